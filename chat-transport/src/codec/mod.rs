//! Codecs: how [`Command`]s and [`Event`]s travel in WebSocket frames.
//!
//! | codec | subprotocol | query | frames | schema |
//! |---|---|---|---|---|
//! | [`Codec::Json`] (default) | `chat.v1.json` | `?codec=json` | text | the serde shape of `chat_core::protocol` |
//! | [`Codec::Proto`] | `chat.v1.proto` | `?codec=proto` | binary | `chat-transport/proto/chat.proto` (`ClientFrame` / `ServerFrame`) |
//!
//! Fan-out encodes a [`Frame`] once per codec ([`Codec::encode_frame`]): every recipient using
//! the same codec shares the same bytes.
//!
//! ```
//! use chat_core::{Command, ConversationId, Event};
//! use chat_transport::codec::Codec;
//!
//! let cmd = Codec::Json
//!     .decode(br#"{"type":"typing","conversation_id":"42"}"#)
//!     .unwrap();
//! assert_eq!(cmd, Command::Typing { conversation_id: ConversationId::from_raw(42) });
//!
//! // The same command in protobuf, and back.
//! let bytes = Codec::Proto.encode_command(&cmd);
//! assert_eq!(Codec::Proto.decode(&bytes).unwrap(), cmd);
//!
//! let err = Codec::Json.decode(br#"{"type":"dance"}"#).unwrap_err();
//! assert!(err.to_string().contains("dance"));
//! ```

use bytes::Bytes;
use chat_core::{Command, Event, Frame};

mod proto;

/// The generated protobuf types of `proto/chat.proto` (package `chat.v1`).
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
}

/// A wire encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// JSON text frames (the default).
    Json,
    /// Protobuf binary frames.
    Proto,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not valid JSON (or not UTF-8).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A JSON object without a string `type`.
    #[error("frame has no \"type\"")]
    MissingType,
    /// A `type` this server does not know.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// A known type with missing or invalid fields.
    #[error("invalid {frame} frame: {reason}")]
    InvalidFields {
        /// The frame type.
        frame: String,
        /// What is wrong.
        reason: String,
    },
    /// Not a valid protobuf message.
    #[error("malformed protobuf: {0}")]
    MalformedProto(String),
    /// A protobuf frame without its `frame` oneof, or with an out-of-range enum.
    #[error("invalid protobuf frame: {0}")]
    InvalidProto(String),
}

impl DecodeError {
    /// The engine error the client receives (`invalid`).
    pub fn to_error(&self) -> chat_core::Error {
        chat_core::Error::invalid(self.to_string())
    }
}

const CLIENT_TYPES: [&str; 9] = [
    "message",
    "typing",
    "delivered",
    "read",
    "edit",
    "delete",
    "sync",
    "presence_subscribe",
    "presence_unsubscribe",
];

const SERVER_TYPES: [&str; 9] = [
    "message_ack",
    "message",
    "typing",
    "receipt",
    "message_edited",
    "message_deleted",
    "sync_done",
    "presence",
    "error",
];

impl Codec {
    /// The codec named by a WebSocket subprotocol.
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

    /// The codec named by a `?codec=` value.
    pub fn from_query_value(value: &str) -> Option<Self> {
        match value {
            "json" => Some(Self::Json),
            "proto" | "protobuf" => Some(Self::Proto),
            _ => None,
        }
    }

    /// Whether frames are binary (protobuf) rather than text (JSON).
    pub fn is_binary(self) -> bool {
        matches!(self, Self::Proto)
    }

    /// The [`Frame`] cache slot of this codec.
    pub fn slot(self) -> usize {
        match self {
            Self::Json => 0,
            Self::Proto => 1,
        }
    }

    /// Encodes an event.
    pub fn encode(self, event: &Event) -> Bytes {
        match self {
            // Serializing our own types to JSON cannot fail (no maps with non-string keys,
            // no failing Serialize impls).
            Self::Json => Bytes::from(serde_json::to_vec(event).unwrap_or_default()),
            Self::Proto => Bytes::from(prost::Message::encode_to_vec(&proto::server_frame(event))),
        }
    }

    /// Encodes a shared frame, at most once per codec however many connections send it.
    pub fn encode_frame(self, frame: &Frame) -> Bytes {
        frame.encoded(self.slot(), |event| self.encode(event))
    }

    /// Decodes a client frame.
    pub fn decode(self, payload: &[u8]) -> Result<Command, DecodeError> {
        match self {
            Self::Json => decode_json(payload, &CLIENT_TYPES),
            Self::Proto => {
                let frame: pb::ClientFrame = prost::Message::decode(payload)
                    .map_err(|e| DecodeError::MalformedProto(e.to_string()))?;
                proto::command(frame)
            }
        }
    }

    /// Encodes a client frame (for Rust clients: tests, the load generator, bots).
    pub fn encode_command(self, command: &Command) -> Bytes {
        match self {
            Self::Json => Bytes::from(serde_json::to_vec(command).unwrap_or_default()),
            Self::Proto => {
                Bytes::from(prost::Message::encode_to_vec(&proto::client_frame(command)))
            }
        }
    }

    /// Decodes a server frame (for Rust clients).
    pub fn decode_event(self, payload: &[u8]) -> Result<Event, DecodeError> {
        match self {
            Self::Json => decode_json(payload, &SERVER_TYPES),
            Self::Proto => {
                let frame: pb::ServerFrame = prost::Message::decode(payload)
                    .map_err(|e| DecodeError::MalformedProto(e.to_string()))?;
                proto::event(frame)
            }
        }
    }
}

/// Decodes JSON in two steps so errors say what was wrong: parse to a value (malformed?),
/// look at `type` (missing? unknown?), then the typed decode (which fields?).
fn decode_json<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    known: &[&str],
) -> Result<T, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
    let ty = match value.get("type") {
        Some(serde_json::Value::String(t)) => t.clone(),
        _ => return Err(DecodeError::MissingType),
    };
    if !known.contains(&ty.as_str()) {
        return Err(DecodeError::UnknownType(ty));
    }
    serde_json::from_value(value).map_err(|e| DecodeError::InvalidFields {
        frame: ty,
        reason: e.to_string(),
    })
}
