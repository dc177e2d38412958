//! [`Chat`]: the engine that composes the four parts.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::ChatConfig;
use super::push::{PushJob, push_worker};
use super::registry::{CloseReason, ConnHandle, Delivery, Registry};
use super::session::{Outbound, Session};
use super::stats::{Stats, StatsSnapshot};
use super::typing::TypingThrottle;
use crate::error::{Error, Result};
use crate::hooks::{DynCommandHook, HookContext, RateLimit};
use crate::id::{ConnectionId, ConversationId, MessageId, NodeId, SnowflakeGenerator, UserId};
use crate::memory::{MemoryPresence, MemoryStore};
use crate::model::{
    ConversationKind, ConversationView, Message, MessageChange, MessageKind, NewConversation,
    NewMessage, Page, Presence, ReceiptKind,
};
use crate::presence::DynPresenceTracker;
use crate::protocol::{Command, Event, Frame, MembershipChange, SendMessage};
use crate::push::PushNotifier;
use crate::router::{DynRouter, Envelope, Inbound, LocalRouter, Payload, Topic};
use crate::store::DynMessageStore;
use crate::time::now_ms;

/// Connect/disconnect of one user are serialized through one of these stripes, so a second
/// device never sees the first one's half-built registry entry.
const USER_LOCK_STRIPES: usize = 64;
/// Stripes of the per-conversation send order lock.
const CONVERSATION_LOCK_STRIPES: usize = 256;

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
    store: DynMessageStore,
    /// Cross-node delivery.
    router: DynRouter,
    /// Online / offline.
    presence: DynPresenceTracker,
    /// Queue of the push worker, when the host installed a notifier.
    push: Option<mpsc::Sender<PushJob>>,
    /// Host rules (rate limit first, when enabled).
    hooks: Vec<DynCommandHook>,
    /// Message, conversation and connection ids.
    ids: SnowflakeGenerator,
    /// Who is connected here.
    registry: Registry,
    /// Typing throttle state.
    typing: TypingThrottle,
    /// Serializes connect/disconnect per user (striped).
    user_locks: Vec<AsyncMutex<()>>,
    /// Serializes append + local fan-out per conversation (striped), so that on one node every
    /// recipient gets a conversation's messages in seq order, whoever sent them.
    conversation_locks: Vec<OrderLock>,
    /// Cancelled by [`Chat::shutdown`]; background tasks and transports watch it.
    shutdown: CancellationToken,
    /// Counters for `/metrics`.
    pub(crate) stats: Stats,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Builds a [`Chat`]. Every part defaults to its in-memory implementation.
#[derive(Debug, Default)]
pub struct ChatBuilder {
    config: ChatConfig,
    store: Option<DynMessageStore>,
    router: Option<DynRouter>,
    presence: Option<DynPresenceTracker>,
    push: Option<Arc<dyn PushNotifier>>,
    hooks: Vec<DynCommandHook>,
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

