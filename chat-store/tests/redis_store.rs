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
use chat_core::UserId;
use chat_core::id::{ConversationId, MessageId};
use chat_core::memory::MemoryStore;
use chat_core::model::{Change, Message, MessageChange, Reaction, ReceiptKind, StreamPosition};
use chat_core::store::{DynMessageStore, MessageStore};
use chat_core::testing::store::{Fixture, random_u64};
use chat_redis::redis;
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

/// The change-stream conformance suite, on the same kind of fresh store.
mod change_stream {
    use super::*;
    chat_core::change_stream_conformance_tests!(with_guard, redis_test_store);
}

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

// ------------------------------------------------------------------- the change stream

/// Both results equal, or both errors of the same kind (the texts may differ); the value.
fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    redis: chat_core::Result<T>,
    memory: chat_core::Result<T>,
) -> Option<T> {
    match (redis, memory) {
        (Ok(r), Ok(m)) => {
            assert_eq!(r, m, "{what}: redis vs memory");
            Some(r)
        }
        (Err(r), Err(m)) => {
            assert_eq!(
                std::mem::discriminant(&r),
                std::mem::discriminant(&m),
                "{what}: redis {r:?} vs memory {m:?}"
            );
            None
        }
        (r, m) => panic!("{what}: redis {r:?} vs memory {m:?}"),
    }
}

/// Every page of a replay from `after`, `limit` at a time, with the epoch left out.
async fn replay(
    store: &dyn MessageStore,
    conv: ConversationId,
    after: u64,
    limit: usize,
) -> Vec<(u64, Vec<Change>, Option<u64>)> {
    let mut pages = Vec::new();
    let mut from = after;
    loop {
        let page = store
            .changes_after(conv, from, limit)
            .await
            .unwrap()
            .expect("a change stream");
        let next = page.next;
        pages.push((page.stream.position, page.changes, next));
        match next {
            Some(p) if limit > 0 => from = p,
            _ => return pages,
        }
    }
}

