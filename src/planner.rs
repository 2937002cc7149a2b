//! The planner: input messages and the campaigns in memory → the next
//! [`Batch`]. It holds the campaigns, the fan-out's turn and the input
//! positions as they will stand once every batch planned so far is recorded,
//! so planning never waits for the sinks; the store is read only for the
//! mirror and the sent set.
//!
//! A planner covers the input partitions whose positions it is given, and
//! the campaigns of the store. Batches it plans are taken through the
//! delivery order by a [`Committer`](crate::checkpoint::Committer).

use std::collections::BTreeMap;
use std::sync::Arc;

use promo_fanout_state::{Origin, Store, StoreError};
use uuid::Uuid;

use crate::action::{self, Limits};
use crate::checkpoint::{Batch, Version};
use crate::config::Settings;
use crate::fanout::{self, Arrival, CampaignKey, Campaigns, Rules};
use crate::sinks::DeadLetter;
use crate::source::InputMessage;

/// Late-subscriber markers: restaurant, client, marker sequence.
pub type Markers = Vec<(Uuid, Uuid, u64)>;

/// A batch's input messages, decoded.
#[derive(Debug, Default)]
pub struct Intake {
    arrivals: Vec<Arrival>,
    dead: Vec<DeadLetter>,
    /// The positions once these messages are handled.
    positions: BTreeMap<i32, i64>,
    /// Messages read, not counting any handled before.
    messages: u64,
}

pub struct Planner {
    store: Arc<Store>,
    campaigns: Campaigns,
    turn: Option<CampaignKey>,
    positions: BTreeMap<i32, i64>,
    /// A batch took as many late-subscriber markers as it could: more wait.
    more_late: bool,
    limits: Limits,
    /// Seconds before a campaign's end at which it stops fanning out.
    margin: i64,
    /// Seconds after a campaign's end its sent entries are kept.
    retention: i64,
    /// Notifications (and late markers) per batch at most.
    budget: usize,
    input_topic: String,
}

impl Planner {
    /// A planner for the partitions of `positions` (the next offset of
    /// each), with the campaigns the store holds.
    pub fn new(
        settings: &Settings,
        store: Arc<Store>,
        positions: BTreeMap<i32, i64>,
    ) -> Result<Planner, StoreError> {
        let campaigns = store
            .campaigns()?
            .into_iter()
            .map(|c| (fanout::key_of(&c), Arc::new(c)))
            .collect();
        Ok(Planner {
            store,
            campaigns,
            turn: None,
            positions,
            more_late: false,
            limits: Limits::new(
                settings.max_message_bytes,
                crate::sinks::producer_max_bytes(settings),
            ),
            margin: settings.expiry_margin.as_secs() as i64,
            retention: settings.sent_retention.as_secs() as i64,
            budget: settings.chunk_size,
            input_topic: settings.input_topic.clone(),
        })
    }

    /// Whether there is work without new input: a campaign whose fan-out
    /// is under way or due, or late subscribers a batch could not all take.
    pub fn busy(&self, now: i64) -> bool {
        self.more_late
            || self
                .campaigns
                .values()
                .any(|c| fanout::awaits_fan_out(c, now, self.margin))
    }

    /// Decodes a batch's messages. A message below the planned position was
    /// handled already (the broker delivered it again) and is skipped; bad
    /// input becomes a dead letter with the reason.
    pub fn intake(&self, messages: Vec<InputMessage>) -> Intake {
        let mut intake = Intake {
            positions: self.positions.clone(),
            ..Intake::default()
        };
        for m in messages {
            if intake
                .positions
                .get(&m.partition)
                .is_some_and(|next| m.offset < *next)
            {
                tracing::debug!(
                    partition = m.partition,
                    offset = m.offset,
                    "skipping a message already handled"
                );
                continue;
            }
            intake.messages += 1;
            intake.positions.insert(m.partition, m.offset + 1);
            let origin = Origin {
                partition: m.partition,
                offset: m.offset,
            };
            match action::decode(m.value.as_deref(), &self.limits) {
                Ok(action) => intake.arrivals.push(Arrival { action, origin }),
                Err(invalid) => {
                    tracing::warn!(partition = m.partition, offset = m.offset, error = %invalid, "bad input; sending it to the DLQ");
                    intake.dead.push(DeadLetter {
                        key: m.key,
                        value: m.value,
                        error: invalid.0,
                        source_topic: self.input_topic.clone(),
                        origin: Some(origin),
                    });
                }
            }
        }
        intake
    }

    /// The late-subscriber markers the next batch takes. They are decided
    /// against what is recorded, so the caller reads them with no batch in
    /// flight (see [`crate::pipeline`]).
    pub fn late_markers(&self) -> Result<Markers, StoreError> {
        self.store.late_subscribers(self.budget)
    }

    /// Plans the next batch and moves the planner's state past it; `None`
    /// when the batch would change nothing.
    pub fn plan(
        &mut self,
        intake: Intake,
        markers: Markers,
        now: i64,
    ) -> Result<Option<Batch>, StoreError> {
        let rules = Rules {
            now,
            margin: self.margin,
            retention: self.retention,
            budget: self.budget,
        };
        let mut plan = fanout::plan(
            &*self.store,
            &self.campaigns,
            &intake.arrivals,
            rules,
            self.turn,
        )?;
        // Subscribers the mirror saw arrive, against the campaigns as they
        // stood before this batch (the plan's own scans cover the rest).
        let late = fanout::late(&*self.store, &self.campaigns, &markers, &rules)?;
        self.more_late = markers.len() >= self.budget;
        let batch = Batch {
            late_notifications: late.len() as u64,
            plan: {
                plan.notifications.extend(late);
                plan
            },
            dead: intake.dead,
            positions: intake.positions,
            late: markers,
            messages: intake.messages,
        };
        if batch.plan.is_empty()
            && batch.dead.is_empty()
            && batch.messages == 0
            && batch.late.is_empty()
        {
            return Ok(None);
        }
        for (k, c) in &batch.plan.puts {
            self.campaigns.insert(*k, c.clone());
        }
        for k in &batch.plan.deletes {
            self.campaigns.remove(k);
        }
        self.turn = batch.plan.next_turn.or(self.turn);
        self.positions = batch.positions.clone();
        let pending = self
            .campaigns
            .values()
            .filter(|c| fanout::awaits_fan_out(c, now, self.margin))
            .count();
        metrics::gauge!("promo_fanout_fanout_pending_campaigns").set(pending as f64);
        metrics::gauge!("promo_fanout_campaigns_stored").set(self.campaigns.len() as f64);
        Ok(Some(batch))
    }

    /// Campaign versions the sinks refused are planned no more, unless a
    /// later action for the same ids has replaced them.
    pub fn forget(&mut self, refused: &[Version]) {
        for (key, origin) in refused {
            if self.campaigns.get(key).is_some_and(|c| c.origin == *origin) {
                self.campaigns.remove(key);
            }
        }
    }
}