    /// Starts the engine: starts the router and the background tasks (heartbeats, presence
    /// changes, router inbox, push, housekeeping). Must run inside a tokio runtime.
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
            conversation_locks: (0..CONVERSATION_LOCK_STRIPES)
                .map(|_| OrderLock::default())
                .collect(),
            push: push.as_ref().map(|(tx, _, _)| tx.clone()),
            config,
            store,
            router,
            presence,
            hooks,
            registry: Registry::default(),
            shutdown,
            stats: Stats::default(),
        });
        let chat = Chat { inner };
        let weak = Arc::downgrade(&chat.inner);
        let token = chat.inner.shutdown.clone();
        tokio::spawn(router_loop(weak.clone(), token.clone(), inbox_rx));
        tokio::spawn(presence_loop(weak.clone(), token.clone(), presence_rx));
        tokio::spawn(heartbeat_loop(weak.clone(), token.clone()));
        tokio::spawn(housekeeping_loop(weak.clone(), token.clone()));
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
            conn.request_close(CloseReason::Shutdown);
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
    /// `sync` sent right after misses nothing.
    pub async fn connect(&self, user: UserId) -> Result<(Session, Outbound)> {
        if self.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        let inner = &self.inner;
        let (conn, outbound) = ConnHandle::new(
            inner.ids.connection_id(),
            user.clone(),
            inner.config.outbound_queue,
            inner.config.reply_queue,
        );
        let conn = Arc::new(conn);
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
        if let Err(err) = inner.presence.connect(&user, conn.id).await {
            warn!(%user, error = %err, "presence connect failed");
        }
        inner.stats.connected();
        debug!(%user, connection = %conn.id, "connected");
        Ok((Session::new(self.clone(), conn), outbound))
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

    async fn user_lock(&self, user: &UserId) -> tokio::sync::MutexGuard<'_, ()> {
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
        inner.stats.disconnected();
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

    /// Best-effort synchronous removal (when a session is dropped outside a runtime).
    pub(crate) fn disconnect_local(&self, id: ConnectionId) {
        if self.inner.registry.remove(id).is_some() {
            self.inner.stats.disconnected();
        }
    }

    fn close_slow(&self, delivery: Delivery) {
        self.inner.stats.delivered(delivery.delivered);
        for conn in delivery.slow {
            warn!(user = %conn.user, connection = %conn.id, "slow consumer: disconnecting");
            self.inner.stats.slow_consumer();
            conn.request_close(CloseReason::SlowConsumer);
            let chat = self.clone();
            let id = conn.id;
            tokio::spawn(async move { chat.disconnect(id).await });
        }
    }

    // ------------------------------------------------------------------ delivery

    pub(crate) async fn reply(&self, conn: &ConnHandle, event: Event) {
        // Waiting here only slows this connection's own command loop. A closed receiver means
        // the transport is gone; nothing to do.
        conn.reply(Arc::new(Frame::new(event))).await;
        self.inner.stats.replied();
    }

    /// Delivers to local connections behind `topic` and publishes to the other nodes.
    async fn broadcast(
        &self,
        topic: Topic,
        event: Event,
        except_user: Option<UserId>,
        except_conn: Option<ConnectionId>,
    ) {
        let inner = &self.inner;
        let envelope_event = inner.router.is_distributed().then(|| event.clone());
        let frame = Arc::new(Frame::new(event));
        let delivery =
            inner
                .registry
                .deliver(&topic, &frame, except_user.as_ref(), except_conn, true);
        self.close_slow(delivery);
        if let Some(event) = envelope_event {
            self.publish(topic, event, except_user, except_conn).await;
        }
    }

    /// Publishes an event to the other nodes subscribed to `topic`.
    async fn publish(
        &self,
        topic: Topic,
        event: Event,
        except_user: Option<UserId>,
        except_conn: Option<ConnectionId>,
    ) {
        let inner = &self.inner;
        let envelope = Envelope {
            origin: inner.config.node_id,
            topic,
            payload: Payload::Event {
                event,
                except_user,
                except_connection: except_conn,
            },
        };
        if let Err(err) = inner.router.publish(envelope).await {
            // Live delivery is best effort; recipients on other nodes catch up by sync.
            inner.stats.router_error();
            warn!(error = %err, "router publish failed");
        }
    }

    /// A user joined or left: update this node's registry, tell the other nodes where the user
    /// is connected (`Payload::Membership` on their user topic), and send a `membership` event
    /// to the user's devices and, when `announce` is set, to the conversation's members.
    async fn membership_changed(
        &self,
        conversation: ConversationId,
        user: &UserId,
        joined: bool,
        announce: bool,
    ) {
        self.apply_membership(conversation, user, joined).await;
        let inner = &self.inner;
        if inner.router.is_distributed() {
            let envelope = Envelope {
                origin: inner.config.node_id,
                topic: Topic::User(user.clone()),
                payload: Payload::Membership {
                    conversation_id: conversation,
                    user_id: user.clone(),
                    joined,
                },
            };
            if let Err(err) = inner.router.publish(envelope).await {
                inner.stats.router_error();
                warn!(error = %err, "router publish (membership) failed");
            }
        }
        let event = Event::Membership {
            conversation_id: conversation,
            user_id: user.clone(),
            change: if joined {
                MembershipChange::Joined
            } else {
                MembershipChange::Left
            },
        };
        if announce {
            self.broadcast(
                Topic::Conversation(conversation),
                event.clone(),
                Some(user.clone()),
                None,
            )
            .await;
        }
        self.broadcast(Topic::User(user.clone()), event, None, None)
            .await;
    }

    async fn apply_membership(&self, conversation: ConversationId, user: &UserId, joined: bool) {
        let inner = &self.inner;
        let _guard = self.user_lock(user).await;
        if inner.registry.membership(conversation, user, joined) == Some(true) {
            let topic = Topic::Conversation(conversation);
            let result = if joined {
                inner.router.subscribe(&topic).await
            } else {
                inner.router.unsubscribe(&topic).await
            };
            if let Err(err) = result {
                warn!(?topic, error = %err, "router (un)subscribe failed");
            }
        }
    }

    // ------------------------------------------------------------------ commands

    pub(crate) async fn execute(&self, conn: &ConnHandle, mut command: Command) -> Result<()> {
        let inner = &self.inner;
        inner.stats.command();
        let ctx = HookContext {
            user: &conn.user,
            connection: conn.id,
        };
        for hook in &inner.hooks {
            hook.before(&ctx, &mut command).await?;
        }
        match command {
            Command::Message(m) => self.send(conn, m).await,
            Command::Typing { conversation_id } => self.typing(conn, conversation_id).await,
            Command::Delivered {
                conversation_id,
                seq,
            } => {
                self.receipt(conn, conversation_id, ReceiptKind::Delivered, seq)
                    .await
            }
            Command::Read {
                conversation_id,
                seq,
            } => {
                self.receipt(conn, conversation_id, ReceiptKind::Read, seq)
                    .await
            }
            Command::Edit {
                conversation_id,
                message_id,
                content,
            } => {
                self.check_content(&content)?;
                if content.is_empty() {
                    return Err(Error::invalid("edit content must not be empty; use delete"));
                }
                self.change(
                    conn,
                    conversation_id,
                    message_id,
                    MessageChange::Edit { content },
                )
                .await
            }
            Command::Delete {
                conversation_id,
                message_id,
            } => {
                self.change(conn, conversation_id, message_id, MessageChange::Delete)
                    .await
            }
            Command::Sync { conversations } => self.sync(conn, conversations).await,
            Command::PresenceSubscribe { user_ids } => {
                self.presence_subscribe(conn, user_ids).await
            }
            Command::PresenceUnsubscribe { user_ids } => {
                let gone = inner.registry.unwatch(conn.id, &user_ids);
                if !gone.is_empty() {
                    inner.presence.unwatch(&gone).await?;
                }
                Ok(())
            }
        }
    }

    fn check_content(&self, content: &str) -> Result<()> {
        let limit = self.inner.config.max_message_bytes;
        if content.len() > limit {
            return Err(Error::TooLarge {
                size: content.len(),
                limit,
            });
        }
        Ok(())
    }

    fn validate_send(&self, m: &SendMessage) -> Result<()> {
        let max_id = self.inner.config.max_client_msg_id_bytes;
        if m.client_msg_id.is_empty() || m.client_msg_id.len() > max_id {
            return Err(Error::invalid(format!(
                "client_msg_id must be 1..={max_id} bytes"
            )));
        }
        self.check_content(&m.content)?;
        match m.kind {
            MessageKind::System => {
                return Err(Error::invalid("clients cannot send system messages"));
            }
            MessageKind::Image | MessageKind::File if m.media.is_none() => {
                return Err(Error::invalid("image and file messages need media"));
            }
            MessageKind::Text if m.content.is_empty() && m.media.is_none() => {
                return Err(Error::invalid("empty message"));
            }
            _ => {}
        }
        if let Some(media) = &m.media {
            media.validate()?;
        }
        Ok(())
    }

    async fn send(&self, conn: &ConnHandle, m: SendMessage) -> Result<()> {
        self.validate_send(&m)?;
        let inner = &self.inner;
        let conversation = m.conversation_id;
        if let Some(target) = m.reply_to
            && inner
                .store
                .message(conversation, target)
                .await
                .ok()
                .flatten()
                .is_none()
        {
            return Err(Error::invalid(format!(
                "reply_to {target} is not a message of this conversation"
            )));
        }
        // Append and local fan-out in one critical section per conversation: seqs are assigned
        // in the same order as frames are queued to local recipients.
        let stripe = &inner.conversation_locks
            [(conversation.get() % CONVERSATION_LOCK_STRIPES as u64) as usize];
        let order = stripe.lock().await;
        let message_id = inner.ids.message_id();
        let appended = inner
            .store
            .append(NewMessage {
                message_id,
                conversation_id: conversation,
                sender_id: conn.user.clone(),
                client_msg_id: m.client_msg_id,
                kind: m.kind,
                content: m.content,
                media: m.media,
                reply_to: m.reply_to,
                created_at: message_id.timestamp_ms(),
            })
            .await?;
        let message = appended.message;
        let ack = Event::MessageAck {
            client_msg_id: message.client_msg_id.clone(),
            conversation_id: message.conversation_id,
            message_id: message.message_id,
            seq: message.seq,
            timestamp: message.created_at,
        };
        if appended.duplicate {
            drop(order);
            // The original send fanned out already (or its recipients get it by sync).
            self.reply(conn, ack).await;
            return Ok(());
        }
        inner.stats.message_sent();
        inner.typing.reset(&conn.user, conversation);
        let event = Event::Message { message };
        let envelope_event = inner.router.is_distributed().then(|| event.clone());
        let frame = Arc::new(Frame::new(event));
        let topic = Topic::Conversation(conversation);
        // Write to the sockets on the spot unless the conversation is busy: other sends wait
        // for this one, or its direct fan-outs would take most of the time between its sends.
        // Then the connections' writer tasks take over (in parallel, batched).
        let started = std::time::Instant::now();
        let may_write = !stripe.contended() && stripe.direct_affordable(started);
        let delivery = inner
            .registry
            .deliver(&topic, &frame, None, Some(conn.id), may_write);
        if may_write {
            stripe.direct_took(started.elapsed());
        } else {
            inner.stats.fanout_to_writers();
        }
        drop(order);
        self.close_slow(delivery);
        // Durable (append returned): only now does the sender hear about it.
        self.reply(conn, ack).await;
        if let Some(push) = &inner.push
            && let Event::Message { message } = frame.event()
            && push.try_send(PushJob::new(message.clone())).is_err()
        {
            warn!("push queue full: dropping a notification");
        }
        if let Some(event) = envelope_event {
            self.publish(topic, event, None, Some(conn.id)).await;
        }
        Ok(())
    }

    async fn typing(&self, conn: &ConnHandle, conversation: ConversationId) -> Result<()> {
        let inner = &self.inner;
        if !inner.registry.is_local_member(&conn.user, conversation) {
            return Err(self.not_member_or_not_found(conversation).await);
        }
        if !inner.typing.allow(&conn.user, conversation) {
            return Ok(());
        }
        self.broadcast(
            Topic::Conversation(conversation),
            Event::Typing {
                conversation_id: conversation,
                user_id: conn.user.clone(),
            },
            Some(conn.user.clone()),
            None,
        )
        .await;
        Ok(())
    }

    async fn receipt(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<()> {
        let update = self
            .inner
            .store
            .set_marker(conversation, &conn.user, kind, seq)
            .await?;
        if update.moved {
            self.broadcast(
                Topic::Conversation(conversation),
                Event::Receipt {
                    conversation_id: conversation,
                    user_id: conn.user.clone(),
                    kind,
                    seq: update.seq,
                },
                None,
                Some(conn.id),
            )
            .await;
        }
        Ok(())
    }

    async fn change(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        message_id: MessageId,
        change: MessageChange,
    ) -> Result<()> {
        self.require_member(conversation, &conn.user).await?;
        let deleted = matches!(change, MessageChange::Delete);
        let message = self
            .inner
            .store
            .change_message(conversation, message_id, &conn.user, change, now_ms())
            .await?;
        let event = if deleted {
            Event::MessageDeleted { message }
        } else {
            Event::MessageEdited { message }
        };
        self.broadcast(Topic::Conversation(conversation), event, None, None)
            .await;
        Ok(())
    }

    async fn sync(
        &self,
        conn: &ConnHandle,
        conversations: BTreeMap<ConversationId, u64>,
    ) -> Result<()> {
        let inner = &self.inner;
        if conversations.len() > inner.config.max_sync_conversations {
            return Err(Error::invalid(format!(
                "sync lists {} conversations; the limit is {}",
                conversations.len(),
                inner.config.max_sync_conversations
            )));
        }
        let limit = inner.config.sync_limit;
        let mut latest = BTreeMap::new();
        let mut more = Vec::new();
        for (conversation, after) in conversations {
            match self.sync_one(conn, conversation, after, limit).await {
                Ok((last, has_more)) => {
                    latest.insert(conversation, last);
                    if has_more {
                        more.push(conversation);
                    }
                }
                Err(err @ (Error::NotMember(_) | Error::NotFound(_))) => {
                    self.inner.stats.count_error(err.code());
                    self.reply(conn, Event::error(&err, None)).await;
                }
                Err(err) => {
                    // Transient store trouble: report it and ask the client to sync this one again.
                    self.inner.stats.count_error(err.code());
                    self.reply(conn, Event::error(&err, None)).await;
                    more.push(conversation);
                }
            }
        }
        self.reply(
            conn,
            Event::SyncDone {
                conversations: latest,
                more,
            },
        )
        .await;
        Ok(())
    }

    async fn sync_one(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        let store = &self.inner.store;
        self.require_member(conversation, &conn.user).await?;
        let mut messages = store
            .messages_after(conversation, after, limit.saturating_add(1))
            .await?;
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        let last = match (has_more, messages.last()) {
            (true, Some(m)) => m.seq,
            _ => store.last_seq(conversation).await?,
        };
        for message in messages {
            self.reply(conn, Event::Message { message }).await;
        }
        Ok((last, has_more))
    }

    async fn presence_subscribe(&self, conn: &ConnHandle, users: Vec<UserId>) -> Result<()> {
        let inner = &self.inner;
        for u in &users {
            UserId::parse(u.as_str())?;
        }
        let fresh = inner
            .registry
            .watch(conn.id, &users, inner.config.max_presence_watch)
            .map_err(|total| {
                Error::invalid(format!(
                    "a connection may watch at most {} users (asked for {total})",
                    inner.config.max_presence_watch
                ))
            })?;
        if !fresh.is_empty() {
            inner.presence.watch(&fresh).await?;
        }
        for p in inner.presence.presence(&users).await? {
            self.reply(conn, presence_event(p)).await;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ checks

    async fn require_member(&self, conversation: ConversationId, user: &UserId) -> Result<()> {
        match self.inner.store.member(conversation, user).await? {
            Some(_) => Ok(()),
            None => Err(self.not_member_or_not_found(conversation).await),
        }
    }

    /// `NotFound` for an unknown conversation, `NotMember` otherwise.
    async fn not_member_or_not_found(&self, conversation: ConversationId) -> Error {
        match self.inner.store.last_seq(conversation).await {
            Ok(_) => Error::NotMember(conversation),
            Err(err) => err,
        }
    }

    // ------------------------------------------------------------------ API for transports

    /// Creates a conversation (the creator is always a member, `owner` of a group). A direct
    /// conversation between the same two users is returned again rather than duplicated.
    pub async fn create_conversation(
        &self,
        creator: &UserId,
        kind: ConversationKind,
        members: &[UserId],
        name: Option<String>,
    ) -> Result<ConversationView> {
        let inner = &self.inner;
        if name.as_ref().is_some_and(|n| n.len() > 256) {
            return Err(Error::invalid("name is longer than 256 bytes"));
        }
        for u in members {
            UserId::parse(u.as_str())?;
        }
        if members.len() >= inner.config.max_group_members {
            return Err(Error::invalid(format!(
                "a group has at most {} members",
                inner.config.max_group_members
            )));
        }
        let id = inner.ids.conversation_id();
        let conversation = inner
            .store
            .create_conversation(NewConversation {
                id,
                kind,
                name,
                creator: creator.clone(),
                members: members.to_vec(),
                created_at: id.timestamp_ms(),
            })
            .await?;
        if conversation.id == id {
            // Each member's devices learn about the new conversation; the members are not
            // told about each other (that would be O(members²) frames for a big group).
            for m in &conversation.members {
                self.membership_changed(id, &m.user_id, true, false).await;
            }
        }
        self.conversation_view(creator, conversation.id).await
    }

    /// One conversation as `user` sees it (`NotMember` / `NotFound`).
    pub async fn conversation_view(
        &self,
        user: &UserId,
        conversation: ConversationId,
    ) -> Result<ConversationView> {
        let store = &self.inner.store;
        let conv = store
            .conversation(conversation)
            .await?
            .ok_or_else(|| Error::not_found(format!("conversation {conversation}")))?;
        if conv.member(user).is_none() {
            return Err(Error::NotMember(conversation));
        }
        let unread = store.unread(conversation, user).await?;
        let last_message = store.history(conversation, None, 1).await?.pop();
        Ok(ConversationView {
            conversation: conv,
            unread,
            last_message,
        })
    }

    /// The user's conversations, most recent activity first. `after` is the previous page's
    /// `next`.
    pub async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>> {
        let limit = self.page_limit(limit)?;
        self.inner
            .store
            .list_conversations(user, after, limit)
            .await
    }

    /// A page of history, newest first: messages with `seq < before`. `next` is the `before`
    /// of the following page, `None` at the beginning of the conversation.
    pub async fn history(
        &self,
        user: &UserId,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Message, u64>> {
        let limit = self.page_limit(limit)?;
        self.require_member(conversation, user).await?;
        let items = self
            .inner
            .store
            .history(conversation, before, limit)
            .await?;
        let next = match items.last() {
            Some(oldest) if items.len() == limit && oldest.seq > 1 => Some(oldest.seq),
            _ => None,
        };
        Ok(Page { items, next })
    }

    fn page_limit(&self, limit: usize) -> Result<usize> {
        let max = self.inner.config.max_page_size;
        if limit == 0 || limit > max {
            return Err(Error::invalid(format!("limit must be 1..={max}")));
        }
        Ok(limit)
    }

    /// The group `actor` wants to change the members of, and the actor's role in it:
    /// `NotFound`, `NotMember`, or `Invalid` for a direct conversation (fixed members).
    async fn group_for_member_change(
        &self,
        actor: &UserId,
        conversation: ConversationId,
    ) -> Result<(crate::model::Conversation, crate::model::Role)> {
        let conv = self
            .inner
            .store
            .conversation(conversation)
            .await?
            .ok_or_else(|| Error::not_found(format!("conversation {conversation}")))?;
        let role = conv
            .member(actor)
            .ok_or(Error::NotMember(conversation))?
            .role;
        if conv.kind != ConversationKind::Group {
            return Err(Error::invalid(
                "a direct conversation has fixed members; only groups change",
            ));
        }
        Ok((conv, role))
    }

    /// Adds members to a group: `actor` must be its owner or an admin. Returns who was added.
    pub async fn add_members(
        &self,
        actor: &UserId,
        conversation: ConversationId,
        users: &[UserId],
    ) -> Result<Vec<UserId>> {
        let inner = &self.inner;
        for u in users {
            UserId::parse(u.as_str())?;
        }
        let (conv, role) = self.group_for_member_change(actor, conversation).await?;
        if !role.can_manage_members() {
            return Err(Error::forbidden("only owners and admins may add members"));
        }
        if conv.members.len() + users.len() > inner.config.max_group_members {
            return Err(Error::invalid(format!(
                "a group has at most {} members",
                inner.config.max_group_members
            )));
        }
        let added = inner
            .store
            .add_members(conversation, users, now_ms())
            .await?;
        for u in &added {
            self.membership_changed(conversation, u, true, true).await;
        }
        Ok(added)
    }

    /// Removes a member from a group: anyone may remove themself; owners and admins may remove
    /// others (but only an owner may remove an owner). Returns whether they were a member.
    pub async fn remove_member(
        &self,
        actor: &UserId,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<bool> {
        let inner = &self.inner;
        let (conv, actor_role) = self.group_for_member_change(actor, conversation).await?;
        if actor != user {
            let target = conv.member(user).map(|m| m.role);
            let allowed = actor_role.can_manage_members()
                && (target != Some(crate::model::Role::Owner)
                    || actor_role == crate::model::Role::Owner);
            if !allowed {
                return Err(Error::forbidden("not allowed to remove this member"));
            }
        }
        let removed = inner.store.remove_member(conversation, user).await?;
        if removed {
            self.membership_changed(conversation, user, false, true)
                .await;
        }
        Ok(removed)
    }

    /// Presence of these users (debounced status, last seen).
    pub async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        if users.len() > self.inner.config.max_presence_watch {
            return Err(Error::invalid(format!(
                "at most {} users per request",
                self.inner.config.max_presence_watch
            )));
        }
        self.inner.presence.presence(users).await
    }

    /// Whether `user` has a connection on this node.
    pub fn is_connected_here(&self, user: &UserId) -> bool {
        self.inner.registry.is_connected(user)
    }

    pub(crate) fn presence_part(&self) -> &DynPresenceTracker {
        &self.inner.presence
    }
}

fn presence_event(p: Presence) -> Event {
    Event::Presence {
        user_id: p.user_id,
        status: p.status,
        last_seen: p.last_seen,
    }
}

/// A conversation stripe's send-order lock, which knows whether anyone waits for it and how
/// busy its fan-out keeps it.
#[derive(Debug, Default)]
struct OrderLock {
    lock: AsyncMutex<()>,
    waiting: std::sync::atomic::AtomicUsize,
    /// Only touched while `lock` is held.
    load: std::sync::Mutex<FanoutLoad>,
}

/// Direct fan-out stays on while it takes less than this share of the time between a
/// conversation stripe's sends.
const DIRECT_SHARE: f64 = 0.8;

/// Moving averages (1/8 weight to the newest) of a stripe's time between sends and of how long
/// its fan-outs take when the sending task writes to the sockets itself.
#[derive(Debug, Default)]
struct FanoutLoad {
    last_send: Option<std::time::Instant>,
    interval_ns: f64,
    direct_ns: f64,
}

impl FanoutLoad {
    fn average(avg: &mut f64, sample: f64) {
        *avg = if *avg == 0.0 {
            sample
        } else {
            *avg + (sample - *avg) / 8.0
        };
    }
}

impl OrderLock {
    async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        /// Counts a waiter until it holds the lock (or gives up: dropped futures count off too).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        self.lock.lock().await
    }

    /// Another send waits for this stripe.
    fn contended(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    fn load(&self) -> std::sync::MutexGuard<'_, FanoutLoad> {
        self.load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a send at `now` (with the lock held); true while direct fan-outs take less than
    /// [`DIRECT_SHARE`] of the time between sends. The estimate of a direct fan-out's cost only changes when
    /// one runs, so a busy conversation stays on the writer tasks instead of flapping.
    fn direct_affordable(&self, now: std::time::Instant) -> bool {
        let mut load = self.load();
        if let Some(last) = load.last_send {
            // Gaps over a second count as a second: an idle spell should not hide for long
            // that the conversation is busy again.
            let gap = now
                .duration_since(last)
                .min(std::time::Duration::from_secs(1));
            FanoutLoad::average(&mut load.interval_ns, gap.as_nanos() as f64);
        }
        load.last_send = Some(now);
        load.interval_ns == 0.0 || load.direct_ns < DIRECT_SHARE * load.interval_ns
    }

    /// How long a direct fan-out took (with the lock held).
    fn direct_took(&self, took: std::time::Duration) {
        FanoutLoad::average(&mut self.load().direct_ns, took.as_nanos() as f64);
    }
}

// ---------------------------------------------------------------------- background tasks

async fn router_loop(
    weak: Weak<Inner>,
    token: CancellationToken,
    mut inbox: mpsc::Receiver<Inbound>,
) {
    loop {
        let inbound = tokio::select! {
            _ = token.cancelled() => return,
            i = inbox.recv() => match i { Some(i) => i, None => return },
        };
        let Some(inner) = weak.upgrade() else { return };
        let chat = Chat { inner };
        match inbound {
            Inbound::Envelope(envelope) => match &envelope.payload {
                Payload::Event {
                    event,
                    except_user,
                    except_connection,
                } => {
                    let frame = Arc::new(Frame::new(event.clone()));
                    // With a backlog in the inbox, leave the writes to the writer tasks.
                    let may_write = inbox.is_empty();
                    let delivery = chat.inner.registry.deliver(
                        &envelope.topic,
                        &frame,
                        except_user.as_ref(),
                        *except_connection,
                        may_write,
                    );
                    chat.close_slow(delivery);
                }
                Payload::Membership {
                    conversation_id,
                    user_id,
                    joined,
                } => {
                    chat.apply_membership(*conversation_id, user_id, *joined)
                        .await;
                }
            },
            Inbound::Lagged => {
                // Live delivery to this node had a gap: every local client must resync from the
                // store. Closing makes them reconnect and sync (the documented client recipe).
                warn!("router lagged: asking every local connection to resync");
                let jitter_ms = chat.inner.config.resync_jitter.as_millis() as u64;
                for conn in chat.inner.registry.connections() {
                    // Spread deterministically by connection id (a Snowflake: its low bits
                    // are well mixed across connections).
                    let delay = std::time::Duration::from_millis(
                        conn.id.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) % (jitter_ms + 1),
                    );
                    let chat = chat.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        conn.request_close(CloseReason::Resync);
                        chat.disconnect(conn.id).await;
                    });
                }
            }
        }
    }
}

async fn presence_loop(
    weak: Weak<Inner>,
    token: CancellationToken,
    mut changes: broadcast::Receiver<Presence>,
) {
    loop {
        let received = tokio::select! {
            _ = token.cancelled() => return,
            r = changes.recv() => r,
        };
        let Some(inner) = weak.upgrade() else { return };
        let chat = Chat { inner };
        match received {
            Ok(p) => {
                let user = p.user_id.clone();
                let frame = Arc::new(Frame::new(presence_event(p)));
                let delivery = chat.inner.registry.deliver_watchers(&user, &frame);
                chat.close_slow(delivery);
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "presence changes lagged: re-reading watched users"
                );
                let users = chat.inner.registry.watched_users();
                for chunk in users.chunks(500) {
                    match chat.presence_part().presence(chunk).await {
                        Ok(list) => {
                            for p in list {
                                let user = p.user_id.clone();
                                let frame = Arc::new(Frame::new(presence_event(p)));
                                let d = chat.inner.registry.deliver_watchers(&user, &frame);
                                chat.close_slow(d);
                            }
                        }
                        Err(err) => warn!(error = %err, "presence re-read failed"),
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn heartbeat_loop(weak: Weak<Inner>, token: CancellationToken) {
    let period = match weak.upgrade() {
        Some(inner) => inner.config.presence.heartbeat_interval(),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        let sessions = inner.registry.sessions();
        if sessions.is_empty() {
            continue;
        }
        if let Err(err) = inner.presence.heartbeat(&sessions).await {
            warn!(error = %err, "presence heartbeat failed");
        }
    }
}

async fn housekeeping_loop(weak: Weak<Inner>, token: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        inner.typing.prune();
        for hook in &inner.hooks {
            hook.housekeeping();
        }
    }
}

impl Inner {
    pub(crate) fn store(&self) -> &DynMessageStore {
        &self.store
    }

    pub(crate) fn presence(&self) -> &DynPresenceTracker {
        &self.presence
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::OrderLock;

    #[test]
    fn a_conversation_busy_with_direct_fan_out_goes_to_the_writer_tasks_and_back_when_quiet() {
        let stripe = OrderLock::default();
        let t0 = Instant::now();
        // Quiet: sends 5 ms apart, fan-outs of 1 ms: written directly.
        for i in 0..20 {
            assert!(stripe.direct_affordable(t0 + Duration::from_millis(5 * i)));
            stripe.direct_took(Duration::from_millis(1));
        }
        // Busy: sends 1 ms apart now; within some sends the average says the fan-outs would
        // take (nearly) all the time, and it stays so (no flapping) while the rate holds.
        let t1 = t0 + Duration::from_millis(100);
        let decisions: Vec<bool> = (0..60)
            .map(|i| stripe.direct_affordable(t1 + Duration::from_micros(1000 * i)))
            .collect();
        assert!(decisions[..10].contains(&true), "switched without evidence");
        assert!(decisions[30..].iter().all(|d| !d), "{decisions:?}");
        // Quiet again: back to direct writes.
        let t2 = t1 + Duration::from_millis(200);
        let back = (0..20).any(|i| stripe.direct_affordable(t2 + Duration::from_millis(50 * i)));
        assert!(back);
    }
}
