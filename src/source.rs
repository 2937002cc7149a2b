//! The input topic: the partitions the consumer group gives this instance,
//! read in batches from the positions the state store holds (restored from
//! Postgres when stale, else the group's committed offsets).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use std::collections::VecDeque;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
pub use rdkafka::consumer::CommitMode;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{OutOfRange, Settings};
use crate::infra::retry::Failure;
use crate::sinks::{kafka_config, kafka_log, Logged};

/// Why the input could not be positioned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "input topic {topic} partition {partition}: the stored position {position} is older than \
         the oldest message the broker still holds ({low}); {lost} messages were deleted by \
         retention before they were read. Refusing to skip them silently: restart with \
         --position-out-of-range earliest (resume at {low}) or latest (resume at the end) \
         to accept the loss",
        lost = low - position
    )]
    OutOfRange {
        topic: String,
        partition: i32,
        position: i64,
        low: i64,
    },
    #[error("reading the input topic's offsets: {0}")]
    Kafka(KafkaError),
}

impl From<KafkaError> for StartError {
    fn from(error: KafkaError) -> Self {
        StartError::Kafka(error)
    }
}

/// One input message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct InputMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

pub struct Source {
    consumer: StreamConsumer<Membership>,
    topic: String,
}

/// A change of this instance's input partitions, decided by the consumer
/// group and carried out by the batch loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Partitions given to this instance: take them, then read them.
    Assign(Vec<i32>),
    /// Partitions taken away: finish what is in flight for them, then let
    /// them go.
    Revoke(Vec<i32>),
    /// Partitions taken away without a rebalance (the session timed out):
    /// another instance may hold them already.
    Lost(Vec<i32>),
}

impl Change {
    /// The change's name in metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Assign(_) => "assign",
            Change::Revoke(_) => "revoke",
            Change::Lost(_) => "lost",
        }
    }
}

/// Assigns (or unassigns) `tpl`: incrementally under cooperative
/// rebalancing, the whole assignment under eager rebalancing.
fn carry_out<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    assign: bool,
    tpl: &TopicPartitionList,
) -> Result<(), KafkaError> {
    let cooperative = matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    );
    match (assign, cooperative) {
        (true, true) => consumer.incremental_assign(tpl),
        (false, true) => consumer.incremental_unassign(tpl),
        (true, false) => consumer.assign(tpl),
        (false, false) => consumer.unassign(),
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // Dropping the consumer leaves the group, which revokes everything:
        // from now on a rebalance is carried out at once, and one still
        // queued is carried out now (librdkafka waits for it to close).
        let context = self.consumer.context();
        context
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for change in self.changes() {
            let (assign, partitions) = match change {
                Change::Assign(p) => (true, p),
                Change::Revoke(p) | Change::Lost(p) => (false, p),
            };
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                tpl.add_partition(&self.topic, p);
            }
            if let Err(error) = carry_out(&self.consumer, assign, &tpl) {
                tracing::warn!(%error, "rebalance while closing");
            }
        }
    }
}

/// The consumer's context. librdkafka reports a rebalance from inside a
/// poll; rather than (un)assigning there, as rdkafka's default does, the
/// change is queued for the batch loop, which (un)assigns once it has done
/// what the change needs ([`Source::changes`], [`Source::start_reading`],
/// [`Source::stop_reading`]). librdkafka holds the group's rebalance until
/// then.
#[derive(Default)]
pub struct Membership {
    changes: std::sync::Mutex<VecDeque<Change>>,
    /// Wakes a batch waiting for input.
    changed: tokio::sync::Notify,
    /// The consumer is closing: a rebalance is carried out at once.
    closing: std::sync::atomic::AtomicBool,
}

impl ClientContext for Membership {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        kafka_log(level, facility, message);
    }
}

impl ConsumerContext for Membership {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        if self.closing.load(std::sync::atomic::Ordering::Relaxed) {
            // Leaving the group: what was in flight is finished or abandoned.
            let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
            if let Err(error) = carry_out(consumer, assign, tpl) {
                tracing::warn!(%error, "rebalance while closing");
            }
            return;
        }
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let change = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Change::Assign(partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if consumer.assignment_lost() => {
                Change::Lost(partitions)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Change::Revoke(partitions),
            other => {
                let error = RDKafkaErrorCode::from(other);
                tracing::error!(%error, "the consumer group's rebalance failed");
                return;
            }
        };
        tracing::info!(?change, "the consumer group rebalances");
        self.changes.lock().expect("not poisoned").push_back(change);
        self.changed.notify_one();
    }
}

