//! [`RedisStore`]: a [`MessageStore`] on Redis. The key layout and the guarantees are in the
//! crate docs.

mod codec;
mod scripts;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chat_core::id::{ConversationId, MessageId, UserId};
use chat_core::model::{
    ChangePage, Conversation, ConversationKind, ConversationView, Member, Message, MessageChange,
    NewConversation, NewMessage, Page, Reaction, ReceiptKind, StreamPosition, direct_key,
};
use chat_core::store::{Appended, MarkerUpdate, MembershipUpdate, MessageStore, MessageUpdate};
use chat_core::{Error, Result};
use chat_redis::redis::{self, Value};
use chat_redis::{RedisConnection, RedisOptions, Script};

use self::codec::{
    array, decode_change, decode_conversation, decode_member, decode_message, decode_message_with,
    decode_reactions, encode, encode_new, idempotency_field, messages_with_reactions, older_than,
    parse_entry, parse_u64, string, timeline_page, tuple, uint,
};

/// How often [`MessageStore::change_message`] re-reads a message that changed between its read
/// and its compare-and-set before giving up with [`Error::Conflict`].
const CAS_ATTEMPTS: usize = 16;

/// Key names under one prefix (see the key table in the crate docs). The Lua prelude in
/// `scripts.rs` builds the same names.
#[derive(Clone)]
struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    fn conv(&self, id: ConversationId) -> String {
        format!("{}:conv:{id}", self.prefix)
    }
    fn members(&self, id: ConversationId) -> String {
        format!("{}:members:{id}", self.prefix)
    }
    fn msgs(&self, id: ConversationId) -> String {
        format!("{}:msgs:{id}", self.prefix)
    }
    fn ids(&self, id: ConversationId) -> String {
        format!("{}:ids:{id}", self.prefix)
    }
    fn idem(&self, id: ConversationId) -> String {
        format!("{}:idem:{id}", self.prefix)
    }
    fn deleted(&self, id: ConversationId) -> String {
        format!("{}:deleted:{id}", self.prefix)
    }
    fn reactions(&self, id: ConversationId) -> String {
        format!("{}:reactions:{id}", self.prefix)
    }
    fn changes(&self, id: ConversationId) -> String {
        format!("{}:changes:{id}", self.prefix)
    }
    fn sent(&self, id: ConversationId, user: &UserId) -> String {
        format!("{}:sent:{id}:{user}", self.prefix)
    }
    fn user(&self, user: &UserId) -> String {
        format!("{}:user:{user}:convs", self.prefix)
    }
    fn direct(&self, pair_key: &str) -> String {
        format!("{}:direct:{pair_key}", self.prefix)
    }
}

