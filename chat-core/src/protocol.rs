//! Transport-agnostic protocol types: [`Command`] (client → server) and [`Event`]
//! (server → client), one variant per frame of the wire contract (`docs/protocol.md`).
//!
//! Both derive serde with an internal `type` tag in snake_case, so the JSON codec is
//! `serde_json::to_vec(&event)`; unknown extra fields are ignored.
//!
//! ```
//! use chat_core::protocol::Command;
//! let cmd: Command = serde_json::from_str(
//!     r#"{"type":"typing","conversation_id":"42","extra":"ignored"}"#).unwrap();
//! assert!(matches!(cmd, Command::Typing { .. }));
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::id::{ConnectionId, ConversationId, MessageId, NodeId, UserId};
use crate::model::{
    Media, Message, MessageKind, PresenceStatus, Reaction, ReceiptKind, StreamPosition,
};

/// The `message` command: send a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessage {
    /// Target conversation.
    pub conversation_id: ConversationId,
    /// The client's idempotency key (1..=64 bytes); a retry with the same key returns the
    /// original ids instead of creating a second message.
    pub client_msg_id: String,
    /// Text content (may be empty for media).
    #[serde(default)]
    pub content: String,
    /// `text` (default), `image` or `file`.
    #[serde(default)]
    pub kind: MessageKind,
    /// Attachment metadata (required for `image` and `file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<Media>,
    /// The message this replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
}

impl SendMessage {
    /// A text message.
    ///
    /// ```
    /// use chat_core::{Command, ConversationId, protocol::SendMessage};
    /// let conversation = ConversationId::from_raw(42);
    /// let send = Command::Message(SendMessage::text(conversation, "m-1", "hi"));
    /// assert!(matches!(send, Command::Message(m) if m.content == "hi"));
    /// ```
    pub fn text(
        conversation_id: ConversationId,
        client_msg_id: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        Self {
            conversation_id,
            client_msg_id: client_msg_id.into(),
            content: content.into(),
            kind: MessageKind::Text,
            media: None,
            reply_to: None,
        }
    }

    /// A media message (`image` or `file`) with its attachment metadata; add a caption with
    /// [`SendMessage::with_content`].
    pub fn media(
        conversation_id: ConversationId,
        client_msg_id: impl Into<String>,
        kind: MessageKind,
        media: Media,
    ) -> Self {
        Self {
            kind,
            media: Some(media),
            ..Self::text(conversation_id, client_msg_id, "")
        }
    }

    /// A system message (a notice from the host, e.g. "Bob joined"): only the host may post
    /// one, with [`Chat::post_message`](crate::Chat::post_message); a client's is refused.
    pub fn system(
        conversation_id: ConversationId,
        client_msg_id: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        Self {
            kind: MessageKind::System,
            ..Self::text(conversation_id, client_msg_id, content)
        }
    }

    /// The same message as a reply to `message_id`.
    pub fn reply_to(mut self, message_id: MessageId) -> Self {
        self.reply_to = Some(message_id);
        self
    }

    /// The same message with `content` (a caption for media).
    pub fn with_content(mut self, content: impl Into<String>) -> Self {
        self.content = content.into();
        self
    }
}

