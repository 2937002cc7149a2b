//! Mirror freshness under `mirror-mode = cdc`: the time from a subscription's
//! commit in Postgres to its being durable in the mirror, as the service's own
//! histogram `promo_fanout_mirror_freshness_seconds` records it.
//!
//! `cargo bench --bench freshness` (Postgres on `PF_BENCH_POSTGRES`, default
//! the local one, with wal_level=logical; Kafka is librdkafka's mock cluster,
//! the mirror does not need the broker). It commits single-row transactions at
//! a steady rate (`PF_BENCH_RATE` per second, default 200) for
//! `PF_BENCH_SECONDS` (default 30), then prints p50/p95/p99 from the histogram
//! and writes them to `target/bench/freshness.md`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use uuid::Uuid;

mod common;

use common::{buckets, drop_db, env_or, free_addr, get, quantile, scratch_db, write_result, BIN};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let admin = env_or(
        "PF_BENCH_POSTGRES",
        "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
    );
    let rate: u64 = env_or("PF_BENCH_RATE", 200);
    let seconds: u64 = env_or("PF_BENCH_SECONDS", 30);

    let scratch = scratch_db(&admin, "pf_bench");
    let (name, url) = (scratch.name.clone(), scratch.url.clone());

    let mock = MockCluster::new(1).unwrap();
    for t in ["actions", "push", "dlq"] {
        mock.create_topic(t, 1, 1).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let metrics = free_addr();
    let mut child = Command::new(BIN)
        .arg("run")
        .args(["--brokers", &mock.bootstrap_servers()])
        .args(["--postgres-url", &format!("{url}?sslmode=disable")])
        .args(["--state-dir", state.path().to_str().unwrap()])
        .args([
            "--input-topic",
            "actions",
            "--output-topic",
            "push",
            "--dlq-topic",
            "dlq",
        ])
        .args(["--group-id", &name, "--mirror-mode", "cdc"])
        .args(["--metrics-addr", &metrics])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&metrics, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the service did not get ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let insert = pg
        .prepare("INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)")
        .unwrap();
    let restaurant = Uuid::new_v4();
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let total = rate * seconds;
    for i in 0..total {
        let due = started + every * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        pg.execute(&insert, &[&Uuid::new_v4(), &restaurant])
            .unwrap();
    }
    let name_h = "promo_fanout_mirror_freshness_seconds";
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (_, body) = get(&metrics, "/metrics").unwrap_or_default();
        let b = buckets(&body, name_h);
        if b.last().is_some_and(|l| l.1 >= total as f64) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "not every transaction was applied"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let b = buckets(&body, name_h);
    let (p50, p95, p99) = (quantile(&b, 0.5), quantile(&b, 0.95), quantile(&b, 0.99));
    let table = format!(
        "| transactions | rate | other load | p50 ≤ | p95 ≤ | p99 ≤ |\n\
         |---|---|---|---|---|---|\n\
         | {total} single-row inserts | {rate}/s | none (idle pipeline) | {:.0} ms | {:.0} ms | {:.0} ms |\n",
        p50 * 1000.0,
        p95 * 1000.0,
        p99 * 1000.0
    );
    println!("mirror freshness (commit in Postgres → durable in the mirror), histogram bucket bounds:\n\n{table}");
    write_result("freshness.md", &table);

    let _ = child.kill();
    let _ = child.wait();
    drop(pg);
    drop_db(&scratch);
}
