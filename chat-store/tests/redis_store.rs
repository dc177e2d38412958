//! `RedisStore` against a real `redis-server` (started by the tests on a free port; the test
//! fails loudly if `redis-server` is not installed — `scripts/test.sh` installs it).
//!
//! `cargo test -p chat-store --test redis_store`
//!
//! * The whole `MessageStore` conformance suite, each case on a fresh store with a random key
//!   prefix, all sharing one server.
//! * Redis-specific cases: two stores ("nodes") appending concurrently, data surviving a new
//!   connection, a crash of Redis with `appendfsync always` (acked messages survive, the store
//!   reconnects), and operations during an outage failing fast with `Unavailable`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Weak};
use std::time::Duration;

use chat_core::Error;
use chat_core::model::{Message, MessageChange, ReceiptKind};
use chat_core::store::{DynMessageStore, MessageStore};
use chat_core::testing::store::{Fixture, random_u64};
use chat_store::{RedisOptions, RedisStore};
use chat_testkit::{RedisServer, random_prefix};

/// The server shared by the tests of this process that are running at the moment: each test
/// holds an `Arc`, the last one to finish kills it (a static would never be dropped, leaving
/// the process behind), and the next test starts a new one.
static SHARED: tokio::sync::Mutex<Weak<RedisServer>> = tokio::sync::Mutex::const_new(Weak::new());

async fn shared_server() -> Arc<RedisServer> {
    let mut shared = SHARED.lock().await;
    if let Some(server) = shared.upgrade() {
        return server;
    }
    let server = Arc::new(RedisServer::start().await);
    *shared = Arc::downgrade(&server);
    server
}

/// A fresh store (random prefix) on the shared server, and the server as the guard that keeps
/// it alive while the case runs.
async fn redis_test_store() -> (DynMessageStore, Arc<RedisServer>) {
    let server = shared_server().await;
    let store = RedisStore::connect(&server.url(), &random_prefix())
        .await
        .expect("connect to the test redis-server");
    (Arc::new(store), server)
}

chat_core::store_conformance_tests!(with_guard, redis_test_store);

// ------------------------------------------------------------------- Redis-specific cases

/// Two stores, as on two chat nodes, append to one conversation concurrently: seqs are exactly
/// 1..=N and both nodes read the same timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_append_gap_free() {
    let server = shared_server().await;
    let prefix = random_prefix();
    let node = || async { Arc::new(RedisStore::connect(&server.url(), &prefix).await.unwrap()) };
    chat_core::testing::store::two_nodes_append_gap_free(node().await, node().await, 8, 50).await;
}

