//! The presence conformance suite against [`MemoryPresence`], on tokio's paused clock and on
//! the real clock.

use chat_core::memory::MemoryPresence;
use chat_core::presence::PresenceConfig;

chat_core::presence_conformance_tests!(|config: PresenceConfig| async move {
    MemoryPresence::new(config)
});

/// The same cases on the real clock (the mode distributed backends use): proves the suite
/// itself works there, and the sweeper on real timers.
mod real_clock {
    use chat_core::memory::MemoryPresence;
    use chat_core::presence::{DynPresenceTracker, PresenceConfig};
    use std::sync::Arc;

    chat_core::presence_conformance_tests!(real_clock, |config: PresenceConfig| async move {
        Arc::new(MemoryPresence::new(config)) as DynPresenceTracker
    });
}
