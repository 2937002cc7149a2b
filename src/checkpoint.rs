//! The delivery order: [`Checkpoint::deliver`] then [`Checkpoint::record`]
//! make a batch durable everywhere or nowhere.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use promo_fanout_state::{Campaign, Commit, Origin, Store};
use tokio::sync::watch;

use crate::fanout::{key_of, CampaignKey, Plan};
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
    /// How many refused campaigns the planner had been told of (see
    /// [`RefusalLog`]) when it planned this batch.
    pub refusals_known: usize,
}

/// Every campaign the sinks have refused since start, in the order the
/// batches that found them were recorded, with the origin of the refused
/// version. The planner is told of each and stops planning it; a batch
/// planned before it was told is recorded without that campaign.
#[derive(Debug, Default)]
pub struct RefusalLog {
    refused: Vec<(CampaignKey, Option<Origin>)>,
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
        let notifications = &batch.plan.notifications;
        let mut refused = until_done(
            "postgres",
            || self.feedback.write(notifications),
            &mut shutdown.clone(),
            |ok| self.health.feedback.set_ok(ok),
        )
        .await?;
        crate::failpoint!("after-postgres");

        let accepted = notifications
            .iter()
            .filter(|n| !refused.contains_key(&key_of(&n.campaign)));
        let mut outbox = Outbox::pushes(accepted);
        outbox.add_dead_letters(&batch.dead);
        let outbox = self.produce("kafka", outbox, shutdown).await?;
        crate::failpoint!("after-sinks");
        for (key, reason) in outbox.refused() {
            refused.entry(key).or_insert(reason);
        }
        Ok(refused)
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
        log: &mut RefusalLog,
        source: &Source,
        started: Instant,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Vec<CampaignKey>, Stopped> {
        let refusals = self.refusals(batch, refused, log);
        self.dead_letter(&refusals.letters, shutdown).await?;
        crate::failpoint!("after-refusals");

        let notifications = &batch.plan.notifications;
        let mut commit = Commit::new();
        let mut sent = 0u64;
        for n in notifications {
            let a = &n.campaign.action;
            if refusals.left_out.contains(&key_of(&n.campaign)) {
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
        for (key, campaign) in &batch.plan.puts {
            if !refusals.left_out.contains(key) {
                commit.put_campaign(campaign);
            }
        }
        for (restaurant, campaign) in batch.plan.deletes.iter().chain(&refusals.newly) {
            commit.delete_campaign(*restaurant, *campaign);
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
            .increment(refusals.newly.len() as u64);
        Ok(refusals.newly)
    }

    /// Sorts a delivered batch's refusals against the log: which campaigns
    /// are refused for the first time (dead-lettered, then deleted), and
    /// which of the batch's changes are left out because an earlier batch
    /// refused their campaign after this one was planned.
    fn refusals(&self, batch: &Batch, refused: Refusals, log: &mut RefusalLog) -> Sorted {
        let stale: BTreeMap<CampaignKey, Option<Origin>> = log.refused[batch.refusals_known..]
            .iter()
            .copied()
            .collect();
        let campaigns: BTreeMap<CampaignKey, &Campaign> = batch
            .plan
            .notifications
            .iter()
            .map(|n| (key_of(&n.campaign), &*n.campaign))
            .collect();
        let mut sorted = Sorted::default();
        for (key, reason) in refused {
            if stale.contains_key(&key) {
                continue;
            }
            let Some(campaign) = campaigns.get(&key) else {
                continue;
            };
            tracing::error!(restaurant_id = %key.0, adv_campaign_id = %key.1, %reason, "a sink refused a campaign; sending it to the DLQ");
            sorted.letters.push(self.letter(campaign, reason));
            log.refused.push((key, campaign.origin));
            sorted.newly.push(key);
        }
        // An action that updated a campaign while its refusal was on its way
        // to the planner is dropped with it: say so rather than lose it.
        for (key, refused_origin) in &stale {
            if let Some(update) = batch.plan.puts.get(key) {
                if update.origin != *refused_origin {
                    sorted.letters.push(
                        self.letter(
                            update,
                            "a sink had just refused this campaign; this update to it arrived \
                         while the refusal was under way and is not applied: send it again"
                                .into(),
                        ),
                    );
                }
            }
        }
        sorted.left_out = stale
            .into_keys()
            .chain(sorted.newly.iter().copied())
            .collect();
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
    /// Campaigns refused for the first time.
    newly: Vec<CampaignKey>,
    /// Campaigns whose notifications and changes in this batch are not
    /// recorded: the newly refused and those an earlier batch refused.
    left_out: BTreeSet<CampaignKey>,
    /// Dead letters to write before the batch is recorded.
    letters: Vec<DeadLetter>,
}
