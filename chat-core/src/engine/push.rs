//! The push worker: finds members with no live device and hands coalesced notifications to
//! the host's [`PushNotifier`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::chat::Inner;
use crate::id::{ConversationId, UserId};
use crate::model::Message;
use crate::push::{PushNotification, PushNotifier};

/// Most pending (user, conversation) notifications before an early flush.
const MAX_PENDING: usize = 10_000;

/// A stored message to consider for push.
#[derive(Debug)]
pub(crate) struct PushJob {
    message: Message,
}

impl PushJob {
    pub(crate) fn new(message: Message) -> Self {
        Self { message }
    }
}

pub(crate) async fn push_worker(
    weak: Weak<Inner>,
    token: CancellationToken,
    mut jobs: mpsc::Receiver<PushJob>,
    notifier: Arc<dyn PushNotifier>,
) {
    let mut pending: HashMap<(UserId, ConversationId), PushNotification> = HashMap::new();
    let mut flush_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => {
                flush(&notifier, &mut pending).await;
                return;
            }
            _ = async { if let Some(at) = flush_at { sleep_until(at).await } }, if flush_at.is_some() => {
                flush(&notifier, &mut pending).await;
                flush_at = None;
            }
            job = jobs.recv() => {
                let Some(job) = job else {
                    flush(&notifier, &mut pending).await;
                    return;
                };
                let Some(inner) = weak.upgrade() else { return };
                let window = inner.config.push_window;
                if let Err(err) = collect(&inner, job, &mut pending).await {
                    warn!(error = %err, "push: could not resolve recipients");
                }
                drop(inner);
                if pending.len() >= MAX_PENDING {
                    flush(&notifier, &mut pending).await;
                    flush_at = None;
                } else if !pending.is_empty() && flush_at.is_none() {
                    flush_at = Some(Instant::now() + window);
                }
            }
        }
    }
}

async fn collect(
    inner: &Inner,
    job: PushJob,
    pending: &mut HashMap<(UserId, ConversationId), PushNotification>,
) -> crate::Result<()> {
    let message = job.message;
    let Some(conversation) = inner.store.conversation(message.conversation_id).await? else {
        return Ok(());
    };
    let recipients: Vec<UserId> = conversation
        .members
        .into_iter()
        .map(|m| m.user_id)
        .filter(|u| *u != message.sender_id)
        .collect();
    if recipients.is_empty() {
        return Ok(());
    }
    let connected = inner.presence.is_connected(&recipients).await?;
    for (user, live) in recipients.into_iter().zip(connected) {
        if live {
            continue;
        }
        pending
            .entry((user.clone(), message.conversation_id))
            .and_modify(|n| {
                n.count = n.count.saturating_add(1);
                n.latest = message.clone();
            })
            .or_insert_with(|| PushNotification {
                user_id: user,
                conversation_id: message.conversation_id,
                count: 1,
                latest: message.clone(),
            });
    }
    Ok(())
}

async fn flush(
    notifier: &Arc<dyn PushNotifier>,
    pending: &mut HashMap<(UserId, ConversationId), PushNotification>,
) {
    if pending.is_empty() {
        return;
    }
    let batch: Vec<_> = pending.drain().map(|(_, n)| n).collect();
    notifier.notify(batch).await;
}
