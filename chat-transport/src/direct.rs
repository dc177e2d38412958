//! The direct write path of a WebSocket connection on a plain TCP socket.
//!
//! The engine offers every frame for the connection to [`TcpWriter`] first
//! ([`DirectWrite`]): when nothing is pending, the frame's ready wire bytes (header and payload,
//! built once per frame and codec and shared by every recipient) are written with one
//! non-blocking `write` on the spot, by the task that produced the frame. No queue, no writer
//! wake-up, no copy into a per-connection buffer. Only when the socket is full, or something is
//! pending, does the frame go to the connection's queue, and the writer task takes over until
//! it has drained the queue and found it empty *under the same lock* that the direct path
//! checks: so a frame never overtakes an earlier one.
//!
//! Reads still go through tokio-tungstenite, over [`ReadSide`]: its writes (pongs, close
//! replies) join the same ordered path.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chat_core::engine::Batch;
use chat_core::{CloseReason, DirectWrite, Frame, Outbound, OutboundWaker};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::metrics::Metrics;
use crate::ws::{CLOSE_PING_TIMEOUT, Closing, ConnState, ConnectionParams, Ended};

/// Most bytes of control frames (pongs, close replies) the reader may leave waiting behind
/// queued data; beyond it the connection is failed (a client flooding pings while not reading).
const MAX_PENDING_CONTROL: usize = 64 * 1024;

/// The write side of one connection.
#[derive(Debug)]
pub(crate) struct TcpWriter {
    sock: OwnedWriteHalf,
    codec: Codec,
    state: Mutex<WriteState>,
    waker: OutboundWaker,
    frames_out: Counter,
    fanout_latency: Histogram,
}

#[derive(Debug)]
struct WriteState {
    /// The writer task owns the socket: something is queued, pending or being written, so
    /// every frame goes to the queue.
    busy: bool,
    /// Bytes to write before anything queued: the rest of a partly written frame, then control
    /// frames from the reader, in order.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    /// The connection is closing: frames are dropped, control writes fail.
    closed: bool,
    /// Frames written directly (to sample the fan-out latency, one in
    /// [`LATENCY_SAMPLE_EVERY`](crate::ws::LATENCY_SAMPLE_EVERY)).
    written: u32,
}

