//! Conversions between `chat_core::protocol` and the generated protobuf types.
//!
//! Total and lossless in the encode direction (`From<&Command>` / `From<&Event>`: every variant
//! and field has a protobuf home). The decode direction (`TryFrom<pb::ClientFrame>` /
//! `TryFrom<pb::ServerFrame>`) rejects what cannot be represented (no `frame` case, a missing
//! message, an unknown or unspecified enum value) instead of guessing. The matches over
//! [`Command`] and [`Event`] are exhaustive, so a new variant in `chat-core` fails to compile
//! here until it has a protobuf encoding.

use chat_core::model::{
    Media, Message, MessageKind, PresenceStatus, Reaction, ReceiptKind, StreamPosition,
};
use chat_core::protocol::{MembershipChange, ResetReason, SendMessage, SessionLimits, SyncFrom};
use chat_core::{
    Command, ConnectionId, ConversationId, ErrorCode, Event, MessageId, NodeId, UserId,
};

use super::DecodeError;
use super::pb;
use super::pb::client_frame::Frame as CF;
use super::pb::server_frame::Frame as SF;

fn invalid(what: String) -> DecodeError {
    DecodeError::InvalidProto(what)
}

fn kind_to_pb(kind: MessageKind) -> i32 {
    (match kind {
        MessageKind::Text => pb::MessageKind::Text,
        MessageKind::Image => pb::MessageKind::Image,
        MessageKind::File => pb::MessageKind::File,
        MessageKind::System => pb::MessageKind::System,
    }) as i32
}

/// `field` names the field in errors, e.g. `Message.kind`.
fn kind_from_pb(kind: i32, field: &str) -> Result<MessageKind, DecodeError> {
    match pb::MessageKind::try_from(kind) {
        // Unspecified is the proto3 default of an unset field: text, as in JSON.
        Ok(pb::MessageKind::Unspecified | pb::MessageKind::Text) => Ok(MessageKind::Text),
        Ok(pb::MessageKind::Image) => Ok(MessageKind::Image),
        Ok(pb::MessageKind::File) => Ok(MessageKind::File),
        Ok(pb::MessageKind::System) => Ok(MessageKind::System),
        Err(_) => Err(invalid(format!(
            "{field}: unknown MessageKind value {kind}"
        ))),
    }
}

fn receipt_kind_to_pb(kind: ReceiptKind) -> i32 {
    (match kind {
        ReceiptKind::Delivered => pb::ReceiptKind::Delivered,
        ReceiptKind::Read => pb::ReceiptKind::Read,
    }) as i32
}

fn receipt_kind_from_pb(kind: i32) -> Result<ReceiptKind, DecodeError> {
    match pb::ReceiptKind::try_from(kind) {
        Ok(pb::ReceiptKind::Delivered) => Ok(ReceiptKind::Delivered),
        Ok(pb::ReceiptKind::Read) => Ok(ReceiptKind::Read),
        Ok(pb::ReceiptKind::Unspecified) => Err(invalid("Receipt.kind is not set".to_owned())),
        Err(_) => Err(invalid(format!(
            "Receipt.kind: unknown ReceiptKind value {kind}"
        ))),
    }
}

fn status_to_pb(status: PresenceStatus) -> i32 {
    (match status {
        PresenceStatus::Online => pb::PresenceStatus::Online,
        PresenceStatus::Offline => pb::PresenceStatus::Offline,
    }) as i32
}

fn status_from_pb(status: i32) -> Result<PresenceStatus, DecodeError> {
    match pb::PresenceStatus::try_from(status) {
        Ok(pb::PresenceStatus::Online) => Ok(PresenceStatus::Online),
        Ok(pb::PresenceStatus::Offline) => Ok(PresenceStatus::Offline),
        Ok(pb::PresenceStatus::Unspecified) => {
            Err(invalid("Presence.status is not set".to_owned()))
        }
        Err(_) => Err(invalid(format!(
            "Presence.status: unknown PresenceStatus value {status}"
        ))),
    }
}

