//! The node-local registry: who is connected here, which conversations have local members,
//! who watches whose presence. Fan-out reads it; connects, disconnects and membership changes
//! write it.

use foldhash::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::id::{ConnectionId, ConversationId, UserId};
use crate::protocol::Frame;
use crate::router::Topic;
use crate::transport::{DynTokenVerifier, Outbox};

/// One live connection as the engine sees it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    /// Cluster-unique id.
    pub(crate) id: ConnectionId,
    /// The authenticated user.
    pub(crate) user: UserId,
    /// Its outbound queue: the only way to the client (bounds included).
    pub(crate) outbox: Outbox,
    /// Unix milliseconds at which its credential expires (`expiry::NEVER`: never); read by
    /// every command, written only under the node's `Expiries` lock.
    pub(crate) expires_at: AtomicU64,
    /// Checks the token of a `refresh` (supplied by the transport).
    pub(crate) verifier: Option<DynTokenVerifier>,
}

impl ConnHandle {
    /// Whether the credential expired at `now` (Unix milliseconds).
    pub(crate) fn expired(&self, now: u64) -> bool {
        now >= self.expires_at.load(Ordering::Acquire)
    }

    /// The expiry, `None` for never.
    pub(crate) fn expiry(&self) -> Option<u64> {
        let at = self.expires_at.load(Ordering::Acquire);
        (at != super::expiry::NEVER).then_some(at)
    }
}

/// What removing a connection changed.
#[derive(Debug, Default)]
pub(crate) struct Removed {
    /// It was the user's last connection on this node.
    pub(crate) last_of_user: bool,
    /// Topics no local connection needs any more.
    pub(crate) topics: Vec<Topic>,
    /// Users nobody on this node watches any more.
    pub(crate) unwatched: Vec<UserId>,
}

#[derive(Debug, Default)]
struct UserEntry {
    /// The user's connections on this node.
    conns: Vec<Arc<ConnHandle>>,
    /// Conversations the user is a member of (loaded at first connect, kept by membership events).
    conversations: HashSet<ConversationId>,
}

#[derive(Debug, Default)]
struct State {
    conns: HashMap<ConnectionId, Arc<ConnHandle>>,
    users: HashMap<UserId, UserEntry>,
    /// Conversation → its members with a connection on this node.
    conversations: HashMap<ConversationId, HashSet<UserId>>,
    /// Watched user → connections watching their presence.
    watchers: HashMap<UserId, HashSet<ConnectionId>>,
    /// Connection → users it watches.
    watching: HashMap<ConnectionId, HashSet<UserId>>,
}

/// Fan-out counts.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// Frames queued.
    pub(crate) delivered: usize,
    /// Connections whose queue was full.
    pub(crate) slow: Vec<Arc<ConnHandle>>,
}

impl Delivery {
    fn push(&mut self, conn: &Arc<ConnHandle>, frame: &Arc<Frame>, may_write: bool) {
        if conn.outbox.push_live(frame, may_write) {
            self.delivered += 1;
        } else {
            self.slow.push(conn.clone());
        }
    }
}

