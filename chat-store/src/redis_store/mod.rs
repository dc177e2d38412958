//! [`RedisStore`]: a [`MessageStore`] on Redis. The key layout and the guarantees are in the
//! crate docs.

mod codec;
mod scripts;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::id::{ConversationId, MessageId, UserId};
use chat_core::model::{
    Conversation, ConversationKind, ConversationView, Member, Message, MessageChange,
    NewConversation, NewMessage, Page, ReceiptKind, direct_key,
};
use chat_core::store::{Appended, MarkerUpdate, MessageStore};
use chat_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};

use self::codec::{
    array, decode_conversation, decode_member, decode_message, encode, encode_new,
    idempotency_field, messages_with_scores, older_than, parse_entry, parse_u64, string, tuple,
    uint,
};

/// The `backend` of every [`Error::Unavailable`] this store returns.
const BACKEND: &str = "redis";

/// How often [`MessageStore::change_message`] re-reads a message that changed between its read
/// and its compare-and-set before giving up with [`Error::Conflict`].
const CAS_ATTEMPTS: usize = 16;

/// Timeouts of a [`RedisStore`]. Every store operation either completes or fails with
/// [`Error::Unavailable`] within [`operation_timeout`](Self::operation_timeout), also while
/// Redis is down or unreachable.
///
/// ```
/// use std::time::Duration;
/// use chat_store::RedisStoreOptions;
///
/// let options = RedisStoreOptions::default().with_operation_timeout(Duration::from_secs(2));
/// assert_eq!(options.operation_timeout, Duration::from_secs(2));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreOptions {
    /// Bound on one whole store operation, waiting for a reconnection included (default 5 s).
    pub operation_timeout: Duration,
    /// Bound on one connection attempt: TCP connect and handshake (default 1 s).
    pub connect_timeout: Duration,
    /// Bound on the wait for one reply once the request is sent (default 3 s).
    pub response_timeout: Duration,
    /// Connection attempts per reconnection, with exponential backoff from 50 ms to 1 s
    /// (default 3). A new reconnection starts with the next operation after a failed one.
    pub reconnect_attempts: usize,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        Self {
            operation_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(3),
            reconnect_attempts: 3,
        }
    }
}

impl RedisStoreOptions {
    /// Sets [`operation_timeout`](Self::operation_timeout).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`response_timeout`](Self::response_timeout).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets [`reconnect_attempts`](Self::reconnect_attempts).
    pub fn with_reconnect_attempts(mut self, attempts: usize) -> Self {
        self.reconnect_attempts = attempts;
        self
    }
}

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
/// The connection is a [`ConnectionManager`]: one multiplexed connection (concurrent requests
/// are pipelined on it) that reconnects by itself after an error. While Redis is unreachable,
/// operations fail with [`Error::Unavailable`] within
/// [`RedisStoreOptions::operation_timeout`]; once it is back, they succeed again. Cloning a
/// `RedisStore` is cheap and shares the connection.
///
/// ```no_run
/// use std::sync::Arc;
/// use chat_core::Chat;
/// use chat_store::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::Error> {
/// let store = RedisStore::new("redis://127.0.0.1:6379/", "chat").await?;
/// let chat = Chat::builder().store(Arc::new(store)).build().await?;
/// # let _ = chat;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    /// Reconnecting multiplexed connection; cloned (an `Arc` clone) for each operation.
    conn: ConnectionManager,
    /// Every key name, under the store's prefix.
    keys: Keys,
    /// Bound on each whole operation.
    operation_timeout: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .field("operation_timeout", &self.operation_timeout)
            .finish_non_exhaustive()
    }
}

/// Maps a Redis error: `CHAT_*` error replies of the scripts to the matching [`Error`], any
/// other failure (connection, timeout, server error) to [`Error::Unavailable`].
fn map_error(e: RedisError) -> Error {
    let detail = || e.detail().unwrap_or_default().to_owned();
    match e.code() {
        Some("CHAT_NOT_FOUND") => Error::not_found(detail()),
        Some("CHAT_NOT_MEMBER") => match detail().trim().parse::<ConversationId>() {
            Ok(id) => Error::NotMember(id),
            Err(_) => Error::internal(format!("bad NOT_MEMBER reply: {e}")),
        },
        Some("CHAT_FORBIDDEN") => Error::forbidden(detail()),
        Some("CHAT_INVALID") => Error::invalid(detail()),
        Some("CHAT_CONFLICT") => Error::Conflict(detail().into()),
        Some("CHAT_INTERNAL") => Error::internal(detail()),
        _ => Error::unavailable(BACKEND, e),
    }
}

