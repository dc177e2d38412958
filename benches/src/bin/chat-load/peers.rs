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
//! The frame a sender sends is [`crate::client::Target::Baseline`]'s (shaped and sized like
//! the chat server's `message` event, carrying the intended send time in `content`), wrapped in
//! the peer's envelope on the way out. [`PeerWs`] does the protocol: it wraps outgoing frames, answers the
//! peers' application-level pings, swallows their control frames, and hands the reader every
//! delivery as a frame `client::read_loop` already understands (`{"type":"message",` followed
//! by the payload from its `"content":"` on), and every error reply or disconnect as a
//! `{"type":"error",…}` frame. So the same `read_loop`, `send_loop`, clock, histograms and
//! counters measure all of them.
//!
//! Wiring into `chat-load`: scenarios name a [`Peer`] and the `idle` or `group` workload
//! (planned like `baseline-idle` / `baseline-group`: groups `g<k>` of `--group-size`); the
//! server is [`Peer::start`]ed in place of the baseline (it is a [`Proc`] like the others, so
//! it is sampled, checked and killed the same way), and `Peer` is the [`crate::Protocol`] that
//! `crate::drive` runs the clients with (its path, handshake, report fields and notes).
//!
//! Programs: `peer-socketioxide` next to this executable (or `$CHAT_LOAD_SOCKETIOXIDE_BIN`);
//! `benches/peers/start-centrifugo.sh` of this source tree (or `$CHAT_LOAD_CENTRIFUGO_START`),
//! which runs `target/peers/bin/centrifugo` (or `$PEER_CENTRIFUGO_BIN`): a missing binary is an
//! error that says to run `benches/peers/install-centrifugo.sh`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::client::Ws;
use crate::server::Proc;

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

impl crate::Protocol for Peer {
    type Client = PeerWs;

    fn path(self, _: &crate::Plan) -> String {
        self.ws_path().to_owned()
    }

    async fn open(self, ws: Ws, plan: crate::Plan) -> Result<PeerWs, String> {
        PeerWs::join(self, ws, &plan.group).await
    }

    fn fields(self) -> Vec<(String, Value)> {
        let version = self.program().map(|(_, v)| v).unwrap_or_default();
        vec![
            ("peer".into(), json!(self.name())),
            ("peer_version".into(), json!(version)),
        ]
    }

    fn idle_note(self) -> String {
        format!(
            "{}: idle connections joined to groups of --group-size; rss_per_connection = \
             (RSS 1 s after the last join - RSS 0.5 s after startup) / connections; \
             server_cpu over the hold",
            self.name()
        )
    }

    fn traffic_note(self, sent: u64) -> Option<String> {
        (self == Peer::Centrifugo).then(|| {
            format!(
                "centrifugo also delivers each publication back to its sender (no \
                 broadcast-except-sender); those {sent} echoes are dropped by the client, not \
                 counted"
            )
        })
    }
}
