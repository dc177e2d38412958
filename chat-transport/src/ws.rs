//! The per-connection loop, written against `Sink`/`Stream` of WebSocket messages so it can be
//! driven by a real socket or by channels in tests.
//!
//! Two tasks per connection:
//! * the **reader** decodes frames and awaits [`Session::handle`] for each, in order;
//! * the **writer** drains the session's [`Outbound`] in batches (up to `write_batch` frames),
//!   feeds them to the sink and flushes once per batch; it also pings every `ping_interval` and
//!   reaps the connection when nothing (not even a pong) arrived for `missed_pongs` intervals.
//!
//! Either side ending ends the other. Close codes: 1000 normal, 1001 server going away,
//! 1009 frame too big, 4000 resync required, 4001 slow consumer, 4002 ping timeout, 4003 token
//! expired (refresh and reconnect), 4004 session revoked.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chat_core::transport::Batch;
use chat_core::{CloseReason, Event, Outbound, Session};
use futures::{Sink, SinkExt, Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::codec::Codec;
use crate::direct::{ReadSide, TcpSocket, direct_write_loop};
use crate::metrics::Metrics;

/// Close code: the server needs the client to reconnect and `sync`.
pub const CLOSE_RESYNC: u16 = 4000;
/// Close code: the client read too slowly; reconnect and `sync`.
pub const CLOSE_SLOW_CONSUMER: u16 = 4001;
/// Close code: the client stopped answering pings.
pub const CLOSE_PING_TIMEOUT: u16 = 4002;
/// Close code: the token expired without a `refresh`; get a new token, reconnect and `sync`.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4003;
/// Close code: the host revoked the user's sessions; do not reconnect with the same token.
pub const CLOSE_REVOKED: u16 = 4004;

/// The writer records the fan-out latency of one batch in this many.
pub(crate) const LATENCY_SAMPLE_EVERY: u32 = 8;

/// Per-connection settings.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionParams {
    /// Codec of this connection.
    pub codec: Codec,
    /// Ping period.
    pub ping_interval: Duration,
    /// Intervals without any inbound frame before the connection is reaped.
    pub missed_pongs: u32,
    /// Most frames written before one flush.
    pub write_batch: usize,
    /// Longest a batch write may take before the connection is dropped.
    pub write_timeout: Duration,
}

/// What ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed or the socket failed.
    Client,
    /// The engine asked for it (slow consumer, shutdown, resync).
    Engine(CloseReason),
    /// No frame for too long.
    PingTimeout,
    /// A frame over the size limit.
    TooBig,
}

/// What the reader and the writer of one connection share.
#[derive(Debug)]
pub(crate) struct ConnState {
    base: Instant,
    /// Milliseconds since `base` of the last inbound frame.
    ms: AtomicU64,
    /// Close code the writer sends when the reader ended the connection (0: none).
    close_code: AtomicU16,
}

impl ConnState {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            ms: AtomicU64::new(0),
            close_code: AtomicU16::new(0),
        }
    }
    fn touch(&self) {
        self.ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// The close code the reader asked for (0: none).
    pub(crate) fn close_code(&self) -> u16 {
        self.close_code.load(Ordering::Relaxed)
    }

    pub(crate) fn idle(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.ms.load(Ordering::Relaxed)))
    }
}

/// Runs one connection to its end: returns why it ended. The session is closed (disconnected
/// from the engine) before this returns.
pub async fn run_connection<S>(
    socket: S,
    session: Session,
    outbound: Outbound,
    params: ConnectionParams,
    metrics: Arc<Metrics>,
) -> Ended
where
    S: Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Send + 'static,
{
    let (sink, stream) = socket.split();
    run_halves(stream, session, params, metrics, |state, done, metrics| {
        write_loop(sink, outbound, params, state, done, metrics)
    })
    .await
}

