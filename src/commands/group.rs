//! `promo-fanout group`: the consumer group's instances as Postgres sees
//! them: who holds each input partition, and each instance's replication
//! slot with the WAL it keeps.

use std::fmt;

use crate::config::Settings;
use crate::mirror::slots::{group_slots, Slot};

/// One input partition's durable state.
#[derive(Debug)]
pub struct Partition {
    pub partition: i32,
    pub owner: String,
    pub epoch: i64,
    pub version: i64,
    pub next_offset: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub partitions: Vec<Partition>,
    pub slots: Vec<Slot>,
}

const PARTITIONS: &str = "\
SELECT partition, owner, epoch, version, next_offset FROM promo_fanout_partitions
WHERE group_id = $1 AND topic = $2 ORDER BY partition";

pub async fn group(settings: &Settings) -> anyhow::Result<Report> {
    let client = super::connect(&settings.postgres_url).await?;
    let rows = client
        .query(PARTITIONS, &[&settings.group_id, &settings.input_topic])
        .await?;
    let partitions = rows
        .iter()
        .map(|r| Partition {
            partition: r.get(0),
            owner: r.get(1),
            epoch: r.get(2),
            version: r.get(3),
            next_offset: r.get(4),
        })
        .collect();
    let slots = group_slots(&client, settings).await?;
    Ok(Report { partitions, slots })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "partition  owner            epoch  version  next_offset")?;
        for p in &self.partitions {
            let next = p.next_offset.map_or("-".to_owned(), |n| n.to_string());
            writeln!(
                f,
                "{:<10} {:<16} {:>5} {:>8} {:>12}",
                p.partition, p.owner, p.epoch, p.version, next
            )?;
        }
        writeln!(
            f,
            "\nslot                                      active  wal_kept_bytes  wal_status"
        )?;
        for s in &self.slots {
            let kept = s.wal_kept_bytes.map_or("-".to_owned(), |n| n.to_string());
            let status = s.wal_status.as_deref().unwrap_or("-");
            writeln!(f, "{:<41} {:<7} {:>14}  {status}", s.name, s.active, kept)?;
        }
        Ok(())
    }
}
