//! [`WsClient`]: the WebSocket test client of the gateway, cluster and example tests (JSON
//! frames over a real socket, every wait bounded).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest wait for a frame that must arrive.
pub const WAIT: Duration = Duration::from_secs(15);

/// What [`WsClient::next_frame`] got.
#[derive(Debug)]
pub enum Frame {
    /// A JSON text frame.
    Json(Value),
    /// The socket closed, with the close code if there was one.
    Closed(Option<u16>),
}

/// A WebSocket client speaking the JSON codec. Panics (the test fails) on anything a test
/// did not expect: a timeout, a non-JSON frame where JSON was expected.
///
/// Connecting waits for the server's first frame, the `session` frame (who, which connection,
/// the token's expiry, the limits), and keeps it in [`WsClient::session`], so the frames a
/// test receives start with what its own commands caused.
#[derive(Debug)]
pub struct WsClient {
    /// The socket.
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `session` frame the server sent first (text for the JSON codec, binary for
    /// protobuf).
    pub session: Message,
}

impl WsClient {
    /// Connects to `url`, asking for subprotocol `protocol` if given; panics on failure.
    pub async fn connect(url: &str, protocol: Option<&str>) -> Self {
        match Self::try_connect(url, protocol).await {
            Ok(ws) => ws,
            Err(e) => panic!("ws connect to {url}: {e}"),
        }
    }

    /// Connects to `url`, asking for subprotocol `protocol` if given.
    pub async fn try_connect(
        url: &str,
        protocol: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request()?;
        if let Some(p) = protocol
            && let Ok(value) = p.parse()
        {
            req.headers_mut().insert("sec-websocket-protocol", value);
        }
        let (mut stream, _) = tokio_tungstenite::connect_async(req).await?;
        let session = loop {
            match tokio::time::timeout(WAIT, stream.next()).await {
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => break m,
                Ok(Some(Ok(m))) => panic!("expected the session frame, got {m:?}"),
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed),
                Err(_) => panic!("no session frame within {WAIT:?}"),
            }
        };
        Ok(Self { stream, session })
    }

    /// The `session` frame as JSON (panics for a protobuf connection).
    pub fn session_json(&self) -> Value {
        match &self.session {
            Message::Text(t) => match serde_json::from_str(t) {
                Ok(v) => v,
                Err(e) => panic!("session frame is not JSON ({e}): {t}"),
            },
            other => panic!("the session frame is not a text frame: {other:?}"),
        }
    }

    /// Connects like a real client: retries with backoff (e.g. while a node answers 503)
    /// until [`WAIT`] has passed.
    pub async fn connect_retrying(url: &str) -> Self {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut backoff = Duration::from_millis(50);
        loop {
            match Self::try_connect(url, None).await {
                Ok(ws) => return ws,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "cannot connect to {url}: {e}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Sends a JSON frame (a closed socket is ignored: the next receive reports it).
    pub async fn send(&mut self, v: Value) {
        let _ = self.stream.send(Message::Text(v.to_string().into())).await;
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, s: &str) {
        let _ = self.stream.send(Message::Text(s.into())).await;
    }

    /// The next data frame (text or binary) within [`WAIT`]; `None` when the socket closed.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within {WAIT:?}"));
            match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next JSON frame or close within `wait`; `None` when nothing came.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            match tokio::time::timeout(wait, self.stream.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(&t) {
                    Ok(v) => return Some(Frame::Json(v)),
                    Err(e) => panic!("not JSON ({e}): {t}"),
                },
                Ok(Some(Ok(Message::Close(c)))) => {
                    return Some(Frame::Closed(c.map(|c| u16::from(c.code))));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return Some(Frame::Closed(None)),
            }
        }
    }

    /// The next JSON frame.
    pub async fn recv(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(t)) => match serde_json::from_str(&t) {
                Ok(v) => v,
                Err(e) => panic!("not JSON ({e}): {t}"),
            },
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Receives until a frame of type `ty` arrives (within [`WAIT`]).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        self.recv_type_any(&[ty]).await
    }

    /// Receives until a frame of one of `types` arrives (within [`WAIT`]).
    pub async fn recv_type_any(&mut self, types: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(Frame::Json(v)) if types.iter().any(|t| v["type"] == *t) => return v,
                Some(Frame::Json(_)) => continue,
                Some(Frame::Closed(c)) => panic!("closed ({c:?}) while waiting for {types:?}"),
                None => panic!("timed out waiting for {types:?}"),
            }
        }
    }

    /// Asserts that nothing was sent to this socket before now by the server's node: an empty
    /// `sync` is a barrier (its `sync_done` is queued after everything queued before it), so
    /// the next data frame must be that `sync_done`. For deliveries through another node, where
    /// no barrier covers them, see [`WsClient::quiet_for`].
    pub async fn quiet(&mut self) {
        self.send(json!({"type": "sync", "conversations": {}}))
            .await;
        let v = self.recv().await;
        assert!(
            v["type"] == "sync_done" && v["conversations"] == json!({}),
            "unexpected frame {v}"
        );
    }

    /// Asserts that no data frame arrives for `window`.
    pub async fn quiet_for(&mut self, window: Duration) {
        if let Ok(Some(Ok(m))) = tokio::time::timeout(window, self.stream.next()).await
            && !matches!(m, Message::Ping(_) | Message::Pong(_))
        {
            panic!("unexpected frame {m:?}");
        }
    }

    /// Waits for the close frame; returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return None,
                Err(_) => panic!("no close within {WAIT:?}"),
            }
        }
    }

    /// Sends a text message and returns its ack (panics on an error frame for it).
    pub async fn send_message(&mut self, conv: &str, cmid: &str, content: &str) -> Value {
        self.send(json!({
            "type": "message", "conversation_id": conv, "client_msg_id": cmid, "content": content
        }))
        .await;
        loop {
            let v = self.recv_type_any(&["message_ack", "error"]).await;
            if v["type"] == "error" && v["client_msg_id"].is_null() {
                panic!("send failed: {v}");
            }
            if v["client_msg_id"] == cmid {
                assert_eq!(v["type"], "message_ack", "send failed: {v}");
                return v;
            }
        }
    }

    /// Syncs `conv` from `after` to the end (following `more`); returns the replayed messages.
    pub async fn sync_all(&mut self, conv: &str, mut after: u64) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            self.send(json!({"type": "sync", "conversations": {conv: after}}))
                .await;
            loop {
                let v = self.recv_type_any(&["message", "sync_done"]).await;
                if v["type"] == "message" {
                    if v["message"]["conversation_id"] == conv {
                        after = after.max(v["message"]["seq"].as_u64().unwrap_or(after));
                        out.push(v["message"].clone());
                    }
                    continue;
                }
                if v["more"].as_array().is_some_and(|m| !m.is_empty()) {
                    break;
                }
                return out;
            }
        }
    }
}