/// Runs one connection on a plain TCP socket (`pre`: bytes read past the upgrade request)
/// with the direct write path (see the `direct` module): frames are written by the task that
/// produced them when the socket has room, and by the connection's writer task otherwise.
/// Returns why it ended; the session is closed before this returns.
pub async fn run_tcp_connection(
    stream: TcpStream,
    pre: Bytes,
    config: WebSocketConfig,
    session: Session,
    outbound: Outbound,
    params: ConnectionParams,
    metrics: Arc<Metrics>,
) -> Ended {
    // `pre` is a view into hyper's whole read buffer (8 KiB): keep only its bytes, and let
    // the buffer go now (a shadowed binding would live as long as the connection).
    let pre = {
        let view = pre;
        if view.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&view)
        }
    };
    let (read, write) = stream.into_split();
    let Some(writer) = session.set_direct(TcpSocket::new(
        write,
        params.codec,
        frames_counter(&metrics, "out", params.codec),
        metrics.fanout_latency.clone(),
    )) else {
        // A fresh session has no direct path yet; this cannot happen.
        return Ended::Client;
    };
    let socket = WebSocketStream::from_raw_socket(
        ReadSide {
            pre,
            read,
            writer: writer.clone(),
        },
        Role::Server,
        Some(config),
    )
    .await;
    run_halves(socket, session, params, metrics, |state, done, metrics| {
        direct_write_loop(writer, outbound, params, state, done, metrics)
    })
    .await
}

/// Runs a connection from its two halves: spawns the writer that `writer` makes (given the
/// state the halves share), reads until the end, stops the writer, closes the session.
async fn run_halves<R, W, F>(
    stream: R,
    session: Session,
    params: ConnectionParams,
    metrics: Arc<Metrics>,
    writer: W,
) -> Ended
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    W: FnOnce(Arc<ConnState>, CancellationToken, Arc<Metrics>) -> F,
    F: Future<Output = Ended> + Send + 'static,
{
    let state = Arc::new(ConnState::new());
    let done = CancellationToken::new();
    let mut writer = tokio::spawn(writer(state.clone(), done.clone(), metrics.clone()));
    let read_end = read_loop(stream, &session, params, &state, &done, &metrics).await;
    // Stop the writer (through the same wait that brings it frames): with a close frame for an
    // oversized frame, else without one. An engine close already requested wins.
    if read_end == Ended::TooBig {
        state.close_code.store(1009, Ordering::Relaxed);
    }
    session.request_close(CloseReason::Disconnected);
    let write_end = match tokio::time::timeout(params.write_timeout, &mut writer).await {
        Ok(r) => r.unwrap_or(Ended::Client),
        Err(_) => {
            writer.abort();
            Ended::Client
        }
    };
    // Boxed for the same reason as commands: it runs once, at the end.
    Box::pin(session.close()).await;
    match (read_end, write_end) {
        (Ended::TooBig, _) => Ended::TooBig,
        (_, Ended::Client) => read_end,
        (_, w) => w,
    }
}

/// The writer's ping timer (its immediate first tick taken) and how long a connection may stay
/// silent before it is reaped.
pub(crate) async fn ping_timer(params: ConnectionParams) -> (tokio::time::Interval, Duration) {
    let mut ping = tokio::time::interval(params.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    (ping, params.ping_interval * params.missed_pongs.max(1))
}

/// The frame counter of one direction and codec.
fn frames_counter(metrics: &Metrics, direction: &'static str, codec: Codec) -> Counter {
    metrics
        .frames
        .get_or_create(&crate::metrics::FrameLabels {
            direction,
            codec: codec_name(codec),
        })
        .clone()
}

async fn read_loop<R>(
    mut stream: R,
    session: &Session,
    params: ConnectionParams,
    state: &ConnState,
    done: &CancellationToken,
    metrics: &Metrics,
) -> Ended
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    // One cancellation future for the connection's life, not one (with its waiter
    // registration) per inbound frame.
    let cancelled = done.cancelled();
    tokio::pin!(cancelled);
    let codec = params.codec;
    let frames_in = frames_counter(metrics, "in", codec);
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = &mut cancelled => return Ended::Client,
        };
        let payload = match msg {
            None => return Ended::Client,
            Some(Err(WsError::Capacity(e))) => {
                debug!(user = %session.user_id(), error = %e, "frame over the limit");
                return Ended::TooBig;
            }
            Some(Err(e)) => {
                debug!(user = %session.user_id(), error = %e, "socket error");
                return Ended::Client;
            }
            Some(Ok(m)) => {
                state.touch();
                match m {
                    Message::Text(t) if !codec.is_binary() => t.into(),
                    Message::Binary(b) if codec.is_binary() => b,
                    Message::Text(_) | Message::Binary(_) => {
                        let expected = if codec.is_binary() { "binary" } else { "text" };
                        let err = chat_core::Error::invalid(format!(
                            "this connection uses codec {codec:?}: send {expected} frames"
                        ));
                        Box::pin(session.reply(Event::error(&err, None))).await;
                        continue;
                    }
                    Message::Close(_) => return Ended::Client,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                }
            }
        };
        frames_in.inc();
        match codec.decode_request(&payload) {
            // Boxed: the engine's command future is ~2.7 KB; inline, every connection's reader
            // task would carry that space even while idle. One allocation per command instead
            // (and the error replies are rare).
            Ok((command, id)) => Box::pin(session.handle_with_id(command, id)).await,
            Err(err) => Box::pin(session.reply(Event::error(&err.to_error(), None))).await,
        }
    }
}

