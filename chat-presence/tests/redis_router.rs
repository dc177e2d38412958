//! [`RedisRouter`] against a real `redis-server` (started by the test, one per test): the
//! router conformance suite, a Redis restart, and two engines chatting through Redis.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use chat_core::memory::{InProcessClient, InProcessTransport, MemoryStore};
use chat_core::model::{ConversationKind, PresenceStatus};
use chat_core::presence::{DynPresenceTracker, PresenceConfig};
use chat_core::protocol::SendMessage;
use chat_core::router::{DynRouter, Envelope, Inbound, Payload, Router, Topic};
use chat_core::{Chat, Command, ConversationId, Error, Event, NodeId, UserId};
use chat_presence::{RedisOptions, RedisPresence, RedisRouter};
use chat_testkit::{RedisServer, random_prefix};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn node(id: u16) -> NodeId {
    NodeId::new(id).unwrap()
}

chat_core::router_conformance_tests!(with_guard, |nodes: Vec<NodeId>| async move {
    let server = RedisServer::start().await;
    let prefix = random_prefix();
    let mut routers = Vec::new();
    for node in nodes {
        let router = RedisRouter::connect(&server.url(), &prefix, node)
            .await
            .unwrap();
        routers.push(Arc::new(router) as DynRouter);
    }
    (routers, server)
});

fn membership(i: u64) -> Payload {
    Payload::Membership {
        conversation_id: ConversationId::from_raw(i),
        user_id: UserId::from("someone"),
        joined: true,
    }
}

fn envelope(origin: NodeId, topic: &Topic, i: u64) -> Envelope {
    Envelope {
        origin,
        topic: topic.clone(),
        payload: membership(i),
    }
}

async fn recv(inbox: &mut mpsc::Receiver<Inbound>, within: Duration) -> Inbound {
    tokio::time::timeout(within, inbox.recv())
        .await
        .expect("nothing received in time")
        .expect("inbox open")
}

/// Redis restarts: publishing fails promptly while it is down; the subscriber reconnects,
/// resubscribes every topic (including one asked for during the outage), reports `Lagged`,
/// and delivery works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resubscribes_and_reports_lagged_after_a_redis_restart() {
    let mut server = RedisServer::start().await;
    let prefix = random_prefix();
    let options = RedisOptions::default()
        .with_op_timeout(Duration::from_millis(500))
        .with_reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let a = RedisRouter::connect_with(&server.url(), &prefix, node(1), options.clone())
        .await
        .unwrap();
    let b = RedisRouter::connect_with(&server.url(), &prefix, node(2), options)
        .await
        .unwrap();
    let (a_tx, _a_inbox) = mpsc::channel(16);
    a.start(a_tx).await.unwrap();
    let (b_tx, mut b_inbox) = mpsc::channel(16);
    b.start(b_tx).await.unwrap();
    let topic = Topic::Conversation(ConversationId::from_raw(1));
    let later = Topic::User(UserId::from("later"));
    b.subscribe(&topic).await.unwrap();

    a.publish(envelope(a.node(), &topic, 1)).await.unwrap();
    match recv(&mut b_inbox, Duration::from_secs(5)).await {
        Inbound::Envelope(e) => assert_eq!(*e, envelope(a.node(), &topic, 1)),
        Inbound::Lagged => panic!("lagged before any outage"),
    }

    server.kill().await;
    let started = Instant::now();
    let err = a
        .publish(envelope(a.node(), &topic, 2))
        .await
        .expect_err("publishing to a dead server fails");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "publish failed promptly ({:?})",
        started.elapsed()
    );
    // Wait until b has noticed the loss, then subscribe during the outage: refused for now,
    // made on reconnect.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.is_connected() {
        assert!(Instant::now() < deadline, "b never noticed the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    assert!(matches!(
        b.subscribe(&later).await,
        Err(Error::Unavailable { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(3));

    server.restart().await;
    match recv(&mut b_inbox, Duration::from_secs(15)).await {
        Inbound::Lagged => {}
        Inbound::Envelope(e) => panic!("the envelope published during the outage arrived: {e:?}"),
    }
    assert!(b.is_connected());

    // Publishing works again (the command connection reconnects on its own; a publish may
    // fail while it does), and both topics are subscribed.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = a.publish(envelope(a.node(), &topic, 3)).await {
        assert!(Instant::now() < deadline, "publish never recovered: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.publish(envelope(a.node(), &later, 4)).await.unwrap();
    for expected in [envelope(a.node(), &topic, 3), envelope(a.node(), &later, 4)] {
        match recv(&mut b_inbox, Duration::from_secs(5)).await {
            Inbound::Envelope(e) => assert_eq!(*e, expected),
            Inbound::Lagged => panic!("a second Lagged"),
        }
    }
}

/// A router stamps its own node on what it publishes (the receiver filters its own echoes by
/// it), and connecting to a dead address fails promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_the_publishing_node_and_dead_servers_fail_fast() {
    let server = RedisServer::start().await;
    let prefix = random_prefix();
    let a = RedisRouter::connect(&server.url(), &prefix, node(1))
        .await
        .unwrap();
    let b = RedisRouter::connect(&server.url(), &prefix, node(2))
        .await
        .unwrap();
    let (tx, mut inbox) = mpsc::channel(16);
    b.start(tx).await.unwrap();
    let topic = Topic::User(UserId::from("u:with:colons"));
    b.subscribe(&topic).await.unwrap();
    assert_eq!(b.channel(&topic), format!("{prefix}:t:user:u:with:colons"));
    // Claims to come from node 2 (b itself): stamped with node 1, so b does receive it.
    a.publish(envelope(node(2), &topic, 1)).await.unwrap();
    match recv(&mut inbox, Duration::from_secs(5)).await {
        Inbound::Envelope(e) => assert_eq!(*e, envelope(node(1), &topic, 1)),
        Inbound::Lagged => panic!("lagged"),
    }

    let dead = format!("redis://127.0.0.1:{}/", chat_testkit::free_port());
    let started = Instant::now();
    let err = RedisRouter::connect_with(
        &dead,
        &prefix,
        node(3),
        RedisOptions::default().with_op_timeout(Duration::from_millis(500)),
    )
    .await
    .expect_err("nothing listens there");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        RedisRouter::connect("not a url", &prefix, node(3)).await,
        Err(Error::Invalid(_))
    ));
}