fn code_to_pb(code: ErrorCode) -> i32 {
    (match code {
        ErrorCode::Unauthorized => pb::ErrorCode::Unauthorized,
        ErrorCode::Forbidden => pb::ErrorCode::Forbidden,
        ErrorCode::NotMember => pb::ErrorCode::NotMember,
        ErrorCode::NotFound => pb::ErrorCode::NotFound,
        ErrorCode::Invalid => pb::ErrorCode::Invalid,
        ErrorCode::TooLarge => pb::ErrorCode::TooLarge,
        ErrorCode::RateLimited => pb::ErrorCode::RateLimited,
        ErrorCode::Internal => pb::ErrorCode::Internal,
        // `ErrorCode` is `#[non_exhaustive]`: a code added to chat-core before it is added to
        // chat.proto travels as `internal`, the code clients already handle generically.
        _ => pb::ErrorCode::Internal,
    }) as i32
}

fn code_from_pb(code: i32) -> Result<ErrorCode, DecodeError> {
    Ok(match pb::ErrorCode::try_from(code) {
        Ok(pb::ErrorCode::Unauthorized) => ErrorCode::Unauthorized,
        Ok(pb::ErrorCode::Forbidden) => ErrorCode::Forbidden,
        Ok(pb::ErrorCode::NotMember) => ErrorCode::NotMember,
        Ok(pb::ErrorCode::NotFound) => ErrorCode::NotFound,
        Ok(pb::ErrorCode::Invalid) => ErrorCode::Invalid,
        Ok(pb::ErrorCode::TooLarge) => ErrorCode::TooLarge,
        Ok(pb::ErrorCode::RateLimited) => ErrorCode::RateLimited,
        Ok(pb::ErrorCode::Internal) => ErrorCode::Internal,
        Ok(pb::ErrorCode::Unspecified) => return Err(invalid("Error.code is not set".to_owned())),
        Err(_) => {
            return Err(invalid(format!(
                "Error.code: unknown ErrorCode value {code}"
            )));
        }
    })
}

fn media_to_pb(m: &Media) -> pb::Media {
    pb::Media {
        url: m.url.clone(),
        mime: m.mime.clone(),
        size: m.size,
        name: m.name.clone(),
    }
}

fn media_from_pb(m: pb::Media) -> Media {
    Media {
        url: m.url,
        mime: m.mime,
        size: m.size,
        name: m.name,
    }
}

fn reactions_to_pb(reactions: &[Reaction]) -> Vec<pb::Reaction> {
    reactions
        .iter()
        .map(|r| pb::Reaction {
            key: r.key.clone(),
            users: r.users.iter().map(ToString::to_string).collect(),
        })
        .collect()
}

fn reactions_from_pb(reactions: Vec<pb::Reaction>) -> Vec<Reaction> {
    reactions
        .into_iter()
        .map(|r| Reaction {
            key: r.key,
            users: r.users.into_iter().map(UserId::from).collect(),
        })
        .collect()
}

fn stream_to_pb(s: &StreamPosition) -> pb::StreamPosition {
    pb::StreamPosition {
        epoch: s.epoch,
        position: s.position,
    }
}

fn stream_from_pb(s: pb::StreamPosition) -> StreamPosition {
    StreamPosition {
        epoch: s.epoch,
        position: s.position,
    }
}

fn message_to_pb(m: &Message, position: Option<u64>) -> pb::MessageEvent {
    pb::MessageEvent {
        position,
        message: Some(pb::Message {
            message_id: m.message_id.get(),
            conversation_id: m.conversation_id.get(),
            seq: m.seq,
            sender_id: m.sender_id.to_string(),
            kind: kind_to_pb(m.kind),
            content: m.content.clone(),
            media: m.media.as_ref().map(media_to_pb),
            reply_to: m.reply_to.map(MessageId::get),
            client_msg_id: m.client_msg_id.clone(),
            created_at: m.created_at,
            edited_at: m.edited_at,
            deleted: m.deleted,
            version: m.version,
            reactions: reactions_to_pb(&m.reactions),
        }),
    }
}

