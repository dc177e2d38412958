//! [`Chat`]: the engine that composes the four parts, and its connections.
//!
//! Where the rest lives: [`ChatBuilder`](super::ChatBuilder) in `builder.rs`, the commands in
//! `commands/`, the host API in `host.rs`, fan-out and the busy heuristic in `fanout.rs`, the
//! background tasks in `tasks.rs`.

use std::sync::Arc;

use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::ChatConfig;
use super::expiry::{Expiries, NEVER};
use super::fanout::OrderLocks;
use super::observer::{DynEngineObserver, EngineEvent, EngineObserver};
use super::push::PushJob;
use super::registry::{ConnHandle, Registry};
use super::stats::{Stats, StatsSnapshot};
use super::typing::TypingThrottle;
use crate::error::{Error, Result};
use crate::hooks::DynCommandHook;
use crate::id::{ConnectionId, NodeId, SnowflakeGenerator, UserId};
use crate::presence::DynPresenceTracker;
use crate::protocol::{Event, Frame, SessionLimits};
use crate::router::{DynRouter, Topic};
use crate::store::DynMessageStore;
use crate::time::now_ms;
use crate::transport::{CloseReason, Outbound, Outbox, Session, SessionOptions};

/// Connect/disconnect of one user are serialized through one of these stripes, so a second
/// device never sees the first one's half-built registry entry.
pub(super) const USER_LOCK_STRIPES: usize = 64;

/// The chat engine: cheap to clone (an `Arc`), shared by every transport and task.
///
/// Built with [`Chat::builder`]; see the crate docs for an example.
#[derive(Clone, Debug)]
pub struct Chat {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// Limits and timings.
    pub(crate) config: ChatConfig,
    /// Durable timelines and conversations.
    pub(super) store: DynMessageStore,
    /// Cross-node delivery.
    pub(super) router: DynRouter,
    /// Online / offline.
    pub(super) presence: DynPresenceTracker,
    /// Queue of the push worker, when the host installed a notifier.
    pub(super) push: Option<mpsc::Sender<PushJob>>,
    /// Host rules (rate limit first, when enabled).
    pub(super) hooks: Vec<DynCommandHook>,
    /// Message, conversation and connection ids.
    pub(super) ids: SnowflakeGenerator,
    /// Who is connected here.
    pub(super) registry: Registry,
    /// Typing throttle state.
    pub(super) typing: TypingThrottle,
    /// Serializes connect/disconnect per user (striped).
    pub(super) user_locks: Vec<AsyncMutex<()>>,
    /// Serializes append + local fan-out per conversation (striped), so that on one node every
    /// recipient gets a conversation's messages in seq order, whoever sent them.
    pub(super) conversation_locks: OrderLocks,
    /// Cancelled by [`Chat::shutdown`]; background tasks and transports watch it.
    pub(super) shutdown: CancellationToken,
    /// The engine's own counters (for `/metrics`): always the first observer.
    pub(super) stats: Stats,
    /// The host's observers.
    pub(super) observers: Vec<DynEngineObserver>,
    /// Session deadlines, watched by the expiry task (shared with it).
    pub(super) expiries: Arc<Expiries>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Inner {
    /// Reports an event to the counters and every observer.
    pub(super) fn observe(&self, event: EngineEvent<'_>) {
        self.stats.observe(&event);
        for o in &self.observers {
            o.observe(&event);
        }
    }
}

impl Chat {
    /// The configuration in force.
    pub fn config(&self) -> &ChatConfig {
        &self.inner.config
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// The store (for host-side reads and admin tools).
    pub fn store(&self) -> &DynMessageStore {
        &self.inner.store
    }

    /// The presence tracker.
    pub fn presence_tracker(&self) -> &DynPresenceTracker {
        &self.inner.presence
    }

    /// Counters (connections, messages, deliveries, errors by code…).
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot(self.inner.registry.len())
    }

    /// Stops the engine: new connections are refused, every connection is asked to close with
    /// [`CloseReason::Shutdown`], background tasks end. Commands already running finish.
    pub fn shutdown(&self) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        info!("chat engine shutting down");
        self.inner.shutdown.cancel();
        for conn in self.inner.registry.connections() {
            conn.outbox.request_close(CloseReason::Shutdown);
        }
    }

    /// Resolves once [`Chat::shutdown`] was called.
    pub async fn shutdown_requested(&self) {
        self.inner.shutdown.cancelled().await;
    }

    /// Whether [`Chat::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    // ------------------------------------------------------------------ connections

    /// Connects an authenticated user's device. The returned session takes commands; the
    /// outbound yields every frame for it. Live delivery is set up before this returns, so a
    /// `sync` sent right after misses nothing. The session never expires; see
    /// [`Chat::connect_with`].
    pub async fn connect(&self, user: UserId) -> Result<(Session, Outbound)> {
        self.connect_with(user, SessionOptions::default()).await
    }

