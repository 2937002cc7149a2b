//! The delivery order: [`Checkpoint::deliver`] then [`Checkpoint::record`]
//! make a batch durable everywhere or nowhere.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use promo_fanout_state::{Commit, Store};
use tokio::sync::watch;

use crate::fanout::Plan;
use crate::health::Health;
use crate::retry::{until_done, SinkError, Stopped};
use crate::sinks::{DeadLetter, FeedbackSink, KafkaSink};
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

/// The sinks, the store and the source a batch is committed to.
pub struct Checkpoint {
    pub feedback: FeedbackSink,
    pub kafka: KafkaSink,
    pub store: Arc<Store>,
    pub health: Arc<Health>,
    /// Seconds after a campaign's end its sent entries are kept.
    pub sent_retention: i64,
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
    ///    NOTHING`) and produce the push messages and dead letters to Kafka
    ///    (idempotent producer, `acks=all`, every delivery report awaited).
    ///    Both must succeed; each is retried with backoff until it does, and
    ///    the batch is not recorded before.
    pub async fn deliver(
        &self,
        batch: &Batch,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let notifications = &batch.plan.notifications;
        let mut pg_shutdown = shutdown.clone();
        let postgres = until_done(
            "postgres",
            || self.feedback.write(notifications),
            &mut pg_shutdown,
            |ok| self.health.postgres_ok.store(ok, Ordering::Relaxed),
        );
        let mut kafka_shutdown = shutdown.clone();
        let kafka = until_done(
            "kafka",
            || async {
                self.kafka.deliver(notifications, &batch.dead).await?;
                crate::failpoint!("after-kafka-produce");
                Ok(())
            },
            &mut kafka_shutdown,
            |ok| self.health.kafka_ok.store(ok, Ordering::Relaxed),
        );
        let (postgres, kafka) = tokio::join!(postgres, kafka);
        postgres?;
        crate::failpoint!("after-postgres");
        kafka?;
        crate::failpoint!("after-sinks");
        Ok(())
    }

    /// Steps 4–5, once [`Checkpoint::deliver`] succeeded and every earlier
    /// batch is recorded:
    ///
    /// 4. commit the sent entries, campaign changes, input positions and the
    ///    late-subscriber markers handled to RocksDB in one synced write batch;
    /// 5. commit the consumer offsets to Kafka, for display: a failure here is
    ///    logged, the store already holds the truth.
    ///
    /// A crash before 4 replays the batch: Postgres ignores the repeated rows,
    /// the push topic may see the batch's messages again. A crash after 4
    /// resumes from the stored positions.
    pub async fn record(
        &self,
        batch: &Batch,
        source: &Source,
        started: Instant,
    ) -> Result<(), Stopped> {
        let notifications = &batch.plan.notifications;
        let mut commit = Commit::new();
        for n in notifications {
            let c = &n.campaign;
            commit.mark_sent(
                c.restaurant_id,
                c.adv_campaign_id,
                n.client_id,
                c.adv_campaign_datetime_end
                    .saturating_add(self.sent_retention),
            );
        }
        for campaign in batch.plan.puts.values() {
            commit.put_campaign(campaign);
        }
        for (restaurant, campaign) in &batch.plan.deletes {
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
        metrics::counter!("promo_fanout_notifications_sent_total")
            .increment(notifications.len() as u64);
        Ok(())
    }
}