/// A [`MessageStore`] on Redis: durable (as durable as the server's persistence settings, see
/// the crate docs) and shared by every node of a cluster of chat servers.
///
/// Every mutation that touches several keys is one Lua script, so it is atomic: in particular
/// `append` checks membership and idempotency, assigns `seq = last_seq + 1`, stores the message
/// and moves the conversation to the top of every member's list in one step, which keeps seqs
/// gap-free across any number of nodes and concurrent appenders.
///
/// # The change stream
///
/// Every change a client renders takes the conversation's next position in the script that
/// makes it (see the crate docs), so positions are 1, 2, 3, … per conversation across every
/// node. The stream's epoch, random, is made with the conversation. A conversation whose stream
/// state is gone (the `epoch` or `position` field missing from its hash, or a position past 0
/// with no change log) gets a new stream, with a new epoch and positions from 1 again, from the
/// next call that reads or records it; so do conversations stored before the stream existed.
/// A conversation created again after its keys were lost has a new epoch too.
///
/// **Retention: the whole stream, compacted.** Nothing in the change log expires: each thing
/// has one entry, at the position of its latest change, so a replay from any position (0
/// included) returns the current state of everything that changed since, each thing once.
///
/// **Cost.** One sorted set per conversation (`<p>:changes:<cid>`) and two fields in its hash
/// (`epoch`, `position`); in the set, one entry per message (`m:<seq>`) and at most two per user
/// who ever was a member (`k:<user>` once their markers moved, `j:<user>` once they joined or
/// left after the creation), however many times each changed. An entry is its name (2 bytes +
/// the seq or user id) plus a score: about 10–20 bytes while the set is small enough for Redis's
/// listpack encoding (`zset-max-listpack-entries`, 128 by default), about 60–80 bytes plus the
/// name in a skiplist beyond. So a conversation of n messages and u members costs roughly
/// n + 2u entries, i.e. some 70–100 bytes per message on top of the message itself. The entries
/// of users who left stay (the join entry says they left; markers of non-members are skipped
/// when replayed). Reactions are one field per reacted-to message in `<p>:reactions:<cid>`
/// (each key once plus each reacting user's id). Recording a change is one `HINCRBY` and one
/// `ZADD` (O(log n)) in the change's script; a replay page is one script,
/// O(log n + page × log n).
///
/// Positions of retried calls: under the shared layer's retry rule, a script whose reply was
/// lost may run again; the second run changes nothing, so it returns no position (a duplicate
/// append, a marker that did not move, a reaction already there, members already added) while
/// the first run's change keeps its position in the log, where a replay finds it. (An edit
/// whose write was applied but not acknowledged is re-read and applied again, as before the
/// stream existed: a second version, with a second position.)
///
/// The connection is the shared Redis layer's [`RedisConnection`] (crate `chat-redis`, the
/// same as `chat-presence`'s): one multiplexed connection (concurrent requests are pipelined on
/// it) that reconnects by itself after an error. While Redis is unreachable, operations fail
/// with [`Error::Unavailable`] within [`RedisOptions::op_timeout`]; once it is back, they
/// succeed again. Cloning a `RedisStore` is cheap and shares the connection.
///
/// ```no_run
/// use std::sync::Arc;
/// use chat_core::Chat;
/// use chat_store::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::Error> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/", "chat").await?;
/// let chat = Chat::builder().store(Arc::new(store)).build().await?;
/// # let _ = chat;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    /// Reconnecting multiplexed connection with the deadline and retry rule of every call.
    conn: RedisConnection,
    /// Every key name, under the store's prefix.
    keys: Keys,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .field("op_timeout", &self.conn.op_timeout())
            .finish_non_exhaustive()
    }
}

/// The epoch a script gives a conversation's change stream if it has none (a new
/// conversation, or one whose stream was lost). Made for every call that may record a change:
/// a random number is cheaper than a round trip to ask whether one is needed.
fn fresh_epoch() -> String {
    StreamPosition::new_epoch().to_string()
}

/// A position returned by a script: 0 means none.
fn position(v: Value) -> Result<Option<u64>> {
    Ok(Some(uint(v)?).filter(|&p| p != 0))
}