/// Everything is in Redis, nothing in the store value: a new store on the same prefix sees the
/// same conversations, timeline, markers and idempotency keys; another prefix sees nothing.
#[tokio::test]
async fn data_survives_a_new_connection() {
    let server = shared_server().await;
    let prefix = random_prefix();
    let fx = Fixture::new();
    let (conv, users, sent, key) = {
        let first = RedisStore::connect(&server.url(), &prefix).await.unwrap();
        let (conv, users) = fx.group(&first, 2).await;
        let mut sent = Vec::new();
        for i in 0..5 {
            sent.push(
                fx.send(&first, conv.id, &users[i % 2], &format!("m{i}"))
                    .await,
            );
        }
        first
            .set_marker(conv.id, &users[1], ReceiptKind::Read, 3)
            .await
            .unwrap();
        let key = sent[4].client_msg_id.clone();
        (conv, users, sent, key)
    };

    let second = RedisStore::connect(&server.url(), &prefix).await.unwrap();
    assert_eq!(second.prefix(), prefix);
    assert_eq!(second.messages_after(conv.id, 0, 100).await.unwrap(), sent);
    let now = second.conversation(conv.id).await.unwrap().unwrap();
    assert_eq!((now.last_seq, now.members.len()), (5, 2));
    assert_eq!(
        second
            .member(conv.id, &users[1])
            .await
            .unwrap()
            .unwrap()
            .last_read_seq,
        3
    );
    assert_eq!(second.unread(conv.id, &users[1]).await.unwrap(), 1);
    let retry = second
        .append(fx.new_message(conv.id, &users[0], &key, "retry"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.message, sent[4]);
    assert_eq!(
        second
            .list_conversations(&users[0], None, 10)
            .await
            .unwrap()
            .items[0]
            .conversation
            .id,
        conv.id
    );

    let other = RedisStore::connect(&server.url(), &random_prefix())
        .await
        .unwrap();
    assert_eq!(other.conversation(conv.id).await.unwrap(), None);
    assert!(other.conversation_ids(&users[0]).await.unwrap().is_empty());
}

/// Redis is killed (SIGKILL) and started again with `appendfsync always`: every acked message
/// is still there; while it is down, operations fail with `Unavailable` within the operation
/// timeout; afterwards the same store works again without being recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_redis_crash_and_reconnects() {
    let mut server =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let options = RedisOptions::default()
        .with_op_timeout(Duration::from_millis(1_500))
        .with_connect_timeout(Duration::from_millis(300))
        .with_response_timeout(Duration::from_millis(500));
    let store = RedisStore::connect_with(&server.url(), &random_prefix(), options)
        .await
        .unwrap();
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(
            fx.send(&store, conv.id, &users[i % 2], &format!("m{i}"))
                .await,
        );
    }

    server.kill().await;
    for attempt in 0..3 {
        // Bounded so that a hang fails the test instead of blocking it; the store's own bound
        // is 1.5 s.
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            store.append(fx.new_message(conv.id, &users[0], "during-outage", "lost?")),
        )
        .await
        .expect("an operation during the outage must not hang");
        assert!(
            matches!(
                r,
                Err(Error::Unavailable {
                    backend: "redis",
                    ..
                })
            ),
            "attempt {attempt} during the outage: {r:?}"
        );
        assert!(r.unwrap_err().is_transient());
        let r = tokio::time::timeout(Duration::from_secs(20), store.history(conv.id, None, 5))
            .await
            .expect("a read during the outage must not hang");
        assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    }

    server.restart().await;
    // The store reconnects by itself; give it a bounded number of tries.
    let mut back = None;
    for _ in 0..100 {
        match store.messages_after(conv.id, 0, 100).await {
            Ok(messages) => {
                back = Some(messages);
                break;
            }
            Err(Error::Unavailable { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("unexpected error after restart: {e:?}"),
        }
    }
    let back = back.expect("the store did not reconnect after Redis came back");
    // Every acked message survived the crash. The append attempted during the outage was never
    // acked: it is either absent or (had it reached Redis) retried idempotently below.
    assert!(
        back.len() >= acked.len(),
        "acked messages lost in the crash"
    );
    assert_eq!(
        &back[..acked.len()],
        &acked[..],
        "acked messages changed in the crash"
    );
    let retried = store
        .append(fx.new_message(conv.id, &users[0], "during-outage", "again"))
        .await
        .unwrap();
    let next = fx.send(&store, conv.id, &users[1], "after").await;
    assert_eq!(
        next.seq,
        retried.message.seq + 1,
        "gap-free after the restart"
    );
    assert_eq!(store.last_seq(conv.id).await.unwrap(), next.seq);
    assert_eq!(
        store.messages_after(conv.id, 0, 100).await.unwrap().len() as u64,
        next.seq
    );
}

/// The first operation after Redis restarted, a read or a script, succeeds: the shared layer
/// retries it once on the new connection (and once more after loading the scripts the new
/// server does not have).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_operation_after_a_redis_restart_succeeds() {
    let mut server =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let options = RedisOptions::default().with_op_timeout(Duration::from_secs(3));
    let store = RedisStore::connect_with(&server.url(), &random_prefix(), options)
        .await
        .unwrap();
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let first = fx.send(&store, conv.id, &users[0], "before").await;

    server.restart().await;
    let read = store.messages_after(conv.id, 0, 10).await;
    assert_eq!(read.expect("the first read after the restart"), [first]);
    server.restart().await;
    let appended = store
        .append(fx.new_message(conv.id, &users[1], "after", "after"))
        .await
        .expect("the first append after another restart");
    assert_eq!(appended.message.seq, 2);
}