/// The Redis store against the in-memory reference (whose semantics are the spec), on one random
/// mix of every change (appends and their retries, edits, deletes, reactions, markers, members
/// joining and leaving, a direct conversation restored): every result, position and replay is
/// the same; only the epochs differ.
#[tokio::test]
async fn change_stream_matches_the_memory_store() {
    let (redis, _server) = redis_test_store().await;
    let memory: DynMessageStore = Arc::new(MemoryStore::new());
    let fx = Fixture::new();
    let users = fx.users("u", 5);
    let new = fx.new_group(&users[0], &users[1..4]);
    let conv = same(
        "create",
        redis.create_conversation(new.clone()).await,
        memory.create_conversation(new).await,
    )
    .unwrap()
    .id;
    let epoch = redis.stream(conv).await.unwrap().unwrap().epoch;
    assert_ne!(epoch, 0);
    assert_eq!(
        redis.stream(conv).await.unwrap(),
        Some(StreamPosition { epoch, position: 0 })
    );
    let keys = ["👍", "ok", "❤️", "bad key", "x", "\u{3000}", "/"];
    let mut sent: Vec<MessageId> = Vec::new();
    let mut x = random_u64() | 1;
    for i in 0..500u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let user = &users[(x % 5) as usize];
        let pick = |sent: &[MessageId]| sent[((x >> 24) as usize) % sent.len().max(1)];
        match (x >> 8) % 12 {
            0..=3 => {
                let m = fx.new_message(conv, user, &format!("k{}", (x >> 16) % 40), "m");
                let a = same(
                    "append",
                    redis.append(m.clone()).await,
                    memory.append(m).await,
                );
                if let Some(a) = a.filter(|a| !a.duplicate) {
                    sent.push(a.message.message_id);
                }
            }
            4 | 5 if !sent.is_empty() => {
                let id = pick(&sent);
                let change = if (x >> 8) % 12 == 4 {
                    MessageChange::Edit {
                        content: format!("e{i}"),
                    }
                } else {
                    MessageChange::Delete
                };
                // By a random user: Forbidden unless it is the sender.
                same(
                    "change",
                    redis
                        .change_message(conv, id, user, change.clone(), i)
                        .await,
                    memory.change_message(conv, id, user, change, i).await,
                );
            }
            6..=8 if !sent.is_empty() => {
                let id = pick(&sent);
                let key = (x >> 40) as usize % (keys.len() + 1);
                let key = keys.get(key).copied();
                same(
                    "react",
                    redis.react(conv, id, user, key).await,
                    memory.react(conv, id, user, key).await,
                );
            }
            9 => {
                let kind = if x >> 63 == 0 {
                    ReceiptKind::Read
                } else {
                    ReceiptKind::Delivered
                };
                let seq = (x >> 32) % (sent.len() as u64 + 3);
                same(
                    "marker",
                    redis.set_marker(conv, user, kind, seq).await,
                    memory.set_marker(conv, user, kind, seq).await,
                );
            }
            10 => {
                let add = [user.clone(), users[((x >> 32) % 5) as usize].clone()];
                same(
                    "add",
                    redis.add_members(conv, &add, i).await,
                    memory.add_members(conv, &add, i).await,
                );
            }
            _ => {
                same(
                    "remove",
                    redis.remove_member(conv, user).await,
                    memory.remove_member(conv, user).await,
                );
            }
        }
        if i % 50 == 49 {
            let r = redis.stream(conv).await.unwrap().unwrap();
            let m = memory.stream(conv).await.unwrap().unwrap();
            assert_eq!((r.epoch, r.position), (epoch, m.position), "step {i}");
            for after in [0, m.position / 2, m.position.saturating_sub(1), m.position] {
                for limit in [0, 1, 3, 1000] {
                    assert_eq!(
                        replay(&*redis, conv, after, limit).await,
                        replay(&*memory, conv, after, limit).await,
                        "step {i}: replay after {after}, {limit} at a time"
                    );
                }
            }
        }
    }
    let full = replay(&*redis, conv, 0, 1000).await;
    assert!(
        full[0]
            .1
            .iter()
            .any(|c| matches!(c, Change::Message { message, .. } if !message.reactions.is_empty())),
        "the mix should leave some reactions"
    );
    // Every read path carries the reactions.
    same(
        "history",
        redis.history(conv, None, 1000).await,
        memory.history(conv, None, 1000).await,
    );
    same(
        "messages_after",
        redis.messages_after(conv, 0, 1000).await,
        memory.messages_after(conv, 0, 1000).await,
    );
    for &id in &sent {
        same(
            "message",
            redis.message(conv, id).await,
            memory.message(conv, id).await,
        );
    }
    for u in &users {
        same(
            "list",
            redis.list_conversations(u, None, 10).await,
            memory.list_conversations(u, None, 10).await,
        );
    }

    // A direct conversation restored by create_conversation records the join.
    let (a, b) = (fx.user("da"), fx.user("db"));
    let direct = fx.new_direct(&a, &b);
    let d = same(
        "create direct",
        redis.create_conversation(direct.clone()).await,
        memory.create_conversation(direct.clone()).await,
    )
    .unwrap()
    .id;
    let m = fx.new_message(d, &a, "d1", "hi");
    same(
        "append",
        redis.append(m.clone()).await,
        memory.append(m).await,
    );
    same(
        "leave",
        redis.remove_member(d, &b).await,
        memory.remove_member(d, &b).await,
    );
    let again = chat_core::model::NewConversation {
        id: fx.conversation_id(),
        creator: b.clone(),
        members: vec![a.clone()],
        ..direct
    };
    let back = same(
        "restore direct",
        redis.create_conversation(again.clone()).await,
        memory.create_conversation(again).await,
    )
    .unwrap();
    assert_eq!(back.id, d);
    let r = replay(&*redis, d, 0, 10).await;
    assert_eq!(r, replay(&*memory, d, 0, 10).await);
    assert_eq!(
        r[0].1.last(),
        Some(&Change::Membership {
            position: 3,
            user_id: b.clone(),
            member: true
        })
    );
}

