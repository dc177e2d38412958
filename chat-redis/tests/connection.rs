//! The shared Redis layer against a real `redis-server` (started by the tests on a free port;
//! they fail loudly if `redis-server` is not installed — `scripts/test.sh` installs it).
//!
//! `cargo test -p chat-redis`
//!
//! * a call during an outage fails fast with `Unavailable`, and works again after it;
//! * `NOSCRIPT` after `SCRIPT FLUSH` is answered by loading the scripts again, transparently;
//! * the first call after the server restarted (its connection is dead) is retried once and
//!   succeeds;
//! * the `CHAT_*` error replies of scripts become domain errors, other errors `Unavailable`;
//! * connecting to a server that never answers fails within the deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chat_core::Error;
use chat_redis::{RedisConnection, RedisOptions, Script, redis};
use chat_testkit::{RedisServer, SilentServer};

/// An outer bound on every await of these tests: a hang fails the test instead of blocking it.
const HANG: Duration = Duration::from_secs(20);

fn options(op_timeout: Duration) -> RedisOptions {
    RedisOptions::default()
        .with_op_timeout(op_timeout)
        .with_connect_timeout(Duration::from_millis(300))
        .with_response_timeout(Duration::from_millis(500))
}

async fn connect(
    server: &RedisServer,
    options: &RedisOptions,
    scripts: &[&Script],
) -> RedisConnection {
    let client = chat_redis::client(&server.url()).unwrap();
    tokio::time::timeout(HANG, RedisConnection::connect(&client, options, scripts))
        .await
        .expect("connect must not hang")
        .expect("connect to the test redis-server")
}

fn is_redis_unavailable(r: &chat_core::Result<impl std::fmt::Debug>) -> bool {
    matches!(
        r,
        Err(Error::Unavailable {
            backend: "redis",
            ..
        })
    )
}

