//! Conformance suite for [`PresenceTracker`] backends.
//!
//! Every case is a plain `pub async fn(&dyn PresenceTracker, &Timing)`;
//! [`presence_conformance_tests!`](crate::presence_conformance_tests) expands each into one
//! `#[tokio::test]` named after the case. The macro takes an **async factory** that builds a
//! tracker for a given [`PresenceConfig`] (the suite chooses short timings):
//!
//! ```ignore
//! // In-memory, on tokio's paused clock (the default mode): every case runs instantly.
//! chat_core::presence_conformance_tests!(|config: PresenceConfig| async move {
//!     chat_core::memory::MemoryPresence::new(config)
//! });
//!
//! // A backend whose clock tokio cannot pause (Redis expires keys on its own clock): the same
//! // cases on the real clock, with TTL 1.5 s and debounce 0.5 s. `with_guard`: the factory
//! // also returns what must outlive the tracker (here the test server), dropped after the case.
//! chat_core::presence_conformance_tests!(with_guard, real_clock, |config: PresenceConfig| async move {
//!     let server = chat_testkit::RedisServer::start().await;
//!     let tracker = RedisPresence::connect(&server.url(), &fresh_prefix(), NodeId::new(1).unwrap(), config)
//!         .await
//!         .unwrap();
//!     (tracker, server)
//! });
//!
//! // Real clock with custom timings (e.g. a backend that sweeps only every 500 ms).
//! chat_core::presence_conformance_tests!(
//!     real_clock,
//!     timing = chat_core::testing::presence::Timing { slack: Duration::from_secs(2), ..Timing::real_clock() },
//!     |config: PresenceConfig| async move { /* … */ }
//! );
//! ```
//!
//! The factory is called once per case; it may return any `T: PresenceTracker` (a concrete
//! type, an `Arc<T>` or a [`DynPresenceTracker`](crate::presence::DynPresenceTracker)).
//!
//! # Time
//!
//! Cases only wait with `tokio::time::sleep`/`timeout`, so the same code runs in both modes:
//! * **paused** (`presence_conformance_tests!(factory)` or `(paused_clock, factory)`):
//!   `#[tokio::test(start_paused = true)]`, [`Timing::paused`] (TTL 9 s, debounce 3 s). Time
//!   jumps to the next timer whenever every task is idle, so the suite takes milliseconds.
//! * **real** (`(real_clock, factory)`): a multi-threaded `#[tokio::test]`,
//!   [`Timing::real_clock`] (TTL 1.5 s, debounce 0.5 s): the suite takes a few seconds per case.
//!
//! # Requirements on the backend
//!
//! * The backend may be shared with other tests and hold other data: every case uses fresh,
//!   random user and session ids and filters change events by user.
//! * Cases call [`PresenceTracker::watch`] before they expect a user's changes.
//! * `last_seen` is compared with [`crate::time::now_ms`] of the test process, within
//!   [`Timing::tolerance`].
//! * A heartbeat of an unknown session re-creates it (heals a session that expired while its
//!   client stayed connected).
//!
//! Callers need `tokio` as a dev-dependency with the `macros` feature (and `test-util` for the
//! paused mode).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::id::{ConnectionId, UserId};
use crate::model::{Presence, PresenceStatus};
use crate::presence::{PresenceConfig, PresenceTracker};
use crate::time::now_ms;

/// The timing a suite run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Handed to the factory.
    pub config: PresenceConfig,
    /// How late after a deadline a backend may be in reporting it (expiry sweeps, pub/sub
    /// delivery); also the longest wait for an expected event.
    pub slack: Duration,
    /// Allowed difference between a `last_seen` and the test's own clock reading.
    pub tolerance: Duration,
}

impl Timing {
    /// For tokio's paused clock: TTL 9 s, debounce 3 s (time is free).
    pub fn paused() -> Self {
        Self {
            config: PresenceConfig {
                ttl: Duration::from_secs(9),
                offline_debounce: Duration::from_secs(3),
            },
            slack: Duration::from_secs(1),
            tolerance: Duration::from_millis(100),
        }
    }

    /// For the real clock: TTL 1.5 s, debounce 0.5 s, 1 s of slack.
    pub fn real_clock() -> Self {
        Self {
            config: PresenceConfig {
                ttl: Duration::from_millis(1500),
                offline_debounce: Duration::from_millis(500),
            },
            slack: Duration::from_secs(1),
            tolerance: Duration::from_millis(250),
        }
    }

