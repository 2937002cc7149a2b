//! The delivery order: [`Checkpoint::deliver`] then [`Checkpoint::record`]
//! make a batch durable everywhere or nowhere.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use promo_fanout_state::{Campaign, Commit, Origin, Store};
use tokio::sync::watch;

use crate::fanout::{key_of, CampaignKey, Notification, Plan};
use crate::health::Health;
use crate::retry::{until_done, SinkError, Stopped};
use crate::sinks::{DeadLetter, FeedbackSink, KafkaSink, Outbox, Refusals};
use crate::source::Source;

/// One batch, decided and ready to be made durable.
#[derive(Debug, Default)]
pub struct Batch {
    /// Campaign changes and notifications.
    pub plan: Plan,
    /// Bad input, for the DLQ.
    pub dead: Vec<DeadLetter>,
    /// The next offset to read per input partition once this batch is done.
    pub positions: BTreeMap<i32, i64>,
    /// Late-subscriber markers this batch has handled (restaurant, client,
    /// marker): cleared with its sent entries.
    pub late: Vec<(uuid::Uuid, uuid::Uuid, u64)>,
}

/// A campaign as one action made it: its ids and the message that carried
/// that action. A later action for the same ids is a new version.
pub type Version = (CampaignKey, Option<Origin>);

fn version(c: &Campaign) -> Version {
    (key_of(c), c.origin)
}

/// The campaign versions the sinks have refused since start, shared by every
/// delivery and the recorder. Batches planned before the planner heard of a
/// refusal still carry the refused version: their deliveries leave it out
/// at each sink, and the recorder leaves it out of the store. A later
/// action for the same ids is a new version and goes through.
#[derive(Debug, Default)]
pub struct Refused {
    versions: std::sync::Mutex<BTreeSet<Version>>,
    /// The versions already dead-lettered, so that each is written once.
    lettered: std::sync::Mutex<BTreeSet<Version>>,
}

impl Refused {
    fn contains(&self, c: &Campaign) -> bool {
        self.versions
            .lock()
            .expect("not poisoned")
            .contains(&version(c))
    }

    fn insert(&self, c: &Campaign) {
        self.versions
            .lock()
            .expect("not poisoned")
            .insert(version(c));
    }

    /// True the first time `v` is to be dead-lettered.
    fn first_letter(&self, v: Version) -> bool {
        self.lettered.lock().expect("not poisoned").insert(v)
    }
}

/// The sinks, the store and the source a batch is committed to.
pub struct Checkpoint {
    pub feedback: FeedbackSink,
    pub kafka: KafkaSink,
    pub store: Arc<Store>,
    pub health: Arc<Health>,
    /// Seconds after a campaign's end its sent entries are kept.
    pub sent_retention: i64,
    /// The input topic, named in the dead letters of refused campaigns.
    pub input_topic: String,
    pub refused: Refused,
}

