//! In-process [`Router`]: see [`MemoryRouterHub`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::id::NodeId;
use crate::router::{Envelope, Inbound, LossyInbox, Router, Topic};

/// The shared hub of an in-process cluster: several engines in one process (multi-node tests,
/// embedded clusters) each get their own [`MemoryRouter`] from one hub. Cheap to clone (a
/// handle).
///
/// ```
/// use std::sync::Arc;
/// use chat_core::memory::MemoryRouterHub;
/// use chat_core::router::{DynRouter, Envelope, Inbound, Payload, Topic};
/// use chat_core::{ConversationId, NodeId, Router, UserId};
/// use tokio::sync::mpsc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> chat_core::Result<()> {
/// let hub = MemoryRouterHub::new();
/// let (a, b): (DynRouter, DynRouter) = (
///     Arc::new(hub.router(NodeId::new(1)?)),
///     Arc::new(hub.router(NodeId::new(2)?)),
/// );
/// let (tx, mut b_inbox) = mpsc::channel(64);
/// b.start(tx).await?;
/// let topic = Topic::Conversation(ConversationId::from_raw(7));
/// b.subscribe(&topic).await?;
/// a.publish(Envelope {
///     origin: NodeId::new(1)?,
///     topic: topic.clone(),
///     payload: Payload::Membership {
///         conversation_id: ConversationId::from_raw(7),
///         user_id: UserId::from("bob"),
///         joined: true,
///     },
/// })
/// .await?;
/// assert!(matches!(b_inbox.recv().await, Some(Inbound::Envelope(e)) if e.topic == topic));
/// # Ok(()) }
/// ```
///
/// # Design
///
/// The hub holds one map `topic → subscribed nodes` behind a `std::sync::RwLock`. Publishing
/// takes the read lock only, and hands the (shared, `Arc`'d) envelope to each other subscribed
/// node's inbox with a non-blocking `try_send` while holding it: publishers never block each
/// other, nor wait for a slow node. Subscribing and unsubscribing take the write lock briefly.
///
/// A node's inbox is the bounded channel given to [`Router::start`]. When it is full the
/// envelope is dropped **for that node only** and the node is marked lagged; it then receives
/// [`Inbound::Lagged`] as soon as its inbox has room (a small task waits for the capacity, so
/// the notice arrives even if nothing else is ever published; without a tokio runtime the next
/// delivery to the node sends it first). Envelopes published while the notice is pending are
/// dropped too: the resync the notice triggers covers them, and the room goes to the notice.
/// Every envelope is dropped *before* the `Lagged` that covers it is enqueued, so the engine's
/// resync, which starts when it reads the notice, sees everything that was lost.
///
/// Dropping a [`MemoryRouter`] removes its node from every topic. The node that publishes never
/// receives its own envelope, even when subscribed to the topic; the publishing router's
/// [`NodeId`] decides (the envelope's `origin` field is carried, not trusted).
#[derive(Clone, Default)]
pub struct MemoryRouterHub {
    /// Subscriptions of every node of this hub.
    inner: Arc<HubInner>,
}

impl MemoryRouterHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// The router of one node. Routers with the same `node` id count as the same node:
    /// none of them receives what another publishes.
    pub fn router(&self, node: NodeId) -> MemoryRouter {
        let slot = Arc::new(NodeSlot {
            key: self.inner.next_key.fetch_add(1, Ordering::Relaxed),
            node,
            inbox: LossyInbox::new(),
        });
        MemoryRouter {
            hub: self.inner.clone(),
            slot,
            topics: Mutex::new(HashSet::new()),
        }
    }

    /// How many topics have at least one subscriber (for tests and metrics).
    pub fn topic_count(&self) -> usize {
        self.inner.read().len()
    }
}

impl fmt::Debug for MemoryRouterHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRouterHub")
            .field("topics", &self.topic_count())
            .finish()
    }
}

/// What the hub's handles share.
#[derive(Default)]
struct HubInner {
    /// Topic → the nodes subscribed to it (each at most once). Small vectors: a topic has
    /// at most one entry per node.
    topics: RwLock<HashMap<Topic, Vec<Arc<NodeSlot>>>>,
    /// Identity of each router, so that unsubscribing removes exactly its own entry.
    next_key: AtomicU64,
}