/// A frame ready to send in one codec: built once per frame and codec, shared by every
/// recipient (no encoding, no UTF-8 check, no copy per recipient).
#[derive(Debug)]
struct Prepared {
    /// For writers that go through tokio-tungstenite (a clone is a reference-count increment).
    message: Message,
    /// The whole WebSocket frame (server frames are unmasked), for the direct path.
    wire: Bytes,
}

fn prepared(codec: Codec, frame: &chat_core::Frame) -> Option<&Prepared> {
    frame
        .prepared_ref(codec.slot(), |_| {
            let payload = codec.encode_frame(frame);
            let (message, data) = if codec.is_binary() {
                (Message::Binary(payload.clone()), Data::Binary)
            } else {
                (
                    Message::Text(Utf8Bytes::try_from(payload.clone()).ok()?),
                    Data::Text,
                )
            };
            let header = FrameHeader {
                opcode: OpCode::Data(data),
                ..FrameHeader::default()
            };
            let mut wire = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
            header.format(payload.len() as u64, &mut wire).ok()?;
            wire.extend_from_slice(&payload);
            Some(Prepared {
                message,
                wire: wire.into(),
            })
        })?
        .as_ref()
}

/// The WebSocket message for a frame (see [`Prepared`]).
fn to_message(codec: Codec, frame: &chat_core::Frame) -> Option<Message> {
    prepared(codec, frame).map(|p| p.message.clone())
}

/// The wire bytes of a frame (see [`Prepared`]).
pub(crate) fn wire(codec: Codec, frame: &chat_core::Frame) -> Option<&Bytes> {
    prepared(codec, frame).map(|p| &p.wire)
}

async fn write_loop<W>(
    mut sink: W,
    mut outbound: Outbound,
    params: ConnectionParams,
    state: Arc<ConnState>,
    done: CancellationToken,
    metrics: Arc<Metrics>,
) -> Ended
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let codec = params.codec;
    // Grows to the largest batch seen (most connections never batch more than a few frames).
    let mut batch = Vec::new();
    let (mut ping, reap_after) = ping_timer(params).await;
    // Long-lived futures and handles, made once per connection rather than once per batch
    // (this loop runs for every fan-out frame: its bookkeeping is on the hot path).
    let deadline = tokio::time::sleep(params.write_timeout);
    tokio::pin!(deadline);
    let frames_out = frames_counter(&metrics, "out", codec);
    let mut batches: u32 = 0;
    let ended = loop {
        tokio::select! {
            // Frames first: under steady traffic the ping timer is not even polled (a
            // connection that takes frames is alive, or its writes stall into the deadline).
            biased;
            // Frames and every close request (engine or reader) arrive through one wait.
            got = outbound.recv_batch(&mut batch, params.write_batch) => {
                let n = match got {
                    Batch::Ended => break Ended::Client,
                    Batch::CloseRequested(reason) => {
                        break close_requested(&mut sink, &mut outbound, reason, params, &state).await;
                    }
                    Batch::Frames(n) => n,
                };
                // Latency is sampled: the first live message of every 8th batch (a clock read
                // and a histogram update per frame would be a visible share of the fan-out cost).
                batches = batches.wrapping_add(1);
                if batches % LATENCY_SAMPLE_EVERY == 1
                    && let Some(frame) = batch.iter().find(|f| matches!(f.event(), Event::Message { .. }))
                {
                    metrics.fanout_latency.observe(frame.age().as_secs_f64());
                }
                let outcome =
                    write_batch(&mut sink, &mut batch, codec, &outbound, deadline.as_mut(), params.write_timeout).await;
                batch.clear();
                match outcome {
                    Some(true) => {
                        frames_out.inc_by(n as u64);
                    }
                    Some(false) => break Ended::Client,
                    None => {
                        let reason = outbound.close_reason().unwrap_or(CloseReason::Shutdown);
                        break close_requested(&mut sink, &mut outbound, reason, params, &state).await;
                    }
                }
            }
            _ = ping.tick() => {
                if state.idle() >= reap_after {
                    metrics.zombies_reaped.inc();
                    let _ = Box::pin(close(&mut sink, CLOSE_PING_TIMEOUT, "ping timeout")).await;
                    break Ended::PingTimeout;
                }
                let sent = tokio::time::timeout(params.write_timeout, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break Ended::Client;
                }
            }
        }
    };
    done.cancel();
    ended
}

