//! Both codecs: every frame round-trips; JSON is exactly the serde shape; protobuf is lossless
//! and rejects what it cannot represent; a shared frame is encoded once per codec; arbitrary
//! input never panics a decoder.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use chat_core::model::{
    Media, Message, MessageKind, PresenceStatus, Reaction, ReceiptKind, StreamPosition,
};
use chat_core::protocol::{ResetReason, SendMessage, SessionLimits, SyncFrom};
use chat_core::{
    Command, ConnectionId, ConversationId, ErrorCode, Event, Frame, MessageId, NodeId, UserId,
};
use chat_transport::codec::pb::{self, client_frame::Frame as CF, server_frame::Frame as SF};
use chat_transport::codec::{Codec, DecodeError};
use proptest::prelude::*;
use prost::Message as _;

const CODECS: [Codec; 2] = [Codec::Json, Codec::Proto];

fn message(id: u64, media: bool, edited: bool) -> Message {
    Message {
        message_id: MessageId::from_raw(id),
        conversation_id: ConversationId::from_raw(u64::MAX),
        seq: 42,
        sender_id: UserId::from("ålice 🚀"),
        kind: if media {
            MessageKind::Image
        } else {
            MessageKind::Text
        },
        content: "héllo\n\"quoted\" \u{0}\u{1F600}".into(),
        media: media.then(|| Media {
            url: "https://cdn.example.com/a.png".into(),
            mime: "image/png".into(),
            size: u64::MAX,
            name: None,
        }),
        reply_to: media.then_some(MessageId::from_raw(1)),
        client_msg_id: "c-1".into(),
        created_at: 1_700_000_000_000,
        edited_at: edited.then_some(1_700_000_000_001),
        deleted: edited,
        version: if edited { u32::MAX } else { 1 },
        reactions: if edited {
            Vec::new()
        } else {
            vec![
                Reaction {
                    key: "👍".into(),
                    users: vec![UserId::from("a"), UserId::from("ü 🚀")],
                },
                Reaction {
                    key: "party_parrot".into(),
                    users: vec![UserId::from("b")],
                },
            ]
        },
    }
}

fn all_commands() -> Vec<Command> {
    let c = ConversationId::from_raw(u64::MAX);
    vec![
        Command::Message(SendMessage {
            conversation_id: c,
            client_msg_id: "k".into(),
            content: "hi ✓".into(),
            kind: MessageKind::Text,
            media: None,
            reply_to: None,
        }),
        Command::Message(SendMessage {
            conversation_id: ConversationId::from_raw(0),
            client_msg_id: String::new(),
            content: String::new(),
            kind: MessageKind::File,
            media: Some(Media {
                url: "https://x/y".into(),
                mime: "application/pdf".into(),
                size: 0,
                name: Some("y — ü.pdf".into()),
            }),
            reply_to: Some(MessageId::from_raw(u64::MAX)),
        }),
        Command::Message(SendMessage {
            conversation_id: c,
            client_msg_id: "sys".into(),
            content: "x".into(),
            kind: MessageKind::System,
            media: Some(Media {
                url: String::new(),
                mime: String::new(),
                size: 1,
                name: Some(String::new()),
            }),
            reply_to: Some(MessageId::from_raw(0)),
        }),
        Command::Typing { conversation_id: c },
        Command::Delivered {
            conversation_id: c,
            seq: 0,
        },
        Command::Read {
            conversation_id: c,
            seq: u64::MAX,
        },
        Command::Edit {
            conversation_id: c,
            message_id: MessageId::from_raw(3),
            content: "é 日本語".into(),
        },
        Command::Edit {
            conversation_id: c,
            message_id: MessageId::from_raw(u64::MAX),
            content: String::new(),
        },
        Command::Delete {
            conversation_id: c,
            message_id: MessageId::from_raw(3),
        },
        Command::Sync {
            conversations: BTreeMap::new(),
            streams: Default::default(),
        },
        Command::Sync {
            conversations: BTreeMap::from([
                (c, u64::MAX),
                (ConversationId::from_raw(0), 0),
                (ConversationId::from_raw(1), 5),
            ]),
            streams: Default::default(),
        },
        Command::PresenceSubscribe {
            user_ids: vec![UserId::from("a"), UserId::from("ü 🚀")],
        },
        Command::PresenceSubscribe { user_ids: vec![] },
        Command::PresenceUnsubscribe {
            user_ids: vec![UserId::from("b")],
        },
        Command::PresenceUnsubscribe { user_ids: vec![] },
        Command::Refresh {
            token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
        },
        Command::Refresh {
            token: String::new(),
        },
        Command::React {
            conversation_id: c,
            message_id: MessageId::from_raw(u64::MAX),
            key: "🎉".into(),
        },
        Command::Unreact {
            conversation_id: c,
            message_id: MessageId::from_raw(7),
        },
        Command::Sync {
            conversations: BTreeMap::from([(c, 3)]),
            streams: BTreeMap::from([
                (
                    ConversationId::from_raw(1),
                    SyncFrom {
                        epoch: Some(u64::MAX >> 1),
                        position: u64::MAX,
                    },
                ),
                (
                    ConversationId::from_raw(2),
                    SyncFrom {
                        epoch: None,
                        position: 0,
                    },
                ),
            ]),
        },
    ]
}