impl HubInner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Topic, Vec<Arc<NodeSlot>>>> {
        // Every critical section leaves the map consistent: poisoning carries no information.
        self.topics.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Topic, Vec<Arc<NodeSlot>>>> {
        self.topics.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One node as the hub sees it.
struct NodeSlot {
    /// Unique per router (node ids need not be).
    key: u64,
    /// The node, to skip the publisher's own node.
    node: NodeId,
    /// The engine's inbox with its lag bookkeeping.
    inbox: Arc<LossyInbox>,
}

/// One node's router on a [`MemoryRouterHub`]. [`Router::is_distributed`] is `true`.
///
/// Dropping it removes the node from all its topics.
pub struct MemoryRouter {
    /// The hub it publishes to and subscribes on.
    hub: Arc<HubInner>,
    /// This node as the hub's subscriber lists hold it.
    slot: Arc<NodeSlot>,
    /// This router's own subscriptions: makes subscribe/unsubscribe idempotent without a write
    /// lock on the hub for repeats, and lets drop clean up exactly its own topics.
    topics: Mutex<HashSet<Topic>>,
}

impl MemoryRouter {
    /// The node this router belongs to.
    pub fn node(&self) -> NodeId {
        self.slot.node
    }

    fn own_topics(&self) -> MutexGuard<'_, HashSet<Topic>> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRouter")
            .field("node", &self.slot.node)
            .field("topics", &self.own_topics().len())
            .field("lagged", &self.slot.inbox.is_lagged())
            .finish_non_exhaustive()
    }
}

impl Drop for MemoryRouter {
    fn drop(&mut self) {
        let topics = std::mem::take(&mut *self.own_topics());
        if topics.is_empty() {
            return;
        }
        let mut map = self.hub.write();
        for topic in topics {
            remove_from(&mut map, &topic, self.slot.key);
        }
    }
}

fn remove_from(map: &mut HashMap<Topic, Vec<Arc<NodeSlot>>>, topic: &Topic, key: u64) {
    if let Some(nodes) = map.get_mut(topic) {
        nodes.retain(|n| n.key != key);
        if nodes.is_empty() {
            map.remove(topic);
        }
    }
}

#[async_trait]
impl Router for MemoryRouter {
    async fn start(&self, inbox: mpsc::Sender<Inbound>) -> Result<()> {
        // A second start replaces the inbox (e.g. an engine restarted on the same router).
        self.slot.inbox.set(inbox);
        Ok(())
    }

    async fn subscribe(&self, topic: &Topic) -> Result<()> {
        let mut own = self.own_topics();
        if own.insert(topic.clone()) {
            self.hub
                .write()
                .entry(topic.clone())
                .or_default()
                .push(self.slot.clone());
        }
        Ok(())
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<()> {
        let mut own = self.own_topics();
        if own.remove(topic) {
            remove_from(&mut self.hub.write(), topic, self.slot.key);
        }
        Ok(())
    }

    async fn publish(&self, envelope: Envelope) -> Result<()> {
        let envelope = Arc::new(envelope);
        let map = self.hub.read();
        if let Some(nodes) = map.get(&envelope.topic) {
            for node in nodes.iter().filter(|n| n.node != self.slot.node) {
                node.inbox.deliver(envelope.clone());
            }
        }
        Ok(())
    }

    fn is_distributed(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::id::{ConversationId, UserId};
    use crate::router::Payload;

    fn env(origin: NodeId, topic: &Topic, i: u64) -> Envelope {
        Envelope {
            origin,
            topic: topic.clone(),
            payload: Payload::Membership {
                conversation_id: ConversationId::from_raw(i),
                user_id: UserId::from("u"),
                joined: true,
            },
        }
    }

    #[tokio::test]
    async fn dropped_router_leaves_every_topic() {
        let hub = MemoryRouterHub::new();
        let r = hub.router(NodeId::new(1).unwrap());
        for i in 0..5 {
            r.subscribe(&Topic::Conversation(ConversationId::from_raw(i)))
                .await
                .unwrap();
        }
        assert_eq!(hub.topic_count(), 5);
        r.unsubscribe(&Topic::Conversation(ConversationId::from_raw(0)))
            .await
            .unwrap();
        assert_eq!(hub.topic_count(), 4);
        drop(r);
        assert_eq!(hub.topic_count(), 0);
    }

    #[tokio::test]
    async fn lagged_notice_arrives_without_further_publishes() {
        let hub = MemoryRouterHub::new();
        let (a, b) = (
            hub.router(NodeId::new(1).unwrap()),
            hub.router(NodeId::new(2).unwrap()),
        );
        let (tx, mut rx) = mpsc::channel(2);
        b.start(tx).await.unwrap();
        let topic = Topic::User(UserId::from("x"));
        b.subscribe(&topic).await.unwrap();
        for i in 0..5 {
            a.publish(env(a.node(), &topic, i)).await.unwrap();
        }
        // Two fit, three were dropped; then exactly one notice once there is room.
        for i in 0..2 {
            match rx.recv().await.unwrap() {
                Inbound::Envelope(e) => assert_eq!(*e, env(a.node(), &topic, i)),
                Inbound::Lagged => panic!("notice before the envelopes that fit"),
            }
        }
        assert!(matches!(rx.recv().await.unwrap(), Inbound::Lagged));
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "exactly one notice");
        a.publish(env(a.node(), &topic, 9)).await.unwrap();
        assert!(
            matches!(rx.recv().await.unwrap(), Inbound::Envelope(e) if *e == env(a.node(), &topic, 9))
        );
    }
}
