//! A real gateway on port 0 and real WebSocket / HTTP clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use chat_core::{Chat, ChatConfig};
use chat_transport::auth::{Authenticator, DevAuth};
use chat_transport::{Gateway, GatewayConfig};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

pub use chat_testkit::ws::WAIT;

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

/// The shared WebSocket test client.
pub use chat_testkit::ws::WsClient as Ws;
