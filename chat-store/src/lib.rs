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
//! | ScyllaDB / Cassandra | `ScyllaStore` | `scylla` | planned |
//!
//! ## Feature flags
//!
//! One feature per backend, named after its client crate (which is built with
//! `default-features = false` and only the features used):
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | **yes** | [`RedisStore`] and [`RedisStoreOptions`], on the `redis` crate (tokio, scripts, connection manager) |
//! | `scylla` | no | `ScyllaStore` (planned) |
//!
//! `redis` is a default feature so that `cargo test --workspace` builds and runs the Redis tests;
//! a host that only wants ScyllaDB turns default features off.
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
//! let store = RedisStore::new("redis://127.0.0.1:6379/", "chat").await?;
//! let chat = Chat::builder().store(Arc::new(store)).build().await?;
//! # let _ = chat;
//! # Ok(()) }
//! ```
//!
//! ## Redis: what is stored where
//!
//! `<p>` is the prefix given to [`RedisStore::new`], `<cid>` a conversation id and `<mid>` a
//! message id (decimal Snowflakes), `<user>` a user id as given by the host, `<seq>` a decimal
//! sequence number. Nothing expires; nothing is deleted except as described.
//!
//! | key | type | content |
//! |---|---|---|
//! | `<p>:conv:<cid>` | hash | `kind` (`direct`/`group`), `name` (absent when none), `created_at` (Unix ms), `last_seq`, `last_activity` (Snowflake of the newest message, or the conversation id while empty), `next_order` (join-order counter); direct conversations also `pair_a`, `pair_b` (the two users) |
//! | `<p>:members:<cid>` | hash | member `<user>` → `role:joined_at:order:last_read_seq:last_delivered_seq`, e.g. `owner:1717171717171:0:12:14` (role `owner`/`admin`/`member`; `order` is the join order, which is the order of `Conversation::members`); removing a member deletes the field |
//! | `<p>:msgs:<cid>` | sorted set | the timeline: score = `seq`, member = the message as JSON, every field of `chat_core::model::Message` but `seq` (ids as strings). An edit or delete replaces the member at the same score; a delete leaves a tombstone (`deleted: true`, content and media emptied) |
//! | `<p>:ids:<cid>` | hash | `<mid>` → `seq` (lookups by message id) |
//! | `<p>:idem:<cid>` | hash | `<len>:<sender>:<client_msg_id>` → `seq` (`<len>` is the sender's length in bytes): the idempotency keys of `append` |
//! | `<p>:sent:<cid>:<user>` | sorted set | seqs of `<user>`'s messages in `<cid>` that are not deleted (member = score = seq), for unread counts |
//! | `<p>:deleted:<cid>` | sorted set | seqs of the deleted messages of `<cid>` (member = score = seq), for unread counts |
//! | `<p>:user:<user>:convs` | sorted set | `<user>`'s conversations, all at score 0 so they sort by member: `<last_activity zero-padded to 20 digits>:<cid>`. Most recent activity first is `ZREVRANGEBYLEX`; a page after cursor `c` starts below `(<c padded>`. (Snowflakes exceed 2^53, so they cannot be exact scores.) |
//! | `<p>:direct:<pair>` | string | the conversation id of the direct conversation of a pair; `<pair>` is `chat_core::model::direct_key` (`<len>:<smaller user>:<larger user>`) |
//!
//! Costs: `append` is O(log n + members) (it moves the conversation in every member's list);
//! `history` and `messages_after` are one `ZREVRANGEBYSCORE`/`ZRANGEBYSCORE … LIMIT`,
//! O(log n + page); `unread` is O(log n) (three counts, no scan, no cap); `member` is one
//! `HGET`; a `list_conversations` page is one script, O(log n + page × (members + log n)).
//!
//! ## Redis: atomicity, consistency, cluster
//!
//! Every mutation that touches several keys is one Lua script run with `EVALSHA` (loaded again
//! automatically after a server restart), so Redis runs it without interleaving anything else:
//!
//! | script | what it does atomically |
//! |---|---|
//! | append | conversation exists (`NotFound`), sender is a member (`NotMember`), idempotency key already there → the original message with `duplicate = true`; otherwise `seq = last_seq + 1`, store the message, its id and its idempotency key, move `last_activity` and the conversation's entry in every member's list |
//! | create | for a direct pair whose conversation exists: return it, restoring a member who left; otherwise create the hash, the members (markers at 0), their list entries and the pair key |
//! | add members / remove member | check the conversation (and, for a direct one, the pair), add members with both markers at the current `last_seq` / remove the member and their list entry |
//! | set marker | forward only, clamped to `last_seq`, read implies delivered |
//! | replace message | the write half of `change_message`: replace the message at a seq only if it is still exactly the JSON that was read, and update the deleted-seq sets |
//! | list | one page of a user's list with each conversation, the user's unread count and the newest message, as one consistent snapshot |
//!
//! `change_message` is a compare-and-set: it reads the message, checks the sender
//! (`Forbidden`), applies `MessageChange::apply` (the same code as every other backend, so a
//! deleted message is `Invalid`) and writes with the replace script, re-reading on a concurrent
//! change. Scripts never decode JSON (`cjson` would turn 64-bit numbers into doubles): they store
//! and compare message JSON verbatim, and keep Snowflakes as strings.
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
//! [`RedisStore`] keeps one multiplexed connection that reconnects by itself. While Redis is
//! down every operation fails with `Error::Unavailable { backend: "redis", .. }` within
//! [`RedisStoreOptions::operation_timeout`] (5 s by default) instead of hanging; operations
//! succeed again as soon as Redis is back. A failed `append` may or may not have been applied
//! (the reply was lost): retrying it with the same `client_msg_id` is safe, which is what
//! idempotent sends are for.

#[cfg(feature = "redis")]
mod redis_store;

#[cfg(feature = "redis")]
pub use redis_store::{RedisStore, RedisStoreOptions};

#[cfg(feature = "scylla")]
mod scylla_store;

#[cfg(feature = "scylla")]
pub use scylla_store::{
    Consistency, DEFAULT_BUCKET_SIZE, Replication, SCHEMA_VERSION, ScyllaStore, ScyllaStoreOptions,
    SerialConsistency, Tablets,
};
