//! The engine: [`Chat`] composes a [`MessageStore`](crate::MessageStore), a
//! [`Router`](crate::Router) and a [`PresenceTracker`](crate::PresenceTracker) and runs every
//! command of the protocol for the [`Session`](crate::Session)s a transport connects.
//!
//! The life of a send (see `docs/architecture.md`), file by file: hooks (rate limit, host
//! rules) in `commands/mod.rs` → validation and `MessageStore::append` (membership check, seq,
//! idempotency) under the conversation's send order in `commands/send.rs` → one
//! [`Frame`](crate::Frame) to every local member connection in `fanout.rs` (through each
//! connection's queue, `transport/outbox.rs`) → `message_ack` to the sender → one envelope per
//! conversation to the other nodes and the push worker (`push.rs`) for members with no live
//! device.
//!
//! | file | what |
//! |---|---|
//! | `builder.rs` | [`ChatBuilder`]: parts, hooks, observers; starts the tasks |
//! | `chat.rs` | [`Chat`]: connections (connect, disconnect), replies |
//! | `commands/` | one file per command: parse → check → apply → reply |
//! | `host.rs` | the host API: conversations, members, history, presence, posting |
//! | `fanout.rs` | local delivery, publish to other nodes, slow consumers, the busy heuristic |
//! | `tasks.rs` | router inbox, session expiry, presence changes, heartbeat, housekeeping |
//! | `expiry.rs` | when each session's credential expires (one ordered map per node) |
//! | `registry.rs` | who is connected here, which conversations have local members |
//! | `observer.rs`, `stats.rs` | [`EngineObserver`] and the engine's own counters |

mod builder;
mod chat;
mod commands;
mod config;
mod expiry;
mod fanout;
mod host;
mod observer;
mod push;
mod registry;
mod stats;
mod tasks;
mod typing;

pub use builder::ChatBuilder;
pub use chat::Chat;
pub use config::ChatConfig;
pub use observer::{DynEngineObserver, EngineEvent, EngineObserver};
pub(crate) use registry::ConnHandle;
pub use stats::StatsSnapshot;
