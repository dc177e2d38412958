//! [`ChatBuilder`]: composes the parts (in-memory defaults) and starts the engine's tasks.

use std::sync::Arc;

use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::chat::{Chat, Inner, USER_LOCK_STRIPES};
use super::config::ChatConfig;
use super::fanout::OrderLocks;
use super::observer::DynEngineObserver;
use super::push::push_worker;
use super::registry::Registry;
use super::stats::Stats;
use super::tasks;
use super::typing::TypingThrottle;
use crate::error::Result;
use crate::hooks::{DynCommandHook, RateLimit};
use crate::id::SnowflakeGenerator;
use crate::memory::{MemoryPresence, MemoryStore};
use crate::presence::DynPresenceTracker;
use crate::push::PushNotifier;
use crate::router::{DynRouter, LocalRouter};
use crate::store::DynMessageStore;

/// Builds a [`Chat`]. Every part defaults to its in-memory implementation.
#[derive(Debug, Default)]
pub struct ChatBuilder {
    config: ChatConfig,
    store: Option<DynMessageStore>,
    router: Option<DynRouter>,
    presence: Option<DynPresenceTracker>,
    push: Option<Arc<dyn PushNotifier>>,
    hooks: Vec<DynCommandHook>,
    observers: Vec<DynEngineObserver>,
}

impl ChatBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: ChatConfig) -> Self {
        self.config = config;
        self
    }

    /// Edits the configuration in place.
    pub fn configure(mut self, f: impl FnOnce(&mut ChatConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// The message store (default: [`MemoryStore`]).
    pub fn store(mut self, store: DynMessageStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The router (default: [`LocalRouter`], single node).
    pub fn router(mut self, router: DynRouter) -> Self {
        self.router = Some(router);
        self
    }

    /// The presence tracker (default: [`MemoryPresence`] with the configured timings).
    pub fn presence(mut self, presence: DynPresenceTracker) -> Self {
        self.presence = Some(presence);
        self
    }

    /// The push hook for members with no live device.
    pub fn push_notifier(mut self, notifier: Arc<dyn PushNotifier>) -> Self {
        self.push = Some(notifier);
        self
    }

    /// Adds a command hook (runs after the rate limit, in the order added).
    pub fn hook(mut self, hook: DynCommandHook) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Adds an observer of engine events (see [`EngineObserver`](super::EngineObserver)).
    pub fn observer(mut self, observer: DynEngineObserver) -> Self {
        self.observers.push(observer);
        self
    }

    /// Starts the engine: starts the router and the background tasks (heartbeats, presence
    /// changes, router inbox, session expiry, push, housekeeping). Must run inside a tokio runtime.
    pub async fn build(self) -> Result<Chat> {
        let config = self.config;
        config.validate()?;
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as DynMessageStore);
        let presence = self.presence.unwrap_or_else(|| {
            Arc::new(MemoryPresence::new(config.presence)) as DynPresenceTracker
        });
        let router = self
            .router
            .unwrap_or_else(|| Arc::new(LocalRouter) as DynRouter);
        let mut hooks = Vec::with_capacity(self.hooks.len() + 1);
        if let Some(rl) = config.rate_limit {
            hooks.push(Arc::new(RateLimit::new(rl)) as DynCommandHook);
        }
        hooks.extend(self.hooks);

        let (inbox_tx, inbox_rx) = mpsc::channel(config.router_inbox);
        router.start(inbox_tx).await?;
        let presence_rx = presence.changes();
        let shutdown = CancellationToken::new();

        let push = self.push.map(|notifier| {
            let (tx, rx) = mpsc::channel(config.push_queue);
            (tx, rx, notifier)
        });
        let inner = Arc::new(Inner {
            ids: SnowflakeGenerator::new(config.node_id),
            typing: TypingThrottle::new(config.typing_throttle),
            user_locks: (0..USER_LOCK_STRIPES)
                .map(|_| AsyncMutex::new(()))
                .collect(),
            conversation_locks: OrderLocks::default(),
            push: push.as_ref().map(|(tx, _, _)| tx.clone()),
            config,
            store,
            router,
            presence,
            hooks,
            registry: Registry::default(),
            shutdown,
            stats: Stats::default(),
            observers: self.observers,
            expiries: Arc::default(),
        });
        let chat = Chat { inner };
        let weak = Arc::downgrade(&chat.inner);
        let token = chat.inner.shutdown.clone();
        let engine = || tasks::Stopping::new(weak.clone(), token.clone());
        let heartbeat = chat.inner.config.presence.heartbeat_interval();
        tokio::spawn(tasks::router_loop(engine(), inbox_rx));
        tokio::spawn(tasks::presence_loop(engine(), presence_rx));
        tokio::spawn(tasks::heartbeat_loop(engine(), heartbeat));
        tokio::spawn(tasks::housekeeping_loop(engine()));
        tokio::spawn(tasks::expiry_loop(engine(), chat.inner.expiries.clone()));
        if let Some((_, rx, notifier)) = push {
            tokio::spawn(push_worker(weak, token, rx, notifier));
        }
        info!(node = %chat.inner.config.node_id, "chat engine started");
        Ok(chat)
    }
}

impl Chat {
    /// A builder with in-memory defaults.
    pub fn builder() -> ChatBuilder {
        ChatBuilder::default()
    }
}
