//! The end-to-end load harness: the machine's limit and promo-fanout, side by
//! side, with peers, in one run on the same Postgres and broker.
//!
//! `bash scripts/bench.sh` (starts the broker, then `cargo bench --bench e2e`),
//! or `cargo bench --bench e2e` with `PF_TEST_BROKERS` pointing at a broker.
//! Sizes come from the environment (defaults in brackets):
//!
//! - `PF_E2E_RESTAURANTS` × `PF_E2E_SUBSCRIBERS` [200 × 500], plus
//!   `PF_E2E_SKEWED` [2] restaurants with ten times as many subscribers, two
//!   actions per restaurant: the throughput run (220,000 notifications);
//! - `PF_E2E_LATENCY_RATES` actions/s × 100 subscribers, each for
//!   `PF_E2E_LATENCY_SECONDS` [1000 and 200/s, 5 s]: latency from action
//!   produced to push message read back, first through a bare relay (the
//!   broker's two hops with the service's client settings: the limit), then
//!   through the service;
//! - `PF_E2E_HOT` subscribers of one restaurant [1,000,000]: wall time and the
//!   service's peak RSS;
//! - `PF_E2E_INSTANCES` [1,2,3]: the throughput run's load through that many
//!   instances in one group;
//! - `PF_E2E_HANDOFF` subscribers of one restaurant [1,000,000]: two
//!   instances; the campaign's holder stopped half-way; time until the other
//!   goes on;
//! - `PF_E2E_MIRROR_ROWS` [10,000,000]: snapshot time, then restart to ready
//!   after a stop (SIGTERM) and after a kill -9.
//!
//! - `PF_E2E_PEERS` [quix,flink]: the peers in `benches/peers/` run on the
//!   throughput run's data (installed by `scripts/peers.sh`);
//!
//! The throughput load runs with `mirror-mode cdc`, then `refresh`
//! (`PF_E2E_REFRESH=0`: not; `PF_E2E_REFRESH_FIRST=1`: `refresh` first).
//! Before them, the raw job with both sinks runs three ways: in one COPY,
//! in transactions of the service's chunk, and so while `pg_recvlogical`
//! follows a slot (`PF_E2E_RAW_FEED=0`: only the first).
//!
//! A stage set to 0 (or empty) is skipped. `PF_E2E_SERVICE_ARGS` adds flags to the
//! service, e.g. `--chunk-size 20000`. Prints one Markdown table and writes it to
//! `target/bench/e2e.md`, with a plot in `target/bench/e2e.svg`.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

mod common;

use common::{
    bench_dir, buckets, drop_db, env_or, feedback_rows, free_addr, get, peers_dir, percentile,
    quantile, scratch_db, write_result, BIN,
};

const PARTITIONS: i32 = 4;
/// How long one step of a multi-instance stage may take.
const STAGE: Duration = Duration::from_secs(600);

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Bench {
    brokers: String,
    admin_url: String,
    rt: tokio::runtime::Runtime,
    rows: Vec<(String, String, String)>,
    /// Throughputs for the plot: (what, per second).
    plotted: Vec<(String, f64)>,
    /// Latency runs for the plot: (through what, actions per second,
    /// sorted latencies in ms).
    latencies: Vec<(&'static str, u64, Vec<f64>)>,
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

/// CPU seconds (user and system) each process has used, by pid: processes
/// named `comm` (every Postgres backend, say), or one pid.
fn cpu_by_pid(comm: Option<&str>, pid: Option<u32>) -> HashMap<u32, f64> {
    // Clock ticks a second, asked of the system once.
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tick = *TICK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let pids: Vec<u32> = match pid {
        Some(p) => vec![p],
        None => std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
    };
    pids.into_iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // `pid (comm) state ppid …`: utime and stime are the 14th and
            // 15th fields, the 12th and 13th after the comm's parenthesis.
            let (head, rest) = stat.rsplit_once(") ")?;
            if comm.is_some_and(|c| head.split_once(" (").map(|h| h.1) != Some(c)) {
                return None;
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((p, ticks / tick))
        })
        .collect()
}

/// The CPU the processes of a throughput run use: the service, every
/// Postgres process (the change feed's walsender also on its own) and the
/// broker.
struct CpuWatch {
    service: u32,
    walsender: Option<u32>,
    start: [HashMap<u32, f64>; 3],
    started: Instant,
}

impl CpuWatch {
    fn start(service: u32, walsender: Option<u32>) -> CpuWatch {
        CpuWatch {
            service,
            walsender,
            start: Self::read(service),
            started: Instant::now(),
        }
    }

    fn read(service: u32) -> [HashMap<u32, f64>; 3] {
        [
            cpu_by_pid(None, Some(service)),
            cpu_by_pid(Some("postgres"), None),
            cpu_by_pid(Some("tansu"), None),
        ]
    }

    /// "service …, Postgres … (walsender …), broker … of … s": CPU seconds
    /// since the start; a process that ended meanwhile is not counted.
    fn stop(self) -> String {
        let end = Self::read(self.service);
        let used = |i: usize, only: Option<u32>| -> f64 {
            end[i]
                .iter()
                .filter(|(p, _)| only.is_none_or(|o| o == **p))
                .map(|(p, t)| t - self.start[i].get(p).copied().unwrap_or(0.0))
                .sum()
        };
        let walsender = match self.walsender {
            Some(w) => format!(" (walsender {:.1} s)", used(1, Some(w))),
            None => String::new(),
        };
        format!(
            "service {:.1} s, Postgres {:.1} s{walsender}, broker {:.1} s, in {:.1} s on 2 cores",
            used(0, None),
            used(1, None),
            used(2, None),
            self.started.elapsed().as_secs_f64()
        )
    }
}

/// Postgres's own logical-replication client, `pg_recvlogical`, following a
/// new slot of a database on the service's default publication,
/// protocol version 1 as the service's feed: what any client of the
/// replication protocol costs Postgres.
struct SlotFollower {
    child: Child,
    walsender: u32,
    cpu_at_start: f64,
}

impl SlotFollower {
    fn start(url: &str) -> SlotFollower {
        let mut pg = postgres::Client::connect(url, postgres::NoTls).unwrap();
        pg.execute(
            "SELECT pg_create_logical_replication_slot('pf_e2e_raw', 'pgoutput')",
            &[],
        )
        .unwrap();
        let child = Command::new("pg_recvlogical")
            .args(["-d", &plaintext(url), "-S", "pf_e2e_raw", "--start"])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!(
                "publication_names={}",
                promo_fanout::config::Settings::default().cdc_publication
            ))
            .args(["-f", "/dev/null"])
            .stderr(Stdio::null())
            .spawn()
            .expect("pg_recvlogical (Debian's postgresql-client) on PATH");
        let walsender = wait_until(
            "pg_recvlogical's walsender",
            Duration::from_secs(30),
            || walsender(url),
        );
        SlotFollower {
            child,
            walsender,
            cpu_at_start: cpu_by_pid(None, Some(walsender))[&walsender],
        }
    }

    /// Waits until the walsender has decoded all the WAL written so far,
    /// stops the client and drops the slot: the walsender's CPU seconds.
    fn stop(mut self, url: &str) -> f64 {
        let mut pg = postgres::Client::connect(url, postgres::NoTls).unwrap();
        let end: String = pg
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        wait_until(
            "the walsender to decode the rows",
            Duration::from_secs(300),
            || {
                pg.query_one(
                    "SELECT sent_lsn >= $1::text::pg_lsn FROM pg_stat_replication WHERE pid = $2",
                    &[&end, &(self.walsender as i32)],
                )
                .unwrap()
                .get::<_, bool>(0)
                .then_some(())
            },
        );
        let cpu = cpu_by_pid(None, Some(self.walsender))[&self.walsender] - self.cpu_at_start;
        let _ = self.child.kill();
        let _ = self.child.wait();
        wait_until("the slot to be released", Duration::from_secs(30), || {
            pg.execute(
                "SELECT pg_drop_replication_slot('pf_e2e_raw') FROM pg_replication_slots \
                 WHERE slot_name = 'pf_e2e_raw' AND NOT active",
                &[],
            )
            .ok()
            .filter(|&n| n == 1)
        });
        cpu
    }
}

