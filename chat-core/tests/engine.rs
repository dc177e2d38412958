//! Engine tests through the in-process transport: one test (at least) per promise of the design
//! brief and per command of the wire contract.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chat_core::model::{Media, MessageKind, ReceiptKind};
use chat_core::protocol::SendMessage;
use chat_core::{Command, ErrorCode, Event, UserId};
use common::*;

// ---------------------------------------------------------------- sending, acks, order

#[tokio::test]
async fn message_is_acked_after_it_is_in_history_and_reaches_members() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;

    let (id, seq) = send_ok(&mut alice, conv, "c1", "hello").await;
    assert_eq!(seq, 1);
    // Durable before ack: by the time the ack was queued the message is readable.
    let hist = h.history("bob", conv).await;
    assert_eq!(hist.len(), 1);
    assert_eq!((hist[0].message_id, hist[0].seq), (id, 1));
    assert_eq!(hist[0].content, "hello");
    assert_eq!(hist[0].sender_id, UserId::from("alice"));

    match next(&mut bob).await {
        Event::Message { message, .. } => {
            assert_eq!(message.message_id, id);
            assert_eq!(message.content, "hello");
            assert_eq!(message.version, 1);
            assert!(!message.deleted);
        }
        other => panic!("bob expected the message, got {other:?}"),
    }
    // The sending device gets the ack, not the message itself.
    expect_nothing(&mut alice).await;
}

#[tokio::test]
async fn no_ack_and_no_fan_out_until_the_store_has_the_message() {
    let store = Arc::new(FaultStore::default());
    let h = Harness::from_builder(chat_core::Chat::builder().store(store.clone())).await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;

    // The store is slow: the append is held at the gate.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *store.gate.lock().unwrap() = Some(gate.clone());
    let session = alice.session().clone();
    let sending = tokio::spawn(async move { session.handle(text(conv, "g1", "held")).await });
    expect_nothing(&mut alice).await;
    expect_nothing(&mut bob).await;
    assert!(h.history("alice", conv).await.is_empty());
    gate.add_permits(1);
    sending.await.unwrap();
    assert!(matches!(
        next(&mut alice).await,
        Event::MessageAck { seq: 1, .. }
    ));
    assert!(matches!(next(&mut bob).await, Event::Message { .. }));
    *store.gate.lock().unwrap() = None;

    // The store fails: an error, no ack, nothing delivered, nothing stored.
    store
        .fail_appends
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, _) = send_err(&mut alice, text(conv, "g2", "lost?")).await;
    assert_eq!(code, ErrorCode::Internal);
    expect_nothing(&mut bob).await;
    // The client retries with the same key once the store is back: stored exactly once.
    store
        .fail_appends
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (_, seq) = send_ok(&mut alice, conv, "g2", "lost?").await;
    assert_eq!(seq, 2);
    assert_eq!(h.history("alice", conv).await.len(), 2);
}

