//! # chat-redis
//!
//! The Redis connection layer shared by the chat SDK's Redis backends: `RedisStore`
//! (`chat-store`, feature `redis`), `RedisPresence` and `RedisRouter` (`chat-presence`). It
//! implements none of `chat-core`'s traits; it is how those backends talk to Redis, so that
//! they all connect, time out, retry and fail the same way.
//!
//! | piece | what it does |
//! |---|---|
//! | [`RedisOptions`] | the one options type of every Redis backend: deadlines, reconnect backoff, pub/sub ping, presence sweep |
//! | [`RedisConnection`] | the command connection: multiplexed, reconnecting, a deadline on every call, the one retry rule, scripts by `EVALSHA` |
//! | [`Script`] | a Lua script run by its SHA1, loaded at connect and again after `NOSCRIPT` |
//! | [`connect_pubsub`] | a dedicated pub/sub connection, opened within the deadline |
//! | [`map_error`], [`unavailable`], [`timed_out`], [`client`] | Redis failures as [`chat_core::Error`] |
//! | [`redis`] | the `redis` client crate itself, re-exported so that every backend builds against the same version and features |
//!
//! ## Rules every Redis backend gets from here
//!
//! * **Deadlines.** Connecting and every call finish within [`RedisOptions::op_timeout`]
//!   (default 2 s), or fail with `Error::Unavailable { backend: "redis", .. }`: nothing hangs
//!   while Redis is down, unreachable or silent.
//! * **Retry once, and only for two reasons.** A call that hit a dropped connection (the
//!   server restarted) is sent once more on the reconnected connection; a call answered
//!   `NOSCRIPT` (the server's script cache is empty after a restart or `SCRIPT FLUSH`) is sent
//!   once more after the scripts are loaded again. Each at most once per call, within the same
//!   deadline. Every call must therefore be safe to repeat.
//! * **Errors.** [`map_error`] turns the `CHAT_*` error replies of the SDK's Lua scripts into
//!   the matching domain error (`NotFound`, `NotMember`, …) and everything else into
//!   `Unavailable` (for which [`chat_core::Error::is_transient`] is true).
//!
//! ## Example
//!
//! ```no_run
//! use chat_redis::{RedisConnection, RedisOptions, Script};
//!
//! # async fn demo() -> chat_core::Result<()> {
//! let incr = Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
//! let client = chat_redis::client("redis://127.0.0.1:6379/")?;
//! let conn = RedisConnection::connect(&client, &RedisOptions::default(), &[&incr]).await?;
//! let mut call = incr.call(&["counter"]);
//! call.arg(5);
//! let n: i64 = conn.query("incr", &call).await?;
//! # let _ = n;
//! # Ok(()) }
//! ```
//!
//! ## Dependency rule
//!
//! This crate depends on `chat-core` and the `redis` client only. Backend crates depend on
//! `chat-core` and on this layer, never on each other (see "Crates and dependency rules" in
//! `docs/architecture.md`).

mod connection;
mod error;
mod options;

pub use connection::{Query, RedisConnection, Script, connect_pubsub};
pub use error::{BACKEND, client, is_connection_error, map_error, timed_out, unavailable};
pub use options::RedisOptions;
pub use redis;
