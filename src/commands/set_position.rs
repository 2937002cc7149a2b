//! `promo-fanout state set-position`: an operator's way past an input message
//! the service should not process (or back to one it should process again).
//! It moves the partition's durable position in Postgres, which every
//! instance restores the partition from, so it holds whichever instance
//! takes the partition next.

use std::fmt;
use std::time::Duration;

use promo_fanout_state::Store;

use crate::config::Settings;
use crate::partitions::{self, Scope};
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

/// Moves the recorded input position of `partition` to `offset` (the next
/// message to read) in Postgres, where every instance restores a partition
/// from: it holds whichever instance takes the partition next. Refuses a
/// negative offset, a partition the input topic does not have, a
/// `--state-dir` whose store a running service holds, and one whose state of
/// the partition is not in Postgres yet.
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
    let store = (dir.join("CURRENT").exists())
        .then(|| Store::open(dir, &crate::pipeline::identity(settings)))
        .transpose()?;
    let mut client = super::connect(&settings.postgres_url).await?;
    let tx = client.transaction().await?;
    let scope = Scope::of(settings);
    let before = partitions::recorded(&tx, &scope, partition).await?;
    if before.is_none() {
        // Nothing recorded: the topic may not have the partition, and a
        // store from before the state was kept in Postgres may hold
        // campaigns of it that its first start writes there (seeds).
        ensure_partition_exists(settings, partition)?;
        if let Some(stored) = store.as_ref().map(|s| s.input_positions()).transpose()? {
            anyhow::ensure!(
                !stored.contains_key(&partition),
                "{} holds partition {partition}'s state, which is not in Postgres yet: start \
                 the service once so that it records it, stop it, then move the position",
                dir.display()
            );
        }
    }
    partitions::move_position(&tx, &scope, partition, offset).await?;
    tx.commit().await?;
    Ok(Moved {
        topic: settings.input_topic.clone(),
        partition,
        old: before.flatten(),
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
