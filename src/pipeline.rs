//! The service: source → mirror → fan-out → sinks → checkpoint, batch after
//! batch, until shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use promo_fanout_state::{Campaign, Identity, Store};
use rdkafka::error::RDKafkaErrorCode;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::action;
use crate::checkpoint::{Batch, Checkpoint, Version};
use crate::clock;
use crate::config::{MirrorMode, Settings};
use crate::fanout::{self, CampaignKey, Rules};
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
    #[error("{step}: {error}")]
    Fatal {
        step: &'static str,
        error: SinkError,
    },
    #[error("cannot serve metrics on {addr}: {error}")]
    Metrics {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("kafka client: {0}")]
    KafkaClient(rdkafka::error::KafkaError),
    #[error(transparent)]
    Start(#[from] crate::source::StartError),
    #[error(
        "an input position fell out of the topic's retained log while running ({0}); \
         with position-out-of-range = fail the service stops rather than skip: restart \
         it to see which partition and how many messages were lost"
    )]
    PositionLost(rdkafka::error::KafkaError),
    #[error("cannot reach {what} within the startup timeout ({timeout}): {last_error}")]
    Unreachable {
        what: String,
        timeout: humantime::FormattedDuration,
        last_error: String,
    },
    #[error(
        "mirror-mode = cdc: the server cannot feed changes: {0}; fix that, or run with \
         --mirror-mode refresh (or auto, which falls back to it)"
    )]
    CdcUnavailable(String),
    #[error("the mirror stopped: {0}")]
    Mirror(SinkError),
}

