//! [`RedisOptions`]: the timeouts and the reconnect policy of every Redis backend.

use std::time::Duration;

/// Connection behaviour of the SDK's Redis backends (`RedisStore`, `RedisPresence`,
/// `RedisRouter`): one type for all of them, passed to their `connect_with`. The defaults
/// suit a Redis on the same network; every field has a `with_*` setter.
///
/// ```
/// use std::time::Duration;
/// use chat_redis::RedisOptions;
///
/// let options = RedisOptions::default().with_op_timeout(Duration::from_millis(500));
/// assert_eq!(options.op_timeout, Duration::from_millis(500));
/// ```
///
/// The defaults unify the two sets the store and presence had before they shared this layer;
/// where those differed, the stricter value was kept (see `docs/architecture.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Longest wait for one whole operation, waiting for a reconnection and the one retry
    /// included (default 2 s). Past it the call fails with `Error::Unavailable`: no call hangs
    /// while Redis is down.
    pub op_timeout: Duration,
    /// Bound on one connection attempt: TCP connect and handshake (default 1 s).
    pub connect_timeout: Duration,
    /// Bound on the wait for one reply once the request is sent (default 2 s).
    pub response_timeout: Duration,
    /// Connection attempts per reconnection of the command connection, with exponential
    /// backoff from [`reconnect_min`](Self::reconnect_min) to
    /// [`reconnect_max`](Self::reconnect_max) (default 3). A new reconnection starts with the
    /// next call after a failed one.
    pub reconnect_attempts: usize,
    /// First delay before reconnecting (default 50 ms); doubled after every failed attempt up
    /// to [`reconnect_max`](Self::reconnect_max).
    pub reconnect_min: Duration,
    /// Longest delay between two reconnect attempts (default 1 s).
    pub reconnect_max: Duration,
    /// How often an idle pub/sub connection is pinged, so a half-open TCP connection is noticed
    /// (default 5 s). Used by the backends that subscribe (presence and router).
    pub ping_interval: Duration,
    /// Longest time between two offline sweeps of `RedisPresence` (the safety net behind
    /// keyspace notifications, see the `chat-presence` docs); only presence uses it. `None`
    /// (the default): a quarter of the shorter of TTL and debounce, between 50 ms and 5 s.
    pub sweep_interval: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            reconnect_attempts: 3,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(1),
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

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`response_timeout`](Self::response_timeout).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets [`reconnect_attempts`](Self::reconnect_attempts).
    pub fn with_reconnect_attempts(mut self, attempts: usize) -> Self {
        self.reconnect_attempts = attempts;
        self
    }

    /// Sets [`reconnect_min`](Self::reconnect_min) and [`reconnect_max`](Self::reconnect_max)
    /// (`max` is raised to `min` if smaller).
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

    /// [`op_timeout`](Self::op_timeout) as used: never zero.
    pub fn checked_op_timeout(&self) -> Duration {
        self.op_timeout.max(Duration::from_millis(1))
    }

    /// [`connect_timeout`](Self::connect_timeout) as used: never zero.
    pub fn checked_connect_timeout(&self) -> Duration {
        self.connect_timeout.max(Duration::from_millis(1))
    }

    /// [`response_timeout`](Self::response_timeout) as used: never zero.
    pub fn checked_response_timeout(&self) -> Duration {
        self.response_timeout.max(Duration::from_millis(1))
    }

    /// [`ping_interval`](Self::ping_interval) as used: at least 10 ms (a zero interval would
    /// panic in tokio).
    pub fn checked_ping_interval(&self) -> Duration {
        self.ping_interval.max(Duration::from_millis(10))
    }

    /// [`reconnect_min`](Self::reconnect_min) as used: never zero (no busy loop against a dead
    /// server).
    pub fn checked_reconnect_min(&self) -> Duration {
        self.reconnect_min.max(Duration::from_millis(1))
    }

    /// [`reconnect_max`](Self::reconnect_max) as used: at least the checked `reconnect_min`.
    pub fn checked_reconnect_max(&self) -> Duration {
        self.reconnect_max.max(self.checked_reconnect_min())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_values_are_clamped_and_max_is_at_least_min() {
        let options = RedisOptions::default()
            .with_op_timeout(Duration::ZERO)
            .with_connect_timeout(Duration::ZERO)
            .with_response_timeout(Duration::ZERO)
            .with_ping_interval(Duration::ZERO)
            .with_reconnect_backoff(Duration::ZERO, Duration::ZERO);
        assert_eq!(options.checked_op_timeout(), Duration::from_millis(1));
        assert_eq!(options.checked_connect_timeout(), Duration::from_millis(1));
        assert_eq!(options.checked_response_timeout(), Duration::from_millis(1));
        assert_eq!(options.checked_ping_interval(), Duration::from_millis(10));
        assert_eq!(options.checked_reconnect_min(), Duration::from_millis(1));
        assert_eq!(options.checked_reconnect_max(), Duration::from_millis(1));
        let options = RedisOptions::default()
            .with_reconnect_backoff(Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(options.reconnect_max, Duration::from_secs(3));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = RedisOptions::default();
        assert_eq!(d.op_timeout, Duration::from_secs(2));
        assert_eq!(d.connect_timeout, Duration::from_secs(1));
        assert_eq!(d.response_timeout, Duration::from_secs(2));
        assert_eq!(d.reconnect_attempts, 3);
        assert_eq!(
            (d.reconnect_min, d.reconnect_max),
            (Duration::from_millis(50), Duration::from_secs(1))
        );
        assert_eq!(d.ping_interval, Duration::from_secs(5));
        assert_eq!(d.sweep_interval, None);
    }
}