    fn ttl(&self) -> Duration {
        self.config.ttl
    }

    fn debounce(&self) -> Duration {
        self.config.offline_debounce
    }
}

/// Builds the tracker of one case (used by the macro).
pub async fn build<F, Fut, T>(timing: &Timing, factory: F) -> T
where
    F: FnOnce(PresenceConfig) -> Fut,
    Fut: Future<Output = T>,
    T: PresenceTracker,
{
    factory(timing.config).await
}

/// Builds the tracker of one case and what must outlive it (used by the macro's `with_guard`
/// form).
pub async fn build_guarded<F, Fut, T, G>(timing: &Timing, factory: F) -> (T, G)
where
    F: FnOnce(PresenceConfig) -> Fut,
    Fut: Future<Output = (T, G)>,
    T: PresenceTracker,
{
    factory(timing.config).await
}

/// Expands the presence conformance suite into one `#[tokio::test]` per case.
///
/// The shape of the three suites (see [`crate::store_conformance_tests`]): an optional
/// `with_guard,` (the factory then returns `(tracker, guard)`, the guard living until the case
/// ends), the clock, then the factory closure `|config: PresenceConfig| async move { … }`
/// returning a `T: PresenceTracker`. Clocks (see [`crate::testing::presence`]):
/// * none or `paused_clock,` — tokio's paused clock, [`Timing::paused`];
/// * `real_clock,` — the real clock, [`Timing::real_clock`];
/// * `real_clock, timing = expr,` — the real clock with custom [`Timing`].
///
/// Invoke the macro at module level of an integration test (it defines functions).
#[macro_export]
macro_rules! presence_conformance_tests {
    (@cases $mode:ident, $build:ident, $timing:expr, $factory:expr) => {
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, connect_turns_online_and_emits_a_change);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, never_seen_user_is_offline_without_last_seen);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, presence_answers_in_the_order_asked);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, second_device_keeps_the_user_online);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, disconnect_turns_offline_after_the_debounce);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, reconnect_within_the_debounce_does_not_flap);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, session_not_heartbeated_expires_after_ttl_and_debounce);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, heartbeated_sessions_stay_online_across_ttls);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, heartbeat_revives_an_expired_session);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, is_connected_ignores_the_debounce);
        $crate::presence_conformance_tests!(@case $mode, $build, $timing, $factory, disconnect_of_an_unknown_session_is_harmless);
    };
    (@case paused, $build:ident, $timing:expr, $factory:expr, $case:ident) => {
        #[::tokio::test(start_paused = true)]
        async fn $case() {
            let timing = $timing;
            $crate::presence_conformance_tests!(@run $build, timing, $factory, $case);
        }
    };
    (@case real, $build:ident, $timing:expr, $factory:expr, $case:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let timing = $timing;
            $crate::presence_conformance_tests!(@run $build, timing, $factory, $case);
        }
    };
    (@run build, $timing:ident, $factory:expr, $case:ident) => {
        let tracker = $crate::testing::presence::build(&$timing, $factory).await;
        $crate::testing::presence::$case(&tracker, &$timing).await;
    };
    (@run build_guarded, $timing:ident, $factory:expr, $case:ident) => {
        let (tracker, guard) = $crate::testing::presence::build_guarded(&$timing, $factory).await;
        $crate::testing::presence::$case(&tracker, &$timing).await;
        // The part first, then what it needed (e.g. its server).
        drop(tracker);
        drop(guard);
    };
    (@clock $build:ident, real_clock, timing = $timing:expr, $factory:expr $(,)?) => {
        $crate::presence_conformance_tests!(@cases real, $build, $timing, $factory);
    };
    (@clock $build:ident, real_clock, $factory:expr $(,)?) => {
        $crate::presence_conformance_tests!(
            @cases real, $build, $crate::testing::presence::Timing::real_clock(), $factory
        );
    };
    (@clock $build:ident, paused_clock, $factory:expr $(,)?) => {
        $crate::presence_conformance_tests!(
            @cases paused, $build, $crate::testing::presence::Timing::paused(), $factory
        );
    };
    (@clock $build:ident, $factory:expr $(,)?) => {
        $crate::presence_conformance_tests!(@clock $build, paused_clock, $factory);
    };
    (with_guard, $($rest:tt)*) => {
        $crate::presence_conformance_tests!(@clock build_guarded, $($rest)*);
    };
    ($($rest:tt)*) => {
        $crate::presence_conformance_tests!(@clock build, $($rest)*);
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A user id no other test (or earlier run against the same backend) uses.
fn fresh_user(label: &str) -> UserId {
    UserId::from(format!("conformance-{label}-{:016x}", random_u64()))
}

/// A session id no other test uses.
fn fresh_session() -> ConnectionId {
    ConnectionId::from_raw(random_u64())
}

async fn presence_of(tracker: &dyn PresenceTracker, user: &UserId) -> Presence {
    let mut all = tracker.presence(std::slice::from_ref(user)).await.unwrap();
    assert_eq!(all.len(), 1, "one answer per user asked");
    let p = all.remove(0);
    assert_eq!(&p.user_id, user, "answer for the user asked");
    p
}

async fn connected(tracker: &dyn PresenceTracker, user: &UserId) -> bool {
    let all = tracker
        .is_connected(std::slice::from_ref(user))
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "one answer per user asked");
    all[0]
}

