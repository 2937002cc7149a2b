//! The subscription mirror: `subscribers_restaurants` copied into the state
//! store by a consistent snapshot, then kept current by the change feed
//! (`cdc`, [`cdc`] and [`stream`]) or by re-reading the table and applying
//! only the difference (`refresh`).
//!
//! The snapshot and each re-read are the same operation: a merge of the table
//! (read in one REPEATABLE READ transaction, by id) against the mirror's row
//! index, writing puts and deletes in bounded synced batches. A crash midway
//! leaves a mirror that the next run's merge completes; until the first merge
//! finishes the mirror position says `snapshot_complete: false` and nothing
//! fans out from it.

pub mod cdc;
pub mod changes;
pub mod pgoutput;
pub mod refresh;
pub mod slots;
pub mod stream;

use std::sync::Arc;
use std::time::Instant;

use futures::{pin_mut, TryStreamExt};
use promo_fanout_state::{Commit, MirrorMode, MirrorPosition, Store, StoreError, Subscription};
use tokio::sync::mpsc;
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use crate::config::{self, Settings};
use crate::infra::clock;
use crate::infra::health::Health;
use crate::infra::retry::{until_done, Failure, Stopped};

/// Why the mirror could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "mirror-mode = cdc: the server cannot feed changes: {0}; fix that, or run with \
         --mirror-mode refresh (or auto, which falls back to it)"
    )]
    CdcUnavailable(String),
    #[error("change feed check: {0}")]
    Check(Failure),
    #[error("mirror snapshot: {0}")]
    Snapshot(Failure),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The mirror, loaded and kept current in the background until shutdown.
pub struct Follower {
    task: AbortOnDropHandle<Result<(), Failure>>,
    /// Reports the WAL kept by the group's replication slots.
    _slots: AbortOnDropHandle<()>,
}

impl Follower {
    /// Resolves if the follower stops: with the error that stopped it, or
    /// with `None` if it ended on shutdown. Not to be awaited again after.
    pub async fn stopped(&mut self) -> Option<Failure> {
        let outcome = (&mut self.task)
            .await
            .expect("the mirror task does not panic");
        outcome.err()
    }

