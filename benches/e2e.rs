//! The end-to-end load harness: the machine's limit and promo-fanout, side by
//! side, in one run on the same Postgres and broker.
//!
//! `bash scripts/bench.sh` (starts the broker, then `cargo bench --bench e2e`),
//! or `cargo bench --bench e2e` with `PF_TEST_BROKERS` pointing at a broker.
//! Sizes come from the environment (defaults in brackets):
//!
//! - `PF_E2E_RESTAURANTS` × `PF_E2E_SUBSCRIBERS` [200 × 500], two actions per
//!   restaurant: the throughput run (200,000 notifications);
//! - `PF_E2E_LATENCY_RATE` actions/s × 100 subscribers for
//!   `PF_E2E_LATENCY_SECONDS` [1000/s, 5 s]: latency from action produced to
//!   push message read back;
//! - `PF_E2E_HOT` subscribers of one restaurant [1,000,000]: wall time and the
//!   service's peak RSS;
//! - `PF_E2E_MIRROR_ROWS` [10,000,000]: snapshot time, then restart to ready.
//!
//! A stage set to 0 is skipped. `PF_E2E_SERVICE_ARGS` adds flags to the
//! service, e.g. `--chunk-size 20000`. Prints one Markdown table and writes it to
//! `target/bench/e2e.md`.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

mod common;

use common::{drop_db, env_or, get, scratch_db, write_result, BIN};

const PARTITIONS: i32 = 4;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Bench {
    brokers: String,
    admin_url: String,
    rt: tokio::runtime::Runtime,
    rows: Vec<(String, String, String)>,
}

fn subscribe(url: &str, restaurant: Uuid, n: u64) {
    postgres::Client::connect(url, postgres::NoTls)
        .unwrap()
        .execute(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
             SELECT gen_random_uuid(), $1 FROM generate_series(1, $2::int8)",
            &[&restaurant, &(n as i64)],
        )
        .unwrap();
}

fn action(r: Uuid, k: Uuid) -> String {
    let t = now();
    serde_json::json!({
        "restaurant_id": r,
        "adv_campaign_id": k,
        "adv_campaign_content": "Two pizzas for the price of one, today only",
        "adv_campaign_owner": "Ivan Ivanov",
        "adv_campaign_owner_contact": "ivan@example.com",
        "adv_campaign_datetime_start": t - 60,
        "adv_campaign_datetime_end": t + 7200,
        "datetime_created": t - 120,
    })
    .to_string()
}

fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = get(addr, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Topics {
    input: String,
    output: String,
    dlq: String,
}

impl Bench {
    fn topics(&self, partitions: i32) -> Topics {
        let id = Uuid::new_v4().simple().to_string();
        let t = Topics {
            input: format!("e2e_actions_{id}"),
            output: format!("e2e_push_{id}"),
            dlq: format!("e2e_dlq_{id}"),
        };
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let new = [
            NewTopic::new(&t.input, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.output, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.dlq, 1, TopicReplication::Fixed(1)),
        ];
        for r in self
            .rt
            .block_on(admin.create_topics(&new, &AdminOptions::new()))
            .unwrap()
        {
            r.unwrap();
        }
        t
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()
            .unwrap()
    }

    /// Produces `values` (key, value) and waits for every acknowledgement.
    fn produce_all(&self, producer: &FutureProducer, topic: &str, values: &[(String, String)]) {
        self.rt.block_on(async {
            for window in values.chunks(10_000) {
                let sends: Vec<_> = window
                    .iter()
                    .map(|(k, v)| {
                        producer.send(
                            FutureRecord::to(topic).key(k.as_str()).payload(v.as_str()),
                            Duration::from_secs(60),
                        )
                    })
                    .collect();
                for s in futures::future::join_all(sends).await {
                    s.map_err(|(e, _)| e).unwrap();
                }
            }
        });
    }

    fn service(
        &self,
        url: &str,
        t: &Topics,
        state: &std::path::Path,
        group: &str,
    ) -> (Child, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .arg("run")
            .args(["--brokers", &self.brokers, "--postgres-url", url])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--input-topic", &t.input, "--output-topic", &t.output])
            .args(["--dlq-topic", &t.dlq, "--group-id", group])
            .args(["--metrics-addr", &metrics])
            // Extra service flags, e.g. "--chunk-size 20000", for tuning runs.
            .args(
                std::env::var("PF_E2E_SERVICE_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        (child, metrics)
    }

    fn wait_ready(&self, metrics: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        while get(metrics, "/readyz").map(|r| r.0) != Some(200) {
            assert!(started.elapsed() < limit, "the service did not get ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    }

    fn wait_sent(&self, metrics: &str, n: f64, limit: Duration) {
        let started = Instant::now();
        while metric(metrics, "promo_fanout_notifications_sent_total") < n {
            assert!(
                started.elapsed() < limit,
                "the notifications did not all commit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn row(&mut self, what: &str, figure: String, note: &str) {
        println!("{what}: {figure} {note}");
        self.rows.push((what.into(), figure, note.into()));
    }

    /// Raw Postgres ingest of feedback-shaped rows into the indexed table:
    /// COPY, and multi-row INSERT … ON CONFLICT DO NOTHING in batches of 5,000.
    fn raw_postgres(&mut self, n: u64) -> f64 {
        let (name, url) = scratch_db(&self.admin_url, "pf_e2e");
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let r = Uuid::new_v4();
        let line = |k: Uuid, c: Uuid| {
            format!(
                "{r}\t{k}\tTwo pizzas for the price of one, today only\tIvan Ivanov\tivan@example.com\t\
                 2026-11-22 10:00:00+00\t2026-11-22 12:00:00+00\t2026-11-22 09:58:00+00\t{c}\t2026-11-22 10:01:00+00\n"
            )
        };
        let k = Uuid::new_v4();
        let data: String = (0..n).map(|_| line(k, Uuid::new_v4())).collect();
        let started = Instant::now();
        let mut w = pg
            .copy_in(
                "COPY subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, \
                 adv_campaign_owner, adv_campaign_owner_contact, adv_campaign_datetime_start, \
                 adv_campaign_datetime_end, datetime_created, client_id, trigger_datetime_created) FROM STDIN",
            )
            .unwrap();
        w.write_all(data.as_bytes()).unwrap();
        w.finish().unwrap();
        let copy = n as f64 / started.elapsed().as_secs_f64();

        let k = Uuid::new_v4();
        let started = Instant::now();
        let mut left = n;
        while left > 0 {
            let m = left.min(5000);
            left -= m;
            let clients: Vec<Uuid> = (0..m).map(|_| Uuid::new_v4()).collect();
            let mut tx = pg.transaction().unwrap();
            tx.execute(
                "INSERT INTO subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, \
                 adv_campaign_owner, adv_campaign_owner_contact, adv_campaign_datetime_start, \
                 adv_campaign_datetime_end, datetime_created, client_id, trigger_datetime_created) \
                 SELECT $1, $2, 'Two pizzas for the price of one, today only', 'Ivan Ivanov', 'ivan@example.com', \
                 now(), now() + interval '2 hours', now(), c, now() FROM unnest($3::uuid[]) c \
                 ON CONFLICT DO NOTHING",
                &[&r, &k, &clients],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let insert = n as f64 / started.elapsed().as_secs_f64();
        drop(pg);
        drop_db(&self.admin_url, &name);
        self.row(
            "raw Postgres COPY",
            format!("{copy:.0} rows/s"),
            &format!("{n} rows"),
        );
        self.row(
            "raw Postgres INSERT … ON CONFLICT",
            format!("{insert:.0} rows/s"),
            &format!("{n} rows, batches of 5,000"),
        );
        copy.max(insert)
    }

    /// Raw idempotent produce (acks=all) of push-shaped messages.
    fn raw_kafka(&mut self, n: u64) -> f64 {
        let t = self.topics(PARTITIONS);
        let producer = self.producer();
        let value = serde_json::json!({
            "restaurant_id": Uuid::new_v4(), "adv_campaign_id": Uuid::new_v4(),
            "adv_campaign_content": "Two pizzas for the price of one, today only",
            "adv_campaign_owner": "Ivan Ivanov", "adv_campaign_owner_contact": "ivan@example.com",
            "adv_campaign_datetime_start": 1, "adv_campaign_datetime_end": 2,
            "datetime_created": 0, "client_id": Uuid::new_v4(), "trigger_datetime_created": 1,
        })
        .to_string();
        let values: Vec<(String, String)> = (0..n)
            .map(|_| (Uuid::new_v4().to_string(), value.clone()))
            .collect();
        let started = Instant::now();
        self.produce_all(&producer, &t.output, &values);
        let rate = n as f64 / started.elapsed().as_secs_f64();
        self.row(
            "raw Kafka idempotent produce",
            format!("{rate:.0} msgs/s"),
            &format!("{n} messages, {PARTITIONS} partitions, acks=all"),
        );
        rate
    }

    /// The service end to end: notifications/s committed on both sinks.
    fn throughput(&mut self, restaurants: u64, subscribers: u64) -> f64 {
        let (name, url) = scratch_db(&self.admin_url, "pf_e2e");
        let rs: Vec<Uuid> = (0..restaurants).map(|_| Uuid::new_v4()).collect();
        for r in &rs {
            subscribe(&url, *r, subscribers);
        }
        let t = self.topics(PARTITIONS);
        let state = tempfile::tempdir().unwrap();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name);
        self.wait_ready(&metrics, Duration::from_secs(120));
        let actions: Vec<(String, String)> = rs
            .iter()
            .flat_map(|r| {
                [
                    (r.to_string(), action(*r, Uuid::new_v4())),
                    (r.to_string(), action(*r, Uuid::new_v4())),
                ]
            })
            .collect();
        let expected = (actions.len() as u64 * subscribers) as f64;
        let producer = self.producer();
        let started = Instant::now();
        self.produce_all(&producer, &t.input, &actions);
        self.wait_sent(&metrics, expected, Duration::from_secs(1800));
        let rate = expected / started.elapsed().as_secs_f64();
        let rows: i64 = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap()
            .query_one("SELECT count(*) FROM subscribers_feedback", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows as f64, expected, "every notification is in Postgres");
        let _ = child.kill();
        let _ = child.wait();
        drop_db(&self.admin_url, &name);
        self.row(
            "promo-fanout end to end",
            format!("{rate:.0} notifications/s"),
            &format!(
                "{restaurants} restaurants × {subscribers} subscribers, {} actions → {expected:.0} notifications, both sinks committed",
                actions.len()
            ),
        );
        rate
    }

    /// Steady load: action produced → push message read back.
    fn latency(&mut self, rate: u64, seconds: u64) {
        let (name, url) = scratch_db(&self.admin_url, "pf_e2e");
        let n = rate * seconds;
        let rs: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        pg.execute(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
             SELECT gen_random_uuid(), r FROM unnest($1::uuid[]) r, generate_series(1, 100)",
            &[&rs],
        )
        .unwrap();
        let t = self.topics(PARTITIONS);
        let state = tempfile::tempdir().unwrap();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name);
        self.wait_ready(&metrics, Duration::from_secs(300));

        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let reader = {
            let brokers = self.brokers.clone();
            let topic = t.output.clone();
            let sent = sent.clone();
            let expected = n * 100;
            std::thread::spawn(move || {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set(
                        "group.id",
                        format!("e2e_reader_{}", Uuid::new_v4().simple()),
                    )
                    .set("fetch.wait.max.ms", "5")
                    .create()
                    .unwrap();
                let mut tpl = TopicPartitionList::new();
                for p in 0..PARTITIONS {
                    tpl.add_partition_offset(&topic, p, Offset::Beginning)
                        .unwrap();
                }
                consumer.assign(&tpl).unwrap();
                let mut latencies = Vec::with_capacity(expected as usize);
                let deadline = Instant::now() + Duration::from_secs(seconds * 20 + 120);
                while (latencies.len() as u64) < expected && Instant::now() < deadline {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let seen = Instant::now();
                    let v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap()).unwrap();
                    let k = v["adv_campaign_id"].as_str().unwrap().to_owned();
                    if let Some(at) = sent.lock().unwrap().get(&k) {
                        latencies.push(seen.duration_since(*at).as_secs_f64() * 1000.0);
                    }
                }
                latencies
            })
        };
        let producer = self.producer();
        let every = Duration::from_secs_f64(1.0 / rate as f64);
        let started = Instant::now();
        let planned: Vec<(String, String, String)> = rs
            .iter()
            .map(|r| {
                let k = Uuid::new_v4();
                (r.to_string(), action(*r, k), k.to_string())
            })
            .collect();
        self.rt.block_on(async {
            let mut pending = Vec::new();
            for (i, (key, payload, k)) in planned.iter().enumerate() {
                let due = started + every * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
                sent.lock().unwrap().insert(k.clone(), Instant::now());
                pending.push(
                    producer.send(
                        FutureRecord::to(&t.input)
                            .key(key.as_str())
                            .payload(payload.as_str()),
                        Duration::from_secs(60),
                    ),
                );
                if pending.len() >= 100 {
                    for s in futures::future::join_all(std::mem::take(&mut pending)).await {
                        s.map_err(|(e, _)| e).unwrap();
                    }
                }
            }
            for s in futures::future::join_all(pending).await {
                s.map_err(|(e, _)| e).unwrap();
            }
        });
        let mut lat = reader.join().unwrap();
        lat.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let _ = child.kill();
        let _ = child.wait();
        drop_db(&self.admin_url, &name);
        self.row(
            "latency, action → push visible",
            format!(
                "p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms",
                q(0.5),
                q(0.95),
                q(0.99)
            ),
            &format!(
                "{rate} actions/s × 100 subscribers for {seconds} s; {} of {} messages read back",
                lat.len(),
                n * 100
            ),
        );
    }

    /// One action for a restaurant with `n` subscribers.
    fn hot(&mut self, n: u64) {
        let (name, url) = scratch_db(&self.admin_url, "pf_e2e");
        let r = Uuid::new_v4();
        subscribe(&url, r, n);
        let t = self.topics(PARTITIONS);
        let state = tempfile::tempdir().unwrap();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name);
        self.wait_ready(&metrics, Duration::from_secs(600));
        let producer = self.producer();
        let started = Instant::now();
        self.produce_all(
            &producer,
            &t.input,
            &[(r.to_string(), action(r, Uuid::new_v4()))],
        );
        self.wait_sent(&metrics, n as f64, Duration::from_secs(3600));
        let wall = started.elapsed().as_secs_f64();
        let rss = peak_rss_mib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        drop_db(&self.admin_url, &name);
        self.row(
            "hot restaurant",
            format!("{wall:.1} s, peak RSS {rss:.0} MiB"),
            &format!(
                "1 action × {n} subscribers ({:.0} notifications/s)",
                n as f64 / wall
            ),
        );
    }

    /// Snapshot of `n` rows, then a restart with the mirror present.
    fn mirror(&mut self, n: u64) {
        let (name, url) = scratch_db(&self.admin_url, "pf_e2e");
        postgres::Client::connect(&url, postgres::NoTls)
            .unwrap()
            .execute(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
                 SELECT gen_random_uuid(), ('00000000-0000-0000-0000-' || lpad((g % 100000)::text, 12, '0'))::uuid \
                 FROM generate_series(1, $1::int8) g",
                &[&(n as i64)],
            )
            .unwrap();
        let t = self.topics(1);
        let state = tempfile::tempdir().unwrap();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name);
        let snapshot = self.wait_ready(&metrics, Duration::from_secs(3600));
        let _ = child.kill();
        let _ = child.wait();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name);
        let restart = self.wait_ready(&metrics, Duration::from_secs(600));
        let _ = child.kill();
        let _ = child.wait();
        drop_db(&self.admin_url, &name);
        self.row(
            "mirror snapshot",
            format!("{:.1} s", snapshot.as_secs_f64()),
            &format!("{n} rows, start to ready with an empty store"),
        );
        self.row(
            "restart to ready",
            format!("{:.2} s", restart.as_secs_f64()),
            &format!("{n} rows mirrored"),
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut b = Bench {
        brokers: std::env::var("PF_TEST_BROKERS")
            .expect("PF_TEST_BROKERS: run scripts/bench.sh, which starts a broker"),
        admin_url: std::env::var("PF_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        rt: tokio::runtime::Runtime::new().unwrap(),
        rows: Vec::new(),
    };
    let restaurants = env_or("PF_E2E_RESTAURANTS", 200);
    let subscribers = env_or("PF_E2E_SUBSCRIBERS", 500);
    let total = restaurants * subscribers * 2;
    let mut limit = f64::INFINITY;
    if total > 0 {
        limit = limit.min(b.raw_postgres(total));
        limit = limit.min(b.raw_kafka(total));
        let rate = b.throughput(restaurants, subscribers);
        b.row(
            "end to end ÷ min(raw Postgres, raw Kafka)",
            format!("{:.2}", rate / limit),
            "target ≥ 0.8",
        );
    }
    let latency_rate = env_or("PF_E2E_LATENCY_RATE", 1000);
    if latency_rate > 0 {
        b.latency(latency_rate, env_or("PF_E2E_LATENCY_SECONDS", 5));
    }
    let hot = env_or("PF_E2E_HOT", 1_000_000);
    if hot > 0 {
        b.hot(hot);
    }
    let mirror = env_or("PF_E2E_MIRROR_ROWS", 10_000_000);
    if mirror > 0 {
        b.mirror(mirror);
    }
    let mut table = String::from("| measure | figure | conditions |\n|---|---|---|\n");
    for (what, figure, note) in &b.rows {
        table.push_str(&format!("| {what} | {figure} | {note} |\n"));
    }
    println!("\n{table}");
    write_result("e2e.md", &table);
}
