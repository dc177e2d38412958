//! # chat-store
//!
//! Durable [`MessageStore`](chat_core::MessageStore) backends for `chat-core`: conversation
//! timelines, conversations, members and read markers that survive a restart and are shared by
//! every node of a cluster of chat servers. Each backend passes the whole conformance suite of
//! `chat_core::testing::store`, so the engine cannot tell them apart from the in-memory default.
//!
//! | backend | type | feature | status |
//! |---|---|---|---|
//! | Redis (standalone or primary/replica, not Redis Cluster; tested with Redis 7.0) | [`RedisStore`] | `redis` | available |
//! | ScyllaDB / Apache Cassandra (CQL; tested on Cassandra 5.0.9) | [`ScyllaStore`] | `scylla` | available |
//!
//! ## Feature flags
//!
//! One feature per backend, named after its client crate (which is built with
//! `default-features = false` and only the features used):
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | **yes** | [`RedisStore`] and [`RedisOptions`], on the `redis` crate (tokio, scripts, connection manager) through `chat-redis`, the Redis connection layer shared with `chat-presence` |
//! | `scylla` | **yes** | [`ScyllaStore`], [`ScyllaStoreOptions`] and its setting types, on the `scylla` crate (no default features) |
//!
//! Both are default features so that `cargo test --workspace` builds and runs both backends'
//! tests (and the workspace's clippy covers them); a host that wants only one turns default
//! features off and enables it, e.g.
//! `chat-store = { version = "0.1", default-features = false, features = ["scylla"] }`.
//!
//! ## Example
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn demo() -> Result<(), chat_core::Error> {
//! use std::sync::Arc;
//! use chat_core::Chat;
//! use chat_store::RedisStore;
//!
//! // Every key starts with "chat:"; two deployments on one Redis use two prefixes.
//! let store = RedisStore::connect("redis://127.0.0.1:6379/", "chat").await?;
//! let chat = Chat::builder().store(Arc::new(store)).build().await?;
//! # let _ = chat;
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #[cfg(feature = "scylla")]
//! # async fn demo() -> Result<(), chat_core::Error> {
//! use std::sync::Arc;
//! use chat_core::Chat;
//! use chat_store::{Replication, ScyllaStore, ScyllaStoreOptions};
//!
//! // Keyspace `chat` (created with its tables if missing), 3 replicas in datacenter dc1.
//! let options = ScyllaStoreOptions::new("chat")
//!     .with_replication(Replication::NetworkTopology(vec![("dc1".into(), 3)]))
//!     .with_local_datacenter("dc1");
//! let nodes = ["10.0.0.1:9042".to_owned(), "10.0.0.2:9042".to_owned()];
//! let store = ScyllaStore::connect_with(&nodes, options).await?;
//! let chat = Chat::builder().store(Arc::new(store)).build().await?;
//! # let _ = chat;
//! # Ok(()) }
//! ```
//!
//! ## Redis: what is stored where
//!
//! `<p>` is the prefix given to [`RedisStore::connect`], `<cid>` a conversation id and `<mid>` a
//! message id (decimal Snowflakes), `<user>` a user id as given by the host, `<seq>` a decimal
//! sequence number. Nothing expires; nothing is deleted except as described.
//!
//! | key | type | content |
//! |---|---|---|
//! | `<p>:conv:<cid>` | hash | `kind` (`direct`/`group`), `name` (absent when none), `created_at` (Unix ms), `last_seq`, `last_activity` (Snowflake of the newest message, or the conversation id while empty), `next_order` (join-order counter), `epoch` (the change stream's, a decimal 63-bit number), `position` (its newest position); direct conversations also `pair_a`, `pair_b` (the two users) |
//! | `<p>:members:<cid>` | hash | member `<user>` → `role:joined_at:order:last_read_seq:last_delivered_seq`, e.g. `owner:1717171717171:0:12:14` (role `owner`/`admin`/`member`; `order` is the join order, which is the order of `Conversation::members`); removing a member deletes the field |
//! | `<p>:msgs:<cid>` | sorted set | the timeline: score = `seq`, member = the message as JSON, every field of `chat_core::model::Message` but `seq` and `reactions` (ids as strings). An edit or delete replaces the member at the same score; a delete leaves a tombstone (`deleted: true`, content and media emptied, reactions removed) |
//! | `<p>:reactions:<cid>` | hash | `<seq>` → the message's reactions as the JSON of `Vec<chat_core::model::Reaction>` (`[{"key":"👍","users":["alice","bob"]}]`); no field when none. Every read of a message merges them in |
//! | `<p>:changes:<cid>` | sorted set | the compacted change log: member = what changed, `m:<seq>` (a message), `k:<user>` (a member's markers), `j:<user>` (a membership); score = the position of its latest change. Recording a change `ZADD`s its member, which moves it: one entry per thing, whatever the number of changes |
//! | `<p>:ids:<cid>` | hash | `<mid>` → `seq` (lookups by message id) |
//! | `<p>:idem:<cid>` | hash | `<len>:<sender>:<client_msg_id>` → `seq` (`<len>` is the sender's length in bytes): the idempotency keys of `append` |
//! | `<p>:sent:<cid>:<user>` | sorted set | seqs of `<user>`'s messages in `<cid>` that are not deleted (member = score = seq), for unread counts |
//! | `<p>:deleted:<cid>` | sorted set | seqs of the deleted messages of `<cid>` (member = score = seq), for unread counts |
//! | `<p>:user:<user>:convs` | sorted set | `<user>`'s conversations, all at score 0 so they sort by member: `<last_activity zero-padded to 20 digits>:<cid>`. Most recent activity first is `ZREVRANGEBYLEX`; a page after cursor `c` starts below `(<c padded>`. (Snowflakes exceed 2^53, so they cannot be exact scores.) |
//! | `<p>:direct:<pair>` | string | the conversation id of the direct conversation of a pair; `<pair>` is `chat_core::model::direct_key` (`<len>:<smaller user>:<larger user>`) |
//!
//! Costs: `append` is O(log n + members) (it moves the conversation in every member's list);
//! `history` and `messages_after` are one script (`ZREVRANGEBYSCORE`/`ZRANGEBYSCORE … LIMIT`
//! and one `HGET` of the reactions per message), O(log n + page); `unread` is O(log n) (three
//! counts, no scan, no cap); `member` is one `HGET`; a `list_conversations` page is one script,
//! O(log n + page × (members + log n)); `react` is one script, O(log n + reactions).
//!
//! ## Redis: atomicity, consistency, cluster
//!
//! Every mutation that touches several keys is one Lua script run with `EVALSHA` (loaded again
//! automatically after a server restart), so Redis runs it without interleaving anything else:
//!
//! | script | what it does atomically |
//! |---|---|
//! | append | conversation exists (`NotFound`), sender is a member (`NotMember`), idempotency key already there → the original message with `duplicate = true`; otherwise `seq = last_seq + 1`, store the message, its id and its idempotency key, move `last_activity` and the conversation's entry in every member's list |
//! | create | for a direct pair whose conversation exists: return it, restoring a member who left; otherwise create the hash (with a new stream: a fresh epoch, position 0), the members (markers at 0), their list entries and the pair key |
//! | add members / remove member | check the conversation (and, for a direct one, the pair), add members with both markers at the current `last_seq` / remove the member and their list entry |
//! | set marker | forward only, clamped to `last_seq`, read implies delivered |
//! | replace message | the write half of `change_message`: replace the message at a seq only if it is still exactly the JSON that was read, and update the deleted-seq sets (a delete also removes the reactions) |
//! | react | `chat_core::model::apply_reaction`'s rule, check by check in its order: conversation, membership (`NotMember`), message, not deleted, key (its syntax checked by the caller), at most 32 keys; then the reactions and the position |
//! | stream / changes after | the stream's epoch and position / one page of the change log with the current state of each entry, as one snapshot |
//! | list | one page of a user's list with each conversation, the user's unread count and the newest message, as one consistent snapshot |
//!
//! Every script that changes something a client renders (append, replace message, react, set
//! marker, add members, remove member, and create when it restores a direct member) also takes the
//! conversation's next change-stream position (`HINCRBY position`) and moves the item's entry in
//! the change log, in the same script: positions are gap-free and in the order of the changes
//! across every node. See [`RedisStore`]'s docs for the stream's costs and retention.
//!
//! `change_message` is a compare-and-set: it reads the message, checks the sender
//! (`Forbidden`), applies `MessageChange::apply` (the same code as every other backend, so a
//! deleted message is `Invalid`) and writes with the replace script, re-reading on a concurrent
//! change. Scripts never decode message JSON (`cjson` would turn 64-bit numbers into doubles):
//! they store and compare it verbatim, and keep Snowflakes as strings. Reactions, which hold
//! only strings, are apart from the message so that the react script can decode and rewrite
//! them: a reaction is one atomic script, never a compare-and-set that could lose to
//! concurrent reactions on a popular message.
//!
//! The scripts declare the conversation's keys in `KEYS`, but build the keys of each member's
//! list (and, for `list`, of each listed conversation) from the prefix, because those are only
//! known inside the script. **`RedisStore` therefore needs a standalone Redis (or a primary
//! with replicas), not Redis Cluster.** Every other command is a single-key read.
//!
//! ## Redis: durability
//!
//! `append` returns (and the engine acks the message) once the script has run, i.e. once the
//! message is in the memory of the Redis primary. How much survives a crash is the server's
//! persistence setting, chosen by the operator:
//!
//! * `appendonly yes` + `appendfsync always`: the write is in the AOF on disk before Redis
//!   replies, so an acked message survives a crash of the Redis process or machine. This is the
//!   setting that keeps the "durable before ack" promise; the tests check it by killing Redis
//!   (`SIGKILL`) and reading the timeline back.
//! * `appendonly yes` + `appendfsync everysec` (Redis's default AOF policy): up to about a
//!   second of acked messages can be lost in a machine crash (not in a process crash).
//! * RDB snapshots only, or no persistence: everything since the last snapshot is lost.
//!
//! With replicas, a failover may lose writes not yet replicated (Redis replication is
//! asynchronous); a host that needs more can wrap the store to call `WAIT` after writes.
//!
//! ## Redis: availability
//!
//! [`RedisStore`] keeps one multiplexed connection that reconnects by itself (the connection
//! layer of `chat-redis`, shared with `chat-presence`: the same [`RedisOptions`], deadlines,
//! retry rule and errors). While Redis is down every operation fails with
//! `Error::Unavailable { backend: "redis", .. }` within [`RedisOptions::op_timeout`] (2 s by
//! default) instead of hanging; operations succeed again as soon as Redis is back. A call that
//! hit a dropped connection is sent once more on the new one (and once more after loading the
//! scripts again, which a restarted Redis has lost), within the same deadline. A failed `append` may or may not have been applied
//! (the reply was lost): retrying it with the same `client_msg_id` is safe, which is what
//! idempotent sends are for.

//!
//! ## ScyllaDB / Cassandra: tables
//!
//! Every table is in the keyspace of [`ScyllaStoreOptions::keyspace`]; ids are `bigint`
//! Snowflakes, users `text`, seqs `bigint`. The schema is created at start (`CREATE … IF NOT
//! EXISTS`) and versioned in `schema_version` (row `'schema'`: `version` = [`SCHEMA_VERSION`],
//! `bucket_size`); a store refuses a keyspace of a newer version.
//!
//! | table | primary key | content |
//! |---|---|---|
//! | `messages` | `((conversation_id, bucket), seq)`, `seq DESC` | the timeline: every field of a message, its `reactions` (JSON) and `rev`/`claimed_rev` (change stream); written by `INSERT … IF NOT EXISTS`, edits, deletes and reactions by `UPDATE … IF version = ? AND rev = ?` |
//! | `idempotency` | `((conversation_id, sender_id, client_msg_id))` | the claim of a send: `message_id`, the `seq` it is written at, and its content |
//! | `message_ids` | `((conversation_id, message_id))` | → `seq` (lookups by id) |
//! | `conversations` | `(id)` | kind, name, created_at, direct pair; `last_seq`, `last_activity`; the stream's `epoch` and `head` hint |
//! | `members` | `(conversation_id, user_id)` | role, joined_at |
//! | `markers` | `(conversation_id, user_id)` | `read_seq`, `delivered_seq`, `claimed_sum` (change stream) |
//! | `user_conversations` | `(user_id, conversation_id)` | the user's conversations |
//! | `direct_pairs` | `(pair_key)` | the direct conversation of a pair (`chat_core::model::direct_key`), claimed by LWT |
//! | `sent` | `((conversation_id, sender_id), seq)` | seqs of the sender's undeleted messages (unread counts) |
//! | `deleted` | `(conversation_id, seq)` | seqs of deleted messages (unread counts) |
//! | `changes` | `((conversation_id, bucket), position)` | the change stream: what changed at each position (`m:<seq>`, `k:<user>` markers, `j:<user>` membership); written by `INSERT … IF NOT EXISTS` |
//! | `change_latest` | `(conversation_id, item)` | → the position of the item's latest change (max-wins) |
//!
//! **Buckets.** `bucket = (seq - 1) / bucket_size`, [`DEFAULT_BUCKET_SIZE`] = 512 seqs per
//! partition, so the partition of any seq is computable without a lookup, and a partition holds
//! at most 512 messages: about 32 MiB at the 64 KiB content limit, ~0.25 MiB for typical
//! 500-byte messages, well under the 100 MB where large partitions start to hurt. `history` and
//! `messages_after` walk from bucket to bucket (a page may read several partitions). The size is
//! fixed per keyspace at creation (stored in `schema_version`).
//!
//! **Append** (the only multi-step write), per message, in-process serialized per conversation
//! (1,024 lock shards) so one node's appends never compete with each other:
//!
//! 1. Read the conversation row (`NotFound`) and the member row (`NotMember`).
//! 2. *Claim*: `INSERT INTO idempotency … IF NOT EXISTS` with this attempt's message id, content
//!    and `seq = last_seq + 1` (`last_seq` from the conversation row, never above the truth).
//!    Not applied → a previous attempt (another node, a crashed one) owns the key: continue
//!    with *its* claim and answer `duplicate = true`.
//! 3. `INSERT INTO messages … IF NOT EXISTS` of the claimed message at the claim's seq. Taken by
//!    another message → find the real last seq, move the claim with `UPDATE idempotency SET seq
//!    = last + 1 … IF seq = <old>` and try again ([`ScyllaStoreOptions::append_attempts`], then
//!    `Error::Conflict`).
//! 4. The writes that follow, all idempotent: `message_ids`, `sent`, and `conversations.last_seq
//!    / last_activity` written `USING TIMESTAMP <seq>` so the highest seq wins whatever order
//!    writes arrive in (max-wins without a read).
//!
//! Why it is gap-free: a message row is only ever written at `last + 1` or below it (a taken
//! seq is refused by the conditional insert), so no seq is allocated without its row being
//! written in the same statement; there is no counter to leave behind. Why it is idempotent
//! across nodes and crashes: the message of a claim is only written at the claim's current seq,
//! and a claim only moves away from a seq that holds another message, so a claim's message is
//! stored at most once; a retry that finds a claim whose row is missing (the node crashed
//! between steps 2 and 3) writes the claimed message itself, at the claimed seq. The window: a
//! crash between 3 and 4 leaves the message in history and sync but not yet findable by id and
//! not yet in the conversation's `last_seq` (`last_seq()` reads past it: it probes the
//! partitions); since the sender never got the ack it retries, and the retry finds the row and
//! redoes step 4. Each window is exercised by a test that writes the rows a crashed node would
//! leave (`tests/scylla_store.rs`).
//!
//! Other windows, each closed by retrying the same call: a `change_message` delete that
//! crashed after the message row was updated but before the `deleted`/`sent` index writes
//! leaves unread counts one too high; retrying the delete answers `Invalid` (already deleted)
//! and writes the index rows first. A conversation whose creation crashed before its
//! `conversations` row exists is invisible (`conversation` is `None`, lists skip it), but
//! `conversation_ids` of its members may still name it; a direct conversation's creation is
//! finished by the next `create_conversation` of the pair.
//!
//! **Markers** are written `USING TIMESTAMP <marker seq>` (max-wins: a marker never moves back,
//! even under concurrent receipts from two nodes, without LWT); a member added later gets both
//! markers at the current last seq, which wins over the markers of an earlier membership.
//! `MarkerUpdate::moved` is computed from a read before the write, so two nodes moving the
//! same marker at once may both report a move (a duplicate receipt; the stored marker is right).
//! **Unread** = `last_seq − read − (own undeleted messages after read) − (deleted messages after
//! read)`: two `COUNT`s over the small `sent` and `deleted` partitions, never a timeline scan.
//! **Conversation list**: the user's `user_conversations` partition plus one single-row read
//! per conversation (its `last_activity`), sorted in memory; so a message costs the same
//! writes in a 500-member group as in a direct chat (one conversation row, no per-member
//! write), and a list page costs one read per conversation of the user plus a view per item.
//!
//! **Change stream and reactions** (schema version 2): see below. Costs of `append` (no
//! contention): 3 LWTs (claim, message row, stream position) + 2 single-row reads + 5 plain
//! writes. Reads are at [`ScyllaStoreOptions::consistency`] (`LOCAL_QUORUM`), LWTs at
//! [`ScyllaStoreOptions::serial_consistency`] (`LOCAL_SERIAL`); every statement is prepared, the
//! driver routes token-aware, timelines are read with paging.
//!
//! ## ScyllaDB / Cassandra: the change stream
//!
//! Every change a client renders takes the conversation's next position (the trait's "change
//! stream", `chat_core::store`): a new message, an edit, a delete, a reaction set or removed,
//! a receipt that moved a marker, a join, a leave (also a direct member restored by
//! `create_conversation`). The order is **effect first, then the position**:
//!
//! 1. The change itself, as before (the message's conditional insert, the edit's CAS, the
//!    marker's max-wins write, the member's LWT, the reaction's CAS).
//! 2. *Claim*: `INSERT INTO changes (…, position, item) … IF NOT EXISTS` at `head + 1`, where
//!    `head` is a position known to exist: the last one this node claimed or saw in this
//!    conversation (claims are serialized per conversation in-process, with that cache, so an
//!    uncontended claim needs no read), else the maximum of the `changes` partitions from the
//!    `conversations.head` hint on. Taken (another node) → the taken position exists, so probe
//!    from it and try above; after `max(append_attempts, 16)` attempts `Error::Conflict`.
//! 3. `change_latest[item] = position` and the `head` hint, both `USING TIMESTAMP <position>`
//!    (max-wins, no read). For a message, it is read back (the state as of the position: it
//!    includes every change below it, even one that raced it) and `claimed_rev` is set to its
//!    `rev` (max-wins); for markers, `claimed_sum = read + delivered` as read back.
//!
//! **Why gap-free, across nodes**: a position is only ever inserted right above one that
//! exists, by a conditional insert, so positions appear in order, each once, with no holes,
//! and there is no counter to leave behind. **Why a reader never sees a position before its
//! effect**: the position is claimed after the effect is stored. `stream()` is the epoch plus
//! the probed head; `changes_after(after, limit)` reads the positions `(after, min(after +
//! limit, head)]` (exactly that many rows: no holes), keeps an entry only if
//! `change_latest[item]` is not above it (the item's later entry comes later) and, within the
//! page, the highest entry of each item, then resolves the page in batches (`IN` queries: the
//! messages of each bucket, the members, the markers): the current message with its
//! reactions, the member's markers (skipped once they left), whether the user is a member.
//! `next` is `after + limit` while that is below the head.
//!
//! **Buckets** of `changes`: `position / (8 × bucket_size)` = 4,096 positions per partition by
//! default. A change row is ~50 bytes, so a partition stays under ~0.5 MiB; a conversation
//! takes a few positions per message (the message, receipts, reactions), so 8× the messages'
//! bucket keeps the number of partitions of the two tables of the same order, and a typical
//! catch-up reads one or two.
//!
//! **Epoch**: random (`StreamPosition::new_epoch`), written at creation by `UPDATE … IF epoch =
//! null` before the conversation row becomes visible (a node finishing a crashed creation keeps
//! the first epoch). A conversation from schema version 1 gets one the same way on its first
//! `stream`/`changes_after`; its positions then start at 1.
//!
//! **Reactions** are a JSON column of the message row (`Vec<Reaction>`, null when none),
//! changed by `UPDATE … SET reactions = ?, rev = <rev + 1> … IF version = ? AND rev = <rev>` after
//! `chat_core::model::apply_reaction` on the row as read: atomic per message, so one user's
//! reaction never overwrites another's and the 32-key limit holds; a delete clears them in its
//! own CAS; an edit keeps them. Every read path gets them with the row (no extra query).
//! Concurrent reactions to one message are serialized by that CAS (16 attempts, then
//! `Conflict`, which is transient).
//!
//! **Crash windows** (an effect stored, its position not claimed): a retried `append` whose
//! original has no `change_latest` entry claims the position and returns it (`duplicate`,
//! `position: Some`); a message whose `rev` is above its `claimed_rev` (a crashed edit, delete
//! or reaction) gets its position from the next `react` or delete that changes nothing (the
//! retry of that call), and any later change of it covers it too; a marker whose `read +
//! delivered` is above `claimed_sum` gets its position from the next receipt that does not
//! move it (reported as `moved: true`). **Remaining**: a crashed join or leave has no position
//! until that user's membership changes again (a retried `add_members`/`remove_member` finds
//! nothing to do and cannot tell a crashed call from a finished one without a column on a row
//! that a leave deletes); clients that missed it see the member list when they next load the
//! conversation. And a change whose retry never comes has no position until its item changes again:
//! a client that was online got the live event; one that was offline misses it in `sync`
//! (acceptable for receipts and reactions, the cost of not paying a second LWT per change).
//! Also: two nodes doing the same no-op retry at once, or a no-op racing a change between its
//! two steps, may claim one extra position for the same item (never a hole or a duplicate);
//! a reader between a claim and its `change_latest` write may get an item on two pages (its
//! current state both times). Members from schema version 1 take one extra marker position on
//! their first receipt that does not move a marker.
//!
//! **Cost in LWTs** (Paxos rounds; uncontended, measured by `ScyllaStore::lwt_count` in
//! `tests/scylla_store.rs`): a new message 3 (was 2), a retried one 1, a receipt that moves a
//! marker 1 (was 0), one that does not 0, a reaction 2, the same reaction again 0, an edit or
//! delete 2 (was 1), a join 2 (was 1) per user, a leave 2 (was 1), a conversation's creation 1
//! more (the epoch). Each change also writes 2–3 small plain rows (`change_latest`, the head
//! hint, `claimed_rev`/`claimed_sum`) and reads its row back once. The log is not compacted: a
//! replay from position P reads every change after P (one ~50-byte row each), even of items
//! that changed again later.
//!
//! ## ScyllaDB / Cassandra: availability and errors
//!
//! While the cluster is unreachable every operation fails within
//! [`ScyllaStoreOptions::operation_timeout`] with `Error::Unavailable { backend: "scylla", .. }`
//! (transient; the gateway answers 503 with `Retry-After`); a rejected statement is
//! `Error::Internal`. A failed `append` may or may not have been stored: retrying with the same
//! `client_msg_id` returns the original. The driver reconnects by itself. Durability is the
//! cluster's: with replication factor 3 and `LOCAL_QUORUM`, an acked message is on two replicas'
//! commit logs (`commitlog_sync: periodic` fsyncs every 10 s by default; ScyllaDB writes LWT
//! mutations with a synchronous commit log).
//!
//! ## ScyllaDB vs Cassandra: what was verified where
//!
//! Verified on Apache Cassandra 5.0.9 (single node, the tests of this crate and of the examples):
//! the schema, LWT (`IF NOT EXISTS`, `IF col = ?`, `IF EXISTS`), `USING TIMESTAMP`, paging, the
//! whole conformance suite, two stores racing on one conversation, the crash windows, a node
//! killed and restarted mid-traffic. **Not run on ScyllaDB** (no ScyllaDB binary could be
//! installed where this was built); from ScyllaDB's documentation: LWT is not supported in
//! keyspaces with tablets, which recent ScyllaDB versions enable by default, so on ScyllaDB the
//! keyspace is created with `tablets = {'enabled': false}` (see [`Tablets`]; ScyllaDB is
//! detected by its `system.scylla_local` table); ScyllaDB returns the old row on every
//! conditional statement (Cassandra only when not applied), which the store handles by reading
//! LWT results by column name. An existing keyspace is never altered.

#[cfg(feature = "redis")]
mod redis_store;

#[cfg(feature = "redis")]
pub use chat_redis::RedisOptions;
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;

#[cfg(feature = "scylla")]
mod scylla_store;

#[cfg(feature = "scylla")]
pub use scylla_store::{
    Consistency, DEFAULT_BUCKET_SIZE, Replication, SCHEMA_VERSION, ScyllaStore, ScyllaStoreOptions,
    SerialConsistency, Tablets,
};