/// Waits up to `within` for the next change of `user`, skipping other users' changes.
async fn next_change(
    changes: &mut broadcast::Receiver<Presence>,
    user: &UserId,
    within: Duration,
) -> Presence {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(p)) if &p.user_id == user => return p,
            Ok(Ok(_)) => continue,
            Ok(Err(RecvError::Lagged(n))) => panic!("change receiver lagged by {n} events"),
            Ok(Err(RecvError::Closed)) => panic!("change channel closed"),
            Err(_) => panic!("no change of {user} within {within:?}"),
        }
    }
}

/// Asserts that no change of `users` has been broadcast so far (non-blocking drain).
fn assert_no_change_yet(changes: &mut broadcast::Receiver<Presence>, users: &[&UserId]) {
    loop {
        match changes.try_recv() {
            Ok(p) => assert!(
                !users.contains(&&p.user_id),
                "unexpected change {p:?} (debounce not respected)"
            ),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Lagged(n)) => panic!("change receiver lagged by {n} events"),
            Err(TryRecvError::Closed) => panic!("change channel closed"),
        }
    }
}

/// Asserts that no change of `users` was broadcast before a change caused afterwards: a fresh
/// sentinel user connects, and its change must come before any change of `users`. Works for
/// backends that deliver changes asynchronously.
async fn assert_no_change(
    tracker: &dyn PresenceTracker,
    changes: &mut broadcast::Receiver<Presence>,
    users: &[&UserId],
    timing: &Timing,
) {
    let sentinel = fresh_user("sentinel");
    let session = fresh_session();
    tracker
        .watch(std::slice::from_ref(&sentinel))
        .await
        .unwrap();
    tracker.connect(&sentinel, session).await.unwrap();
    let deadline = tokio::time::Instant::now() + timing.slack;
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(p)) if p.user_id == sentinel => break,
            Ok(Ok(p)) => assert!(!users.contains(&&p.user_id), "unexpected change {p:?}"),
            Ok(Err(RecvError::Lagged(n))) => panic!("change receiver lagged by {n} events"),
            Ok(Err(RecvError::Closed)) => panic!("change channel closed"),
            Err(_) => panic!("the sentinel's online change never arrived"),
        }
    }
    tracker.disconnect(&sentinel, session).await.unwrap();
}

fn assert_near(actual: u64, expected_from: u64, expected_to: u64, tolerance: Duration, what: &str) {
    let tol = u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX);
    assert!(
        actual + tol >= expected_from && actual <= expected_to + tol,
        "{what}: {actual} not within [{expected_from}, {expected_to}] ± {tol} ms"
    );
}

/// Subscribes to changes and watches `users` (in that order, so nothing is missed).
async fn watching(
    tracker: &dyn PresenceTracker,
    users: &[&UserId],
) -> broadcast::Receiver<Presence> {
    let changes = tracker.changes();
    let users: Vec<UserId> = users.iter().map(|u| (*u).clone()).collect();
    tracker.watch(&users).await.unwrap();
    changes
}

