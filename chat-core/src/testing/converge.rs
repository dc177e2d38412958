//! The convergence property, for every store that keeps a change stream (feature `testing`):
//! random interleavings of sends, edits, deletes, reactions, receipts, member changes,
//! disconnects and reconnect + `streams` syncs over six devices of three users, through a
//! real engine and the in-process transport. After a final sync, every device's view of the
//! conversation equals every other's and the store's; no connected device ever saw a position
//! gap; every device reached the stream's head.
//!
//! A device's view is built only from the frames it received ([`DeviceView`]), by the rules of
//! `docs/protocol.md` §9. Run it with [`check`] (a store factory, a number of cases; a
//! failure prints the shortest sequence of steps that still fails), or [`run`] on sequences
//! from [`ops`] with your own proptest runner:
//!
//! ```no_run
//! use std::sync::Arc;
//! use chat_core::store::DynMessageStore;
//! use chat_core::testing::converge;
//!
//! // A plain #[test] (not async): `check` runs its own tokio runtime.
//! converge::check(16, || async {
//!     (Arc::new(chat_core::memory::MemoryStore::new()) as DynMessageStore, ())
//! });
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use proptest::prelude::*;

use crate::engine::Chat;
use crate::id::{ConversationId, MessageId, UserId};
use crate::memory::{InProcessClient, InProcessTransport};
use crate::model::{ConversationKind, Message, MessageKind, NewMessage, ReceiptKind};
use crate::protocol::{Command, Event, MembershipChange, SyncFrom};
use crate::store::{DynMessageStore, MessageStore};

const USERS: [&str; 3] = ["ann", "ben", "cat"];
const DEVICES: usize = USERS.len() * 2;
const KEYS: [&str; 3] = ["👍", "🎉", "❤️"];
const WAIT: Duration = Duration::from_secs(10);

/// One step of a run.
#[derive(Clone, Debug)]
pub enum Op {
    /// A user sends a message (through one of their connected devices).
    Send(usize),
    /// A user edits one of their messages.
    Edit(usize, usize),
    /// A user deletes one of their messages.
    Delete(usize, usize),
    /// A user reacts to a message (`None`: removes their reaction).
    React(usize, usize, Option<usize>),
    /// A user reads up to a seq.
    Read(usize, u8),
    /// A user's device reports delivery up to a seq.
    Delivered(usize, u8),
    /// A device disconnects (its queued frames are lost), or reconnects and syncs.
    Toggle(usize),
    /// The owner adds "dan", or removes him.
    Dan,
}

/// Sequences of 1..60 steps.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    let user = 0..USERS.len();
    let op = prop_oneof![
        4 => user.clone().prop_map(Op::Send),
        2 => (user.clone(), any::<usize>()).prop_map(|(u, n)| Op::Edit(u, n)),
        1 => (user.clone(), any::<usize>()).prop_map(|(u, n)| Op::Delete(u, n)),
        3 => (user.clone(), any::<usize>(), proptest::option::of(0..KEYS.len()))
            .prop_map(|(u, n, k)| Op::React(u, n, k)),
        2 => (user.clone(), any::<u8>()).prop_map(|(u, s)| Op::Read(u, s)),
        1 => (user, any::<u8>()).prop_map(|(u, s)| Op::Delivered(u, s)),
        3 => (0..DEVICES).prop_map(Op::Toggle),
        1 => Just(Op::Dan),
    ];
    proptest::collection::vec(op, 1..60)
}

/// What one device knows of the conversation, from the frames it received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceView {
    /// Messages by id, at the highest version seen (a frame of the same version replaces).
    pub messages: BTreeMap<MessageId, Message>,
    /// Per member: (delivered, read).
    pub markers: BTreeMap<UserId, (u64, u64)>,
    /// Per user with a membership change: member now.
    pub members: BTreeMap<UserId, bool>,
    /// The stream epoch, from `sync_done`.
    pub epoch: Option<u64>,
    /// The last position applied contiguously.
    pub position: u64,
    /// Live frames that skipped positions.
    pub gaps: u32,
    /// `reset`s received.
    pub resets: u32,
    /// A `streams` sync is in flight (its frames are a compacted replay).
    pub syncing: bool,
}

impl DeviceView {
    fn see(&mut self, position: Option<u64>) {
        match position {
            _ if self.syncing => {}
            Some(p) if p == self.position + 1 => self.position = p,
            Some(p) if p > self.position + 1 => self.gaps += 1,
            _ => {}
        }
    }

    fn upsert(&mut self, m: &Message) {
        let newer = self
            .messages
            .get(&m.message_id)
            .is_none_or(|old| old.version <= m.version);
        if newer {
            self.messages.insert(m.message_id, m.clone());
        }
    }

