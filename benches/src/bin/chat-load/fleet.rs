//! `cluster-idle`: more idle connections than one process may hold open files for, spread
//! over several chat-server nodes on one Redis **and** over several load-generator processes.
//!
//! The parent (`chat-load --scenario cluster-idle`) starts the Redis and the nodes like
//! `cluster`, then re-executes itself once per [`Worker`] in a hidden mode
//! (`--worker-addrs <node,node,…> --worker-range START..END`). Each worker holds at most its
//! open-file limit minus [`FD_HEADROOM`] connections: connection `i` (global index) goes to node
//! `i mod nodes` as user `u{i}` from `client::source_addr(i, --sources)`, with the parent's
//! `--connect-concurrency` shared out between the workers. A worker writes two JSON lines on
//! its stdout:
//!
//! 1. `{"connected":N,"failed":M,"first_error":…,"seconds":S}` once its range is connected
//!    (every connection has its reader from the moment it is up, answering the servers' pings);
//! 2. `{"closed_early":K}` after its stdin reaches EOF, which is how the parent ends the hold
//!    (and what a dead parent does too, so a worker never outlives it); then it exits.
//!
//! A worker that fails writes `{"error":"…"}` instead and exits 1. The parent kills and reaps
//! every worker on every path out of [`drive`]; `crate::run` does the same for the servers.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Shared};
use crate::{Args, FD_HEADROOM, IdleHold, Servers, round3, server, sys};

/// Most chat-server nodes of `cluster-idle`.
pub const MAX_NODES: usize = 8;

/// How long the workers may take to report their second line once their stdin is closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses `--worker-range START..END`.
pub fn parse_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s.split_once("..").ok_or("expected START..END")?;
    let start = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let end = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if end <= start {
        return Err(format!("empty range {s}"));
    }
    Ok(start..end)
}

/// Checks, before anything starts, that `connections` fit: each node's share under a server's
/// open-file limit `nofile` (inherited from this process) minus [`FD_HEADROOM`], and each
/// source address's share under the ephemeral port range.
pub fn check_limits(
    connections: usize,
    nodes: usize,
    nofile: u64,
    sources: usize,
) -> anyhow::Result<()> {
    let per_process = nofile.saturating_sub(FD_HEADROOM) as usize;
    if per_process == 0 {
        bail!("cluster-idle: open-file limit {nofile} leaves no room for connections");
    }
    let per_node = connections.div_ceil(nodes);
    if per_node > per_process {
        let needed = connections.div_ceil(per_process);
        let hint = if needed <= MAX_NODES {
            format!("use --nodes {needed} or more")
        } else {
            format!(
                "at most {} connections fit on {MAX_NODES} nodes",
                per_process * MAX_NODES
            )
        };
        bail!(
            "cluster-idle: {connections} connections over {nodes} nodes is {per_node} per \
             chat-server, above its open-file limit {nofile} minus {FD_HEADROOM} kept free \
             ({per_process}); {hint}"
        );
    }
    let per_source = connections.div_ceil(sources.max(1));
    if let Some(ports) = sys::local_port_count()
        && per_source > ports
    {
        bail!(
            "cluster-idle: {per_source} connections per source address, above the \
             {ports} ephemeral ports of net.ipv4.ip_local_port_range; use more --sources"
        );
    }
    Ok(())
}

/// Global connection ranges of the workers: as few as fit `per_process` each, evenly sized.
fn worker_ranges(connections: usize, per_process: usize) -> Vec<Range<usize>> {
    let n = connections.div_ceil(per_process.max(1)).max(1);
    (0..n)
        .map(|k| k * connections / n..(k + 1) * connections / n)
        .collect()
}

/// Runs the `cluster-idle` hold against `servers` (started by `crate::run`: Redis and the
/// nodes) and returns the report. Every worker is killed and reaped before it returns.
pub async fn drive(
    args: &Args,
    connections: usize,
    servers: &Servers,
    nofile: u64,
) -> anyhow::Result<Value> {
    let mut workers = Vec::new();
    let result = hold(args, connections, servers, nofile, &mut workers).await;
    for w in workers {
        w.reap().await;
    }
    result
}

