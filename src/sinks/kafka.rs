//! The push topic and the dead-letter topic: idempotent producers with
//! `acks=all`, and every delivery report awaited before a batch counts as
//! sent. A record the broker acknowledged is never produced again (short of
//! a crash); a dead letter is always written, without its bytes if the
//! broker finds them too large.

use futures::stream::{FuturesUnordered, StreamExt};
use promo_fanout_state::Origin;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::action::Action;
use crate::config::Settings;
use crate::fanout::{key_of, CampaignKey, Notification};
use crate::infra::retry::{classify, Disposition, Failure};
use crate::sinks::Refusals;

/// The client configuration shared by the consumer and the producer: brokers
/// plus every passed-through `kafka.*` property.
pub fn kafka_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (k, v) in &settings.kafka {
        config.set(k, v);
    }
    config
}

/// The context of the service's Kafka clients that need no other: their
/// log, through [`log`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }
}

/// The consumers that read only metadata and watermarks never join the
/// group: librdkafka's defaults.
impl ConsumerContext for Logged {}

/// librdkafka's log as rdkafka reports it, with one warning made a debug
/// line: every `kafka.*` property goes to every client, consumers and
/// producers alike, and librdkafka warns at each start that a consumer's
/// property "will be ignored by this producer instance" (and the reverse).
/// That is meant, and would read as if the property had no effect.
pub fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    let meant = facility == "CONFWARN" && message.contains("will be ignored by this");
    let level = if meant { RDKafkaLogLevel::Debug } else { level };
    DefaultClientContext.log(level, facility, message);
}

/// A message on its way to the DLQ: the original key and value bytes,
/// unchanged, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub error: String,
    pub source_topic: String,
    /// The input message it came from; `None` for a campaign stored before
    /// origins were kept.
    pub origin: Option<Origin>,
}

/// How much of a dead letter's `error` header is kept: a sink's error can
/// quote a whole row.
const MAX_ERROR_HEADER: usize = 4096;

impl DeadLetter {
    fn headers(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut error = self.error.as_str();
        if error.len() > MAX_ERROR_HEADER {
            let mut end = MAX_ERROR_HEADER;
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error = &error[..end];
        }
        let mut headers = vec![
            ("error", error.as_bytes().to_vec()),
            ("source_topic", self.source_topic.as_bytes().to_vec()),
        ];
        if let Some(o) = self.origin {
            headers.push(("source_partition", o.partition.to_string().into_bytes()));
            headers.push(("source_offset", o.offset.to_string().into_bytes()));
        }
        headers
    }
}

/// The push message's JSON shape: the action's fields, the client, and when
/// the notification was made.
#[derive(Debug, Serialize)]
pub struct PushMessage<'a> {
    #[serde(flatten)]
    pub action: &'a Action,
    pub client_id: Uuid,
    pub trigger_datetime_created: i64,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The producer's `message.max.bytes`: the passed-through property, else
/// librdkafka's default.
pub fn producer_max_bytes(settings: &Settings) -> usize {
    settings
        .kafka
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// The length of `action`'s push message with the longest client id and
/// trigger time: what the decoder holds against the producer's limit.
pub fn push_message_len(action: &Action) -> usize {
    let message = PushMessage {
        action,
        client_id: Uuid::max(),
        trigger_datetime_created: i64::MIN,
    };
    let mut counter = ByteCount(0);
    serde_json::to_writer(&mut counter, &message).expect("a push message always serializes");
    counter.0
}

/// A writer that only counts.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> From<&'a Notification> for PushMessage<'a> {
    fn from(n: &'a Notification) -> Self {
        PushMessage {
            action: &n.campaign.action,
            client_id: n.client_id,
            trigger_datetime_created: n.trigger_datetime_created,
        }
    }
}

