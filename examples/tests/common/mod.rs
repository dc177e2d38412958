//! What the process-level tests of `examples/` share: a `chat-server` child process on a free
//! loopback port (killed on drop), plain-socket HTTP against it, and the WebSocket test client.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

pub use chat_testkit::free_port;
pub use chat_testkit::ws::{Frame, WAIT, WsClient as Ws};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A `chat-server` process (the binary of this package), killed on drop.
#[derive(Debug)]
pub struct Node {
    /// Where it listens (127.0.0.1).
    pub port: u16,
    /// The process.
    pub child: Child,
}

impl Node {
    /// Starts `chat-server` with `env` (on top of: a free port, dev mode, no rate limit,
    /// `RUST_LOG=warn`) and waits until `/healthz` answers 200, at most `start_wait`. Panics if
    /// the process exits first.
    pub async fn spawn(env: &[(&str, String)], start_wait: Duration) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-server"));
        cmd.env("CHAT_BIND", format!("127.0.0.1:{port}"))
            .env("CHAT_RATE_LIMIT", "0")
            .env("RUST_LOG", "warn")
            .env_remove("CHAT_JWT_SECRET")
            .env_remove("CHAT_REDIS_URL")
            .env_remove("CHAT_SCYLLA_URI")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn chat-server");
        let deadline = tokio::time::Instant::now() + start_wait;
        loop {
            if let Ok((200, _)) = try_http(port, "GET", "/healthz", None, None).await {
                return Self { port, child };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("chat-server exited at start: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chat-server did not start within {start_wait:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the process.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// One HTTP request as `user` (dev mode's `X-Chat-User`).
    pub async fn try_http(
        &self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<Value>,
    ) -> std::io::Result<(u16, Value)> {
        try_http(self.port, method, path, user, body).await
    }

    /// [`Node::try_http`] that must reach the server.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        user: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.try_http(method, path, Some(user), body).await.unwrap()
    }

    /// A WebSocket for `user`, connected like a real client: retried with backoff while the
    /// node answers 5xx (e.g. 503 while a backend is down).
    pub async fn ws(&self, user: &str) -> Ws {
        Ws::connect_retrying(&self.ws_url(user)).await
    }

    /// The socket URL of `user` (dev mode).
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?user={user}", self.port)
    }
}

/// One HTTP/1.1 request over a plain socket: `(status, JSON body or null)`.
pub async fn try_http(
    port: u16,
    method: &str,
    path: &str,
    user: Option<&str>,
    body: Option<Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let user = user
        .map(|u| format!("x-chat-user: {u}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{user}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = text
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((status, json))
}
