//! [`PresenceTracker`]: online / offline / last seen, heartbeats with a TTL, debounced offline.
//!
//! A user is online while at least one of their sessions (connections, on any node) is alive.
//! A session stays alive while it is heartbeated within the TTL (default 90 s); when the last
//! session of a user ends (or expires) the user turns offline only after the debounce (default
//! 30 s), so a reconnecting user does not flap. Presence is eventually consistent.
//!
//! Contract details every implementation keeps (checked by `chat_core::testing::presence`, feature `testing`):
//! * a heartbeat of an unknown session re-creates it (heals a session that expired while its
//!   client stayed connected);
//! * after a TTL expiry the debounce counts from the expiry, and `last_seen` is the session's last
//!   heartbeat;
//! * `disconnect` of an unknown session does nothing;
//! * change events are guaranteed only for users the node [`watch`](PresenceTracker::watch)es.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::id::{ConnectionId, UserId};
use crate::model::Presence;

/// Presence timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceConfig {
    /// A session not heartbeated for this long is dead (default 90 s).
    pub ttl: Duration,
    /// How long a user with no live session stays online before turning offline (default 30 s).
    pub offline_debounce: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(90),
            offline_debounce: Duration::from_secs(30),
        }
    }
}

impl PresenceConfig {
    /// How often the engine heartbeats its sessions: a third of the TTL, so two heartbeats
    /// may be lost before a live session expires.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(10))
    }
}

/// Tracks who is online.
///
/// Implementations: [`crate::memory::MemoryPresence`], `chat_presence::RedisPresence`.
#[async_trait]
pub trait PresenceTracker: Send + Sync + Debug + 'static {
    /// A session of `user` started.
    async fn connect(&self, user: &UserId, session: ConnectionId) -> Result<()>;

    /// A session of `user` ended.
    async fn disconnect(&self, user: &UserId, session: ConnectionId) -> Result<()>;

    /// Keeps these sessions alive for another TTL (one batched call per node per interval).
    async fn heartbeat(&self, sessions: &[(UserId, ConnectionId)]) -> Result<()>;

    /// The (debounced) presence of each user, in the order asked.
    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>>;

    /// Whether each user has a live session right now (no debounce), in the order asked.
    /// Used to pick push-notification targets.
    async fn is_connected(&self, users: &[UserId]) -> Result<Vec<bool>>;

    /// Status changes (online → offline after the debounce, offline → online). A distributed
    /// tracker delivers at least the changes of users this node [`watch`](Self::watch)es.
    /// The channel is bounded: a receiver that lags re-reads [`presence`](Self::presence).
    fn changes(&self) -> broadcast::Receiver<Presence>;

    /// This node wants changes of these users (a distributed tracker subscribes to them).
    async fn watch(&self, _users: &[UserId]) -> Result<()> {
        Ok(())
    }

    /// This node no longer wants changes of these users.
    async fn unwatch(&self, _users: &[UserId]) -> Result<()> {
        Ok(())
    }
}

/// A shared, dynamically chosen tracker.
pub type DynPresenceTracker = Arc<dyn PresenceTracker>;

#[async_trait]
impl<T: PresenceTracker + ?Sized> PresenceTracker for Arc<T> {
    async fn connect(&self, user: &UserId, session: ConnectionId) -> Result<()> {
        (**self).connect(user, session).await
    }
    async fn disconnect(&self, user: &UserId, session: ConnectionId) -> Result<()> {
        (**self).disconnect(user, session).await
    }
    async fn heartbeat(&self, sessions: &[(UserId, ConnectionId)]) -> Result<()> {
        (**self).heartbeat(sessions).await
    }
    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        (**self).presence(users).await
    }
    async fn is_connected(&self, users: &[UserId]) -> Result<Vec<bool>> {
        (**self).is_connected(users).await
    }
    fn changes(&self) -> broadcast::Receiver<Presence> {
        (**self).changes()
    }
    async fn watch(&self, users: &[UserId]) -> Result<()> {
        (**self).watch(users).await
    }
    async fn unwatch(&self, users: &[UserId]) -> Result<()> {
        (**self).unwatch(users).await
    }
}