    /// [`Chat::connect`] with the credential's expiry, a verifier for `refresh`, and the
    /// `session` frame (see [`SessionOptions`]). A credential that expired already is refused
    /// (`Unauthorized`); one that expires later closes the connection with
    /// [`CloseReason::TokenExpired`] when it does, unless a `refresh` moved it.
    pub async fn connect_with(
        &self,
        user: UserId,
        options: SessionOptions,
    ) -> Result<(Session, Outbound)> {
        if self.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        if options.expires_at.is_some_and(|at| at <= now_ms()) {
            return Err(super::expiry::expired());
        }
        let inner = &self.inner;
        let (outbox, outbound) = Outbox::new(inner.config.outbound_queue, inner.config.reply_queue);
        let conn = Arc::new(ConnHandle {
            id: inner.ids.connection_id(),
            user: user.clone(),
            outbox,
            expires_at: std::sync::atomic::AtomicU64::new(NEVER),
            verifier: options.verifier,
        });
        // Before the connection can receive anything else: the first frame.
        if options.announce {
            let event = self.session_event(&conn, options.expires_at);
            conn.outbox.reply(Arc::new(Frame::new(event))).await;
        }
        {
            let _guard = self.user_lock(&user).await;
            if inner.registry.add(conn.clone()) {
                if let Err(err) = self.load_user(&user).await {
                    drop(_guard);
                    self.disconnect(conn.id).await;
                    return Err(err);
                }
            }
        }
        inner.expiries.start(&conn, options.expires_at);
        if let Err(err) = inner.presence.connect(&user, conn.id).await {
            warn!(%user, error = %err, "presence connect failed");
        }
        inner.observe(EngineEvent::Connected {
            user: &user,
            connection: conn.id,
        });
        debug!(%user, connection = %conn.id, "connected");
        Ok((Session::new(self.clone(), conn), outbound))
    }

    /// The `session` event of a connection.
    fn session_event(&self, conn: &ConnHandle, expires_at: Option<u64>) -> Event {
        let config = &self.inner.config;
        Event::Session {
            user_id: conn.user.clone(),
            connection_id: conn.id,
            node_id: config.node_id,
            expires_at,
            limits: SessionLimits {
                max_message_bytes: config.max_message_bytes as u64,
                rate_per_second: config.rate_limit.map(|r| r.per_second.get()),
                rate_burst: config.rate_limit.map(|r| r.burst.get()),
            },
        }
    }

    /// First connection of a user on this node: subscribe to their topic, index their
    /// conversations and subscribe to those that had no local member.
    async fn load_user(&self, user: &UserId) -> Result<()> {
        let inner = &self.inner;
        inner.router.subscribe(&Topic::User(user.clone())).await?;
        let conversations = inner.store.conversation_ids(user).await?;
        for c in inner.registry.set_conversations(user, conversations) {
            inner.router.subscribe(&Topic::Conversation(c)).await?;
        }
        Ok(())
    }

    pub(super) async fn user_lock(&self, user: &UserId) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, RandomState};
        static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let h = HASHER.get_or_init(RandomState::new).hash_one(user) as usize;
        self.inner.user_locks[h % USER_LOCK_STRIPES].lock().await
    }

    /// Removes a connection (idempotent).
    pub(crate) async fn disconnect(&self, id: ConnectionId) {
        let inner = &self.inner;
        let Some(user) = inner.registry.user_of(id) else {
            return;
        };
        let removed = {
            let _guard = self.user_lock(&user).await;
            inner.registry.remove(id)
        };
        let Some(removed) = removed else { return };
        inner.expiries.remove(id);
        inner.observe(EngineEvent::Disconnected { connection: id });
        for topic in &removed.topics {
            if let Err(err) = inner.router.unsubscribe(topic).await {
                warn!(?topic, error = %err, "router unsubscribe failed");
            }
        }
        if !removed.unwatched.is_empty()
            && let Err(err) = inner.presence.unwatch(&removed.unwatched).await
        {
            warn!(error = %err, "presence unwatch failed");
        }
        if let Err(err) = inner.presence.disconnect(&user, id).await {
            warn!(%user, error = %err, "presence disconnect failed");
        }
        debug!(%user, connection = %id, "disconnected");
    }

    /// Asks each connection's transport to close it for `reason`, then removes them (their
    /// queues take nothing more).
    pub(super) async fn close_connections(&self, conns: Vec<Arc<ConnHandle>>, reason: CloseReason) {
        for conn in &conns {
            conn.outbox.request_close(reason);
        }
        for conn in conns {
            self.disconnect(conn.id).await;
        }
    }

    /// Closes every connection of `user` on this node for `reason`; returns how many.
    pub(super) async fn close_user(&self, user: &UserId, reason: CloseReason) -> usize {
        let conns = self.inner.registry.user_connections(user);
        let n = conns.len();
        self.close_connections(conns, reason).await;
        n
    }

    /// Best-effort synchronous removal (when a session is dropped outside a runtime).
    pub(crate) fn disconnect_local(&self, id: ConnectionId) {
        if self.inner.registry.remove(id).is_some() {
            self.inner.expiries.remove(id);
            self.inner
                .observe(EngineEvent::Disconnected { connection: id });
        }
    }

    // ------------------------------------------------------------------ replies

    /// Queues `event` for this connection only. Waiting here only slows this connection's own
    /// command loop. A closed receiver means the transport is gone; nothing to do.
    pub(crate) async fn reply(&self, conn: &ConnHandle, event: Event) {
        conn.outbox.reply(Arc::new(Frame::new(event))).await;
        self.inner.observe(EngineEvent::Replied {
            connection: conn.id,
        });
    }

    /// A command of `conn` failed: count it and answer with an `error` frame.
    pub(crate) async fn command_failed(
        &self,
        conn: &ConnHandle,
        error: &Error,
        client_msg_id: Option<String>,
    ) {
        self.command_failed_with_id(conn, error, client_msg_id, None)
            .await;
    }

    /// [`Chat::command_failed`] for a command that carried an `id`, echoed on the error.
    pub(crate) async fn command_failed_with_id(
        &self,
        conn: &ConnHandle,
        error: &Error,
        client_msg_id: Option<String>,
        id: Option<String>,
    ) {
        self.inner.observe(EngineEvent::CommandFailed {
            connection: conn.id,
            error,
        });
        let mut event = Event::error(error, client_msg_id);
        if let Event::Error { id: slot, .. } = &mut event {
            *slot = id;
        }
        self.reply(conn, event).await;
    }
}
