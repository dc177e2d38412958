//! `message`: store a new message (idempotently), ack it, fan it out.

use std::sync::Arc;

use tracing::warn;

use crate::engine::chat::Chat;
use crate::engine::observer::EngineEvent;
use crate::engine::push::PushJob;
use crate::engine::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::id::{ConnectionId, ConversationId, MessageId, UserId};
use crate::model::{Message, MessageKind, NewMessage};
use crate::protocol::{Event, Frame, SendMessage};
use crate::router::Topic;

impl Chat {
    pub(in crate::engine) async fn send(&self, conn: &ConnHandle, m: SendMessage) -> Result<()> {
        // check
        self.validate_send(&m)?;
        self.check_reply_to(m.conversation_id, m.reply_to).await?;
        // apply: stored, and fanned out on this node in seq order
        let (ack, stored) = self.store_and_fan_out(&conn.user, Some(conn.id), m).await?;
        // reply: durable (append returned), so only now does the sender hear about it
        self.reply(conn, ack).await;
        if let Stored::New(frame) = stored {
            self.fan_out_beyond_node(&frame, Some(conn.id)).await;
        }
        Ok(())
    }

    /// A client's message within the limits: id length, content size, kind and media.
    fn validate_send(&self, m: &SendMessage) -> Result<()> {
        if m.kind == MessageKind::System {
            return Err(Error::invalid("clients cannot send system messages"));
        }
        self.validate_message(m)
    }

    /// Any message, from a client or the host: `client_msg_id` length, content size, kind and
    /// media.
    pub(in crate::engine) fn validate_message(&self, m: &SendMessage) -> Result<()> {
        let max_id = self.inner.config.max_client_msg_id_bytes;
        if m.client_msg_id.is_empty() || m.client_msg_id.len() > max_id {
            return Err(Error::invalid(format!(
                "client_msg_id must be 1..={max_id} bytes"
            )));
        }
        self.check_content(&m.content)?;
        match m.kind {
            MessageKind::Image | MessageKind::File if m.media.is_none() => {
                return Err(Error::invalid("image and file messages need media"));
            }
            MessageKind::Text | MessageKind::System
                if m.content.is_empty() && m.media.is_none() =>
            {
                return Err(Error::invalid("empty message"));
            }
            _ => {}
        }
        if let Some(media) = &m.media {
            media.validate()?;
        }
        Ok(())
    }

    /// `reply_to`, when set, names a message of the conversation (`Invalid` otherwise; a
    /// failing store is reported as its own error, not as bad input).
    pub(in crate::engine) async fn check_reply_to(
        &self,
        conversation: ConversationId,
        reply_to: Option<MessageId>,
    ) -> Result<()> {
        let Some(target) = reply_to else {
            return Ok(());
        };
        match self.inner.store.message(conversation, target).await? {
            Some(_) => Ok(()),
            None => Err(Error::invalid(format!(
                "reply_to {target} is not a message of this conversation"
            ))),
        }
    }

    /// Appends `m` from `sender` and, for a new message, delivers it to this node's members
    /// (except the connection `except`), both under the conversation's send order, so seqs
    /// are assigned in the order frames are queued to local recipients. Returns the sender's
    /// `message_ack`. A retry is not fanned out again: the original send was (or its
    /// recipients get it by sync).
    pub(in crate::engine) async fn store_and_fan_out(
        &self,
        sender: &UserId,
        except: Option<ConnectionId>,
        m: SendMessage,
    ) -> Result<(Event, Stored)> {
        let inner = &self.inner;
        let conversation = m.conversation_id;
        let order = inner.conversation_locks.lock(conversation).await;
        let message_id = inner.ids.message_id();
        let appended = inner
            .store
            .append(NewMessage {
                message_id,
                conversation_id: conversation,
                sender_id: sender.clone(),
                client_msg_id: m.client_msg_id,
                kind: m.kind,
                content: m.content,
                media: m.media,
                reply_to: m.reply_to,
                created_at: message_id.timestamp_ms(),
            })
            .await?;
        let message = appended.message;
        let ack = Event::MessageAck {
            client_msg_id: message.client_msg_id.clone(),
            conversation_id: message.conversation_id,
            message_id: message.message_id,
            seq: message.seq,
            timestamp: message.created_at,
            position: appended.position,
        };
        if appended.duplicate {
            return Ok((ack, Stored::Duplicate(Box::new(message))));
        }
        inner.observe(EngineEvent::MessageStored { message: &message });
        inner.typing.reset(sender, conversation);
        let frame = Arc::new(Frame::new(Event::Message {
            message,
            position: appended.position,
        }));
        self.fan_out_message(order, except, &Topic::Conversation(conversation), &frame);
        Ok((ack, Stored::New(frame)))
    }

    /// After the local fan-out of a new message: the push hook for offline members, and the
    /// other nodes.
    pub(in crate::engine) async fn fan_out_beyond_node(
        &self,
        frame: &Frame,
        except: Option<ConnectionId>,
    ) {
        let Event::Message { message, .. } = frame.event() else {
            return;
        };
        let inner = &self.inner;
        if let Some(push) = &inner.push
            && push.try_send(PushJob::new(message.clone())).is_err()
        {
            warn!("push queue full: dropping a notification");
        }
        if inner.router.is_distributed() {
            let topic = Topic::Conversation(message.conversation_id);
            self.publish(topic, frame.event().clone(), None, except)
                .await;
        }
    }
}

/// What [`Chat::store_and_fan_out`] stored.
#[derive(Debug)]
pub(in crate::engine) enum Stored {
    /// A new message, fanned out on this node: its frame.
    New(Arc<Frame>),
    /// A retry: the original message, not fanned out again.
    Duplicate(Box<Message>),
}
