//! Several engines in one process joined by the in-process router hub, sharing one store and one
//! presence tracker: the multi-node behaviour of the engine, without Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chat_core::memory::{
    InProcessClient, InProcessTransport, MemoryPresence, MemoryRouterHub, MemoryStore,
};
use chat_core::model::{ConversationKind, PresenceStatus, ReceiptKind};
use chat_core::presence::PresenceConfig;
use chat_core::router::{Envelope, Payload, Router, Topic};
use chat_core::{Chat, ChatConfig, Command, ConversationId, Event, NodeId, UserId};
use common::*;

struct Cluster {
    hub: MemoryRouterHub,
    nodes: Vec<InProcessTransport>,
}

impl Cluster {
    async fn new(n: u16, f: impl Fn(&mut ChatConfig)) -> Self {
        let store = Arc::new(MemoryStore::new());
        let presence = Arc::new(MemoryPresence::new(PresenceConfig::default()));
        let hub = MemoryRouterHub::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let chat = Chat::builder()
                .configure(|c| {
                    c.node_id = NodeId::new(i + 1).unwrap();
                    c.rate_limit = None;
                    f(c);
                })
                .store(store.clone())
                .presence(presence.clone())
                .router(Arc::new(hub.router(NodeId::new(i + 1).unwrap())))
                .build()
                .await
                .unwrap();
            nodes.push(InProcessTransport::new(chat));
        }
        Self { hub, nodes }
    }

    fn chat(&self, node: usize) -> &Chat {
        self.nodes[node].chat()
    }

    async fn connect(&self, node: usize, user: &str) -> InProcessClient {
        self.nodes[node].connect(user).await.unwrap()
    }

    async fn create(
        &self,
        kind: ConversationKind,
        creator: &str,
        others: &[String],
    ) -> ConversationId {
        let members: Vec<UserId> = others.iter().map(|u| UserId::from(u.as_str())).collect();
        self.chat(0)
            .create_conversation(&UserId::from(creator), kind, &members, None)
            .await
            .unwrap()
            .conversation
            .id
    }
}

