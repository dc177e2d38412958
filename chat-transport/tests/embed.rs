//! The gateway mounted as a tower service inside an axum application, under a path prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use chat_core::Chat;
use chat_transport::Gateway;
use chat_transport::auth::DevAuth;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn the_gateway_mounts_in_axum_with_websockets_and_http() {
    let chat = Chat::builder().build().await.unwrap();
    let gateway = Gateway::new(chat.clone(), Arc::new(DevAuth));
    let app = Router::new()
        .route("/", get(|| async { "host app" }))
        .nest_service("/chat", gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat/ws?user=alice"))
        .await
        .unwrap();
    ws.send(Message::Text(
        r#"{"type":"sync","conversations":{}}"#.into(),
    ))
    .await
    .unwrap();
    // The first frame describes the session, then the answer.
    for expected in ["session", "sync_done"] {
        let reply = ws.next().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert_eq!(v["type"], expected);
    }

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /chat/healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(r#""status":"ok""#), "{resp}");
    chat.shutdown();
}
