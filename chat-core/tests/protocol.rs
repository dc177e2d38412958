//! The protocol types against the JSON wire contract: exact shapes, round trips, and arbitrary
//! input never panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chat_core::model::{Media, Message, MessageKind, PresenceStatus, ReceiptKind};
use chat_core::protocol::SendMessage;
use chat_core::{Command, ConversationId, ErrorCode, Event, MessageId, UserId};
use proptest::prelude::*;
use serde_json::json;

fn message() -> Message {
    Message {
        message_id: MessageId::from_raw(9_007_199_254_740_993), // > 2^53: must be a string
        conversation_id: ConversationId::from_raw(7),
        seq: 3,
        sender_id: UserId::from("alice"),
        kind: MessageKind::Image,
        content: "look".into(),
        media: Some(Media {
            url: "https://cdn.example.com/x.png".into(),
            mime: "image/png".into(),
            size: 10,
            name: None,
        }),
        reply_to: None,
        client_msg_id: "c-1".into(),
        created_at: 1_700_000_000_000,
        edited_at: None,
        deleted: false,
        version: 1,
        reactions: Vec::new(),
    }
}

#[test]
fn client_frames_decode_from_the_documented_json() {
    let m: Command = serde_json::from_value(json!({
        "type": "message", "conversation_id": "7", "client_msg_id": "c-1", "content": "hi",
        "unknown_extra": {"ignored": true}
    }))
    .unwrap();
    assert_eq!(
        m,
        Command::Message(SendMessage {
            conversation_id: ConversationId::from_raw(7),
            client_msg_id: "c-1".into(),
            content: "hi".into(),
            kind: MessageKind::Text,
            media: None,
            reply_to: None,
        })
    );
    let r: Command =
        serde_json::from_value(json!({"type": "read", "conversation_id": "7", "seq": 4})).unwrap();
    assert_eq!(
        r,
        Command::Read {
            conversation_id: ConversationId::from_raw(7),
            seq: 4
        }
    );
    let s: Command =
        serde_json::from_value(json!({"type": "sync", "conversations": {"7": 3, "8": 0}})).unwrap();
    assert_eq!(
        s,
        Command::Sync {
            conversations: BTreeMap::from([
                (ConversationId::from_raw(7), 3),
                (ConversationId::from_raw(8), 0)
            ]),
            streams: Default::default(),
        }
    );
    let p: Command =
        serde_json::from_value(json!({"type": "presence_subscribe", "user_ids": ["bob", "carol"]}))
            .unwrap();
    assert_eq!(
        p,
        Command::PresenceSubscribe {
            user_ids: vec![UserId::from("bob"), UserId::from("carol")]
        }
    );
    for bad in [
        json!({"type": "nope"}),
        json!({"conversation_id": "7"}),
        json!({"type": "read", "conversation_id": "x", "seq": 1}),
        json!({"type": "read", "conversation_id": "7", "seq": -1}),
        json!({"type": "message", "conversation_id": "7"}),
    ] {
        assert!(
            serde_json::from_value::<Command>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn server_frames_encode_to_the_documented_json() {
    let ack = Event::MessageAck {
        client_msg_id: "c-1".into(),
        conversation_id: ConversationId::from_raw(7),
        message_id: MessageId::from_raw(9_007_199_254_740_993),
        seq: 3,
        timestamp: 1_700_000_000_000,
        position: None,
    };
    assert_eq!(
        serde_json::to_value(&ack).unwrap(),
        json!({"type": "message_ack", "client_msg_id": "c-1", "conversation_id": "7",
               "message_id": "9007199254740993", "seq": 3, "timestamp": 1_700_000_000_000u64})
    );
    let msg = serde_json::to_value(Event::Message {
        message: message(),
        position: None,
    })
    .unwrap();
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["message"]["message_id"], "9007199254740993");
    assert_eq!(msg["message"]["kind"], "image");
    assert_eq!(msg["message"]["media"]["mime"], "image/png");
    assert_eq!(msg["message"]["deleted"], false);
    assert!(msg["message"].get("edited_at").is_none());
    let err = Event::Error {
        code: ErrorCode::NotMember,
        message: "nope".into(),
        client_msg_id: None,
        id: None,
    };
    assert_eq!(
        serde_json::to_value(&err).unwrap(),
        json!({"type": "error", "code": "not_member", "message": "nope"})
    );
    let presence = Event::Presence {
        user_id: UserId::from("bob"),
        status: PresenceStatus::Offline,
        last_seen: None,
    };
    assert_eq!(
        serde_json::to_value(&presence).unwrap(),
        json!({"type": "presence", "user_id": "bob", "status": "offline", "last_seen": null})
    );
    let receipt = Event::Receipt {
        conversation_id: ConversationId::from_raw(7),
        user_id: UserId::from("bob"),
        kind: ReceiptKind::Read,
        seq: 2,
        position: None,
    };
    assert_eq!(
        serde_json::to_value(&receipt).unwrap(),
        json!({"type": "receipt", "conversation_id": "7", "user_id": "bob", "kind": "read", "seq": 2})
    );
    let done = Event::SyncDone {
        conversations: BTreeMap::from([(ConversationId::from_raw(7), 3)]),
        more: vec![],
        streams: Default::default(),
    };
    assert_eq!(
        serde_json::to_value(&done).unwrap(),
        json!({"type": "sync_done", "conversations": {"7": 3}})
    );
}

#[test]
fn frames_cache_one_encoding_per_codec() {
    let frame = chat_core::Frame::new(Event::Message {
        message: message(),
        position: None,
    });
    let mut calls = 0;
    let a = frame.encoded(0, |e| {
        calls += 1;
        serde_json::to_vec(e).unwrap().into()
    });
    let b = frame.encoded(0, |_| unreachable!("encoded twice"));
    assert_eq!(a, b);
    assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes are shared");
    assert_eq!(calls, 1);
    let other = frame.encoded(1, |_| bytes::Bytes::from_static(b"proto"));
    assert_eq!(&other[..], b"proto");
}

fn arb_event() -> impl Strategy<Value = Event> {
    let id = any::<u64>();
    prop_oneof![
        (id, ".{0,20}", any::<u64>()).prop_map(|(i, s, seq)| Event::MessageAck {
            client_msg_id: s,
            conversation_id: ConversationId::from_raw(i),
            message_id: MessageId::from_raw(i.wrapping_mul(31)),
            seq,
            timestamp: seq / 2,
            position: None,
        }),
        (id, ".{0,40}", any::<bool>()).prop_map(|(i, content, deleted)| {
            let mut m = message();
            m.message_id = MessageId::from_raw(i);
            m.content = content;
            m.deleted = deleted;
            Event::Message {
                message: m,
                position: None,
            }
        }),
        (id, "[a-z]{1,10}").prop_map(|(i, u)| Event::Typing {
            conversation_id: ConversationId::from_raw(i),
            user_id: UserId::from(u),
        }),
        (
            id,
            prop::collection::btree_map(any::<u64>(), any::<u64>(), 0..5)
        )
            .prop_map(|(_, m)| Event::SyncDone {
                conversations: m
                    .into_iter()
                    .map(|(k, v)| (ConversationId::from_raw(k), v))
                    .collect(),
                more: vec![],
                streams: Default::default(),
            }),
    ]
}

proptest! {
    #[test]
    fn events_round_trip_through_json(event in arb_event()) {
        let bytes = serde_json::to_vec(&event).unwrap();
        let back: Event = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(back, event);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_command_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_slice::<Command>(&bytes);
    }

    #[test]
    fn arbitrary_json_objects_never_panic_the_command_decoder(
        t in prop::sample::select(vec!["message", "typing", "read", "delivered", "edit", "delete", "sync", "presence_subscribe", "x"]),
        k in "[a-z_]{1,16}",
        v in prop_oneof![Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), ".{0,8}".prop_map(|s| json!(s)), Just(json!({"7": -1}))],
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), json!(t));
        obj.insert("conversation_id".into(), json!("1"));
        obj.insert(k, v);
        let _ = serde_json::from_value::<Command>(serde_json::Value::Object(obj));
    }
}

#[test]
fn frames_cache_one_prepared_value_per_slot() {
    let frame = chat_core::Frame::new(Event::Message {
        message: message(),
        position: None,
    });
    let mut calls = 0;
    let a: Option<std::sync::Arc<str>> = frame.prepared(1, |_| {
        calls += 1;
        std::sync::Arc::from("ready")
    });
    let b: Option<std::sync::Arc<str>> = frame.prepared(1, |_| unreachable!("prepared twice"));
    assert_eq!(calls, 1);
    assert!(std::sync::Arc::ptr_eq(
        a.as_ref().unwrap(),
        b.as_ref().unwrap()
    ));
    // Another type in the same slot is refused, not confused.
    assert_eq!(frame.prepared::<u32>(1, |_| 7), None);
    assert_eq!(frame.prepared::<u32>(2, |_| 7), Some(7));
}
