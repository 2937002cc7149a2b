//! The broker: fresh topics, a producer and a reader for tests, and a
//! private tansu for faults that would disturb the shared one.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use uuid::Uuid;

use super::{unique, wait_for};

pub fn brokers() -> String {
    std::env::var("PF_TEST_BROKERS").expect(
        "PF_TEST_BROKERS is not set: run the suite with scripts/test.sh, which starts a broker",
    )
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

    /// Fresh topics on librdkafka's mock cluster, the input with
    /// `partitions` partitions.
    pub fn on_mock<C: rdkafka::ClientContext>(
        mock: &rdkafka::mocking::MockCluster<'_, C>,
        partitions: i32,
    ) -> Topics {
        let t = Topics {
            input: unique("actions"),
            output: unique("push"),
            dlq: unique("dlq"),
            group: unique("group"),
        };
        mock.create_topic(&t.input, partitions, 1).unwrap();
        for name in [&t.output, &t.dlq] {
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
        t.create_on(brokers, partitions);
        t
    }

    /// Creates these topics on `brokers` (again, after a broker lost them).
    pub fn create_on(&self, brokers: &str, partitions: i32) {
        let t = self;
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

    /// Sends actions keyed by restaurant at once, so that they are likely to
    /// be read in one batch.
    pub fn send_actions(&self, topic: &str, actions: &[Value]) {
        let encoded: Vec<(String, String)> = actions
            .iter()
            .map(|a| {
                (
                    a["restaurant_id"].as_str().unwrap().to_owned(),
                    a.to_string(),
                )
            })
            .collect();
        self.send_all(
            topic,
            encoded
                .iter()
                .map(|(k, v)| (Some(k.as_bytes()), v.as_bytes())),
        );
    }

    pub fn send_action(&self, topic: &str, action: &Value) {
        let key = action["restaurant_id"]
            .as_str()
            .map(|s| s.as_bytes().to_vec());
        self.send(topic, key.as_deref(), action.to_string().as_bytes(), None);
    }
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
            let m = match m {
                Ok(m) => m,
                // The broker held down by the test: the reader waits too.
                Err(rdkafka::error::KafkaError::MessageConsumption(
                    RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown,
                )) => continue,
                Err(error) => panic!("reading the topic: {error}"),
            };
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

    /// Reads until `n` messages, then a quiet second more, and asserts that
    /// there are exactly `n` (`what` says why).
    pub fn exactly(&mut self, n: usize, timeout: Duration, what: &str) -> &[Record] {
        self.until(n, timeout);
        self.drain(Duration::from_secs(1));
        assert_eq!(self.seen.len(), n, "{what}");
        &self.seen
    }
}

/// A [`Reader`] on a thread of its own, reading as messages arrive: a
/// broker that drops a partition's oldest messages (librdkafka's mock
/// cluster keeps about 5 MB of each) loses none of them to the test.
pub struct Tail {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Record>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Tail {
    pub fn start(brokers: &str, topic: &str) -> Tail {
        let seen = std::sync::Arc::<std::sync::Mutex<Vec<Record>>>::default();
        let stop = std::sync::Arc::<std::sync::atomic::AtomicBool>::default();
        let mut reader = Reader::on(brokers, topic);
        let handle = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    reader.drain(Duration::from_millis(100));
                    seen.lock().unwrap().append(&mut reader.seen);
                }
            })
        };
        Tail {
            seen,
            stop,
            handle: Some(handle),
        }
    }

    /// Waits until what was read satisfies `done`, then until nothing more
    /// arrives for `quiet`; returns everything read.
    pub fn until(
        &self,
        what: &str,
        timeout: Duration,
        quiet: Duration,
        done: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let reading = || {
            let stopped = self.handle.as_ref().is_none_or(|h| h.is_finished());
            assert!(
                !stopped,
                "the reader of the topic stopped (see its panic above)"
            );
        };
        wait_for(what, timeout, || {
            reading();
            done(&self.seen.lock().unwrap()).then_some(())
        });
        let deadline = Instant::now() + timeout;
        let mut last = (self.seen.lock().unwrap().len(), Instant::now());
        loop {
            assert!(
                Instant::now() < deadline,
                "messages kept arriving for {timeout:?} after {what}"
            );
            reading();
            std::thread::sleep(Duration::from_millis(100));
            let n = self.seen.lock().unwrap().len();
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return self.seen.lock().unwrap().clone();
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A tansu broker of the test's own, on a free loopback port, for faults that
/// would disturb the shared one (freezing it, adding partitions). Killed on
/// drop.
pub struct PrivateBroker {
    pub child: Child,
    pub addr: String,
    /// The folder of its SQLite storage, when it has one.
    dir: Option<tempfile::TempDir>,
}

/// The SQLite database of a [`PrivateBroker::on_sqlite`], in its folder.
const TANSU_DB: &str = "tansu.db";

impl PrivateBroker {
    /// Keeps topics in memory, as the shared broker does.
    pub fn start() -> PrivateBroker {
        PrivateBroker::spawn("memory://tansu/", None)
    }

    /// Keeps topics in a SQLite database of its own, where a test can
    /// change what no Kafka request of tansu's can (see
    /// [`add_partition`](PrivateBroker::add_partition)).
    pub fn on_sqlite() -> PrivateBroker {
        let dir = tempfile::tempdir().unwrap();
        PrivateBroker::spawn(&format!("sqlite://{TANSU_DB}"), Some(dir))
    }

    fn spawn(storage: &str, dir: Option<tempfile::TempDir>) -> PrivateBroker {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = launch(&addr, storage, dir.as_ref().map(|d| d.path()));
        PrivateBroker { child, addr, dir }
    }

    /// Kills a broker on memory storage and starts another on the same
    /// address: every topic, offset, group and producer id is gone, as
    /// after a broker lost its disk.
    pub fn restart_empty(&mut self) {
        assert!(self.dir.is_none(), "a broker on memory storage");
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = launch(&self.addr, "memory://tansu/", None);
    }

    /// Adds a partition to `topic` as Kafka's CreatePartitions would, in
    /// the broker's SQLite storage: the topic's partition count (which its
    /// metadata answers report), the partition, and its offsets. Returns the
    /// new partition.
    pub fn add_partition(&self, topic: &str) -> i32 {
        let dir = self.dir.as_ref().expect("a broker on SQLite");
        let mut db = rusqlite::Connection::open(dir.path().join(TANSU_DB)).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        let tx = db.transaction().unwrap();
        let partition: i32 = tx
            .query_row(
                "UPDATE topic SET partitions = partitions + 1 WHERE name = ?1 \
                 RETURNING partitions - 1",
                [topic],
                |row| row.get(0),
            )
            .unwrap();
        tx.execute(
            "INSERT INTO topition (topic, partition) \
             SELECT id, ?2 FROM topic WHERE name = ?1",
            rusqlite::params![topic, partition],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO watermark (topition) \
             SELECT tp.id FROM topition tp JOIN topic t ON tp.topic = t.id \
             WHERE t.name = ?1 AND tp.partition = ?2",
            rusqlite::params![topic, partition],
        )
        .unwrap();
        tx.commit().unwrap();
        partition
    }

    /// SIGSTOP: the process stays, its connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(&self.child, Signal::SIGSTOP);
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        signal(&self.child, Signal::SIGCONT);
    }
}

/// A tansu broker listening on `addr`, its storage relative to `dir`.
fn launch(addr: &str, storage: &str, dir: Option<&std::path::Path>) -> Child {
    let url = format!("tcp://{addr}");
    let tansu = std::env::var("PF_TEST_TANSU").unwrap_or_else(|_| "tansu".into());
    let mut command = Command::new(&tansu);
    command
        .args(["broker", "--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", storage])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // tansu opens a SQLite database relative to its working directory.
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {tansu} (scripts/test.sh installs it): {e}"));
    wait_for(
        "the private broker to listen",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(addr).ok(),
    );
    child
}

/// Sends `sig` to a child process.
pub fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// A loopback port free now. Only for tansu and Prometheus, which cannot
/// report the port they bind: another process may take it first (the service
/// binds port 0 and reports its address instead).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