/// Subscriptions a second written during a throughput run
/// (`PF_E2E_WRITER_RATE`, 0 for none).
fn writer_rate() -> u64 {
    env_or("PF_E2E_WRITER_RATE", 200)
}

/// Subscribes new clients to one restaurant at a steady rate, each in its
/// own transaction, until stopped; notes when each committed.
struct LateWriter {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(Uuid, Instant)>>,
}

impl LateWriter {
    fn start(url: &str, restaurant: Uuid, rate: u64) -> LateWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, url) = (stop.clone(), url.to_owned());
        let handle = std::thread::spawn(move || {
            if rate == 0 {
                return Vec::new();
            }
            let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let insert = pg
                .prepare("INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)")
                .unwrap();
            let every = Duration::from_secs_f64(1.0 / rate as f64);
            let started = Instant::now();
            let mut written = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let due = started + every * written.len() as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let c = Uuid::new_v4();
                pg.execute(&insert, &[&c, &restaurant]).unwrap();
                written.push((c, Instant::now()));
            }
            written
        });
        LateWriter { stop, handle }
    }

    fn stop(self) -> Vec<(Uuid, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// A producer with the service's default settings (idempotent, `acks=all`,
/// 5 ms linger, lz4).
fn producer(brokers: &str) -> FutureProducer {
    use promo_fanout::sinks::{PRODUCER_DEFAULTS, PRODUCER_GUARANTEE};
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in PRODUCER_GUARANTEE.iter().chain(PRODUCER_DEFAULTS) {
        config.set(*k, *v);
    }
    config.create().unwrap()
}

/// The harness's readers' `fetch.wait.max.ms`: short, since they timestamp
/// what they read.
const READER_FETCH_WAIT_MS: &str = "5";

/// Subscribers per restaurant of the latency runs.
const STEADY_FAN_OUT: u64 = 100;

/// A consumer of every partition of `topic` from its beginning, with
/// `fetch_wait_ms` as its `fetch.wait.max.ms`.
fn reader_from_start(brokers: &str, topic: &str, fetch_wait_ms: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("e2e_reader_{}", Uuid::new_v4().simple()),
        )
        .set("fetch.wait.max.ms", fetch_wait_ms)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

/// The restaurants of a latency run: one action each, `rate` per second for
/// a second of warm-up and `seconds` more.
fn steady_restaurants(rate: u64, seconds: u64) -> Vec<Uuid> {
    (0..rate * (seconds + 1)).map(|_| Uuid::new_v4()).collect()
}

/// The raw job behind the latency figure, with nothing of the service: it
/// reads the input with the service's default `fetch.wait.max.ms`, produces
/// [`STEADY_FAN_OUT`] push messages per action with the service's producer
/// settings (idempotent, `acks=all`, 5 ms linger, lz4) in batches of the
/// service's default `batch-size`, commits the input offsets after each
/// batch, and keeps as many batches awaiting their acknowledgements as the
/// service's default `pipeline-depth`. No mirror, no sent set, no Postgres,
/// no store. (`PF_E2E_SERVICE_ARGS` does not reach it.)
struct Relay {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Relay {
    fn start(brokers: &str, t: &Topics) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let consumer =
            reader_from_start(brokers, &t.input, promo_fanout::source::FETCH_WAIT_MAX_MS);
        let producer = producer(brokers);
        let output = t.output.clone();
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let defaults = promo_fanout::config::Settings::default();
                let mut in_flight = std::collections::VecDeque::new();
                while !stop.load(Ordering::Relaxed) {
                    let actions = next_batch(&consumer, defaults.batch_size);
                    if actions.is_empty() {
                        continue;
                    }
                    let sends: Vec<_> = actions
                        .iter()
                        .flat_map(|a| pushes(a.payload().unwrap()))
                        .map(|(key, value)| send_waiting(&producer, &output, &key, &value))
                        .collect();
                    let _ = consumer.commit_consumer_state(CommitMode::Async);
                    in_flight.push_back(sends);
                    while in_flight.len() >= defaults.pipeline_depth {
                        let oldest = in_flight.pop_front().unwrap();
                        for s in rt.block_on(futures::future::join_all(oldest)) {
                            s.unwrap().map_err(|(e, _)| e).unwrap();
                        }
                    }
                }
            })
        };
        Relay { stop, handle }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap();
    }
}

/// Reads `expected` push messages (or until `limit`) on a thread, each
/// counted in `read_back` once its campaign is in `sent`: the latencies
/// (ms, sorted) of those of counted campaigns.
fn read_latencies(
    consumer: BaseConsumer,
    expected: u64,
    limit: Duration,
    sent: Arc<Mutex<HashMap<String, (Instant, bool)>>>,
    read_back: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Vec<f64>> {
    std::thread::spawn(move || {
        let mut latencies = Vec::with_capacity(expected as usize);
        let mut read = 0u64;
        let deadline = Instant::now() + limit;
        while read < expected && Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let seen = Instant::now();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let k = v["adv_campaign_id"].as_str().unwrap().to_owned();
            if let Some((at, counted)) = sent.lock().unwrap().get(&k) {
                read += 1;
                read_back.store(read, Ordering::Relaxed);
                if *counted {
                    latencies.push(seen.duration_since(*at).as_secs_f64() * 1000.0);
                }
            }
        }
        latencies.sort_by(|a, b| a.total_cmp(b));
        latencies
    })
}

/// Up to `max` messages: the first within 100 ms, then what is already
/// fetched. A read error is left for the next poll, as the service does.
fn next_batch(consumer: &BaseConsumer, max: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let mut out = Vec::new();
    let mut wait = Duration::from_millis(100);
    while out.len() < max {
        match consumer.poll(wait) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(_)) | None => break,
        }
        wait = Duration::ZERO;
    }
    out
}

/// Enqueues one record, waiting while the producer's queue is full.
fn send_waiting(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    value: &[u8],
) -> rdkafka::producer::DeliveryFuture {
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(value)) {
            Ok(delivery) => return delivery,
            Err((
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                _,
            )) => std::thread::sleep(Duration::from_millis(1)),
            Err((e, _)) => panic!("relaying a push message: {e}"),
        }
    }
}