/// The consumer's default `fetch.wait.max.ms` (librdkafka's is 500).
pub const FETCH_WAIT_MAX_MS: &str = "10";

/// The consumer's default `queued.max.messages.kbytes` (librdkafka's is
/// 65536).
const QUEUED_MAX_KBYTES: &str = "16384";

/// The group membership's defaults, each overridable with `kafka.<property>`.
/// Incremental `cooperative-sticky` assignment: a rebalance moves only the
/// partitions that change hands, and every other partition keeps being read
/// and planned throughout. Should a broker hand a partition on before its
/// holder has let go (the tansu broker once did), the epoch fence rolls the
/// holder's batch back and the holder joins again (see `pipeline::run`).
/// A dead instance is noticed after 6 s (the smallest session Kafka brokers
/// accept by default, `group.min.session.timeout.ms`) rather than
/// librdkafka's 45 s, with a heartbeat every 2 s (a third of it, so that one
/// lost heartbeat does not end the session). Partitions added to the input
/// topic are noticed at the next metadata refresh, which rebalances the
/// group: every 10 s rather than librdkafka's 5 min (one small request).
const GROUP_DEFAULTS: &[(&str, &str)] = &[
    ("partition.assignment.strategy", "cooperative-sticky"),
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "2000"),
    ("topic.metadata.refresh.interval.ms", "10000"),
];

/// The configuration of every consumer of the input topic: the shared
/// client configuration, the group, and the group membership's defaults
/// where no `kafka.<property>` overrides them. The consumers that only read
/// watermarks or metadata never join, but take the same defaults, since
/// librdkafka checks them against each other (`max.poll.interval.ms` may not
/// be below `session.timeout.ms`).
pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let mut config = kafka_config(settings);
    config.set("group.id", &settings.group_id);
    for (property, value) in GROUP_DEFAULTS {
        if !settings.kafka.contains_key(*property) {
            config.set(*property, *value);
        }
    }
    config
}

impl Source {
    pub fn new(settings: &Settings) -> Result<Source, KafkaError> {
        let mut config = consumer_config(settings);
        config.set("enable.partition.eof", "false");
        // Where a fresh partition starts is decided in `start_positions`; this
        // only applies `position-out-of-range` to a position that falls out
        // of the retained log while running.
        let reset = settings.position_out_of_range.auto_offset_reset();
        if let Some(theirs) = settings.kafka.get("auto.offset.reset") {
            if theirs != reset {
                tracing::warn!(
                    kafka_auto_offset_reset = %theirs,
                    position_out_of_range = reset,
                    "kafka.auto.offset.reset is set by position-out-of-range; ignoring the property"
                );
            }
        }
        config.set("auto.offset.reset", reset);
        // How long a fetch may wait for data on the broker. A broker answers
        // as soon as data arrives, but some Kafka-protocol brokers (tansu)
        // hold every fetch for the whole wait, which then adds itself to the
        // latency of every action. Overridable with `kafka.fetch.wait.max.ms`.
        if !settings.kafka.contains_key("fetch.wait.max.ms") {
            config.set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
        }
        // librdkafka pre-fetches up to 64 MB by default; a batch takes at most
        // `batch-size` messages, so a smaller queue bounds memory at no cost.
        if !settings.kafka.contains_key("queued.max.messages.kbytes") {
            config.set("queued.max.messages.kbytes", QUEUED_MAX_KBYTES);
        }
        // Offsets move only when a batch is durable, by `commit` below.
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        Ok(Source {
            consumer: config.create_with_context(Membership::default())?,
            topic: settings.input_topic.clone(),
        })
    }

    /// Joins the consumer group on the input topic: partitions come and go
    /// as [`changes`](Source::changes).
    pub fn subscribe(&self) -> Result<(), KafkaError> {
        self.consumer.subscribe(&[&self.topic])
    }

    /// The rebalances reported since the last call, in order.
    pub fn changes(&self) -> Vec<Change> {
        let context = self.consumer.context();
        context
            .changes
            .lock()
            .expect("not poisoned")
            .drain(..)
            .collect()
    }

