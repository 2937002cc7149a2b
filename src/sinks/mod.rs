//! The two sinks every notification must reach before anything is committed.

mod kafka;
mod postgres;

pub use kafka::{kafka_config, DeadLetter, KafkaSink, PushMessage};
pub use postgres::{connect as postgres_connect, unix, FeedbackSink};
