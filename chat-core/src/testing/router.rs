//! Conformance suite for [`Router`](crate::Router) backends.
//!
//! Every case is a plain `pub async fn(factory)`;
//! [`router_conformance_tests!`](crate::router_conformance_tests) expands each into one
//! `#[tokio::test]` named after the case. The factory builds **the routers of several nodes
//! sharing one backend**:
//!
//! ```ignore
//! chat_core::router_conformance_tests!(|nodes: Vec<NodeId>| async move {
//!     let hub = chat_core::memory::MemoryRouterHub::new();
//!     nodes
//!         .into_iter()
//!         .map(|node| Arc::new(hub.router(node)) as DynRouter)
//!         .collect::<Vec<_>>()
//! });
//!
//! // Redis: one fresh key/channel prefix per call isolates concurrent cases.
//! chat_core::router_conformance_tests!(|nodes: Vec<NodeId>| async move {
//!     let prefix = fresh_prefix();
//!     let mut routers = Vec::new();
//!     for node in nodes {
//!         routers.push(Arc::new(RedisRouter::connect(&url, &prefix, node).await.unwrap()) as DynRouter);
//!     }
//!     routers
//! });
//! ```
//!
//! The factory is `FnOnce(Vec<NodeId>) -> impl Future<Output = Vec<DynRouter>>`: it receives
//! distinct node ids chosen by the case and returns one router per id, in the same order. It is
//! called once per case, and everything it returns must share one backend, isolated from other
//! calls (a fresh prefix) or at least tolerant of them (topics are random in every case).
//! The case calls [`Router::start`](crate::Router::start) on each router with its own inbox.
//!
//! # What the suite assumes
//!
//! * Once `subscribe` has returned, envelopes published afterwards (by any node) on that topic
//!   reach the subscriber; once `unsubscribe` has returned, they no longer do.
//! * Delivery may be asynchronous, but envelopes published one after another (each `publish`
//!   awaited) reach a given node in publication order, across topics and publishers. "Does not
//!   arrive" is checked without sleeping: after the envelope that must not arrive, another node
//!   publishes a barrier on a topic the receiver is subscribed to, and the next thing the
//!   receiver gets must be the barrier.
//! * Runs on the real clock (a multi-threaded `#[tokio::test]`); waits for expected envelopes
//!   are capped at [`RECV_TIMEOUT`].
//!
//! Callers need `tokio` as a dev-dependency with the `macros` and `rt-multi-thread` features.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::id::{ConnectionId, ConversationId, MessageId, NodeId, UserId};
use crate::model::{Media, Message, MessageKind, Reaction, ReceiptKind};
use crate::protocol::Event;
use crate::router::{DynRouter, Envelope, Inbound, Payload, Topic};

/// Longest wait for an envelope that must arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Inbox capacity of the nodes of most cases (more than any case publishes).
pub const INBOX_CAPACITY: usize = 1024;

/// Expands the router conformance suite into one `#[tokio::test]` per case.
///
/// The shape of the three suites (see [`crate::store_conformance_tests`]):
/// `router_conformance_tests!([with_guard,] factory)`, where `factory` is a closure
/// `|nodes: Vec<NodeId>| async move { … }` returning one router per node id (see
/// [`crate::testing::router`]); in the `with_guard` form it returns `(routers, guard)` and the
/// guard (a test server, say) lives until the case ends. Invoke it at module level of an
/// integration test (it defines functions).
#[macro_export]
macro_rules! router_conformance_tests {
    (@case plain, $factory:expr, $case:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::testing::router::$case($factory).await;
        }
    };
    (@case guard, $factory:expr, $case:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let guard = $crate::testing::router::Guard::default();
            $crate::testing::router::$case(guard.wrap($factory)).await;
        }
    };
    (@all $mode:ident, $factory:expr) => {
        $crate::router_conformance_tests!(@case $mode, $factory, delivers_to_subscribed_nodes_only);
        $crate::router_conformance_tests!(@case $mode, $factory, origin_never_receives_its_own_envelope);
        $crate::router_conformance_tests!(@case $mode, $factory, unsubscribe_stops_delivery);
        $crate::router_conformance_tests!(@case $mode, $factory, user_topics_route_to_their_subscribers);
        $crate::router_conformance_tests!(@case $mode, $factory, each_envelope_arrives_once_per_node);
        $crate::router_conformance_tests!(@case $mode, $factory, payloads_round_trip_intact);
        $crate::router_conformance_tests!(@case $mode, $factory, order_from_one_publisher_is_preserved);
        $crate::router_conformance_tests!(@case $mode, $factory, publish_without_subscribers_is_ok);
        $crate::router_conformance_tests!(@case $mode, $factory, full_inbox_reports_lagged);
    };
    (with_guard, $factory:expr $(,)?) => {
        $crate::router_conformance_tests!(@all guard, $factory);
    };
    ($factory:expr $(,)?) => {
        $crate::router_conformance_tests!(@all plain, $factory);
    };
}

