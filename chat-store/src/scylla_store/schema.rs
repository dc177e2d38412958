//! Keyspace and table creation, versioned: `schema_version` holds the applied version and the
//! bucket size; every migration is a list of idempotent DDL statements (`IF NOT EXISTS`), so
//! two nodes starting at once, or a node that crashed half-way, simply run them again.

use chat_core::{Error, Result};
use scylla::client::session::Session;

use super::options::{ScyllaStoreOptions, Tablets};
use super::{db_err, internal};

/// The version this code writes and reads. A keyspace at a higher version was migrated by a
/// newer release: the store refuses to open it rather than guess.
pub const SCHEMA_VERSION: i32 = 2;

/// One idempotent step of a migration.
enum Step {
    /// A DDL statement that is idempotent by itself (`CREATE … IF NOT EXISTS`); `{ks}` is
    /// replaced by the keyspace.
    Ddl(&'static str),
    /// `ALTER TABLE <table> ADD <column> <type>`, skipped when the column exists (ScyllaDB and
    /// older Cassandra releases have no `ADD IF NOT EXISTS`; two nodes adding it at once is
    /// fine: the loser's error is ignored when the column is there afterwards).
    AddColumn(&'static str, &'static str, &'static str),
}

use Step::{AddColumn, Ddl};

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&[Step]] = &[
    &[
        // A conversation. kind/name/created_at/pair_* are written once with the real clock;
        // last_seq/last_activity only with `USING TIMESTAMP <seq>`, so the newest message wins
        // whatever the order the writes arrive in (last-write-wins becomes max-wins).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.conversations (
        id bigint PRIMARY KEY,
        kind text, name text, created_at bigint, pair_a text, pair_b text,
        last_seq bigint, last_activity bigint)"),
        // Members and their roles, one partition per conversation.
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.members (
        conversation_id bigint, user_id text, role text, joined_at bigint,
        PRIMARY KEY (conversation_id, user_id))"),
        // Read/delivered markers, written only with `USING TIMESTAMP <marker seq>` (max-wins).
        // Kept when a member leaves, so a later, higher write always wins.
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.markers (
        conversation_id bigint, user_id text, read_seq bigint, delivered_seq bigint,
        PRIMARY KEY (conversation_id, user_id))"),
        // A user's conversations.
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.user_conversations (
        user_id text, conversation_id bigint,
        PRIMARY KEY (user_id, conversation_id))"),
        // The direct conversation of a pair (claimed by LWT).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.direct_pairs (
        pair_key text PRIMARY KEY, conversation_id bigint, created_at bigint)"),
        // The timeline: bucket = (seq - 1) / bucket_size; rows written by `IF NOT EXISTS`.
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.messages (
        conversation_id bigint, bucket bigint, seq bigint,
        message_id bigint, sender_id text, client_msg_id text, kind text, content text,
        media text, reply_to bigint, created_at bigint, edited_at bigint, deleted boolean,
        version bigint,
        PRIMARY KEY ((conversation_id, bucket), seq))
        WITH CLUSTERING ORDER BY (seq DESC)"),
        // message id -> seq (lookups by id).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.message_ids (
        conversation_id bigint, message_id bigint, seq bigint,
        PRIMARY KEY ((conversation_id, message_id)))"),
        // The idempotency claim of (conversation, sender, client_msg_id): the message it stands
        // for, the seq it is being written at, and its content (so that a retry can finish the
        // write of a crashed node).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.idempotency (
        conversation_id bigint, sender_id text, client_msg_id text,
        seq bigint, message_id bigint, kind text, content text, media text, reply_to bigint,
        created_at bigint,
        PRIMARY KEY ((conversation_id, sender_id, client_msg_id)))"),
        // Seqs of a sender's messages that are not deleted (unread counts).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.sent (
        conversation_id bigint, sender_id text, seq bigint,
        PRIMARY KEY ((conversation_id, sender_id), seq))"),
        // Seqs of deleted messages (unread counts).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.deleted (
        conversation_id bigint, seq bigint, sender_id text,
        PRIMARY KEY (conversation_id, seq))"),
    ],
    // 2: the change stream and reactions.
    &[
        // The stream's epoch (random, made with the conversation) and a hint of its head
        // (the newest position; written `USING TIMESTAMP <position>` after the position's
        // claim, so never above the truth and max-wins).
        AddColumn("conversations", "epoch", "bigint"),
        AddColumn("conversations", "head", "bigint"),
        // A message's reactions: JSON of `Vec<Reaction>`, null when none; written only by
        // conditional updates (`IF version = ? AND reactions = ?`).
        AddColumn("messages", "reactions", "text"),
        // `rev`: bumped by every change of a stored message (edit, delete, reaction; the CAS
        // conditions on it). `claimed_rev`: the highest rev a position was claimed after,
        // written `USING TIMESTAMP <rev>` (max-wins); `rev > claimed_rev` means a change
        // whose writer crashed before its claim, repaired by the next call that finds it.
        AddColumn("messages", "rev", "bigint"),
        AddColumn("messages", "claimed_rev", "bigint"),
        // read_seq + delivered_seq as of the latest claimed marker position, written
        // `USING TIMESTAMP <sum>` (max-wins); below the sum: a move without a position.
        AddColumn("markers", "claimed_sum", "bigint"),
        // The change log: one row per position, `item` = what changed there (`m:<seq>`,
        // `k:<user>` markers, `j:<user>` membership); rows written by `IF NOT EXISTS` at
        // head + 1 only. bucket = position / (8 × the messages' bucket size).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.changes (
            conversation_id bigint, bucket bigint, position bigint, item text,
            PRIMARY KEY ((conversation_id, bucket), position))
            WITH CLUSTERING ORDER BY (position ASC)"),
        // item -> the position of its latest change, written `USING TIMESTAMP <position>`
        // (max-wins without a read).
        Ddl("CREATE TABLE IF NOT EXISTS {ks}.change_latest (
            conversation_id bigint, item text, position bigint,
            PRIMARY KEY (conversation_id, item))"),
    ],
];

