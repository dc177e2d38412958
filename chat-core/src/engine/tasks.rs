//! The engine's background tasks: the router inbox (envelopes from other nodes, lag), session
//! expiry, presence changes to watchers, the batched presence heartbeat, and housekeeping. Each holds only a
//! `Weak` of the engine and ends with [`Chat::shutdown`] (or when the engine is dropped).

use std::future::Future;
use std::sync::{Arc, Weak};

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::chat::{Chat, Inner};
use super::commands::presence_event;
use super::expiry::Expiries;
use crate::model::Presence;
use crate::protocol::Frame;
use crate::router::{Inbound, Payload};
use crate::time::now_ms;
use crate::transport::CloseReason;

/// What a background task holds of the engine: a `Weak` (the task never keeps the engine
/// alive) and the shutdown token.
#[derive(Debug)]
pub(super) struct Stopping {
    weak: Weak<Inner>,
    token: CancellationToken,
}

impl Stopping {
    pub(super) fn new(weak: Weak<Inner>, token: CancellationToken) -> Self {
        Self { weak, token }
    }

    /// Waits for `next`; returns it with the engine, or `None` once the engine stopped
    /// (shut down or dropped) or `next` says the source ended.
    async fn next<T>(&self, next: impl Future<Output = Option<T>>) -> Option<(T, Chat)> {
        let item = tokio::select! {
            _ = self.token.cancelled() => return None,
            item = next => item?,
        };
        let inner = self.weak.upgrade()?;
        Some((item, Chat { inner }))
    }
}

/// A ticker that waits one `period` before its first tick and does not catch up after a
/// stall.
fn ticker(period: std::time::Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

pub(super) async fn router_loop(engine: Stopping, mut inbox: mpsc::Receiver<Inbound>) {
    while let Some((inbound, chat)) = engine.next(inbox.recv()).await {
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
                Payload::Revoke { user_id } => {
                    chat.close_user(user_id, CloseReason::Revoked).await;
                }
            },
            Inbound::Lagged => resync_everyone(&chat),
        }
    }
}

/// Live delivery to this node had a gap: every local client must resync from the store.
/// Closing makes them reconnect and sync (the documented client recipe), spread over
/// `resync_jitter`.
fn resync_everyone(chat: &Chat) {
    warn!("router lagged: asking every local connection to resync");
    let jitter_ms = chat.inner.config.resync_jitter.as_millis() as u64;
    for conn in chat.inner.registry.connections() {
        // Spread deterministically by connection id (a Snowflake: its low bits are well mixed
        // across connections).
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

/// Closes every session whose credential expired, with [`CloseReason::TokenExpired`]: one task
/// for the node, sleeping until the earliest deadline (re-armed when an earlier one is added),
/// instead of a timer per connection.
pub(super) async fn expiry_loop(engine: Stopping, expiries: Arc<Expiries>) {
    loop {
        let wake = async {
            let first = expiries.first();
            let due = async {
                match first {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms());
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = expiries.earlier_added() => {}
                _ = due => {}
            }
            Some(())
        };
        let Some(((), chat)) = engine.next(wake).await else {
            return;
        };
        let due = expiries.take_due(now_ms());
        let conns = due
            .into_iter()
            .filter_map(|id| chat.inner.registry.get(id))
            .collect();
        chat.close_connections(conns, CloseReason::TokenExpired)
            .await;
    }
}

pub(super) async fn presence_loop(engine: Stopping, mut changes: broadcast::Receiver<Presence>) {
    while let Some((received, chat)) = engine.next(async { Some(changes.recv().await) }).await {
        match received {
            Ok(p) => to_watchers(&chat, p),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "presence changes lagged: re-reading watched users"
                );
                let users = chat.inner.registry.watched_users();
                for chunk in users.chunks(500) {
                    match chat.inner.presence.presence(chunk).await {
                        Ok(list) => list.into_iter().for_each(|p| to_watchers(&chat, p)),
                        Err(err) => warn!(error = %err, "presence re-read failed"),
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A user's presence to the connections here that watch it.
fn to_watchers(chat: &Chat, p: Presence) {
    let user = p.user_id.clone();
    let frame = Arc::new(Frame::new(presence_event(p)));
    let delivery = chat.inner.registry.deliver_watchers(&user, &frame);
    chat.close_slow(delivery, false);
}

pub(super) async fn heartbeat_loop(engine: Stopping, period: std::time::Duration) {
    let mut tick = ticker(period);
    while let Some((_, chat)) = engine.next(async { Some(tick.tick().await) }).await {
        let sessions = chat.inner.registry.sessions();
        if sessions.is_empty() {
            continue;
        }
        if let Err(err) = chat.inner.presence.heartbeat(&sessions).await {
            warn!(error = %err, "presence heartbeat failed");
        }
    }
}

pub(super) async fn housekeeping_loop(engine: Stopping) {
    let mut tick = ticker(std::time::Duration::from_secs(30));
    while let Some((_, chat)) = engine.next(async { Some(tick.tick().await) }).await {
        chat.inner.typing.prune();
        for hook in &chat.inner.hooks {
            hook.housekeeping();
        }
    }
}
