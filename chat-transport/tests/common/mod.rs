//! A real gateway on port 0 and real WebSocket / HTTP clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_core::{Chat, ChatConfig};
use chat_transport::auth::{Authenticator, DevAuth};
use chat_transport::{Gateway, GatewayConfig};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);
pub const QUIET: Duration = Duration::from_millis(200);

pub struct Server {
    pub addr: SocketAddr,
    pub chat: Chat,
    pub gateway: Gateway,
    pub serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(|_| {}, |_| {}, Arc::new(DevAuth)).await
    }

    pub async fn start_with(
        chat_cfg: impl FnOnce(&mut ChatConfig),
        gw_cfg: impl FnOnce(&mut GatewayConfig),
        auth: Arc<dyn Authenticator>,
    ) -> Self {
        let chat = Chat::builder().configure(chat_cfg).build().await.unwrap();
        let mut config = GatewayConfig::for_chat(&chat);
        gw_cfg(&mut config);
        let gateway = Gateway::with_config(chat.clone(), auth, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let g = gateway.clone();
        let serving = tokio::spawn(async move { g.serve(listener).await });
        Self {
            addr,
            chat,
            gateway,
            serving,
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    pub async fn ws(&self, user: &str) -> Ws {
        Ws::connect(&self.ws_url(&format!("user={user}")), None).await
    }

    /// An HTTP request; returns the status and the JSON body (Null when empty / not JSON).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, bytes) = self
            .http_raw(method, path, auth, body.map(|b| b.to_string()))
            .await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn http_raw(
        &self,
        method: &str,
        path: &str,
        auth: Auth<'_>,
        body: Option<String>,
    ) -> (u16, Bytes) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let mut uri = format!("http://{}{path}", self.addr);
        let mut req = http::Request::builder().method(method);
        match auth {
            Auth::None => {}
            Auth::User(u) => {
                uri.push(if path.contains('?') { '&' } else { '?' });
                uri.push_str(&format!("user={u}"));
            }
            Auth::Bearer(t) => req = req.header("authorization", format!("Bearer {t}")),
        }
        let req = req
            .uri(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let resp = tokio::time::timeout(WAIT, client.request(req))
            .await
            .expect("http timeout")
            .expect("http request");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, bytes)
    }

    /// Creates a conversation as `creator` over HTTP and returns its id.
    pub async fn conversation(&self, creator: &str, kind: &str, members: &[&str]) -> String {
        let (status, body) = self
            .http(
                "POST",
                "/api/conversations",
                Auth::User(creator),
                Some(serde_json::json!({"kind": kind, "members": members})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    None,
    User(&'a str),
    Bearer(&'a str),
}

pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn connect(url: &str, protocol: Option<&str>) -> Self {
        Self::try_connect(url, protocol).await.expect("ws connect")
    }

    pub async fn try_connect(
        url: &str,
        protocol: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request()?;
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        let (stream, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self { stream })
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.stream.send(Message::Text(s.into())).await.unwrap();
    }

    /// Next data frame (text or binary) within [`WAIT`]; `None` when the socket closed.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a frame");
            match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Next JSON frame.
    pub async fn recv(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Receives until a frame of `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Asserts no data frame arrives for [`QUIET`].
    pub async fn quiet(&mut self) {
        if let Ok(Some(Ok(m))) = tokio::time::timeout(QUIET, self.stream.next()).await {
            if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
                panic!("unexpected frame {m:?}");
            }
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

    /// Sends a message and returns the ack.
    pub async fn send_message(&mut self, conv: &str, cmid: &str, content: &str) -> Value {
        self.send(serde_json::json!({
            "type": "message", "conversation_id": conv, "client_msg_id": cmid, "content": content
        }))
        .await;
        loop {
            let v = self.recv().await;
            if v["type"] == "message_ack" && v["client_msg_id"] == cmid {
                return v;
            }
            if v["type"] == "error" {
                panic!("send failed: {v}");
            }
        }
    }
}
