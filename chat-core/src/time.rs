//! Wall-clock milliseconds that follow tokio's clock, so paused-clock tests see time move.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now. Anchored once to the system clock, then advanced by tokio's
/// monotonic clock (which tests may pause and advance).
///
/// The offset from the anchor is signed: each paused-clock test runtime has a clock of its own,
/// which may stand *before* the anchor another runtime of the same process set, and time must
/// still move there (a saturating offset would freeze it at the anchor).
pub fn now_ms() -> u64 {
    static ANCHOR: OnceLock<(std::time::Instant, u64)> = OnceLock::new();
    let (instant, ms) = ANCHOR.get_or_init(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (tokio::time::Instant::now().into_std(), ms)
    });
    let now = tokio::time::Instant::now().into_std();
    let offset_ns: i128 = match now.checked_duration_since(*instant) {
        Some(ahead) => ahead.as_nanos() as i128,
        None => -(instant.duration_since(now).as_nanos() as i128),
    };
    let ms = *ms as i128 + offset_ns.div_euclid(1_000_000);
    ms.clamp(0, u64::MAX as i128) as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::now_ms;

    /// Time moves by exactly what the clock moved, in a runtime whose clock stands before the
    /// anchor that another runtime set (tests of one process share the anchor).
    #[test]
    fn time_moves_in_every_paused_runtime_whatever_set_the_anchor() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"))
        };
        // The first runtime sets the anchor far ahead in its own (virtual) time.
        runtime().block_on(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            now_ms();
        });
        // A second runtime's clock starts behind that anchor: time must still move there.
        runtime().block_on(async {
            let before = now_ms();
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            assert_eq!(now_ms() - before, 1_000);
        });
    }
}
