//! [`ScyllaStore`]: a [`MessageStore`] on ScyllaDB or Apache Cassandra (CQL). The schema, the
//! append protocol and the guarantees are in the crate docs.

mod options;
mod schema;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chat_core::id::{ConversationId, MessageId, UserId};
use chat_core::model::{
    Change, ChangePage, Conversation, ConversationKind, ConversationView, Media, Member, Message,
    MessageChange, NewConversation, NewMessage, Page, Reaction, ReceiptKind, Role, StreamPosition,
    apply_reaction, direct_key,
};
use chat_core::store::{Appended, MarkerUpdate, MembershipUpdate, MessageStore, MessageUpdate};
use chat_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use scylla::DeserializeRow;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{ExecutionError, PagerExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

pub use self::options::{
    Consistency, DEFAULT_BUCKET_SIZE, Replication, ScyllaStoreOptions, SerialConsistency, Tablets,
};
pub use self::schema::SCHEMA_VERSION;

/// The `backend` of every [`Error::Unavailable`] this store returns.
const BACKEND: &str = "scylla";

/// Compare-and-set attempts of `change_message` before [`Error::Conflict`].
const CAS_ATTEMPTS: usize = 16;

/// In-process append locks: appends to one conversation from one store are serialized, so the
/// conditional inserts of one node never compete with each other (only with other nodes').
/// A fixed number of shards bounds the memory whatever the number of conversations.
const LOCK_SHARDS: usize = 1024;

/// Rows per page when reading timelines and lists.
const PAGE_SIZE: i32 = 1000;

/// Concurrent requests of one `list_conversations` call.
const LIST_CONCURRENCY: usize = 16;

/// Positions per `changes` partition, as a multiple of the messages' bucket size (so it is
/// fixed per keyspace by the stored bucket size): 8 × 512 = 4,096 positions by default. A
/// change row is ~50 bytes (a position and a short item name), so a partition stays under
/// ~0.5 MiB, while a replay of a typical offline gap (a few hundred changes) reads one or two
/// partitions. A conversation takes several positions per message (the message, receipts,
/// reactions), so change partitions fill a few times faster than message partitions; 8×
/// keeps their number per conversation of the same order.
const CHANGE_BUCKET_FACTOR: u64 = 8;

/// Keys per `IN (…)` of a replay's batched reads.
const IN_CHUNK: usize = 100;

/// The change-stream item of the message at `seq`.
fn message_item(seq: u64) -> String {
    format!("m:{seq}")
}

/// The change-stream item of a member's markers.
fn markers_item(user: &UserId) -> String {
    format!("k:{user}")
}

/// The change-stream item of a user's membership.
fn membership_item(user: &UserId) -> String {
    format!("j:{user}")
}

/// What a change-stream item names.
enum Item {
    Message(u64),
    Markers(UserId),
    Membership(UserId),
}

impl Item {
    fn parse(s: &str) -> Option<Self> {
        if let Some(seq) = s.strip_prefix("m:") {
            return seq.parse().ok().map(Self::Message);
        }
        if let Some(user) = s.strip_prefix("k:") {
            return Some(Self::Markers(UserId::from(user)));
        }
        s.strip_prefix("j:")
            .map(|user| Self::Membership(UserId::from(user)))
    }
}

fn reactions_json(reactions: &[Reaction]) -> Result<Option<String>> {
    if reactions.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(reactions).map(Some).map_err(internal)
}

fn reactions_parse(s: Option<&str>) -> Result<Vec<Reaction>> {
    match s {
        None | Some("") => Ok(Vec::new()),
        Some(s) => serde_json::from_str(s).map_err(internal),
    }
}

fn internal(e: impl fmt::Display) -> Error {
    Error::internal(format!("{BACKEND}: {e}"))
}

/// Maps a driver error: the cluster unreachable, overloaded or timing out is
/// [`Error::Unavailable`] (transient); a rejected statement is [`Error::Internal`] (a bug).
fn db_err(e: ExecutionError) -> Error {
    use scylla::errors::DbError;
    match &e {
        ExecutionError::BadQuery(_) => internal(e),
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::SyntaxError
            | DbError::Invalid
            | DbError::AlreadyExists { .. }
            | DbError::FunctionFailure { .. }
            | DbError::ConfigError
            | DbError::ProtocolError,
            _,
        )) => internal(e),
        _ => Error::unavailable(BACKEND, e),
    }
}

fn pager_err(e: PagerExecutionError) -> Error {
    match e {
        PagerExecutionError::NextPageError(_) | PagerExecutionError::PrepareError(_) => {
            Error::unavailable(BACKEND, e)
        }
        other => internal(other),
    }
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{v} is out of range for the store")))
}

fn u64_of(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| internal(format!("negative value {v} in the store")))
}

/// `"text"` for [`MessageKind::Text`] etc.: the serde names of the enums.
fn enum_name<T: serde::Serialize>(v: &T) -> Result<String> {
    match serde_json::to_value(v).map_err(internal)? {
        serde_json::Value::String(s) => Ok(s),
        other => Err(internal(format!("unexpected enum encoding {other}"))),
    }
}

fn enum_parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(internal)
}

fn media_json(m: &Option<Media>) -> Result<Option<String>> {
    m.as_ref()
        .map(|m| serde_json::to_string(m).map_err(internal))
        .transpose()
}

fn media_parse(s: Option<&str>) -> Result<Option<Media>> {
    s.map(|s| serde_json::from_str(s).map_err(internal))
        .transpose()
}

/// A row of `messages`.
#[derive(DeserializeRow)]
struct MessageRow {
    seq: i64,
    message_id: i64,
    sender_id: String,
    client_msg_id: String,
    kind: String,
    content: Option<String>,
    media: Option<String>,
    reply_to: Option<i64>,
    created_at: i64,
    edited_at: Option<i64>,
    deleted: Option<bool>,
    version: i64,
    reactions: Option<String>,
    rev: Option<i64>,
    claimed_rev: Option<i64>,
}

/// What a CAS on a message row compares with, and whether its latest change has a position.
struct MessageMeta {
    /// `rev` as stored (`None`: never changed since it was stored).
    rev: Option<i64>,
    /// Whether a change of the message is stored but no position was claimed after it (its
    /// writer crashed, or is between the two steps).
    unclaimed: bool,
}

impl MessageRow {
    fn into_message(self, conversation: ConversationId) -> Result<Message> {
        Ok(Message {
            message_id: MessageId::from_raw(u64_of(self.message_id)?),
            conversation_id: conversation,
            seq: u64_of(self.seq)?,
            sender_id: UserId::from(self.sender_id),
            kind: enum_parse(&self.kind)?,
            content: self.content.unwrap_or_default(),
            media: media_parse(self.media.as_deref())?,
            reply_to: self
                .reply_to
                .map(|r| u64_of(r).map(MessageId::from_raw))
                .transpose()?,
            client_msg_id: self.client_msg_id,
            created_at: u64_of(self.created_at)?,
            edited_at: self.edited_at.map(u64_of).transpose()?,
            deleted: self.deleted.unwrap_or(false),
            version: u32::try_from(self.version).map_err(internal)?,
            reactions: reactions_parse(self.reactions.as_deref())?,
        })
    }
}

const MESSAGE_COLUMNS: &str = "seq, message_id, sender_id, client_msg_id, kind, content, media, \
                               reply_to, created_at, edited_at, deleted, version, reactions, \
                               rev, claimed_rev";

/// The columns of a lightweight transaction's result, by name (`[applied]` and, when not
/// applied, the current values; ScyllaDB and Cassandra differ in which columns they return).
struct Lwt {
    applied: bool,
    columns: HashMap<String, CqlValue>,
}

impl Lwt {
    fn parse(result: QueryResult) -> Result<Self> {
        let rows = result.into_rows_result().map_err(internal)?;
        let names: Vec<String> = rows
            .column_specs()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        let row = rows
            .maybe_first_row::<Row>()
            .map_err(internal)?
            .ok_or_else(|| internal("conditional statement returned no row"))?;
        let mut columns = HashMap::new();
        for (name, value) in names.into_iter().zip(row.columns) {
            if let Some(v) = value {
                columns.insert(name, v);
            }
        }
        let applied = matches!(columns.get("[applied]"), Some(CqlValue::Boolean(true)));
        Ok(Self { applied, columns })
    }

    fn i64(&self, name: &str) -> Option<i64> {
        match self.columns.get(name) {
            Some(CqlValue::BigInt(v)) => Some(*v),
            _ => None,
        }
    }

    fn text(&self, name: &str) -> Option<&str> {
        match self.columns.get(name) {
            Some(CqlValue::Text(s) | CqlValue::Ascii(s)) => Some(s),
            _ => None,
        }
    }
}

