//! The peers `chat-load` compares `chat-server` to, driven with the same workloads and
//! measured by the same code as `baseline-idle` / `baseline-group`:
//!
//! * **Centrifugo** (Go), installed from the Go module proxy by
//!   `benches/peers/install-centrifugo.sh` and started by `benches/peers/start-centrifugo.sh`
//!   (anonymous clients, namespace `chat` where subscribers may publish, no history). Clients
//!   speak its JSON protocol v2 on `/connection/websocket`: `connect`, `subscribe` to
//!   `chat:<group>`, then `publish` every message to it; deliveries are `push`es of the
//!   publication. Centrifugo has no "everyone but the sender": the sender gets its own
//!   publication back, which the client recognises (its own client id in the publication's
//!   `info`) and drops, so it is neither counted nor timed, but the server did that extra
//!   1/(group size - 1) of the work.
//! * **peer-socketioxide**, a minimal chat server on socketioxide (a binary of this crate).
//!   Clients speak socket.io v5 over Engine.IO 4's WebSocket transport
//!   (`/socket.io/?EIO=4&transport=websocket`): the `0{…}` open packet, `40` to connect the
//!   default namespace, `420["join","<group>"]` (acknowledged by `430[…]`), then
//!   `42["message",<frame>]` for every message; Engine.IO pings (`2`) are answered (`3`).
//!
//! The frame a sender sends is [`Target::Baseline`]'s (shaped and sized like the chat server's
//! `message` event, carrying the intended send time in `content`), wrapped in the peer's
//! envelope on the way out. [`PeerWs`] does the protocol: it wraps outgoing frames, answers the
//! peers' application-level pings, swallows their control frames, and hands the reader every
//! delivery as a frame `client::read_loop` already understands (`{"type":"message",` followed
//! by the payload from its `"content":"` on), and every error reply or disconnect as a
//! `{"type":"error",…}` frame. So the same `read_loop`, `send_loop`, clock, histograms and
//! counters measure all of them.
//!
//! Wiring into `chat-load`: scenarios name a [`Peer`] and the `idle` or `group` workload; the
//! server is [`Peer::start`]ed in place of the baseline (it is a [`Proc`] like the others, so
//! it is sampled, checked and killed the same way) and [`drive`] replaces `crate::drive`.
//!
//! Programs: `peer-socketioxide` next to this executable (or `$CHAT_LOAD_SOCKETIOXIDE_BIN`);
//! `benches/peers/start-centrifugo.sh` of this source tree (or `$CHAT_LOAD_CENTRIFUGO_START`),
//! which runs `target/peers/bin/centrifugo` (or `$PEER_CENTRIFUGO_BIN`): a missing binary is an
//! error that says to run `benches/peers/install-centrifugo.sh`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::client::{self, Shared, Target, Ws};
use crate::server::Proc;
use crate::sys;

/// How long the peer handshake (connect, join/subscribe) of one client may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Centrifugo, JSON protocol v2.
    Centrifugo,
    /// `peer-socketioxide`, socket.io v5 over Engine.IO 4 WebSocket.
    Socketioxide,
}

impl Peer {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Centrifugo => "centrifugo",
            Peer::Socketioxide => "socketioxide",
        }
    }

    /// The WebSocket endpoint.
    fn ws_path(self) -> &'static str {
        match self {
            Peer::Centrifugo => "/connection/websocket",
            Peer::Socketioxide => "/socket.io/?EIO=4&transport=websocket",
        }
    }

    /// The program started for it, and its version (for the report).
    fn program(self) -> anyhow::Result<(PathBuf, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        match self {
            Peer::Centrifugo => {
                let start = std::env::var_os("CHAT_LOAD_CENTRIFUGO_START")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| root.join("benches/peers/start-centrifugo.sh"));
                let bin = std::env::var_os("PEER_CENTRIFUGO_BIN")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| root.join("target/peers/bin/centrifugo"));
                if !bin.exists() {
                    bail!(
                        "{} not found: install it first with benches/peers/install-centrifugo.sh \
                         (go install from the Go module proxy), or set PEER_CENTRIFUGO_BIN",
                        bin.display()
                    );
                }
                let version = std::fs::read_to_string(bin.with_file_name("centrifugo.version"))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_else(|_| "unknown".to_owned());
                Ok((start, format!("centrifugo {version}")))
            }
            Peer::Socketioxide => {
                let bin = match std::env::var_os("CHAT_LOAD_SOCKETIOXIDE_BIN") {
                    Some(p) => PathBuf::from(p),
                    None => crate::sibling(&None, "peer-socketioxide")?,
                };
                Ok((
                    bin,
                    format!("socketioxide {}", locked_version(&root, "socketioxide")),
                ))
            }
        }
    }

    /// Starts it on a free loopback port (under `taskset -c 0` when `pin`), ready when its port
    /// accepts. Both programs take `--bind ADDR`, like `baseline-server`, and the Centrifugo
    /// script `exec`s the server, so the pid sampled is the server's own.
    pub async fn start(self, pin: bool) -> anyhow::Result<Proc> {
        let (program, version) = self.program()?;
        eprintln!("chat-load: starting {} ({version})", program.display());
        Proc::baseline(&program, pin)
            .await
            .with_context(|| format!("starting the {} peer", self.name()))
    }

    /// What the clients join: a room (socket.io) or a channel of the `chat` namespace.
    fn channel(self, group: &str) -> String {
        match self {
            Peer::Centrifugo => format!("chat:{group}"),
            Peer::Socketioxide => group.to_owned(),
        }
    }
}

