//! The two sinks every notification must reach before anything is committed.

mod kafka;
mod postgres;

pub use kafka::{
    kafka_config, log as kafka_log, producer_max_bytes, push_message_len, DeadLetter, KafkaSink,
    Logged, Outbox, PushMessage, PRODUCER_DEFAULTS, PRODUCER_GUARANTEE,
};
pub use postgres::{
    action_of, connect as postgres_connect, unix, FeedbackSink, Open, Refusals, ACTION_COLUMNS,
    ACTION_COLUMN_COUNT, COPY as FEEDBACK_COPY, COPY_TYPES as FEEDBACK_COPY_TYPES,
};
