//! `subscribers_feedback`: one idempotent transaction per batch, in which the
//! campaigns whose rows Postgres refuses (a constraint, a trigger, a value
//! out of range) are isolated and left out, and the rest written.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use promo_fanout_state::Action;
use tokio::sync::Mutex;
use tokio_postgres::{Client, GenericClient, NoTls};
use uuid::Uuid;

use crate::fanout::{key_of, CampaignKey, Notification};
use crate::infra::retry::{classify, postgres_text, Disposition, Failure};

/// Campaigns a sink refused for what is in them, with the sink's reason.
pub type Refusals = BTreeMap<CampaignKey, String>;

const INSERT: &str = "\
INSERT INTO subscribers_feedback (
    restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
    adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
    datetime_created, client_id, trigger_datetime_created)
SELECT * FROM UNNEST(
    $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
    $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::uuid[], $10::timestamptz[])
ON CONFLICT (restaurant_id, adv_campaign_id, client_id) DO NOTHING";

/// The action columns of `subscribers_feedback`, times as Unix seconds: a
/// SELECT list that [`action_of`] reads back, from column 0.
pub const ACTION_COLUMNS: &str = "\
    restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, \
    adv_campaign_owner_contact, extract(epoch FROM adv_campaign_datetime_start)::int8, \
    extract(epoch FROM adv_campaign_datetime_end)::int8, \
    extract(epoch FROM datetime_created)::int8";

/// How many columns [`ACTION_COLUMNS`] lists.
pub const ACTION_COLUMN_COUNT: usize = 8;

/// The action a feedback row was written for, selected with
/// [`ACTION_COLUMNS`].
pub fn action_of(row: &tokio_postgres::Row) -> Action {
    Action {
        restaurant_id: row.get(0),
        adv_campaign_id: row.get(1),
        adv_campaign_content: row.get(2),
        adv_campaign_owner: row.get(3),
        adv_campaign_owner_contact: row.get(4),
        adv_campaign_datetime_start: row.get(5),
        adv_campaign_datetime_end: row.get(6),
        datetime_created: row.get(7),
    }
}

/// Writes feedback rows over a few connections, one per batch in flight;
/// each reconnects by itself after an error.
pub struct FeedbackSink {
    url: String,
    /// `None` after a connection error, until the next write reconnects.
    clients: Vec<Mutex<Option<Client>>>,
}

pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

pub fn unix(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl FeedbackSink {
    /// Connects the first of `connections` (at least one) now, to check the
    /// database is there; the others connect on first use.
    pub async fn connect(url: &str, connections: usize) -> Result<FeedbackSink, Failure> {
        let first = connect(url).await.map_err(Failure::Postgres)?;
        let clients = std::iter::once(Mutex::new(Some(first)))
            .chain((1..connections.max(1)).map(|_| Mutex::new(None)))
            .collect();
        Ok(FeedbackSink {
            url: url.to_owned(),
            clients,
        })
    }

    /// Inserts one row per notification in one transaction; rows already
    /// there are left alone. The rows of a campaign Postgres refuses for
    /// their content are left out, and the campaign returned with the reason.
    pub async fn write(&self, batch: &[&Notification]) -> Result<Refusals, Failure> {
        if batch.is_empty() {
            return Ok(Refusals::new());
        }
        // A free connection; with as many connections as batches in flight
        // there is one, the wait on the first is only a fallback.
        let mut guard = match self.clients.iter().find_map(|c| c.try_lock().ok()) {
            Some(guard) => guard,
            None => self.clients[0].lock().await,
        };
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.url).await.map_err(Failure::Postgres)?);
        }
        let client = guard.as_mut().expect("connected above");
        let result = write_isolating(client, batch).await;
        if result.is_err() {
            // The connection's state is unknown: start afresh next time.
            *guard = None;
        }
        result
    }
}

