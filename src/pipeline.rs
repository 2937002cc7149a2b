//! The service: source → mirror → fan-out → sinks → checkpoint, batch after
//! batch, until shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use promo_fanout_state::{Campaign, Identity, Progress, Store};
use rdkafka::error::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::action;
use crate::checkpoint::{Batch, Checkpoint};
use crate::clock;
use crate::config::{MirrorMode, Settings};
use crate::fanout::{self, CampaignKey, Rules, Timing};
use crate::health::{self, Health};
use crate::mirror;
use crate::retry::{until_done, SinkError, Stopped};
use crate::sinks::{DeadLetter, FeedbackSink, KafkaSink};
use crate::source::Source;

/// How long an idle loop waits for input before it looks at scheduled
/// campaigns again.
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// How often the consumer lag is asked of the broker (one watermark request
/// per partition, off the batch loop).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] promo_fanout_state::StoreError),
    #[error("{step}: {source}")]
    Fatal {
        step: &'static str,
        #[source]
        source: SinkError,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("kafka client: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    #[error(
        "mirror-mode = cdc (Postgres logical replication) is not built yet; \
         use --mirror-mode refresh (the default)"
    )]
    CdcUnavailable,
}

pub fn identity(settings: &Settings) -> Identity {
    Identity {
        group_id: settings.group_id.clone(),
        input_topic: settings.input_topic.clone(),
    }
}

/// Runs the service until `shutdown` turns true. The batch in flight is
/// finished and committed first.
pub async fn run(settings: Settings, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    if settings.mirror_mode == MirrorMode::Cdc {
        return Err(RunError::CdcUnavailable);
    }
    let store = Arc::new(Store::open(settings.state_dir(), &identity(&settings))?);
    let health = Arc::new(Health::default());
    let server = health::serve(
        settings.metrics_addr,
        health.clone(),
        health::install_metrics(),
        shutdown.clone(),
    )
    .await
    .map_err(|source| RunError::Metrics {
        addr: settings.metrics_addr,
        source,
    })?;
    tracing::info!(
        state_dir = %settings.state_dir.display(),
        brokers = %settings.brokers,
        postgres = %settings.postgres_url_redacted(),
        kafka = ?settings.kafka_redacted(),
        input = %settings.input_topic,
        output = %settings.output_topic,
        dlq = %settings.dlq_topic,
        metrics = %settings.metrics_addr,
        "starting"
    );

    let Some(feedback) = connect_postgres(&settings, &health, &mut shutdown).await? else {
        return Ok(());
    };
    let kafka = KafkaSink::new(&settings)?;
    let source = Source::new(&settings)?;

    if !load_mirror(&settings, &store, &mut shutdown).await? {
        return Ok(());
    }
    health.mirror_loaded.store(true, Ordering::Relaxed);
    let refresh = tokio::spawn(mirror::refresh_loop(
        store.clone(),
        settings.postgres_url.clone(),
        settings.refresh_interval,
        shutdown.clone(),
    ));

    let Some(partitions) = wait_for_topic(&source, &health, &mut shutdown).await? else {
        return Ok(());
    };
    let mut positions = store.input_positions()?;
    source.assign(&partitions, &positions)?;
    tracing::info!(topic = %source.topic(), ?partitions, stored = ?positions, "input assigned");

    let checkpoint = Checkpoint {
        feedback,
        kafka,
        store: store.clone(),
        health: health.clone(),
        sent_retention: settings.sent_retention.as_secs() as i64,
    };
    let mut campaigns: BTreeMap<CampaignKey, Campaign> = store
        .campaigns()?
        .into_iter()
        .map(|c| (fanout::key_of(&c), c))
        .collect();
    let margin = settings.expiry_margin.as_secs() as i64;
    let mut turn = None;
    let (positions_tx, positions_rx) = watch::channel(positions.clone());
    crate::source::report_lag(&settings, partitions, positions_rx, LAG_EVERY)?;

    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = clock::now();
        let busy = campaigns.values().any(|c| {
            c.progress != Progress::Done
                && fanout::campaign_timing(c, now, margin) == Timing::Eligible
        });
        let wait = if busy { Duration::ZERO } else { IDLE_WAIT };
        let messages = tokio::select! {
            m = source.next_batch(settings.batch_size, wait, settings.batch_linger) => m,
            _ = shutdown.wait_for(|s| *s) => break,
        };

        let now = clock::now();
        let mut batch = Batch {
            positions: positions.clone(),
            ..Batch::default()
        };
        let mut actions = Vec::with_capacity(messages.len());
        let mut fresh = 0u64;
        for m in messages {
            // A message below the stored position was already handled: the
            // broker re-delivered it. Never move a position backwards.
            if batch
                .positions
                .get(&m.partition)
                .is_some_and(|next| m.offset < *next)
            {
                tracing::debug!(
                    partition = m.partition,
                    offset = m.offset,
                    "skipping a message already committed"
                );
                continue;
            }
            fresh += 1;
            batch.positions.insert(m.partition, m.offset + 1);
            match action::decode(m.value.as_deref(), settings.max_message_bytes) {
                Ok(a) => actions.push(a),
                Err(invalid) => {
                    tracing::warn!(partition = m.partition, offset = m.offset, error = %invalid, "bad input; sending it to the DLQ");
                    batch.dead.push(DeadLetter {
                        key: m.key,
                        value: m.value,
                        error: invalid.0,
                        source_topic: settings.input_topic.clone(),
                        source_partition: m.partition,
                        source_offset: m.offset,
                    });
                }
            }
        }
        crate::failpoint!("after-validation");

        let rules = Rules {
            now,
            margin,
            retention: settings.sent_retention.as_secs() as i64,
            budget: settings.chunk_size,
        };
        batch.plan = fanout::plan(&*store, &campaigns, &actions, rules, turn)?;
        if batch.plan.is_empty() && batch.dead.is_empty() && fresh == 0 {
            continue;
        }

        match checkpoint.commit(&batch, &source, &mut shutdown).await {
            Ok(()) => {}
            Err(Stopped::Shutdown) => {
                tracing::info!("shutdown during an outage: the batch in flight is left uncommitted and will be replayed");
                break;
            }
            Err(Stopped::Fatal(source)) => {
                return Err(RunError::Fatal {
                    step: "commit",
                    source,
                })
            }
        }

        let tally = batch.plan.tally;
        metrics::counter!("promo_fanout_messages_consumed_total").increment(fresh);
        metrics::counter!("promo_fanout_messages_invalid_total").increment(batch.dead.len() as u64);
        metrics::counter!("promo_fanout_actions_expired_total").increment(tally.expired);
        metrics::counter!("promo_fanout_actions_scheduled_total").increment(tally.scheduled);
        metrics::counter!("promo_fanout_actions_eligible_total").increment(tally.eligible);
        metrics::counter!("promo_fanout_actions_updated_total").increment(tally.updated);
        if fresh > 0 || !batch.plan.notifications.is_empty() {
            tracing::info!(
                messages = fresh,
                invalid = batch.dead.len(),
                eligible = tally.eligible,
                scheduled = tally.scheduled,
                expired = tally.expired,
                updated = tally.updated,
                notifications = batch.plan.notifications.len(),
                "batch committed"
            );
        }
        for (k, c) in std::mem::take(&mut batch.plan.puts) {
            campaigns.insert(k, c);
        }
        for k in &batch.plan.deletes {
            campaigns.remove(k);
        }
        turn = batch.plan.next_turn.or(turn);
        positions = batch.positions;
        positions_tx.send_replace(positions.clone());
        let pending = campaigns
            .values()
            .filter(|c| {
                c.progress != Progress::Done
                    && fanout::campaign_timing(c, now, margin) == Timing::Eligible
            })
            .count();
        metrics::gauge!("promo_fanout_fanout_pending_campaigns").set(pending as f64);
        metrics::gauge!("promo_fanout_campaigns_stored").set(campaigns.len() as f64);
    }

    tracing::info!("stopped");
    refresh.abort();
    let _ = server.await;
    Ok(())
}

