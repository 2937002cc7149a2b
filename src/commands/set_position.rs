//! `promo-fanout state set-position`: an operator's way past an input message
//! the service should not process (or back to one it should process again).
//! It moves the partition's durable position in Postgres, which every
//! instance restores the partition from, so it holds whichever instance
//! takes the partition next.

use std::fmt;
use std::time::Duration;

use promo_fanout_state::Store;

use crate::config::Settings;
use crate::source::Source;

/// What `set-position` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub topic: String,
    pub partition: i32,
    /// The stored next offset before, if the partition had one.
    pub old: Option<i64>,
    pub new: i64,
}

impl fmt::Display for Moved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Moved {
            topic,
            partition,
            old,
            new,
        } = self;
        match old {
            None => write!(
                f,
                "{topic} partition {partition}: no recorded position; now {new} (the service \
                 starts there instead of at the group's committed offset)"
            ),
            Some(old) if new > old => write!(
                f,
                "{topic} partition {partition}: position {old} -> {new}; skips {} message(s), \
                 offsets {old} to {}",
                new - old,
                new - 1
            ),
            Some(old) if new < old => write!(
                f,
                "{topic} partition {partition}: position {old} -> {new}; processes {} \
                 message(s) again, offsets {new} to {} (the sent set keeps anyone from being \
                 notified twice)",
                old - new,
                old - 1
            ),
            Some(old) => write!(f, "{topic} partition {partition}: position {old} unchanged"),
        }
    }
}

/// Who `promo-fanout group` shows as the partition's holder after a move:
/// no instance holds it until one takes it again.
const OWNER: &str = "set-position";

/// Moves the partition's recorded position, making every holder's state of
/// it stale: a new epoch fences a running holder's batches (it takes the
/// partition again), and a new version makes whichever instance takes it
/// next read its state back from Postgres, the new position included. The
/// old one is `None` if no batch of the partition was ever recorded.
const MOVE: &str = "\
INSERT INTO promo_fanout_partitions AS p
    (group_id, topic, partition, epoch, version, next_offset, owner, recorded_at)
VALUES ($1, $2, $3, 1, 1, $4, $5, now())
ON CONFLICT (group_id, topic, partition) DO UPDATE
    SET epoch = p.epoch + 1, version = p.version + 1, next_offset = EXCLUDED.next_offset,
        owner = EXCLUDED.owner, taken_at = now(), recorded_at = now()";

/// The recorded position before the move: no row if the partition was never
/// taken, `NULL` if no batch of it was recorded.
const BEFORE: &str = "\
SELECT next_offset FROM promo_fanout_partitions
WHERE group_id = $1 AND topic = $2 AND partition = $3
FOR UPDATE";

/// Moves the recorded input position of `partition` to `offset` (the next
/// message to read) in Postgres, where every instance restores a partition
/// from: it holds whichever instance takes the partition next. Refuses a
/// negative offset, a partition the input topic does not have, and a
/// `--state-dir` whose store a running service holds.
pub async fn set_position(
    settings: &Settings,
    partition: i32,
    offset: i64,
) -> anyhow::Result<Moved> {
    anyhow::ensure!(partition >= 0, "--partition {partition}: must be 0 or more");
    anyhow::ensure!(offset >= 0, "--offset {offset}: must be 0 or more");
    // A service on this host holding its store is refused up front; one
    // elsewhere is fenced by the move.
    let dir = settings.state_dir();
    let _held = (dir.join("CURRENT").exists())
        .then(|| Store::open(dir, &crate::pipeline::identity(settings)))
        .transpose()?;
    let mut client = super::connect(&settings.postgres_url).await?;
    let tx = client.transaction().await?;
    let (group, topic) = (&settings.group_id, &settings.input_topic);
    let before = tx.query_opt(BEFORE, &[group, topic, &partition]).await?;
    if before.is_none() {
        // Never taken: the topic may not have the partition at all.
        ensure_partition_exists(settings, partition)?;
    }
    tx.execute(MOVE, &[group, topic, &partition, &offset, &OWNER])
        .await?;
    let old = before.and_then(|row| row.get(0));
    tx.commit().await?;
    Ok(Moved {
        topic: settings.input_topic.clone(),
        partition,
        old,
        new: offset,
    })
}

/// Asks the brokers whether the input topic has `partition`.
fn ensure_partition_exists(settings: &Settings, partition: i32) -> anyhow::Result<()> {
    let topic = &settings.input_topic;
    let partitions = Source::new(settings)?
        .partitions(Duration::from_secs(10))
        .map_err(|e| {
            anyhow::anyhow!(
                "partition {partition} of {topic} has no recorded position, and the brokers \
                 at {} could not say whether the topic has it: {e}",
                settings.brokers
            )
        })?;
    anyhow::ensure!(
        partitions.contains(&partition),
        "{topic} has no partition {partition} (it has {}): nothing moved",
        partitions.len()
    );
    Ok(())
}