/// `case` names the `ServerFrame` case in errors. Returns the message and the event's position.
fn message_from_pb(e: pb::MessageEvent, case: &str) -> Result<(Message, Option<u64>), DecodeError> {
    let position = e.position;
    let m = e.message.ok_or_else(|| {
        invalid(format!(
            "ServerFrame.{case}: MessageEvent.message is not set"
        ))
    })?;
    let message = Message {
        message_id: MessageId::from_raw(m.message_id),
        conversation_id: ConversationId::from_raw(m.conversation_id),
        seq: m.seq,
        sender_id: UserId::from(m.sender_id),
        kind: kind_from_pb(m.kind, "Message.kind")?,
        content: m.content,
        media: m.media.map(media_from_pb),
        reply_to: m.reply_to.map(MessageId::from_raw),
        client_msg_id: m.client_msg_id,
        created_at: m.created_at,
        edited_at: m.edited_at,
        deleted: m.deleted,
        version: m.version,
        reactions: reactions_from_pb(m.reactions),
    };
    Ok((message, position))
}

fn users_to_pb(ids: &[UserId]) -> pb::UserIds {
    pb::UserIds {
        user_ids: ids.iter().map(ToString::to_string).collect(),
    }
}

/// Client-sent user ids, checked like [`UserId::parse`] (as the JSON codec does).
fn users_from_pb(ids: pb::UserIds) -> Result<Vec<UserId>, DecodeError> {
    ids.user_ids
        .iter()
        .map(|u| UserId::parse(u).map_err(|e| invalid(format!("UserIds.user_ids: {e}"))))
        .collect()
}

impl From<&Command> for pb::ClientFrame {
    fn from(cmd: &Command) -> Self {
        let frame = match cmd {
            Command::Message(m) => CF::Message(pb::SendMessage {
                conversation_id: m.conversation_id.get(),
                client_msg_id: m.client_msg_id.clone(),
                content: m.content.clone(),
                kind: kind_to_pb(m.kind),
                media: m.media.as_ref().map(media_to_pb),
                reply_to: m.reply_to.map(MessageId::get),
            }),
            Command::Typing { conversation_id } => CF::Typing(pb::Typing {
                conversation_id: conversation_id.get(),
            }),
            Command::Delivered {
                conversation_id,
                seq,
            } => CF::Delivered(pb::Marker {
                conversation_id: conversation_id.get(),
                seq: *seq,
            }),
            Command::Read {
                conversation_id,
                seq,
            } => CF::Read(pb::Marker {
                conversation_id: conversation_id.get(),
                seq: *seq,
            }),
            Command::Edit {
                conversation_id,
                message_id,
                content,
            } => CF::Edit(pb::Edit {
                conversation_id: conversation_id.get(),
                message_id: message_id.get(),
                content: content.clone(),
            }),
            Command::Delete {
                conversation_id,
                message_id,
            } => CF::Delete(pb::Delete {
                conversation_id: conversation_id.get(),
                message_id: message_id.get(),
            }),
            Command::React {
                conversation_id,
                message_id,
                key,
            } => CF::React(pb::React {
                conversation_id: conversation_id.get(),
                message_id: message_id.get(),
                key: key.clone(),
            }),
            Command::Unreact {
                conversation_id,
                message_id,
            } => CF::Unreact(pb::Unreact {
                conversation_id: conversation_id.get(),
                message_id: message_id.get(),
            }),
            Command::Sync {
                conversations,
                streams,
            } => CF::Sync(pb::Sync {
                conversations: conversations.iter().map(|(k, v)| (k.get(), *v)).collect(),
                streams: streams
                    .iter()
                    .map(|(k, v)| {
                        let from = pb::SyncFrom {
                            epoch: v.epoch,
                            position: v.position,
                        };
                        (k.get(), from)
                    })
                    .collect(),
            }),
            Command::PresenceSubscribe { user_ids } => CF::PresenceSubscribe(users_to_pb(user_ids)),
            Command::PresenceUnsubscribe { user_ids } => {
                CF::PresenceUnsubscribe(users_to_pb(user_ids))
            }
            Command::Refresh { token } => CF::Refresh(pb::Refresh {
                token: token.clone(),
            }),
        };
        pb::ClientFrame {
            frame: Some(frame),
            id: None,
        }
    }
}

