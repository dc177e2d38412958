//! Codecs: how [`Command`]s and [`Event`]s travel in WebSocket frames.
//!
//! | codec | subprotocol | query | frames | schema |
//! |---|---|---|---|---|
//! | [`Codec::Json`] (default) | `chat.v1.json` | `?codec=json` | text | the serde shape of [`chat_core::protocol`] |
//! | [`Codec::Proto`] | `chat.v1.proto` | `?codec=proto` | binary | `chat-transport/proto/chat.proto` ([`pb::ClientFrame`] / [`pb::ServerFrame`]) |
//!
//! * **JSON is the serde shape**: [`Codec::encode`] is exactly `serde_json::to_vec(&event)`, and
//!   decoding ignores unknown extra fields.
//! * **Protobuf is lossless**: every [`Command`] and [`Event`] converts to its protobuf frame and
//!   back unchanged ([`From`] / [`TryFrom`] impls on the [`pb`] types). Decoding rejects what
//!   the Rust types cannot represent (no `frame` case, a missing message, an unknown enum
//!   number) instead of guessing; the only default is an unspecified `kind`, which means text.
//! * **Encode once per fan-out**: [`Codec::encode_frame`] caches the bytes in the shared
//!   [`Frame`], so every recipient using the same codec gets the same [`Bytes`].
//! * **Errors say what was wrong** ([`DecodeError`]): not UTF-8, malformed JSON, no `type`,
//!   an unknown `type` (named), a known type with bad fields, malformed or invalid protobuf.
//!   [`DecodeError::to_error`] turns any of them into the `invalid` error the client gets.
//!   No input makes a decoder panic.
//!
//! ```
//! use chat_core::{Command, ConversationId, ErrorCode, Event, Frame};
//! use chat_transport::codec::{Codec, DecodeError};
//!
//! // A client frame, in JSON (unknown fields are ignored)...
//! let cmd = Codec::Json
//!     .decode(br#"{"type":"typing","conversation_id":"42","extra":true}"#)
//!     .unwrap();
//! assert_eq!(cmd, Command::Typing { conversation_id: ConversationId::from_raw(42) });
//!
//! // ...and the same command in protobuf, and back.
//! let bytes = Codec::Proto.encode_command(&cmd);
//! assert_eq!(Codec::Proto.decode(&bytes).unwrap(), cmd);
//!
//! // A bad frame gets an `invalid` error that names the problem.
//! let err = Codec::Json.decode(br#"{"type":"dance"}"#).unwrap_err();
//! assert_eq!(err, DecodeError::UnknownType("dance".into()));
//! let event = Event::error(&err.to_error(), None);
//! assert!(matches!(&event, Event::Error { code: ErrorCode::Invalid, message, .. }
//!     if message.contains("dance")));
//!
//! // Fan-out: encoded at most once per codec, whatever the number of recipients.
//! let frame = Frame::new(event);
//! let (a, b) = (Codec::Proto.encode_frame(&frame), Codec::Proto.encode_frame(&frame));
//! assert_eq!(a.as_ptr(), b.as_ptr());
//! assert_eq!(Codec::Proto.decode_event(&a).unwrap(), *frame.event());
//! ```

use bytes::Bytes;
use chat_core::{Command, Event, Frame};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod proto;

/// The protobuf types generated from `proto/chat.proto` (package `chat.v1`).
///
/// Convert with `pb::ServerFrame::from(&event)`, `Command::try_from(client_frame)` and so on;
/// the [`Codec`] methods do that and the byte encoding in one step.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
}

/// A wire encoding of frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// JSON text frames (the default).
    #[default]
    Json,
    /// Protobuf binary frames.
    Proto,
}

/// Why a frame could not be decoded. Every variant is a client error: answer it with
/// [`DecodeError::to_error`] (an `invalid` error) and keep the connection open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A JSON frame that is not UTF-8.
    #[error("frame is not valid UTF-8 (bad byte at offset {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// Not JSON, or JSON that is not an object.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A JSON object without a string `type`.
    #[error("frame has no \"type\" string")]
    MissingType,
    /// A `type` this side does not know (shortened if very long).
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// A known `type` with missing or invalid fields.
    #[error("invalid {frame:?} frame: {reason}")]
    InvalidFields {
        /// The frame type.
        frame: String,
        /// What is wrong (from the JSON decoder; shortened if very long).
        reason: String,
    },
    /// Not a valid protobuf message.
    #[error("malformed protobuf: {0}")]
    MalformedProto(String),
    /// Valid protobuf that is not a valid frame: no `frame` case (empty, or a case this side
    /// does not know), a missing required message, an unknown or unspecified enum value.
    #[error("invalid protobuf frame: {0}")]
    InvalidProto(String),
}