/// Every prepared statement of the store.
struct Statements {
    conv_get: PreparedStatement,
    conv_insert: PreparedStatement,
    conv_state: PreparedStatement,
    members_get: PreparedStatement,
    member_get: PreparedStatement,
    member_insert: PreparedStatement,
    member_insert_lwt: PreparedStatement,
    member_delete_lwt: PreparedStatement,
    markers_get: PreparedStatement,
    marker_get: PreparedStatement,
    marker_set: PreparedStatement,
    marker_set_delivered: PreparedStatement,
    user_conv_insert: PreparedStatement,
    user_conv_delete: PreparedStatement,
    user_convs: PreparedStatement,
    direct_claim: PreparedStatement,
    msg_insert: PreparedStatement,
    msg_get: PreparedStatement,
    msg_max: PreparedStatement,
    msg_desc: PreparedStatement,
    msg_asc: PreparedStatement,
    msg_update: PreparedStatement,
    id_insert: PreparedStatement,
    id_get: PreparedStatement,
    idem_claim: PreparedStatement,
    idem_move: PreparedStatement,
    idem_get: PreparedStatement,
    sent_insert: PreparedStatement,
    sent_delete: PreparedStatement,
    sent_count: PreparedStatement,
    deleted_insert: PreparedStatement,
    deleted_count: PreparedStatement,
    conv_epoch_lwt: PreparedStatement,
    conv_head: PreparedStatement,
    msg_claimed: PreparedStatement,
    marker_claimed: PreparedStatement,
    msg_tombstone: PreparedStatement,
    msg_react: PreparedStatement,
    msg_in: PreparedStatement,
    change_claim: PreparedStatement,
    change_max: PreparedStatement,
    change_range: PreparedStatement,
    latest_set: PreparedStatement,
    latest_get: PreparedStatement,
    latest_in: PreparedStatement,
    members_in: PreparedStatement,
    markers_in: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Self> {
        let p = async |cql: String| -> Result<PreparedStatement> {
            let mut st = session
                .prepare(cql)
                .await
                .map_err(|e| db_err(ExecutionError::PrepareError(e)))?;
            st.set_page_size(PAGE_SIZE);
            Ok(st)
        };
        let idempotent = async |cql: String| -> Result<PreparedStatement> {
            let mut st = p(cql).await?;
            st.set_is_idempotent(true);
            Ok(st)
        };
        Ok(Self {
            conv_get: idempotent(format!(
                "SELECT kind, name, created_at, pair_a, pair_b, last_seq, last_activity, epoch, \
                 head FROM {ks}.conversations WHERE id = ?"
            ))
            .await?,
            conv_insert: idempotent(format!(
                "INSERT INTO {ks}.conversations (id, kind, name, created_at, pair_a, pair_b) \
                 VALUES (?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            conv_state: idempotent(format!(
                "UPDATE {ks}.conversations USING TIMESTAMP ? SET last_seq = ?, last_activity = ? \
                 WHERE id = ?"
            ))
            .await?,
            members_get: idempotent(format!(
                "SELECT user_id, role, joined_at FROM {ks}.members WHERE conversation_id = ?"
            ))
            .await?,
            member_get: idempotent(format!(
                "SELECT role, joined_at FROM {ks}.members WHERE conversation_id = ? AND user_id = ?"
            ))
            .await?,
            member_insert: idempotent(format!(
                "INSERT INTO {ks}.members (conversation_id, user_id, role, joined_at) \
                 VALUES (?, ?, ?, ?)"
            ))
            .await?,
            member_insert_lwt: p(format!(
                "INSERT INTO {ks}.members (conversation_id, user_id, role, joined_at) \
                 VALUES (?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            member_delete_lwt: p(format!(
                "DELETE FROM {ks}.members WHERE conversation_id = ? AND user_id = ? IF EXISTS"
            ))
            .await?,
            markers_get: idempotent(format!(
                "SELECT user_id, read_seq, delivered_seq FROM {ks}.markers \
                 WHERE conversation_id = ?"
            ))
            .await?,
            marker_get: idempotent(format!(
                "SELECT read_seq, delivered_seq, claimed_sum FROM {ks}.markers \
                 WHERE conversation_id = ? AND user_id = ?"
            ))
            .await?,
            marker_set: idempotent(format!(
                "UPDATE {ks}.markers USING TIMESTAMP ? SET read_seq = ?, delivered_seq = ? \
                 WHERE conversation_id = ? AND user_id = ?"
            ))
            .await?,
            marker_set_delivered: idempotent(format!(
                "UPDATE {ks}.markers USING TIMESTAMP ? SET delivered_seq = ? \
                 WHERE conversation_id = ? AND user_id = ?"
            ))
            .await?,
            user_conv_insert: idempotent(format!(
                "INSERT INTO {ks}.user_conversations (user_id, conversation_id) VALUES (?, ?)"
            ))
            .await?,
            user_conv_delete: idempotent(format!(
                "DELETE FROM {ks}.user_conversations WHERE user_id = ? AND conversation_id = ?"
            ))
            .await?,
            user_convs: idempotent(format!(
                "SELECT conversation_id FROM {ks}.user_conversations WHERE user_id = ?"
            ))
            .await?,
            direct_claim: p(format!(
                "INSERT INTO {ks}.direct_pairs (pair_key, conversation_id, created_at) \
                 VALUES (?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            msg_insert: p(format!(
                "INSERT INTO {ks}.messages (conversation_id, bucket, seq, message_id, sender_id, \
                 client_msg_id, kind, content, media, reply_to, created_at, deleted, version) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, false, 1) IF NOT EXISTS"
            ))
            .await?,
            msg_get: idempotent(format!(
                "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                 WHERE conversation_id = ? AND bucket = ? AND seq = ?"
            ))
            .await?,
            msg_max: idempotent(format!(
                "SELECT seq FROM {ks}.messages WHERE conversation_id = ? AND bucket = ? LIMIT 1"
            ))
            .await?,
            msg_desc: idempotent(format!(
                "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                 WHERE conversation_id = ? AND bucket = ? AND seq <= ? \
                 ORDER BY seq DESC LIMIT ?"
            ))
            .await?,
            msg_asc: idempotent(format!(
                "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                 WHERE conversation_id = ? AND bucket = ? AND seq >= ? \
                 ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            msg_update: p(format!(
                "UPDATE {ks}.messages SET content = ?, media = ?, edited_at = ?, deleted = ?, \
                 version = ?, rev = ? WHERE conversation_id = ? AND bucket = ? AND seq = ? \
                 IF version = ? AND rev = ?"
            ))
            .await?,
            id_insert: idempotent(format!(
                "INSERT INTO {ks}.message_ids (conversation_id, message_id, seq) VALUES (?, ?, ?)"
            ))
            .await?,
            id_get: idempotent(format!(
                "SELECT seq FROM {ks}.message_ids WHERE conversation_id = ? AND message_id = ?"
            ))
            .await?,
            idem_claim: p(format!(
                "INSERT INTO {ks}.idempotency (conversation_id, sender_id, client_msg_id, seq, \
                 message_id, kind, content, media, reply_to, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            idem_move: p(format!(
                "UPDATE {ks}.idempotency SET seq = ? \
                 WHERE conversation_id = ? AND sender_id = ? AND client_msg_id = ? IF seq = ?"
            ))
            .await?,
            idem_get: idempotent(format!(
                "SELECT seq, message_id, kind, content, media, reply_to, created_at \
                 FROM {ks}.idempotency \
                 WHERE conversation_id = ? AND sender_id = ? AND client_msg_id = ?"
            ))
            .await?,
            sent_insert: idempotent(format!(
                "INSERT INTO {ks}.sent (conversation_id, sender_id, seq) VALUES (?, ?, ?)"
            ))
            .await?,
            sent_delete: idempotent(format!(
                "DELETE FROM {ks}.sent WHERE conversation_id = ? AND sender_id = ? AND seq = ?"
            ))
            .await?,
            sent_count: idempotent(format!(
                "SELECT COUNT(*) FROM {ks}.sent \
                 WHERE conversation_id = ? AND sender_id = ? AND seq > ?"
            ))
            .await?,
            deleted_insert: idempotent(format!(
                "INSERT INTO {ks}.deleted (conversation_id, seq, sender_id) VALUES (?, ?, ?)"
            ))
            .await?,
            deleted_count: idempotent(format!(
                "SELECT COUNT(*) FROM {ks}.deleted WHERE conversation_id = ? AND seq > ?"
            ))
            .await?,
            conv_epoch_lwt: p(format!(
                "UPDATE {ks}.conversations SET epoch = ? WHERE id = ? IF epoch = null"
            ))
            .await?,
            conv_head: idempotent(format!(
                "UPDATE {ks}.conversations USING TIMESTAMP ? SET head = ? WHERE id = ?"
            ))
            .await?,
            msg_claimed: idempotent(format!(
                "UPDATE {ks}.messages USING TIMESTAMP ? SET claimed_rev = ? \
                 WHERE conversation_id = ? AND bucket = ? AND seq = ?"
            ))
            .await?,
            marker_claimed: idempotent(format!(
                "UPDATE {ks}.markers USING TIMESTAMP ? SET claimed_sum = ? \
                 WHERE conversation_id = ? AND user_id = ?"
            ))
            .await?,
            msg_tombstone: p(format!(
                "UPDATE {ks}.messages SET content = ?, media = ?, edited_at = ?, deleted = ?, \
                 version = ?, rev = ?, reactions = null \
                 WHERE conversation_id = ? AND bucket = ? AND seq = ? IF version = ? AND rev = ?"
            ))
            .await?,
            msg_react: p(format!(
                "UPDATE {ks}.messages SET reactions = ?, rev = ? \
                 WHERE conversation_id = ? AND bucket = ? AND seq = ? \
                 IF version = ? AND rev = ?"
            ))
            .await?,
            msg_in: idempotent(format!(
                "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                 WHERE conversation_id = ? AND bucket = ? AND seq IN ?"
            ))
            .await?,
            change_claim: p(format!(
                "INSERT INTO {ks}.changes (conversation_id, bucket, position, item) \
                 VALUES (?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            change_max: idempotent(format!(
                "SELECT position FROM {ks}.changes WHERE conversation_id = ? AND bucket = ? \
                 ORDER BY position DESC LIMIT 1"
            ))
            .await?,
            change_range: idempotent(format!(
                "SELECT position, item FROM {ks}.changes \
                 WHERE conversation_id = ? AND bucket = ? AND position > ? AND position <= ?"
            ))
            .await?,
            latest_set: idempotent(format!(
                "UPDATE {ks}.change_latest USING TIMESTAMP ? SET position = ? \
                 WHERE conversation_id = ? AND item = ?"
            ))
            .await?,
            latest_get: idempotent(format!(
                "SELECT position FROM {ks}.change_latest WHERE conversation_id = ? AND item = ?"
            ))
            .await?,
            latest_in: idempotent(format!(
                "SELECT item, position FROM {ks}.change_latest \
                 WHERE conversation_id = ? AND item IN ?"
            ))
            .await?,
            members_in: idempotent(format!(
                "SELECT user_id FROM {ks}.members WHERE conversation_id = ? AND user_id IN ?"
            ))
            .await?,
            markers_in: idempotent(format!(
                "SELECT user_id, read_seq, delivered_seq FROM {ks}.markers \
                 WHERE conversation_id = ? AND user_id IN ?"
            ))
            .await?,
        })
    }
}

