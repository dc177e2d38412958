//! In-memory [`PresenceTracker`]: see [`MemoryPresence`].

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use crate::error::Result;
use crate::id::{ConnectionId, UserId};
use crate::model::{Presence, PresenceStatus};
use crate::presence::{PresenceConfig, PresenceTracker};
use crate::time::now_ms;

/// Number of lock shards users are spread over.
const SHARDS: usize = 32;

/// In-memory presence for a single process (the embedded default).
///
/// ```
/// use chat_core::PresenceTracker;
/// use chat_core::memory::MemoryPresence;
/// use chat_core::model::PresenceStatus;
/// use chat_core::presence::PresenceConfig;
/// use chat_core::{ConnectionId, UserId};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> chat_core::Result<()> {
/// let presence = MemoryPresence::new(PresenceConfig::default());
/// let mut changes = presence.changes();
/// let alice = UserId::from("alice");
/// presence.connect(&alice, ConnectionId::from_raw(1)).await?;
/// assert_eq!(changes.recv().await.unwrap().status, PresenceStatus::Online);
/// assert_eq!(presence.is_connected(&[alice]).await?, vec![true]);
/// # Ok(()) }
/// ```
///
/// # Runtime
///
/// Construction needs no runtime. A background *sweeper* task turns users offline when their
/// debounce (or a session's TTL) runs out; it is spawned on the tokio runtime of the first
/// `connect`/`disconnect`/`heartbeat` call, and again if that runtime shuts down and a later
/// call comes from another one. It holds only a weak reference and exits when the tracker is
/// dropped. It follows tokio's clock, so tests may use the paused clock. Without a tokio
/// runtime (a future polled by another executor) answers stay correct, but offline changes are
/// only broadcast when a later call touches the user.
///
/// # Semantics
///
/// * A user is online while at least one session is alive; several devices are several sessions.
/// * `connect` (or a heartbeat of an unknown session, see below) of an offline or never-seen user
///   turns them online and broadcasts `Presence { Online, last_seen: Some(now) }`. A connect
///   while a debounced offline is pending cancels it: no change at all (no flap).
/// * When the last session ends (`disconnect`, or expiry: not heartbeated for the TTL) the
///   offline is scheduled `offline_debounce` later; when it comes due with still no session the
///   user turns offline and `Presence { Offline, last_seen: Some(end) }` is broadcast, where
///   `end` is the wall-clock time the last session ended: the disconnect time, or for an expired
///   session its last heartbeat (the last time it was known alive). An expired session's
///   debounce runs from the expiry (last heartbeat + TTL).
/// * `heartbeat` of an unknown session (expired, or never connected) **re-creates** it, exactly
///   like `connect`. This heals a session that expired because its node stalled past the TTL
///   while the client stayed connected. The price: a heartbeat racing with `disconnect` (sent
///   from a snapshot taken just before the disconnect) resurrects the session until it expires
///   again (TTL + debounce); the engine keeps that window small by heartbeating only sessions
///   it still holds. `disconnect` of an unknown session does nothing.
/// * `presence` of an online user reports `last_seen = now`; of a never-seen user `Offline` with
///   `last_seen: None`. `is_connected` has no debounce.
/// * `watch`/`unwatch` are no-ops: in one process every change is broadcast.
///
/// # Memory
///
/// Bounded by the number of users ever seen plus live sessions: a user who went offline keeps
/// one small entry (about 100 bytes plus the id) holding `last_seen`, which presence must keep
/// answering. Queries for unknown users allocate nothing. Changes go to a [`broadcast`] channel
/// of [`CHANGES_CAPACITY`](Self::CHANGES_CAPACITY) events; a receiver that lags gets `RecvError::Lagged` and should
/// re-read [`PresenceTracker::presence`].
//
// How it works: users are spread over `SHARDS` shards, each a `std::sync::Mutex` around a map
// `user → UserState` and an ordered set of `(deadline, user)`. A user's deadline is the earliest
// moment something happens to them on its own: a session expires (last heartbeat + TTL) or the
// debounced offline comes due. Every critical section is short and synchronous (no lock is held
// across an `.await`). State changes are applied by one function, `UserState::settle`, in two
// places: lazily by every call that touches a user (a read at time t reflects every deadline up
// to t even if the sweeper has not run yet), and by the sweeper, which sleeps until the earliest
// deadline of all shards (`timeout_at`) and is woken through a `Notify` when a deadline earlier
// than the one it sleeps on appears (`sweeper_target`). The sweeper is what makes the offline
// *broadcasts* timely.
pub struct MemoryPresence {
    /// Everything the sweeper also needs (it holds only a `Weak` to it).
    shared: Arc<Shared>,
}

