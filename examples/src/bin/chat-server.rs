//! The reference chat server: the whole SDK with zero configuration.
//!
//! ```sh
//! cargo run --release --bin chat-server
//! # then open http://127.0.0.1:8080/ in two browser tabs
//! ```
//!
//! Configuration by flags or the same names in the environment (see `--help`). Without
//! `CHAT_JWT_SECRET` the server runs in dev mode: `?user=<id>` is accepted without a token.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chat_core::hooks::RateLimitConfig;
use chat_core::presence::PresenceConfig;
use chat_core::{Chat, NodeId};
use chat_transport::auth::{Authenticator, DevAuth, JwtAuth};
use chat_transport::{Gateway, GatewayConfig};
use clap::Parser;
use tracing::{info, warn};

/// The chat page served at `/`.
const INDEX_HTML: &str = include_str!("../../static/index.html");

#[derive(Debug, Parser)]
#[command(name = "chat-server", about = "Reference chat server (chat-sdk)")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "CHAT_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// HS256 secret for JWTs (`sub` = user id). Unset: dev mode, `?user=<id>` without a token.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Redis URL for presence, router and (unless CHAT_SCYLLA_URI is set) the store; several
    /// processes form one cluster.
    #[arg(long, env = "CHAT_REDIS_URL")]
    redis_url: Option<String>,
    /// Key and channel prefix in Redis (every node of one cluster uses the same).
    #[arg(long, env = "CHAT_REDIS_PREFIX", default_value = "chat")]
    redis_prefix: String,
    /// Message store in ScyllaDB / Cassandra: comma-separated `host:port` contact points.
    #[arg(long, env = "CHAT_SCYLLA_URI")]
    scylla_uri: Option<String>,
    /// Keyspace of the CQL store (created with its tables if missing).
    #[arg(long, env = "CHAT_SCYLLA_KEYSPACE", default_value = "chat")]
    scylla_keyspace: String,
    /// Replication of a keyspace the server creates: `simple:<rf>` or `<dc>:<rf>,<dc>:<rf>`
    /// (NetworkTopologyStrategy). An existing keyspace is not altered.
    #[arg(long, env = "CHAT_SCYLLA_REPLICATION", default_value = "simple:1")]
    scylla_replication: String,
    /// Consistency of the CQL store's reads and writes (e.g. `local_quorum`, `quorum`).
    #[arg(long, env = "CHAT_SCYLLA_CONSISTENCY", default_value = "local_quorum")]
    scylla_consistency: String,
    /// Serial consistency of its lightweight transactions: `local_serial` or `serial`.
    #[arg(
        long,
        env = "CHAT_SCYLLA_SERIAL_CONSISTENCY",
        default_value = "local_serial"
    )]
    scylla_serial_consistency: String,
    /// Local datacenter of this process (requests go to its replicas first).
    #[arg(long, env = "CHAT_SCYLLA_LOCAL_DC")]
    scylla_local_dc: Option<String>,
    /// Snowflake node id (0-1023), unique per process in a cluster.
    #[arg(long, env = "CHAT_NODE_ID", default_value_t = 0)]
    node_id: u16,
    /// Messages per second per user (0 disables the limit).
    #[arg(long, env = "CHAT_RATE_LIMIT", default_value_t = 20)]
    rate_limit: u32,
    /// Burst above the rate.
    #[arg(long, env = "CHAT_RATE_BURST", default_value_t = 50)]
    rate_burst: u32,
    /// Largest message content in bytes (WebSocket frames may be 4x this).
    #[arg(long, env = "CHAT_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    max_message_bytes: usize,
    /// How long a user with no live session stays online.
    #[arg(long, env = "CHAT_OFFLINE_DEBOUNCE_MS", default_value_t = 30_000)]
    offline_debounce_ms: u64,
    /// Presence heartbeat TTL.
    #[arg(long, env = "CHAT_PRESENCE_TTL_MS", default_value_t = 90_000)]
    presence_ttl_ms: u64,
    /// WebSocket read chunk and write flush threshold per connection, in bytes. Each idle
    /// connection holds its read buffer: smaller saves memory, larger reads big frames in
    /// fewer system calls.
    #[arg(long, env = "CHAT_IO_BUFFER_BYTES", default_value_t = 4 * 1024)]
    io_buffer_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let node_id = NodeId::new(args.node_id).context("CHAT_NODE_ID")?;
    let rate_limit = match (
        NonZeroU32::new(args.rate_limit),
        NonZeroU32::new(args.rate_burst),
    ) {
        (Some(per_second), Some(burst)) => Some(RateLimitConfig { per_second, burst }),
        _ => None,
    };
    let presence_config = PresenceConfig {
        ttl: Duration::from_millis(args.presence_ttl_ms),
        offline_debounce: Duration::from_millis(args.offline_debounce_ms),
    };
    let mut builder = Chat::builder().configure(|c| {
        c.node_id = node_id;
        c.rate_limit = rate_limit;
        c.max_message_bytes = args.max_message_bytes;
        c.presence = presence_config;
    });
    let scylla = match &args.scylla_uri {
        Some(uri) => Some(Arc::new(scylla_store(&args, uri).await?)),
        None => None,
    };
    let backends = match &args.redis_url {
        Some(url) => {
            let prefix = &args.redis_prefix;
            let store: chat_core::store::DynMessageStore = match &scylla {
                Some(s) => s.clone(),
                None => Arc::new(
                    chat_store::RedisStore::connect(url, prefix)
                        .await
                        .context("connecting the Redis store")?,
                ),
            };
            let presence =
                chat_presence::RedisPresence::connect(url, prefix, node_id, presence_config)
                    .await
                    .context("connecting Redis presence")?;
            let router = chat_presence::RedisRouter::connect(url, prefix, node_id)
                .await
                .context("connecting the Redis router")?;
            builder = builder
                .store(store)
                .presence(Arc::new(presence))
                .router(Arc::new(router));
            if scylla.is_some() {
                "CQL store, Redis presence and router (cluster mode)"
            } else {
                "Redis store, presence and router (cluster mode)"
            }
        }
        None => match &scylla {
            Some(s) => {
                builder = builder.store(s.clone());
                "CQL store, in-memory presence and router (single node: set CHAT_REDIS_URL for a cluster)"
            }
            None => "in-memory parts: data is lost on restart",
        },
    };
    let chat = builder.build().await?;
    let auth: Arc<dyn Authenticator> = match &args.jwt_secret {
        Some(secret) if !secret.is_empty() => Arc::new(JwtAuth::new(secret.as_bytes())),
        _ => {
            warn!("==============================================================");
            warn!("DEV MODE: CHAT_JWT_SECRET is unset; ?user=<id> is trusted");
            warn!("without a token. Anyone can be anyone. Never run this in production.");
            warn!("==============================================================");
            Arc::new(DevAuth)
        }
    };
    let mut config = GatewayConfig::for_chat(&chat);
    config.index_html = Some(INDEX_HTML);
    config.io_buffer_bytes = args.io_buffer_bytes.max(64);
    let gateway = Gateway::with_config(chat.clone(), auth, config);
    let listener = listen(args.bind).with_context(|| format!("cannot listen on {}", args.bind))?;
    info!(addr = %listener.local_addr()?, node = %node_id, backends, "chat-server ready");

    let stopper = chat.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("signal received: shutting down");
        stopper.shutdown();
    });
    gateway.serve(listener).await?;
    info!("bye");
    Ok(())
}

