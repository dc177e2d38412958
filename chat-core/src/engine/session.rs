//! One connection's view of the engine: [`Session`] takes commands, [`Outbound`] yields frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::Chat;
use super::registry::{CloseReason, ConnHandle};
use crate::error::Result;
use crate::id::{ConnectionId, UserId};
use crate::protocol::{Command, Event, Frame};

/// A connected device. Commands go in through [`Session::handle`]; everything the client should
/// receive comes out of the paired [`Outbound`]. Frames of one session are handled in order when
/// the transport awaits `handle` before reading the next frame (the WebSocket gateway does).
///
/// Dropping the session disconnects it (presence, registry); [`Session::close`] does the same
/// and waits for it.
#[derive(Debug)]
pub struct Session {
    /// The engine.
    chat: Chat,
    /// The registry's handle of this connection.
    conn: Arc<ConnHandle>,
    /// Set once the disconnect ran, so `Drop` does not run it again.
    closed: AtomicBool,
}

impl Session {
    pub(crate) fn new(chat: Chat, conn: Arc<ConnHandle>) -> Self {
        Self {
            chat,
            conn,
            closed: AtomicBool::new(false),
        }
    }

    /// The authenticated user.
    pub fn user_id(&self) -> &UserId {
        &self.conn.user
    }

    /// This connection's cluster-unique id.
    pub fn connection_id(&self) -> ConnectionId {
        self.conn.id
    }

    /// The engine this session belongs to.
    pub fn chat(&self) -> &Chat {
        &self.chat
    }

    /// Executes a command. Failures are answered with an `error` frame on the [`Outbound`]
    /// (with the `client_msg_id` of a failed send); the session stays usable.
    pub async fn handle(&self, command: Command) {
        let client_msg_id = match &command {
            Command::Message(m) => Some(m.client_msg_id.clone()),
            _ => None,
        };
        if let Err(err) = self.execute(command).await {
            self.chat.inner.stats.count_error(err.code());
            self.reply(Event::error(&err, client_msg_id)).await;
        }
    }

    /// Executes a command and returns its error instead of sending an `error` frame.
    pub async fn execute(&self, command: Command) -> Result<()> {
        self.chat.execute(&self.conn, command).await
    }

    /// Sends an event to this connection only (e.g. a transport-level error for a frame that
    /// could not be decoded). Waits while the reply queue is full.
    pub async fn reply(&self, event: Event) {
        self.chat.reply(&self.conn, event).await;
    }

    /// Resolves when the engine wants this connection closed (slow consumer, shutdown, resync);
    /// see [`Session::close_reason`]. The future may be kept (pinned) across a loop and polled
    /// again after it resolved: it stays ready.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.conn.close.cancelled()
    }

    /// Why the engine closed the connection, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.close_reason()
    }

    /// Disconnects: leaves the registry, tells presence. Idempotent with `Drop`.
    pub async fn close(self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.chat.disconnect(self.conn.id).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let chat = self.chat.clone();
        let id = self.conn.id;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { chat.disconnect(id).await });
            }
            Err(_) => chat.disconnect_local(id),
        }
    }
}

/// Frames for one connection: replies to its own commands and fan-out from others. A transport
/// drains it with [`Outbound::recv_many`] and writes the batch with one flush.
#[derive(Debug)]
pub struct Outbound {
    /// Replies (acks, errors, sync pages).
    replies: mpsc::Receiver<Arc<Frame>>,
    /// Fan-out from other connections.
    live: mpsc::Receiver<Arc<Frame>>,
    /// One item when the engine asks for the connection to be closed.
    control: mpsc::Receiver<()>,
}

/// What [`Outbound::recv_batch`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    /// This many frames were appended to the buffer.
    Frames(usize),
    /// The engine asks for the connection to be closed (see [`Session::close_reason`]).
    CloseRequested,
    /// The session is gone and every frame was drained.
    Ended,
}

impl Outbound {
    pub(crate) fn new(
        replies: mpsc::Receiver<Arc<Frame>>,
        live: mpsc::Receiver<Arc<Frame>>,
        control: mpsc::Receiver<()>,
    ) -> Self {
        Self {
            replies,
            live,
            control,
        }
    }

    /// For writers: waits for frames or a close request, whichever comes first (a close request
    /// wins over queued frames). On frames, takes every ready frame up to `limit` into `buf`.
    /// One wait covers both, so a writer needs no separate close future per batch.
    pub async fn recv_batch(&mut self, buf: &mut Vec<Arc<Frame>>, limit: usize) -> Batch {
        let first = tokio::select! {
            biased;
            Some(()) = self.control.recv() => return Batch::CloseRequested,
            Some(f) = self.replies.recv() => f,
            Some(f) = self.live.recv() => f,
            else => return Batch::Ended,
        };
        buf.push(first);
        let mut n = 1;
        while n < limit.max(1) {
            match self.try_recv() {
                Some(f) => {
                    buf.push(f);
                    n += 1;
                }
                None => break,
            }
        }
        Batch::Frames(n)
    }

    /// Resolves when the engine asks for the connection to be closed (cheap to poll: one
    /// channel). Resolves at most once per request.
    pub async fn close_requested(&mut self) {
        if self.control.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// The next frame; `None` once the session is gone and both queues are drained.
    pub async fn recv(&mut self) -> Option<Arc<Frame>> {
        tokio::select! {
            // Replies first: they are bounded by this connection's own commands, so they cannot
            // starve fan-out for long (and `biased` skips a random draw per frame).
            biased;
            Some(f) = self.replies.recv() => Some(f),
            Some(f) = self.live.recv() => Some(f),
            else => None,
        }
    }

    /// A frame if one is ready.
    pub fn try_recv(&mut self) -> Option<Arc<Frame>> {
        self.replies
            .try_recv()
            .ok()
            .or_else(|| self.live.try_recv().ok())
    }

    /// Waits for at least one frame, then takes every ready frame up to `limit` into `buf`.
    /// Returns how many were added (0 once the session is gone).
    pub async fn recv_many(&mut self, buf: &mut Vec<Arc<Frame>>, limit: usize) -> usize {
        let limit = limit.max(1);
        let Some(first) = self.recv().await else {
            return 0;
        };
        buf.push(first);
        let mut n = 1;
        while n < limit {
            match self.try_recv() {
                Some(f) => {
                    buf.push(f);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }
}