impl DecodeError {
    /// The engine error the client receives: always [`chat_core::Error::Invalid`].
    pub fn to_error(&self) -> chat_core::Error {
        chat_core::Error::invalid(self.to_string())
    }
}

/// The JSON `type`s of [`Command`]s. Only used to tell "unknown type" from "bad fields" once
/// decoding failed; a valid frame never looks here.
const CLIENT_TYPES: [&str; 12] = [
    "message",
    "typing",
    "delivered",
    "read",
    "edit",
    "delete",
    "sync",
    "presence_subscribe",
    "presence_unsubscribe",
    "refresh",
    "react",
    "unreact",
];

/// The JSON `type`s of [`Event`]s.
const SERVER_TYPES: [&str; 15] = [
    "message_ack",
    "message",
    "typing",
    "receipt",
    "message_edited",
    "message_deleted",
    "sync_done",
    "presence",
    "membership",
    "session",
    "refreshed",
    "error",
    "reaction",
    "reset",
    "ok",
];

/// Longest unknown `type` echoed back in an error, in bytes.
const MAX_ECHOED_TYPE: usize = 64;
/// Longest decoder message echoed back in an error, in bytes (serde quotes bad values).
const MAX_REASON: usize = 256;

impl Codec {
    /// The codec named by a WebSocket subprotocol (`chat.v1.json`, `chat.v1.proto`).
    pub fn from_subprotocol(protocol: &str) -> Option<Self> {
        match protocol {
            "chat.v1.json" => Some(Self::Json),
            "chat.v1.proto" => Some(Self::Proto),
            _ => None,
        }
    }

    /// The WebSocket subprotocol of this codec.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => "chat.v1.json",
            Self::Proto => "chat.v1.proto",
        }
    }

    /// The codec named by a `?codec=` value (`json`, `proto`; `protobuf` is accepted too).
    pub fn from_query_value(value: &str) -> Option<Self> {
        match value {
            "json" => Some(Self::Json),
            "proto" | "protobuf" => Some(Self::Proto),
            _ => None,
        }
    }

    /// Whether frames are binary WebSocket frames (protobuf) rather than text (JSON).
    pub fn is_binary(self) -> bool {
        matches!(self, Self::Proto)
    }

    /// The [`Frame`] cache slot of this codec (see [`Frame::encoded`]).
    pub fn slot(self) -> usize {
        match self {
            Self::Json => 0,
            Self::Proto => 1,
        }
    }

    /// Encodes an event (server → client).
    pub fn encode(self, event: &Event) -> Bytes {
        match self {
            Self::Json => to_json(event, event.type_name()),
            Self::Proto => {
                Bytes::from(prost::Message::encode_to_vec(&pb::ServerFrame::from(event)))
            }
        }
    }

    /// Encodes a shared frame, at most once per codec however many connections send it:
    /// later calls return the same [`Bytes`].
    pub fn encode_frame(self, frame: &Frame) -> Bytes {
        frame.encoded(self.slot(), |event| self.encode(event))
    }

    /// Decodes a client frame (client → server), ignoring its `id`.
    pub fn decode(self, payload: &[u8]) -> Result<Command, DecodeError> {
        self.decode_request(payload).map(|(command, _)| command)
    }

    /// Decodes a client frame and its optional `id` (1..=64 bytes; any command may carry one,
    /// see [`Session::handle_with_id`](chat_core::Session::handle_with_id)).
    pub fn decode_request(self, payload: &[u8]) -> Result<(Command, Option<String>), DecodeError> {
        let (command, id) = match self {
            Self::Json => {
                let command = decode_json(payload, &CLIENT_TYPES)?;
                (command, json_id(payload)?)
            }
            Self::Proto => {
                let mut frame = decode_proto::<pb::ClientFrame>(payload)?;
                let id = frame.id.take();
                (Command::try_from(frame)?, id)
            }
        };
        if let Some(id) = &id {
            Command::validate_id(id).map_err(|_| DecodeError::InvalidFields {
                frame: command.type_name().to_owned(),
                reason: "id must be a string of 1 to 64 bytes".to_owned(),
            })?;
        }
        Ok((command, id))
    }

    /// Encodes a client frame (for Rust clients: tests, the load generator, bots).
    pub fn encode_command(self, command: &Command) -> Bytes {
        match self {
            Self::Json => to_json(command, command.type_name()),
            Self::Proto => Bytes::from(prost::Message::encode_to_vec(&pb::ClientFrame::from(
                command,
            ))),
        }
    }

    /// Decodes a server frame (for Rust clients).
    pub fn decode_event(self, payload: &[u8]) -> Result<Event, DecodeError> {
        match self {
            Self::Json => decode_json(payload, &SERVER_TYPES),
            Self::Proto => Event::try_from(decode_proto::<pb::ServerFrame>(payload)?),
        }
    }
}