fn all_events() -> Vec<Event> {
    let c = ConversationId::from_raw(9);
    vec![
        Event::MessageAck {
            client_msg_id: "k".into(),
            conversation_id: c,
            message_id: MessageId::from_raw(u64::MAX),
            seq: 1,
            timestamp: u64::MAX,
            position: Some(3),
        },
        Event::MessageAck {
            client_msg_id: String::new(),
            conversation_id: ConversationId::from_raw(0),
            message_id: MessageId::from_raw(0),
            seq: 0,
            timestamp: 0,
            position: None,
        },
        Event::Message {
            message: message(1, false, false),
            position: None,
        },
        Event::Message {
            message: message(u64::MAX, true, false),
            position: None,
        },
        Event::Typing {
            conversation_id: c,
            user_id: UserId::from("bob"),
        },
        Event::Receipt {
            conversation_id: c,
            user_id: UserId::from("bob"),
            kind: ReceiptKind::Delivered,
            seq: 3,
            position: None,
        },
        Event::Receipt {
            conversation_id: c,
            user_id: UserId::from("bob"),
            kind: ReceiptKind::Read,
            seq: u64::MAX,
            position: None,
        },
        Event::MessageEdited {
            message: message(3, false, true),
            position: None,
        },
        Event::MessageDeleted {
            message: message(4, true, true),
            position: None,
        },
        Event::SyncDone {
            conversations: BTreeMap::from([(c, 10), (ConversationId::from_raw(u64::MAX), 0)]),
            more: vec![c, ConversationId::from_raw(u64::MAX)],
            streams: Default::default(),
        },
        Event::SyncDone {
            conversations: BTreeMap::new(),
            more: vec![],
            streams: Default::default(),
        },
        Event::Presence {
            user_id: UserId::from("bob"),
            status: PresenceStatus::Online,
            last_seen: Some(5),
        },
        Event::Presence {
            user_id: UserId::from("bob"),
            status: PresenceStatus::Offline,
            last_seen: Some(0),
        },
        Event::Presence {
            user_id: UserId::from("nobody"),
            status: PresenceStatus::Offline,
            last_seen: None,
        },
        Event::Membership {
            conversation_id: ConversationId::from_raw(u64::MAX),
            user_id: UserId::from("carol"),
            change: chat_core::protocol::MembershipChange::Joined,
            position: None,
        },
        Event::Membership {
            conversation_id: ConversationId::from_raw(0),
            user_id: UserId::from("carol"),
            change: chat_core::protocol::MembershipChange::Left,
            position: None,
        },
        Event::Session {
            user_id: UserId::from("ålice"),
            connection_id: ConnectionId::from_raw(u64::MAX),
            node_id: NodeId::new(1023).unwrap(),
            expires_at: Some(u64::MAX),
            limits: SessionLimits {
                max_message_bytes: 65_536,
                rate_per_second: Some(20),
                rate_burst: Some(u32::MAX),
            },
        },
        Event::Session {
            user_id: UserId::from("dev"),
            connection_id: ConnectionId::from_raw(0),
            node_id: NodeId::ZERO,
            expires_at: None,
            limits: SessionLimits {
                max_message_bytes: 0,
                rate_per_second: None,
                rate_burst: None,
            },
        },
        Event::Refreshed {
            expires_at: Some(1_700_000_060_000),
        },
        Event::Refreshed { expires_at: None },
        Event::Message {
            message: message(11, false, false),
            position: Some(u64::MAX),
        },
        Event::Receipt {
            conversation_id: c,
            user_id: UserId::from("r"),
            kind: ReceiptKind::Delivered,
            seq: 4,
            position: Some(17),
        },
        Event::Reaction {
            conversation_id: c,
            message_id: MessageId::from_raw(5),
            user_id: UserId::from("ü 🚀"),
            key: Some("👍".into()),
            reactions: message(5, false, false).reactions,
            position: Some(18),
        },
        Event::Reaction {
            conversation_id: c,
            message_id: MessageId::from_raw(5),
            user_id: UserId::from("b"),
            key: None,
            reactions: Vec::new(),
            position: None,
        },
        Event::Reset {
            conversation_id: c,
            stream: StreamPosition {
                epoch: 1,
                position: 0,
            },
            reason: ResetReason::Epoch,
        },
        Event::Reset {
            conversation_id: c,
            stream: StreamPosition {
                epoch: u64::MAX,
                position: u64::MAX,
            },
            reason: ResetReason::TooFarBehind,
        },
        Event::SyncDone {
            conversations: BTreeMap::new(),
            more: vec![c],
            streams: BTreeMap::from([(
                c,
                StreamPosition {
                    epoch: 42,
                    position: 9,
                },
            )]),
        },
        Event::Ok {
            id: "cmd-1 ✓".into(),
        },
        Event::Error {
            code: ErrorCode::Invalid,
            message: "bad".into(),
            client_msg_id: None,
            id: Some("cmd-2".into()),
        },
        Event::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            client_msg_id: Some("k".into()),
            id: None,
        },
        Event::Error {
            code: ErrorCode::NotMember,
            message: String::new(),
            client_msg_id: None,
            id: None,
        },
    ]
    .into_iter()
    .chain(
        [
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Invalid,
            ErrorCode::TooLarge,
            ErrorCode::Internal,
        ]
        .map(|code| Event::Error {
            code,
            message: code.to_string(),
            client_msg_id: Some(String::new()),
            id: None,
        }),
    )
    .collect()
}