    /// Puts back `changes` not carried out, in order, ahead of any queued
    /// since.
    pub fn requeue(&self, changes: impl DoubleEndedIterator<Item = Change>) {
        let mut queue = self
            .consumer
            .context()
            .changes
            .lock()
            .expect("not poisoned");
        for change in changes.rev() {
            queue.push_front(change);
        }
    }

    /// Starts reading assigned partitions from `start` (the next offset of
    /// each): completes a [`Change::Assign`].
    pub fn start_reading(&self, start: &BTreeMap<i32, i64>) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in start {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*next))?;
        }
        carry_out(&self.consumer, true, &tpl)
    }

    /// Stops reading revoked partitions: completes a [`Change::Revoke`].
    pub fn stop_reading(&self, partitions: &[i32]) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        carry_out(&self.consumer, false, &tpl)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The input topic's partitions, from the broker's metadata.
    pub fn partitions(&self, timeout: Duration) -> Result<Vec<i32>, Failure> {
        self.partitions_of(&self.topic, timeout)
    }

    /// Whether the broker knows `topic`: `None` if it did not say (no
    /// answer, no leader yet, not authorized).
    pub fn topic_exists(&self, topic: &str, timeout: Duration) -> Option<bool> {
        match self.partitions_of(topic, timeout) {
            Ok(partitions) => Some(!partitions.is_empty()),
            Err(Failure::Kafka(e))
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                Some(false)
            }
            Err(_) => None,
        }
    }

    fn partitions_of(&self, topic: &str, timeout: Duration) -> Result<Vec<i32>, Failure> {
        tokio::task::block_in_place(|| topic_partitions(&self.consumer, topic, timeout))
            .map_err(Failure::Kafka)
    }

    /// Where each partition starts: its position in the store, else the
    /// group's committed offset, else the oldest message the broker holds. A
    /// position the broker no longer holds (deleted by retention before it
    /// was read) is handled by `policy`: an error, or a logged jump to the
    /// oldest or the newest message.
    pub fn start_positions(
        &self,
        partitions: &[i32],
        stored: &BTreeMap<i32, i64>,
        policy: OutOfRange,
        timeout: Duration,
    ) -> Result<BTreeMap<i32, i64>, StartError> {
        let mut known = stored.clone();
        let fresh: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !stored.contains_key(p))
            .collect();
        if !fresh.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for p in &fresh {
                tpl.add_partition(&self.topic, *p);
            }
            let committed =
                tokio::task::block_in_place(|| self.consumer.committed_offsets(tpl, timeout))?;
            for e in committed.elements() {
                if let Offset::Offset(next) = e.offset() {
                    known.insert(e.partition(), next);
                }
            }
        }
        let mut out = BTreeMap::new();
        for p in partitions {
            let (low, high) = tokio::task::block_in_place(|| {
                self.consumer.fetch_watermarks(&self.topic, *p, timeout)
            })?;
            let Some(next) = known.get(p).copied() else {
                out.insert(*p, low);
                continue;
            };
            if next >= low {
                out.insert(*p, next);
                continue;
            }
            let lost = low - next;
            let start = match policy {
                OutOfRange::Fail => {
                    return Err(StartError::OutOfRange {
                        topic: self.topic.clone(),
                        partition: *p,
                        position: next,
                        low,
                    })
                }
                OutOfRange::Earliest => low,
                OutOfRange::Latest => high,
            };
            tracing::warn!(
                topic = %self.topic,
                partition = *p,
                position = next,
                oldest = low,
                resume_at = start,
                lost,
                ?policy,
                "input position older than the topic's retention: messages were deleted unread"
            );
            metrics::counter!("promo_fanout_positions_out_of_range_total", "partition" => p.to_string())
                .increment(1);
            out.insert(*p, start);
        }
        Ok(out)
    }

    /// Waits up to `wait` for a first message, then takes what else is
    /// already queued, and what arrives within `linger` once nothing is
    /// (none by default: an action that arrives alone is processed at once),
    /// `max` messages at most; a rebalance ends the wait at once. Read errors
    /// are logged and retried; the one
    /// error returned is a position that fell out of the retained log under
    /// `position-out-of-range = fail`.
    pub async fn next_batch(
        &self,
        max: usize,
        wait: Duration,
        linger: Duration,
    ) -> Result<Vec<InputMessage>, KafkaError> {
        let mut out = Vec::new();
        let mut deadline = Instant::now() + wait;
        while out.len() < max {
            let queued = if out.is_empty() {
                None
            } else {
                self.consumer.recv().now_or_never()
            };
            let received = match queued {
                Some(r) => r,
                None if !out.is_empty() && linger.is_zero() => break,
                None => {
                    let changed = self.consumer.context().changed.notified();
                    tokio::select! {
                        r = tokio::time::timeout_at(deadline, self.consumer.recv()) => match r {
                            Err(_) => break,
                            Ok(r) => r,
                        },
                        // A rebalance is for the batch loop to carry out.
                        _ = changed => break,
                    }
                }
            };
            match received {
                Ok(m) => {
                    if out.is_empty() {
                        deadline = Instant::now() + linger;
                    }
                    out.push(InputMessage {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                    });
                }
                Err(error)
                    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) =>
                {
                    return Err(error);
                }
                Err(error) => {
                    // librdkafka reconnects by itself; report and keep reading.
                    tracing::warn!(%error, "input topic read failed");
                    metrics::counter!("promo_fanout_retries_total", "cause" => "kafka_source")
                        .increment(1);
                    if out.is_empty() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Tells the group how far this node has got. Only for display and for a
    /// fresh store: the store's positions are the truth.
    pub fn commit(
        &self,
        positions: &BTreeMap<i32, i64>,
        mode: CommitMode,
    ) -> Result<(), KafkaError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in positions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*next))?;
        }
        self.consumer.commit(&tpl, mode)
    }
}

