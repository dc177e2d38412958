//! [`RedisPresence`] against a real `redis-server` (started by the test, one per test): the
//! presence conformance suite on the real clock, plus the cluster cases the suite cannot
//! express (a node dying, offline detection without keyspace notifications, a Redis restart).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chat_core::model::{Presence, PresenceStatus};
use chat_core::presence::{PresenceConfig, PresenceTracker};
use chat_core::time::now_ms;
use chat_core::{ConnectionId, Error, NodeId, UserId};
use chat_presence::{RedisOptions, RedisPresence};
use chat_testkit::{RedisServer, random_prefix};
use tokio::sync::broadcast;
use tokio::time::Instant;

fn node(id: u16) -> NodeId {
    NodeId::new(id).unwrap()
}

/// The whole suite on the real clock (Redis expires keys on its own clock). Timings wider than
/// `Timing::real_clock` so that a loaded 2-core CI machine, where a sleep may wake hundreds of
/// milliseconds late, does not make it flaky: every "not yet" check has a margin of half the
/// debounce (1 s) or two thirds of the TTL (2 s).
mod conformance {
    use std::time::Duration;

    use chat_core::presence::PresenceConfig;
    use chat_core::testing::presence::Timing;
    use chat_presence::RedisPresence;
    use chat_testkit::{RedisServer, random_prefix};

    use super::node;

    chat_core::presence_conformance_tests!(
        with_guard,
        real_clock,
        timing = Timing {
            config: PresenceConfig {
                ttl: Duration::from_millis(3000),
                offline_debounce: Duration::from_millis(2000),
            },
            slack: Duration::from_secs(2),
            ..Timing::real_clock()
        },
        |config: PresenceConfig| async move {
            let server = RedisServer::start().await;
            let tracker = RedisPresence::connect(&server.url(), &random_prefix(), node(1), config)
                .await
                .unwrap();
            assert!(
                tracker.keyspace_events(),
                "the test server notifies expired keys"
            );
            (tracker, server)
        }
    );
}

/// Waits for the next change of `user`.
async fn next_change(
    changes: &mut broadcast::Receiver<Presence>,
    user: &UserId,
    within: Duration,
) -> Presence {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(p)) if &p.user_id == user => return p,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("change channel: {e}"),
            Err(_) => panic!("no change of {user} within {within:?}"),
        }
    }
}

/// Every change received within `window`.
async fn changes_within(
    changes: &mut broadcast::Receiver<Presence>,
    window: Duration,
) -> Vec<Presence> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(p)) => out.push(p),
            Ok(Err(e)) => panic!("change channel: {e}"),
            Err(_) => return out,
        }
    }
}

