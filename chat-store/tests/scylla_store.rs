//! `ScyllaStore` against a real CQL node: Apache Cassandra 5.0, started by the README's test
//! command (`scripts/test.sh`, which runs `scripts/cassandra.sh`) and named by
//! `CHAT_TEST_SCYLLA_URI` (`host:port`, comma-separated for several contact points).
//! **Without `CHAT_TEST_SCYLLA_URI` every test here fails**; `scripts/test.sh` skips this
//! binary (loudly) only when Java 11/17 or Maven is missing.
//!
//! ```text
//! scripts/cassandra.sh start
//! CHAT_TEST_SCYLLA_URI=127.0.0.1:19042 cargo test -p chat-store --test scylla_store
//! scripts/cassandra.sh stop
//! ```
//!
//! * The whole `MessageStore` conformance suite, all cases in one keyspace created for this
//!   test process (random name; the cases use random ids), with 16 seqs per bucket so every
//!   case crosses partition boundaries.
//! * The change-stream conformance suite (positions, replays, reactions, epochs), same keyspace.
//! * CQL-specific cases: two stores ("nodes") appending to one conversation and taking stream
//!   positions in it, the crash windows of the append protocol and of the change stream (rows
//!   left as a crashed node would leave them, then a retry), the LWT cost per operation, the
//!   versioned schema (and the migration of a version-1 keyspace), and an unreachable node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chat_core::Error;
use chat_core::model::NewMessage;
use chat_core::store::{DynMessageStore, MessageStore};
use chat_core::testing::store::{Fixture, random_u64};
use chat_store::{ScyllaStore, ScyllaStoreOptions};
use chat_testkit::CassandraNode;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

/// Seqs per bucket of the test keyspace: small, so that the suite reads across buckets.
const TEST_BUCKET: u64 = 16;

fn contact_points() -> Vec<String> {
    chat_testkit::test_contact_points()
}

/// The keyspace of this test process.
fn keyspace() -> &'static str {
    static KS: OnceLock<String> = OnceLock::new();
    KS.get_or_init(|| format!("chat_test_{:012x}", random_u64() & 0xffff_ffff_ffff))
}

fn options() -> ScyllaStoreOptions {
    ScyllaStoreOptions::new(keyspace()).with_bucket_size(TEST_BUCKET)
}

async fn open() -> ScyllaStore {
    ScyllaStore::connect_with(&contact_points(), options())
        .await
        .expect("connect to the test CQL node (CHAT_TEST_SCYLLA_URI)")
}

/// A store on the test keyspace (one session per test: each test has its own runtime).
async fn scylla_test_store() -> DynMessageStore {
    Arc::new(open().await)
}

/// A raw session, to leave rows behind as a crashed node would.
async fn raw_session() -> Session {
    SessionBuilder::new()
        .known_nodes(contact_points())
        .build()
        .await
        .expect("raw session")
}

mod cql {
    use super::*;
    chat_core::store_conformance_tests!(scylla_test_store);
    chat_core::change_stream_conformance_tests!(scylla_test_store);
}

/// The convergence property (`chat_core::testing::converge`) on the CQL node: random sends,
/// edits, deletes, reactions, receipts, member changes and disconnects over six devices; after a
/// final `streams` sync every device's view equals the store's. Fewer cases than on the
/// in-memory store: every change costs lightweight transactions here.
#[test]
fn every_device_converges_on_cql() {
    chat_core::testing::converge::check(12, || async { (scylla_test_store().await, ()) });
}

/// Two stores ("nodes") on one keyspace change one conversation at once (appends, reactions,
/// receipts): their position claims collide and are retried, and the positions are still
/// exactly 1..=N with one head seen from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cql_two_nodes_positions_gap_free() {
    chat_core::testing::stream::two_nodes_positions_gap_free(
        Arc::new(open().await),
        Arc::new(open().await),
        15,
    )
    .await;
}

// ------------------------------------------------------------------- CQL-specific cases

/// Two stores, as on two chat nodes (separate sessions, separate in-process locks), append to
/// one conversation concurrently: their conditional inserts collide and are retried, and the
/// seqs are still exactly 1..=N, read the same from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cql_two_nodes_append_gap_free() {
    chat_core::testing::store::two_nodes_append_gap_free(
        Arc::new(open().await),
        Arc::new(open().await),
        4,
        20,
    )
    .await;
}