/// Sleeps `duration`, heartbeating `sessions` every third of the TTL so they stay alive
/// however long the wait (the real-clock TTL is short).
async fn sleep_alive(
    tracker: &dyn PresenceTracker,
    sessions: &[(UserId, ConnectionId)],
    duration: Duration,
    timing: &Timing,
) {
    let end = tokio::time::Instant::now() + duration;
    loop {
        let step = (tokio::time::Instant::now() + timing.ttl() / 3).min(end);
        tokio::time::sleep_until(step).await;
        tracker.heartbeat(sessions).await.unwrap();
        if step >= end {
            return;
        }
    }
}

/// Connects and consumes the online change.
async fn go_online(
    tracker: &dyn PresenceTracker,
    changes: &mut broadcast::Receiver<Presence>,
    user: &UserId,
    session: ConnectionId,
    timing: &Timing,
) {
    tracker.connect(user, session).await.unwrap();
    let change = next_change(changes, user, timing.slack).await;
    assert_eq!(change.status, PresenceStatus::Online, "{change:?}");
}

// ---------------------------------------------------------------------------------------------
// Cases

/// Connecting an unseen user turns them online, with a change event stamped now.
pub async fn connect_turns_online_and_emits_a_change(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let user = fresh_user("online");
    let mut changes = watching(tracker, &[&user]).await;
    let before = now_ms();
    tracker.connect(&user, fresh_session()).await.unwrap();
    let after = now_ms();

    let change = next_change(&mut changes, &user, timing.slack).await;
    assert_eq!(change.status, PresenceStatus::Online);
    let seen = change.last_seen.expect("an online change has last_seen");
    assert_near(
        seen,
        before,
        after,
        timing.tolerance,
        "online change last_seen",
    );

    let p = presence_of(tracker, &user).await;
    assert_eq!(p.status, PresenceStatus::Online);
    assert!(p.last_seen.is_some(), "an online user has been seen: {p:?}");
    assert!(connected(tracker, &user).await);
}

/// A user never seen is offline with `last_seen: None`; asking does not create them.
pub async fn never_seen_user_is_offline_without_last_seen(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let user = fresh_user("never");
    let mut changes = watching(tracker, &[&user]).await;
    for _ in 0..2 {
        let p = presence_of(tracker, &user).await;
        assert_eq!(
            p,
            Presence {
                user_id: user.clone(),
                status: PresenceStatus::Offline,
                last_seen: None
            }
        );
        assert!(!connected(tracker, &user).await);
    }
    tokio::time::sleep(timing.debounce() + timing.slack).await;
    assert_eq!(presence_of(tracker, &user).await.last_seen, None);
    assert_no_change(tracker, &mut changes, &[&user], timing).await;
}

/// Batched reads answer one entry per user asked, in the order asked (duplicates included).
pub async fn presence_answers_in_the_order_asked(tracker: &dyn PresenceTracker, timing: &Timing) {
    let (on, off) = (fresh_user("on"), fresh_user("off"));
    let mut changes = watching(tracker, &[&on]).await;
    go_online(tracker, &mut changes, &on, fresh_session(), timing).await;
    let asked = [off.clone(), on.clone(), off.clone(), on.clone()];

    let p = tracker.presence(&asked).await.unwrap();
    let got: Vec<_> = p.iter().map(|p| (p.user_id.clone(), p.status)).collect();
    assert_eq!(
        got,
        vec![
            (off.clone(), PresenceStatus::Offline),
            (on.clone(), PresenceStatus::Online),
            (off.clone(), PresenceStatus::Offline),
            (on.clone(), PresenceStatus::Online),
        ]
    );
    assert_eq!(
        tracker.is_connected(&asked).await.unwrap(),
        vec![false, true, false, true]
    );
    assert!(tracker.presence(&[]).await.unwrap().is_empty());
    assert!(tracker.is_connected(&[]).await.unwrap().is_empty());
}

/// Two devices: the user stays online (no event) while either is connected.
pub async fn second_device_keeps_the_user_online(tracker: &dyn PresenceTracker, timing: &Timing) {
    let user = fresh_user("multi");
    let (phone, laptop) = (fresh_session(), fresh_session());
    let mut changes = watching(tracker, &[&user]).await;
    go_online(tracker, &mut changes, &user, phone, timing).await;
    tracker.connect(&user, laptop).await.unwrap();
    tracker.disconnect(&user, phone).await.unwrap();
    assert!(connected(tracker, &user).await, "the laptop is connected");

    let alive = [(user.clone(), laptop)];
    sleep_alive(tracker, &alive, timing.debounce() + timing.slack, timing).await;
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );
    assert!(connected(tracker, &user).await);
    // Neither a second online (laptop) nor an offline (phone) change.
    assert_no_change(tracker, &mut changes, &[&user], timing).await;

    // The last device leaving does turn the user offline.
    tracker.disconnect(&user, laptop).await.unwrap();
    let change = next_change(&mut changes, &user, timing.debounce() + timing.slack).await;
    assert_eq!(change.status, PresenceStatus::Offline);
}

