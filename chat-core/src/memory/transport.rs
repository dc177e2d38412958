//! [`InProcessTransport`]: clients in the same process, no sockets. Tests use it to drive the
//! engine exactly as a WebSocket client would (commands in, events out, in order); hosts can use
//! it to embed bots or server-side participants.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::Chat;
use crate::error::Result;
use crate::id::{ConnectionId, UserId};
use crate::protocol::{Command, Event};
use crate::transport::{CloseReason, Frame, Outbound, Session, SessionOptions};

/// The in-process transport: [`connect`](InProcessTransport::connect) clients to a [`Chat`].
/// It drives the engine through the same contract as any transport ([`crate::transport`]).
///
/// ```
/// use chat_core::{Chat, Command, Event, memory::InProcessTransport};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::Error> {
/// let transport = InProcessTransport::new(Chat::builder().build().await?);
/// let mut alice = transport.connect("alice").await?;
/// alice.send(Command::Sync { conversations: Default::default(), streams: Default::default() }).await;
/// assert!(matches!(alice.recv().await, Some(Event::SyncDone { .. })));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct InProcessTransport {
    /// The engine clients connect to.
    chat: Chat,
}

impl InProcessTransport {
    /// A transport attached to `chat`.
    pub fn new(chat: Chat) -> Self {
        Self { chat }
    }

    /// The engine.
    pub fn chat(&self) -> &Chat {
        &self.chat
    }

    /// Connects a client authenticated as `user`.
    pub async fn connect(&self, user: impl Into<UserId>) -> Result<InProcessClient> {
        self.connect_with(user, SessionOptions::default()).await
    }

    /// Connects a client with an expiry, a `refresh` verifier or the `session` frame (see
    /// [`Chat::connect_with`]).
    pub async fn connect_with(
        &self,
        user: impl Into<UserId>,
        options: SessionOptions,
    ) -> Result<InProcessClient> {
        let (session, outbound) = self.chat.connect_with(user.into(), options).await?;
        Ok(InProcessClient {
            session: Arc::new(session),
            outbound,
        })
    }
}

/// One in-process client: send commands, receive events in order.
#[derive(Debug)]
pub struct InProcessClient {
    /// The engine side of the connection.
    session: Arc<Session>,
    /// Frames for this client.
    outbound: Outbound,
}

impl InProcessClient {
    /// The user.
    pub fn user_id(&self) -> &UserId {
        self.session.user_id()
    }

    /// The connection id.
    pub fn connection_id(&self) -> ConnectionId {
        self.session.connection_id()
    }

    /// The engine-side session (e.g. to run commands from another task).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Sends a command and waits until the engine has handled it (replies are queued by then).
    pub async fn send(&self, command: Command) {
        self.session.handle(command).await;
    }

    /// The next event; `None` when the connection is closed and drained.
    pub async fn recv(&mut self) -> Option<Event> {
        self.recv_frame().await.map(|f| f.event().clone())
    }

    /// The next frame, shared with the other recipients of the same fan-out.
    pub async fn recv_frame(&mut self) -> Option<Arc<Frame>> {
        if self.session.close_reason().is_some() {
            return self.outbound.try_recv();
        }
        tokio::select! {
            f = self.outbound.recv() => f,
            _ = self.session.closed() => self.outbound.try_recv(),
        }
    }

    /// The next event within `timeout`, else `None`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .ok()
            .flatten()
    }

    /// An event if one is queued now.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.outbound.try_recv().map(|f| f.event().clone())
    }

    /// Every event queued now.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }

    /// Why the engine closed this client, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.session.close_reason()
    }

    /// Disconnects and waits for the engine to forget the connection.
    pub async fn close(self) {
        match Arc::try_unwrap(self.session) {
            Ok(session) => session.close().await,
            Err(shared) => drop(shared),
        }
    }
}
