//! The commands of the protocol, one file each. Every handler reads the same way:
//! **parse** (the typed [`Command`] fields) → **check** (limits, membership) → **apply**
//! (the store, the registry) → **reply / fan out**. An `Err` becomes the client's `error`
//! frame (in [`Session::handle`](crate::Session::handle)); the session stays usable.

mod change;
mod presence;
mod react;
mod receipt;
mod refresh;
mod send;
mod sync;
mod typing;

pub(super) use presence::presence_event;
pub(super) use send::Stored;

use super::chat::Chat;
use super::expiry::expired;
use super::observer::EngineEvent;
use super::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::hooks::HookContext;
use crate::id::{ConversationId, UserId};
use crate::model::ReceiptKind;
use crate::protocol::Command;
use crate::time::now_ms;

impl Chat {
    /// Runs one command of `conn`: the expiry check, the hooks (rate limit first), then its
    /// handler. After the session's credential expired every command, `refresh` included, is
    /// `Unauthorized`; this is the only place that checks it.
    pub(crate) async fn execute(&self, conn: &ConnHandle, mut command: Command) -> Result<()> {
        let inner = &self.inner;
        inner.observe(EngineEvent::Command {
            connection: conn.id,
        });
        if conn.expired(now_ms()) {
            return Err(expired());
        }
        let ctx = HookContext {
            user: &conn.user,
            connection: conn.id,
        };
        for hook in &inner.hooks {
            hook.before(&ctx, &mut command).await?;
        }
        match command {
            Command::Message(m) => self.send(conn, m).await,
            Command::Typing { conversation_id } => self.typing(conn, conversation_id).await,
            Command::Delivered {
                conversation_id,
                seq,
            } => {
                self.receipt(conn, conversation_id, ReceiptKind::Delivered, seq)
                    .await
            }
            Command::Read {
                conversation_id,
                seq,
            } => {
                self.receipt(conn, conversation_id, ReceiptKind::Read, seq)
                    .await
            }
            Command::Edit {
                conversation_id,
                message_id,
                content,
            } => self.edit(conn, conversation_id, message_id, content).await,
            Command::Delete {
                conversation_id,
                message_id,
            } => self.delete(conn, conversation_id, message_id).await,
            Command::React {
                conversation_id,
                message_id,
                key,
            } => {
                self.react(conn, conversation_id, message_id, Some(key))
                    .await
            }
            Command::Unreact {
                conversation_id,
                message_id,
            } => self.react(conn, conversation_id, message_id, None).await,
            Command::Sync {
                conversations,
                streams,
            } => self.sync(conn, conversations, streams).await,
            Command::PresenceSubscribe { user_ids } => {
                self.presence_subscribe(conn, user_ids).await
            }
            Command::PresenceUnsubscribe { user_ids } => {
                self.presence_unsubscribe(conn, user_ids).await
            }
            Command::Refresh { token } => self.refresh(conn, token).await,
        }
    }

    // ------------------------------------------------------------------ shared checks

    /// Content within `max_message_bytes` (`TooLarge`).
    pub(super) fn check_content(&self, content: &str) -> Result<()> {
        let limit = self.inner.config.max_message_bytes;
        if content.len() > limit {
            return Err(Error::TooLarge {
                size: content.len(),
                limit,
            });
        }
        Ok(())
    }

    /// `user` is a member of `conversation` (`NotMember`, or `NotFound` for an unknown one).
    pub(super) async fn require_member(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<()> {
        match self.inner.store.member(conversation, user).await? {
            Some(_) => Ok(()),
            None => Err(self.not_member_or_not_found(conversation).await),
        }
    }

    /// `NotFound` for an unknown conversation, `NotMember` otherwise.
    pub(super) async fn not_member_or_not_found(&self, conversation: ConversationId) -> Error {
        match self.inner.store.last_seq(conversation).await {
            Ok(_) => Error::NotMember(conversation),
            Err(err) => err,
        }
    }
}
