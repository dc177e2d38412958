//! [`Transport`]: how clients reach the engine.
//!
//! A transport accepts connections, authenticates them, decodes [`Command`](crate::Command)s
//! into [`Session::handle`](crate::Session::handle) and encodes what the session's
//! [`Outbound`](crate::Outbound) receiver yields. A transport that can write without waiting
//! (a socket with room) may also register a [`DirectWrite`](crate::DirectWrite) per session,
//! so frames are written by the task that produced them and only queued when the socket is
//! full. Implementations: [`crate::memory::InProcessTransport`] (tests and embedded hosts, no
//! sockets), `chat_transport::Gateway` (WebSocket + HTTP, with a direct path on TCP).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::Chat;
use crate::error::Result;

/// Serves clients into a [`Chat`].
#[async_trait]
pub trait Transport: Send + Sync + Debug + 'static {
    /// A short name for logs and metrics (`"websocket"`, `"in-process"`).
    fn name(&self) -> &'static str;

    /// Serves `chat` until [`Chat::shutdown`] is called (or the transport fails).
    async fn serve(&self, chat: Chat) -> Result<()>;
}

/// A shared, dynamically chosen transport.
pub type DynTransport = Arc<dyn Transport>;
