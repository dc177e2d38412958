//! A terminal WebSocket client for `chat-server`: every line typed is sent as one text frame,
//! every frame received is printed on its own line. Enough to take the README's tour without
//! installing anything else.
//!
//! ```sh
//! cargo run --release --bin chat-cli -- 'ws://127.0.0.1:8080/ws?user=bob'
//! # with CHAT_JWT_SECRET set on the server:
//! cargo run --release --bin chat-cli -- --token "$JWT" ws://127.0.0.1:8080/ws
//! ```
//!
//! Type a frame, e.g.
//! `{"type":"message","conversation_id":"…","client_msg_id":"m1","content":"hi"}`.
//! Ctrl-D closes the connection.

use anyhow::Context;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[derive(Debug, Parser)]
#[command(name = "chat-cli", about = "Terminal WebSocket client for chat-server")]
struct Args {
    /// The socket URL, e.g. `ws://127.0.0.1:8080/ws?user=alice` (dev mode).
    url: String,
    /// A JWT, sent as `Authorization: Bearer …` on the upgrade request.
    #[arg(long, env = "CHAT_TOKEN")]
    token: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut request = args
        .url
        .as_str()
        .into_client_request()
        .context("not a ws:// URL")?;
    if let Some(token) = &args.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).context("bad token")?;
        request.headers_mut().insert("authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    eprintln!("connected to {} (Ctrl-D to quit)", args.url);
    let (mut tx, mut rx) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => tx.send(Message::text(line)).await?,
                None => {
                    let _ = tx.send(Message::Close(None)).await;
                    break;
                }
            },
            frame = rx.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Binary(bytes))) => println!("<{} binary bytes>", bytes.len()),
                Some(Ok(Message::Close(close))) => {
                    match close {
                        Some(c) => eprintln!("closed by the server: {} {}", u16::from(c.code), c.reason),
                        None => eprintln!("closed by the server"),
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("the connection failed"),
                None => break,
            },
        }
    }
    Ok(())
}