/// The whole batch in one statement; only when Postgres refuses it for its
/// content, again campaign by campaign (halving, each half under a
/// savepoint) until the refused ones are found.
async fn write_isolating(
    client: &mut Client,
    batch: &[&Notification],
) -> Result<Refusals, Failure> {
    let pg = Failure::Postgres;
    let tx = client.transaction().await.map_err(pg)?;
    let error = match insert(&tx, &Rows::new(batch.iter().copied())).await {
        Ok(_) => {
            tx.commit().await.map_err(pg)?;
            return Ok(Refusals::new());
        }
        Err(e) => Failure::Postgres(e),
    };
    if classify(&error) != Disposition::Refuse {
        return Err(error);
    }
    tx.rollback().await.map_err(pg)?;
    tracing::warn!(%error, notifications = batch.len(), "postgres refused a batch for its content; isolating the campaigns it refuses");

    let mut by_campaign: BTreeMap<CampaignKey, Vec<&Notification>> = BTreeMap::new();
    for n in batch {
        by_campaign.entry(key_of(&n.campaign)).or_default().push(n);
    }
    let groups: Vec<(CampaignKey, Vec<&Notification>)> = by_campaign.into_iter().collect();
    let tx = client.transaction().await.map_err(pg)?;
    let mut refused = Refusals::new();
    let mut todo = vec![&groups[..]];
    while let Some(part) = todo.pop() {
        // By hand: a savepoint rolled back is then released, so that
        // savepoints do not nest one per halving.
        tx.batch_execute("SAVEPOINT isolate").await.map_err(pg)?;
        let rows = Rows::new(part.iter().flat_map(|(_, rows)| rows.iter().copied()));
        let error = match insert(&tx, &rows).await {
            Ok(_) => {
                tx.batch_execute("RELEASE SAVEPOINT isolate")
                    .await
                    .map_err(pg)?;
                continue;
            }
            Err(e) => e,
        };
        tx.batch_execute("ROLLBACK TO SAVEPOINT isolate; RELEASE SAVEPOINT isolate")
            .await
            .map_err(pg)?;
        let reason = format!("postgres refused it: {}", postgres_text(&error));
        let error = Failure::Postgres(error);
        if classify(&error) != Disposition::Refuse {
            return Err(error);
        }
        match part {
            [(key, _)] => {
                refused.insert(*key, reason);
            }
            _ => {
                let (first, second) = part.split_at(part.len() / 2);
                todo.push(second);
                todo.push(first);
            }
        }
    }
    tx.commit().await.map_err(pg)?;
    Ok(refused)
}

/// Feedback rows, column by column as the INSERT takes them: one per
/// notification, the action's fields, the client and the trigger time.
struct Rows<'a> {
    restaurant: Vec<Uuid>,
    campaign: Vec<Uuid>,
    content: Vec<&'a str>,
    owner: Vec<Option<&'a str>>,
    contact: Vec<Option<&'a str>>,
    start: Vec<DateTime<Utc>>,
    end: Vec<DateTime<Utc>>,
    created: Vec<DateTime<Utc>>,
    client: Vec<Uuid>,
    trigger: Vec<DateTime<Utc>>,
}

impl<'a> Rows<'a> {
    fn new(notifications: impl Iterator<Item = &'a Notification>) -> Rows<'a> {
        let mut rows = Rows {
            restaurant: Vec::new(),
            campaign: Vec::new(),
            content: Vec::new(),
            owner: Vec::new(),
            contact: Vec::new(),
            start: Vec::new(),
            end: Vec::new(),
            created: Vec::new(),
            client: Vec::new(),
            trigger: Vec::new(),
        };
        for n in notifications {
            let a = &n.campaign.action;
            rows.restaurant.push(a.restaurant_id);
            rows.campaign.push(a.adv_campaign_id);
            rows.content.push(&a.adv_campaign_content);
            rows.owner.push(a.adv_campaign_owner.as_deref());
            rows.contact.push(a.adv_campaign_owner_contact.as_deref());
            rows.start.push(unix(a.adv_campaign_datetime_start));
            rows.end.push(unix(a.adv_campaign_datetime_end));
            rows.created.push(unix(a.datetime_created));
            rows.client.push(n.client_id);
            rows.trigger.push(unix(n.trigger_datetime_created));
        }
        rows
    }
}

/// One statement inserting `rows`, `ON CONFLICT DO NOTHING`.
async fn insert(
    client: &impl GenericClient,
    rows: &Rows<'_>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            INSERT,
            &[
                &rows.restaurant,
                &rows.campaign,
                &rows.content,
                &rows.owner,
                &rows.contact,
                &rows.start,
                &rows.end,
                &rows.created,
                &rows.client,
                &rows.trigger,
            ],
        )
        .await
}