/// Keeps what a `with_guard` factory returned beside its routers until the case ends (used by
/// the macro).
#[derive(Debug)]
pub struct Guard<G>(std::sync::Arc<std::sync::Mutex<Option<G>>>);

impl<G> Default for Guard<G> {
    fn default() -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(None)))
    }
}

impl<G: Send + 'static> Guard<G> {
    /// A plain factory that keeps the guard of `factory`'s result here.
    pub fn wrap<F, Fut>(
        &self,
        factory: F,
    ) -> impl FnOnce(Vec<NodeId>) -> std::pin::Pin<Box<dyn Future<Output = Vec<DynRouter>> + Send>>
    where
        F: FnOnce(Vec<NodeId>) -> Fut + Send + 'static,
        Fut: Future<Output = (Vec<DynRouter>, G)> + Send + 'static,
    {
        let slot = self.0.clone();
        move |nodes| {
            Box::pin(async move {
                let (routers, guard) = factory(nodes).await;
                *slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(guard);
                routers
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// One started node of a case.
#[derive(Debug)]
pub struct TestNode {
    /// Its id (also the `origin` of what it publishes).
    pub id: NodeId,
    /// Its router.
    pub router: DynRouter,
    /// What its router delivered.
    pub inbox: mpsc::Receiver<Inbound>,
}

impl TestNode {
    /// Publishes `payload` on `topic` with this node as origin; returns the envelope.
    pub async fn publish(&self, topic: &Topic, payload: Payload) -> Envelope {
        let envelope = Envelope {
            origin: self.id,
            topic: topic.clone(),
            payload,
        };
        self.router.publish(envelope.clone()).await.unwrap();
        envelope
    }

    /// Subscribes to every topic given.
    pub async fn subscribe(&self, topics: &[&Topic]) {
        for topic in topics {
            self.router.subscribe(topic).await.unwrap();
        }
    }

    /// The next item of the inbox, or a panic after [`RECV_TIMEOUT`].
    pub async fn recv(&mut self) -> Inbound {
        match tokio::time::timeout(RECV_TIMEOUT, self.inbox.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("node {}: inbox closed", self.id),
            Err(_) => panic!("node {}: nothing received within {RECV_TIMEOUT:?}", self.id),
        }
    }

    /// The next envelope (a `Lagged` is a failure here).
    pub async fn recv_envelope(&mut self) -> Arc<Envelope> {
        match self.recv().await {
            Inbound::Envelope(e) => e,
            Inbound::Lagged => panic!("node {}: unexpected Lagged", self.id),
        }
    }

    /// Asserts that the next envelope is `expected` (e.g. a barrier: anything before it is a
    /// delivery that should not have happened).
    pub async fn expect(&mut self, expected: &Envelope, what: &str) {
        let got = self.recv_envelope().await;
        assert_eq!(*got, *expected, "node {}: expected {what}", self.id);
    }
}

/// Builds `capacities.len()` nodes with fresh distinct ids and starts each with an inbox of
/// the given capacity.
pub async fn start_nodes<F, Fut>(factory: F, capacities: &[usize]) -> Vec<TestNode>
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let ids = fresh_node_ids(capacities.len());
    let routers = factory(ids.clone()).await;
    assert_eq!(
        routers.len(),
        ids.len(),
        "the factory returns one router per node id"
    );
    let mut nodes = Vec::with_capacity(ids.len());
    for ((id, router), &capacity) in ids.into_iter().zip(routers).zip(capacities) {
        let (tx, inbox) = mpsc::channel(capacity);
        router.start(tx).await.unwrap();
        assert!(
            router.is_distributed(),
            "a multi-node router is distributed"
        );
        nodes.push(TestNode { id, router, inbox });
    }
    nodes
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn fresh_node_ids(n: usize) -> Vec<NodeId> {
    let mut ids = BTreeSet::new();
    while ids.len() < n {
        let raw = u16::try_from(random_u64() % (u64::from(crate::id::MAX_NODE_ID) + 1))
            .unwrap_or_default();
        ids.insert(NodeId::new(raw).unwrap());
    }
    let mut ids: Vec<_> = ids.into_iter().collect();
    // Not sorted: node order must not matter.
    ids.rotate_left(1);
    ids
}

fn fresh_conversation() -> Topic {
    Topic::Conversation(ConversationId::from_raw(random_u64()))
}

fn fresh_user_id(label: &str) -> UserId {
    UserId::from(format!("conformance-{label}-{:016x}", random_u64()))
}

/// A small, recognizable payload.
fn marker(label: &str) -> Payload {
    Payload::Event {
        event: Event::Typing {
            conversation_id: ConversationId::from_raw(random_u64()),
            user_id: UserId::from(label),
        },
        except_user: None,
        except_connection: None,
    }
}

fn numbered(i: u64) -> Payload {
    Payload::Event {
        event: Event::Receipt {
            conversation_id: ConversationId::from_raw(7),
            user_id: UserId::from("ordered"),
            kind: ReceiptKind::Read,
            seq: i,
            position: None,
        },
        except_user: None,
        except_connection: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

/// Three nodes, two subscribed to a conversation: a publish reaches the other subscriber only.
pub async fn delivers_to_subscribed_nodes_only<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 3]).await;
    let (conv, barrier) = (fresh_conversation(), fresh_conversation());
    nodes[0].subscribe(&[&conv, &barrier]).await;
    nodes[1].subscribe(&[&conv, &barrier]).await;
    nodes[2].subscribe(&[&barrier]).await;

    let sent = nodes[0].publish(&conv, marker("hello")).await;
    let bar = nodes[1].publish(&barrier, marker("barrier")).await;

    nodes[1].expect(&sent, "the envelope (subscribed)").await;
    nodes[0]
        .expect(&bar, "the barrier (its own envelope must not come back)")
        .await;
    nodes[2]
        .expect(&bar, "the barrier (not subscribed to the conversation)")
        .await;
}

/// The publishing node never receives its own envelope, even as the topic's only subscriber.
pub async fn origin_never_receives_its_own_envelope<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 2]).await;
    let (topic, barrier) = (fresh_conversation(), fresh_conversation());
    nodes[0].subscribe(&[&topic, &barrier]).await;

    nodes[0].publish(&topic, marker("echo")).await;
    let bar = nodes[1].publish(&barrier, marker("barrier")).await;
    nodes[0].expect(&bar, "the barrier, not its own echo").await;

    // The same topic published by the other node does arrive.
    let other = nodes[1].publish(&topic, marker("from-other")).await;
    nodes[0].expect(&other, "the other node's envelope").await;
}

