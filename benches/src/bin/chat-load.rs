//! `chat-load`: drives a real `chat-server` (or the bare `baseline-server`) over loopback
//! WebSockets and prints **one JSON object** on stdout per run. Progress goes to stderr.
//!
//! ```sh
//! cargo build --release --bin chat-server
//! cargo build --release -p chat-benches --bin chat-load --bin baseline-server
//! target/release/chat-load --scenario group --connections 500 --rate 20 --duration 5
//! ```
//!
//! Scenarios:
//! * `idle`: N connections held for `--duration` (answering the server's pings). Server RSS
//!   after startup vs. after every connection is up → `rss_per_connection_bytes`.
//! * `direct`: N/2 pairs of users, each pair in a direct conversation; every connection sends
//!   to its peer; `--rate` is the total over all senders.
//! * `group`: groups of `--group-size` members (created over HTTP), `--senders` senders per
//!   group; every member's delivery counted and timed.
//! * `cluster`: `group` over `--nodes` (2–4) chat-server processes on one fresh
//!   `redis-server`; connection i goes to node i mod nodes.
//! * `cluster-idle`: `idle` over `--nodes` (2–8) chat-server processes on one fresh
//!   `redis-server` (node i mod nodes), the connections spread over as many generator
//!   processes (this executable re-run in a hidden worker mode) as their file limit needs, so
//!   it goes beyond one process's open files (100k and more); see `chat-load/fleet.rs`.
//! * `baseline-idle`, `baseline-group`: `idle` and `group` against `baseline-server`.
//! * `peer-centrifugo-idle`, `peer-centrifugo-group`, `peer-socketioxide-idle`,
//!   `peer-socketioxide-group`: the same against Centrifugo and `peer-socketioxide`, their
//!   clients speaking the peer's protocol (see `chat-load/peers.rs`).
//!
//! Every scenario but `cluster-idle` is one run of the same driver (`drive`), generic over the
//! [`Protocol`] its clients speak (chat JSON, baseline, Centrifugo, socket.io), so they are all
//! connected, warmed up, loaded, drained and measured by the same code.
//!
//! The servers are children of this process: on free loopback ports, with
//! `CHAT_RATE_LIMIT=0`, in dev auth (`?user=`), waited for (`/healthz`, or the port for the
//! baseline), and killed at the end. `--pin` runs the servers (and Redis) under
//! `taskset -c 0` and moves every thread of this process to CPU 1 (`taskset -a -p -c 1`, before
//! the runtime starts, so tokio runs one worker).
//!
//! How the figures are measured:
//! * **latency** (`p50_ms` … `max_ms`): every message carries its *intended* send time (µs
//!   since this process started) in its content; each recipient connection records
//!   `receipt - intended` in an HdrHistogram (1 µs – 1 h, 3 significant digits), once per
//!   distinct message (repeats count as `duplicates`). The send schedule is open-loop: one clock
//!   thread releases message n at `start + n / rate` to sender n mod senders, whatever the
//!   senders or the server are doing, so a stall shows up as latency instead of as fewer
//!   samples (no coordinated omission). `send_lag_*` is how late the generator itself got the
//!   frames onto the socket (flush done − intended time). `ack_*` (chat only): intended time →
//!   `message_ack` at the sender.
//! * **sent / delivered / lost**: `sent` counts messages flushed in the window; `expected`
//!   adds, per sent message, the members that should get it (everyone in the conversation
//!   but the sending connection); `delivered` counts distinct (recipient, message) receipts
//!   of window messages; `lost = expected - delivered` after waiting up to `--drain` seconds.
//!   Rates divide by `--duration`. One warm-up message per conversation is sent and fully
//!   delivered before the window (not counted).
//! * **errors**: failed connections + `error` frames + failed writes + connections the server
//!   closed early + messages never acked (chat), detailed in `error_detail`.
//! * **server RSS / CPU**: `VmRSS` of `/proc/<pid>/status` and utime+stime of
//!   `/proc/<pid>/stat` (ticks / `getconf CLK_TCK`), summed over the server processes (Redis
//!   reported apart as `redis_*`). RSS: 0.5 s after startup (`server_rss_start_bytes`) and at
//!   the end (`server_rss_bytes`: idle, 1 s after the last connection is up; traffic, after
//!   the drain, so it includes the stored messages). `rss_per_connection_bytes` = (RSS with
//!   every connection up, before any traffic − `server_rss_start_bytes`) / connections. CPU:
//!   from the start of the window to the end of the drain (idle: over the hold).
//!   `delivered_per_server_cpu_second = delivered / server_cpu_seconds`.
//! * **limits**: client sockets are bound to 127.0.0.2 … 127.0.0.(1+`--sources`) before
//!   connecting; binding with port 0 picks the port at bind time, so each source address has
//!   the ~28k ports of `net.ipv4.ip_local_port_range` for all destinations together (ports in
//!   TIME_WAIT from a previous run count too). This process holds one descriptor per
//!   connection and raises its soft `RLIMIT_NOFILE` to the hard limit (with `prlimit`: the
//!   workspace forbids `unsafe`); connections beyond the limit minus 300 are not opened, and
//!   `note` says so. `cluster-idle` instead gives every generator worker at most that many,
//!   and refuses (before starting anything) a run whose share per node exceeds a server's
//!   limit minus 300, or whose share per source address exceeds the ephemeral port range.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "chat-load/client.rs"]
mod client;
#[path = "chat-load/fleet.rs"]
mod fleet;
#[path = "chat-load/peers.rs"]
mod peers;
#[path = "chat-load/server.rs"]
mod server;
#[path = "chat-load/sys.rs"]
mod sys;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::stream::SplitSink;
use futures::{Sink, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use client::{Shared, Target, Ws};
use server::{Http, Proc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Idle authenticated connections: memory per connection.
    Idle,
    /// 1:1 messages between pairs.
    Direct,
    /// Groups of `--group-size`, `--senders` senders each.
    Group,
    /// `group` across `--nodes` chat-server processes on one Redis.
    Cluster,
    /// `idle` across `--nodes` chat-server processes on one Redis, from several generator
    /// processes (beyond one process's file limit).
    ClusterIdle,
    /// `idle` against baseline-server.
    BaselineIdle,
    /// `group` against baseline-server.
    BaselineGroup,
    /// `idle` against Centrifugo (benches/peers/install-centrifugo.sh first).
    PeerCentrifugoIdle,
    /// `group` against Centrifugo.
    PeerCentrifugoGroup,
    /// `idle` against peer-socketioxide.
    PeerSocketioxideIdle,
    /// `group` against peer-socketioxide.
    PeerSocketioxideGroup,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Direct => "direct",
            Scenario::Group => "group",
            Scenario::Cluster => "cluster",
            Scenario::ClusterIdle => "cluster-idle",
            Scenario::BaselineIdle => "baseline-idle",
            Scenario::BaselineGroup => "baseline-group",
            Scenario::PeerCentrifugoIdle => "peer-centrifugo-idle",
            Scenario::PeerCentrifugoGroup => "peer-centrifugo-group",
            Scenario::PeerSocketioxideIdle => "peer-socketioxide-idle",
            Scenario::PeerSocketioxideGroup => "peer-socketioxide-group",
        }
    }
    fn is_baseline(self) -> bool {
        matches!(self, Scenario::BaselineIdle | Scenario::BaselineGroup)
    }
    fn is_idle(self) -> bool {
        matches!(
            self,
            Scenario::Idle
                | Scenario::ClusterIdle
                | Scenario::BaselineIdle
                | Scenario::PeerCentrifugoIdle
                | Scenario::PeerSocketioxideIdle
        )
    }
    /// Groups named `g<k>` by the clients themselves (baseline and peers), rather than chat
    /// conversations created over HTTP.
    fn named_groups(self) -> bool {
        self.is_baseline() || self.peer().is_some()
    }
    fn is_cluster(self) -> bool {
        matches!(self, Scenario::Cluster | Scenario::ClusterIdle)
    }
    fn peer(self) -> Option<peers::Peer> {
        match self {
            Scenario::PeerCentrifugoIdle | Scenario::PeerCentrifugoGroup => {
                Some(peers::Peer::Centrifugo)
            }
            Scenario::PeerSocketioxideIdle | Scenario::PeerSocketioxideGroup => {
                Some(peers::Peer::Socketioxide)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "chat-load",
    about = "Load generator for chat-server (and the bare baseline-server); prints one JSON object per run",
    after_help = "JSON fields: scenario, connections (held), connections_requested, target_rate, \
        duration_s, sent, sent_per_sec, expected, delivered, delivered_per_sec, lost, duplicates, \
        errors (+ error_detail), p50_ms/p90_ms/p99_ms/p999_ms/max_ms/mean_ms (intended send -> \
        receipt, every recipient), ack_* (chat only), send_lag_* (generator lateness), \
        server_rss_start_bytes, server_rss_bytes, rss_per_connection_bytes, server_cpu_seconds, \
        delivered_per_server_cpu_second, load_cpu_seconds, redis_*, server_metrics, note; \
        cluster-idle adds generator_processes, generator_*, node_connections"
)]
struct Args {
    /// Which workload.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Client connections (default: 2000 idle and cluster-idle, 200 direct, --group-size for
    /// group/cluster).
    #[arg(long)]
    connections: Option<usize>,
    /// Messages per second, total over all senders (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of the measured window (idle: how long connections are held).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Members per group (group, cluster, baseline-group; idle connections are grouped too).
    #[arg(long, default_value_t = 500)]
    group_size: usize,
    /// Senders per group (default min(10, group size)).
    #[arg(long)]
    senders: Option<usize>,
    /// chat-server processes in the cluster (2-4) and cluster-idle (2-8) scenarios.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// chat-server binary (default: `chat-server` next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// baseline-server binary (default: `baseline-server` next to this executable).
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// redis-server binary for the cluster and cluster-idle scenarios.
    #[arg(long, default_value = "redis-server")]
    redis_bin: PathBuf,
    /// Pin the servers to CPU 0 and this process to CPU 1.
    #[arg(long)]
    pin: bool,
    /// Source addresses for client sockets: 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 16)]
    sources: usize,
    /// Most seconds to wait after the window for outstanding deliveries.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Connection attempts in flight at once (kept below the servers' listen backlog, 128 with
    /// tokio's default, so no SYN is dropped and retried after 1 s).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Internal (cluster-idle generator worker): the chat-server nodes, comma-separated.
    #[arg(long, hide = true, value_delimiter = ',')]
    worker_addrs: Vec<SocketAddr>,
    /// Internal (cluster-idle generator worker): its global connection indices START..END.
    #[arg(long, hide = true, value_parser = fleet::parse_range)]
    worker_range: Option<Range<usize>>,
}

/// File descriptors kept free per process beyond one per connection (listener, epoll, Redis,
/// logs, HTTP, …).
const FD_HEADROOM: u64 = 300;

fn main() {
    let args = Args::parse();
    if args.pin
        && let Err(e) = sys::pin_self(1)
    {
        eprintln!("chat-load: --pin: {e:#}");
        std::process::exit(2);
    }
    let nofile = sys::raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(range) = args.worker_range.clone() {
        // A cluster-idle generator worker: its JSON lines are for its parent.
        let code = match runtime.block_on(fleet::worker(&args, range, nofile)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("chat-load worker: {e:#}");
                fleet::write_line(&json!({"error": format!("{e:#}")}));
                1
            }
        };
        std::process::exit(code);
    }
    match runtime.block_on(run(&args, nofile)) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("chat-load: {e:#}");
            println!(
                "{}",
                json!({"scenario": args.scenario.name(), "error": format!("{e:#}")})
            );
            std::process::exit(1);
        }
    }
}