/// `topic`'s partitions, from the broker's metadata; a topic the broker does
/// not know is `UnknownTopicOrPartition`.
fn topic_partitions<X: ConsumerContext>(
    consumer: &impl Consumer<X>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let found =
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ))?;
    if let Some(err) = found.error() {
        return Err(KafkaError::MetadataFetch(err.into()));
    }
    Ok(found.partitions().iter().map(|p| p.id()).collect())
}

/// How often the consumer-lag thread looks for a change of the partitions
/// held between two reports.
const LAG_SLICE: Duration = Duration::from_millis(250);

/// Publishes the consumer lag of each partition this instance holds (high
/// watermark minus the recorded position) every `every`, and how many
/// partitions the input topic has: summed over the group against
/// `promo_fanout_partitions_held`, it shows partitions nobody reads.
/// Watermarks are network round trips, so this runs on a thread and client of
/// its own instead of in the batch loop, until the returned [`LagReporter`]
/// is stopped or dropped.
pub fn report_lag(
    settings: &Settings,
    health: std::sync::Arc<crate::infra::health::Health>,
    positions: watch::Receiver<BTreeMap<i32, i64>>,
    every: Duration,
) -> Result<LagReporter, KafkaError> {
    let consumer: BaseConsumer<Logged> = consumer_config(settings).create_with_context(Logged)?;
    let topic = settings.input_topic.clone();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("consumer-lag".into())
        .spawn(move || loop {
            if stopped.try_recv() != Err(std::sync::mpsc::TryRecvError::Empty) {
                return;
            }
            if let Ok(partitions) = topic_partitions(&consumer, &topic, Duration::from_secs(2)) {
                metrics::gauge!("promo_fanout_input_partitions").set(partitions.len() as f64);
            }
            let current = positions.borrow().clone();
            for p in current.keys() {
                if stopped.try_recv() != Err(std::sync::mpsc::TryRecvError::Empty) {
                    return;
                }
                // Doubles as the broker's health check while no batch is
                // being delivered.
                let answer = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(2));
                health.consumer.set_ok(answer.is_ok());
                let Ok((low, high)) = answer else {
                    continue;
                };
                let next = current.get(p).copied().unwrap_or(low);
                metrics::gauge!("promo_fanout_consumer_lag", "partition" => p.to_string())
                    .set((high - next).max(0) as f64);
            }
            // Every `every`, or at once when the partitions held change.
            let deadline = std::time::Instant::now() + every;
            while std::time::Instant::now() < deadline {
                let slice = LAG_SLICE.min(deadline - std::time::Instant::now());
                if stopped.recv_timeout(slice) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    return;
                }
                if !positions.borrow().keys().eq(current.keys()) {
                    break;
                }
            }
        })
        .expect("the consumer-lag thread starts");
    Ok(LagReporter {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The consumer-lag thread: told to stop when dropped.
pub struct LagReporter {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LagReporter {
    /// Stops the thread and waits for it (at most one metadata or watermark
    /// request).
    pub async fn stop(mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for LagReporter {
    fn drop(&mut self) {
        self.stop.take();
    }
}
