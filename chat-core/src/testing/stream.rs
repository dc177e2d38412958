//! The change-stream conformance suite (feature `testing`): the promises of
//! [`MessageStore`]'s change stream (see the "change stream" section of
//! [`crate::store`]), run by every store that keeps one through
//! [`change_stream_conformance_tests!`](crate::change_stream_conformance_tests).
//!
//! * positions are 1..=N without gaps or duplicates under concurrent appends, edits, deletes,
//!   reactions, marker moves and member changes (and, with [`two_nodes_positions_gap_free`],
//!   across two store instances as on two nodes);
//! * a change that changes nothing takes no position;
//! * [`changes_after`](MessageStore::changes_after) replays each changed thing once, at its
//!   latest version and the position of its latest change, in position order, and pages
//!   without losing or repeating anything;
//! * reactions follow [`crate::model::apply_reaction`] and are visible on every read path;
//! * the epoch is stable while the stream lives and differs between streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::error::Error;
use crate::id::{MessageId, UserId};
use crate::model::{Change, Message, MessageChange, Reaction, ReceiptKind, StreamPosition};
use crate::store::{DynMessageStore, MessageStore};
use crate::testing::store::Fixture;

/// Every change of a page, following `next` until the end; checks the order and that nothing
/// repeats.
async fn replay_all(
    store: &DynMessageStore,
    conv: crate::ConversationId,
    after: u64,
    limit: usize,
) -> (Vec<Change>, StreamPosition) {
    let mut all = Vec::new();
    let mut from = after;
    for _ in 0..100_000 {
        let page = store
            .changes_after(conv, from, limit)
            .await
            .unwrap()
            .expect("the store keeps a change stream");
        assert!(page.changes.len() <= limit, "page longer than limit");
        all.extend(page.changes);
        match page.next {
            Some(next) => {
                assert!(next > from, "next must move forward");
                from = next;
            }
            None => {
                let positions: Vec<u64> = all.iter().map(Change::position).collect();
                let mut sorted = positions.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(positions, sorted, "strictly increasing positions");
                assert!(
                    positions
                        .iter()
                        .all(|&p| p > after && p <= page.stream.position)
                );
                return (all, page.stream);
            }
        }
    }
    panic!("changes_after never ended");
}

fn message_changes(changes: &[Change]) -> Vec<(u64, Message)> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Message { position, message } => Some((*position, (**message).clone())),
            _ => None,
        })
        .collect()
}

async fn head(store: &DynMessageStore, conv: crate::ConversationId) -> StreamPosition {
    store.stream(conv).await.unwrap().expect("a change stream")
}

/// Many tasks append, edit, delete, react, move markers and change members of one group at
/// once: the positions they got are exactly 1..=N and the stream's head is N.
pub async fn positions_are_gap_free_under_concurrency(store: &DynMessageStore) {
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&**store, 6).await;
    assert_eq!(
        head(store, conv.id).await.position,
        0,
        "creation is position 0"
    );
    let tasks = 6;
    let per_task = 12;
    let mut handles = Vec::new();
    for (t, user) in users.iter().take(tasks).cloned().enumerate() {
        let (store, fx) = (store.clone(), fx.clone());
        let id = conv.id;
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..per_task {
                let new = fx.new_message(id, &user, &fx.client_msg_id(), &format!("{t}-{i}"));
                let a = store.append(new).await.unwrap();
                got.push(a.position.expect("a new message takes a position"));
                let mid = a.message.message_id;
                let key = if i % 2 == 0 { "👍" } else { "🎉" };
                let r = store.react(id, mid, &user, Some(key)).await.unwrap();
                got.push(r.position.expect("a new reaction takes a position"));
                let e = store
                    .change_message(
                        id,
                        mid,
                        &user,
                        MessageChange::Edit {
                            content: format!("{t}-{i} edited"),
                        },
                        1,
                    )
                    .await
                    .unwrap();
                got.push(e.position.expect("an edit takes a position"));
                let m = store
                    .set_marker(id, &user, ReceiptKind::Read, a.message.seq)
                    .await
                    .unwrap();
                if m.moved {
                    got.push(m.position.expect("a marker that moved takes a position"));
                } else {
                    assert_eq!(m.position, None, "a marker that did not move takes none");
                }
                if i % 4 == 3 {
                    let d = store
                        .change_message(id, mid, &user, MessageChange::Delete, 2)
                        .await
                        .unwrap();
                    got.push(d.position.expect("a delete takes a position"));
                }
            }
            got
        }));
    }
    // Member changes interleaved from another task.
    let members = {
        let (store, fx) = (store.clone(), fx.clone());
        let id = conv.id;
        tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..10 {
                let u = fx.user(&format!("joiner{i}"));
                let added = store.add_members(id, &[u.clone()], 3).await.unwrap();
                got.push(added[0].position.expect("a join takes a position"));
                if i % 2 == 0 {
                    let gone = store.remove_member(id, &u).await.unwrap().unwrap();
                    got.push(gone.position.expect("a leave takes a position"));
                }
            }
            got
        })
    };
    let mut all = members.await.unwrap();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    let n = all.len() as u64;
    assert_eq!(all, (1..=n).collect::<Vec<_>>(), "positions are 1..=N");
    assert_eq!(head(store, conv.id).await.position, n);
}