impl From<rdkafka::error::KafkaError> for RunError {
    fn from(error: rdkafka::error::KafkaError) -> Self {
        RunError::KafkaClient(error)
    }
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
    let store = Arc::new(Store::open(settings.state_dir(), &identity(&settings))?);
    let health = Arc::new(Health::default());
    // No task `run` starts outlives it: the tasks below are aborted when
    // `run` returns, whichever way, and the metrics server stops on shutdown
    // or then. (Aborting axum's server would leave its shutdown watcher.)
    let serving = CancellationToken::new();
    let _stop_serving = serving.clone().drop_guard();
    let server = health::serve(
        settings.metrics_addr,
        health.clone(),
        health::install_metrics(),
        {
            let mut shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => {}
                    _ = serving.cancelled() => {}
                }
            }
        },
    )
    .await
    .map_err(|error| RunError::Metrics {
        addr: settings.metrics_addr,
        error,
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
    let source = Arc::new(Source::new(&settings)?);

    let Some(mode) = mirror_mode(&settings, &mut shutdown).await? else {
        return Ok(());
    };
    if !load_mirror(&settings, mode, &store, &mut shutdown).await? {
        return Ok(());
    }
    health.mirror_loaded.store(true, Ordering::Relaxed);
    let mut mirror_task = AbortOnDropHandle::new(match mode {
        MirrorMode::Cdc => tokio::spawn(crate::cdc::follow(
            store.clone(),
            crate::cdc::FeedConfig::new(&settings),
            health.clone(),
            shutdown.clone(),
        )),
        _ => {
            let refresh = mirror::refresh_loop(
                store.clone(),
                settings.postgres_url.clone(),
                settings.refresh_interval,
                shutdown.clone(),
            );
            tokio::spawn(async move {
                refresh.await;
                Ok(())
            })
        }
    });

    let Some(partitions) = wait_for_topic(&settings, &source, &health, &mut shutdown).await? else {
        return Ok(());
    };
    let stored = store.input_positions()?;
    let start = source.start_positions(
        &partitions,
        &stored,
        settings.position_out_of_range,
        Duration::from_secs(10),
    )?;
    source.assign(&start)?;
    tracing::info!(topic = %source.topic(), ?partitions, ?stored, ?start, "input assigned");
    // Positions the policy moved forward are committed with the next batch.
    let mut positions = stored;
    for (p, next) in &start {
        let known = positions.entry(*p).or_insert(*next);
        *known = (*known).max(*next);
    }

    let checkpoint = Arc::new(Checkpoint {
        feedback,
        kafka,
        store: store.clone(),
        health: health.clone(),
        sent_retention: settings.sent_retention.as_secs() as i64,
        input_topic: settings.input_topic.clone(),
        refused: Default::default(),
    });
    let mut campaigns: BTreeMap<CampaignKey, Campaign> = store
        .campaigns()?
        .into_iter()
        .map(|c| (fanout::key_of(&c), c))
        .collect();
    let margin = settings.expiry_margin.as_secs() as i64;
    let limits = action::Limits::new(
        settings.max_message_bytes,
        crate::sinks::producer_max_bytes(&settings),
    );
    let mut turn = None;
    let (positions_tx, positions_rx) = watch::channel(positions.clone());
    let lag = crate::source::report_lag(
        &settings,
        health.clone(),
        partitions,
        positions_rx,
        LAG_EVERY,
    )?;

    // Batches go from here to the recorder in the order they were planned.
    // Each is delivered to the sinks by its own task as soon as it is
    // planned, up to `pipeline-depth` at once; the recorder waits for each
    // delivery in turn and records it (store, then offsets). The plan of the
    // next batch starts from this one's in-memory outcome, so it never waits
    // for the sinks.
    let depth = Arc::new(Semaphore::new(settings.pipeline_depth));
    let (queue_tx, queue_rx) = mpsc::unbounded_channel::<InFlight>();
    let (recorded_tx, mut recorded_rx) = watch::channel(0u64);
    let (refused_tx, mut refused_rx) = mpsc::unbounded_channel();
    let mut recorder = AbortOnDropHandle::new(tokio::spawn(record_in_order(
        checkpoint.clone(),
        source.clone(),
        queue_rx,
        recorded_tx,
        positions_tx,
        refused_tx,
        shutdown.clone(),
    )));
    let deliveries = TaskTracker::new();
    let mut planned = 0u64;

    let mut more_late = false;
    let outcome = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        if mirror_task.is_finished() {
            let outcome = (&mut mirror_task)
                .await
                .expect("the mirror task does not panic");
            if *shutdown.borrow() {
                break Ok(());
            }
            break Err(RunError::Mirror(outcome.err().unwrap_or_else(|| {
                SinkError::Config("the mirror task ended unexpectedly".into())
            })));
        }
        if recorder.is_finished() {
            break Ok(());
        }
        forget_refused(&mut campaigns, &mut refused_rx);
        let now = clock::now();
        let busy = more_late
            || campaigns
                .values()
                .any(|c| fanout::awaits_fan_out(c, now, margin));
        let wait = if busy { Duration::ZERO } else { IDLE_WAIT };
        let messages = tokio::select! {
            m = source.next_batch(settings.batch_size, wait, settings.batch_linger) => {
                match m {
                    Ok(m) => m,
                    Err(e) => break Err(RunError::PositionLost(e)),
                }
            }
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
        };

        let now = clock::now();
        let mut batch = Batch {
            positions: positions.clone(),
            ..Batch::default()
        };
        let mut arrivals = Vec::with_capacity(messages.len());
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
            let origin = promo_fanout_state::Origin {
                partition: m.partition,
                offset: m.offset,
            };
            match action::decode(m.value.as_deref(), &limits) {
                Ok(action) => arrivals.push(fanout::Arrival { action, origin }),
                Err(invalid) => {
                    tracing::warn!(partition = m.partition, offset = m.offset, error = %invalid, "bad input; sending it to the DLQ");
                    batch.dead.push(DeadLetter {
                        key: m.key,
                        value: m.value,
                        error: invalid.0,
                        source_topic: settings.input_topic.clone(),
                        origin: Some(origin),
                    });
                }
            }
        }
        crate::failpoint!("after-validation");

        // Late subscribers are decided against what is recorded: the sent
        // entries of batches in flight are not in the store yet, nor are the
        // markers they clear. So with markers waiting, the batches in flight
        // are recorded first.
        // After the wait the markers are read again: those the recorded
        // batches cleared are gone, and nothing is in flight to race with.
        let mut markers = store.late_subscribers(settings.chunk_size)?;
        if !markers.is_empty() && *recorded_rx.borrow() < planned {
            tokio::select! {
                r = recorded_rx.wait_for(|r| *r >= planned) => {
                    if r.is_err() {
                        break Ok(());
                    }
                }
                _ = shutdown.wait_for(|s| *s) => break Ok(()),
            }
            markers = store.late_subscribers(settings.chunk_size)?;
            forget_refused(&mut campaigns, &mut refused_rx);
        }

        let rules = Rules {
            now,
            margin,
            retention: settings.sent_retention.as_secs() as i64,
            budget: settings.chunk_size,
        };
        batch.plan = fanout::plan(&*store, &campaigns, &arrivals, rules, turn)?;
        // Subscribers the mirror saw arrive, against the campaigns as they
        // stood before this batch (the plan's own scans cover the rest).
        batch.late = markers;
        more_late = batch.late.len() >= settings.chunk_size;
        let late = fanout::late(&*store, &campaigns, &batch.late, &rules)?;
        let late_count = late.len();
        batch.plan.notifications.extend(late);
        if batch.plan.is_empty() && batch.dead.is_empty() && fresh == 0 && batch.late.is_empty() {
            continue;
        }

        // What the next batch is planned from.
        for (k, c) in &batch.plan.puts {
            campaigns.insert(*k, c.clone());
        }
        for k in &batch.plan.deletes {
            campaigns.remove(k);
        }
        turn = batch.plan.next_turn.or(turn);
        positions = batch.positions.clone();
        let pending = campaigns
            .values()
            .filter(|c| fanout::awaits_fan_out(c, now, margin))
            .count();
        metrics::gauge!("promo_fanout_fanout_pending_campaigns").set(pending as f64);
        metrics::gauge!("promo_fanout_campaigns_stored").set(campaigns.len() as f64);

        let permit = tokio::select! {
            p = depth.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            // The recorder stopped: nothing in flight will be released.
            _ = recorder_stopped(&mut recorded_rx) => break Ok(()),
        };
        planned += 1;
        let batch = Arc::new(batch);
        let delivery = {
            let (checkpoint, batch, shutdown) =
                (checkpoint.clone(), batch.clone(), shutdown.clone());
            AbortOnDropHandle::new(
                deliveries.spawn(async move { checkpoint.deliver(&batch, &shutdown).await }),
            )
        };
        let sent = queue_tx.send(InFlight {
            batch,
            delivery,
            started: Instant::now(),
            fresh,
            late: late_count as u64,
            _permit: permit,
        });
        if sent.is_err() {
            break Ok(());
        }
    };

    // Batches in flight are delivered and recorded before the recorder ends,
    // unless an outage is under way at shutdown (they are then replayed).
    drop(queue_tx);
    if !mirror_task.is_finished() {
        mirror_task.abort();
        let _ = (&mut mirror_task).await;
    }
    if outcome.is_err() {
        // Not a shutdown: the deliveries in flight may wait on an outage that
        // nobody will end. Leave them to be replayed.
        recorder.abort();
    }
    let recorded = (&mut recorder).await;
    // The recorder is done, and with it every delivery it had not awaited
    // (aborted as its queue was dropped): wait until they have all ended.
    deliveries.close();
    deliveries.wait().await;
    lag.stop().await;
    outcome?;
    match recorded.expect("the recorder does not panic") {
        Ok(()) => {}
        Err(Stopped::Shutdown) => {
            tracing::info!("shutdown during an outage: the batches in flight are left unrecorded and will be replayed");
        }
        Err(Stopped::Fatal(error)) => {
            return Err(RunError::Fatal {
                step: "delivery",
                error,
            })
        }
    }
    tracing::info!("stopped");
    let _ = server.await;
    Ok(())
}