async fn hold(
    args: &Args,
    connections: usize,
    servers: &Servers,
    nofile: u64,
    workers: &mut Vec<Worker>,
) -> anyhow::Result<Value> {
    let tck = sys::clock_ticks_per_second() as f64;
    let redis = servers
        .redis
        .as_ref()
        .context("cluster-idle needs its Redis")?;
    // Let the servers settle after startup, then the "empty" sample.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_start, _) = servers.sample();
    let redis_start = redis.sample();

    let ranges = worker_ranges(connections, nofile.saturating_sub(FD_HEADROOM) as usize);
    let concurrency = args.connect_concurrency.div_ceil(ranges.len()).max(1);
    let exe = std::env::current_exe().context("locating this executable")?;
    let addrs: Vec<String> = servers.nodes.iter().map(|n| n.addr.to_string()).collect();
    let addrs = addrs.join(",");
    eprintln!(
        "chat-load: cluster-idle: connecting {connections} clients to {} nodes from {} \
         generator processes ({concurrency} connects in flight each)",
        servers.nodes.len(),
        ranges.len()
    );
    let started = Instant::now();
    for range in ranges {
        workers.push(Worker::spawn(&exe, args, &addrs, range, concurrency)?);
    }
    let reports = futures::future::try_join_all(workers.iter_mut().map(Worker::line)).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let connected: u64 = reports.iter().map(|r| count(r, "connected")).sum();
    let failed: u64 = reports.iter().map(|r| count(r, "failed")).sum();
    let first_error = reports
        .iter()
        .find_map(|r| r["first_error"].as_str())
        .map(str::to_owned);
    eprintln!(
        "chat-load: {connected} connected in {connect_secs:.1} s ({failed} failed{})",
        first_error
            .as_ref()
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );

    // Settle, then the "all connected" sample; hold; sample again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_connected, ticks0) = servers.sample();
    let redis0 = redis.sample();
    let load0 = generator_sample(workers);
    eprintln!(
        "chat-load: holding {connected} idle connections for {} s",
        args.duration
    );
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let (rss_end, ticks1) = servers.sample();
    let redis1 = redis.sample();
    let load1 = generator_sample(workers);
    let mut node_connections = Vec::new();
    for node in &servers.nodes {
        let open = server::metric(node, "chat_ws_connections").await;
        node_connections.push(open.map(|v| v as u64));
    }

    // End the hold: EOF on every worker's stdin, then their closing lines.
    for w in workers.iter_mut() {
        w.stdin.take();
    }
    let closing = futures::future::try_join_all(workers.iter_mut().map(Worker::line));
    let closing = tokio::time::timeout(CLOSE_TIMEOUT, closing)
        .await
        .context("generator workers did not report after their stdin was closed")??;
    let closed_early: u64 = closing.iter().map(|r| count(r, "closed_early")).sum();

    let mut report = json!({
        "scenario": "cluster-idle",
        "connections": connected,
        "nodes": servers.nodes.len(),
        "generator_processes": workers.len(),
        "duration_s": args.duration,
        "connect_seconds": round3(connect_secs),
    });
    let obj = report.as_object_mut().expect("object");
    obj.extend(crate::idle_fields(
        IdleHold {
            rss_start,
            rss_connected,
            rss_end,
            connected: connected as usize,
            server_ticks: ticks1.saturating_sub(ticks0),
            load_ticks: load1.ticks.saturating_sub(load0.ticks),
            errors: failed + closed_early,
            error_detail: json!({"connect": failed, "closed_early": closed_early,
                   "first_connect_error": first_error}),
            note: format!(
                "cluster-idle: {} generator processes of at most {} connections each; \
                 server_* summed over the nodes (Redis apart as redis_*); rss_per_connection = \
                 (node RSS 1 s after every generator reported connected - node RSS 0.5 s after \
                 startup) / connections; server_cpu (nodes) and load_cpu (generators) over the \
                 hold; generator_rss = workers + parent with every connection up; \
                 node_connections = chat_ws_connections at the end of the hold",
                workers.len(),
                nofile.saturating_sub(FD_HEADROOM)
            ),
        },
        tck,
    ));
    obj.extend([
        ("node_connections".into(), json!(node_connections)),
        ("generator_rss_bytes".into(), json!(load0.rss)),
        (
            "generator_connections".into(),
            json!(
                reports
                    .iter()
                    .map(|r| count(r, "connected"))
                    .collect::<Vec<_>>()
            ),
        ),
        (
            "generator_connect_seconds".into(),
            json!(
                reports
                    .iter()
                    .map(|r| r["seconds"].as_f64().map(round3))
                    .collect::<Vec<_>>()
            ),
        ),
        ("redis_rss_start_bytes".into(), json!(redis_start.rss)),
        ("redis_rss_bytes".into(), json!(redis0.rss)),
        ("redis_rss_end_bytes".into(), json!(redis1.rss)),
        (
            "redis_cpu_seconds".into(),
            json!(round3(
                redis1.ticks.saturating_sub(redis0.ticks) as f64 / tck
            )),
        ),
    ]);
    Ok(report)
}

