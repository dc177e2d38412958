//! One connection's view of the engine: [`Session`] takes commands, [`Outbound`] yields frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::Chat;
use super::registry::{CloseReason, ConnHandle, ConnShared, DirectWrite, Out, OutboundWaker};
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
        self.conn.shared.token.cancelled()
    }

    /// Why the engine closed the connection, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.close_reason()
    }

    /// Asks the outbound side to close the connection for `reason` (the first reason wins; a
    /// writer sees it in [`Outbound::recv_batch`]). Transports call it with
    /// [`CloseReason::Disconnected`] when the client side ended, to stop their writer.
    pub fn request_close(&self, reason: CloseReason) {
        self.conn.request_close(reason);
    }

    /// Registers the transport's synchronous write path for this connection (see
    /// [`DirectWrite`]); false if one is registered already.
    pub fn set_direct_write(&self, direct: Arc<dyn DirectWrite>) -> bool {
        self.conn.set_direct_write(direct)
    }

    /// A handle that wakes this connection's writer (for a [`DirectWrite`] that left work for
    /// it).
    pub fn outbound_waker(&self) -> OutboundWaker {
        self.conn.outbound_waker()
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

/// Frames for one connection: replies to its own commands and fan-out from others, in the
/// order the engine queued them (one queue). A transport drains it with
/// [`Outbound::recv_batch`] (or [`Outbound::recv_many`]) and writes each batch with one flush.
#[derive(Debug)]
pub struct Outbound {
    queue: mpsc::UnboundedReceiver<Out>,
    /// The queue bounds (given back as frames are taken) and the close request.
    shared: Arc<ConnShared>,
}

/// What [`Outbound::recv_batch`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    /// This many frames were appended to the buffer (0: the writer was woken with nothing to
    /// take, see [`OutboundWaker`]).
    Frames(usize),
    /// The connection is to be closed, for this reason (also [`Session::close_reason`]).
    CloseRequested(CloseReason),
    /// The session is gone and every frame was drained.
    Ended,
}

impl Outbound {
    pub(crate) fn new(queue: mpsc::UnboundedReceiver<Out>, shared: Arc<ConnShared>) -> Self {
        Self { queue, shared }
    }

    /// The frame of a queue item, returning a reply's permit; `None` for a wake-up.
    fn frame(&self, item: Out) -> Option<Arc<Frame>> {
        match item {
            Out::Live(f) => {
                self.shared.took_live();
                Some(f)
            }
            Out::Reply(f) => {
                self.shared.took_reply();
                Some(f)
            }
            Out::Wake => {
                self.shared.took_wake();
                None
            }
        }
    }

    /// For writers: waits for frames or a close request. A close request is reported before
    /// any further frame is taken (frames already queued stay queued, e.g. for a flush on
    /// [`CloseReason::Shutdown`]); otherwise takes every ready frame up to `limit` into `buf`.
    /// This is the writer's only wait: no separate close future is polled per batch.
    pub async fn recv_batch(&mut self, buf: &mut Vec<Arc<Frame>>, limit: usize) -> Batch {
        if let Some(reason) = self.shared.reason() {
            return Batch::CloseRequested(reason);
        }
        let Some(item) = self.queue.recv().await else {
            return Batch::Ended;
        };
        match self.frame(item) {
            Some(first) => buf.push(first),
            // A wake-up: a close request, or work the transport left for its writer.
            None => {
                return match self.shared.reason() {
                    Some(reason) => Batch::CloseRequested(reason),
                    None => Batch::Frames(0),
                };
            }
        }
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

    /// A token cancelled once the connection is asked to close (a child of the connection's
    /// own: cancelling it affects nothing else). For writers that wait on it while they hold
    /// `&mut self` elsewhere.
    pub fn close_signal(&self) -> tokio_util::sync::CancellationToken {
        self.shared.token.child_token()
    }

    /// Resolves once the connection is asked to close (for a writer blocked on a full socket).
    pub async fn close_requested(&self) {
        self.shared.token.cancelled().await;
    }

    /// True when no frame (and no wake-up) is queued. A transport with a [`DirectWrite`] checks
    /// it under its own lock before it lets the engine write directly again.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Why the connection is to be closed, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }

    /// The next frame; `None` once the session is gone and every frame was drained.
    pub async fn recv(&mut self) -> Option<Arc<Frame>> {
        loop {
            let item = self.queue.recv().await?;
            if let Some(f) = self.frame(item) {
                return Some(f);
            }
        }
    }

    /// A frame if one is ready.
    pub fn try_recv(&mut self) -> Option<Arc<Frame>> {
        loop {
            let item = self.queue.try_recv().ok()?;
            if let Some(f) = self.frame(item) {
                return Some(f);
            }
        }
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