async fn connect_postgres(
    settings: &Settings,
    health: &Health,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<FeedbackSink>, RunError> {
    match until_done(
        "postgres connect",
        || FeedbackSink::connect(&settings.postgres_url),
        shutdown,
        |ok| health.postgres_ok.store(ok, Ordering::Relaxed),
    )
    .await
    {
        Ok(sink) => Ok(Some(sink)),
        Err(Stopped::Shutdown) => Ok(None),
        Err(Stopped::Fatal(source)) => Err(RunError::Fatal {
            step: "postgres connect",
            source,
        }),
    }
}

/// Completes the mirror's first snapshot if the store has none yet. Returns
/// false when shutdown came first.
async fn load_mirror(
    settings: &Settings,
    store: &Arc<Store>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, RunError> {
    if store
        .mirror_position()?
        .is_some_and(|p| p.snapshot_complete)
    {
        tracing::info!("mirror present; resuming without a snapshot");
        return Ok(true);
    }
    tracing::info!("mirror empty or incomplete; taking a snapshot of subscribers_restaurants");
    let started = std::time::Instant::now();
    match until_done(
        "mirror snapshot",
        // `sync` succeeds only once the whole table has been merged.
        || mirror::sync(store.clone(), &settings.postgres_url, clock::now()),
        shutdown,
        |_| {},
    )
    .await
    {
        Ok(stats) => {
            tracing::info!(
                rows = stats.rows,
                seconds = started.elapsed().as_secs_f64(),
                "mirror snapshot loaded"
            );
            Ok(true)
        }
        Err(Stopped::Shutdown) => Ok(false),
        Err(Stopped::Fatal(source)) => Err(RunError::Fatal {
            step: "mirror snapshot",
            source,
        }),
    }
}

async fn wait_for_topic(
    source: &Source,
    health: &Health,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Vec<i32>>, RunError> {
    match until_done(
        "input topic metadata",
        || async {
            let result = source.partitions(Duration::from_secs(5));
            // The broker answered that the topic is unknown: it is reachable.
            let answered = match &result {
                Ok(_) => true,
                Err(SinkError::Kafka(e)) => {
                    e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                }
                Err(_) => false,
            };
            health.kafka_ok.store(answered, Ordering::Relaxed);
            result
        },
        shutdown,
        |ok| health.input_assigned.store(ok, Ordering::Relaxed),
    )
    .await
    {
        Ok(p) => Ok(Some(p)),
        Err(Stopped::Shutdown) => Ok(None),
        Err(Stopped::Fatal(source)) => Err(RunError::Fatal {
            step: "input topic metadata",
            source,
        }),
    }
}
