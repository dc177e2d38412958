//! [`MessageStore`]: durable conversation timelines, conversations, members and read markers.
//!
//! Promises every implementation keeps (checked by `chat_core::testing::store`, feature `testing`):
//! * `append` assigns `seq = last + 1` atomically: per conversation, seqs are 1, 2, 3, … with no
//!   gap and no duplicate, whatever the number of concurrent appenders and nodes.
//! * `append` is idempotent on `(conversation, sender, client_msg_id)`: a retry returns the
//!   original message with `duplicate = true` and stores nothing new.
//! * `append` returns only once the message is durable for that backend.
//! * Markers only move forward and are clamped to the conversation's last seq; reading up to N
//!   also marks delivered up to N. Members added later start with both markers at the
//!   conversation's `last_seq` at the time they join (history before that is not unread).
//! * A freshly appended message keeps the `message_id` it was given.
//! * Editing or deleting a deleted message is [`crate::Error::Invalid`].
//! * `limit = 0` returns an empty page.
//! * For an unknown conversation, `member` returns `Ok(None)` or [`crate::Error::NotFound`]
//!   (callers treat both as "not a member"); `append`, `set_marker` and `last_seq` return
//!   `NotFound`.
//! * A direct conversation has exactly its two members: `add_members` of anyone else is
//!   [`crate::Error::Invalid`] (the engine also refuses member changes on direct conversations).
//!
//! # The change stream
//!
//! A store that keeps one ([`MessageStore::stream`] returns `Some`) gives every change a
//! client renders the conversation's next **position**, atomically with the change:
//! a new message, an edit, a delete, a reaction set or removed, a member's markers moving (one
//! position per call that moved them), a member joining or leaving. Positions are 1, 2, 3, …
//! per conversation without gaps and without duplicates, across tasks and nodes; the
//! conversation's creation is position 0. A change that changes nothing (a retried append, a
//! marker that did not move, the same reaction again) takes no position. The store returns the
//! position with the change; [`MessageStore::changes_after`] replays the current state of
//! everything whose latest change is after a position, each thing once, in position order.
//! The stream's **epoch** is random and made with the stream; a store that loses a stream
//! (or whose conversation is recreated) makes a new one with a new epoch.
//!
//! Positions are `None` from a store without a change stream (then `changes_after` and
//! `stream` return `None` and the engine's `sync` replays new messages by seq only).
//!
//! ```
//! use chat_core::memory::MemoryStore;
//! use chat_core::model::{Change, ConversationKind, MessageChange, MessageKind, NewConversation, NewMessage};
//! use chat_core::id::{NodeId, SnowflakeGenerator};
//! use chat_core::{MessageStore, UserId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chat_core::Error> {
//! let store = MemoryStore::new();
//! let ids = SnowflakeGenerator::new(NodeId::ZERO);
//! let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
//! let conv = store
//!     .create_conversation(NewConversation {
//!         id: ids.conversation_id(),
//!         kind: ConversationKind::Direct,
//!         name: None,
//!         creator: alice.clone(),
//!         members: vec![bob.clone()],
//!         created_at: 0,
//!     })
//!     .await?;
//! let sent = store
//!     .append(NewMessage {
//!         message_id: ids.message_id(),
//!         conversation_id: conv.id,
//!         sender_id: alice.clone(),
//!         client_msg_id: "m1".into(),
//!         kind: MessageKind::Text,
//!         content: "hi".into(),
//!         media: None,
//!         reply_to: None,
//!         created_at: 0,
//!     })
//!     .await?;
//! assert_eq!(sent.position, Some(1));
//! for text in ["hi!", "hi!!"] {
//!     let edit = MessageChange::Edit { content: text.into() };
//!     store.change_message(conv.id, sent.message.message_id, &alice, edit, 1).await?;
//! }
//! store.react(conv.id, sent.message.message_id, &bob, Some("👍")).await?; // position 4
//!
//! // A device that applied position 1 catches up: the message once, as it is now.
//! let page = store.changes_after(conv.id, 1, 100).await?.expect("a change stream");
//! assert_eq!(page.stream.position, 4);
//! let [Change::Message { position: 4, message }] = page.changes.as_slice() else { panic!() };
//! assert_eq!((message.content.as_str(), message.reactions[0].key.as_str()), ("hi!!", "👍"));
//! # Ok(()) }
//! ```

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::id::{ConversationId, MessageId, UserId};
use crate::model::{
    ChangePage, Conversation, ConversationView, Member, Message, MessageChange, NewConversation,
    NewMessage, Page, ReceiptKind, StreamPosition,
};

