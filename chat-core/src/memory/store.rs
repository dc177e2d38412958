//! In-memory [`MessageStore`]: the embedded default.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use foldhash::fast::RandomState;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::id::{ConversationId, MessageId, UserId};
use crate::model::{
    Change, ChangePage, Conversation, ConversationKind, ConversationView, Member, Message,
    MessageChange, NewConversation, NewMessage, Page, ReceiptKind, Role, StreamPosition,
    apply_reaction, direct_key,
};
use crate::store::{Appended, MarkerUpdate, MembershipUpdate, MessageStore, MessageUpdate};

/// Number of conversation-map shards and user-index shards (a power of two).
const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// One conversation behind its own lock.
type ConvCell = Arc<Mutex<ConvState>>;

/// A user's conversations ordered by `last_activity`, most recent first. Unique keys: the
/// activity value is a Snowflake, the conversation id breaks any tie.
type UserIndex = BTreeSet<(Reverse<u64>, ConversationId)>;

/// A concurrent, in-process [`MessageStore`]: the embedded default of `chat-core`.
///
/// Fast and correct for a single process, but **everything is lost on restart**; use the Redis
/// or ScyllaDB stores of `chat-store` for durability and for several nodes.
///
/// ```
/// use chat_core::memory::MemoryStore;
/// use chat_core::model::{ConversationKind, MessageKind, NewConversation, NewMessage};
/// use chat_core::id::{NodeId, SnowflakeGenerator};
/// use chat_core::{MessageStore, UserId};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::Error> {
/// let store = MemoryStore::new();
/// let ids = SnowflakeGenerator::new(NodeId::ZERO);
/// let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
/// let conv = store
///     .create_conversation(NewConversation {
///         id: ids.conversation_id(),
///         kind: ConversationKind::Direct,
///         name: None,
///         creator: alice.clone(),
///         members: vec![bob.clone()],
///         created_at: 0,
///     })
///     .await?;
/// let new = NewMessage {
///     message_id: ids.message_id(),
///     conversation_id: conv.id,
///     sender_id: alice.clone(),
///     client_msg_id: "m1".into(),
///     kind: MessageKind::Text,
///     content: "hi".into(),
///     media: None,
///     reply_to: None,
///     created_at: 0,
/// };
/// let first = store.append(new.clone()).await?;
/// assert_eq!((first.message.seq, first.duplicate), (1, false));
/// // A retry of the same client_msg_id returns the original message.
/// let retry = store.append(NewMessage { message_id: ids.message_id(), ..new }).await?;
/// assert_eq!((retry.message.message_id, retry.duplicate), (first.message.message_id, true));
/// assert_eq!(store.unread(conv.id, &bob).await?, 1);
/// # Ok(()) }
/// ```
///
/// # Design
///
/// * Conversations live in sharded maps; each conversation has its own [`Mutex`], held for the
///   whole of an append (membership check, idempotency lookup, seq assignment, write), which is
///   what makes seqs gap-free. Appends to different conversations only share a brief read lock
///   on one of the map shards. No lock is ever held across an `.await`.
/// * Every user has an index of their conversations by `last_activity` (sharded by user), so
///   [`list_conversations`](MessageStore::list_conversations) reads one page without looking at
///   the user's other conversations, let alone the rest of the store. An append moves the
///   conversation in the index of each member while it still holds the conversation's lock, so
///   an index entry always carries the conversation's current `last_activity`.
///   Lock order: direct-pair map → conversation map shard → conversation → user index shard.
/// * Unread counts are O(log n): per sender the sorted seqs of their messages and of their
///   deleted messages, plus the sorted seqs of all deleted messages.
/// * The change stream is compacted: each thing that changed (a message, a member's markers,
///   a member's membership) has one entry, at the position of its latest change, in a map
///   ordered by position. A replay is a range read of that map; its memory is one entry per
///   message plus two per member who ever changed, whatever the number of changes.
///
/// # Semantics beyond the trait
///
/// * Members added later (and direct members restored by `create_conversation`) start with both
///   markers at the conversation's current `last_seq`: history from before they joined does not
///   count as unread.
/// * Setting the read marker to N also moves the delivered marker to at least N (read implies
///   delivered).
/// * A direct conversation keeps its pair: `add_members` with anyone else is
///   [`Error::Invalid`]; if one of the pair left, creating the direct conversation again
///   restores them.
/// * Lookups on an unknown conversation ([`member`](MessageStore::member),
///   [`message`](MessageStore::message), `history`, `messages_after`, `unread`,
///   `remove_member`) are [`Error::NotFound`]; [`conversation`](MessageStore::conversation)
///   returns `None`.
/// * `unread` of a user who is not a member is [`Error::NotMember`].
/// * A `limit` of 0 returns an empty page (with `next: None` for `list_conversations`).
/// * `list_conversations` is not a snapshot: the page is cut from the user's index, then each
///   conversation is read as it is now. A conversation with a message newer than the page's
///   cursor shows its newer state (and comes first on the next listing from the top); one the
///   user left in between is skipped. `next` is always the index key of the page's last entry.
/// * A `NewConversation::id` already in use is [`Error::Conflict`]; so is a
///   `NewMessage::message_id` already used by another message of the conversation.
pub struct MemoryStore {
    /// Conversations, sharded by id so lookups of different conversations rarely meet.
    conversations: Box<[RwLock<HashMap<ConversationId, ConvCell>>]>,
    /// Per-user conversation index, sharded by user.
    users: Box<[Mutex<HashMap<UserId, UserIndex>>]>,
    /// [`direct_key`] → the direct conversation of that pair. Also serializes the creation of
    /// direct conversations, so two concurrent creations of one pair yield one conversation.
    directs: Mutex<HashMap<String, ConversationId>>,
    /// Picks the user shard.
    hasher: RandomState,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No lock taken: Debug must never block or dump a whole store.
        f.debug_struct("MemoryStore")
            .field("shards", &SHARDS)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-sender bookkeeping of one conversation.
#[derive(Debug, Default)]
struct SenderState {
    /// Idempotency keys: client_msg_id → seq.
    by_client: HashMap<String, u64>,
    /// Seqs of the sender's messages (ascending, appended in order).
    seqs: Vec<u64>,
    /// Seqs of the sender's deleted messages (ascending).
    deleted: Vec<u64>,
}

/// A member plus the order in which they joined (so `Conversation::members` lists the creator
/// first and the rest in join order).
#[derive(Debug)]
struct MemberSlot {
    member: Member,
    order: u64,
}

/// What a change-stream entry points at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Item {
    /// The message at this seq.
    Message(u64),
    /// A member's markers.
    Markers(UserId),
    /// A member's membership.
    Membership(UserId),
}

