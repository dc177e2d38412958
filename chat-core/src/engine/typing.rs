//! Typing throttle: at most one typing event per user per conversation per window.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::id::{ConversationId, UserId};

/// Shards of the throttle map: every send resets its sender's entry, so one global lock would
/// serialize all sends of the node.
const SHARDS: usize = 32;

type Shard = Mutex<HashMap<(UserId, ConversationId), Instant>>;

/// Last forwarded typing event per (user, conversation). Entries older than the window are
/// pruned by housekeeping, so the map holds only recent typists.
#[derive(Debug)]
pub(crate) struct TypingThrottle {
    window: Duration,
    hasher: RandomState,
    shards: Vec<Shard>,
}

impl TypingThrottle {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, user: &UserId, conversation: ConversationId) -> &Shard {
        let h = self.hasher.hash_one((user, conversation)) as usize;
        &self.shards[h % SHARDS]
    }

    /// True when the event may be forwarded (and records it).
    pub(crate) fn allow(&self, user: &UserId, conversation: ConversationId) -> bool {
        let now = Instant::now();
        let mut last = self
            .shard(user, conversation)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match last.get_mut(&(user.clone(), conversation)) {
            Some(at) if now.duration_since(*at) < self.window => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                last.insert((user.clone(), conversation), now);
                true
            }
        }
    }

    /// Forgets the user's last typing event in a conversation (after they sent a message, the
    /// next keystroke should show "typing" again at once).
    pub(crate) fn reset(&self, user: &UserId, conversation: ConversationId) {
        let mut last = self
            .shard(user, conversation)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !last.is_empty() {
            last.remove(&(user.clone(), conversation));
        }
    }

    /// Forgets entries older than the window.
    pub(crate) fn prune(&self) {
        let now = Instant::now();
        let window = self.window;
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, at| now.duration_since(*at) < window);
        }
    }
}
