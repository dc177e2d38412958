//! The engine: [`Chat`] composes a [`MessageStore`](crate::MessageStore), a
//! [`Router`](crate::Router) and a [`PresenceTracker`](crate::PresenceTracker) and runs every
//! command of the protocol for the [`Session`]s a transport connects.
//!
//! The life of a send (see `docs/architecture.md`): hooks (rate limit, host rules) → validation
//! (size, kind, media) → `MessageStore::append` (membership check, seq, idempotency) → `message_ack`
//! to the sender → one [`Frame`](crate::Frame) queued to every local member connection (except the
//! sending one) and one envelope per conversation published to the other nodes → push worker
//! for members with no live device.

mod chat;
mod config;
mod push;
mod registry;
mod session;
mod stats;
mod typing;

pub use chat::{Chat, ChatBuilder};
pub use config::ChatConfig;
pub use registry::{CloseReason, DirectWrite, OutboundWaker};
pub use session::{Batch, Outbound, Session};
pub use stats::StatsSnapshot;
