//! What the data path stands on: the clock, crash points for tests, health
//! and metrics, and the one place that tells an outage from bad data.

pub mod clock;
pub mod failpoint;
pub mod health;
pub mod process;
pub mod retry;
pub mod scratch_db;
pub mod tls;
