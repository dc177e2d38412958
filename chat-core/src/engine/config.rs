//! Engine configuration.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::hooks::RateLimitConfig;
use crate::id::NodeId;
use crate::presence::PresenceConfig;

/// Everything the engine lets a host tune. `ChatConfig::default()` is what the reference server
/// runs with.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ChatConfig {
    /// Snowflake node id, unique per process in a cluster (default 0).
    pub node_id: NodeId,
    /// Largest message content in UTF-8 bytes (default 64 KiB); over it: `too_large`.
    pub max_message_bytes: usize,
    /// Largest `client_msg_id` in bytes (default 64).
    pub max_client_msg_id_bytes: usize,
    /// Per-user rate limit on sends, edits, deletes and reactions; `None` disables it (default 20/s, burst 50).
    pub rate_limit: Option<RateLimitConfig>,
    /// At most one typing event per user per conversation per this window (default 3 s).
    pub typing_throttle: Duration,
    /// Presence TTL and offline debounce.
    pub presence: PresenceConfig,
    /// Fan-out frames each connection may have queued; a connection that falls further behind
    /// is disconnected as a slow consumer (default 1024). Replies and fan-out share one queue
    /// per connection (in order), of `outbound_queue + reply_queue` slots.
    pub outbound_queue: usize,
    /// Replies (acks, errors, sync pages) each connection may have queued. A reply beyond it
    /// waits for room, which slows only that connection's own command loop, and never uses the
    /// fan-out share (default 256).
    pub reply_queue: usize,
    /// Capacity of the router's inbox (default 8192).
    pub router_inbox: usize,
    /// Most messages replayed per conversation per `sync` (default 1000).
    pub sync_limit: usize,
    /// Most conversations in one `sync` (default 1000).
    pub max_sync_conversations: usize,
    /// Furthest behind (in change-stream positions) a `sync` of the `streams` form replays;
    /// a client further behind gets a `reset` and reloads the conversation from history,
    /// which is cheaper than replaying more changes than a history page holds messages
    /// (default 10,000).
    pub max_catch_up: u64,
    /// Largest history page (default 100).
    pub max_page_size: usize,
    /// Most members in a group (default 10,000).
    pub max_group_members: usize,
    /// Most users one connection may watch the presence of (default 1000).
    pub max_presence_watch: usize,
    /// How long offline-push notifications are coalesced per user (default 2 s).
    pub push_window: Duration,
    /// Capacity of the push queue in messages; overflow is dropped with a warning (default 10,000).
    pub push_queue: usize,
    /// When the router reports a gap, local connections are asked to resync spread over this
    /// window (so a Redis restart does not make every client of every node reconnect in the
    /// same instant; default 2 s).
    pub resync_jitter: Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            node_id: NodeId::ZERO,
            max_message_bytes: 64 * 1024,
            max_client_msg_id_bytes: 64,
            rate_limit: Some(RateLimitConfig::default()),
            typing_throttle: Duration::from_secs(3),
            presence: PresenceConfig::default(),
            outbound_queue: 1024,
            reply_queue: 256,
            router_inbox: 8192,
            sync_limit: 1000,
            max_sync_conversations: 1000,
            max_catch_up: 10_000,
            max_page_size: 100,
            max_group_members: 10_000,
            max_presence_watch: 1000,
            push_window: Duration::from_secs(2),
            push_queue: 10_000,
            resync_jitter: Duration::from_secs(2),
        }
    }
}

impl ChatConfig {
    /// Checks that every limit is usable.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_message_bytes", self.max_message_bytes),
            ("max_client_msg_id_bytes", self.max_client_msg_id_bytes),
            ("outbound_queue", self.outbound_queue),
            ("reply_queue", self.reply_queue),
            ("router_inbox", self.router_inbox),
            ("sync_limit", self.sync_limit),
            ("max_sync_conversations", self.max_sync_conversations),
            (
                "max_catch_up",
                usize::try_from(self.max_catch_up).unwrap_or(usize::MAX),
            ),
            ("max_page_size", self.max_page_size),
            ("max_group_members", self.max_group_members),
            ("push_queue", self.push_queue),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid(format!("config: {name} must be > 0")));
            }
        }
        if self.presence.ttl.is_zero() {
            return Err(Error::invalid("config: presence ttl must be > 0"));
        }
        Ok(())
    }
}
