//! `promo-fanout state set-position`: an operator's way past an input message
//! the service should not process (or back to one it should process again),
//! with the service stopped.

use std::fmt;

use promo_fanout_state::{Commit, Store};

use crate::config::Settings;

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
                "{topic} partition {partition}: no stored position; now {new} (the service \
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

/// Moves the stored input position of `partition` to `offset` (the next
/// message to read). Refuses a store another process holds (a running
/// service), a store that does not exist, and a negative offset.
pub fn set_position(settings: &Settings, partition: i32, offset: i64) -> anyhow::Result<Moved> {
    anyhow::ensure!(partition >= 0, "--partition {partition}: must be 0 or more");
    anyhow::ensure!(offset >= 0, "--offset {offset}: must be 0 or more");
    let dir = settings.state_dir();
    anyhow::ensure!(
        dir.join("CURRENT").exists(),
        "no state store at {}: pass --state-dir",
        dir.display()
    );
    let store = Store::open(dir, &crate::pipeline::identity(settings))?;
    let old = store.input_positions()?.get(&partition).copied();
    let mut commit = Commit::new();
    commit.set_input_position(partition, offset);
    store.commit(commit)?;
    Ok(Moved {
        topic: settings.input_topic.clone(),
        partition,
        old,
        new: offset,
    })
}