/// The version of `name` in the workspace's Cargo.lock.
fn locked_version(root: &Path, name: &str) -> String {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let needle = format!("name = \"{name}\"\nversion = \"");
    lock.find(&needle)
        .and_then(|at| {
            let rest = &lock[at + needle.len()..];
            rest.find('"').map(|end| rest[..end].to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// A client connection speaking a peer's protocol, seen by `chat-load` as a plain WebSocket of
/// text frames: outgoing frames are wrapped in the peer's envelope, incoming deliveries are
/// turned into `{"type":"message","content":"<stamp>"…` frames and errors into
/// `{"type":"error",…}` frames; pings are answered here. Split it like a WebSocket (the stream
/// half answers pings through the shared socket).
#[derive(Debug)]
pub struct PeerWs {
    inner: Ws,
    peer: Peer,
    /// The channel (Centrifugo) as a JSON string literal.
    channel_json: String,
    /// Centrifugo: `"client":"<our client id>"`, found in the `info` of our own publications.
    self_tag: Option<String>,
    /// Next Centrifugo command id.
    next_id: u64,
    /// Translated frames not yet handed out.
    out: VecDeque<Message>,
    /// A pong to send.
    pong: Option<&'static str>,
    /// A pong was written but not yet flushed.
    pong_unflushed: bool,
}

/// The next text frame (WebSocket pings are answered by tungstenite while reading).
async fn recv_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => return Err(format!("closed by the peer: {c:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed by the peer".to_owned()),
        }
    }
}

async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("write: {e}"))
}

/// Reads socket.io packets until one starting with `want` (answering pings).
async fn sio_wait(ws: &mut Ws, want: &str, what: &str) -> Result<(), String> {
    loop {
        let t = recv_text(ws).await?;
        if t.starts_with(want) {
            return Ok(());
        }
        if t == "2" {
            send_text(ws, "3".to_owned()).await?;
        } else if t.starts_with("44") || t.starts_with("41") || t.starts_with('1') {
            return Err(format!("socket.io {what} refused: {t}"));
        }
    }
}