/// After `unsubscribe` nothing more arrives; subscribing again resumes delivery. Both are
/// idempotent.
pub async fn unsubscribe_stops_delivery<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 2]).await;
    let (topic, barrier) = (fresh_conversation(), fresh_conversation());
    nodes[1].subscribe(&[&topic, &barrier]).await;

    let first = nodes[0].publish(&topic, marker("first")).await;
    nodes[1]
        .expect(&first, "the envelope while subscribed")
        .await;

    nodes[1].router.unsubscribe(&topic).await.unwrap();
    nodes[1].router.unsubscribe(&topic).await.unwrap();
    // Unsubscribing from a topic never subscribed is fine too.
    nodes[1]
        .router
        .unsubscribe(&fresh_conversation())
        .await
        .unwrap();
    nodes[0].publish(&topic, marker("after-unsubscribe")).await;
    let bar = nodes[0].publish(&barrier, marker("barrier")).await;
    nodes[1].expect(&bar, "the barrier (unsubscribed)").await;

    nodes[1].subscribe(&[&topic]).await;
    let again = nodes[0].publish(&topic, marker("again")).await;
    nodes[1]
        .expect(&again, "the envelope after re-subscribing")
        .await;
}

/// User topics route like conversation topics: only to the nodes subscribed to that user.
pub async fn user_topics_route_to_their_subscribers<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 3]).await;
    let alice = Topic::User(fresh_user_id("alice"));
    let bob = Topic::User(fresh_user_id("bob"));
    let barrier = fresh_conversation();
    nodes[1].subscribe(&[&alice, &barrier]).await;
    nodes[2].subscribe(&[&bob, &barrier]).await;

    let to_alice = nodes[0].publish(&alice, marker("for-alice")).await;
    let bar = nodes[0].publish(&barrier, marker("barrier")).await;
    nodes[1].expect(&to_alice, "alice's envelope").await;
    nodes[1].expect(&bar, "the barrier").await;
    nodes[2]
        .expect(
            &bar,
            "the barrier (bob's node must not get alice's envelope)",
        )
        .await;

    let to_bob = nodes[1].publish(&bob, marker("for-bob")).await;
    nodes[2].expect(&to_bob, "bob's envelope").await;
}