    /// Applies one frame of the conversation (the driver only runs one conversation).
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Message { message, position }
            | Event::MessageEdited { message, position }
            | Event::MessageDeleted { message, position } => {
                self.see(*position);
                self.upsert(message);
            }
            Event::Reaction {
                message_id,
                reactions,
                position,
                ..
            } => {
                self.see(*position);
                if let Some(m) = self.messages.get_mut(message_id) {
                    m.reactions.clone_from(reactions);
                }
            }
            Event::Receipt {
                user_id,
                kind,
                seq,
                position,
                ..
            } => {
                self.see(*position);
                let (delivered, read) = self.markers.entry(user_id.clone()).or_default();
                if *kind == ReceiptKind::Read {
                    *read = (*read).max(*seq);
                }
                *delivered = (*delivered).max(*seq).max(*read);
            }
            Event::Membership {
                user_id,
                change,
                position,
                ..
            } => {
                self.see(*position);
                self.members
                    .insert(user_id.clone(), *change == MembershipChange::Joined);
            }
            Event::Reset { stream, .. } => {
                *self = Self {
                    epoch: Some(stream.epoch),
                    position: stream.position,
                    resets: self.resets + 1,
                    ..Self::default()
                };
            }
            Event::SyncDone { streams, .. } => {
                if let Some(s) = streams.values().next() {
                    self.epoch = Some(s.epoch);
                    self.position = s.position;
                    self.syncing = false;
                }
            }
            _ => {}
        }
    }

    /// What two converged devices share.
    pub fn state(&self) -> StateRef<'_> {
        (&self.messages, &self.markers, &self.members)
    }
}

/// What [`DeviceView::state`] compares.
pub type StateRef<'a> = (
    &'a BTreeMap<MessageId, Message>,
    &'a BTreeMap<UserId, (u64, u64)>,
    &'a BTreeMap<UserId, bool>,
);

struct Device {
    user: usize,
    client: Option<InProcessClient>,
    view: DeviceView,
}

impl Device {
    /// Applies every frame queued for the device.
    fn pump(&mut self) {
        if let Some(c) = &mut self.client {
            for e in c.drain() {
                self.view.apply(&e);
            }
        }
    }
}

async fn recv(client: &mut InProcessClient) -> Event {
    tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("a reply within the wait")
        .expect("the connection is open")
}