/// One conversation.
#[derive(Debug)]
struct ConvState {
    id: ConversationId,
    kind: ConversationKind,
    name: Option<String>,
    created_at: u64,
    /// The id of the newest message, or of the conversation while it is empty.
    last_activity: u64,
    /// The two users of a direct conversation (who may be re-added), `None` for a group.
    direct_pair: Option<[UserId; 2]>,
    members: HashMap<UserId, MemberSlot>,
    /// Next `MemberSlot::order`.
    next_order: u64,
    /// The timeline: `messages[i].seq == i + 1`.
    messages: Vec<Message>,
    /// message_id → seq.
    by_id: HashMap<MessageId, u64>,
    senders: HashMap<UserId, SenderState>,
    /// Seqs of all deleted messages (ascending).
    deleted: Vec<u64>,
    /// The change stream's epoch and newest position.
    stream: StreamPosition,
    /// The compacted change log: position → what changed there (its latest change).
    changes: BTreeMap<u64, Item>,
    /// `message_positions[seq - 1]`: the message's entry in `changes` (no hashing on the
    /// append path).
    message_positions: Vec<u64>,
    /// A member's markers or membership → its entry in `changes`.
    change_of: HashMap<Item, u64>,
}

impl ConvState {
    fn last_seq(&self) -> u64 {
        self.messages.len() as u64
    }

    fn message_at(&self, seq: u64) -> Option<&Message> {
        self.messages.get(to_index(seq.checked_sub(1)?))
    }

    /// The seq and the stored message of `id` (`NotFound`).
    fn message_mut(&mut self, id: MessageId) -> Result<(u64, &mut Message)> {
        let conversation = self.id;
        let not_found = || Error::not_found(format!("message {id} in conversation {conversation}"));
        let seq = *self.by_id.get(&id).ok_or_else(not_found)?;
        let message = seq
            .checked_sub(1)
            .and_then(|i| self.messages.get_mut(to_index(i)))
            .ok_or_else(not_found)?;
        Ok((seq, message))
    }

    /// Gives `item` the next position (moving its entry); returns it.
    fn record(&mut self, item: Item) -> u64 {
        self.stream.position += 1;
        let position = self.stream.position;
        let old = match &item {
            Item::Message(seq) => {
                let i = to_index(seq.saturating_sub(1));
                if i >= self.message_positions.len() {
                    self.message_positions.resize(i + 1, 0);
                }
                std::mem::replace(&mut self.message_positions[i], position)
            }
            _ => self.change_of.insert(item.clone(), position).unwrap_or(0),
        };
        if old != 0 {
            self.changes.remove(&old);
        }
        self.changes.insert(position, item);
        position
    }

