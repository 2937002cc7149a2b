//! The test harness: a fresh database and fresh topics per test on the real
//! local Postgres and the real broker started by `scripts/test.sh`, the real
//! `promo-fanout` binary, and waits on conditions rather than sleeps.
//!
//! By concern: [`database`] (scratch databases), [`broker`] (topics,
//! producing and reading, a private broker), [`service`] (the binary as a
//! child process), [`proxy`] (a connection a test can cut).

#![allow(dead_code)]

pub mod broker;
pub mod database;
pub mod proxy;
pub mod service;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

// Each test file uses some of the harness.
#[allow(unused_imports)]
pub use {broker::*, database::*, proxy::*, service::*};

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A size from the environment (a test run larger by hand), else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Polls `check` until it returns `Some`, failing the test with `what` after
/// `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An action as the spec's JSON, valid between `start` and `end`.
pub fn action(restaurant: Uuid, campaign: Uuid, start: i64, end: i64) -> Value {
    json!({
        "restaurant_id": restaurant.to_string(),
        "adv_campaign_id": campaign.to_string(),
        "adv_campaign_content": format!("campaign {campaign}"),
        "adv_campaign_owner": "Ivan Ivanov",
        "adv_campaign_owner_contact": "ivan@example.com",
        "adv_campaign_datetime_start": start,
        "adv_campaign_datetime_end": end,
        "datetime_created": start - 10,
    })
}

/// An action running now for an hour.
pub fn live_action(restaurant: Uuid, campaign: Uuid) -> Value {
    action(restaurant, campaign, now() - 60, now() + 3600)
}