impl TryFrom<pb::ClientFrame> for Command {
    type Error = DecodeError;

    fn try_from(frame: pb::ClientFrame) -> Result<Self, DecodeError> {
        let frame = frame.frame.ok_or_else(|| {
            invalid(
                "ClientFrame has no frame case set (empty, or a case this server does not know)"
                    .to_owned(),
            )
        })?;
        Ok(match frame {
            CF::Message(m) => Command::Message(SendMessage {
                conversation_id: ConversationId::from_raw(m.conversation_id),
                client_msg_id: m.client_msg_id,
                content: m.content,
                kind: kind_from_pb(m.kind, "SendMessage.kind")?,
                media: m.media.map(media_from_pb),
                reply_to: m.reply_to.map(MessageId::from_raw),
            }),
            CF::Typing(t) => Command::Typing {
                conversation_id: ConversationId::from_raw(t.conversation_id),
            },
            CF::Delivered(m) => Command::Delivered {
                conversation_id: ConversationId::from_raw(m.conversation_id),
                seq: m.seq,
            },
            CF::Read(m) => Command::Read {
                conversation_id: ConversationId::from_raw(m.conversation_id),
                seq: m.seq,
            },
            CF::Edit(e) => Command::Edit {
                conversation_id: ConversationId::from_raw(e.conversation_id),
                message_id: MessageId::from_raw(e.message_id),
                content: e.content,
            },
            CF::Delete(d) => Command::Delete {
                conversation_id: ConversationId::from_raw(d.conversation_id),
                message_id: MessageId::from_raw(d.message_id),
            },
            CF::Sync(s) => Command::Sync {
                conversations: s
                    .conversations
                    .into_iter()
                    .map(|(k, v)| (ConversationId::from_raw(k), v))
                    .collect(),
                streams: s
                    .streams
                    .into_iter()
                    .map(|(k, v)| {
                        let from = SyncFrom {
                            epoch: v.epoch,
                            position: v.position,
                        };
                        (ConversationId::from_raw(k), from)
                    })
                    .collect(),
            },
            CF::React(r) => Command::React {
                conversation_id: ConversationId::from_raw(r.conversation_id),
                message_id: MessageId::from_raw(r.message_id),
                key: r.key,
            },
            CF::Unreact(r) => Command::Unreact {
                conversation_id: ConversationId::from_raw(r.conversation_id),
                message_id: MessageId::from_raw(r.message_id),
            },
            CF::PresenceSubscribe(u) => Command::PresenceSubscribe {
                user_ids: users_from_pb(u)?,
            },
            CF::PresenceUnsubscribe(u) => Command::PresenceUnsubscribe {
                user_ids: users_from_pb(u)?,
            },
            CF::Refresh(r) => Command::Refresh { token: r.token },
        })
    }
}