/// Two stores ("nodes") on one prefix make appends, edits, reactions and marker moves on one
/// conversation concurrently: the positions they return are exactly 1..=N, the stream is at N
/// on both nodes, with one epoch, and the replay has every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_positions_are_gap_free() {
    let server = shared_server().await;
    let prefix = random_prefix();
    let node = || async { Arc::new(RedisStore::connect(&server.url(), &prefix).await.unwrap()) };
    let nodes = [node().await, node().await];
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&*nodes[0], 8).await;
    let mut positions = Vec::new();
    let mut seeds = Vec::new();
    for u in &users {
        let new = fx.new_message(conv.id, u, &fx.client_msg_id(), "seed");
        let a = nodes[0].append(new).await.unwrap();
        positions.push(a.position.unwrap());
        seeds.push(a.message.message_id);
    }
    let seeds = Arc::new(seeds);
    let mut tasks = Vec::new();
    for (t, user) in users.iter().cloned().enumerate() {
        let (store, fx, seeds) = (nodes[t % 2].clone(), fx.clone(), seeds.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut positions = Vec::new();
            for i in 0..40usize {
                let p = match i % 4 {
                    0 => {
                        let new = fx.new_message(conv.id, &user, &fx.client_msg_id(), "m");
                        let a = store.append(new).await.unwrap();
                        mine.push(a.message.message_id);
                        a.position
                    }
                    1 => {
                        let edit = MessageChange::Edit {
                            content: format!("e{i}"),
                        };
                        let id = *mine.last().unwrap();
                        store
                            .change_message(conv.id, id, &user, edit, i as u64)
                            .await
                            .unwrap()
                            .position
                    }
                    2 => {
                        let id = seeds[(t + i) % seeds.len()];
                        let key = ["a", "b", "c"][i % 3];
                        store
                            .react(conv.id, id, &user, Some(key))
                            .await
                            .unwrap()
                            .position
                    }
                    _ => {
                        store
                            .set_marker(conv.id, &user, ReceiptKind::Read, (i * 3) as u64)
                            .await
                            .unwrap()
                            .position
                    }
                };
                positions.extend(p);
            }
            positions
        }));
    }
    for t in tasks {
        positions.extend(t.await.unwrap());
    }
    positions.sort_unstable();
    let n = positions.len() as u64;
    assert_eq!(
        positions,
        (1..=n).collect::<Vec<_>>(),
        "gap-free, no duplicate"
    );
    let s0 = nodes[0].stream(conv.id).await.unwrap().unwrap();
    let s1 = nodes[1].stream(conv.id).await.unwrap().unwrap();
    assert_eq!(s0, s1);
    assert_eq!(s0.position, n);
    let page = nodes[1]
        .changes_after(conv.id, 0, 10_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.next, None);
    let messages = page
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Message { .. }))
        .count();
    assert_eq!(messages as u64, nodes[0].last_seq(conv.id).await.unwrap());
    let at: Vec<u64> = page.changes.iter().map(Change::position).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "in position order");
    assert_eq!(at.last(), Some(&n));
}

/// The suite's two-node case: appends, edits, reactions and markers from two stores on one
/// prefix take positions 1..=N, and both see the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_positions_gap_free_suite_case() {
    let server = shared_server().await;
    let prefix = random_prefix();
    let node = || async { Arc::new(RedisStore::connect(&server.url(), &prefix).await.unwrap()) };
    chat_core::testing::stream::two_nodes_positions_gap_free(node().await, node().await, 60).await;
}

