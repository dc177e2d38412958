//! Engine counters, read by `/metrics`: the engine's own [`EngineObserver`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::observer::{EngineEvent, EngineObserver};
use crate::error::ErrorCode;

/// Monotonic counters (relaxed atomics: they are statistics, not synchronization).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    connections_total: AtomicU64,
    disconnections_total: AtomicU64,
    commands: AtomicU64,
    messages_sent: AtomicU64,
    deliveries: AtomicU64,
    replies: AtomicU64,
    slow_consumers: AtomicU64,
    router_errors: AtomicU64,
    fanouts_to_writers: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
}

impl EngineObserver for Stats {
    fn observe(&self, event: &EngineEvent<'_>) {
        let counter = match event {
            EngineEvent::Connected { .. } => &self.connections_total,
            EngineEvent::Disconnected { .. } => &self.disconnections_total,
            EngineEvent::Command { .. } => &self.commands,
            EngineEvent::CommandFailed { error, .. } => {
                let code = error.code();
                match ErrorCode::ALL.iter().position(|c| *c == code) {
                    Some(i) => &self.errors[i],
                    None => return,
                }
            }
            EngineEvent::MessageStored { .. } => &self.messages_sent,
            EngineEvent::Delivered { frames, to_writers } => {
                if *to_writers {
                    self.fanouts_to_writers.fetch_add(1, Relaxed);
                }
                if *frames > 0 {
                    self.deliveries.fetch_add(*frames as u64, Relaxed);
                }
                return;
            }
            EngineEvent::Replied { .. } => &self.replies,
            EngineEvent::SlowConsumer { .. } => &self.slow_consumers,
            EngineEvent::RouterError { .. } => &self.router_errors,
        };
        counter.fetch_add(1, Relaxed);
    }
}

impl Stats {
    pub(crate) fn snapshot(&self, connections: usize) -> StatsSnapshot {
        StatsSnapshot {
            connections: connections as u64,
            connections_total: self.connections_total.load(Relaxed),
            disconnections_total: self.disconnections_total.load(Relaxed),
            commands: self.commands.load(Relaxed),
            messages_sent: self.messages_sent.load(Relaxed),
            deliveries: self.deliveries.load(Relaxed),
            replies: self.replies.load(Relaxed),
            slow_consumers: self.slow_consumers.load(Relaxed),
            router_errors: self.router_errors.load(Relaxed),
            fanouts_to_writers: self.fanouts_to_writers.load(Relaxed),
            errors: ErrorCode::ALL
                .iter()
                .zip(&self.errors)
                .map(|(c, n)| (*c, n.load(Relaxed)))
                .collect(),
        }
    }
}

/// A point-in-time copy of the engine counters.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Connections open on this node now.
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections closed since start.
    pub disconnections_total: u64,
    /// Commands executed.
    pub commands: u64,
    /// New messages stored (retries not counted).
    pub messages_sent: u64,
    /// Fan-out frames delivered to local connections (written directly or queued).
    pub deliveries: u64,
    /// Reply frames (acks, errors, sync) queued.
    pub replies: u64,
    /// Connections cut for reading too slowly.
    pub slow_consumers: u64,
    /// Failed router publishes.
    pub router_errors: u64,
    /// Message fan-outs handed to the connections' writer tasks because the conversation was
    /// busy (instead of written to idle sockets by the sending task; see
    /// [`crate::transport::direct`]).
    pub fanouts_to_writers: u64,
    /// Error frames by code.
    pub errors: Vec<(ErrorCode, u64)>,
}
