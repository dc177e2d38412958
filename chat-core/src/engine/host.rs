//! The host API: what a host service (and the HTTP half of a transport) calls directly,
//! outside any socket: conversations, members, history, presence, and posting messages.

use super::chat::Chat;
use super::commands::Stored;
use crate::error::{Error, Result};
use crate::id::{ConversationId, UserId};
use crate::model::{
    Conversation, ConversationKind, ConversationView, Message, NewConversation, Page, Presence,
    Role,
};
use crate::protocol::{Event, SendMessage};
use crate::router::Payload;
use crate::time::now_ms;
use crate::transport::CloseReason;

impl Chat {
    /// Posts a message into a conversation from the host side (a bot, a system notice, an
    /// import), as `sender`, who must be a member. Unlike a client's send, it may be
    /// [`MessageKind::System`](crate::model::MessageKind::System); it goes through the same
    /// store (idempotent on `client_msg_id`), ordering and fan-out, to every member device,
    /// the sender's own included. Returns the stored message (the original one for a retry).
    ///
    /// ```
    /// use chat_core::{Chat, UserId, model::ConversationKind, protocol::SendMessage};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), chat_core::Error> {
    /// let chat = Chat::builder().build().await?;
    /// let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
    /// let conv = chat.create_conversation(&alice, ConversationKind::Group, &[bob], None).await?;
    /// let notice = SendMessage::system(conv.conversation.id, "welcome-1", "Welcome, Bob!");
    /// let message = chat.post_message(&alice, notice).await?;
    /// assert_eq!(message.seq, 1);
    /// # Ok(()) }
    /// ```
    pub async fn post_message(&self, sender: &UserId, message: SendMessage) -> Result<Message> {
        self.validate_message(&message)?;
        self.check_reply_to(message.conversation_id, message.reply_to)
            .await?;
        let (_, stored) = self.store_and_fan_out(sender, None, message).await?;
        match stored {
            Stored::Duplicate(message) => Ok(*message),
            Stored::New(frame) => {
                self.fan_out_beyond_node(&frame, None).await;
                match frame.event() {
                    Event::Message { message, .. } => Ok(message.clone()),
                    _ => Err(Error::internal("a stored message without its frame")),
                }
            }
        }
    }

    /// Revokes every session of `user`: their connections on this node, and on every other
    /// node when the router is distributed (a `Payload::Revoke` on the user's topic), are
    /// closed with [`CloseReason::Revoked`](crate::CloseReason::Revoked). Returns how many
    /// were closed here. It does not stop the user from connecting again: refuse their
    /// credential in the transport's authenticator too.
    ///
    /// The local connections are closed even when publishing to the other nodes fails (then
    /// the publish error is returned).
    pub async fn revoke_user(&self, user: &UserId) -> Result<usize> {
        let closed = self.close_user(user, CloseReason::Revoked).await;
        let payload = Payload::Revoke {
            user_id: user.clone(),
        };
        self.publish_to_user(user, payload).await?;
        Ok(closed)
    }

    /// Creates a conversation (the creator is always a member, `owner` of a group). A direct
    /// conversation between the same two users is returned again rather than duplicated.
    pub async fn create_conversation(
        &self,
        creator: &UserId,
        kind: ConversationKind,
        members: &[UserId],
        name: Option<String>,
    ) -> Result<ConversationView> {
        let inner = &self.inner;
        if name.as_ref().is_some_and(|n| n.len() > 256) {
            return Err(Error::invalid("name is longer than 256 bytes"));
        }
        for u in members {
            UserId::parse(u.as_str())?;
        }
        if members.len() >= inner.config.max_group_members {
            return Err(Error::invalid(format!(
                "a group has at most {} members",
                inner.config.max_group_members
            )));
        }
        let id = inner.ids.conversation_id();
        let conversation = inner
            .store
            .create_conversation(NewConversation {
                id,
                kind,
                name,
                creator: creator.clone(),
                members: members.to_vec(),
                created_at: id.timestamp_ms(),
            })
            .await?;
        if conversation.id == id {
            // Each member's devices learn about the new conversation; the members are not
            // told about each other (that would be O(members²) frames for a big group).
            for m in &conversation.members {
                self.membership_changed(id, &m.user_id, true, false, None)
                    .await;
            }
        }
        self.conversation_view(creator, conversation.id).await
    }

