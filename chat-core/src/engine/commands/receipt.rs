//! `delivered` / `read`: move the caller's marker forward, tell the others and the caller's
//! other devices.

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::Result;
use crate::id::ConversationId;
use crate::model::ReceiptKind;
use crate::protocol::Event;
use crate::router::Topic;

impl Chat {
    pub(in crate::engine) async fn receipt(
        &self,
        conn: &ConnHandle,
        conversation: ConversationId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<()> {
        // check + apply: the store checks membership, clamps and only moves forward
        let update = self
            .inner
            .store
            .set_marker(conversation, &conn.user, kind, seq)
            .await?;
        // fan out: only a marker that moved, to every member device. The reporting
        // connection gets it too when it carries a position (it needs every position to
        // notice a missed change); without a change stream it is left out as before.
        if update.moved {
            let except = update.position.is_none().then_some(conn.id);
            self.broadcast(
                Topic::Conversation(conversation),
                Event::Receipt {
                    conversation_id: conversation,
                    user_id: conn.user.clone(),
                    kind,
                    seq: update.seq,
                    position: update.position,
                },
                None,
                except,
            )
            .await;
        }
        Ok(())
    }
}
