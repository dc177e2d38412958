//! Several `chat-server` processes with the message store on a real CQL node (Apache Cassandra
//! 5.0, started by `scripts/test.sh` and named by `CHAT_TEST_SCYLLA_URI`) and presence/router on
//! a real Redis: one chat whose history lives in CQL. **Fails without `CHAT_TEST_SCYLLA_URI`**
//! (`scripts/test.sh` skips it loudly only when Java 11/17 or Maven is missing).
//!
//! `CHAT_TEST_SCYLLA_URI=127.0.0.1:19042 cargo test -p chat-examples --test cql_cluster`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

mod common;

use chat_testkit::{CassandraNode, RedisServer};
use common::{Node, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The first process creates the keyspace and its tables, which takes a few seconds.
const START_WAIT: Duration = Duration::from_secs(90);

fn scylla_uri() -> String {
    chat_testkit::test_contact_points().join(",")
}

/// One keyspace for this test process (random, so runs never share data).
fn keyspace() -> &'static str {
    static KS: OnceLock<String> = OnceLock::new();
    KS.get_or_init(|| format!("chat_gw_{:012x}", random_u64() & 0xffff_ffff_ffff))
}

/// A `chat-server` process with its store on the test CQL node and presence/router on `redis`.
async fn start_node(redis: &RedisServer, id: u16) -> Node {
    let env = [
        ("CHAT_REDIS_URL", redis.url()),
        ("CHAT_SCYLLA_URI", scylla_uri()),
        ("CHAT_SCYLLA_KEYSPACE", keyspace().to_owned()),
        ("CHAT_NODE_ID", id.to_string()),
    ];
    Node::spawn(&env, START_WAIT).await
}

fn contents(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Two processes (CQL store, Redis presence and router): a conversation created on one is
/// used on the other, messages flow both ways live, and the history is the same from both.
/// Then both processes and the Redis server go away: a new process on a *fresh* Redis serves
/// the whole history and the conversation list, so they live in the CQL store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_two_processes_share_history_that_outlives_them_and_redis() {
    let redis = RedisServer::start().await;
    let a = start_node(&redis, 1).await;
    let b = start_node(&redis, 2).await;
    let (alice, bob) = (
        format!("alice{:x}", random_u64()),
        format!("bob{:x}", random_u64()),
    );
    let (status, body) = a
        .http(
            "POST",
            "/api/conversations",
            &alice,
            Some(json!({"kind": "direct", "members": [bob]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let conv = body["id"].as_str().unwrap().to_owned();

    let mut alice_ws = a.ws(&alice).await;
    let mut bob_ws = b.ws(&bob).await;
    let first = alice_ws.send_message(&conv, "a1", "hi from A").await;
    assert_eq!(first["seq"], 1);
    assert_eq!(
        bob_ws.recv_type("message").await["message"]["content"],
        "hi from A"
    );
    let ack = bob_ws.send_message(&conv, "b1", "hi from B").await;
    assert_eq!(ack["seq"], 2);
    assert_eq!(
        alice_ws.recv_type("message").await["message"]["content"],
        "hi from B"
    );
    // A retried send (same client_msg_id) through the other node is the same message.
    let mut alice_on_b = b.ws(&alice).await;
    let again = alice_on_b.send_message(&conv, "a1", "hi from A").await;
    assert_eq!(
        (&again["seq"], &again["message_id"]),
        (&first["seq"], &first["message_id"])
    );

    let path = format!("/api/conversations/{conv}/messages");
    let (s1, from_a) = a.http("GET", &path, &bob, None).await;
    let (s2, from_b) = b.http("GET", &path, &alice, None).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(contents(&from_a), vec!["hi from B", "hi from A"]);
    assert_eq!(from_a["messages"], from_b["messages"]);

    drop((alice_ws, bob_ws, alice_on_b));
    drop((a, b));
    drop(redis);

    let fresh_redis = RedisServer::start().await;
    let c = start_node(&fresh_redis, 3).await;
    let (status, page) = c.http("GET", &path, &bob, None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"], from_a["messages"], "history from CQL");
    let (_, list) = c.http("GET", "/api/conversations", &alice, None).await;
    assert_eq!(list["conversations"][0]["id"], conv.as_str());
    assert_eq!(list["conversations"][0]["last_seq"], 2);
    assert_eq!(list["conversations"][0]["unread"], 1);
    let mut bob_ws = c.ws(&bob).await;
    assert_eq!(bob_ws.send_message(&conv, "b2", "after").await["seq"], 3);
}

/// No CQL node at `CHAT_SCYLLA_URI`: the server refuses to start, with an error naming the
/// setting, instead of serving without a store.
#[tokio::test]
async fn cql_server_refuses_to_start_without_a_reachable_node() {
    let dead = free_port();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(env!("CARGO_BIN_EXE_chat-server"))
            .env("CHAT_BIND", format!("127.0.0.1:{}", free_port()))
            .env("CHAT_SCYLLA_URI", format!("127.0.0.1:{dead}"))
            .env("CHAT_SCYLLA_KEYSPACE", keyspace())
            .env("RUST_LOG", "warn")
            .env_remove("CHAT_REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the server gives up within 60 s")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CHAT_SCYLLA_URI"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{dead}")), "{stderr}");
}

/// The raw response head (status line and headers), for headers like `Retry-After`.
async fn http_head(port: u16, path: &str, user: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-chat-user: {user}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).to_string();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

/// The CQL node dies under a running server: HTTP answers 503 with `Retry-After`, a send gets
/// an `error` frame (the socket stays open), nothing hangs. The node comes back (same data):
/// the server recovers by itself, the acked message is in history, and the retried send with
/// the same client_msg_id is the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_node_down_gives_503_with_retry_after_and_the_server_recovers() {
    scylla_uri(); // like every test here, needs the CQL test setup
    let node = CassandraNode::start().await;
    let redis = RedisServer::start().await;
    let srv = Node::spawn(
        &[
            ("CHAT_REDIS_URL", redis.url()),
            ("CHAT_SCYLLA_URI", node.uri()),
            ("CHAT_SCYLLA_KEYSPACE", "chat_gw_fault".to_owned()),
            ("RUST_LOG", "error".to_owned()),
        ],
        START_WAIT,
    )
    .await;
    let (alice, bob) = ("alice", "bob");
    let (status, body) = srv
        .http(
            "POST",
            "/api/conversations",
            alice,
            Some(json!({"kind": "direct", "members": [bob]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let conv = body["id"].as_str().unwrap().to_owned();
    let mut ws = srv.ws(alice).await;
    let first = ws.send_message(&conv, "m1", "before the outage").await;
    let path = format!("/api/conversations/{conv}/messages");

    node.kill().await;
    let head = http_head(srv.port, &path, bob).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    ws.send(json!({"type": "message", "conversation_id": conv, "client_msg_id": "m2", "content": "during"}))
        .await;
    let err = ws.recv_type("error").await;
    assert_eq!(err["client_msg_id"], "m2", "{err}");

    node.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let page = loop {
        let (status, page) = srv.http("GET", &path, bob, None).await;
        if status == 200 {
            break page;
        }
        assert_eq!(status, 503, "{page}");
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(page["messages"][0]["message_id"], first["message_id"]);
    // The socket survived the outage; the retry of the failed send is stored once.
    let ack = ws.send_message(&conv, "m2", "during").await;
    assert_eq!(ack["seq"], 2);
    let again = ws.send_message(&conv, "m2", "during").await;
    assert_eq!(again["message_id"], ack["message_id"]);
}
