//! The gateway against real WebSocket and HTTP clients on port 0: the wire contract end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_transport::auth::JwtAuth;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn messages_acks_and_multi_device_over_websocket() {
    let s = Server::start().await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let mut alice = s.ws("alice").await;
    let mut alice2 = s.ws("alice").await;
    let mut bob = s.ws("bob").await;
    let ack = alice.send_message(&conv, "c1", "hello bob").await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["conversation_id"], conv.as_str());
    assert!(
        ack["message_id"].is_string(),
        "64-bit ids travel as strings"
    );
    assert!(ack["timestamp"].is_u64());
    for c in [&mut bob, &mut alice2] {
        let m = c.recv_type("message").await;
        assert_eq!(m["message"]["content"], "hello bob");
        assert_eq!(m["message"]["message_id"], ack["message_id"]);
        assert_eq!(m["message"]["sender_id"], "alice");
        assert_eq!(m["message"]["seq"], 1);
        assert_eq!(m["message"]["deleted"], false);
        assert_eq!(m["message"]["version"], 1);
    }
    alice.quiet().await;
    // A retry returns the same ids.
    let again = alice.send_message(&conv, "c1", "hello bob").await;
    assert_eq!(again["message_id"], ack["message_id"]);
    bob.quiet().await;
}

#[tokio::test]
async fn typing_receipts_edits_deletes_sync_and_presence_frames() {
    let s = Server::start().await;
    let conv = s.conversation("alice", "group", &["bob"]).await;
    let mut alice = s.ws("alice").await;
    let mut bob = s.ws("bob").await;
    let ack = alice.send_message(&conv, "m1", "first").await;
    let _ = bob.recv_type("message").await;

    bob.send(json!({"type": "typing", "conversation_id": conv}))
        .await;
    let t = alice.recv().await;
    assert_eq!(
        t,
        json!({"type": "typing", "conversation_id": conv, "user_id": "bob"})
    );

    bob.send(json!({"type": "delivered", "conversation_id": conv, "seq": 1}))
        .await;
    bob.send(json!({"type": "read", "conversation_id": conv, "seq": 1}))
        .await;
    // Every member device gets them, bob's own too, each with its change-stream position
    // (the message took 1).
    for device in [&mut alice, &mut bob] {
        assert_eq!(
            device.recv().await,
            json!({"type": "receipt", "conversation_id": conv, "user_id": "bob", "kind": "delivered", "seq": 1, "position": 2})
        );
        assert_eq!(
            device.recv().await,
            json!({"type": "receipt", "conversation_id": conv, "user_id": "bob", "kind": "read", "seq": 1, "position": 3})
        );
    }

    alice
        .send(json!({"type": "edit", "conversation_id": conv, "message_id": ack["message_id"], "content": "first!"}))
        .await;
    let e = bob.recv_type("message_edited").await;
    assert_eq!(e["message"]["content"], "first!");
    assert_eq!(e["message"]["version"], 2);
    assert!(e["message"]["edited_at"].is_u64());
    alice
        .send(json!({"type": "delete", "conversation_id": conv, "message_id": ack["message_id"]}))
        .await;
    let d = bob.recv_type("message_deleted").await;
    assert_eq!(d["message"]["deleted"], true);
    assert_eq!(d["message"]["content"], "");

    bob.send(json!({"type": "sync", "conversations": {conv.clone(): 0}}))
        .await;
    let replay = bob.recv_type("message").await;
    assert_eq!(replay["message"]["seq"], 1);
    assert_eq!(replay["message"]["deleted"], true, "tombstone in sync");
    let done = bob.recv().await;
    assert_eq!(
        done,
        json!({"type": "sync_done", "conversations": {conv.clone(): 1}})
    );

    bob.send(json!({"type": "presence_subscribe", "user_ids": ["alice", "nobody"]}))
        .await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..2 {
        let p = bob.recv_type("presence").await;
        seen.insert(p["user_id"].as_str().unwrap().to_owned(), p);
    }
    assert_eq!(seen["alice"]["status"], "online");
    assert!(seen["alice"]["last_seen"].is_u64());
    assert_eq!(
        seen["nobody"],
        json!({"type": "presence", "user_id": "nobody", "status": "offline", "last_seen": null})
    );
}