impl MemoryPresence {
    /// Capacity of the [`PresenceTracker::changes`] broadcast channel.
    pub const CHANGES_CAPACITY: usize = 1024;

    /// A tracker with this timing. Works outside a tokio runtime (see the type docs).
    pub fn new(config: PresenceConfig) -> Self {
        let (changes, _) = broadcast::channel(Self::CHANGES_CAPACITY);
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Self {
            shared: Arc::new(Shared {
                config,
                shards,
                hasher: RandomState::new(),
                changes,
                wake: Arc::new(Notify::new()),
                sweeper_target: AtomicU64::new(u64::MAX),
                sweeper_running: AtomicBool::new(false),
                base: Instant::now(),
            }),
        }
    }

    /// The timing this tracker was built with.
    pub fn config(&self) -> PresenceConfig {
        self.shared.config
    }

    /// Spawns the sweeper if it is not running and we are inside a tokio runtime.
    fn ensure_sweeper(&self) {
        if self.shared.sweeper_running.load(Ordering::Acquire) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self
            .shared
            .sweeper_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let guard = SweeperGuard(Arc::downgrade(&self.shared));
            let wake = self.shared.wake.clone();
            handle.spawn(sweep_loop(guard, wake));
        }
    }
}

impl Default for MemoryPresence {
    fn default() -> Self {
        Self::new(PresenceConfig::default())
    }
}

impl Drop for MemoryPresence {
    fn drop(&mut self) {
        // Wake the sweeper so it notices (failed upgrade) and exits.
        self.shared.wake.notify_one();
    }
}