/// Two nodes retrying the same send concurrently: one message, both get its ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cql_two_nodes_retry_one_send() {
    let node_a = Arc::new(open().await);
    let node_b = Arc::new(open().await);
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&*node_a, 2).await;
    fx.send(&*node_a, conv.id, &users[1], "before").await;
    let mut handles = Vec::new();
    for r in 0..8 {
        let store = if r % 2 == 0 {
            node_a.clone()
        } else {
            node_b.clone()
        };
        let new = fx.new_message(conv.id, &users[0], "same", &format!("attempt {r}"));
        handles.push(tokio::spawn(
            async move { store.append(new).await.unwrap() },
        ));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    assert_eq!(results.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(results.iter().all(|a| a.message == results[0].message));
    assert_eq!(results[0].message.seq, 2);
    assert_eq!(node_b.last_seq(conv.id).await.unwrap(), 2);
}

fn ks_table(table: &str) -> String {
    format!("{}.{table}", keyspace())
}

/// Writes the idempotency claim a node makes first, as if it crashed right after it.
async fn leave_claim(raw: &Session, new: &NewMessage, seq: u64) {
    raw.query_unpaged(
        format!(
            "INSERT INTO {} (conversation_id, sender_id, client_msg_id, seq, message_id, kind, \
             content, created_at) VALUES (?, ?, ?, ?, ?, 'text', ?, ?)",
            ks_table("idempotency")
        ),
        (
            new.conversation_id.get() as i64,
            new.sender_id.as_str(),
            new.client_msg_id.as_str(),
            seq as i64,
            new.message_id.get() as i64,
            new.content.as_str(),
            new.created_at as i64,
        ),
    )
    .await
    .unwrap();
}

/// Crash after the claim, before the message row: the retry (a new attempt with another
/// message id and content, as a client resending after a reconnect) finishes the claimed
/// message at the claimed seq, so the seq is not left empty and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_retry_finishes_the_claim_of_a_crashed_node() {
    let store = open().await;
    let raw = raw_session().await;
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    fx.send(&store, conv.id, &users[1], "one").await;

    let crashed = fx.new_message(conv.id, &users[0], "k", "written by the crashed node");
    leave_claim(&raw, &crashed, 2).await;
    assert_eq!(
        store.last_seq(conv.id).await.unwrap(),
        1,
        "nothing stored yet"
    );

    let retry = fx.new_message(conv.id, &users[0], "k", "the retry");
    let a = store.append(retry).await.unwrap();
    assert!(a.duplicate, "the claim was the original attempt");
    assert_eq!(a.message, crashed.clone().into_message(2));
    assert_eq!(store.last_seq(conv.id).await.unwrap(), 2);
    let next = fx.send(&store, conv.id, &users[1], "three").await;
    assert_eq!(next.seq, 3, "no gap");
    let all = store.messages_after(conv.id, 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        store.message(conv.id, crashed.message_id).await.unwrap(),
        Some(all[1].clone())
    );
}

/// A claim left at a seq that another message took meanwhile (its node lost the race and
/// crashed): the retry moves the claim to the end and stores the message once, gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_retry_moves_a_stale_claim() {
    let store = open().await;
    let raw = raw_session().await;
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let crashed = fx.new_message(conv.id, &users[0], "k", "lost the race");
    leave_claim(&raw, &crashed, 1).await;
    let winner = fx.send(&store, conv.id, &users[1], "took seq 1").await;
    assert_eq!(winner.seq, 1);

    let a = store
        .append(fx.new_message(conv.id, &users[0], "k", "retry"))
        .await
        .unwrap();
    assert!(a.duplicate);
    assert_eq!(a.message, crashed.clone().into_message(2));
    let again = store
        .append(fx.new_message(conv.id, &users[0], "k", "retry 2"))
        .await
        .unwrap();
    assert_eq!(again.message, a.message);
    let all = store.messages_after(conv.id, 0, 100).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].message_id, crashed.message_id);
}

