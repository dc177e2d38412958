//! `typing`: tell the other members, at most once per throttle window.

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::Result;
use crate::id::ConversationId;
use crate::protocol::Event;
use crate::router::Topic;

impl Chat {
    pub(in crate::engine) async fn typing(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
    ) -> Result<()> {
        let inner = &self.inner;
        // check: membership as this node knows it (no store round trip for a typing frame)
        if !inner.registry.is_local_member(&conn.user, conversation) {
            return Err(self.not_member_or_not_found(conversation).await);
        }
        // apply: the throttle drops extra frames inside the window
        if !inner.typing.allow(&conn.user, conversation) {
            return Ok(());
        }
        // fan out: to the other members, never to the typist's own devices
        self.broadcast(
            Topic::Conversation(conversation),
            Event::Typing {
                conversation_id: conversation,
                user_id: conn.user.clone(),
            },
            Some(conn.user.clone()),
            None,
        )
        .await;
        Ok(())
    }
}