/// Serializes a protocol value. Our types cannot fail to serialize (string map keys, no
/// fallible `Serialize` impls); if that ever changed, the peer gets a visible `internal` error
/// frame rather than an empty or truncated one.
fn to_json<T: Serialize>(value: &T, type_name: &str) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(bytes) => Bytes::from(bytes),
        Err(err) => Bytes::from(
            serde_json::json!({
                "type": "error",
                "code": "internal",
                "message": format!("could not encode a {type_name:?} frame as JSON: {err}"),
            })
            .to_string(),
        ),
    }
}

fn decode_proto<M: prost::Message + Default>(payload: &[u8]) -> Result<M, DecodeError> {
    M::decode(payload).map_err(|e| DecodeError::MalformedProto(e.to_string()))
}

/// Decodes a JSON frame in one pass; only when that fails does it look again to say why
/// (not an object? no `type`? an unknown `type`? bad fields of a known one?).
/// The top-level `id` of a JSON client frame that already decoded. Parsed a second time only
/// when the bytes `"id"` occur at all, so frames without one (the common case) pay one
/// vectorized substring search.
fn json_id(payload: &[u8]) -> Result<Option<String>, DecodeError> {
    if memchr::memmem::find(payload, b"\"id\"").is_none() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(default)]
        id: Option<String>,
    }
    serde_json::from_slice::<Id>(payload)
        .map(|f| f.id)
        .map_err(|_| DecodeError::InvalidFields {
            frame: "command".to_owned(),
            reason: "id must be a string of 1 to 64 bytes".to_owned(),
        })
}

fn decode_json<T: DeserializeOwned>(payload: &[u8], known: &[&str]) -> Result<T, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|e| DecodeError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // Serde would also accept an array for an internally tagged enum (`["typing", …]`); the
    // protocol says every frame is an object.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(DecodeError::MalformedJson(
            "a frame must be a JSON object".to_owned(),
        ));
    }
    match serde_json::from_str::<T>(text) {
        Ok(value) => Ok(value),
        Err(err) if err.is_data() => Err(diagnose(text, known, &err)),
        Err(err) => Err(DecodeError::MalformedJson(err.to_string())),
    }
}

/// Why a syntactically valid JSON object did not decode.
fn diagnose(text: &str, known: &[&str], err: &serde_json::Error) -> DecodeError {
    /// Only the tag; every other field is skipped.
    #[derive(serde::Deserialize)]
    struct Tag {
        #[serde(rename = "type")]
        ty: Option<serde_json::Value>,
    }
    match serde_json::from_str::<Tag>(text) {
        Ok(Tag {
            ty: Some(serde_json::Value::String(ty)),
        }) => {
            if known.contains(&ty.as_str()) {
                DecodeError::InvalidFields {
                    frame: ty,
                    reason: shorten(&err.to_string(), MAX_REASON),
                }
            } else {
                DecodeError::UnknownType(shorten(&ty, MAX_ECHOED_TYPE))
            }
        }
        Ok(Tag { ty: _ }) => DecodeError::MissingType,
        // For example a duplicate `type` field.
        Err(_) => DecodeError::MalformedJson(shorten(&err.to_string(), MAX_REASON)),
    }
}