/// Waits (up to 10 s) for an event matching `pred`, skipping others.
async fn expect_event(
    client: &mut InProcessClient,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, client.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("{}: closed while waiting for {what}", client.user_id()),
            Err(_) => panic!("{}: no {what}", client.user_id()),
        }
    }
}

/// Two engines (one store, as two processes would share a database) joined only by Redis:
/// a message crosses nodes, and presence subscriptions see the other node's user come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_chat_and_see_presence_through_redis() {
    let server = RedisServer::start().await;
    let prefix = random_prefix();
    let store = Arc::new(MemoryStore::new());
    let presence_config = PresenceConfig {
        ttl: Duration::from_secs(3),
        offline_debounce: Duration::from_millis(500),
    };
    let mut nodes = Vec::new();
    for id in [1, 2] {
        let router = RedisRouter::connect(&server.url(), &prefix, node(id))
            .await
            .unwrap();
        let presence = RedisPresence::connect(&server.url(), &prefix, node(id), presence_config)
            .await
            .unwrap();
        let chat = Chat::builder()
            .configure(|c| {
                c.node_id = node(id);
                c.presence = presence_config;
                c.rate_limit = None;
            })
            .store(store.clone())
            .router(Arc::new(router) as DynRouter)
            .presence(Arc::new(presence) as DynPresenceTracker)
            .build()
            .await
            .unwrap();
        nodes.push(InProcessTransport::new(chat));
    }
    let (alice_id, bob_id) = (UserId::from("alice"), UserId::from("bob"));
    let conv = nodes[0]
        .chat()
        .create_conversation(
            &alice_id,
            ConversationKind::Direct,
            std::slice::from_ref(&bob_id),
            None,
        )
        .await
        .unwrap()
        .conversation
        .id;
    let mut alice = nodes[0].connect("alice").await.unwrap();
    let mut bob = nodes[1].connect("bob").await.unwrap();

    alice
        .send(Command::PresenceSubscribe {
            user_ids: vec![bob_id.clone()],
        })
        .await;
    expect_event(&mut alice, "bob online", |e| {
        matches!(e, Event::Presence { user_id, status: PresenceStatus::Online, .. } if *user_id == bob_id)
    })
    .await;

    alice
        .send(Command::Message(SendMessage {
            conversation_id: conv,
            client_msg_id: "m1".into(),
            content: "hello across nodes".into(),
            kind: Default::default(),
            media: None,
            reply_to: None,
        }))
        .await;
    expect_event(&mut alice, "the ack", |e| {
        matches!(e, Event::MessageAck { seq: 1, .. })
    })
    .await;
    let got = expect_event(&mut bob, "alice's message", |e| {
        matches!(e, Event::Message { .. })
    })
    .await;
    assert!(
        matches!(&got, Event::Message { message, .. } if message.content == "hello across nodes" && message.seq == 1),
        "{got:?}"
    );

    bob.close().await;
    let gone = expect_event(&mut alice, "bob offline", |e| {
        matches!(e, Event::Presence { user_id, status: PresenceStatus::Offline, .. } if *user_id == bob_id)
    })
    .await;
    assert!(matches!(
        gone,
        Event::Presence {
            last_seen: Some(_),
            ..
        }
    ));
    // Revocation crosses nodes through Redis too: bob's new device on node 2 is closed by a
    // revoke on node 1, where bob has none.
    let bob_again = nodes[1].connect("bob").await.unwrap();
    assert_eq!(nodes[0].chat().revoke_user(&bob_id).await.unwrap(), 0);
    tokio::time::timeout(Duration::from_secs(5), bob_again.session().closed())
        .await
        .expect("bob's device on the other node was not revoked");
    assert_eq!(
        bob_again.close_reason(),
        Some(chat_core::CloseReason::Revoked)
    );
    assert!(alice.close_reason().is_none());
}