/// Connecting to a port where nothing listens fails with `Unavailable` (not a hang, not a
/// panic); bad arguments are `Invalid`.
#[tokio::test]
async fn connection_failures_and_bad_arguments() {
    let port = chat_testkit::free_port();
    let options = RedisOptions::default()
        .with_op_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_millis(200))
        .with_reconnect_attempts(1);
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        RedisStore::connect_with(&format!("redis://127.0.0.1:{port}/"), "p", options),
    )
    .await
    .expect("connecting must not hang");
    assert!(
        matches!(
            r,
            Err(Error::Unavailable {
                backend: "redis",
                ..
            })
        ),
        "{r:?}"
    );
    let r = RedisStore::connect("not a url", "p").await;
    assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    let server = shared_server().await;
    let r = RedisStore::connect(&server.url(), "").await;
    assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    let store = RedisStore::connect(&server.url(), "p").await.unwrap();
    let debug = format!("{store:?}");
    assert!(
        debug.contains("RedisStore") && !debug.contains("127.0.0.1"),
        "{debug}"
    );
}

/// A server that accepts connections but never answers (a hung Redis, a black-holed network):
/// connecting fails with `Unavailable` within the operation timeout instead of hanging.
#[tokio::test]
async fn a_server_that_never_answers_gives_unavailable() {
    let silent = chat_testkit::SilentServer::start().await;
    let options = RedisOptions::default()
        .with_op_timeout(Duration::from_millis(800))
        .with_connect_timeout(Duration::from_millis(300))
        .with_response_timeout(Duration::from_millis(300));
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        RedisStore::connect_with(&silent.url(), "p", options),
    )
    .await
    .expect("connecting to a silent server must not hang");
    assert!(
        matches!(
            r,
            Err(Error::Unavailable {
                backend: "redis",
                ..
            })
        ),
        "{r:?}"
    );
}

/// `unread` (three O(log n) counts over the per-sender and deleted seq sets) agrees with its
/// definition, a scan of the timeline, after a random mix of appends, deletes and markers.
#[tokio::test]
async fn unread_matches_a_scan_after_random_operations() {
    let (store, _server) = redis_test_store().await;
    let fx = Fixture::new();
    let (conv, users) = fx.group(&*store, 4).await;
    let mut sent: Vec<Message> = Vec::new();
    let mut x = random_u64() | 1;
    for i in 0..400u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let user = &users[(x % 4) as usize];
        match (x >> 8) % 10 {
            0..=5 => sent.push(fx.send(&*store, conv.id, user, "m").await),
            6 | 7 if !sent.is_empty() => {
                let m = &sent[((x >> 16) as usize) % sent.len()];
                // Deleting twice is Invalid; that is fine here.
                let _ = store
                    .change_message(
                        conv.id,
                        m.message_id,
                        &m.sender_id,
                        MessageChange::Delete,
                        i,
                    )
                    .await;
            }
            _ => {
                let seq = (x >> 20) % (sent.len() as u64 + 2);
                store
                    .set_marker(conv.id, user, ReceiptKind::Read, seq)
                    .await
                    .unwrap();
            }
        }
        if i % 40 == 0 || i == 399 {
            let timeline = store.messages_after(conv.id, 0, usize::MAX).await.unwrap();
            for u in &users {
                let read = store
                    .member(conv.id, u)
                    .await
                    .unwrap()
                    .unwrap()
                    .last_read_seq;
                let naive = timeline
                    .iter()
                    .filter(|m| m.seq > read && &m.sender_id != u && !m.deleted)
                    .count() as u64;
                assert_eq!(store.unread(conv.id, u).await.unwrap(), naive, "step {i}");
            }
        }
    }
}
