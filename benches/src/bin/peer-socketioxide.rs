//! `peer-socketioxide`: the socket.io peer `chat-load` compares `chat-server` to: a minimal
//! chat server on [socketioxide] (the socket.io server a Rust user would pick instead), hosted
//! by axum, built from crates.io.
//!
//! The same workload as `baseline-server` and the chat server's `group` scenario, written the
//! way the socketioxide docs show it: a client connects over socket.io v5 / Engine.IO 4 on the
//! WebSocket transport (`GET /socket.io/?EIO=4&transport=websocket`), connects to the default
//! namespace, emits `join` with its group name (acknowledged), then every `message` event it
//! emits is broadcast to the other members of its room (`socket.to(room).emit(..)`, which
//! excludes the sender). No store, no auth. The two event handlers are registered in a
//! connect middleware rather than in the connect handler (see `main`: socketioxide spawns the
//! connect handler after acknowledging the connect, so a client that emits at once could lose
//! its first event). The payload is deserialized into a
//! `serde_json::Value` and serialized once per broadcast (socketioxide encodes a broadcast
//! packet once for every recipient).
//!
//! ```sh
//! peer-socketioxide --bind 127.0.0.1:9092     # or PEER_BIND=127.0.0.1:9092
//! ```
//!
//! Settings, against the chat gateway's and `baseline-server`'s:
//! * per-connection outbound queue: 1024 packets (`max_buffer_size`, default 128), like the
//!   engine's `outbound_queue`; a full queue makes the emit to that socket fail (socket.io
//!   drops the packet; the gateway disconnects a slow consumer instead);
//! * WebSocket read buffer 4 KiB (`ws_read_buffer_size`, the default), largest message and
//!   frame 256 KiB, like the gateway;
//! * writes: engineioxide feeds every queued packet and flushes once the queue is drained (the
//!   gateway flushes every 64 frames). Not settable: its tungstenite write buffer
//!   (tungstenite's default, 128 KiB before a write is forced) and its per-recipient copy of
//!   the encoded packet into a `String`;
//! * heartbeat: Engine.IO's own ping every 25 s, 20 s to answer (the defaults; `chat-load`
//!   answers them).
//!
//! It answers no other HTTP: readiness is "the port accepts". Emits that fail (a full queue)
//! are counted and reported on stderr every 5 s.
//!
//! [socketioxide]: https://docs.rs/socketioxide
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::serve::{Listener, ListenerExt};
use serde_json::Value;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Data, Extension, SocketRef};
use socketioxide::handler::ConnectHandler;

/// Per-connection outbound queue, in packets (the engine's default `outbound_queue`).
const OUTBOUND_QUEUE: usize = 1024;
/// WebSocket read buffer (the gateway's default).
const WS_READ_BUFFER: usize = 4 * 1024;
/// Largest frame accepted (the gateway's default: 4 × 64 KiB).
const MAX_FRAME_BYTES: usize = 256 * 1024;

/// The room a socket joined (a socket extension).
#[derive(Clone, Debug)]
struct Group(String);

/// Broadcasts that failed for at least one recipient.
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Registers the socket's event handlers (a connect middleware that always admits).
async fn register_handlers(s: SocketRef) -> Result<(), Infallible> {
    s.on(
        "join",
        async |s: SocketRef, Data(group): Data<String>, ack: AckSender| {
            s.join(group.clone());
            s.extensions.insert(Group(group));
            let _ = ack.send("ok");
        },
    );
    s.on(
        "message",
        async |s: SocketRef, Data(msg): Data<Value>, Extension(Group(group)): Extension<Group>| {
            if s.to(group).emit("message", &msg).await.is_err() {
                FAILURES.fetch_add(1, Ordering::Relaxed);
            }
        },
    );
    Ok(())
}

fn parse_bind() -> SocketAddr {
    let mut bind = std::env::var("PEER_BIND").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bind" => bind = args.next().expect("--bind needs an address"),
            "-h" | "--help" => {
                println!(
                    "peer-socketioxide [--bind ADDR]  (default 127.0.0.1:9092, env PEER_BIND)\n\
                     socket.io chat peer: connect to /socket.io/?EIO=4&transport=websocket, \
                     emit `join` <group> (acked), then each `message` event goes to every other \
                     member of the group."
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?}; try --help");
                std::process::exit(2);
            }
        }
    }
    bind.parse().expect("--bind: not a socket address")
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let bind = parse_bind();
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(OUTBOUND_QUEUE)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .ws_max_message_size(MAX_FRAME_BYTES)
        .ws_max_frame_size(MAX_FRAME_BYTES)
        .build_layer();

    // The event handlers are registered in a connect *middleware*: socketioxide awaits
    // middlewares before it sends the namespace `40` packet, but spawns the connect handler
    // after it, so handlers registered there race the client's first event (a `join` sent
    // right after `40` was then lost now and again: no handler yet, no ack).
    io.ns("/", { async |_: SocketRef| {} }.with(register_handlers));

    tokio::spawn(async move {
        let mut reported = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = FAILURES.load(Ordering::Relaxed);
            if now != reported {
                eprintln!("peer-socketioxide: {now} broadcasts failed for some recipient");
                reported = now;
            }
        }
    });

    let app = axum::Router::new().layer(layer);
    // Nagle off, like the gateway and baseline-server.
    let listener = tokio::net::TcpListener::bind(bind).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    eprintln!("peer-socketioxide listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
