//! Token life on a live session: expiry known to the engine, `refresh`, the close at expiry,
//! the `session` frame, and revocation (one node and two nodes). Time is tokio's paused clock:
//! the engine's wall clock (`chat_core::time::now_ms`) follows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::memory::{InProcessTransport, MemoryPresence, MemoryRouterHub, MemoryStore};
use chat_core::presence::PresenceConfig;
use chat_core::time::now_ms;
use chat_core::transport::{Credential, SessionOptions, TokenVerifier};
use chat_core::{Chat, CloseReason, Command, ErrorCode, Event, NodeId, UserId};
use common::*;

/// The host's tokens: a fixed table of token → credential (what a JWT verifier computes from
/// the token itself).
#[derive(Debug, Default)]
struct Tokens(HashMap<String, Credential>);

impl Tokens {
    fn with(mut self, token: &str, user: &str, expires_at: u64) -> Self {
        self.0.insert(
            token.to_owned(),
            Credential::new(UserId::from(user)).expiring_at(expires_at),
        );
        self
    }
}

#[async_trait]
impl TokenVerifier for Tokens {
    async fn verify(&self, token: &str) -> chat_core::Result<Credential> {
        self.0
            .get(token)
            .cloned()
            .ok_or_else(|| chat_core::Error::Unauthorized("unknown token".into()))
    }
}

fn options(expires_at: u64, tokens: Tokens) -> SessionOptions {
    SessionOptions::new()
        .expires_at(Some(expires_at))
        .verifier(Arc::new(tokens))
}

/// Waits (on the paused clock) until the engine closes `c`, then returns why.
async fn closed(c: &chat_core::memory::InProcessClient) -> Option<CloseReason> {
    tokio::time::timeout(Duration::from_secs(60), c.session().closed())
        .await
        .expect("the session was not closed");
    c.close_reason()
}

#[tokio::test(start_paused = true)]
async fn no_command_succeeds_after_expiry_and_nothing_is_stored_or_delivered() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let exp = now_ms() + 1_000;
    let mut alice = h
        .transport
        .connect_with("alice", options(exp, Tokens::default()))
        .await
        .unwrap();
    let mut bob = h.connect("bob").await;
    send_ok(&mut alice, conv, "before", "still valid").await;
    expect(&mut bob, "the message before exp", |e| {
        matches!(e, Event::Message { .. })
    })
    .await;

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Every command is refused, whether or not the close already happened.
    let session = alice.session().clone();
    for cmd in [
        text(conv, "after", "expired"),
        Command::Read {
            conversation_id: conv,
            seq: 1,
        },
        Command::Sync {
            conversations: Default::default(),
            streams: Default::default(),
        },
        Command::Refresh {
            token: "anything".into(),
        },
    ] {
        let err = session.execute(cmd).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unauthorized, "{err}");
    }
    let history = h.history("bob", conv).await;
    assert_eq!(history.len(), 1, "the message after exp was stored");
    expect_nothing(&mut bob).await;
    assert_eq!(closed(&alice).await, Some(CloseReason::TokenExpired));
}

#[tokio::test(start_paused = true)]
async fn an_expired_credential_cannot_connect() {
    let h = Harness::new().await;
    let err = h
        .transport
        .connect_with("alice", SessionOptions::new().expires_at(Some(now_ms())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthorized);
    assert_eq!(h.chat.stats().connections, 0);
}

#[tokio::test(start_paused = true)]
async fn the_session_closes_with_token_expired_at_exp_and_leaves_the_node() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let start = tokio::time::Instant::now();
    let exp = now_ms() + 2_000;
    let alice = h
        .transport
        .connect_with("alice", SessionOptions::new().expires_at(Some(exp)))
        .await
        .unwrap();
    // A later connection with an earlier deadline re-arms the task: it closes first.
    let early = h
        .transport
        .connect_with("carol", SessionOptions::new().expires_at(Some(exp - 1_500)))
        .await
        .unwrap();
    let forever = h.connect("alice").await;
    assert_eq!(alice.session().expires_at(), Some(exp));

    assert_eq!(closed(&early).await, Some(CloseReason::TokenExpired));
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert!(alice.close_reason().is_none(), "closed before its exp");
    assert_eq!(closed(&alice).await, Some(CloseReason::TokenExpired));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2_000) && elapsed < Duration::from_millis(2_100),
        "closed after {elapsed:?}"
    );
    // Gone from the node: a message to alice reaches only her device without expiry.
    let mut bob = h.connect("bob").await;
    send_ok(&mut bob, conv, "m1", "hi").await;
    assert_eq!(h.chat.stats().connections, 2);
    assert!(forever.close_reason().is_none());
}

