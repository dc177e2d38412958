//! The simulated clients: WebSocket connections from spread source addresses, one reader task
//! per connection that counts and times every delivery, and open-loop sender tasks.
//!
//! Timing: every message carries its **intended** send time, as microseconds since the load
//! generator's start (`Shared::t0`), in its content: `"<intended_us>:<id>"` (and for the chat
//! server in its `client_msg_id` too, so the ack is timed the same way). A sender that falls
//! behind its schedule still stamps the time the message *should* have left, so any stall,
//! in the server or in the generator, shows up as latency (no coordinated omission).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::{Sink, SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Latency histograms are sharded by connection to keep lock contention negligible.
const SHARDS: usize = 16;

/// Counters and histograms shared by every client task.
#[derive(Debug)]
pub struct Shared {
    /// Time zero of every timestamp.
    pub t0: Instant,
    /// Delivery latency, intended send → receipt, µs.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Ack latency, intended send → `message_ack`, µs (chat server only).
    ack_latency: Mutex<Histogram<u64>>,
    /// How late the generator handed frames to the socket, µs.
    send_lag: Mutex<Histogram<u64>>,
    /// Next message id.
    next_id: AtomicU64,
    /// Messages written (and flushed) in the measured window.
    pub sent: AtomicU64,
    /// Deliveries the sent messages should cause.
    pub expected: AtomicU64,
    /// Distinct (recipient connection, message) deliveries.
    pub delivered: AtomicU64,
    /// Deliveries of a message a connection had already received.
    pub duplicates: AtomicU64,
    /// `message_ack` frames.
    pub acks: AtomicU64,
    /// `error` frames.
    pub error_frames: AtomicU64,
    /// Writes that failed.
    pub send_errors: AtomicU64,
    /// Connections the server ended before the run did.
    pub closed_early: AtomicU64,
    /// Warm-up deliveries (not measured).
    pub warmup_delivered: AtomicU64,
    /// Frames of any other kind.
    pub other_frames: AtomicU64,
    /// First `error` frame, for the report.
    pub first_error: Mutex<Option<String>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

impl Shared {
    /// Fresh counters; time zero is now.
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            ack_latency: Mutex::new(histogram()),
            send_lag: Mutex::new(histogram()),
            next_id: AtomicU64::new(1),
            sent: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            error_frames: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            warmup_delivered: AtomicU64::new(0),
            other_frames: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    fn us_of(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_micros() as u64
    }

    /// A fresh message id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Delivery latency percentiles (all shards merged).
    pub fn latency(&self) -> Percentiles {
        let mut all = histogram();
        for shard in &self.latency {
            let _ = all.add(&*shard.lock().unwrap());
        }
        Percentiles::of(&all)
    }

    /// Ack latency percentiles.
    pub fn ack_latency(&self) -> Percentiles {
        Percentiles::of(&self.ack_latency.lock().unwrap())
    }

    /// Send lag percentiles.
    pub fn send_lag(&self) -> Percentiles {
        Percentiles::of(&self.send_lag.lock().unwrap())
    }

    fn note_error(&self, frame: &str) {
        self.error_frames.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(frame.chars().take(300).collect());
        }
    }
}

/// Client socket settings: small buffers like the server's, so 20k clients stay cheap.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

/// The source address of connection `i`: 127.0.0.2, .3, … (`sources` of them). The port is
/// picked when the socket is bound, before the destination is known, so each source address
/// has the ephemeral port range (~28k) for all destinations together.
pub fn source_addr(i: usize, sources: usize) -> Ipv4Addr {
    let n = 2 + (i % sources.max(1)) as u32;
    Ipv4Addr::from(0x7f00_0000 | n)
}