/// One record on its way to a topic.
#[derive(Debug, Clone)]
struct Record {
    topic_is_dlq: bool,
    /// The campaign of a push message, to name in a refusal.
    campaign: Option<CampaignKey>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(&'static str, Vec<u8>)>,
}

impl Record {
    /// The record without its value, then without its key as well, with
    /// headers that say what was left out: for a dead letter too large for
    /// the DLQ. `None` once there is nothing left to leave out.
    fn without_payload(&self) -> Option<Record> {
        let mut smaller = self.clone();
        let (omitted, size_header, hash_header) = if let Some(v) = smaller.value.take() {
            (v, "value_omitted_bytes", "value_omitted_sha256")
        } else if let Some(k) = smaller.key.take() {
            (k, "key_omitted_bytes", "key_omitted_sha256")
        } else {
            return None;
        };
        smaller.headers.extend([
            (size_header, omitted.len().to_string().into_bytes()),
            (hash_header, hex(&Sha256::digest(&omitted)).into_bytes()),
        ]);
        Some(smaller)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What became of a record so far.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Pending,
    Acknowledged,
    /// The broker or the client refuses the record for what is in it.
    Refused(String),
}

/// A batch's records and what became of each: produced again by
/// [`KafkaSink::send`] only while not acknowledged, so a retry after an
/// outage re-sends exactly what failed.
#[derive(Debug, Default)]
pub struct Outbox {
    records: Vec<(Record, Fate)>,
}

impl Outbox {
    /// One push message per notification.
    pub fn pushes<'a>(notifications: impl Iterator<Item = &'a Notification>) -> Outbox {
        let records = notifications
            .map(|n| {
                let value = serde_json::to_vec(&PushMessage::from(n))
                    .expect("a push message always serializes");
                let record = Record {
                    topic_is_dlq: false,
                    campaign: Some(key_of(&n.campaign)),
                    key: Some(n.client_id.to_string().into_bytes()),
                    value: Some(value),
                    headers: Vec::new(),
                };
                (record, Fate::Pending)
            })
            .collect();
        Outbox { records }
    }

    /// Adds dead letters, after the pushes.
    pub fn add_dead_letters(&mut self, dead: &[DeadLetter]) {
        self.records.extend(dead.iter().map(|d| {
            let record = Record {
                topic_is_dlq: true,
                campaign: None,
                key: d.key.clone(),
                value: d.value.clone(),
                headers: d.headers(),
            };
            (record, Fate::Pending)
        }));
    }

    /// The campaigns whose push messages were refused for their content,
    /// with the reason.
    pub fn refused(&self) -> Refusals {
        let mut out = Refusals::new();
        for (record, fate) in &self.records {
            if let (Some(key), Fate::Refused(reason)) = (record.campaign, fate) {
                out.entry(key).or_insert_with(|| reason.clone());
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn pending(&self) -> usize {
        self.records
            .iter()
            .filter(|(_, f)| *f == Fate::Pending)
            .count()
    }

    /// Takes in one delivery report. A dead letter refused for its size is
    /// put back without its payload; any other refusal is kept for the
    /// caller. Returns the error of a report that failed otherwise.
    fn settle(&mut self, i: usize, report: Result<(), KafkaError>) -> Option<Failure> {
        let error = match report {
            Ok(()) => {
                self.records[i].1 = Fate::Acknowledged;
                return None;
            }
            Err(e) => Failure::Kafka(e),
        };
        if classify(&error) != Disposition::Refuse {
            return Some(error);
        }
        let (record, fate) = &mut self.records[i];
        if !record.topic_is_dlq {
            *fate = Fate::Refused(format!("the push topic refused it: {error}"));
            return None;
        }
        let too_large = matches!(
            &error,
            Failure::Kafka(e) if matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            )
        );
        if !too_large {
            // The DLQ refuses what the data cannot change (a compacted DLQ
            // refusing a record without a key, say): a setup for a person
            // to fix, waited out like an outage, never skipped.
            return Some(Failure::DlqRefused(format!(
                "{error}; check the DLQ topic's configuration"
            )));
        }
        match record.without_payload() {
            Some(smaller) => {
                tracing::warn!(%error, "a dead letter is too large for the DLQ; writing it without its payload");
                *record = smaller;
                None
            }
            // Headers alone refused: nothing the data can change.
            None => Some(Failure::DlqRefused(format!(
                "{error}, even without key and value"
            ))),
        }
    }
}

/// librdkafka's largest `message.max.bytes`: the DLQ producer's, so that the
/// broker, not the client, judges whether a dead letter fits.
const DLQ_MESSAGE_MAX_BYTES: &str = "1000000000";

/// What the producers are always set to, whatever `kafka.*` says: the
/// delivery guarantee.
pub const PRODUCER_GUARANTEE: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

/// The producers' defaults, each overridable with `kafka.<property>`.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "5"), ("compression.type", "lz4")];

pub struct KafkaSink {
    /// Made again by [`KafkaSink::renew`].
    producers: std::sync::RwLock<Producers>,
    /// The push producer's configuration.
    config: ClientConfig,
    output_topic: String,
    dlq_topic: String,
}

/// The two producers, cheap to clone (each is a handle to its client).
#[derive(Clone)]
struct Producers {
    /// Counts the renewals: a send renews only the producers it used.
    generation: u64,
    /// Push messages, within the `message.max.bytes` the decoder holds
    /// actions to.
    push: FutureProducer<Logged>,
    /// Dead letters: an input message too large for the pipeline is sent
    /// whole whenever the broker takes it.
    dlq: FutureProducer<Logged>,
}

impl Producers {
    fn new(config: &ClientConfig, generation: u64) -> Result<Producers, KafkaError> {
        let mut dlq = config.clone();
        dlq.set("message.max.bytes", DLQ_MESSAGE_MAX_BYTES);
        Ok(Producers {
            generation,
            push: config.create_with_context(Logged)?,
            dlq: dlq.create_with_context(Logged)?,
        })
    }
}

impl KafkaSink {
    pub fn new(settings: &Settings) -> Result<KafkaSink, KafkaError> {
        let mut config = kafka_config(settings);
        // Set after the pass-through: the delivery guarantee is not optional.
        for (k, v) in PRODUCER_GUARANTEE {
            config.set(*k, *v);
        }
        for (k, v) in PRODUCER_DEFAULTS {
            if !settings.kafka.contains_key(*k) {
                config.set(*k, *v);
            }
        }
        Ok(KafkaSink {
            producers: std::sync::RwLock::new(Producers::new(&config, 0)?),
            config,
            output_topic: settings.output_topic.clone(),
            dlq_topic: settings.dlq_topic.clone(),
        })
    }

    /// Replaces both producers, for records that timed out or were refused
    /// for their producer id or sequence on them (`used`, unless another send
    /// has replaced them already): librdkafka keeps an idempotent producer's
    /// id for the life of its client, and a broker that lost its state
    /// (tansu restarted on memory storage) fails every produce under that id
    /// with `UnknownProducerId` until the records time out, or with
    /// `OutOfOrderSequenceNumber` once it gave the same id to another
    /// client. Only a new client asks for a new id. Records still in flight on
    /// the old producers finish there; the last handle to them is dropped
    /// off the runtime's workers (a client's drop waits for its threads).
    fn renew(&self, used: u64) {
        let mut current = self.producers.write().expect("not poisoned");
        if current.generation != used {
            return;
        }
        match Producers::new(&self.config, used + 1) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *current, fresh);
                tokio::task::spawn_blocking(move || drop(old));
                tracing::warn!("the producers were made again, with a new producer id");
            }
            Err(error) => {
                tracing::warn!(%error, "the producers could not be made again")
            }
        }
    }

