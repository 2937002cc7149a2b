//! The change feed read over a replication connection
//! (`START_REPLICATION SLOT … LOGICAL`, through `pgwire-replication`):
//! Postgres decodes each WAL record once and pushes each transaction as it
//! commits.
//!
//! **What is applied when.** Changes are gathered ([`Pending`]) and written
//! to the store in one synced batch when the feed has nothing more queued
//! after a commit, or when [`CHUNK`] changes are held (a large transaction
//! is applied in parts as it arrives, so memory stays bounded whatever its
//! size).
//!
//! **What is confirmed.** The position reported to the server as flushed
//! (standby status updates, which `pgwire-replication` sends every
//! `cdc-status-interval` and whenever the server asks) is only ever the end
//! of a transaction whose changes, and every earlier one's, are in a synced
//! store batch, or a keepalive's position while nothing is under way. A
//! keepalive carries the walsender's sent position, and with protocol
//! version 1 a transaction is sent only once it has committed, whole, before
//! any keepalive past its commit: so moving there skips nothing. An idle
//! table never pins WAL, and a transaction still open is sent whole when it
//! commits.
//!
//! A transaction applied in parts shows the fan-out its state between
//! parts: a row it inserts and deletes again may be seen (and notified) in
//! between. Only transactions of more than [`CHUNK`] changes are split.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use promo_fanout_state::{Commit, MirrorMode, MirrorPosition, Store};
use tokio_util::sync::CancellationToken;

use crate::infra::health::Health;
use crate::infra::retry::Failure;
use crate::mirror::cdc::FeedConfig;
use crate::mirror::changes::{self, Pending, Txn};
use crate::mirror::pgoutput;

/// Changes held at most before they are written, even in the middle of a
/// transaction.
pub const CHUNK: usize = 5_000;

/// Follows the slot from the store's position until shutdown (`Ok`) or an
/// error.
pub async fn follow_slot(
    store: &Arc<Store>,
    feed: &FeedConfig,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), Failure> {
    let mut stream = Stream::open(store, feed).await?;
    health.change_feed.set_ok(true);
    loop {
        let event = tokio::select! {
            event = async {
                stream.write_if_idle().await?;
                stream.recv().await
            } => event?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(event) = event else {
            return Err(Failure::Feed(
                "the server ended the replication stream".into(),
            ));
        };
        stream.handle(event).await?;
    }
}

/// The replication session and what of its feed the store holds.
struct Stream<'a> {
    store: &'a Arc<Store>,
    session: ReplicationClient,
    /// What the store holds: the end of the last transaction applied, or an
    /// idle keepalive's position.
    position: MirrorPosition,
    pending: Pending,
    /// When `position` was last written.
    written_at: Instant,
    /// How long after the last write an idle feed moves its position.
    idle_move: Duration,
    /// The furthest WAL position the server has reported.
    server_end: u64,
    /// An event received while looking whether one was queued.
    queued: Option<pgwire_replication::Result<Option<ReplicationEvent>>>,
}

