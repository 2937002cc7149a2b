//! `mirror-mode = refresh`: the table re-read every `refresh-interval` and
//! merged into the mirror, for servers that cannot feed changes.

use std::sync::Arc;
use std::time::Duration;

use promo_fanout_state::Store;
use tokio_util::sync::CancellationToken;

use super::{sync, SyncPlan};

/// Re-reads the table every `interval` until `shutdown` fires; failures are
/// logged and retried at the next tick.
pub async fn refresh_loop(
    store: Arc<Store>,
    postgres_url: String,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let started = std::time::Instant::now();
        let plan = SyncPlan::refresh(crate::infra::clock::now(), true);
        match sync(store.clone(), &postgres_url, plan, None).await {
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