/// Opens the CQL message store from the `CHAT_SCYLLA_*` settings; a clear error when no
/// contact point answers.
async fn scylla_store(args: &Args, uri: &str) -> anyhow::Result<chat_store::ScyllaStore> {
    let points: Vec<String> = uri
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if points.is_empty() {
        bail!("CHAT_SCYLLA_URI: expected host:port[,host:port…], got {uri:?}");
    }
    let mut options = chat_store::ScyllaStoreOptions::new(args.scylla_keyspace.clone())
        .with_replication(
            args.scylla_replication
                .parse()
                .context("CHAT_SCYLLA_REPLICATION")?,
        )
        .with_consistency(
            args.scylla_consistency
                .parse()
                .context("CHAT_SCYLLA_CONSISTENCY")?,
        )
        .with_serial_consistency(
            args.scylla_serial_consistency
                .parse()
                .context("CHAT_SCYLLA_SERIAL_CONSISTENCY")?,
        );
    if let Some(dc) = &args.scylla_local_dc {
        options = options.with_local_datacenter(dc.clone());
    }
    chat_store::ScyllaStore::connect_with(&points, options)
        .await
        .with_context(|| format!("opening the CQL message store at {uri} (CHAT_SCYLLA_URI)"))
}

/// Binds with a deep accept backlog: after a node restart every client reconnects at once, and
/// the default of 128 pending connections overflows (SYN retries add a second per client).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
