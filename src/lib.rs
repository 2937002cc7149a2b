//! promo-fanout: restaurant promotions fanned out to their subscribers, to
//! Kafka and Postgres, crash-safe. The data path, top to bottom:
//! [`source`] → [`action`] → [`planner`] ([`fanout`] over the [`mirror`]) →
//! [`checkpoint`] ([`sinks`], then the store), driven by [`pipeline`].
//! Beside it: [`config`], [`infra`] and the [`commands`] besides `run`.

pub mod action;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod fanout;
pub mod infra;
pub mod mirror;
pub mod partitions;
pub mod pipeline;
pub mod planner;
pub mod sinks;
pub mod source;