/// A raw connection to the test server, for what the store never does.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A conversation whose stream state is lost (epoch and position gone, or only the log gone,
/// or the whole database flushed and the conversation created again with the same id) gets a
/// new stream: a different epoch, positions from 1 again.
#[tokio::test]
async fn a_lost_stream_gets_a_new_epoch() {
    let server = RedisServer::start().await;
    let prefix = random_prefix();
    let store = RedisStore::connect(&server.url(), &prefix).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let fx = Fixture::new();
    let (a, b) = (fx.user("a"), fx.user("b"));
    let new = fx.new_direct(&a, &b);
    let conv = store.create_conversation(new.clone()).await.unwrap();
    for _ in 0..3 {
        fx.send(&store, conv.id, &a, "m").await;
    }
    let first = store.stream(conv.id).await.unwrap().unwrap();
    assert_eq!(first.position, 3);

    // Epoch and position lost.
    let ck = format!("{prefix}:conv:{}", conv.id);
    let xk = format!("{prefix}:changes:{}", conv.id);
    let _: () = redis::cmd("HDEL")
        .arg(&ck)
        .arg("epoch")
        .arg("position")
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = store.stream(conv.id).await.unwrap().unwrap();
    assert_ne!(second.epoch, first.epoch);
    assert_eq!(second.position, 0);
    assert_eq!(
        store.stream(conv.id).await.unwrap().unwrap(),
        second,
        "stable"
    );
    let m = fx.send(&store, conv.id, &b, "after").await;
    let page = store.changes_after(conv.id, 0, 10).await.unwrap().unwrap();
    assert_eq!(
        page.stream,
        StreamPosition {
            position: 1,
            ..second
        }
    );
    assert_eq!(
        page.changes,
        vec![Change::Message {
            position: 1,
            message: Box::new(m)
        }],
        "the old log went with the old stream"
    );

    // Only the log lost: a position past 0 without a log is a lost stream too.
    let _: () = redis::cmd("DEL")
        .arg(&xk)
        .query_async(&mut conn)
        .await
        .unwrap();
    let marker = store
        .set_marker(conv.id, &b, ReceiptKind::Read, 4)
        .await
        .unwrap();
    assert_eq!(marker.position, Some(1));
    let third = store.stream(conv.id).await.unwrap().unwrap();
    assert_ne!(third.epoch, second.epoch);
    assert_eq!(third.position, 1);

    // Everything lost, the conversation created again with the same id.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    assert_eq!(store.conversation(conv.id).await.unwrap(), None);
    let again = store.create_conversation(new).await.unwrap();
    assert_eq!(again.id, conv.id);
    let fourth = store.stream(conv.id).await.unwrap().unwrap();
    assert_eq!(fourth.position, 0);
    assert!(![first.epoch, second.epoch, third.epoch].contains(&fourth.epoch));
}

