//! Prints a topic as JSON lines (partition, offset, key, headers, value), for
//! looking at the push topic and the DLQ by hand. The Debian `kcat` links
//! librdkafka 2.0.2, which cannot read the tansu broker's ApiVersion reply;
//! this uses the same librdkafka as the service.
//!
//! `cargo run --example topic -- BROKERS TOPIC [produce]`: with `produce`,
//! sends each line of stdin as a message instead.

use std::io::BufRead;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [brokers, topic, rest @ ..] = args.as_slice() else {
        eprintln!("usage: topic BROKERS TOPIC [produce]");
        std::process::exit(2);
    };
    if rest.first().map(String::as_str) == Some("produce") {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            producer
                .send(BaseRecord::<(), str>::to(topic).payload(&line))
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(10))?;
        return Ok(());
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "promo-fanout-topic-example")
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    while let Some(m) = consumer.poll(Duration::from_secs(2)) {
        let m = m?;
        let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
        let headers: serde_json::Map<String, serde_json::Value> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), text(h.value).into()))
                    .collect()
            })
            .unwrap_or_default();
        let value = text(m.payload());
        let value = value
            .as_deref()
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .unwrap_or_else(|| value.clone().into());
        println!(
            "{}",
            serde_json::json!({
                "partition": m.partition(), "offset": m.offset(),
                "key": text(m.key()), "headers": headers, "value": value,
            })
        );
    }
    Ok(())
}
