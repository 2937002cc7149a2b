//! The subscription mirror: `subscribers_restaurants` copied into the state
//! store by a consistent snapshot, then kept current by re-reading the table
//! and applying only the difference.
//!
//! The snapshot and each re-read are the same operation: a merge of the table
//! (read in one REPEATABLE READ transaction, by id) against the mirror's row
//! index, writing puts and deletes in bounded synced batches. A crash midway
//! leaves a mirror that the next run's merge completes; until the first merge
//! finishes the mirror position says `snapshot_complete: false` and nothing
//! fans out from it.

use std::sync::Arc;
use std::time::Duration;

use futures::{pin_mut, TryStreamExt};
use promo_fanout_state::{Commit, MirrorMode, MirrorPosition, Store, Subscription};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::retry::SinkError;

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

/// Reads the whole table consistently and brings the mirror to it.
pub async fn sync(
    store: Arc<Store>,
    postgres_url: &str,
    plan: SyncPlan,
) -> Result<SyncStats, SinkError> {
    let mut client = crate::sinks::postgres_connect(postgres_url)
        .await
        .map_err(SinkError::Postgres)?;
    let (tx, rx) = mpsc::channel::<Feed>(MERGE_BATCH);
    let merge = tokio::task::spawn_blocking(move || merge(&store, rx, plan));

    let read = async {
        let txn = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The first statement takes the snapshot; the WAL position read in
        // it is at or after every commit the snapshot sees.
        let lsn: Option<String> = txn
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_current_wal_lsn()::text END",
                &[],
            )
            .await?
            .get(0);
        let snapshot_lsn = lsn.as_deref().and_then(crate::pgoutput::parse_lsn);
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
    read_result.map_err(SinkError::Postgres)?;
    merged
}

/// The merge join of the table's rows (arriving in id order on `rx`) with the
/// mirror's row index. Runs on a blocking thread: RocksDB iterators are not
/// `Send`.
fn merge(
    store: &Store,
    mut rx: mpsc::Receiver<Feed>,
    plan: SyncPlan,
) -> Result<SyncStats, SinkError> {
    let late = plan.late_seq;
    let mut stats = SyncStats::default();
    let mut commit = Commit::new();
    let mut ours = store.subscription_rows();
    let mut mine = ours.next().transpose()?;
    let flush = |commit: &mut Commit| -> Result<(), SinkError> {
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

/// Re-reads the table every `interval` until `shutdown` fires; failures are
/// logged and retried at the next tick.
pub async fn refresh_loop(
    store: Arc<Store>,
    postgres_url: String,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let started = std::time::Instant::now();
        let plan = SyncPlan::refresh(crate::clock::now(), true);
        match sync(store.clone(), &postgres_url, plan).await {
            Ok(stats) => {
                metrics::histogram!("promo_fanout_mirror_sync_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(
                    rows = stats.rows,
                    inserted = stats.inserted,
                    deleted = stats.deleted,
                    "mirror re-read applied"
                );
            }
            Err(error) => {
                metrics::counter!("promo_fanout_retries_total", "cause" => "mirror").increment(1);
                tracing::warn!(%error, "mirror re-read failed; retrying at the next interval");
            }
        }
    }
}