/// A `streams` sync from the device's view, following `more`.
async fn sync(device: &mut Device, conv: ConversationId) {
    for _ in 0..1000 {
        device.view.syncing = true;
        let client = device.client.as_mut().unwrap();
        let from = SyncFrom {
            epoch: device.view.epoch,
            position: device.view.position,
        };
        client
            .send(Command::Sync {
                conversations: BTreeMap::new(),
                streams: [(conv, from)].into(),
            })
            .await;
        let more = loop {
            let e = recv(client).await;
            device.view.apply(&e);
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

/// Runs `ops` on a fresh engine over `store` and checks the convergence property.
pub async fn run(store: DynMessageStore, ops: Vec<Op>) {
    let chat = Chat::builder()
        .store(store.clone())
        .configure(|c| {
            // A small sync page, so replays page; no rate limit in the way.
            c.sync_limit = 4;
            c.rate_limit = None;
        })
        .build()
        .await
        .unwrap();
    let transport = InProcessTransport::new(chat.clone());
    let users: Vec<UserId> = USERS.iter().map(|u| UserId::from(*u)).collect();
    let conv = chat
        .create_conversation(&users[0], ConversationKind::Group, &users[1..], None)
        .await
        .unwrap()
        .conversation
        .id;
    let mut devices = Vec::new();
    for d in 0..DEVICES {
        let user = d % USERS.len();
        devices.push(Device {
            user,
            client: Some(transport.connect(users[user].clone()).await.unwrap()),
            view: DeviceView::default(),
        });
    }
    let dan = UserId::from("dan");
    let mut dan_in = false;
    let mut sent: Vec<Vec<MessageId>> = vec![Vec::new(); USERS.len()];
    let mut all_sent = Vec::new();
    let mut counter = 0u64;
    for op in ops {
        let actor = |devices: &[Device], user: usize| {
            devices
                .iter()
                .position(|d| d.user == user && d.client.is_some())
        };
        let command = match &op {
            Op::Send(u) => {
                if let Some(d) = actor(&devices, *u) {
                    counter += 1;
                    let (key, content) = (format!("k{counter}"), format!("m{counter}"));
                    let device = &mut devices[d];
                    let client = device.client.as_mut().unwrap();
                    client
                        .send(Command::Message(crate::protocol::SendMessage::text(
                            conv,
                            key.clone(),
                            content.clone(),
                        )))
                        .await;
                    let ack = loop {
                        match recv(client).await {
                            ack @ Event::MessageAck { .. } => break ack,
                            other => device.view.apply(&other),
                        }
                    };
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
                    // The sender knows its message from what it sent plus the ack (it gets
                    // no `message` frame for it), as a client's outbox does.
                    let own = NewMessage {
                        message_id,
                        conversation_id: conv,
                        sender_id: users[*u].clone(),
                        client_msg_id: key,
                        kind: MessageKind::Text,
                        content,
                        media: None,
                        reply_to: None,
                        created_at: timestamp,
                    }
                    .into_message(seq);
                    devices[d].view.apply(&Event::Message {
                        message: own,
                        position,
                    });
                    sent[*u].push(message_id);
                    all_sent.push(message_id);
                }
                None
            }
            Op::Edit(u, n) | Op::Delete(u, n) if !sent[*u].is_empty() => {
                let message_id = sent[*u][n % sent[*u].len()];
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
                Some((*u, cmd))
            }
            Op::React(u, n, key) if !all_sent.is_empty() => {
                let message_id = all_sent[n % all_sent.len()];
                let cmd = match key {
                    Some(k) => Command::React {
                        conversation_id: conv,
                        message_id,
                        key: KEYS[*k].into(),
                    },
                    None => Command::Unreact {
                        conversation_id: conv,
                        message_id,
                    },
                };
                Some((*u, cmd))
            }
            Op::Read(u, s) | Op::Delivered(u, s) => {
                let seq = u64::from(*s) % (all_sent.len() as u64 + 2);
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
                Some((*u, cmd))
            }
            Op::Toggle(d) => {
                if let Some(c) = devices[*d].client.take() {
                    // What was queued but not read is lost with the connection.
                    c.close().await;
                } else {
                    let user = users[devices[*d].user].clone();
                    devices[*d].client = Some(transport.connect(user).await.unwrap());
                    sync(&mut devices[*d], conv).await;
                }
                None
            }
            Op::Dan => {
                if dan_in {
                    chat.remove_member(&users[0], conv, &dan).await.unwrap();
                } else {
                    chat.add_members(&users[0], conv, std::slice::from_ref(&dan))
                        .await
                        .unwrap();
                }
                dan_in = !dan_in;
                None
            }
            _ => None,
        };
        if let Some((u, cmd)) = command
            && let Some(d) = actor(&devices, u)
        {
            // Errors (editing a deleted message, …) are answered and change nothing.
            devices[d].client.as_ref().unwrap().send(cmd).await;
        }
        for d in &mut devices {
            d.pump();
        }
    }
    // Everyone back, one final sync each.
    for d in &mut devices {
        if d.client.is_none() {
            let user = users[d.user].clone();
            d.client = Some(transport.connect(user).await.unwrap());
        }
        sync(d, conv).await;
    }
    let head = store.stream(conv).await.unwrap().expect("a change stream");
    let reference = &devices[0].view;
    for (i, d) in devices.iter().enumerate() {
        let v = &d.view;
        assert_eq!(
            v.state(),
            reference.state(),
            "device {i} differs from device 0"
        );
        assert_eq!(v.resets, 0, "device {i}: no reset within max_catch_up");
        assert_eq!(
            v.gaps, 0,
            "device {i}: a connected device sees every position"
        );
        assert_eq!(v.position, head.position, "device {i} reached the head");
        assert_eq!(v.epoch, Some(head.epoch), "device {i} knows the epoch");
    }
    // The views hold what the store holds.
    let stored = store.history(conv, None, usize::MAX).await.unwrap();
    assert_eq!(reference.messages.len(), stored.len(), "every message once");
    for m in stored {
        assert_eq!(
            reference.messages.get(&m.message_id),
            Some(&m),
            "message {} at its latest version",
            m.seq
        );
    }
    let conversation = store.conversation(conv).await.unwrap().unwrap();
    for (user, markers) in &reference.markers {
        let m = conversation.member(user).expect("markers of a member");
        assert_eq!(
            (m.last_delivered_seq, m.last_read_seq),
            *markers,
            "markers of {user}"
        );
    }
    assert_eq!(
        reference.members.get(&dan).copied().unwrap_or(false),
        dan_in,
        "dan's membership"
    );
    chat.shutdown();
}

/// Runs the property on `cases` random sequences (`PROPTEST_CASES` overrides), each on a fresh
/// store from `factory`, which also returns a guard kept alive for the case (e.g. the test
/// server the store talks to). Panics with the shortest failing sequence. Call it from a
/// plain `#[test]`: it runs its own multi-threaded tokio runtime.
pub fn check<F, Fut, G>(cases: u32, factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (DynMessageStore, G)>,
{
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let config = proptest::test_runner::Config {
        cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&ops(), |ops| {
        rt.block_on(async {
            let (store, guard) = factory().await;
            run(store, ops).await;
            drop(guard);
        });
        Ok(())
    });
    if let Err(err) = result {
        panic!("the convergence property failed: {err}");
    }
}
