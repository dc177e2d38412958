//! `sync`: replay what a reconnecting device missed, then `sync_done`.
//!
//! Two forms, per conversation: `streams` (epoch + position) replays the current state of
//! every change after the position — or answers `reset` when the position cannot be replayed;
//! `conversations` (seq only, older clients) replays new messages after a seq.

use std::collections::BTreeMap;

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::id::ConversationId;
use crate::model::{Change, ReceiptKind, StreamPosition};
use crate::protocol::{Event, MembershipChange, ResetReason, SyncFrom};

/// How one conversation of a `streams` sync ended.
enum Replayed {
    /// Replayed up to `stream.position`; `more` when the client should sync again from it.
    Done { stream: StreamPosition, more: bool },
    /// A `reset` was sent.
    Reset,
}

impl Chat {
    pub(in crate::engine) async fn sync(
        &self,
        conn: &ConnHandle,
        conversations: BTreeMap<ConversationId, u64>,
        streams: BTreeMap<ConversationId, SyncFrom>,
    ) -> Result<()> {
        // check
        let inner = &self.inner;
        let asked = conversations.len().saturating_add(streams.len());
        if asked > inner.config.max_sync_conversations {
            return Err(Error::invalid(format!(
                "sync lists {asked} conversations; the limit is {}",
                inner.config.max_sync_conversations
            )));
        }
        // apply + reply: each conversation on its own; one failing does not stop the others
        let limit = inner.config.sync_limit;
        let mut latest = BTreeMap::new();
        let mut positions = BTreeMap::new();
        let mut more = Vec::new();
        for (conversation, after) in conversations {
            match self.sync_seq(conn, conversation, after, limit).await {
                Ok((last, has_more)) => {
                    latest.insert(conversation, last);
                    if has_more {
                        more.push(conversation);
                    }
                }
                Err(err) => self.sync_failed(conn, conversation, &err, &mut more).await,
            }
        }
        for (conversation, from) in streams {
            match self.sync_stream(conn, conversation, from, limit).await {
                Ok(Replayed::Done {
                    stream,
                    more: has_more,
                }) => {
                    positions.insert(conversation, stream);
                    if has_more && !more.contains(&conversation) {
                        more.push(conversation);
                    }
                }
                Ok(Replayed::Reset) => {}
                Err(err) => self.sync_failed(conn, conversation, &err, &mut more).await,
            }
        }
        self.reply(
            conn,
            Event::SyncDone {
                conversations: latest,
                more,
                streams: positions,
            },
        )
        .await;
        Ok(())
    }

    /// One conversation failed: its `error`, and for store trouble a `more` entry so the
    /// client syncs it again (not for "not a member" / "not found": that will not change).
    async fn sync_failed(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        err: &Error,
        more: &mut Vec<ConversationId>,
    ) {
        let transient = !matches!(
            err,
            Error::NotMember(_) | Error::NotFound(_) | Error::Invalid(_)
        );
        self.command_failed(conn, err, None).await;
        if transient && !more.contains(&conversation) {
            more.push(conversation);
        }
    }

    /// Replays up to `limit` messages after `after`; returns the seq to resume from and
    /// whether more are left.
    async fn sync_seq(
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
            self.reply(
                conn,
                Event::Message {
                    message,
                    position: None,
                },
            )
            .await;
        }
        Ok((last, has_more))
    }

    /// Replays up to `limit` changes after `from.position`, each at its current state, or
    /// sends a `reset` when the position cannot be replayed (another epoch, ahead of the
    /// stream, or more than `max_catch_up` behind).
    async fn sync_stream(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        from: SyncFrom,
        limit: usize,
    ) -> Result<Replayed> {
        let store = &self.inner.store;
        self.require_member(conversation, &conn.user).await?;
        let page = store
            .changes_after(conversation, from.position, limit)
            .await?
            .ok_or_else(|| {
                Error::invalid(
                    "this server's message store keeps no change stream: sync by seq \
                     (`conversations`)",
                )
            })?;
        let stream = page.stream;
        let reason = if from.epoch.is_some_and(|e| e != stream.epoch) {
            Some(ResetReason::Epoch)
        } else if from.position > stream.position
            || stream.position - from.position > self.inner.config.max_catch_up
        {
            Some(ResetReason::TooFarBehind)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.reply(
                conn,
                Event::Reset {
                    conversation_id: conversation,
                    stream,
                    reason,
                },
            )
            .await;
            return Ok(Replayed::Reset);
        }
        for change in page.changes {
            self.replay(conn, conversation, change).await;
        }
        let reached = page.next.unwrap_or(stream.position);
        Ok(Replayed::Done {
            stream: StreamPosition {
                epoch: stream.epoch,
                position: reached,
            },
            more: page.next.is_some(),
        })
    }

    /// The frames of one replayed change (the same frames as live, at the change's position).
    async fn replay(&self, conn: &ConnHandle, conversation: ConversationId, change: Change) {
        match change {
            Change::Message { position, message } => {
                self.reply(
                    conn,
                    Event::Message {
                        message: *message,
                        position: Some(position),
                    },
                )
                .await;
            }
            Change::Markers {
                position,
                user_id,
                delivered,
                read,
            } => {
                for (kind, seq) in [
                    (ReceiptKind::Delivered, delivered),
                    (ReceiptKind::Read, read),
                ] {
                    self.reply(
                        conn,
                        Event::Receipt {
                            conversation_id: conversation,
                            user_id: user_id.clone(),
                            kind,
                            seq,
                            position: Some(position),
                        },
                    )
                    .await;
                }
            }
            Change::Membership {
                position,
                user_id,
                member,
            } => {
                let change = if member {
                    MembershipChange::Joined
                } else {
                    MembershipChange::Left
                };
                self.reply(
                    conn,
                    Event::Membership {
                        conversation_id: conversation,
                        user_id,
                        change,
                        position: Some(position),
                    },
                )
                .await;
            }
        }
    }
}
