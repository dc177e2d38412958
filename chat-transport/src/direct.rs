//! The direct write path of a WebSocket connection on a plain TCP socket.
//!
//! The engine offers every frame for the connection to a [`DirectWriter`] over [`TcpSocket`]
//! first: when nothing is pending, the frame's ready wire bytes (header and payload, built
//! once per frame and codec and shared by every recipient) are written with one non-blocking
//! `write` on the spot, by the task that produced the frame. No queue, no writer wake-up, no
//! copy into a per-connection buffer. Only when the socket is full, or something is pending,
//! does the frame go to the connection's queue, and the writer task here takes over until it
//! has drained the queue. The ordering rule (a frame never overtakes an earlier one) is kept
//! by chat-core's [`DirectWriter`]: this module only writes through it.
//!
//! Reads still go through tokio-tungstenite, over [`ReadSide`]: its writes (pongs, close
//! replies) join the same ordered path.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chat_core::transport::{Batch, DirectSocket, DirectWriter};
use chat_core::{CloseReason, Frame, Outbound};
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

/// The write half of a connection's TCP socket, as the engine's direct path sees it.
#[derive(Debug)]
pub(crate) struct TcpSocket {
    sock: OwnedWriteHalf,
    codec: Codec,
    frames_out: Counter,
    fanout_latency: Histogram,
    /// Frames written directly (to sample the fan-out latency, one in
    /// [`LATENCY_SAMPLE_EVERY`](crate::ws::LATENCY_SAMPLE_EVERY)).
    written: AtomicU32,
}

impl TcpSocket {
    pub(crate) fn new(
        sock: OwnedWriteHalf,
        codec: Codec,
        frames_out: Counter,
        fanout_latency: Histogram,
    ) -> Self {
        Self {
            sock,
            codec,
            frames_out,
            fanout_latency,
            written: AtomicU32::new(0),
        }
    }
}

impl DirectSocket for TcpSocket {
    fn wire<'f>(&self, frame: &'f Frame) -> Option<&'f Bytes> {
        crate::ws::wire(self.codec, frame)
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.sock.try_write(buf)
    }

    fn written(&self, frame: &Frame) {
        self.frames_out.inc();
        let n = self.written.fetch_add(1, Ordering::Relaxed);
        if n % crate::ws::LATENCY_SAMPLE_EVERY == 0
            && matches!(frame.event(), chat_core::Event::Message { .. })
        {
            self.fanout_latency.observe(frame.age().as_secs_f64());
        }
    }
}

/// The direct path of one connection.
pub(crate) type TcpWriter = DirectWriter<TcpSocket>;

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
                    break Box::pin(direct_close(&w, &mut outbound, &mut batch, reason, params, &state)).await;
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
            write_all(&w.socket().sock, std::slice::from_ref(&chunk)).await?;
            continue;
        }
        if let Some(bytes) = own.take() {
            write_all(&w.socket().sock, std::slice::from_ref(&bytes)).await?;
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
                    .filter_map(|f| crate::ws::wire(w.socket().codec, &f).cloned()),
            );
            write_all(&w.socket().sock, &bufs).await?;
            bufs.clear();
            w.socket().frames_out.inc_by(n as u64);
            continue;
        }
        if w.try_idle(outbound) {
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
) -> Ended {
    let closing = Closing::for_reason(reason, state);
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
    match tokio::time::timeout(timeout, write_all(&w.socket().sock, &bufs)).await {
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
