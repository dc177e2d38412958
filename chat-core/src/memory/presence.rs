//! In-memory [`PresenceTracker`](crate::PresenceTracker) (stub, to be written).

/// In-memory presence.
#[derive(Debug, Default)]
pub struct MemoryPresence;
