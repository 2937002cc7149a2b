//! The planner: input messages and the campaigns in memory → the next
//! [`Batch`]. It holds the campaigns, the fan-out's turn and the input
//! positions as they will stand once every batch planned so far is recorded,
//! so planning never waits for the sinks; the store is read only for the
//! mirror and the sent set.
//!
//! A planner covers the input partitions whose positions it is given, and
//! the campaigns of the store. Batches it plans are taken through the
//! delivery order by a [`Committer`](crate::checkpoint::Committer).

use std::collections::{BTreeMap, VecDeque};
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

impl Intake {
    /// Messages read, not counting any handled before.
    pub fn messages(&self) -> u64 {
        self.messages
    }
}

/// What the batches planned but not yet recorded hold, so that late
/// subscribers are decided without waiting for them: the markers they took
/// and the (campaign, client) pairs they notify.
///
/// Every notification passes through `notified` twice (planned, recorded):
/// its maps hash with foldhash, not the standard library's SipHash, which
/// made this bookkeeping a tenth of the service's own CPU under load
/// (`perf record`, 2026-11-24).
#[derive(Debug, Default)]
struct InFlight {
    /// Per batch, in the order planned (and recorded).
    batches: VecDeque<(Markers, Vec<(CampaignKey, Uuid)>)>,
    markers: foldhash::HashSet<(Uuid, Uuid, u64)>,
    notified: foldhash::HashMap<(CampaignKey, Uuid), usize>,
}

impl InFlight {
    fn planned(&mut self, batch: &Batch) {
        let notified: Vec<(CampaignKey, Uuid)> = batch
            .plan
            .notifications
            .iter()
            .map(|n| (fanout::key_of(&n.campaign), n.client_id))
            .collect();
        for pair in &notified {
            *self.notified.entry(*pair).or_default() += 1;
        }
        self.markers.extend(batch.late.iter().copied());
        self.batches.push_back((batch.late.clone(), notified));
    }

    /// The oldest batch planned has been recorded.
    fn recorded(&mut self) {
        let Some((markers, notified)) = self.batches.pop_front() else {
            return;
        };
        for m in &markers {
            self.markers.remove(m);
        }
        for pair in notified {
            if let Some(n) = self.notified.get_mut(&pair) {
                *n -= 1;
                if *n == 0 {
                    self.notified.remove(&pair);
                }
            }
        }
    }
}

pub struct Planner {
    store: Arc<Store>,
    in_flight: InFlight,
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
            .filter(|c| positions.contains_key(&c.partition()))
            .map(|c| (fanout::key_of(&c), Arc::new(c)))
            .collect();
        Ok(Planner {
            store,
            in_flight: InFlight::default(),
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
            let Some(next) = intake.positions.get(&m.partition) else {
                // Fetched before its partition was revoked: its new holder
                // reads it.
                continue;
            };
            if m.offset < *next {
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

    /// The late-subscriber markers the next batch takes: those no batch in
    /// flight has taken.
    /// None while the planner holds no partition: there is no campaign to
    /// tell, and the markers wait for the partitions to come.
    pub fn late_markers(&self) -> Result<Markers, StoreError> {
        if self.positions.is_empty() {
            return Ok(Markers::new());
        }
        let taken = &self.in_flight.markers;
        let mut markers = self.store.late_subscribers(self.budget + taken.len())?;
        markers.retain(|m| !taken.contains(m));
        markers.truncate(self.budget);
        Ok(markers)
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
        let notified = &self.in_flight.notified;
        let late = fanout::late(&*self.store, &self.campaigns, &markers, &rules, |k, c| {
            notified.contains_key(&(*k, c))
        })?;
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
        self.in_flight.planned(&batch);
        let pending = self
            .campaigns
            .values()
            .filter(|c| fanout::awaits_fan_out(c, now, self.margin))
            .count();
        metrics::gauge!("promo_fanout_fanout_pending_campaigns").set(pending as f64);
        metrics::gauge!("promo_fanout_campaigns_stored").set(self.campaigns.len() as f64);
        Ok(Some(batch))
    }

    /// The oldest batch planned has been recorded (batches are recorded in
    /// the order planned): what it holds is in the store now.
    pub fn recorded(&mut self) {
        self.in_flight.recorded();
    }

    /// Takes on `partitions` from their positions, with the campaigns the
    /// store holds for them (restored by their take).
    pub fn adopt(&mut self, positions: &BTreeMap<i32, i64>) -> Result<(), StoreError> {
        for c in self.store.campaigns()? {
            if positions.contains_key(&c.partition()) {
                self.campaigns.insert(fanout::key_of(&c), Arc::new(c));
            }
        }
        self.positions.extend(positions);
        Ok(())
    }

    /// Plans nothing more for `partitions`: their campaigns and positions
    /// are dropped (the batches already planned still deliver them).
    pub fn release(&mut self, partitions: &[i32]) {
        self.campaigns
            .retain(|_, c| !partitions.contains(&c.partition()));
        for p in partitions {
            self.positions.remove(p);
        }
    }

    /// The input partitions this planner covers.
    pub fn partitions(&self) -> Vec<i32> {
        self.positions.keys().copied().collect()
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
