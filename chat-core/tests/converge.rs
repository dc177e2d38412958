//! The convergence property: random interleavings of sends, edits, deletes, reactions,
//! receipts, member changes, disconnects and reconnect+syncs over six devices of three users;
//! after a final sync every device's view of the conversation is the same, and its messages
//! are the store's (latest versions, reactions included).
//!
//! `cargo test -p chat-core --test converge` (`PROPTEST_CASES` for more cases).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chat_core::memory::InProcessClient;
use chat_core::model::{MessageKind, NewMessage};
use chat_core::protocol::SyncFrom;
use chat_core::{Command, ConversationId, Event, MessageStore, UserId};
use chat_testkit::view::View;
use common::*;
use proptest::prelude::*;

const USERS: [&str; 3] = ["ann", "ben", "cat"];
const KEYS: [&str; 3] = ["👍", "🎉", "❤️"];

#[derive(Clone, Debug)]
enum Op {
    Send(usize),
    Edit(usize, usize),
    Delete(usize, usize),
    React(usize, usize, Option<usize>),
    Read(usize, u8),
    Delivered(usize, u8),
    /// Disconnect a connected device; reconnect and sync a disconnected one.
    Toggle(usize),
    /// The owner adds or removes "dan".
    Dan,
}

fn op() -> impl Strategy<Value = Op> {
    let user = 0..USERS.len();
    prop_oneof![
        4 => user.clone().prop_map(Op::Send),
        2 => (user.clone(), any::<usize>()).prop_map(|(u, n)| Op::Edit(u, n)),
        1 => (user.clone(), any::<usize>()).prop_map(|(u, n)| Op::Delete(u, n)),
        3 => (user.clone(), any::<usize>(), proptest::option::of(0..KEYS.len()))
            .prop_map(|(u, n, k)| Op::React(u, n, k)),
        2 => (user.clone(), any::<u8>()).prop_map(|(u, s)| Op::Read(u, s)),
        1 => (user, any::<u8>()).prop_map(|(u, s)| Op::Delivered(u, s)),
        3 => (0..USERS.len() * 2).prop_map(Op::Toggle),
        1 => Just(Op::Dan),
    ]
}

struct Device {
    user: usize,
    client: Option<InProcessClient>,
    view: View,
}

impl Device {
    /// Applies every frame queued for the device (nothing when disconnected: lost).
    fn pump(&mut self) {
        if let Some(c) = &mut self.client {
            for e in c.drain() {
                self.view.apply(&serde_json::to_value(&e).unwrap());
            }
        }
    }
}

/// A `streams` sync from the device's view, following `more`, applying the replay.
async fn sync(device: &mut Device, conv: ConversationId) {
    let key = conv.to_string();
    for _ in 0..1000 {
        device.view.begin_sync(&key);
        let c = device.view.conversation(&key);
        let epoch = c.epoch.as_deref().map(|e| e.parse().unwrap());
        let client = device.client.as_mut().unwrap();
        client
            .send(Command::Sync {
                conversations: Default::default(),
                streams: [(
                    conv,
                    SyncFrom {
                        epoch,
                        position: c.position,
                    },
                )]
                .into(),
            })
            .await;
        let more = loop {
            let e = next(client).await;
            device.view.apply(&serde_json::to_value(&e).unwrap());
            if let Event::SyncDone { more, .. } = e {
                break more.contains(&conv);
            }
        };
        if !more {
            return;
        }
    }
    panic!("sync never ended");
}

