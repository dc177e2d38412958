//! Embedding the chat gateway in an existing axum application.
//!
//! ```sh
//! cargo run --release --bin axum-embed
//! curl http://127.0.0.1:3000/            # the host's own route
//! curl http://127.0.0.1:3000/chat/healthz # the gateway, mounted under /chat
//! ```
//!
//! The gateway is a `tower::Service`, so it mounts with `nest_service`; WebSocket clients
//! connect to `ws://127.0.0.1:3000/chat/ws?user=alice` (dev auth here; use `JwtAuth` for real).

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use chat_core::Chat;
use chat_transport::Gateway;
use chat_transport::auth::DevAuth;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let chat = Chat::builder().build().await?;
    let gateway = Gateway::new(chat.clone(), Arc::new(DevAuth));
    let app = Router::new()
        .route("/", get(|| async { "the host application" }))
        .nest_service("/chat", gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            chat.shutdown();
        })
        .await?;
    Ok(())
}
