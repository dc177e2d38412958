//! [`Router`]: moves events between gateway nodes.
//!
//! A node subscribes to the [`Topic`]s it has local interest in: a conversation while at least
//! one of its online users is a member, a user while that user has a connection on it. Publishing
//! to a topic reaches every *other* subscribed node once, so a group message costs
//! O(nodes with members), not O(members). The publishing node delivers to its own connections
//! itself.
//!
//! Routing is best effort (Redis pub/sub is at-most-once): correctness comes from the store and
//! `sync`. A router that knows it may have dropped envelopes (a full inbox, a lost connection to
//! its broker) sends [`Inbound::Lagged`] so the engine can make its clients resync.
//!
//! Contract details every implementation keeps (checked by `chat_core::testing::router`, feature `testing`):
//! * a subscription is effective when `subscribe` returns, and gone when `unsubscribe` returns;
//! * envelopes published one after another by one router reach a given node in publish order
//!   (across topics too);
//! * a node never receives what its own router published; `Envelope::origin` must be the
//!   publishing router's node id;
//! * `start` may be called again (it replaces the inbox).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::id::{ConnectionId, ConversationId, NodeId, UserId};
use crate::protocol::Event;

/// What a node can subscribe to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "t", content = "id", rename_all = "snake_case")]
pub enum Topic {
    /// Events of one conversation; subscribed by nodes with an online member.
    Conversation(ConversationId),
    /// Events for one user's devices; subscribed by nodes where the user is connected.
    User(UserId),
}

/// What travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
// Envelopes are built once per publish and moved, never stored in bulk: no need to box.
#[allow(clippy::large_enum_variant)]
pub enum Payload {
    /// Deliver an event to the topic's local connections.
    Event {
        /// The event.
        event: Event,
        /// Skip every connection of this user (e.g. typing is not echoed to the typist).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        except_user: Option<UserId>,
        /// Skip this one connection (e.g. the device that sent the message got an ack instead).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        except_connection: Option<ConnectionId>,
    },
    /// A user joined or left a conversation: nodes where the user is online update their
    /// local index (and their conversation subscriptions).
    Membership {
        /// Which conversation.
        conversation_id: ConversationId,
        /// Who.
        user_id: UserId,
        /// Joined (true) or left (false).
        joined: bool,
    },
    /// The host revoked a user's sessions ([`Chat::revoke_user`](crate::Chat::revoke_user)):
    /// nodes where the user is online close their connections with
    /// [`CloseReason::Revoked`](crate::CloseReason::Revoked).
    Revoke {
        /// Whose sessions.
        user_id: UserId,
    },
}

/// One routed message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The publishing node (which does not receive its own envelopes).
    pub origin: NodeId,
    /// Where it was published.
    pub topic: Topic,
    /// What it carries.
    pub payload: Payload,
}

/// What a router hands to its node's engine.
#[derive(Clone, Debug)]
pub enum Inbound {
    /// An envelope from another node.
    Envelope(Arc<Envelope>),
    /// Envelopes may have been lost (inbox overflow, broker reconnect): live delivery has a gap
    /// that only the store can fill.
    Lagged,
}

/// Moves [`Envelope`]s between nodes.
///
/// Implementations: [`LocalRouter`] (single node, the default), [`crate::memory::MemoryRouterHub`]
/// (several engines in one process), `chat_presence::RedisRouter` (Redis pub/sub).
#[async_trait]
pub trait Router: Send + Sync + Debug + 'static {
    /// Starts delivering envelopes published by other nodes on subscribed topics to `inbox`.
    /// Called once by the engine before any other method.
    async fn start(&self, inbox: mpsc::Sender<Inbound>) -> Result<()>;

    /// Starts receiving a topic (idempotent).
    async fn subscribe(&self, topic: &Topic) -> Result<()>;

    /// Stops receiving a topic (idempotent).
    async fn unsubscribe(&self, topic: &Topic) -> Result<()>;

    /// Publishes to every other node subscribed to `envelope.topic`.
    async fn publish(&self, envelope: Envelope) -> Result<()>;

    /// Whether other nodes exist at all. When false the engine skips publishing.
    fn is_distributed(&self) -> bool {
        false
    }
}

/// A shared, dynamically chosen router.
pub type DynRouter = Arc<dyn Router>;