/// The outcome of [`MessageStore::append`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The stored message (the original one for a retry).
    pub message: Message,
    /// True when `(conversation, sender, client_msg_id)` was already stored.
    pub duplicate: bool,
    /// The change-stream position the append took; `None` for a duplicate (it took none) and
    /// from a store without a change stream.
    pub position: Option<u64>,
}

/// The outcome of [`MessageStore::change_message`] and [`MessageStore::react`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageUpdate {
    /// The message after the call.
    pub message: Message,
    /// The position the change took: `None` when nothing changed (the same reaction again) or
    /// from a store without a change stream.
    pub position: Option<u64>,
}

/// A member who joined ([`MessageStore::add_members`]) or left ([`MessageStore::remove_member`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipUpdate {
    /// Who.
    pub user_id: UserId,
    /// The position the change took (`None` from a store without a change stream).
    pub position: Option<u64>,
}

/// The outcome of [`MessageStore::set_marker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkerUpdate {
    /// The marker after the call (never lower than before).
    pub seq: u64,
    /// Whether the call moved it.
    pub moved: bool,
    /// The position the move took (`None` when it did not move, or from a store without a
    /// change stream).
    pub position: Option<u64>,
}

/// Durable storage of conversations and their timelines.
///
/// Implementations: [`crate::memory::MemoryStore`] (embedded default), `chat_store::RedisStore`,
/// `chat_store::ScyllaStore`.
#[async_trait]
pub trait MessageStore: Send + Sync + Debug + 'static {
    // ---- timelines ----

    /// Appends a message: checks that the sender is a member ([`crate::Error::NotMember`]),
    /// assigns the next seq and stores it durably, idempotently (see the module docs).
    /// [`crate::Error::NotFound`] for an unknown conversation.
    async fn append(&self, message: NewMessage) -> Result<Appended>;

    /// One message.
    async fn message(&self, conversation: ConversationId, id: MessageId)
    -> Result<Option<Message>>;

    /// Edits or deletes a message of `by`: [`crate::Error::Forbidden`] when `by` is not the
    /// sender, [`crate::Error::NotFound`] when there is no such message. Bumps `version`; a
    /// delete also removes the reactions.
    async fn change_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        by: &UserId,
        change: MessageChange,
        now: u64,
    ) -> Result<MessageUpdate>;

    /// Sets (`Some(key)`) or removes (`None`) `user`'s reaction on a message, by the rule of
    /// [`crate::model::apply_reaction`] (one per user per message, a new key replacing the
    /// old one). Does not bump `version`. [`crate::Error::NotFound`] for no such message,
    /// [`crate::Error::NotMember`] when `user` is not a member, [`crate::Error::Invalid`] for
    /// a deleted message, a bad key or too many keys.
    ///
    /// A store without a change stream refuses with [`crate::Error::Invalid`].
    async fn react(
        &self,
        conversation: ConversationId,
        id: MessageId,
        user: &UserId,
        key: Option<&str>,
    ) -> Result<MessageUpdate>;

    /// The conversation's change stream now, `None` for a store without one.
    /// [`crate::Error::NotFound`] for an unknown conversation.
    async fn stream(&self, conversation: ConversationId) -> Result<Option<StreamPosition>>;

    /// Up to `limit` changes whose latest position is after `after`, in position order, each
    /// as the current state of what changed (see [`crate::model::Change`]), with the stream
    /// as it was when read. `None` for a store without a change stream.
    /// [`crate::Error::NotFound`] for an unknown conversation.
    async fn changes_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Option<ChangePage>>;

    /// Up to `limit` messages with `seq < before` (all when `None`), newest first.
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// Up to `limit` messages with `seq > after`, oldest first (for sync).
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// Seq of the newest message (0 when empty); [`crate::Error::NotFound`] for an unknown
    /// conversation.
    async fn last_seq(&self, conversation: ConversationId) -> Result<u64>;

    // ---- conversations and members ----

    /// Creates a conversation. The creator is always a member (`owner` of a group). A direct
    /// conversation needs exactly two distinct members; if one already exists between them it
    /// is returned instead of a new one.
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation>;

    /// A conversation with its members.
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>>;

    /// One member entry (the hot-path membership check).
    async fn member(&self, conversation: ConversationId, user: &UserId) -> Result<Option<Member>>;

    /// Adds members (role `member`); returns the users that were not members before, each
    /// with the position their join took.
    async fn add_members(
        &self,
        conversation: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> Result<Vec<MembershipUpdate>>;

    /// Removes a member; returns `None` when they were not one.
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<Option<MembershipUpdate>>;

    /// Every conversation the user is a member of (unordered).
    async fn conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>>;

    /// The user's conversations, most recent activity first, `limit` per page. `after` is the
    /// `last_activity` of the last conversation of the previous page.
    async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>>;

    /// Moves the user's delivered or read marker forward to `seq` (clamped to the last seq).
    /// [`crate::Error::NotMember`] when the user is not a member.
    async fn set_marker(
        &self,
        conversation: ConversationId,
        user: &UserId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<MarkerUpdate>;

    /// Messages from other members after the user's read marker, not counting deleted ones.
    async fn unread(&self, conversation: ConversationId, user: &UserId) -> Result<u64>;
}

/// A shared, dynamically chosen store.
pub type DynMessageStore = Arc<dyn MessageStore>;

#[async_trait]
impl<T: MessageStore + ?Sized> MessageStore for Arc<T> {
    async fn append(&self, message: NewMessage) -> Result<Appended> {
        (**self).append(message).await
    }
    async fn message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<Message>> {
        (**self).message(conversation, id).await
    }
    async fn change_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        by: &UserId,
        change: MessageChange,
        now: u64,
    ) -> Result<MessageUpdate> {
        (**self)
            .change_message(conversation, id, by, change, now)
            .await
    }
    async fn react(
        &self,
        conversation: ConversationId,
        id: MessageId,
        user: &UserId,
        key: Option<&str>,
    ) -> Result<MessageUpdate> {
        (**self).react(conversation, id, user, key).await
    }
    async fn stream(&self, conversation: ConversationId) -> Result<Option<StreamPosition>> {
        (**self).stream(conversation).await
    }
    async fn changes_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Option<ChangePage>> {
        (**self).changes_after(conversation, after, limit).await
    }
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        (**self).history(conversation, before, limit).await
    }
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        (**self).messages_after(conversation, after, limit).await
    }
    async fn last_seq(&self, conversation: ConversationId) -> Result<u64> {
        (**self).last_seq(conversation).await
    }
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        (**self).create_conversation(new).await
    }
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        (**self).conversation(id).await
    }
    async fn member(&self, conversation: ConversationId, user: &UserId) -> Result<Option<Member>> {
        (**self).member(conversation, user).await
    }
    async fn add_members(
        &self,
        conversation: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> Result<Vec<MembershipUpdate>> {
        (**self).add_members(conversation, users, now).await
    }
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<Option<MembershipUpdate>> {
        (**self).remove_member(conversation, user).await
    }
    async fn conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>> {
        (**self).conversation_ids(user).await
    }
    async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>> {
        (**self).list_conversations(user, after, limit).await
    }
    async fn set_marker(
        &self,
        conversation: ConversationId,
        user: &UserId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<MarkerUpdate> {
        (**self).set_marker(conversation, user, kind, seq).await
    }
    async fn unread(&self, conversation: ConversationId, user: &UserId) -> Result<u64> {
        (**self).unread(conversation, user).await
    }
}
