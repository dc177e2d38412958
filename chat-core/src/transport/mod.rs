//! The per-connection contract: everything a transport needs to serve clients into a
//! [`Chat`](crate::Chat), and nothing of the engine's insides.
//!
//! A transport (the WebSocket gateway in `chat-transport`, the in-process
//! [`InProcessTransport`](crate::memory::InProcessTransport), an SSE or test transport of your
//! own) does four things per connection:
//!
//! 1. **Accept and authenticate**, then [`Chat::connect`](crate::Chat::connect) the user: it
//!    returns a [`Session`] (commands in) and an [`Outbound`] (frames out). A transport whose
//!    credentials expire uses [`Chat::connect_with`](crate::Chat::connect_with) and
//!    [`SessionOptions`]: the engine then refuses commands after the expiry, closes the
//!    connection with [`CloseReason::TokenExpired`] at it, and accepts `refresh` commands
//!    whose token the transport's [`TokenVerifier`] accepts.
//! 2. **Read**: decode each client frame into a [`Command`](crate::Command) and await
//!    [`Session::handle`] before reading the next one (this is what makes one socket's
//!    commands run in order). A frame that does not decode gets [`Session::reply`] with an
//!    `error` event.
//! 3. **Write**: drain the [`Outbound`] with [`Outbound::recv_batch`], encode each
//!    [`Frame`] (the encoding is cached per codec in the frame, so a group message is encoded
//!    once per node, not per recipient) and write the batch with one flush.
//!    [`Batch::CloseRequested`] means the engine wants the connection closed for a
//!    [`CloseReason`] (slow consumer, shutdown, resync, token expired, revoked); the transport
//!    maps it to its own close code.
//! 4. **End**: when the client goes away, [`Session::request_close`] with
//!    [`CloseReason::Disconnected`] stops the writer, and dropping (or
//!    [`Session::close`]-ing) the session leaves the registry and presence.
//!
//! Optionally, a transport whose socket can be written without waiting registers a
//! [`DirectSocket`] with [`Session::set_direct`]: the engine then writes frames on the spot
//! while the socket has room, and queues them for the writer task only when it is full. The
//! ordering rule that makes this safe is enforced by [`DirectWriter`] (see [`direct`]).
//!
//! The bounds of a connection's queue (`outbound_queue` fan-out frames, `reply_queue`
//! replies; see [`ChatConfig`](crate::ChatConfig)) are kept by the queue itself, so a
//! transport cannot grow the server by reading slowly: it is cut as a slow consumer.
//!
//! There is deliberately no `Transport` trait to implement: nothing in the engine composes a
//! transport (a host mounts it in its own server, e.g. `chat_transport::Gateway` as a tower
//! `Service`), so the contract is this module's types, not a `serve` method.

mod credential;
pub mod direct;
mod frame;
mod outbox;
mod session;

pub use credential::{Credential, DynTokenVerifier, SessionOptions, TokenVerifier};
pub use direct::{DirectSocket, DirectWriter};
pub use frame::{CODEC_SLOTS, Frame};
pub(crate) use outbox::Outbox;
pub use outbox::{Batch, Outbound, OutboundWaker};
pub use session::Session;

/// Why the engine asks a transport to close a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The connection's outbound queue was full: it reads too slowly. It should reconnect and sync.
    SlowConsumer,
    /// The server is shutting down ("going away").
    Shutdown,
    /// Live delivery to this node had a gap (router lag, broker reconnect): reconnect and sync.
    Resync,
    /// The transport ended the connection (the client closed it, the socket failed, or the
    /// transport refused a frame); see [`Session::request_close`].
    Disconnected,
    /// The session's credential expired without a `refresh`: get a fresh token and reconnect
    /// (then `sync`).
    TokenExpired,
    /// The host revoked the user's sessions ([`Chat::revoke_user`](crate::Chat::revoke_user)):
    /// do not reconnect with the same credential.
    Revoked,
}

impl CloseReason {
    /// A short text for close frames and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow consumer",
            Self::Shutdown => "server shutting down",
            Self::Resync => "resync required",
            Self::Disconnected => "disconnected",
            Self::TokenExpired => "token expired",
            Self::Revoked => "session revoked",
        }
    }
}
