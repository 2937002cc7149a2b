//! The push topic and the dead-letter topic: an idempotent producer with
//! `acks=all`, and every delivery report awaited before a batch counts as sent.

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;
use uuid::Uuid;

use crate::config::Settings;
use crate::fanout::Notification;
use crate::retry::SinkError;

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

/// A bad input message on its way to the DLQ, bytes unchanged.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub error: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// The push message's JSON shape.
#[derive(Debug, Serialize)]
pub struct PushMessage<'a> {
    pub restaurant_id: Uuid,
    pub adv_campaign_id: Uuid,
    pub adv_campaign_content: &'a str,
    pub adv_campaign_owner: Option<&'a str>,
    pub adv_campaign_owner_contact: Option<&'a str>,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub datetime_created: i64,
    pub client_id: Uuid,
    pub trigger_datetime_created: i64,
}

impl<'a> From<&'a Notification> for PushMessage<'a> {
    fn from(n: &'a Notification) -> Self {
        let c = &n.campaign;
        PushMessage {
            restaurant_id: c.restaurant_id,
            adv_campaign_id: c.adv_campaign_id,
            adv_campaign_content: &c.adv_campaign_content,
            adv_campaign_owner: c.adv_campaign_owner.as_deref(),
            adv_campaign_owner_contact: c.adv_campaign_owner_contact.as_deref(),
            adv_campaign_datetime_start: c.adv_campaign_datetime_start,
            adv_campaign_datetime_end: c.adv_campaign_datetime_end,
            datetime_created: c.datetime_created,
            client_id: n.client_id,
            trigger_datetime_created: n.trigger_datetime_created,
        }
    }
}

pub struct KafkaSink {
    producer: FutureProducer,
    output_topic: String,
    dlq_topic: String,
}

impl KafkaSink {
    pub fn new(settings: &Settings) -> Result<KafkaSink, KafkaError> {
        let mut config = kafka_config(settings);
        // Set after the pass-through: the delivery guarantee is not optional.
        config.set("enable.idempotence", "true").set("acks", "all");
        for (k, v) in [("linger.ms", "5"), ("compression.type", "lz4")] {
            if !settings.kafka.contains_key(k) {
                config.set(k, v);
            }
        }
        Ok(KafkaSink {
            producer: config.create()?,
            output_topic: settings.output_topic.clone(),
            dlq_topic: settings.dlq_topic.clone(),
        })
    }

    /// Produces every push message and dead letter and waits for all their
    /// delivery reports; the first failure fails the whole call.
    pub async fn deliver(
        &self,
        pushes: &[Notification],
        dead: &[DeadLetter],
    ) -> Result<(), SinkError> {
        let encoded: Vec<(String, Vec<u8>)> = pushes
            .iter()
            .map(|n| {
                let body = serde_json::to_vec(&PushMessage::from(n))
                    .expect("a push message always serializes");
                (n.client_id.to_string(), body)
            })
            .collect();
        let mut pending = FuturesUnordered::new();
        for (key, body) in &encoded {
            let record = FutureRecord::to(&self.output_topic)
                .key(key.as_bytes())
                .payload(body.as_slice());
            self.enqueue(record, &mut pending).await?;
        }
        for d in dead {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "error",
                    value: Some(d.error.as_bytes()),
                })
                .insert(Header {
                    key: "source_topic",
                    value: Some(d.source_topic.as_bytes()),
                })
                .insert(Header {
                    key: "source_partition",
                    value: Some(d.source_partition.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "source_offset",
                    value: Some(d.source_offset.to_string().as_bytes()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.dlq_topic).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &d.value {
                record = record.payload(v.as_slice());
            }
            self.enqueue(record, &mut pending).await?;
        }
        while let Some(report) = pending.next().await {
            check(report)?;
        }
        Ok(())
    }

    /// Hands one record to librdkafka, waiting for earlier deliveries while
    /// its queue is full.
    async fn enqueue<'a>(
        &self,
        mut record: FutureRecord<'a, [u8], [u8]>,
        pending: &mut FuturesUnordered<DeliveryFuture>,
    ) -> Result<(), SinkError> {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.next().await {
                        Some(report) => check(report)?,
                        None => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => return Err(SinkError::Kafka(e)),
            }
        }
    }
}

fn check(
    report: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(), SinkError> {
    match report {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(SinkError::Kafka(e)),
        Err(_) => Err(SinkError::Kafka(KafkaError::Canceled)),
    }
}