/// The conversation row.
struct ConvRow {
    kind: ConversationKind,
    name: Option<String>,
    created_at: u64,
    pair: Option<(UserId, UserId)>,
    last_seq: u64,
    last_activity: u64,
    /// The stream's epoch; `None` for a conversation created before the change stream.
    epoch: Option<u64>,
    /// The head hint: a position that exists (0 when none does), never above the head.
    head: u64,
}

/// What an idempotency claim says: the message it stands for and where it is being written.
struct Claim {
    seq: u64,
    message: NewMessage,
}

/// A [`MessageStore`] on ScyllaDB or Apache Cassandra, shared by every node of a cluster of
/// chat servers. See the crate docs for the schema, the append protocol, the change stream and
/// what was verified where.
///
/// It keeps a change stream ([`MessageStore::stream`] is `Some`): every change is applied
/// first, then takes the conversation's next position by a conditional insert at head + 1
/// (gap-free across nodes), and reactions live on the message row, changed by CAS.
///
/// Cost in lightweight transactions (Paxos rounds), uncontended, as measured by
/// [`ScyllaStore::lwt_count`]: a new message 3, a retried one 1, a receipt that moves a marker
/// 1, a reaction 2, an edit or delete 2, a join or a leave 2, a creation 1 (+1 for the direct
/// pair); changes that change nothing 0.
///
/// Crash windows that remain (an effect stored whose writer crashed before its position): a
/// join or leave has no position until that user's membership changes again; any other change
/// gets it from the retry of the same call (a duplicate append, the same reaction or receipt
/// again, a second delete) or from the item's next change. Details in the crate docs.
///
/// Cloning is cheap (one shared session).
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    st: Statements,
    options: ScyllaStoreOptions,
    /// Seqs per `messages` partition, as stored in the keyspace.
    bucket_size: u64,
    /// See [`LOCK_SHARDS`].
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Position claims, serialized per conversation shard in-process (one node's claims never
    /// compete with each other), each with the last position this node knows to exist in the
    /// shard's most recent conversation (so an uncontended claim needs no read).
    claims: Vec<tokio::sync::Mutex<Option<(ConversationId, u64)>>>,
    /// Positions per `changes` partition ([`CHANGE_BUCKET_FACTOR`] × `bucket_size`).
    change_bucket: u64,
    /// Conditional statements (LWTs) sent so far; see [`ScyllaStore::lwt_count`].
    lwts: AtomicU64,
}

impl fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("keyspace", &self.inner.options.keyspace)
            .field("bucket_size", &self.inner.bucket_size)
            .finish_non_exhaustive()
    }
}

impl ScyllaStore {
    /// Connects to the cluster through the given contact points (`host:port`, at least one),
    /// creates or migrates the schema (keyspace `chat`, see [`ScyllaStoreOptions::new`]) and
    /// prepares every statement. [`Error::Unavailable`] when no contact point answers.
    pub async fn connect(contact_points: &[String], keyspace: &str) -> Result<Self> {
        Self::connect_with(contact_points, ScyllaStoreOptions::new(keyspace)).await
    }