/// Changes that change nothing take no position.
pub async fn no_op_changes_take_no_position(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (a, b) = (fx.user("a"), fx.user("b"));
    let conv = fx.direct(&**store, &a, &b).await;
    let new = fx.new_message(conv.id, &a, "k", "hi");
    let first = store.append(new.clone()).await.unwrap();
    assert_eq!(first.position, Some(1));
    let retry = store
        .append(crate::model::NewMessage {
            message_id: fx.message_id(),
            ..new
        })
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.position, None, "a retried append takes no position");
    let mid = first.message.message_id;
    assert_eq!(
        store
            .react(conv.id, mid, &b, Some("👍"))
            .await
            .unwrap()
            .position,
        Some(2)
    );
    let again = store.react(conv.id, mid, &b, Some("👍")).await.unwrap();
    assert_eq!(again.position, None, "the same reaction again");
    let none = store.react(conv.id, mid, &a, None).await.unwrap();
    assert_eq!(none.position, None, "removing a reaction that is not there");
    let m = store
        .set_marker(conv.id, &b, ReceiptKind::Read, 1)
        .await
        .unwrap();
    assert_eq!(m.position, Some(3));
    let m = store
        .set_marker(conv.id, &b, ReceiptKind::Delivered, 1)
        .await
        .unwrap();
    assert!(!m.moved, "read 1 already moved delivered to 1");
    assert_eq!(m.position, None);
    assert!(
        store
            .add_members(conv.id, &[a.clone()], 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(head(store, conv.id).await.position, 3);
}

/// A replay returns the current state of each changed thing once, at the position of its
/// latest change; replays from later positions return the later part; paging at every size
/// yields the same sequence.
pub async fn changes_after_replays_latest_versions_once(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, users) = fx.group(&**store, 3).await;
    let (a, b, c) = (&users[0], &users[1], &users[2]);
    let m1 = fx.send(&**store, conv.id, a, "one").await; // 1
    let m2 = fx.send(&**store, conv.id, b, "two").await; // 2
    let m3 = fx.send(&**store, conv.id, a, "three").await; // 3
    let edit = |s: &str| MessageChange::Edit { content: s.into() };
    for (i, text) in ["one v2", "one v3", "one v4"].into_iter().enumerate() {
        let u = store
            .change_message(conv.id, m1.message_id, a, edit(text), 10 + i as u64)
            .await
            .unwrap();
        assert_eq!(u.position, Some(4 + i as u64)); // 4, 5, 6
    }
    store
        .change_message(conv.id, m2.message_id, b, MessageChange::Delete, 20)
        .await
        .unwrap(); // 7
    store
        .react(conv.id, m3.message_id, c, Some("❤️"))
        .await
        .unwrap(); // 8
    store
        .set_marker(conv.id, c, ReceiptKind::Read, 3)
        .await
        .unwrap(); // 9
    let d = fx.user("d");
    store.add_members(conv.id, &[d.clone()], 30).await.unwrap(); // 10
    store.remove_member(conv.id, b).await.unwrap(); // 11
    store
        .set_marker(conv.id, c, ReceiptKind::Delivered, 3)
        .await
        .unwrap(); // no move: read 3 moved delivered
    let (all, stream) = replay_all(store, conv.id, 0, 1000).await;
    assert_eq!(stream.position, 11);
    let messages = message_changes(&all);
    let by_id: BTreeMap<MessageId, (u64, Message)> = messages
        .iter()
        .map(|(p, m)| (m.message_id, (*p, m.clone())))
        .collect();
    assert_eq!(messages.len(), 3, "each message once: {messages:?}");
    let (p1, v1) = &by_id[&m1.message_id];
    assert_eq!((*p1, v1.content.as_str(), v1.version), (6, "one v4", 4));
    let (p2, v2) = &by_id[&m2.message_id];
    assert_eq!(*p2, 7);
    assert!(v2.deleted && v2.content.is_empty(), "tombstone: {v2:?}");
    let (p3, v3) = &by_id[&m3.message_id];
    assert_eq!(*p3, 8);
    assert_eq!(
        v3.reactions,
        vec![Reaction {
            key: "❤️".into(),
            users: vec![c.clone()]
        }]
    );
    assert!(all.contains(&Change::Markers {
        position: 9,
        user_id: c.clone(),
        delivered: 3,
        read: 3,
    }));
    assert!(all.contains(&Change::Membership {
        position: 10,
        user_id: d.clone(),
        member: true,
    }));
    assert!(all.contains(&Change::Membership {
        position: 11,
        user_id: b.clone(),
        member: false,
    }));
    // From a later position: only what changed after it.
    let (later, _) = replay_all(store, conv.id, 7, 1000).await;
    let positions: Vec<u64> = later.iter().map(Change::position).collect();
    assert_eq!(positions, vec![8, 9, 10, 11]);
    let (none, _) = replay_all(store, conv.id, 11, 1000).await;
    assert!(none.is_empty(), "nothing after the head");
    // Every page size gives the same sequence.
    for limit in [1, 2, 3, 5] {
        let (paged, _) = replay_all(store, conv.id, 0, limit).await;
        assert_eq!(paged, all, "limit {limit}");
    }
    let empty = store.changes_after(conv.id, 0, 0).await.unwrap().unwrap();
    assert!(empty.changes.is_empty(), "limit 0");
    // Unknown conversation.
    let unknown = fx.conversation_id();
    assert!(matches!(
        store.changes_after(unknown, 0, 10).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store.stream(unknown).await,
        Err(Error::NotFound(_))
    ));
}

