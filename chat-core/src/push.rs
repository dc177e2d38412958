//! [`PushNotifier`]: the hook for members with no live device.

use std::fmt::Debug;

use async_trait::async_trait;

use crate::id::{ConversationId, UserId};
use crate::model::Message;

/// One notification: `count` new messages in a conversation for a user with no live device,
/// coalesced over the engine's push window; `latest` is the newest of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushNotification {
    /// Recipient.
    pub user_id: UserId,
    /// Where.
    pub conversation_id: ConversationId,
    /// How many messages were coalesced into this notification.
    pub count: u32,
    /// The newest of them.
    pub latest: Message,
}

/// Supplied by the host (APNs, FCM, e-mail, …). Called from a background task with batches
/// coalesced per user and conversation; it may take its time (the engine's push queue is
/// bounded and drops, with a warning, what does not fit).
#[async_trait]
pub trait PushNotifier: Send + Sync + Debug + 'static {
    /// Deliver a batch of notifications.
    async fn notify(&self, batch: Vec<PushNotification>);
}
