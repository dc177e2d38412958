//! The node-local registry: who is connected here, which conversations have local members,
//! who watches whose presence. Fan-out reads it; connects, disconnects and membership changes
//! write it.

use foldhash::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::session::Outbound;

use crate::id::{ConnectionId, ConversationId, UserId};
use crate::protocol::Frame;
use crate::router::Topic;

/// Why the engine asks a transport to close a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The connection's outbound queue was full: it reads too slowly. It should reconnect and sync.
    SlowConsumer,
    /// The server is shutting down ("going away").
    Shutdown,
    /// Live delivery to this node had a gap (router lag, broker reconnect): reconnect and sync.
    Resync,
    /// The transport ended the connection (the client closed it, the socket failed, or the
    /// transport refused a frame); see [`Session::request_close`](crate::Session::request_close).
    Disconnected,
}

impl CloseReason {
    /// A short text for close frames and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow consumer",
            Self::Shutdown => "server shutting down",
            Self::Resync => "resync required",
            Self::Disconnected => "disconnected",
        }
    }
}

/// One item of a connection's outbound queue.
#[derive(Debug)]
pub(crate) enum Out {
    /// Fan-out from other connections (counted against `outbound_queue`).
    Live(Arc<Frame>),
    /// A reply to the connection's own command (holds one of `reply_queue` slots).
    Reply(Arc<Frame>),
    /// Wakes a waiting writer to look at the close request.
    Wake,
}

/// One live connection as the engine sees it.
///
/// Everything for the connection goes through **one** queue, in order (one wait for the
/// writer, one channel's memory per connection), bounded by two counts: at most
/// `outbound_queue` fan-out frames (one more means the client reads too slowly: slow consumer)
/// and at most `reply_queue` replies (one more waits for room, slowing only this connection's
/// own command loop). Replies never use the fan-out share, so a large `sync` replay cannot make
/// live traffic look like a slow consumer.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    /// Cluster-unique id.
    pub(crate) id: ConnectionId,
    /// The authenticated user.
    pub(crate) user: UserId,
    /// The outbound queue (bounded by `shared`, not by the channel).
    queue: mpsc::UnboundedSender<Out>,
    /// The queue's bounds and the close request (one allocation: every delivery touches it).
    pub(crate) shared: Arc<ConnShared>,
    /// The transport's synchronous write path, if it registered one.
    direct: OnceLock<Arc<dyn DirectWrite>>,
}

/// A transport's synchronous write path for one connection, registered with
/// [`Session::set_direct_write`](crate::Session::set_direct_write).
///
/// Without one, every frame for a connection goes through its [`Outbound`](crate::Outbound)
/// queue and the transport's writer task: one task wake-up per frame. With one, the engine
/// first offers each frame to the transport, which writes it on the spot when its socket has
/// room and nothing is pending, and otherwise hands it back to the queue. Order is the
/// transport's to keep: once anything is pending (queued frames, a partly written frame), it
/// must queue every further frame until its writer has drained the queue and found it empty
/// under the same lock (see [`Outbound::is_empty`](crate::Outbound::is_empty)).
pub trait DirectWrite: Send + Sync + std::fmt::Debug + 'static {
    /// Writes `frame` now, or calls `queue(frame)` (while holding whatever makes the choice
    /// atomic with respect to the writer going idle) and returns its result. `true`: the frame
    /// was taken (written, owned by the transport to finish, queued, or dropped because the
    /// connection is closing); `false`: `queue` refused it (the connection is a slow consumer).
    ///
    /// `may_write: false` asks for the queue even when the socket is idle: the engine is under
    /// load (other sends wait for this fan-out to finish), and handing the writes to the
    /// connections' writer tasks spreads them over the runtime's threads and lets each writer
    /// batch several frames per system call. The transport must then queue, keeping order.
    fn write_or_queue(
        &self,
        frame: &Arc<Frame>,
        queue: &mut dyn FnMut(&Arc<Frame>) -> bool,
        may_write: bool,
    ) -> bool;
}

/// What a connection's engine side and its [`Outbound`] share.
#[derive(Debug)]
pub(crate) struct ConnShared {
    /// Fan-out frames in the queue.
    live: AtomicUsize,
    live_max: usize,
    /// Free reply slots.
    reply_permits: Semaphore,
    /// Why the connection is to be closed (first reason wins).
    reason: OnceLock<CloseReason>,
    /// A wake-up from an [`OutboundWaker`] is queued and not yet taken (at most one is).
    woken: AtomicBool,
    /// Cancelled with the first close reason.
    pub(crate) token: CancellationToken,
}

