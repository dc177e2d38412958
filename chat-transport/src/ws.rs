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
//! 1009 frame too big, 4000 resync required, 4001 slow consumer, 4002 ping timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_core::engine::Batch;
use chat_core::{CloseReason, Event, Outbound, Session};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::codec::Codec;
use crate::metrics::Metrics;

/// Close code: the server needs the client to reconnect and `sync`.
pub const CLOSE_RESYNC: u16 = 4000;
/// Close code: the client read too slowly; reconnect and `sync`.
pub const CLOSE_SLOW_CONSUMER: u16 = 4001;
/// Close code: the client stopped answering pings.
pub const CLOSE_PING_TIMEOUT: u16 = 4002;

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

/// Milliseconds since `base` of the last inbound frame.
#[derive(Debug)]
struct LastSeen {
    base: Instant,
    ms: AtomicU64,
}

impl LastSeen {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
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
    let session = Arc::new(session);
    let last_seen = Arc::new(LastSeen::new());
    let done = CancellationToken::new();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<(u16, &'static str)>();
    let writer = tokio::spawn(write_loop(
        sink,
        outbound,
        session.clone(),
        params,
        last_seen.clone(),
        done.clone(),
        close_rx,
        metrics.clone(),
    ));
    let read_end = read_loop(stream, &session, params, &last_seen, &done, &metrics).await;
    // Tell the writer to finish: with a close frame for an oversized frame, else just stop.
    if read_end == Ended::TooBig {
        let _ = close_tx.send((1009, "frame too big"));
    } else {
        drop(close_tx);
    }
    let mut writer = writer;
    let write_end = match tokio::time::timeout(params.write_timeout, &mut writer).await {
        Ok(r) => r.unwrap_or(Ended::Client),
        Err(_) => {
            writer.abort();
            Ended::Client
        }
    };
    done.cancel();
    if let Ok(session) = Arc::try_unwrap(session) {
        session.close().await;
    }
    match (read_end, write_end) {
        (Ended::TooBig, _) => Ended::TooBig,
        (_, Ended::Client) => read_end,
        (_, w) => w,
    }
}

async fn read_loop<R>(
    mut stream: R,
    session: &Session,
    params: ConnectionParams,
    last_seen: &LastSeen,
    done: &CancellationToken,
    metrics: &Metrics,
) -> Ended
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let codec = params.codec;
    let frames_in = metrics
        .frames
        .get_or_create(&crate::metrics::FrameLabels {
            direction: "in",
            codec: codec_name(codec),
        })
        .clone();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = done.cancelled() => return Ended::Client,
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
                last_seen.touch();
                match m {
                    Message::Text(t) if !codec.is_binary() => t.into(),
                    Message::Binary(b) if codec.is_binary() => b,
                    Message::Text(_) | Message::Binary(_) => {
                        let expected = if codec.is_binary() { "binary" } else { "text" };
                        session
                            .reply(Event::error(
                                &chat_core::Error::invalid(format!(
                                    "this connection uses codec {:?}: send {expected} frames",
                                    codec
                                )),
                                None,
                            ))
                            .await;
                        continue;
                    }
                    Message::Close(_) => return Ended::Client,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                }
            }
        };
        frames_in.inc();
        match codec.decode(&payload) {
            Ok(command) => session.handle(command).await,
            Err(err) => {
                session.reply(Event::error(&err.to_error(), None)).await;
            }
        }
    }
}

/// The WebSocket message for a frame, built once per codec and shared by every recipient
/// (the per-recipient cost is a reference-count increment: no encoding, no UTF-8 check).
fn to_message(codec: Codec, frame: &chat_core::Frame) -> Option<Message> {
    frame
        .prepared(codec.slot(), |_| {
            let bytes = codec.encode_frame(frame);
            if codec.is_binary() {
                Some(Message::Binary(bytes))
            } else {
                Utf8Bytes::try_from(bytes).ok().map(Message::Text)
            }
        })
        .flatten()
}