/// The reaction rule, case by case, against the in-memory reference: one reaction per user,
/// a new key replacing the old one, at most `Reaction::MAX_KEYS` keys (a user's only-user key
/// frees its slot), bad keys (Unicode whitespace too), deleted messages, non-members, unknown
/// messages; an edit keeps the reactions, a delete clears them.
#[tokio::test]
async fn reaction_rules_match_the_memory_store() {
    let (redis, _server) = redis_test_store().await;
    let memory: DynMessageStore = Arc::new(MemoryStore::new());
    let fx = Fixture::new();
    let max = Reaction::MAX_KEYS;
    let users = fx.users("r", max + 2);
    let outsider = fx.user("outsider");
    let new = fx.new_group(&users[0], &users[1..]);
    let conv = same(
        "create",
        redis.create_conversation(new.clone()).await,
        memory.create_conversation(new).await,
    )
    .unwrap()
    .id;
    let m = fx.new_message(conv, &users[0], "m", "hello");
    let id = same(
        "append",
        redis.append(m.clone()).await,
        memory.append(m).await,
    )
    .unwrap()
    .message
    .message_id;
    let react = async |user: &UserId, key: Option<&str>| {
        same(
            &format!("react {user} {key:?}"),
            redis.react(conv, id, user, key).await,
            memory.react(conv, id, user, key).await,
        )
    };
    for (i, u) in users.iter().take(max).enumerate() {
        let r = react(u, Some(&format!("k{i}"))).await.unwrap();
        assert!(r.position.is_some());
    }
    assert_eq!(react(&users[max], Some("one-too-many")).await, None);
    assert!(
        react(&users[max], Some("k3"))
            .await
            .unwrap()
            .position
            .is_some()
    );
    // users[3] is no longer k3's only user: switching does not free a slot.
    assert_eq!(react(&users[3], Some("new")).await, None);
    // users[0] is k0's only user: switching frees its slot.
    assert!(
        react(&users[0], Some("new"))
            .await
            .unwrap()
            .position
            .is_some()
    );
    assert_eq!(
        react(&users[0], Some("new")).await.unwrap().position,
        None,
        "same again"
    );
    assert!(react(&users[0], None).await.unwrap().position.is_some());
    assert_eq!(
        react(&users[0], None).await.unwrap().position,
        None,
        "nothing to remove"
    );
    for bad in ["", "a b", "\u{3000}", "\u{85}", "tab\t", &"x".repeat(65)] {
        assert_eq!(react(&users[1], Some(bad)).await, None, "{bad:?}");
    }
    assert!(react(&users[1], Some(&"x".repeat(64))).await.is_some());
    assert_eq!(react(&outsider, Some("k1")).await, None, "not a member");
    let unknown = fx.message_id();
    same(
        "unknown message",
        redis.react(conv, unknown, &users[1], Some("k1")).await,
        memory.react(conv, unknown, &users[1], Some("k1")).await,
    );
    same(
        "unknown conversation",
        redis.react(fx.conversation_id(), id, &users[1], None).await,
        memory
            .react(fx.conversation_id(), id, &users[1], None)
            .await,
    );
    let edit = MessageChange::Edit {
        content: "edited".into(),
    };
    let edited = same(
        "edit",
        redis
            .change_message(conv, id, &users[0], edit.clone(), 5)
            .await,
        memory.change_message(conv, id, &users[0], edit, 5).await,
    )
    .unwrap();
    assert_eq!(
        edited.message.reactions.len(),
        max - 1,
        "k0 left with users[0]"
    );
    let deleted = same(
        "delete",
        redis
            .change_message(conv, id, &users[0], MessageChange::Delete, 6)
            .await,
        memory
            .change_message(conv, id, &users[0], MessageChange::Delete, 6)
            .await,
    )
    .unwrap();
    assert!(deleted.message.reactions.is_empty());
    assert_eq!(react(&users[1], Some("k1")).await, None, "deleted");
    assert_eq!(react(&users[1], None).await, None, "deleted");
    same(
        "message",
        redis.message(conv, id).await,
        memory.message(conv, id).await,
    );
    assert_eq!(
        replay(&*redis, conv, 0, 100).await,
        replay(&*memory, conv, 0, 100).await
    );
}

/// Many users of two nodes react to one message at once: every reaction is applied (no retry
/// to lose, the rule runs in one script), each with its own position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reactions_to_one_message_all_apply() {
    let server = shared_server().await;
    let prefix = random_prefix();
    let node = || async { Arc::new(RedisStore::connect(&server.url(), &prefix).await.unwrap()) };
    let nodes = [node().await, node().await];
    let fx = Fixture::new();
    let (conv, users) = fx.group(&*nodes[0], 40).await;
    let hot = fx.send(&*nodes[0], conv.id, &users[0], "hot").await;
    let tasks: Vec<_> = users
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, user)| {
            let store = nodes[i % 2].clone();
            tokio::spawn(async move {
                let key = ["👍", "🎉", "ok"][i % 3];
                store
                    .react(conv.id, hot.message_id, &user, Some(key))
                    .await
                    .unwrap()
                    .position
                    .unwrap()
            })
        })
        .collect();
    let mut positions = Vec::new();
    for t in tasks {
        positions.push(t.await.unwrap());
    }
    positions.sort_unstable();
    assert_eq!(positions, (2..=41).collect::<Vec<u64>>());
    let m = nodes[1]
        .message(conv.id, hot.message_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.reactions.iter().map(|r| r.users.len()).sum::<usize>(), 40);
    assert_eq!(m.version, 1, "reactions do not bump the version");
}

/// The convergence property (`chat_core::testing::converge`) on Redis: random sends, edits,
/// deletes, reactions, receipts, member changes and disconnects over six devices; after a final
/// `streams` sync every device's view equals the store's. Each case on a fresh Redis.
#[test]
fn every_device_converges_on_redis() {
    chat_core::testing::converge::check(48, || async {
        let server = RedisServer::start().await;
        let store = RedisStore::connect(&server.url(), &random_prefix())
            .await
            .expect("connect to the test redis-server");
        (Arc::new(store) as DynMessageStore, server)
    });
}