/// How long a delivery may go without an answer before the recorder says so.
const STUCK_DELIVERY: Duration = Duration::from_secs(15);

/// A batch planned and on its way to the sinks.
struct InFlight {
    batch: Arc<Batch>,
    /// Aborted if dropped before it is awaited (the recorder stopped).
    delivery: AbortOnDropHandle<Result<crate::sinks::Refusals, Stopped>>,
    started: Instant,
    fresh: u64,
    late: u64,
    /// Held until the batch is recorded: bounds the batches in flight.
    _permit: OwnedSemaphorePermit,
}

/// Waits for each batch's delivery, in the order planned, and records it.
/// Stops at the first batch that cannot be delivered: the batches after it
/// are not recorded either, and are replayed after a restart.
async fn record_in_order(
    checkpoint: Arc<Checkpoint>,
    source: Arc<Source>,
    mut queue: mpsc::UnboundedReceiver<InFlight>,
    recorded: watch::Sender<u64>,
    positions: watch::Sender<BTreeMap<i32, i64>>,
    refused: mpsc::UnboundedSender<Version>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Stopped> {
    while let Some(mut f) = queue.recv().await {
        // A sink that fails is retried and logged by the delivery itself; one
        // that neither answers nor fails would be silent, so say so here.
        let delivered = loop {
            match tokio::time::timeout(STUCK_DELIVERY, &mut f.delivery).await {
                Ok(outcome) => break outcome.expect("a delivery does not panic"),
                Err(_) => tracing::warn!(
                    seconds = f.started.elapsed().as_secs(),
                    notifications = f.batch.plan.notifications.len(),
                    "a batch is still being delivered without an error: waiting on a \
                     Postgres commit or the broker's acknowledgements"
                ),
            }
        };
        let newly = checkpoint
            .record(&f.batch, delivered?, &source, f.started, &shutdown)
            .await?;
        for key in newly {
            // The planner is gone only when the service is stopping.
            let _ = refused.send(key);
        }
        recorded.send_modify(|r| *r += 1);
        positions.send_replace(f.batch.positions.clone());

        let (batch, tally) = (&f.batch, f.batch.plan.tally);
        metrics::counter!("promo_fanout_messages_consumed_total").increment(f.fresh);
        metrics::counter!("promo_fanout_messages_invalid_total").increment(batch.dead.len() as u64);
        metrics::counter!("promo_fanout_actions_expired_total").increment(tally.expired);
        metrics::counter!("promo_fanout_actions_scheduled_total").increment(tally.scheduled);
        metrics::counter!("promo_fanout_actions_eligible_total").increment(tally.eligible);
        metrics::counter!("promo_fanout_actions_updated_total").increment(tally.updated);
        metrics::counter!("promo_fanout_late_notifications_total").increment(f.late);
        if f.fresh > 0 || !batch.plan.notifications.is_empty() || f.late > 0 {
            tracing::info!(
                messages = f.fresh,
                invalid = batch.dead.len(),
                eligible = tally.eligible,
                scheduled = tally.scheduled,
                expired = tally.expired,
                updated = tally.updated,
                notifications = batch.plan.notifications.len(),
                late = f.late,
                "batch committed"
            );
        }
    }
    Ok(())
}

/// Campaigns the sinks refused are planned no more: the version refused is
/// forgotten, unless a later action for the same ids has replaced it.
fn forget_refused(
    campaigns: &mut BTreeMap<CampaignKey, Campaign>,
    refused: &mut mpsc::UnboundedReceiver<Version>,
) {
    while let Ok((key, origin)) = refused.try_recv() {
        if campaigns.get(&key).is_some_and(|c| c.origin == origin) {
            campaigns.remove(&key);
        }
    }
}

/// Resolves once the recorder has stopped (its sender is dropped).
async fn recorder_stopped(recorded: &mut watch::Receiver<u64>) {
    while recorded.changed().await.is_ok() {}
}

async fn connect_postgres(
    settings: &Settings,
    health: &Health,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<FeedbackSink>, RunError> {
    let last_error = std::sync::Mutex::new(String::new());
    let attempts = until_done(
        "postgres connect",
        || async {
            let result =
                FeedbackSink::connect(&settings.postgres_url, settings.pipeline_depth).await;
            if let Err(e) = &result {
                *last_error.lock().expect("not poisoned") = e.to_string();
            }
            result
        },
        shutdown,
        |ok| health.feedback.set_ok(ok),
    );
    match tokio::time::timeout(settings.startup_timeout, attempts).await {
        Err(_elapsed) => Err(RunError::Unreachable {
            what: format!("Postgres at {}", settings.postgres_url_redacted()),
            timeout: humantime::format_duration(settings.startup_timeout),
            last_error: last_error.into_inner().expect("not poisoned"),
        }),
        Ok(Ok(sink)) => Ok(Some(sink)),
        Ok(Err(Stopped::Shutdown)) => Ok(None),
        Ok(Err(Stopped::Fatal(error))) => Err(RunError::Fatal {
            step: "postgres connect",
            error,
        }),
    }
}

/// Resolves `mirror-mode`: `auto` is `cdc` when the server allows it, else
/// `refresh` with a line saying what is missing. Returns `None` on shutdown.
async fn mirror_mode(
    settings: &Settings,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<MirrorMode>, RunError> {
    let feed = crate::cdc::FeedConfig::new(settings);
    let wanted = settings.mirror_mode;
    let checked = until_done(
        "change feed check",
        || async {
            let client = crate::sinks::postgres_connect(&settings.postgres_url)
                .await
                .map_err(SinkError::Postgres)?;
            let missing = crate::cdc::missing(&client, &feed).await?;
            let cdc = wanted == MirrorMode::Cdc || (wanted == MirrorMode::Auto && missing.is_empty());
            if cdc {
                return Ok(missing);
            }
            // Refresh mode: a slot of ours would only keep WAL. Drop it.
            match crate::cdc::drop_slot(&client, &feed.slot).await {
                Ok(true) => tracing::warn!(slot = %feed.slot, "dropped this pipeline's replication slot: refresh mode does not read it"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, slot = %feed.slot, "could not drop this pipeline's replication slot"),
            }
            Ok(missing)
        },
        shutdown,
        |_| {},
    )
    .await;
    let missing = match checked {
        Ok(m) => m,
        Err(Stopped::Shutdown) => return Ok(None),
        Err(Stopped::Fatal(error)) => {
            return Err(RunError::Fatal {
                step: "change feed check",
                error,
            })
        }
    };
    let mode = match (wanted, missing.is_empty()) {
        (MirrorMode::Refresh, _) => MirrorMode::Refresh,
        (_, true) => MirrorMode::Cdc,
        (MirrorMode::Cdc, false) => return Err(RunError::CdcUnavailable(missing.join("; "))),
        (MirrorMode::Auto, false) => {
            tracing::warn!(
                missing = %missing.join("; "),
                "mirror-mode auto: the server cannot feed changes; re-reading the table every refresh-interval instead"
            );
            MirrorMode::Refresh
        }
    };
    tracing::info!(mode = ?mode, slot = %feed.slot, publication = %feed.publication, "mirror mode");
    Ok(Some(mode))
}

/// Brings the mirror to a state it can be followed from: in `cdc` mode the
/// slot and, where needed, a snapshot after it; in `refresh` mode the first
/// snapshot if the store has none. Returns false when shutdown came first.
async fn load_mirror(
    settings: &Settings,
    mode: MirrorMode,
    store: &Arc<Store>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, RunError> {
    let started = std::time::Instant::now();
    let outcome = if mode == MirrorMode::Cdc {
        let feed = crate::cdc::FeedConfig::new(settings);
        until_done(
            "change feed start",
            || crate::cdc::prepare(store.clone(), &feed, clock::now()),
            shutdown,
            |_| {},
        )
        .await
    } else {
        if store
            .mirror_position()?
            .is_some_and(|p| p.snapshot_complete)
        {
            tracing::info!("mirror present; resuming without a snapshot");
            return Ok(true);
        }
        tracing::info!("mirror empty or incomplete; taking a snapshot of subscribers_restaurants");
        until_done(
            "mirror snapshot",
            // `sync` succeeds only once the whole table has been merged.
            || async {
                let plan = mirror::SyncPlan::refresh(clock::now(), false);
                mirror::sync(store.clone(), &settings.postgres_url, plan)
                    .await
                    .map(|stats| {
                        tracing::info!(rows = stats.rows, "mirror snapshot loaded");
                    })
            },
            shutdown,
            |_| {},
        )
        .await
    };
    match outcome {
        Ok(()) => {
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "mirror ready");
            Ok(true)
        }
        Err(Stopped::Shutdown) => Ok(false),
        Err(Stopped::Fatal(error)) => Err(RunError::Fatal {
            step: "mirror snapshot",
            error,
        }),
    }
}

/// Waits for the input topic's partitions. A broker that never answers
/// within `startup-timeout` is an error; a broker that answers that the topic
/// does not exist is waited on (not ready) until someone creates it.
async fn wait_for_topic(
    settings: &Settings,
    source: &Source,
    health: &Health,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Vec<i32>>, RunError> {
    let last_error = std::sync::Mutex::new(String::new());
    let answered_once = std::sync::atomic::AtomicBool::new(false);
    let attempts = until_done(
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
            if answered {
                answered_once.store(true, Ordering::Relaxed);
            }
            if let Err(e) = &result {
                *last_error.lock().expect("not poisoned") = e.to_string();
            }
            health.consumer.set_ok(answered);
            result
        },
        shutdown,
        |ok| health.input_assigned.store(ok, Ordering::Relaxed),
    );
    tokio::pin!(attempts);
    let outcome = tokio::select! {
        outcome = &mut attempts => outcome,
        _ = tokio::time::sleep(settings.startup_timeout) => {
            if !answered_once.load(Ordering::Relaxed) {
                return Err(RunError::Unreachable {
                    what: format!("the Kafka brokers at {}", settings.brokers),
                    timeout: humantime::format_duration(settings.startup_timeout),
                    last_error: last_error.lock().expect("not poisoned").clone(),
                });
            }
            tracing::warn!(topic = %settings.input_topic, "the input topic does not exist yet; waiting for it (not ready)");
            attempts.await
        }
    };
    match outcome {
        Ok(p) => Ok(Some(p)),
        Err(Stopped::Shutdown) => Ok(None),
        Err(Stopped::Fatal(error)) => Err(RunError::Fatal {
            step: "input topic metadata",
            error,
        }),
    }
}