async fn run(ops: Vec<Op>) {
    // A small sync page, so replays page.
    let h = Harness::with(|c| {
        c.sync_limit = 4;
        c.rate_limit = None;
    })
    .await;
    let conv = h.group(USERS[0], &USERS[1..]).await;
    let mut devices = Vec::new();
    for d in 0..USERS.len() * 2 {
        let user = d % USERS.len();
        devices.push(Device {
            user,
            client: Some(h.connect(USERS[user]).await),
            view: View::default(),
        });
    }
    let owner = UserId::from(USERS[0]);
    let dan = UserId::from("dan");
    let mut dan_in = false;
    let mut sent: Vec<Vec<chat_core::MessageId>> = vec![Vec::new(); USERS.len()];
    let mut all_sent = Vec::new();
    let mut counter = 0;
    for op in ops {
        // Commands go through a connected device of the user, if any (else skipped).
        let actor = |devices: &mut Vec<Device>, user: usize| {
            devices
                .iter()
                .position(|d| d.user == user && d.client.is_some())
        };
        match op {
            Op::Send(u) => {
                if let Some(d) = actor(&mut devices, u) {
                    counter += 1;
                    let c = devices[d].client.as_mut().unwrap();
                    c.send(text(conv, &format!("k{counter}"), &format!("m{counter}")))
                        .await;
                    let ack = expect(c, "ack", |e| matches!(e, Event::MessageAck { .. })).await;
                    let Event::MessageAck {
                        message_id,
                        seq,
                        timestamp,
                        position,
                        ..
                    } = ack
                    else {
                        unreachable!()
                    };
                    // The sending device knows its message from what it sent and the ack
                    // (it gets no `message` frame for it), as a client's outbox does.
                    let own = NewMessage {
                        message_id,
                        conversation_id: conv,
                        sender_id: UserId::from(USERS[u]),
                        client_msg_id: format!("k{counter}"),
                        kind: MessageKind::Text,
                        content: format!("m{counter}"),
                        media: None,
                        reply_to: None,
                        created_at: timestamp,
                    }
                    .into_message(seq);
                    let frame = Event::Message {
                        message: own,
                        position,
                    };
                    devices[d]
                        .view
                        .apply(&serde_json::to_value(&frame).unwrap());
                    sent[u].push(message_id);
                    all_sent.push(message_id);
                }
            }
            Op::Edit(u, n) | Op::Delete(u, n) if !sent[u].is_empty() => {
                if let Some(d) = actor(&mut devices, u) {
                    let message_id = sent[u][n % sent[u].len()];
                    counter += 1;
                    let cmd = if matches!(op, Op::Edit(..)) {
                        Command::Edit {
                            conversation_id: conv,
                            message_id,
                            content: format!("edit {counter}"),
                        }
                    } else {
                        Command::Delete {
                            conversation_id: conv,
                            message_id,
                        }
                    };
                    devices[d].client.as_ref().unwrap().send(cmd).await;
                }
            }
            Op::React(u, n, key) if !all_sent.is_empty() => {
                if let Some(d) = actor(&mut devices, u) {
                    let message_id = all_sent[n % all_sent.len()];
                    let cmd = match key {
                        Some(k) => Command::React {
                            conversation_id: conv,
                            message_id,
                            key: KEYS[k].into(),
                        },
                        None => Command::Unreact {
                            conversation_id: conv,
                            message_id,
                        },
                    };
                    devices[d].client.as_ref().unwrap().send(cmd).await;
                }
            }
            Op::Read(u, s) | Op::Delivered(u, s) => {
                if let Some(d) = actor(&mut devices, u) {
                    let seq = u64::from(s) % (all_sent.len() as u64 + 2);
                    let cmd = if matches!(op, Op::Read(..)) {
                        Command::Read {
                            conversation_id: conv,
                            seq,
                        }
                    } else {
                        Command::Delivered {
                            conversation_id: conv,
                            seq,
                        }
                    };
                    devices[d].client.as_ref().unwrap().send(cmd).await;
                }
            }
            Op::Toggle(d) => {
                if let Some(c) = devices[d].client.take() {
                    devices[d].pump_into_nothing(c).await;
                } else {
                    devices[d].client = Some(h.connect(USERS[devices[d].user]).await);
                    sync(&mut devices[d], conv).await;
                }
            }
            Op::Dan => {
                if dan_in {
                    h.chat.remove_member(&owner, conv, &dan).await.unwrap();
                } else {
                    h.chat
                        .add_members(&owner, conv, std::slice::from_ref(&dan))
                        .await
                        .unwrap();
                }
                dan_in = !dan_in;
            }
            _ => {}
        }
        for d in &mut devices {
            d.pump();
        }
    }
    // Everyone back, one final sync each.
    for d in &mut devices {
        if d.client.is_none() {
            d.client = Some(h.connect(USERS[d.user]).await);
        }
        sync(d, conv).await;
    }
    let key = conv.to_string();
    let head = h.chat.store().stream(conv).await.unwrap().unwrap();
    let reference = devices[0].view.conversation(&key);
    for (i, d) in devices.iter().enumerate() {
        let v = d.view.conversation(&key);
        assert_eq!(
            v.state(),
            reference.state(),
            "device {i} differs from device 0"
        );
        assert_eq!(v.resets, 0, "no reset expected within max_catch_up");
        assert_eq!(
            v.gaps, 0,
            "device {i}: a connected device sees every position"
        );
        assert_eq!(v.position, head.position, "device {i} reached the head");
    }
    // The views hold what the store holds.
    let stored = h.history(USERS[0], conv).await;
    assert_eq!(reference.messages.len(), stored.len(), "every message once");
    for m in stored {
        assert_eq!(
            reference.messages[&m.message_id.to_string()],
            serde_json::to_value(&m).unwrap(),
            "message {} at its latest version",
            m.seq
        );
    }
    let conversation = h
        .chat
        .conversation_view(&owner, conv)
        .await
        .unwrap()
        .conversation;
    for (user, (delivered, read)) in &reference.markers {
        let m = conversation
            .member(&UserId::from(user.as_str()))
            .expect("markers of a member");
        assert_eq!(
            (m.last_delivered_seq, m.last_read_seq),
            (*delivered, *read),
            "{user}"
        );
    }
}

impl Device {
    /// A disconnect: what was queued but not yet read is lost with the socket.
    async fn pump_into_nothing(&mut self, client: InProcessClient) {
        client.close().await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_device_converges_after_a_final_sync(ops in proptest::collection::vec(op(), 1..60)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops));
    }
}