/// Reactions: one per user per message, replaced by a new key, removed, bounded, refused on
/// deleted messages and for non-members, cleared by a delete, and on every read path.
pub async fn reactions_follow_the_rule_on_every_read_path(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, users) = fx.group(&**store, 3).await;
    let (a, b, c) = (&users[0], &users[1], &users[2]);
    let m = fx.send(&**store, conv.id, a, "react to me").await;
    let react = async |u: &UserId, k: Option<&str>| store.react(conv.id, m.message_id, u, k).await;
    let summary = |msg: &Message| -> Vec<(String, Vec<UserId>)> {
        msg.reactions
            .iter()
            .map(|r| (r.key.clone(), r.users.clone()))
            .collect()
    };
    react(b, Some("👍")).await.unwrap();
    let r = react(c, Some("👍")).await.unwrap();
    assert_eq!(
        summary(&r.message),
        vec![("👍".to_owned(), vec![b.clone(), c.clone()])]
    );
    let r = react(b, Some("🎉")).await.unwrap();
    assert_eq!(
        summary(&r.message),
        vec![
            ("👍".to_owned(), vec![c.clone()]),
            ("🎉".to_owned(), vec![b.clone()])
        ],
        "a new key replaces the user's old one"
    );
    assert_eq!(
        r.message.version, m.version,
        "reactions do not bump the version"
    );
    let r = react(c, None).await.unwrap();
    assert_eq!(
        summary(&r.message),
        vec![("🎉".to_owned(), vec![b.clone()])]
    );
    // Every read path shows them.
    let stored = store.message(conv.id, m.message_id).await.unwrap().unwrap();
    assert_eq!(summary(&stored), summary(&r.message));
    let history = store.history(conv.id, None, 10).await.unwrap();
    assert_eq!(summary(&history[0]), summary(&r.message));
    let after = store.messages_after(conv.id, 0, 10).await.unwrap();
    assert_eq!(summary(&after[0]), summary(&r.message));
    let list = store.list_conversations(a, None, 10).await.unwrap();
    let view = list
        .items
        .iter()
        .find(|v| v.conversation.id == conv.id)
        .unwrap();
    assert_eq!(
        summary(view.last_message.as_ref().unwrap()),
        summary(&r.message)
    );
    // Refusals.
    let outsider = fx.user("outsider");
    assert!(matches!(
        store
            .react(conv.id, m.message_id, &outsider, Some("👍"))
            .await,
        Err(Error::NotMember(_))
    ));
    assert!(matches!(
        store.react(conv.id, fx.message_id(), b, Some("👍")).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store
            .react(fx.conversation_id(), m.message_id, b, Some("👍"))
            .await,
        Err(Error::NotFound(_))
    ));
    for bad in ["", "a b", &"x".repeat(Reaction::MAX_KEY_BYTES + 1)] {
        assert!(
            matches!(react(b, Some(bad)).await, Err(Error::Invalid(_))),
            "key {bad:?}"
        );
    }
    // At most MAX_KEYS distinct keys.
    let crowd = fx.users("crowd", Reaction::MAX_KEYS + 1);
    store.add_members(conv.id, &crowd, 1).await.unwrap();
    let m2 = fx.send(&**store, conv.id, a, "many").await;
    for (i, u) in crowd.iter().take(Reaction::MAX_KEYS).enumerate() {
        store
            .react(conv.id, m2.message_id, u, Some(&format!("k{i}")))
            .await
            .unwrap();
    }
    let last = &crowd[Reaction::MAX_KEYS];
    assert!(matches!(
        store
            .react(conv.id, m2.message_id, last, Some("one-too-many"))
            .await,
        Err(Error::Invalid(_))
    ));
    store
        .react(conv.id, m2.message_id, last, Some("k0"))
        .await
        .expect("an existing key is fine");
    // A delete clears them; a deleted message takes none.
    let d = store
        .change_message(conv.id, m.message_id, a, MessageChange::Delete, 5)
        .await
        .unwrap();
    assert!(d.message.reactions.is_empty(), "a delete clears reactions");
    assert!(matches!(react(b, Some("👍")).await, Err(Error::Invalid(_))));
}