/// Writes `batch` (drained) with one flush. `Some(ok)` when the write finished (or failed) or
/// the deadline passed (`Some(false)`), `None` when a close was requested while it waited.
///
/// Most writes complete on the first poll (the socket has room): only a write that has to wait
/// arms the deadline and watches for a close request, so a write stuck on a full socket cannot
/// outlive the engine's close request (slow consumer) or the write timeout, and the common case
/// touches no timer.
async fn write_batch<W>(
    sink: &mut W,
    batch: &mut Vec<Arc<chat_core::Frame>>,
    codec: Codec,
    outbound: &Outbound,
    mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    timeout: Duration,
) -> Option<bool>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let write = async {
        for frame in batch.drain(..) {
            if let Some(m) = to_message(codec, &frame) {
                sink.feed(m).await?;
            }
        }
        sink.flush().await
    };
    tokio::pin!(write);
    if let std::task::Poll::Ready(r) = futures::poll!(write.as_mut()) {
        return Some(r.is_ok());
    }
    deadline
        .as_mut()
        .reset(tokio::time::Instant::now() + timeout);
    tokio::select! {
        biased;
        r = write => Some(r.is_ok()),
        _ = outbound.close_requested() => None,
        _ = &mut deadline => Some(false),
    }
}

/// The connection is to be closed: say why with the matching close code (after flushing what
/// is queued when the server is going away). A close the reader asked for carries its code, if
/// any (1009 for an oversized frame).
async fn close_requested<W>(
    sink: &mut W,
    outbound: &mut Outbound,
    reason: CloseReason,
    params: ConnectionParams,
    state: &ConnState,
) -> Ended
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let closing = Closing::for_reason(reason, state);
    if closing.flush_first {
        while let Some(frame) = outbound.try_recv() {
            if let Some(m) = to_message(params.codec, &frame)
                && sink.feed(m).await.is_err()
            {
                break;
            }
        }
    }
    if let Some((code, text)) = closing.frame {
        let _ = tokio::time::timeout(params.write_timeout, close(sink, code, text)).await;
    }
    closing.ended
}

/// What a writer does when the connection is to be closed (both writers: queued and direct).
pub(crate) struct Closing {
    /// Write what is queued before the close frame (the server is going away).
    pub(crate) flush_first: bool,
    /// The close frame to send, if any.
    pub(crate) frame: Option<(u16, &'static str)>,
    /// What the connection's end is reported as.
    pub(crate) ended: Ended,
}

impl Closing {
    pub(crate) fn for_reason(reason: CloseReason, state: &ConnState) -> Self {
        let engine = |frame| Self {
            flush_first: false,
            frame: Some(frame),
            ended: Ended::Engine(reason),
        };
        match reason {
            // The reader ended it: a close frame only for an oversized frame.
            CloseReason::Disconnected => Self {
                flush_first: false,
                frame: (state.close_code() == 1009).then_some((1009, "frame too big")),
                ended: Ended::Client,
            },
            CloseReason::SlowConsumer => {
                engine((CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and sync"))
            }
            CloseReason::Resync => engine((CLOSE_RESYNC, "resync required: reconnect and sync")),
            CloseReason::TokenExpired => engine((
                CLOSE_TOKEN_EXPIRED,
                "token expired: refresh the token and reconnect",
            )),
            CloseReason::Revoked => engine((CLOSE_REVOKED, "session revoked")),
            // Going away: flush what is already queued first.
            _ => Self {
                flush_first: true,
                ..engine((1001, "server shutting down"))
            },
        }
    }
}

async fn close<W>(sink: &mut W, code: u16, reason: &'static str) -> Result<(), WsError>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    sink.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    })))
    .await?;
    sink.flush().await
}

/// The codec's label for metrics.
pub(crate) fn codec_name(codec: Codec) -> &'static str {
    if codec.is_binary() { "proto" } else { "json" }
}