impl From<&Event> for pb::ServerFrame {
    fn from(event: &Event) -> Self {
        let frame = match event {
            Event::MessageAck {
                client_msg_id,
                conversation_id,
                message_id,
                seq,
                timestamp,
                position,
            } => SF::MessageAck(pb::MessageAck {
                client_msg_id: client_msg_id.clone(),
                conversation_id: conversation_id.get(),
                message_id: message_id.get(),
                seq: *seq,
                timestamp: *timestamp,
                position: *position,
            }),
            Event::Message { message, position } => SF::Message(message_to_pb(message, *position)),
            Event::Typing {
                conversation_id,
                user_id,
            } => SF::Typing(pb::TypingEvent {
                conversation_id: conversation_id.get(),
                user_id: user_id.to_string(),
            }),
            Event::Receipt {
                conversation_id,
                user_id,
                kind,
                seq,
                position,
            } => SF::Receipt(pb::Receipt {
                conversation_id: conversation_id.get(),
                user_id: user_id.to_string(),
                kind: receipt_kind_to_pb(*kind),
                seq: *seq,
                position: *position,
            }),
            Event::MessageEdited { message, position } => {
                SF::MessageEdited(message_to_pb(message, *position))
            }
            Event::MessageDeleted { message, position } => {
                SF::MessageDeleted(message_to_pb(message, *position))
            }
            Event::Reaction {
                conversation_id,
                message_id,
                user_id,
                key,
                reactions,
                position,
            } => SF::Reaction(pb::ReactionEvent {
                conversation_id: conversation_id.get(),
                message_id: message_id.get(),
                user_id: user_id.to_string(),
                key: key.clone(),
                reactions: reactions_to_pb(reactions),
                position: *position,
            }),
            Event::Reset {
                conversation_id,
                stream,
                reason,
            } => SF::Reset(pb::Reset {
                conversation_id: conversation_id.get(),
                stream: Some(stream_to_pb(stream)),
                reason: match reason {
                    ResetReason::Epoch => pb::ResetReason::Epoch,
                    ResetReason::TooFarBehind => pb::ResetReason::TooFarBehind,
                } as i32,
            }),
            Event::SyncDone {
                conversations,
                more,
                streams,
            } => SF::SyncDone(pb::SyncDone {
                conversations: conversations.iter().map(|(k, v)| (k.get(), *v)).collect(),
                more: more.iter().map(|c| c.get()).collect(),
                streams: streams
                    .iter()
                    .map(|(k, v)| (k.get(), stream_to_pb(v)))
                    .collect(),
            }),
            Event::Presence {
                user_id,
                status,
                last_seen,
            } => SF::Presence(pb::Presence {
                user_id: user_id.to_string(),
                status: status_to_pb(*status),
                last_seen: *last_seen,
            }),
            Event::Membership {
                conversation_id,
                user_id,
                change,
                position,
            } => SF::Membership(pb::Membership {
                position: *position,
                conversation_id: conversation_id.get(),
                user_id: user_id.to_string(),
                change: match change {
                    MembershipChange::Joined => pb::MembershipChange::Joined,
                    MembershipChange::Left => pb::MembershipChange::Left,
                } as i32,
            }),
            Event::Error {
                code,
                message,
                client_msg_id,
                id,
            } => SF::Error(pb::Error {
                code: code_to_pb(*code),
                message: message.clone(),
                client_msg_id: client_msg_id.clone(),
                id: id.clone(),
            }),
            Event::Ok { id } => SF::Ok(pb::Ok { id: id.clone() }),
            Event::Session {
                user_id,
                connection_id,
                node_id,
                expires_at,
                limits,
            } => SF::Session(pb::Session {
                user_id: user_id.to_string(),
                connection_id: connection_id.get(),
                node_id: u32::from(node_id.get()),
                expires_at: *expires_at,
                limits: Some(pb::SessionLimits {
                    max_message_bytes: limits.max_message_bytes,
                    rate_per_second: limits.rate_per_second,
                    rate_burst: limits.rate_burst,
                }),
            }),
            Event::Refreshed { expires_at } => SF::Refreshed(pb::Refreshed {
                expires_at: *expires_at,
            }),
        };
        pb::ServerFrame { frame: Some(frame) }
    }
}

impl TryFrom<pb::ServerFrame> for Event {
    type Error = DecodeError;

