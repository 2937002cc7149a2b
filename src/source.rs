//! The input topic: every partition assigned to this single node, read from
//! the positions the state store holds (or the group's committed offsets for a
//! fresh store), in batches.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Settings;
use crate::retry::SinkError;
use crate::sinks::kafka_config;

/// One input message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct InputMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

pub struct Source {
    consumer: StreamConsumer,
    topic: String,
}

impl Source {
    pub fn new(settings: &Settings) -> Result<Source, KafkaError> {
        let mut config = kafka_config(settings);
        config
            .set("group.id", &settings.group_id)
            .set("enable.partition.eof", "false");
        if !settings.kafka.contains_key("auto.offset.reset") {
            config.set("auto.offset.reset", "earliest");
        }
        // Offsets move only when a batch is durable, by `commit` below.
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        Ok(Source {
            consumer: config.create()?,
            topic: settings.input_topic.clone(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The input topic's partitions, from the broker's metadata.
    pub fn partitions(&self, timeout: Duration) -> Result<Vec<i32>, SinkError> {
        let metadata = tokio::task::block_in_place(|| {
            self.consumer.fetch_metadata(Some(&self.topic), timeout)
        })
        .map_err(SinkError::Kafka)?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or(SinkError::Kafka(KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            )))?;
        if let Some(err) = topic.error() {
            return Err(SinkError::Kafka(KafkaError::MetadataFetch(err.into())));
        }
        Ok(topic.partitions().iter().map(|p| p.id()).collect())
    }

    /// Assigns every partition, each from its stored position when there is
    /// one, else from the group's committed offset (else `auto.offset.reset`).
    pub fn assign(
        &self,
        partitions: &[i32],
        stored: &BTreeMap<i32, i64>,
    ) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let offset = stored
                .get(p)
                .map_or(Offset::Stored, |next| Offset::Offset(*next));
            tpl.add_partition_offset(&self.topic, *p, offset)?;
        }
        self.consumer.assign(&tpl)
    }

    /// Waits up to `wait` for a first message, then takes what else arrives
    /// within `linger`, `max` messages at most.
    pub async fn next_batch(
        &self,
        max: usize,
        wait: Duration,
        linger: Duration,
    ) -> Vec<InputMessage> {
        let mut out = Vec::new();
        let first_deadline = Instant::now() + wait;
        let mut deadline = first_deadline;
        while out.len() < max {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => {
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
                Ok(Err(error)) => {
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
        out
    }

    /// Tells the group how far this node has got. Only for display and for a
    /// fresh store: the store's positions are the truth.
    pub fn commit(&self, positions: &BTreeMap<i32, i64>) -> Result<(), KafkaError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in positions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*next))?;
        }
        self.consumer.commit(&tpl, CommitMode::Async)
    }
}

/// Publishes the consumer lag per partition (high watermark minus the stored
/// position; from the low watermark where none is stored yet) every `every`.
/// Watermarks are network round trips, so this runs on a thread and client of
/// its own instead of in the batch loop. It stops once the sender of
/// `positions` is dropped.
pub fn report_lag(
    settings: &Settings,
    partitions: Vec<i32>,
    positions: watch::Receiver<BTreeMap<i32, i64>>,
    every: Duration,
) -> Result<(), KafkaError> {
    let consumer: BaseConsumer = kafka_config(settings)
        .set("group.id", &settings.group_id)
        .create()?;
    let topic = settings.input_topic.clone();
    std::thread::Builder::new()
        .name("consumer-lag".into())
        .spawn(move || {
            while positions.has_changed().is_ok() {
                let current = positions.borrow().clone();
                for p in &partitions {
                    let Ok((low, high)) =
                        consumer.fetch_watermarks(&topic, *p, Duration::from_millis(500))
                    else {
                        continue;
                    };
                    let next = current.get(p).copied().unwrap_or(low);
                    metrics::gauge!("promo_fanout_consumer_lag", "partition" => p.to_string())
                        .set((high - next).max(0) as f64);
                }
                std::thread::sleep(every);
            }
        })
        .expect("the consumer-lag thread starts");
    Ok(())
}
