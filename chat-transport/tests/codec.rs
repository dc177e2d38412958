//! Both codecs: every frame round-trips; JSON is exactly the serde shape; protobuf is lossless;
//! arbitrary input never panics a decoder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chat_core::model::{Media, Message, MessageKind, PresenceStatus, ReceiptKind};
use chat_core::protocol::SendMessage;
use chat_core::{Command, ConversationId, ErrorCode, Event, Frame, MessageId, UserId};
use chat_transport::codec::{Codec, DecodeError};
use proptest::prelude::*;

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
        content: "héllo\n\"quoted\"".into(),
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
        version: if edited { 3 } else { 1 },
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
            conversation_id: c,
            client_msg_id: "k2".into(),
            content: String::new(),
            kind: MessageKind::File,
            media: Some(Media {
                url: "https://x/y".into(),
                mime: "application/pdf".into(),
                size: 0,
                name: Some("y.pdf".into()),
            }),
            reply_to: Some(MessageId::from_raw(7)),
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
            content: "e".into(),
        },
        Command::Delete {
            conversation_id: c,
            message_id: MessageId::from_raw(3),
        },
        Command::Sync {
            conversations: BTreeMap::new(),
        },
        Command::Sync {
            conversations: BTreeMap::from([(c, 5), (ConversationId::from_raw(1), 0)]),
        },
        Command::PresenceSubscribe {
            user_ids: vec![UserId::from("a"), UserId::from("b")],
        },
        Command::PresenceUnsubscribe { user_ids: vec![] },
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
            timestamp: 2,
        },
        Event::Message {
            message: message(1, false, false),
        },
        Event::Message {
            message: message(2, true, false),
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
        },
        Event::Receipt {
            conversation_id: c,
            user_id: UserId::from("bob"),
            kind: ReceiptKind::Read,
            seq: 3,
        },
        Event::MessageEdited {
            message: message(3, false, true),
        },
        Event::MessageDeleted {
            message: message(4, true, true),
        },
        Event::SyncDone {
            conversations: BTreeMap::from([(c, 10)]),
            more: vec![c],
        },
        Event::SyncDone {
            conversations: BTreeMap::new(),
            more: vec![],
        },
        Event::Presence {
            user_id: UserId::from("bob"),
            status: PresenceStatus::Online,
            last_seen: Some(5),
        },
        Event::Presence {
            user_id: UserId::from("nobody"),
            status: PresenceStatus::Offline,
            last_seen: None,
        },
        Event::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            client_msg_id: Some("k".into()),
        },
        Event::Error {
            code: ErrorCode::NotMember,
            message: String::new(),
            client_msg_id: None,
        },
    ]
}

#[test]
fn every_command_round_trips_through_both_codecs() {
    for codec in [Codec::Json, Codec::Proto] {
        for cmd in all_commands() {
            let bytes = codec.encode_command(&cmd);
            assert_eq!(codec.decode(&bytes).unwrap(), cmd, "{codec:?}");
        }
    }
}

#[test]
fn every_event_round_trips_through_both_codecs() {
    for codec in [Codec::Json, Codec::Proto] {
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
}

#[test]
fn a_frame_is_encoded_once_per_codec() {
    let frame = Frame::new(all_events().remove(1));
    for codec in [Codec::Json, Codec::Proto] {
        let a = codec.encode_frame(&frame);
        let b = codec.encode_frame(&frame);
        assert_eq!(a.as_ptr(), b.as_ptr(), "{codec:?} encoded twice");
    }
    assert_ne!(
        Codec::Json.encode_frame(&frame),
        Codec::Proto.encode_frame(&frame)
    );
}

#[test]
fn json_errors_say_what_was_wrong() {
    let e = Codec::Json.decode(br#"{"type":"dance"}"#).unwrap_err();
    assert!(matches!(&e, DecodeError::UnknownType(t) if t == "dance"));
    assert!(e.to_string().contains("dance"));
    assert!(matches!(
        Codec::Json.decode(br#"{"x":1}"#),
        Err(DecodeError::MissingType)
    ));
    assert!(matches!(
        Codec::Json.decode(b"{nope"),
        Err(DecodeError::MalformedJson(_))
    ));
    assert!(matches!(
        Codec::Json.decode(&[0xff, 0xfe]),
        Err(DecodeError::MalformedJson(_))
    ));
    let e = Codec::Json
        .decode(br#"{"type":"read","conversation_id":"1"}"#)
        .unwrap_err();
    assert!(matches!(&e, DecodeError::InvalidFields { frame, .. } if frame == "read"));
    assert_eq!(e.to_error().code(), ErrorCode::Invalid);
}

#[test]
fn protobuf_rejects_what_it_cannot_represent() {
    use prost::Message as _;
    // An empty ClientFrame (no oneof).
    assert!(matches!(
        Codec::Proto.decode(&[]),
        Err(DecodeError::InvalidProto(_))
    ));
    // An out-of-range enum value.
    let frame = chat_transport::codec::pb::ClientFrame {
        frame: Some(chat_transport::codec::pb::client_frame::Frame::Message(
            chat_transport::codec::pb::SendMessage {
                conversation_id: 1,
                client_msg_id: "k".into(),
                content: "x".into(),
                kind: 99,
                media: None,
                reply_to: None,
            },
        )),
    };
    assert!(matches!(
        Codec::Proto.decode(&frame.encode_to_vec()),
        Err(DecodeError::InvalidProto(_))
    ));
    // Garbage.
    assert!(matches!(
        Codec::Proto.decode(&[0x0a, 0xff, 0xff, 0xff]),
        Err(DecodeError::MalformedProto(_))
    ));
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (
            any::<u64>(),
            "\\PC{1,20}",
            "\\PC{0,50}",
            0u8..3,
            any::<Option<u64>>()
        )
            .prop_map(
                |(c, k, content, kind, reply)| Command::Message(SendMessage {
                    conversation_id: ConversationId::from_raw(c),
                    client_msg_id: k,
                    content,
                    kind: [MessageKind::Text, MessageKind::Image, MessageKind::File][kind as usize],
                    media: None,
                    reply_to: reply.map(MessageId::from_raw),
                })
            ),
        (any::<u64>(), any::<u64>()).prop_map(|(c, s)| Command::Read {
            conversation_id: ConversationId::from_raw(c),
            seq: s
        }),
        prop::collection::btree_map(any::<u64>(), any::<u64>(), 0..8).prop_map(|m| {
            Command::Sync {
                conversations: m
                    .into_iter()
                    .map(|(k, v)| (ConversationId::from_raw(k), v))
                    .collect(),
            }
        }),
        prop::collection::vec("\\PC{1,10}", 0..5).prop_map(|u| Command::PresenceSubscribe {
            user_ids: u.into_iter().map(UserId::from).collect()
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for codec in [Codec::Json, Codec::Proto] {
            let _ = codec.decode(&bytes);
            let _ = codec.decode_event(&bytes);
        }
    }

    #[test]
    fn generated_commands_round_trip(cmd in arb_command()) {
        for codec in [Codec::Json, Codec::Proto] {
            let bytes = codec.encode_command(&cmd);
            prop_assert_eq!(codec.decode(&bytes).unwrap(), cmd.clone());
        }
    }
}