#[async_trait]
impl<T: Router + ?Sized> Router for Arc<T> {
    async fn start(&self, inbox: mpsc::Sender<Inbound>) -> Result<()> {
        (**self).start(inbox).await
    }
    async fn subscribe(&self, topic: &Topic) -> Result<()> {
        (**self).subscribe(topic).await
    }
    async fn unsubscribe(&self, topic: &Topic) -> Result<()> {
        (**self).unsubscribe(topic).await
    }
    async fn publish(&self, envelope: Envelope) -> Result<()> {
        (**self).publish(envelope).await
    }
    fn is_distributed(&self) -> bool {
        (**self).is_distributed()
    }
}

/// The single-node router: there is nobody else to route to, so everything is a no-op.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalRouter;

#[async_trait]
impl Router for LocalRouter {
    async fn start(&self, _inbox: mpsc::Sender<Inbound>) -> Result<()> {
        Ok(())
    }
    async fn subscribe(&self, _topic: &Topic) -> Result<()> {
        Ok(())
    }
    async fn unsubscribe(&self, _topic: &Topic) -> Result<()> {
        Ok(())
    }
    async fn publish(&self, _envelope: Envelope) -> Result<()> {
        Ok(())
    }
}

/// The sending side of an engine's router inbox, for router implementations: delivery never
/// blocks, and when an envelope had to be dropped (inbox full) or was lost elsewhere (a broker
/// reconnect), exactly one [`Inbound::Lagged`] notice reaches the engine as soon as the inbox
/// has room — before any later envelope, so the engine learns of the gap in order.
#[derive(Debug, Default)]
pub struct LossyInbox {
    /// The engine's inbox, set by [`Router::start`].
    tx: std::sync::Mutex<Option<mpsc::Sender<Inbound>>>,
    /// Envelopes were lost and the notice is not enqueued yet.
    lagged: std::sync::atomic::AtomicBool,
    /// A task waiting for inbox capacity to enqueue the notice exists.
    notifier: std::sync::atomic::AtomicBool,
}

impl LossyInbox {
    /// An inbox not started yet (deliveries are ignored until [`set`](Self::set)).
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Sets (or replaces) the engine's inbox: call from [`Router::start`].
    pub fn set(&self, tx: mpsc::Sender<Inbound>) {
        *self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
    }

    /// Whether a loss is recorded and its notice not enqueued yet.
    pub fn is_lagged(&self) -> bool {
        self.lagged.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn sender(&self) -> Option<mpsc::Sender<Inbound>> {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Non-blocking delivery of one envelope.
    pub fn deliver(self: &Arc<Self>, envelope: Arc<Envelope>) {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::sync::mpsc::error::TrySendError;
        let Some(tx) = self.sender() else {
            return; // Not started: nobody to deliver to.
        };
        if self.lagged.load(SeqCst) {
            // The notice goes first; without room for it, this envelope is dropped as well.
            match tx.try_reserve() {
                Ok(permit) => {
                    if self
                        .lagged
                        .compare_exchange(true, false, SeqCst, SeqCst)
                        .is_ok()
                    {
                        permit.send(Inbound::Lagged);
                    }
                }
                Err(_) => return,
            }
        }
        match tx.try_send(Inbound::Envelope(envelope)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.mark_lagged(tx),
            Err(TrySendError::Closed(_)) => {} // The engine is gone.
        }
    }

    /// Envelopes were lost outside the inbox (e.g. a broker reconnect): the notice is
    /// enqueued as soon as possible.
    pub fn report_lagged(self: &Arc<Self>) {
        if let Some(tx) = self.sender() {
            self.mark_lagged(tx);
        }
    }

    /// Records a loss and makes sure the notice is enqueued once there is room.
    fn mark_lagged(self: &Arc<Self>, tx: mpsc::Sender<Inbound>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.lagged.store(true, SeqCst);
        if self.notifier.swap(true, SeqCst) {
            return; // A notifier task is already waiting.
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on: the next delivery sends the notice first.
            self.notifier.store(false, SeqCst);
            return;
        };
        let inbox = Arc::clone(self);
        runtime.spawn(async move {
            loop {
                let Ok(permit) = tx.reserve().await else {
                    break; // Inbox closed: nobody to notify.
                };
                // Clear the flag before enqueuing: a loss after this point re-marks (a fresh
                // notice); one before it is covered by this notice, enqueued after the loss.
                if inbox
                    .lagged
                    .compare_exchange(true, false, SeqCst, SeqCst)
                    .is_ok()
                {
                    permit.send(Inbound::Lagged);
                } else {
                    drop(permit); // A delivery enqueued the notice already.
                }
                inbox.notifier.store(false, SeqCst);
                // A loss between the exchange and clearing `notifier` saw a live notifier:
                // take over its notice.
                if !inbox.lagged.load(SeqCst) || inbox.notifier.swap(true, SeqCst) {
                    break;
                }
            }
        });
    }
}
