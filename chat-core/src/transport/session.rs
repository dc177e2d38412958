//! One connection's view of the engine: [`Session`] takes commands; its
//! [`Outbound`](super::Outbound) yields frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::direct::{DirectSocket, DirectWriter};
use super::{CloseReason, OutboundWaker};
use crate::engine::{Chat, ConnHandle};
use crate::error::Result;
use crate::id::{ConnectionId, UserId};
use crate::protocol::{Command, Event};

/// A connected device. Commands go in through [`Session::handle`]; everything the client should
/// receive comes out of the paired [`Outbound`](super::Outbound). Frames of one session are handled in order when
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

    /// Unix milliseconds at which the session's credential expires (moved by `refresh`);
    /// `None`: never.
    pub fn expires_at(&self) -> Option<u64> {
        self.conn.expiry()
    }

    /// The engine this session belongs to.
    pub fn chat(&self) -> &Chat {
        &self.chat
    }

    /// Executes a command. Failures are answered with an `error` frame on the [`Outbound`](super::Outbound)
    /// (with the `client_msg_id` of a failed send); the session stays usable.
    pub async fn handle(&self, command: Command) {
        self.handle_with_id(command, None).await;
    }

    /// [`Session::handle`] for a command that carried an `id` (see
    /// [`Command::MAX_ID_BYTES`]): a failure's `error` echoes it, and a success is answered
    /// with `ok` carrying it, after the command's other replies (`message_ack`, `sync_done`,
    /// …). With `None` this is `handle`.
    pub async fn handle_with_id(&self, command: Command, id: Option<String>) {
        let client_msg_id = match &command {
            Command::Message(m) => Some(m.client_msg_id.clone()),
            _ => None,
        };
        match self.execute(command).await {
            Ok(()) => {
                if let Some(id) = id {
                    self.reply(Event::Ok { id }).await;
                }
            }
            Err(err) => {
                self.chat
                    .command_failed_with_id(&self.conn, &err, client_msg_id, id)
                    .await;
            }
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

    /// Resolves when the engine wants this connection closed (slow consumer, shutdown, resync,
    /// token expired, revoked);
    /// see [`Session::close_reason`]. The future may be kept (pinned) across a loop and polled
    /// again after it resolved: it stays ready.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.conn.outbox.closed()
    }

    /// Why the engine closed the connection, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.outbox.close_reason()
    }

    /// Asks the outbound side to close the connection for `reason` (the first reason wins; a
    /// writer sees it in [`Outbound::recv_batch`](super::Outbound::recv_batch)). Transports call it with
    /// [`CloseReason::Disconnected`] when the client side ended, to stop their writer.
    pub fn request_close(&self, reason: CloseReason) {
        self.conn.outbox.request_close(reason);
    }

    /// Registers the transport's synchronous write path for this connection (see
    /// [`direct`](super::direct)): from now on the engine offers every frame to the returned
    /// [`DirectWriter`] first. `None` if one is registered already.
    pub fn set_direct<S: DirectSocket>(&self, sock: S) -> Option<Arc<DirectWriter<S>>> {
        let writer = Arc::new(DirectWriter::new(sock, self.conn.outbox.waker()));
        self.conn
            .outbox
            .set_direct(writer.clone())
            .then_some(writer)
    }

    /// A handle that wakes this connection's writer.
    pub fn outbound_waker(&self) -> OutboundWaker {
        self.conn.outbox.waker()
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