impl Checkpoint {
    /// Steps 1–3 of the delivery order, which lets a crash at any instant
    /// lose nothing and repeat nothing in Postgres (SPEC §3). The pipeline
    /// runs the deliveries of up to `pipeline-depth` batches at once and
    /// [records](Checkpoint::record) them one at a time, in order.
    ///
    /// 1. read and validate: done by the caller, bad messages are `batch.dead`;
    /// 2. decide recipients: done by the caller, `batch.plan`;
    /// 3. write the feedback rows to Postgres (one transaction, `ON CONFLICT DO
    ///    NOTHING`), leaving out the campaigns Postgres refuses for their
    ///    content; then produce the push messages of the rest and the dead
    ///    letters to Kafka (idempotent producer, `acks=all`, every delivery
    ///    report awaited). Postgres goes first so that a campaign it refuses
    ///    reaches no client. Each is retried with backoff until it succeeds
    ///    (Kafka re-sends only the records not acknowledged), and the batch is
    ///    not recorded before. The refused campaigns are returned, with the
    ///    reason, for `record` to dead-letter.
    pub async fn deliver(
        &self,
        batch: &Batch,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Refusals, Stopped> {
        let notifications: Vec<&Notification> = batch
            .plan
            .notifications
            .iter()
            .filter(|n| !self.refused.contains(&n.campaign))
            .collect();
        let mut refused = Refusals::new();
        if !notifications.is_empty() {
            refused = until_done(
                "postgres",
                || self.feedback.write(&notifications),
                &mut shutdown.clone(),
                |ok| self.health.feedback.set_ok(ok),
            )
            .await?;
        }
        crate::failpoint!("after-postgres");
        self.mark_refused(notifications.iter().copied(), &refused);

        // Left out too: what a batch delivering meanwhile found refused.
        let accepted = notifications
            .into_iter()
            .filter(|n| !refused.contains_key(&key_of(&n.campaign)))
            .filter(|n| !self.refused.contains(&n.campaign));
        let mut outbox = Outbox::pushes(accepted);
        outbox.add_dead_letters(&batch.dead);
        if !outbox.is_empty() {
            outbox = self.produce("kafka", outbox, shutdown).await?;
        }
        crate::failpoint!("after-sinks");
        let pushed_refused = outbox.refused();
        self.mark_refused(batch.plan.notifications.iter(), &pushed_refused);
        for (key, reason) in pushed_refused {
            refused.entry(key).or_insert(reason);
        }
        Ok(refused)
    }

    /// Shares what a sink refused at once, before the batch is recorded, so
    /// that the batches delivering meanwhile push none of it.
    fn mark_refused<'a>(
        &self,
        notifications: impl Iterator<Item = &'a Notification>,
        refused: &Refusals,
    ) {
        for n in notifications {
            if refused.contains_key(&key_of(&n.campaign)) {
                self.refused.insert(&n.campaign);
            }
        }
    }

