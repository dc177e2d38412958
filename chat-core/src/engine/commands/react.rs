//! `react` / `unreact`: set or remove the caller's reaction on a message, tell every member
//! device (the caller's own included: that is its confirmation).

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::Result;
use crate::id::{ConversationId, MessageId};
use crate::model::Reaction;
use crate::protocol::Event;
use crate::router::Topic;

impl Chat {
    pub(in crate::engine) async fn react(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        message_id: MessageId,
        key: Option<String>,
    ) -> Result<()> {
        // check: a valid key (the store checks membership, the message and the key count)
        if let Some(key) = &key {
            Reaction::validate_key(key)?;
        }
        // apply
        let update = self
            .inner
            .store
            .react(conversation, message_id, &conn.user, key.as_deref())
            .await?;
        // fan out: only a change that took a position (the same reaction again is a no-op)
        if update.position.is_some() {
            self.broadcast(
                Topic::Conversation(conversation),
                Event::Reaction {
                    conversation_id: conversation,
                    message_id,
                    user_id: conn.user.clone(),
                    key,
                    reactions: update.message.reactions,
                    position: update.position,
                },
                None,
                None,
            )
            .await;
        }
        Ok(())
    }
}
