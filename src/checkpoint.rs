//! The delivery order. A [`Committer`] takes each planned batch through it:
//! [`Checkpoint::deliver`] (Postgres, then Kafka) as soon as it is planned,
//! then [`Checkpoint::record`] (dead letters of refused campaigns, the store,
//! the consumer offsets) after every batch planned before it. A batch is
//! durable everywhere or, after a crash, replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt};
use promo_fanout_state::{Campaign, Commit, Origin, Ownership, Store};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::fanout::{key_of, CampaignKey, Notification, Plan};
use crate::infra::health::Health;
use crate::infra::retry::{until_written, Stopped};
use crate::partitions::{self, Scope};
use crate::sinks::{DeadLetter, FeedbackSink, KafkaSink, Open, Outbox, Refusals};
use crate::source::{CommitMode, Source};

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
    /// Input messages read for this batch (for metrics).
    pub messages: u64,
    /// How many of the notifications are for late subscribers.
    pub late_notifications: u64,
}

/// A campaign as one action made it: its ids and the message that carried
/// that action. A later action for the same ids is a new version.
pub type Version = (CampaignKey, Option<Origin>);

fn version(c: &Campaign) -> Version {
    (key_of(c), c.origin)
}

/// The campaign versions the sinks have refused since start, shared by every
/// delivery and record. Batches planned before the planner heard of a
/// refusal still carry the refused version: their deliveries leave it out
/// at each sink, and their records leave it out of the store. A later
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

/// A delivered batch: what the sinks refused, and its feedback transaction,
/// open until the batch is recorded.
pub struct Delivered {
    pub refused: Refusals,
    pub open: Option<Open>,
    /// The rows `open` holds.
    pub inserted: usize,
}

