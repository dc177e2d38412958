//! "Every device converges", over real WebSockets (JSON) on the gateway: a device that was
//! offline for edits, deletes, reactions, receipts and membership changes ends, after one
//! reconnect and one `sync` of the `streams` form, with exactly the state of a device that
//! stayed online; an epoch or position that cannot be replayed gets a `reset`; command ids are
//! echoed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chat_core::UserId;
use chat_core::testing::converge::DeviceView as View;
use chat_core::{Event, MessageId};
use common::*;
use serde_json::{Value, json};

/// A JSON frame as the protocol's typed event (every frame the server sends decodes).
fn event(v: &Value) -> Event {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
}

/// Receives until the barrier (an empty sync) comes back, applying every frame to `view`;
/// returns the frames.
async fn pump(ws: &mut Ws, view: &mut View) -> Vec<Value> {
    ws.send(json!({"type": "sync", "conversations": {}, "id": "barrier"}))
        .await;
    let mut frames = Vec::new();
    loop {
        let v = ws.recv().await;
        if v["type"] == "ok" && v["id"] == "barrier" {
            return frames;
        }
        view.apply(&event(&v));
        frames.push(v);
    }
}

/// Sends a `streams` sync for `conv` from the view's epoch and position, following `more`;
/// returns every frame of the replay (resets and sync_done included).
async fn sync_streams(ws: &mut Ws, view: &mut View, conv: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        view.syncing = true;
        let mut from = json!({"position": view.position});
        if let Some(epoch) = view.epoch {
            from["epoch"] = json!(epoch.to_string());
        }
        ws.send(json!({"type": "sync", "streams": {conv: from}}))
            .await;
        let more = loop {
            let v = ws.recv().await;
            view.apply(&event(&v));
            let done = v["type"] == "sync_done";
            let more = done
                && v["more"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|c| c == conv));
            frames.push(v);
            if done {
                break more;
            }
        };
        if !more {
            return frames;
        }
    }
}

async fn command(ws: &mut Ws, frame: Value) {
    ws.send(frame).await;
}