/// A frame from a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// Exhaustive on purpose: a new frame must be handled by every codec (a compile error, not a
// silent gap).
pub enum Command {
    /// Send a message.
    Message(SendMessage),
    /// The user is typing.
    Typing {
        /// Where.
        conversation_id: ConversationId,
    },
    /// Everything up to `seq` reached this device.
    Delivered {
        /// Where.
        conversation_id: ConversationId,
        /// Up to which seq.
        seq: u64,
    },
    /// Everything up to `seq` was read.
    Read {
        /// Where.
        conversation_id: ConversationId,
        /// Up to which seq.
        seq: u64,
    },
    /// Replace the content of one's own message.
    Edit {
        /// Where.
        conversation_id: ConversationId,
        /// Which message.
        message_id: MessageId,
        /// New content.
        content: String,
    },
    /// Delete one's own message (leaves a tombstone).
    Delete {
        /// Where.
        conversation_id: ConversationId,
        /// Which message.
        message_id: MessageId,
    },
    /// React to a message: one key per user per message (a new key replaces the old one).
    React {
        /// Where.
        conversation_id: ConversationId,
        /// Which message.
        message_id: MessageId,
        /// An emoji or a short name, 1..=64 bytes.
        key: String,
    },
    /// Remove one's reaction from a message.
    Unreact {
        /// Where.
        conversation_id: ConversationId,
        /// Which message.
        message_id: MessageId,
    },
    /// Catch up. `streams` (the current form) replays every change after the client's
    /// position; `conversations` (the seq-only form of older clients) replays new messages
    /// after a seq. A conversation may be in either map.
    Sync {
        /// Conversation → last seq the client has (0 for none): new messages only.
        #[serde(default)]
        conversations: BTreeMap<ConversationId, u64>,
        /// Conversation → the stream epoch and the last position the client applied.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        streams: BTreeMap<ConversationId, SyncFrom>,
    },
    /// Receive presence of these users: their status now, then every change.
    PresenceSubscribe {
        /// Users to watch.
        user_ids: Vec<UserId>,
    },
    /// Stop receiving presence of these users.
    PresenceUnsubscribe {
        /// Users to stop watching.
        user_ids: Vec<UserId>,
    },
    /// A fresh token for this socket, before the current one expires: same user, later expiry.
    /// Answered with `refreshed`.
    Refresh {
        /// The new token (a JWT for the WebSocket gateway).
        token: String,
    },
}

impl Command {
    /// Longest command `id` (the optional correlation id any command may carry), in bytes.
    pub const MAX_ID_BYTES: usize = 64;

    /// Checks a command `id`: 1..=[`Command::MAX_ID_BYTES`] bytes.
    pub fn validate_id(id: &str) -> crate::Result<()> {
        if id.is_empty() || id.len() > Self::MAX_ID_BYTES {
            return Err(crate::Error::invalid("id must be 1..=64 bytes"));
        }
        Ok(())
    }

    /// The wire `type` of the command.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Message(_) => "message",
            Self::Typing { .. } => "typing",
            Self::Delivered { .. } => "delivered",
            Self::Read { .. } => "read",
            Self::Edit { .. } => "edit",
            Self::Delete { .. } => "delete",
            Self::React { .. } => "react",
            Self::Unreact { .. } => "unreact",
            Self::Sync { .. } => "sync",
            Self::PresenceSubscribe { .. } => "presence_subscribe",
            Self::PresenceUnsubscribe { .. } => "presence_unsubscribe",
            Self::Refresh { .. } => "refresh",
        }
    }
}

