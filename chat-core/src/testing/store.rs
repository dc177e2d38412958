//! Conformance suite for [`MessageStore`] backends.
//!
//! Every case is a plain `pub async fn case(store: &DynMessageStore)`; the
//! [`store_conformance_tests!`](crate::store_conformance_tests) macro expands all of them into
//! one `#[tokio::test]` each (multi-thread runtime, 4 workers) for a backend:
//!
//! ```
//! // tests/memory_store.rs
//! use std::sync::Arc;
//! use chat_core::memory::MemoryStore;
//! use chat_core::store::DynMessageStore;
//!
//! chat_core::store_conformance_tests!(async { Arc::new(MemoryStore::new()) as DynMessageStore });
//! # fn main() {}
//! ```
//!
//! The argument is any expression whose value is a future resolving to a
//! [`DynMessageStore`]; it is evaluated once per test, so a networked backend can create a fresh,
//! isolated store (a random key prefix, a fresh keyspace) every time, e.g.
//! `store_conformance_tests!(redis_test_store())` with `async fn redis_test_store() -> DynMessageStore`.
//! The crate using the macro needs `tokio` with the `macros` and `rt-multi-thread` features.
//!
//! The cases use only the trait, fresh random ids and user names, and never assume the store is
//! empty, so they also run against a shared server.
//!
//! Choices the trait leaves open that the suite pins down (every backend must agree):
//! * a message appended fresh keeps the `message_id` of its [`NewMessage`];
//! * a member added later starts with both markers at the conversation's `last_seq` (no unread
//!   history from before they joined);
//! * moving the read marker to N moves the delivered marker to at least N;
//! * editing or deleting a deleted message is [`Error::Invalid`] (from [`MessageChange::apply`]);
//! * `limit == 0` gives an empty page, a huge `limit` (`usize::MAX`) is fine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;
use crate::id::{ConversationId, MAX_NODE_ID, MessageId, NodeId, SnowflakeGenerator, UserId};
use crate::model::{
    Conversation, ConversationKind, ConversationView, Media, Message, MessageChange, MessageKind,
    NewConversation, NewMessage, Page, ReceiptKind, Role,
};
use crate::store::{Appended, DynMessageStore, MembershipUpdate, MessageStore};

// ------------------------------------------------------------------------------ helpers

/// A random 64-bit value (std's randomly keyed SipHash over a counter and the clock).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    RandomState::new().hash_one((COUNTER.fetch_add(1, Ordering::Relaxed), nanos))
}

/// Shuffles `items` in place (Fisher–Yates over a xorshift seeded by [`random_u64`]).
pub fn shuffle<T>(items: &mut [T]) {
    let mut x = random_u64() | 1;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Fresh ids and user names for one case: a Snowflake generator on a random node and a random
/// prefix for user ids, so cases never see each other's data even in a shared store.
pub struct Fixture {
    /// Conversation and message ids.
    pub ids: SnowflakeGenerator,
    /// Prefix of every user id made by [`Fixture::user`].
    pub prefix: String,
    /// Makes client_msg_ids unique within the fixture.
    counter: AtomicU64,
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("node", &self.ids.node())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    /// A fixture with a random node id and user prefix.
    pub fn new() -> Self {
        let node = (random_u64() % (u64::from(MAX_NODE_ID) + 1)) as u16;
        Self {
            ids: SnowflakeGenerator::new(NodeId::new(node).expect("node id in range")),
            prefix: format!("t{:016x}", random_u64()),
            counter: AtomicU64::new(0),
        }
    }

    /// A user id unique to this fixture.
    pub fn user(&self, name: &str) -> UserId {
        UserId::from(format!("{}-{name}", self.prefix))
    }

    /// `n` users named `{name}0`, `{name}1`, …
    pub fn users(&self, name: &str, n: usize) -> Vec<UserId> {
        (0..n).map(|i| self.user(&format!("{name}{i}"))).collect()
    }

    /// A fresh conversation id.
    pub fn conversation_id(&self) -> ConversationId {
        self.ids.conversation_id()
    }

    /// A fresh message id.
    pub fn message_id(&self) -> MessageId {
        self.ids.message_id()
    }

    /// A fresh, unique client_msg_id.
    pub fn client_msg_id(&self) -> String {
        format!("c{}", self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// A text message with a fresh message id.
    pub fn new_message(
        &self,
        conversation: ConversationId,
        sender: &UserId,
        client_msg_id: &str,
        content: &str,
    ) -> NewMessage {
        let message_id = self.message_id();
        NewMessage {
            message_id,
            conversation_id: conversation,
            sender_id: sender.clone(),
            client_msg_id: client_msg_id.to_owned(),
            kind: MessageKind::Text,
            content: content.to_owned(),
            media: None,
            reply_to: None,
            created_at: message_id.timestamp_ms(),
        }
    }

    /// A group creation request.
    pub fn new_group(&self, creator: &UserId, members: &[UserId]) -> NewConversation {
        let id = self.conversation_id();
        NewConversation {
            id,
            kind: ConversationKind::Group,
            name: Some(format!("group {id}")),
            creator: creator.clone(),
            members: members.to_vec(),
            created_at: id.timestamp_ms(),
        }
    }

    /// A direct conversation creation request.
    pub fn new_direct(&self, creator: &UserId, other: &UserId) -> NewConversation {
        let id = self.conversation_id();
        NewConversation {
            id,
            kind: ConversationKind::Direct,
            name: None,
            creator: creator.clone(),
            members: vec![other.clone()],
            created_at: id.timestamp_ms(),
        }
    }

    /// Creates a group of `n` fresh users (`n >= 1`); the first one is the creator (owner).
    pub async fn group<S: MessageStore + ?Sized>(
        &self,
        store: &S,
        n: usize,
    ) -> (Conversation, Vec<UserId>) {
        let users = self.users(&format!("g{}-", random_u64() % 1_000_000), n.max(1));
        let conv = store
            .create_conversation(self.new_group(&users[0], &users[1..]))
            .await
            .expect("create group");
        (conv, users)
    }

    /// Creates a direct conversation between `a` and `b`.
    pub async fn direct<S: MessageStore + ?Sized>(
        &self,
        store: &S,
        a: &UserId,
        b: &UserId,
    ) -> Conversation {
        store
            .create_conversation(self.new_direct(a, b))
            .await
            .expect("create direct")
    }

    /// Appends a text message with a fresh client_msg_id; asserts it is new.
    pub async fn send<S: MessageStore + ?Sized>(
        &self,
        store: &S,
        conversation: ConversationId,
        sender: &UserId,
        content: &str,
    ) -> Message {
        let new = self.new_message(conversation, sender, &self.client_msg_id(), content);
        let appended = store.append(new.clone()).await.expect("append");
        assert!(!appended.duplicate, "fresh client_msg_id flagged duplicate");
        assert_eq!(appended.message.message_id, new.message_id);
        appended.message
    }
}

fn user_ids(updates: Vec<MembershipUpdate>) -> Vec<UserId> {
    updates.into_iter().map(|u| u.user_id).collect()
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn view_ids(page: &Page<ConversationView, u64>) -> Vec<ConversationId> {
    page.items.iter().map(|v| v.conversation.id).collect()
}

/// Walks `list_conversations` with page size `limit`, checking the cursor of every page;
/// returns the concatenated ids.
async fn walk_list(store: &DynMessageStore, user: &UserId, limit: usize) -> Vec<ConversationId> {
    let mut all = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = store.list_conversations(user, after, limit).await.unwrap();
        assert!(page.items.len() <= limit, "page longer than limit");
        all.extend(view_ids(&page));
        match page.next {
            Some(next) => {
                let last = page.items.last().expect("a page with a cursor has items");
                assert_eq!(
                    next, last.conversation.last_activity,
                    "next = last item's activity"
                );
                assert_eq!(
                    page.items.len(),
                    limit,
                    "only a full page may have a next page"
                );
                after = Some(next);
            }
            None => return all,
        }
    }
    panic!("list_conversations never ended");
}

fn assert_not_member<T: fmt::Debug>(r: crate::Result<T>, conv: ConversationId, what: &str) {
    assert!(
        matches!(r, Err(Error::NotMember(id)) if id == conv),
        "{what}: expected NotMember({conv}), got {r:?}"
    );
}

fn assert_not_found<T: fmt::Debug>(r: crate::Result<T>, what: &str) {
    assert!(
        matches!(r, Err(Error::NotFound(_))),
        "{what}: expected NotFound, got {r:?}"
    );
}

// -------------------------------------------------------------------------------- cases

/// 32 tasks × 100 appends on one conversation: seqs are exactly 1..=3200, each task sees its
/// own seqs increase, and every returned `Appended` is the stored message.
pub async fn append_assigns_gap_free_seqs_under_concurrency(store: &DynMessageStore) {
    const TASKS: usize = 32;
    const PER_TASK: usize = 100;
    const TOTAL: u64 = (TASKS * PER_TASK) as u64;
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&**store, 8).await;

    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, fx) = (store.clone(), fx.clone());
            let sender = users[t % users.len()].clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(PER_TASK);
                for i in 0..PER_TASK {
                    let new =
                        fx.new_message(conv.id, &sender, &format!("t{t}-{i}"), &format!("{t}/{i}"));
                    let a = store.append(new.clone()).await.unwrap();
                    assert!(!a.duplicate, "fresh append flagged duplicate");
                    assert_eq!(a.message, new.into_message(a.message.seq));
                    out.push(a.message);
                }
                out
            })
        })
        .collect();
    let mut appended = Vec::with_capacity(TASKS * PER_TASK);
    for h in handles {
        let mine = h.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0].seq < w[1].seq),
            "one sender's sequential appends got decreasing seqs"
        );
        appended.extend(mine);
    }

    assert_eq!(store.last_seq(conv.id).await.unwrap(), TOTAL);
    let stored = store
        .messages_after(conv.id, 0, TASKS * PER_TASK + 10)
        .await
        .unwrap();
    assert_eq!(
        seqs(&stored),
        (1..=TOTAL).collect::<Vec<_>>(),
        "gap-free 1..=N"
    );
    let ids: HashSet<MessageId> = stored.iter().map(|m| m.message_id).collect();
    assert_eq!(ids.len(), stored.len(), "duplicate message ids stored");
    let mut returned_seqs = HashSet::new();
    for a in &appended {
        assert!(returned_seqs.insert(a.seq), "seq {} returned twice", a.seq);
        assert_eq!(&stored[(a.seq - 1) as usize], a, "returned != stored");
    }

    // History, newest first, in pages, shows the same timeline.
    let mut walked = Vec::new();
    let mut before = None;
    loop {
        let page = store.history(conv.id, before, 500).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.seq);
        walked.extend(page);
    }
    walked.reverse();
    assert_eq!(walked, stored);

    for a in appended.iter().step_by(97) {
        let one = store.message(conv.id, a.message_id).await.unwrap();
        assert_eq!(one.as_ref(), Some(a));
    }
}