    fn try_from(frame: pb::ServerFrame) -> Result<Self, DecodeError> {
        let frame = frame.frame.ok_or_else(|| {
            invalid(
                "ServerFrame has no frame case set (empty, or a case this client does not know)"
                    .to_owned(),
            )
        })?;
        Ok(match frame {
            SF::MessageAck(a) => Event::MessageAck {
                client_msg_id: a.client_msg_id,
                conversation_id: ConversationId::from_raw(a.conversation_id),
                message_id: MessageId::from_raw(a.message_id),
                seq: a.seq,
                timestamp: a.timestamp,
                position: a.position,
            },
            SF::Message(m) => {
                let (message, position) = message_from_pb(m, "message")?;
                Event::Message { message, position }
            }
            SF::Typing(t) => Event::Typing {
                conversation_id: ConversationId::from_raw(t.conversation_id),
                user_id: UserId::from(t.user_id),
            },
            SF::Receipt(r) => Event::Receipt {
                conversation_id: ConversationId::from_raw(r.conversation_id),
                user_id: UserId::from(r.user_id),
                kind: receipt_kind_from_pb(r.kind)?,
                seq: r.seq,
                position: r.position,
            },
            SF::MessageEdited(m) => {
                let (message, position) = message_from_pb(m, "message_edited")?;
                Event::MessageEdited { message, position }
            }
            SF::MessageDeleted(m) => {
                let (message, position) = message_from_pb(m, "message_deleted")?;
                Event::MessageDeleted { message, position }
            }
            SF::Reaction(r) => Event::Reaction {
                conversation_id: ConversationId::from_raw(r.conversation_id),
                message_id: MessageId::from_raw(r.message_id),
                user_id: UserId::from(r.user_id),
                key: r.key,
                reactions: reactions_from_pb(r.reactions),
                position: r.position,
            },
            SF::Reset(r) => Event::Reset {
                conversation_id: ConversationId::from_raw(r.conversation_id),
                stream: stream_from_pb(
                    r.stream
                        .ok_or_else(|| invalid("Reset.stream is not set".to_owned()))?,
                ),
                reason: match pb::ResetReason::try_from(r.reason) {
                    Ok(pb::ResetReason::Epoch) => ResetReason::Epoch,
                    Ok(pb::ResetReason::TooFarBehind) => ResetReason::TooFarBehind,
                    _ => {
                        return Err(invalid(format!(
                            "Reset.reason: invalid ResetReason value {}",
                            r.reason
                        )));
                    }
                },
            },
            SF::SyncDone(s) => Event::SyncDone {
                conversations: s
                    .conversations
                    .into_iter()
                    .map(|(k, v)| (ConversationId::from_raw(k), v))
                    .collect(),
                more: s.more.into_iter().map(ConversationId::from_raw).collect(),
                streams: s
                    .streams
                    .into_iter()
                    .map(|(k, v)| (ConversationId::from_raw(k), stream_from_pb(v)))
                    .collect(),
            },
            SF::Presence(p) => Event::Presence {
                user_id: UserId::from(p.user_id),
                status: status_from_pb(p.status)?,
                last_seen: p.last_seen,
            },
            SF::Membership(m) => Event::Membership {
                conversation_id: ConversationId::from_raw(m.conversation_id),
                user_id: UserId::from(m.user_id),
                change: match pb::MembershipChange::try_from(m.change) {
                    Ok(pb::MembershipChange::Joined) => MembershipChange::Joined,
                    Ok(pb::MembershipChange::Left) => MembershipChange::Left,
                    _ => {
                        return Err(invalid(format!(
                            "Membership.change: invalid MembershipChange value {}",
                            m.change
                        )));
                    }
                },
                position: m.position,
            },
            SF::Error(e) => Event::Error {
                code: code_from_pb(e.code)?,
                message: e.message,
                client_msg_id: e.client_msg_id,
                id: e.id,
            },
            SF::Ok(o) => Event::Ok { id: o.id },
            SF::Session(s) => {
                let limits = s
                    .limits
                    .ok_or_else(|| invalid("Session.limits is not set".to_owned()))?;
                let node_id = u16::try_from(s.node_id)
                    .ok()
                    .and_then(|n| NodeId::new(n).ok())
                    .ok_or_else(|| {
                        invalid(format!("Session.node_id: {} is out of range", s.node_id))
                    })?;
                Event::Session {
                    user_id: UserId::from(s.user_id),
                    connection_id: ConnectionId::from_raw(s.connection_id),
                    node_id,
                    expires_at: s.expires_at,
                    limits: SessionLimits {
                        max_message_bytes: limits.max_message_bytes,
                        rate_per_second: limits.rate_per_second,
                        rate_burst: limits.rate_burst,
                    },
                }
            }
            SF::Refreshed(r) => Event::Refreshed {
                expires_at: r.expires_at,
            },
        })
    }
}