/// Several nodes: one connects two users (one with two devices) and dies without
/// disconnecting; once the TTL and the debounce have passed, the surviving nodes report them
/// offline, last seen at their last heartbeat, and each change is published exactly once
/// however many nodes noticed the expiry.
async fn dead_node_case(server: &RedisServer, config: PresenceConfig, options: RedisOptions) {
    let prefix = random_prefix();
    let url = server.url();
    let dying = RedisPresence::connect_with(&url, &prefix, node(1), config, options.clone())
        .await
        .unwrap();
    let mut observers = Vec::new();
    for id in [2, 3] {
        observers.push(
            RedisPresence::connect_with(&url, &prefix, node(id), config, options.clone())
                .await
                .unwrap(),
        );
    }
    let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
    let users = [alice.clone(), bob.clone()];
    let mut changes = Vec::new();
    for o in &observers {
        let rx = o.changes();
        o.watch(&users).await.unwrap();
        changes.push(rx);
    }

    let before = now_ms();
    dying
        .connect(&alice, ConnectionId::from_raw(1))
        .await
        .unwrap();
    dying
        .connect(&bob, ConnectionId::from_raw(2))
        .await
        .unwrap();
    dying
        .connect(&bob, ConnectionId::from_raw(3))
        .await
        .unwrap();
    let after = now_ms();
    for rx in &mut changes {
        for user in &users {
            let p = next_change(rx, user, Duration::from_secs(2)).await;
            assert_eq!(p.status, PresenceStatus::Online);
        }
    }
    drop(dying); // Crash: no disconnect, its tasks and connections gone.
    let dropped = Instant::now();

    // Online (and connected) until the TTL lapses.
    tokio::time::sleep(config.ttl / 2).await;
    assert_eq!(
        observers[0].is_connected(&users).await.unwrap(),
        vec![true, true]
    );

    let window = config.ttl + config.offline_debounce + Duration::from_secs(3);
    let mut received = Vec::new();
    for rx in &mut changes {
        received.push(changes_within(rx, window.saturating_sub(dropped.elapsed())).await);
    }
    for (i, got) in received.iter().enumerate() {
        for user in &users {
            let of_user: Vec<_> = got.iter().filter(|p| &p.user_id == user).collect();
            assert_eq!(
                of_user.len(),
                1,
                "observer {i}: exactly one change of {user}, got {got:?}"
            );
            assert_eq!(of_user[0].status, PresenceStatus::Offline);
            let seen = of_user[0].last_seen.unwrap();
            assert!(
                seen + 250 >= before && seen <= after + 250,
                "last seen {seen} is the last heartbeat ({before}..{after})"
            );
        }
    }
    for o in &observers {
        let p = o.presence(&users).await.unwrap();
        assert!(
            p.iter().all(|p| p.status == PresenceStatus::Offline),
            "{p:?}"
        );
        assert_eq!(o.is_connected(&users).await.unwrap(), vec![false, false]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_users_go_offline_once() {
    let server = RedisServer::start().await;
    let config = PresenceConfig {
        ttl: Duration::from_millis(1500),
        offline_debounce: Duration::from_millis(1000),
    };
    // A sweep interval far longer than the test: expiry events alone drive the detection.
    let options = RedisOptions::default().with_sweep_interval(Duration::from_secs(60));
    dead_node_case(&server, config, options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keyspace_notifications_the_sweep_detects_a_dead_node() {
    let server = RedisServer::start_with(&["--notify-keyspace-events", ""]).await;
    let config = PresenceConfig {
        ttl: Duration::from_millis(1500),
        offline_debounce: Duration::from_millis(1000),
    };
    let probe = RedisPresence::connect(&server.url(), &random_prefix(), node(9), config)
        .await
        .unwrap();
    assert!(
        !probe.keyspace_events(),
        "notifications are off on this server"
    );
    drop(probe);
    let options = RedisOptions::default().with_sweep_interval(Duration::from_millis(300));
    dead_node_case(&server, config, options).await;
}

/// Redis restarts (losing every key): calls fail promptly while it is down; afterwards the
/// trackers reconnect, reload their scripts, resubscribe, and the next heartbeat brings the
/// user back online for the watchers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_redis_restart() {
    let mut server = RedisServer::start().await;
    let prefix = random_prefix();
    let config = PresenceConfig {
        ttl: Duration::from_secs(5),
        offline_debounce: Duration::from_secs(1),
    };
    let options = RedisOptions::default()
        .with_op_timeout(Duration::from_millis(500))
        .with_reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let home =
        RedisPresence::connect_with(&server.url(), &prefix, node(1), config, options.clone())
            .await
            .unwrap();
    let watcher = RedisPresence::connect_with(&server.url(), &prefix, node(2), config, options)
        .await
        .unwrap();
    let carol = UserId::from("carol");
    let session = ConnectionId::from_raw(7);
    let mut changes = watcher.changes();
    watcher.watch(std::slice::from_ref(&carol)).await.unwrap();
    home.connect(&carol, session).await.unwrap();
    let p = next_change(&mut changes, &carol, Duration::from_secs(2)).await;
    assert_eq!(p.status, PresenceStatus::Online);

    server.kill().await;
    let started = Instant::now();
    let err = home
        .heartbeat(&[(carol.clone(), session)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "failed promptly ({:?})",
        started.elapsed()
    );
    assert!(matches!(
        watcher.presence(std::slice::from_ref(&carol)).await,
        Err(Error::Unavailable { .. })
    ));

    server.restart().await;
    // The engine heartbeats every third of the TTL; here: until it works again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match home.heartbeat(&[(carol.clone(), session)]).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "heartbeat while reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no heartbeat after the restart: {e}"),
        }
    }
    // The watcher hears of carol again (the heartbeat re-created her session: online), once
    // its subscription is back; the resync after its reconnect may say so too.
    // (Before the heartbeat, the resync may report her offline: the restart lost every key.)
    loop {
        let p = next_change(&mut changes, &carol, Duration::from_secs(15)).await;
        if p.status == PresenceStatus::Online {
            break;
        }
    }
    assert_eq!(
        watcher
            .presence(std::slice::from_ref(&carol))
            .await
            .unwrap()[0]
            .status,
        PresenceStatus::Online
    );
    // And changes flow: a disconnect turns her offline after the debounce.
    home.disconnect(&carol, session).await.unwrap();
    loop {
        let p = next_change(&mut changes, &carol, Duration::from_secs(5)).await;
        if p.status == PresenceStatus::Offline {
            break;
        }
    }
}

/// The first call after Redis restarted meets a dead connection *and* a server without the
/// scripts; the shared layer retries once for each, so the call succeeds (no call has to fail
/// for the tracker to recover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_a_redis_restart_succeeds() {
    let mut server = RedisServer::start().await;
    let config = PresenceConfig {
        ttl: Duration::from_secs(5),
        offline_debounce: Duration::from_secs(1),
    };
    let options = RedisOptions::default().with_op_timeout(Duration::from_secs(3));
    let tracker =
        RedisPresence::connect_with(&server.url(), &random_prefix(), node(1), config, options)
            .await
            .unwrap();
    let dave = UserId::from("dave");
    let session = ConnectionId::from_raw(3);
    tracker.connect(&dave, session).await.unwrap();
    server.restart().await;
    tracker
        .heartbeat(&[(dave.clone(), session)])
        .await
        .expect("the first heartbeat after the restart");
    assert_eq!(
        tracker
            .is_connected(std::slice::from_ref(&dave))
            .await
            .unwrap(),
        [true]
    );
    server.restart().await;
    tracker
        .disconnect(&dave, session)
        .await
        .expect("the first disconnect after another restart");
}

/// `unwatch` unsubscribes: the node no longer hears of that user (checked against a barrier:
/// a change of a still-watched user, published after, must come first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwatch_stops_the_changes_of_that_user() {
    let server = RedisServer::start().await;
    let prefix = random_prefix();
    let config = PresenceConfig {
        ttl: Duration::from_secs(5),
        offline_debounce: Duration::from_millis(100),
    };
    let home = RedisPresence::connect(&server.url(), &prefix, node(1), config)
        .await
        .unwrap();
    let watcher = RedisPresence::connect(&server.url(), &prefix, node(2), config)
        .await
        .unwrap();
    let (dave, erin) = (UserId::from("dave"), UserId::from("erin"));
    let mut changes = watcher.changes();
    watcher.watch(&[dave.clone(), erin.clone()]).await.unwrap();
    home.connect(&dave, ConnectionId::from_raw(1))
        .await
        .unwrap();
    let p = next_change(&mut changes, &dave, Duration::from_secs(2)).await;
    assert_eq!(p.status, PresenceStatus::Online);

    watcher.unwatch(std::slice::from_ref(&dave)).await.unwrap();
    watcher.unwatch(std::slice::from_ref(&dave)).await.unwrap(); // idempotent
    home.disconnect(&dave, ConnectionId::from_raw(1))
        .await
        .unwrap();
    // Dave's offline change is published (well) within this wait, on a channel the watcher
    // left; then the barrier.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        watcher.presence(std::slice::from_ref(&dave)).await.unwrap()[0].status,
        PresenceStatus::Offline,
        "reads do not depend on watching"
    );
    home.connect(&erin, ConnectionId::from_raw(3))
        .await
        .unwrap();
    // The very next change is erin's: nothing of dave came before it.
    let barrier = tokio::time::timeout(Duration::from_secs(2), changes.recv())
        .await
        .expect("erin's change")
        .unwrap();
    assert_eq!(
        (barrier.user_id, barrier.status),
        (erin, PresenceStatus::Online)
    );
    assert!(
        changes.try_recv().is_err(),
        "nothing else, in particular no change of the unwatched user"
    );
}