    /// Produces every record of `outbox` not yet acknowledged and waits for
    /// all their delivery reports. Ok once none is pending (each
    /// acknowledged, or refused for its content: see [`Outbox::refused`]).
    /// Otherwise the first error; the records acknowledged meanwhile stay
    /// acknowledged, so calling again re-sends only the rest.
    pub async fn send(&self, outbox: &mut Outbox) -> Result<(), Failure> {
        let producers = self.producers.read().expect("not poisoned").clone();
        let mut reports = FuturesUnordered::new();
        let mut failure = None;
        for i in 0..outbox.records.len() {
            if outbox.records[i].1 != Fate::Pending {
                continue;
            }
            let producer = if outbox.records[i].0.topic_is_dlq {
                &producers.dlq
            } else {
                &producers.push
            };
            loop {
                match producer.send_result(self.record(&outbox.records[i].0)) {
                    Ok(delivery) => {
                        reports.push(report(i, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // librdkafka's queue is full: take in a report first.
                        match reports.next().await {
                            Some((j, r)) => failure = failure.or(outbox.settle(j, r)),
                            None => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                        }
                    }
                    // Refused before it left (too large for the client, say).
                    Err((e, _)) => {
                        failure = failure.or(outbox.settle(i, Err(e)));
                        break;
                    }
                }
            }
        }
        while let Some((i, r)) = reports.next().await {
            failure = failure.or(outbox.settle(i, r));
        }
        let used = producers.generation;
        if self.producers.read().expect("not poisoned").generation != used {
            // Renewed meanwhile: this may be the last handle to the old ones.
            tokio::task::spawn_blocking(move || drop(producers));
        }
        match failure {
            Some(error) => {
                if needs_new_producers(&error) {
                    self.renew(used);
                }
                Err(error)
            }
            // A dead letter put back without its payload is produced again.
            None if outbox.pending() > 0 => Box::pin(self.send(outbox)).await,
            None => Ok(()),
        }
    }

    fn record<'a>(&'a self, r: &'a Record) -> FutureRecord<'a, [u8], [u8]> {
        let topic = if r.topic_is_dlq {
            &self.dlq_topic
        } else {
            &self.output_topic
        };
        let mut record = FutureRecord::to(topic);
        if !r.headers.is_empty() {
            let headers = r.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                })
            });
            record = record.headers(headers);
        }
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        record
    }
}

/// Whether `failure` calls for new producers (see [`KafkaSink::renew`]):
/// records that timed out, or a broker whose producer ids and sequences no
/// longer match the client's (after it lost its state, a new client of it
/// may even have been given the same id), which retrying on the same client
/// cannot mend.
fn needs_new_producers(failure: &Failure) -> bool {
    use RDKafkaErrorCode as C;
    let Failure::Kafka(e) = failure else {
        return false;
    };
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageTimedOut
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerEpoch
                | C::InvalidProducerIdMapping
        )
    )
}

