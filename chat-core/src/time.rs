//! Wall-clock milliseconds that follow tokio's clock, so paused-clock tests see time move.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now. Anchored once to the system clock, then advanced by tokio's
/// monotonic clock (which tests may pause and advance).
pub fn now_ms() -> u64 {
    static ANCHOR: OnceLock<(std::time::Instant, u64)> = OnceLock::new();
    let (instant, ms) = ANCHOR.get_or_init(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (tokio::time::Instant::now().into_std(), ms)
    });
    let elapsed = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(*instant);
    ms + elapsed.as_millis() as u64
}