/// A `LIMIT` count for Redis (a signed 64-bit integer), saturating.
fn redis_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host[:port][/db]`) with the default
    /// [`RedisOptions`]; every key starts with `prefix` and `:`.
    ///
    /// [`Error::Invalid`] for a malformed URL or an empty prefix, [`Error::Unavailable`] when
    /// Redis cannot be reached within the operation timeout.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        Self::connect_with(url, prefix, RedisOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(url: &str, prefix: &str, options: RedisOptions) -> Result<Self> {
        if prefix.is_empty() {
            return Err(Error::invalid("the redis key prefix must not be empty"));
        }
        let client = chat_redis::client(url)?;
        let conn = RedisConnection::connect(&client, &options, &scripts::all()).await?;
        Ok(Self {
            conn,
            keys: Keys {
                prefix: Arc::from(prefix),
            },
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// Runs a script with `keys` and `args` (the prefix is prepended to `args` as `ARGV[1]`).
    ///
    /// Under the shared layer's retry rule a call may reach Redis twice (the first call after
    /// Redis restarted fails on the dead connection, and the script cache of the new server is
    /// empty). Every script is safe to repeat: appends are idempotent, markers only move
    /// forward, member changes are set operations, and a repeated create of the same id reports
    /// `Conflict` rather than creating twice.
    async fn script(
        &self,
        what: &'static str,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value> {
        let mut call = script.call(keys);
        call.arg(&*self.keys.prefix);
        for a in args {
            call.arg(*a);
        }
        self.conn.query(what, &call).await
    }

    /// The stored JSON, seq and reactions of a message; `NotFound` for an unknown conversation.
    async fn raw_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<(u64, String, Value)>> {
        let v = self
            .script(
                "get message",
                &scripts::GET_MESSAGE,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.ids(conversation),
                    &self.keys.msgs(conversation),
                    &self.keys.reactions(conversation),
                ],
                &[&conversation.to_string(), &id.to_string()],
            )
            .await?;
        if v == Value::Nil {
            return Ok(None);
        }
        let [seq, json, reactions] = tuple::<3>(v)?;
        Ok(Some((uint(seq)?, string(json)?, reactions)))
    }

    /// A range of the timeline with the reactions, in one script (`NotFound` for an unknown
    /// conversation).
    async fn timeline_range(
        &self,
        conversation: ConversationId,
        command: &str,
        from: String,
        to: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let v = self
            .script(
                "timeline range",
                &scripts::TIMELINE,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.msgs(conversation),
                    &self.keys.reactions(conversation),
                ],
                &[
                    &conversation.to_string(),
                    command,
                    &from,
                    to,
                    &redis_count(limit).to_string(),
                ],
            )
            .await?;
        timeline_page(v)
    }

    /// The compare-and-set loop of `change_message`: reads the message, lets `change` turn it
    /// into the new version, and writes it only if the stored JSON is still what was read,
    /// re-reading on a concurrent change. The write takes the change's position.
    async fn update_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        change: impl Fn(&Message) -> Result<Message> + Send + Sync,
    ) -> Result<MessageUpdate> {
        let cid = conversation.to_string();
        for _ in 0..CAS_ATTEMPTS {
            let (seq, old, _) = self.raw_message(conversation, id).await?.ok_or_else(|| {
                Error::not_found(format!("message {id} in conversation {conversation}"))
            })?;
            let current = decode_message(&old, seq)?;
            let mut changed = change(&current)?;
            let new = encode(&changed)?;
            let deletes = changed.deleted && !current.deleted;
            let written = self
                .script(
                    "replace message",
                    &scripts::REPLACE_MESSAGE,
                    &[
                        &self.keys.msgs(conversation),
                        &self.keys.deleted(conversation),
                        &self.keys.sent(conversation, &current.sender_id),
                        &self.keys.conv(conversation),
                        &self.keys.changes(conversation),
                        &self.keys.reactions(conversation),
                    ],
                    &[
                        &fresh_epoch(),
                        &cid,
                        &seq.to_string(),
                        &old,
                        &new,
                        if deletes { "1" } else { "0" },
                    ],
                )
                .await?;
            let mut written = array(written)?.into_iter();
            let at = position(
                written
                    .next()
                    .ok_or_else(|| codec::corrupt("replace reply"))?,
            )?;
            if let Some(at) = at {
                // The reactions as they were when the write ran (none after a delete).
                changed.reactions = decode_reactions(written.next().unwrap_or(Value::Nil))?;
                return Ok(MessageUpdate {
                    message: changed,
                    position: Some(at),
                });
            }
        }
        Err(Error::Conflict(
            format!("message {id} kept changing concurrently; try again").into(),
        ))
    }
}

fn unknown(id: ConversationId) -> Error {
    Error::not_found(format!("conversation {id}"))
}

#[async_trait]
impl MessageStore for RedisStore {
    async fn append(&self, message: NewMessage) -> Result<Appended> {
        let id = message.conversation_id;
        let json = encode_new(&message)?;
        let v = self
            .script(
                "append",
                &scripts::APPEND,
                &[
                    &self.keys.conv(id),
                    &self.keys.members(id),
                    &self.keys.msgs(id),
                    &self.keys.ids(id),
                    &self.keys.idem(id),
                    &self.keys.sent(id, &message.sender_id),
                    &self.keys.changes(id),
                    &self.keys.reactions(id),
                ],
                &[
                    &fresh_epoch(),
                    &id.to_string(),
                    message.sender_id.as_str(),
                    &idempotency_field(&message.sender_id, &message.client_msg_id),
                    &message.message_id.to_string(),
                    &json,
                ],
            )
            .await?;
        let mut items = array(v)?.into_iter();
        let (Some(flag), Some(seq)) = (items.next(), items.next()) else {
            return Err(codec::corrupt("append reply"));
        };
        let seq = uint(seq)?;
        let third = items
            .next()
            .ok_or_else(|| codec::corrupt("append reply of two items"))?;
        if uint(flag)? == 0 {
            return Ok(Appended {
                message: message.into_message(seq),
                duplicate: false,
                position: position(third)?,
            });
        }
        let reactions = items.next().unwrap_or(Value::Nil);
        Ok(Appended {
            message: decode_message_with(&string(third)?, seq, reactions)?,
            duplicate: true,
            position: None,
        })
    }

    async fn message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<Message>> {
        self.raw_message(conversation, id)
            .await?
            .map(|(seq, json, reactions)| decode_message_with(&json, seq, reactions))
            .transpose()
    }

    async fn change_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        by: &UserId,
        change: MessageChange,
        now: u64,
    ) -> Result<MessageUpdate> {
        // Compare-and-set (see `update_message`): `MessageChange::apply` is the one definition
        // of an edit. The sender check needs no re-check: a message's sender never changes.
        self.update_message(conversation, id, |current| {
            if &current.sender_id != by {
                return Err(Error::forbidden(
                    "only the sender may edit or delete a message",
                ));
            }
            let mut changed = current.clone();
            change.apply(&mut changed, now)?;
            Ok(changed)
        })
        .await
    }

    async fn react(
        &self,
        conversation: ConversationId,
        id: MessageId,
        user: &UserId,
        key: Option<&str>,
    ) -> Result<MessageUpdate> {
        // One script applies `apply_reaction`'s rule, step by step and in its order of checks;
        // the key's syntax (Unicode whitespace and control characters) is checked here and
        // reported by the script at the point the rule checks it.
        let key_error = match key.map(Reaction::validate_key) {
            Some(Err(Error::Invalid(why))) => why.to_string(),
            Some(Err(e)) => return Err(e),
            _ => String::new(),
        };
        let too_many = format!(
            "a message has at most {} distinct reaction keys",
            Reaction::MAX_KEYS
        );
        let v = self
            .script(
                "react",
                &scripts::REACT,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                    &self.keys.ids(conversation),
                    &self.keys.msgs(conversation),
                    &self.keys.deleted(conversation),
                    &self.keys.reactions(conversation),
                    &self.keys.changes(conversation),
                ],
                &[
                    &fresh_epoch(),
                    &conversation.to_string(),
                    &id.to_string(),
                    user.as_str(),
                    if key.is_some() { "1" } else { "0" },
                    key.unwrap_or(""),
                    if key_error.is_empty() { "1" } else { "0" },
                    &key_error,
                    &Reaction::MAX_KEYS.to_string(),
                    &too_many,
                ],
            )
            .await?;
        let [seq, json, reactions, at] = tuple::<4>(v)?;
        Ok(MessageUpdate {
            message: decode_message_with(&string(json)?, uint(seq)?, reactions)?,
            position: position(at)?,
        })
    }

    async fn stream(&self, conversation: ConversationId) -> Result<Option<StreamPosition>> {
        let v = self
            .script(
                "stream",
                &scripts::STREAM,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.changes(conversation),
                ],
                &[&fresh_epoch(), &conversation.to_string()],
            )
            .await?;
        let [epoch, position] = tuple::<2>(v)?;
        Ok(Some(StreamPosition {
            epoch: uint(epoch)?,
            position: uint(position)?,
        }))
    }

    async fn changes_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Option<ChangePage>> {
        // One more entry than asked, to know whether more follow (counts below i64::MAX, as in
        // `list_conversations`).
        let limit = limit.min(i64::MAX as usize / 2);
        let v = self
            .script(
                "changes after",
                &scripts::CHANGES,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                    &self.keys.msgs(conversation),
                    &self.keys.changes(conversation),
                    &self.keys.reactions(conversation),
                ],
                &[
                    &fresh_epoch(),
                    &conversation.to_string(),
                    &after.to_string(),
                    &(limit + 1).to_string(),
                    &limit.to_string(),
                ],
            )
            .await?;
        let [epoch, stream_position, entries, more] = tuple::<4>(v)?;
        let stream = StreamPosition {
            epoch: uint(epoch)?,
            position: uint(stream_position)?,
        };
        let mut changes = Vec::new();
        let mut read_to = after;
        for entry in array(entries)? {
            let [item, at, state] = tuple::<3>(entry)?;
            let at = uint(at)?;
            read_to = at;
            changes.extend(decode_change(&string(item)?, at, state)?);
        }
        let next = (uint(more)? == 1).then_some(read_to);
        Ok(Some(ChangePage {
            stream,
            changes,
            next,
        }))
    }

    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let max = before.map_or_else(|| "+inf".to_owned(), |b| format!("({b}"));
        self.timeline_range(conversation, "ZREVRANGEBYSCORE", max, "-inf", limit)
            .await
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.timeline_range(
            conversation,
            "ZRANGEBYSCORE",
            format!("({after}"),
            "+inf",
            limit,
        )
        .await
    }

    async fn last_seq(&self, conversation: ConversationId) -> Result<u64> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.keys.conv(conversation)).arg("last_seq");
        let last: Option<String> = self.conn.query("last seq", &cmd).await?;
        parse_u64(&last.ok_or_else(|| unknown(conversation))?)
    }

    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        // Creator first, then the others in the given order, without duplicates.
        let mut users: Vec<&UserId> = Vec::with_capacity(new.members.len() + 1);
        for u in std::iter::once(&new.creator).chain(&new.members) {
            if !users.contains(&u) {
                users.push(u);
            }
        }
        let (kind, first_role, pair_key) = match new.kind {
            ConversationKind::Group => ("group", "owner", self.keys.conv(new.id)),
            ConversationKind::Direct => {
                let &[a, b] = users.as_slice() else {
                    return Err(Error::invalid(
                        "a direct conversation needs exactly two distinct users",
                    ));
                };
                ("direct", "member", self.keys.direct(&direct_key(a, b)))
            }
        };
        let (epoch, cid, created_at) = (
            fresh_epoch(),
            new.id.to_string(),
            new.created_at.to_string(),
        );
        let mut args: Vec<&str> = vec![
            &epoch,
            &cid,
            kind,
            if new.name.is_some() { "1" } else { "0" },
            new.name.as_deref().unwrap_or(""),
            &created_at,
            first_role,
        ];
        args.extend(users.iter().map(|u| u.as_str()));
        let v = self
            .script(
                "create",
                &scripts::CREATE,
                &[
                    &self.keys.conv(new.id),
                    &self.keys.members(new.id),
                    &pair_key,
                    &self.keys.changes(new.id),
                    &self.keys.reactions(new.id),
                ],
                &args,
            )
            .await?;
        let [id, snapshot] = tuple::<2>(v)?;
        let id = string(id)?
            .parse::<ConversationId>()
            .map_err(|_| codec::corrupt("conversation id"))?;
        decode_conversation(id, snapshot)
    }

    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        let v = self
            .script(
                "conversation",
                &scripts::CONVERSATION,
                &[&self.keys.conv(id), &self.keys.members(id)],
                &[],
            )
            .await?;
        if v == Value::Nil {
            return Ok(None);
        }
        decode_conversation(id, v).map(Some)
    }

    async fn member(&self, conversation: ConversationId, user: &UserId) -> Result<Option<Member>> {
        let mut pipe = redis::pipe();
        pipe.hget(self.keys.members(conversation), user.as_str())
            .exists(self.keys.conv(conversation));
        let (entry, exists): (Option<String>, bool) = self.conn.query("member", &pipe).await?;
        if !exists {
            return Err(unknown(conversation));
        }
        entry
            .map(|v| decode_member(user.clone(), &v).map(|(m, _)| m))
            .transpose()
    }

    async fn add_members(
        &self,
        conversation: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> Result<Vec<MembershipUpdate>> {
        let (epoch, cid, now) = (fresh_epoch(), conversation.to_string(), now.to_string());
        let mut args: Vec<&str> = vec![&epoch, &cid, &now];
        args.extend(users.iter().map(UserId::as_str));
        let v = self
            .script(
                "add members",
                &scripts::ADD_MEMBERS,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                    &self.keys.changes(conversation),
                ],
                &args,
            )
            .await?;
        array(v)?
            .into_iter()
            .map(|added| {
                let [user, at] = tuple::<2>(added)?;
                Ok(MembershipUpdate {
                    user_id: UserId::from(string(user)?),
                    position: position(at)?,
                })
            })
            .collect()
    }

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<Option<MembershipUpdate>> {
        let v = self
            .script(
                "remove member",
                &scripts::REMOVE_MEMBER,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                    &self.keys.changes(conversation),
                ],
                &[&fresh_epoch(), &conversation.to_string(), user.as_str()],
            )
            .await?;
        Ok(position(v)?.map(|at| MembershipUpdate {
            user_id: user.clone(),
            position: Some(at),
        }))
    }

    async fn conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.keys.user(user)).arg(0).arg(-1);
        let entries: Vec<String> = self.conn.query("conversation ids", &cmd).await?;
        entries
            .iter()
            .map(|e| parse_entry(e).map(|(_, id)| id))
            .collect()
    }

    async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>> {
        if limit == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        // One more entry than asked, to know whether there is a next page. Counts stay below
        // i64::MAX so that both Redis and Lua read them exactly enough.
        let limit = limit.min(i64::MAX as usize / 2);
        let max = after.map_or_else(|| "+".to_owned(), older_than);
        let v = self
            .script(
                "list",
                &scripts::LIST,
                &[&self.keys.user(user)],
                &[
                    user.as_str(),
                    &max,
                    &(limit + 1).to_string(),
                    &limit.to_string(),
                ],
            )
            .await?;
        let [entries, views] = tuple::<2>(v)?;
        let entries = array(entries)?
            .into_iter()
            .map(|e| string(e).and_then(|e| parse_entry(&e)))
            .collect::<Result<Vec<_>>>()?;
        let mut items = Vec::with_capacity(entries.len().min(limit));
        for (view, &(_, id)) in array(views)?.into_iter().zip(&entries) {
            let [snapshot, unread, newest] = tuple::<3>(view)?;
            items.push(ConversationView {
                conversation: decode_conversation(id, snapshot)?,
                unread: uint(unread)?,
                last_message: messages_with_reactions(newest)?.pop(),
            });
        }
        // The script reads the list and the conversations atomically, so each entry's key is
        // the conversation's current last_activity.
        let next = if entries.len() > limit {
            entries.get(limit - 1).map(|&(activity, _)| activity)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn set_marker(
        &self,
        conversation: ConversationId,
        user: &UserId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<MarkerUpdate> {
        let kind = match kind {
            ReceiptKind::Read => "read",
            ReceiptKind::Delivered => "delivered",
        };
        let v = self
            .script(
                "set marker",
                &scripts::SET_MARKER,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                    &self.keys.changes(conversation),
                ],
                &[
                    &fresh_epoch(),
                    &conversation.to_string(),
                    user.as_str(),
                    kind,
                    &seq.to_string(),
                ],
            )
            .await?;
        let [seq, moved, at] = tuple::<3>(v)?;
        Ok(MarkerUpdate {
            seq: uint(seq)?,
            moved: uint(moved)? == 1,
            position: position(at)?,
        })
    }

    async fn unread(&self, conversation: ConversationId, user: &UserId) -> Result<u64> {
        let v = self
            .script(
                "unread",
                &scripts::UNREAD,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                ],
                &[&conversation.to_string(), user.as_str()],
            )
            .await?;
        uint(v)
    }
}
