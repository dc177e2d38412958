//! Typing throttle: at most one typing event per user per conversation per window.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::id::{ConversationId, UserId};

/// Last forwarded typing event per (user, conversation). Entries older than the window are
/// pruned by housekeeping, so the map holds only recent typists.
#[derive(Debug)]
pub(crate) struct TypingThrottle {
    window: Duration,
    last: Mutex<HashMap<(UserId, ConversationId), Instant>>,
}

impl TypingThrottle {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// True when the event may be forwarded (and records it).
    pub(crate) fn allow(&self, user: &UserId, conversation: ConversationId) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
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
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(user.clone(), conversation));
    }

    /// Forgets entries older than the window.
    pub(crate) fn prune(&self) {
        let now = Instant::now();
        let window = self.window;
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, at| now.duration_since(*at) < window);
    }
}