#[test]
fn every_command_round_trips_through_both_codecs() {
    for codec in CODECS {
        for cmd in all_commands() {
            let bytes = codec.encode_command(&cmd);
            assert_eq!(codec.decode(&bytes).unwrap(), cmd, "{codec:?}");
        }
    }
}

#[test]
fn every_event_round_trips_through_both_codecs() {
    for codec in CODECS {
        for event in all_events() {
            let bytes = codec.encode(&event);
            assert_eq!(codec.decode_event(&bytes).unwrap(), event, "{codec:?}");
        }
    }
}

#[test]
fn the_json_codec_is_the_serde_shape() {
    for event in all_events() {
        assert_eq!(
            Codec::Json.encode(&event),
            serde_json::to_vec(&event).unwrap()
        );
    }
    for cmd in all_commands() {
        assert_eq!(
            Codec::Json.encode_command(&cmd),
            serde_json::to_vec(&cmd).unwrap()
        );
        // And decoding is serde's too.
        let text = serde_json::to_string(&cmd).unwrap();
        assert_eq!(
            Codec::Json.decode(text.as_bytes()).unwrap(),
            serde_json::from_str::<Command>(&text).unwrap()
        );
    }
}

#[test]
fn the_json_codec_speaks_the_documented_wire_format() {
    // Ids as strings or numbers, unknown fields ignored, optional fields defaulted.
    let cmd = Codec::Json
        .decode(
            br#" {"type":"message","conversation_id":"18446744073709551615","client_msg_id":"m1",
                 "content":"hi","future_field":{"nested":[1,2,3]}} "#,
        )
        .unwrap();
    assert_eq!(
        cmd,
        Command::Message(SendMessage {
            conversation_id: ConversationId::from_raw(u64::MAX),
            client_msg_id: "m1".into(),
            content: "hi".into(),
            kind: MessageKind::Text,
            media: None,
            reply_to: None,
        })
    );
    let cmd = Codec::Json
        .decode(br#"{"conversation_id":7,"seq":3,"type":"read"}"#)
        .unwrap();
    assert_eq!(
        cmd,
        Command::Read {
            conversation_id: ConversationId::from_raw(7),
            seq: 3
        }
    );
    let text = Codec::Json.encode(&Event::Presence {
        user_id: UserId::from("bob"),
        status: PresenceStatus::Offline,
        last_seen: None,
    });
    assert_eq!(
        &text[..],
        br#"{"type":"presence","user_id":"bob","status":"offline","last_seen":null}"#
    );
    // Token life: refresh, refreshed, the session frame (as in docs/protocol.md).
    assert_eq!(
        Codec::Json
            .decode(br#"{"type":"refresh","token":"eyJ.x.y"}"#)
            .unwrap(),
        Command::Refresh {
            token: "eyJ.x.y".into()
        }
    );
    assert_eq!(
        &Codec::Json.encode(&Event::Refreshed {
            expires_at: Some(1_700_003_600_000)
        })[..],
        br#"{"type":"refreshed","expires_at":1700003600000}"#
    );
    let session = Event::Session {
        user_id: UserId::from("alice"),
        connection_id: ConnectionId::from_raw(7),
        node_id: NodeId::new(3).unwrap(),
        expires_at: Some(1_700_000_900_000),
        limits: SessionLimits {
            max_message_bytes: 65_536,
            rate_per_second: Some(20),
            rate_burst: Some(50),
        },
    };
    assert_eq!(
        &Codec::Json.encode(&session)[..],
        br#"{"type":"session","user_id":"alice","connection_id":"7","node_id":3,"expires_at":1700000900000,"limits":{"max_message_bytes":65536,"rate_per_second":20,"rate_burst":50}}"#
    );
}

#[test]
fn a_frame_is_encoded_once_per_codec() {
    let frame = Frame::new(Event::Message {
        message: message(7, true, false),
        position: None,
    });
    for codec in CODECS {
        let a = codec.encode_frame(&frame);
        let b = codec.encode_frame(&frame);
        assert_eq!(a.as_ptr(), b.as_ptr(), "{codec:?} encoded twice");
        assert_eq!(a, codec.encode(frame.event()));
    }
    assert_ne!(
        Codec::Json.encode_frame(&frame),
        Codec::Proto.encode_frame(&frame)
    );
    // The cache is the frame's slot for the codec: a pre-filled slot is what encode_frame returns.
    let frame = Frame::new(frame.event().clone());
    let _ = frame.encoded(Codec::Proto.slot(), |_| {
        bytes::Bytes::from_static(b"cached")
    });
    assert_eq!(&Codec::Proto.encode_frame(&frame)[..], b"cached");
}

#[test]
fn codec_names() {
    for codec in CODECS {
        assert_eq!(Codec::from_subprotocol(codec.subprotocol()), Some(codec));
    }
    assert_eq!(Codec::from_subprotocol("chat.v2.json"), None);
    assert_eq!(Codec::from_query_value("json"), Some(Codec::Json));
    assert_eq!(Codec::from_query_value("proto"), Some(Codec::Proto));
    assert_eq!(Codec::from_query_value("xml"), None);
    assert!(!Codec::Json.is_binary());
    assert!(Codec::Proto.is_binary());
    assert_ne!(Codec::Json.slot(), Codec::Proto.slot());
    assert!(Codec::Proto.slot() < chat_core::protocol::CODEC_SLOTS);
    assert_eq!(Codec::default(), Codec::Json);
}

#[test]
fn the_unknown_type_error_names_the_type() {
    let e = Codec::Json
        .decode(br#"{"type":"dance","x":1}"#)
        .unwrap_err();
    assert_eq!(e, DecodeError::UnknownType("dance".into()));
    assert_eq!(e.to_string(), r#"unknown frame type "dance""#);
    let err = e.to_error();
    assert_eq!(err.code(), ErrorCode::Invalid);
    assert!(err.client_message().contains("dance"));
    // A server type is unknown to the server...
    assert_eq!(
        Codec::Json.decode(br#"{"type":"message_ack"}"#),
        Err(DecodeError::UnknownType("message_ack".into()))
    );
    // ...and a client type to the client.
    assert_eq!(
        Codec::Json.decode_event(br#"{"type":"sync"}"#),
        Err(DecodeError::UnknownType("sync".into()))
    );
    // A huge type is not echoed whole.
    let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(10_000));
    match Codec::Json.decode(long.as_bytes()) {
        Err(DecodeError::UnknownType(t)) => assert!(t.len() < 100 && t.ends_with('…')),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_errors_say_what_was_wrong() {
    let decode = |s: &[u8]| Codec::Json.decode(s).unwrap_err();
    assert_eq!(decode(br#"{"x":1}"#), DecodeError::MissingType);
    assert_eq!(decode(br#"{"type":7}"#), DecodeError::MissingType);
    assert_eq!(decode(br#"{"type":null}"#), DecodeError::MissingType);
    assert!(matches!(decode(b"{nope"), DecodeError::MalformedJson(_)));
    assert!(matches!(decode(b""), DecodeError::MalformedJson(_)));
    assert!(matches!(decode(b"   "), DecodeError::MalformedJson(_)));
    assert!(matches!(
        decode(br#"{"type":"typing","conversation_id":"1"} trailing"#),
        DecodeError::MalformedJson(_)
    ));
    // Serde would take an array for an internally tagged enum; the protocol says object.
    assert!(matches!(
        decode(br#"["typing","1"]"#),
        DecodeError::MalformedJson(m) if m.contains("object")
    ));
    assert!(matches!(decode(b"42"), DecodeError::MalformedJson(_)));
    assert_eq!(
        decode(&[b'{', 0xff, 0xfe, b'}']),
        DecodeError::NotUtf8 { valid_up_to: 1 }
    );
    // Missing and mistyped fields of a known type name the type and the field.
    let e = decode(br#"{"type":"read","conversation_id":"1"}"#);
    assert!(
        matches!(&e, DecodeError::InvalidFields { frame, reason } if frame == "read" && reason.contains("seq")),
        "{e:?}"
    );
    let e = decode(br#"{"type":"delivered","conversation_id":"1","seq":-1}"#);
    assert!(matches!(&e, DecodeError::InvalidFields { frame, .. } if frame == "delivered"));
    let e = decode(br#"{"type":"message","conversation_id":"x","client_msg_id":"k"}"#);
    assert!(matches!(&e, DecodeError::InvalidFields { frame, .. } if frame == "message"));
    let e = decode(br#"{"type":"message","conversation_id":"1","client_msg_id":"k","kind":"gif"}"#);
    assert!(matches!(&e, DecodeError::InvalidFields { reason, .. } if reason.contains("gif")));
    // A bad value is not echoed whole.
    let big = format!(
        r#"{{"type":"read","conversation_id":"1","seq":"{}"}}"#,
        "9".repeat(100_000)
    );
    assert!(decode(big.as_bytes()).to_string().len() < 400);
    // Everything maps to `invalid`.
    for e in [
        decode(b"{"),
        decode(br#"{"type":"read"}"#),
        DecodeError::NotUtf8 { valid_up_to: 0 },
    ] {
        assert_eq!(e.to_error().code(), ErrorCode::Invalid);
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let mut deep = String::from(r#"{"type":"typing","conversation_id":"1","x":"#);
    deep.push_str(&"[".repeat(100_000));
    deep.push_str(&"]".repeat(100_000));
    deep.push('}');
    assert!(matches!(
        Codec::Json.decode(deep.as_bytes()),
        Err(DecodeError::MalformedJson(_))
    ));
    assert!(Codec::Json.decode_event(deep.as_bytes()).is_err());
}

fn client(frame: CF) -> Vec<u8> {
    pb::ClientFrame {
        frame: Some(frame),
        id: None,
    }
    .encode_to_vec()
}

fn server(frame: SF) -> Vec<u8> {
    pb::ServerFrame { frame: Some(frame) }.encode_to_vec()
}

fn invalid_proto(result: Result<impl std::fmt::Debug, DecodeError>, needle: &str) {
    match result {
        Err(DecodeError::InvalidProto(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected InvalidProto({needle}), got {other:?}"),
    }
}

#[test]
fn protobuf_rejects_what_it_cannot_represent() {
    // An empty frame (no oneof case), and one with only a case from the future (field 50).
    invalid_proto(Codec::Proto.decode(&[]), "no frame");
    invalid_proto(Codec::Proto.decode(&[0x90, 0x03, 0x01]), "no frame");
    invalid_proto(Codec::Proto.decode_event(&[]), "no frame");
    // An out-of-range message kind.
    let send = pb::SendMessage {
        conversation_id: 1,
        client_msg_id: "k".into(),
        content: "x".into(),
        kind: 99,
        media: None,
        reply_to: None,
    };
    invalid_proto(
        Codec::Proto.decode(&client(CF::Message(send.clone()))),
        "SendMessage.kind",
    );
    // A user id that `UserId::parse` refuses is refused by both codecs where it is decoded.
    invalid_proto(
        Codec::Proto.decode(&client(CF::PresenceSubscribe(pb::UserIds {
            user_ids: vec!["ok".into(), String::new()],
        }))),
        "UserIds.user_ids",
    );
    assert!(
        Codec::Json
            .decode(br#"{"type":"presence_subscribe","user_ids":["ok",""]}"#)
            .is_err()
    );
    // An unset kind is text, as in JSON.
    let cmd = Codec::Proto
        .decode(&client(CF::Message(pb::SendMessage { kind: 0, ..send })))
        .unwrap();
    assert!(matches!(cmd, Command::Message(m) if m.kind == MessageKind::Text));

    // A message event without its message.
    for (frame, name) in [
        (
            SF::Message(pb::MessageEvent {
                message: None,
                position: None,
            }),
            "message",
        ),
        (
            SF::MessageEdited(pb::MessageEvent {
                message: None,
                position: None,
            }),
            "message_edited",
        ),
        (
            SF::MessageDeleted(pb::MessageEvent {
                message: None,
                position: None,
            }),
            "message_deleted",
        ),
    ] {
        invalid_proto(
            Codec::Proto.decode_event(&server(frame)),
            &format!("ServerFrame.{name}"),
        );
    }
    // Unspecified or unknown enums where a value is required.
    let message = pb::ServerFrame::from(&Event::Message {
        message: message(1, false, false),
        position: None,
    });
    let Some(SF::Message(mut m)) = message.frame else {
        panic!()
    };
    if let Some(inner) = m.message.as_mut() {
        inner.kind = -1;
    }
    invalid_proto(
        Codec::Proto.decode_event(&server(SF::Message(m))),
        "Message.kind",
    );
    for kind in [0, 3, i32::MAX] {
        let frame = SF::Receipt(pb::Receipt {
            conversation_id: 1,
            user_id: "u".into(),
            kind,
            seq: 1,
            position: None,
        });
        invalid_proto(Codec::Proto.decode_event(&server(frame)), "Receipt.kind");
    }
    for status in [0, 3, -5] {
        let frame = SF::Presence(pb::Presence {
            user_id: "u".into(),
            status,
            last_seen: None,
        });
        invalid_proto(Codec::Proto.decode_event(&server(frame)), "Presence.status");
    }
    for code in [0, 9, 1000] {
        let frame = SF::Error(pb::Error {
            code,
            message: String::new(),
            client_msg_id: None,
            id: None,
        });
        invalid_proto(Codec::Proto.decode_event(&server(frame)), "Error.code");
    }
    // Garbage, truncation and invalid UTF-8 in a string field.
    assert!(matches!(
        Codec::Proto.decode(&[0x0a, 0xff, 0xff, 0xff]),
        Err(DecodeError::MalformedProto(_))
    ));
    // A session frame without its limits, or with a node id out of range.
    let session = pb::Session {
        user_id: "u".into(),
        connection_id: 1,
        node_id: 1,
        expires_at: None,
        limits: None,
    };
    invalid_proto(
        Codec::Proto.decode_event(&server(SF::Session(session.clone()))),
        "Session.limits",
    );
    let limits = Some(pb::SessionLimits {
        max_message_bytes: 1,
        rate_per_second: None,
        rate_burst: None,
    });
    for node_id in [1024, u32::MAX] {
        invalid_proto(
            Codec::Proto.decode_event(&server(SF::Session(pb::Session {
                node_id,
                limits,
                ..session.clone()
            }))),
            "Session.node_id",
        );
    }
    let full = Codec::Proto.encode_command(&all_commands()[1]);
    assert!(matches!(
        Codec::Proto.decode(&full[..full.len() - 1]),
        Err(DecodeError::MalformedProto(_))
    ));
    // presence_subscribe { user_ids: [b"\xff"] }
    let bad_utf8 = [0x42, 0x03, 0x0a, 0x01, 0xff];
    assert!(matches!(
        Codec::Proto.decode(&bad_utf8),
        Err(DecodeError::MalformedProto(_))
    ));
    // All of them are `invalid` for the client.
    assert_eq!(
        Codec::Proto.decode(&[]).unwrap_err().to_error().code(),
        ErrorCode::Invalid
    );
}

#[test]
fn protobuf_ignores_unknown_fields() {
    let cmd = Command::Typing {
        conversation_id: ConversationId::from_raw(5),
    };
    let mut bytes = Codec::Proto.encode_command(&cmd).to_vec();
    bytes.extend([0xa0, 0x06, 0x01]); // field 100 varint 1, at the top level
    assert_eq!(Codec::Proto.decode(&bytes).unwrap(), cmd);
}

#[test]
fn protobuf_wire_format_is_the_documented_one() {
    // Snowflake ids are fixed64 (wire type 1): field 1 of Typing is `09` + 8 bytes little-endian.
    let bytes = Codec::Proto.encode_command(&Command::Typing {
        conversation_id: ConversationId::from_raw(0x0102_0304_0506_0708),
    });
    assert_eq!(
        &bytes[..],
        &[
            0x12, 0x09, 0x09, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01
        ]
    );
    // Conversions are also public, for Rust clients that want the messages themselves.
    for event in all_events() {
        let frame = pb::ServerFrame::from(&event);
        assert_eq!(Event::try_from(frame).unwrap(), event);
    }
    for cmd in all_commands() {
        let frame = pb::ClientFrame::from(&cmd);
        assert_eq!(Command::try_from(frame).unwrap(), cmd);
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn arb_conv() -> impl Strategy<Value = ConversationId> {
    prop_oneof![Just(0), Just(u64::MAX), any::<u64>()].prop_map(ConversationId::from_raw)
}

fn arb_msg_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![Just(0), Just(u64::MAX), any::<u64>()].prop_map(MessageId::from_raw)
}

fn arb_user() -> impl Strategy<Value = UserId> {
    "\\PC{1,12}".prop_map(UserId::from)
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "\\PC{0,40}", any::<String>()]
}

fn arb_kind() -> impl Strategy<Value = MessageKind> {
    prop_oneof![
        Just(MessageKind::Text),
        Just(MessageKind::Image),
        Just(MessageKind::File),
        Just(MessageKind::System),
    ]
}

fn arb_media() -> impl Strategy<Value = Option<Media>> {
    proptest::option::of(
        (
            arb_text(),
            arb_text(),
            any::<u64>(),
            proptest::option::of(arb_text()),
        )
            .prop_map(|(url, mime, size, name)| Media {
                url,
                mime,
                size,
                name,
            }),
    )
}

fn arb_seq_map() -> impl Strategy<Value = BTreeMap<ConversationId, u64>> {
    prop::collection::btree_map(arb_conv(), any::<u64>(), 0..6)
}

fn arb_command() -> BoxedStrategy<Command> {
    prop_oneof![
        (
            arb_conv(),
            arb_text(),
            arb_text(),
            arb_kind(),
            arb_media(),
            proptest::option::of(arb_msg_id()),
        )
            .prop_map(
                |(conversation_id, client_msg_id, content, kind, media, reply_to)| {
                    Command::Message(SendMessage {
                        conversation_id,
                        client_msg_id,
                        content,
                        kind,
                        media,
                        reply_to,
                    })
                }
            ),
        arb_conv().prop_map(|conversation_id| Command::Typing { conversation_id }),
        (arb_conv(), any::<u64>()).prop_map(|(conversation_id, seq)| Command::Delivered {
            conversation_id,
            seq
        }),
        (arb_conv(), any::<u64>()).prop_map(|(conversation_id, seq)| Command::Read {
            conversation_id,
            seq
        }),
        (arb_conv(), arb_msg_id(), arb_text()).prop_map(
            |(conversation_id, message_id, content)| Command::Edit {
                conversation_id,
                message_id,
                content
            }
        ),
        (arb_conv(), arb_msg_id()).prop_map(|(conversation_id, message_id)| Command::Delete {
            conversation_id,
            message_id
        }),
        arb_seq_map().prop_map(|conversations| Command::Sync {
            conversations,
            streams: Default::default()
        }),
        prop::collection::vec(arb_user(), 0..5)
            .prop_map(|user_ids| Command::PresenceSubscribe { user_ids }),
        prop::collection::vec(arb_user(), 0..5)
            .prop_map(|user_ids| Command::PresenceUnsubscribe { user_ids }),
        arb_text().prop_map(|token| Command::Refresh { token }),
    ]
    .boxed()
}

fn arb_message() -> BoxedStrategy<Message> {
    (
        (
            arb_msg_id(),
            arb_conv(),
            any::<u64>(),
            arb_user(),
            arb_kind(),
        ),
        (arb_text(), arb_media(), proptest::option::of(arb_msg_id())),
        (
            arb_text(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                (message_id, conversation_id, seq, sender_id, kind),
                (content, media, reply_to),
                (client_msg_id, created_at, edited_at, deleted, version),
            )| Message {
                message_id,
                conversation_id,
                seq,
                sender_id,
                kind,
                content,
                media,
                reply_to,
                client_msg_id,
                created_at,
                edited_at,
                deleted,
                version,
                reactions: Vec::new(),
            },
        )
        .boxed()
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn arb_event() -> BoxedStrategy<Event> {
    prop_oneof![
        (
            arb_text(),
            arb_conv(),
            arb_msg_id(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(client_msg_id, conversation_id, message_id, seq, timestamp)| {
                    Event::MessageAck {
                        client_msg_id,
                        conversation_id,
                        message_id,
                        seq,
                        timestamp,
                        position: None,
                    }
                }
            ),
        arb_message().prop_map(|message| Event::Message {
            message,
            position: None
        }),
        (arb_conv(), arb_user()).prop_map(|(conversation_id, user_id)| Event::Typing {
            conversation_id,
            user_id
        }),
        (
            arb_conv(),
            arb_user(),
            prop_oneof![Just(ReceiptKind::Delivered), Just(ReceiptKind::Read)],
            any::<u64>()
        )
            .prop_map(|(conversation_id, user_id, kind, seq)| Event::Receipt {
                conversation_id,
                user_id,
                kind,
                seq,
                position: None,
            }),
        arb_message().prop_map(|message| Event::MessageEdited {
            message,
            position: None
        }),
        arb_message().prop_map(|message| Event::MessageDeleted {
            message,
            position: None
        }),
        (arb_seq_map(), prop::collection::vec(arb_conv(), 0..4)).prop_map(
            |(conversations, more)| Event::SyncDone {
                conversations,
                more,
                streams: Default::default(),
            }
        ),
        (
            arb_user(),
            prop_oneof![Just(PresenceStatus::Online), Just(PresenceStatus::Offline)],
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(user_id, status, last_seen)| Event::Presence {
                user_id,
                status,
                last_seen
            }),
        (
            arb_error_code(),
            arb_text(),
            proptest::option::of(arb_text())
        )
            .prop_map(|(code, message, client_msg_id)| Event::Error {
                code,
                message,
                client_msg_id,
                id: None,
            }),
        (
            (arb_user(), any::<u64>(), 0u16..=1023),
            proptest::option::of(any::<u64>()),
            (
                any::<u64>(),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>())
            )
        )
            .prop_map(
                |(
                    (user_id, connection_id, node_id),
                    expires_at,
                    (max_message_bytes, rate_per_second, rate_burst),
                )| Event::Session {
                    user_id,
                    connection_id: ConnectionId::from_raw(connection_id),
                    node_id: NodeId::new(node_id).unwrap(),
                    expires_at,
                    limits: SessionLimits {
                        max_message_bytes,
                        rate_per_second,
                        rate_burst,
                    },
                }
            ),
        proptest::option::of(any::<u64>()).prop_map(|expires_at| Event::Refreshed { expires_at }),
    ]
    .boxed()
}

/// A valid encoding of some frame, then damaged: truncated, a byte changed, bytes inserted.
fn arb_damaged(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (valid, any::<prop::sample::Index>(), any::<u8>(), 0u8..3).prop_map(
        |(mut bytes, at, byte, how)| {
            if bytes.is_empty() {
                return vec![byte];
            }
            let i = at.index(bytes.len());
            match how {
                0 => bytes.truncate(i),
                1 => bytes[i] = byte,
                _ => bytes.insert(i, byte),
            }
            bytes
        },
    )
}

fn decode_everything(bytes: &[u8]) {
    for codec in CODECS {
        let _ = codec.decode(bytes);
        let _ = codec.decode_event(bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn damaged_frames_never_panic_any_decoder(
        bytes in arb_damaged(prop_oneof![
            (arb_command(), prop::sample::select(CODECS.to_vec()))
                .prop_map(|(c, codec)| codec.encode_command(&c).to_vec()),
            (arb_event(), prop::sample::select(CODECS.to_vec()))
                .prop_map(|(e, codec)| codec.encode(&e).to_vec()),
        ])
    ) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_json_values_never_panic_the_json_decoder(
        text in r#"\{("(type|conversation_id|seq|content|kind|media|user_ids|conversations|x)":("typing"|"message"|"sync"|"read"|"presence"|-?[0-9]{1,22}|\[\]|\{\}|null|true|"[^"\\]{0,8}"),?){0,6}\}"#
    ) {
        let _ = Codec::Json.decode(text.as_bytes());
        let _ = Codec::Json.decode_event(text.as_bytes());
    }

    #[test]
    fn generated_commands_round_trip(cmd in arb_command()) {
        for codec in CODECS {
            let bytes = codec.encode_command(&cmd);
            prop_assert_eq!(&codec.decode(&bytes).unwrap(), &cmd, "{:?}", codec);
        }
    }

    #[test]
    fn generated_events_round_trip(event in arb_event()) {
        for codec in CODECS {
            let bytes = codec.encode(&event);
            prop_assert_eq!(&codec.decode_event(&bytes).unwrap(), &event, "{:?}", codec);
        }
        prop_assert_eq!(Codec::Json.encode(&event), serde_json::to_vec(&event).unwrap());
    }
}