/// The push messages of one action for [`STEADY_FAN_OUT`] made-up clients,
/// shaped as the service's: the action's fields, the client and when the
/// push was made. (key, value).
fn pushes(action: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut message: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(action).unwrap();
    message.insert("trigger_datetime_created".into(), now().into());
    (0..STEADY_FAN_OUT)
        .map(|_| {
            let client = Uuid::new_v4().to_string();
            message.insert("client_id".into(), client.clone().into());
            (client, serde_json::to_vec(&message).unwrap())
        })
        .collect()
}

/// Reads a push topic from the start and notes when each message for one
/// restaurant was seen, by client.
struct PushWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<Uuid, Instant>>>,
    handle: std::thread::JoinHandle<()>,
}

impl PushWatch {
    fn start(brokers: &str, topic: &str, restaurant: Uuid) -> PushWatch {
        let consumer = reader_from_start(brokers, topic, READER_FETCH_WAIT_MS);
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
        let (flag, into) = (stop.clone(), seen.clone());
        let wanted = restaurant.to_string();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let at = Instant::now();
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                if v["restaurant_id"].as_str() == Some(wanted.as_str()) {
                    let c = v["client_id"].as_str().unwrap().parse().unwrap();
                    into.lock().unwrap().entry(c).or_insert(at);
                }
            }
        });
        PushWatch { stop, seen, handle }
    }

    /// Messages seen for the restaurant so far.
    fn seen(&self) -> f64 {
        self.seen.lock().unwrap().len() as f64
    }

    fn arrivals(&self) -> HashMap<Uuid, Instant> {
        self.seen.lock().unwrap().clone()
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap();
    }
}

struct Topics {
    input: String,
    output: String,
    dlq: String,
}

/// The throughput run's data, the same for the service and the peers:
/// `restaurants` × `subscribers`, plus `skewed` restaurants with ten times as
/// many; two campaigns each.
struct Load {
    restaurants: u64,
    subscribers: u64,
    skewed: u64,
}