/// After the last disconnect the user stays online for the debounce, then turns offline with a
/// change event whose `last_seen` is the disconnect time.
pub async fn disconnect_turns_offline_after_the_debounce(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let user = fresh_user("leaving");
    let session = fresh_session();
    let mut changes = watching(tracker, &[&user]).await;
    go_online(tracker, &mut changes, &user, session, timing).await;
    // Connected for a while, so "connect time" and "disconnect time" differ.
    tokio::time::sleep(timing.debounce()).await;

    let before = now_ms();
    tracker.disconnect(&user, session).await.unwrap();
    let after = now_ms();
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );

    tokio::time::sleep(timing.debounce() / 2).await;
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online,
        "still online halfway through the debounce"
    );
    assert_no_change_yet(&mut changes, &[&user]);

    let change = next_change(&mut changes, &user, timing.debounce() / 2 + timing.slack).await;
    assert_eq!(change.status, PresenceStatus::Offline);
    let seen = change
        .last_seen
        .expect("an offline change of a seen user has last_seen");
    assert_near(seen, before, after, timing.tolerance, "offline last_seen");

    let p = presence_of(tracker, &user).await;
    assert_eq!(p.status, PresenceStatus::Offline);
    assert_eq!(p.last_seen, Some(seen), "presence agrees with the change");
    assert!(!connected(tracker, &user).await);
}

/// Reconnecting within the debounce produces no change at all (no offline, no second online).
pub async fn reconnect_within_the_debounce_does_not_flap(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let user = fresh_user("flaky");
    let first = fresh_session();
    let mut changes = watching(tracker, &[&user]).await;
    go_online(tracker, &mut changes, &user, first, timing).await;

    tracker.disconnect(&user, first).await.unwrap();
    tokio::time::sleep(timing.debounce() / 2).await;
    let second = fresh_session();
    tracker.connect(&user, second).await.unwrap();

    // Well past the first disconnect's debounce.
    let alive = [(user.clone(), second)];
    sleep_alive(tracker, &alive, timing.debounce() + timing.slack, timing).await;
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );
    assert!(connected(tracker, &user).await);
    assert_no_change(tracker, &mut changes, &[&user], timing).await;

    // The debounce starts over from the second disconnect.
    tracker.disconnect(&user, second).await.unwrap();
    tokio::time::sleep(timing.debounce() / 2).await;
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );
    let change = next_change(&mut changes, &user, timing.debounce() / 2 + timing.slack).await;
    assert_eq!(change.status, PresenceStatus::Offline);
}

/// A session never heartbeated dies after the TTL; the user turns offline a debounce later,
/// last seen at the last sign of life (the connect).
pub async fn session_not_heartbeated_expires_after_ttl_and_debounce(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let user = fresh_user("silent");
    let mut changes = watching(tracker, &[&user]).await;
    let before = now_ms();
    go_online(tracker, &mut changes, &user, fresh_session(), timing).await;
    let after = now_ms();

    tokio::time::sleep(timing.ttl() / 2).await;
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );
    assert!(connected(tracker, &user).await, "alive within the TTL");

    // Past the TTL (connect happened up to `after - before` ms after `before`), inside the
    // debounce that follows it.
    tokio::time::sleep(timing.ttl() / 2 + timing.debounce() / 2).await;
    assert!(!connected(tracker, &user).await, "expired after the TTL");
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online,
        "the debounce applies after an expiry too"
    );
    assert_no_change_yet(&mut changes, &[&user]);

    let change = next_change(&mut changes, &user, timing.debounce() / 2 + timing.slack).await;
    assert_eq!(change.status, PresenceStatus::Offline);
    let seen = change.last_seen.expect("last_seen of an expired session");
    assert_near(
        seen,
        before,
        after,
        timing.tolerance,
        "last_seen of an expired session",
    );
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Offline
    );
}

