//! The presence conformance suite against [`MemoryPresence`], on tokio's paused clock and on
//! the real clock.

use chat_core::memory::MemoryPresence;
use chat_core::presence::PresenceConfig;

chat_core::presence_conformance_tests!(|config: PresenceConfig| async move {
    MemoryPresence::new(config)
});

/// The same cases on the real clock, the mode distributed backends use: proves the suite works
/// there (and the sweeper on real timers). Timings a little wider than
/// [`Timing::real_clock`] so a loaded CI machine does not make it flaky.
mod real_clock {
    use std::sync::Arc;
    use std::time::Duration;

    use chat_core::memory::MemoryPresence;
    use chat_core::presence::{DynPresenceTracker, PresenceConfig};
    use chat_core::testing::presence::Timing;

    chat_core::presence_conformance_tests!(
        real_clock,
        timing = Timing {
            config: PresenceConfig {
                ttl: Duration::from_millis(2400),
                offline_debounce: Duration::from_millis(1000),
            },
            ..Timing::real_clock()
        },
        |config: PresenceConfig| async move {
            Arc::new(MemoryPresence::new(config)) as DynPresenceTracker
        }
    );
}