impl Load {
    fn sizes(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.restaurants)
            .map(|_| self.subscribers)
            .chain((0..self.skewed).map(|_| self.subscribers * 10))
    }

    fn notifications(&self) -> u64 {
        2 * self.sizes().sum::<u64>()
    }

    fn describe(&self) -> String {
        format!(
            "{} restaurants × {} subscribers and {} × {}, 2 actions each → {} notifications",
            self.restaurants,
            self.subscribers,
            self.skewed,
            self.subscribers * 10,
            self.notifications()
        )
    }

    /// Subscribes fresh clients to fresh restaurants in the database at
    /// `url`; returns the actions (key, value) to produce.
    fn subscribe(&self, url: &str) -> Vec<(String, String)> {
        let mut actions = Vec::new();
        for n in self.sizes() {
            let r = Uuid::new_v4();
            subscribe(url, r, n);
            for _ in 0..2 {
                actions.push((r.to_string(), action(r, Uuid::new_v4())));
            }
        }
        actions
    }
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
        // Retention stated explicitly: Quix Streams derives its changelog
        // topic's from the input's, and tansu reports only what was set.
        let new = [
            NewTopic::new(&t.input, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.output, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.dlq, 1, TopicReplication::Fixed(1)),
        ]
        .map(|topic| topic.set("retention.ms", "-1"));
        // tansu has timed out creating topics now and then: the request is
        // made again, and a topic an earlier attempt created counts as made.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failed: Vec<String> = match self
                .rt
                .block_on(admin.create_topics(&new, &AdminOptions::new()))
            {
                Ok(results) => results
                    .into_iter()
                    .filter_map(|r| match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                        Err((topic, code)) => Some(format!("{topic}: {code}")),
                    })
                    .collect(),
                Err(e) => vec![e.to_string()],
            };
            if failed.is_empty() {
                return t;
            }
            assert!(attempts < 3, "creating the topics failed: {failed:?}");
            eprintln!("creating the topics failed ({failed:?}); trying again");
        }
    }

    fn producer(&self) -> FutureProducer {
        producer(&self.brokers)
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
        flags: &[&str],
    ) -> (Child, String) {
        let metrics = free_addr();
        let child = Command::new(BIN)
            .arg("run")
            .args(flags)
            .args([
                "--brokers",
                &self.brokers,
                "--postgres-url",
                &plaintext(url),
            ])
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
        wait_until("the service to get ready", limit, || {
            (get(metrics, "/readyz").map(|r| r.0) == Some(200)).then_some(())
        });
        started.elapsed()
    }

    fn wait_sent(&self, metrics: &str, n: f64, limit: Duration) {
        wait_until("every notification to commit", limit, || {
            (metric(metrics, "promo_fanout_notifications_sent_total") >= n).then_some(())
        });
    }

    fn row(&mut self, what: &str, figure: String, note: &str) {
        println!("{what}: {figure} {note}");
        self.rows.push((what.into(), figure, note.into()));
    }

    /// Raw Postgres ingest of feedback-shaped rows into the indexed table:
    /// COPY, and multi-row INSERT … ON CONFLICT DO NOTHING in batches of 5,000:
    /// (COPY, INSERT) rows/s.
    fn raw_postgres(&mut self, n: u64) -> (f64, f64) {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let url = scratch.url.clone();
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
        let text = n as f64 / started.elapsed().as_secs_f64();
        let binary = raw_binary_copy(&mut pg, r, n);
        // The limit is the faster of the two formats.
        let copy = text.max(binary);

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
        drop_db(&scratch);
        self.row(
            "raw Postgres COPY, text",
            format!("{text:.0} rows/s"),
            &format!("{n} rows, one statement"),
        );
        self.row(
            "raw Postgres COPY, binary",
            format!("{binary:.0} rows/s"),
            &format!("{n} rows, one statement"),
        );
        self.row(
            "raw Postgres COPY",
            format!("{copy:.0} rows/s"),
            "the faster format: the limit",
        );
        self.row(
            "raw Postgres INSERT … ON CONFLICT",
            format!("{insert:.0} rows/s"),
            &format!("{n} rows, batches of 5,000"),
        );
        self.plotted.push(("raw COPY".into(), copy));
        self.plotted.push(("raw INSERT".into(), insert));
        (copy, insert)
    }

    /// Raw idempotent produce (acks=all) of push-shaped messages.
    fn raw_kafka(&mut self, n: u64) -> f64 {
        let t = self.topics(PARTITIONS);
        let producer = self.producer();
        let values = push_values(n);
        let started = Instant::now();
        self.produce_all(&producer, &t.output, &values);
        let rate = n as f64 / started.elapsed().as_secs_f64();
        self.row(
            "raw Kafka idempotent produce",
            format!("{rate:.0} msgs/s"),
            &format!("{n} messages, {PARTITIONS} partitions, acks=all"),
        );
        self.plotted.push(("raw produce".into(), rate));
        rate
    }

    /// The raw job with both sinks at once, as the service does it: `n`
    /// feedback rows by binary COPY on one connection, in transactions of
    /// `chunk` rows, while `n` push messages are produced: rows/s until both
    /// are done. With `follow`, Postgres's own client `pg_recvlogical`
    /// follows a slot of the database on the service's publication
    /// meanwhile, so that Postgres decodes the rows as it does for `cdc`.
    fn raw_both(&mut self, n: u64, chunk: u64, follow: bool) -> f64 {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let mut pg = postgres::Client::connect(&scratch.url, postgres::NoTls).unwrap();
        let feed = follow.then(|| SlotFollower::start(&scratch.url));
        let t = self.topics(PARTITIONS);
        let producer = self.producer();
        let values = push_values(n);
        let started = Instant::now();
        let copy = std::thread::spawn(move || {
            let r = Uuid::new_v4();
            let mut left = n;
            while left > 0 {
                let m = left.min(chunk);
                raw_binary_copy(&mut pg, r, m);
                left -= m;
            }
        });
        self.produce_all(&producer, &t.output, &values);
        copy.join().unwrap();
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let walsender = feed.map(|f| f.stop(&scratch.url));
        drop_db(&scratch);
        let (what, note) = match (chunk >= n, walsender) {
            (true, _) => (
                "raw COPY and produce at once".to_owned(),
                format!("{n} rows by binary COPY while {n} messages are produced"),
            ),
            (false, None) => (
                format!("raw COPY and produce at once, {chunk}-row transactions"),
                format!("{n} rows by binary COPY while {n} messages are produced, no slot"),
            ),
            (false, Some(cpu)) => (
                format!("raw COPY and produce at once, {chunk}-row transactions, slot followed"),
                format!(
                    "the same while pg_recvlogical follows a slot of the database \
                     (its walsender: {cpu:.1} s of CPU to decode the rows)"
                ),
            ),
        };
        self.row(&what, format!("{rate:.0} rows/s"), &note);
        if chunk >= n {
            self.plotted.push(("raw both".into(), rate));
        }
        rate
    }

    /// The throughput stages: the raw limits, the service end to end in both
    /// mirror modes with their ratios, and the peers. Returns the service's
    /// rate with `cdc`.
    fn throughput_stages(&mut self, load: &Load) -> f64 {
        let total = load.notifications();
        let (copy, insert) = self.raw_postgres(total);
        let limit = copy.max(insert).min(self.raw_kafka(total));
        let both = self.raw_both(total, total, false);
        let fed = self.raw_with_feed(total);
        let refresh_on = std::env::var("PF_E2E_REFRESH").map_or(true, |v| v != "0");
        let refresh_first =
            refresh_on && std::env::var("PF_E2E_REFRESH_FIRST").is_ok_and(|v| v == "1");
        let mut refresh = refresh_first.then(|| self.throughput(load, "refresh"));
        let rate = self.throughput(load, "cdc");
        self.row(
            "end to end ÷ min(raw Postgres, raw Kafka)",
            format!("{:.2}", rate / limit),
            "target ≥ 0.8",
        );
        self.row(
            "end to end (cdc) ÷ raw Postgres COPY",
            format!("{:.2}", rate / copy),
            "target ≥ 0.8",
        );
        self.row(
            "end to end (cdc) ÷ raw COPY and produce at once",
            format!("{:.2}", rate / both),
            "both sinks, as the service writes them",
        );
        if refresh_on {
            let refresh = *refresh.get_or_insert_with(|| self.throughput(load, "refresh"));
            self.row(
                "end to end, cdc ÷ refresh",
                format!("{:.2}", rate / refresh),
                "same load and writer; target ≥ 1",
            );
        }
        if let Some((chunked, followed)) = fed {
            self.row(
                "raw job, slot followed ÷ no slot",
                format!("{:.2}", followed / chunked),
                "the faster of two runs each: what Postgres's decoding of the rows costs \
                 the raw job on these cores, the floor for cdc ÷ refresh",
            );
        }
        self.peers(load, rate);
        rate
    }

    /// The raw job with both sinks in the service's transactions, without a
    /// slot and with one followed by `pg_recvlogical`: the faster of two
    /// runs each. None with `PF_E2E_RAW_FEED=0` or without `pg_recvlogical`.
    fn raw_with_feed(&mut self, total: u64) -> Option<(f64, f64)> {
        if std::env::var("PF_E2E_RAW_FEED").is_ok_and(|v| v == "0") {
            return None;
        }
        let found = Command::new("pg_recvlogical").arg("--version").output();
        if found.is_err() {
            println!("pg_recvlogical is not on PATH (Debian's postgresql-client): no raw job with a slot followed");
            return None;
        }
        // What the service writes per transaction by default.
        let chunk = promo_fanout::config::Settings::default().chunk_size as u64;
        // Alternated, twice each, the faster kept: the first runs of a stage
        // on a fresh topic and database are the slowest.
        let mut best = [0f64; 2];
        for _ in 0..2 {
            for (i, follow) in [false, true].into_iter().enumerate() {
                best[i] = best[i].max(self.raw_both(total, chunk, follow));
            }
        }
        Some((best[0], best[1]))
    }

    /// The peers named in `PF_E2E_PEERS` on the same load, each against the
    /// service's `rate`.
    fn peers(&mut self, load: &Load, rate: f64) {
        let peers = std::env::var("PF_E2E_PEERS").unwrap_or_else(|_| "quix,flink".into());
        for (name, slug, target) in [
            ("Quix Streams", "quix", 6.0),
            ("PyFlink (Flink SQL)", "flink", 4.5),
        ] {
            if !peers.split(',').any(|p| p.trim() == slug) {
                continue;
            }
            if let Some(peer) = self.peer(name, slug, load) {
                self.row(
                    &format!("promo-fanout ÷ {name}"),
                    format!("{:.1}×", rate / peer),
                    &format!("target ≥ {target}×"),
                );
            }
        }
    }

    /// The service end to end in `mode` (`cdc` or `refresh`): notifications/s
    /// committed on both sinks, while a writer adds [`writer_rate`]
    /// subscribers a second to a restaurant whose campaign has been fanned
    /// out. In `cdc` mode, also the mirror's freshness and the late
    /// subscribers' notification latency under that load.
    fn throughput(&mut self, load: &Load, mode: &str) -> f64 {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let (name, url) = (scratch.name.clone(), scratch.url.clone());
        let actions = load.subscribe(&url);
        let late_r = Uuid::new_v4();
        subscribe(&url, late_r, 1);
        let t = self.topics(PARTITIONS);
        let state = tempfile::tempdir().unwrap();
        let flags = ["--mirror-mode", mode];
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name, &flags);
        self.wait_ready(&metrics, Duration::from_secs(120));
        let watch = PushWatch::start(&self.brokers, &t.output, late_r);
        let producer = self.producer();
        self.produce_all(
            &producer,
            &t.input,
            &[(late_r.to_string(), action(late_r, Uuid::new_v4()))],
        );
        self.wait_sent(&metrics, 1.0, Duration::from_secs(60));

        let writer = LateWriter::start(&url, late_r, writer_rate());
        let expected = load.notifications() as f64;
        let cpu = CpuWatch::start(child.id(), walsender(&url));
        let started = Instant::now();
        self.produce_all(&producer, &t.input, &actions);
        let deadline = started + Duration::from_secs(1800);
        while metric(&metrics, "promo_fanout_notifications_sent_total") - watch.seen() < expected {
            assert!(
                Instant::now() < deadline,
                "the notifications did not all commit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rate = expected / started.elapsed().as_secs_f64();
        let cpu = cpu.stop();
        let written = writer.stop();
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let rows: i64 = pg
            .query_one(
                "SELECT count(*) FROM subscribers_feedback WHERE restaurant_id <> $1",
                &[&late_r],
            )
            .unwrap()
            .get(0);
        assert_eq!(rows as f64, expected, "every notification is in Postgres");
        let conditions = format!(
            "{}, both sinks committed, `mirror-mode {mode}`, {} subscriptions/s written meanwhile",
            load.describe(),
            writer_rate()
        );
        self.row(
            &format!("promo-fanout end to end, {mode}"),
            format!("{rate:.0} notifications/s"),
            &conditions,
        );
        self.plotted.push((mode.to_owned(), rate));
        self.row(
            &format!("CPU used during the run, {mode}"),
            cpu,
            "user + system seconds, from /proc",
        );
        if mode == "cdc" {
            self.under_load(&metrics, &watch, &written);
        }
        watch.stop();
        let _ = child.kill();
        let _ = child.wait();
        drop(pg);
        drop_db(&scratch);
        rate
    }

    /// The mirror's freshness during a throughput run, and how long the late
    /// subscribers written meanwhile waited for their notification.
    fn under_load(&mut self, metrics: &str, watch: &PushWatch, written: &[(Uuid, Instant)]) {
        let (_, body) = get(metrics, "/metrics").unwrap_or_default();
        let b = buckets(&body, "promo_fanout_mirror_freshness_seconds");
        let applied = b.last().map_or(0.0, |l| l.1);
        self.row(
            "mirror freshness under load",
            format!(
                "p50 ≤ {:.0} ms, p99 ≤ {:.0} ms",
                quantile(&b, 0.5) * 1000.0,
                quantile(&b, 0.99) * 1000.0
            ),
            &format!("commit → durable in the mirror, {applied:.0} transactions during the throughput run (histogram bucket bounds); target p99 ≤ 200 ms"),
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while (watch.seen() as usize) < written.len() + 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let seen = watch.arrivals();
        let mut lat: Vec<f64> = written
            .iter()
            .filter_map(|(c, at)| Some(seen.get(c)?.duration_since(*at).as_secs_f64() * 1000.0))
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        self.row(
            "late subscriber notified, under load",
            format!("p50 {:.0} ms, p99 {:.0} ms", percentile(&lat, 0.5), percentile(&lat, 0.99)),
            &format!(
                "subscription committed → push visible, {} of {} late subscribers written during the throughput run",
                lat.len(),
                written.len()
            ),
        );
    }

    /// A peer (benches/peers/<script>) on the same data as [`Bench::throughput`]:
    /// started on a topic holding one warm-up action, timed from when that
    /// action's row is in Postgres (the peer is up) until every notification's
    /// row is. Returns notifications/s, or `None` when the peer is not
    /// installed or fails (a row says why).
    fn peer(&mut self, name: &str, slug: &str, load: &Load) -> Option<f64> {
        let venv = peers_dir().join(slug);
        let python = venv.join("bin/python3");
        if !python.exists() {
            self.row(
                name,
                "not run".into(),
                &format!("{} missing: run scripts/peers.sh", python.display()),
            );
            return None;
        }
        let scratch = scratch_db(&self.admin_url, "pf_peer");
        let (db, url) = (scratch.name.clone(), scratch.url.clone());
        let actions = load.subscribe(&url);
        let warm = Uuid::new_v4();
        subscribe(&url, warm, 1);
        // Flink's JDBC lookup reads ids as text (benches/peers/flink_peer.py).
        postgres::Client::connect(&url, postgres::NoTls)
            .unwrap()
            .batch_execute(
                "CREATE VIEW subscribers_restaurants_text AS \
                   SELECT restaurant_id::text AS restaurant_id, client_id::text AS client_id \
                   FROM subscribers_restaurants; \
                 CREATE INDEX subscribers_restaurants_text_idx \
                   ON subscribers_restaurants ((restaurant_id::text)); \
                 ANALYZE subscribers_restaurants",
            )
            .unwrap();
        let t = self.topics(PARTITIONS);
        let producer = self.producer();
        self.produce_all(
            &producer,
            &t.input,
            &[(warm.to_string(), action(warm, Uuid::new_v4()))],
        );
        let state = tempfile::tempdir().unwrap();
        let log = bench_dir().join(format!("peer-{slug}.log"));
        let mut child = self.spawn_peer(slug, &t, (&db, &url), state.path(), &log);
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let expected = load.notifications() as i64 + 1;
        // The warm-up action's row first: the start-up is not counted.
        let first = wait_rows(&mut child, &mut pg, 1, Duration::from_secs(300));
        let result = first.and_then(|startup| {
            let started = Instant::now();
            self.produce_all(&producer, &t.input, &actions);
            wait_rows(&mut child, &mut pg, expected, Duration::from_secs(1800))?;
            let rate = (expected - 1) as f64 / started.elapsed().as_secs_f64();
            Ok((rate, startup))
        });
        let _ = child.kill();
        let _ = child.wait();
        drop(pg);
        drop_db(&scratch);
        match result {
            Ok((rate, startup)) => {
                self.row(
                    name,
                    format!("{rate:.0} notifications/s"),
                    &format!(
                        "same data and sinks; {:.1} s from launch to its first row, not counted",
                        startup.as_secs_f64()
                    ),
                );
                self.plotted.push((slug.to_owned(), rate));
                Some(rate)
            }
            Err(why) => {
                self.row(
                    name,
                    "failed".into(),
                    &format!("{why}; see {}", log.display()),
                );
                None
            }
        }
    }

    /// Starts the peer `slug` (`benches/peers/{slug}_peer.py` in its venv)
    /// on the topics `t` and the database (`db`, `url`), logging to `log`.
    fn spawn_peer(
        &self,
        slug: &str,
        t: &Topics,
        (db, url): (&str, &str),
        state: &std::path::Path,
        log: &std::path::Path,
    ) -> std::process::Child {
        let venv = peers_dir().join(slug);
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/peers")
            .join(format!("{slug}_peer.py"));
        Command::new(venv.join("bin/python3"))
            .arg(&script)
            .args([&self.brokers, &t.input, &t.output, db, url])
            .arg(state)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    venv.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(log).unwrap(),
            ))
            .spawn()
            .unwrap()
    }

    /// Steady load through the service: action produced → push message read
    /// back, each action to a restaurant with 100 subscribers.
    fn latency(&mut self, rate: u64, seconds: u64) {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let (name, url) = (scratch.name.clone(), scratch.url.clone());
        let rs = steady_restaurants(rate, seconds);
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        pg.execute(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
             SELECT gen_random_uuid(), r FROM unnest($1::uuid[]) r, generate_series(1, $2::int)",
            &[&rs, &(STEADY_FAN_OUT as i32)],
        )
        .unwrap();
        let t = self.topics(PARTITIONS);
        let state = tempfile::tempdir().unwrap();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name, &[]);
        self.wait_ready(&metrics, Duration::from_secs(300));
        let lat = self.steady_load(&t, &rs, rate, seconds);
        // A push is visible before its batch is recorded: the figures below
        // wait for the last batches.
        let all = (rs.len() as u64 * STEADY_FAN_OUT) as f64;
        self.wait_sent(&metrics, all, Duration::from_secs(120));
        // How the actions were batched, and how long a batch was in flight
        // (planned → both sinks → recorded), warm-up included.
        let batches = metric(&metrics, "promo_fanout_batches_committed_total");
        let in_flight = metric(&metrics, "promo_fanout_commit_seconds_sum")
            / metric(&metrics, "promo_fanout_commit_seconds_count");
        let _ = child.kill();
        let _ = child.wait();
        drop_db(&scratch);
        let batching = format!(
            "; {batches} batches of {:.1} actions, each {:.1} ms in flight on average",
            rs.len() as f64 / batches,
            in_flight * 1000.0
        );
        self.latency_row(
            ("latency, action → push visible", "promo-fanout"),
            rate,
            seconds,
            lat,
            &batching,
        );
    }

    /// The same load through a bare relay ([`Relay`]): the two hops through
    /// the broker with the service's client settings and nothing else, the
    /// limit for the latency figure.
    fn relay_latency(&mut self, rate: u64, seconds: u64) {
        let rs = steady_restaurants(rate, seconds);
        let t = self.topics(PARTITIONS);
        let relay = Relay::start(&self.brokers, &t);
        let lat = self.steady_load(&t, &rs, rate, seconds);
        relay.stop();
        let what = (
            "latency limit: a bare relay through the broker",
            RELAY_PLOTTED,
        );
        self.latency_row(what, rate, seconds, lat, "");
    }

    /// A latency row; `what` is the row's name and the plot's.
    fn latency_row(
        &mut self,
        what: (&str, &'static str),
        rate: u64,
        seconds: u64,
        lat: Vec<f64>,
        note: &str,
    ) {
        let (what, plotted) = what;
        let q = |p: f64| percentile(&lat, p);
        self.row(
            what,
            format!(
                "p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms",
                q(0.5),
                q(0.95),
                q(0.99)
            ),
            &format!(
                "{rate} actions/s × {STEADY_FAN_OUT} subscribers for {seconds} s after 1 s of warm-up; {} of {} messages read back{note}",
                lat.len(),
                rate * seconds * STEADY_FAN_OUT
            ),
        );
        self.latencies.push((plotted, rate, lat));
    }

    /// Produces one action to each of `restaurants` at `rate` per second,
    /// each when due, and reads the push topic back. Returns the latencies
    /// (ms, sorted) of the pushes of every action but the first second's,
    /// which are read back before the counted actions start: the first
    /// fetches of a fresh consumer and topic are slow on the local broker,
    /// and what queued meanwhile drains only after.
    fn steady_load(&self, t: &Topics, restaurants: &[Uuid], rate: u64, seconds: u64) -> Vec<f64> {
        let warm_up = rate as usize;
        // Campaign → (when produced, counted).
        let sent: Arc<Mutex<HashMap<String, (Instant, bool)>>> = Arc::default();
        let read_back = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = read_latencies(
            reader_from_start(&self.brokers, &t.output, READER_FETCH_WAIT_MS),
            restaurants.len() as u64 * STEADY_FAN_OUT,
            Duration::from_secs(seconds * 20 + 120),
            sent.clone(),
            read_back.clone(),
        );
        let producer = self.producer();
        let every = Duration::from_secs_f64(1.0 / rate as f64);
        let mut started = Instant::now();
        let planned: Vec<(String, String, String)> = restaurants
            .iter()
            .map(|r| {
                let k = Uuid::new_v4();
                (r.to_string(), action(*r, k), k.to_string())
            })
            .collect();
        self.rt.block_on(async {
            let mut pending: Vec<rdkafka::producer::DeliveryFuture> = Vec::new();
            for (i, (key, payload, k)) in planned.iter().enumerate() {
                if i == warm_up {
                    // The counted actions start once the warm-up's pushes
                    // are all read back: the service is past its start (the
                    // group join, the first fetches, the first statements on
                    // each connection) and in its steady state.
                    for s in futures::future::join_all(std::mem::take(&mut pending)).await {
                        s.unwrap().map_err(|(e, _)| e).unwrap();
                    }
                    let all = warm_up as u64 * STEADY_FAN_OUT;
                    wait_until("the warm-up read back", Duration::from_secs(120), || {
                        (read_back.load(Ordering::Relaxed) >= all).then_some(())
                    });
                    started = Instant::now() - every * i as u32;
                }
                let due = started + every * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
                sent.lock()
                    .unwrap()
                    .insert(k.clone(), (Instant::now(), i >= warm_up));
                // Enqueued now (`send` would enqueue only when awaited, which
                // would hold each message until the next batch of awaits).
                pending.push(
                    producer
                        .send_result(
                            FutureRecord::to(&t.input)
                                .key(key.as_str())
                                .payload(payload.as_str()),
                        )
                        .map_err(|(e, _)| e)
                        .unwrap(),
                );
                if pending.len() >= 100 {
                    for s in futures::future::join_all(std::mem::take(&mut pending)).await {
                        s.unwrap().map_err(|(e, _)| e).unwrap();
                    }
                }
            }
            for s in futures::future::join_all(pending).await {
                s.unwrap().map_err(|(e, _)| e).unwrap();
            }
        });
        reader.join().unwrap()
    }

    /// One action for a restaurant with `n` subscribers.
    /// `rate`: the end-to-end rate of this run, for the target.
    fn hot(&mut self, n: u64, rate: Option<f64>) {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let (name, url) = (scratch.name.clone(), scratch.url.clone());
        let r = Uuid::new_v4();
        subscribe(&url, r, n);
        let t = self.topics(PARTITIONS);
        let state = tempfile::tempdir().unwrap();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name, &[]);
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
        drop_db(&scratch);
        self.row(
            "hot restaurant",
            format!("{wall:.1} s, peak RSS {rss:.0} MiB"),
            &format!(
                "1 action × {n} subscribers ({:.0} notifications/s); target ≤ {} and ≤ 256 MB",
                n as f64 / wall,
                rate.map_or("1.25 × n ÷ end-to-end rate".into(), |r| format!(
                    "{:.1} s",
                    1.25 * n as f64 / r
                ))
            ),
        );
    }

    /// The throughput load through `n` instances in one group (each with
    /// its own store and slot), from the actions produced to every
    /// notification committed by one of them.
    fn instances(&mut self, load: &Load, n: usize) -> f64 {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let (name, url) = (scratch.name.clone(), scratch.url.clone());
        let actions = load.subscribe(&url);
        let t = self.topics(PARTITIONS);
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut instances = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let id = format!("i{i}");
            let flags = ["--instance-id", &id];
            let (child, metrics) = self.service(&url, &t, dir.path(), &name, &flags);
            self.wait_ready(&metrics, Duration::from_secs(600));
            instances.push((child, metrics));
        }
        let held = |m: &String| metric(m, "promo_fanout_partitions_held");
        wait_until("the partitions to be split", STAGE, || {
            let counts: Vec<f64> = instances.iter().map(|(_, m)| held(m)).collect();
            let spread = counts.iter().all(|&c| c >= 1.0);
            (spread && counts.iter().sum::<f64>() == PARTITIONS as f64).then_some(())
        });
        let expected = load.notifications() as f64;
        let sent = || -> f64 {
            instances
                .iter()
                .map(|(_, m)| metric(m, "promo_fanout_notifications_sent_total"))
                .sum()
        };
        // A cooperative rebalance takes more than one round: the load starts
        // once no instance has rebalanced for 3 s (its last round done).
        let rebalances = |m: &String| metric(m, "promo_fanout_rebalances_total");
        let counts = || -> Vec<f64> { instances.iter().map(|(_, m)| rebalances(m)).collect() };
        let mut last = (counts(), Instant::now());
        wait_until("the group to settle", STAGE, || {
            let now = counts();
            if now != last.0 {
                last = (now, Instant::now());
            }
            (last.1.elapsed() >= Duration::from_secs(3)).then_some(())
        });
        let joined = counts();
        let started = Instant::now();
        self.produce_all(&self.producer(), &t.input, &actions);
        wait_until("every notification", STAGE, || {
            (sent() >= expected).then_some(())
        });
        let rate = expected / started.elapsed().as_secs_f64();
        // What each instance did: a skewed split, or a rebalance moving
        // partitions mid-way (counted from the load's start), shows here.
        let shares: Vec<String> = instances
            .iter()
            .zip(&joined)
            .map(|((_, m), before)| {
                format!(
                    "{:.0} sent, {:.0} partition(s) at the end, {:.0} rebalance(s) during the load",
                    metric(m, "promo_fanout_notifications_sent_total"),
                    held(m),
                    rebalances(m) - before
                )
            })
            .collect();
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        assert_eq!(
            feedback_rows(&mut pg) as f64,
            expected,
            "every notification once"
        );
        for (mut child, _) in instances {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(pg);
        drop_db(&scratch);
        self.row(
            &format!("{n} instance(s) in one group"),
            format!("{rate:.0} notifications/s"),
            &format!(
                "{}, {PARTITIONS} input partitions; by instance: {}",
                load.describe(),
                shares.join("; ")
            ),
        );
        rate
    }

    /// A partition handed over while its campaign (1 action × `n`
    /// subscribers) is half done: two instances in one group; the holder is
    /// stopped with SIGTERM (it records what is in flight and leaves the
    /// group); the other takes the partition, restores the campaign and its
    /// sent set from Postgres and finishes it, every row once.
    fn handoff(&mut self, n: u64) {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let (name, url) = (scratch.name.clone(), scratch.url.clone());
        let r = Uuid::new_v4();
        subscribe(&url, r, n);
        let t = self.topics(PARTITIONS);
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let mut instances = Vec::new();
        for (id, dir) in ["a", "b"].iter().zip(&dirs) {
            let flags = ["--instance-id", id, "--mirror-mode", "refresh"];
            let (child, metrics) = self.service(&url, &t, dir.path(), &name, &flags);
            self.wait_ready(&metrics, Duration::from_secs(600));
            instances.push((child, metrics));
        }
        let held = |m: &str| metric(m, "promo_fanout_partitions_held");
        wait_until("the partitions to be split", STAGE, || {
            instances.iter().all(|(_, m)| held(m) == 2.0).then_some(())
        });
        let producer = self.producer();
        self.produce_all(
            &producer,
            &t.input,
            &[(r.to_string(), action(r, Uuid::new_v4()))],
        );
        let sent = |m: &str| metric(m, "promo_fanout_notifications_sent_total");
        let holder = wait_until("the fan-out to be half done", STAGE, || {
            instances
                .iter()
                .position(|(_, m)| sent(m) >= n as f64 / 2.0)
        });
        let (mut stopped, _) = instances.remove(holder);
        let (mut survivor, metrics) = instances.remove(0);
        let spent_before = metric(&metrics, "promo_fanout_handoff_seconds_sum");
        let stop = Instant::now();
        stop_service(&mut stopped);
        let exited = stop.elapsed().as_secs_f64();
        let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let done_before = feedback_rows(&mut pg) as f64;
        wait_until("the survivor to go on", STAGE, || {
            (sent(&metrics) > 0.0).then_some(())
        });
        let next = stop.elapsed().as_secs_f64();
        let spent = metric(&metrics, "promo_fanout_handoff_seconds_sum") - spent_before;
        self.wait_sent(&metrics, n as f64 - done_before, Duration::from_secs(3600));
        assert_eq!(
            feedback_rows(&mut pg),
            n as i64,
            "every subscriber once in Postgres"
        );
        let _ = survivor.kill();
        let _ = survivor.wait();
        drop(pg);
        drop_db(&scratch);
        self.row(
            "hand-off of a half-done campaign",
            format!("{next:.1} s from stop to the next notification"),
            &format!(
                "1 action × {n} subscribers, 2 instances; the holder stopped (SIGTERM) at \
                 {done_before:.0} sent, exited after {exited:.1} s; the survivor's rebalance \
                 (revoke, take, restore from Postgres) {spent:.2} s"
            ),
        );
    }

    /// Snapshot of `n` rows, then two restarts with the mirror present:
    /// after a stop and after a kill -9.
    fn mirror(&mut self, n: u64) {
        let scratch = scratch_db(&self.admin_url, "pf_e2e");
        let (name, url) = (scratch.name.clone(), scratch.url.clone());
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
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name, &[]);
        let snapshot = self.wait_ready(&metrics, Duration::from_secs(3600));
        // A stop (SIGTERM) leaves the consumer group; a kill -9 does not, and
        // the group then assigns the restarted instance only after about the
        // killed member's session.
        stop_service(&mut child);
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name, &[]);
        let after_stop = self.wait_ready(&metrics, Duration::from_secs(600));
        let _ = child.kill();
        let _ = child.wait();
        let (mut child, metrics) = self.service(&url, &t, state.path(), &name, &[]);
        let after_kill = self.wait_ready(&metrics, Duration::from_secs(600));
        let _ = child.kill();
        let _ = child.wait();
        drop_db(&scratch);
        self.row(
            "mirror snapshot",
            format!("{:.1} s", snapshot.as_secs_f64()),
            &format!("{n} rows, start to ready with an empty store"),
        );
        self.row(
            "restart to ready, after a stop",
            format!("{:.2} s", after_stop.as_secs_f64()),
            &format!("{n} rows mirrored, SIGTERM"),
        );
        self.row(
            "restart to ready, after kill -9",
            format!("{:.2} s", after_kill.as_secs_f64()),
            &format!("{n} rows mirrored; the group waits about the killed member's session"),
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
        plotted: Vec::new(),
        latencies: Vec::new(),
    };
    let load = Load {
        restaurants: env_or("PF_E2E_RESTAURANTS", 200),
        subscribers: env_or("PF_E2E_SUBSCRIBERS", 500),
        skewed: env_or("PF_E2E_SKEWED", 2),
    };
    let total = load.notifications();
    let end_to_end = (total > 0).then(|| b.throughput_stages(&load));
    let latency_rates = std::env::var("PF_E2E_LATENCY_RATES").unwrap_or_else(|_| "1000,200".into());
    for rate in latency_rates
        .split(',')
        .filter_map(|r| r.trim().parse::<u64>().ok())
    {
        if rate > 0 {
            let seconds = env_or("PF_E2E_LATENCY_SECONDS", 5);
            b.relay_latency(rate, seconds);
            b.latency(rate, seconds);
        }
    }
    let hot = env_or("PF_E2E_HOT", 1_000_000);
    if hot > 0 {
        b.hot(hot, end_to_end);
    }
    let counts = std::env::var("PF_E2E_INSTANCES").unwrap_or_else(|_| "1,2,3".into());
    for n in counts
        .split(',')
        .filter_map(|c| c.trim().parse::<usize>().ok())
    {
        if n > 0 && total > 0 {
            b.instances(&load, n);
        }
    }
    let handoff = env_or("PF_E2E_HANDOFF", 1_000_000);
    if handoff > 0 {
        b.handoff(handoff);
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
    let svg = bench_dir().join("e2e.svg");
    plot(&svg, &b.plotted, &b.latencies);
    println!(
        "written: {} and {}",
        bench_dir().join("e2e.md").display(),
        svg.display()
    );
}