async fn ping(conn: &RedisConnection) -> chat_core::Result<String> {
    tokio::time::timeout(HANG, conn.query("PING", &redis::cmd("PING")))
        .await
        .expect("a call must not hang")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_during_an_outage_fails_fast_with_unavailable_and_works_after_it() {
    let mut server = RedisServer::start().await;
    let op_timeout = Duration::from_millis(800);
    let conn = connect(&server, &options(op_timeout), &[]).await;
    assert_eq!(ping(&conn).await.unwrap(), "PONG");

    server.kill().await;
    for attempt in 0..3 {
        let started = Instant::now();
        let r = ping(&conn).await;
        let took = started.elapsed();
        assert!(is_redis_unavailable(&r), "attempt {attempt}: {r:?}");
        assert!(r.unwrap_err().is_transient());
        // The op timeout, and some slack for a loaded test machine.
        assert!(
            took < op_timeout + Duration::from_millis(700),
            "attempt {attempt} took {took:?}, the op timeout is {op_timeout:?}"
        );
    }

    server.restart().await;
    let mut back = false;
    for _ in 0..100 {
        match ping(&conn).await {
            Ok(pong) => {
                assert_eq!(pong, "PONG");
                back = true;
                break;
            }
            Err(Error::Unavailable { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("unexpected error after the restart: {e:?}"),
        }
    }
    assert!(back, "the connection did not come back after Redis did");
}

/// A server that stops answering (frozen with `SIGSTOP`; the connection stays open): the
/// deadline is all that ends the call, so the reply timeout is set far beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_server_that_stopped_answering_fails_within_the_op_timeout() {
    let server = RedisServer::start().await;
    let op_timeout = Duration::from_millis(700);
    let options = options(op_timeout).with_response_timeout(Duration::from_secs(60));
    let conn = connect(&server, &options, &[]).await;
    assert_eq!(ping(&conn).await.unwrap(), "PONG");
    server.pause();
    let started = Instant::now();
    let r = ping(&conn).await;
    let took = started.elapsed();
    server.resume();
    assert!(is_redis_unavailable(&r), "{r:?}");
    assert!(
        r.unwrap_err().to_string().contains("PING"),
        "the error names the call"
    );
    assert!(
        took >= op_timeout && took < op_timeout + Duration::from_millis(700),
        "took {took:?}, the op timeout is {op_timeout:?}"
    );
    // Thawed, the same connection answers again.
    let mut back = false;
    for _ in 0..50 {
        if ping(&conn).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "no answer after the server was resumed");
}

#[tokio::test]
async fn noscript_after_script_flush_is_reloaded_transparently() {
    let server = RedisServer::start().await;
    let incr = Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let echo = Script::new("return ARGV[1]");
    let conn = connect(&server, &options(Duration::from_secs(2)), &[&incr, &echo]).await;
    let loaded = || {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("EXISTS").arg(incr.hash()).arg(echo.hash());
        cmd
    };

    // Loaded at connect, before any call.
    let exists: Vec<i64> = conn.query("SCRIPT EXISTS", &loaded()).await.unwrap();
    assert_eq!(exists, [1, 1]);
    let mut call = incr.call(&["n"]);
    call.arg(2);
    assert_eq!(conn.query::<i64>("incr", &call).await.unwrap(), 2);

    // The server forgets every script (as after a restart): the next call gets NOSCRIPT from
    // the server, and succeeds anyway.
    conn.query::<()>("SCRIPT FLUSH", redis::cmd("SCRIPT").arg("FLUSH"))
        .await
        .unwrap();
    let exists: Vec<i64> = conn.query("SCRIPT EXISTS", &loaded()).await.unwrap();
    assert_eq!(exists, [0, 0], "SCRIPT FLUSH did not flush");
    assert_eq!(
        conn.query::<i64>("incr", &call).await.unwrap(),
        4,
        "ran exactly once"
    );
    let exists: Vec<i64> = conn.query("SCRIPT EXISTS", &loaded()).await.unwrap();
    assert_eq!(exists, [1, 1], "every script is loaded again");

    // The same inside a pipeline of script calls.
    conn.query::<()>("SCRIPT FLUSH", redis::cmd("SCRIPT").arg("FLUSH"))
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    pipe.add_command(call.clone());
    let mut hello = echo.call(&[]);
    hello.arg("hello");
    pipe.add_command(hello);
    let (n, said): (i64, String) = conn.query("pipeline", &pipe).await.unwrap();
    assert_eq!((n, said.as_str()), (6, "hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_a_restart_is_retried_once_and_succeeds() {
    let mut server = RedisServer::start().await;
    let echo = Script::new("return ARGV[1]");
    let conn = connect(&server, &options(Duration::from_secs(3)), &[&echo]).await;
    assert_eq!(ping(&conn).await.unwrap(), "PONG");
    for round in 0..3 {
        // The connection the layer holds dies with the server; the new server has no scripts.
        server.restart().await;
        let mut call = echo.call(&[]);
        call.arg(round);
        let r = tokio::time::timeout(HANG, conn.query::<i64>("echo", &call))
            .await
            .expect("must not hang");
        assert_eq!(
            r.unwrap(),
            round,
            "round {round}: the first call after a restart"
        );
        // A plain command after a restart too.
        server.restart().await;
        assert_eq!(ping(&conn).await.unwrap(), "PONG", "round {round}");
    }
}

#[tokio::test]
async fn script_error_codes_become_domain_errors_and_the_rest_unavailable() {
    let server = RedisServer::start().await;
    let fail = Script::new("return redis.error_reply(ARGV[1])");
    let conn = connect(&server, &options(Duration::from_secs(2)), &[&fail]).await;
    let reply = |text: &str| {
        let mut call = fail.call(&[]);
        call.arg(text);
        call
    };
    let r = conn
        .query::<()>("fail", &reply("CHAT_NOT_FOUND conversation 7"))
        .await;
    assert!(
        matches!(&r, Err(Error::NotFound(m)) if m == "conversation 7"),
        "{r:?}"
    );
    let r = conn.query::<()>("fail", &reply("CHAT_NOT_MEMBER 42")).await;
    assert!(
        matches!(&r, Err(Error::NotMember(id)) if id.to_string() == "42"),
        "{r:?}"
    );
    let r = conn
        .query::<()>("fail", &reply("CHAT_NOT_MEMBER nonsense"))
        .await;
    assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
    let r = conn
        .query::<()>("fail", &reply("CHAT_FORBIDDEN not yours"))
        .await;
    assert!(matches!(r, Err(Error::Forbidden(_))), "{r:?}");
    let r = conn
        .query::<()>("fail", &reply("CHAT_INVALID deleted"))
        .await;
    assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    let r = conn
        .query::<()>("fail", &reply("CHAT_CONFLICT again"))
        .await;
    assert!(
        matches!(&r, Err(e @ Error::Conflict(_)) if e.is_transient()),
        "{r:?}"
    );
    let r = conn.query::<()>("fail", &reply("CHAT_INTERNAL bug")).await;
    assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");

    // Any other server error, and a reply of the wrong type: Unavailable.
    conn.query::<()>("SET", redis::cmd("SET").arg("s").arg("x"))
        .await
        .unwrap();
    let r = conn
        .query::<i64>("LPUSH", redis::cmd("LPUSH").arg("s").arg("x"))
        .await;
    assert!(is_redis_unavailable(&r), "WRONGTYPE: {r:?}");
    let r = conn.query::<i64>("GET", redis::cmd("GET").arg("s")).await;
    assert!(is_redis_unavailable(&r), "not an integer: {r:?}");
}

#[tokio::test]
async fn connecting_to_a_server_that_never_answers_fails_within_the_deadline() {
    let silent = SilentServer::start().await;
    let op_timeout = Duration::from_millis(600);
    let client = chat_redis::client(&silent.url()).unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(
        HANG,
        RedisConnection::connect(&client, &options(op_timeout), &[]),
    )
    .await
    .expect("connecting to a silent server must not hang");
    assert!(is_redis_unavailable(&r), "{r:?}");
    assert!(started.elapsed() < op_timeout + Duration::from_millis(700));

    // And nothing listening at all.
    let port = chat_testkit::free_port();
    let client = chat_redis::client(&format!("redis://127.0.0.1:{port}/")).unwrap();
    let r = tokio::time::timeout(
        HANG,
        RedisConnection::connect(
            &client,
            &options(op_timeout).with_reconnect_attempts(1),
            &[],
        ),
    )
    .await
    .expect("connecting to a closed port must not hang");
    assert!(is_redis_unavailable(&r), "{r:?}");
}
