//! `promo-fanout state rebuild`: a new store from Postgres and Kafka, for a
//! lost or damaged state directory.
//!
//! The mirror comes from a snapshot of `subscribers_restaurants`. The sent
//! set comes from `subscribers_feedback`, the record of every notification
//! ever made, so nobody is notified twice. Campaigns found there that can
//! still fire are restored unstarted (their scan skips whoever is in the sent
//! set). Input positions are set to the start of what the topic retains, so
//! the actions the old store knew (scheduled ones included) are read again.
//! Expired ones are skipped, and the sent set stops the rest from repeating.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::{pin_mut, TryStreamExt};
use promo_fanout_state::{Campaign, Commit, Progress, Store};
use rdkafka::consumer::{BaseConsumer, Consumer};
use uuid::Uuid;

use crate::config::Settings;
use crate::infra::clock;
use crate::sinks::{action_of, postgres_connect, Logged, ACTION_COLUMNS, ACTION_COLUMN_COUNT};
use crate::source::consumer_config;
use crate::{mirror, pipeline};

/// What a rebuild restored.
#[derive(Debug, Default)]
pub struct Report {
    pub subscriptions: u64,
    pub sent: u64,
    pub campaigns: u64,
    pub partitions: Vec<(i32, i64)>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rebuilt: {} subscription rows, {} sent entries, {} campaigns; input replays from {:?}",
            self.subscriptions, self.sent, self.campaigns, self.partitions
        )
    }
}

pub async fn rebuild(settings: &Settings) -> anyhow::Result<Report> {
    let dir = settings.state_dir();
    if dir.exists() && dir.read_dir()?.next().is_some() {
        anyhow::bail!(
            "{} is not empty: move the old store aside (it may help a post-mortem) and run \
             `promo-fanout state rebuild` again",
            dir.display()
        );
    }
    let store = Arc::new(Store::open(dir, &pipeline::identity(settings))?);
    let mut report = Report::default();

    let now = clock::now();
    let stats = mirror::sync(
        store.clone(),
        &settings.postgres_url,
        mirror::SyncPlan::refresh(now, false),
        None,
    )
    .await?;
    report.subscriptions = stats.rows;
    let mut commit = restore_sent(settings, &store, now, &mut report).await?;
    report.partitions = input_starts(settings).await?;
    for (p, low) in &report.partitions {
        commit.set_input_position(*p, *low);
    }
    store.commit(commit)?;
    Ok(report)
}

/// The sent set and the campaigns that can still fire, from
/// `subscribers_feedback`; returns the last part, not yet committed.
async fn restore_sent(
    settings: &Settings,
    store: &Store,
    now: i64,
    report: &mut Report,
) -> anyhow::Result<Commit> {
    let retention = settings.sent_retention.as_secs() as i64;
    let client = postgres_connect(&settings.postgres_url).await?;
    let query = format!(
        "SELECT {ACTION_COLUMNS}, client_id FROM subscribers_feedback \
         WHERE adv_campaign_datetime_end > to_timestamp($1) \
         ORDER BY restaurant_id, adv_campaign_id"
    );
    let rows = client.query_raw(&query, [(now - retention) as f64]).await?;
    pin_mut!(rows);
    let mut commit = Commit::new();
    let mut last: Option<(Uuid, Uuid)> = None;
    while let Some(row) = rows.try_next().await? {
        let action = action_of(&row);
        let c: Uuid = row.get(ACTION_COLUMN_COUNT);
        let (r, k) = (action.restaurant_id, action.adv_campaign_id);
        let end = action.adv_campaign_datetime_end;
        if last != Some((r, k)) {
            last = Some((r, k));
            commit.put_campaign(&Campaign {
                action,
                progress: Progress::NotStarted,
                origin: None,
            });
            report.campaigns += 1;
        }
        commit.mark_sent(r, k, c, end.saturating_add(retention));
        report.sent += 1;
        if commit.len() >= 20_000 {
            store.commit(std::mem::take(&mut commit))?;
        }
    }
    Ok(commit)
}

/// Where each input partition's retained log starts.
async fn input_starts(settings: &Settings) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer<Logged> = consumer_config(settings).create_with_context(Logged)?;
    let topic = settings.input_topic.clone();
    let partitions = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(i32, i64)>> {
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(Some(&topic), timeout)?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| anyhow::anyhow!("topic {topic} not found"))?;
        t.partitions()
            .iter()
            .map(|p| {
                let (low, _) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
                Ok((p.id(), low))
            })
            .collect()
    })
    .await??;
    Ok(partitions)
}