/// Crash after the message row, before the writes that follow it (id lookup, activity, sent
/// set): the message is already in history and sync (seq taken, no gap); the retry — which
/// the client sends because it never got the ack — completes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_retry_completes_writes_after_a_crash_past_the_message_row() {
    let store = open().await;
    let raw = raw_session().await;
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let crashed = fx.new_message(conv.id, &users[0], "k", "stored, then crash");
    leave_claim(&raw, &crashed, 1).await;
    raw.query_unpaged(
        format!(
            "INSERT INTO {} (conversation_id, bucket, seq, message_id, sender_id, client_msg_id, \
             kind, content, created_at, deleted, version) \
             VALUES (?, 0, 1, ?, ?, 'k', 'text', ?, ?, false, 1)",
            ks_table("messages")
        ),
        (
            conv.id.get() as i64,
            crashed.message_id.get() as i64,
            crashed.sender_id.as_str(),
            crashed.content.as_str(),
            crashed.created_at as i64,
        ),
    )
    .await
    .unwrap();

    assert_eq!(store.last_seq(conv.id).await.unwrap(), 1);
    assert_eq!(
        store.messages_after(conv.id, 0, 10).await.unwrap(),
        vec![crashed.clone().into_message(1)]
    );
    assert_eq!(
        store.message(conv.id, crashed.message_id).await.unwrap(),
        None,
        "the id lookup is written after the row"
    );

    let a = store
        .append(fx.new_message(conv.id, &users[0], "k", "retry"))
        .await
        .unwrap();
    assert!(a.duplicate);
    assert_eq!(a.message, crashed.clone().into_message(1));
    assert_eq!(
        a.position,
        Some(1),
        "the crashed node claimed no position: the retry claims it"
    );
    let page = store.changes_after(conv.id, 0, 10).await.unwrap().unwrap();
    assert_eq!(page.stream.position, 1);
    assert_eq!(
        page.changes,
        vec![chat_core::model::Change::Message {
            position: 1,
            message: Box::new(a.message.clone())
        }]
    );
    let again = store
        .append(fx.new_message(conv.id, &users[0], "k", "retry 2"))
        .await
        .unwrap();
    assert_eq!(again.position, None, "it has its position now");
    assert_eq!(
        store.message(conv.id, crashed.message_id).await.unwrap(),
        Some(a.message.clone())
    );
    let c = store.conversation(conv.id).await.unwrap().unwrap();
    assert_eq!((c.last_seq, c.last_activity), (1, crashed.message_id.get()));
    assert_eq!(store.unread(conv.id, &users[0]).await.unwrap(), 0);
    assert_eq!(store.unread(conv.id, &users[1]).await.unwrap(), 1);
    assert_eq!(fx.send(&store, conv.id, &users[1], "next").await.seq, 2);
}

/// Crash after a change's effect, before its position: a reaction (or an edit) stored with
/// no position, a marker moved with no position. The retry of the same call changes nothing
/// but finishes the position, so clients replaying the stream see the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_retry_claims_the_position_of_a_crashed_reaction_and_receipt() {
    use chat_core::model::{Change, Reaction, ReceiptKind};
    let store = open().await;
    let raw = raw_session().await;
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let (a, b) = (&users[0], &users[1]);
    let m = fx.send(&store, conv.id, a, "react to me").await; // position 1
    // What a crashed `react` leaves: the CAS applied (reactions, rev), no claim.
    let reactions = vec![Reaction {
        key: "👍".into(),
        users: vec![b.clone()],
    }];
    raw.query_unpaged(
        format!(
            "UPDATE {} SET reactions = ?, rev = 1 WHERE conversation_id = ? AND bucket = 0 \
             AND seq = 1",
            ks_table("messages")
        ),
        (
            serde_json::to_string(&reactions).unwrap(),
            conv.id.get() as i64,
        ),
    )
    .await
    .unwrap();
    // What a crashed read receipt leaves: the markers moved (max-wins), no claim.
    raw.query_unpaged(
        format!(
            "UPDATE {} USING TIMESTAMP 1 SET read_seq = 1, delivered_seq = 1 \
             WHERE conversation_id = ? AND user_id = ?",
            ks_table("markers")
        ),
        (conv.id.get() as i64, b.as_str()),
    )
    .await
    .unwrap();
    assert_eq!(store.stream(conv.id).await.unwrap().unwrap().position, 1);

    let r = store
        .react(conv.id, m.message_id, b, Some("👍"))
        .await
        .unwrap();
    assert_eq!(
        r.position,
        Some(2),
        "the retried reaction claims the position"
    );
    assert_eq!(r.message.reactions, reactions);
    let k = store
        .set_marker(conv.id, b, ReceiptKind::Read, 1)
        .await
        .unwrap();
    assert_eq!((k.seq, k.moved, k.position), (1, true, Some(3)));
    // Finished: the same calls again are no-ops.
    let r = store
        .react(conv.id, m.message_id, b, Some("👍"))
        .await
        .unwrap();
    assert_eq!(r.position, None);
    let k = store
        .set_marker(conv.id, b, ReceiptKind::Read, 1)
        .await
        .unwrap();
    assert_eq!((k.moved, k.position), (false, None));
    let page = store.changes_after(conv.id, 0, 10).await.unwrap().unwrap();
    assert_eq!(page.stream.position, 3);
    assert_eq!(
        page.changes,
        vec![
            Change::Message {
                position: 2,
                message: Box::new(r.message.clone())
            },
            Change::Markers {
                position: 3,
                user_id: b.clone(),
                delivered: 1,
                read: 1
            },
        ]
    );
}