#[tokio::test]
async fn acked_messages_survive_the_engine_going_away() {
    let store: chat_core::store::DynMessageStore = Arc::new(chat_core::memory::MemoryStore::new());
    let chat = chat_core::Chat::builder()
        .store(store.clone())
        .build()
        .await
        .unwrap();
    let t = chat_core::memory::InProcessTransport::new(chat.clone());
    let conv = chat
        .create_conversation(
            &UserId::from("a"),
            chat_core::model::ConversationKind::Direct,
            &[UserId::from("b")],
            None,
        )
        .await
        .unwrap()
        .conversation
        .id;
    let mut a = t.connect("a").await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(send_ok(&mut a, conv, &format!("m{i}"), "x").await);
    }
    // The engine stops (a gateway crash as far as the store is concerned).
    chat.shutdown();
    drop(a);
    drop(t);
    drop(chat);
    let fresh = chat_core::Chat::builder()
        .store(store)
        .build()
        .await
        .unwrap();
    let page = fresh
        .history(&UserId::from("b"), conv, None, 100)
        .await
        .unwrap();
    let stored: HashSet<_> = page.items.iter().map(|m| (m.message_id, m.seq)).collect();
    for ack in &acked {
        assert!(stored.contains(ack), "acked {ack:?} missing after restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_get_gap_free_seqs_and_every_ack_is_stored() {
    const TASKS: usize = 32;
    const SENDS: usize = 500;
    let h = Harness::with(|c| {
        c.rate_limit = None;
        c.outbound_queue = TASKS * SENDS + 16;
    })
    .await;
    let users: Vec<String> = (0..TASKS).map(|i| format!("u{i}")).collect();
    let others: Vec<&str> = users.iter().map(String::as_str).collect();
    let conv = h.group("observer", &others).await;
    let mut observer = h.connect("observer").await;

    let mut tasks = Vec::new();
    for u in &users {
        let mut client = h.connect(u).await;
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::with_capacity(SENDS);
            for i in 0..SENDS {
                let cmid = format!("{}-{i}", client.user_id());
                client.send(text(conv, &cmid, &cmid)).await;
                // Replies of one session come in command order; other members' messages
                // interleave on the live queue.
                loop {
                    match client.recv().await.expect("open") {
                        Event::MessageAck {
                            client_msg_id,
                            message_id,
                            seq,
                            ..
                        } => {
                            assert_eq!(client_msg_id, cmid);
                            acks.push((message_id, seq, cmid.clone()));
                            break;
                        }
                        Event::Message { .. } => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        // One sender's messages get seqs in send order.
        assert!(mine.windows(2).all(|w| w[0].1 < w[1].1));
        acks.extend(mine);
    }
    let total = TASKS * SENDS;
    assert_eq!(acks.len(), total);
    let seqs: HashSet<u64> = acks.iter().map(|a| a.1).collect();
    assert_eq!(seqs.len(), total, "duplicate seq");
    assert_eq!(
        seqs,
        (1..=total as u64).collect(),
        "seqs are not exactly 1..N"
    );

    let hist = h.history("observer", conv).await;
    assert_eq!(hist.len(), total);
    let by_seq: HashMap<u64, _> = hist.iter().map(|m| (m.seq, m)).collect();
    for (id, seq, cmid) in &acks {
        let m = by_seq[seq];
        assert_eq!(
            (&m.message_id, &m.content),
            (id, cmid),
            "ack not matched by store"
        );
    }
    assert!(hist.windows(2).all(|w| w[0].seq + 1 == w[1].seq));

    // The observer (on the same node) got every message once, in seq order whoever sent it:
    // exactly 1, 2, 3, … N.
    let mut expected_seq = 1;
    let mut seen = HashSet::new();
    while seen.len() < total {
        match next(&mut observer).await {
            Event::Message { message, .. } => {
                assert!(seen.insert(message.message_id), "delivered twice");
                assert_eq!(message.seq, expected_seq, "live delivery out of seq order");
                expected_seq += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn retried_send_returns_the_original_ids_and_creates_nothing() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let first = send_ok(&mut alice, conv, "same", "once").await;
    let again = send_ok(&mut alice, conv, "same", "once (retry)").await;
    assert_eq!(first, again);
    // A retry from another device of the same user is the same message too.
    let mut alice2 = h.connect("alice").await;
    let third = send_ok(&mut alice2, conv, "same", "once").await;
    assert_eq!(first, third);
    let hist = h.history("alice", conv).await;
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].content, "once");
    // Bob saw it once.
    assert!(matches!(next(&mut bob).await, Event::Message { .. }));
    expect_nothing(&mut bob).await;
    // The same key from someone else is a different message.
    let bobs = send_ok(&mut bob, conv, "same", "bob's").await;
    assert_ne!(bobs.0, first.0);
    assert_eq!(bobs.1, 2);
}

#[tokio::test]
async fn every_device_of_every_member_gets_the_message() {
    let h = Harness::new().await;
    let conv = h.group("alice", &["bob"]).await;
    let mut a1 = h.connect("alice").await;
    let mut a2 = h.connect("alice").await;
    let mut b1 = h.connect("bob").await;
    let mut b2 = h.connect("bob").await;
    let (id, _) = send_ok(&mut a1, conv, "k", "hi").await;
    for c in [&mut a2, &mut b1, &mut b2] {
        match next(c).await {
            Event::Message { message, .. } => assert_eq!(message.message_id, id),
            other => panic!("expected message, got {other:?}"),
        }
    }
    expect_nothing(&mut a1).await;
}

#[tokio::test]
async fn media_messages_and_replies_carry_their_metadata() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let (first, _) = send_ok(&mut alice, conv, "t", "look").await;
    let _ = next(&mut bob).await;
    let media = Media {
        url: "https://cdn.example.com/a.png".into(),
        mime: "image/png".into(),
        size: 1234,
        name: Some("a.png".into()),
    };
    alice
        .send(Command::Message(SendMessage {
            conversation_id: conv,
            client_msg_id: "img".into(),
            content: String::new(),
            kind: MessageKind::Image,
            media: Some(media.clone()),
            reply_to: Some(first),
        }))
        .await;
    expect(&mut alice, "ack", |e| matches!(e, Event::MessageAck { .. })).await;
    match next(&mut bob).await {
        Event::Message { message, .. } => {
            assert_eq!(message.kind, MessageKind::Image);
            assert_eq!(message.media, Some(media));
            assert_eq!(message.reply_to, Some(first));
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- errors keep the connection usable

#[tokio::test]
async fn bad_input_gets_typed_errors_and_the_connection_stays_usable() {
    let h = Harness::with(|c| c.max_message_bytes = 100).await;
    let conv = h.direct("alice", "bob").await;
    let strangers = h.direct("carol", "dave").await;
    let mut alice = h.connect("alice").await;

    let cases: Vec<(Command, ErrorCode)> = vec![
        (text(strangers, "x1", "hi"), ErrorCode::NotMember),
        (
            text(chat_core::ConversationId::from_raw(12345), "x2", "hi"),
            ErrorCode::NotFound,
        ),
        (text(conv, "x3", &"a".repeat(101)), ErrorCode::TooLarge),
        (text(conv, "", "no key"), ErrorCode::Invalid),
        (text(conv, &"k".repeat(65), "long key"), ErrorCode::Invalid),
        (text(conv, "x4", ""), ErrorCode::Invalid),
        (
            Command::Message(SendMessage {
                conversation_id: conv,
                client_msg_id: "x5".into(),
                content: "sys".into(),
                kind: MessageKind::System,
                media: None,
                reply_to: None,
            }),
            ErrorCode::Invalid,
        ),
        (
            Command::Message(SendMessage {
                conversation_id: conv,
                client_msg_id: "x6".into(),
                content: String::new(),
                kind: MessageKind::File,
                media: None,
                reply_to: None,
            }),
            ErrorCode::Invalid,
        ),
        (
            Command::Message(SendMessage {
                conversation_id: conv,
                client_msg_id: "x7".into(),
                content: String::new(),
                kind: MessageKind::Image,
                media: Some(Media {
                    url: "javascript:alert(1)".into(),
                    mime: "image/png".into(),
                    size: 1,
                    name: None,
                }),
                reply_to: None,
            }),
            ErrorCode::Invalid,
        ),
        (
            Command::Message(SendMessage {
                conversation_id: conv,
                client_msg_id: "x8".into(),
                content: "re: nothing".into(),
                kind: MessageKind::Text,
                media: None,
                reply_to: Some(chat_core::MessageId::from_raw(77)),
            }),
            ErrorCode::Invalid,
        ),
        (
            Command::Typing {
                conversation_id: strangers,
            },
            ErrorCode::NotMember,
        ),
        (
            Command::Read {
                conversation_id: strangers,
                seq: 1,
            },
            ErrorCode::NotMember,
        ),
        (
            Command::Edit {
                conversation_id: conv,
                message_id: chat_core::MessageId::from_raw(1),
                content: "e".into(),
            },
            ErrorCode::NotFound,
        ),
    ];
    for (cmd, code) in cases {
        let what = format!("{cmd:?}");
        let (got, message) = send_err(&mut alice, cmd).await;
        assert_eq!(got, code, "{what}: {message}");
        // Still usable after every error.
        let ok = send_ok(&mut alice, conv, &format!("ok-{}", rand_suffix()), "fine").await;
        assert!(ok.1 >= 1);
    }
    // Errors of a send carry its client_msg_id.
    alice.send(text(strangers, "mine", "x")).await;
    match next(&mut alice).await {
        Event::Error {
            code,
            client_msg_id,
            ..
        } => {
            assert_eq!(code, ErrorCode::NotMember);
            assert_eq!(client_msg_id.as_deref(), Some("mine"));
        }
        other => panic!("{other:?}"),
    }
    // Nothing the bad commands did reached the store.
    let hist = h.history("alice", conv).await;
    assert!(hist.iter().all(|m| m.content == "fine"));
    let stats = h.chat.stats();
    assert!(
        stats
            .errors
            .iter()
            .any(|(c, n)| *c == ErrorCode::Invalid && *n >= 5)
    );
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn rate_limit_counts_sends_edits_deletes_reactions_but_not_typing_receipts_or_refresh() {
    let h = Harness::with(|c| {
        c.rate_limit = Some(chat_core::hooks::RateLimitConfig {
            per_second: std::num::NonZeroU32::new(1).unwrap(),
            burst: std::num::NonZeroU32::new(3).unwrap(),
        });
        c.typing_throttle = std::time::Duration::ZERO;
    })
    .await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let (id, _) = send_ok(&mut alice, conv, "r1", "1").await;
    // A retry counts too.
    let _ = send_ok(&mut alice, conv, "r1", "1").await;
    alice
        .send(Command::Edit {
            conversation_id: conv,
            message_id: id,
            content: "edited".into(),
        })
        .await;
    expect(&mut alice, "edited", |e| {
        matches!(e, Event::MessageEdited { .. })
    })
    .await;
    // Burst of 3 used: the 4th is limited.
    let (code, _) = send_err(&mut alice, text(conv, "r2", "2")).await;
    assert_eq!(code, ErrorCode::RateLimited);
    let (code, _) = send_err(
        &mut alice,
        Command::Delete {
            conversation_id: conv,
            message_id: id,
        },
    )
    .await;
    assert_eq!(code, ErrorCode::RateLimited);
    // Reactions count too (each one is fanned out to every member device).
    for cmd in [
        Command::React {
            conversation_id: conv,
            message_id: id,
            key: "👍".into(),
        },
        Command::Unreact {
            conversation_id: conv,
            message_id: id,
        },
    ] {
        let (code, _) = send_err(&mut alice, cmd).await;
        assert_eq!(code, ErrorCode::RateLimited);
    }
    // `refresh` does not: it is answered on its own merits (this in-process session has no
    // token verifier), never with rate_limited.
    let (code, _) = send_err(&mut alice, Command::Refresh { token: "t".into() }).await;
    assert_ne!(code, ErrorCode::RateLimited);
    // Typing and receipts still work and are not limited.
    for _ in 0..10 {
        alice
            .send(Command::Typing {
                conversation_id: conv,
            })
            .await;
        alice
            .send(Command::Read {
                conversation_id: conv,
                seq: 1,
            })
            .await;
    }
    // Not limited: the first read moved the marker (alice's own device gets the receipt,
    // with its change-stream position); the other nine moved nothing.
    expect(&mut alice, "receipt", |e| {
        matches!(
            e,
            Event::Receipt {
                seq: 1,
                position: Some(_),
                ..
            }
        )
    })
    .await;
    expect_nothing(&mut alice).await;
    // Another user has their own bucket.
    let mut bob = h.connect("bob").await;
    send_ok(&mut bob, conv, "b1", "mine").await;
}

#[tokio::test]
async fn hooks_can_reject_and_rewrite_commands() {
    #[derive(Debug)]
    struct Moderation;
    #[async_trait::async_trait]
    impl chat_core::hooks::CommandHook for Moderation {
        async fn before(
            &self,
            _ctx: &chat_core::hooks::HookContext<'_>,
            cmd: &mut Command,
        ) -> chat_core::Result<()> {
            if let Command::Message(m) = cmd {
                if m.content.contains("forbidden") {
                    return Err(chat_core::Error::forbidden("moderated"));
                }
                m.content = m.content.replace("darn", "d**n");
            }
            Ok(())
        }
    }
    let h = Harness::from_builder(chat_core::Chat::builder().hook(Arc::new(Moderation))).await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let (code, _) = send_err(&mut alice, text(conv, "f", "forbidden word")).await;
    assert_eq!(code, ErrorCode::Forbidden);
    send_ok(&mut alice, conv, "d", "oh darn").await;
    let hist = h.history("alice", conv).await;
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].content, "oh d**n");
}

// ---------------------------------------------------------------- typing

#[tokio::test(start_paused = true)]
async fn typing_is_throttled_per_user_and_not_echoed() {
    let h = Harness::new().await;
    let conv = h.group("alice", &["bob", "carol"]).await;
    let mut a1 = h.connect("alice").await;
    let mut a2 = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let typing = Command::Typing {
        conversation_id: conv,
    };
    a1.send(typing.clone()).await;
    match next(&mut bob).await {
        Event::Typing {
            conversation_id,
            user_id,
        } => {
            assert_eq!(conversation_id, conv);
            assert_eq!(user_id, UserId::from("alice"));
        }
        other => panic!("{other:?}"),
    }
    // Inside the 3 s window: dropped, from either device.
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    a1.send(typing.clone()).await;
    a2.send(typing.clone()).await;
    assert!(bob.try_recv().is_none());
    // Never echoed to the typist's own devices.
    assert!(a1.try_recv().is_none());
    assert!(a2.try_recv().is_none());
    // Another user is throttled separately.
    let mut carol = h.connect("carol").await;
    carol.send(typing.clone()).await;
    assert!(
        matches!(next(&mut bob).await, Event::Typing { user_id, .. } if user_id == UserId::from("carol"))
    );
    // Sending a message resets the throttle: the next keystroke shows "typing" at once.
    send_ok(&mut a1, conv, "t1", "sent").await;
    let _ = next(&mut bob).await;
    let _ = next(&mut carol).await;
    a2.drain();
    a1.send(typing.clone()).await;
    assert!(
        matches!(next(&mut bob).await, Event::Typing { user_id, .. } if user_id == UserId::from("alice"))
    );
    assert!(
        matches!(next(&mut carol).await, Event::Typing { user_id, .. } if user_id == UserId::from("alice"))
    );
    // After the window, forwarded again.
    tokio::time::advance(std::time::Duration::from_millis(3100)).await;
    a2.send(typing).await;
    assert!(
        matches!(next(&mut bob).await, Event::Typing { user_id, .. } if user_id == UserId::from("alice"))
    );
    assert!(
        matches!(next(&mut carol).await, Event::Typing { user_id, .. } if user_id == UserId::from("alice"))
    );
}

// ---------------------------------------------------------------- receipts and unread

#[tokio::test]
async fn receipts_reach_other_members_and_the_readers_other_devices() {
    let h = Harness::new().await;
    let conv = h.group("alice", &["bob"]).await;
    let mut alice = h.connect("alice").await;
    let mut b1 = h.connect("bob").await;
    let mut b2 = h.connect("bob").await;
    for i in 0..3 {
        send_ok(&mut alice, conv, &format!("m{i}"), "x").await;
    }
    b1.drain();
    for _ in 0..3 {
        expect(&mut b2, "message", |e| matches!(e, Event::Message { .. })).await;
    }
    b1.send(Command::Delivered {
        conversation_id: conv,
        seq: 3,
    })
    .await;
    b1.send(Command::Read {
        conversation_id: conv,
        seq: 2,
    })
    .await;
    // Every member device, the reporting one too (positions: the messages took 1..=3).
    for c in [&mut alice, &mut b2, &mut b1] {
        let e1 = next(c).await;
        let e2 = next(c).await;
        assert_eq!(
            e1,
            Event::Receipt {
                conversation_id: conv,
                user_id: UserId::from("bob"),
                kind: ReceiptKind::Delivered,
                seq: 3,
                position: Some(4),
            }
        );
        assert_eq!(
            e2,
            Event::Receipt {
                conversation_id: conv,
                user_id: UserId::from("bob"),
                kind: ReceiptKind::Read,
                seq: 2,
                position: Some(5),
            }
        );
    }
    // Nothing else; a marker moving backwards sends nothing.
    expect_nothing(&mut b1).await;
    b2.send(Command::Read {
        conversation_id: conv,
        seq: 1,
    })
    .await;
    expect_nothing(&mut alice).await;
    // A seq above the last is clamped.
    b1.send(Command::Read {
        conversation_id: conv,
        seq: 1_000,
    })
    .await;
    match next(&mut alice).await {
        Event::Receipt { kind, seq, .. } => {
            assert_eq!((kind, seq), (ReceiptKind::Read, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unread_counts_others_messages_after_the_read_marker_minus_deleted() {
    let h = Harness::new().await;
    let conv = h.group("alice", &["bob"]).await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(send_ok(&mut alice, conv, &format!("a{i}"), "x").await.0);
    }
    send_ok(&mut bob, conv, "b0", "mine").await;
    let unread = |user: &'static str| {
        let chat = h.chat.clone();
        async move {
            chat.conversation_view(&UserId::from(user), conv)
                .await
                .unwrap()
                .unread
        }
    };
    assert_eq!(unread("bob").await, 4);
    assert_eq!(unread("alice").await, 1);
    bob.send(Command::Read {
        conversation_id: conv,
        seq: 2,
    })
    .await;
    assert_eq!(unread("bob").await, 2);
    alice
        .send(Command::Delete {
            conversation_id: conv,
            message_id: ids[3],
        })
        .await;
    assert_eq!(unread("bob").await, 1);
    // The list shows the same count.
    let list = h
        .chat
        .list_conversations(&UserId::from("bob"), None, 10)
        .await
        .unwrap();
    assert_eq!(list.items[0].unread, 1);
    bob.send(Command::Read {
        conversation_id: conv,
        seq: 5,
    })
    .await;
    assert_eq!(unread("bob").await, 0);
}

// ---------------------------------------------------------------- edits and deletes

#[tokio::test]
async fn edit_and_delete_are_sender_only_versioned_and_broadcast() {
    let h = Harness::new().await;
    let conv = h.group("alice", &["bob"]).await;
    let mut a1 = h.connect("alice").await;
    let mut a2 = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let (id, _) = send_ok(&mut a1, conv, "e", "first").await;
    a2.drain();
    let _ = next(&mut bob).await;

    a1.send(Command::Edit {
        conversation_id: conv,
        message_id: id,
        content: "second".into(),
    })
    .await;
    for c in [&mut a1, &mut a2, &mut bob] {
        match next(c).await {
            Event::MessageEdited { message, .. } => {
                assert_eq!(message.content, "second");
                assert_eq!(message.version, 2);
                assert!(message.edited_at.is_some());
            }
            other => panic!("{other:?}"),
        }
    }
    let (code, _) = send_err(
        &mut bob,
        Command::Edit {
            conversation_id: conv,
            message_id: id,
            content: "hijack".into(),
        },
    )
    .await;
    assert_eq!(code, ErrorCode::Forbidden);
    let (code, _) = send_err(
        &mut bob,
        Command::Delete {
            conversation_id: conv,
            message_id: id,
        },
    )
    .await;
    assert_eq!(code, ErrorCode::Forbidden);

    a2.send(Command::Delete {
        conversation_id: conv,
        message_id: id,
    })
    .await;
    match next(&mut bob).await {
        Event::MessageDeleted { message, .. } => {
            assert!(message.deleted);
            assert!(message.content.is_empty());
            assert_eq!(message.version, 3);
        }
        other => panic!("{other:?}"),
    }
    let hist = h.history("bob", conv).await;
    assert_eq!(hist.len(), 1);
    assert!(hist[0].deleted && hist[0].content.is_empty());
    // A deleted message cannot be edited back.
    let (code, _) = send_err(
        &mut a1,
        Command::Edit {
            conversation_id: conv,
            message_id: id,
            content: "zombie".into(),
        },
    )
    .await;
    assert_eq!(code, ErrorCode::Invalid);
}

// ---------------------------------------------------------------- sync

#[tokio::test]
async fn sync_after_a_missed_stretch_replays_everything_in_order() {
    let h = Harness::with(|c| c.sync_limit = 4).await;
    let conv = h.direct("alice", "bob").await;
    let other = h.group("alice", &["bob"]).await;
    let strangers = h.direct("carol", "dave").await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let (first, _) = send_ok(&mut alice, conv, "s0", "seen live").await;
    assert!(matches!(next(&mut bob).await, Event::Message { .. }));
    bob.close().await;

    let mut missed = Vec::new();
    for i in 1..=6 {
        missed.push(send_ok(&mut alice, conv, &format!("s{i}"), &format!("m{i}")).await);
    }
    send_ok(&mut alice, other, "o1", "other").await;
    alice
        .send(Command::Delete {
            conversation_id: conv,
            message_id: first,
        })
        .await;

    let mut bob = h.connect("bob").await;
    let mut cursor = BTreeMap::from([(conv, 1u64), (other, 0), (strangers, 0)]);
    let mut got = Vec::new();
    let mut errors = Vec::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        bob.send(Command::Sync {
            conversations: cursor.clone(),
            streams: Default::default(),
        })
        .await;
        let done = loop {
            match next(&mut bob).await {
                Event::Message { message, .. } => {
                    let c = cursor.get_mut(&message.conversation_id).unwrap();
                    assert_eq!(message.seq, *c + 1, "sync out of order or with a gap");
                    *c = message.seq;
                    got.push(message);
                }
                Event::Error { code, .. } => errors.push(code),
                Event::SyncDone {
                    conversations,
                    more,
                    ..
                } => break (conversations, more),
                other => panic!("{other:?}"),
            }
        };
        cursor.remove(&strangers);
        if done.1.is_empty() {
            assert_eq!(done.0.get(&conv), Some(&7));
            assert_eq!(done.0.get(&other), Some(&1));
            assert!(!done.0.contains_key(&strangers));
            break;
        }
        assert_eq!(done.1, vec![conv], "only the long conversation has more");
    }
    assert_eq!(
        rounds, 2,
        "6 missed messages with a limit of 4 take two rounds"
    );
    assert_eq!(errors, vec![ErrorCode::NotMember]);
    let replayed: Vec<_> = got
        .iter()
        .filter(|m| m.conversation_id == conv)
        .map(|m| (m.message_id, m.seq))
        .collect();
    assert_eq!(replayed, missed);
    // Sync from 0 includes the deleted first message as a tombstone.
    bob.send(Command::Sync {
        conversations: BTreeMap::from([(conv, 0)]),
        streams: Default::default(),
    })
    .await;
    match next(&mut bob).await {
        Event::Message { message, .. } => {
            assert_eq!(message.seq, 1);
            assert!(message.deleted && message.content.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn empty_sync_is_a_cheap_barrier() {
    let h = Harness::new().await;
    let mut alice = h.connect("alice").await;
    alice
        .send(Command::Sync {
            conversations: BTreeMap::new(),
            streams: Default::default(),
        })
        .await;
    assert_eq!(
        next(&mut alice).await,
        Event::SyncDone {
            conversations: BTreeMap::new(),
            more: vec![],
            streams: Default::default(),
        }
    );
}

// ---------------------------------------------------------------- presence

#[tokio::test(start_paused = true)]
async fn presence_goes_to_subscribers_only_and_offline_is_debounced() {
    let h = Harness::new().await;
    let mut alice = h.connect("alice").await;
    let mut carol = h.connect("carol").await;
    alice
        .send(Command::PresenceSubscribe {
            user_ids: vec![UserId::from("bob"), UserId::from("nobody")],
        })
        .await;
    let mut now = HashMap::new();
    for _ in 0..2 {
        match next(&mut alice).await {
            Event::Presence {
                user_id,
                status,
                last_seen,
            } => {
                now.insert(user_id, (status, last_seen));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        now[&UserId::from("nobody")],
        (chat_core::model::PresenceStatus::Offline, None)
    );

    let bob = h.connect("bob").await;
    match next(&mut alice).await {
        Event::Presence {
            user_id, status, ..
        } => {
            assert_eq!(user_id, UserId::from("bob"));
            assert_eq!(status, chat_core::model::PresenceStatus::Online);
        }
        other => panic!("{other:?}"),
    }
    bob.close().await;
    // Within the 30 s debounce: still online, nothing sent.
    tokio::time::sleep(std::time::Duration::from_secs(20)).await;
    assert!(alice.try_recv().is_none());
    tokio::time::sleep(std::time::Duration::from_secs(15)).await;
    match next(&mut alice).await {
        Event::Presence {
            user_id,
            status,
            last_seen,
        } => {
            assert_eq!(user_id, UserId::from("bob"));
            assert_eq!(status, chat_core::model::PresenceStatus::Offline);
            assert!(last_seen.is_some());
        }
        other => panic!("{other:?}"),
    }
    // Carol never subscribed: she got nothing.
    assert!(carol.try_recv().is_none());
}

// ---------------------------------------------------------------- conversations and members

#[tokio::test]
async fn conversations_list_by_activity_with_cursor() {
    let h = Harness::new().await;
    let mut convs = Vec::new();
    for i in 0..5 {
        convs.push(h.direct("alice", &format!("friend{i}")).await);
    }
    // The same pair again is the same conversation.
    assert_eq!(h.direct("friend2", "alice").await, convs[2]);
    let mut alice = h.connect("alice").await;
    for &i in &[3usize, 0, 4, 1] {
        send_ok(&mut alice, convs[i], &format!("c{i}"), "x").await;
    }
    // Most recent first: 1, 4, 0, 3, then 2 (no messages; ordered by creation).
    let expected = vec![convs[1], convs[4], convs[0], convs[3], convs[2]];
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = h
            .chat
            .list_conversations(&UserId::from("alice"), after, 2)
            .await
            .unwrap();
        assert!(page.items.len() <= 2);
        got.extend(page.items.iter().map(|v| v.conversation.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(got, expected);
    let bad = h
        .chat
        .list_conversations(&UserId::from("alice"), None, 0)
        .await;
    assert!(matches!(bad, Err(chat_core::Error::Invalid(_))));
}

#[tokio::test]
async fn members_are_managed_by_owners_and_admins_and_removed_members_see_nothing_new() {
    let h = Harness::new().await;
    let conv = h.group("owner", &["bob"]).await;
    let (owner_id, bob_id, carol_id) = (
        UserId::from("owner"),
        UserId::from("bob"),
        UserId::from("carol"),
    );
    // A plain member may not add.
    let err = h.chat.add_members(&bob_id, conv, &[carol_id.clone()]).await;
    assert!(matches!(err, Err(chat_core::Error::Forbidden(_))));
    let mut carol = h.connect("carol").await;
    let mut bob = h.connect("bob").await;
    let added = h
        .chat
        .add_members(&owner_id, conv, &[carol_id.clone(), bob_id.clone()])
        .await
        .unwrap();
    assert_eq!(added, vec![carol_id.clone()]);
    // Carol's devices and the other members learn about it.
    let joined = Event::Membership {
        conversation_id: conv,
        user_id: carol_id.clone(),
        change: chat_core::protocol::MembershipChange::Joined,
        position: Some(1),
    };
    assert_eq!(next(&mut carol).await, joined);
    assert_eq!(next(&mut bob).await, joined);
    // Carol was online when added: she gets live messages from now on.
    let mut owner = h.connect("owner").await;
    send_ok(&mut owner, conv, "1", "welcome").await;
    assert!(
        matches!(next(&mut carol).await, Event::Message { message, .. } if message.content == "welcome")
    );
    bob.drain();

    // Bob cannot remove carol; the owner can.
    assert!(matches!(
        h.chat.remove_member(&bob_id, conv, &carol_id).await,
        Err(chat_core::Error::Forbidden(_))
    ));
    assert!(
        h.chat
            .remove_member(&owner_id, conv, &carol_id)
            .await
            .unwrap()
    );
    let left = Event::Membership {
        conversation_id: conv,
        user_id: carol_id.clone(),
        change: chat_core::protocol::MembershipChange::Left,
        position: Some(3),
    };
    assert_eq!(next(&mut carol).await, left);
    assert_eq!(next(&mut bob).await, left);
    send_ok(&mut owner, conv, "2", "carol is gone").await;
    expect_nothing(&mut carol).await;
    let (code, _) = send_err(&mut carol, text(conv, "c", "let me in")).await;
    assert_eq!(code, ErrorCode::NotMember);
    assert!(matches!(
        h.chat.history(&carol_id, conv, None, 10).await,
        Err(chat_core::Error::NotMember(_))
    ));
    // Anyone may leave.
    assert!(h.chat.remove_member(&bob_id, conv, &bob_id).await.unwrap());
    // Direct conversations have fixed members.
    let d = h.direct("owner", "bob").await;
    assert!(matches!(
        h.chat.add_members(&owner_id, d, &[carol_id]).await,
        Err(chat_core::Error::Invalid(_))
    ));
}

#[tokio::test]
async fn history_pages_walk_back_to_the_first_message() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let alice_id = UserId::from("alice");
    let empty = h.chat.history(&alice_id, conv, None, 50).await.unwrap();
    assert!(empty.items.is_empty() && empty.next.is_none());
    let mut alice = h.connect("alice").await;
    for i in 0..10 {
        send_ok(&mut alice, conv, &format!("h{i}"), &i.to_string()).await;
    }
    let p1 = h.chat.history(&alice_id, conv, None, 4).await.unwrap();
    assert_eq!(
        p1.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![10, 9, 8, 7]
    );
    assert_eq!(p1.next, Some(7));
    let p2 = h.chat.history(&alice_id, conv, p1.next, 4).await.unwrap();
    assert_eq!(
        p2.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![6, 5, 4, 3]
    );
    let p3 = h.chat.history(&alice_id, conv, p2.next, 4).await.unwrap();
    assert_eq!(
        p3.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(p3.next, None);
    // Exact multiple: the page that ends at seq 1 has no next.
    let p = h.chat.history(&alice_id, conv, Some(5), 4).await.unwrap();
    assert_eq!(p.next, None);
    assert!(matches!(
        h.chat.history(&UserId::from("eve"), conv, None, 4).await,
        Err(chat_core::Error::NotMember(_))
    ));
    assert!(matches!(
        h.chat
            .history(&alice_id, chat_core::ConversationId::from_raw(1), None, 4)
            .await,
        Err(chat_core::Error::NotFound(_))
    ));
}

// ---------------------------------------------------------------- bounded memory

#[tokio::test]
async fn a_slow_consumer_is_disconnected_while_others_keep_receiving() {
    let h = Harness::with(|c| {
        c.outbound_queue = 8;
        c.rate_limit = None;
    })
    .await;
    let conv = h.group("alice", &["slow", "fast"]).await;
    let mut alice = h.connect("alice").await;
    let slow = h.connect("slow").await;
    let mut fast = h.connect("fast").await;
    for i in 0..20 {
        send_ok(&mut alice, conv, &format!("m{i}"), "x").await;
        match next(&mut fast).await {
            Event::Message { message, .. } => assert_eq!(message.seq, i + 1),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        slow.close_reason(),
        Some(chat_core::CloseReason::SlowConsumer)
    );
    assert_eq!(h.chat.stats().slow_consumers, 1);
    // The engine unregisters it by itself (no help from the transport needed).
    let gone = async {
        while h.chat.is_connected_here(&UserId::from("slow")) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, gone)
        .await
        .expect("slow consumer still registered");
}

#[tokio::test]
async fn replies_and_fan_out_share_one_ordered_queue_with_separate_bounds() {
    let h = Harness::with(|c| {
        c.outbound_queue = 4;
        c.reply_queue = 32;
        c.rate_limit = None;
    })
    .await;
    let conv = h.group("alice", &["busy"]).await;
    let mut alice = h.connect("alice").await;
    let mut busy = h.connect("busy").await;
    // `busy` sends 20 messages without reading: 20 acks queued, within its reply share and
    // far beyond the fan-out share; that is not a slow consumer.
    for i in 0..20 {
        busy.send(text(conv, &format!("b{i}"), "x")).await;
        match next(&mut alice).await {
            Event::Message { message, .. } => assert_eq!(message.seq, i + 1),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(busy.close_reason(), None);
    // Fan-out has its own share: exactly `outbound_queue` frames fit…
    for i in 0..4 {
        send_ok(&mut alice, conv, &format!("a{i}"), "y").await;
    }
    assert_eq!(busy.close_reason(), None);
    // …and everything comes out in the order it was queued: the acks, then the messages.
    let got: Vec<Event> = busy.drain();
    let acks: Vec<u64> = got
        .iter()
        .filter_map(|e| match e {
            Event::MessageAck { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(acks, (1..=20).collect::<Vec<_>>());
    let live: Vec<u64> = got
        .iter()
        .filter_map(|e| match e {
            Event::Message { message, .. } => Some(message.seq),
            _ => None,
        })
        .collect();
    assert_eq!(live, vec![21, 22, 23, 24]);
    assert!(matches!(got[19], Event::MessageAck { seq: 20, .. }));
    // Taking frames frees their slots: another 4 fit, the 5th does not.
    for i in 4..8 {
        send_ok(&mut alice, conv, &format!("a{i}"), "y").await;
    }
    assert_eq!(busy.close_reason(), None);
    send_ok(&mut alice, conv, "a8", "y").await;
    assert_eq!(
        busy.close_reason(),
        Some(chat_core::CloseReason::SlowConsumer)
    );
}

#[tokio::test]
async fn a_reply_beyond_reply_queue_waits_for_the_client_to_read() {
    let h = Harness::with(|c| {
        c.reply_queue = 2;
        c.rate_limit = None;
    })
    .await;
    let conv = h.group("alice", &["bob"]).await;
    let mut alice = h.connect("alice").await;
    alice.send(text(conv, "m0", "x")).await;
    alice.send(text(conv, "m1", "x")).await;
    // The third ack has no slot: the command loop waits (nothing is dropped, nothing closed).
    let third = tokio::time::timeout(QUIET, alice.session().handle(text(conv, "m2", "x"))).await;
    assert!(third.is_err(), "the third reply did not wait");
    assert_eq!(alice.close_reason(), None);
    assert!(matches!(
        next(&mut alice).await,
        Event::MessageAck { seq: 1, .. }
    ));
    // Room again: the next command's reply goes through.
    tokio::time::timeout(WAIT, alice.session().handle(text(conv, "m3", "x")))
        .await
        .expect("reply slot freed");
    let rest: Vec<String> = alice
        .drain()
        .into_iter()
        .filter_map(|e| match e {
            Event::MessageAck { client_msg_id, .. } => Some(client_msg_id),
            _ => None,
        })
        .collect();
    // m2's send was abandoned while it waited for its ack slot (the message itself was stored:
    // a retry with the same client_msg_id gets its ack).
    assert_eq!(rest, vec!["m1", "m3"]);
}

// ---------------------------------------------------------------- push

#[tokio::test(start_paused = true)]
async fn offline_members_get_one_coalesced_push() {
    #[derive(Debug, Default)]
    struct Collect(std::sync::Mutex<Vec<chat_core::push::PushNotification>>);
    #[async_trait::async_trait]
    impl chat_core::push::PushNotifier for Collect {
        async fn notify(&self, batch: Vec<chat_core::push::PushNotification>) {
            self.0.lock().unwrap().extend(batch);
        }
    }
    let pushes = Arc::new(Collect::default());
    let h = Harness::from_builder(chat_core::Chat::builder().push_notifier(pushes.clone())).await;
    let conv = h.group("alice", &["online", "offline"]).await;
    let mut alice = h.connect("alice").await;
    let _online = h.connect("online").await;
    for i in 0..3 {
        send_ok(&mut alice, conv, &format!("p{i}"), &format!("n{i}")).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let got = pushes.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].user_id, UserId::from("offline"));
    assert_eq!(got[0].conversation_id, conv);
    assert_eq!(got[0].count, 3);
    assert_eq!(got[0].latest.content, "n2");
}

// ---------------------------------------------------------------- shutdown

#[tokio::test]
async fn shutdown_closes_connections_and_refuses_new_ones() {
    let h = Harness::new().await;
    let mut alice = h.connect("alice").await;
    h.chat.shutdown();
    assert!(alice.recv().await.is_none() || alice.close_reason().is_some());
    assert_eq!(alice.close_reason(), Some(chat_core::CloseReason::Shutdown));
    assert!(matches!(
        h.transport.connect("bob").await,
        Err(chat_core::Error::Shutdown)
    ));
}

#[tokio::test]
async fn presence_unsubscribe_stops_updates_and_limits_are_enforced() {
    let h = Harness::with(|c| c.max_presence_watch = 3).await;
    let mut alice = h.connect("alice").await;
    alice
        .send(Command::PresenceSubscribe {
            user_ids: vec![UserId::from("bob")],
        })
        .await;
    assert!(matches!(next(&mut alice).await, Event::Presence { .. }));
    alice
        .send(Command::PresenceSubscribe {
            user_ids: vec![UserId::from("carol")],
        })
        .await;
    assert!(matches!(next(&mut alice).await, Event::Presence { .. }));
    alice
        .send(Command::PresenceUnsubscribe {
            user_ids: vec![UserId::from("bob")],
        })
        .await;
    // Bob comes online, then carol: presence changes reach watchers in order, so carol's
    // arriving first proves bob's was not sent (no sleep needed).
    let _bob = h.connect("bob").await;
    let _carol = h.connect("carol").await;
    match next(&mut alice).await {
        Event::Presence { user_id, .. } => assert_eq!(user_id, UserId::from("carol")),
        other => panic!("expected carol's presence, got {other:?}"),
    }
    // More users than a connection may watch: a typed error, the connection stays usable.
    let (code, _) = send_err(
        &mut alice,
        Command::PresenceSubscribe {
            user_ids: ["a", "b", "c", "d"]
                .iter()
                .map(|u| UserId::from(*u))
                .collect(),
        },
    )
    .await;
    assert_eq!(code, ErrorCode::Invalid);
    let (code, _) = send_err(
        &mut alice,
        Command::PresenceSubscribe {
            user_ids: vec![UserId::from("")],
        },
    )
    .await;
    assert_eq!(code, ErrorCode::Invalid);
    alice
        .send(Command::Sync {
            conversations: BTreeMap::new(),
            streams: Default::default(),
        })
        .await;
    assert!(matches!(next(&mut alice).await, Event::SyncDone { .. }));
}

#[tokio::test]
async fn members_learn_about_a_new_conversation_without_polling() {
    let h = Harness::new().await;
    let mut bob = h.connect("bob").await;
    let mut carol = h.connect("carol").await;
    let conv = h.group("alice", &["bob", "carol"]).await;
    for (client, who) in [(&mut bob, "bob"), (&mut carol, "carol")] {
        assert_eq!(
            next(client).await,
            Event::Membership {
                conversation_id: conv,
                user_id: UserId::from(who),
                change: chat_core::protocol::MembershipChange::Joined,
                position: None,
            }
        );
        // Only their own joining, not every other member's (O(members) per device, not O(n²)).
        expect_nothing(client).await;
    }
    // The same direct conversation again announces nothing new.
    let d = h.direct("bob", "carol").await;
    assert!(matches!(next(&mut bob).await, Event::Membership { .. }));
    assert!(matches!(next(&mut carol).await, Event::Membership { .. }));
    assert_eq!(h.direct("carol", "bob").await, d);
    expect_nothing(&mut bob).await;
}

#[tokio::test]
async fn an_outbound_waker_queues_at_most_one_wake_up_however_often_it_is_called() {
    let chat = chat_core::Chat::builder().build().await.unwrap();
    let (session, mut outbound) = chat.connect(UserId::from("w")).await.unwrap();
    let waker = session.outbound_waker();
    for _ in 0..10_000 {
        assert!(waker.wake());
    }
    let mut buf = Vec::new();
    assert_eq!(
        outbound.recv_batch(&mut buf, 16).await,
        chat_core::transport::Batch::Frames(0)
    );
    assert!(outbound.is_empty(), "more than one wake-up was queued");
    // Taken: the next wake queues one again.
    assert!(waker.wake());
    assert!(!outbound.is_empty());
    drop(session);
    drop(outbound);
    // Gone: waking reports it.
    tokio::task::yield_now().await;
    assert!(!waker.wake());
}

// ---------------------------------------------------------------- host API and observers

#[tokio::test]
async fn the_host_posts_a_system_message_that_every_member_device_gets_once() {
    let h = Harness::new().await;
    let conv = h.group("alice", &["bob"]).await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    let notice = SendMessage::system(conv, "welcome-1", "Welcome, Bob!");
    let posted = h
        .chat
        .post_message(&UserId::from("alice"), notice.clone())
        .await
        .unwrap();
    assert_eq!((posted.seq, posted.kind), (1, MessageKind::System));
    // Every member device, the posting user's own included (there is no sending socket).
    for c in [&mut alice, &mut bob] {
        match next(c).await {
            Event::Message { message, .. } => assert_eq!(message, posted),
            other => panic!("expected the notice, got {other:?}"),
        }
    }
    // Idempotent like a client's send: the retry returns the original, nothing new goes out.
    let again = h
        .chat
        .post_message(&UserId::from("alice"), notice)
        .await
        .unwrap();
    assert_eq!(again.message_id, posted.message_id);
    expect_nothing(&mut bob).await;
    assert_eq!(h.history("bob", conv).await.len(), 1);
    // A client may not send one; a non-member may not post one.
    let (code, _) = send_err(
        &mut bob,
        Command::Message(SendMessage::system(conv, "s-1", "I am the system")),
    )
    .await;
    assert_eq!(code, ErrorCode::Invalid);
    let err = h
        .chat
        .post_message(
            &UserId::from("mallory"),
            SendMessage::text(conv, "m-1", "hi"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotMember);
    // The host's messages meet the same limits as a client's (here: the idempotency key).
    let err = h
        .chat
        .post_message(&UserId::from("alice"), SendMessage::system(conv, "", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Invalid);
}

#[tokio::test]
async fn a_store_outage_while_checking_reply_to_is_reported_as_the_outage() {
    let store = Arc::new(FaultStore::default());
    let h = Harness::from_builder(chat_core::Chat::builder().store(store.clone())).await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let (first, _) = send_ok(&mut alice, conv, "r0", "first").await;
    store
        .fail_message_reads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let reply = SendMessage::text(conv, "r1", "a reply").reply_to(first);
    let (code, _) = send_err(&mut alice, Command::Message(reply.clone())).await;
    assert_eq!(code, ErrorCode::Internal, "an outage is not bad input");
    store
        .fail_message_reads
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // Back: the same send goes through, and a reply to nothing is bad input.
    let (_, seq) = send_ok(&mut alice, conv, "r1", "a reply").await;
    assert_eq!(seq, 2);
    let bogus = SendMessage::text(conv, "r2", "?").reply_to(chat_core::MessageId::from_raw(7));
    let (code, _) = send_err(&mut alice, Command::Message(bogus)).await;
    assert_eq!(code, ErrorCode::Invalid);
}

/// An observer that records what it saw.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl chat_core::engine::EngineObserver for Recorder {
    fn observe(&self, event: &chat_core::engine::EngineEvent<'_>) {
        use chat_core::engine::EngineEvent as E;
        let line = match event {
            E::Connected { user, .. } => format!("connected {user}"),
            E::Disconnected { .. } => "disconnected".into(),
            E::Command { .. } => "command".into(),
            E::CommandFailed { error, .. } => format!("failed {}", error.code().as_str()),
            E::MessageStored { message } => format!("stored {}", message.seq),
            E::Delivered { frames, .. } => format!("delivered {frames}"),
            E::Replied { .. } => "replied".into(),
            E::SlowConsumer { user, .. } => format!("slow {user}"),
            E::RouterError { .. } => "router error".into(),
            _ => "other".into(),
        };
        self.0.lock().unwrap().push(line);
    }
}

#[tokio::test]
async fn observers_see_what_the_engine_does_and_agree_with_its_counters() {
    let recorder = Arc::new(Recorder::default());
    let h = Harness::from_builder(chat_core::Chat::builder().observer(recorder.clone())).await;
    let conv = h.direct("alice", "bob").await;
    let mut alice = h.connect("alice").await;
    let _bob = h.connect("bob").await;
    recorder.0.lock().unwrap().clear();
    send_ok(&mut alice, conv, "o1", "hi").await;
    send_err(&mut alice, text(conv, "", "no id")).await;
    let seen = recorder.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "command",
            "stored 1",
            "delivered 1",
            "replied",
            "command",
            "failed invalid",
            "replied"
        ],
        "{seen:?}"
    );
    let stats = h.chat.stats();
    assert_eq!((stats.messages_sent, stats.deliveries), (1, 1));
    let invalid = stats
        .errors
        .iter()
        .find(|(c, _)| *c == ErrorCode::Invalid)
        .map(|(_, n)| *n);
    assert_eq!(invalid, Some(1));
}