    /// The current state of what `item` points at (`None`: nothing to replay, e.g. the
    /// markers of someone who left).
    fn resolve(&self, position: u64, item: &Item) -> Option<Change> {
        match item {
            Item::Message(seq) => self.message_at(*seq).map(|m| Change::Message {
                position,
                message: Box::new(m.clone()),
            }),
            Item::Markers(user) => self.members.get(user).map(|s| Change::Markers {
                position,
                user_id: user.clone(),
                delivered: s.member.last_delivered_seq,
                read: s.member.last_read_seq,
            }),
            Item::Membership(user) => Some(Change::Membership {
                position,
                user_id: user.clone(),
                member: self.members.contains_key(user),
            }),
        }
    }

    fn add_member(&mut self, user: UserId, role: Role, now: u64) {
        let last = self.last_seq();
        let order = self.next_order;
        self.next_order += 1;
        self.members.insert(
            user.clone(),
            MemberSlot {
                member: Member {
                    user_id: user,
                    role,
                    joined_at: now,
                    last_read_seq: last,
                    last_delivered_seq: last,
                },
                order,
            },
        );
    }

    fn snapshot(&self) -> Conversation {
        let mut slots: Vec<&MemberSlot> = self.members.values().collect();
        slots.sort_unstable_by_key(|s| s.order);
        Conversation {
            id: self.id,
            kind: self.kind,
            name: self.name.clone(),
            members: slots.into_iter().map(|s| s.member.clone()).collect(),
            created_at: self.created_at,
            last_seq: self.last_seq(),
            last_activity: self.last_activity,
        }
    }

    /// Messages after the user's read marker, from others, not deleted. O(log n).
    fn unread(&self, user: &UserId) -> Result<u64> {
        let member = self.members.get(user).ok_or(Error::NotMember(self.id))?;
        let last = self.last_seq();
        let read = member.member.last_read_seq.min(last);
        let (own, own_deleted) = self.senders.get(user).map_or((0, 0), |s| {
            (count_above(&s.seqs, read), count_above(&s.deleted, read))
        });
        let others_deleted = count_above(&self.deleted, read).saturating_sub(own_deleted);
        Ok((last - read)
            .saturating_sub(own)
            .saturating_sub(others_deleted))
    }
}

/// How many values of the ascending slice are greater than `x`.
fn count_above(sorted: &[u64], x: u64) -> u64 {
    (sorted.len() - sorted.partition_point(|&s| s <= x)) as u64
}

/// Inserts into an ascending vector (deletes are rare, so the shift is fine).
fn insert_sorted(sorted: &mut Vec<u64>, x: u64) {
    if let Err(pos) = sorted.binary_search(&x) {
        sorted.insert(pos, x);
    }
}

