//! The README's two-minute tour, as a test: `chat-server` on the in-memory default (dev mode),
//! a conversation created over HTTP, and two `chat-cli` processes (the terminal client the
//! project ships) exchanging a message over real WebSockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

mod common;

use common::{Node, WAIT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

fn cli(url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chat-cli"))
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn chat-cli")
}

/// Waits until `child` printed `what` on stderr (its "connected" line); returns the rest of
/// its stderr, to keep the pipe open.
async fn wait_stderr(
    child: &mut Child,
    what: &str,
) -> tokio::io::Lines<BufReader<tokio::process::ChildStderr>> {
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, err.next_line())
        .await
        .expect("chat-cli said nothing")
        .unwrap()
        .unwrap_or_default();
    assert!(line.contains(what), "chat-cli: {line}");
    err
}

/// The next line a client printed, as JSON.
async fn next_json(
    out: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
) -> Value {
    let line = tokio::time::timeout(WAIT, out.next_line())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the client ended"));
    serde_json::from_str(&line).unwrap()
}

#[tokio::test]
async fn the_tour_works_with_the_shipped_terminal_client() {
    let server = Node::spawn(&[], WAIT).await;
    let (status, body) = server
        .http(
            "POST",
            "/api/conversations",
            "alice",
            Some(serde_json::json!({"kind": "direct", "members": ["bob"]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let conv = body["id"].as_str().unwrap().to_owned();
    let port = server.port;

    let mut bob = cli(&format!("ws://127.0.0.1:{port}/ws?user=bob"));
    let _bob_err = wait_stderr(&mut bob, "connected").await;
    let mut alice = cli(&format!("ws://127.0.0.1:{port}/ws?user=alice"));
    let _alice_err = wait_stderr(&mut alice, "connected").await;
    let frame = format!(
        r#"{{"type":"message","conversation_id":"{conv}","client_msg_id":"m1","content":"hi bob"}}"#
    );
    let mut stdin = alice.stdin.take().unwrap();
    stdin
        .write_all(format!("{frame}\n").as_bytes())
        .await
        .unwrap();

    let mut alice_out = BufReader::new(alice.stdout.take().unwrap()).lines();
    let mut bob_out = BufReader::new(bob.stdout.take().unwrap()).lines();
    // The first frame of each socket describes its session (dev mode: no expiry).
    for (out, user) in [(&mut alice_out, "alice"), (&mut bob_out, "bob")] {
        let session = next_json(out, "no session frame").await;
        assert_eq!(session["type"], "session", "{session}");
        assert_eq!(session["user_id"], user);
        assert!(session.get("expires_at").is_none(), "{session}");
    }
    let ack = next_json(&mut alice_out, "no ack").await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("message_ack"), Some(1))
    );
    let got = next_json(&mut bob_out, "bob got nothing").await;
    assert_eq!(got["type"], "message");
    assert_eq!(got["message"]["content"], "hi bob");
    // Ctrl-D (end of input) closes alice's client cleanly.
    drop(stdin);
    let status = tokio::time::timeout(WAIT, alice.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
