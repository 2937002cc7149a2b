//! The service: source → planner → committer (sinks, then store), batch
//! after batch, with the mirror kept current beside them, until shutdown.
//!
//! [`run`] starts the parts in order (metrics, Postgres, the mirror, the
//! input topic, the positions) and loops: read a batch of input, plan it,
//! submit it to the committer. The committer delivers up to
//! `pipeline-depth` batches at once and records them in order; the planner
//! plans from its own in-memory state, so it never waits for the sinks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use promo_fanout_state::{Identity, Ownership, Store};
use rdkafka::error::RDKafkaErrorCode;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::checkpoint::{Checkpoint, Committer, Recorded};
use crate::config::Settings;
use crate::infra::clock;
use crate::infra::health::{self, Health};
use crate::infra::retry::{backoff, until_done, Failure, Stopped};
use crate::mirror::{self, Follower};
use crate::partitions::{self, Scope};
use crate::planner::Planner;
use crate::sinks::{postgres_connect, FeedbackSink, KafkaSink};
use crate::source::{Change, CommitMode, LagReporter, Source};

/// How long an idle loop waits for input before it looks at scheduled
/// campaigns again.
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// How often the consumer lag is asked of the broker (one watermark request
/// per partition, off the batch loop).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Why the service stopped, named after what failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(Box<promo_fanout_state::StoreError>),
    #[error("cannot serve metrics on {addr}: {error}")]
    Metrics {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("kafka client: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    #[error("postgres connect: {0}")]
    PostgresConnect(Failure),
    #[error(transparent)]
    MirrorStart(Box<mirror::StartError>),
    #[error("the mirror stopped: {0}")]
    Mirror(Failure),
    #[error("input topic metadata: {0}")]
    InputTopic(Failure),
    #[error(transparent)]
    Start(#[from] crate::source::StartError),
    #[error("cannot reach {what} within the startup timeout ({timeout}): {last_error}")]
    Unreachable {
        what: String,
        timeout: humantime::FormattedDuration,
        last_error: String,
    },
    #[error(
        "an input position fell out of the topic's retained log while running ({0}); \
         with position-out-of-range = fail the service stops rather than skip: restart \
         it to see which partition and how many messages were lost"
    )]
    PositionLost(rdkafka::error::KafkaError),
    #[error("delivery: {0}")]
    Delivery(Failure),
    #[error("taking the input partitions: {0}{hint}", hint = migrate_hint(.0))]
    Partitions(Failure),
}

impl RunError {
    /// Another instance took this one's partitions, while it recorded a
    /// batch or took them itself.
    fn is_fenced(&self) -> bool {
        matches!(
            self,
            RunError::Delivery(Failure::Fenced(_)) | RunError::Partitions(Failure::Fenced(_))
        )
    }
}

impl From<promo_fanout_state::StoreError> for RunError {
    fn from(error: promo_fanout_state::StoreError) -> Self {
        RunError::Store(Box::new(error))
    }
}

/// How each step of [`run`] stops: on shutdown, or with what failed.
type Step<T> = Result<T, Stopped<RunError>>;

fn failed<E: Into<RunError>>(error: E) -> Stopped<RunError> {
    Stopped::Fatal(error.into())
}

pub fn identity(settings: &Settings) -> Identity {
    Identity {
        group_id: settings.group_id.clone(),
        input_topic: settings.input_topic.clone(),
    }
}

