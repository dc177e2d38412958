//! `edit` / `delete`: change one of the caller's messages, tell every member device.

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::id::{ConversationId, MessageId};
use crate::model::MessageChange;
use crate::protocol::Event;
use crate::router::Topic;
use crate::time::now_ms;

impl Chat {
    pub(in crate::engine) async fn edit(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        message_id: MessageId,
        content: String,
    ) -> Result<()> {
        self.check_content(&content)?;
        if content.is_empty() {
            return Err(Error::invalid("edit content must not be empty; use delete"));
        }
        self.change(
            conn,
            conversation,
            message_id,
            MessageChange::Edit { content },
        )
        .await
    }

    pub(in crate::engine) async fn delete(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        message_id: MessageId,
    ) -> Result<()> {
        self.change(conn, conversation, message_id, MessageChange::Delete)
            .await
    }

    async fn change(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        message_id: MessageId,
        change: MessageChange,
    ) -> Result<()> {
        // check: a member (the store checks it is the sender's own message)
        self.require_member(conversation, &conn.user).await?;
        // apply
        let deleted = matches!(change, MessageChange::Delete);
        let update = self
            .inner
            .store
            .change_message(conversation, message_id, &conn.user, change, now_ms())
            .await?;
        // fan out: every member device, the editor's own included
        let (message, position) = (update.message, update.position);
        let event = if deleted {
            Event::MessageDeleted { message, position }
        } else {
            Event::MessageEdited { message, position }
        };
        self.broadcast(Topic::Conversation(conversation), event, None, None)
            .await;
        Ok(())
    }
}
