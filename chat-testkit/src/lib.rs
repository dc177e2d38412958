//! Test support: real services for the backend crates' tests, never mocks.
//!
//! [`RedisServer`] starts a throwaway `redis-server` on a free loopback port, waits until it
//! answers `PING`, and kills it on drop. If `redis-server` is not installed the test **fails**
//! loudly (the README's test command, `scripts/test.sh`, installs it), so no test can pass
//! without having run against Redis.
//!
//! Shared by every test crate: [`random_prefix`] (isolated test state on a shared server),
//! [`free_port`], [`ws::WsClient`], the WebSocket test client of the gateway, cluster and
//! example tests, and [`CassandraNode`], a CQL node of one test.

pub mod cassandra;
pub mod ws;

pub use cassandra::{CassandraNode, test_contact_points};

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// A `redis-server` child process on 127.0.0.1, killed (and its data dir removed) on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server with persistence off (tests) and keyspace notifications for expired
    /// keys on (`notify-keyspace-events Ex`).
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--appendonly", "yes"]`).
    pub async fn start_with(extra_args: &[&str]) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("chat-testkit-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut server = Self {
            child: None,
            port,
            dir,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--notify-keyspace-events")
            .arg("Ex")
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}). Install it (Debian: apt-get install -y \
                 redis-server) or run the README's test command, scripts/test.sh, which does."
            )
        });
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.addr()).await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's working directory (where `SAVE` writes `dump.rdb` and from which a
    /// restart loads it).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Kills the server (a crash: nothing is flushed).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open and nothing is answered, like a
    /// hung Redis or a black-holed network. [`resume`](Self::resume) thaws it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a [`pause`](Self::pause)d server (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            panic!("redis-server on port {} is not running", self.port);
        };
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill {signal}: {e}"));
        assert!(status.success(), "kill {signal} {pid} failed: {status}");
    }

    /// Starts it again on the same port (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP server on 127.0.0.1 that accepts connections and never reads or answers anything: a
/// hung Redis or a black-holed network, for deadline tests. Stops (closing every connection)
/// on drop.
#[derive(Debug)]
pub struct SilentServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SilentServer {
    /// Starts it on a free port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a silent server: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("silent server without an address: {e}"));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket); // read nothing, answer nothing
            }
        });
        Self { addr, task }
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"+PONG\r\n"
    )
}

/// A key prefix (or keyspace-safe name) no other test uses: `test-` and 16 hex digits, from a
/// process-wide counter mixed with the clock and a random hasher seed. Every test that shares
/// a server with others takes one, so runs never see each other's data.
pub fn random_prefix() -> String {
    use std::hash::{BuildHasher, Hasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("test_{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_answers_and_restarts() {
        let mut r = RedisServer::start().await;
        assert!(ping(r.addr()).await);
        r.kill().await;
        assert!(!ping(r.addr()).await);
        r.restart().await;
        assert!(ping(r.addr()).await);
        r.pause();
        assert!(!ping(r.addr()).await, "a paused server answered");
        r.resume();
        assert!(ping(r.addr()).await);
    }
}