/// Runs the service until `shutdown` is cancelled. The batches in flight are
/// finished and recorded first.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let store = Arc::new(Store::open(settings.state_dir(), &identity(&settings))?);
    store.claim_instance(&settings.instance_id)?;
    let health = Arc::new(Health::default());
    let server = MetricsServer::start(&settings, &health, &shutdown).await?;
    // After the recorder is installed by the server's start.
    crate::checkpoint::register_counters();
    tracing::info!(
        state_dir = %settings.state_dir.display(),
        brokers = %settings.brokers,
        postgres = %settings.postgres_url_redacted(),
        kafka = ?settings.kafka_redacted(),
        input = %settings.input_topic,
        output = %settings.output_topic,
        dlq = %settings.dlq_topic,
        "starting"
    );
    let mut rejoins = Rejoins::default();
    let outcome = loop {
        let started = Pipeline::start(settings.clone(), store.clone(), health.clone(), &shutdown);
        let ran_from = std::time::Instant::now();
        let outcome = match started.await {
            Ok(pipeline) => pipeline.run().await,
            Err(Stopped::Shutdown) => Ok(()),
            Err(Stopped::Fatal(error)) => Err(error),
        };
        let Some(error) = outcome.as_ref().err().filter(|e| e.is_fenced()) else {
            break outcome;
        };
        if shutdown.is_cancelled() {
            // Stopping anyway: what was in flight is the new holder's.
            tracing::warn!(%error, "stopped; the batches in flight were fenced");
            break Ok(());
        }
        let wait = rejoins.after(error, ran_from.elapsed(), &health);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    server.stop().await;
    outcome
}

/// Another instance took partitions while this one had batches for them in
/// flight or was taking them (the group moved them without this instance
/// letting go first: a session that ended unnoticed, or a broker's
/// cooperative rebalance that did not wait). The fence rolled the batches
/// back; everything this instance held in memory is dropped, and it leaves
/// the consumer group and joins again, as a restart would, taking what the
/// group gives it from the durable state. Rejoins that follow each other
/// quickly wait longer and longer (two instances given the same partitions
/// would otherwise fence each other in a tight loop).
struct Rejoins {
    /// The waits of this run of fences, from the outages' [`backoff`].
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

/// A pipeline that ran this long before its fence starts the backoff over.
const REJOIN_RESET: Duration = Duration::from_secs(60);

impl Default for Rejoins {
    fn default() -> Self {
        Rejoins {
            delays: Box::new(backoff()),
        }
    }
}

impl Rejoins {
    /// Counts the fence (`fenced`: the error it stopped the pipeline with,
    /// saying where it struck) and says how long to wait before joining
    /// again.
    fn after(&mut self, fenced: &RunError, ran: Duration, health: &Health) -> Duration {
        if ran >= REJOIN_RESET {
            *self = Rejoins::default();
        }
        let wait = self.delays.next().expect("the backoff never ends");
        health.joined.store(false, Ordering::Relaxed);
        metrics::counter!("promo_fanout_rebalances_total", "kind" => "fenced").increment(1);
        metrics::gauge!("promo_fanout_partitions_held").set(0.0);
        tracing::warn!(%fenced, wait_ms = wait.as_millis() as u64, "leaving the consumer group and joining it again");
        wait
    }
}

/// `/metrics`, `/healthz` and `/readyz`, served until shutdown or until
/// `run` returns, whichever is first.
struct MetricsServer {
    task: tokio::task::JoinHandle<()>,
    stop_guard: DropGuard,
}

impl MetricsServer {
    async fn start(
        settings: &Settings,
        health: &Arc<Health>,
        shutdown: &CancellationToken,
    ) -> Result<MetricsServer, RunError> {
        // A child token: cancelled on shutdown, and when `run` returns. (An
        // aborted axum server would leave its shutdown watcher behind.)
        let stop = shutdown.child_token();
        let stopped = stop.clone();
        let task = health::serve(
            settings.metrics_addr,
            health.clone(),
            health::install_metrics(),
            async move { stopped.cancelled().await },
        )
        .await
        .map_err(|error| RunError::Metrics {
            addr: settings.metrics_addr,
            error,
        })?;
        Ok(MetricsServer {
            task,
            stop_guard: stop.drop_guard(),
        })
    }

