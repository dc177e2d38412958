//! Several `chat-server` processes with the message store on a real CQL node (Apache Cassandra
//! 5.0, started by `scripts/test.sh` and named by `CHAT_TEST_SCYLLA_URI`) and presence/router on
//! a real Redis: one chat whose history lives in CQL. **Fails without `CHAT_TEST_SCYLLA_URI`**
//! (`scripts/test.sh` skips it loudly only when Java 11/17 or Maven is missing).
//!
//! `CHAT_TEST_SCYLLA_URI=127.0.0.1:19042 cargo test -p chat-examples --test cql_cluster`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use chat_testkit::{RedisServer, free_port};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

const WAIT: Duration = Duration::from_secs(15);
/// The first process creates the keyspace and its tables, which takes a few seconds.
const START_WAIT: Duration = Duration::from_secs(90);

fn scylla_uri() -> String {
    let uri = std::env::var("CHAT_TEST_SCYLLA_URI").unwrap_or_default();
    assert!(
        !uri.trim().is_empty(),
        "CHAT_TEST_SCYLLA_URI is not set: these tests need a real CQL node. Run the README's \
         test command (scripts/test.sh starts Apache Cassandra), or `scripts/cassandra.sh start` \
         and `export CHAT_TEST_SCYLLA_URI=127.0.0.1:19042`."
    );
    uri
}

/// One keyspace for this test process (random, so runs never share data).
fn keyspace() -> &'static str {
    static KS: OnceLock<String> = OnceLock::new();
    KS.get_or_init(|| format!("chat_gw_{:012x}", random_u64() & 0xffff_ffff_ffff))
}

struct Node {
    port: u16,
    /// Killed on drop.
    _child: Child,
}

impl Node {
    async fn start(redis: &RedisServer, id: u16) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-server"));
        cmd.env("CHAT_BIND", format!("127.0.0.1:{port}"))
            .env("CHAT_REDIS_URL", redis.url())
            .env("CHAT_SCYLLA_URI", scylla_uri())
            .env("CHAT_SCYLLA_KEYSPACE", keyspace())
            .env("CHAT_NODE_ID", id.to_string())
            .env("CHAT_RATE_LIMIT", "0")
            .env("RUST_LOG", "warn")
            .env_remove("CHAT_JWT_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn chat-server");
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            if let Ok((200, _)) = try_http(port, "GET", "/healthz", None, None).await {
                return Self {
                    port,
                    _child: child,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("node {id} exited at start: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn http(
        &self,
        method: &str,
        path: &str,
        user: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        try_http(self.port, method, path, Some(user), body)
            .await
            .unwrap()
    }

    async fn ws(&self, user: &str) -> Ws {
        let url = format!("ws://127.0.0.1:{}/ws?user={user}", self.port);
        let (stream, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("websocket");
        Ws { stream }
    }
}

async fn try_http(
    port: u16,
    method: &str,
    path: &str,
    user: Option<&str>,
    body: Option<Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let user = user
        .map(|u| format!("x-chat-user: {u}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{user}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = text
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((status, json))
}

struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    async fn send(&mut self, v: Value) {
        let _ = self.stream.send(Message::Text(v.to_string().into())).await;
    }

    async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == ty {
                        return v;
                    }
                }
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("socket ended while waiting for {ty}: {other:?}"),
                Err(_) => panic!("timed out waiting for {ty}"),
            }
        }
    }

    async fn send_message(&mut self, conv: &str, cmid: &str, content: &str) -> Value {
        self.send(json!({"type": "message", "conversation_id": conv, "client_msg_id": cmid, "content": content}))
            .await;
        let v = self.recv_type("message_ack").await;
        assert_eq!(v["client_msg_id"], cmid, "{v}");
        v
    }
}