/// The registry. One `RwLock`: fan-out (the hot path) only reads, so deliveries run in parallel;
/// writes happen on connect, disconnect and membership changes.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    state: RwLock<State>,
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a connection; true when it is the user's first on this node.
    pub(crate) fn add(&self, conn: Arc<ConnHandle>) -> bool {
        let mut s = self.write();
        s.conns.insert(conn.id, conn.clone());
        let entry = s.users.entry(conn.user.clone()).or_default();
        entry.conns.push(conn);
        entry.conns.len() == 1
    }

    /// Records the user's conversations; returns the conversations that had no local member
    /// before (their topics must be subscribed).
    pub(crate) fn set_conversations(
        &self,
        user: &UserId,
        conversations: Vec<ConversationId>,
    ) -> Vec<ConversationId> {
        let mut s = self.write();
        let State {
            users,
            conversations: index,
            ..
        } = &mut *s;
        let Some(entry) = users.get_mut(user) else {
            return Vec::new();
        };
        let mut fresh = Vec::new();
        for c in conversations {
            if entry.conversations.insert(c) {
                let members = index.entry(c).or_default();
                if members.is_empty() {
                    fresh.push(c);
                }
                members.insert(user.clone());
            }
        }
        fresh
    }

    /// Removes a connection (idempotent: `None` if it was already gone).
    pub(crate) fn remove(&self, id: ConnectionId) -> Option<Removed> {
        let mut s = self.write();
        let conn = s.conns.remove(&id)?;
        let mut removed = Removed::default();
        // Presence watches of this connection.
        if let Some(watched) = s.watching.remove(&id) {
            for u in watched {
                if let Some(w) = s.watchers.get_mut(&u) {
                    w.remove(&id);
                    if w.is_empty() {
                        s.watchers.remove(&u);
                        removed.unwatched.push(u);
                    }
                }
            }
        }
        let last = match s.users.get_mut(&conn.user) {
            Some(entry) => {
                entry.conns.retain(|c| c.id != id);
                entry.conns.is_empty()
            }
            None => false,
        };
        if last {
            removed.last_of_user = true;
            removed.topics.push(Topic::User(conn.user.clone()));
            if let Some(entry) = s.users.remove(&conn.user) {
                for c in entry.conversations {
                    if let Some(members) = s.conversations.get_mut(&c) {
                        members.remove(&conn.user);
                        if members.is_empty() {
                            s.conversations.remove(&c);
                            removed.topics.push(Topic::Conversation(c));
                        }
                    }
                }
            }
        }
        Some(removed)
    }

    /// A user joined (true) or left a conversation. Returns `Some(topic_changed)` when the user
    /// is connected here: on join, whether the conversation had no local member before (subscribe);
    /// on leave, whether it has none now (unsubscribe). `None` when the user is not here.
    pub(crate) fn membership(
        &self,
        conversation: ConversationId,
        user: &UserId,
        joined: bool,
    ) -> Option<bool> {
        let mut s = self.write();
        let State {
            users,
            conversations,
            ..
        } = &mut *s;
        let entry = users.get_mut(user)?;
        if joined {
            if !entry.conversations.insert(conversation) {
                return Some(false);
            }
            let members = conversations.entry(conversation).or_default();
            let fresh = members.is_empty();
            members.insert(user.clone());
            Some(fresh)
        } else {
            if !entry.conversations.remove(&conversation) {
                return Some(false);
            }
            let Some(members) = conversations.get_mut(&conversation) else {
                return Some(false);
            };
            members.remove(user);
            let empty = members.is_empty();
            if empty {
                conversations.remove(&conversation);
            }
            Some(empty)
        }
    }

    /// Whether `user` is connected here and a member of `conversation` (as far as this node knows).
    pub(crate) fn is_local_member(&self, user: &UserId, conversation: ConversationId) -> bool {
        self.read()
            .users
            .get(user)
            .is_some_and(|e| e.conversations.contains(&conversation))
    }

    /// Delivers `frame` to the local connections behind `topic`, minus the exceptions.
    /// `may_write: false` asks a direct write path to queue (see `transport::direct`).
    pub(crate) fn deliver(
        &self,
        topic: &Topic,
        frame: &Arc<Frame>,
        except_user: Option<&UserId>,
        except_conn: Option<ConnectionId>,
        may_write: bool,
    ) -> Delivery {
        // Collect under the read lock, deliver after it: delivery may write to sockets (a
        // transport's direct path), which must not hold up connects and disconnects.
        let mut targets: Vec<Arc<ConnHandle>> = Vec::new();
        {
            let s = self.read();
            let to_user = |targets: &mut Vec<Arc<ConnHandle>>, entry: &UserEntry| {
                for conn in &entry.conns {
                    if Some(conn.id) != except_conn {
                        targets.push(conn.clone());
                    }
                }
            };
            match topic {
                Topic::Conversation(c) => {
                    if let Some(members) = s.conversations.get(c) {
                        targets.reserve(members.len());
                        for u in members {
                            if Some(u) == except_user {
                                continue;
                            }
                            if let Some(entry) = s.users.get(u) {
                                to_user(&mut targets, entry);
                            }
                        }
                    }
                }
                Topic::User(u) => {
                    if Some(u) != except_user
                        && let Some(entry) = s.users.get(u)
                    {
                        to_user(&mut targets, entry);
                    }
                }
            }
        }
        let mut out = Delivery::default();
        for conn in &targets {
            out.push(conn, frame, may_write);
        }
        out
    }

    /// Queues `frame` for every connection watching `user`'s presence.
    pub(crate) fn deliver_watchers(&self, user: &UserId, frame: &Arc<Frame>) -> Delivery {
        let s = self.read();
        let mut out = Delivery::default();
        if let Some(ids) = s.watchers.get(user) {
            for id in ids {
                if let Some(conn) = s.conns.get(id) {
                    out.push(conn, frame, true);
                }
            }
        }
        out
    }

    /// Adds presence watches for a connection. Returns the users no one here watched before,
    /// or `Err(total)` when the connection would exceed `max` watches.
    pub(crate) fn watch(
        &self,
        conn: ConnectionId,
        users: &[UserId],
        max: usize,
    ) -> Result<Vec<UserId>, usize> {
        let mut s = self.write();
        if !s.conns.contains_key(&conn) {
            return Ok(Vec::new());
        }
        let current = s.watching.get(&conn).map_or(0, HashSet::len);
        let adding = users
            .iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|u| !s.watching.get(&conn).is_some_and(|w| w.contains(*u)))
            .count();
        if current + adding > max {
            return Err(current + adding);
        }
        let mut fresh = Vec::new();
        for u in users {
            s.watching.entry(conn).or_default().insert(u.clone());
            let w = s.watchers.entry(u.clone()).or_default();
            if w.is_empty() {
                fresh.push(u.clone());
            }
            w.insert(conn);
        }
        Ok(fresh)
    }

    /// Removes presence watches; returns the users nobody here watches any more.
    pub(crate) fn unwatch(&self, conn: ConnectionId, users: &[UserId]) -> Vec<UserId> {
        let mut s = self.write();
        let mut gone = Vec::new();
        for u in users {
            if let Some(w) = s.watching.get_mut(&conn) {
                w.remove(u);
            }
            if let Some(w) = s.watchers.get_mut(u) {
                w.remove(&conn);
                if w.is_empty() {
                    s.watchers.remove(u);
                    gone.push(u.clone());
                }
            }
        }
        gone
    }

    /// Every user watched on this node.
    pub(crate) fn watched_users(&self) -> Vec<UserId> {
        self.read().watchers.keys().cloned().collect()
    }

    /// Every (user, connection) here, for the batched presence heartbeat.
    pub(crate) fn sessions(&self) -> Vec<(UserId, ConnectionId)> {
        self.read()
            .conns
            .values()
            .map(|c| (c.user.clone(), c.id))
            .collect()
    }

    /// A connection here.
    pub(crate) fn get(&self, id: ConnectionId) -> Option<Arc<ConnHandle>> {
        self.read().conns.get(&id).cloned()
    }

    /// The connections of `user` here.
    pub(crate) fn user_connections(&self, user: &UserId) -> Vec<Arc<ConnHandle>> {
        self.read()
            .users
            .get(user)
            .map(|e| e.conns.clone())
            .unwrap_or_default()
    }

    /// Every connection here.
    pub(crate) fn connections(&self) -> Vec<Arc<ConnHandle>> {
        self.read().conns.values().cloned().collect()
    }

    /// The user of a connection here.
    pub(crate) fn user_of(&self, id: ConnectionId) -> Option<UserId> {
        self.read().conns.get(&id).map(|c| c.user.clone())
    }

    /// Number of connections here.
    pub(crate) fn len(&self) -> usize {
        self.read().conns.len()
    }

    /// Whether `user` has a connection here.
    pub(crate) fn is_connected(&self, user: &UserId) -> bool {
        self.read().users.contains_key(user)
    }
}