/// RSS and CPU ticks of the load generator: every worker and this process.
fn generator_sample(workers: &[Worker]) -> sys::Sample {
    let pids = workers.iter().map(|w| w.pid).chain([std::process::id()]);
    pids.map(sys::sample)
        .fold(sys::Sample::default(), |a, s| sys::Sample {
            rss: a.rss + s.rss,
            ticks: a.ticks + s.ticks,
        })
}

/// One generator worker process, seen from the parent.
#[derive(Debug)]
struct Worker {
    /// Its global connection indices.
    range: Range<usize>,
    pid: u32,
    child: Child,
    /// Dropped (closed) to end the hold.
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts this executable in worker mode for `range` against `addrs` (comma-separated).
    fn spawn(
        exe: &Path,
        args: &Args,
        addrs: &str,
        range: Range<usize>,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(["--scenario", "cluster-idle", "--worker-addrs", addrs])
            .arg("--worker-range")
            .arg(format!("{}..{}", range.start, range.end))
            .arg("--sources")
            .arg(args.sources.to_string())
            .arg("--connect-concurrency")
            .arg(concurrency.to_string());
        if args.pin {
            cmd.arg("--pin");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting generator worker {range:?}"))?;
        let pid = child.id().context("worker has no pid")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("worker stdout")?;
        Ok(Self {
            range,
            pid,
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    /// Its next JSON line; an `{"error":…}` line, anything unparsable or its exit is an error.
    async fn line(&mut self) -> anyhow::Result<Value> {
        let range = &self.range;
        let line = self
            .stdout
            .next_line()
            .await
            .with_context(|| format!("reading generator worker {range:?}"))?;
        let Some(line) = line else {
            let status = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
            let status = match status {
                Ok(Ok(s)) => s.to_string(),
                _ => "still running".to_owned(),
            };
            bail!("generator worker {range:?} closed its stdout without reporting ({status})");
        };
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("generator worker {range:?} wrote {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!(
                "generator worker {range:?}: {}",
                e.as_str().unwrap_or_default()
            );
        }
        Ok(v)
    }

    /// Kills it (if it has not exited) and reaps it.
    async fn reap(mut self) {
        drop(self.stdin.take());
        if matches!(self.child.try_wait(), Ok(None)) {
            // Give a worker that is closing normally a moment, then kill it.
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
            }
        }
    }
}

/// Writes one JSON line on stdout (a worker's report to its parent); a parent that is gone is
/// ignored (the worker notices its stdin's EOF).
pub fn write_line(v: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The worker mode: connects `range` to `args.worker_addrs`, reports, holds until stdin's
/// EOF, reports again.
pub async fn worker(args: &Args, range: Range<usize>, nofile: u64) -> anyhow::Result<()> {
    let addrs: &[SocketAddr] = &args.worker_addrs;
    if addrs.is_empty() {
        bail!("--worker-range needs --worker-addrs");
    }
    let cap = nofile.saturating_sub(FD_HEADROOM) as usize;
    if range.len() > cap {
        bail!(
            "{} connections, above this process's open-file limit {nofile} minus {FD_HEADROOM}",
            range.len()
        );
    }
    // The parent closes our stdin to end the hold; its death does the same.
    let (eof_tx, mut eof) = watch::channel(false);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = eof_tx.send(true);
    });
    let shared = Arc::new(Shared::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    let targets = range
        .clone()
        .map(|i| (i, addrs[i % addrs.len()], format!("/ws?user=u{i}")));
    let connecting = client::connect_all(
        targets,
        args.sources,
        args.connect_concurrency,
        |_, ws| std::future::ready(Ok(ws)),
        |i, ws| {
            let shared = shared.clone();
            let stop = stop_rx.clone();
            readers.spawn(async move { client::read_loop(ws, i, &shared, stop).await });
        },
    );
    let outcome = tokio::select! {
        r = connecting => r?,
        _ = eof.wait_for(|&e| e) => bail!("stdin closed while connecting"),
    };
    eprintln!(
        "chat-load: generator {range:?}: {} connected in {:.1} s ({} failed)",
        outcome.ok, outcome.seconds, outcome.failed
    );
    write_line(&json!({
        "connected": outcome.ok,
        "failed": outcome.failed,
        "first_error": outcome.first_error,
        "seconds": outcome.seconds,
    }));
    let _ = eof.wait_for(|&e| e).await;
    let _ = stop_tx.send(true);
    let closed_early = shared.closed_early.load(Ordering::Relaxed);
    crate::finish_readers(readers).await;
    write_line(&json!({ "closed_early": closed_early }));
    Ok(())
}