/// A binary next to this executable, unless given.
fn sibling(given: &Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found; build it (cargo build --release --bin {name}) or pass its path",
            p.display()
        );
    }
    Ok(p)
}

/// One client connection's role.
#[derive(Clone, Debug)]
struct Plan {
    /// Index of the server node it connects to.
    node: usize,
    /// Its user, `u<i>` (how chat-server knows it).
    user: String,
    /// The group it is in, `g<k>` (what it joins on baseline-server and the peers), or its chat
    /// conversation's id (empty for an idle chat connection).
    group: String,
    /// What it sends, to how many recipients; `None` for a listener only.
    sends: Option<(Target, u64)>,
    /// Sends the warm-up message of its conversation.
    warmup: bool,
}

/// What the clients of one server kind speak, for [`drive`]: how a client connects and joins,
/// how its frames are framed (a client is a WebSocket of text frames as `client::read_loop`
/// and `client::send_loop` see them), and what the report says of it: chat JSON and the
/// baseline's in [`Plain`], Centrifugo and socket.io in [`peers::Peer`].
trait Protocol: Copy + Send + Sync + 'static {
    /// A connected client.
    type Client: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Send
        + Unpin
        + 'static;
    /// The WebSocket path `plan`'s client opens.
    fn path(self, plan: &Plan) -> String;
    /// Makes a client of `plan`'s open WebSocket (the protocol's own handshake and join).
    fn open(
        self,
        ws: Ws,
        plan: Plan,
    ) -> impl Future<Output = Result<Self::Client, String>> + Send + 'static;
    /// Whether the server acks every message (`message_ack`): the drain waits for the acks,
    /// `ack_*` is reported and a missing ack is an error.
    fn acked(self) -> bool {
        false
    }
    /// Fields the report adds for it.
    fn fields(self) -> Vec<(String, Value)> {
        Vec::new()
    }
    /// The note of an idle hold.
    fn idle_note(self) -> String {
        "idle: rss_per_connection = (RSS 1 s after the last connect - RSS 0.5 s after startup) \
         / connections; server_cpu over the hold"
            .into()
    }
    /// The note of a traffic run that sent `sent` messages.
    fn traffic_note(self, _sent: u64) -> Option<String> {
        None
    }
}