    /// [`ScyllaStore::connect`] with options.
    pub async fn connect_with(
        contact_points: &[String],
        options: ScyllaStoreOptions,
    ) -> Result<Self> {
        options.validate()?;
        if contact_points.is_empty() {
            return Err(Error::invalid("no contact points"));
        }
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &options.local_datacenter {
            policy = policy
                .prefer_datacenter(dc.clone())
                .permit_dc_failover(false);
        }
        let profile = ExecutionProfile::builder()
            .consistency(options.consistency.to_driver())
            .serial_consistency(Some(options.serial_consistency.to_driver()))
            .request_timeout(Some(options.request_timeout))
            .load_balancing_policy(policy.build())
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(contact_points)
            .connection_timeout(options.connect_timeout)
            .default_execution_profile_handle(profile.into_handle());
        if let Some((user, password)) = &options.credentials {
            builder = builder.user(user, password);
        }
        let connect = async {
            let session = builder.build().await.map_err(|e| {
                Error::unavailable(
                    BACKEND,
                    format!("cannot connect to {}: {e}", contact_points.join(",")),
                )
            })?;
            let bucket_size = schema::migrate(&session, &options).await?;
            let st = Statements::prepare(&session, &options.keyspace).await?;
            Ok::<_, Error>((session, st, bucket_size))
        };
        // Connecting and migrating may take many requests: bound them together.
        let bound = options.startup_timeout;
        let (session, st, bucket_size) =
            tokio::time::timeout(bound, connect).await.map_err(|_| {
                Error::unavailable(
                    BACKEND,
                    format!(
                        "no answer from {} within {bound:?}",
                        contact_points.join(",")
                    ),
                )
            })??;
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                st,
                options,
                bucket_size,
                locks: (0..LOCK_SHARDS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                claims: (0..LOCK_SHARDS)
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                change_bucket: bucket_size.saturating_mul(CHANGE_BUCKET_FACTOR),
                lwts: AtomicU64::new(0),
            }),
        })
    }

    /// Seqs per `messages` partition of this keyspace.
    pub fn bucket_size(&self) -> u64 {
        self.inner.bucket_size
    }

    /// How many lightweight transactions (conditional statements, each a Paxos round) this
    /// store has sent since it was opened: a measure of the cost of the operations (see the
    /// crate docs for the count per operation).
    pub fn lwt_count(&self) -> u64 {
        self.inner.lwts.load(Ordering::Relaxed)
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &ScyllaStoreOptions {
        &self.inner.options
    }

    /// Runs one store operation within [`ScyllaStoreOptions::operation_timeout`].
    async fn bounded<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        let limit = self.inner.options.operation_timeout;
        tokio::time::timeout(limit, op).await.unwrap_or_else(|_| {
            Err(Error::unavailable(
                BACKEND,
                format!("operation timed out after {limit:?}"),
            ))
        })
    }

    fn bucket_of(&self, seq: u64) -> u64 {
        seq.saturating_sub(1) / self.inner.bucket_size
    }

    fn bucket_end(&self, bucket: u64) -> u64 {
        (bucket + 1).saturating_mul(self.inner.bucket_size)
    }

    async fn exec(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<QueryResult> {
        // Only the conditional statements have " IF " (DDL never goes through here).
        if st.get_statement().contains(" IF ") {
            self.inner.lwts.fetch_add(1, Ordering::Relaxed);
        }
        self.inner
            .session
            .execute_unpaged(st, values)
            .await
            .map_err(db_err)
    }

    /// Every row of a (paged) query.
    async fn rows<R>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        let pager = self
            .inner
            .session
            .execute_iter(st.clone(), values)
            .await
            .map_err(pager_err)?;
        let stream = pager.rows_stream::<R>().map_err(internal)?;
        stream.try_collect().await.map_err(|e| {
            use scylla::errors::NextRowError;
            match e {
                NextRowError::NextPageError(p) => Error::unavailable(BACKEND, p),
                other => internal(other),
            }
        })
    }

    async fn first<R>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Option<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let result = self.exec(st, values).await?;
        let rows = result.into_rows_result().map_err(internal)?;
        rows.maybe_first_row::<R>().map_err(internal)
    }

    async fn count(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<u64> {
        let n: Option<(i64,)> = self.first(st, values).await?;
        u64_of(n.map_or(0, |(n,)| n))
    }

    // ------------------------------------------------------------------ conversations

    async fn conv_row(&self, id: ConversationId) -> Result<Option<ConvRow>> {
        type R = (
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        let row: Option<R> = self
            .first(&self.inner.st.conv_get, (i64_of(id.get())?,))
            .await?;
        let Some((
            Some(kind),
            name,
            created_at,
            pair_a,
            pair_b,
            last_seq,
            last_activity,
            epoch,
            head,
        )) = row
        else {
            // No row, or only the activity cells of a conversation whose creation did not finish.
            return Ok(None);
        };
        Ok(Some(ConvRow {
            kind: enum_parse(&kind)?,
            name,
            created_at: u64_of(created_at.unwrap_or(0))?,
            pair: pair_a.zip(pair_b).map(|(a, b)| (a.into(), b.into())),
            last_seq: u64_of(last_seq.unwrap_or(0))?,
            last_activity: match last_activity {
                Some(a) => u64_of(a)?,
                None => id.get(),
            },
            epoch: epoch.map(u64_of).transpose()?.filter(|e| *e != 0),
            head: u64_of(head.unwrap_or(0))?,
        }))
    }

    async fn existing(&self, id: ConversationId) -> Result<ConvRow> {
        self.conv_row(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("conversation {id}")))
    }

    async fn load_conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        let Some(row) = self.conv_row(id).await? else {
            return Ok(None);
        };
        let cid = i64_of(id.get())?;
        let (members, markers) = tokio::try_join!(
            self.rows::<(String, String, i64)>(&self.inner.st.members_get, (cid,)),
            self.rows::<(String, Option<i64>, Option<i64>)>(&self.inner.st.markers_get, (cid,)),
        )?;
        let markers: HashMap<String, (Option<i64>, Option<i64>)> =
            markers.into_iter().map(|(u, r, d)| (u, (r, d))).collect();
        let members = members
            .into_iter()
            .map(|(user, role, joined_at)| {
                let (r, d) = markers.get(&user).copied().unwrap_or((None, None));
                Ok(Member {
                    role: enum_parse(&role)?,
                    joined_at: u64_of(joined_at)?,
                    last_read_seq: u64_of(r.unwrap_or(0))?,
                    last_delivered_seq: u64_of(d.unwrap_or(0))?,
                    user_id: UserId::from(user),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Conversation {
            id,
            kind: row.kind,
            name: row.name,
            members,
            created_at: row.created_at,
            last_seq: row.last_seq,
            last_activity: row.last_activity,
        }))
    }

    /// Writes a new conversation: members, markers and list entries first, the conversation
    /// row last (a conversation exists once its `kind` is written, so a crash half-way leaves
    /// nothing visible but orphan member rows). Idempotent: the same `new` written twice (a
    /// helper finishing a crashed creation) gives the same rows.
    async fn write_conversation(
        &self,
        new: &NewConversation,
        users: &[UserId],
        creator_role: Role,
        pair: Option<(&UserId, &UserId)>,
    ) -> Result<()> {
        let st = &self.inner.st;
        let cid = i64_of(new.id.get())?;
        let created_at = i64_of(new.created_at)?;
        let member_role = enum_name(&Role::Member)?;
        let creator_role = enum_name(&creator_role)?;
        let owned: Vec<(String, UserId)> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let role = if i == 0 { &creator_role } else { &member_role };
                (role.clone(), u.clone())
            })
            .collect();
        futures::stream::iter(owned)
            .map(|(role, u): (String, UserId)| async move {
                tokio::try_join!(
                    self.exec(&st.member_insert, (cid, u.as_str(), &role, created_at)),
                    self.exec(&st.marker_set, (0i64, 0i64, 0i64, cid, u.as_str())),
                    self.exec(&st.user_conv_insert, (u.as_str(), cid)),
                )
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        self.exec(&st.conv_state, (0i64, 0i64, cid, cid)).await?;
        // The epoch by LWT (first writer wins), before the row becomes visible: a helper
        // finishing a crashed creation keeps the epoch the first writer made.
        self.exec(
            &st.conv_epoch_lwt,
            (i64_of(StreamPosition::new_epoch())?, cid),
        )
        .await?;
        self.exec(
            &st.conv_insert,
            (
                cid,
                enum_name(&new.kind)?,
                new.name.as_deref(),
                created_at,
                pair.map(|p| p.0.as_str()),
                pair.map(|p| p.1.as_str()),
            ),
        )
        .await?;
        Ok(())
    }

    /// Adds the users that are not members (LWT per user, so concurrent adds agree on who was
    /// new), with both markers at the current last seq, then gives each join its position.
    /// Returns the new ones, in input order.
    async fn add_users(
        &self,
        conversation: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> Result<Vec<MembershipUpdate>> {
        let st = &self.inner.st;
        let cid = i64_of(conversation.get())?;
        let mut seen = HashSet::new();
        let users: Vec<UserId> = users.iter().filter(|u| seen.insert(*u)).cloned().collect();
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let last = i64_of(self.probe_last(conversation, None).await?)?;
        let role = enum_name(&Role::Member)?;
        let joined_at = i64_of(now)?;
        let added = futures::stream::iter(users)
            .map(|u: UserId| {
                let role = role.clone();
                async move {
                    let lwt = Lwt::parse(
                        self.exec(&st.member_insert_lwt, (cid, u.as_str(), &role, joined_at))
                            .await?,
                    )?;
                    if !lwt.applied {
                        return Ok::<_, Error>(None);
                    }
                    // The join's position covers the markers it starts with.
                    let sum = last.saturating_mul(2);
                    tokio::try_join!(
                        self.exec(&st.marker_set, (last, last, last, cid, u.as_str())),
                        self.exec(&st.marker_claimed, (sum, sum, cid, u.as_str())),
                        self.exec(&st.user_conv_insert, (u.as_str(), cid)),
                    )?;
                    let position = self.claim(conversation, None, &membership_item(&u)).await?;
                    Ok(Some(MembershipUpdate {
                        user_id: u,
                        position: Some(position),
                    }))
                }
            })
            .buffered(LIST_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(added.into_iter().flatten().collect())
    }

    // ------------------------------------------------------------------ timeline

    /// The seq of the newest message, from the hint in the conversation row (never above the
    /// truth: it is written after the message) and the `messages` partitions after it.
    async fn probe_last(&self, conversation: ConversationId, hint: Option<u64>) -> Result<u64> {
        let hint = match hint {
            Some(h) => h,
            None => self.existing(conversation).await?.last_seq,
        };
        let cid = i64_of(conversation.get())?;
        let mut last = hint;
        let mut bucket = self.bucket_of(hint + 1);
        loop {
            let max: Option<(i64,)> = self
                .first(&self.inner.st.msg_max, (cid, i64_of(bucket)?))
                .await?;
            match max {
                Some((m,)) => {
                    let m = u64_of(m)?;
                    last = last.max(m);
                    if m < self.bucket_end(bucket) {
                        return Ok(last);
                    }
                    bucket += 1;
                }
                None => return Ok(last),
            }
        }
    }

    async fn message_at(&self, conversation: ConversationId, seq: u64) -> Result<Option<Message>> {
        let row: Option<MessageRow> = self
            .first(
                &self.inner.st.msg_get,
                (
                    i64_of(conversation.get())?,
                    i64_of(self.bucket_of(seq))?,
                    i64_of(seq)?,
                ),
            )
            .await?;
        row.map(|r| r.into_message(conversation)).transpose()
    }

    /// `INSERT … IF NOT EXISTS` of the message at `seq`: `Ok(Ok(message))` when it is there now
    /// (written by this call, or by a helper for the same claim), `Ok(Err(other_id))` when
    /// another message holds the seq.
    async fn insert_at(
        &self,
        new: &NewMessage,
        seq: u64,
    ) -> Result<std::result::Result<Message, MessageId>> {
        let cid = i64_of(new.conversation_id.get())?;
        let lwt = Lwt::parse(
            self.exec(
                &self.inner.st.msg_insert,
                (
                    cid,
                    i64_of(self.bucket_of(seq))?,
                    i64_of(seq)?,
                    i64_of(new.message_id.get())?,
                    new.sender_id.as_str(),
                    new.client_msg_id.as_str(),
                    enum_name(&new.kind)?,
                    new.content.as_str(),
                    media_json(&new.media)?,
                    new.reply_to.map(|r| i64_of(r.get())).transpose()?,
                    i64_of(new.created_at)?,
                ),
            )
            .await?,
        )?;
        if lwt.applied {
            return Ok(Ok(new.clone().into_message(seq)));
        }
        let holder = lwt
            .i64("message_id")
            .ok_or_else(|| internal("conditional insert returned no message_id"))?;
        if u64_of(holder)? == new.message_id.get() {
            // Written by a helper of the same claim: read it back as stored.
            return match self.message_at(new.conversation_id, seq).await? {
                Some(m) => Ok(Ok(m)),
                None => Err(internal("message vanished after a conditional insert")),
            };
        }
        Ok(Err(MessageId::from_raw(u64_of(holder)?)))
    }

    /// The claim's row as a [`NewMessage`].
    fn claim_of(lwt: &Lwt, key: &NewMessage) -> Result<Claim> {
        let seq = lwt
            .i64("seq")
            .ok_or_else(|| internal("idempotency claim without seq"))?;
        let message_id = lwt
            .i64("message_id")
            .ok_or_else(|| internal("idempotency claim without message_id"))?;
        Ok(Claim {
            seq: u64_of(seq)?,
            message: NewMessage {
                message_id: MessageId::from_raw(u64_of(message_id)?),
                conversation_id: key.conversation_id,
                sender_id: key.sender_id.clone(),
                client_msg_id: key.client_msg_id.clone(),
                kind: enum_parse(lwt.text("kind").unwrap_or("text"))?,
                content: lwt.text("content").unwrap_or_default().to_owned(),
                media: media_parse(lwt.text("media"))?,
                reply_to: lwt
                    .i64("reply_to")
                    .map(|r| u64_of(r).map(MessageId::from_raw))
                    .transpose()?,
                created_at: u64_of(lwt.i64("created_at").unwrap_or(0))?,
            },
        })
    }

    async fn read_claim(&self, key: &NewMessage) -> Result<Claim> {
        type R = (
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        );
        let row: Option<R> = self
            .first(
                &self.inner.st.idem_get,
                (
                    i64_of(key.conversation_id.get())?,
                    key.sender_id.as_str(),
                    key.client_msg_id.as_str(),
                ),
            )
            .await?;
        let Some((Some(seq), Some(id), kind, content, media, reply_to, created_at)) = row else {
            return Err(internal("idempotency claim vanished"));
        };
        Ok(Claim {
            seq: u64_of(seq)?,
            message: NewMessage {
                message_id: MessageId::from_raw(u64_of(id)?),
                conversation_id: key.conversation_id,
                sender_id: key.sender_id.clone(),
                client_msg_id: key.client_msg_id.clone(),
                kind: enum_parse(kind.as_deref().unwrap_or("text"))?,
                content: content.unwrap_or_default(),
                media: media_parse(media.as_deref())?,
                reply_to: reply_to
                    .map(|r| u64_of(r).map(MessageId::from_raw))
                    .transpose()?,
                created_at: u64_of(created_at.unwrap_or(0))?,
            },
        })
    }

    /// The writes that follow a stored message: the id lookup, the sender's sent set and the
    /// conversation's last seq/activity (max-wins by `USING TIMESTAMP seq`). All idempotent,
    /// so a retry that finds the message re-applies them, which closes the window of a crash
    /// between the conditional insert and these writes.
    async fn after_insert(&self, m: &Message) -> Result<()> {
        let st = &self.inner.st;
        let cid = i64_of(m.conversation_id.get())?;
        let seq = i64_of(m.seq)?;
        let mid = i64_of(m.message_id.get())?;
        let sent = async {
            if m.deleted {
                Ok(())
            } else {
                self.exec(&st.sent_insert, (cid, m.sender_id.as_str(), seq))
                    .await
                    .map(|_| ())
            }
        };
        tokio::try_join!(
            self.exec(&st.id_insert, (cid, mid, seq)),
            sent,
            self.exec(&st.conv_state, (seq, seq, mid, cid)),
        )?;
        Ok(())
    }

    async fn append_inner(&self, new: NewMessage) -> Result<Appended> {
        let st = &self.inner.st;
        let conv = new.conversation_id;
        let cid = i64_of(conv.get())?;
        let shard = BuildHasherDefault::<DefaultHasher>::default().hash_one(conv.get()) as usize
            % LOCK_SHARDS;
        let _guard = self.inner.locks[shard].lock().await;

        // Both reads at once: the conversation (NotFound first) and the membership.
        let (row, member) = tokio::join!(
            self.existing(conv),
            self.first::<(String, i64)>(&st.member_get, (cid, new.sender_id.as_str()))
        );
        let row = row?;
        if member?.is_none() {
            return Err(Error::NotMember(conv));
        }

        // 1. Claim the idempotency key at the seq after the hint (never above last + 1).
        let first_seq = row.last_seq + 1;
        let lwt = Lwt::parse(
            self.exec(
                &st.idem_claim,
                (
                    cid,
                    new.sender_id.as_str(),
                    new.client_msg_id.as_str(),
                    i64_of(first_seq)?,
                    i64_of(new.message_id.get())?,
                    enum_name(&new.kind)?,
                    new.content.as_str(),
                    media_json(&new.media)?,
                    new.reply_to.map(|r| i64_of(r.get())).transpose()?,
                    i64_of(new.created_at)?,
                ),
            )
            .await?,
        )?;
        let mine = lwt.applied;
        let mut claim = if mine {
            Claim {
                seq: first_seq,
                message: new.clone(),
            }
        } else {
            Self::claim_of(&lwt, &new)?
        };

        // 2. Write the claimed message at the claim's seq; when another message holds that seq,
        //    move the claim (LWT on its seq) to last + 1 and try again. The message of a claim
        //    is only ever written at the claim's current seq, and a claim only moves away from
        //    a seq held by another message, so it ends up stored exactly once.
        let mut try_insert = mine;
        for _ in 0..self.inner.options.append_attempts {
            let outcome = if try_insert {
                self.insert_at(&claim.message, claim.seq).await?
            } else {
                match self.message_at(conv, claim.seq).await? {
                    Some(m) if m.message_id == claim.message.message_id => Ok(m),
                    Some(m) => Err(m.message_id),
                    None => self.insert_at(&claim.message, claim.seq).await?,
                }
            };
            match outcome {
                Ok(message) => {
                    self.after_insert(&message).await?;
                    let item = message_item(message.seq);
                    let position = if mine {
                        Some(self.claim(conv, Some(row.head), &item).await?)
                    } else {
                        // A retry: the original takes its position now if the node that
                        // stored it did not get to claim one (it crashed, or is in between).
                        let latest: Option<(Option<i64>,)> =
                            self.first(&st.latest_get, (cid, item.as_str())).await?;
                        match latest {
                            Some((Some(_),)) => None,
                            _ => Some(self.claim(conv, Some(row.head), &item).await?),
                        }
                    };
                    return Ok(Appended {
                        message,
                        duplicate: !mine,
                        position,
                    });
                }
                Err(_other) => {
                    let next = self.probe_last(conv, Some(claim.seq)).await? + 1;
                    let moved = Lwt::parse(
                        self.exec(
                            &st.idem_move,
                            (
                                i64_of(next)?,
                                cid,
                                new.sender_id.as_str(),
                                new.client_msg_id.as_str(),
                                i64_of(claim.seq)?,
                            ),
                        )
                        .await?,
                    )?;
                    if moved.applied {
                        claim.seq = next;
                        try_insert = true;
                    } else {
                        // Someone else moved it: follow.
                        claim = self.read_claim(&new).await?;
                        try_insert = false;
                    }
                }
            }
        }
        Err(Error::Conflict(
            format!(
                "append to conversation {conv}: no free seq after {} attempts",
                self.inner.options.append_attempts
            )
            .into(),
        ))
    }

    async fn page(
        &self,
        conversation: ConversationId,
        desc: bool,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let st = &self.inner.st;
        let cid = i64_of(conversation.get())?;
        let mut out = Vec::new();
        let mut cursor = from;
        loop {
            let remaining = limit - out.len();
            let bucket = self.bucket_of(cursor);
            let n = i32::try_from(remaining).unwrap_or(i32::MAX);
            let values = (cid, i64_of(bucket)?, i64_of(cursor)?, n);
            let rows: Vec<MessageRow> = if desc {
                self.rows(&st.msg_desc, values).await?
            } else {
                self.rows(&st.msg_asc, values).await?
            };
            let got = rows.len();
            for r in rows {
                out.push(r.into_message(conversation)?);
            }
            if out.len() >= limit || got == 0 {
                return Ok(out);
            }
            if desc {
                if bucket == 0 {
                    return Ok(out);
                }
                cursor = bucket * self.inner.bucket_size;
            } else {
                let end = self.bucket_end(bucket);
                if out.last().map(|m| m.seq) != Some(end) {
                    return Ok(out);
                }
                cursor = end + 1;
            }
        }
    }

    async fn marker_row(&self, cid: i64, user: &UserId) -> Result<(u64, u64)> {
        let (read, delivered, _) = self.marker_state(cid, user).await?;
        Ok((read, delivered))
    }

    /// Read and delivered markers, and `claimed_sum` (see the schema).
    async fn marker_state(&self, cid: i64, user: &UserId) -> Result<(u64, u64, u64)> {
        let row: Option<(Option<i64>, Option<i64>, Option<i64>)> = self
            .first(&self.inner.st.marker_get, (cid, user.as_str()))
            .await?;
        let (r, d, c) = row.unwrap_or((None, None, None));
        Ok((
            u64_of(r.unwrap_or(0))?,
            u64_of(d.unwrap_or(0))?,
            u64_of(c.unwrap_or(0))?,
        ))
    }

    /// Claims a position for the user's markers and records what it covers; returns the
    /// position and the markers as of it.
    async fn claim_markers(
        &self,
        conversation: ConversationId,
        hint: u64,
        user: &UserId,
    ) -> Result<(u64, u64, u64)> {
        let cid = i64_of(conversation.get())?;
        let position = self
            .claim(conversation, Some(hint), &markers_item(user))
            .await?;
        // As of the position (max-wins: a concurrent higher receipt may be there already).
        let (read, delivered, _) = self.marker_state(cid, user).await?;
        let sum = i64_of(read.saturating_add(delivered))?;
        self.exec(
            &self.inner.st.marker_claimed,
            (sum, sum, cid, user.as_str()),
        )
        .await?;
        Ok((position, read, delivered))
    }

    async fn unread_inner(&self, conversation: ConversationId, user: &UserId) -> Result<u64> {
        let row = self.existing(conversation).await?;
        self.unread_with(conversation, user, row.last_seq).await
    }

    async fn unread_with(
        &self,
        conversation: ConversationId,
        user: &UserId,
        hint: u64,
    ) -> Result<u64> {
        let st = &self.inner.st;
        let cid = i64_of(conversation.get())?;
        let (last, (read, _)) = tokio::try_join!(
            self.probe_last(conversation, Some(hint)),
            self.marker_row(cid, user)
        )?;
        let read = read.min(last);
        let r = i64_of(read)?;
        let (own, deleted) = tokio::try_join!(
            self.count(&st.sent_count, (cid, user.as_str(), r)),
            self.count(&st.deleted_count, (cid, r)),
        )?;
        Ok((last - read).saturating_sub(own + deleted))
    }

    async fn view(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<Option<ConversationView>> {
        let Some(conv) = self.load_conversation(conversation).await? else {
            return Ok(None);
        };
        let (last, unread) = tokio::try_join!(
            self.page(conversation, true, conv.last_seq.max(1), 1),
            self.unread_with(conversation, user, conv.last_seq)
        )?;
        let last_message = if conv.last_seq == 0 {
            None
        } else {
            last.into_iter().next()
        };
        Ok(Some(ConversationView {
            conversation: conv,
            unread,
            last_message,
        }))
    }

    // ------------------------------------------------------------------ change stream

    fn shard(conversation: ConversationId) -> usize {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(conversation.get()) as usize
            % LOCK_SHARDS
    }

    fn change_bucket_of(&self, position: u64) -> u64 {
        position / self.inner.change_bucket
    }

    /// The last position of a `changes` bucket.
    fn change_bucket_last(&self, bucket: u64) -> u64 {
        (bucket + 1)
            .saturating_mul(self.inner.change_bucket)
            .saturating_sub(1)
    }

    /// The newest position, from `hint` (a position that exists, or 0) and the `changes`
    /// partitions from the hint's on. Positions have no holes, so the newest is the maximum of
    /// the first partition that is not full.
    async fn probe_head(&self, conversation: ConversationId, hint: u64) -> Result<u64> {
        let cid = i64_of(conversation.get())?;
        let mut head = hint;
        let mut bucket = self.change_bucket_of(hint);
        loop {
            let max: Option<(i64,)> = self
                .first(&self.inner.st.change_max, (cid, i64_of(bucket)?))
                .await?;
            let Some((max,)) = max else { return Ok(head) };
            let max = u64_of(max)?;
            head = head.max(max);
            if max < self.change_bucket_last(bucket) {
                return Ok(head);
            }
            bucket += 1;
        }
    }

    /// Gives `item` the conversation's next position, **after** its effect is stored: `INSERT
    /// INTO changes … IF NOT EXISTS` at head + 1, where head is a position known to exist (so
    /// no position is ever taken before the one below it: no holes); on a conflict the taken
    /// position proves itself, so the next attempt starts above it. Then `change_latest[item]`
    /// and the head hint, both max-wins (`USING TIMESTAMP <position>`). `hint` is the
    /// conversation row's head hint when the caller has read it.
    async fn claim(
        &self,
        conversation: ConversationId,
        hint: Option<u64>,
        item: &str,
    ) -> Result<u64> {
        let st = &self.inner.st;
        let cid = i64_of(conversation.get())?;
        let mut cache = self.inner.claims[Self::shard(conversation)].lock().await;
        let mut head = match *cache {
            Some((c, h)) if c == conversation => h,
            _ => {
                let hint = match hint {
                    Some(h) => h,
                    None => self.existing(conversation).await?.head,
                };
                self.probe_head(conversation, hint).await?
            }
        };
        let attempts = self.inner.options.append_attempts.max(CAS_ATTEMPTS);
        for _ in 0..attempts {
            let position = head + 1;
            let lwt = Lwt::parse(
                self.exec(
                    &st.change_claim,
                    (
                        cid,
                        i64_of(self.change_bucket_of(position))?,
                        i64_of(position)?,
                        item,
                    ),
                )
                .await?,
            )?;
            if lwt.applied {
                *cache = Some((conversation, position));
                drop(cache);
                let p = i64_of(position)?;
                tokio::try_join!(
                    self.exec(&st.latest_set, (p, p, cid, item)),
                    self.exec(&st.conv_head, (p, p, cid)),
                )?;
                return Ok(position);
            }
            // Another node took it: it exists, so the head is at least there.
            head = self.probe_head(conversation, position).await?;
            *cache = Some((conversation, head));
        }
        Err(Error::Conflict(
            format!(
                "conversation {conversation}: no free stream position after {attempts} attempts"
            )
            .into(),
        ))
    }

    /// The stream's epoch: the one made at creation, or, for a conversation created before the
    /// change stream, one made now by LWT (`IF epoch = null`: every node agrees on it).
    async fn ensure_epoch(&self, conversation: ConversationId, row: &ConvRow) -> Result<u64> {
        if let Some(e) = row.epoch {
            return Ok(e);
        }
        let epoch = StreamPosition::new_epoch();
        let lwt = Lwt::parse(
            self.exec(
                &self.inner.st.conv_epoch_lwt,
                (i64_of(epoch)?, i64_of(conversation.get())?),
            )
            .await?,
        )?;
        if lwt.applied {
            return Ok(epoch);
        }
        lwt.i64("epoch")
            .filter(|e| *e != 0)
            .map(u64_of)
            .transpose()?
            .ok_or_else(|| internal("epoch LWT not applied but no epoch"))
    }

    async fn stream_inner(&self, conversation: ConversationId) -> Result<StreamPosition> {
        let row = self.existing(conversation).await?;
        let (epoch, position) = tokio::try_join!(
            self.ensure_epoch(conversation, &row),
            self.probe_head(conversation, row.head)
        )?;
        Ok(StreamPosition { epoch, position })
    }

    /// The message row at `seq` with what a CAS compares with.
    async fn message_raw(
        &self,
        conversation: ConversationId,
        seq: u64,
    ) -> Result<Option<(Message, MessageMeta)>> {
        let row: Option<MessageRow> = self
            .first(
                &self.inner.st.msg_get,
                (
                    i64_of(conversation.get())?,
                    i64_of(self.bucket_of(seq))?,
                    i64_of(seq)?,
                ),
            )
            .await?;
        row.map(|r| {
            let meta = MessageMeta {
                rev: r.rev,
                unclaimed: r.rev.unwrap_or(0) > r.claimed_rev.unwrap_or(0),
            };
            r.into_message(conversation).map(|m| (m, meta))
        })
        .transpose()
    }

    /// Claims a position for the message at `seq` after a change of it, then reads it back
    /// (the message as of the position: it includes every change below it, e.g. a reaction
    /// that raced this edit but was claimed first) and records the rev the position covers.
    async fn claim_message(
        &self,
        conversation: ConversationId,
        hint: u64,
        id: MessageId,
        seq: u64,
        fallback: Message,
    ) -> Result<(u64, Message)> {
        let position = self
            .claim(conversation, Some(hint), &message_item(seq))
            .await?;
        let Some((message, meta)) = self
            .message_raw(conversation, seq)
            .await?
            .filter(|(m, _)| m.message_id == id)
        else {
            return Ok((position, fallback));
        };
        if let Some(rev) = meta.rev {
            self.exec(
                &self.inner.st.msg_claimed,
                (
                    rev,
                    rev,
                    i64_of(conversation.get())?,
                    i64_of(self.bucket_of(seq))?,
                    i64_of(seq)?,
                ),
            )
            .await?;
        }
        Ok((position, message))
    }

    /// Runs `query(chunk)` for chunks of `keys` of [`IN_CHUNK`], concurrently; all the rows.
    async fn rows_in<K, R>(&self, st: &PreparedStatement, cid: i64, keys: Vec<K>) -> Result<Vec<R>>
    where
        K: scylla::serialize::value::SerializeValue + Clone + Send + Sync,
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        let chunks: Vec<Vec<K>> = keys.chunks(IN_CHUNK).map(<[K]>::to_vec).collect();
        let parts: Vec<Vec<R>> = futures::stream::iter(chunks)
            .map(|chunk| async move { self.rows::<R>(st, (cid, chunk)).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    async fn changes_after_inner(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<ChangePage> {
        let st = &self.inner.st;
        let cid = i64_of(conversation.get())?;
        let stream = self.stream_inner(conversation).await?;
        let head = stream.position;
        if limit == 0 || after >= head {
            return Ok(ChangePage {
                stream,
                changes: Vec::new(),
                next: None,
            });
        }
        // Positions have no holes: the page is exactly (after, end].
        let end = after.saturating_add(limit as u64).min(head);
        let mut entries: Vec<(u64, String)> = Vec::new();
        for bucket in self.change_bucket_of(after + 1)..=self.change_bucket_of(end) {
            let rows: Vec<(i64, String)> = self
                .rows(
                    &st.change_range,
                    (cid, i64_of(bucket)?, i64_of(after)?, i64_of(end)?),
                )
                .await?;
            for (p, item) in rows {
                entries.push((u64_of(p)?, item));
            }
        }
        // Keep an entry only if it is its item's latest: `change_latest` is not above it (an
        // entry with a higher latest comes again later; a missing latest is a claim whose
        // writer has not written it yet, or crashed). Within the page, the highest entry of
        // an item wins.
        let items: Vec<String> = entries
            .iter()
            .map(|(_, i)| i.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let latest: HashMap<String, u64> = self
            .rows_in::<String, (String, Option<i64>)>(&st.latest_in, cid, items)
            .await?
            .into_iter()
            .filter_map(|(i, p)| Some((i, u64::try_from(p?).ok()?)))
            .collect();
        let mut keep: HashMap<&str, u64> = HashMap::new();
        for (p, item) in &entries {
            if latest.get(item).is_none_or(|l| l <= p) {
                let e = keep.entry(item.as_str()).or_insert(*p);
                *e = (*e).max(*p);
            }
        }
        let mut kept: Vec<(u64, Item)> = keep
            .into_iter()
            .filter_map(|(item, p)| Item::parse(item).map(|i| (p, i)))
            .collect();
        kept.sort_unstable_by_key(|(p, _)| *p);

        // Resolve in batches: messages per bucket, members and markers by user.
        let mut seqs_by_bucket: HashMap<u64, Vec<i64>> = HashMap::new();
        let mut users: HashSet<String> = HashSet::new();
        let mut marker_users: HashSet<String> = HashSet::new();
        for (_, item) in &kept {
            match item {
                Item::Message(seq) => seqs_by_bucket
                    .entry(self.bucket_of(*seq))
                    .or_default()
                    .push(i64_of(*seq)?),
                Item::Markers(u) => {
                    users.insert(u.as_str().to_owned());
                    marker_users.insert(u.as_str().to_owned());
                }
                Item::Membership(u) => {
                    users.insert(u.as_str().to_owned());
                }
            }
        }
        let messages = async {
            let mut out: HashMap<u64, Message> = HashMap::new();
            for (bucket, seqs) in seqs_by_bucket {
                let b = i64_of(bucket)?;
                let chunks: Vec<Vec<i64>> = seqs.chunks(IN_CHUNK).map(<[i64]>::to_vec).collect();
                for chunk in chunks {
                    let rows: Vec<MessageRow> = self.rows(&st.msg_in, (cid, b, chunk)).await?;
                    for r in rows {
                        let m = r.into_message(conversation)?;
                        out.insert(m.seq, m);
                    }
                }
            }
            Ok::<_, Error>(out)
        };
        let (messages, members, markers) = tokio::try_join!(
            messages,
            self.rows_in::<String, (String,)>(&st.members_in, cid, users.into_iter().collect()),
            self.rows_in::<String, (String, Option<i64>, Option<i64>)>(
                &st.markers_in,
                cid,
                marker_users.into_iter().collect()
            ),
        )?;
        let members: HashSet<String> = members.into_iter().map(|(u,)| u).collect();
        let markers: HashMap<String, (Option<i64>, Option<i64>)> =
            markers.into_iter().map(|(u, r, d)| (u, (r, d))).collect();
        let mut changes = Vec::with_capacity(kept.len());
        for (position, item) in kept {
            match item {
                Item::Message(seq) => {
                    if let Some(message) = messages.get(&seq) {
                        changes.push(Change::Message {
                            position,
                            message: Box::new(message.clone()),
                        });
                    }
                }
                Item::Markers(user_id) => {
                    if members.contains(user_id.as_str()) {
                        let (r, d) = markers
                            .get(user_id.as_str())
                            .copied()
                            .unwrap_or((None, None));
                        changes.push(Change::Markers {
                            position,
                            user_id,
                            delivered: u64_of(d.unwrap_or(0))?,
                            read: u64_of(r.unwrap_or(0))?,
                        });
                    }
                }
                Item::Membership(user_id) => {
                    let member = members.contains(user_id.as_str());
                    changes.push(Change::Membership {
                        position,
                        user_id,
                        member,
                    });
                }
            }
        }
        Ok(ChangePage {
            stream,
            changes,
            next: (end < head).then_some(end),
        })
    }
}

#[async_trait]
impl MessageStore for ScyllaStore {
    async fn append(&self, message: NewMessage) -> Result<Appended> {
        self.bounded(self.append_inner(message)).await
    }

    async fn message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<Message>> {
        self.bounded(async {
            let seq: Option<(i64,)> = self
                .first(
                    &self.inner.st.id_get,
                    (i64_of(conversation.get())?, i64_of(id.get())?),
                )
                .await?;
            let Some((seq,)) = seq else { return Ok(None) };
            Ok(self
                .message_at(conversation, u64_of(seq)?)
                .await?
                .filter(|m| m.message_id == id))
        })
        .await
    }

    async fn change_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
        by: &UserId,
        change: MessageChange,
        now: u64,
    ) -> Result<MessageUpdate> {
        self.bounded(async {
            let st = &self.inner.st;
            let row = self.existing(conversation).await?;
            let cid = i64_of(conversation.get())?;
            let not_found = || Error::not_found(format!("message {id}"));
            let seq: Option<(i64,)> = self.first(&st.id_get, (cid, i64_of(id.get())?)).await?;
            let seq = u64_of(seq.ok_or_else(not_found)?.0)?;
            for _ in 0..CAS_ATTEMPTS {
                let (current, meta) = self
                    .message_raw(conversation, seq)
                    .await?
                    .filter(|(m, _)| m.message_id == id)
                    .ok_or_else(not_found)?;
                if &current.sender_id != by {
                    return Err(Error::forbidden("only the sender may change a message"));
                }
                let mut changed = current.clone();
                if let Err(e) = change.apply(&mut changed, now) {
                    if current.deleted {
                        // Finish the index writes of a delete that crashed half-way, and
                        // its position (a retried delete is the caller's way to finish it).
                        self.mark_deleted(cid, &current).await?;
                        if meta.unclaimed {
                            self.claim_message(conversation, row.head, id, seq, current)
                                .await?;
                        }
                    }
                    return Err(e);
                }
                let rev = meta.rev.unwrap_or(0).saturating_add(1);
                // A delete also clears the reactions (in the same CAS); an edit leaves them.
                let statement = if changed.deleted {
                    &st.msg_tombstone
                } else {
                    &st.msg_update
                };
                let lwt = Lwt::parse(
                    self.exec(
                        statement,
                        (
                            changed.content.as_str(),
                            media_json(&changed.media)?,
                            changed.edited_at.map(i64_of).transpose()?,
                            changed.deleted,
                            i64::from(changed.version),
                            rev,
                            cid,
                            i64_of(self.bucket_of(seq))?,
                            i64_of(seq)?,
                            i64::from(current.version),
                            meta.rev,
                        ),
                    )
                    .await?,
                )?;
                if lwt.applied {
                    if changed.deleted {
                        self.mark_deleted(cid, &changed).await?;
                    }
                    let (position, message) = self
                        .claim_message(conversation, row.head, id, seq, changed)
                        .await?;
                    return Ok(MessageUpdate {
                        message,
                        position: Some(position),
                    });
                }
            }
            Err(Error::Conflict(
                format!("message {id} changed concurrently {CAS_ATTEMPTS} times").into(),
            ))
        })
        .await
    }

    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.bounded(async {
            let row = self.existing(conversation).await?;
            if limit == 0 || before == Some(0) || before == Some(1) {
                return Ok(Vec::new());
            }
            let last = self.probe_last(conversation, Some(row.last_seq)).await?;
            let top = before.map_or(last, |b| (b - 1).min(last));
            if top == 0 {
                return Ok(Vec::new());
            }
            self.page(conversation, true, top, limit).await
        })
        .await
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.bounded(async {
            self.existing(conversation).await?;
            if limit == 0 || after >= i64::MAX as u64 {
                return Ok(Vec::new());
            }
            self.page(conversation, false, after + 1, limit).await
        })
        .await
    }

    async fn last_seq(&self, conversation: ConversationId) -> Result<u64> {
        self.bounded(self.probe_last(conversation, None)).await
    }

    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        self.bounded(async {
            let mut seen = HashSet::with_capacity(new.members.len() + 1);
            let users: Vec<UserId> = std::iter::once(&new.creator)
                .chain(&new.members)
                .filter(|u| seen.insert(*u))
                .cloned()
                .collect();
            match new.kind {
                ConversationKind::Group => {
                    self.write_conversation(&new, &users, Role::Owner, None)
                        .await?;
                    self.load_conversation(new.id)
                        .await?
                        .ok_or_else(|| internal("conversation missing after creation"))
                }
                ConversationKind::Direct => {
                    let [a, b] = <[UserId; 2]>::try_from(users).map_err(|_| {
                        Error::invalid("a direct conversation needs exactly two distinct users")
                    })?;
                    let (a, b) = if a <= b { (a, b) } else { (b, a) };
                    let lwt = Lwt::parse(
                        self.exec(
                            &self.inner.st.direct_claim,
                            (
                                direct_key(&a, &b),
                                i64_of(new.id.get())?,
                                i64_of(new.created_at)?,
                            ),
                        )
                        .await?,
                    )?;
                    let (id, created_at) = if lwt.applied {
                        (new.id, new.created_at)
                    } else {
                        let id = lwt
                            .i64("conversation_id")
                            .ok_or_else(|| internal("direct pair without conversation"))?;
                        let at = lwt.i64("created_at").unwrap_or(0);
                        (ConversationId::from_raw(u64_of(id)?), u64_of(at)?)
                    };
                    let exists = !lwt.applied && self.conv_row(id).await?.is_some();
                    if exists {
                        // Restore a member who left.
                        self.add_users(id, &[a, b], new.created_at).await?;
                    } else {
                        // Ours, or the pair's creation is in progress or crashed: write it
                        // (the same rows whoever writes them).
                        let fresh = NewConversation {
                            id,
                            kind: ConversationKind::Direct,
                            name: None,
                            creator: a.clone(),
                            members: vec![b.clone()],
                            created_at,
                        };
                        self.write_conversation(
                            &fresh,
                            &[a.clone(), b.clone()],
                            Role::Member,
                            Some((&a, &b)),
                        )
                        .await?;
                    }
                    self.load_conversation(id)
                        .await?
                        .ok_or_else(|| internal("conversation missing after creation"))
                }
            }
        })
        .await
    }

    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        self.bounded(self.load_conversation(id)).await
    }

    async fn member(&self, conversation: ConversationId, user: &UserId) -> Result<Option<Member>> {
        self.bounded(async {
            let cid = i64_of(conversation.get())?;
            let (member, (read, delivered)) = tokio::try_join!(
                self.first::<(String, i64)>(&self.inner.st.member_get, (cid, user.as_str())),
                self.marker_row(cid, user)
            )?;
            member
                .map(|(role, joined_at)| {
                    Ok(Member {
                        user_id: user.clone(),
                        role: enum_parse(&role)?,
                        joined_at: u64_of(joined_at)?,
                        last_read_seq: read,
                        last_delivered_seq: delivered,
                    })
                })
                .transpose()
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
        self.bounded(async {
            let st = &self.inner.st;
            let row = self.existing(conversation).await?;
            let cid = i64_of(conversation.get())?;
            let (member, seq) = tokio::try_join!(
                self.first::<(String, i64)>(&st.member_get, (cid, user.as_str())),
                self.first::<(i64,)>(&st.id_get, (cid, i64_of(id.get())?)),
            )?;
            if member.is_none() {
                return Err(Error::NotMember(conversation));
            }
            let not_found =
                || Error::not_found(format!("message {id} in conversation {conversation}"));
            let seq = u64_of(seq.ok_or_else(not_found)?.0)?;
            for _ in 0..CAS_ATTEMPTS {
                let (current, meta) = self
                    .message_raw(conversation, seq)
                    .await?
                    .filter(|(m, _)| m.message_id == id)
                    .ok_or_else(not_found)?;
                let mut changed = current.clone();
                if !apply_reaction(&mut changed, user, key)? {
                    if meta.unclaimed {
                        // The same reaction again, retried after a writer stored it (or
                        // another change) but crashed before its position: claim it now.
                        let (position, message) = self
                            .claim_message(conversation, row.head, id, seq, current)
                            .await?;
                        return Ok(MessageUpdate {
                            message,
                            position: Some(position),
                        });
                    }
                    return Ok(MessageUpdate {
                        message: current,
                        position: None,
                    });
                }
                // CAS on the rev (every edit, delete and reaction bumps it; a delete also
                // clears the reactions): one user's change never overwrites another's, and
                // the key limit holds.
                let lwt = Lwt::parse(
                    self.exec(
                        &st.msg_react,
                        (
                            reactions_json(&changed.reactions)?,
                            meta.rev.unwrap_or(0).saturating_add(1),
                            cid,
                            i64_of(self.bucket_of(seq))?,
                            i64_of(seq)?,
                            i64::from(current.version),
                            meta.rev,
                        ),
                    )
                    .await?,
                )?;
                if lwt.applied {
                    let (position, message) = self
                        .claim_message(conversation, row.head, id, seq, changed)
                        .await?;
                    return Ok(MessageUpdate {
                        message,
                        position: Some(position),
                    });
                }
            }
            Err(Error::Conflict(
                format!("reactions of message {id} changed concurrently {CAS_ATTEMPTS} times")
                    .into(),
            ))
        })
        .await
    }

    async fn stream(&self, conversation: ConversationId) -> Result<Option<StreamPosition>> {
        self.bounded(self.stream_inner(conversation))
            .await
            .map(Some)
    }

    async fn changes_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Option<ChangePage>> {
        self.bounded(self.changes_after_inner(conversation, after, limit))
            .await
            .map(Some)
    }

    async fn add_members(
        &self,
        conversation: ConversationId,
        users: &[UserId],
        now: u64,
    ) -> Result<Vec<MembershipUpdate>> {
        self.bounded(async {
            let row = self.existing(conversation).await?;
            if let Some((a, b)) = &row.pair {
                if users.iter().any(|u| u != a && u != b) {
                    return Err(Error::invalid(
                        "a direct conversation cannot have other members",
                    ));
                }
            }
            self.add_users(conversation, users, now).await
        })
        .await
    }

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<Option<MembershipUpdate>> {
        self.bounded(async {
            self.existing(conversation).await?;
            let cid = i64_of(conversation.get())?;
            let st = &self.inner.st;
            let lwt = Lwt::parse(
                self.exec(&st.member_delete_lwt, (cid, user.as_str()))
                    .await?,
            )?;
            // Also when it was not applied: finishes a removal that crashed half-way.
            self.exec(&st.user_conv_delete, (user.as_str(), cid))
                .await?;
            if !lwt.applied {
                return Ok(None);
            }
            let position = self
                .claim(conversation, None, &membership_item(user))
                .await?;
            Ok(Some(MembershipUpdate {
                user_id: user.clone(),
                position: Some(position),
            }))
        })
        .await
    }

    async fn conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>> {
        self.bounded(async {
            let rows: Vec<(i64,)> = self
                .rows(&self.inner.st.user_convs, (user.as_str(),))
                .await?;
            rows.into_iter()
                .map(|(c,)| u64_of(c).map(ConversationId::from_raw))
                .collect()
        })
        .await
    }

    async fn list_conversations(
        &self,
        user: &UserId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<ConversationView, u64>> {
        self.bounded(async {
            if limit == 0 {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
            let rows: Vec<(i64,)> = self
                .rows(&self.inner.st.user_convs, (user.as_str(),))
                .await?;
            // The activity of each of the user's conversations (one single-row read each).
            let mut active: Vec<(u64, ConversationId)> = futures::stream::iter(rows)
                .map(|(c,)| async move {
                    let id = ConversationId::from_raw(u64_of(c)?);
                    Ok::<_, Error>(self.conv_row(id).await?.map(|r| (r.last_activity, id)))
                })
                .buffer_unordered(LIST_CONCURRENCY)
                .try_filter_map(|x| async move { Ok(x) })
                .try_collect()
                .await?;
            active.retain(|(a, _)| after.is_none_or(|after| *a < after));
            active.sort_unstable_by(|x, y| y.cmp(x));
            let more = active.len() > limit;
            active.truncate(limit);
            let items: Vec<ConversationView> = futures::stream::iter(active)
                .map(|(_, id)| self.view(id, user))
                .buffered(LIST_CONCURRENCY)
                .try_filter_map(|v| async move { Ok(v) })
                .try_collect()
                .await?;
            let next = if more {
                items.last().map(|v| v.conversation.last_activity)
            } else {
                None
            };
            Ok(Page { items, next })
        })
        .await
    }

    async fn set_marker(
        &self,
        conversation: ConversationId,
        user: &UserId,
        kind: ReceiptKind,
        seq: u64,
    ) -> Result<MarkerUpdate> {
        self.bounded(async {
            let st = &self.inner.st;
            let row = self.existing(conversation).await?;
            let cid = i64_of(conversation.get())?;
            let (member, last, (read, delivered, claimed)) = tokio::try_join!(
                self.first::<(String, i64)>(&st.member_get, (cid, user.as_str())),
                self.probe_last(conversation, Some(row.last_seq)),
                self.marker_state(cid, user),
            )?;
            if member.is_none() {
                return Err(Error::NotMember(conversation));
            }
            let target = seq.min(last);
            let current = match kind {
                ReceiptKind::Read => read,
                ReceiptKind::Delivered => delivered,
            };
            if target <= current {
                if read.saturating_add(delivered) > claimed {
                    // A move is stored without a position (its writer crashed before the
                    // claim, or is just between the two): this call, typically the retry of
                    // that receipt, finishes it, and reports the move it makes visible.
                    let (position, read, delivered) =
                        self.claim_markers(conversation, row.head, user).await?;
                    return Ok(MarkerUpdate {
                        seq: match kind {
                            ReceiptKind::Read => read,
                            ReceiptKind::Delivered => delivered,
                        },
                        moved: true,
                        position: Some(position),
                    });
                }
                return Ok(MarkerUpdate {
                    seq: current,
                    moved: false,
                    position: None,
                });
            }
            // Max-wins: a cell written with timestamp = its value only loses to a higher one.
            let t = i64_of(target)?;
            match kind {
                ReceiptKind::Read => {
                    self.exec(&st.marker_set, (t, t, t, cid, user.as_str()))
                        .await?
                }
                ReceiptKind::Delivered => {
                    self.exec(&st.marker_set_delivered, (t, t, cid, user.as_str()))
                        .await?
                }
            };
            let (position, read, delivered) =
                self.claim_markers(conversation, row.head, user).await?;
            let now = match kind {
                ReceiptKind::Read => read,
                ReceiptKind::Delivered => delivered,
            };
            Ok(MarkerUpdate {
                seq: now.max(target),
                moved: true,
                position: Some(position),
            })
        })
        .await
    }

    async fn unread(&self, conversation: ConversationId, user: &UserId) -> Result<u64> {
        self.bounded(self.unread_inner(conversation, user)).await
    }
}

impl ScyllaStore {
    /// The index writes of a deleted message (unread counts): idempotent.
    async fn mark_deleted(&self, cid: i64, m: &Message) -> Result<()> {
        let st = &self.inner.st;
        let seq = i64_of(m.seq)?;
        tokio::try_join!(
            self.exec(&st.deleted_insert, (cid, seq, m.sender_id.as_str())),
            self.exec(&st.sent_delete, (cid, m.sender_id.as_str(), seq)),
        )?;
        Ok(())
    }
}
