//! When each session's credential expires: one ordered map for the whole node, watched by one
//! background task (`tasks::expiry_loop`), instead of a timer per connection.
//!
//! Every entry belongs to a live connection with an expiry: it is added at connect, moved by a
//! `refresh`, and removed at disconnect, so the maps are bounded by the number of sessions.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};

use foldhash::HashMap;
use tokio::sync::Notify;

use super::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::id::ConnectionId;

/// [`ConnHandle::expires_at`] of a session that never expires.
pub(crate) const NEVER: u64 = u64::MAX;

#[derive(Debug, Default)]
struct State {
    /// (expiry in Unix milliseconds, connection), earliest first.
    order: BTreeSet<(u64, ConnectionId)>,
    /// Connection → its entry's expiry (to find the entry when it moves or goes).
    by_conn: HashMap<ConnectionId, u64>,
}

/// The node's session deadlines.
#[derive(Debug, Default)]
pub(crate) struct Expiries {
    state: Mutex<State>,
    /// Woken when a deadline earlier than every other one is added, so the task re-arms.
    earlier: Notify,
}

impl Expiries {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new connection's expiry (`None`: never).
    pub(crate) fn start(&self, conn: &ConnHandle, expires_at: Option<u64>) {
        self.put(&mut self.lock(), conn, expires_at.unwrap_or(NEVER));
    }

    /// Moves `conn`'s expiry for a `refresh` at `now`. Refused (`Unauthorized`) when the
    /// session expired already (a refresh cannot revive it) or `expires_at` is not after `now`.
    pub(crate) fn refresh(
        &self,
        conn: &ConnHandle,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<()> {
        let at = expires_at.unwrap_or(NEVER);
        let mut s = self.lock();
        if conn.expired(now) {
            return Err(expired());
        }
        if at <= now {
            return Err(Error::Unauthorized("the new token is expired".into()));
        }
        self.put(&mut s, conn, at);
        Ok(())
    }

    fn put(&self, s: &mut State, conn: &ConnHandle, at: u64) {
        if let Some(old) = s.by_conn.remove(&conn.id) {
            s.order.remove(&(old, conn.id));
        }
        conn.expires_at.store(at, Ordering::Release);
        if at != NEVER {
            let first = s.order.first().is_none_or(|(f, _)| at < *f);
            s.order.insert((at, conn.id));
            s.by_conn.insert(conn.id, at);
            if first {
                self.earlier.notify_one();
            }
        }
    }

    /// Forgets a connection (disconnect).
    pub(crate) fn remove(&self, id: ConnectionId) {
        let mut s = self.lock();
        if let Some(at) = s.by_conn.remove(&id) {
            s.order.remove(&(at, id));
        }
    }

    /// The earliest deadline.
    pub(crate) fn first(&self) -> Option<u64> {
        self.lock().order.first().map(|(at, _)| *at)
    }

    /// Resolves when an earlier deadline was added (a wake-up is kept if nobody waited).
    pub(crate) async fn earlier_added(&self) {
        self.earlier.notified().await;
    }

    /// Removes and returns every connection whose deadline is at or before `now`.
    pub(crate) fn take_due(&self, now: u64) -> Vec<ConnectionId> {
        let mut s = self.lock();
        let mut due = Vec::new();
        while let Some(&(at, id)) = s.order.first() {
            if at > now {
                break;
            }
            s.order.pop_first();
            s.by_conn.remove(&id);
            due.push(id);
        }
        due
    }

    /// Number of sessions with a deadline.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_conn.len()
    }
}

/// The error of a command on an expired session.
pub(crate) fn expired() -> Error {
    Error::Unauthorized(
        "token expired: refresh before it expires, or reconnect with a new one".into(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::id::UserId;
    use crate::transport::Outbox;

    fn conn(id: u64) -> ConnHandle {
        let (outbox, _outbound) = Outbox::new(4, 4);
        ConnHandle {
            id: ConnectionId::from_raw(id),
            user: UserId::from("u"),
            outbox,
            expires_at: AtomicU64::new(NEVER),
            verifier: None,
        }
    }

    #[test]
    fn deadlines_come_out_in_order_and_moves_and_removals_leave_nothing_behind() {
        let e = Expiries::default();
        let (a, b, c) = (conn(1), conn(2), conn(3));
        e.start(&a, Some(300));
        e.start(&b, Some(100));
        e.start(&c, None);
        assert_eq!(e.first(), Some(100));
        assert_eq!(e.len(), 2, "a session that never expires has no entry");
        // b refreshes to later than a; a's refresh at 400 is refused: it expired at 300.
        e.refresh(&b, Some(500), 50).unwrap();
        assert!(e.refresh(&a, Some(900), 400).is_err());
        assert!(e.refresh(&b, Some(60), 70).is_err(), "an expired new token");
        assert_eq!(b.expiry(), Some(500), "a refused refresh changes nothing");
        assert_eq!(e.take_due(299), vec![]);
        assert_eq!(e.take_due(300), vec![a.id]);
        e.remove(b.id);
        assert_eq!(e.len(), 0);
        assert_eq!(e.first(), None);
    }
}