#[allow(clippy::too_many_arguments)]
async fn write_loop<W>(
    mut sink: W,
    mut outbound: Outbound,
    session: Arc<Session>,
    params: ConnectionParams,
    last_seen: Arc<LastSeen>,
    done: CancellationToken,
    mut close_rx: tokio::sync::oneshot::Receiver<(u16, &'static str)>,
    metrics: Arc<Metrics>,
) -> Ended
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let codec = params.codec;
    let mut batch = Vec::with_capacity(params.write_batch);
    let mut ping = tokio::time::interval(params.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let reap_after = params.ping_interval * params.missed_pongs.max(1);
    // Long-lived futures and handles, made once per connection rather than once per batch
    // (this loop runs for every fan-out frame: its bookkeeping is on the hot path).
    let deadline = tokio::time::sleep(params.write_timeout);
    tokio::pin!(deadline);
    let frames_out = metrics
        .frames
        .get_or_create(&crate::metrics::FrameLabels {
            direction: "out",
            codec: codec_name(codec),
        })
        .clone();
    let ended = loop {
        tokio::select! {
            biased;
            code = &mut close_rx => {
                if let Ok((code, text)) = code {
                    let _ = tokio::time::timeout(params.write_timeout, close(&mut sink, code, text)).await;
                }
                break Ended::Client;
            }
            _ = ping.tick() => {
                if last_seen.idle() >= reap_after {
                    metrics.zombies_reaped.inc();
                    let _ = close(&mut sink, CLOSE_PING_TIMEOUT, "ping timeout").await;
                    break Ended::PingTimeout;
                }
                let sent = tokio::time::timeout(params.write_timeout, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break Ended::Client;
                }
            }
            // Frames and the engine's close request arrive through one wait.
            got = outbound.recv_batch(&mut batch, params.write_batch) => {
                let n = match got {
                    Batch::Ended => break Ended::Client,
                    Batch::CloseRequested => {
                        break engine_close(&mut sink, &mut outbound, &session, params, &metrics).await;
                    }
                    Batch::Frames(n) => n,
                };
                // One latency sample per batch (the first live message), not one per frame.
                if let Some(frame) = batch.iter().find(|f| matches!(f.event(), Event::Message { .. })) {
                    metrics.fanout_latency.observe(frame.age().as_secs_f64());
                }
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + params.write_timeout);
                let write = async {
                    for frame in batch.drain(..) {
                        if let Some(m) = to_message(codec, &frame) {
                            sink.feed(m).await?;
                        }
                    }
                    sink.flush().await
                };
                // A write stuck on a full socket must not outlive the engine's close request
                // (slow consumer) or the write timeout.
                let outcome = tokio::select! {
                    biased;
                    r = write => Some(r.is_ok()),
                    _ = outbound.close_requested() => None,
                    _ = &mut deadline => Some(false),
                };
                batch.clear();
                match outcome {
                    Some(true) => {
                        frames_out.inc_by(n as u64);
                    }
                    Some(false) => break Ended::Client,
                    None => {
                        break engine_close(&mut sink, &mut outbound, &session, params, &metrics).await;
                    }
                }
            }
        }
    };
    done.cancel();
    ended
}

/// The engine asked for the connection to be closed: say why with the matching close code
/// (after flushing what is queued when the server is going away).
async fn engine_close<W>(
    sink: &mut W,
    outbound: &mut Outbound,
    session: &Session,
    params: ConnectionParams,
    metrics: &Metrics,
) -> Ended
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let codec = params.codec;
    let reason = session.close_reason().unwrap_or(CloseReason::Shutdown);
    let (code, text) = match reason {
        CloseReason::SlowConsumer => {
            metrics.slow_consumers.inc();
            (CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and sync")
        }
        CloseReason::Resync => (CLOSE_RESYNC, "resync required: reconnect and sync"),
        _ => {
            // Going away: flush what is already queued first.
            while let Some(frame) = outbound.try_recv() {
                if let Some(m) = to_message(codec, &frame)
                    && sink.feed(m).await.is_err()
                {
                    break;
                }
            }
            (1001, "server shutting down")
        }
    };
    let _ = tokio::time::timeout(params.write_timeout, close(sink, code, text)).await;
    Ended::Engine(reason)
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