/// Opens one WebSocket to `server` at `path` from `source` (port chosen by the kernel),
/// retrying a few times (backlog overflow under a connection storm).
pub async fn connect(server: SocketAddr, path: &str, source: Ipv4Addr) -> Result<Ws, String> {
    let mut backoff = Duration::from_millis(50);
    let mut last = String::new();
    for _ in 0..6 {
        match connect_once(server, path, source).await {
            Ok(ws) => return Ok(ws),
            Err(e) => last = e,
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    Err(last)
}

/// What [`connect_all`] did.
#[derive(Debug)]
pub struct Connected {
    /// Clients opened (and handed to `on_open`).
    pub ok: usize,
    /// Connections that failed after their retries.
    pub failed: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Seconds from the first attempt to the last result.
    pub seconds: f64,
}

/// Opens every `(i, server, path)` of `targets` from [`source_addr`]`(i, sources)`, with at
/// most `concurrency` attempts in flight, runs `handshake(i, ws)` on each WebSocket (a
/// protocol's own connect and join, inside the same slot; `std::future::ready(Ok(ws))` for
/// none) and hands each client to `on_open` as soon as it is up (so its reader can start
/// answering pings while the rest connect). A failed handshake counts as a failed connection.
pub async fn connect_all<C, H, Fut, F>(
    targets: impl IntoIterator<Item = (usize, SocketAddr, String)>,
    sources: usize,
    concurrency: usize,
    handshake: H,
    mut on_open: F,
) -> anyhow::Result<Connected>
where
    C: Send + 'static,
    H: Fn(usize, Ws) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<C, String>> + Send + 'static,
    F: FnMut(usize, C),
{
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let handshake = Arc::new(handshake);
    let mut connecting = JoinSet::new();
    for (i, server, path) in targets {
        let source = source_addr(i, sources);
        let limit = limit.clone();
        let handshake = handshake.clone();
        connecting.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let client = match connect(server, &path, source).await {
                Ok(ws) => handshake(i, ws).await,
                Err(e) => Err(e),
            };
            (i, client)
        });
    }
    let mut out = Connected {
        ok: 0,
        failed: 0,
        first_error: None,
        seconds: 0.0,
    };
    while let Some(r) = connecting.join_next().await {
        let (i, client) = r.context("connect task panicked")?;
        match client {
            Ok(client) => {
                out.ok += 1;
                on_open(i, client);
            }
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert(e);
            }
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

async fn connect_once(server: SocketAddr, path: &str, source: Ipv4Addr) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(server))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{server}{path}");
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// Parses `"<us>:<id>"` at the start of `s` (up to the closing quote).
fn parse_stamp(s: &str) -> Option<(bool, u64, u64)> {
    let end = s.find('"')?;
    let s = &s[..end];
    let (warm, s) = match s.strip_prefix("W") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (us, id) = s.split_once(':')?;
    Some((warm, us.parse().ok()?, id.parse().ok()?))
}

/// The stamp in the value of `"field":"…"` of a JSON text.
fn stamp_of(text: &str, field: &str) -> Option<(bool, u64, u64)> {
    let at = text.find(field)?;
    parse_stamp(&text[at + field.len()..])
}

/// Reads one connection until `stop`: counts and times deliveries, acks and errors. Pings are
/// answered by tungstenite while it reads.
pub async fn read_loop<S>(
    mut stream: S,
    conn: usize,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let shard = &shared.latency[conn % SHARDS];
    let mut seen: HashSet<u64> = HashSet::new();
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => return,
            m = stream.next() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                if !*stop.borrow() {
                    shared.closed_early.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Some(Ok(_)) => continue,
        };
        let now = shared.now_us();
        let t: &str = &text;
        // Frame kinds by their leading bytes (serde writes the tag first); anything else is
        // parsed properly.
        let kind = if t.starts_with(r#"{"type":"message","#) {
            "message"
        } else if t.starts_with(r#"{"type":"message_ack""#) {
            "message_ack"
        } else if t.starts_with(r#"{"type":"error""#) {
            "error"
        } else {
            match serde_json::from_str::<serde_json::Value>(t) {
                Ok(v) => match v["type"].as_str() {
                    Some("message") => "message",
                    Some("message_ack") => "message_ack",
                    Some("error") => "error",
                    _ => "other",
                },
                Err(_) => "other",
            }
        };
        match kind {
            "message" => match stamp_of(t, r#""content":""#) {
                Some((true, _, _)) => {
                    shared.warmup_delivered.fetch_add(1, Ordering::Relaxed);
                }
                Some((false, sent_us, id)) => {
                    if seen.insert(id) {
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                        shard
                            .lock()
                            .unwrap()
                            .saturating_record(now.saturating_sub(sent_us).max(1));
                    } else {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    shared.other_frames.fetch_add(1, Ordering::Relaxed);
                }
            },
            "message_ack" => {
                if let Some((false, sent_us, _)) = stamp_of(t, r#""client_msg_id":""#) {
                    shared.acks.fetch_add(1, Ordering::Relaxed);
                    shared
                        .ack_latency
                        .lock()
                        .unwrap()
                        .saturating_record(now.saturating_sub(sent_us).max(1));
                }
            }
            "error" => shared.note_error(t),
            _ => {
                shared.other_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a sender sends to.
#[derive(Clone, Debug)]
pub enum Target {
    /// A chat-server conversation: `{"type":"message","conversation_id",…}`.
    Chat {
        /// The conversation id (decimal string).
        conversation: String,
    },
    /// A baseline-server group: the frame itself is what recipients get, so it is shaped and
    /// sized like the chat server's `message` event.
    Baseline {
        /// Group name (stands in for the conversation id).
        group: String,
        /// Sender name (stands in for the sender id).
        user: String,
    },
}

impl Target {
    /// The frame for one message stamped `stamp` (`"<us>:<id>"`, or `"W<us>:<id>"` for warm-up).
    pub fn frame(&self, stamp: &str, seq: u64) -> String {
        match self {
            Target::Chat { conversation } => format!(
                r#"{{"type":"message","conversation_id":"{conversation}","client_msg_id":"{stamp}","content":"{stamp}"}}"#
            ),
            Target::Baseline { group, user } => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                format!(
                    r#"{{"type":"message","message":{{"message_id":"{:019}","conversation_id":"{group}","seq":{seq},"sender_id":"{user}","kind":"text","content":"{stamp}","client_msg_id":"{stamp}","created_at":{now_ms},"deleted":false,"version":1}}}}"#,
                    seq + 252_343_002_071_040_000
                )
            }
        }
    }
}

/// The open-loop clock: one OS thread that releases message `n` at `start + n / rate` to
/// sender `n mod senders` (so every sender runs at `rate / senders`, evenly interleaved),
/// until `end`. A plain thread with `std::thread::sleep` (tens of µs of overshoot) instead of
/// tokio timers (1 ms wheel, which would add ~1.5 ms of lag to every message). It never waits
/// for a sender: a sender that falls behind finds several due times queued and sends them at
/// once, each stamped with its own intended time.
pub fn spawn_clock(
    start: Instant,
    end: Instant,
    rate: f64,
    senders: Vec<mpsc::UnboundedSender<Instant>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start_std = start.into_std();
        let end_std = end.into_std();
        let step = Duration::from_secs_f64(1.0 / rate);
        let mut n: u64 = 0;
        loop {
            let at = start_std + step.mul_f64(n as f64);
            if at >= end_std {
                break;
            }
            let now = std::time::Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            // Everything due by now goes out in one pass.
            let now = std::time::Instant::now();
            loop {
                let at = start_std + step.mul_f64(n as f64);
                if at >= end_std || at > now {
                    break;
                }
                let tx = &senders[(n % senders.len() as u64) as usize];
                let _ = tx.send(Instant::from_std(at));
                n += 1;
            }
        }
    })
}

/// Most frames fed before one flush when a sender catches up.
const SEND_BATCH: usize = 64;

/// Sends on `sink` whenever the clock releases a message, to `target` (each message expected
/// by `recipients` connections). Frames already due are fed together and flushed once. Ends
/// when the clock is done.
pub async fn send_loop<K>(
    mut sink: K,
    target: Target,
    mut due: mpsc::UnboundedReceiver<Instant>,
    recipients: u64,
    shared: &Shared,
) -> K
where
    K: Sink<Message, Error = WsError> + Unpin,
{
    let mut k: u64 = 0;
    let mut stamps = Vec::with_capacity(SEND_BATCH);
    while due.recv_many(&mut stamps, SEND_BATCH).await > 0 {
        let mut failed = false;
        for &at in &stamps {
            let id = shared.next_id();
            let stamp = format!("{}:{id}", shared.us_of(at));
            k += 1;
            let frame = target.frame(&stamp, k);
            if sink.feed(Message::Text(frame.into())).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed || sink.flush().await.is_err() {
            shared
                .send_errors
                .fetch_add(stamps.len() as u64, Ordering::Relaxed);
            break;
        }
        let flushed = Instant::now();
        let n = stamps.len() as u64;
        shared.sent.fetch_add(n, Ordering::Relaxed);
        shared.expected.fetch_add(n * recipients, Ordering::Relaxed);
        let mut lag = shared.send_lag.lock().unwrap();
        for &at in &stamps {
            lag.saturating_record(flushed.saturating_duration_since(at).as_micros().max(1) as u64);
        }
        drop(lag);
        stamps.clear();
    }
    sink
}

/// Sends one warm-up message (not measured: its stamp starts with `W`).
pub async fn send_warmup<K>(sink: &mut K, target: &Target, shared: &Shared) -> bool
where
    K: Sink<Message, Error = WsError> + Unpin,
{
    let id = shared.next_id();
    let stamp = format!("W{}:{id}", shared.now_us());
    sink.send(Message::Text(target.frame(&stamp, 0).into()))
        .await
        .is_ok()
}