#[tokio::test]
async fn an_offline_device_converges_with_one_that_stayed_online() {
    // A small page so the replay pages (`more`).
    let s = Server::start_with(
        |c| c.sync_limit = 3,
        |_| {},
        std::sync::Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let conv = s.conversation("alice", "group", &["bob", "carol"]).await;
    let mut alice = s.ws("alice").await;
    let mut carol = s.ws("carol").await;
    let mut phone = s.ws("bob").await;
    let mut laptop = s.ws("bob").await;
    let (mut phone_view, mut laptop_view) = (View::default(), View::default());

    // Phase 1: both of bob's devices online; the laptop learns the stream by a first sync.
    let mut ids = Vec::new();
    for i in 1..=3 {
        let ack = alice
            .send_message(&conv, &format!("m{i}"), &format!("text {i}"))
            .await;
        assert_eq!(ack["position"], i, "the ack carries the message's position");
        ids.push(ack["message_id"].as_str().unwrap().to_owned());
    }
    pump(&mut phone, &mut phone_view).await;
    pump(&mut laptop, &mut laptop_view).await;
    let first = sync_streams(&mut laptop, &mut laptop_view, &conv).await;
    assert!(
        first.iter().all(|f| f["type"] != "reset"),
        "a first sync within max_catch_up replays: {first:?}"
    );
    assert_eq!(laptop_view.position, 3);
    assert!(laptop_view.epoch.is_some());
    assert_eq!(phone_view.state(), laptop_view.state());

    // Phase 2: the laptop goes away; everything changes.
    drop(laptop);
    for content in ["text 1 v2", "text 1 v3", "text 1 v4"] {
        command(&mut alice, json!({"type": "edit", "conversation_id": conv, "message_id": ids[0], "content": content})).await;
    }
    command(
        &mut alice,
        json!({"type": "delete", "conversation_id": conv, "message_id": ids[1]}),
    )
    .await;
    command(
        &mut carol,
        json!({"type": "react", "conversation_id": conv, "message_id": ids[2], "key": "👍"}),
    )
    .await;
    command(
        &mut alice,
        json!({"type": "react", "conversation_id": conv, "message_id": ids[2], "key": "🎉"}),
    )
    .await;
    command(
        &mut alice,
        json!({"type": "react", "conversation_id": conv, "message_id": ids[2], "key": "❤️"}),
    )
    .await;
    command(
        &mut alice,
        json!({"type": "read", "conversation_id": conv, "seq": 3}),
    )
    .await;
    pump(&mut alice, &mut View::default()).await;
    pump(&mut carol, &mut View::default()).await;
    s.chat
        .add_members(
            &UserId::from("alice"),
            conv.parse().unwrap(),
            &[UserId::from("dave")],
        )
        .await
        .unwrap();
    s.chat
        .remove_member(
            &UserId::from("alice"),
            conv.parse().unwrap(),
            &UserId::from("carol"),
        )
        .await
        .unwrap();
    alice.send_message(&conv, "m4", "text 4").await;
    command(
        &mut phone,
        json!({"type": "read", "conversation_id": conv, "seq": 4, "id": "r4"}),
    )
    .await;
    let frames = pump(&mut phone, &mut phone_view).await;
    assert!(
        frames.iter().any(|f| f["type"] == "ok" && f["id"] == "r4"),
        "a command with an id is answered with ok: {frames:?}"
    );
    // The phone saw every position exactly once, in order: nothing missed.
    let positions: Vec<u64> = frames
        .iter()
        .filter_map(|f| f["position"].as_u64())
        .collect();
    assert_eq!(positions, (4..=15).collect::<Vec<_>>(), "{frames:#?}");

    // Phase 3: the laptop reconnects and syncs once (paging through `more`).
    let mut laptop = s.ws("bob").await;
    let replay = sync_streams(&mut laptop, &mut laptop_view, &conv).await;
    let (p, l) = (&phone_view, &laptop_view);
    assert_eq!(
        p.state(),
        l.state(),
        "the laptop converged\nreplay: {replay:#?}"
    );
    assert_eq!(l.position, 15);
    let epoch = first.last().unwrap()["streams"][&conv]["epoch"]
        .as_str()
        .unwrap();
    assert_eq!(l.epoch.map(|e| e.to_string()).as_deref(), Some(epoch));
    // What converged: the latest versions, once each.
    let m1: Vec<&Value> = replay
        .iter()
        .filter(|f| f["message"]["message_id"] == ids[0].as_str())
        .collect();
    assert_eq!(m1.len(), 1, "edited three times, replayed once");
    assert_eq!(m1[0]["message"]["content"], "text 1 v4");
    assert_eq!(m1[0]["message"]["version"], 4);
    let id = |i: usize| ids[i].parse::<MessageId>().unwrap();
    assert!(l.messages[&id(1)].deleted, "the tombstone");
    assert_eq!(
        serde_json::to_value(&l.messages[&id(2)].reactions).unwrap(),
        json!([{"key": "👍", "users": ["carol"]}, {"key": "❤️", "users": ["alice"]}])
    );
    let user = |u: &str| chat_core::UserId::from(u);
    assert_eq!(l.markers[&user("alice")], (3, 3));
    assert_eq!(l.markers[&user("bob")], (4, 4));
    assert_eq!(l.members.get(&user("dave")), Some(&true));
    assert_eq!(l.members.get(&user("carol")), Some(&false));
    assert!(
        replay.iter().filter(|f| f["type"] == "sync_done").count() > 1,
        "paged by sync_limit"
    );

    // The seq-only form of older clients still replays new messages only.
    laptop
        .send(json!({"type": "sync", "conversations": {conv.clone(): 3}}))
        .await;
    let m = laptop.recv_type("message").await;
    assert_eq!(m["message"]["content"], "text 4");
    assert!(
        m.get("position").is_none(),
        "a seq-only replay carries no positions"
    );
    assert_eq!(
        laptop.recv().await,
        json!({"type": "sync_done", "conversations": {conv.clone(): 4}})
    );
}

#[tokio::test]
async fn positions_that_cannot_be_replayed_get_a_reset() {
    let s = Server::start_with(
        |c| c.max_catch_up = 5,
        |_| {},
        std::sync::Arc::new(chat_transport::auth::DevAuth),
    )
    .await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let mut alice = s.ws("alice").await;
    let mut bob = s.ws("bob").await;
    for i in 0..4 {
        alice.send_message(&conv, &format!("m{i}"), "x").await;
    }
    let mut view = View::default();
    let done = sync_streams(&mut bob, &mut view, &conv).await;
    let stream = done.last().unwrap()["streams"][&conv].clone();
    assert_eq!(stream["position"], 4);
    let epoch = stream["epoch"].as_str().unwrap().to_owned();
    assert!(
        epoch.parse::<u64>().is_ok(),
        "the epoch is a decimal string: {epoch}"
    );

    let reset = |reason: &str| {
        json!({
            "type": "reset", "conversation_id": conv, "reason": reason,
            "stream": {"epoch": epoch, "position": 4},
        })
    };
    // Another epoch: the client's position belongs to another history.
    bob.send(json!({"type": "sync", "streams": {conv.clone(): {"epoch": "12345", "position": 2}}}))
        .await;
    assert_eq!(bob.recv().await, reset("epoch"));
    assert_eq!(
        bob.recv().await,
        json!({"type": "sync_done", "conversations": {}}),
        "a reset conversation is not in sync_done"
    );
    // Ahead of the stream.
    bob.send(json!({"type": "sync", "streams": {conv.clone(): {"epoch": epoch, "position": 99}}}))
        .await;
    assert_eq!(bob.recv().await, reset("too_far_behind"));
    bob.recv_type("sync_done").await;
    // Within max_catch_up (5): replayed; beyond it: reset.
    for i in 4..7 {
        alice.send_message(&conv, &format!("m{i}"), "x").await;
    }
    pump(&mut bob, &mut View::default()).await;
    bob.send(json!({"type": "sync", "streams": {conv.clone(): {"epoch": epoch, "position": 0}}}))
        .await;
    assert_eq!(
        bob.recv().await["reason"],
        "too_far_behind",
        "7 positions behind, max 5"
    );
    bob.recv_type("sync_done").await;
    bob.send(json!({"type": "sync", "streams": {conv.clone(): {"epoch": epoch, "position": 2}}}))
        .await;
    let mut seqs = Vec::new();
    loop {
        let v = bob.recv().await;
        if v["type"] == "sync_done" {
            assert_eq!(v["streams"][&conv]["position"], 7);
            break;
        }
        seqs.push(v["message"]["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn every_command_can_carry_an_id_echoed_on_its_ok_or_error() {
    let s = Server::start().await;
    let conv = s.conversation("alice", "direct", &["bob"]).await;
    let mut alice = s.ws("alice").await;
    let ack = alice.send_message(&conv, "m1", "hi").await;
    let mid = ack["message_id"].as_str().unwrap();
    let cases = [
        (
            json!({"type": "typing", "conversation_id": conv, "id": "t"}),
            None,
        ),
        (
            json!({"type": "react", "conversation_id": conv, "message_id": mid, "key": "👍", "id": "r"}),
            None,
        ),
        (
            json!({"type": "react", "conversation_id": conv, "message_id": mid, "key": "two words", "id": "bad-key"}),
            Some("invalid"),
        ),
        (
            json!({"type": "unreact", "conversation_id": conv, "message_id": mid, "id": "u"}),
            None,
        ),
        (
            json!({"type": "edit", "conversation_id": conv, "message_id": "1", "content": "x", "id": "e"}),
            Some("not_found"),
        ),
        (
            json!({"type": "read", "conversation_id": "42", "seq": 1, "id": "rd"}),
            Some("not_found"),
        ),
        (
            json!({"type": "message", "conversation_id": conv, "client_msg_id": "m2", "content": "two", "id": "m"}),
            None,
        ),
    ];
    for (frame, error) in cases {
        let id = frame["id"].as_str().unwrap().to_owned();
        alice.send(frame.clone()).await;
        let answer = loop {
            let v = alice.recv().await;
            if v["id"] == id.as_str() {
                break v;
            }
            assert!(
                v["type"] != "error",
                "{frame}: an error without the id: {v}"
            );
        };
        match error {
            None => assert_eq!(answer, json!({"type": "ok", "id": id}), "{frame}"),
            Some(code) => {
                assert_eq!(answer["type"], "error", "{frame}");
                assert_eq!(answer["code"], code, "{frame}: {answer}");
            }
        }
    }
    // A bad id is a decode error; the socket stays usable.
    alice
        .send(json!({"type": "typing", "conversation_id": conv, "id": ""}))
        .await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["code"], "invalid");
    alice
        .send(json!({"type": "typing", "conversation_id": conv, "id": 5}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "invalid");
    alice.quiet().await;
}