/// The protocols spoken straight on the WebSocket, with no handshake of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plain {
    /// chat-server's JSON protocol: `/ws?user=u<i>` (dev auth), `message` frames to a
    /// conversation, each acked by a `message_ack`.
    ChatJson,
    /// baseline-server: `/ws?group=g<k>`, and every frame is relayed as it is to the rest of
    /// the group (no acks).
    Baseline,
}

impl Protocol for Plain {
    type Client = Ws;
    fn path(self, plan: &Plan) -> String {
        match self {
            Plain::ChatJson => format!("/ws?user={}", plan.user),
            Plain::Baseline => format!("/ws?group={}", plan.group),
        }
    }
    fn open(self, ws: Ws, _: Plan) -> impl Future<Output = Result<Ws, String>> + Send + 'static {
        std::future::ready(Ok(ws))
    }
    fn acked(self) -> bool {
        self == Plain::ChatJson
    }
}

/// The servers of one run.
struct Servers {
    nodes: Vec<Proc>,
    redis: Option<Proc>,
}

impl Servers {
    fn sample(&self) -> (u64, u64) {
        self.nodes.iter().fold((0, 0), |(rss, ticks), n| {
            let s = n.sample();
            (rss + s.rss, ticks + s.ticks)
        })
    }
    async fn kill(self) {
        for n in self.nodes {
            n.kill().await;
        }
        if let Some(r) = self.redis {
            r.kill().await;
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn run(args: &Args, nofile: u64) -> anyhow::Result<Value> {
    let scenario = args.scenario;
    if !(args.rate > 0.0 || scenario.is_idle()) {
        bail!("--rate must be > 0");
    }
    if args.duration <= 0.0 || args.group_size < 2 {
        bail!("--duration must be > 0 and --group-size >= 2");
    }
    let nodes_wanted = match scenario {
        Scenario::Cluster if !(2..=4).contains(&args.nodes) => bail!("--nodes must be 2..=4"),
        Scenario::ClusterIdle if !(2..=fleet::MAX_NODES).contains(&args.nodes) => {
            bail!("--nodes must be 2..={} for cluster-idle", fleet::MAX_NODES)
        }
        Scenario::Cluster | Scenario::ClusterIdle => args.nodes,
        _ => 1,
    };
    let requested = args.connections.unwrap_or(match scenario {
        Scenario::Idle
        | Scenario::ClusterIdle
        | Scenario::BaselineIdle
        | Scenario::PeerCentrifugoIdle
        | Scenario::PeerSocketioxideIdle => 2000,
        Scenario::Direct => 200,
        _ => args.group_size,
    });
    // File limits: this process holds every client socket (cluster-idle: its generator
    // workers do, each at most `per_process`); each server node holds its share. Children
    // inherit this process's limit.
    let per_process = nofile.saturating_sub(FD_HEADROOM) as usize;
    let cap = if scenario == Scenario::ClusterIdle {
        fleet::check_limits(requested, nodes_wanted, nofile, args.sources)?;
        requested
    } else {
        per_process
    };
    let mut notes = Vec::new();
    let mut connections = requested.min(cap);
    if connections < requested {
        notes.push(format!(
            "capped from {requested} to {connections} connections: open-file limit {nofile} per \
             process (load generator and each server), {FD_HEADROOM} kept free; use the \
             cluster-idle scenario (several generator and server processes) to go further"
        ));
    }
    if scenario == Scenario::Direct {
        connections -= connections % 2;
    }
    if connections < 2 {
        bail!("need at least 2 connections");
    }

    // ---- servers
    let pin = args.pin;
    let mut servers = if let Some(peer) = scenario.peer() {
        Servers {
            nodes: vec![peer.start(pin).await?],
            redis: None,
        }
    } else if scenario.is_baseline() {
        let bin = sibling(&args.baseline_bin, "baseline-server")?;
        eprintln!("chat-load: starting {}", bin.display());
        Servers {
            nodes: vec![Proc::baseline(&bin, pin).await?],
            redis: None,
        }
    } else {
        let bin = sibling(&args.server_bin, "chat-server")?;
        if scenario.is_cluster() {
            let redis = Proc::redis(&args.redis_bin, pin).await?;
            let url = format!("redis://{}/", redis.addr);
            eprintln!("chat-load: redis-server on {}", redis.addr);
            let mut nodes = Vec::new();
            for i in 0..nodes_wanted {
                eprintln!("chat-load: starting {} (node {})", bin.display(), i + 1);
                nodes.push(Proc::chat(&bin, (i + 1) as u16, Some(&url), pin).await?);
            }
            Servers {
                nodes,
                redis: Some(redis),
            }
        } else {
            eprintln!("chat-load: starting {}", bin.display());
            Servers {
                nodes: vec![Proc::chat(&bin, 0, None, pin).await?],
                redis: None,
            }
        }
    };
    let result = match scenario.peer() {
        None if scenario == Scenario::ClusterIdle => {
            fleet::drive(args, connections, &servers, nofile).await
        }
        Some(peer) => drive(args, scenario, peer, connections, &servers).await,
        None => {
            let proto = if scenario.is_baseline() {
                Plain::Baseline
            } else {
                Plain::ChatJson
            };
            drive(args, scenario, proto, connections, &servers).await
        }
    };
    let metrics = if scenario.is_baseline() || scenario.peer().is_some() {
        serde_json::Map::new()
    } else {
        server::interesting_metrics(&servers.nodes).await
    };
    let survived = servers.nodes.iter_mut().all(Proc::alive);
    let log_lines: usize = servers.nodes.iter().map(Proc::log_lines).sum();
    let logs: Vec<String> = servers
        .nodes
        .iter()
        .map(|n| n.log.display().to_string())
        .collect();
    servers.kill().await;
    let mut report = result?;
    let obj = report.as_object_mut().expect("object");
    obj.insert("connections_requested".into(), requested.into());
    obj.insert("pinned".into(), pin.into());
    obj.insert("server_metrics".into(), Value::Object(metrics));
    obj.insert("server_survived".into(), survived.into());
    obj.insert("server_log_lines".into(), log_lines.into());
    obj.insert("server_logs".into(), logs.into());
    let mut note: Vec<String> = notes;
    if let Some(Value::String(n)) = obj.get("note") {
        note.push(n.clone());
    }
    obj.insert("note".into(), note.join("; ").into());
    Ok(report)
}

/// Builds every connection's plan (and creates the chat conversations over HTTP). Groups of
/// `--group-size` (the last one may be smaller; a group of one is left out of the traffic
/// workloads), `--senders` senders each; idle connections of the baseline and the peers join
/// group `i / size`, and nobody sends.
async fn plans(
    args: &Args,
    scenario: Scenario,
    connections: usize,
    servers: &Servers,
) -> anyhow::Result<(Vec<Plan>, usize)> {
    let nodes = servers.nodes.len();
    let size = args.group_size;
    let plan = |i: usize, group: String, sends: Option<(Target, u64)>, warmup: bool| Plan {
        node: i % nodes,
        user: format!("u{i}"),
        group,
        sends,
        warmup,
    };
    match scenario {
        Scenario::ClusterIdle => bail!("cluster-idle is driven by fleet::drive"),
        Scenario::Idle => {
            let plans = (0..connections)
                .map(|i| plan(i, String::new(), None, false))
                .collect();
            Ok((plans, 0))
        }
        Scenario::BaselineIdle | Scenario::PeerCentrifugoIdle | Scenario::PeerSocketioxideIdle => {
            let plans = (0..connections)
                .map(|i| plan(i, format!("g{}", i / size), None, false))
                .collect();
            Ok((plans, 0))
        }
        Scenario::Direct => {
            let specs: Vec<(String, Value)> = (0..connections / 2)
                .map(|p| {
                    (
                        format!("u{}", 2 * p),
                        json!({"kind": "direct", "members": [format!("u{}", 2 * p + 1)]}),
                    )
                })
                .collect();
            let ids = create_conversations(&servers.nodes[0], specs).await?;
            let plans = (0..connections)
                .map(|i| {
                    let conversation = ids[i / 2].clone();
                    let target = Target::Chat {
                        conversation: conversation.clone(),
                    };
                    plan(i, conversation, Some((target, 1)), i % 2 == 0)
                })
                .collect();
            Ok((plans, connections / 2))
        }
        Scenario::Group
        | Scenario::Cluster
        | Scenario::BaselineGroup
        | Scenario::PeerCentrifugoGroup
        | Scenario::PeerSocketioxideGroup => {
            let named = scenario.named_groups();
            let groups: Vec<std::ops::Range<usize>> = (0..connections)
                .step_by(size)
                .map(|s| s..(s + size).min(connections))
                .filter(|r| r.len() >= 2)
                .collect();
            let ids = if named {
                (0..groups.len()).map(|g| format!("g{g}")).collect()
            } else {
                let specs = groups
                    .iter()
                    .map(|r| {
                        let members: Vec<String> = r.clone().map(|i| format!("u{i}")).collect();
                        (
                            format!("u{}", r.start),
                            json!({"kind": "group", "members": members, "name": "load"}),
                        )
                    })
                    .collect();
                create_conversations(&servers.nodes[0], specs).await?
            };
            let senders = args.senders.unwrap_or(10).max(1);
            let mut plans = Vec::with_capacity(connections);
            for (g, r) in groups.iter().enumerate() {
                let recipients = (r.len() - 1) as u64;
                for (m, i) in r.clone().enumerate() {
                    let sends = (m < senders).then(|| {
                        let target = if named {
                            Target::Baseline {
                                group: ids[g].clone(),
                                user: format!("u{i}"),
                            }
                        } else {
                            Target::Chat {
                                conversation: ids[g].clone(),
                            }
                        };
                        (target, recipients)
                    });
                    plans.push(plan(i, ids[g].clone(), sends, m == 0));
                }
            }
            Ok((plans, groups.len()))
        }
    }
}

/// Creates conversations on `node` (8 keep-alive HTTP connections in parallel); returns their
/// ids in order. `specs`: (creator, body).
async fn create_conversations(
    node: &Proc,
    specs: Vec<(String, Value)>,
) -> anyhow::Result<Vec<String>> {
    let specs = Arc::new(specs);
    let workers = 8.min(specs.len()).max(1);
    let mut set = JoinSet::new();
    for w in 0..workers {
        let specs = specs.clone();
        let addr = node.addr;
        set.spawn(async move {
            let mut http = Http::connect(addr).await?;
            let mut out = Vec::new();
            for (i, (creator, body)) in specs.iter().enumerate().skip(w).step_by(workers) {
                let (status, v) = http
                    .request("POST", "/api/conversations", Some(creator), Some(body))
                    .await?;
                let id = v["id"].as_str().map(str::to_owned);
                match (status, id) {
                    (200, Some(id)) => out.push((i, id)),
                    _ => bail!("POST /api/conversations: {status} {v}"),
                }
            }
            anyhow::Ok(out)
        });
    }
    let mut ids = vec![String::new(); specs.len()];
    while let Some(r) = set.join_next().await {
        for (i, id) in r.context("worker panicked")?? {
            ids[i] = id;
        }
    }
    Ok(ids)
}

/// A connected client: its send half is kept for the window.
enum Conn<C> {
    Listener,
    Sender(SplitSink<C, Message>),
}

/// Runs one measured run of `scenario` against `servers`, its clients speaking `proto`: connect
/// every client, then the idle hold, or the warm-up, the open-loop window and the drain; samples
/// the servers and returns the report (see the top of this file for how each figure is taken).
async fn drive<P: Protocol>(
    args: &Args,
    scenario: Scenario,
    proto: P,
    connections: usize,
    servers: &Servers,
) -> anyhow::Result<Value> {
    let tck = sys::clock_ticks_per_second() as f64;
    let self_pid = std::process::id();
    // Let the server(s) settle after startup, then the "empty" sample.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_start, _) = servers.sample();

    let (plans, groups) = plans(args, scenario, connections, servers).await?;
    let plans = Arc::new(plans);
    let shared = Arc::new(Shared::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    // ---- connect (and join) everything
    eprintln!(
        "chat-load: {}: connecting {} clients to {} server(s)",
        scenario.name(),
        plans.len(),
        servers.nodes.len()
    );
    let mut conns: Vec<Option<Conn<P::Client>>> = (0..plans.len()).map(|_| None).collect();
    let mut readers = JoinSet::new();
    let targets = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| (i, servers.nodes[plan.node].addr, proto.path(plan)));
    let handshake = {
        let plans = plans.clone();
        move |i: usize, ws| proto.open(ws, plans[i].clone())
    };
    let outcome = client::connect_all(
        targets,
        args.sources,
        args.connect_concurrency,
        handshake,
        |i, ws: P::Client| {
            let shared = shared.clone();
            let stop = stop_rx.clone();
            if plans[i].sends.is_some() {
                let (sink, stream) = ws.split();
                readers.spawn(async move { client::read_loop(stream, i, &shared, stop).await });
                conns[i] = Some(Conn::Sender(sink));
            } else {
                readers.spawn(async move { client::read_loop(ws, i, &shared, stop).await });
                conns[i] = Some(Conn::Listener);
            }
        },
    )
    .await?;
    let connected = outcome.ok;
    let connect_secs = outcome.seconds;
    let connect_errors = outcome.failed;
    let first_connect_error = outcome.first_error;
    eprintln!(
        "chat-load: {connected} connected in {connect_secs:.1} s ({connect_errors} failed{})",
        first_connect_error
            .as_ref()
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );

    let mut report = json!({
        "scenario": scenario.name(),
        "connections": connected,
        "nodes": servers.nodes.len(),
        "duration_s": args.duration,
        "connect_seconds": round3(connect_secs),
    });
    let obj = report.as_object_mut().expect("object");
    obj.extend(proto.fields());

    if scenario.is_idle() {
        // Settle, then the "all connected" sample.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss_connected, ticks0) = servers.sample();
        let load0 = sys::cpu_ticks(self_pid).unwrap_or(0);
        eprintln!(
            "chat-load: holding {connected} idle connections for {} s",
            args.duration
        );
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        let (rss_end, ticks1) = servers.sample();
        let load1 = sys::cpu_ticks(self_pid).unwrap_or(0);
        let _ = stop_tx.send(true);
        let closed_early = shared.closed_early.load(Ordering::Relaxed);
        let error_frames = shared.error_frames.load(Ordering::Relaxed);
        obj.extend(idle_fields(
            IdleHold {
                rss_start,
                rss_connected,
                rss_end,
                connected,
                server_ticks: ticks1.saturating_sub(ticks0),
                load_ticks: load1.saturating_sub(load0),
                errors: connect_errors + closed_early + error_frames,
                error_detail: json!({"connect": connect_errors, "closed_early": closed_early,
                       "error_frames": error_frames,
                       "first_error_frame": *shared.first_error.lock().unwrap(),
                       "first_connect_error": first_connect_error}),
                note: proto.idle_note(),
            },
            tck,
        ));
        drop(conns);
        finish_readers(readers).await;
        return Ok(report);
    }

    // Memory with every connection up, before any traffic (the same measure as idle).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_connected, _) = servers.sample();

    // ---- warm-up: one message per conversation, every recipient must get it (this also
    // waits for cross-node subscriptions to be in place).
    let mut warm_expected = 0u64;
    for (i, plan) in plans.iter().enumerate() {
        if let (true, Some((target, recipients)), Some(Conn::Sender(sink))) =
            (plan.warmup, &plan.sends, conns[i].as_mut())
            && client::send_warmup(sink, target, &shared).await
        {
            warm_expected += recipients;
        }
    }
    let warm_deadline = Instant::now() + Duration::from_secs(15);
    while shared.warmup_delivered.load(Ordering::Relaxed) < warm_expected
        && Instant::now() < warm_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let warm_got = shared.warmup_delivered.load(Ordering::Relaxed);
    if warm_got < warm_expected {
        eprintln!("chat-load: warm-up incomplete: {warm_got}/{warm_expected} deliveries");
    }
    // Let warm-up acks arrive before the window.
    tokio::time::sleep(Duration::from_millis(200)).await;
    shared.error_frames.store(0, Ordering::Relaxed);

    // ---- the measured window
    let senders: Vec<usize> = (0..plans.len())
        .filter(|&i| matches!(conns[i], Some(Conn::Sender(_))))
        .collect();
    if senders.is_empty() {
        bail!("no sender connected");
    }
    let per_sender = args.rate / senders.len() as f64;
    let window = Duration::from_secs_f64(args.duration);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + window;
    let mut sending = JoinSet::new();
    let mut clock_txs = Vec::with_capacity(senders.len());
    for &i in &senders {
        let Some(Conn::Sender(sink)) = conns[i].take() else {
            continue;
        };
        let (target, recipients) = plans[i].sends.clone().expect("sender plan");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        clock_txs.push(tx);
        let shared = shared.clone();
        sending
            .spawn(async move { client::send_loop(sink, target, rx, recipients, &shared).await });
    }
    let clock = client::spawn_clock(start, end, args.rate, clock_txs);
    eprintln!(
        "chat-load: {}: {} senders at {:.1} msg/s each ({} msg/s total) for {} s",
        scenario.name(),
        senders.len(),
        per_sender,
        args.rate,
        args.duration
    );
    tokio::time::sleep_until(start).await;
    let (_, ticks0) = servers.sample();
    let redis0 = servers.redis.as_ref().map(Proc::sample).unwrap_or_default();
    let load0 = sys::cpu_ticks(self_pid).unwrap_or(0);
    let mut sinks = Vec::new();
    while let Some(r) = sending.join_next().await {
        sinks.push(r.context("sender panicked")?);
    }
    let _ = tokio::task::spawn_blocking(move || clock.join()).await;
    let senders_done = Instant::now();
    // Drain: until every expected delivery (and ack) is in, or the drain timeout.
    let wants_acks = proto.acked();
    let drain_deadline = senders_done + Duration::from_secs_f64(args.drain);
    loop {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let expected = shared.expected.load(Ordering::Relaxed);
        let acked = shared.acks.load(Ordering::Relaxed) >= shared.sent.load(Ordering::Relaxed);
        if (delivered >= expected && (acked || !wants_acks)) || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = Instant::now();
    let (rss_end, ticks1) = servers.sample();
    let redis1 = servers.redis.as_ref().map(Proc::sample).unwrap_or_default();
    let load1 = sys::cpu_ticks(self_pid).unwrap_or(0);
    let _ = stop_tx.send(true);
    drop(sinks);
    drop(conns);
    finish_readers(readers).await;

    let secs = args.duration;
    let sent = shared.sent.load(Ordering::Relaxed);
    let expected = shared.expected.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let duplicates = shared.duplicates.load(Ordering::Relaxed);
    let acks = shared.acks.load(Ordering::Relaxed);
    let error_frames = shared.error_frames.load(Ordering::Relaxed);
    let send_errors = shared.send_errors.load(Ordering::Relaxed);
    let closed_early = shared.closed_early.load(Ordering::Relaxed);
    let unacked = if wants_acks {
        sent.saturating_sub(acks)
    } else {
        0
    };
    let cpu = ticks1.saturating_sub(ticks0) as f64 / tck;
    let lat = shared.latency();
    // Ack latency: chat only (null for the others).
    let ack = wants_acks.then(|| shared.ack_latency());
    let lag = shared.send_lag();
    let senders_n = senders.len();
    obj.extend([
        ("target_rate".into(), json!(args.rate)),
        ("groups".into(), json!(groups)),
        (
            "group_size".into(),
            if matches!(scenario, Scenario::Direct) {
                json!(2)
            } else {
                json!(args.group_size.min(connections))
            },
        ),
        ("senders".into(), json!(senders_n)),
        ("sent".into(), json!(sent)),
        ("sent_per_sec".into(), json!(round3(sent as f64 / secs))),
        ("expected".into(), json!(expected)),
        ("delivered".into(), json!(delivered)),
        (
            "delivered_per_sec".into(),
            json!(round3(delivered as f64 / secs)),
        ),
        ("lost".into(), json!(expected.saturating_sub(delivered))),
        ("duplicates".into(), json!(duplicates)),
        ("p50_ms".into(), json!(lat.p50)),
        ("p90_ms".into(), json!(lat.p90)),
        ("p99_ms".into(), json!(lat.p99)),
        ("p999_ms".into(), json!(lat.p999)),
        ("max_ms".into(), json!(lat.max)),
        ("mean_ms".into(), json!(round3(lat.mean))),
        ("latency_samples".into(), json!(lat.count)),
        (
            "errors".into(),
            json!(connect_errors + error_frames + send_errors + closed_early + unacked),
        ),
        (
            "error_detail".into(),
            json!({
                "connect": connect_errors, "error_frames": error_frames,
                "send": send_errors, "closed_early": closed_early, "unacked": unacked,
                "first_error_frame": *shared.first_error.lock().unwrap(),
                "first_connect_error": first_connect_error,
            }),
        ),
        ("ack_p50_ms".into(), json!(ack.map(|a| a.p50))),
        ("ack_p99_ms".into(), json!(ack.map(|a| a.p99))),
        ("send_lag_p50_ms".into(), json!(lag.p50)),
        ("send_lag_p99_ms".into(), json!(lag.p99)),
        ("send_lag_max_ms".into(), json!(lag.max)),
        ("server_rss_start_bytes".into(), json!(rss_start)),
        ("server_rss_bytes".into(), json!(rss_end)),
        (
            "rss_per_connection_bytes".into(),
            json!(
                (rss_connected.saturating_sub(rss_start) as f64 / connected.max(1) as f64).round()
            ),
        ),
        ("server_rss_connected_bytes".into(), json!(rss_connected)),
        ("server_cpu_seconds".into(), json!(round3(cpu))),
        (
            "delivered_per_server_cpu_second".into(),
            if cpu > 0.0 {
                json!((delivered as f64 / cpu).round())
            } else {
                Value::Null
            },
        ),
        (
            "measured_seconds".into(),
            json!(round3((drained - start).as_secs_f64())),
        ),
        (
            "load_cpu_seconds".into(),
            json!(round3(load1.saturating_sub(load0) as f64 / tck)),
        ),
    ]);
    if servers.redis.is_some() {
        obj.insert(
            "redis_cpu_seconds".into(),
            json!(round3(
                redis1.ticks.saturating_sub(redis0.ticks) as f64 / tck
            )),
        );
        obj.insert("redis_rss_bytes".into(), json!(redis1.rss));
        let total = cpu + redis1.ticks.saturating_sub(redis0.ticks) as f64 / tck;
        obj.insert(
            "delivered_per_cluster_cpu_second".into(),
            if total > 0.0 {
                json!((delivered as f64 / total).round())
            } else {
                Value::Null
            },
        );
    }
    if let Some(note) = proto.traffic_note(sent) {
        obj.insert("note".into(), note.into());
    }
    Ok(report)
}

/// What an idle hold measured, for [`idle_fields`].
struct IdleHold {
    rss_start: u64,
    rss_connected: u64,
    rss_end: u64,
    connected: usize,
    server_ticks: u64,
    load_ticks: u64,
    errors: u64,
    error_detail: Value,
    note: String,
}

/// The report fields of an idle hold: the same for chat-server, the baseline and the peers.
fn idle_fields(h: IdleHold, tck: f64) -> Vec<(String, Value)> {
    let per_conn = if h.connected > 0 {
        h.rss_connected.saturating_sub(h.rss_start) as f64 / h.connected as f64
    } else {
        0.0
    };
    vec![
        ("target_rate".into(), json!(0)),
        ("sent".into(), json!(0)),
        ("sent_per_sec".into(), json!(0.0)),
        ("expected".into(), json!(0)),
        ("delivered".into(), json!(0)),
        ("delivered_per_sec".into(), json!(0.0)),
        ("lost".into(), json!(0)),
        ("duplicates".into(), json!(0)),
        ("p50_ms".into(), Value::Null),
        ("p99_ms".into(), Value::Null),
        ("p999_ms".into(), Value::Null),
        ("errors".into(), json!(h.errors)),
        ("error_detail".into(), h.error_detail),
        ("server_rss_start_bytes".into(), json!(h.rss_start)),
        ("server_rss_bytes".into(), json!(h.rss_connected)),
        ("server_rss_end_bytes".into(), json!(h.rss_end)),
        ("rss_per_connection_bytes".into(), json!(per_conn.round())),
        (
            "server_cpu_seconds".into(),
            json!(round3(h.server_ticks as f64 / tck)),
        ),
        ("delivered_per_server_cpu_second".into(), Value::Null),
        (
            "load_cpu_seconds".into(),
            json!(round3(h.load_ticks as f64 / tck)),
        ),
        ("note".into(), json!(h.note)),
    ]
}

/// Waits (bounded) for the reader tasks to see the stop signal.
async fn finish_readers(mut readers: JoinSet<()>) {
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if done.is_err() {
        readers.abort_all();
    }
}
