//! Helpers shared by the engine tests: build an engine, connect in-process clients, wait for
//! specific events.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chat_core::memory::{InProcessClient, InProcessTransport};
use chat_core::model::{ConversationKind, Message};
use chat_core::protocol::SendMessage;
use chat_core::{Chat, ChatConfig, Command, ConversationId, Event, UserId};

/// How long a test waits for an event that must arrive.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure an event does not arrive.
pub const QUIET: Duration = Duration::from_millis(150);

pub struct Harness {
    pub chat: Chat,
    pub transport: InProcessTransport,
}

impl Harness {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(f: impl FnOnce(&mut ChatConfig)) -> Self {
        Self::from_builder(Chat::builder().configure(f)).await
    }

    /// An engine built from `builder` (a store with faults, an observer…).
    pub async fn from_builder(builder: chat_core::ChatBuilder) -> Self {
        let chat = builder.build().await.unwrap();
        let transport = InProcessTransport::new(chat.clone());
        Self { chat, transport }
    }

    pub async fn connect(&self, user: &str) -> InProcessClient {
        self.transport.connect(user).await.unwrap()
    }

    pub async fn group(&self, creator: &str, others: &[&str]) -> ConversationId {
        let members: Vec<UserId> = others.iter().map(|u| UserId::from(*u)).collect();
        self.chat
            .create_conversation(
                &UserId::from(creator),
                ConversationKind::Group,
                &members,
                Some("g".into()),
            )
            .await
            .unwrap()
            .conversation
            .id
    }

    pub async fn direct(&self, a: &str, b: &str) -> ConversationId {
        self.chat
            .create_conversation(
                &UserId::from(a),
                ConversationKind::Direct,
                &[UserId::from(b)],
                None,
            )
            .await
            .unwrap()
            .conversation
            .id
    }

    pub async fn history(&self, user: &str, conv: ConversationId) -> Vec<Message> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self
                .chat
                .history(&UserId::from(user), conv, before, 100)
                .await
                .unwrap();
            all.extend(page.items);
            match page.next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        all.reverse();
        all
    }
}

pub fn text(conv: ConversationId, client_msg_id: &str, content: &str) -> Command {
    Command::Message(SendMessage::text(conv, client_msg_id, content))
}

/// Receives until `pred` matches, failing after [`WAIT`]; returns the matching event.
pub async fn expect<F: Fn(&Event) -> bool>(c: &mut InProcessClient, what: &str, pred: F) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, c.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!(
                "{}: connection closed while waiting for {what}",
                c.user_id()
            ),
            Err(_) => panic!("{}: timed out waiting for {what}", c.user_id()),
        }
    }
}

/// The next event, which must arrive within [`WAIT`].
pub async fn next(c: &mut InProcessClient) -> Event {
    tokio::time::timeout(WAIT, c.recv())
        .await
        .unwrap_or_else(|_| panic!("{}: no event", c.user_id()))
        .unwrap_or_else(|| panic!("{}: closed", c.user_id()))
}

/// Asserts that nothing was queued for `c` by what the test did before on this node: an
/// empty `sync` is a barrier (its `sync_done` is queued after everything queued before it),
/// so the next event must be that `sync_done`. No sleep, no timing. For events that reach a
/// connection through a background task (another node, presence changes) use
/// [`expect_quiet`] or a positive control instead.
pub async fn expect_nothing(c: &mut InProcessClient) {
    c.send(Command::Sync {
        conversations: Default::default(),
        streams: Default::default(),
    })
    .await;
    match tokio::time::timeout(WAIT, c.recv()).await {
        Ok(Some(Event::SyncDone {
            conversations,
            more,
            ..
        })) if conversations.is_empty() && more.is_empty() => {}
        Ok(Some(e)) => panic!("{}: unexpected event {e:?}", c.user_id()),
        // Closed (and drained) or the barrier itself never came back: nothing arrived.
        Ok(None) => {}
        Err(_) => panic!("{}: the sync barrier was not answered", c.user_id()),
    }
}

/// Asserts that nothing arrives for [`QUIET`]: for deliveries through another node, where no
/// barrier on this connection covers them.
pub async fn expect_quiet(c: &mut InProcessClient) {
    if let Ok(Some(e)) = tokio::time::timeout(QUIET, c.recv()).await {
        panic!("{}: unexpected event {e:?}", c.user_id());
    }
}

/// Sends a text message and returns its ack `(message_id, seq)`.
pub async fn send_ok(
    c: &mut InProcessClient,
    conv: ConversationId,
    cmid: &str,
    body: &str,
) -> (chat_core::MessageId, u64) {
    c.send(text(conv, cmid, body)).await;
    match expect(c, "message_ack", |e| {
        matches!(e, Event::MessageAck { client_msg_id, .. } if client_msg_id == cmid)
            || matches!(e, Event::Error { client_msg_id: Some(id), .. } if id == cmid)
    })
    .await
    {
        Event::MessageAck {
            message_id, seq, ..
        } => (message_id, seq),
        other => panic!("send failed: {other:?}"),
    }
}

