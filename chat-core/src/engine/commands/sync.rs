//! `sync`: replay what a reconnecting device missed, then `sync_done`.

use std::collections::BTreeMap;

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::id::ConversationId;
use crate::protocol::Event;

impl Chat {
    pub(in crate::engine) async fn sync(
        &self,
        conn: &ConnHandle,
        conversations: BTreeMap<ConversationId, u64>,
    ) -> Result<()> {
        // check
        let inner = &self.inner;
        if conversations.len() > inner.config.max_sync_conversations {
            return Err(Error::invalid(format!(
                "sync lists {} conversations; the limit is {}",
                conversations.len(),
                inner.config.max_sync_conversations
            )));
        }
        // apply + reply: each conversation on its own; one failing does not stop the others
        let limit = inner.config.sync_limit;
        let mut latest = BTreeMap::new();
        let mut more = Vec::new();
        for (conversation, after) in conversations {
            match self.sync_one(conn, conversation, after, limit).await {
                Ok((last, has_more)) => {
                    latest.insert(conversation, last);
                    if has_more {
                        more.push(conversation);
                    }
                }
                Err(err) => {
                    let transient = !matches!(err, Error::NotMember(_) | Error::NotFound(_));
                    self.command_failed(conn, &err, None).await;
                    if transient {
                        // Store trouble: the client syncs this one again.
                        more.push(conversation);
                    }
                }
            }
        }
        self.reply(
            conn,
            Event::SyncDone {
                conversations: latest,
                more,
            },
        )
        .await;
        Ok(())
    }

    /// Replays up to `limit` messages after `after`; returns the seq to resume from and
    /// whether more are left.
    async fn sync_one(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        let store = &self.inner.store;
        self.require_member(conversation, &conn.user).await?;
        let mut messages = store
            .messages_after(conversation, after, limit.saturating_add(1))
            .await?;
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        let last = match (has_more, messages.last()) {
            (true, Some(m)) => m.seq,
            _ => store.last_seq(conversation).await?,
        };
        for message in messages {
            self.reply(conn, Event::Message { message }).await;
        }
        Ok((last, has_more))
    }
}