/// One publish arrives exactly once at each subscribed node, even after repeated `subscribe`.
pub async fn each_envelope_arrives_once_per_node<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 3]).await;
    let (topic, other, barrier) = (
        fresh_conversation(),
        fresh_conversation(),
        fresh_conversation(),
    );
    for node in &nodes[1..] {
        node.subscribe(&[&topic, &topic, &other, &barrier, &topic])
            .await;
    }

    let sent = nodes[0].publish(&topic, marker("once")).await;
    let bar = nodes[0].publish(&barrier, marker("barrier")).await;
    for node in &mut nodes[1..] {
        node.expect(&sent, "the envelope").await;
        node.expect(&bar, "the barrier, not a duplicate").await;
    }
}

/// Envelopes come out as they went in: topic, origin and payload (a full message event with
/// exclusions, a membership change).
pub async fn payloads_round_trip_intact<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 2]).await;
    let conversation_id = ConversationId::from_raw(random_u64());
    let topic = Topic::Conversation(conversation_id);
    nodes[1].subscribe(&[&topic]).await;

    let message = Message {
        message_id: MessageId::from_raw(u64::MAX - 3),
        conversation_id,
        seq: 42,
        sender_id: UserId::from("sender ✓ \"quoted\""),
        kind: MessageKind::Image,
        content: "héllo\nwörld 🚀 <b>&amp;</b>".to_owned(),
        media: Some(Media {
            url: "https://cdn.example/x.png?a=1&b=2".to_owned(),
            mime: "image/png".to_owned(),
            size: 123_456,
            name: Some("x.png".to_owned()),
        }),
        reply_to: Some(MessageId::from_raw(1 << 60)),
        client_msg_id: "client-1".to_owned(),
        created_at: 1_717_171_717_171,
        edited_at: Some(1_717_171_717_999),
        deleted: false,
        version: 2,
        reactions: vec![Reaction {
            key: "👍".to_owned(),
            users: vec![UserId::from("a"), UserId::from("b ✓")],
        }],
    };
    let event = nodes[0]
        .publish(
            &topic,
            Payload::Event {
                event: Event::Message {
                    message,
                    position: None,
                },
                except_user: Some(UserId::from("sender ✓ \"quoted\"")),
                except_connection: Some(ConnectionId::from_raw(u64::MAX)),
            },
        )
        .await;
    let membership = nodes[0]
        .publish(
            &topic,
            Payload::Membership {
                conversation_id,
                user_id: UserId::from("new-member"),
                joined: false,
            },
        )
        .await;

    let got = nodes[1].recv_envelope().await;
    assert_eq!(*got, event);
    assert_eq!(got.origin, nodes[0].id);
    let got = nodes[1].recv_envelope().await;
    assert_eq!(*got, membership);
}