impl fmt::Debug for MemoryPresence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPresence")
            .field("config", &self.shared.config)
            .field(
                "sweeper_running",
                &self.shared.sweeper_running.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// State shared by the tracker and its sweeper.
struct Shared {
    /// TTL and debounce.
    config: PresenceConfig,
    /// Users, spread by hash so unrelated users do not contend.
    shards: Box<[Mutex<Shard>]>,
    /// Picks a user's shard.
    hasher: RandomState,
    /// Status changes; `send` never blocks (bounded ring, lagging receivers skip).
    changes: broadcast::Sender<Presence>,
    /// Wakes the sweeper: an earlier deadline appeared, or the tracker was dropped.
    wake: Arc<Notify>,
    /// The deadline the sweeper sleeps until, in [`Shared::ticks`] (`u64::MAX`: none, or
    /// sweeping right now). A writer whose new deadline is not later than this wakes the sweeper.
    sweeper_target: AtomicU64,
    /// Whether a sweeper task exists (reset by [`SweeperGuard`] when the task ends).
    sweeper_running: AtomicBool,
    /// Origin of [`Shared::ticks`].
    base: Instant,
}

/// One lock's worth of users.
#[derive(Default)]
struct Shard {
    /// Every user ever seen (see the module docs on memory).
    users: HashMap<UserId, UserState>,
    /// `(deadline, user)` for every user with a pending deadline; the sweeper pops the front.
    deadlines: BTreeSet<(Instant, UserId)>,
}

/// One user.
struct UserState {
    /// Live sessions (usually one or two devices, so a `Vec` beats a map).
    sessions: Vec<SessionState>,
    /// The status last broadcast (debounced).
    online: bool,
    /// When the pending debounced offline comes due. Only set while `online` and
    /// `sessions` is empty.
    offline_at: Option<Instant>,
    /// Wall-clock Unix ms when the user was last known alive: the end of the last session.
    /// Reported as `last_seen` while offline.
    ended_ms: u64,
    /// The key of this user in `Shard::deadlines`, if any.
    deadline: Option<Instant>,
}

/// One session (device connection).
struct SessionState {
    /// Which connection.
    id: ConnectionId,
    /// Dead unless heartbeated before this.
    expires: Instant,
    /// Wall-clock Unix ms of the connect or last heartbeat: `last_seen` if it expires.
    seen_ms: u64,
}

/// What one call observes: tokio's clock and the wall clock that follows it.
#[derive(Clone, Copy)]
struct Now {
    /// Monotonic (tokio, pausable) time.
    at: Instant,
    /// Unix milliseconds.
    ms: u64,
}

impl Now {
    fn get() -> Self {
        Self {
            at: Instant::now(),
            ms: now_ms(),
        }
    }
}

impl UserState {
    fn new(now: Now) -> Self {
        Self {
            sessions: Vec::new(),
            online: false,
            offline_at: None,
            ended_ms: now.ms,
            deadline: None,
        }
    }

    /// Applies everything due at `now`: expires sessions, schedules and executes the debounced
    /// offline. Returns the offline change if it happened.
    fn settle(&mut self, user: &UserId, now: Now, config: &PresenceConfig) -> Option<Presence> {
        let mut last_expiry: Option<Instant> = None;
        let mut ended_ms = self.ended_ms;
        self.sessions.retain(|s| {
            if s.expires <= now.at {
                last_expiry = Some(last_expiry.map_or(s.expires, |e| e.max(s.expires)));
                ended_ms = ended_ms.max(s.seen_ms);
                false
            } else {
                true
            }
        });
        self.ended_ms = ended_ms;
        if self.sessions.is_empty() {
            // Give the memory of a former multi-device user back.
            self.sessions = Vec::new();
            if let Some(expired) = last_expiry {
                if self.online && self.offline_at.is_none() {
                    self.offline_at = Some(expired + config.offline_debounce);
                }
            }
        }
        match self.offline_at {
            Some(at) if at <= now.at => {
                self.online = false;
                self.offline_at = None;
                Some(Presence {
                    user_id: user.clone(),
                    status: PresenceStatus::Offline,
                    last_seen: Some(self.ended_ms),
                })
            }
            _ => None,
        }
    }

    /// Adds or refreshes a session; returns the online change if the user was offline.
    fn touch(
        &mut self,
        user: &UserId,
        session: ConnectionId,
        now: Now,
        config: &PresenceConfig,
    ) -> Option<Presence> {
        let expires = now.at + config.ttl;
        match self.sessions.iter_mut().find(|s| s.id == session) {
            Some(s) => {
                s.expires = expires;
                s.seen_ms = now.ms;
            }
            None => self.sessions.push(SessionState {
                id: session,
                expires,
                seen_ms: now.ms,
            }),
        }
        // Reconnect inside the debounce: cancel the pending offline, say nothing.
        self.offline_at = None;
        if self.online {
            return None;
        }
        self.online = true;
        Some(Presence {
            user_id: user.clone(),
            status: PresenceStatus::Online,
            last_seen: Some(now.ms),
        })
    }

    /// Ends a session (unknown sessions are ignored).
    fn end(&mut self, session: ConnectionId, now: Now, config: &PresenceConfig) {
        let before = self.sessions.len();
        self.sessions.retain(|s| s.id != session);
        if self.sessions.len() == before {
            return;
        }
        self.ended_ms = self.ended_ms.max(now.ms);
        if self.sessions.is_empty() {
            self.sessions = Vec::new();
            if self.online {
                self.offline_at = Some(now.at + config.offline_debounce);
            }
        }
    }

    /// The presence as reported to readers (after [`settle`](Self::settle)).
    fn view(&self, user: &UserId, now: Now) -> Presence {
        Presence {
            user_id: user.clone(),
            status: if self.online {
                PresenceStatus::Online
            } else {
                PresenceStatus::Offline
            },
            last_seen: Some(if self.online { now.ms } else { self.ended_ms }),
        }
    }

    /// The earliest moment something happens to this user on its own.
    fn next_deadline(&self) -> Option<Instant> {
        let sessions = self.sessions.iter().map(|s| s.expires).min();
        match (sessions, self.offline_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Shard {
    /// Settles `user` (if known), then applies `f` to its state, creating it if `create`.
    /// Keeps the deadline index in sync and broadcasts the changes, in order, before the shard
    /// is unlocked. Returns `f`'s result (`None` for an unknown user with `create == false`)
    /// and the user's new deadline if it moved earlier (the caller may have to wake the sweeper).
    fn with_user<R>(
        &mut self,
        shared: &Shared,
        user: &UserId,
        now: Now,
        create: bool,
        f: impl FnOnce(&mut UserState) -> (R, Option<Presence>),
    ) -> (Option<R>, Option<Instant>) {
        let state = match self.users.entry(user.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) if create => e.insert(UserState::new(now)),
            Entry::Vacant(_) => return (None, None),
        };
        if let Some(change) = state.settle(user, now, &shared.config) {
            // No receivers is fine: nobody is listening.
            let _ = shared.changes.send(change);
        }
        let (out, change) = f(state);
        if let Some(change) = change {
            let _ = shared.changes.send(change);
        }
        let old = state.deadline;
        let new = state.next_deadline();
        state.deadline = new;
        let mut earlier = None;
        if old != new {
            if let Some(old) = old {
                self.deadlines.remove(&(old, user.clone()));
            }
            if let Some(new) = new {
                self.deadlines.insert((new, user.clone()));
                if old.is_none_or(|old| new < old) {
                    earlier = Some(new);
                }
            }
        }
        (Some(out), earlier)
    }

    /// Settles every user whose deadline is due; returns the shard's next deadline.
    fn sweep(&mut self, shared: &Shared, now: Now) -> Option<Instant> {
        while let Some((deadline, user)) = self.deadlines.first().cloned() {
            if deadline > now.at {
                return Some(deadline);
            }
            // `settle` moves the deadline past `now` (or clears it), so this terminates.
            let (found, _) = self.with_user(shared, &user, now, false, |_| ((), None));
            if found.is_none() {
                // Defensive: an index entry without a user; drop it.
                self.deadlines.remove(&(deadline, user));
            }
        }
        None
    }
}

impl Shared {
    fn shard(&self, user: &UserId) -> usize {
        (self.hasher.hash_one(user) as usize) % self.shards.len()
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding the lock leaves consistent-enough state (every mutation is
        // a few field writes); keep serving rather than poisoning presence for good.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `at` as nanoseconds since `base`, saturating (so comparisons err towards waking).
    fn ticks(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// A deadline earlier than the user's previous one was set: wake the sweeper if it sleeps
    /// past it.
    fn scheduled(&self, at: Option<Instant>) {
        if let Some(at) = at {
            if self.ticks(at) <= self.sweeper_target.load(Ordering::SeqCst) {
                self.wake.notify_one();
            }
        }
    }

    /// One pass over all shards; returns the earliest remaining deadline.
    fn sweep(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for index in 0..self.shards.len() {
            let now = Now::get();
            if let Some(d) = self.lock(index).sweep(self, now) {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        next
    }
}

/// Marks the sweeper as gone when its task ends (tracker dropped, or runtime shut down).
struct SweeperGuard(Weak<Shared>);

impl Drop for SweeperGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.sweeper_running.store(false, Ordering::Release);
        }
    }
}

/// The sweeper: sleeps until the earliest deadline (or a wake-up), settles what is due.
async fn sweep_loop(guard: SweeperGuard, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = guard.0.upgrade() else {
                return;
            };
            // While sweeping, every new deadline wakes us (it may be earlier than what we find).
            shared.sweeper_target.store(u64::MAX, Ordering::SeqCst);
            let next = shared.sweep();
            let target = next.map_or(u64::MAX, |d| shared.ticks(d));
            shared.sweeper_target.store(target, Ordering::SeqCst);
            next
            // The strong reference ends here: a sleeping sweeper never keeps the tracker alive.
        };
        match next {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline, wake.notified()).await;
            }
            None => wake.notified().await,
        }
    }
}

#[async_trait]
impl PresenceTracker for MemoryPresence {
    async fn connect(&self, user: &UserId, session: ConnectionId) -> Result<()> {
        self.ensure_sweeper();
        let shared = &*self.shared;
        let now = Now::get();
        let (_, earlier) =
            shared
                .lock(shared.shard(user))
                .with_user(shared, user, now, true, |state| {
                    ((), state.touch(user, session, now, &shared.config))
                });
        shared.scheduled(earlier);
        Ok(())
    }

    async fn disconnect(&self, user: &UserId, session: ConnectionId) -> Result<()> {
        self.ensure_sweeper();
        let shared = &*self.shared;
        let now = Now::get();
        let (_, earlier) =
            shared
                .lock(shared.shard(user))
                .with_user(shared, user, now, false, |state| {
                    state.end(session, now, &shared.config);
                    ((), None)
                });
        shared.scheduled(earlier);
        Ok(())
    }

    async fn heartbeat(&self, sessions: &[(UserId, ConnectionId)]) -> Result<()> {
        self.ensure_sweeper();
        let shared = &*self.shared;
        let now = Now::get();
        // Group by shard so each shard is locked once per batch.
        let mut order: Vec<(usize, usize)> = sessions
            .iter()
            .enumerate()
            .map(|(i, (user, _))| (shared.shard(user), i))
            .collect();
        order.sort_unstable();
        let mut earliest: Option<Instant> = None;
        for run in order.chunk_by(|a, b| a.0 == b.0) {
            let mut shard = shared.lock(run[0].0);
            for &(_, i) in run {
                let (user, session) = &sessions[i];
                // Unknown sessions are re-created (see the module docs).
                let (_, earlier) = shard.with_user(shared, user, now, true, |state| {
                    ((), state.touch(user, *session, now, &shared.config))
                });
                if let Some(e) = earlier {
                    earliest = Some(earliest.map_or(e, |x| x.min(e)));
                }
            }
        }
        shared.scheduled(earliest);
        Ok(())
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        let shared = &*self.shared;
        let now = Now::get();
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            let (view, earlier) =
                shared
                    .lock(shared.shard(user))
                    .with_user(shared, user, now, false, |state| {
                        (state.view(user, now), None)
                    });
            shared.scheduled(earlier);
            out.push(view.unwrap_or_else(|| Presence {
                user_id: user.clone(),
                status: PresenceStatus::Offline,
                last_seen: None,
            }));
        }
        Ok(out)
    }

    async fn is_connected(&self, users: &[UserId]) -> Result<Vec<bool>> {
        let shared = &*self.shared;
        let now = Now::get();
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            let (connected, earlier) =
                shared
                    .lock(shared.shard(user))
                    .with_user(shared, user, now, false, |state| {
                        (!state.sessions.is_empty(), None)
                    });
            shared.scheduled(earlier);
            out.push(connected.unwrap_or(false));
        }
        Ok(out)
    }

    fn changes(&self) -> broadcast::Receiver<Presence> {
        self.shared.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn config() -> PresenceConfig {
        PresenceConfig {
            ttl: Duration::from_secs(9),
            offline_debounce: Duration::from_secs(3),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_emits_offline_exactly_at_the_deadline() {
        let p = MemoryPresence::new(config());
        let mut rx = p.changes();
        let u = UserId::from("u");
        p.connect(&u, ConnectionId::from_raw(1)).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().status, PresenceStatus::Online);
        let start = Instant::now();
        p.disconnect(&u, ConnectionId::from_raw(1)).await.unwrap();
        // Nobody reads presence: only the sweeper can produce this event.
        let off = rx.recv().await.unwrap();
        assert_eq!(off.status, PresenceStatus::Offline);
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_wakes_for_an_earlier_deadline() {
        let p = MemoryPresence::new(config());
        let mut rx = p.changes();
        let (a, b) = (UserId::from("a"), UserId::from("b"));
        // `a` gives the sweeper a far deadline (TTL 9 s) to sleep on.
        p.connect(&a, ConnectionId::from_raw(1)).await.unwrap();
        p.connect(&b, ConnectionId::from_raw(2)).await.unwrap();
        rx.recv().await.unwrap();
        rx.recv().await.unwrap();
        tokio::task::yield_now().await;
        let start = Instant::now();
        p.disconnect(&b, ConnectionId::from_raw(2)).await.unwrap();
        let off = rx.recv().await.unwrap();
        assert_eq!(off.user_id, b);
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_stops_when_the_tracker_is_dropped() {
        let p = MemoryPresence::new(config());
        p.connect(&UserId::from("u"), ConnectionId::from_raw(1))
            .await
            .unwrap();
        tokio::task::yield_now().await;
        let weak = Arc::downgrade(&p.shared);
        assert!(p.shared.sweeper_running.load(Ordering::Acquire));
        drop(p);
        // The sweeper held no strong reference while sleeping.
        assert!(weak.upgrade().is_none());
        // And it exits: the runtime goes idle instead of sleeping until the 9 s deadline.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let metrics = tokio::runtime::Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn offline_users_keep_one_small_entry_and_no_deadline() {
        let p = MemoryPresence::new(config());
        for i in 0..100u64 {
            let u = UserId::from(format!("u{i}"));
            p.connect(&u, ConnectionId::from_raw(i)).await.unwrap();
            p.disconnect(&u, ConnectionId::from_raw(i)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut users = 0;
        for shard in p.shared.shards.iter() {
            let shard = shard.lock().unwrap();
            assert!(shard.deadlines.is_empty());
            for state in shard.users.values() {
                assert!(state.sessions.is_empty() && state.sessions.capacity() == 0);
                assert!(!state.online);
            }
            users += shard.users.len();
        }
        assert_eq!(users, 100);
        // Reads of unknown users allocate nothing.
        p.presence(&[UserId::from("nobody")]).await.unwrap();
        let total: usize = p
            .shared
            .shards
            .iter()
            .map(|s| s.lock().unwrap().users.len())
            .sum();
        assert_eq!(total, 100);
    }
}