    /// One conversation as `user` sees it (`NotMember` / `NotFound`).
    pub async fn conversation_view(
        &self,
        user: &UserId,
        conversation: ConversationId,
    ) -> Result<ConversationView> {
        let store = &self.inner.store;
        let conv = store
            .conversation(conversation)
            .await?
            .ok_or_else(|| Error::not_found(format!("conversation {conversation}")))?;
        if conv.member(user).is_none() {
            return Err(Error::NotMember(conversation));
        }
        let unread = store.unread(conversation, user).await?;
        let last_message = store.history(conversation, None, 1).await?.pop();
        Ok(ConversationView {
            conversation: conv,
            unread,
            last_message,
        })
    }

    /// The user's conversations, most recent activity first. `after` is the previous page's
    /// `next`.
    pub async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>> {
        let limit = self.page_limit(limit)?;
        self.inner
            .store
            .list_conversations(user, after, limit)
            .await
    }

    /// A page of history, newest first: messages with `seq < before`. `next` is the `before`
    /// of the following page, `None` at the beginning of the conversation.
    pub async fn history(
        &self,
        user: &UserId,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Message, u64>> {
        let limit = self.page_limit(limit)?;
        self.require_member(conversation, user).await?;
        let items = self
            .inner
            .store
            .history(conversation, before, limit)
            .await?;
        let next = match items.last() {
            Some(oldest) if items.len() == limit && oldest.seq > 1 => Some(oldest.seq),
            _ => None,
        };
        Ok(Page { items, next })
    }

    fn page_limit(&self, limit: usize) -> Result<usize> {
        let max = self.inner.config.max_page_size;
        if limit == 0 || limit > max {
            return Err(Error::invalid(format!("limit must be 1..={max}")));
        }
        Ok(limit)
    }

    /// The group `actor` wants to change the members of, and the actor's role in it:
    /// `NotFound`, `NotMember`, or `Invalid` for a direct conversation (fixed members).
    async fn group_for_member_change(
        &self,
        actor: &UserId,
        conversation: ConversationId,
    ) -> Result<(Conversation, Role)> {
        let conv = self
            .inner
            .store
            .conversation(conversation)
            .await?
            .ok_or_else(|| Error::not_found(format!("conversation {conversation}")))?;
        let role = conv
            .member(actor)
            .ok_or(Error::NotMember(conversation))?
            .role;
        if conv.kind != ConversationKind::Group {
            return Err(Error::invalid(
                "a direct conversation has fixed members; only groups change",
            ));
        }
        Ok((conv, role))
    }

    /// Adds members to a group: `actor` must be its owner or an admin. Returns who was added.
    pub async fn add_members(
        &self,
        actor: &UserId,
        conversation: ConversationId,
        users: &[UserId],
    ) -> Result<Vec<UserId>> {
        let inner = &self.inner;
        for u in users {
            UserId::parse(u.as_str())?;
        }
        let (conv, role) = self.group_for_member_change(actor, conversation).await?;
        if !role.can_manage_members() {
            return Err(Error::forbidden("only owners and admins may add members"));
        }
        if conv.members.len() + users.len() > inner.config.max_group_members {
            return Err(Error::invalid(format!(
                "a group has at most {} members",
                inner.config.max_group_members
            )));
        }
        let added = inner
            .store
            .add_members(conversation, users, now_ms())
            .await?;
        for u in &added {
            self.membership_changed(conversation, &u.user_id, true, true, u.position)
                .await;
        }
        Ok(added.into_iter().map(|u| u.user_id).collect())
    }

    /// Removes a member from a group: anyone may remove themself; owners and admins may remove
    /// others (but only an owner may remove an owner). Returns whether they were a member.
    pub async fn remove_member(
        &self,
        actor: &UserId,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<bool> {
        let inner = &self.inner;
        let (conv, actor_role) = self.group_for_member_change(actor, conversation).await?;
        if actor != user {
            let target = conv.member(user).map(|m| m.role);
            let allowed = actor_role.can_manage_members()
                && (target != Some(Role::Owner) || actor_role == Role::Owner);
            if !allowed {
                return Err(Error::forbidden("not allowed to remove this member"));
            }
        }
        let removed = inner.store.remove_member(conversation, user).await?;
        let Some(removed) = removed else {
            return Ok(false);
        };
        self.membership_changed(conversation, user, false, true, removed.position)
            .await;
        Ok(true)
    }

    /// Presence of these users (debounced status, last seen).
    pub async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        if users.len() > self.inner.config.max_presence_watch {
            return Err(Error::invalid(format!(
                "at most {} users per request",
                self.inner.config.max_presence_watch
            )));
        }
        self.inner.presence.presence(users).await
    }

    /// Whether `user` has a connection on this node.
    pub fn is_connected_here(&self, user: &UserId) -> bool {
        self.inner.registry.is_connected(user)
    }
}