/// Creates the keyspace if missing, applies the migrations it lacks and returns the bucket size
/// of the keyspace (the stored one when the schema already existed).
pub(crate) async fn migrate(session: &Session, options: &ScyllaStoreOptions) -> Result<u64> {
    let ks = &options.keyspace;
    let tablets = match options.tablets {
        Tablets::Disable => true,
        Tablets::Omit => false,
        Tablets::DisableOnScylla => is_scylla(session).await?,
    };
    let mut create = format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
        options.replication.cql()
    );
    if tablets {
        create.push_str(" AND tablets = {'enabled': false}");
    }
    ddl(session, &create).await?;
    ddl(
        session,
        &format!(
            "CREATE TABLE IF NOT EXISTS {ks}.schema_version (
                id text PRIMARY KEY, version int, bucket_size bigint)"
        ),
    )
    .await?;

    let (mut version, bucket) = read_version(session, ks).await?;
    let bucket = match bucket {
        Some(b) => b,
        None => {
            // First start: record the bucket size (first writer wins).
            session
                .query_unpaged(
                    format!(
                        "INSERT INTO {ks}.schema_version (id, version, bucket_size)
                         VALUES ('schema', 0, ?) IF NOT EXISTS"
                    ),
                    (i64::try_from(options.bucket_size).map_err(internal)?,),
                )
                .await
                .map_err(db_err)?;
            let (v, b) = read_version(session, ks).await?;
            version = v;
            b.ok_or_else(|| Error::internal("schema_version row missing after insert"))?
        }
    };
    if version > SCHEMA_VERSION {
        return Err(Error::internal(format!(
            "keyspace {ks} has schema version {version}; this build knows up to {SCHEMA_VERSION}"
        )));
    }
    for (i, statements) in MIGRATIONS.iter().enumerate() {
        let target = i32::try_from(i + 1).map_err(internal)?;
        if target <= version {
            continue;
        }
        for step in *statements {
            match step {
                Ddl(statement) => ddl(session, &statement.replace("{ks}", ks)).await?,
                AddColumn(table, column, ty) => add_column(session, ks, table, column, ty).await?,
            }
        }
        // Record it; a concurrent node recording the same version is fine.
        session
            .query_unpaged(
                format!(
                    "UPDATE {ks}.schema_version SET version = ? WHERE id = 'schema' IF version < ?"
                ),
                (target, target),
            )
            .await
            .map_err(db_err)?;
        version = target;
    }
    u64::try_from(bucket)
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| Error::internal(format!("bad stored bucket size {bucket}")))
}

async fn ddl(session: &Session, statement: &str) -> Result<()> {
    session
        .query_unpaged(statement, ())
        .await
        .map(|_| ())
        .map_err(db_err)
}

async fn has_column(session: &Session, ks: &str, table: &str, column: &str) -> Result<bool> {
    let rows = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (ks, table, column),
        )
        .await
        .map_err(db_err)?
        .into_rows_result()
        .map_err(internal)?;
    Ok(rows.rows_num() > 0)
}

async fn add_column(
    session: &Session,
    ks: &str,
    table: &str,
    column: &str,
    ty: &str,
) -> Result<()> {
    if has_column(session, ks, table, column).await? {
        return Ok(());
    }
    match ddl(
        session,
        &format!("ALTER TABLE {ks}.{table} ADD {column} {ty}"),
    )
    .await
    {
        Ok(()) => Ok(()),
        // Another node added it first.
        Err(_) if has_column(session, ks, table, column).await? => Ok(()),
        Err(e) => Err(e),
    }
}

async fn read_version(session: &Session, ks: &str) -> Result<(i32, Option<i64>)> {
    let rows = session
        .query_unpaged(
            format!("SELECT version, bucket_size FROM {ks}.schema_version WHERE id = 'schema'"),
            (),
        )
        .await
        .map_err(db_err)?
        .into_rows_result()
        .map_err(internal)?;
    let row = rows
        .maybe_first_row::<(Option<i32>, Option<i64>)>()
        .map_err(internal)?;
    Ok(match row {
        Some((v, b)) => (v.unwrap_or(0), b),
        None => (0, None),
    })
}

/// Whether the cluster is ScyllaDB: it has a `system.scylla_local` table, Cassandra does not.
async fn is_scylla(session: &Session) -> Result<bool> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables
             WHERE keyspace_name = 'system' AND table_name = 'scylla_local'",
            (),
        )
        .await
        .map_err(db_err)?
        .into_rows_result()
        .map_err(internal)?;
    Ok(rows.rows_num() > 0)
}