/// Sessions heartbeated every third of the TTL (in one batch) stay online for several TTLs.
pub async fn heartbeated_sessions_stay_online_across_ttls(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let (a, b) = (fresh_user("beat-a"), fresh_user("beat-b"));
    let (sa, sb) = (fresh_session(), fresh_session());
    let mut changes = watching(tracker, &[&a, &b]).await;
    go_online(tracker, &mut changes, &a, sa, timing).await;
    go_online(tracker, &mut changes, &b, sb, timing).await;

    let batch = [(a.clone(), sa), (b.clone(), sb)];
    for _ in 0..9 {
        tokio::time::sleep(timing.ttl() / 3).await;
        // Alive before the heartbeat too: the previous one extended the sessions (a tracker
        // that re-creates expired sessions on heartbeat must not hide a missing refresh).
        assert_eq!(
            tracker.is_connected(&[a.clone(), b.clone()]).await.unwrap(),
            vec![true, true],
            "alive a third of a TTL after the last heartbeat"
        );
        tracker.heartbeat(&batch).await.unwrap();
        let p = tracker.presence(&[a.clone(), b.clone()]).await.unwrap();
        assert!(
            p.iter().all(|p| p.status == PresenceStatus::Online),
            "{p:?}"
        );
        assert_eq!(
            tracker.is_connected(&[a.clone(), b.clone()]).await.unwrap(),
            vec![true, true]
        );
    }
    assert_no_change(tracker, &mut changes, &[&a, &b], timing).await;
}

/// A heartbeat of a session the tracker no longer knows (it expired) re-creates it.
pub async fn heartbeat_revives_an_expired_session(tracker: &dyn PresenceTracker, timing: &Timing) {
    let user = fresh_user("revived");
    let session = fresh_session();
    let mut changes = watching(tracker, &[&user]).await;
    go_online(tracker, &mut changes, &user, session, timing).await;

    let gone = next_change(
        &mut changes,
        &user,
        timing.ttl() + timing.debounce() + timing.slack,
    )
    .await;
    assert_eq!(gone.status, PresenceStatus::Offline);
    assert!(!connected(tracker, &user).await);

    tracker.heartbeat(&[(user.clone(), session)]).await.unwrap();
    let back = next_change(&mut changes, &user, timing.slack).await;
    assert_eq!(back.status, PresenceStatus::Online);
    assert!(connected(tracker, &user).await);
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );
}

/// `is_connected` has no debounce: false right after the last disconnect, while `presence`
/// still says online; true again right after a reconnect.
pub async fn is_connected_ignores_the_debounce(tracker: &dyn PresenceTracker, timing: &Timing) {
    let user = fresh_user("push");
    let session = fresh_session();
    let mut changes = watching(tracker, &[&user]).await;
    go_online(tracker, &mut changes, &user, session, timing).await;
    assert!(connected(tracker, &user).await);

    tracker.disconnect(&user, session).await.unwrap();
    assert!(!connected(tracker, &user).await, "no live session");
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online,
        "debounced presence still online"
    );

    tracker.connect(&user, fresh_session()).await.unwrap();
    assert!(connected(tracker, &user).await);
    assert_no_change(tracker, &mut changes, &[&user], timing).await;
}

/// Disconnecting a session that was never connected changes nothing.
pub async fn disconnect_of_an_unknown_session_is_harmless(
    tracker: &dyn PresenceTracker,
    timing: &Timing,
) {
    let (stranger, user) = (fresh_user("stranger"), fresh_user("steady"));
    let mut changes = watching(tracker, &[&stranger, &user]).await;
    let session = fresh_session();
    go_online(tracker, &mut changes, &user, session, timing).await;

    tracker
        .disconnect(&stranger, fresh_session())
        .await
        .unwrap();
    tracker.disconnect(&user, fresh_session()).await.unwrap();
    assert!(!connected(tracker, &stranger).await);
    assert!(
        connected(tracker, &user).await,
        "the real session is untouched"
    );

    let alive = [(user.clone(), session)];
    sleep_alive(tracker, &alive, timing.debounce() + timing.slack, timing).await;
    assert_eq!(
        presence_of(tracker, &stranger).await.status,
        PresenceStatus::Offline
    );
    assert_eq!(
        presence_of(tracker, &user).await.status,
        PresenceStatus::Online
    );
    assert!(connected(tracker, &user).await);
    assert_no_change(tracker, &mut changes, &[&stranger, &user], timing).await;
}