    async fn stop(self) {
        drop(self.stop_guard);
        let _ = self.task.await;
    }
}

/// The running parts of the service.
struct Pipeline {
    settings: Settings,
    source: Arc<Source>,
    planner: Planner,
    committer: Committer,
    checkpoint: Arc<Checkpoint>,
    store: Arc<Store>,
    mirror: Follower,
    lag: LagReporter,
    /// The positions recorded, for the lag reporter.
    recorded: watch::Sender<BTreeMap<i32, i64>>,
    shutdown: CancellationToken,
}

impl Pipeline {
    /// Starts every part, in order: Postgres, the mirror, the input topic
    /// (joining the consumer group), then the planner and the committer.
    /// Partitions come with the group's first rebalance.
    async fn start(
        settings: Settings,
        store: Arc<Store>,
        health: Arc<Health>,
        shutdown: &CancellationToken,
    ) -> Step<Pipeline> {
        let shutdown = shutdown.clone();
        let feedback = connect_postgres(&settings, &health, &shutdown).await?;
        let kafka = KafkaSink::new(&settings).map_err(failed)?;
        let source = Arc::new(Source::new(&settings).map_err(failed)?);
        let mirror = mirror::start(&settings, &store, &health, &shutdown)
            .await
            .map_err(|s| s.map(|e| RunError::MirrorStart(Box::new(e))))?;
        wait_for_topic(&settings, &source, &health, &shutdown).await?;
        source.subscribe().map_err(failed)?;
        warn_of_missing_outputs(&settings, &source);
        metrics::gauge!("promo_fanout_partitions_held").set(0.0);
        let (recorded, positions_rx) = watch::channel(BTreeMap::new());
        let lag = crate::source::report_lag(&settings, health.clone(), positions_rx, LAG_EVERY)
            .map_err(failed)?;
        let checkpoint = Arc::new(Checkpoint {
            feedback,
            scope: Scope::of(&settings),
            held: Default::default(),
            unheld: std::sync::Mutex::new(
                store.ownerships().map_err(failed)?.into_keys().collect(),
            ),
            kafka,
            store: store.clone(),
            health,
            sent_retention: settings.sent_retention.as_secs() as i64,
            input_topic: settings.input_topic.clone(),
            refused: Default::default(),
        });
        let depth = settings.pipeline_depth;
        let committer = Committer::new(checkpoint.clone(), source.clone(), depth, shutdown.clone());
        Ok(Pipeline {
            planner: Planner::new(&settings, store.clone(), BTreeMap::new()).map_err(failed)?,
            committer,
            checkpoint,
            store,
            settings,
            source,
            mirror,
            lag,
            recorded,
            shutdown,
        })
    }

    /// Loops until shutdown or an error, then stops every part: on shutdown
    /// the batches in flight are delivered and recorded, on an error they
    /// are left to be replayed.
    async fn run(mut self) -> Result<(), RunError> {
        let outcome = match self.batches().await {
            Err(Stopped::Fatal(error)) => Err(error),
            Ok(()) | Err(Stopped::Shutdown) => self.drain().await,
        };
        self.committer.abort().await;
        self.mirror.stop().await;
        self.lag.stop().await;
        tracing::info!("stopped");
        outcome
    }