impl<'a> Stream<'a> {
    async fn open(store: &'a Arc<Store>, feed: &FeedConfig) -> Result<Stream<'a>, Failure> {
        let position = store
            .mirror_position()?
            .filter(|p| p.mode == MirrorMode::Cdc && p.snapshot_complete)
            .ok_or_else(|| Failure::Feed("the change feed started before its snapshot".into()))?;
        let start = position
            .lsn
            .ok_or_else(|| Failure::Feed("the mirror position has no LSN".into()))?;
        // Reported as flushed until something newer is durable.
        let config = feed.replication(Lsn::from_u64(start))?;
        let mut session = ReplicationClient::connect(config)
            .await
            .map_err(Failure::Replication)?;
        session.wait_started().await.map_err(Failure::Replication)?;
        tracing::info!(slot = %feed.slot, from = %Lsn::from_u64(start), "following the change feed");
        Ok(Stream {
            store,
            session,
            position,
            pending: Pending::default(),
            written_at: Instant::now(),
            // Keepalives come about once per status interval: moving on
            // every other one would double the wait.
            idle_move: feed.status_interval / 2,
            server_end: start,
            queued: None,
        })
    }

    /// Applies what is held if a whole transaction is and nothing more is
    /// queued; an event that is queued is kept for [`Stream::recv`].
    async fn write_if_idle(&mut self) -> Result<(), Failure> {
        if self.queued.is_none() && self.pending.has_commit() {
            match self.session.recv().now_or_never() {
                Some(event) => self.queued = Some(event),
                None => self.write().await?,
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<ReplicationEvent>, Failure> {
        let event = match self.queued.take() {
            Some(event) => event,
            None => self.session.recv().await,
        };
        event.map_err(Failure::Replication)
    }

    async fn handle(&mut self, event: ReplicationEvent) -> Result<(), Failure> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => self.pending.begin(final_lsn.as_u64(), commit_time_micros)?,
            ReplicationEvent::XLogData { wal_end, data, .. } => {
                self.server_end = self.server_end.max(wal_end.as_u64());
                let message = pgoutput::parse(&data).map_err(|e| Failure::Feed(e.to_string()))?;
                self.pending.receive(message)?;
                if self.pending.len() >= CHUNK {
                    self.write().await?;
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.pending.commit(end_lsn.as_u64())?,
            ReplicationEvent::KeepAlive { wal_end, .. } => self.keepalive(wal_end.as_u64()).await?,
            _ => {}
        }
        Ok(())
    }

    /// Applies what is held in one synced batch, then lets the server know
    /// how far the store holds the feed.
    async fn write(&mut self) -> Result<(), Failure> {
        let txns = self.pending.take();
        let whole = txns.iter().filter(|t| t.end_lsn.is_some()).count();
        let store = self.store.clone();
        let done = self.position.clone();
        let next = tokio::task::spawn_blocking(move || {
            let (commit, next) = changes::apply(&store, &txns, &done)?;
            store.commit(commit)?;
            record_freshness(&txns);
            Ok::<_, Failure>(next)
        })
        .await
        .expect("the mirror apply does not panic")?;
        crate::failpoint!("cdc-after-apply");
        metrics::counter!("promo_fanout_mirror_transactions_total").increment(whole as u64);
        self.moved(next);
        Ok(())
    }

    /// A keepalive at `wal_end`: with nothing under way, everything that
    /// committed before it has been received and applied, so the position
    /// may move there (every `idle_move`, to keep store writes rare).
    async fn keepalive(&mut self, wal_end: u64) -> Result<(), Failure> {
        self.server_end = self.server_end.max(wal_end);
        let behind = self.position.lsn.is_some_and(|l| wal_end > l);
        if self.pending.is_empty() && behind && self.written_at.elapsed() >= self.idle_move {
            let mut next = self.position.clone();
            next.lsn = Some(wal_end);
            next.synced_at = crate::infra::clock::now();
            let mut commit = Commit::new();
            commit.set_mirror_position(&next);
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.commit(commit))
                .await
                .expect("the store commit does not panic")?;
            self.moved(next);
        } else {
            self.report_lag();
        }
        Ok(())
    }

    /// The store holds `next`: confirm its LSN to the server.
    fn moved(&mut self, next: MirrorPosition) {
        if let Some(lsn) = next.lsn.filter(|&l| self.position.lsn < Some(l)) {
            self.session.update_applied_lsn(Lsn::from_u64(lsn));
        }
        self.position = next;
        self.written_at = Instant::now();
        self.report_lag();
    }

    fn report_lag(&self) {
        if let Some(lsn) = self.position.lsn {
            metrics::gauge!("promo_fanout_mirror_lag_bytes")
                .set(self.server_end.saturating_sub(lsn) as f64);
        }
    }
}

/// Commit in Postgres to durable in the mirror, per whole transaction.
fn record_freshness(txns: &[Txn]) {
    let now = crate::infra::clock::now_f64();
    for t in txns.iter().filter(|t| t.end_lsn.is_some()) {
        metrics::histogram!("promo_fanout_mirror_freshness_seconds")
            .record((now - pgoutput::unix_seconds(t.commit_time)).max(0.0));
    }
}