#[tokio::test(start_paused = true)]
async fn refresh_before_expiry_keeps_the_session_working_past_the_old_exp() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let exp = now_ms() + 1_000;
    let later = exp + 10_000;
    let mut alice = h
        .transport
        .connect_with(
            "alice",
            options(exp, Tokens::default().with("t2", "alice", later)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.send(Command::Refresh { token: "t2".into() }).await;
    match next(&mut alice).await {
        Event::Refreshed { expires_at } => assert_eq!(expires_at, Some(later)),
        other => panic!("expected refreshed, got {other:?}"),
    }
    assert_eq!(alice.session().expires_at(), Some(later));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(alice.close_reason().is_none(), "closed at the old exp");
    send_ok(&mut alice, conv, "m1", "past the old exp").await;
    // The new expiry applies in its turn.
    assert_eq!(closed(&alice).await, Some(CloseReason::TokenExpired));
    assert!(now_ms() >= later);
}

#[tokio::test(start_paused = true)]
async fn refresh_with_another_users_or_a_bad_token_fails_and_the_old_expiry_still_applies() {
    let h = Harness::new().await;
    let exp = now_ms() + 1_000;
    let tokens =
        Tokens::default()
            .with("bobs", "bob", exp + 60_000)
            .with("stale", "alice", now_ms() - 1);
    let mut alice = h
        .transport
        .connect_with("alice", options(exp, tokens))
        .await
        .unwrap();
    for (token, code) in [
        ("bobs", ErrorCode::Forbidden),
        ("unknown", ErrorCode::Unauthorized),
        ("stale", ErrorCode::Unauthorized),
        ("", ErrorCode::Unauthorized),
    ] {
        let (got, message) = send_err(
            &mut alice,
            Command::Refresh {
                token: token.into(),
            },
        )
        .await;
        assert_eq!(got, code, "token {token:?}: {message}");
    }
    assert_eq!(alice.session().expires_at(), Some(exp));
    // The session stayed usable until its own exp.
    expect_nothing(&mut alice).await;
    assert_eq!(closed(&alice).await, Some(CloseReason::TokenExpired));
    assert!(now_ms() >= exp);
}

#[tokio::test(start_paused = true)]
async fn refresh_without_a_verifier_is_unauthorized() {
    let h = Harness::new().await;
    let mut alice = h.connect("alice").await;
    let (code, _) = send_err(&mut alice, Command::Refresh { token: "t".into() }).await;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert_eq!(alice.session().expires_at(), None);
}

#[tokio::test]
async fn the_session_frame_comes_first_and_describes_the_session() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let exp = now_ms() + 60_000;
    let bob = h.connect("bob").await;
    // Traffic for alice while she connects comes after the session frame.
    let sender = tokio::spawn(async move {
        for i in 0..20 {
            bob.send(text(conv, &format!("m{i}"), "hi")).await;
        }
        bob
    });
    let mut alice = h
        .transport
        .connect_with(
            "alice",
            SessionOptions::new().expires_at(Some(exp)).announce(),
        )
        .await
        .unwrap();
    match next(&mut alice).await {
        Event::Session {
            user_id,
            connection_id,
            node_id,
            expires_at,
            limits,
        } => {
            assert_eq!(user_id, UserId::from("alice"));
            assert_eq!(connection_id, alice.connection_id());
            assert_eq!(node_id, h.chat.node_id());
            assert_eq!(expires_at, Some(exp));
            assert_eq!(
                limits.max_message_bytes,
                h.chat.config().max_message_bytes as u64
            );
            let rl = h.chat.config().rate_limit.unwrap();
            assert_eq!(limits.rate_per_second, Some(rl.per_second.get()));
            assert_eq!(limits.rate_burst, Some(rl.burst.get()));
        }
        other => panic!("expected the session frame first, got {other:?}"),
    }
    sender.await.unwrap();
    // Without `announce` there is no session frame.
    let mut plain = h.connect("carol").await;
    expect_nothing(&mut plain).await;
}

#[tokio::test]
async fn revoke_closes_every_device_of_the_user_on_the_node() {
    let h = Harness::new().await;
    let conv = h.direct("alice", "bob").await;
    let phone = h.connect("alice").await;
    let laptop = h
        .transport
        .connect_with(
            "alice",
            SessionOptions::new().expires_at(Some(now_ms() + 60_000)),
        )
        .await
        .unwrap();
    let mut bob = h.connect("bob").await;
    assert_eq!(h.chat.revoke_user(&UserId::from("alice")).await.unwrap(), 2);
    assert_eq!(phone.close_reason(), Some(CloseReason::Revoked));
    assert_eq!(laptop.close_reason(), Some(CloseReason::Revoked));
    assert!(bob.close_reason().is_none());
    assert_eq!(h.chat.stats().connections, 1);
    send_ok(&mut bob, conv, "m1", "still here").await;
    assert_eq!(
        h.chat.revoke_user(&UserId::from("nobody")).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn revoke_closes_the_users_devices_on_other_nodes_too() {
    let store = Arc::new(MemoryStore::new());
    let presence = Arc::new(MemoryPresence::new(PresenceConfig::default()));
    let hub = MemoryRouterHub::new();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let chat = Chat::builder()
            .configure(|c| c.node_id = NodeId::new(i).unwrap())
            .store(store.clone())
            .presence(presence.clone())
            .router(Arc::new(hub.router(NodeId::new(i).unwrap())))
            .build()
            .await
            .unwrap();
        nodes.push(InProcessTransport::new(chat));
    }
    let here = nodes[0].connect("alice").await.unwrap();
    let there = nodes[1].connect("alice").await.unwrap();
    let other = nodes[1].connect("bob").await.unwrap();
    let alice = UserId::from("alice");
    assert_eq!(nodes[0].chat().revoke_user(&alice).await.unwrap(), 1);
    assert_eq!(here.close_reason(), Some(CloseReason::Revoked));
    assert_eq!(closed(&there).await, Some(CloseReason::Revoked));
    assert!(other.close_reason().is_none(), "another user's device");
    // Revoking from a node where the user has no device reaches the others as well.
    let again = nodes[1].connect("alice").await.unwrap();
    let bob = UserId::from("bob");
    assert_eq!(nodes[0].chat().revoke_user(&bob).await.unwrap(), 0);
    assert_eq!(closed(&other).await, Some(CloseReason::Revoked));
    assert!(again.close_reason().is_none());
}
