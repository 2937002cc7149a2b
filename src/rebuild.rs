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
use promo_fanout_state::{Action, Campaign, Commit, Progress, Store};
use rdkafka::consumer::{BaseConsumer, Consumer};
use uuid::Uuid;

use crate::config::Settings;
use crate::sinks::{kafka_config, postgres_connect};
use crate::{clock, mirror, pipeline};

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
    )
    .await?;
    report.subscriptions = stats.rows;

    let retention = settings.sent_retention.as_secs() as i64;
    let client = postgres_connect(&settings.postgres_url).await?;
    let rows = client
        .query_raw(
            "SELECT restaurant_id, adv_campaign_id, client_id, adv_campaign_content, \
                    adv_campaign_owner, adv_campaign_owner_contact, \
                    extract(epoch FROM adv_campaign_datetime_start)::int8, \
                    extract(epoch FROM adv_campaign_datetime_end)::int8, \
                    extract(epoch FROM datetime_created)::int8 \
             FROM subscribers_feedback \
             WHERE adv_campaign_datetime_end > to_timestamp($1) \
             ORDER BY restaurant_id, adv_campaign_id",
            [(now - retention) as f64],
        )
        .await?;
    pin_mut!(rows);
    let mut commit = Commit::new();
    let mut last: Option<(Uuid, Uuid)> = None;
    while let Some(row) = rows.try_next().await? {
        let (r, k, c): (Uuid, Uuid, Uuid) = (row.get(0), row.get(1), row.get(2));
        let end: i64 = row.get(7);
        if last != Some((r, k)) {
            last = Some((r, k));
            commit.put_campaign(&Campaign {
                action: Action {
                    restaurant_id: r,
                    adv_campaign_id: k,
                    adv_campaign_content: row.get(3),
                    adv_campaign_owner: row.get(4),
                    adv_campaign_owner_contact: row.get(5),
                    adv_campaign_datetime_start: row.get(6),
                    adv_campaign_datetime_end: end,
                    datetime_created: row.get(8),
                },
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

    let consumer: BaseConsumer = kafka_config(settings)
        .set("group.id", &settings.group_id)
        .create()?;
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
    for (p, low) in &partitions {
        commit.set_input_position(*p, *low);
    }
    report.partitions = partitions;
    store.commit(commit)?;
    Ok(report)
}