    /// Reads, plans and submits batches, one per pass.
    async fn batches(&mut self) -> Step<()> {
        loop {
            // Checked first: with input waiting, the select below could take
            // another batch after a shutdown was asked for.
            if self.shutdown.is_cancelled() {
                return Err(Stopped::Shutdown);
            }
            let mut changes = self.source.changes().into_iter();
            while let Some(change) = changes.next() {
                if let Err(stopped) = self.rebalance(&change).await {
                    // librdkafka waits for every change to be carried out,
                    // and closing the consumer would wait forever: what is
                    // left is carried out by the close (`Source`'s drop).
                    self.source.requeue(std::iter::once(change).chain(changes));
                    return Err(stopped);
                }
            }
            while let Some(recorded) = self.committer.next().now_or_never() {
                self.recorded(recorded.map_err(|s| s.map(RunError::Delivery))?);
            }
            let wait = if self.planner.busy(clock::now()) {
                Duration::ZERO
            } else {
                IDLE_WAIT
            };
            let (max, linger) = (self.settings.batch_size, self.settings.batch_linger);
            let messages = tokio::select! {
                m = self.source.next_batch(max, wait, linger) => m.map_err(|e| failed(RunError::PositionLost(e)))?,
                stopped = self.mirror.stopped() => return Err(match stopped {
                    Some(error) => failed(RunError::Mirror(error)),
                    None if self.shutdown.is_cancelled() => Stopped::Shutdown,
                    None => failed(RunError::Mirror(Failure::Config(
                        "the mirror task ended unexpectedly".into(),
                    ))),
                }),
                _ = self.shutdown.cancelled() => return Err(Stopped::Shutdown),
            };
            let intake = self.planner.intake(messages);
            if intake.messages() > 0 {
                crate::failpoint!("after-validation");
            }
            // Decided against what is recorded and what is in flight: the
            // batches in flight need not be waited for.
            let markers = self.planner.late_markers().map_err(failed)?;
            let Some(batch) = self
                .planner
                .plan(intake, markers, clock::now())
                .map_err(failed)?
            else {
                continue;
            };
            while self.committer.is_full() {
                let recorded = self.next_recorded().await?;
                self.recorded(recorded);
            }
            self.committer.submit(batch);
        }
    }

    /// Carries out a change of this instance's partitions (see
    /// [`adopt`](Pipeline::adopt), [`release`](Pipeline::release)).
    async fn rebalance(&mut self, change: &Change) -> Step<()> {
        let started = std::time::Instant::now();
        let kind = change.kind();
        let partitions = match change {
            Change::Assign(p) => {
                self.adopt(p).await?;
                let health = &self.checkpoint.health;
                health.joined.store(true, Ordering::Relaxed);
                p
            }
            Change::Revoke(p) => {
                self.release(p).await?;
                p
            }
            Change::Lost(p) => {
                // Another instance may hold them already: then the batches
                // in flight are fenced, and the instance joins again.
                tracing::warn!(partitions = ?p, "the consumer group says this instance lost partitions (its session or generation expired); letting them go");
                self.release(p).await?;
                p
            }
        };
        let held = self.planner.partitions();
        let took = started.elapsed();
        metrics::counter!("promo_fanout_rebalances_total", "kind" => kind).increment(1);
        metrics::histogram!("promo_fanout_handoff_seconds", "kind" => kind)
            .record(took.as_secs_f64());
        metrics::gauge!("promo_fanout_partitions_held").set(held.len() as f64);
        tracing::info!(
            kind,
            ?partitions,
            ?held,
            ms = took.as_millis() as u64,
            "rebalance carried out"
        );
        Ok(())
    }

    /// Partitions given to this instance: taken in Postgres (which fences
    /// their previous holder), their state brought to the durable one, and
    /// only then read.
    async fn adopt(&mut self, partitions: &[i32]) -> Step<()> {
        // Batches planned without these partitions may have handled
        // late-subscriber markers without their campaigns: recorded first,
        // they mark the store's state of the partitions as not exact.
        self.record_in_flight().await?;
        let (settings, store) = (&self.settings, &self.store);
        let scope = &self.checkpoint.scope;
        let held = take_partitions(settings, scope, store, partitions, &self.shutdown).await?;
        let (start, positions) =
            start_positions(settings, &self.source, store, partitions).map_err(failed)?;
        self.planner.adopt(&positions).map_err(failed)?;
        self.checkpoint
            .held
            .lock()
            .expect("not poisoned")
            .extend(held);
        let mut unheld = self.checkpoint.unheld.lock().expect("not poisoned");
        unheld.retain(|p| !partitions.contains(p));
        drop(unheld);
        self.recorded.send_modify(|r| r.extend(&positions));
        self.source.start_reading(&start).map_err(failed)
    }