/// Many concurrent retries of one `(sender, client_msg_id)`, mixed with other appends: exactly
/// one message, every retry gets its ids; another sender or conversation is a new message.
pub async fn append_is_idempotent_under_concurrent_retries(store: &DynMessageStore) {
    const RETRIES: usize = 32;
    const OTHERS: usize = 8;
    const PER_OTHER: usize = 20;
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&**store, 3).await;
    let (alice, bob) = (users[0].clone(), users[1].clone());

    let mut attempts = Vec::new();
    let mut retry_handles = Vec::new();
    for r in 0..RETRIES {
        let new = fx.new_message(conv.id, &alice, "same-key", &format!("attempt {r}"));
        attempts.push(new.clone());
        let store = store.clone();
        retry_handles.push(tokio::spawn(
            async move { store.append(new).await.unwrap() },
        ));
    }
    let other_handles: Vec<_> = (0..OTHERS)
        .map(|t| {
            let (store, fx, sender) = (store.clone(), fx.clone(), users[t % 3].clone());
            tokio::spawn(async move {
                for i in 0..PER_OTHER {
                    let new = fx.new_message(conv.id, &sender, &format!("o{t}-{i}"), "other");
                    assert!(!store.append(new).await.unwrap().duplicate);
                }
            })
        })
        .collect();
    let mut results: Vec<Appended> = Vec::new();
    for h in retry_handles {
        results.push(h.await.unwrap());
    }
    for h in other_handles {
        h.await.unwrap();
    }

    let originals: Vec<&Appended> = results.iter().filter(|a| !a.duplicate).collect();
    assert_eq!(originals.len(), 1, "exactly one retry stores the message");
    let original = originals[0].message.clone();
    for a in &results {
        assert_eq!(
            a.message, original,
            "every retry returns the original message"
        );
    }
    let winner = attempts
        .iter()
        .find(|n| n.message_id == original.message_id)
        .expect("the stored id is one of the attempted ids");
    assert_eq!(original.content, winner.content);

    let total = 1 + (OTHERS * PER_OTHER) as u64;
    assert_eq!(store.last_seq(conv.id).await.unwrap(), total);
    let all = store.messages_after(conv.id, 0, 1000).await.unwrap();
    assert_eq!(seqs(&all), (1..=total).collect::<Vec<_>>());
    let keyed: Vec<&Message> = all
        .iter()
        .filter(|m| m.sender_id == alice && m.client_msg_id == "same-key")
        .collect();
    assert_eq!(keyed, vec![&original]);
    for n in attempts
        .iter()
        .filter(|n| n.message_id != original.message_id)
    {
        assert_eq!(store.message(conv.id, n.message_id).await.unwrap(), None);
    }

    // A late retry too.
    let late = store
        .append(fx.new_message(conv.id, &alice, "same-key", "late"))
        .await
        .unwrap();
    assert!(late.duplicate);
    assert_eq!(late.message, original);

    // Same key, other sender: a different message.
    let from_bob = fx.new_message(conv.id, &bob, "same-key", "bob's");
    let b = store.append(from_bob.clone()).await.unwrap();
    assert!(!b.duplicate);
    assert_eq!(b.message, from_bob.into_message(total + 1));

    // Same key and sender, other conversation: a different message.
    let conv2 = fx.direct(&**store, &alice, &bob).await;
    let elsewhere = fx.new_message(conv2.id, &alice, "same-key", "elsewhere");
    let e = store.append(elsewhere.clone()).await.unwrap();
    assert!(!e.duplicate);
    assert_eq!(e.message, elsewhere.into_message(1));

    // And those are idempotent in turn.
    let b2 = store
        .append(fx.new_message(conv.id, &bob, "same-key", "again"))
        .await
        .unwrap();
    assert!(b2.duplicate);
    assert_eq!(b2.message, b.message);
    assert_eq!(store.last_seq(conv.id).await.unwrap(), total + 1);
    assert_eq!(store.last_seq(conv2.id).await.unwrap(), 1);
}

