//! The test harness: a fresh database and fresh topics per test on the real
//! local Postgres and the real broker started by `scripts/test.sh`, the real
//! `promo-fanout` binary, and waits on conditions rather than sleeps.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use uuid::Uuid;

pub const BIN: &str = env!("CARGO_BIN_EXE_promo-fanout");

pub fn brokers() -> String {
    std::env::var("PF_TEST_BROKERS").expect(
        "PF_TEST_BROKERS is not set: run the suite with scripts/test.sh, which starts a broker",
    )
}

pub fn admin_url() -> String {
    std::env::var("PF_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Polls `check` until it returns `Some`, failing the test with `what` after
/// `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scratch database, dropped at the end of the test.
pub struct Db {
    pub name: String,
    pub url: String,
}

impl Db {
    pub fn new() -> Db {
        let name = unique("pf_test");
        let mut admin = postgres::Client::connect(&admin_url(), postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let base = admin_url();
        let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
        Db { name, url }
    }

    /// A database with the project's migrations applied by `promo-fanout migrate`.
    pub fn migrated() -> Db {
        let db = Db::new();
        let out = Command::new(BIN)
            .args(["migrate", "--postgres-url", &db.url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        db
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    pub fn subscribe(&self, restaurant: Uuid, client: Uuid) -> i64 {
        self.client()
            .query_one(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2) RETURNING id",
                &[&client, &restaurant],
            )
            .unwrap()
            .get(0)
    }

    /// `n` new clients subscribed to `restaurant`, in one statement.
    pub fn new_subscribers(&self, restaurant: Uuid, n: usize) -> Vec<Uuid> {
        let clients: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        self.subscribe_many(restaurant, &clients);
        clients
    }

    /// Subscribes `clients` to `restaurant` in one statement.
    pub fn subscribe_many(&self, restaurant: Uuid, clients: &[Uuid]) {
        self.client()
            .execute(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) SELECT c, $2 FROM unnest($1::uuid[]) c",
                &[&clients, &restaurant],
            )
            .unwrap();
    }

    /// Every feedback row as (restaurant, campaign, client).
    pub fn feedback(&self) -> Vec<(Uuid, Uuid, Uuid)> {
        self.client()
            .query(
                "SELECT restaurant_id, adv_campaign_id, client_id FROM subscribers_feedback ORDER BY 1, 2, 3",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    pub fn feedback_count(&self) -> i64 {
        self.client()
            .query_one("SELECT count(*) FROM subscribers_feedback", &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let Ok(mut admin) = postgres::Client::connect(&admin_url(), postgres::NoTls) else {
            return;
        };
        // A replication slot (the change feed's) keeps its database: drop
        // the slots once their readers are gone, then the database.
        for _ in 0..50 {
            let _ = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&self.name],
            );
            let _ = admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = $1 AND NOT active",
                &[&self.name],
            );
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                    &[&self.name],
                )
                .map(|r| r.get(0))
                .unwrap_or(0);
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

impl Db {
    /// The table's rows as (row id, restaurant, client), by id.
    pub fn subscription_rows(&self) -> Vec<(i64, Uuid, Uuid)> {
        self.client()
            .query(
                "SELECT id, restaurant_id, client_id FROM subscribers_restaurants ORDER BY id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// This database's replication slots, by name.
    pub fn slots(&self) -> Vec<String> {
        postgres::Client::connect(&admin_url(), postgres::NoTls)
            .unwrap()
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE database = $1 ORDER BY 1",
                &[&self.name],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// The mirror in a state dump, as (row id, restaurant, client) by row id.
pub fn mirror_rows(state_dir: &Path) -> Vec<(i64, Uuid, Uuid)> {
    dump(state_dir, Some("subscriptions"))
        .iter()
        .filter(|e| e["kind"] == "by_row")
        .map(|e| {
            (
                e["row_id"].as_i64().unwrap(),
                e["restaurant_id"].as_str().unwrap().parse().unwrap(),
                e["client_id"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// The mirror position in a state dump.
pub fn mirror_position(state_dir: &Path) -> Option<Value> {
    dump(state_dir, Some("positions"))
        .into_iter()
        .find(|e| e["kind"] == "mirror")
}

/// Fresh input, output and DLQ topics.
pub struct Topics {
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
}

impl Topics {
    pub fn new(partitions: i32) -> Topics {
        Topics::on(&brokers(), partitions)
    }

    /// Fresh one-partition topics on librdkafka's mock cluster.
    pub fn on_mock<C: rdkafka::ClientContext>(
        mock: &rdkafka::mocking::MockCluster<'_, C>,
    ) -> Topics {
        let t = Topics {
            input: unique("actions"),
            output: unique("push"),
            dlq: unique("dlq"),
            group: unique("group"),
        };
        for name in [&t.input, &t.output, &t.dlq] {
            mock.create_topic(name, 1, 1).unwrap();
        }
        t
    }

    /// Fresh topics on another cluster, e.g. a private broker.
    pub fn on(brokers: &str, partitions: i32) -> Topics {
        let t = Topics {
            input: unique("actions"),
            output: unique("push"),
            dlq: unique("dlq"),
            group: unique("group"),
        };
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let topics = [
            NewTopic::new(&t.input, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.output, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.dlq, 1, TopicReplication::Fixed(1)),
        ];
        let results = rt
            .block_on(admin.create_topics(&topics, &AdminOptions::new()))
            .unwrap();
        for r in results {
            r.unwrap();
        }
        t
    }
}

/// A producer for test input.
pub struct Producer {
    inner: FutureProducer,
    rt: tokio::runtime::Runtime,
}

impl Producer {
    pub fn new() -> Producer {
        Producer::on(&brokers())
    }

    /// A producer for another cluster, e.g. a mock one.
    pub fn on(brokers: &str) -> Producer {
        Producer::with(brokers, &[])
    }

    /// A producer with client properties of the test's own, e.g. a larger
    /// `message.max.bytes`.
    pub fn with(brokers: &str, properties: &[(&str, &str)]) -> Producer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true");
        for (k, v) in properties {
            config.set(*k, *v);
        }
        Producer {
            inner: config.create().unwrap(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// Sends `value` with `key` to a partition (or by key), waiting for the ack.
    pub fn send(&self, topic: &str, key: Option<&[u8]>, value: &[u8], partition: Option<i32>) {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        self.rt
            .block_on(self.inner.send(rec, Duration::from_secs(30)))
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// Sends many messages at once, waiting for every ack.
    pub fn send_all<'a>(
        &self,
        topic: &str,
        messages: impl Iterator<Item = (Option<&'a [u8]>, &'a [u8])>,
    ) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        self.rt.block_on(async {
            let mut pending = Vec::new();
            for (key, value) in messages {
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value);
                if let Some(k) = key {
                    rec = rec.key(k);
                }
                loop {
                    match self.inner.send_result(rec) {
                        Ok(delivery) => {
                            pending.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            rec = back;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err((e, _)) => panic!("produce: {e}"),
                    }
                }
            }
            for delivery in pending {
                delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        })
    }

    pub fn send_action(&self, topic: &str, action: &Value) {
        let key = action["restaurant_id"]
            .as_str()
            .map(|s| s.as_bytes().to_vec());
        self.send(topic, key.as_deref(), action.to_string().as_bytes(), None);
    }
}

/// An action as the spec's JSON, valid between `start` and `end`.
pub fn action(restaurant: Uuid, campaign: Uuid, start: i64, end: i64) -> Value {
    json!({
        "restaurant_id": restaurant.to_string(),
        "adv_campaign_id": campaign.to_string(),
        "adv_campaign_content": format!("campaign {campaign}"),
        "adv_campaign_owner": "Ivan Ivanov",
        "adv_campaign_owner_contact": "ivan@example.com",
        "adv_campaign_datetime_start": start,
        "adv_campaign_datetime_end": end,
        "datetime_created": start - 10,
    })
}

/// An action running now for an hour.
pub fn live_action(restaurant: Uuid, campaign: Uuid) -> Value {
    action(restaurant, campaign, now() - 60, now() + 3600)
}

/// One message as the tests read it back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn json(&self) -> Value {
        serde_json::from_slice(self.value.as_deref().unwrap()).unwrap()
    }
}

/// The push messages as sorted (restaurant, campaign, client) triples.
pub fn triples(records: &[Record]) -> Vec<(Uuid, Uuid, Uuid)> {
    let mut v: Vec<_> = records
        .iter()
        .map(|r| {
            let j = r.json();
            let p = |f: &str| Uuid::parse_str(j[f].as_str().unwrap()).unwrap();
            (p("restaurant_id"), p("adv_campaign_id"), p("client_id"))
        })
        .collect();
    v.sort();
    v
}

/// Reads a topic from the beginning, without a group.
pub struct Reader {
    consumer: BaseConsumer,
    pub seen: Vec<Record>,
}

impl Reader {
    pub fn new(topic: &str) -> Reader {
        Reader::on(&brokers(), topic)
    }

    /// A reader of a topic on another cluster.
    pub fn on(brokers: &str, topic: &str) -> Reader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Reader {
            consumer,
            seen: Vec::new(),
        }
    }

    /// Reads whatever has arrived within `quiet` of the last message.
    pub fn drain(&mut self, quiet: Duration) -> &[Record] {
        while let Some(m) = self.consumer.poll(quiet) {
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.seen.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        &self.seen
    }

    /// Reads until at least `n` messages have been seen in all.
    pub fn until(&mut self, n: usize, timeout: Duration) -> &[Record] {
        let deadline = Instant::now() + timeout;
        while self.seen.len() < n {
            assert!(
                Instant::now() < deadline,
                "timed out with {} of {n} messages",
                self.seen.len()
            );
            self.drain(Duration::from_millis(200));
        }
        &self.seen
    }
}

/// The service as a child process.
pub struct Service {
    pub child: Child,
    pub metrics: String,
    pub state_dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Service {
    pub fn settings(db: &Db, topics: &Topics, state_dir: &Path) -> Vec<String> {
        vec![
            "--brokers".into(),
            brokers(),
            "--postgres-url".into(),
            db.url.clone(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--input-topic".into(),
            topics.input.clone(),
            "--output-topic".into(),
            topics.output.clone(),
            "--dlq-topic".into(),
            topics.dlq.clone(),
            "--group-id".into(),
            topics.group.clone(),
            "--refresh-interval".into(),
            "1s".into(),
        ]
    }

    /// Replaces the value of `flag` in settings made by [`Service::settings`].
    pub fn set_flag(args: &mut [String], flag: &str, value: String) {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value;
    }

    /// Starts `promo-fanout run` and waits until it reports ready.
    pub fn start(db: &Db, topics: &Topics, state_dir: &Path, extra: &[&str]) -> Service {
        Self::start_with_env(db, topics, state_dir, extra, &[])
    }

    pub fn start_with_env(
        db: &Db,
        topics: &Topics,
        state_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Service {
        let mut args = Self::settings(db, topics, state_dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let s = Self::spawn(args, envs, state_dir);
        s.wait_ready();
        s
    }

    pub fn spawn(args: Vec<String>, envs: Vec<(String, String)>, state_dir: &Path) -> Service {
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args(&args)
            .args(["--metrics-addr", &metrics]);
        cmd.envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.env("RUST_LOG", "info");
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = cmd.spawn().unwrap();
        Service {
            child,
            metrics,
            state_dir: state_dir.to_owned(),
            args,
            envs,
        }
    }

    /// The same service again with other environment variables (e.g. no
    /// fail points), after a stop or a crash.
    pub fn restart_with_env(&mut self, envs: &[(&str, &str)]) {
        self.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// Waits for the process to end by itself, e.g. at a fail point.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_for("the service to exit", timeout, || {
            self.child.try_wait().unwrap()
        })
    }

    /// The same service again, after a stop or a crash.
    pub fn restart(&mut self) {
        let next = Self::spawn(
            self.args.clone(),
            self.envs.clone(),
            &self.state_dir.clone(),
        );
        *self = next;
        self.wait_ready();
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn wait_ready(&self) {
        wait_for(
            "the service to report ready",
            Duration::from_secs(60),
            || (self.get("/readyz")?.0 == 200).then_some(()),
        );
    }

    /// A counter's value from /metrics (summed over labels).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe { libc_kill(self.child.id() as i32, 15) };
        self.child.wait().unwrap()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// `promo-fanout state dump` as parsed JSON lines.
pub fn dump(state_dir: &Path, table: Option<&str>) -> Vec<Value> {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "state",
        "dump",
        "--state-dir",
        &state_dir.display().to_string(),
    ]);
    if let Some(t) = table {
        cmd.args(["--table", t]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "state dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `promo-fanout ARGS...` run to its end: (exit code, stderr).
pub fn run_cli(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tansu broker of the test's own, on a free loopback port, for faults that
/// would disturb the shared one (freezing it). Killed on drop.
pub struct PrivateBroker {
    pub child: Child,
    pub addr: String,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let tansu = std::env::var("PF_TEST_TANSU").unwrap_or_else(|_| "tansu".into());
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {tansu} (scripts/test.sh installs it): {e}"));
        wait_for(
            "the private broker to listen",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&addr).ok(),
        );
        PrivateBroker { child, addr }
    }

    /// SIGSTOP: the process stays, its connections stay open, nothing answers.
    pub fn freeze(&self) {
        unsafe { libc_kill(self.child.id() as i32, 19) };
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        unsafe { libc_kill(self.child.id() as i32, 18) };
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP proxy a test can cut (every connection closed, new ones
/// refused) and restore, to stage a database or network outage.
pub struct Proxy {
    pub port: u16,
    target: String,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    up: bool,
    generation: u64,
    streams: Vec<std::net::TcpStream>,
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = Proxy {
            port,
            target: target.to_owned(),
            state: Default::default(),
        };
        p.state.lock().unwrap().up = true;
        p.serve(listener);
        p
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let state = self.state.clone();
        let target = self.target.clone();
        let generation = state.lock().unwrap().generation;
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let mut st = state.lock().unwrap();
                if !st.up || st.generation != generation {
                    // Cut: drop the listener so new connections are refused.
                    return;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                st.streams.push(client.try_clone().unwrap());
                st.streams.push(server.try_clone().unwrap());
                drop(st);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        let mut st = self.state.lock().unwrap();
        st.up = false;
        st.generation += 1;
        for s in st.streams.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        drop(st);
        // Wake the accept loop so it sees the cut and drops its listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        wait_for(
            "the proxy to stop listening",
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect(("127.0.0.1", self.port))
                    .is_err()
                    .then_some(())
            },
        );
    }

    /// Accepts connections again on the same port.
    pub fn restore(&self) {
        let listener = wait_for(
            "the proxy port to bind again",
            Duration::from_secs(10),
            || std::net::TcpListener::bind(("127.0.0.1", self.port)).ok(),
        );
        self.state.lock().unwrap().up = true;
        self.serve(listener);
    }
}