/// A delivery report, tagged with its record's index.
async fn report(i: usize, delivery: DeliveryFuture) -> (usize, Result<(), KafkaError>) {
    let outcome = match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        // The producer went away before reporting: as good as a failure.
        Err(_) => Err(KafkaError::Canceled),
    };
    (i, outcome)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use promo_fanout_state::{Campaign, Progress};

    use super::*;

    fn notification(k: u128, client: u128) -> Notification {
        Notification {
            campaign: Arc::new(Campaign {
                action: Action {
                    restaurant_id: Uuid::from_u128(1),
                    adv_campaign_id: Uuid::from_u128(k),
                    adv_campaign_content: "deal".into(),
                    adv_campaign_owner: None,
                    adv_campaign_owner_contact: None,
                    adv_campaign_datetime_start: 0,
                    adv_campaign_datetime_end: 10,
                    datetime_created: 0,
                },
                progress: Progress::NotStarted,
                origin: None,
            }),
            client_id: Uuid::from_u128(client),
            trigger_datetime_created: 5,
        }
    }

    fn failed(code: RDKafkaErrorCode) -> Result<(), KafkaError> {
        Err(KafkaError::MessageProduction(code))
    }

    #[test]
    fn only_what_was_not_acknowledged_is_sent_again() {
        let pushes = [
            notification(5, 10),
            notification(5, 11),
            notification(6, 12),
        ];
        let mut outbox = Outbox::pushes(pushes.iter());
        assert_eq!(outbox.pending(), 3);
        assert!(outbox.settle(0, Ok(())).is_none());
        let outage = outbox.settle(1, failed(RDKafkaErrorCode::MessageTimedOut));
        assert!(outage.is_some(), "an outage is reported for a retry");
        assert!(outbox
            .settle(2, failed(RDKafkaErrorCode::MessageSizeTooLarge))
            .is_none());
        // Acknowledged and refused records are done; the timed-out one alone
        // is produced again.
        let pending: Vec<usize> = (0..3)
            .filter(|i| outbox.records[*i].1 == Fate::Pending)
            .collect();
        assert_eq!(pending, vec![1]);
        let refused = outbox.refused();
        assert_eq!(refused.len(), 1);
        assert!(refused[&(Uuid::from_u128(1), Uuid::from_u128(6))]
            .starts_with("the push topic refused it: kafka:"));
    }

    #[test]
    fn a_dead_letter_too_large_is_sent_again_without_its_payload() {
        let mut outbox = Outbox::default();
        outbox.add_dead_letters(&[DeadLetter {
            key: Some(b"k".to_vec()),
            value: Some(vec![b'x'; 2000]),
            error: "value: too large".into(),
            source_topic: "in".into(),
            origin: Some(Origin {
                partition: 0,
                offset: 7,
            }),
        }]);
        assert!(outbox
            .settle(0, failed(RDKafkaErrorCode::MessageSizeTooLarge))
            .is_none());
        let (record, fate) = &outbox.records[0];
        assert_eq!(*fate, Fate::Pending, "produced again");
        assert_eq!(record.value, None);
        assert_eq!(record.key.as_deref(), Some(&b"k"[..]));
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(header("value_omitted_bytes").as_deref(), Some("2000"));
        assert_eq!(header("value_omitted_sha256").map(|h| h.len()), Some(64));
        assert_eq!(header("source_offset").as_deref(), Some("7"));
        // Still too large: the key goes too; then nothing is left to leave out.
        assert!(outbox
            .settle(0, failed(RDKafkaErrorCode::MessageSizeTooLarge))
            .is_none());
        assert_eq!(outbox.records[0].0.key, None);
        let stuck = outbox.settle(0, failed(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(matches!(stuck, Some(Failure::DlqRefused(_))));
        assert_eq!(outbox.records[0].1, Fate::Pending, "never skipped");
    }

    #[test]
    fn a_dlq_that_refuses_a_record_for_anything_but_size_is_waited_out() {
        let mut outbox = Outbox::default();
        outbox.add_dead_letters(&[DeadLetter {
            key: None,
            value: Some(b"v".to_vec()),
            error: "bad".into(),
            source_topic: "in".into(),
            origin: None,
        }]);
        let error = outbox
            .settle(0, failed(RDKafkaErrorCode::InvalidRecord))
            .expect("reported");
        assert_eq!(
            crate::infra::retry::classify(&error),
            crate::infra::retry::Disposition::Retry
        );
        assert!(error
            .to_string()
            .starts_with("the DLQ refuses a dead letter: "));
        assert_eq!(outbox.records[0].1, Fate::Pending, "never skipped");
    }
}
