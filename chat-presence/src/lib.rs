//! # chat-presence
//!
//! The cluster coordination of [`chat_core`] over Redis: several gateway processes sharing one
//! Redis form one chat cluster.
//!
//! | part | type | what it does |
//! |---|---|---|
//! | [`PresenceTracker`](chat_core::PresenceTracker) | [`RedisPresence`] | online / offline / last seen of every user, across nodes; changes published per user |
//! | [`Router`](chat_core::Router) | [`RedisRouter`] | moves events between nodes: one pub/sub channel per conversation and per user |
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | yes | [`RedisPresence`], [`RedisRouter`], [`RedisOptions`] (the `redis` client crate with tokio, connection manager and scripts, through the shared connection layer `chat-redis`) |
//!
//! Without the `redis` feature the crate is empty. Both types need standalone Redis ≥ 5 (tested with 7)
//! (or a Sentinel-managed primary); Redis Cluster is not supported (the presence scripts touch
//! keys they derive from the prefix).
//!
//! ```no_run
//! use std::sync::Arc;
//! use chat_core::presence::{DynPresenceTracker, PresenceConfig};
//! use chat_core::router::DynRouter;
//! use chat_core::{Chat, NodeId};
//! use chat_presence::{RedisPresence, RedisRouter};
//!
//! # async fn run() -> chat_core::Result<()> {
//! let url = "redis://127.0.0.1:6379/";
//! let node = NodeId::new(1)?; // unique per process
//! let config = PresenceConfig::default(); // the same on every node
//! let chat = Chat::builder()
//!     .configure(|c| {
//!         c.node_id = node;
//!         c.presence = config;
//!     })
//!     .router(Arc::new(RedisRouter::connect(url, "chat", node).await?) as DynRouter)
//!     .presence(Arc::new(RedisPresence::connect(url, "chat", node, config).await?) as DynPresenceTracker)
//!     // .store(…) a store every node shares (chat-store's Redis or ScyllaDB store)
//!     .build()
//!     .await?;
//! # drop(chat);
//! # Ok(()) }
//! ```
//!
//! ## Keys and channels
//!
//! Every name starts with the prefix `{p}` given to `connect`, so clusters (and test runs)
//! sharing a server never see each other. `{u}` is a user id, `{c}` a connection id, `{id}` a
//! conversation id.
//!
//! | name | kind | content | lifetime |
//! |---|---|---|---|
//! | `{p}:sess:{u}` | hash | connection id → last heartbeat (Unix ms, server clock) | TTL: refreshed to the presence TTL by every heartbeat |
//! | `{p}:alive:{u}` | string | `1`; expires when `u`'s last session does | TTL = until the newest session's expiry; deleted at the last disconnect |
//! | `{p}:live` | sorted set | users with a session, scored by the newest session's expiry (ms) | user removed when the last session ends |
//! | `{p}:pending` | sorted set | users in their offline debounce, scored by when it is over (ms) | user removed when offline, or on reconnect |
//! | `{p}:seen:{u}` | string | last time `u` was known alive (ms): `last_seen` while offline | kept (like the in-memory tracker, presence must keep answering it) |
//! | `{p}:presence:{u}` | channel | JSON [`Presence`](chat_core::model::Presence) on every status change of `u` | subscribed by nodes that [`watch`](chat_core::PresenceTracker::watch) `u` |
//! | `__keyevent@{db}__:expired` | channel | names of expired keys (Redis keyspace notifications) | subscribed by every `RedisPresence` |
//! | `{p}:t:conv:{id}` | channel | JSON [`Envelope`](chat_core::router::Envelope)s of conversation `id` | subscribed by nodes with an online member |
//! | `{p}:t:user:{u}` | channel | JSON envelopes for `u`'s devices | subscribed by nodes where `u` is connected |
//!
//! A user's status is not stored as such: `u` is online exactly while it is in `{p}:live` or
//! `{p}:pending`. Presence reads (`presence`, `is_connected`) are one pipelined round trip
//! (`TIME` plus `ZSCORE`/`GET` per user) and compute the status at the server's clock, so a
//! read reflects an expiry or a debounce that ended a moment ago even if no node has swept
//! yet. Every change of state is one Lua script (connect/heartbeat, disconnect, sweep), and a
//! transition's `PUBLISH` is part of its script: however many nodes notice the same expiry at
//! once, the online → offline transition happens, and is published, exactly once.
//!
//! ## Offline detection
//!
//! A session stays alive while it is heartbeated within the TTL. The engine heartbeats all of
//! a node's sessions in one call per interval, which is one pipelined round trip (one script
//! call per 128 sessions). The last session of a user ends in one of two ways:
//!
//! * **disconnect**: the disconnect script moves the user from `live` to `pending` (due after
//!   the debounce);
//! * **expiry** (the node crashed or stalled): nobody disconnects, so the deadline must be
//!   noticed. Two mechanisms, both on every node:
//!   1. **keyspace notifications**: `{p}:alive:{u}` expires with the user's last session;
//!      Redis publishes that on `__keyevent@{db}__:expired` and every node sweeps at once. This
//!      needs `notify-keyspace-events` to include `Ex` (checked at connect, see
//!      [`RedisPresence::keyspace_events`]; this crate never changes server configuration).
//!   2. **the sweep**, the safety net: Redis pub/sub is at-most-once (a node reconnecting misses
//!      events), keyspace events may be disabled (managed Redis), and Redis's own expiry of a
//!      key may lag under load. Each node runs a sweep script that settles the users whose
//!      deadline in `{p}:live` or `{p}:pending` has passed and answers when the earliest
//!      deadline comes; the node sleeps until then, at most
//!      [`RedisOptions::sweep_interval`], and is woken earlier by its own disconnects and by
//!      expiry events.
//!
//! An expired user enters `pending` with the debounce counted from the expiry, and
//! `last_seen` is the last heartbeat. A connect or heartbeat during the debounce cancels it
//! without any change (no flap). So a dead node leaves no zombie: once its sessions' TTL and
//! then the debounce have passed, the surviving nodes turn its users offline, the change
//! published once.
//!
//! Why both: notifications alone lose events, and a sweep alone either polls often or detects
//! late; with the sweep sleeping until the earliest known deadline, detection is prompt either
//! way, and a node that is never woken by an event still catches everything within one
//! sweep interval.
//!
//! ## Failures
//!
//! Both types talk to Redis through `chat-redis`, the connection layer every Redis backend of
//! the SDK shares (the same options, deadlines, retry rule and errors as chat-store's
//! `RedisStore`). Every call has a deadline ([`RedisOptions::op_timeout`], default 2 s) and
//! fails with `Error::Unavailable { backend: "redis", .. }` past it: nothing hangs while Redis is
//! down. The command connection reconnects on its own (a call that hit a dropped connection is
//! tried once more, and once more after loading the scripts again if the server lost them).
//! The pub/sub connection is re-established with backoff and every channel subscribed
//! again; [`RedisRouter`] then reports [`Inbound::Lagged`](chat_core::router::Inbound::Lagged)
//! (live delivery had a gap: the engine makes clients resync from the store) and
//! [`RedisPresence`] re-reads its watched users and broadcasts their current presence.
//! A restarted Redis that lost its data loses presence too: the next heartbeats re-create the
//! sessions (their users come back online).
//!
//! ## Session registry
//!
//! The design mentions a registry user → nodes. The router does not need one: a node
//! subscribes to `{p}:t:user:{u}` while `u` is connected to it, so Redis's subscriber lists
//! are that registry, kept exact by the subscriptions themselves (a dead node's subscriptions
//! die with its connection), and publishing to a user reaches exactly the nodes holding their
//! sessions.

#[cfg(feature = "redis")]
mod presence;
#[cfg(feature = "redis")]
mod pubsub;
#[cfg(feature = "redis")]
mod router;
#[cfg(feature = "redis")]
mod scripts;

#[cfg(feature = "redis")]
pub use chat_redis::RedisOptions;
#[cfg(feature = "redis")]
pub use presence::RedisPresence;
#[cfg(feature = "redis")]
pub use router::RedisRouter;