/// A seq or count as an index, saturating on 32-bit targets.
fn to_index(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

fn unknown(id: ConversationId) -> Error {
    Error::not_found(format!("conversation {id}"))
}

/// How an index entry changes.
#[derive(Clone, Copy)]
enum IndexOp {
    Insert(u64),
    Remove(u64),
    Move { from: u64, to: u64 },
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            conversations: (0..SHARDS).map(|_| RwLock::default()).collect(),
            users: (0..SHARDS).map(|_| Mutex::default()).collect(),
            directs: Mutex::default(),
            hasher: RandomState::default(),
        }
    }

    fn conv_shard(&self, id: ConversationId) -> &RwLock<HashMap<ConversationId, ConvCell>> {
        // Fibonacci hashing: the top bits of the product mix every bit of the Snowflake.
        let i = (id.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize;
        &self.conversations[i % SHARDS]
    }

    fn user_shard_index(&self, user: &UserId) -> usize {
        (self.hasher.hash_one(user) as usize) % SHARDS
    }

    fn user_shard(&self, user: &UserId) -> MutexGuard<'_, HashMap<UserId, UserIndex>> {
        lock(&self.users[self.user_shard_index(user)])
    }

    fn get(&self, id: ConversationId) -> Result<ConvCell> {
        read(self.conv_shard(id))
            .get(&id)
            .cloned()
            .ok_or_else(|| unknown(id))
    }

    /// Applies `op` for `conv` to the index of every user in `users`, taking each user shard
    /// once. Must be called with the conversation's lock held.
    fn update_index<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
        conv: ConversationId,
        op: IndexOp,
    ) {
        let mut targets: Vec<(usize, &UserId)> = users
            .into_iter()
            .map(|u| (self.user_shard_index(u), u))
            .collect();
        targets.sort_unstable_by_key(|&(shard, _)| shard);
        let mut i = 0;
        while i < targets.len() {
            let shard = targets[i].0;
            let mut map = lock(&self.users[shard]);
            while i < targets.len() && targets[i].0 == shard {
                let user = targets[i].1;
                i += 1;
                match op {
                    IndexOp::Insert(to) => {
                        map.entry(user.clone())
                            .or_default()
                            .insert((Reverse(to), conv));
                    }
                    IndexOp::Move { from, to } => {
                        // The hot path (every member on every append): no key clone when
                        // the user is indexed, which members always are.
                        if let Some(index) = map.get_mut(user) {
                            index.remove(&(Reverse(from), conv));
                            index.insert((Reverse(to), conv));
                        } else {
                            map.entry(user.clone())
                                .or_default()
                                .insert((Reverse(to), conv));
                        }
                    }
                    IndexOp::Remove(from) => {
                        let now_empty = map.get_mut(user).is_some_and(|index| {
                            index.remove(&(Reverse(from), conv));
                            index.is_empty()
                        });
                        if now_empty {
                            map.remove(user);
                        }
                    }
                }
            }
        }
    }

    /// Creates and publishes a conversation with `users` (the first one gets `first_role`).
    fn insert_new(
        &self,
        new: &NewConversation,
        users: &[UserId],
        first_role: Role,
        direct_pair: Option<[UserId; 2]>,
    ) -> Result<Conversation> {
        let mut state = ConvState {
            id: new.id,
            kind: new.kind,
            name: new.name.clone(),
            created_at: new.created_at,
            last_activity: new.id.get(),
            direct_pair,
            members: HashMap::with_capacity(users.len()),
            next_order: 0,
            messages: Vec::new(),
            by_id: HashMap::new(),
            senders: HashMap::new(),
            deleted: Vec::new(),
            stream: StreamPosition {
                epoch: StreamPosition::new_epoch(),
                position: 0,
            },
            changes: BTreeMap::new(),
            message_positions: Vec::new(),
            change_of: HashMap::new(),
        };
        for (i, user) in users.iter().enumerate() {
            let role = if i == 0 { first_role } else { Role::Member };
            state.add_member(user.clone(), role, new.created_at);
        }
        let cell: ConvCell = Arc::new(Mutex::new(state));
        // Hold the conversation's lock while publishing and indexing: anyone who finds it in
        // the map or an index waits until it is complete. (Taking the map lock after this
        // conversation's lock cannot deadlock: nobody else can reach it yet.)
        let guard = lock(&cell);
        match write(self.conv_shard(new.id)).entry(new.id) {
            Entry::Occupied(_) => {
                return Err(Error::Conflict(
                    format!("conversation id {} is already in use", new.id).into(),
                ));
            }
            Entry::Vacant(v) => {
                v.insert(cell.clone());
            }
        }
        self.update_index(users, new.id, IndexOp::Insert(guard.last_activity));
        Ok(guard.snapshot())
    }

    /// Adds the `users` that are not members yet (role `Member`, markers at `last_seq`),
    /// gives each join a position and indexes them; returns them.
    fn add_to(&self, state: &mut ConvState, users: &[UserId], now: u64) -> Vec<MembershipUpdate> {
        let mut added = Vec::new();
        for user in users {
            if !state.members.contains_key(user) {
                state.add_member(user.clone(), Role::Member, now);
                let position = state.record(Item::Membership(user.clone()));
                added.push(MembershipUpdate {
                    user_id: user.clone(),
                    position: Some(position),
                });
            }
        }
        self.update_index(
            added.iter().map(|a| &a.user_id),
            state.id,
            IndexOp::Insert(state.last_activity),
        );
        added
    }
}

#[async_trait]
impl MessageStore for MemoryStore {
    async fn append(&self, message: NewMessage) -> Result<Appended> {
        let id = message.conversation_id;
        let cell = self.get(id)?;
        let mut guard = lock(&cell);
        let st = &mut *guard;
        if !st.members.contains_key(&message.sender_id) {
            return Err(Error::NotMember(id));
        }
        let existing = st
            .senders
            .get(&message.sender_id)
            .and_then(|s| s.by_client.get(message.client_msg_id.as_str()));
        if let Some(&seq) = existing {
            let original = st
                .message_at(seq)
                .ok_or_else(|| Error::internal("idempotency key points at no message"))?;
            return Ok(Appended {
                message: original.clone(),
                duplicate: true,
                position: None,
            });
        }
        if st.by_id.contains_key(&message.message_id) {
            return Err(Error::Conflict(
                format!("message id {} is already in use", message.message_id).into(),
            ));
        }
        let seq = st.last_seq() + 1;
        let stored = message.into_message(seq);
        let sender = st.senders.entry(stored.sender_id.clone()).or_default();
        sender.by_client.insert(stored.client_msg_id.clone(), seq);
        sender.seqs.push(seq);
        st.by_id.insert(stored.message_id, seq);
        let from = st.last_activity;
        st.last_activity = stored.message_id.get();
        st.messages.push(stored.clone());
        let position = st.record(Item::Message(seq));
        self.update_index(
            st.members.keys(),
            id,
            IndexOp::Move {
                from,
                to: st.last_activity,
            },
        );
        Ok(Appended {
            message: stored,
            duplicate: false,
            position: Some(position),
        })
    }

