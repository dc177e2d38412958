//! [`CassandraNode`]: a throw-away Apache Cassandra node of one test, through the project's
//! `scripts/cassandra.sh` (resolved from Maven Central into a cache dir, free loopback ports,
//! `commitlog_sync: batch` so an acknowledged write survives a SIGKILL), killed and restarted at
//! will, stopped and removed on drop. For the tests that kill *their own* node; the shared node
//! of a test run is started once by `scripts/test.sh` and named by `CHAT_TEST_SCYLLA_URI`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The contact points of the test run's shared CQL node, from `CHAT_TEST_SCYLLA_URI`
/// (comma-separated `host:port`). **Panics when it is unset**, saying how to get one: a CQL test
/// never passes without having run against a real node.
pub fn test_contact_points() -> Vec<String> {
    let uri = std::env::var("CHAT_TEST_SCYLLA_URI").unwrap_or_default();
    let points: Vec<String> = uri
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        !points.is_empty(),
        "CHAT_TEST_SCYLLA_URI is not set: these tests need a real CQL node. Run the README's \
         test command (scripts/test.sh starts Apache Cassandra), or `scripts/cassandra.sh start` \
         and `export CHAT_TEST_SCYLLA_URI=127.0.0.1:19042`."
    );
    points
}

/// One Cassandra node on 127.0.0.1.
#[derive(Debug)]
pub struct CassandraNode {
    /// Its data, logs and config (removed on drop).
    home: PathBuf,
    /// Where clients connect.
    cql_port: u16,
    /// Its internode port (nothing connects; it must be free).
    storage_port: u16,
}

impl CassandraNode {
    /// Starts a fresh node and waits until it answers CQL; panics (the test fails) if it cannot.
    pub async fn start() -> Self {
        let node = Self {
            home: std::env::temp_dir().join(format!("chat-testkit-cql-{}", crate::random_prefix())),
            cql_port: crate::free_port(),
            storage_port: crate::free_port(),
        };
        node.run("start", false).await;
        node
    }

    /// `host:port` for the driver.
    pub fn uri(&self) -> String {
        format!("127.0.0.1:{}", self.cql_port)
    }

    /// SIGKILLs the node (its data stays).
    pub async fn kill(&self) {
        self.run("kill", true).await;
    }

    /// Starts the node again on its data (after [`CassandraNode::kill`]).
    pub async fn restart(&self) {
        self.run("start", true).await;
    }

    fn command(&self, action: &str, keep_data: bool) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cassandra.sh");
        let mut cmd = Command::new(script);
        cmd.arg(action)
            .env("CASS_HOME", &self.home)
            .env("CQL_PORT", self.cql_port.to_string())
            .env("STORAGE_PORT", self.storage_port.to_string())
            .env("CASS_COMMITLOG_SYNC", "batch")
            .env("CASS_KEEP_DATA", if keep_data { "1" } else { "0" });
        cmd
    }

    async fn run(&self, action: &'static str, keep_data: bool) {
        let mut cmd = self.command(action, keep_data);
        let out = match tokio::task::spawn_blocking(move || cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("cannot run scripts/cassandra.sh {action}: {e}"),
            Err(e) => panic!("scripts/cassandra.sh {action}: {e}"),
        };
        assert!(
            out.status.success(),
            "scripts/cassandra.sh {action} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for CassandraNode {
    fn drop(&mut self) {
        let _ = self.command("stop", true).output();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}