/// The latency curve of the bare relay, drawn dashed beside the service's
/// at the same rate.
const RELAY_PLOTTED: &str = "bare relay";

/// The throughputs and the latency runs, side by side in one SVG.
fn plot(
    path: &std::path::Path,
    throughputs: &[(String, f64)],
    latencies: &[(&'static str, u64, Vec<f64>)],
) {
    use plotters::prelude::*;

    let root = SVGBackend::new(path, (1300, 520)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let (left, right) = root.split_horizontally(700);
    throughput_chart(&left, throughputs);
    latency_chart(&right, latencies);
    root.present().unwrap();
}

type Area<'a> =
    plotters::drawing::DrawingArea<plotters::backend::SVGBackend<'a>, plotters::coord::Shift>;

/// The throughputs as bars: the service's red (named by its mirror mode),
/// the raw jobs' blue, the peers' black (named by their slug).
fn throughput_chart(left: &Area, throughputs: &[(String, f64)]) {
    use plotters::prelude::*;

    let n = throughputs.len().max(1);
    let top = throughputs.iter().map(|t| t.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(left)
        .caption(
            "Per second: raw jobs (blue), promo-fanout (red), peers (black)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => {
                throughputs.get(*i).map(|t| t.0.clone()).unwrap_or_default()
            }
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()
        .unwrap();
    chart
        .draw_series(throughputs.iter().enumerate().map(|(i, (what, v))| {
            let colour = if what == "cdc" || what == "refresh" {
                RED
            } else if what.starts_with("raw") {
                BLUE
            } else {
                BLACK
            };
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                colour.mix(0.7).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .unwrap();
}

/// The latency runs as percentile curves: one colour per rate, the relay's
/// curve dashed.
fn latency_chart(right: &Area, latencies: &[(&'static str, u64, Vec<f64>)]) {
    use plotters::prelude::*;

    let highest = latencies
        .iter()
        .filter_map(|(_, _, l)| l.last().copied())
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(right)
        .caption(
            "Latency, action produced → push visible (ms, log scale)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..100.0, (1.0..highest).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .draw()
        .unwrap();
    // One colour per rate; the relay's curve dashed in its rate's colour.
    let mut rates: Vec<u64> = latencies.iter().map(|(_, r, _)| *r).collect();
    rates.sort_unstable();
    rates.dedup();
    for (what, rate, lat) in latencies {
        let i = rates.binary_search(rate).unwrap_or(0);
        let colour = [RED, BLUE, GREEN, BLACK][i % 4];
        let step = (lat.len() / 1000).max(1);
        let points = lat
            .iter()
            .enumerate()
            .step_by(step)
            .chain(lat.last().map(|l| (lat.len() - 1, l)))
            .map(|(j, v)| (j as f64 * 100.0 / lat.len().max(1) as f64, v.max(1.0)));
        let label = format!("{what}, {rate} actions/s");
        if *what == RELAY_PLOTTED {
            let style = colour.stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(points, 6, 4, style))
                .unwrap()
                .label(label)
                .legend(move |(x, y)| {
                    plotters::element::DashedPathElement::new(
                        vec![(x, y), (x + 20, y)],
                        6,
                        4,
                        style,
                    )
                });
        } else {
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .unwrap()
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .unwrap();
}

/// Waits, at most `limit`, until the peer `child` has written `want`
/// feedback rows; returns how long that took.
fn wait_rows(
    child: &mut std::process::Child,
    pg: &mut postgres::Client,
    want: i64,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let n = feedback_rows(pg);
        if n >= want {
            return Ok(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} after {n} of {want} rows"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{want} rows not written within {} s",
        limit.as_secs()
    ))
}

/// The pid of the walsender serving the database at `url`'s change feed, if
/// one runs.
fn walsender(url: &str) -> Option<u32> {
    let mut pg = postgres::Client::connect(url, postgres::NoTls).ok()?;
    let row = pg
        .query_opt(
            "SELECT pid FROM pg_stat_replication r JOIN pg_replication_slots s \
             ON s.active_pid = r.pid WHERE s.database = current_database()",
            &[],
        )
        .ok()??;
    Some(row.get::<_, i32>(0) as u32)
}

/// `url` without TLS, as the raw baselines the service is compared with
/// connect (the default `sslmode=prefer` would encrypt even on loopback).
fn plaintext(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=disable")
}

/// Polls `check` every 20 ms until it gives a value, `limit` at most.
/// Stops a service as an operator would (SIGTERM: it records what is in
/// flight and leaves the consumer group) and waits for it to exit.
fn stop_service(child: &mut Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
}

fn wait_until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` feedback rows of one campaign of restaurant `r` in one binary COPY,
/// the service's own statement: rows/s.
fn raw_binary_copy(pg: &mut postgres::Client, r: Uuid, n: u64) -> f64 {
    use postgres::binary_copy::BinaryCopyInWriter;
    use promo_fanout::sinks::{FEEDBACK_COPY, FEEDBACK_COPY_TYPES};
    let k = Uuid::new_v4();
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
        .unwrap()
        .to_utc();
    let clients: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let started = Instant::now();
    let sink = pg.copy_in(FEEDBACK_COPY).unwrap();
    let mut w = BinaryCopyInWriter::new(sink, &FEEDBACK_COPY_TYPES);
    for c in &clients {
        w.write(&[
            &r,
            &k,
            &"Two pizzas for the price of one, today only",
            &"Ivan Ivanov",
            &"ivan@example.com",
            &at,
            &at,
            &at,
            c,
            &at,
        ])
        .unwrap();
    }
    w.finish().unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// `n` push-shaped messages: (key, value).
fn push_values(n: u64) -> Vec<(String, String)> {
    let value = serde_json::json!({
        "restaurant_id": Uuid::new_v4(), "adv_campaign_id": Uuid::new_v4(),
        "adv_campaign_content": "Two pizzas for the price of one, today only",
        "adv_campaign_owner": "Ivan Ivanov", "adv_campaign_owner_contact": "ivan@example.com",
        "adv_campaign_datetime_start": 1, "adv_campaign_datetime_end": 2,
        "datetime_created": 0, "client_id": Uuid::new_v4(), "trigger_datetime_created": 1,
    })
    .to_string();
    (0..n)
        .map(|_| (Uuid::new_v4().to_string(), value.clone()))
        .collect()
}
