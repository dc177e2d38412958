//! The gateway: one tower `Service` that serves `GET /ws` (WebSocket), the HTTP API,
//! `/healthz`, `/metrics` and (optionally) a page at `/`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chat_core::transport::{DynTokenVerifier, SessionOptions};
use chat_core::{Chat, Error, UserId};
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::api::{error_response, internal, json_response};
use crate::auth::{AuthRequest, Authenticator, Credential, RefreshVerifier};
use crate::codec::Codec;
use crate::metrics::{HttpLabels, Metrics};
use crate::ws::{ConnectionParams, Ended, run_connection, run_tcp_connection};

/// The response type of the gateway service.
pub type GatewayResponse = Response<Full<Bytes>>;

/// Gateway limits and timings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Largest WebSocket frame / message accepted (default: 4 × the engine's content limit).
    pub max_frame_bytes: usize,
    /// Ping period (default 20 s).
    pub ping_interval: Duration,
    /// Ping intervals with no inbound frame before a connection is reaped (default 2).
    pub missed_pongs: u32,
    /// Most frames per write batch before a flush (default 64).
    pub write_batch: usize,
    /// Longest a batch write may block (default 10 s).
    pub write_timeout: Duration,
    /// Most concurrent WebSocket connections (default 100,000); above it, 503.
    pub max_connections: usize,
    /// tungstenite read and write buffer sizes (default 4 KiB each, instead of 128 KiB).
    pub io_buffer_bytes: usize,
    /// Largest HTTP API request body (default 1 MiB).
    pub max_body_bytes: usize,
    /// How long shutdown waits for connections to finish (default 10 s).
    pub shutdown_grace: Duration,
    /// Served at `GET /` when set (the reference server's chat page).
    pub index_html: Option<&'static str>,
}

impl GatewayConfig {
    /// Defaults sized from the engine's content limit.
    pub fn for_chat(chat: &Chat) -> Self {
        Self {
            max_frame_bytes: chat
                .config()
                .max_message_bytes
                .saturating_mul(4)
                .max(16 * 1024),
            ping_interval: Duration::from_secs(20),
            missed_pongs: 2,
            write_batch: 64,
            write_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            io_buffer_bytes: 4 * 1024,
            max_body_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            index_html: None,
        }
    }
}

/// The WebSocket + HTTP gateway. Cheap to clone; implements `tower::Service`, so a host can
/// mount it in its own hyper or axum server, or call [`Gateway::serve`].
#[derive(Clone, Debug)]
pub struct Gateway {
    pub(crate) inner: Arc<GatewayInner>,
}

#[derive(Debug)]
pub(crate) struct GatewayInner {
    /// The engine.
    pub(crate) chat: Chat,
    /// Who is calling.
    auth: Arc<dyn Authenticator>,
    /// The same authenticator as the sessions' `refresh` verifier (one `Arc` for all).
    verifier: DynTokenVerifier,
    /// Limits.
    pub(crate) config: GatewayConfig,
    /// Counters and histograms for `/metrics`.
    metrics: Arc<Metrics>,
    /// Connection limit.
    slots: Arc<Semaphore>,
    /// WebSocket connection tasks, awaited on shutdown.
    tasks: TaskTracker,
}

impl Gateway {
    /// A gateway with default limits.
    pub fn new(chat: Chat, auth: Arc<dyn Authenticator>) -> Self {
        let config = GatewayConfig::for_chat(&chat);
        Self::with_config(chat, auth, config)
    }