/// `s`, cut to at most `max` bytes (on a char boundary) with `…` appended when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_lists_match_the_protocol_types() {
        use chat_core::model::{PresenceStatus, ReceiptKind};
        use chat_core::protocol::SendMessage;
        use chat_core::{ConversationId, ErrorCode, MessageId, UserId};
        let (c, m, u) = (
            ConversationId::from_raw(1),
            MessageId::from_raw(1),
            UserId::from("u"),
        );
        let commands = [
            Command::Message(SendMessage {
                conversation_id: c,
                client_msg_id: "k".into(),
                content: String::new(),
                kind: Default::default(),
                media: None,
                reply_to: None,
            }),
            Command::Typing { conversation_id: c },
            Command::Delivered {
                conversation_id: c,
                seq: 1,
            },
            Command::Read {
                conversation_id: c,
                seq: 1,
            },
            Command::Edit {
                conversation_id: c,
                message_id: m,
                content: String::new(),
            },
            Command::Delete {
                conversation_id: c,
                message_id: m,
            },
            Command::Sync {
                conversations: Default::default(),
                streams: Default::default(),
            },
            Command::PresenceSubscribe { user_ids: vec![] },
            Command::PresenceUnsubscribe { user_ids: vec![] },
            Command::Refresh {
                token: String::new(),
            },
            Command::React {
                conversation_id: c,
                message_id: m,
                key: "k".into(),
            },
            Command::Unreact {
                conversation_id: c,
                message_id: m,
            },
        ];
        let names: Vec<_> = commands.iter().map(Command::type_name).collect();
        assert_eq!(names, CLIENT_TYPES);

        let message = chat_core::model::NewMessage {
            message_id: m,
            conversation_id: c,
            sender_id: u.clone(),
            client_msg_id: "k".into(),
            kind: Default::default(),
            content: String::new(),
            media: None,
            reply_to: None,
            created_at: 0,
        }
        .into_message(1);
        let events = [
            Event::MessageAck {
                client_msg_id: "k".into(),
                conversation_id: c,
                message_id: m,
                seq: 1,
                timestamp: 0,
                position: None,
            },
            Event::Message {
                message: message.clone(),
                position: None,
            },
            Event::Typing {
                conversation_id: c,
                user_id: u.clone(),
            },
            Event::Receipt {
                conversation_id: c,
                user_id: u.clone(),
                kind: ReceiptKind::Read,
                seq: 1,
                position: None,
            },
            Event::MessageEdited {
                message: message.clone(),
                position: None,
            },
            Event::MessageDeleted {
                message,
                position: None,
            },
            Event::SyncDone {
                conversations: Default::default(),
                more: vec![],
                streams: Default::default(),
            },
            Event::Presence {
                user_id: u,
                status: PresenceStatus::Online,
                last_seen: None,
            },
            Event::Membership {
                conversation_id: Default::default(),
                user_id: "u".into(),
                change: chat_core::protocol::MembershipChange::Joined,
                position: None,
            },
            Event::Session {
                user_id: "u".into(),
                connection_id: Default::default(),
                node_id: chat_core::NodeId::ZERO,
                expires_at: None,
                limits: chat_core::protocol::SessionLimits {
                    max_message_bytes: 1,
                    rate_per_second: None,
                    rate_burst: None,
                },
            },
            Event::Refreshed { expires_at: None },
            Event::Error {
                code: ErrorCode::Invalid,
                message: String::new(),
                client_msg_id: None,
                id: None,
            },
            Event::Reaction {
                conversation_id: c,
                message_id: m,
                user_id: "u".into(),
                key: None,
                reactions: vec![],
                position: None,
            },
            Event::Reset {
                conversation_id: c,
                stream: chat_core::model::StreamPosition {
                    epoch: 1,
                    position: 1,
                },
                reason: chat_core::protocol::ResetReason::Epoch,
            },
            Event::Ok { id: "i".into() },
        ];
        let names: Vec<_> = events.iter().map(Event::type_name).collect();
        assert_eq!(names, SERVER_TYPES);
    }

    #[test]
    fn shorten_cuts_on_a_char_boundary() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "abc…");
        assert_eq!(shorten("aé", 2), "a…");
    }
}