    /// Partitions taken away: nothing more is planned for them, every batch
    /// in flight is delivered and recorded (batches mix partitions), their
    /// offsets are committed, and only then are they let go.
    async fn release(&mut self, partitions: &[i32]) -> Step<()> {
        self.planner.release(partitions);
        self.record_in_flight().await?;
        let mut positions = self.store.input_positions().map_err(failed)?;
        positions.retain(|p, _| partitions.contains(p));
        if let Err(error) = self.source.commit(&positions, CommitMode::Sync) {
            tracing::warn!(%error, "consumer offset commit failed for released partitions; Postgres holds the positions");
        }
        self.checkpoint
            .held
            .lock()
            .expect("not poisoned")
            .retain(|p, _| !partitions.contains(p));
        let mut unheld = self.checkpoint.unheld.lock().expect("not poisoned");
        unheld.extend(partitions);
        drop(unheld);
        self.recorded
            .send_modify(|r| r.retain(|p, _| !partitions.contains(p)));
        for p in partitions {
            metrics::gauge!("promo_fanout_consumer_lag", "partition" => p.to_string()).set(0.0);
        }
        self.source.stop_reading(partitions).map_err(failed)
    }

    /// Waits until every batch in flight is recorded.
    async fn record_in_flight(&mut self) -> Step<()> {
        while !self.committer.is_empty() {
            let recorded = self.next_recorded().await?;
            self.recorded(recorded);
        }
        Ok(())
    }

    /// The next batch recorded, unless shutdown comes first.
    async fn next_recorded(&mut self) -> Step<Recorded> {
        tokio::select! {
            r = self.committer.next() => r.map_err(|s| s.map(RunError::Delivery)),
            _ = self.shutdown.cancelled() => Err(Stopped::Shutdown),
        }
    }

    /// Takes in a recorded batch: its positions for the lag, its refusals
    /// for the planner.
    fn recorded(&mut self, recorded: Recorded) {
        self.planner.recorded();
        self.planner.forget(&recorded.refused);
        let held = self.planner.partitions();
        self.recorded.send_modify(|r| {
            for (p, next) in &recorded.batch.positions {
                if held.contains(p) {
                    r.insert(*p, *next);
                }
            }
        });
    }