    /// A gateway with explicit limits.
    pub fn with_config(chat: Chat, auth: Arc<dyn Authenticator>, config: GatewayConfig) -> Self {
        let metrics = Arc::new(Metrics::new(chat.clone()));
        Self {
            inner: Arc::new(GatewayInner {
                slots: Arc::new(Semaphore::new(config.max_connections)),
                chat,
                verifier: Arc::new(RefreshVerifier(auth.clone())),
                auth,
                config,
                metrics,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// The engine.
    pub fn chat(&self) -> &Chat {
        &self.inner.chat
    }

    /// Serves HTTP/1.1 (with upgrades) on `listener` until [`Chat::shutdown`] is called, then
    /// stops accepting, closes WebSockets with 1001 "going away" after flushing what is
    /// queued, and waits up to `shutdown_grace` for connections to finish.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let chat = self.inner.chat.clone();
        // Cancelled when shutdown starts: HTTP connections finish their in-flight request
        // and close; WebSocket connections are closed by the engine (going away).
        let stop = tokio_util::sync::CancellationToken::new();
        let http_tasks = TaskTracker::new();
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "gateway listening");
        }
        loop {
            let accepted = tokio::select! {
                _ = chat.shutdown_requested() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let gateway = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(gateway.handle(req).await) }
            });
            let stop = stop.clone();
            http_tasks.spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(err) = result {
                    debug!(%peer, error = %err, "http connection ended with an error");
                }
            });
        }
        drop(listener);
        info!("gateway stopped accepting; draining connections");
        stop.cancel();
        let grace = self.inner.config.shutdown_grace;
        let ws_tasks = self.inner.tasks.clone();
        ws_tasks.close();
        http_tasks.close();
        let drained = tokio::time::timeout(grace, async {
            http_tasks.wait().await;
            ws_tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            warn!("shutdown grace elapsed with connections still open");
        }
        Ok(())
    }

    /// Handles one request (any body type, so it mounts in hyper or axum alike).
    pub async fn handle<B>(&self, req: Request<B>) -> GatewayResponse
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let response = self.route(req).await;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            self.inner
                .metrics
                .http
                .get_or_create(&HttpLabels {
                    status: response.status().as_u16(),
                })
                .inc();
        }
        response
    }

    async fn route<B>(&self, req: Request<B>) -> GatewayResponse
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, []) => match self.inner.config.index_html {
                Some(page) => Response::builder()
                    .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                    .body(Full::new(Bytes::from_static(page.as_bytes())))
                    .unwrap_or_else(|_| internal()),
                None => error_response(&Error::not_found("no page here")),
            },
            (&Method::GET, ["healthz"]) => {
                let status = if self.inner.chat.is_shutting_down() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                json_response(
                    status,
                    &json!({"status": if status.is_success() {"ok"} else {"shutting_down"}}),
                )
            }
            (&Method::GET, ["metrics"]) => Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(self.inner.metrics.render())))
                .unwrap_or_else(|_| internal()),
            (&Method::GET, ["ws"]) => match self.identify(req.headers(), req.uri().query()).await {
                Ok(credential) => self.upgrade(req, credential).await,
                Err(err) => error_response(&err),
            },
            (_, ["api", rest @ ..]) => {
                let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
                match self.authenticate(req.headers(), req.uri().query()).await {
                    Ok(user) => match self.api(req, &user, &rest).await {
                        Ok(resp) => resp,
                        Err(err) => error_response(&err),
                    },
                    Err(err) => error_response(&err),
                }
            }
            _ => error_response(&Error::not_found(format!("no route for {path}"))),
        }
    }

    /// The caller of an HTTP request.
    async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<UserId, Error> {
        self.identify(headers, query).await.map(|c| c.user)
    }

    /// The credential of a request (user and expiry; a WebSocket's session ends at the
    /// expiry). Failures are counted.
    async fn identify(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Credential, Error> {
        let result = self
            .inner
            .auth
            .identify(AuthRequest { headers, query })
            .await;
        if result.is_err() {
            self.inner.metrics.unauthorized.inc();
        }
        result
    }

    // ------------------------------------------------------------------ WebSocket

    async fn upgrade<B>(&self, mut req: Request<B>, credential: Credential) -> GatewayResponse
    where
        B: Send + 'static,
    {
        let Credential { user, expires_at } = credential;
        let headers = req.headers();
        let has_token = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
            })
        };
        if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
            return error_response(&Error::invalid("expected a WebSocket upgrade request"));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return error_response(&Error::invalid("Sec-WebSocket-Version must be 13"));
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return error_response(&Error::invalid("missing Sec-WebSocket-Key"));
        };
        let accept = derive_accept_key(key.as_bytes());
        // Codec: a subprotocol the client offered, else ?codec=, else JSON.
        let offered: Vec<String> = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(',').map(|p| p.trim().to_owned()))
            .collect();
        let by_protocol = offered.iter().find_map(|p| Codec::from_subprotocol(p));
        let by_query = AuthRequest {
            headers,
            query: req.uri().query(),
        }
        .query_param("codec");
        let codec = match (by_protocol, by_query) {
            (Some(c), _) => c,
            (None, Some(q)) => match Codec::from_query_value(&q) {
                Some(c) => c,
                None => return error_response(&Error::invalid(format!("unknown codec {q:?}"))),
            },
            (None, None) => Codec::Json,
        };
        let Ok(permit) = self.inner.slots.clone().try_acquire_owned() else {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": {"code": "unavailable", "message": "connection limit reached"}}),
            );
        };
        // The session ends at the credential's expiry (unless refreshed); its first frame
        // describes it.
        let options = SessionOptions::new()
            .expires_at(expires_at)
            .verifier(self.inner.verifier.clone())
            .announce();
        let (session, outbound) = match self.inner.chat.connect_with(user.clone(), options).await {
            Ok(x) => x,
            Err(Error::Shutdown) => {
                return json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": {"code": "unavailable", "message": "shutting down"}}),
                );
            }
            Err(err) => return error_response(&err),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let config = &self.inner.config;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.io_buffer_bytes)
            .write_buffer_size(config.io_buffer_bytes)
            .max_write_buffer_size(config.max_frame_bytes.saturating_mul(4))
            .max_message_size(Some(config.max_frame_bytes))
            .max_frame_size(Some(config.max_frame_bytes));
        let params = ConnectionParams {
            codec,
            ping_interval: config.ping_interval,
            missed_pongs: config.missed_pongs,
            write_batch: config.write_batch,
            write_timeout: config.write_timeout,
        };
        let metrics = self.inner.metrics.clone();
        self.inner.tasks.spawn(async move {
            let _permit = permit;
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(err) => {
                    debug!(error = %err, "upgrade failed");
                    session.close().await;
                    return;
                }
            };
            metrics.connections.inc();
            // A plain TCP socket (Gateway::serve, axum::serve, any hyper server on tokio's
            // TcpStream) gets the direct write path; any other stream (TLS, tests) the queued
            // one.
            let ended = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let stream = parts.io.into_inner();
                    run_tcp_connection(
                        stream,
                        parts.read_buf,
                        ws_config,
                        session,
                        outbound,
                        params,
                        metrics.clone(),
                    )
                    .await
                }
                Err(upgraded) => {
                    let socket = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(ws_config),
                    )
                    .await;
                    run_connection(socket, session, outbound, params, metrics.clone()).await
                }
            };
            metrics.connections.dec();
            if ended != Ended::Client {
                debug!(%user, ?ended, "connection closed by the server");
            }
        });
        let mut resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept);
        if by_protocol.is_some() {
            resp = resp.header(header::SEC_WEBSOCKET_PROTOCOL, codec.subprotocol());
        }
        resp.body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| internal())
    }
}

impl<B> tower_service::Service<Request<B>> for Gateway
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = GatewayResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<GatewayResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let gateway = self.clone();
        Box::pin(async move { Ok(gateway.handle(req).await) })
    }
}