#[tokio::test]
async fn a_direct_chat_across_nodes_carries_messages_typing_and_receipts() {
    let c = Cluster::new(3, |_| {}).await;
    let conv = c
        .create(ConversationKind::Direct, "alice", &["bob".into()])
        .await;
    let mut alice = c.connect(0, "alice").await;
    let mut bob_phone = c.connect(1, "bob").await;
    let mut bob_laptop = c.connect(2, "bob").await;
    let mut alice_tablet = c.connect(2, "alice").await;

    let (id, seq) = send_ok(&mut alice, conv, "x1", "hello from node 1").await;
    assert_eq!(seq, 1);
    for client in [&mut bob_phone, &mut bob_laptop, &mut alice_tablet] {
        match next(client).await {
            Event::Message { message, .. } => assert_eq!(message.message_id, id),
            other => panic!("{other:?}"),
        }
    }
    bob_phone
        .send(Command::Typing {
            conversation_id: conv,
        })
        .await;
    for client in [&mut alice, &mut alice_tablet] {
        assert!(
            matches!(next(client).await, Event::Typing { user_id, .. } if user_id == UserId::from("bob"))
        );
    }
    bob_phone
        .send(Command::Read {
            conversation_id: conv,
            seq: 1,
        })
        .await;
    // Every member device gets it, the reporting one too (it carries the change-stream
    // position the reporter needs to notice a missed change).
    for client in [
        &mut alice,
        &mut alice_tablet,
        &mut bob_laptop,
        &mut bob_phone,
    ] {
        match next(client).await {
            Event::Receipt {
                user_id, kind, seq, ..
            } => {
                assert_eq!(
                    (user_id, kind, seq),
                    (UserId::from("bob"), ReceiptKind::Read, 1)
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // Typing never echoed to the typist's device on another node; nothing twice.
    expect_quiet(&mut bob_laptop).await;
    expect_quiet(&mut bob_phone).await;
    expect_quiet(&mut alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_member_group_reaches_every_device_once_in_seq_order() {
    const MEMBERS: usize = 500;
    const MESSAGES: usize = 20;
    let c = Cluster::new(3, |cfg| cfg.outbound_queue = 4096).await;
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let conv = c.create(ConversationKind::Group, "sender", &members).await;
    let mut clients = Vec::new();
    for (i, m) in members.iter().enumerate() {
        clients.push(c.connect(i % 3, m).await);
    }
    let mut sender = c.connect(0, "sender").await;
    for i in 0..MESSAGES {
        send_ok(&mut sender, conv, &format!("g{i}"), &format!("n{i}")).await;
    }
    for client in &mut clients {
        let mut seqs = Vec::new();
        for _ in 0..MESSAGES {
            match next(client).await {
                Event::Message { message, .. } => seqs.push(message.seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());
        assert!(client.try_recv().is_none(), "delivered twice");
    }
    // O(nodes with members): each node subscribes the conversation topic once.
    assert!(c.hub.topic_count() >= 1);
}

#[tokio::test]
async fn membership_changes_reach_the_node_where_the_user_is_online() {
    let c = Cluster::new(2, |_| {}).await;
    let conv = c.create(ConversationKind::Group, "owner", &[]).await;
    let mut owner = c.connect(0, "owner").await;
    let mut carol = c.connect(1, "carol").await;
    let carol_id = UserId::from("carol");
    let owner_id = UserId::from("owner");
    c.chat(0)
        .add_members(&owner_id, conv, std::slice::from_ref(&carol_id))
        .await
        .unwrap();
    // The membership envelope crosses nodes asynchronously; wait until carol gets traffic.
    let mut delivered = false;
    for i in 0..50 {
        send_ok(&mut owner, conv, &format!("w{i}"), "welcome").await;
        if let Some(Event::Message { .. }) = carol.recv_timeout(QUIET).await {
            delivered = true;
            break;
        }
    }
    assert!(
        delivered,
        "carol on node 2 never received the group's messages"
    );
    c.chat(0)
        .remove_member(&owner_id, conv, &carol_id)
        .await
        .unwrap();
    tokio::time::sleep(QUIET).await;
    carol.drain();
    send_ok(&mut owner, conv, "after", "carol is gone").await;
    expect_quiet(&mut carol).await;
}

#[tokio::test(start_paused = true)]
async fn presence_crosses_nodes_to_subscribers() {
    let c = Cluster::new(2, |_| {}).await;
    let mut alice = c.connect(0, "alice").await;
    alice
        .send(Command::PresenceSubscribe {
            user_ids: vec![UserId::from("bob")],
        })
        .await;
    assert!(matches!(
        next(&mut alice).await,
        Event::Presence {
            status: PresenceStatus::Offline,
            ..
        }
    ));
    let bob = c.connect(1, "bob").await;
    assert!(matches!(
        next(&mut alice).await,
        Event::Presence {
            status: PresenceStatus::Online,
            ..
        }
    ));
    bob.close().await;
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    assert!(matches!(
        next(&mut alice).await,
        Event::Presence {
            status: PresenceStatus::Offline,
            ..
        }
    ));
    expect_quiet(&mut alice).await;
}

#[tokio::test]
async fn a_router_gap_makes_clients_resync_and_sync_fills_it() {
    let c = Cluster::new(2, |cfg| {
        cfg.router_inbox = 1;
        cfg.resync_jitter = std::time::Duration::from_millis(200);
    })
    .await;
    let conv = c
        .create(ConversationKind::Direct, "alice", &["bob".into()])
        .await;
    let mut bob = c.connect(1, "bob").await;
    // A burst the second node's inbox (capacity 1) cannot take without yielding in between.
    let flood = c.hub.router(NodeId::new(99).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    flood.start(tx).await.unwrap();
    for i in 0..50u64 {
        flood
            .publish(Envelope {
                origin: NodeId::new(99).unwrap(),
                topic: Topic::Conversation(conv),
                payload: Payload::Event {
                    event: Event::Typing {
                        conversation_id: conv,
                        user_id: UserId::from(format!("ghost{i}")),
                    },
                    except_user: None,
                    except_connection: None,
                },
            })
            .await
            .unwrap();
    }
    // Node 2 learns it lost envelopes and closes its clients with Resync.
    let closed = async {
        while bob.close_reason().is_none() {
            let _ = bob.recv_timeout(QUIET).await;
        }
    };
    tokio::time::timeout(WAIT, closed).await.expect("no resync");
    assert_eq!(bob.close_reason(), Some(chat_core::CloseReason::Resync));
    // The recipe: reconnect and sync, which misses nothing stored meanwhile.
    let mut alice = c.connect(0, "alice").await;
    send_ok(&mut alice, conv, "during", "sent during the gap").await;
    let mut bob = c.connect(1, "bob").await;
    bob.send(Command::Sync {
        conversations: BTreeMap::from([(conv, 0)]),
        streams: Default::default(),
    })
    .await;
    assert!(
        matches!(next(&mut bob).await, Event::Message { message, .. } if message.content == "sent during the gap")
    );
    assert!(matches!(next(&mut bob).await, Event::SyncDone { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_appending_to_one_conversation_get_gap_free_seqs() {
    let c = Cluster::new(2, |_| {}).await;
    let users: Vec<String> = (0..16).map(|i| format!("w{i}")).collect();
    let conv = c.create(ConversationKind::Group, "owner", &users).await;
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let mut client = c.connect(i % 2, u).await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for k in 0..100 {
                let cmid = format!("{}-{k}", client.user_id());
                client.send(text(conv, &cmid, "x")).await;
                loop {
                    match client.recv().await.unwrap() {
                        Event::MessageAck { seq, .. } => {
                            seqs.push(seq);
                            break;
                        }
                        Event::Message { .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
            }
            seqs
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for s in t.await.unwrap() {
            assert!(all.insert(s), "seq {s} assigned twice");
        }
    }
    assert_eq!(all, (1..=1600).collect());
    let per_node: HashMap<_, _> = (0..2)
        .map(|n| (n, c.chat(n).stats().messages_sent))
        .collect();
    assert_eq!(per_node.values().sum::<u64>(), 1600);
}