/// Envelopes from one publisher on one topic arrive in publication order.
pub async fn order_from_one_publisher_is_preserved<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    const COUNT: u64 = 200;
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 3]).await;
    let topic = fresh_conversation();
    nodes[1].subscribe(&[&topic]).await;
    nodes[2].subscribe(&[&topic]).await;

    for i in 1..=COUNT {
        nodes[0].publish(&topic, numbered(i)).await;
    }
    for node in &mut nodes[1..] {
        for i in 1..=COUNT {
            let got = node.recv_envelope().await;
            assert_eq!(
                got.payload,
                numbered(i),
                "node {}: envelope {i} out of order",
                node.id
            );
        }
    }
}

/// Publishing to a topic nobody subscribed to succeeds and reaches nobody.
pub async fn publish_without_subscribers_is_ok<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY; 2]).await;
    let barrier = fresh_conversation();
    nodes[1].subscribe(&[&barrier]).await;

    nodes[0]
        .publish(&fresh_conversation(), marker("void"))
        .await;
    nodes[0]
        .publish(&Topic::User(fresh_user_id("nobody")), marker("void"))
        .await;
    // A topic that had a subscriber once.
    let left = fresh_conversation();
    nodes[1].subscribe(&[&left]).await;
    nodes[1].router.unsubscribe(&left).await.unwrap();
    nodes[0].publish(&left, marker("void")).await;

    let bar = nodes[0].publish(&barrier, marker("barrier")).await;
    nodes[1].expect(&bar, "the barrier only").await;
}

/// A node whose inbox is full loses envelopes, then gets [`Inbound::Lagged`] (so it can
/// resync), and delivery resumes afterwards.
pub async fn full_inbox_reports_lagged<F, Fut>(factory: F)
where
    F: FnOnce(Vec<NodeId>) -> Fut,
    Fut: Future<Output = Vec<DynRouter>>,
{
    const CAPACITY: usize = 4;
    const SENT: u64 = 64;
    let mut nodes = start_nodes(factory, &[INBOX_CAPACITY, CAPACITY]).await;
    let topic = fresh_conversation();
    nodes[1].subscribe(&[&topic]).await;

    for i in 1..=SENT {
        nodes[0].publish(&topic, numbered(i)).await;
    }
    // Let an asynchronous backend hand everything to the (not draining) inbox.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut before_lagged = Vec::new();
    loop {
        match nodes[1].recv().await {
            Inbound::Envelope(e) => before_lagged.push(e),
            Inbound::Lagged => break,
        }
        assert!(
            before_lagged.len() < usize::try_from(SENT).unwrap(),
            "every envelope arrived before a Lagged: the inbox never overflowed?"
        );
    }
    assert!(
        !before_lagged.is_empty() && before_lagged.len() <= CAPACITY,
        "{} envelopes before Lagged with an inbox of {CAPACITY}",
        before_lagged.len()
    );
    for (i, e) in before_lagged.iter().enumerate() {
        let seq = u64::try_from(i).unwrap() + 1;
        assert_eq!(e.payload, numbered(seq), "the first envelopes, in order");
    }

    // Live again: what is published now arrives (possibly after leftovers of the burst, and at
    // most a later second notice).
    let after = nodes[0].publish(&topic, numbered(SENT + 1)).await;
    loop {
        match nodes[1].recv().await {
            Inbound::Envelope(e) if *e == after => break,
            Inbound::Envelope(e) => assert!(
                matches!(&e.payload, Payload::Event { event: Event::Receipt { seq, .. }, .. } if *seq <= SENT),
                "unexpected envelope {e:?}"
            ),
            Inbound::Lagged => {}
        }
    }
}
