//! `baseline-server`: the ceiling `chat-load` compares `chat-server` to.
//!
//! A bare tokio-tungstenite broadcast server: no auth, no store, no engine, no codec. A client
//! connects to `GET /ws?group=<g>`; every text frame it sends is broadcast, as the very same
//! bytes (one `Utf8Bytes` shared by every recipient, never copied), to every *other* client of
//! the group. Per connection, like the chat gateway: tungstenite read and write buffers of
//! 4 KiB, a bounded outbound queue of 1024 frames (a client whose queue is full is
//! disconnected, as the gateway does with a slow consumer), and a writer task that feeds up to
//! 64 queued frames and flushes once.
//!
//! ```sh
//! baseline-server --bind 127.0.0.1:9090     # or BASELINE_BIND=127.0.0.1:9090
//! ```
//!
//! `chat-load --scenario baseline-idle|baseline-group` starts it itself. The frames it relays
//! are whatever the clients send; `chat-load` sends JSON shaped like the chat server's
//! `message` event (same size, same `content` field) so the same measuring code works for both.
//! It answers no HTTP: readiness is "the port accepts".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// tungstenite read and write buffer size: the same as the chat gateway's default.
const IO_BUFFER_BYTES: usize = 4 * 1024;
/// Largest frame accepted (the gateway's default: 4 × 64 KiB).
const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Per-connection outbound queue (the engine's default `outbound_queue`).
const OUTBOUND_QUEUE: usize = 1024;
/// Frames per write batch before one flush (the gateway's default `write_batch`).
const WRITE_BATCH: usize = 64;

/// One connected client, as seen by the other members of its group.
struct Member {
    id: u64,
    tx: mpsc::Sender<Message>,
}

/// The members of one group.
type Group = Arc<RwLock<Vec<Member>>>;

/// Every group, by name.
#[derive(Default)]
struct Groups {
    by_name: Mutex<HashMap<String, Group>>,
}

impl Groups {
    fn join(&self, name: &str, member: Member) -> Group {
        let group = self
            .by_name
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone();
        group.write().unwrap().push(member);
        group
    }
}

fn parse_bind() -> SocketAddr {
    let mut bind = std::env::var("BASELINE_BIND").unwrap_or_else(|_| "127.0.0.1:9090".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bind" => bind = args.next().expect("--bind needs an address"),
            "-h" | "--help" => {
                println!(
                    "baseline-server [--bind ADDR]  (default 127.0.0.1:9090, env BASELINE_BIND)\n\
                     Bare WebSocket broadcast: GET /ws?group=<g>; each text frame goes to every \
                     other client of the group."
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
    let listener = TcpListener::bind(bind).await?;
    eprintln!("baseline-server listening on {}", listener.local_addr()?);
    let groups = Arc::new(Groups::default());
    let next_id = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let groups = groups.clone();
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            connection(stream, id, &groups).await;
        });
    }
}

/// The `group` query parameter of `/ws?group=<g>`, or `""` (everybody in one default group).
fn group_of(req: &Request) -> String {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("group="))
        .unwrap_or("")
        .to_owned()
}

// tungstenite's callback signature returns its (large) `ErrorResponse` as the error.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, id: u64, groups: &Groups) {
    let config = WebSocketConfig::default()
        .read_buffer_size(IO_BUFFER_BYTES)
        .write_buffer_size(IO_BUFFER_BYTES)
        .max_write_buffer_size(MAX_FRAME_BYTES * 4)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let mut group_name = String::new();
    let callback = |req: &Request, resp: Response| {
        group_name = group_of(req);
        Ok(resp)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE);
    let group = groups.join(&group_name, Member { id, tx });

    // Writer: up to WRITE_BATCH frames fed, then one flush. It ends when the socket fails or
    // when the queue's only sender (the group entry) is gone: dropped as a slow consumer.
    let mut writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            for m in batch.drain(..) {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    // Reader: every text frame to every other member, the same bytes.
    let mut slow = Vec::new();
    let mut writer_done = false;
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                {
                    let members = group.read().unwrap();
                    for m in members.iter().filter(|m| m.id != id) {
                        if m.tx.try_send(Message::Text(text.clone())).is_err() {
                            slow.push(m.id);
                        }
                    }
                }
                if !slow.is_empty() {
                    // Slow consumers (or already gone): drop them from the group; their
                    // writer then ends and their connection closes.
                    group.write().unwrap().retain(|m| !slow.contains(&m.id));
                    slow.clear();
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    group.write().unwrap().retain(|m| m.id != id);
    if !writer_done {
        // Our queue's sender was just removed: the writer drains and ends.
        let _ = writer.await;
    }
}