    /// Delivers and records the batches in flight at shutdown, unless an
    /// outage holds them past the grace period: they are then replayed
    /// after the restart.
    async fn drain(&mut self) -> Result<(), RunError> {
        while !self.committer.is_empty() {
            match self.committer.next().await {
                Ok(recorded) => self.recorded(recorded),
                Err(Stopped::Shutdown) => {
                    tracing::info!("shutdown during an outage: the batches in flight are left unrecorded and will be replayed");
                    break;
                }
                Err(Stopped::Fatal(error)) => return Err(RunError::Delivery(error)),
            }
        }
        Ok(())
    }
}

/// Where each of `partitions` starts (see [`Source::start_positions`]), and
/// the positions to plan from: those the policy moved forward are committed
/// with the next batch.
type Start = (BTreeMap<i32, i64>, BTreeMap<i32, i64>);

fn start_positions(
    settings: &Settings,
    source: &Source,
    store: &Store,
    partitions: &[i32],
) -> Result<Start, RunError> {
    let mut stored = store.input_positions()?;
    stored.retain(|p, _| partitions.contains(p));
    let start = source.start_positions(
        partitions,
        &stored,
        settings.position_out_of_range,
        Duration::from_secs(10),
    )?;
    tracing::info!(topic = %source.topic(), ?partitions, ?stored, ?start, "input assigned");
    let mut positions = stored;
    for (p, next) in &start {
        let known = positions.entry(*p).or_insert(*next);
        *known = (*known).max(*next);
    }
    Ok((start, positions))
}

/// Takes `partitions` for this instance and brings the store's state of
/// each to the durable one in Postgres (see [`crate::partitions`]).
async fn take_partitions(
    settings: &Settings,
    scope: &Scope,
    store: &Store,
    partitions: &[i32],
    shutdown: &CancellationToken,
) -> Step<BTreeMap<i32, Ownership>> {
    let retention = settings.sent_retention.as_secs() as i64;
    let restored = until_done(
        "take input partitions",
        || async {
            let mut client = postgres_connect(&settings.postgres_url)
                .await
                .map_err(Failure::Postgres)?;
            let taken = partitions::take(&client, scope, partitions).await?;
            crate::failpoint!("after-take");
            partitions::restore(store, &mut client, scope, &taken, retention).await
        },
        shutdown,
        |_| {},
    )
    .await
    .map_err(|s| s.map(RunError::Partitions))?;
    tracing::info!(
        instance = %scope.instance,
        kept = ?restored.kept,
        seeded = ?restored.seeded,
        restored = ?restored.restored,
        "input partitions taken"
    );
    Ok(restored.held)
}

/// Postgres has no such table: the migrations were not applied.
fn migrate_hint(failure: &Failure) -> &'static str {
    match failure {
        Failure::Postgres(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
        {
            " (run `promo-fanout migrate` first)"
        }
        _ => "",
    }
}

async fn connect_postgres(
    settings: &Settings,
    health: &Health,
    shutdown: &CancellationToken,
) -> Step<FeedbackSink> {
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
        Err(_elapsed) => Err(failed(RunError::Unreachable {
            what: format!("Postgres at {}", settings.postgres_url_redacted()),
            timeout: humantime::format_duration(settings.startup_timeout),
            last_error: last_error.into_inner().expect("not poisoned"),
        })),
        Ok(outcome) => outcome.map_err(|s| s.map(RunError::PostgresConnect)),
    }
}

/// The push and dead-letter topics are not waited for (the input may hold
/// nothing to push for a long while), but a missing one is said at start:
/// the first message to it would otherwise fail only after librdkafka's
/// metadata wait (30 s), then be retried until the topic exists.
fn warn_of_missing_outputs(settings: &Settings, source: &Source) {
    for (role, topic) in [
        ("push", &settings.output_topic),
        ("dead-letter", &settings.dlq_topic),
    ] {
        if source.topic_exists(topic, Duration::from_secs(5)) == Some(false) {
            tracing::warn!(%topic, "the {role} topic does not exist: its messages are retried until it is created");
        }
    }
}

/// Waits for the input topic's partitions. A broker that never answers
/// within `startup-timeout` is an error; a broker that answers that the topic
/// does not exist is waited on (not ready) until someone creates it.
async fn wait_for_topic(
    settings: &Settings,
    source: &Source,
    health: &Health,
    shutdown: &CancellationToken,
) -> Step<Vec<i32>> {
    let last_error = std::sync::Mutex::new(String::new());
    let answered_once = std::sync::atomic::AtomicBool::new(false);
    let attempts = until_done(
        "input topic metadata",
        || async {
            let result = source.partitions(Duration::from_secs(5));
            // The broker answered that the topic is unknown: it is reachable.
            let answered = match &result {
                Ok(_) => true,
                Err(Failure::Kafka(e)) => {
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
                return Err(failed(RunError::Unreachable {
                    what: format!("the Kafka brokers at {}", settings.brokers),
                    timeout: humantime::format_duration(settings.startup_timeout),
                    last_error: last_error.lock().expect("not poisoned").clone(),
                }));
            }
            tracing::warn!(topic = %settings.input_topic, "the input topic does not exist yet; waiting for it (not ready)");
            attempts.await
        }
    };
    outcome.map_err(|s| s.map(RunError::InputTopic))
}