/// The schema is versioned and created once: a second store on the keyspace migrates nothing,
/// and the bucket size recorded at creation wins over a different option.
#[tokio::test]
async fn cql_schema_is_versioned_and_keeps_its_bucket_size() {
    let first = open().await;
    assert_eq!(first.bucket_size(), TEST_BUCKET);
    let other = ScyllaStore::connect_with(&contact_points(), options().with_bucket_size(1000))
        .await
        .unwrap();
    assert_eq!(other.bucket_size(), TEST_BUCKET, "the stored size wins");
    let raw = raw_session().await;
    let row = raw
        .query_unpaged(
            format!(
                "SELECT version, bucket_size FROM {} WHERE id = 'schema'",
                ks_table("schema_version")
            ),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(i32, i64)>()
        .unwrap();
    assert_eq!(row, (chat_store::SCHEMA_VERSION, TEST_BUCKET as i64));
}

/// No node at the address: a clear, transient `Unavailable` within the timeouts.
#[tokio::test]
async fn cql_unreachable_node_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let r = ScyllaStore::connect_with(
        &[format!("127.0.0.1:{port}")],
        ScyllaStoreOptions::new("chat_unreachable")
            .with_connect_timeout(Duration::from_secs(1))
            .with_startup_timeout(Duration::from_secs(10)),
    )
    .await;
    let err = r.expect_err("no node there");
    assert!(
        matches!(
            err,
            Error::Unavailable {
                backend: "scylla",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(20));
}

// ------------------------------------------------------------------- faults

/// The node is SIGKILLed while a sender is appending and restarted from its data: while it is
/// down every operation fails with a transient `Unavailable` within the operation timeout
/// (nothing hangs, nothing else is returned); the sender retries each message with the same
/// client_msg_id until acked; afterwards seqs are exactly 1..=N, every acked message is in
/// history with the acked id, and no retry stored a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cql_node_killed_mid_traffic_loses_no_acked_message() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    const TOTAL: u64 = 40;
    // Checks CHAT_TEST_SCYLLA_URI like every test here (the node of this test is its own).
    contact_points();
    let node = CassandraNode::start().await;
    let options = ScyllaStoreOptions::new("chat_fault")
        .with_bucket_size(8)
        .with_request_timeout(Duration::from_secs(1))
        .with_operation_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1));
    let store = Arc::new(
        ScyllaStore::connect_with(&[node.uri()], options)
            .await
            .unwrap(),
    );
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&*store, 2).await;
    let acked_count = Arc::new(AtomicU64::new(0));

    let sender = {
        let (store, fx, acked_count) = (store.clone(), fx.clone(), acked_count.clone());
        let alice = users[0].clone();
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let mut errors = 0;
            for i in 0..TOTAL {
                let cmid = format!("m{i}");
                let deadline = Instant::now() + Duration::from_secs(180);
                loop {
                    let new = fx.new_message(conv.id, &alice, &cmid, &cmid);
                    match store.append(new).await {
                        Ok(a) => {
                            acked.insert(a.message.seq, a.message);
                            acked_count.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(e) => {
                            assert!(e.is_transient(), "non-transient error {e:?}");
                            assert!(
                                matches!(
                                    e,
                                    Error::Unavailable {
                                        backend: "scylla",
                                        ..
                                    }
                                ),
                                "{e:?}"
                            );
                            errors += 1;
                            assert!(Instant::now() < deadline, "{cmid} never acked");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
            (acked, errors)
        })
    };

    while acked_count.load(Ordering::SeqCst) < 15 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill().await;
    // Down: a typed, transient error within the operation timeout (plus slack).
    let t = Instant::now();
    let r = store.last_seq(conv.id).await;
    assert!(
        matches!(
            r,
            Err(Error::Unavailable {
                backend: "scylla",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let h = store.history(conv.id, None, 10).await;
    assert!(matches!(h, Err(ref e) if e.is_transient()), "{h:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.restart().await;

    let (acked, errors) = sender.await.unwrap();
    assert!(errors > 0, "the sender saw the outage");
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>(),
        "every message acked once, gap-free"
    );
    // Every acked message is in history as acked (the store reconnected by itself).
    let deadline = Instant::now() + Duration::from_secs(30);
    let all = loop {
        match store.messages_after(conv.id, 0, usize::MAX).await {
            Ok(m) => break m,
            Err(e) => {
                assert!(e.is_transient() && Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(all, acked.values().cloned().collect::<Vec<_>>());
    let keys: std::collections::HashSet<&str> =
        all.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(keys.len() as u64, TOTAL, "no message stored twice");
}

// ------------------------------------------------------------------- engines

/// Two engines ("nodes", each with its own `ScyllaStore` session and in-process locks) on one
/// keyspace, joined by the in-process router: two users on different nodes send concurrently
/// into one group. Every ack is a stored message, seqs are gap-free across the nodes, each user
/// gets the other's messages live, and a sync on either node replays the same timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cql_two_engines_on_one_keyspace_ack_only_stored_gap_free_messages() {
    use std::collections::{BTreeMap, HashMap};

    use chat_core::memory::{InProcessClient, InProcessTransport, MemoryPresence, MemoryRouterHub};
    use chat_core::model::ConversationKind;
    use chat_core::presence::PresenceConfig;
    use chat_core::protocol::SendMessage;
    use chat_core::{Chat, Command, Event, NodeId};

    const PER_USER: usize = 30;
    let hub = MemoryRouterHub::new();
    let presence = Arc::new(MemoryPresence::new(PresenceConfig::default()));
    let mut nodes = Vec::new();
    let mut stores = Vec::new();
    for i in 1..=2u16 {
        let store = Arc::new(open().await);
        stores.push(store.clone());
        let chat = Chat::builder()
            .configure(|c| {
                c.node_id = NodeId::new(i).unwrap();
                c.rate_limit = None;
            })
            .store(store)
            .presence(presence.clone())
            .router(Arc::new(hub.router(NodeId::new(i).unwrap())))
            .build()
            .await
            .unwrap();
        nodes.push(InProcessTransport::new(chat));
    }
    let fx = Fixture::new();
    let (alice, bob) = (fx.user("alice"), fx.user("bob"));
    let conv = nodes[0]
        .chat()
        .create_conversation(&alice, ConversationKind::Group, &[bob.clone()], None)
        .await
        .unwrap()
        .conversation
        .id;

    // Each user sends PER_USER messages on their node and collects acks and live messages.
    let run = |client: InProcessClient, name: &'static str| {
        tokio::spawn(async move {
            let mut client = client;
            for i in 0..PER_USER {
                client
                    .send(Command::Message(SendMessage {
                        conversation_id: conv,
                        client_msg_id: format!("{name}{i}"),
                        content: format!("{name} {i}"),
                        kind: Default::default(),
                        media: None,
                        reply_to: None,
                    }))
                    .await;
            }
            let mut acks = Vec::new();
            let mut live = BTreeMap::new();
            while acks.len() < PER_USER || live.len() < PER_USER {
                match client.recv_timeout(Duration::from_secs(30)).await {
                    Some(Event::MessageAck {
                        seq, message_id, ..
                    }) => acks.push((seq, message_id)),
                    Some(Event::Message { message, .. }) => {
                        live.insert(message.seq, message.message_id);
                    }
                    Some(Event::Error { .. }) => panic!("{name}: error event"),
                    Some(_) => {}
                    None => panic!(
                        "{name}: timed out ({} acks, {} live)",
                        acks.len(),
                        live.len()
                    ),
                }
            }
            (client, acks, live)
        })
    };
    let a = run(nodes[0].connect(alice.clone()).await.unwrap(), "a");
    let b = run(nodes[1].connect(bob.clone()).await.unwrap(), "b");
    let (mut alice_client, a_acks, a_live) = a.await.unwrap();
    let (_bob_client, b_acks, b_live) = b.await.unwrap();

    for acks in [&a_acks, &b_acks] {
        assert!(
            acks.windows(2).all(|w| w[0].0 < w[1].0),
            "one sender's seqs increase"
        );
    }
    let mut acked: HashMap<u64, chat_core::MessageId> =
        a_acks.iter().chain(&b_acks).copied().collect();
    assert_eq!(acked.len(), 2 * PER_USER, "no seq acked twice");
    let mut seqs: Vec<u64> = acked.keys().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=(2 * PER_USER) as u64).collect::<Vec<_>>());
    // Each got the other's messages live, as acked to the other.
    for (seq, id) in &a_live {
        assert_eq!(
            b_acks.iter().find(|(s, _)| s == seq).map(|x| x.1),
            Some(*id)
        );
    }
    assert_eq!(b_live.len(), PER_USER);
    // The store of the other node has exactly what was acked.
    let stored = stores[1].messages_after(conv, 0, usize::MAX).await.unwrap();
    for m in &stored {
        assert_eq!(acked.remove(&m.seq), Some(m.message_id));
    }
    assert!(acked.is_empty());
    // Sync on node 0 replays the whole timeline in order.
    alice_client
        .send(Command::Sync {
            conversations: BTreeMap::from([(conv, 0)]),
            streams: Default::default(),
        })
        .await;
    let mut replay = Vec::new();
    loop {
        match alice_client.recv_timeout(Duration::from_secs(30)).await {
            Some(Event::Message { message, .. }) => replay.push(message),
            Some(Event::SyncDone { .. }) => break,
            Some(_) => {}
            None => panic!("sync timed out"),
        }
    }
    assert_eq!(replay, stored);
}

/// A keyspace the store creates gets the configured replication (NetworkTopologyStrategy
/// here, on the node's datacenter), and no tablets option on Cassandra (detected as not
/// ScyllaDB); forcing the ScyllaDB option on Cassandra is rejected by the node, which shows
/// the option really is sent, as a typed non-transient error.
#[tokio::test]
async fn cql_keyspace_replication_and_tablets_option() {
    use chat_store::{Replication, Tablets};
    let raw = raw_session().await;
    let (dc,): (String,) = raw
        .query_unpaged("SELECT data_center FROM system.local", ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row()
        .unwrap();
    let ks = format!("chat_repl_{:x}", random_u64() & 0xffff_ffff);
    let store = ScyllaStore::connect_with(
        &contact_points(),
        ScyllaStoreOptions::new(ks.clone())
            .with_replication(Replication::NetworkTopology(vec![(dc.clone(), 1)])),
    )
    .await
    .unwrap();
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    fx.send(&store, conv.id, &users[0], "hi").await;
    let (replication,): (std::collections::HashMap<String, String>,) = raw
        .query_unpaged(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (ks.as_str(),),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row()
        .unwrap();
    assert!(
        replication["class"].ends_with("NetworkTopologyStrategy"),
        "{replication:?}"
    );
    assert_eq!(replication.get(&dc).map(String::as_str), Some("1"));

    let forced = ScyllaStore::connect_with(
        &contact_points(),
        ScyllaStoreOptions::new(format!("chat_tab_{:x}", random_u64() & 0xffff_ffff))
            .with_tablets(Tablets::Disable),
    )
    .await;
    let err = forced.expect_err("Cassandra has no tablets option");
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(!err.is_transient());
}

/// The node answers with CQL's `Unavailable` (a keyspace that wants 3 replicas on this one
/// node): opening such a store fails with a transient `Unavailable` of this backend (the schema
/// step writes at a quorum); a store whose keyspace is raised to 3 replicas under it keeps
/// plain writes at `ONE` but cannot run Paxos (2 of 3 needed), so an append fails with a
/// transient `Unavailable` within the operation timeout and stores nothing, and so does its
/// retry; once the keyspace is back to 1 replica the retry stores the message exactly once.
#[tokio::test]
async fn cql_an_unavailable_answer_is_a_transient_error_and_stores_nothing() {
    use chat_store::{Consistency, Replication};
    let is_unavailable =
        |err: &Error| matches!(err, Error::Unavailable { backend, .. } if *backend == "scylla");
    // Opening: the schema step cannot reach a quorum.
    let err = ScyllaStore::connect_with(
        &contact_points(),
        ScyllaStoreOptions::new(format!("chat_unav_{:x}", random_u64() & 0xffff_ffff))
            .with_replication(Replication::Simple {
                replication_factor: 3,
            }),
    )
    .await
    .expect_err("a quorum of 3 replicas on one node");
    assert!(is_unavailable(&err) && err.is_transient(), "{err:?}");

    // Appending: the keyspace loses its quorum under an open store.
    let ks = format!("chat_unav_{:x}", random_u64() & 0xffff_ffff);
    let store = ScyllaStore::connect_with(
        &contact_points(),
        ScyllaStoreOptions::new(ks.clone()).with_consistency(Consistency::One),
    )
    .await
    .unwrap();
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let raw = raw_session().await;
    let set_rf = |rf: u32| {
        format!(
            "ALTER KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"
        )
    };
    raw.query_unpaged(set_rf(3), ()).await.unwrap();
    let message = NewMessage {
        message_id: fx.ids.message_id(),
        conversation_id: conv.id,
        sender_id: users[0].clone(),
        client_msg_id: "unavailable-1".into(),
        kind: Default::default(),
        content: "needs a quorum".into(),
        media: None,
        reply_to: None,
        created_at: chat_core::time::now_ms(),
    };
    for attempt in 0..2 {
        let started = Instant::now();
        let err = store
            .append(message.clone())
            .await
            .expect_err("no quorum for Paxos");
        assert!(is_unavailable(&err), "attempt {attempt}: {err:?}");
        assert!(err.is_transient(), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(store.history(conv.id, None, 10).await.unwrap().is_empty());
    // Back to one replica: the client's retry stores it, once.
    raw.query_unpaged(set_rf(1), ()).await.unwrap();
    let stored = store.append(message.clone()).await.unwrap();
    assert_eq!((stored.message.seq, stored.duplicate), (1, false));
    assert!(store.append(message).await.unwrap().duplicate);
    assert_eq!(store.history(conv.id, None, 10).await.unwrap().len(), 1);
}

/// What the operations cost in lightweight transactions (Paxos rounds), uncontended, measured
/// with `ScyllaStore::lwt_count` (the numbers of the crate docs): a new message 3 (idempotency
/// claim, message row, position), a retried one 1, a receipt that moves a marker 1 (its
/// position), one that does not 0, a reaction 2 (CAS, position), the same reaction again 0, an
/// edit 2, a join 2, a leave 2.
#[tokio::test]
async fn cql_lwt_cost_per_operation() {
    use chat_core::model::{MessageChange, ReceiptKind};
    let store = open().await;
    let fx = Fixture::new();
    let (conv, users) = fx.group(&store, 2).await;
    let (a, b) = (&users[0], &users[1]);
    let mut costs = Vec::new();
    let mut last = store.lwt_count();
    let mut note = |what: &'static str, store: &ScyllaStore| {
        let now = store.lwt_count();
        costs.push((what, now - last));
        last = now;
    };
    let new = fx.new_message(conv.id, a, "lwt-cost", "hi");
    let m = store.append(new.clone()).await.unwrap().message;
    note("append", &store);
    let retry = store
        .append(NewMessage {
            message_id: fx.message_id(),
            ..new
        })
        .await
        .unwrap();
    assert!(retry.duplicate && retry.position.is_none());
    note("append retried", &store);
    store
        .set_marker(conv.id, b, ReceiptKind::Read, m.seq)
        .await
        .unwrap();
    note("receipt", &store);
    store
        .set_marker(conv.id, b, ReceiptKind::Read, m.seq)
        .await
        .unwrap();
    note("receipt, no move", &store);
    store
        .react(conv.id, m.message_id, b, Some("👍"))
        .await
        .unwrap();
    note("reaction", &store);
    store
        .react(conv.id, m.message_id, b, Some("👍"))
        .await
        .unwrap();
    note("reaction again", &store);
    let edit = MessageChange::Edit {
        content: "hi!".into(),
    };
    store
        .change_message(conv.id, m.message_id, a, edit, 2)
        .await
        .unwrap();
    note("edit", &store);
    let c = fx.user("c");
    store.add_members(conv.id, &[c.clone()], 3).await.unwrap();
    note("join", &store);
    store.remove_member(conv.id, &c).await.unwrap();
    note("leave", &store);
    eprintln!("LWTs per operation: {costs:?}");
    assert_eq!(
        costs,
        vec![
            ("append", 3),
            ("append retried", 1),
            ("receipt", 1),
            ("receipt, no move", 0),
            ("reaction", 2),
            ("reaction again", 0),
            ("edit", 2),
            ("join", 2),
            ("leave", 2),
        ]
    );
}

/// A keyspace of schema version 1 (before the change stream) is migrated to the current
/// version on open, and its conversations get a stream: an epoch made once (by LWT, the same
/// from every store), positions from 1, reactions on messages stored before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_schema_v1_keyspace_is_migrated_and_old_conversations_get_a_stream() {
    let ks = format!("{}_v1", keyspace());
    let opts = || ScyllaStoreOptions::new(ks.clone()).with_bucket_size(TEST_BUCKET);
    let fx = Fixture::new();
    let (conv, users, old) = {
        let store = ScyllaStore::connect_with(&contact_points(), opts())
            .await
            .unwrap();
        let (conv, users) = fx.group(&store, 2).await;
        let old = fx.send(&store, conv.id, &users[0], "from v1").await;
        (conv, users, old)
    };
    // Back to version 1: what the change stream added is gone.
    let raw = raw_session().await;
    for ddl in [
        "DROP TABLE {ks}.changes",
        "DROP TABLE {ks}.change_latest",
        "ALTER TABLE {ks}.conversations DROP epoch",
        "ALTER TABLE {ks}.conversations DROP head",
        "ALTER TABLE {ks}.messages DROP reactions",
        "ALTER TABLE {ks}.messages DROP rev",
        "ALTER TABLE {ks}.messages DROP claimed_rev",
        "ALTER TABLE {ks}.markers DROP claimed_sum",
        "UPDATE {ks}.schema_version SET version = 1 WHERE id = 'schema'",
    ] {
        raw.query_unpaged(ddl.replace("{ks}", &ks), ())
            .await
            .unwrap();
    }
    let store = ScyllaStore::connect_with(&contact_points(), opts())
        .await
        .unwrap();
    let other = ScyllaStore::connect_with(&contact_points(), opts())
        .await
        .unwrap();
    let version = raw
        .query_unpaged(
            format!("SELECT version FROM {ks}.schema_version WHERE id = 'schema'"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(i32,)>()
        .unwrap();
    assert_eq!(version.0, chat_store::SCHEMA_VERSION);
    let s = store.stream(conv.id).await.unwrap().unwrap();
    assert_ne!(s.epoch, 0);
    assert_eq!(s.position, 0);
    assert_eq!(
        other.stream(conv.id).await.unwrap().unwrap(),
        s,
        "one epoch"
    );
    let r = store
        .react(conv.id, old.message_id, &users[1], Some("👍"))
        .await
        .unwrap();
    assert_eq!(r.position, Some(1));
    let m = fx.send(&store, conv.id, &users[1], "from v2").await;
    let page = other.changes_after(conv.id, 0, 10).await.unwrap().unwrap();
    assert_eq!(page.stream.epoch, s.epoch);
    assert_eq!(page.stream.position, 2);
    assert_eq!(page.changes.len(), 2, "{page:?}");
    assert!(matches!(
        &page.changes[0],
        chat_core::model::Change::Message { position: 1, message } if message.message_id == old.message_id
            && message.reactions.len() == 1
    ));
    assert!(matches!(
        &page.changes[1],
        chat_core::model::Change::Message { message, .. } if message.message_id == m.message_id
    ));
    raw.query_unpaged(format!("DROP KEYSPACE {ks}"), ())
        .await
        .unwrap();
}
