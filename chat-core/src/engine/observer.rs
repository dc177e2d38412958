//! [`EngineObserver`]: how counters, metrics and a host's own instrumentation see what the
//! engine does, without the command code carrying any of them.
//!
//! The engine reports each [`EngineEvent`] at one place (a connection opened, a command ran
//! or failed, a message was stored, a fan-out delivered frames…). Its own counters
//! ([`Chat::stats`](crate::Chat::stats), read by `/metrics`) are one observer; a host adds
//! others with [`ChatBuilder::observer`](crate::ChatBuilder::observer).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use chat_core::{Chat, engine::{EngineEvent, EngineObserver}};
//!
//! #[derive(Debug, Default)]
//! struct Failures(AtomicU64);
//! impl EngineObserver for Failures {
//!     fn observe(&self, event: &EngineEvent<'_>) {
//!         if let EngineEvent::CommandFailed { .. } = event {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }
//! }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chat_core::Error> {
//! let failures = Arc::new(Failures::default());
//! let chat = Chat::builder().observer(failures.clone()).build().await?;
//! # Ok(()) }
//! ```

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::Error;
use crate::id::{ConnectionId, UserId};
use crate::model::Message;

/// Something the engine did. Observers must be quick: they run inline, on the engine's tasks.
#[derive(Debug)]
#[non_exhaustive]
pub enum EngineEvent<'a> {
    /// A device connected.
    Connected {
        /// Who.
        user: &'a UserId,
        /// Its connection.
        connection: ConnectionId,
    },
    /// A device's session ended.
    Disconnected {
        /// Its connection.
        connection: ConnectionId,
    },
    /// A command arrived (before hooks and checks).
    Command {
        /// The connection it came from.
        connection: ConnectionId,
    },
    /// A command failed; the client gets an `error` frame with the error's code.
    CommandFailed {
        /// The connection it came from.
        connection: ConnectionId,
        /// Why.
        error: &'a Error,
    },
    /// A new message was stored (a retried send is not reported again).
    MessageStored {
        /// The message.
        message: &'a Message,
    },
    /// A fan-out handed frames to local connections (written directly or queued).
    Delivered {
        /// How many connections got the frame.
        frames: usize,
        /// A message fan-out whose writes were left to the connections' writer tasks because
        /// the conversation was busy (see [`crate::transport::direct`]).
        to_writers: bool,
    },
    /// A reply (ack, error, sync page, presence) was queued to the connection that asked.
    Replied {
        /// The connection.
        connection: ConnectionId,
    },
    /// A connection fell too far behind and is being cut.
    SlowConsumer {
        /// Whose.
        user: &'a UserId,
        /// Which.
        connection: ConnectionId,
    },
    /// Publishing to the other nodes failed (live delivery there is lost; sync recovers it).
    RouterError {
        /// Why.
        error: &'a Error,
    },
}

/// Sees every [`EngineEvent`]. Added with
/// [`ChatBuilder::observer`](crate::ChatBuilder::observer).
pub trait EngineObserver: Send + Sync + Debug + 'static {
    /// Called inline for every event: keep it short and non-blocking.
    fn observe(&self, event: &EngineEvent<'_>);
}

/// A shared observer.
pub type DynEngineObserver = Arc<dyn EngineObserver>;

impl<T: EngineObserver + ?Sized> EngineObserver for Arc<T> {
    fn observe(&self, event: &EngineEvent<'_>) {
        (**self).observe(event);
    }
}