/// Sends and expects an error with `code`; returns the message.
pub async fn send_err(c: &mut InProcessClient, cmd: Command) -> (chat_core::ErrorCode, String) {
    c.send(cmd).await;
    match expect(c, "error", |e| {
        matches!(e, Event::Error { .. } | Event::MessageAck { .. })
    })
    .await
    {
        Event::Error { code, message, .. } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A real [`MemoryStore`](chat_core::memory::MemoryStore) with fault injection on `append`:
/// appends can be held at a gate (to observe what happens before the store answers) or made
/// to fail (a backend outage).
#[derive(Debug, Default)]
pub struct FaultStore {
    pub inner: chat_core::memory::MemoryStore,
    /// When set, `append` waits for a permit before storing.
    pub gate: std::sync::Mutex<Option<std::sync::Arc<tokio::sync::Semaphore>>>,
    /// When true, `append` fails with `Unavailable` without storing.
    pub fail_appends: std::sync::atomic::AtomicBool,
    /// When true, `message` (the one-message read) fails with `Unavailable`.
    pub fail_message_reads: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl chat_core::MessageStore for FaultStore {
    async fn append(
        &self,
        m: chat_core::model::NewMessage,
    ) -> chat_core::Result<chat_core::store::Appended> {
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        if self.fail_appends.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(chat_core::Error::unavailable("fault", "injected outage"));
        }
        self.inner.append(m).await
    }
    async fn message(
        &self,
        c: ConversationId,
        id: chat_core::MessageId,
    ) -> chat_core::Result<Option<Message>> {
        if self
            .fail_message_reads
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(chat_core::Error::unavailable("fault", "injected outage"));
        }
        self.inner.message(c, id).await
    }
    async fn change_message(
        &self,
        c: ConversationId,
        id: chat_core::MessageId,
        by: &UserId,
        change: chat_core::model::MessageChange,
        now: u64,
    ) -> chat_core::Result<chat_core::store::MessageUpdate> {
        self.inner.change_message(c, id, by, change, now).await
    }
    async fn react(
        &self,
        c: ConversationId,
        id: chat_core::MessageId,
        u: &UserId,
        key: Option<&str>,
    ) -> chat_core::Result<chat_core::store::MessageUpdate> {
        self.inner.react(c, id, u, key).await
    }
    async fn stream(
        &self,
        c: ConversationId,
    ) -> chat_core::Result<Option<chat_core::model::StreamPosition>> {
        self.inner.stream(c).await
    }
    async fn changes_after(
        &self,
        c: ConversationId,
        after: u64,
        limit: usize,
    ) -> chat_core::Result<Option<chat_core::model::ChangePage>> {
        self.inner.changes_after(c, after, limit).await
    }
    async fn history(
        &self,
        c: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> chat_core::Result<Vec<Message>> {
        self.inner.history(c, before, limit).await
    }
    async fn messages_after(
        &self,
        c: ConversationId,
        after: u64,
        limit: usize,
    ) -> chat_core::Result<Vec<Message>> {
        self.inner.messages_after(c, after, limit).await
    }
    async fn last_seq(&self, c: ConversationId) -> chat_core::Result<u64> {
        self.inner.last_seq(c).await
    }
    async fn create_conversation(
        &self,
        n: chat_core::model::NewConversation,
    ) -> chat_core::Result<chat_core::model::Conversation> {
        self.inner.create_conversation(n).await
    }
    async fn conversation(
        &self,
        c: ConversationId,
    ) -> chat_core::Result<Option<chat_core::model::Conversation>> {
        self.inner.conversation(c).await
    }
    async fn member(
        &self,
        c: ConversationId,
        u: &UserId,
    ) -> chat_core::Result<Option<chat_core::model::Member>> {
        self.inner.member(c, u).await
    }
    async fn add_members(
        &self,
        c: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> chat_core::Result<Vec<chat_core::store::MembershipUpdate>> {
        self.inner.add_members(c, users, now).await
    }
    async fn remove_member(
        &self,
        c: ConversationId,
        u: &UserId,
    ) -> chat_core::Result<Option<chat_core::store::MembershipUpdate>> {
        self.inner.remove_member(c, u).await
    }
    async fn conversation_ids(&self, u: &UserId) -> chat_core::Result<Vec<ConversationId>> {
        self.inner.conversation_ids(u).await
    }
    async fn list_conversations(
        &self,
        u: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> chat_core::Result<chat_core::model::Page<chat_core::model::ConversationView, u64>> {
        self.inner.list_conversations(u, after, limit).await
    }
    async fn set_marker(
        &self,
        c: ConversationId,
        u: &UserId,
        kind: chat_core::model::ReceiptKind,
        seq: u64,
    ) -> chat_core::Result<chat_core::store::MarkerUpdate> {
        self.inner.set_marker(c, u, kind, seq).await
    }
    async fn unread(&self, c: ConversationId, u: &UserId) -> chat_core::Result<u64> {
        self.inner.unread(c, u).await
    }
}