#[tokio::test]
async fn bad_frames_get_typed_errors_and_the_socket_stays_open() {
    let s = Server::start_with(
        |c| c.max_message_bytes = 1000,
        |_| {},
        Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let other = s.conversation("carol", "direct", &["dave"]).await;
    let mut alice = s.ws("alice").await;
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid"),
        (r#"{"type":"dance"}"#.into(), "invalid"),
        (r#"{"conversation_id":"1"}"#.into(), "invalid"),
        (json!({"type": "message", "conversation_id": other, "client_msg_id": "x", "content": "hi"}).to_string(), "not_member"),
        (json!({"type": "message", "conversation_id": conv, "client_msg_id": "y", "content": "a".repeat(1001)}).to_string(), "too_large"),
        (json!({"type": "message", "conversation_id": "42", "client_msg_id": "z", "content": "hi"}).to_string(), "not_found"),
    ];
    for (frame, code) in cases {
        alice.send_text(&frame).await;
        let e = alice.recv_type("error").await;
        assert_eq!(e["code"], code, "{frame}: {e}");
        assert!(e["message"].is_string());
        // Still open and working.
        let ack = alice
            .send_message(&conv, &format!("ok-{code}-{}", frame.len()), "fine")
            .await;
        assert!(ack["seq"].is_u64());
    }
    // A binary frame on a JSON connection is refused politely.
    alice
        .stream
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(alice.recv_type("error").await["code"], "invalid");
    // The error of a failed send names its client_msg_id.
    alice
        .send(json!({"type": "message", "conversation_id": other, "client_msg_id": "named", "content": "x"}))
        .await;
    assert_eq!(alice.recv_type("error").await["client_msg_id"], "named");
    // Nothing bad was stored.
    let (status, page) = s
        .http(
            "GET",
            &format!("/api/conversations/{conv}/messages"),
            Auth::User("alice"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["content"] == "fine")
    );
}

#[tokio::test]
async fn a_frame_over_the_websocket_limit_is_closed_with_1009_and_the_server_keeps_serving() {
    let s = Server::start_with(
        |c| c.max_message_bytes = 1000,
        |g| g.max_frame_bytes = 4000,
        Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let mut alice = s.ws("alice").await;
    let huge = json!({"type": "message", "conversation_id": conv, "client_msg_id": "big", "content": "x".repeat(10_000)});
    let _ = alice
        .stream
        .send(Message::Text(huge.to_string().into()))
        .await;
    assert_eq!(alice.close_code().await, Some(1009));
    let mut again = s.ws("alice").await;
    let ack = again.send_message(&conv, "after", "still here").await;
    assert_eq!(ack["seq"], 1, "the oversized message was not stored");
}

#[tokio::test]
async fn jwt_auth_on_upgrade_and_http() {
    let auth = Arc::new(JwtAuth::new(b"s3cret"));
    let s = Server::start_with(|_| {}, |_| {}, auth.clone()).await;
    let token = auth.issue("alice", Duration::from_secs(60)).unwrap();
    let wrong = JwtAuth::new(b"other")
        .issue("alice", Duration::from_secs(60))
        .unwrap();
    // exp one hour in the past.
    let expired = {
        #[derive(serde::Serialize)]
        struct C<'a> {
            sub: &'a str,
            exp: u64,
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &C {
                sub: "alice",
                exp: now - 3600,
            },
            &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    };
    for bad in ["", "garbage", wrong.as_str(), expired.as_str()] {
        let url = s.ws_url(&format!("token={bad}"));
        let err = Ws::try_connect(&url, None)
            .await
            .expect_err("must be refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
            other => panic!("expected HTTP 401, got {other:?}"),
        }
        let (status, body) = s
            .http("GET", "/api/conversations", Auth::Bearer(bad), None)
            .await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // Dev-mode style ?user= is not accepted when JWT is on.
    let (status, _) = s
        .http("GET", "/api/conversations", Auth::User("alice"), None)
        .await;
    assert_eq!(status, 401);
    // Query token (browsers) and header token both work.
    let mut ws = Ws::connect(&s.ws_url(&format!("token={token}")), None).await;
    ws.send(json!({"type": "sync", "conversations": {}})).await;
    assert_eq!(ws.recv().await["type"], "sync_done");
    let (status, body) = s
        .http("GET", "/api/conversations", Auth::Bearer(&token), None)
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn http_api_conversations_history_members_presence() {
    let s = Server::start().await;
    // Create: the caller is always a member; direct dedupe.
    let (status, conv) = s
        .http(
            "POST",
            "/api/conversations",
            Auth::User("alice"),
            Some(json!({"kind": "group", "members": ["bob"], "name": "team"})),
        )
        .await;
    assert_eq!(status, 200);
    let gid = conv["id"].as_str().unwrap().to_owned();
    assert_eq!(conv["kind"], "group");
    assert_eq!(conv["name"], "team");
    assert_eq!(conv["last_seq"], 0);
    assert_eq!(conv["unread"], 0);
    let members: Vec<_> = conv["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(members.contains(&("alice".into(), "owner".into())));
    assert!(members.contains(&("bob".into(), "member".into())));
    let d1 = s.conversation("alice", "direct", &["bob"]).await;
    let d2 = s.conversation("bob", "direct", &["alice"]).await;
    assert_eq!(d1, d2);

    // History pages.
    let mut alice = s.ws("alice").await;
    for i in 0..5 {
        alice
            .send_message(&gid, &format!("h{i}"), &format!("n{i}"))
            .await;
    }
    let (_, p1) = s
        .http(
            "GET",
            &format!("/api/conversations/{gid}/messages?limit=2"),
            Auth::User("bob"),
            None,
        )
        .await;
    let seqs: Vec<u64> = p1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![5, 4]);
    assert_eq!(p1["next"], 4);
    let (_, p2) = s
        .http(
            "GET",
            &format!("/api/conversations/{gid}/messages?limit=2&before=4"),
            Auth::User("bob"),
            None,
        )
        .await;
    assert_eq!(p2["next"], 2);
    let (_, p3) = s
        .http(
            "GET",
            &format!("/api/conversations/{gid}/messages?limit=2&before=2"),
            Auth::User("bob"),
            None,
        )
        .await;
    assert_eq!(p3["messages"].as_array().unwrap().len(), 1);
    assert_eq!(p3["next"], json!(null));

    // List: most recent activity first, unread for the caller, cursor.
    let (_, list) = s
        .http("GET", "/api/conversations?limit=1", Auth::User("bob"), None)
        .await;
    assert_eq!(list["conversations"][0]["id"], gid.as_str());
    assert_eq!(list["conversations"][0]["unread"], 5);
    assert_eq!(list["conversations"][0]["last_seq"], 5);
    let cursor = list["next"]
        .as_str()
        .expect("cursor is a string")
        .to_owned();
    let (_, list2) = s
        .http(
            "GET",
            &format!("/api/conversations?limit=1&after={cursor}"),
            Auth::User("bob"),
            None,
        )
        .await;
    assert_eq!(list2["conversations"][0]["id"], d1.as_str());
    assert_eq!(list2["next"], json!(null));

    // Members: only owners/admins add; anyone leaves; removed → 403.
    let (status, body) = s
        .http(
            "POST",
            &format!("/api/conversations/{gid}/members"),
            Auth::User("bob"),
            Some(json!({"user_ids": ["carol"]})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, body) = s
        .http(
            "POST",
            &format!("/api/conversations/{gid}/members"),
            Auth::User("alice"),
            Some(json!({"user_ids": ["carol"]})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["added"], json!(["carol"]));
    let (status, body) = s
        .http(
            "DELETE",
            &format!("/api/conversations/{gid}/members/carol"),
            Auth::User("alice"),
            None,
        )
        .await;
    assert_eq!((status, body["removed"].as_bool()), (200, Some(true)));
    let (status, body) = s
        .http(
            "GET",
            &format!("/api/conversations/{gid}/messages"),
            Auth::User("carol"),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("not_member"))
    );

    // Errors: 400, 404, 413, 401.
    let (status, body) = s
        .http(
            "POST",
            "/api/conversations",
            Auth::User("alice"),
            Some(json!({"kind": "direct", "members": []})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid"))
    );
    let (status, _) = s
        .http_raw(
            "POST",
            "/api/conversations",
            Auth::User("alice"),
            Some("{oops".into()),
        )
        .await;
    assert_eq!(status, 400);
    let (status, body) = s
        .http(
            "GET",
            "/api/conversations/123/messages",
            Auth::User("alice"),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = s
        .http(
            "GET",
            "/api/conversations/not-a-number",
            Auth::User("alice"),
            None,
        )
        .await;
    assert_eq!(status, 400);
    let big = json!({"kind": "group", "members": [], "name": "x".repeat(2 * 1024 * 1024)});
    let (status, body) = s
        .http("POST", "/api/conversations", Auth::User("alice"), Some(big))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
    let (status, _) = s.http("GET", "/api/conversations", Auth::None, None).await;
    assert_eq!(status, 401);

    // Presence over HTTP.
    let (status, body) = s
        .http(
            "GET",
            "/api/presence?user_ids=alice,ghost",
            Auth::User("bob"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["presence"][0]["user_id"], "alice");
    assert_eq!(body["presence"][0]["status"], "online");
    assert_eq!(
        body["presence"][1],
        json!({"user_id": "ghost", "status": "offline", "last_seen": null})
    );

    // Health and metrics.
    let (status, body) = s.http("GET", "/healthz", Auth::None, None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, text) = s.http_raw("GET", "/metrics", Auth::None, None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(text.to_vec()).unwrap();
    for name in [
        "chat_ws_connections",
        "chat_ws_frames_total",
        "chat_engine_messages_sent_total",
        "chat_engine_fanouts_to_writers_total",
        "chat_fanout_latency_seconds_bucket",
        "chat_http_responses_total",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    assert!(text.contains("chat_engine_messages_sent_total 5"), "{text}");
}

#[tokio::test]
async fn a_slow_consumer_is_cut_while_others_keep_receiving() {
    let s = Server::start_with(
        |c| {
            c.rate_limit = None;
            c.outbound_queue = 16;
            c.max_message_bytes = 64 * 1024;
        },
        |g| g.write_timeout = Duration::from_secs(2),
        Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let conv = s.conversation("alice", "group", &["slow", "fast"]).await;
    // The slow client: a tiny receive buffer and it never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(s.addr).await.unwrap();
    let (slow, _) = tokio_tungstenite::client_async(s.ws_url("user=slow"), tcp)
        .await
        .unwrap();
    let mut fast = s.ws("fast").await;
    let mut alice = s.ws("alice").await;
    let body = "x".repeat(32 * 1024);
    for i in 0..200 {
        alice.send_message(&conv, &format!("m{i}"), &body).await;
        let m = fast.recv_type("message").await;
        assert_eq!(m["message"]["seq"], i + 1);
        if s.chat.stats().slow_consumers > 0 && i > 20 {
            break;
        }
    }
    assert!(
        s.chat.stats().slow_consumers >= 1,
        "the slow consumer was never cut"
    );
    // Bounded: the slow connection was unregistered, so its queue no longer grows.
    tokio::time::timeout(WAIT, async {
        while s.chat.is_connected_here(&chat_core::UserId::from("slow")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("slow consumer still registered");
    drop(slow);
    // Others are unaffected.
    alice.send_message(&conv, "after", "still flowing").await;
    assert_eq!(
        fast.recv_type("message").await["message"]["content"],
        "still flowing"
    );
    // One cut, counted once: the gateway's name and the engine's carry the same count.
    let cut = s.chat.stats().slow_consumers;
    let (_, text) = s.http_raw("GET", "/metrics", Auth::None, None).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    for name in [
        "chat_ws_slow_consumers_total",
        "chat_engine_slow_consumers_total",
    ] {
        assert!(
            text.lines().any(|l| l == format!("{name} {cut}")),
            "{name} is not {cut}:\n{text}"
        );
    }
}

#[tokio::test]
async fn a_reader_that_pauses_gets_every_frame_in_order_and_intact() {
    // Frames are written directly by the sending task while the socket has room and queued for
    // the writer task once it is full; the switch back and forth must never reorder, split or
    // drop a frame, and control frames (pongs) must slot in between whole frames.
    let s = Server::start_with(
        |c| {
            c.rate_limit = None;
            c.outbound_queue = 100_000;
            c.max_message_bytes = 64 * 1024;
        },
        |_| {},
        Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let conv = s.conversation("alice", "group", &["paused"]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(s.addr).await.unwrap();
    let (mut paused, _) = tokio_tungstenite::client_async(s.ws_url("user=paused"), tcp)
        .await
        .unwrap();
    let mut alice = s.ws("alice").await;
    const N: usize = 400;
    // Sizes vary so frame boundaries fall at every offset of the socket's buffer.
    let body = |i: usize| format!("{i}:{}", "y".repeat(1000 + (i * 997) % 12_000));
    for i in 0..N {
        alice.send_message(&conv, &format!("m{i}"), &body(i)).await;
    }
    // A ping while the server's side is backed up (the socket is full by now): the pong waits
    // its turn behind whole frames.
    paused
        .send(Message::Ping(b"hi".to_vec().into()))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut pongs = 0;
    while seqs.len() < N {
        let msg = tokio::time::timeout(WAIT, paused.next())
            .await
            .expect("paused reader starved")
            .expect("socket ended")
            .expect("a valid frame");
        match msg {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    let seq = v["message"]["seq"].as_u64().unwrap() as usize;
                    assert_eq!(
                        v["message"]["content"],
                        body(seq - 1),
                        "frame {seq} damaged"
                    );
                    seqs.push(seq);
                }
            }
            Message::Pong(p) => {
                assert_eq!(&p[..], b"hi");
                pongs += 1;
            }
            _ => {}
        }
    }
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    assert_eq!(pongs, 1, "the pong went missing");
    assert_eq!(s.chat.stats().slow_consumers, 0);
    // And the direct path is open again: a later message arrives at once.
    alice.send_message(&conv, "late", "after the backlog").await;
    loop {
        let msg = tokio::time::timeout(WAIT, paused.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "message" {
                assert_eq!(v["message"]["content"], "after the backlog");
                break;
            }
        }
    }
}

#[tokio::test]
async fn a_zombie_that_stops_answering_pings_is_reaped_and_shown_offline() {
    let s = Server::start_with(
        |c| c.presence.offline_debounce = Duration::from_millis(300),
        |g| {
            g.ping_interval = Duration::from_millis(100);
            g.missed_pongs = 2;
        },
        Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let mut watcher = s.ws("watcher").await;
    watcher
        .send(json!({"type": "presence_subscribe", "user_ids": ["zombie"]}))
        .await;
    assert_eq!(watcher.recv_type("presence").await["status"], "offline");
    // The zombie never polls its socket, so it never answers pings.
    let zombie = s.ws("zombie").await;
    assert_eq!(watcher.recv_type("presence").await["status"], "online");
    let offline = watcher.recv_type("presence").await;
    assert_eq!(offline["user_id"], "zombie");
    assert_eq!(offline["status"], "offline");
    assert!(!s.chat.is_connected_here(&chat_core::UserId::from("zombie")));
    // The watcher itself answers pings (tungstenite replies while reading) and stays.
    watcher
        .send(json!({"type": "sync", "conversations": {}}))
        .await;
    assert_eq!(watcher.recv_type("sync_done").await["type"], "sync_done");
    drop(zombie);
}

#[tokio::test]
async fn graceful_shutdown_flushes_says_going_away_and_stops_accepting() {
    let s = Server::start().await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let mut alice = s.ws("alice").await;
    let mut bob = s.ws("bob").await;
    alice.send_message(&conv, "last", "before shutdown").await;
    s.chat.shutdown();
    // Bob still gets what was queued, then a 1001.
    assert_eq!(
        bob.recv_type("message").await["message"]["content"],
        "before shutdown"
    );
    assert_eq!(bob.close_code().await, Some(1001));
    assert_eq!(alice.close_code().await, Some(1001));
    let served = tokio::time::timeout(WAIT, s.serving)
        .await
        .expect("serve did not return");
    assert!(served.unwrap().is_ok());
    assert!(
        tokio::net::TcpStream::connect(s.addr).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn codec_selection_by_subprotocol_and_query() {
    let s = Server::start().await;
    let (mut ws, resp) = {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                s.ws_url("user=alice"),
            )
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", "chat.v1.json".parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap()
    };
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v1.json");
    ws.send(Message::Text(
        r#"{"type":"sync","conversations":{}}"#.into(),
    ))
    .await
    .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert!(matches!(m, Message::Text(_)));
    let err = Ws::try_connect(&s.ws_url("user=alice&codec=xml"), None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 400));
}

#[tokio::test]
async fn protobuf_clients_and_json_clients_talk_to_each_other() {
    use chat_core::{Command, ConversationId, Event};
    use chat_transport::codec::Codec;
    let s = Server::start().await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let conv_id: ConversationId = conv.parse().unwrap();
    let mut alice = s.ws("alice").await;
    let mut bob = Ws::connect(&s.ws_url("user=bob"), Some("chat.v1.proto")).await;
    let mut bob_by_query = Ws::connect(&s.ws_url("user=bob&codec=proto"), None).await;

    // bob (protobuf) sends; alice (JSON) receives.
    let cmd = Command::Message(chat_core::protocol::SendMessage {
        conversation_id: conv_id,
        client_msg_id: "pb-1".into(),
        content: "from protobuf".into(),
        kind: Default::default(),
        media: None,
        reply_to: None,
    });
    bob.stream
        .send(Message::Binary(Codec::Proto.encode_command(&cmd)))
        .await
        .unwrap();
    let decode = |m: Option<Message>| match m {
        Some(Message::Binary(b)) => Codec::Proto.decode_event(&b).unwrap(),
        other => panic!("expected a binary frame, got {other:?}"),
    };
    match decode(bob.next_message().await) {
        Event::MessageAck {
            seq, client_msg_id, ..
        } => {
            assert_eq!((seq, client_msg_id.as_str()), (1, "pb-1"));
        }
        other => panic!("{other:?}"),
    }
    let m = alice.recv_type("message").await;
    assert_eq!(m["message"]["content"], "from protobuf");
    // bob's other (protobuf) device gets the message as protobuf.
    match decode(bob_by_query.next_message().await) {
        Event::Message { message, .. } => assert_eq!(message.content, "from protobuf"),
        other => panic!("{other:?}"),
    }
    // alice (JSON) replies; bob (protobuf) receives the same event in binary.
    alice.send_message(&conv, "js-1", "from json").await;
    match decode(bob.next_message().await) {
        Event::Message { message, .. } => {
            assert_eq!(message.content, "from json");
            assert_eq!(message.seq, 2);
        }
        other => panic!("{other:?}"),
    }
    // Garbage and text frames on a protobuf connection get an error (in protobuf).
    bob.stream
        .send(Message::Binary(vec![0xff, 0x00].into()))
        .await
        .unwrap();
    assert!(matches!(
        decode(bob.next_message().await),
        Event::Error {
            code: chat_core::ErrorCode::Invalid,
            ..
        }
    ));
    bob.send_text("{}").await;
    assert!(matches!(
        decode(bob.next_message().await),
        Event::Error {
            code: chat_core::ErrorCode::Invalid,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_reach_every_socket_in_seq_order() {
    // Several senders at once into one conversation: the order lock assigns seqs, and whether a
    // frame is written directly by its sender's task or queued for the writer task, every
    // socket must see the conversation's messages in seq order, none missing.
    let s = Server::start_with(
        |c| c.rate_limit = None,
        |_| {},
        Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let senders = ["s0", "s1", "s2", "s3"];
    let mut members: Vec<&str> = senders.to_vec();
    members.extend(["r0", "r1"]);
    let conv = s.conversation("s0", "group", &members[1..]).await;
    let mut readers = vec![s.ws("r0").await, s.ws("r1").await];
    const EACH: usize = 50;
    let mut tasks = Vec::new();
    for name in senders {
        let mut ws = s.ws(name).await;
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                ws.send_message(&conv, &format!("{name}-{i}"), "x").await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for r in &mut readers {
        let mut got = Vec::new();
        while got.len() < senders.len() * EACH {
            let m = r.recv_type("message").await;
            got.push(m["message"]["seq"].as_u64().unwrap());
        }
        assert_eq!(got, (1..=(senders.len() * EACH) as u64).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------- token life

/// Unix milliseconds now (the engine's clock, which follows the system clock here).
fn now_ms() -> u64 {
    chat_core::time::now_ms()
}

/// A direct conversation alice–bob made by the host (the HTTP helper speaks dev auth).
async fn alice_and_bob(s: &Server) -> String {
    s.chat
        .create_conversation(
            &chat_core::UserId::from("alice"),
            chat_core::model::ConversationKind::Direct,
            &[chat_core::UserId::from("bob")],
            None,
        )
        .await
        .unwrap()
        .conversation
        .id
        .to_string()
}

#[tokio::test]
async fn the_first_frame_is_the_session_frame_with_user_expiry_and_limits() {
    let auth = Arc::new(JwtAuth::new(b"s3cret"));
    let s = Server::start_with(|c| c.max_message_bytes = 1000, |_| {}, auth.clone()).await;
    let token = auth.issue("alice", Duration::from_secs(600)).unwrap();
    let exp = auth.verify_credential(&token).unwrap().expires_at.unwrap();
    let ws = Ws::connect(&s.ws_url(&format!("token={token}")), None).await;
    let session = ws.session_json();
    assert_eq!(session["type"], "session", "{session}");
    assert_eq!(session["user_id"], "alice");
    assert!(
        session["connection_id"].is_string(),
        "64-bit ids are strings"
    );
    assert_eq!(session["node_id"], s.chat.node_id().get());
    assert_eq!(session["expires_at"], exp);
    assert_eq!(session["limits"]["max_message_bytes"], 1000);
    assert_eq!(session["limits"]["rate_per_second"], 20);
    assert_eq!(session["limits"]["rate_burst"], 50);
    // Protobuf clients get it too; dev mode never expires.
    let dev = Server::start().await;
    let ws = Ws::connect(&dev.ws_url("user=bob"), Some("chat.v1.proto")).await;
    let tokio_tungstenite::tungstenite::Message::Binary(bytes) = &ws.session else {
        panic!("expected a binary session frame, got {:?}", ws.session);
    };
    match chat_transport::codec::Codec::Proto
        .decode_event(bytes)
        .unwrap()
    {
        chat_core::Event::Session {
            user_id,
            expires_at,
            ..
        } => {
            assert_eq!(user_id.as_str(), "bob");
            assert_eq!(expires_at, None);
        }
        other => panic!("expected the session frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_socket_is_closed_with_4003_at_exp_and_a_message_after_exp_is_not_acked() {
    let auth = Arc::new(JwtAuth::new(b"s3cret"));
    let s = Server::start_with(|_| {}, |_| {}, auth.clone()).await;
    let conv = alice_and_bob(&s).await;
    let token = auth.issue("alice", Duration::from_secs(2)).unwrap();
    let mut ws = Ws::connect(&s.ws_url(&format!("token={token}")), None).await;
    let exp = ws.session_json()["expires_at"].as_u64().unwrap();
    ws.send_message(&conv, "before", "valid").await;
    // Just past exp: the message must not be acked (the socket is closed or closing).
    tokio::time::sleep(Duration::from_millis(exp.saturating_sub(now_ms()) + 20)).await;
    ws.send(json!({"type": "message", "conversation_id": conv, "client_msg_id": "after", "content": "expired"}))
        .await;
    let code = loop {
        match ws.next_frame(WAIT).await {
            Some(chat_testkit::ws::Frame::Json(v)) => {
                assert_ne!(v["type"], "message_ack", "acked after exp: {v}");
                assert_eq!(v["code"], "unauthorized", "{v}");
            }
            Some(chat_testkit::ws::Frame::Closed(code)) => break code,
            None => panic!("not closed after exp"),
        }
    };
    assert_eq!(code, Some(chat_transport::ws::CLOSE_TOKEN_EXPIRED));
    let at = now_ms();
    assert!(at >= exp, "closed before exp");
    assert!(at < exp + 2_000, "closed {} ms after exp", at - exp);
    let history = s
        .chat
        .history(
            &chat_core::UserId::from("alice"),
            conv.parse().unwrap(),
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(history.items.len(), 1, "a message after exp was stored");
}

#[tokio::test]
async fn refresh_over_the_socket_extends_it_and_bad_refreshes_get_typed_errors() {
    let auth = Arc::new(JwtAuth::new(b"s3cret"));
    let s = Server::start_with(|_| {}, |_| {}, auth.clone()).await;
    let conv = alice_and_bob(&s).await;
    let token = auth.issue("alice", Duration::from_secs(2)).unwrap();
    let mut ws = Ws::connect(&s.ws_url(&format!("token={token}")), None).await;
    let old_exp = ws.session_json()["expires_at"].as_u64().unwrap();
    // Bad refreshes: typed errors, the socket stays open, the expiry does not move.
    let bobs = auth.issue("bob", Duration::from_secs(600)).unwrap();
    let frames = [
        (json!({"type": "refresh", "token": bobs}), "forbidden"),
        (
            json!({"type": "refresh", "token": "garbage"}),
            "unauthorized",
        ),
        (json!({"type": "refresh"}), "invalid"),
        (json!({"type": "refresh", "token": 42}), "invalid"),
    ];
    for (frame, code) in frames {
        ws.send(frame.clone()).await;
        let err = ws.recv_type("error").await;
        assert_eq!(err["code"], code, "{frame}: {err}");
    }
    let fresh = auth.issue("alice", Duration::from_secs(600)).unwrap();
    let new_exp = auth.verify_credential(&fresh).unwrap().expires_at.unwrap();
    ws.send(json!({"type": "refresh", "token": fresh})).await;
    let refreshed = ws.recv_type("refreshed").await;
    assert_eq!(refreshed["expires_at"], new_exp);
    // Past the old exp the socket still works.
    tokio::time::sleep(Duration::from_millis(
        old_exp.saturating_sub(now_ms()) + 300,
    ))
    .await;
    let ack = ws.send_message(&conv, "later", "still here").await;
    assert_eq!(ack["seq"], 1);
}
