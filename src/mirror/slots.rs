//! The replication slots of the consumer group, each instance's mirror having
//! its own: listed by `promo-fanout group` and reported by every running
//! instance as `promo_fanout_slot_wal_kept_bytes{slot}`, so that a slot nobody
//! reads any more (a retired instance's) is seen before it fills the disk.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// One replication slot of the group.
#[derive(Debug)]
pub struct Slot {
    pub name: String,
    pub active: bool,
    /// WAL the slot keeps from being removed (current position − restart).
    pub wal_kept_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

const SLOTS: &str = "\
SELECT slot_name::text, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,
       wal_status
FROM pg_replication_slots WHERE database = current_database() ORDER BY slot_name";

/// How often a running instance reads the group's slots for the metric.
const REPORT_EVERY: Duration = Duration::from_secs(15);

/// The group's slots: those named with the group's prefix, and this
/// instance's own (`cdc-slot` may be named freely).
pub async fn group_slots(
    client: &tokio_postgres::Client,
    settings: &Settings,
) -> Result<Vec<Slot>, tokio_postgres::Error> {
    let prefix = settings.group_slot_prefix();
    Ok(client
        .query(SLOTS, &[])
        .await?
        .iter()
        .map(|r| Slot {
            name: r.get(0),
            active: r.get(1),
            wal_kept_bytes: r.get(2),
            wal_status: r.get(3),
        })
        .filter(|s| s.name.starts_with(&prefix) || settings.cdc_slot.as_ref() == Some(&s.name))
        .collect())
}

/// Sets `promo_fanout_slot_wal_kept_bytes` for each of the group's slots
/// every [`REPORT_EVERY`] until shutdown. A failed read is logged and tried
/// again at the next turn on a new connection: the metric is an aid, never a
/// reason to stop.
pub async fn report(settings: Settings, shutdown: CancellationToken) {
    let mut client = None;
    let mut reported = BTreeSet::new();
    loop {
        if client.is_none() {
            client = crate::sinks::postgres_connect(&settings.postgres_url)
                .await
                .inspect_err(|e| tracing::debug!(error = %e, "slot report: no connection"))
                .ok();
        }
        if let Some(c) = &client {
            match group_slots(c, &settings).await {
                Ok(slots) => reported = set_gauges(&slots, reported),
                Err(error) => {
                    tracing::debug!(%error, "slot report: query failed");
                    client = None;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}

/// Sets the gauge of each slot, and zeroes those of slots since dropped.
fn set_gauges(slots: &[Slot], before: BTreeSet<String>) -> BTreeSet<String> {
    let now: BTreeSet<String> = slots.iter().map(|s| s.name.clone()).collect();
    for gone in before.difference(&now) {
        metrics::gauge!("promo_fanout_slot_wal_kept_bytes", "slot" => gone.clone()).set(0.0);
    }
    for s in slots {
        metrics::gauge!("promo_fanout_slot_wal_kept_bytes", "slot" => s.name.clone())
            .set(s.wal_kept_bytes.unwrap_or(0) as f64);
    }
    now
}
