//! Append and history latency of `RedisStore` and `ScyllaStore`, in the same run.
//!
//! ```sh
//! scripts/cassandra.sh start      # CQL on 127.0.0.1:19042
//! CHAT_TEST_SCYLLA_URI=127.0.0.1:19042 cargo run --release -p chat-store --example store_bench
//! scripts/cassandra.sh stop
//! ```
//!
//! Starts its own `redis-server` (persistence off, as in the tests) on a free port. Per backend:
//! sequential appends to one conversation (what one busy conversation gets: the engine holds a
//! per-conversation lock across `append`), 100 conversations appended to concurrently (one
//! sequential sender each), history pages of 50, read receipts (a marker moved by one each
//! time) and, on a store with a change stream, reactions. Prints one line per measurement.
//! `BENCH_REDIS_ONLY=1` skips the CQL part (no Cassandra needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::store::DynMessageStore;
use chat_core::testing::store::{Fixture, random_u64};
use chat_store::{RedisStore, ScyllaStore, ScyllaStoreOptions};
use chat_testkit::RedisServer;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(backend: &str, what: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{backend:>7} {what:<32} n={:>6} {:>9.0}/s  p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}

async fn bench(backend: &str, store: DynMessageStore) {
    let per_conv = env_usize("BENCH_APPENDS", 2000);
    let fx = Arc::new(Fixture::new());

    // 1 conversation, one sequential sender.
    let (conv, users) = fx.group(&*store, 2).await;
    for i in 0..50 {
        fx.send(&*store, conv.id, &users[0], &format!("warm{i}"))
            .await;
    }
    let mut lat = Vec::with_capacity(per_conv);
    let t0 = Instant::now();
    for i in 0..per_conv {
        let t = Instant::now();
        fx.send(
            &*store,
            conv.id,
            &users[i % 2],
            "a short text message of about 40 bytes",
        )
        .await;
        lat.push(t.elapsed());
    }
    report(backend, "append, 1 conversation", lat, t0.elapsed());

    // History pages of 50 over that conversation (newest, and random older pages).
    let last = store.last_seq(conv.id).await.unwrap();
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for i in 0..500 {
        let before = if i % 2 == 0 {
            None
        } else {
            Some(51 + random_u64() % (last - 50))
        };
        let t = Instant::now();
        let page = store.history(conv.id, before, 50).await.unwrap();
        lat.push(t.elapsed());
        assert_eq!(page.len(), 50);
    }
    report(backend, "history page of 50", lat, t0.elapsed());

    // Read receipts: the reader's marker moves by one each time (every call moves it).
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for seq in 1..=per_conv.min(last as usize) as u64 {
        let t = Instant::now();
        let up = store
            .set_marker(conv.id, &users[1], chat_core::model::ReceiptKind::Read, seq)
            .await
            .unwrap();
        lat.push(t.elapsed());
        assert!(up.moved);
    }
    report(backend, "read marker, 1 conversation", lat, t0.elapsed());

    // Reactions (stores with a change stream): users take turns on the newest message.
    let newest = store.history(conv.id, None, 1).await.unwrap()[0].message_id;
    if store
        .react(conv.id, newest, &users[0], Some("👍"))
        .await
        .is_ok()
    {
        let mut lat = Vec::new();
        let t0 = Instant::now();
        for i in 0..per_conv {
            let key = if i % 2 == 0 { "🎉" } else { "👍" };
            let t = Instant::now();
            store
                .react(conv.id, newest, &users[i % 2], Some(key))
                .await
                .unwrap();
            lat.push(t.elapsed());
        }
        report(backend, "react, 1 message", lat, t0.elapsed());
    }

    // 100 conversations, one sequential sender each, all at once.
    let convs = 100;
    let per = (per_conv / 10).max(20);
    let mut groups = Vec::new();
    for _ in 0..convs {
        groups.push(fx.group(&*store, 2).await);
    }
    let t0 = Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|(conv, users)| {
            let (store, fx) = (store.clone(), fx.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    fx.send(&*store, conv.id, &users[i % 2], "hello").await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    report(backend, "append, 100 conversations", lat, t0.elapsed());
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let redis = RedisServer::start().await;
    let store = RedisStore::connect(&redis.url(), &format!("bench{:x}", random_u64()))
        .await
        .unwrap();
    bench("redis", Arc::new(store)).await;

    if std::env::var_os("BENCH_REDIS_ONLY").is_some() {
        return;
    }
    let uri = std::env::var("CHAT_TEST_SCYLLA_URI").expect("CHAT_TEST_SCYLLA_URI=host:port");
    let points: Vec<String> = uri.split(',').map(str::to_owned).collect();
    let keyspace = format!("bench_{:x}", random_u64() & 0xffff_ffff);
    let store = ScyllaStore::connect_with(&points, ScyllaStoreOptions::new(keyspace.clone()))
        .await
        .unwrap();
    bench("scylla", Arc::new(store)).await;
    statement_costs(&points, &keyspace).await;
}

/// One plain single-row write, one lightweight transaction and one single-row read, each
/// sequential on its own (the building blocks of an append).
async fn statement_costs(points: &[String], keyspace: &str) {
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(points)
        .build()
        .await
        .unwrap();
    session
        .query_unpaged(
            format!("CREATE TABLE IF NOT EXISTS {keyspace}.bench (k bigint PRIMARY KEY, v text)"),
            (),
        )
        .await
        .unwrap();
    let plain = session
        .prepare(format!("INSERT INTO {keyspace}.bench (k, v) VALUES (?, ?)"))
        .await
        .unwrap();
    let lwt = session
        .prepare(format!(
            "INSERT INTO {keyspace}.bench (k, v) VALUES (?, ?) IF NOT EXISTS"
        ))
        .await
        .unwrap();
    let read = session
        .prepare(format!("SELECT v FROM {keyspace}.bench WHERE k = ?"))
        .await
        .unwrap();
    for (what, st, base) in [
        ("plain INSERT", &plain, 0i64),
        ("INSERT IF NOT EXISTS (LWT)", &lwt, 1_000_000),
        ("SELECT one row", &read, 0),
    ] {
        let mut lat = Vec::new();
        let t0 = Instant::now();
        for i in 0..1000i64 {
            let t = Instant::now();
            if std::ptr::eq(st, &read) {
                session.execute_unpaged(st, (i,)).await.unwrap();
            } else {
                session.execute_unpaged(st, (base + i, "x")).await.unwrap();
            }
            lat.push(t.elapsed());
        }
        report("cql", what, lat, t0.elapsed());
    }
}