/// A frame to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// Exhaustive on purpose, like `Command`.
pub enum Event {
    /// The message is durably stored.
    MessageAck {
        /// The client's key, echoed.
        client_msg_id: String,
        /// Where.
        conversation_id: ConversationId,
        /// The assigned id.
        message_id: MessageId,
        /// The assigned seq.
        seq: u64,
        /// Unix milliseconds when stored.
        timestamp: u64,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// A new message (live), or the latest version of a changed one (replayed by sync).
    Message {
        /// The message.
        message: Message,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// Someone is typing.
    Typing {
        /// Where.
        conversation_id: ConversationId,
        /// Who.
        user_id: UserId,
    },
    /// A delivered or read marker moved.
    Receipt {
        /// Where.
        conversation_id: ConversationId,
        /// Whose marker.
        user_id: UserId,
        /// Delivered or read.
        kind: ReceiptKind,
        /// Up to which seq.
        seq: u64,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// A message was edited.
    MessageEdited {
        /// The message after the edit.
        message: Message,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// A message was deleted (tombstone).
    MessageDeleted {
        /// The tombstone.
        message: Message,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// Someone set or removed their reaction on a message.
    Reaction {
        /// Where.
        conversation_id: ConversationId,
        /// Which message.
        message_id: MessageId,
        /// Who.
        user_id: UserId,
        /// Their key now; absent: they removed their reaction.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// The message's reactions after the change.
        reactions: Vec<Reaction>,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// A conversation's history cannot be replayed from the client's position: the stream's
    /// epoch differs (the store lost it, or the conversation was recreated) or the client is
    /// too far behind. Drop the local copy, reload it from history, then sync from this
    /// stream. Sent during a `sync`, before its `sync_done`.
    Reset {
        /// Which conversation.
        conversation_id: ConversationId,
        /// The stream now: sync from it after reloading.
        stream: StreamPosition,
        /// Why.
        reason: ResetReason,
    },
    /// The end of a sync.
    SyncDone {
        /// Conversation → latest seq (the seq-only form).
        conversations: BTreeMap<ConversationId, u64>,
        /// Conversations with more to replay: sync again from the last seq (or, for
        /// `streams`, the position) received.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more: Vec<ConversationId>,
        /// Conversation → the stream epoch and the position the replay reached (the
        /// `streams` form; a conversation that got a `reset` is not listed).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        streams: BTreeMap<ConversationId, StreamPosition>,
    },
    /// A user's presence (now, then on every change).
    Presence {
        /// Whose.
        user_id: UserId,
        /// Online or offline.
        status: PresenceStatus,
        /// Unix milliseconds, `null` for a user never seen.
        last_seen: Option<u64>,
    },
    /// Someone joined or left a conversation. Sent to the conversation's members and to the
    /// affected user's own devices (so a client learns it was added to, or removed from, a
    /// conversation without polling).
    Membership {
        /// Where.
        conversation_id: ConversationId,
        /// Who joined or left.
        user_id: UserId,
        /// `joined` or `left`.
        change: MembershipChange,
        /// The change-stream position this change took (absent from a store without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// The first frame of a connection: who it is, where, until when, and the limits in force.
    Session {
        /// The authenticated user.
        user_id: UserId,
        /// This connection's cluster-unique id.
        connection_id: ConnectionId,
        /// The gateway node serving it.
        node_id: NodeId,
        /// Unix milliseconds at which the credential expires (`refresh` before it); absent:
        /// never.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// Limits a client should respect.
        limits: SessionLimits,
    },
    /// A `refresh` was accepted: the session now expires at `expires_at`.
    Refreshed {
        /// Unix milliseconds of the new expiry; absent: never.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// A command failed; the connection stays open.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable text.
        message: String,
        /// Set when the failed command was a `message`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        /// The failed command's `id`, when it carried one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A command that carried an `id` succeeded; sent after the command's other replies.
    Ok {
        /// The command's `id`.
        id: String,
    },
}

impl Event {
    /// The wire `type` of the event.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::MessageAck { .. } => "message_ack",
            Self::Message { .. } => "message",
            Self::Typing { .. } => "typing",
            Self::Receipt { .. } => "receipt",
            Self::MessageEdited { .. } => "message_edited",
            Self::MessageDeleted { .. } => "message_deleted",
            Self::Reaction { .. } => "reaction",
            Self::Reset { .. } => "reset",
            Self::SyncDone { .. } => "sync_done",
            Self::Presence { .. } => "presence",
            Self::Membership { .. } => "membership",
            Self::Session { .. } => "session",
            Self::Refreshed { .. } => "refreshed",
            Self::Error { .. } => "error",
            Self::Ok { .. } => "ok",
        }
    }

    /// An `error` event for `err`.
    pub fn error(err: &crate::Error, client_msg_id: Option<String>) -> Self {
        Self::Error {
            code: err.code(),
            message: err.client_message(),
            client_msg_id,
            id: None,
        }
    }
}

/// The limits announced in the `session` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLimits {
    /// Largest message content in UTF-8 bytes (over it: `too_large`).
    pub max_message_bytes: u64,
    /// Sends, edits, deletes and reactions per second per user, when rate limited (over it:
    /// `rate_limited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<u32>,
    /// The burst allowed above `rate_per_second`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
}

/// Where a `sync` of the `streams` form starts for one conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFrom {
    /// The stream epoch the client's position belongs to; absent on a first sync (no check).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::id::opt_u64_string"
    )]
    pub epoch: Option<u64>,
    /// The last position the client applied (0: replay everything the stream holds).
    #[serde(default)]
    pub position: u64,
}

/// Why a `reset` was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// The client's epoch is not the stream's: its position belongs to another history.
    Epoch,
    /// The client's position is further behind than the server replays
    /// (`ChatConfig::max_catch_up`), or ahead of the stream.
    TooFarBehind,
}

/// Joined or left, in a `membership` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChange {
    /// Added to (or created with) the conversation.
    Joined,
    /// Removed from, or left, the conversation.
    Left,
}

pub use crate::transport::{CODEC_SLOTS, Frame};