/// The sinks, the store and the source a batch is committed to.
pub struct Checkpoint {
    pub feedback: FeedbackSink,
    /// Whose partitions this instance records.
    pub scope: Scope,
    /// This instance's hold on each of its partitions, as the last batch
    /// recorded left it.
    pub held: std::sync::Mutex<BTreeMap<i32, Ownership>>,
    /// Partitions not held whose state the store still marks as exact. A
    /// batch that handles late-subscriber markers handles them only for the
    /// campaigns of held partitions: the others' state is no longer exact,
    /// and their marks are dropped with that batch.
    pub unheld: std::sync::Mutex<BTreeSet<i32>>,
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
    ///    NOTHING`, left open until the batch is recorded), leaving out the
    ///    campaigns Postgres refuses for their content; then produce the push
    ///    messages of the rest and the dead letters to Kafka (idempotent
    ///    producer, `acks=all`, every delivery report awaited). Postgres goes
    ///    first so that a campaign it refuses reaches no client. Each is
    ///    retried with backoff until it succeeds (Kafka re-sends only the
    ///    records not acknowledged), and the batch is not recorded before.
    ///    The refused campaigns are returned, with the reason, for `record`
    ///    to dead-letter.
    pub async fn deliver(
        &self,
        batch: &Batch,
        shutdown: &CancellationToken,
    ) -> Result<Delivered, Stopped> {
        let notifications: Vec<&Notification> = batch
            .plan
            .notifications
            .iter()
            .filter(|n| !self.refused.contains(&n.campaign))
            .collect();
        let mut refused = Refusals::new();
        let mut open = None;
        if !notifications.is_empty() {
            let began = until_written(
                "postgres",
                || self.feedback.begin(&notifications),
                shutdown,
                |ok| self.health.feedback.set_ok(ok),
            )
            .await?;
            open = Some(began.0);
            refused = began.1;
        }
        let inserted = notifications
            .iter()
            .filter(|n| !refused.contains_key(&key_of(&n.campaign)))
            .count();
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
        Ok(Delivered {
            refused,
            open,
            inserted,
        })
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
    ///    an earlier batch); commit the feedback transaction with the state of
    ///    the batch's partitions (positions, campaign changes: see
    ///    [`crate::partitions`]), fenced by this instance's hold on them;
    ///    then commit to RocksDB in one synced write batch the sent entries,
    ///    campaign changes (a refused campaign deleted, as if it never came),
    ///    input positions, the late-subscriber markers handled and the new
    ///    hold;
    /// 5. commit the consumer offsets to Kafka, for display: a failure here is
    ///    logged, Postgres and the store already hold the truth.
    ///
    /// A crash before the Postgres commit replays the batch: its feedback
    /// rows were rolled back, the push topic may see its messages again. A
    /// crash between the two commits leaves the store behind Postgres: the
    /// restart finds it stale and restores the partitions from Postgres. A
    /// crash after 4 resumes from the stored positions. Returns the
    /// campaigns newly refused, for the planner.
    pub async fn record(
        &self,
        batch: &Batch,
        delivered: Delivered,
        source: &Source,
        started: Instant,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Version>, Stopped> {
        let refusals = self.refusals(batch, delivered.refused);
        self.dead_letter(&refusals.letters, shutdown).await?;
        crate::failpoint!("after-refusals");

        let (mut commit, durable) = changes(batch, &refusals, self.sent_retention);
        let rows: Vec<&Notification> = batch
            .plan
            .notifications
            .iter()
            .filter(|n| !refusals.leaves_out(&n.campaign))
            .collect();
        // Rows of a campaign refused since they were written (by the push
        // topic, or by a batch delivering meanwhile) must not be committed:
        // the commit then goes through a new transaction with the rest.
        let open = (rows.len() == delivered.inserted).then_some(delivered.open);
        let open = std::sync::Mutex::new(open.flatten());
        let held = self.held.lock().expect("not poisoned").clone();
        let now_held = until_written(
            "postgres",
            || {
                let open = open.lock().expect("not poisoned").take();
                self.feedback
                    .commit(open, &rows, &self.scope, &held, &durable)
            },
            shutdown,
            |ok| self.health.feedback.set_ok(ok),
        )
        .await?;
        crate::failpoint!("after-postgres-commit");
        for (partition, ownership) in &now_held {
            commit.set_ownership(*partition, *ownership);
        }
        if !batch.late.is_empty() {
            for partition in std::mem::take(&mut *self.unheld.lock().expect("not poisoned")) {
                commit.forget_ownership(partition);
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit(commit))
            .await
            .expect("the store commit does not panic")
            .map_err(|e| Stopped::Fatal(e.into()))?;
        self.held.lock().expect("not poisoned").extend(now_held);
        crate::failpoint!("after-store-commit");

        if let Err(error) = source.commit(&batch.positions, CommitMode::Async) {
            tracing::warn!(%error, "consumer offset commit failed; the store holds the positions");
        }
        crate::failpoint!("after-offset-commit");

        metrics::histogram!("promo_fanout_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("promo_fanout_batches_committed_total").increment(1);
        metrics::counter!("promo_fanout_notifications_sent_total").increment(rows.len() as u64);
        metrics::counter!("promo_fanout_campaigns_refused_total")
            .increment(refusals.lettered.len() as u64);
        report(batch);
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
                    .map(|n| &n.campaign)
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
        shutdown: &CancellationToken,
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
        shutdown: &CancellationToken,
    ) -> Result<Outbox, Stopped> {
        let outbox = tokio::sync::Mutex::new(outbox);
        until_written(
            what,
            || async { self.kafka.send(&mut *outbox.lock().await).await },
            shutdown,
            |ok| self.health.producer.set_ok(ok),
        )
        .await?;
        Ok(outbox.into_inner())
    }
}

/// What recording `batch` changes, in the store and in its partitions'
/// durable state: the sent entries, the campaigns put and deleted (a
/// refused one deleted, as if it never came), the input positions and the
/// late-subscriber markers handled.
fn changes(batch: &Batch, refusals: &Sorted, sent_retention: i64) -> (Commit, partitions::Record) {
    let mut commit = Commit::new();
    let mut durable = partitions::Record::default();
    for n in &batch.plan.notifications {
        if refusals.leaves_out(&n.campaign) {
            continue;
        }
        let a = &n.campaign.action;
        let expires_at = a.adv_campaign_datetime_end.saturating_add(sent_retention);
        commit.mark_sent(a.restaurant_id, a.adv_campaign_id, n.client_id, expires_at);
        durable.touched.insert(n.campaign.partition());
    }
    for campaign in batch.plan.puts.values() {
        if !refusals.leaves_out(campaign) {
            commit.put_campaign(campaign);
            durable.put(campaign);
        }
    }
    let refused_keys = refusals.here.iter().copied();
    for (restaurant, campaign) in batch.plan.deletes.iter().copied().chain(refused_keys) {
        commit.delete_campaign(restaurant, campaign);
        durable.deletes.push((restaurant, campaign));
    }
    for (partition, next) in &batch.positions {
        commit.set_input_position(*partition, *next);
        durable.touched.insert(*partition);
        durable.positions.insert(*partition, *next);
    }
    for (restaurant, client, seq) in &batch.late {
        commit.clear_late(*restaurant, *client, *seq);
    }
    (commit, durable)
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

/// The counters the alert rules compare, shown at 0 from the start (a
/// counter appears on `/metrics` only once touched, and a rate needs a
/// series before the first event).
pub fn register_counters() {
    for name in [
        "promo_fanout_messages_consumed_total",
        "promo_fanout_messages_invalid_total",
        "promo_fanout_actions_eligible_total",
        "promo_fanout_notifications_sent_total",
        "promo_fanout_batches_committed_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}

/// A recorded batch's counts, to the metrics and, if it did anything, the log.
fn report(batch: &Batch) {
    let tally = batch.plan.tally;
    let notifications = batch.plan.notifications.len();
    metrics::counter!("promo_fanout_messages_consumed_total").increment(batch.messages);
    metrics::counter!("promo_fanout_messages_invalid_total").increment(batch.dead.len() as u64);
    metrics::counter!("promo_fanout_actions_expired_total").increment(tally.expired);
    metrics::counter!("promo_fanout_actions_scheduled_total").increment(tally.scheduled);
    metrics::counter!("promo_fanout_actions_eligible_total").increment(tally.eligible);
    metrics::counter!("promo_fanout_actions_updated_total").increment(tally.updated);
    metrics::counter!("promo_fanout_late_notifications_total").increment(batch.late_notifications);
    if batch.messages > 0 || notifications > 0 || batch.late_notifications > 0 {
        tracing::info!(
            messages = batch.messages,
            invalid = batch.dead.len(),
            eligible = tally.eligible,
            scheduled = tally.scheduled,
            expired = tally.expired,
            updated = tally.updated,
            notifications,
            late = batch.late_notifications,
            "batch committed"
        );
    }
}

/// A batch that went through the whole delivery order.
#[derive(Debug)]
pub struct Recorded {
    pub batch: Arc<Batch>,
    /// The campaign versions the sinks refused, dead-lettered now: the
    /// planner forgets them.
    pub refused: Vec<Version>,
}

/// Owns the delivery order for the batches in flight:
///
/// 1. [`submit`](Committer::submit) a planned batch: its delivery to both
///    sinks starts at once, in a task of its own, up to `pipeline-depth`
///    batches at a time (the caller waits for [`next`](Committer::next)
///    while [`is_full`](Committer::is_full));
/// 2. each task records its batch (dead letters, store, consumer offsets)
///    once the batch submitted before it is recorded, so the store moves
///    in the order batches were planned;
/// 3. [`next`](Committer::next) yields the batches as they are recorded, in
///    that order: the caller moves the reported positions on and feeds the
///    refusals back to the planner;
/// 4. on shutdown the caller drains what is in flight with `next` (an outage
///    under way is abandoned after a grace period and replayed after the
///    restart); on an error it [`abort`](Committer::abort)s.
///
/// A batch whose delivery fails stops every batch after it from being
/// recorded: their positions would skip it.
pub struct Committer {
    checkpoint: Arc<Checkpoint>,
    source: Arc<crate::source::Source>,
    depth: usize,
    shutdown: CancellationToken,
    in_flight: FuturesOrdered<AbortOnDropHandle<Result<Recorded, Stopped>>>,
    /// Every task, so that none outlives an abort.
    tasks: TaskTracker,
    /// Fires once the batch submitted last is recorded.
    previous: Option<oneshot::Receiver<()>>,
}

impl Committer {
    pub fn new(
        checkpoint: Arc<Checkpoint>,
        source: Arc<crate::source::Source>,
        depth: usize,
        shutdown: CancellationToken,
    ) -> Committer {
        Committer {
            checkpoint,
            source,
            depth,
            shutdown,
            in_flight: FuturesOrdered::new(),
            tasks: TaskTracker::new(),
            previous: None,
        }
    }

    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= self.depth
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Starts taking `batch` through the delivery order.
    pub fn submit(&mut self, batch: Batch) {
        let (recorded, next) = oneshot::channel();
        let task = commit(
            self.checkpoint.clone(),
            self.source.clone(),
            Arc::new(batch),
            self.previous.replace(next),
            recorded,
            self.shutdown.clone(),
        );
        let handle = AbortOnDropHandle::new(self.tasks.spawn(task));
        self.in_flight.push_back(handle);
    }

    /// The next batch recorded, in the order submitted; never resolves while
    /// nothing is in flight.
    pub async fn next(&mut self) -> Result<Recorded, Stopped> {
        match self.in_flight.next().await {
            Some(outcome) => outcome.expect("a delivery does not panic"),
            None => std::future::pending().await,
        }
    }

    /// Stops every batch in flight (they are replayed after a restart) and
    /// waits until their tasks have ended.
    pub async fn abort(self) {
        drop(self.in_flight);
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// One batch through the delivery order, in its own task.
async fn commit(
    checkpoint: Arc<Checkpoint>,
    source: Arc<crate::source::Source>,
    batch: Arc<Batch>,
    previous: Option<oneshot::Receiver<()>>,
    recorded: oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> Result<Recorded, Stopped> {
    let started = Instant::now();
    // A sink that fails or does not answer is retried, logged and reported
    // by the delivery's steps themselves (`until_written`).
    let delivered = checkpoint.deliver(&batch, &shutdown).await?;
    if let Some(previous) = previous {
        // The batch before was not recorded (it failed, or the service is
        // stopping): recording this one would skip it.
        previous.await.map_err(|_| Stopped::Shutdown)?;
    }
    let refused = checkpoint
        .record(&batch, delivered, &source, started, &shutdown)
        .await?;
    let _ = recorded.send(());
    Ok(Recorded { batch, refused })
}