    /// Steps 4–5, once [`Checkpoint::deliver`] succeeded and every earlier
    /// batch is recorded:
    ///
    /// 4. dead-letter the campaigns the sinks refused (not already refused by
    ///    an earlier batch), then commit to RocksDB in one synced write batch
    ///    the sent entries, campaign changes (a refused campaign deleted, as
    ///    if it never came), input positions and the late-subscriber markers
    ///    handled;
    /// 5. commit the consumer offsets to Kafka, for display: a failure here is
    ///    logged, the store already holds the truth.
    ///
    /// A crash before 4 replays the batch: Postgres ignores the repeated rows,
    /// the push topic may see the batch's messages again. A crash after 4
    /// resumes from the stored positions. Returns the campaigns newly
    /// refused, for the planner.
    pub async fn record(
        &self,
        batch: &Batch,
        refused: Refusals,
        source: &Source,
        started: Instant,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Vec<Version>, Stopped> {
        let refusals = self.refusals(batch, refused);
        self.dead_letter(&refusals.letters, shutdown).await?;
        crate::failpoint!("after-refusals");

        let notifications = &batch.plan.notifications;
        let mut commit = Commit::new();
        let mut sent = 0u64;
        for n in notifications {
            let a = &n.campaign.action;
            if refusals.leaves_out(&n.campaign) {
                continue;
            }
            sent += 1;
            commit.mark_sent(
                a.restaurant_id,
                a.adv_campaign_id,
                n.client_id,
                a.adv_campaign_datetime_end
                    .saturating_add(self.sent_retention),
            );
        }
        for campaign in batch.plan.puts.values() {
            if !refusals.leaves_out(campaign) {
                commit.put_campaign(campaign);
            }
        }
        let refused_keys = refusals.here.iter().copied();
        for (restaurant, campaign) in batch.plan.deletes.iter().copied().chain(refused_keys) {
            commit.delete_campaign(restaurant, campaign);
        }
        for (partition, next) in &batch.positions {
            commit.set_input_position(*partition, *next);
        }
        for (restaurant, client, seq) in &batch.late {
            commit.clear_late(*restaurant, *client, *seq);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit(commit))
            .await
            .expect("the store commit does not panic")
            .map_err(|e| Stopped::Fatal(SinkError::Store(e)))?;
        crate::failpoint!("after-store-commit");

        if let Err(error) = source.commit(&batch.positions) {
            tracing::warn!(%error, "consumer offset commit failed; the store holds the positions");
        }
        crate::failpoint!("after-offset-commit");

        metrics::histogram!("promo_fanout_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("promo_fanout_batches_committed_total").increment(1);
        metrics::counter!("promo_fanout_notifications_sent_total").increment(sent);
        metrics::counter!("promo_fanout_campaigns_refused_total")
            .increment(refusals.lettered.len() as u64);
        Ok(refusals.lettered)
    }

    /// Sorts a delivered batch's refusals: which campaign versions to
    /// dead-letter (each once, the latest version the batch has of it), and
    /// what the batch's record leaves out.
    fn refusals(&self, batch: &Batch, refused: Refusals) -> Sorted {
        let mut sorted = Sorted {
            here: refused.keys().copied().collect(),
            refused: self.refused.versions.lock().expect("not poisoned").clone(),
            ..Sorted::default()
        };
        for (key, reason) in refused {
            let latest = batch.plan.puts.get(&key).or_else(|| {
                batch
                    .plan
                    .notifications
                    .iter()
                    .find(|n| key_of(&n.campaign) == key)
                    .map(|n| &*n.campaign)
            });
            let Some(campaign) = latest else { continue };
            if !self.refused.first_letter(version(campaign)) {
                continue;
            }
            tracing::error!(restaurant_id = %key.0, adv_campaign_id = %key.1, %reason, "a sink refused a campaign; sending it to the DLQ");
            sorted.letters.push(self.letter(campaign, reason));
            sorted.lettered.push(version(campaign));
        }
        sorted
    }

    /// A refused campaign as a dead letter: its action as the input JSON,
    /// keyed by restaurant, with the coordinates of the message it came in.
    fn letter(&self, campaign: &Campaign, reason: String) -> DeadLetter {
        DeadLetter {
            key: Some(campaign.action.restaurant_id.to_string().into_bytes()),
            value: Some(serde_json::to_vec(&campaign.action).expect("an action always serializes")),
            error: reason,
            source_topic: self.input_topic.clone(),
            origin: campaign.origin,
        }
    }

    async fn dead_letter(
        &self,
        letters: &[DeadLetter],
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut outbox = Outbox::default();
        outbox.add_dead_letters(letters);
        self.produce("dlq", outbox, shutdown).await.map(drop)
    }

    /// Produces `outbox` until every record is acknowledged (or refused for
    /// its content), retrying outages; a retry re-sends only what the broker
    /// has not acknowledged.
    async fn produce(
        &self,
        what: &'static str,
        outbox: Outbox,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Outbox, Stopped> {
        let outbox = tokio::sync::Mutex::new(outbox);
        until_done(
            what,
            || async { self.kafka.send(&mut *outbox.lock().await).await },
            &mut shutdown.clone(),
            |ok| self.health.producer.set_ok(ok),
        )
        .await?;
        Ok(outbox.into_inner())
    }
}

/// A batch's refusals, sorted by [`Checkpoint::refusals`].
#[derive(Default)]
struct Sorted {
    /// The campaigns this batch's delivery found refused: every version of
    /// them is left out of its record, and they are deleted from the store.
    here: BTreeSet<CampaignKey>,
    /// Every version refused so far, by this batch or another.
    refused: BTreeSet<Version>,
    /// The versions dead-lettered by this batch, for the planner.
    lettered: Vec<Version>,
    /// Dead letters to write before the batch is recorded.
    letters: Vec<DeadLetter>,
}

impl Sorted {
    fn leaves_out(&self, c: &Campaign) -> bool {
        self.here.contains(&key_of(c)) || self.refused.contains(&version(c))
    }
}