fn contents(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Two processes (CQL store, Redis presence and router): a conversation created on one is
/// used on the other, messages flow both ways live, and the history is the same from both.
/// Then both processes and the Redis server go away: a new process on a *fresh* Redis serves
/// the whole history and the conversation list, so they live in the CQL store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_two_processes_share_history_that_outlives_them_and_redis() {
    let redis = RedisServer::start().await;
    let a = Node::start(&redis, 1).await;
    let b = Node::start(&redis, 2).await;
    let (alice, bob) = (
        format!("alice{:x}", random_u64()),
        format!("bob{:x}", random_u64()),
    );
    let (status, body) = a
        .http(
            "POST",
            "/api/conversations",
            &alice,
            Some(json!({"kind": "direct", "members": [bob]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let conv = body["id"].as_str().unwrap().to_owned();

    let mut alice_ws = a.ws(&alice).await;
    let mut bob_ws = b.ws(&bob).await;
    let first = alice_ws.send_message(&conv, "a1", "hi from A").await;
    assert_eq!(first["seq"], 1);
    assert_eq!(
        bob_ws.recv_type("message").await["message"]["content"],
        "hi from A"
    );
    let ack = bob_ws.send_message(&conv, "b1", "hi from B").await;
    assert_eq!(ack["seq"], 2);
    assert_eq!(
        alice_ws.recv_type("message").await["message"]["content"],
        "hi from B"
    );
    // A retried send (same client_msg_id) through the other node is the same message.
    let mut alice_on_b = b.ws(&alice).await;
    let again = alice_on_b.send_message(&conv, "a1", "hi from A").await;
    assert_eq!(
        (&again["seq"], &again["message_id"]),
        (&first["seq"], &first["message_id"])
    );

    let path = format!("/api/conversations/{conv}/messages");
    let (s1, from_a) = a.http("GET", &path, &bob, None).await;
    let (s2, from_b) = b.http("GET", &path, &alice, None).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(contents(&from_a), vec!["hi from B", "hi from A"]);
    assert_eq!(from_a["messages"], from_b["messages"]);

    drop((alice_ws, bob_ws, alice_on_b));
    drop((a, b));
    drop(redis);

    let fresh_redis = RedisServer::start().await;
    let c = Node::start(&fresh_redis, 3).await;
    let (status, page) = c.http("GET", &path, &bob, None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"], from_a["messages"], "history from CQL");
    let (_, list) = c.http("GET", "/api/conversations", &alice, None).await;
    assert_eq!(list["conversations"][0]["id"], conv.as_str());
    assert_eq!(list["conversations"][0]["last_seq"], 2);
    assert_eq!(list["conversations"][0]["unread"], 1);
    let mut bob_ws = c.ws(&bob).await;
    assert_eq!(bob_ws.send_message(&conv, "b2", "after").await["seq"], 3);
}

/// No CQL node at `CHAT_SCYLLA_URI`: the server refuses to start, with an error naming the
/// setting, instead of serving without a store.
#[tokio::test]
async fn cql_server_refuses_to_start_without_a_reachable_node() {
    let dead = free_port();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(env!("CARGO_BIN_EXE_chat-server"))
            .env("CHAT_BIND", format!("127.0.0.1:{}", free_port()))
            .env("CHAT_SCYLLA_URI", format!("127.0.0.1:{dead}"))
            .env("CHAT_SCYLLA_KEYSPACE", keyspace())
            .env("RUST_LOG", "warn")
            .env_remove("CHAT_REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the server gives up within 60 s")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CHAT_SCYLLA_URI"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{dead}")), "{stderr}");
}

/// A Cassandra node of one test (`scripts/cassandra.sh` on free ports, `commitlog_sync:
/// batch`), killed and restarted at will, stopped and removed on drop.
struct OwnNode {
    home: std::path::PathBuf,
    cql_port: u16,
    storage_port: u16,
}

impl OwnNode {
    fn command(&self, action: &str, keep_data: bool) -> std::process::Command {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cassandra.sh");
        let mut cmd = std::process::Command::new(script);
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
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .expect("run scripts/cassandra.sh");
        assert!(
            out.status.success(),
            "cassandra.sh {action} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn start() -> Self {
        let node = Self {
            home: std::env::temp_dir().join(format!("chat-gw-cql-fault-{:x}", random_u64())),
            cql_port: free_port(),
            storage_port: free_port(),
        };
        node.run("start", false).await;
        node
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        let _ = self.command("stop", true).output();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// The raw response head (status line and headers), for headers like `Retry-After`.
async fn http_head(port: u16, path: &str, user: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-chat-user: {user}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).to_string();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

/// The CQL node dies under a running server: HTTP answers 503 with `Retry-After`, a send gets
/// an `error` frame (the socket stays open), nothing hangs. The node comes back (same data):
/// the server recovers by itself, the acked message is in history, and the retried send with
/// the same client_msg_id is the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_node_down_gives_503_with_retry_after_and_the_server_recovers() {
    scylla_uri(); // like every test here, needs the CQL test setup
    let node = OwnNode::start().await;
    let redis = RedisServer::start().await;
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-server"))
        .env("CHAT_BIND", format!("127.0.0.1:{port}"))
        .env("CHAT_REDIS_URL", redis.url())
        .env("CHAT_SCYLLA_URI", format!("127.0.0.1:{}", node.cql_port))
        .env("CHAT_SCYLLA_KEYSPACE", "chat_gw_fault")
        .env("CHAT_RATE_LIMIT", "0")
        .env("RUST_LOG", "error")
        .env_remove("CHAT_JWT_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + START_WAIT;
    while !matches!(
        try_http(port, "GET", "/healthz", None, None).await,
        Ok((200, _))
    ) {
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let srv = Node {
        port,
        _child: child,
    };
    let (alice, bob) = ("alice", "bob");
    let (status, body) = srv
        .http(
            "POST",
            "/api/conversations",
            alice,
            Some(json!({"kind": "direct", "members": [bob]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let conv = body["id"].as_str().unwrap().to_owned();
    let mut ws = srv.ws(alice).await;
    let first = ws.send_message(&conv, "m1", "before the outage").await;
    let path = format!("/api/conversations/{conv}/messages");

    node.run("kill", true).await;
    let head = http_head(port, &path, bob).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    ws.send(json!({"type": "message", "conversation_id": conv, "client_msg_id": "m2", "content": "during"}))
        .await;
    let err = ws.recv_type("error").await;
    assert_eq!(err["client_msg_id"], "m2", "{err}");

    node.run("start", true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let page = loop {
        let (status, page) = srv.http("GET", &path, bob, None).await;
        if status == 200 {
            break page;
        }
        assert_eq!(status, 503, "{page}");
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(page["messages"][0]["message_id"], first["message_id"]);
    // The socket survived the outage; the retry of the failed send is stored once.
    let ack = ws.send_message(&conv, "m2", "during").await;
    assert_eq!(ack["seq"], 2);
    let again = ws.send_message(&conv, "m2", "during").await;
    assert_eq!(again["message_id"], ack["message_id"]);
}