    async fn message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<Message>> {
        let cell = self.get(conversation)?;
        let st = lock(&cell);
        Ok(st
            .by_id
            .get(&id)
            .and_then(|&seq| st.message_at(seq))
            .cloned())
    }

    async fn change_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        by: &UserId,
        change: MessageChange,
        now: u64,
    ) -> Result<MessageUpdate> {
        let cell = self.get(conversation)?;
        let mut guard = lock(&cell);
        let st = &mut *guard;
        let (seq, current) = st.message_mut(id)?;
        if &current.sender_id != by {
            return Err(Error::forbidden(
                "only the sender may edit or delete a message",
            ));
        }
        let mut changed = current.clone();
        change.apply(&mut changed, now)?;
        let newly_deleted = changed.deleted && !current.deleted;
        *current = changed.clone();
        if newly_deleted {
            insert_sorted(&mut st.deleted, seq);
            insert_sorted(&mut st.senders.entry(by.clone()).or_default().deleted, seq);
        }
        let position = st.record(Item::Message(seq));
        Ok(MessageUpdate {
            message: changed,
            position: Some(position),
        })
    }

    async fn react(
        &self,
        conversation: ConversationId,
        id: MessageId,
        user: &UserId,
        key: Option<&str>,
    ) -> Result<MessageUpdate> {
        let cell = self.get(conversation)?;
        let mut guard = lock(&cell);
        let st = &mut *guard;
        if !st.members.contains_key(user) {
            return Err(Error::NotMember(conversation));
        }
        let (seq, current) = st.message_mut(id)?;
        let mut changed = current.clone();
        if !apply_reaction(&mut changed, user, key)? {
            return Ok(MessageUpdate {
                message: changed,
                position: None,
            });
        }
        *current = changed.clone();
        let position = st.record(Item::Message(seq));
        Ok(MessageUpdate {
            message: changed,
            position: Some(position),
        })
    }

    async fn stream(&self, conversation: ConversationId) -> Result<Option<StreamPosition>> {
        Ok(Some(lock(&*self.get(conversation)?).stream))
    }

    async fn changes_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Option<ChangePage>> {
        let cell = self.get(conversation)?;
        let st = lock(&cell);
        let mut entries = st
            .changes
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(limit.saturating_add(1));
        let mut changes = Vec::new();
        let mut read_to = after;
        for (&position, item) in entries.by_ref().take(limit) {
            read_to = position;
            changes.extend(st.resolve(position, item));
        }
        let next = entries.next().map(|_| read_to);
        Ok(Some(ChangePage {
            stream: st.stream,
            changes,
            next,
        }))
    }

    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let cell = self.get(conversation)?;
        let st = lock(&cell);
        let len = st.messages.len();
        // Messages with seq < before are the first `before - 1` ones.
        let end = before.map_or(len, |b| to_index(b.saturating_sub(1)).min(len));
        let start = end.saturating_sub(limit);
        let page = st.messages.get(start..end).unwrap_or_default();
        Ok(page.iter().rev().cloned().collect())
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let cell = self.get(conversation)?;
        let st = lock(&cell);
        let len = st.messages.len();
        let start = to_index(after).min(len);
        let end = start.saturating_add(limit).min(len);
        Ok(st.messages.get(start..end).unwrap_or_default().to_vec())
    }

    async fn last_seq(&self, conversation: ConversationId) -> Result<u64> {
        Ok(lock(&*self.get(conversation)?).last_seq())
    }

    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        // Creator first, then the others in the given order, without duplicates.
        let mut seen = HashSet::with_capacity(new.members.len() + 1);
        let users: Vec<UserId> = std::iter::once(&new.creator)
            .chain(&new.members)
            .filter(|u| seen.insert(*u))
            .cloned()
            .collect();
        match new.kind {
            ConversationKind::Group => self.insert_new(&new, &users, Role::Owner, None),
            ConversationKind::Direct => {
                let [a, b] = <[UserId; 2]>::try_from(users).map_err(|_| {
                    Error::invalid("a direct conversation needs exactly two distinct users")
                })?;
                let key = direct_key(&a, &b);
                let mut directs = lock(&self.directs);
                if let Some(&existing) = directs.get(&key) {
                    if let Ok(cell) = self.get(existing) {
                        let mut st = lock(&cell);
                        self.add_to(&mut st, &[a, b], new.created_at);
                        return Ok(st.snapshot());
                    }
                }
                let pair = [a.clone(), b.clone()];
                let conv = self.insert_new(&new, &[a, b], Role::Member, Some(pair))?;
                directs.insert(key, conv.id);
                Ok(conv)
            }
        }
    }

    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        Ok(self.get(id).ok().map(|cell| lock(&cell).snapshot()))
    }

    async fn member(&self, conversation: ConversationId, user: &UserId) -> Result<Option<Member>> {
        let cell = self.get(conversation)?;
        let st = lock(&cell);
        Ok(st.members.get(user).map(|s| s.member.clone()))
    }

    async fn add_members(
        &self,
        conversation: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> Result<Vec<MembershipUpdate>> {
        let cell = self.get(conversation)?;
        let mut st = lock(&cell);
        if let Some(pair) = &st.direct_pair {
            if users.iter().any(|u| !pair.contains(u)) {
                return Err(Error::invalid(
                    "a direct conversation cannot have other members",
                ));
            }
        }
        Ok(self.add_to(&mut st, users, now))
    }

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<Option<MembershipUpdate>> {
        let cell = self.get(conversation)?;
        let mut st = lock(&cell);
        if st.members.remove(user).is_none() {
            return Ok(None);
        }
        let position = st.record(Item::Membership(user.clone()));
        self.update_index([user], conversation, IndexOp::Remove(st.last_activity));
        Ok(Some(MembershipUpdate {
            user_id: user.clone(),
            position: Some(position),
        }))
    }

    async fn conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>> {
        Ok(self
            .user_shard(user)
            .get(user)
            .map(|index| index.iter().map(|&(_, id)| id).collect())
            .unwrap_or_default())
    }

    async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>> {
        if limit == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        // One more than asked, to know whether there is a next page.
        let keys: Vec<(u64, ConversationId)> = {
            let shard = self.user_shard(user);
            let Some(index) = shard.get(user) else {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            };
            // Entries sort by activity descending; "after" the cursor means older than it.
            let start = match after {
                Some(a) => Bound::Excluded((Reverse(a), ConversationId::from_raw(u64::MAX))),
                None => Bound::Unbounded,
            };
            index
                .range((start, Bound::Unbounded))
                .take(limit.saturating_add(1))
                .map(|&(Reverse(activity), id)| (activity, id))
                .collect()
        };
        let more = keys.len() > limit;
        let mut items = Vec::with_capacity(keys.len().min(limit));
        let mut last_key = None;
        for &(activity, id) in keys.iter().take(limit) {
            // The user index lock is released: a conversation may have moved or the user may
            // have left since; a left one is skipped, a moved one is shown as it is now.
            let Ok(cell) = self.get(id) else { continue };
            let st = lock(&cell);
            let Ok(unread) = st.unread(user) else {
                continue;
            };
            items.push(ConversationView {
                conversation: st.snapshot(),
                unread,
                last_message: st.messages.last().cloned(),
            });
            last_key = Some(activity);
        }
        let next = if more {
            // The cursor is the index key of the last entry read, even if it was skipped.
            keys.get(limit - 1).map(|&(a, _)| a).or(last_key)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn set_marker(
        &self,
        conversation: ConversationId,
        user: &UserId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<MarkerUpdate> {
        let cell = self.get(conversation)?;
        let mut guard = lock(&cell);
        let st = &mut *guard;
        let seq = seq.min(st.last_seq());
        let m = &mut st
            .members
            .get_mut(user)
            .ok_or(Error::NotMember(conversation))?
            .member;
        let marker = match kind {
            ReceiptKind::Read => &mut m.last_read_seq,
            ReceiptKind::Delivered => &mut m.last_delivered_seq,
        };
        let moved = seq > *marker;
        if moved {
            *marker = seq;
        }
        let now = *marker;
        // Read implies delivered.
        m.last_delivered_seq = m.last_delivered_seq.max(m.last_read_seq);
        let position = moved.then(|| st.record(Item::Markers(user.clone())));
        Ok(MarkerUpdate {
            seq: now,
            moved,
            position,
        })
    }

    async fn unread(&self, conversation: ConversationId, user: &UserId) -> Result<u64> {
        lock(&*self.get(conversation)?).unread(user)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::id::{NodeId, SnowflakeGenerator};
    use crate::model::MessageKind;

    fn ids() -> SnowflakeGenerator {
        SnowflakeGenerator::new(NodeId::new(17).unwrap())
    }

    fn msg(ids: &SnowflakeGenerator, conv: ConversationId, from: &UserId, key: &str) -> NewMessage {
        NewMessage {
            message_id: ids.message_id(),
            conversation_id: conv,
            sender_id: from.clone(),
            client_msg_id: key.to_owned(),
            kind: MessageKind::Text,
            content: key.to_owned(),
            media: None,
            reply_to: None,
            created_at: 1,
        }
    }

    fn new_conv(
        ids: &SnowflakeGenerator,
        kind: ConversationKind,
        creator: &UserId,
        members: &[UserId],
    ) -> NewConversation {
        NewConversation {
            id: ids.conversation_id(),
            kind,
            name: None,
            creator: creator.clone(),
            members: members.to_vec(),
            created_at: 1,
        }
    }

    /// Every member of every conversation is indexed under the conversation's current
    /// `last_activity`, and nothing else is indexed.
    fn assert_index_consistent(store: &MemoryStore) {
        let mut expected: BTreeSet<(UserId, u64, ConversationId)> = BTreeSet::new();
        for shard in store.conversations.iter() {
            for cell in read(shard).values() {
                let st = lock(cell);
                for user in st.members.keys() {
                    expected.insert((user.clone(), st.last_activity, st.id));
                }
            }
        }
        let mut actual = BTreeSet::new();
        for shard in store.users.iter() {
            for (user, index) in lock(shard).iter() {
                assert!(!index.is_empty(), "empty index kept for {user}");
                for &(Reverse(activity), id) in index {
                    actual.insert((user.clone(), activity, id));
                }
            }
        }
        assert_eq!(actual, expected);
    }

    /// Unread by definition: a scan of the timeline.
    fn naive_unread(st: &ConvState, user: &UserId) -> u64 {
        let read = st.members[user].member.last_read_seq;
        st.messages
            .iter()
            .filter(|m| m.seq > read && &m.sender_id != user && !m.deleted)
            .count() as u64
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn user_index_stays_consistent_under_concurrent_mixed_operations() {
        let store = Arc::new(MemoryStore::new());
        let ids = Arc::new(ids());
        let users: Vec<UserId> = (0..8).map(|i| UserId::from(format!("u{i}"))).collect();
        let mut convs = Vec::new();
        for i in 0..6 {
            let c = store
                .create_conversation(new_conv(
                    &ids,
                    ConversationKind::Group,
                    &users[i],
                    &users[..4],
                ))
                .await
                .unwrap();
            convs.push(c.id);
        }
        let mut tasks = Vec::new();
        for t in 0..8usize {
            let (store, ids, users, convs) =
                (store.clone(), ids.clone(), users.clone(), convs.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..300usize {
                    let conv = convs[(t + i) % convs.len()];
                    let user = &users[(t * 7 + i) % users.len()];
                    match i % 5 {
                        0 => {
                            store.add_members(conv, &[user.clone()], 2).await.unwrap();
                        }
                        1 => {
                            store.remove_member(conv, user).await.unwrap();
                        }
                        2 => {
                            let _ = store
                                .set_marker(conv, user, ReceiptKind::Read, i as u64)
                                .await;
                        }
                        _ => {
                            // NotMember is fine: membership changes concurrently.
                            let _ = store
                                .append(msg(&ids, conv, user, &format!("{t}-{i}")))
                                .await;
                        }
                    }
                    if i % 50 == 0 {
                        let page = store.list_conversations(user, None, 3).await.unwrap();
                        let acts: Vec<u64> = page
                            .items
                            .iter()
                            .map(|v| v.conversation.last_activity)
                            .collect();
                        assert!(page.items.len() <= 3);
                        assert!(acts.windows(2).all(|w| w[0] != w[1]));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_index_consistent(&store);
        for &c in &convs {
            let cell = store.get(c).unwrap();
            let st = lock(&cell);
            assert!(
                st.messages
                    .iter()
                    .enumerate()
                    .all(|(i, m)| m.seq == i as u64 + 1)
            );
            for user in st.members.keys() {
                assert_eq!(st.unread(user).unwrap(), naive_unread(&st, user));
            }
        }
    }

    #[tokio::test]
    async fn unread_matches_a_scan_after_random_operations() {
        let store = MemoryStore::new();
        let ids = ids();
        let users: Vec<UserId> = (0..4).map(|i| UserId::from(format!("r{i}"))).collect();
        let conv = store
            .create_conversation(new_conv(&ids, ConversationKind::Group, &users[0], &users))
            .await
            .unwrap();
        let mut sent: Vec<Message> = Vec::new();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for i in 0..2_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let user = &users[(x % 4) as usize];
            match (x >> 8) % 10 {
                0..=5 => {
                    let m = msg(&ids, conv.id, user, &format!("k{i}"));
                    sent.push(store.append(m).await.unwrap().message);
                }
                6 | 7 if !sent.is_empty() => {
                    let m = &sent[((x >> 16) as usize) % sent.len()];
                    let _ = store
                        .change_message(
                            conv.id,
                            m.message_id,
                            &m.sender_id,
                            MessageChange::Delete,
                            i,
                        )
                        .await;
                }
                _ => {
                    let last = sent.len() as u64;
                    let seq = (x >> 20) % (last + 2);
                    store
                        .set_marker(conv.id, user, ReceiptKind::Read, seq)
                        .await
                        .unwrap();
                }
            }
            if i % 97 == 0 {
                let cell = store.get(conv.id).unwrap();
                let st = lock(&cell);
                for u in &users {
                    assert_eq!(st.unread(u).unwrap(), naive_unread(&st, u), "step {i}");
                }
            }
        }
    }

    #[tokio::test]
    async fn direct_pair_is_fixed_and_restored_on_create() {
        let store = MemoryStore::new();
        let ids = ids();
        let (a, b, c) = (UserId::from("a"), UserId::from("b"), UserId::from("c"));
        let d = store
            .create_conversation(new_conv(&ids, ConversationKind::Direct, &a, &[b.clone()]))
            .await
            .unwrap();
        let r = store.add_members(d.id, &[c.clone()], 1).await;
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        store.append(msg(&ids, d.id, &a, "1")).await.unwrap();
        store.append(msg(&ids, d.id, &a, "2")).await.unwrap();
        assert!(store.remove_member(d.id, &b).await.unwrap().is_some());
        assert!(store.conversation_ids(&b).await.unwrap().is_empty());
        // b opens the direct conversation again: same conversation, b restored with nothing
        // unread from before.
        let again = store
            .create_conversation(new_conv(&ids, ConversationKind::Direct, &b, &[a.clone()]))
            .await
            .unwrap();
        assert_eq!(again.id, d.id);
        let m = store.member(d.id, &b).await.unwrap().unwrap();
        assert_eq!((m.role, m.last_read_seq), (Role::Member, 2));
        assert_eq!(store.conversation_ids(&b).await.unwrap(), vec![d.id]);
        assert!(
            store
                .add_members(d.id, &[b.clone()], 1)
                .await
                .unwrap()
                .is_empty()
        );
        assert_index_consistent(&store);
    }

    #[tokio::test]
    async fn reused_ids_are_conflicts() {
        let store = MemoryStore::new();
        let ids = ids();
        let a = UserId::from("a");
        let new = new_conv(&ids, ConversationKind::Group, &a, &[]);
        store.create_conversation(new.clone()).await.unwrap();
        let r = store.create_conversation(new).await;
        assert!(matches!(r, Err(Error::Conflict(_))), "{r:?}");

        let conv = store
            .create_conversation(new_conv(&ids, ConversationKind::Group, &a, &[]))
            .await
            .unwrap();
        let first = msg(&ids, conv.id, &a, "one");
        store.append(first.clone()).await.unwrap();
        let reused = NewMessage {
            client_msg_id: "two".into(),
            ..first
        };
        let r = store.append(reused).await;
        assert!(matches!(r, Err(Error::Conflict(_))), "{r:?}");
        assert_eq!(store.last_seq(conv.id).await.unwrap(), 1);
        assert_index_consistent(&store);
    }

    #[tokio::test]
    async fn unknown_conversation_lookups_are_not_found() {
        let store = MemoryStore::new();
        let id = ids().conversation_id();
        let a = UserId::from("a");
        assert!(matches!(
            store.member(id, &a).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.history(id, None, 1).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.messages_after(id, 0, 1).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.unread(id, &a).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.remove_member(id, &a).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.message(id, MessageId::from_raw(1)).await,
            Err(Error::NotFound(_))
        ));
        assert_eq!(store.conversation(id).await.unwrap(), None);
    }

    #[test]
    fn debug_is_short_and_lock_free() {
        let store = MemoryStore::new();
        let _held = lock(&store.directs);
        let s = format!("{store:?}");
        assert!(s.starts_with("MemoryStore") && s.len() < 100, "{s}");
    }
}