    /// Stops the follower, if it runs, and waits until it has.
    pub async fn stop(mut self) {
        if !self.task.is_finished() {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

/// Chooses the mode (`auto` is `cdc` when the server allows it), loads the
/// mirror (slot and snapshot in `cdc` mode; the first snapshot in `refresh`
/// mode if the store has none) and starts following the table.
pub async fn start(
    settings: &Settings,
    store: &Arc<Store>,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> Result<Follower, Stopped<StartError>> {
    let feed = cdc::FeedConfig::new(settings);
    let mode = choose_mode(settings, &feed, shutdown).await?;
    let started = Instant::now();
    if mode == config::MirrorMode::Cdc {
        let prepare = || cdc::prepare(store.clone(), &feed, clock::now());
        until_done("change feed start", prepare, shutdown, |_| {})
            .await
            .map_err(|s| s.map(StartError::Snapshot))?;
    } else {
        snapshot_if_missing(settings, store, shutdown).await?;
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "mirror ready");
    health
        .mirror_loaded
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let task = if mode == config::MirrorMode::Cdc {
        tokio::spawn(cdc::follow(
            store.clone(),
            feed,
            health.clone(),
            shutdown.clone(),
        ))
    } else {
        let refresh = refresh::refresh_loop(
            store.clone(),
            settings.postgres_url.clone(),
            settings.refresh_interval,
            shutdown.clone(),
        );
        tokio::spawn(async move {
            refresh.await;
            Ok(())
        })
    };
    let slots = tokio::spawn(slots::report(settings.clone(), shutdown.clone()));
    Ok(Follower {
        task: AbortOnDropHandle::new(task),
        _slots: AbortOnDropHandle::new(slots),
    })
}

/// Resolves `mirror-mode`: `auto` is `cdc` when the server allows it, else
/// `refresh` with a line saying what is missing. In `refresh` mode a slot of
/// this pipeline's is dropped: it would only keep WAL.
async fn choose_mode(
    settings: &Settings,
    feed: &cdc::FeedConfig,
    shutdown: &CancellationToken,
) -> Result<config::MirrorMode, Stopped<StartError>> {
    use config::MirrorMode::{Auto, Cdc, Refresh};
    let wanted = settings.mirror_mode;
    let check = || async {
        let client = crate::sinks::postgres_connect(&settings.postgres_url)
            .await
            .map_err(Failure::Postgres)?;
        let missing = cdc::missing(&client, feed).await?;
        if wanted == Refresh || (wanted == Auto && !missing.is_empty()) {
            match cdc::drop_slot(&client, &feed.slot).await {
                Ok(true) => {
                    tracing::warn!(slot = %feed.slot, "dropped this pipeline's replication slot: refresh mode does not read it")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, slot = %feed.slot, "could not drop this pipeline's replication slot")
                }
            }
        }
        Ok(missing)
    };
    let missing = until_done("change feed check", check, shutdown, |_| {})
        .await
        .map_err(|s| s.map(StartError::Check))?;
    let mode = match (wanted, missing.is_empty()) {
        (Refresh, _) => Refresh,
        (_, true) => Cdc,
        (Cdc, false) => {
            return Err(Stopped::Fatal(StartError::CdcUnavailable(
                missing.join("; "),
            )))
        }
        (Auto, false) => {
            tracing::warn!(
                missing = %missing.join("; "),
                "mirror-mode auto: the server cannot feed changes; re-reading the table every refresh-interval instead"
            );
            Refresh
        }
    };
    tracing::info!(mode = ?mode, slot = %feed.slot, publication = %feed.publication, "mirror mode");
    Ok(mode)
}

/// `refresh` mode: the first snapshot, unless the store holds a complete one.
async fn snapshot_if_missing(
    settings: &Settings,
    store: &Arc<Store>,
    shutdown: &CancellationToken,
) -> Result<(), Stopped<StartError>> {
    let complete = store
        .mirror_position()
        .map_err(|e| Stopped::Fatal(e.into()))?
        .is_some_and(|p| p.snapshot_complete);
    if complete {
        tracing::info!("mirror present; resuming without a snapshot");
        return Ok(());
    }
    tracing::info!("mirror empty or incomplete; taking a snapshot of subscribers_restaurants");
    // `sync` succeeds only once the whole table has been merged.
    let snapshot = || async {
        let plan = SyncPlan::refresh(clock::now(), false);
        let stats = sync(store.clone(), &settings.postgres_url, plan, None).await?;
        tracing::info!(rows = stats.rows, "mirror snapshot loaded");
        Ok(())
    };
    until_done("mirror snapshot", snapshot, shutdown, |_| {})
        .await
        .map_err(|s| s.map(StartError::Snapshot))
}

/// Rows per write batch while merging.
const MERGE_BATCH: usize = 20_000;

/// What one merge changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub rows: u64,
    pub inserted: u64,
    pub deleted: u64,
}

/// How a merge ends: the mirror position it writes with its last batch,
/// given the server's WAL position when the snapshot was taken (none on a
/// standby), and whether the rows it adds are late subscribers (a mirror that
/// was complete before: they subscribed while campaigns may be under way).
pub struct SyncPlan {
    pub finish: Box<dyn FnOnce(Option<u64>) -> MirrorPosition + Send>,
    pub late_seq: Option<u64>,
}

impl SyncPlan {
    /// `refresh` mode: a snapshot, or a re-read.
    pub fn refresh(now: i64, late: bool) -> SyncPlan {
        SyncPlan {
            finish: Box::new(move |_| MirrorPosition {
                mode: MirrorMode::Refresh,
                snapshot_complete: true,
                lsn: None,
                slot: None,
                catch_up_until: None,
                synced_at: now,
            }),
            late_seq: late.then_some(now as u64),
        }
    }
}

/// What the reading side hands the merge: rows in id order, then `End` once
/// the whole table has been read. A feed that stops without `End` failed.
enum Feed {
    Row(Subscription),
    /// With the WAL position of the snapshot.
    End(Option<u64>),
}

/// Reads the whole table consistently (in `snapshot`, one a replication
/// slot exported, if given) and brings the mirror to it.
pub async fn sync(
    store: Arc<Store>,
    postgres_url: &str,
    plan: SyncPlan,
    snapshot: Option<&str>,
) -> Result<SyncStats, Failure> {
    let mut client = crate::sinks::postgres_connect(postgres_url)
        .await
        .map_err(Failure::Postgres)?;
    let (tx, rx) = mpsc::channel::<Feed>(MERGE_BATCH);
    let merge = tokio::task::spawn_blocking(move || merge(&store, rx, plan));

    let read = async {
        let txn = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        if let Some(name) = snapshot {
            let name = name.replace('\'', "''");
            txn.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{name}'"))
                .await?;
        }
        // The first statement takes the snapshot (unless one was set); the WAL position read in
        // it is at or after every commit the snapshot sees.
        let lsn: Option<PgLsn> = txn
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_current_wal_lsn() END",
                &[],
            )
            .await?
            .get(0);
        let snapshot_lsn = lsn.map(u64::from);
        let rows = txn
            .query_raw(
                "SELECT id::int8, restaurant_id, client_id FROM subscribers_restaurants ORDER BY id",
                std::iter::empty::<i64>(),
            )
            .await?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await? {
            let sub = Subscription {
                row_id: row.get(0),
                restaurant_id: row.get::<_, Uuid>(1),
                client_id: row.get::<_, Uuid>(2),
            };
            if tx.send(Feed::Row(sub)).await.is_err() {
                // The merge stopped: its own error says why.
                return Ok(());
            }
        }
        txn.commit().await?;
        let _ = tx.send(Feed::End(snapshot_lsn)).await;
        Ok::<_, tokio_postgres::Error>(())
    };
    let read_result = read.await;
    drop(tx);
    let merged = merge.await.expect("the merge thread does not panic");
    read_result.map_err(Failure::Postgres)?;
    merged
}

/// The merge join of the table's rows (arriving in id order on `rx`) with the
/// mirror's row index. Runs on a blocking thread: RocksDB iterators are not
/// `Send`.
fn merge(
    store: &Store,
    mut rx: mpsc::Receiver<Feed>,
    plan: SyncPlan,
) -> Result<SyncStats, Failure> {
    let late = plan.late_seq;
    let mut stats = SyncStats::default();
    let mut commit = Commit::new();
    let mut ours = store.subscription_rows();
    let mut mine = ours.next().transpose()?;
    let flush = |commit: &mut Commit| -> Result<(), Failure> {
        if commit.len() >= MERGE_BATCH {
            store.commit(std::mem::take(commit))?;
            crate::failpoint!("mirror-snapshot-batch");
        }
        Ok(())
    };
    loop {
        match rx.blocking_recv() {
            Some(Feed::Row(theirs)) => {
                stats.rows += 1;
                // Our rows with smaller ids are gone from the table.
                while let Some(m) = mine.filter(|m| m.row_id < theirs.row_id) {
                    commit.delete_subscription(&m);
                    stats.deleted += 1;
                    mine = ours.next().transpose()?;
                }
                match mine {
                    Some(m) if m.row_id == theirs.row_id => {
                        if m != theirs {
                            commit.delete_subscription(&m);
                            commit.put_subscription(&theirs);
                            if let Some(seq) = late {
                                commit.mark_late(theirs.restaurant_id, theirs.client_id, seq);
                            }
                            stats.deleted += 1;
                            stats.inserted += 1;
                        }
                        mine = ours.next().transpose()?;
                    }
                    _ => {
                        commit.put_subscription(&theirs);
                        if let Some(seq) = late {
                            commit.mark_late(theirs.restaurant_id, theirs.client_id, seq);
                        }
                        stats.inserted += 1;
                    }
                }
                flush(&mut commit)?;
            }
            Some(Feed::End(snapshot_lsn)) => {
                while let Some(m) = mine {
                    commit.delete_subscription(&m);
                    stats.deleted += 1;
                    flush(&mut commit)?;
                    mine = ours.next().transpose()?;
                }
                commit.set_mirror_position(&(plan.finish)(snapshot_lsn));
                store.commit(commit)?;
                metrics::counter!("promo_fanout_mirror_snapshots_total").increment(1);
                return Ok(stats);
            }
            None => {
                // The read failed midway. What was merged so far is true of
                // the snapshot; keep it, and leave the position as it was.
                store.commit(commit)?;
                return Ok(stats);
            }
        }
    }
}