/// A non-member's append is `NotMember`, an unknown conversation's `NotFound`; neither stores
/// anything, uses a seq or an idempotency key.
pub async fn append_rejects_non_members_and_unknown_conversations(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, _users) = fx.group(&**store, 2).await;
    let outsider = fx.user("outsider");

    let rejected = fx.new_message(conv.id, &outsider, "k1", "let me in");
    assert_not_member(
        store.append(rejected.clone()).await,
        conv.id,
        "append by outsider",
    );
    let unknown = fx.conversation_id();
    assert_not_found(
        store
            .append(fx.new_message(unknown, &outsider, "k2", "nowhere"))
            .await,
        "append to unknown conversation",
    );
    assert_not_found(
        store.last_seq(unknown).await,
        "last_seq of unknown conversation",
    );

    assert_eq!(store.last_seq(conv.id).await.unwrap(), 0);
    assert!(store.history(conv.id, None, 10).await.unwrap().is_empty());
    assert!(
        store
            .messages_after(conv.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.message(conv.id, rejected.message_id).await.unwrap(),
        None
    );

    // Once a member, the same key is a new message at seq 1.
    let added = store
        .add_members(conv.id, std::slice::from_ref(&outsider), 1)
        .await
        .unwrap();
    assert_eq!(user_ids(added), vec![outsider.clone()]);
    let ok = fx.new_message(conv.id, &outsider, "k1", "hello");
    let a = store.append(ok.clone()).await.unwrap();
    assert!(!a.duplicate);
    assert_eq!(a.message, ok.into_message(1));
}

/// Every field of a new message is stored as given (kind, media, reply_to, created_at, …).
pub async fn append_stores_every_field(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, users) = fx.group(&**store, 2).await;
    let first = fx.send(&**store, conv.id, &users[1], "first").await;
    let mut new = fx.new_message(conv.id, &users[0], "img-1", "a caption");
    new.kind = MessageKind::Image;
    new.media = Some(Media {
        url: "https://cdn.example.com/a.png".into(),
        mime: "image/png".into(),
        size: 12_345,
        name: Some("a.png".into()),
    });
    new.reply_to = Some(first.message_id);
    new.created_at = 1_700_000_000_123;
    let a = store.append(new.clone()).await.unwrap();
    let expected = new.into_message(2);
    assert_eq!(a.message, expected);
    assert_eq!(
        store.message(conv.id, expected.message_id).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.history(conv.id, None, 1).await.unwrap(),
        vec![expected.clone()]
    );
    assert_eq!(
        store.messages_after(conv.id, 1, 10).await.unwrap(),
        vec![expected]
    );
}

/// `history` boundaries: empty conversation, exact multiples of the page size, `before = 1`,
/// `before` beyond the end, limits 0 and `usize::MAX`, walking every page.
pub async fn history_pagination_boundaries(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, users) = fx.group(&**store, 2).await;
    for before in [None, Some(0), Some(1), Some(2), Some(100)] {
        assert!(
            store.history(conv.id, before, 10).await.unwrap().is_empty(),
            "empty conversation, before {before:?}"
        );
    }

    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(
            fx.send(&**store, conv.id, &users[i % 2], &format!("m{i}"))
                .await,
        );
    }
    let newest_first: Vec<Message> = sent.iter().rev().cloned().collect();

    for page_size in [10usize, 7, 1, 30, 31] {
        let mut walked = Vec::new();
        let mut before = None;
        let mut pages = 0;
        loop {
            let page = store.history(conv.id, before, page_size).await.unwrap();
            if page.is_empty() {
                break;
            }
            pages += 1;
            assert!(page.len() <= page_size);
            assert!(
                page.windows(2).all(|w| w[0].seq == w[1].seq + 1),
                "newest first, contiguous"
            );
            before = Some(page.last().unwrap().seq);
            walked.extend(page);
            assert!(pages <= 30, "history pagination does not end");
        }
        assert_eq!(
            pages,
            30usize.div_ceil(page_size),
            "page count for size {page_size}"
        );
        assert_eq!(walked, newest_first, "walk with page size {page_size}");
    }

    let h = |before, limit| store.history(conv.id, before, limit);
    assert!(h(Some(1), 10).await.unwrap().is_empty(), "before = 1");
    assert!(h(Some(0), 10).await.unwrap().is_empty(), "before = 0");
    assert_eq!(h(Some(2), 10).await.unwrap(), vec![sent[0].clone()]);
    assert_eq!(h(Some(31), 10).await.unwrap(), newest_first[..10]);
    assert_eq!(h(Some(1_000), 10).await.unwrap(), newest_first[..10]);
    assert_eq!(h(Some(u64::MAX), 10).await.unwrap(), newest_first[..10]);
    assert_eq!(h(Some(30), 10).await.unwrap(), newest_first[1..11]);
    assert_eq!(h(Some(5), 10).await.unwrap(), newest_first[26..]);
    assert!(h(None, 0).await.unwrap().is_empty(), "limit 0");
    assert!(h(Some(10), 0).await.unwrap().is_empty(), "limit 0");
    assert_eq!(h(None, usize::MAX).await.unwrap(), newest_first);
    assert_eq!(h(Some(11), usize::MAX).await.unwrap(), newest_first[20..]);
}

/// `messages_after` boundaries: `after = 0`, `after = last`, `after > last`, limits 0 and
/// `usize::MAX`, walking every page.
pub async fn messages_after_pagination_boundaries(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, users) = fx.group(&**store, 2).await;
    for after in [0, 1, 100] {
        assert!(
            store
                .messages_after(conv.id, after, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(
            fx.send(&**store, conv.id, &users[i % 2], &format!("m{i}"))
                .await,
        );
    }

    for page_size in [10usize, 3, 1, 20, 21] {
        let mut walked = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .messages_after(conv.id, after, page_size)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= page_size);
            assert_eq!(page[0].seq, after + 1, "resumes right after the cursor");
            after = page.last().unwrap().seq;
            walked.extend(page);
            assert!(walked.len() <= 20, "messages_after pagination does not end");
        }
        assert_eq!(walked, sent, "walk with page size {page_size}");
    }

    let a = |after, limit| store.messages_after(conv.id, after, limit);
    assert_eq!(a(0, 5).await.unwrap(), sent[..5]);
    assert_eq!(a(19, 5).await.unwrap(), sent[19..]);
    assert!(a(20, 5).await.unwrap().is_empty(), "after = last");
    assert!(a(21, 5).await.unwrap().is_empty(), "after > last");
    assert!(a(u64::MAX, 5).await.unwrap().is_empty(), "after = u64::MAX");
    assert!(a(0, 0).await.unwrap().is_empty(), "limit 0");
    assert_eq!(a(0, usize::MAX).await.unwrap(), sent);
    assert_eq!(a(15, usize::MAX).await.unwrap(), sent[15..]);
}