/// Sends one Centrifugo command (id from `next_id`) and waits for its reply (answering pings).
async fn centrifugo_call(
    ws: &mut Ws,
    next_id: &mut u64,
    method: &str,
    params: &str,
) -> Result<Value, String> {
    let id = *next_id;
    *next_id += 1;
    send_text(ws, format!(r#"{{"id":{id},"{method}":{params}}}"#)).await?;
    loop {
        let t = recv_text(ws).await?;
        for line in t.split('\n').filter(|l| !l.is_empty()) {
            if line == "{}" {
                send_text(ws, "{}".to_owned()).await?;
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| format!("centrifugo sent non-JSON {line:?}: {e}"))?;
            if v["id"].as_u64() != Some(id) {
                continue;
            }
            if !v["error"].is_null() {
                return Err(format!("centrifugo {method} failed: {line}"));
            }
            return Ok(v);
        }
    }
}

impl PeerWs {
    /// Runs the peer's handshake on a fresh WebSocket and joins `group`.
    pub async fn join(peer: Peer, ws: Ws, group: &str) -> Result<Self, String> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::join_inner(peer, ws, group))
            .await
            .map_err(|_| format!("{} handshake timed out", peer.name()))?
    }

    async fn join_inner(peer: Peer, mut ws: Ws, group: &str) -> Result<Self, String> {
        let channel = peer.channel(group);
        let channel_json = json_str(&channel);
        let mut next_id = 1;
        let mut self_tag = None;
        match peer {
            Peer::Socketioxide => {
                let open = recv_text(&mut ws).await?;
                if !open.starts_with("0{") {
                    return Err(format!("expected the Engine.IO open packet, got {open:?}"));
                }
                send_text(&mut ws, "40".to_owned()).await?;
                sio_wait(&mut ws, "40", "namespace connect").await?;
                send_text(&mut ws, format!(r#"420["join",{channel_json}]"#)).await?;
                sio_wait(&mut ws, "430", "join ack").await?;
            }
            Peer::Centrifugo => {
                let connect = centrifugo_call(&mut ws, &mut next_id, "connect", "{}").await?;
                let client_id = connect["connect"]["client"]
                    .as_str()
                    .ok_or_else(|| format!("connect reply without a client id: {connect}"))?;
                self_tag = Some(format!(r#""client":"{client_id}""#));
                let sub = format!(r#"{{"channel":{channel_json}}}"#);
                centrifugo_call(&mut ws, &mut next_id, "subscribe", &sub).await?;
            }
        }
        Ok(Self {
            inner: ws,
            peer,
            channel_json,
            self_tag,
            next_id,
            out: VecDeque::new(),
            pong: None,
            pong_unflushed: false,
        })
    }

    /// Queues an error frame for the reader.
    fn error(&mut self, frame: &str) {
        let e = json!({"type": "error", "peer": self.peer.name(), "frame": frame});
        self.out.push_back(Message::Text(e.to_string().into()));
    }

    /// Queues a delivery for the reader: `{"type":"message",` and the payload from its
    /// `"content":"` on (where `read_loop` finds the stamp).
    fn deliver(&mut self, frame: &str) {
        const HEAD: &str = r#"{"type":"message","#;
        match frame.find(r#""content":""#) {
            Some(at) => {
                let mut s = String::with_capacity(HEAD.len() + frame.len() - at);
                s.push_str(HEAD);
                s.push_str(&frame[at..]);
                self.out.push_back(Message::Text(s.into()));
            }
            None => self.error(frame),
        }
    }

    /// Translates one incoming text frame.
    fn translate(&mut self, text: &str) {
        match self.peer {
            Peer::Socketioxide => match text.as_bytes() {
                b"2" => self.pong = Some("3"),
                [b'4', b'2', ..] => self.deliver(text),
                // connect_error, namespace disconnect, Engine.IO close
                [b'4', b'4' | b'1', ..] | [b'1', ..] => self.error(text),
                // acks, noops, the rest
                _ => {}
            },
            Peer::Centrifugo => {
                // Several replies may share one frame, one per line.
                for line in text.split('\n').filter(|l| !l.is_empty()) {
                    if line == "{}" {
                        self.pong = Some("{}");
                    } else if line.starts_with(r#"{"push":"#) {
                        if line.contains(r#""pub":"#) {
                            let own = self.self_tag.as_deref().is_some_and(|t| line.contains(t));
                            if !own {
                                self.deliver(line);
                            }
                        } else if line.contains(r#""disconnect":"#)
                            || line.contains(r#""unsubscribe":"#)
                        {
                            self.error(line);
                        }
                    } else if line.contains(r#""error":"#) {
                        self.error(line);
                    }
                    // Other replies (publish results) need nothing.
                }
            }
        }
    }

    /// Writes and flushes a pending pong as far as the socket lets it.
    fn poll_pong(&mut self, cx: &mut TaskContext<'_>) -> Result<(), WsError> {
        if let Some(p) = self.pong {
            match Pin::new(&mut self.inner).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.pong = None;
                    Pin::new(&mut self.inner).start_send(Message::Text(p.into()))?;
                    self.pong_unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        if self.pong_unflushed {
            match Pin::new(&mut self.inner).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.pong_unflushed = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// A frame in the peer's envelope.
    fn wrap(&mut self, frame: &str) -> String {
        match self.peer {
            Peer::Socketioxide => format!(r#"42["message",{frame}]"#),
            Peer::Centrifugo => {
                let id = self.next_id;
                self.next_id += 1;
                format!(
                    r#"{{"id":{id},"publish":{{"channel":{},"data":{frame}}}}}"#,
                    self.channel_json
                )
            }
        }
    }
}

impl Stream for PeerWs {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Err(e) = this.poll_pong(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            if let Some(m) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Text(t))) => this.translate(t.as_str()),
                other => return Poll::Ready(other),
            }
        }
    }
}

impl Sink<Message> for PeerWs {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.get_mut().inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        let item = match item {
            Message::Text(t) => Message::Text(this.wrap(t.as_str()).into()),
            other => other,
        };
        Pin::new(&mut this.inner).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// One client connection's role (the `baseline-group` / `baseline-idle` layout).
#[derive(Clone, Debug)]
struct PeerPlan {
    /// The group it joins.
    group: String,
    /// What it sends, to how many recipients; `None` for a listener only.
    sends: Option<(Target, u64)>,
    /// Sends the warm-up message of its group.
    warmup: bool,
}

/// Groups of `--group-size` (the last one may be smaller; a group of one is left out of the
/// group workload), `--senders` senders each, exactly like `baseline-group`; for idle, every
/// connection joins group `i / size` and nobody sends.
fn plans(args: &crate::Args, idle: bool, connections: usize) -> (Vec<PeerPlan>, usize) {
    let size = args.group_size;
    if idle {
        let plans = (0..connections)
            .map(|i| PeerPlan {
                group: format!("g{}", i / size),
                sends: None,
                warmup: false,
            })
            .collect();
        return (plans, 0);
    }
    let groups: Vec<std::ops::Range<usize>> = (0..connections)
        .step_by(size)
        .map(|s| s..(s + size).min(connections))
        .filter(|r| r.len() >= 2)
        .collect();
    let senders = args.senders.unwrap_or(10).max(1);
    let mut plans = Vec::with_capacity(connections);
    for (g, r) in groups.iter().enumerate() {
        let recipients = (r.len() - 1) as u64;
        for (m, i) in r.clone().enumerate() {
            let sends = (m < senders).then(|| {
                let target = Target::Baseline {
                    group: format!("g{g}"),
                    user: format!("u{i}"),
                };
                (target, recipients)
            });
            plans.push(PeerPlan {
                group: format!("g{g}"),
                sends,
                warmup: m == 0,
            });
        }
    }
    (plans, groups.len())
}

/// A connected client: its send half is kept for the window.
enum Conn {
    Listener,
    Sender(futures::stream::SplitSink<PeerWs, Message>),
}

/// Drives `server` (a started [`Peer`]) with the `idle` or `group` workload and returns the
/// report: the same fields, measured the same way, as `crate::drive` for `baseline-idle` /
/// `baseline-group`, plus `peer` and `peer_version`. `scenario` is the name reported.
pub async fn drive(
    args: &crate::Args,
    scenario: &str,
    peer: Peer,
    idle: bool,
    connections: usize,
    server: &Proc,
) -> anyhow::Result<Value> {
    let tck = sys::clock_ticks_per_second() as f64;
    let self_pid = std::process::id();
    let version = peer.program().map(|(_, v)| v).unwrap_or_default();
    // Let the server settle after startup, then the "empty" sample.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start = server.sample().rss;

    let (plans, groups) = plans(args, idle, connections);
    let shared = Arc::new(Shared::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    // ---- connect (and join) everything
    eprintln!(
        "chat-load: {scenario}: connecting {} clients to {}",
        plans.len(),
        peer.name()
    );
    let connect_started = Instant::now();
    let limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for (i, plan) in plans.iter().enumerate() {
        let addr = server.addr;
        let group = plan.group.clone();
        let source = client::source_addr(i, args.sources);
        let limit = limit.clone();
        connecting.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let ws = match client::connect(addr, peer.ws_path(), source).await {
                Ok(ws) => PeerWs::join(peer, ws, &group).await,
                Err(e) => Err(e),
            };
            (i, ws)
        });
    }
    let mut conns: Vec<Option<Conn>> = (0..plans.len()).map(|_| None).collect();
    let mut readers = JoinSet::new();
    let mut connect_errors = 0u64;
    let mut first_connect_error = None;
    while let Some(r) = connecting.join_next().await {
        let (i, ws) = r.context("connect task panicked")?;
        match ws {
            Ok(ws) => {
                let shared = shared.clone();
                let stop = stop_rx.clone();
                if plans[i].sends.is_some() {
                    let (sink, stream) = ws.split();
                    readers.spawn(async move { client::read_loop(stream, i, &shared, stop).await });
                    conns[i] = Some(Conn::Sender(sink));
                } else {
                    readers.spawn(async move { client::read_loop(ws, i, &shared, stop).await });
                    conns[i] = Some(Conn::Listener);
                }
            }
            Err(e) => {
                connect_errors += 1;
                first_connect_error.get_or_insert(e);
            }
        }
    }
    let connected = conns.iter().filter(|c| c.is_some()).count();
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "chat-load: {connected} connected and joined in {connect_secs:.1} s ({connect_errors} failed{})",
        first_connect_error
            .as_ref()
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );

    let mut report = json!({
        "scenario": scenario,
        "peer": peer.name(),
        "peer_version": version,
        "connections": connected,
        "nodes": 1,
        "duration_s": args.duration,
        "connect_seconds": crate::round3(connect_secs),
    });
    let obj = report.as_object_mut().expect("object");

    if idle {
        // Settle, then the "all connected" sample.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s0 = server.sample();
        let load0 = sys::cpu_ticks(self_pid).unwrap_or(0);
        eprintln!(
            "chat-load: holding {connected} idle connections for {} s",
            args.duration
        );
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        let s1 = server.sample();
        let load1 = sys::cpu_ticks(self_pid).unwrap_or(0);
        let _ = stop_tx.send(true);
        let closed_early = shared.closed_early.load(Ordering::Relaxed);
        let error_frames = shared.error_frames.load(Ordering::Relaxed);
        obj.extend(crate::idle_fields(
            crate::IdleHold {
                rss_start,
                rss_connected: s0.rss,
                rss_end: s1.rss,
                connected,
                server_ticks: s1.ticks.saturating_sub(s0.ticks),
                load_ticks: load1.saturating_sub(load0),
                errors: connect_errors + closed_early + error_frames,
                error_detail: json!({"connect": connect_errors, "closed_early": closed_early,
                       "error_frames": error_frames,
                       "first_error_frame": *shared.first_error.lock().unwrap(),
                       "first_connect_error": first_connect_error}),
                note: format!(
                    "{}: idle connections joined to groups of --group-size; rss_per_connection = \
                     (RSS 1 s after the last join - RSS 0.5 s after startup) / connections; \
                     server_cpu over the hold",
                    peer.name()
                ),
            },
            tck,
        ));
        drop(conns);
        crate::finish_readers(readers).await;
        return Ok(report);
    }

    // ---- warm-up: one message per group, every recipient must get it.
    let mut warm_expected = 0u64;
    for (i, plan) in plans.iter().enumerate() {
        if let (true, Some((target, recipients)), Some(Conn::Sender(sink))) =
            (plan.warmup, &plan.sends, conns[i].as_mut())
            && client::send_warmup(sink, target, &shared).await
        {
            warm_expected += recipients;
        }
    }
    let warm_deadline = Instant::now() + Duration::from_secs(15);
    while shared.warmup_delivered.load(Ordering::Relaxed) < warm_expected
        && Instant::now() < warm_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let warm_got = shared.warmup_delivered.load(Ordering::Relaxed);
    if warm_got < warm_expected {
        eprintln!("chat-load: warm-up incomplete: {warm_got}/{warm_expected} deliveries");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    shared.error_frames.store(0, Ordering::Relaxed);

    // ---- the measured window
    let senders: Vec<usize> = (0..plans.len())
        .filter(|&i| matches!(conns[i], Some(Conn::Sender(_))))
        .collect();
    if senders.is_empty() {
        bail!("no sender connected");
    }
    let per_sender = args.rate / senders.len() as f64;
    let window = Duration::from_secs_f64(args.duration);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + window;
    let mut sending = JoinSet::new();
    let mut clock_txs = Vec::with_capacity(senders.len());
    for &i in &senders {
        let Some(Conn::Sender(sink)) = conns[i].take() else {
            continue;
        };
        let (target, recipients) = plans[i].sends.clone().expect("sender plan");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        clock_txs.push(tx);
        let shared = shared.clone();
        sending
            .spawn(async move { client::send_loop(sink, target, rx, recipients, &shared).await });
    }
    let clock = client::spawn_clock(start, end, args.rate, clock_txs);
    eprintln!(
        "chat-load: {scenario}: {} senders at {:.1} msg/s each ({} msg/s total) for {} s",
        senders.len(),
        per_sender,
        args.rate,
        args.duration
    );
    tokio::time::sleep_until(start).await;
    let ticks0 = server.sample().ticks;
    let load0 = sys::cpu_ticks(self_pid).unwrap_or(0);
    let mut sinks = Vec::new();
    while let Some(r) = sending.join_next().await {
        sinks.push(r.context("sender panicked")?);
    }
    let _ = tokio::task::spawn_blocking(move || clock.join()).await;
    let senders_done = Instant::now();
    // Drain: until every expected delivery is in, or the drain timeout.
    let drain_deadline = senders_done + Duration::from_secs_f64(args.drain);
    loop {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let expected = shared.expected.load(Ordering::Relaxed);
        if delivered >= expected || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = Instant::now();
    let end_sample = server.sample();
    let load1 = sys::cpu_ticks(self_pid).unwrap_or(0);
    let _ = stop_tx.send(true);
    drop(sinks);
    drop(conns);
    crate::finish_readers(readers).await;

    let secs = args.duration;
    let sent = shared.sent.load(Ordering::Relaxed);
    let expected = shared.expected.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let duplicates = shared.duplicates.load(Ordering::Relaxed);
    let error_frames = shared.error_frames.load(Ordering::Relaxed);
    let send_errors = shared.send_errors.load(Ordering::Relaxed);
    let closed_early = shared.closed_early.load(Ordering::Relaxed);
    let cpu = end_sample.ticks.saturating_sub(ticks0) as f64 / tck;
    let lat = shared.latency();
    let lag = shared.send_lag();
    let rss_end = end_sample.rss;
    let group_size = args.group_size.min(connections);
    obj.extend([
        ("target_rate".into(), json!(args.rate)),
        ("groups".into(), json!(groups)),
        ("group_size".into(), json!(group_size)),
        ("senders".into(), json!(senders.len())),
        ("sent".into(), json!(sent)),
        (
            "sent_per_sec".into(),
            json!(crate::round3(sent as f64 / secs)),
        ),
        ("expected".into(), json!(expected)),
        ("delivered".into(), json!(delivered)),
        (
            "delivered_per_sec".into(),
            json!(crate::round3(delivered as f64 / secs)),
        ),
        ("lost".into(), json!(expected.saturating_sub(delivered))),
        ("duplicates".into(), json!(duplicates)),
        ("p50_ms".into(), json!(lat.p50)),
        ("p90_ms".into(), json!(lat.p90)),
        ("p99_ms".into(), json!(lat.p99)),
        ("p999_ms".into(), json!(lat.p999)),
        ("max_ms".into(), json!(lat.max)),
        ("mean_ms".into(), json!(crate::round3(lat.mean))),
        ("latency_samples".into(), json!(lat.count)),
        (
            "errors".into(),
            json!(connect_errors + error_frames + send_errors + closed_early),
        ),
        (
            "error_detail".into(),
            json!({
                "connect": connect_errors, "error_frames": error_frames,
                "send": send_errors, "closed_early": closed_early,
                "first_error_frame": *shared.first_error.lock().unwrap(),
                "first_connect_error": first_connect_error,
            }),
        ),
        ("ack_p50_ms".into(), Value::Null),
        ("ack_p99_ms".into(), Value::Null),
        ("send_lag_p50_ms".into(), json!(lag.p50)),
        ("send_lag_p99_ms".into(), json!(lag.p99)),
        ("send_lag_max_ms".into(), json!(lag.max)),
        ("server_rss_start_bytes".into(), json!(rss_start)),
        ("server_rss_bytes".into(), json!(rss_end)),
        (
            "rss_per_connection_bytes".into(),
            json!((rss_end.saturating_sub(rss_start) as f64 / connected.max(1) as f64).round()),
        ),
        ("server_cpu_seconds".into(), json!(crate::round3(cpu))),
        (
            "delivered_per_server_cpu_second".into(),
            if cpu > 0.0 {
                json!((delivered as f64 / cpu).round())
            } else {
                Value::Null
            },
        ),
        (
            "measured_seconds".into(),
            json!(crate::round3((drained - start).as_secs_f64())),
        ),
        (
            "load_cpu_seconds".into(),
            json!(crate::round3(load1.saturating_sub(load0) as f64 / tck)),
        ),
    ]);
    if peer == Peer::Centrifugo {
        obj.insert(
            "note".into(),
            json!(format!(
                "centrifugo also delivers each publication back to its sender (no \
                 broadcast-except-sender); those {} echoes are dropped by the client, not counted",
                sent
            )),
        );
    }
    Ok(report)
}
