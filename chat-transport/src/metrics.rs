//! `/metrics` in the Prometheus text format (via `prometheus-client`): gateway counters plus
//! the engine's own counters, read at scrape time.

use chat_core::Chat;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of frames by direction and codec.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    /// `in` or `out`.
    pub direction: &'static str,
    /// `json` or `proto`.
    pub codec: &'static str,
}

/// Label of HTTP responses.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HttpLabels {
    /// Status code.
    pub(crate) status: u16,
}

/// Gateway metrics (one per gateway; shared by its connections).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub(crate) connections: Gauge,
    /// WebSocket frames by direction and codec.
    pub(crate) frames: Family<FrameLabels, Counter>,
    /// Upgrade/HTTP requests refused for auth.
    pub(crate) unauthorized: Counter,
    /// HTTP responses by status.
    pub(crate) http: Family<HttpLabels, Counter>,
    /// Connections closed because their queue was full.
    /// Connections closed because they stopped answering pings.
    pub(crate) zombies_reaped: Counter,
    /// Seconds from a live `message` frame's creation (after the store append) to its write on
    /// a socket: fan-out plus queueing plus the write. Sampled: one write batch in 8 per
    /// connection.
    pub(crate) fanout_latency: Histogram,
}

impl Metrics {
    /// Metrics for a gateway over `chat` (the engine's counters are read at scrape time).
    pub fn new(chat: Chat) -> Self {
        let mut registry = Registry::with_prefix("chat");
        let connections = Gauge::default();
        registry.register(
            "ws_connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let frames = Family::<FrameLabels, Counter>::default();
        registry.register("ws_frames", "WebSocket frames", frames.clone());
        let unauthorized = Counter::default();
        registry.register(
            "unauthorized",
            "Requests refused for missing or bad credentials",
            unauthorized.clone(),
        );
        let http = Family::<HttpLabels, Counter>::default();
        registry.register("http_responses", "HTTP API responses", http.clone());
        let zombies_reaped = Counter::default();
        registry.register(
            "ws_zombies_reaped",
            "Connections closed because they stopped answering pings",
            zombies_reaped.clone(),
        );
        let fanout_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "fanout_latency_seconds",
            "From a live message's creation to its write on a socket (one write batch in 8 per connection is sampled)",
            fanout_latency.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { chat }));
        Self {
            registry,
            connections,
            frames,
            unauthorized,
            http,
            zombies_reaped,
            fanout_latency,
        }
    }

    /// The text exposition (OpenMetrics text format, which Prometheus scrapes).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The engine's counters (`Chat::stats`) exposed at scrape time.
#[derive(Debug)]
struct EngineCollector {
    chat: Chat,
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.chat.stats();
        let m = encoder.encode_descriptor(
            "engine_connections",
            "Sessions open on this node",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.connections as i64).encode(m)?;
        counter(
            &mut encoder,
            "engine_messages_sent",
            "New messages stored (retries not counted)",
            s.messages_sent,
        )?;
        counter(
            &mut encoder,
            "engine_commands",
            "Commands executed",
            s.commands,
        )?;
        counter(
            &mut encoder,
            "engine_deliveries",
            "Fan-out frames delivered to local connections",
            s.deliveries,
        )?;
        counter(
            &mut encoder,
            "engine_fanouts_to_writers",
            "Message fan-outs handed to the writer tasks because the conversation was busy",
            s.fanouts_to_writers,
        )?;
        // One count, two names: `ws_slow_consumers` is the name dashboards of the gateway know.
        counter(
            &mut encoder,
            "ws_slow_consumers",
            "Connections closed because they read too slowly",
            s.slow_consumers,
        )?;
        counter(
            &mut encoder,
            "engine_slow_consumers",
            "Sessions cut for reading too slowly",
            s.slow_consumers,
        )?;
        counter(
            &mut encoder,
            "engine_router_errors",
            "Failed router publishes",
            s.router_errors,
        )?;
        for (code, n) in s.errors {
            counter(
                &mut encoder,
                &format!("engine_errors_{}", code.as_str()),
                &format!("Error frames with code {}", code.as_str()),
                n,
            )?;
        }
        Ok(())
    }
}