impl TcpWriter {
    pub(crate) fn new(
        sock: OwnedWriteHalf,
        codec: Codec,
        waker: OutboundWaker,
        frames_out: Counter,
        fanout_latency: Histogram,
    ) -> Self {
        Self {
            sock,
            codec,
            // Busy until the writer has drained what was queued before this was registered.
            state: Mutex::new(WriteState {
                busy: true,
                pending: VecDeque::new(),
                pending_bytes: 0,
                closed: false,
                written: 0,
            }),
            waker,
            frames_out,
            fanout_latency,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn socket(&self) -> &OwnedWriteHalf {
        &self.sock
    }

    pub(crate) fn codec(&self) -> Codec {
        self.codec
    }

    /// For the writer: the next pending chunk (the rest of a partly written frame, control
    /// frames), which goes out before anything queued.
    pub(crate) fn take_pending(&self) -> Option<Bytes> {
        let mut st = self.lock();
        let chunk = st.pending.pop_front()?;
        st.pending_bytes -= chunk.len();
        Some(chunk)
    }

    /// For the writer: gives the socket back to the direct path if nothing is pending and
    /// `queue_empty` (called under the lock) says the queue is empty too.
    pub(crate) fn try_idle(&self, queue_empty: impl FnOnce() -> bool) -> bool {
        let mut st = self.lock();
        if st.pending.is_empty() && !st.closed && queue_empty() {
            st.busy = false;
            true
        } else {
            false
        }
    }

    /// For the writer: takes the socket (before writing something of its own).
    pub(crate) fn take(&self) {
        self.lock().busy = true;
    }

    /// For the writer: the connection is closing. Returns what is pending (the rest of a
    /// partly written frame must go out before a close frame).
    pub(crate) fn close(&self) -> Vec<Bytes> {
        let mut st = self.lock();
        st.closed = true;
        st.busy = true;
        st.pending_bytes = 0;
        st.pending.drain(..).collect()
    }

    /// Adds `bytes` to write after what is pending; wakes the writer if it was idle.
    fn defer(&self, st: &mut WriteState, bytes: Bytes) {
        st.pending_bytes += bytes.len();
        st.pending.push_back(bytes);
        if !st.busy {
            st.busy = true;
            self.waker.wake();
        }
    }

    /// A control frame from the reader side (tungstenite's pong or close reply).
    fn write_control(&self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.lock();
        if st.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if st.busy {
            if st.pending_bytes + buf.len() > MAX_PENDING_CONTROL {
                return Err(io::Error::other("too many control frames waiting"));
            }
            self.defer(&mut st, Bytes::copy_from_slice(buf));
            return Ok(buf.len());
        }
        match self.sock.try_write(buf) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => self.defer(&mut st, Bytes::copy_from_slice(&buf[n..])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.defer(&mut st, Bytes::copy_from_slice(buf));
            }
            Err(e) => return Err(e),
        }
        Ok(buf.len())
    }
}

impl DirectWrite for TcpWriter {
    fn write_or_queue(
        &self,
        frame: &Arc<Frame>,
        queue: &mut dyn FnMut(&Arc<Frame>) -> bool,
        may_write: bool,
    ) -> bool {
        let mut st = self.lock();
        if st.closed {
            return true;
        }
        if st.busy {
            return queue(frame);
        }
        if !may_write {
            // The queue's push wakes the writer, which takes it from here.
            st.busy = true;
            return queue(frame);
        }
        let Some(wire) = crate::ws::wire(self.codec, frame) else {
            // Not encodable in this codec: dropped, as on the queued path.
            return true;
        };
        match self.sock.try_write(wire) {
            Ok(n) if n == wire.len() => {}
            Ok(n) => self.defer(&mut st, wire.slice(n..)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                st.busy = true;
                return queue(frame);
            }
            Err(_) => {
                // The socket failed; the reader sees it too and ends the connection.
                st.closed = true;
                return true;
            }
        }
        self.frames_out.inc();
        st.written = st.written.wrapping_add(1);
        if st.written % crate::ws::LATENCY_SAMPLE_EVERY == 1
            && matches!(frame.event(), chat_core::Event::Message { .. })
        {
            self.fanout_latency.observe(frame.age().as_secs_f64());
        }
        true
    }
}

/// Writes all of `bufs` (in order) to the socket, as few system calls as the kernel allows.
pub(crate) async fn write_all(sock: &OwnedWriteHalf, bufs: &[Bytes]) -> io::Result<()> {
    let mut first = 0;
    let mut offset = 0;
    while first < bufs.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&bufs[first][offset..])
            .chain(bufs[first + 1..].iter().map(|b| &b[..]))
            .take(64)
            .map(io::IoSlice::new)
            .collect();
        match sock.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                while n > 0 && first < bufs.len() {
                    let left = bufs[first].len() - offset;
                    if n >= left {
                        n -= left;
                        first += 1;
                        offset = 0;
                    } else {
                        offset += n;
                        n = 0;
                    }
                }
                // Skip empty buffers.
                while first < bufs.len() && bufs[first].len() == offset {
                    first += 1;
                    offset = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The read side handed to tokio-tungstenite: bytes hyper read past the upgrade request first,
/// then the socket. Its writes (pongs, close replies) go through [`TcpWriter`].
#[derive(Debug)]
pub(crate) struct ReadSide {
    pub(crate) pre: Bytes,
    pub(crate) read: OwnedReadHalf,
    pub(crate) writer: Arc<TcpWriter>,
}

impl AsyncRead for ReadSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            if self.pre.is_empty() {
                self.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.writer.write_control(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How a stretch of writing by the writer task ended.
enum Drained {
    /// Everything written; the direct path is open again.
    Idle,
    /// The socket failed or the write deadline passed.
    Failed,
    /// A close was requested while a write waited.
    CloseRequested,
}

/// The writer task of a direct connection: it takes over whenever the direct path left
/// something (queued frames, the rest of a frame, control frames), writes it all, and hands
/// the socket back. It also pings, reaps and closes, like the queued writer.
pub(crate) async fn direct_write_loop(
    w: Arc<TcpWriter>,
    mut outbound: Outbound,
    params: ConnectionParams,
    state: Arc<ConnState>,
    done: CancellationToken,
    metrics: Arc<Metrics>,
) -> Ended {
    // Only used when frames had to be queued: allocated then.
    let mut batch: Vec<Arc<Frame>> = Vec::new();
    let (mut ping, reap_after) = crate::ws::ping_timer(params).await;
    let deadline = tokio::time::sleep(params.write_timeout);
    tokio::pin!(deadline);
    let close = outbound.close_signal();
    // Whatever was queued before the direct path was registered goes first.
    let mut own: Option<Bytes> = None;
    let ended = loop {
        // Boxed: the writer runs only when the direct path left it work, and its futures would
        // otherwise take room in every idle connection's task.
        let drained = Box::pin(guarded(
            drain(
                &w,
                &mut outbound,
                &mut batch,
                own.take(),
                params.write_batch,
            ),
            &close,
            deadline.as_mut(),
            params.write_timeout,
        ))
        .await;
        match drained {
            Drained::Idle => {}
            Drained::Failed => break Ended::Client,
            Drained::CloseRequested => {
                let reason = outbound.close_reason().unwrap_or(CloseReason::Shutdown);
                break Box::pin(direct_close(
                    &w,
                    &mut outbound,
                    &mut batch,
                    reason,
                    params,
                    &state,
                    &metrics,
                ))
                .await;
            }
        }
        tokio::select! {
            biased;
            got = outbound.recv_batch(&mut batch, params.write_batch) => match got {
                Batch::Ended => break Ended::Client,
                Batch::CloseRequested(reason) => {
                    // Boxed (here and above): closing runs once, and its futures would otherwise
                    // take room in every idle writer's task.
                    break Box::pin(direct_close(&w, &mut outbound, &mut batch, reason, params, &state, &metrics)).await;
                }
                // Frames (in `batch`) or a wake-up for pending bytes: the loop drains them.
                Batch::Frames(_) => w.take(),
            },
            _ = ping.tick() => {
                if state.idle() >= reap_after {
                    metrics.zombies_reaped.inc();
                    let _ = Box::pin(finish_with_close(&w, Some((CLOSE_PING_TIMEOUT, "ping timeout")), params.write_timeout)).await;
                    break Ended::PingTimeout;
                }
                w.take();
                own = Some(control_frame(WsFrame::ping(Bytes::new())));
            }
        }
    };
    // However it ended, the direct path is shut: later frames are dropped, not queued.
    let _ = w.close();
    done.cancel();
    ended
}

/// Runs `work` to its end, unless a close is requested or the deadline passes while it waits
/// (the deadline is armed only if the first poll did not finish it: most drains complete at
/// once).
async fn guarded(
    work: impl Future<Output = io::Result<()>>,
    close: &CancellationToken,
    mut deadline: Pin<&mut tokio::time::Sleep>,
    timeout: Duration,
) -> Drained {
    tokio::pin!(work);
    if let Poll::Ready(r) = futures::poll!(work.as_mut()) {
        return if r.is_ok() {
            Drained::Idle
        } else {
            Drained::Failed
        };
    }
    deadline
        .as_mut()
        .reset(tokio::time::Instant::now() + timeout);
    tokio::select! {
        biased;
        r = work => if r.is_ok() { Drained::Idle } else { Drained::Failed },
        _ = close.cancelled() => Drained::CloseRequested,
        _ = &mut deadline => Drained::Failed,
    }
}

/// Writes everything the connection has (pending bytes first, then `own`, then queued frames
/// up to `limit` per system call) until nothing is left, then hands the socket back.
async fn drain(
    w: &TcpWriter,
    outbound: &mut Outbound,
    batch: &mut Vec<Arc<Frame>>,
    mut own: Option<Bytes>,
    limit: usize,
) -> io::Result<()> {
    let mut bufs: Vec<Bytes> = Vec::new();
    loop {
        // A partly written frame must be finished before anything else.
        if let Some(chunk) = w.take_pending() {
            write_all(w.socket(), std::slice::from_ref(&chunk)).await?;
            continue;
        }
        if let Some(bytes) = own.take() {
            write_all(w.socket(), std::slice::from_ref(&bytes)).await?;
            continue;
        }
        if batch.is_empty() {
            while batch.len() < limit.max(1) {
                match outbound.try_recv() {
                    Some(f) => batch.push(f),
                    None => break,
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len();
            bufs.extend(
                batch
                    .drain(..)
                    .filter_map(|f| crate::ws::wire(w.codec(), &f).cloned()),
            );
            write_all(w.socket(), &bufs).await?;
            bufs.clear();
            w.frames_out.inc_by(n as u64);
            continue;
        }
        if w.try_idle(|| outbound.is_empty()) {
            return Ok(());
        }
    }
}

/// Closes a direct connection: flushes what is queued when the server is going away, then
/// the rest of a partly written frame and the close frame with the matching code.
async fn direct_close(
    w: &TcpWriter,
    outbound: &mut Outbound,
    batch: &mut Vec<Arc<Frame>>,
    reason: CloseReason,
    params: ConnectionParams,
    state: &ConnState,
    metrics: &Metrics,
) -> Ended {
    let closing = Closing::for_reason(reason, state, metrics);
    if closing.flush_first {
        let _ = tokio::time::timeout(
            params.write_timeout,
            drain(w, outbound, batch, None, params.write_batch),
        )
        .await;
    }
    let _ = finish_with_close(w, closing.frame, params.write_timeout).await;
    closing.ended
}

/// Closes the direct path, writes what is pending (the rest of a frame) and the close frame.
async fn finish_with_close(
    w: &TcpWriter,
    close: Option<(u16, &'static str)>,
    timeout: Duration,
) -> io::Result<()> {
    let mut bufs = w.close();
    if let Some((code, reason)) = close {
        bufs.push(control_frame(WsFrame::close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        }))));
    }
    match tokio::time::timeout(timeout, write_all(w.socket(), &bufs)).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// The wire bytes of a control frame.
fn control_frame(frame: WsFrame) -> Bytes {
    let mut out = Vec::with_capacity(frame.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut out);
    out.into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A writer on a real loopback socket, plus its engine session (for the waker).
    async fn writer() -> (Arc<TcpWriter>, tokio::net::TcpStream, chat_core::Session) {
        let chat = chat_core::Chat::builder().build().await.unwrap();
        let (session, _outbound) = chat.connect(chat_core::UserId::from("a")).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        let w = Arc::new(TcpWriter::new(
            write,
            Codec::Json,
            session.outbound_waker(),
            Counter::default(),
            Histogram::new([0.1]),
        ));
        (w, client, session)
    }

    fn frame(n: u64) -> Arc<Frame> {
        Arc::new(Frame::new(chat_core::Event::Typing {
            conversation_id: chat_core::ConversationId::from_raw(n),
            user_id: chat_core::UserId::from("u"),
        }))
    }

    #[tokio::test]
    async fn once_anything_is_queued_every_later_frame_is_queued_until_the_writer_hands_back() {
        let (w, _client, _session) = writer().await;
        let queued = std::sync::Mutex::new(Vec::new());
        let mut queue = |f: &Arc<Frame>| {
            queued.lock().unwrap().push(f.clone());
            true
        };
        // Busy from the start: whatever the engine queued before registration goes first.
        assert!(w.write_or_queue(&frame(1), &mut queue, true));
        assert_eq!(queued.lock().unwrap().len(), 1);
        // The writer drained the queue and hands the socket back.
        assert!(w.try_idle(|| true));
        // Idle and allowed: written directly, not queued.
        assert!(w.write_or_queue(&frame(2), &mut queue, true));
        assert_eq!(queued.lock().unwrap().len(), 1);
        // The engine asks for the queue (under load): queued, and the connection turns busy,
        assert!(w.write_or_queue(&frame(3), &mut queue, false));
        // so a later frame that may be written directly still queues behind it.
        assert!(w.write_or_queue(&frame(4), &mut queue, true));
        let ids: Vec<_> = queued
            .lock()
            .unwrap()
            .iter()
            .map(|f| match f.event() {
                chat_core::Event::Typing {
                    conversation_id, ..
                } => conversation_id.get(),
                _ => 0,
            })
            .collect();
        assert_eq!(ids, vec![1, 3, 4]);
        // The writer cannot hand back while its queue is not empty.
        assert!(!w.try_idle(|| false));
        assert!(w.try_idle(|| true));
        // Closed: frames are dropped, not queued, and control writes fail.
        let _ = w.close();
        assert!(w.write_or_queue(&frame(5), &mut queue, true));
        assert_eq!(queued.lock().unwrap().len(), 3);
        assert!(w.write_control(b"x").is_err());
    }

    #[tokio::test]
    async fn control_frames_wait_behind_pending_bytes_and_are_bounded() {
        let (w, _client, _session) = writer().await;
        assert!(w.try_idle(|| true));
        // Busy (something queued): a pong is kept, in order, not written.
        w.take();
        assert_eq!(w.write_control(b"pong").unwrap(), 4);
        assert_eq!(w.take_pending().as_deref(), Some(&b"pong"[..]));
        assert_eq!(w.take_pending(), None);
        // A client flooding pings while not reading cannot grow the backlog without bound.
        let big = vec![0u8; 1024];
        let mut failed = false;
        for _ in 0..(MAX_PENDING_CONTROL / 1024 + 2) {
            if w.write_control(&big).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "control backlog unbounded");
    }
}
