//! The processes under test: `chat-server` nodes, `baseline-server`, `redis-server`, started as
//! children on free loopback ports, waited for, sampled and killed; plus a tiny keep-alive
//! HTTP/1.1 client for the chat server's API.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::sys;

/// How long a child may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process under test.
#[derive(Debug)]
pub struct Proc {
    /// What it is (`chat-server#0`, `baseline-server`, `redis-server`).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its pid (the program's own: `taskset` execs it).
    pub pid: u32,
    /// Its stderr, for post-mortems.
    pub log: PathBuf,
    /// A scratch directory removed after the kill (Redis's `--dir`).
    scratch: Option<PathBuf>,
    child: Child,
}

impl Proc {
    fn spawn(
        name: String,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        port: u16,
        pin: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = if pin {
            // The server side gets CPU 0, the load generator CPU 1.
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let log = std::env::temp_dir().join(format!(
            "chat-load-{}-{}.log",
            std::process::id(),
            name.replace('#', "-")
        ));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        cmd.args(args)
            .env_remove("CHAT_JWT_SECRET")
            .env_remove("CHAT_REDIS_URL")
            .env_remove("CHAT_SCYLLA_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Self {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            pid,
            log,
            scratch: None,
            child,
        })
    }

    /// A `chat-server` with in-memory parts (or on `redis_url`), rate limits off, dev auth.
    pub async fn chat(
        bin: &Path,
        node: u16,
        redis_url: Option<&str>,
        pin: bool,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut env = vec![
            ("CHAT_BIND", format!("127.0.0.1:{port}")),
            ("CHAT_RATE_LIMIT", "0".to_owned()),
            ("CHAT_NODE_ID", node.to_string()),
            (
                "RUST_LOG",
                std::env::var("CHAT_LOAD_SERVER_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ),
        ];
        if let Some(url) = redis_url {
            env.push(("CHAT_REDIS_URL", url.to_owned()));
        }
        let mut p = Self::spawn(format!("chat-server#{node}"), bin, &[], &env, port, pin)?;
        p.wait_ready(|addr| async move {
            let mut http = Http::connect(addr).await.ok()?;
            let (status, _) = http.request("GET", "/healthz", None, None).await.ok()?;
            (status == 200).then_some(())
        })
        .await?;
        Ok(p)
    }

    /// `baseline-server`; ready when its port accepts.
    pub async fn baseline(bin: &Path, pin: bool) -> anyhow::Result<Self> {
        let port = free_port()?;
        let args = ["--bind".to_owned(), format!("127.0.0.1:{port}")];
        let mut p = Self::spawn("baseline-server".to_owned(), bin, &args, &[], port, pin)?;
        p.wait_ready(|addr| async move { TcpStream::connect(addr).await.ok().map(|_| ()) })
            .await?;
        Ok(p)
    }

    /// A throwaway `redis-server` (no persistence; expired-key notifications on, as the Redis
    /// presence expects); ready when it answers `PING`.
    pub async fn redis(bin: &Path, pin: bool) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("chat-load-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.to_string_lossy(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--notify-keyspace-events",
            "Ex",
            "--maxclients",
            "10000",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut p = Self::spawn("redis-server".to_owned(), bin, &args, &[], port, pin)?;
        p.scratch = Some(dir);
        p.wait_ready(|addr| async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 7];
            tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
                .await
                .ok()?
                .ok()?;
            (&buf == b"+PONG\r\n").then_some(())
        })
        .await?;
        Ok(p)
    }

    async fn wait_ready<F, Fut>(&mut self, probe: F) -> anyhow::Result<()>
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: Future<Output = Option<()>>,
    {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during startup ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if probe(self.addr).await.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready after {READY_TIMEOUT:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Lines of its stderr (warnings and errors: servers run with `RUST_LOG=warn`).
    pub fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// RSS and CPU ticks now.
    pub fn sample(&self) -> sys::Sample {
        sys::sample(self.pid)
    }

    /// Kills it (SIGKILL) and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A keep-alive HTTP/1.1 client for one server (requests one at a time).
#[derive(Debug)]
pub struct Http {
    stream: BufReader<TcpStream>,
}

impl Http {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(s),
        })
    }

    /// One request; returns the status and the raw body. `user` goes in `X-Chat-User`.
    pub async fn request_raw(
        &mut self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let user = user
            .map(|u| format!("x-chat-user: {u}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\n{user}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let length = length.context("response without content-length")?;
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }

    /// One request with a JSON answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let (status, body) = self.request_raw(method, path, user, body).await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }
}

/// Every sample of a chat server's `/metrics` (Prometheus text: `name{labels} value`), or
/// `None` when it cannot be fetched.
pub async fn scrape(node: &Proc) -> Option<Vec<(String, f64)>> {
    let mut http = Http::connect(node.addr).await.ok()?;
    let (200, body) = http.request_raw("GET", "/metrics", None, None).await.ok()? else {
        return None;
    };
    let samples = String::from_utf8_lossy(&body)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse::<f64>().ok()?))
        })
        .collect();
    Some(samples)
}

/// One unlabelled sample (`name value`) of a chat server's `/metrics`.
pub async fn metric(node: &Proc, name: &str) -> Option<f64> {
    scrape(node)
        .await?
        .into_iter()
        .find_map(|(n, v)| (n == name).then_some(v))
}

/// Counters of interest from a chat server's `/metrics` (slow consumers, drops, resyncs,
/// errors, reaped zombies), summed over `nodes`; only the non-zero ones.
pub async fn interesting_metrics(nodes: &[Proc]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for node in nodes {
        for (name, v) in scrape(node).await.unwrap_or_default() {
            let interesting = ["slow", "drop", "resync", "error", "zombie", "lag", "gap"]
                .iter()
                .any(|w| name.contains(w));
            if !interesting || name.contains("_bucket") {
                continue;
            }
            let entry = out.entry(name).or_insert(Value::from(0.0));
            *entry = Value::from(entry.as_f64().unwrap_or(0.0) + v);
        }
    }
    out.retain(|_, v| v.as_f64() != Some(0.0));
    out
}