impl ConnShared {
    pub(crate) fn took_live(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// The reader took a wake-up item.
    pub(crate) fn took_wake(&self) {
        self.woken.store(false, Ordering::Release);
    }

    pub(crate) fn took_reply(&self) {
        self.reply_permits.add_permits(1);
    }

    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// True for the first request.
    fn request_close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }
}

impl ConnHandle {
    /// A connection and its outbound side.
    pub(crate) fn new(
        id: ConnectionId,
        user: UserId,
        outbound_queue: usize,
        reply_queue: usize,
    ) -> (Self, Outbound) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(ConnShared {
            live: AtomicUsize::new(0),
            live_max: outbound_queue.max(1),
            reply_permits: Semaphore::new(reply_queue.max(1)),
            reason: OnceLock::new(),
            token: CancellationToken::new(),
            woken: AtomicBool::new(false),
        });
        let outbound = Outbound::new(rx, shared.clone());
        (
            Self {
                id,
                user,
                queue: tx,
                shared,
                direct: OnceLock::new(),
            },
            outbound,
        )
    }

    /// Delivers a fan-out frame (written directly when `may_write` and the transport can, else
    /// queued); false when the connection already has its most fan-out frames queued (slow
    /// consumer).
    fn push(&self, frame: &Arc<Frame>, may_write: bool) -> bool {
        match self.direct.get() {
            Some(direct) => direct.write_or_queue(frame, &mut |f| self.queue_live(f), may_write),
            None => self.queue_live(frame),
        }
    }

    /// Queues a fan-out frame; false when the connection already has its most fan-out frames
    /// queued (slow consumer).
    fn queue_live(&self, frame: &Arc<Frame>) -> bool {
        let shared = &self.shared;
        if shared.live.fetch_add(1, Ordering::AcqRel) >= shared.live_max {
            shared.took_live();
            // Already being closed: not a new slow consumer.
            return shared.token.is_cancelled();
        }
        if self.queue.send(Out::Live(frame.clone())).is_err() {
            // The receiver is gone: the transport is tearing the connection down.
            shared.took_live();
        }
        true
    }

    /// Queues a reply, waiting for a free reply slot (only this connection's own command loop
    /// waits). False when the outbound side is gone.
    pub(crate) async fn reply(&self, frame: Arc<Frame>) -> bool {
        let Ok(permit) = self.shared.reply_permits.acquire().await else {
            return false;
        };
        let Some(direct) = self.direct.get() else {
            // The reader gives the slot back when it takes the frame.
            permit.forget();
            return self.queue.send(Out::Reply(frame)).is_ok();
        };
        let mut permit = Some(permit);
        // Written directly: the slot is free again as soon as `permit` drops.
        direct.write_or_queue(
            &frame,
            &mut |f| {
                if let Some(p) = permit.take() {
                    p.forget();
                }
                self.queue.send(Out::Reply(f.clone())).is_ok()
            },
            true,
        )
    }

    /// Registers the transport's direct write path (once).
    pub(crate) fn set_direct_write(&self, direct: Arc<dyn DirectWrite>) -> bool {
        self.direct.set(direct).is_ok()
    }

    /// A handle that wakes the connection's writer (see [`OutboundWaker`]).
    pub(crate) fn outbound_waker(&self) -> OutboundWaker {
        OutboundWaker {
            queue: self.queue.downgrade(),
            shared: Arc::downgrade(&self.shared),
        }
    }

    pub(crate) fn request_close(&self, reason: CloseReason) {
        if self.shared.request_close(reason) {
            // Wake a writer waiting for frames (once: the first reason wins).
            let _ = self.queue.send(Out::Wake);
        }
    }

    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }
}

/// Wakes a connection's writer: [`Outbound::recv_batch`](crate::Outbound::recv_batch) returns
/// (with `Batch::Frames(0)` when nothing else is there). For a transport's [`DirectWrite`]
/// that left work for its writer (a partly written frame). It does not keep the connection's
/// queue open, and however often it is called, at most one wake-up waits in the queue.
#[derive(Clone, Debug)]
pub struct OutboundWaker {
    queue: mpsc::WeakUnboundedSender<Out>,
    shared: std::sync::Weak<ConnShared>,
}

impl OutboundWaker {
    /// Wakes the writer; false when the connection is gone.
    pub fn wake(&self) -> bool {
        let (Some(queue), Some(shared)) = (self.queue.upgrade(), self.shared.upgrade()) else {
            return false;
        };
        if shared.woken.swap(true, Ordering::AcqRel) {
            // One is queued already: the writer will look.
            return true;
        }
        queue.send(Out::Wake).is_ok()
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
        if conn.push(frame, may_write) {
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
    /// `may_write`: see [`DirectWrite::write_or_queue`].
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