/// A new conversation's fields; lookups of unknown conversations.
pub async fn create_and_read_conversations(store: &DynMessageStore) {
    let fx = Fixture::new();
    let owner = fx.user("owner");
    let others = fx.users("m", 2);
    let new = fx.new_group(&owner, &others);
    let conv = store.create_conversation(new.clone()).await.unwrap();
    assert_eq!(conv.id, new.id);
    assert_eq!(conv.kind, ConversationKind::Group);
    assert_eq!(conv.name, new.name);
    assert_eq!(conv.created_at, new.created_at);
    assert_eq!(conv.last_seq, 0);
    assert_eq!(
        conv.last_activity,
        new.id.get(),
        "an empty conversation's activity is its id"
    );
    assert_eq!(
        store.conversation(conv.id).await.unwrap(),
        Some(conv.clone())
    );
    assert_eq!(store.last_seq(conv.id).await.unwrap(), 0);

    let m = fx.send(&**store, conv.id, &others[0], "hi").await;
    let after = store.conversation(conv.id).await.unwrap().unwrap();
    assert_eq!(after.last_seq, 1);
    assert_eq!(
        after.last_activity,
        m.message_id.get(),
        "activity = newest message id"
    );

    let unknown = fx.conversation_id();
    assert_eq!(store.conversation(unknown).await.unwrap(), None);
    assert_not_found(store.last_seq(unknown).await, "last_seq");
    assert_not_found(
        store
            .add_members(unknown, std::slice::from_ref(&owner), 0)
            .await,
        "add_members",
    );
    assert_not_found(
        store
            .set_marker(unknown, &owner, ReceiptKind::Read, 1)
            .await,
        "set_marker",
    );
    // The trait does not say whether a member lookup in an unknown conversation is an error.
    let member = store.member(unknown, &owner).await;
    assert!(
        matches!(member, Ok(None) | Err(Error::NotFound(_))),
        "member of unknown conversation: {member:?}"
    );
}

/// A direct conversation: same pair in either order (and with duplicates) is one conversation,
/// also when created concurrently; wrong member counts are `Invalid`.
pub async fn direct_conversations_are_deduplicated_and_validated(store: &DynMessageStore) {
    let fx = Arc::new(Fixture::new());
    let (a, b, c) = (fx.user("a"), fx.user("b"), fx.user("c"));

    let d1 = fx.direct(&**store, &a, &b).await;
    assert_eq!(d1.kind, ConversationKind::Direct);
    let mut members: Vec<(UserId, Role)> = d1
        .members
        .iter()
        .map(|m| (m.user_id.clone(), m.role))
        .collect();
    members.sort();
    let mut expected = vec![(a.clone(), Role::Member), (b.clone(), Role::Member)];
    expected.sort();
    assert_eq!(members, expected);

    let d2 = fx.direct(&**store, &b, &a).await;
    assert_eq!(d2.id, d1.id, "reversed pair");
    let mut again = fx.new_direct(&a, &b);
    again.members = vec![b.clone(), a.clone(), b.clone()];
    assert_eq!(
        store.create_conversation(again).await.unwrap().id,
        d1.id,
        "duplicates"
    );
    assert_eq!(
        store
            .conversation(d1.id)
            .await
            .unwrap()
            .unwrap()
            .members
            .len(),
        2
    );

    for members in [vec![], vec![a.clone()], vec![b.clone(), c.clone()]] {
        let mut bad = fx.new_direct(&a, &b);
        bad.members = members.clone();
        let r = store.create_conversation(bad.clone()).await;
        assert!(
            matches!(r, Err(Error::Invalid(_))),
            "direct with members {members:?}: {r:?}"
        );
        assert_eq!(store.conversation(bad.id).await.unwrap(), None);
    }

    // A fresh pair, created concurrently from both sides.
    let (x, y) = (fx.user("x"), fx.user("y"));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (store, fx) = (store.clone(), fx.clone());
            let (from, to) = if i % 2 == 0 {
                (x.clone(), y.clone())
            } else {
                (y.clone(), x.clone())
            };
            tokio::spawn(async move { fx.direct(&*store, &from, &to).await.id })
        })
        .collect();
    let mut ids = HashSet::new();
    for h in handles {
        ids.insert(h.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "concurrent creations of one pair: {ids:?}");
    let id = *ids.iter().next().unwrap();
    assert_eq!(store.conversation_ids(&x).await.unwrap(), vec![id]);
    assert_eq!(store.conversation_ids(&y).await.unwrap(), vec![id]);
    let listed = store.list_conversations(&a, None, 100).await.unwrap();
    assert_eq!(view_ids(&listed), vec![d1.id]);
}

