//! The engine's background tasks: the router inbox (envelopes from other nodes, lag), presence
//! changes to watchers, the batched presence heartbeat, and housekeeping. Each holds only a
//! `Weak` of the engine and ends with [`Chat::shutdown`] (or when the engine is dropped).

use std::sync::{Arc, Weak};

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::chat::{Chat, Inner};
use super::commands::presence_event;
use crate::model::Presence;
use crate::protocol::Frame;
use crate::router::{Inbound, Payload};
use crate::transport::CloseReason;

pub(super) async fn router_loop(
    weak: Weak<Inner>,
    token: CancellationToken,
    mut inbox: mpsc::Receiver<Inbound>,
) {
    loop {
        let inbound = tokio::select! {
            _ = token.cancelled() => return,
            i = inbox.recv() => match i { Some(i) => i, None => return },
        };
        let Some(inner) = weak.upgrade() else { return };
        let chat = Chat { inner };
        match inbound {
            Inbound::Envelope(envelope) => match &envelope.payload {
                Payload::Event {
                    event,
                    except_user,
                    except_connection,
                } => {
                    let frame = Arc::new(Frame::new(event.clone()));
                    // With a backlog in the inbox, leave the writes to the writer tasks.
                    let may_write = inbox.is_empty();
                    let delivery = chat.inner.registry.deliver(
                        &envelope.topic,
                        &frame,
                        except_user.as_ref(),
                        *except_connection,
                        may_write,
                    );
                    chat.close_slow(delivery, false);
                }
                Payload::Membership {
                    conversation_id,
                    user_id,
                    joined,
                } => {
                    chat.apply_membership(*conversation_id, user_id, *joined)
                        .await;
                }
            },
            Inbound::Lagged => {
                // Live delivery to this node had a gap: every local client must resync from the
                // store. Closing makes them reconnect and sync (the documented client recipe).
                warn!("router lagged: asking every local connection to resync");
                let jitter_ms = chat.inner.config.resync_jitter.as_millis() as u64;
                for conn in chat.inner.registry.connections() {
                    // Spread deterministically by connection id (a Snowflake: its low bits
                    // are well mixed across connections).
                    let delay = std::time::Duration::from_millis(
                        conn.id.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) % (jitter_ms + 1),
                    );
                    let chat = chat.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        conn.outbox.request_close(CloseReason::Resync);
                        chat.disconnect(conn.id).await;
                    });
                }
            }
        }
    }
}

pub(super) async fn presence_loop(
    weak: Weak<Inner>,
    token: CancellationToken,
    mut changes: broadcast::Receiver<Presence>,
) {
    loop {
        let received = tokio::select! {
            _ = token.cancelled() => return,
            r = changes.recv() => r,
        };
        let Some(inner) = weak.upgrade() else { return };
        let chat = Chat { inner };
        match received {
            Ok(p) => {
                let user = p.user_id.clone();
                let frame = Arc::new(Frame::new(presence_event(p)));
                let delivery = chat.inner.registry.deliver_watchers(&user, &frame);
                chat.close_slow(delivery, false);
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "presence changes lagged: re-reading watched users"
                );
                let users = chat.inner.registry.watched_users();
                for chunk in users.chunks(500) {
                    match chat.inner.presence.presence(chunk).await {
                        Ok(list) => {
                            for p in list {
                                let user = p.user_id.clone();
                                let frame = Arc::new(Frame::new(presence_event(p)));
                                let d = chat.inner.registry.deliver_watchers(&user, &frame);
                                chat.close_slow(d, false);
                            }
                        }
                        Err(err) => warn!(error = %err, "presence re-read failed"),
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

pub(super) async fn heartbeat_loop(weak: Weak<Inner>, token: CancellationToken) {
    let period = match weak.upgrade() {
        Some(inner) => inner.config.presence.heartbeat_interval(),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        let sessions = inner.registry.sessions();
        if sessions.is_empty() {
            continue;
        }
        if let Err(err) = inner.presence.heartbeat(&sessions).await {
            warn!(error = %err, "presence heartbeat failed");
        }
    }
}

pub(super) async fn housekeeping_loop(weak: Weak<Inner>, token: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        inner.typing.prune();
        for hook in &inner.hooks {
            hook.housekeeping();
        }
    }
}
