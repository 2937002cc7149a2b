//! promo-fanout: restaurant promotions fanned out to their subscribers, to
//! Kafka and Postgres, crash-safe. The data path, top to bottom:
//! [`source`] → [`mirror`] → [`fanout`] → [`sinks`] → [`checkpoint`], driven
//! by [`pipeline`].

pub mod action;
pub mod cdc;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod demo;
pub mod dump;
pub mod failpoint;
pub mod fanout;
pub mod health;
pub mod migrate;
pub mod mirror;
pub mod pgoutput;
pub mod pipeline;
pub mod rebuild;
pub mod retry;
pub mod set_position;
pub mod sinks;
pub mod source;
