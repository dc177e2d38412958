//! Several `chat-server` processes on one real Redis act as one chat: the wire contract across
//! nodes, a 500-member group, presence and receipts across nodes, and faults (Redis restarted
//! mid-traffic, a gateway killed mid-traffic).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

mod common;

use chat_testkit::RedisServer;
use common::{Frame, Node, WAIT};
use serde_json::json;

/// A `chat-server` process on the shared Redis.
async fn start_node(redis: &RedisServer, id: u16, extra: &[(&str, &str)]) -> Node {
    let mut env = vec![
        ("CHAT_REDIS_URL", redis.url()),
        ("CHAT_NODE_ID", id.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Node::spawn(&env, WAIT).await
}

async fn conversation(node: &Node, creator: &str, kind: &str, members: &[&str]) -> String {
    let (status, body) = node
        .http(
            "POST",
            "/api/conversations",
            creator,
            Some(json!({"kind": kind, "members": members})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_serve_the_whole_contract_across_nodes() {
    let redis = RedisServer::start().await;
    let timing = [
        ("CHAT_PRESENCE_TTL_MS", "3000"),
        ("CHAT_OFFLINE_DEBOUNCE_MS", "500"),
    ];
    let a = start_node(&redis, 1, &timing).await;
    let b = start_node(&redis, 2, &timing).await;
    // Created on node A, used on node B: the store is shared.
    let conv = conversation(&a, "alice", "direct", &["bob"]).await;
    let mut alice = a.ws("alice").await;
    let mut bob = b.ws("bob").await;
    let mut bob_laptop = a.ws("bob").await;

    // Presence across nodes: alice (on A) watches bob (on B and A).
    alice
        .send(json!({"type": "presence_subscribe", "user_ids": ["bob"]}))
        .await;
    assert_eq!(alice.recv_type("presence").await["status"], "online");

    // Messages both ways, each device once.
    let ack = alice.send_message(&conv, "a1", "hi from A").await;
    assert_eq!(ack["seq"], 1);
    for dev in [&mut bob, &mut bob_laptop] {
        let m = dev.recv_type("message").await;
        assert_eq!(m["message"]["content"], "hi from A");
    }
    let ack = bob.send_message(&conv, "b1", "hi from B").await;
    assert_eq!(ack["seq"], 2);
    assert_eq!(
        alice.recv_type("message").await["message"]["content"],
        "hi from B"
    );
    assert_eq!(bob_laptop.recv_type("message").await["message"]["seq"], 2);

    // Typing and receipts across nodes.
    bob.send(json!({"type": "typing", "conversation_id": conv}))
        .await;
    assert_eq!(alice.recv_type("typing").await["user_id"], "bob");
    bob.send(json!({"type": "read", "conversation_id": conv, "seq": 1}))
        .await;
    let r = alice.recv_type("receipt").await;
    assert_eq!(
        (r["user_id"].as_str(), r["kind"].as_str(), r["seq"].as_u64()),
        (Some("bob"), Some("read"), Some(1))
    );
    assert_eq!(bob_laptop.recv_type("receipt").await["seq"], 1);

    // History and the conversation list from either node.
    let (status, page) = b
        .http(
            "GET",
            &format!("/api/conversations/{conv}/messages"),
            "alice",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    let (_, list) = a.http("GET", "/api/conversations", "bob", None).await;
    assert_eq!(list["conversations"][0]["id"], conv.as_str());
    assert_eq!(
        list["conversations"][0]["unread"], 0,
        "bob's own message and the one he read"
    );

    // Sync on another node returns the same timeline.
    let replay = bob_laptop.sync_all(&conv, 0).await;
    assert_eq!(
        replay
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Bob leaves both nodes: alice sees him offline after the debounce.
    drop(bob);
    drop(bob_laptop);
    let p = alice.recv_type("presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["status"].as_str()),
        (Some("bob"), Some("offline"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_member_group_across_three_nodes_gets_every_message_once_in_order() {
    const MEMBERS: usize = 500;
    const MESSAGES: u64 = 10;
    let redis = RedisServer::start().await;
    let nodes = [
        start_node(&redis, 1, &[]).await,
        start_node(&redis, 2, &[]).await,
        start_node(&redis, 3, &[]).await,
    ];
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let conv = conversation(&nodes[0], "sender", "group", &refs).await;
    let mut clients = Vec::new();
    for (i, n) in names.iter().enumerate() {
        clients.push(nodes[i % 3].ws(n).await);
    }
    // Every member is subscribed on its node before the first send: a barrier per client.
    for c in &mut clients {
        c.send(json!({"type": "sync", "conversations": {}})).await;
        c.recv_type("sync_done").await;
    }
    let mut sender = nodes[1].ws("sender").await;
    for i in 0..MESSAGES {
        sender
            .send_message(&conv, &format!("g{i}"), &format!("n{i}"))
            .await;
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < MESSAGES as usize {
                let m = c.recv_type("message").await;
                assert_eq!(m["message"]["conversation_id"], conv.as_str());
                seqs.push(m["message"]["seq"].as_u64().unwrap());
            }
            // Nothing twice.
            if let Some(Frame::Json(v)) = c.next_frame(Duration::from_millis(100)).await {
                assert_ne!(v["type"], "message", "delivered twice: {v}");
            }
            seqs
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (1..=MESSAGES).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_traffic_loses_no_acked_message() {
    // Durable before ack: Redis fsyncs every write before answering.
    let mut redis =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let a = start_node(&redis, 1, &[]).await;
    let b = start_node(&redis, 2, &[]).await;
    let conv = conversation(&a, "alice", "direct", &["bob"]).await;
    let mut alice = a.ws("alice").await;
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    // Bob's view: message_id by seq, live or synced.
    let mut bob_seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut bob = b.ws("bob").await;
    let contiguous = |seen: &BTreeMap<u64, String>| {
        let mut n = 0;
        while seen.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    };

    let total = 60;
    for i in 0..total {
        if i == 20 {
            redis.restart().await;
        }
        // Send with retries (same client_msg_id) until acked; reconnect when the node closes
        // the socket (4000 resync after its pub/sub connection came back).
        let cmid = format!("r{i}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        'send: loop {
            assert!(tokio::time::Instant::now() < deadline, "{cmid} never acked");
            alice
                .send(json!({"type": "message", "conversation_id": conv, "client_msg_id": cmid, "content": cmid}))
                .await;
            loop {
                match alice.next_frame(Duration::from_secs(5)).await {
                    Some(Frame::Json(v))
                        if v["type"] == "message_ack" && v["client_msg_id"] == cmid.as_str() =>
                    {
                        acked.insert(
                            v["seq"].as_u64().unwrap(),
                            v["message_id"].as_str().unwrap().to_owned(),
                        );
                        break 'send;
                    }
                    Some(Frame::Json(v)) if v["type"] == "error" => {
                        // The store is unreachable: retry later with the same key.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'send;
                    }
                    Some(Frame::Json(_)) => continue,
                    Some(Frame::Closed(_)) | None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        alice = a.ws("alice").await;
                        continue 'send;
                    }
                }
            }
        }
        // Bob reads live; if his node asks him to resync (or drops him), he reconnects and
        // syncs from his last contiguous seq.
        while let Some(frame) = bob.next_frame(Duration::from_millis(5)).await {
            match frame {
                Frame::Json(v) if v["type"] == "message" => {
                    let m = &v["message"];
                    bob_seen.insert(
                        m["seq"].as_u64().unwrap(),
                        m["message_id"].as_str().unwrap().to_owned(),
                    );
                }
                Frame::Json(_) => {}
                Frame::Closed(_) => {
                    bob = b.ws("bob").await;
                    for m in bob.sync_all(&conv, contiguous(&bob_seen)).await {
                        bob_seen.insert(
                            m["seq"].as_u64().unwrap(),
                            m["message_id"].as_str().unwrap().to_owned(),
                        );
                    }
                }
            }
        }
    }
    // Seqs are exactly 1..=total (gap-free despite the restart and the retries).
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    // Every acked message is in history.
    let mut history = HashMap::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/conversations/{conv}/messages?limit=100&before={b}"),
            None => format!("/api/conversations/{conv}/messages?limit=100"),
        };
        // Like a client: a 503 (this node's first Redis call after the restart found its
        // connection dead) is retried after `Retry-After`.
        let (mut status, mut page) = b.http("GET", &path, "bob", None).await;
        for _ in 0..20 {
            if status != 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            (status, page) = b.http("GET", &path, "bob", None).await;
        }
        assert_eq!(status, 200, "{page}");
        for m in page["messages"].as_array().unwrap() {
            history.insert(
                m["seq"].as_u64().unwrap(),
                m["message_id"].as_str().unwrap().to_owned(),
            );
        }
        match page["next"].as_u64() {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    for (seq, id) in &acked {
        assert_eq!(
            history.get(seq),
            Some(id),
            "acked seq {seq} missing from history"
        );
    }
    // Every acked message reached bob, live or by the sync a client does after reconnecting.
    for m in bob.sync_all(&conv, contiguous(&bob_seen)).await {
        bob_seen.insert(
            m["seq"].as_u64().unwrap(),
            m["message_id"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(
        bob_seen, acked,
        "bob's timeline differs from what was acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_loses_nothing_and_its_users_go_offline() {
    let redis = RedisServer::start().await;
    let timing = [
        ("CHAT_PRESENCE_TTL_MS", "1500"),
        ("CHAT_OFFLINE_DEBOUNCE_MS", "500"),
    ];
    let a = start_node(&redis, 1, &timing).await;
    let mut b = start_node(&redis, 2, &timing).await;
    let conv = conversation(&a, "alice", "group", &["bob", "carol"]).await;
    let mut alice = a.ws("alice").await;
    alice
        .send(json!({"type": "presence_subscribe", "user_ids": ["carol"]}))
        .await;
    let mut bob = b.ws("bob").await;
    let _carol = b.ws("carol").await;
    // Wait until alice sees carol online (her presence crossed nodes).
    loop {
        let p = alice.recv_type("presence").await;
        if p["status"] == "online" {
            break;
        }
    }
    let mut bob_seen = HashSet::new();
    for i in 0..10 {
        alice.send_message(&conv, &format!("k{i}"), "x").await;
    }
    for _ in 0..10 {
        bob_seen.insert(
            bob.recv_type("message").await["message"]["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    // Node B dies (SIGKILL: no goodbye, no presence cleanup).
    b.kill().await;
    for i in 10..20 {
        alice.send_message(&conv, &format!("k{i}"), "x").await;
    }
    // Bob's client notices, reconnects to node A and syncs from his last contiguous seq.
    loop {
        match bob.next_frame(WAIT).await {
            Some(Frame::Closed(_)) | None => break,
            Some(Frame::Json(_)) => continue,
        }
    }
    let mut bob = a.ws("bob").await;
    for m in bob.sync_all(&conv, 10).await {
        bob_seen.insert(m["seq"].as_u64().unwrap());
    }
    assert_eq!(
        bob_seen,
        (1..=20).collect::<HashSet<_>>(),
        "bob missed messages"
    );
    // Carol's sessions lived only on the dead node: offline after TTL + debounce.
    let p = alice.recv_type("presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["status"].as_str()),
        (Some("carol"), Some("offline"))
    );
}

/// Sends a `streams` sync for `conv` until the node answers it without a transient error
/// (the node's first Redis calls after a Redis restart may fail; a failed conversation is
/// retried as `more` says). Returns the frames up to the `sync_done`.
async fn sync_streams_retrying(
    node: &Node,
    ws: &mut common::Ws,
    user: &str,
    conv: &str,
    from: serde_json::Value,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no answer to sync");
        ws.send(json!({"type": "sync", "streams": {conv: from.clone()}}))
            .await;
        let mut frames = Vec::new();
        let answered = loop {
            match ws.next_frame(Duration::from_secs(5)).await {
                Some(Frame::Json(v)) => {
                    let done = v["type"] == "sync_done";
                    let transient = v["type"] == "error" && v["code"] == "internal";
                    frames.push(v);
                    if transient {
                        break false;
                    }
                    if done {
                        break true;
                    }
                }
                // The node closed the socket (4000 resync after its Redis came back).
                Some(Frame::Closed(_)) | None => {
                    *ws = node.ws(user).await;
                    break false;
                }
            }
        };
        let retried = frames.last().is_some_and(|v| {
            v["more"]
                .as_array()
                .is_some_and(|m| m.iter().any(|c| c == conv))
        });
        if answered && !retried {
            return frames;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis that comes back with less than it acknowledged (restarted from an older snapshot,
/// or with nothing at all): a client syncing from its position gets a `reset` or `not_found`,
/// never a replay of a different history as if it were the rest of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_writes_gives_a_syncing_client_a_reset_not_a_wrong_replay() {
    let mut redis = RedisServer::start().await;
    let a = start_node(&redis, 1, &[]).await;
    let conv = conversation(&a, "alice", "direct", &["bob"]).await;
    let mut alice = a.ws("alice").await;
    alice.send_message(&conv, "m1", "one").await;
    alice.send_message(&conv, "m2", "two").await;
    // A snapshot with two messages; the third is acknowledged after it.
    let saved = std::process::Command::new("redis-cli")
        .args(["-p", &redis.addr().port().to_string(), "SAVE"])
        .output()
        .expect("redis-cli (installed with redis-server)");
    assert!(saved.status.success(), "{saved:?}");
    alice.send_message(&conv, "m3", "three").await;
    let mut bob = a.ws("bob").await;
    let first = sync_streams_retrying(&a, &mut bob, "bob", &conv, json!({"position": 0})).await;
    let stream = first.last().unwrap()["streams"][&conv].clone();
    assert_eq!(stream["position"], 3, "{first:?}");
    let epoch = stream["epoch"].as_str().unwrap().to_owned();

    // Redis restarts from the snapshot: the conversation is back at position 2.
    redis.restart().await;
    let from = json!({"epoch": epoch, "position": 3});
    let frames = sync_streams_retrying(&a, &mut bob, "bob", &conv, from.clone()).await;
    let reset = frames
        .iter()
        .find(|f| f["type"] == "reset")
        .unwrap_or_else(|| panic!("no reset: {frames:?}"));
    assert_eq!(reset["reason"], "too_far_behind");
    assert_eq!(
        reset["stream"]["position"], 2,
        "the stream as the store has it now"
    );
    assert!(
        frames.iter().all(|f| f["type"] != "message"),
        "nothing replayed: {frames:?}"
    );
    assert!(frames.last().unwrap().get("streams").is_none());

    // Redis comes back with nothing: the conversation is gone, and says so.
    redis.kill().await;
    let _ = std::fs::remove_file(redis.data_dir().join("dump.rdb"));
    redis.restart().await;
    let frames = sync_streams_retrying(&a, &mut bob, "bob", &conv, from).await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "not_found"),
        "{frames:?}"
    );
    assert!(frames.iter().all(|f| f["type"] != "message"), "{frames:?}");
}