/// Group roles (creator owner, deduped members), adding (only new users returned, markers at
/// the current end) and removing members (no more access, gone from the user's lists).
pub async fn group_roles_and_membership_changes(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (owner, m1, m2, m3) = (
        fx.user("owner"),
        fx.user("m1"),
        fx.user("m2"),
        fx.user("m3"),
    );
    let conv = store
        .create_conversation(
            fx.new_group(&owner, &[m1.clone(), m2.clone(), m1.clone(), owner.clone()]),
        )
        .await
        .unwrap();
    let mut roles: Vec<(UserId, Role)> = conv
        .members
        .iter()
        .map(|m| (m.user_id.clone(), m.role))
        .collect();
    roles.sort();
    let mut expected = vec![
        (owner.clone(), Role::Owner),
        (m1.clone(), Role::Member),
        (m2.clone(), Role::Member),
    ];
    expected.sort();
    assert_eq!(roles, expected, "creator owner, members deduped");
    assert_eq!(
        store.member(conv.id, &owner).await.unwrap().unwrap().role,
        Role::Owner
    );

    let alone = store
        .create_conversation(fx.new_group(&m3, &[]))
        .await
        .unwrap();
    assert_eq!(alone.members.len(), 1);
    assert_eq!(alone.members[0].role, Role::Owner);

    for i in 0..3 {
        fx.send(&**store, conv.id, &owner, &format!("before m3 {i}"))
            .await;
    }
    let added = store
        .add_members(conv.id, &[m3.clone(), m1.clone(), m3.clone()], 4242)
        .await
        .unwrap();
    assert_eq!(
        user_ids(added),
        vec![m3.clone()],
        "only users that were not members"
    );
    let member = store.member(conv.id, &m3).await.unwrap().unwrap();
    assert_eq!(member.role, Role::Member);
    assert_eq!(member.joined_at, 4242);
    assert_eq!((member.last_read_seq, member.last_delivered_seq), (3, 3));
    assert_eq!(
        store.unread(conv.id, &m3).await.unwrap(),
        0,
        "no unread history before joining"
    );
    assert!(
        store
            .add_members(conv.id, std::slice::from_ref(&m3), 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .conversation_ids(&m3)
            .await
            .unwrap()
            .contains(&conv.id)
    );
    fx.send(&**store, conv.id, &m3, "m3 is here").await;
    assert_eq!(store.unread(conv.id, &m1).await.unwrap(), 4);

    assert!(store.remove_member(conv.id, &m1).await.unwrap().is_some());
    assert!(
        store.remove_member(conv.id, &m1).await.unwrap().is_none(),
        "second removal"
    );
    assert!(
        store
            .remove_member(conv.id, &fx.user("never"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.member(conv.id, &m1).await.unwrap(), None);
    let now = store.conversation(conv.id).await.unwrap().unwrap();
    assert!(now.member(&m1).is_none());
    assert_eq!(now.members.len(), 3);
    assert_not_member(
        store
            .append(fx.new_message(conv.id, &m1, &fx.client_msg_id(), "still here?"))
            .await,
        conv.id,
        "append after removal",
    );
    assert_not_member(
        store.set_marker(conv.id, &m1, ReceiptKind::Read, 1).await,
        conv.id,
        "set_marker after removal",
    );
    assert!(
        !store
            .conversation_ids(&m1)
            .await
            .unwrap()
            .contains(&conv.id)
    );
    let list = store.list_conversations(&m1, None, 100).await.unwrap();
    assert!(!view_ids(&list).contains(&conv.id));
    assert_eq!(
        store.last_seq(conv.id).await.unwrap(),
        4,
        "no message stored by the removed"
    );

    // Others are unaffected; new messages move the conversation in their lists only.
    fx.send(&**store, conv.id, &m2, "after").await;
    let list = store.list_conversations(&m2, None, 100).await.unwrap();
    assert_eq!(view_ids(&list), vec![conv.id]);
    assert!(
        store
            .list_conversations(&m1, None, 100)
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Re-adding works.
    assert_eq!(
        store
            .add_members(conv.id, std::slice::from_ref(&m1), 5)
            .await
            .map(user_ids)
            .unwrap(),
        vec![m1.clone()]
    );
    fx.send(&**store, conv.id, &m1, "back").await;
    assert_eq!(
        view_ids(&store.list_conversations(&m1, None, 100).await.unwrap()),
        vec![conv.id]
    );
}

/// Markers only move forward, are clamped to the last seq, and reading implies delivery.
pub async fn markers_move_forward_only_and_are_clamped(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (a, b) = (fx.user("a"), fx.user("b"));
    let conv = fx.direct(&**store, &a, &b).await;
    let mark = async |kind, seq| {
        store
            .set_marker(conv.id, &a, kind, seq)
            .await
            .map(|u| (u.seq, u.moved))
    };
    let up = |seq, moved| (seq, moved);
    use ReceiptKind::{Delivered, Read};

    assert_eq!(
        mark(Read, 5).await.unwrap(),
        up(0, false),
        "empty conversation clamps to 0"
    );
    for i in 0..10 {
        fx.send(&**store, conv.id, &b, &format!("m{i}")).await;
    }
    assert_eq!(mark(Delivered, 4).await.unwrap(), up(4, true));
    let m = store.member(conv.id, &a).await.unwrap().unwrap();
    assert_eq!(
        (m.last_read_seq, m.last_delivered_seq),
        (0, 4),
        "delivered alone"
    );

    assert_eq!(mark(Read, 5).await.unwrap(), up(5, true));
    assert_eq!(
        mark(Read, 3).await.unwrap(),
        up(5, false),
        "never backwards"
    );
    assert_eq!(
        mark(Read, 5).await.unwrap(),
        up(5, false),
        "same seq is no move"
    );
    let m = store.member(conv.id, &a).await.unwrap().unwrap();
    assert_eq!(
        (m.last_read_seq, m.last_delivered_seq),
        (5, 5),
        "read implies delivered"
    );
    assert_eq!(mark(Delivered, 3).await.unwrap(), up(5, false));
    assert_eq!(mark(Delivered, 8).await.unwrap(), up(8, true));
    let m = store.member(conv.id, &a).await.unwrap().unwrap();
    assert_eq!((m.last_read_seq, m.last_delivered_seq), (5, 8));

    assert_eq!(
        mark(Read, 100).await.unwrap(),
        up(10, true),
        "clamped to last seq"
    );
    assert_eq!(mark(Delivered, u64::MAX).await.unwrap(), up(10, false));
    let m = store.member(conv.id, &a).await.unwrap().unwrap();
    assert_eq!((m.last_read_seq, m.last_delivered_seq), (10, 10));

    fx.send(&**store, conv.id, &b, "eleven").await;
    assert_eq!(mark(Read, 11).await.unwrap(), up(11, true));
    // b's markers are untouched by a's.
    let mb = store.member(conv.id, &b).await.unwrap().unwrap();
    assert_eq!((mb.last_read_seq, mb.last_delivered_seq), (0, 0));

    assert_not_member(
        store
            .set_marker(conv.id, &fx.user("outsider"), Read, 1)
            .await,
        conv.id,
        "set_marker by outsider",
    );
    assert_not_found(
        store.set_marker(fx.conversation_id(), &a, Read, 1).await,
        "set_marker on unknown conversation",
    );
}

/// Unread counts only others' messages after the read marker that are not deleted.
pub async fn unread_counts_others_undeleted_messages(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (conv, users) = fx.group(&**store, 3).await;
    let (a, b, c) = (&users[0], &users[1], &users[2]);
    let order = [b, a, c, b, c, a, b, c, b]; // b×4, a×2, c×3
    let mut sent = Vec::new();
    for (i, u) in order.iter().enumerate() {
        sent.push(fx.send(&**store, conv.id, u, &format!("m{i}")).await);
    }
    let unread = async |u: &UserId| store.unread(conv.id, u).await;
    assert_eq!(unread(a).await.unwrap(), 7);
    assert_eq!(unread(b).await.unwrap(), 5);
    assert_eq!(unread(c).await.unwrap(), 6);

    store
        .set_marker(conv.id, a, ReceiptKind::Read, 4)
        .await
        .unwrap();
    // After seq 4: c, a, b, c, b → 4 from others.
    assert_eq!(unread(a).await.unwrap(), 4);
    // Delivered does not change unread.
    store
        .set_marker(conv.id, a, ReceiptKind::Delivered, 9)
        .await
        .unwrap();
    assert_eq!(unread(a).await.unwrap(), 4);

    let del = async |m: &Message| {
        store
            .change_message(
                conv.id,
                m.message_id,
                &m.sender_id,
                MessageChange::Delete,
                1,
            )
            .await
    };
    del(&sent[6]).await.unwrap(); // b's, after a's marker
    assert_eq!(unread(a).await.unwrap(), 3, "deleted after the marker");
    del(&sent[0]).await.unwrap(); // b's, before a's marker
    assert_eq!(unread(a).await.unwrap(), 3, "deleted before the marker");
    del(&sent[5]).await.unwrap(); // a's own
    assert_eq!(unread(a).await.unwrap(), 3, "own deleted message");
    assert_eq!(unread(b).await.unwrap(), 4, "b: a×2 + c×3 − a's deleted");
    assert_eq!(unread(c).await.unwrap(), 3, "c: b×4 + a×2 − 3 deleted");
    // Editing does not change it.
    store
        .change_message(
            conv.id,
            sent[7].message_id,
            c,
            MessageChange::Edit {
                content: "edited".into(),
            },
            2,
        )
        .await
        .unwrap();
    assert_eq!(unread(a).await.unwrap(), 3);

    store
        .set_marker(conv.id, a, ReceiptKind::Read, 9)
        .await
        .unwrap();
    assert_eq!(unread(a).await.unwrap(), 0, "all read");
    fx.send(&**store, conv.id, a, "mine").await;
    assert_eq!(unread(a).await.unwrap(), 0, "own messages never unread");
    fx.send(&**store, conv.id, b, "theirs").await;
    assert_eq!(unread(a).await.unwrap(), 1);
}

/// Edits and deletes: versions, `edited_at`, tombstones in history, `Forbidden` for others,
/// `NotFound` for unknown ids or the wrong conversation, no change to a deleted message.
pub async fn edit_and_delete_messages(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (a, b) = (fx.user("a"), fx.user("b"));
    let conv = fx.direct(&**store, &a, &b).await;
    let other = fx.direct(&**store, &a, &fx.user("c")).await;

    let mut img = fx.new_message(conv.id, &a, "img", "caption");
    img.kind = MessageKind::Image;
    img.media = Some(Media {
        url: "https://cdn.example.com/x.jpg".into(),
        mime: "image/jpeg".into(),
        size: 10,
        name: None,
    });
    let m1 = store.append(img).await.unwrap().message;
    let m2 = fx.send(&**store, conv.id, &a, "typo").await;
    let m3 = fx.send(&**store, conv.id, &b, "b's").await;
    let in_other = fx.send(&**store, other.id, &a, "elsewhere").await;
    let change = async |id, by: &UserId, ch, now| {
        store
            .change_message(conv.id, id, by, ch, now)
            .await
            .map(|u| u.message)
    };
    let edit = |s: &str| MessageChange::Edit { content: s.into() };

    let e1 = change(m2.message_id, &a, edit("fixed"), 1_000)
        .await
        .unwrap();
    assert_eq!(
        (e1.version, e1.edited_at, e1.content.as_str()),
        (2, Some(1_000), "fixed")
    );
    assert_eq!(
        (e1.seq, e1.message_id, e1.deleted),
        (m2.seq, m2.message_id, false)
    );
    assert_eq!(e1.created_at, m2.created_at);
    assert_eq!(
        store.message(conv.id, m2.message_id).await.unwrap(),
        Some(e1.clone())
    );

    let d = change(m2.message_id, &a, MessageChange::Delete, 2_000)
        .await
        .unwrap();
    assert_eq!((d.version, d.edited_at, d.deleted), (3, Some(2_000), true));
    assert!(d.content.is_empty());
    assert_eq!(
        store.message(conv.id, m2.message_id).await.unwrap(),
        Some(d.clone())
    );

    let d1 = change(m1.message_id, &a, MessageChange::Delete, 3_000)
        .await
        .unwrap();
    assert_eq!((d1.version, d1.deleted, d1.media.clone()), (2, true, None));
    assert!(d1.content.is_empty());
    assert_eq!(d1.kind, MessageKind::Image);

    let history = store.history(conv.id, None, 10).await.unwrap();
    assert_eq!(
        history,
        vec![m3.clone(), d.clone(), d1.clone()],
        "tombstones in history"
    );
    let after = store.messages_after(conv.id, 0, 10).await.unwrap();
    assert_eq!(after, vec![d1.clone(), d.clone(), m3.clone()]);
    assert_eq!(
        store.last_seq(conv.id).await.unwrap(),
        3,
        "no new seq for edits"
    );

    // Another user: Forbidden, nothing changes.
    let r = change(m3.message_id, &a, edit("not mine"), 4_000).await;
    assert!(
        matches!(r, Err(Error::Forbidden(_))),
        "edit by other: {r:?}"
    );
    let r = change(m3.message_id, &a, MessageChange::Delete, 4_000).await;
    assert!(
        matches!(r, Err(Error::Forbidden(_))),
        "delete by other: {r:?}"
    );
    assert_eq!(
        store.message(conv.id, m3.message_id).await.unwrap(),
        Some(m3.clone())
    );

    // Unknown id, wrong conversation, unknown conversation: NotFound.
    assert_not_found(
        change(fx.message_id(), &a, edit("x"), 1).await,
        "unknown id",
    );
    assert_not_found(
        change(in_other.message_id, &a, edit("x"), 1).await,
        "wrong conversation",
    );
    assert_eq!(
        store.message(conv.id, in_other.message_id).await.unwrap(),
        None
    );
    assert_not_found(
        store
            .change_message(fx.conversation_id(), m3.message_id, &b, edit("x"), 1)
            .await,
        "unknown conversation",
    );

    // A deleted message stays deleted.
    let r = change(m2.message_id, &a, edit("resurrect"), 5_000).await;
    assert!(
        matches!(r, Err(Error::Invalid(_))),
        "edit of deleted: {r:?}"
    );
    let r = change(m2.message_id, &a, MessageChange::Delete, 5_000).await;
    assert!(
        matches!(r, Err(Error::Invalid(_))),
        "delete of deleted: {r:?}"
    );
    assert_eq!(
        store.message(conv.id, m2.message_id).await.unwrap(),
        Some(d)
    );

    // b's edits bump b's message.
    let e3 = change(m3.message_id, &b, edit("b2"), 6_000).await.unwrap();
    let e3b = change(m3.message_id, &b, edit("b3"), 7_000).await.unwrap();
    assert_eq!(
        (e3.version, e3b.version, e3b.edited_at),
        (2, 3, Some(7_000))
    );
    assert_eq!(in_other.version, 1);
}

/// The conversation list: most recent activity first after shuffled, interleaved appends;
/// every page size walks the same order once; `next` is `None` on the last page.
pub async fn list_conversations_orders_by_activity_and_pages(store: &DynMessageStore) {
    let fx = Fixture::new();
    let alice = fx.user("alice");
    let friends = fx.users("f", 4);
    let mut convs: Vec<Conversation> = Vec::new();
    for i in 0..3 {
        let conv = store
            .create_conversation(
                fx.new_group(&friends[i], &[alice.clone(), friends[i + 1].clone()]),
            )
            .await
            .unwrap();
        convs.push(conv);
    }
    convs.push(fx.direct(&**store, &alice, &friends[0]).await);
    convs.push(fx.direct(&**store, &friends[3], &alice).await);
    // Not alice's.
    let not_hers = store
        .create_conversation(fx.new_group(&friends[0], &[friends[1].clone()]))
        .await
        .unwrap();

    let mut activity: HashMap<ConversationId, u64> = HashMap::new();
    let mut last: HashMap<ConversationId, Message> = HashMap::new();
    for c in &convs {
        assert_eq!(c.last_activity, c.id.get());
        activity.insert(c.id, c.last_activity);
    }
    let expected = |activity: &HashMap<ConversationId, u64>| {
        let mut v: Vec<(u64, ConversationId)> = activity.iter().map(|(&c, &a)| (a, c)).collect();
        v.sort_unstable_by(|x, y| y.cmp(x));
        v.into_iter().map(|(_, c)| c).collect::<Vec<_>>()
    };
    assert_eq!(
        walk_list(store, &alice, 100).await,
        expected(&activity),
        "before any message"
    );

    let send_round = async |convs: &[Conversation],
                            activity: &mut HashMap<ConversationId, u64>,
                            last: &mut HashMap<ConversationId, Message>| {
        let mut order: Vec<&Conversation> = convs.iter().collect();
        shuffle(&mut order);
        let take = 2 + (random_u64() as usize % (order.len() - 1));
        for (i, c) in order.into_iter().take(take).enumerate() {
            let sender = if i % 2 == 0 {
                &alice
            } else {
                &c.members[0].user_id
            };
            let m = fx.send(&**store, c.id, sender, "hi").await;
            activity.insert(c.id, m.message_id.get());
            last.insert(c.id, m);
        }
    };
    send_round(&convs, &mut activity, &mut last).await;
    // An empty conversation created now sits between older and newer activity.
    convs.push(
        store
            .create_conversation(fx.new_group(&alice, &[friends[2].clone()]))
            .await
            .unwrap(),
    );
    activity.insert(convs[5].id, convs[5].id.get());
    let (with_messages, _) = convs.split_at(5);
    send_round(with_messages, &mut activity, &mut last).await;
    send_round(with_messages, &mut activity, &mut last).await;
    fx.send(&**store, not_hers.id, &friends[1], "unrelated")
        .await;

    let want = expected(&activity);
    assert_eq!(want.len(), 6);
    let full = store.list_conversations(&alice, None, 100).await.unwrap();
    assert_eq!(view_ids(&full), want, "most recent activity first");
    assert_eq!(full.next, None);
    for v in &full.items {
        let id = v.conversation.id;
        assert_eq!(v.conversation.last_activity, activity[&id]);
        assert_eq!(v.last_message.as_ref(), last.get(&id));
        assert_eq!(v.conversation.last_seq, last.get(&id).map_or(0, |m| m.seq));
        assert!(v.conversation.member(&alice).is_some());
    }
    for limit in [1, 2, 3, 4, 5, 6, 7] {
        assert_eq!(
            walk_list(store, &alice, limit).await,
            want,
            "page size {limit}"
        );
    }
    // 6 conversations in pages of 2 and 3: the last page is full and has no next.
    let p = store
        .list_conversations(&alice, Some(activity[&want[3]]), 2)
        .await
        .unwrap();
    assert_eq!(view_ids(&p), want[4..]);
    assert_eq!(p.next, None, "exact multiple: no next on the last page");
    let p = store
        .list_conversations(&alice, Some(activity[&want[5]]), 2)
        .await
        .unwrap();
    assert!(p.items.is_empty() && p.next.is_none(), "after the oldest");
    let p = store.list_conversations(&alice, None, 0).await.unwrap();
    assert!(p.items.is_empty(), "limit 0");
    let p = store
        .list_conversations(&alice, None, usize::MAX)
        .await
        .unwrap();
    assert_eq!(view_ids(&p), want);

    let mut ids = store.conversation_ids(&alice).await.unwrap();
    ids.sort_unstable();
    let mut want_sorted = want.clone();
    want_sorted.sort_unstable();
    assert_eq!(ids, want_sorted);

    // The oldest one jumps to the top on a new message.
    let oldest = want[5];
    fx.send(&**store, oldest, &alice, "bump").await;
    let top = store.list_conversations(&alice, None, 1).await.unwrap();
    assert_eq!(view_ids(&top), vec![oldest]);
    assert!(top.next.is_some());
    assert!(
        store
            .list_conversations(&fx.user("nobody"), None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// Views in the conversation list carry the user's unread count and the newest message
/// (a tombstone when it was deleted).
pub async fn list_conversations_views_carry_unread_and_last_message(store: &DynMessageStore) {
    let fx = Fixture::new();
    let (alice, bob) = (fx.user("alice"), fx.user("bob"));
    let conv = fx.direct(&**store, &alice, &bob).await;
    let view = async |u: &UserId| {
        let page = store.list_conversations(u, None, 10).await.unwrap();
        assert_eq!(view_ids(&page), vec![conv.id]);
        page.items.into_iter().next().unwrap()
    };
    let v = view(&alice).await;
    assert_eq!((v.unread, v.last_message), (0, None));

    let mut from_bob = Vec::new();
    for i in 0..3 {
        from_bob.push(fx.send(&**store, conv.id, &bob, &format!("b{i}")).await);
    }
    let mine = fx.send(&**store, conv.id, &alice, "a0").await;
    let v = view(&alice).await;
    assert_eq!(v.unread, 3);
    assert_eq!(v.last_message, Some(mine.clone()));
    assert_eq!(v.conversation.last_seq, 4);
    assert_eq!(view(&bob).await.unread, 1);

    store
        .change_message(
            conv.id,
            from_bob[1].message_id,
            &bob,
            MessageChange::Delete,
            9,
        )
        .await
        .unwrap();
    assert_eq!(view(&alice).await.unread, 2);
    let tomb = store
        .change_message(conv.id, mine.message_id, &alice, MessageChange::Delete, 10)
        .await
        .unwrap()
        .message;
    let v = view(&alice).await;
    assert_eq!(
        v.last_message,
        Some(tomb.clone()),
        "newest message, tombstone included"
    );
    assert!(v.last_message.unwrap().deleted);
    assert_eq!(
        view(&bob).await.unread,
        0,
        "deleted messages are not unread"
    );

    store
        .set_marker(conv.id, &alice, ReceiptKind::Read, 4)
        .await
        .unwrap();
    assert_eq!(view(&alice).await.unread, 0);
}

/// Concurrent appends to many conversations with overlapping members: afterwards every user's
/// list is exactly their conversations, ordered by the id of each one's newest message.
pub async fn concurrent_appends_keep_conversation_lists_ordered(store: &DynMessageStore) {
    const CONVS: usize = 12;
    const TASKS_PER_CONV: usize = 4;
    const PER_TASK: usize = 25;
    let fx = Arc::new(Fixture::new());
    let users = fx.users("u", 6);
    let mut convs = Vec::new();
    for i in 0..CONVS {
        let mut members = users.clone();
        shuffle(&mut members);
        members.truncate(2 + i % 4);
        convs.push(
            store
                .create_conversation(fx.new_group(&members[0], &members[1..]))
                .await
                .unwrap(),
        );
    }
    let mut handles = Vec::new();
    for c in &convs {
        for t in 0..TASKS_PER_CONV {
            let (store, fx) = (store.clone(), fx.clone());
            let conv = c.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let sender = &conv.members[(t + i) % conv.members.len()].user_id;
                    fx.send(&*store, conv.id, sender, "x").await;
                }
            }));
        }
    }
    for h in handles {
        h.await.unwrap();
    }

    let per_conv = (TASKS_PER_CONV * PER_TASK) as u64;
    let mut newest: HashMap<ConversationId, Message> = HashMap::new();
    for c in &convs {
        let last = store.history(c.id, None, 1).await.unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].seq, per_conv);
        newest.insert(c.id, last[0].clone());
    }
    for u in &users {
        let mut mine: Vec<(u64, ConversationId)> = convs
            .iter()
            .filter(|c| c.member(u).is_some())
            .map(|c| (newest[&c.id].message_id.get(), c.id))
            .collect();
        mine.sort_unstable_by(|x, y| y.cmp(x));
        let want: Vec<ConversationId> = mine.into_iter().map(|(_, c)| c).collect();
        let page = store.list_conversations(u, None, 1000).await.unwrap();
        assert_eq!(view_ids(&page), want, "list of {u}");
        for v in &page.items {
            let m = &newest[&v.conversation.id];
            assert_eq!(v.conversation.last_activity, m.message_id.get());
            assert_eq!(v.conversation.last_seq, per_conv);
            assert_eq!(v.last_message.as_ref(), Some(m));
        }
        assert_eq!(walk_list(store, u, 3).await, want, "paged list of {u}");
        let ids: HashSet<ConversationId> = store
            .conversation_ids(u)
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(ids, want.iter().copied().collect::<HashSet<_>>());
    }
}

// ------------------------------------------------------------------- several nodes

/// For distributed backends (not in the macro: it needs two stores on one backend, as two
/// chat nodes would have): `tasks_per_node` tasks on each of `node_a` and `node_b` append
/// `per_task` messages each to one conversation concurrently. Each task sees its own seqs
/// increase and its messages stored as sent; together the seqs are exactly 1..=N; both nodes
/// read the same timeline and the same last seq.
pub async fn two_nodes_append_gap_free(
    node_a: DynMessageStore,
    node_b: DynMessageStore,
    tasks_per_node: usize,
    per_task: usize,
) {
    let fx = Arc::new(Fixture::new());
    let (conv, users) = fx.group(&*node_a, 4).await;
    let mut handles = Vec::new();
    for t in 0..2 * tasks_per_node {
        let store = if t % 2 == 0 {
            node_a.clone()
        } else {
            node_b.clone()
        };
        let (fx, sender) = (fx.clone(), users[t % users.len()].clone());
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..per_task {
                let new = fx.new_message(conv.id, &sender, &format!("{t}-{i}"), "x");
                let a = store.append(new.clone()).await.unwrap();
                assert!(!a.duplicate);
                assert_eq!(a.message, new.into_message(a.message.seq));
                seqs.push(a.message.seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        let seqs = h.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    all.sort_unstable();
    let total = (2 * tasks_per_node * per_task) as u64;
    assert_eq!(
        all,
        (1..=total).collect::<Vec<_>>(),
        "gap-free across nodes"
    );
    let from_a = node_a.messages_after(conv.id, 0, usize::MAX).await.unwrap();
    let from_b = node_b.messages_after(conv.id, 0, usize::MAX).await.unwrap();
    assert_eq!(from_a.len() as u64, total);
    assert_eq!(from_a, from_b);
    assert_eq!(node_b.last_seq(conv.id).await.unwrap(), total);
}

// -------------------------------------------------------------------------------- macro

/// Expands the [`MessageStore`] conformance suite ([`crate::testing::store`]) into one
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 4)]` per case, named after the case.
///
/// The shape is the same for the three suites ([`crate::store_conformance_tests`],
/// [`crate::presence_conformance_tests`], [`crate::router_conformance_tests`]): an optional
/// `with_guard,` then a **factory closure** from the suite's inputs (none here) to a future of
/// the part, called once per test:
///
/// ```
/// use std::sync::Arc;
/// use chat_core::memory::MemoryStore;
/// use chat_core::store::DynMessageStore;
///
/// mod memory {
///     use super::*;
///     chat_core::store_conformance_tests!(|| async { Arc::new(MemoryStore::new()) as DynMessageStore });
/// }
///
/// // A backend that needs setup passes an async fn (e.g. connect to the test server and pick
/// // a random key prefix). One whose store needs something kept alive while the case runs (a
/// // test server process, a temporary directory) returns `(store, guard)` in the `with_guard`
/// // form; the guard is dropped after the case.
/// mod with_guard {
///     use super::*;
///     async fn fresh_store() -> (DynMessageStore, std::path::PathBuf) {
///         (Arc::new(MemoryStore::new()), std::env::temp_dir())
///     }
///     chat_core::store_conformance_tests!(with_guard, fresh_store);
/// }
/// # fn main() {}
/// ```
///
/// Invoke it inside a module to run the suite for several backends in one test crate. The
/// calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! store_conformance_tests {
    (with_guard, $factory:expr $(,)?) => {
        $crate::store_conformance_tests!(@all (guard) ($factory));
    };
    ($factory:expr $(,)?) => {
        $crate::store_conformance_tests!(@all (plain) ($factory));
    };
    (@all ($mode:ident) ($factory:expr)) => {
        $crate::store_conformance_tests!(@cases ($mode) ($factory)
            append_assigns_gap_free_seqs_under_concurrency,
            append_is_idempotent_under_concurrent_retries,
            append_rejects_non_members_and_unknown_conversations,
            append_stores_every_field,
            history_pagination_boundaries,
            messages_after_pagination_boundaries,
            create_and_read_conversations,
            direct_conversations_are_deduplicated_and_validated,
            group_roles_and_membership_changes,
            markers_move_forward_only_and_are_clamped,
            unread_counts_others_undeleted_messages,
            edit_and_delete_messages,
            list_conversations_orders_by_activity_and_pages,
            list_conversations_views_carry_unread_and_last_message,
            concurrent_appends_keep_conversation_lists_ordered,
        );
    };
    (@cases (plain) ($factory:expr) @in $module:ident $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let store: $crate::store::DynMessageStore = ($factory)().await;
                $crate::testing::$module::$case(&store).await;
            }
        )*
    };
    (@cases (guard) ($factory:expr) @in $module:ident $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                // The guard (e.g. the test server the store talks to) lives until the case ends.
                let (store, guard): ($crate::store::DynMessageStore, _) = ($factory)().await;
                $crate::testing::$module::$case(&store).await;
                drop(store);
                drop(guard);
            }
        )*
    };
    (@cases ($mode:ident) ($factory:expr) $($case:ident),* $(,)?) => {
        $crate::store_conformance_tests!(@cases ($mode) ($factory) @in store $($case),*);
    };
}