/// The epoch stays while the stream lives and differs between two conversations.
pub async fn epochs_are_stable_and_distinct(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (one, users) = fx.group(&**store, 2).await;
    let (two, _) = fx.group(&**store, 2).await;
    let e1 = head(store, one.id).await.epoch;
    assert_ne!(e1, 0);
    fx.send(&**store, one.id, &users[0], "hi").await;
    let after = head(store, one.id).await;
    assert_eq!(after.epoch, e1, "a change keeps the epoch");
    let page = store.changes_after(one.id, 0, 10).await.unwrap().unwrap();
    assert_eq!(page.stream, after);
    assert_ne!(head(store, two.id).await.epoch, e1, "random per stream");
}

/// Two store instances (two nodes) change one conversation concurrently: the positions they
/// got are exactly 1..=N, and both see the same head.
pub async fn two_nodes_positions_gap_free<S: MessageStore>(a: Arc<S>, b: Arc<S>, per_node: usize) {
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&*a, 4).await;
    let nodes: [Arc<dyn MessageStore>; 2] = [a.clone(), b.clone()];
    let mut handles = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..2 {
            let (store, fx) = (node.clone(), fx.clone());
            let user = users[n * 2 + t].clone();
            let id = conv.id;
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..per_node {
                    let new = fx.new_message(id, &user, &fx.client_msg_id(), &format!("{i}"));
                    let m = store.append(new).await.unwrap();
                    got.push(m.position.unwrap());
                    let r = store
                        .react(id, m.message.message_id, &user, Some("👍"))
                        .await
                        .unwrap();
                    got.push(r.position.unwrap());
                    let k = store
                        .set_marker(id, &user, ReceiptKind::Read, m.message.seq)
                        .await
                        .unwrap();
                    got.extend(k.position);
                }
                got
            }));
        }
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    let n = all.len() as u64;
    assert_eq!(all, (1..=n).collect::<Vec<_>>());
    let (ha, hb) = (
        a.stream(conv.id).await.unwrap().unwrap(),
        b.stream(conv.id).await.unwrap().unwrap(),
    );
    assert_eq!(ha, hb);
    assert_eq!(ha.position, n);
    let seen: HashSet<u64> = a
        .changes_after(conv.id, 0, 100_000)
        .await
        .unwrap()
        .unwrap()
        .changes
        .iter()
        .map(Change::position)
        .collect();
    assert!(seen.contains(&n), "the newest change is replayable");
}

/// Runs the change-stream conformance suite: one `#[tokio::test]` per case, each on a fresh
/// store from the factory, in the same two shapes as
/// [`store_conformance_tests!`](crate::store_conformance_tests).
#[macro_export]
macro_rules! change_stream_conformance_tests {
    (with_guard, $factory:expr $(,)?) => {
        $crate::store_conformance_tests!(@cases (guard) ($factory) @in stream
            positions_are_gap_free_under_concurrency,
            no_op_changes_take_no_position,
            changes_after_replays_latest_versions_once,
            reactions_follow_the_rule_on_every_read_path,
            epochs_are_stable_and_distinct,
        );
    };
    ($factory:expr $(,)?) => {
        $crate::store_conformance_tests!(@cases (plain) ($factory) @in stream
            positions_are_gap_free_under_concurrency,
            no_op_changes_take_no_position,
            changes_after_replays_latest_versions_once,
            reactions_follow_the_rule_on_every_read_path,
            epochs_are_stable_and_distinct,
        );
    };
}
