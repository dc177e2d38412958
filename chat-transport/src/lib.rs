//! # chat-transport
//!
//! The WebSocket + HTTP gateway for [`chat_core`]: serves the whole wire contract
//! (`docs/protocol.md`) over hyper 1 and tokio-tungstenite.
//!
//! | piece | what |
//! |---|---|
//! | [`Gateway`] | a `tower::Service` (mount it in hyper or axum) with [`Gateway::serve`] for a plain listener |
//! | [`codec`] | JSON (text frames, `chat.v1.json`, default) and protobuf (binary frames, `chat.v1.proto`) |
//! | [`auth`] | [`auth::Authenticator`]; HS256 [`auth::JwtAuth`]; [`auth::DevAuth`] for local development |
//! | [`ws`] | the per-connection loop over any `Sink`/`Stream` of WebSocket messages; close codes |
//! | [`metrics`] | `/metrics` in the Prometheus/OpenMetrics text format |
//!
//! Routes: `GET /ws`, `POST|GET /api/conversations`, `GET /api/conversations/{id}`,
//! `GET /api/conversations/{id}/messages`, `POST /api/conversations/{id}/members`,
//! `DELETE /api/conversations/{id}/members/{user}`, `GET /api/presence`, `GET /healthz`,
//! `GET /metrics`, and `GET /` when a page is configured.
//!
//! Per connection: a bounded outbound queue drained by one writer that writes a batch and
//! flushes once; a frame is encoded once per codec and the bytes shared by every recipient;
//! tungstenite buffers of 4 KiB instead of 128 KiB; pings every 20 s and a reaper for silent
//! peers; slow consumers are closed (4001) rather than buffered.
//!
//! ```no_run
//! use std::sync::Arc;
//! use chat_core::Chat;
//! use chat_transport::{Gateway, auth::JwtAuth};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let chat = Chat::builder().build().await?;
//! let gateway = Gateway::new(chat.clone(), Arc::new(JwtAuth::new(b"secret")));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // Elsewhere, on SIGTERM: chat.shutdown();
//! gateway.serve(listener).await?;
//! # Ok(()) }
//! ```
//!
//! Mounted in an existing axum application (any tower-compatible server works the same way;
//! on a plain TCP stream the gateway takes its direct write path there too):
//!
//! ```no_run
//! use std::sync::Arc;
//! use chat_core::Chat;
//! use chat_transport::{Gateway, auth::JwtAuth};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let chat = Chat::builder().build().await?;
//! let gateway = Gateway::new(chat.clone(), Arc::new(JwtAuth::new(b"secret")));
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "the host application" }))
//!     .nest_service("/chat", gateway); // clients connect to /chat/ws
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(async move {
//!         let _ = tokio::signal::ctrl_c().await;
//!         chat.shutdown();
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Runnable programs, each with the command to run it in its first lines, are in the
//! repository's `examples/`: `chat-server` (the reference server: every setting, Redis, the
//! chat page), `axum-embed` (the snippet above) and `chat-cli` (a terminal client).

mod api;
pub mod auth;
pub mod codec;
mod direct;
mod gateway;
pub mod metrics;
pub mod ws;

pub use api::error_response;
pub use gateway::{Gateway, GatewayConfig, GatewayResponse};