/// A `LIMIT` count for Redis (a signed 64-bit integer), saturating.
fn redis_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host[:port][/db]`) with the default
    /// [`RedisStoreOptions`]; every key starts with `prefix` and `:`.
    ///
    /// [`Error::Invalid`] for a malformed URL or an empty prefix, [`Error::Unavailable`] when
    /// Redis cannot be reached within the operation timeout.
    pub async fn new(url: &str, prefix: &str) -> Result<Self> {
        Self::with_options(url, prefix, RedisStoreOptions::default()).await
    }

    /// Like [`new`](Self::new), with explicit timeouts.
    pub async fn with_options(url: &str, prefix: &str, options: RedisStoreOptions) -> Result<Self> {
        if prefix.is_empty() {
            return Err(Error::invalid("the redis key prefix must not be empty"));
        }
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid(format!("invalid redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(options.reconnect_attempts)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = match tokio::time::timeout(
            options.operation_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(Error::unavailable(BACKEND, e)),
            Err(_) => return Err(timed_out(options.operation_timeout)),
        };
        Ok(Self {
            conn,
            keys: Keys {
                prefix: Arc::from(prefix),
            },
            operation_timeout: options.operation_timeout,
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// Runs one read against Redis within the operation timeout (not retried: a read that
    /// fails on a connection dropped by a Redis restart returns `Unavailable`, and the next
    /// one runs on the reconnected connection).
    async fn exec<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.operation_timeout, op(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(timed_out(self.operation_timeout)),
        }
    }

    /// Runs a script with `keys` and `args` (the prefix is prepended to `args` as `ARGV[1]`),
    /// within the operation timeout.
    ///
    /// The first call after Redis restarted fails on the dead connection (the connection
    /// manager only reconnects then), so a connection-level failure is retried once on the
    /// fresh connection. Every script is safe to repeat: appends are idempotent, markers only
    /// move forward, member changes are set operations, and a repeated create of the same id
    /// reports `Conflict` rather than creating twice.
    async fn script(&self, script: &redis::Script, keys: &[&str], args: &[&str]) -> Result<Value> {
        let run = |mut conn: ConnectionManager| {
            let mut invocation = script.prepare_invoke();
            for k in keys {
                invocation.key(*k);
            }
            invocation.arg(&*self.keys.prefix);
            for a in args {
                invocation.arg(*a);
            }
            async move { invocation.invoke_async(&mut conn).await }
        };
        let attempts = async {
            match run(self.conn.clone()).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    run(self.conn.clone()).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.operation_timeout, attempts).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(timed_out(self.operation_timeout)),
        }
    }

    /// The stored JSON and seq of a message; `NotFound` for an unknown conversation.
    async fn raw_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<(u64, String)>> {
        let v = self
            .script(
                &scripts::GET_MESSAGE,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.ids(conversation),
                    &self.keys.msgs(conversation),
                ],
                &[&conversation.to_string(), &id.to_string()],
            )
            .await?;
        if v == Value::Nil {
            return Ok(None);
        }
        let [seq, json] = tuple::<2>(v)?;
        Ok(Some((uint(seq)?, string(json)?)))
    }

    /// `EXISTS conv` and a range of the timeline in one round trip.
    async fn timeline_range(
        &self,
        conversation: ConversationId,
        command: &str,
        from: String,
        to: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let (conv, msgs) = (self.keys.conv(conversation), self.keys.msgs(conversation));
        let (exists, page): (bool, Value) = self
            .exec(|mut conn| async move {
                redis::pipe()
                    .exists(&conv)
                    .cmd(command)
                    .arg(&msgs)
                    .arg(from)
                    .arg(to)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(redis_count(limit))
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if !exists {
            return Err(unknown(conversation));
        }
        messages_with_scores(page)
    }
}

fn timed_out(after: Duration) -> Error {
    Error::unavailable(
        BACKEND,
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from redis within {after:?}"),
        ),
    )
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
                &scripts::APPEND,
                &[
                    &self.keys.conv(id),
                    &self.keys.members(id),
                    &self.keys.msgs(id),
                    &self.keys.ids(id),
                    &self.keys.idem(id),
                    &self.keys.sent(id, &message.sender_id),
                ],
                &[
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
        if uint(flag)? == 0 {
            return Ok(Appended {
                message: message.into_message(seq),
                duplicate: false,
            });
        }
        let original = items
            .next()
            .ok_or_else(|| codec::corrupt("append reply without the original"))?;
        Ok(Appended {
            message: decode_message(&string(original)?, seq)?,
            duplicate: true,
        })
    }

    async fn message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<Message>> {
        self.raw_message(conversation, id)
            .await?
            .map(|(seq, json)| decode_message(&json, seq))
            .transpose()
    }

    async fn change_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        by: &UserId,
        change: MessageChange,
        now: u64,
    ) -> Result<Message> {
        // Compare-and-set: read, apply `MessageChange::apply` (the one definition of an edit),
        // then write only if the stored JSON is still what was read. The sender check needs no
        // re-check: a message's sender never changes.
        for _ in 0..CAS_ATTEMPTS {
            let (seq, old) = self.raw_message(conversation, id).await?.ok_or_else(|| {
                Error::not_found(format!("message {id} in conversation {conversation}"))
            })?;
            let current = decode_message(&old, seq)?;
            if &current.sender_id != by {
                return Err(Error::forbidden(
                    "only the sender may edit or delete a message",
                ));
            }
            let mut changed = current;
            change.apply(&mut changed, now)?;
            let new = encode(&changed)?;
            let replaced = self
                .script(
                    &scripts::REPLACE_MESSAGE,
                    &[
                        &self.keys.msgs(conversation),
                        &self.keys.deleted(conversation),
                        &self.keys.sent(conversation, by),
                    ],
                    &[
                        &seq.to_string(),
                        &old,
                        &new,
                        if changed.deleted { "1" } else { "0" },
                    ],
                )
                .await?;
            if uint(replaced)? == 1 {
                return Ok(changed);
            }
        }
        Err(Error::Conflict(
            format!("message {id} kept changing concurrently; try again").into(),
        ))
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
        let conv = self.keys.conv(conversation);
        let last: Option<String> = self
            .exec(|mut conn| async move {
                redis::cmd("HGET")
                    .arg(&conv)
                    .arg("last_seq")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
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
        let (cid, created_at) = (new.id.to_string(), new.created_at.to_string());
        let mut args: Vec<&str> = vec![
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
                &scripts::CREATE,
                &[
                    &self.keys.conv(new.id),
                    &self.keys.members(new.id),
                    &pair_key,
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
        let (conv, members) = (
            self.keys.conv(conversation),
            self.keys.members(conversation),
        );
        let (entry, exists): (Option<String>, bool) = self
            .exec(|mut conn| async move {
                redis::pipe()
                    .hget(&members, user.as_str())
                    .exists(&conv)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
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
    ) -> Result<Vec<UserId>> {
        let (cid, now) = (conversation.to_string(), now.to_string());
        let mut args: Vec<&str> = vec![&cid, &now];
        args.extend(users.iter().map(UserId::as_str));
        let v = self
            .script(
                &scripts::ADD_MEMBERS,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                ],
                &args,
            )
            .await?;
        array(v)?
            .into_iter()
            .map(|u| string(u).map(UserId::from))
            .collect()
    }

    async fn remove_member(&self, conversation: ConversationId, user: &UserId) -> Result<bool> {
        let v = self
            .script(
                &scripts::REMOVE_MEMBER,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                ],
                &[&conversation.to_string(), user.as_str()],
            )
            .await?;
        Ok(uint(v)? == 1)
    }

    async fn conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>> {
        let key = self.keys.user(user);
        let entries: Vec<String> = self
            .exec(|mut conn| async move {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
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
                last_message: messages_with_scores(newest)?.pop(),
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
                &scripts::SET_MARKER,
                &[
                    &self.keys.conv(conversation),
                    &self.keys.members(conversation),
                ],
                &[
                    &conversation.to_string(),
                    user.as_str(),
                    kind,
                    &seq.to_string(),
                ],
            )
            .await?;
        let [seq, moved] = tuple::<2>(v)?;
        Ok(MarkerUpdate {
            seq: uint(seq)?,
            moved: uint(moved)? == 1,
        })
    }

    async fn unread(&self, conversation: ConversationId, user: &UserId) -> Result<u64> {
        let v = self
            .script(
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
