//! `presence_subscribe` / `presence_unsubscribe`: watch users' presence for as long as the
//! socket lives.

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::id::UserId;
use crate::model::Presence;
use crate::protocol::Event;

impl Chat {
    pub(in crate::engine) async fn presence_subscribe(
        &self,
        conn: &ConnHandle,
        users: Vec<UserId>,
    ) -> Result<()> {
        let inner = &self.inner;
        // check
        for u in &users {
            UserId::parse(u.as_str())?;
        }
        // apply: this node's watch list (bounded per connection), the tracker for new ones
        let fresh = inner
            .registry
            .watch(conn.id, &users, inner.config.max_presence_watch)
            .map_err(|total| {
                Error::invalid(format!(
                    "a connection may watch at most {} users (asked for {total})",
                    inner.config.max_presence_watch
                ))
            })?;
        if !fresh.is_empty() {
            inner.presence.watch(&fresh).await?;
        }
        // reply: the current status of each, then changes as they happen
        for p in inner.presence.presence(&users).await? {
            self.reply(conn, presence_event(p)).await;
        }
        Ok(())
    }

    pub(in crate::engine) async fn presence_unsubscribe(
        &self,
        conn: &ConnHandle,
        users: Vec<UserId>,
    ) -> Result<()> {
        let inner = &self.inner;
        let gone = inner.registry.unwatch(conn.id, &users);
        if !gone.is_empty() {
            inner.presence.unwatch(&gone).await?;
        }
        Ok(())
    }
}

/// The `presence` frame of a status.
pub(in crate::engine) fn presence_event(p: Presence) -> Event {
    Event::Presence {
        user_id: p.user_id,
        status: p.status,
        last_seen: p.last_seen,
    }
}
