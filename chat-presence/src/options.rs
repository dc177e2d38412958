//! [`RedisOptions`]: timeouts and reconnect policy shared by [`RedisPresence`](crate::RedisPresence)
//! and [`RedisRouter`](crate::RedisRouter).

use std::time::Duration;

/// Connection behaviour of the Redis backends. The defaults suit a Redis on the same network;
/// every field has a `with_*` setter.
///
/// ```
/// use std::time::Duration;
/// use chat_presence::RedisOptions;
///
/// let options = RedisOptions::default().with_op_timeout(Duration::from_millis(500));
/// assert_eq!(options.op_timeout, Duration::from_millis(500));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Longest wait for one Redis operation, including a reconnect it has to wait for
    /// (default 2 s). Past it the call fails with `Error::Unavailable`: no call hangs while
    /// Redis is down.
    pub op_timeout: Duration,
    /// First delay before reconnecting a lost pub/sub connection (default 50 ms); doubled after
    /// every failed attempt up to [`reconnect_max`](Self::reconnect_max).
    pub reconnect_min: Duration,
    /// Longest delay between two reconnect attempts (default 2 s).
    pub reconnect_max: Duration,
    /// How often an idle pub/sub connection is pinged, so a half-open TCP connection is noticed
    /// (default 5 s).
    pub ping_interval: Duration,
    /// Longest time between two offline sweeps of [`RedisPresence`](crate::RedisPresence) (the
    /// safety net behind keyspace notifications, see the crate docs). `None` (the default):
    /// a quarter of the shorter of TTL and debounce, between 50 ms and 5 s.
    pub sweep_interval: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
            sweep_interval: None,
        }
    }
}

impl RedisOptions {
    /// Sets [`op_timeout`](Self::op_timeout).
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Sets [`reconnect_min`](Self::reconnect_min) and [`reconnect_max`](Self::reconnect_max).
    pub fn with_reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// Sets [`ping_interval`](Self::ping_interval).
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Sets [`sweep_interval`](Self::sweep_interval).
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = Some(interval);
        self
    }

    /// `op_timeout`, never zero.
    pub(crate) fn checked_op_timeout(&self) -> Duration {
        self.op_timeout.max(Duration::from_millis(1))
    }

    /// `ping_interval`, never zero (a zero `interval` panics).
    pub(crate) fn checked_ping_interval(&self) -> Duration {
        self.ping_interval.max(Duration::from_millis(10))
    }

    /// `reconnect_min`, never zero (no busy loop against a dead server).
    pub(crate) fn checked_reconnect_min(&self) -> Duration {
        self.reconnect_min.max(Duration::from_millis(1))
    }

    /// `reconnect_max`, at least `reconnect_min`.
    pub(crate) fn checked_reconnect_max(&self) -> Duration {
        self.reconnect_max.max(self.checked_reconnect_min())
    }
}
