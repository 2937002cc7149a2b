//! `subscribers_feedback`: one idempotent transaction per batch.

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::fanout::Notification;
use crate::retry::SinkError;

const INSERT: &str = "\
INSERT INTO subscribers_feedback (
    restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
    adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
    datetime_created, client_id, trigger_datetime_created)
SELECT * FROM UNNEST(
    $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
    $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::uuid[], $10::timestamptz[])
ON CONFLICT (restaurant_id, adv_campaign_id, client_id) DO NOTHING";

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
    pub async fn connect(url: &str, connections: usize) -> Result<FeedbackSink, SinkError> {
        let first = connect(url).await.map_err(SinkError::Postgres)?;
        let clients = std::iter::once(Mutex::new(Some(first)))
            .chain((1..connections.max(1)).map(|_| Mutex::new(None)))
            .collect();
        Ok(FeedbackSink {
            url: url.to_owned(),
            clients,
        })
    }

    /// Inserts one row per notification in one transaction; rows already
    /// there are left alone. Returns how many rows were new.
    pub async fn write(&self, batch: &[Notification]) -> Result<u64, SinkError> {
        if batch.is_empty() {
            return Ok(0);
        }
        // A free connection; with as many connections as batches in flight
        // there is one, the wait on the first is only a fallback.
        let mut guard = match self.clients.iter().find_map(|c| c.try_lock().ok()) {
            Some(guard) => guard,
            None => self.clients[0].lock().await,
        };
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.url).await.map_err(SinkError::Postgres)?);
        }
        let client = guard.as_mut().expect("connected above");
        let result = insert(client, batch).await;
        if result.is_err() {
            // The connection's state is unknown: start afresh next time.
            *guard = None;
        }
        result.map_err(SinkError::Postgres)
    }
}

async fn insert(client: &mut Client, batch: &[Notification]) -> Result<u64, tokio_postgres::Error> {
    let n = batch.len();
    let mut restaurant = Vec::with_capacity(n);
    let mut campaign = Vec::with_capacity(n);
    let mut content = Vec::with_capacity(n);
    let mut owner = Vec::with_capacity(n);
    let mut contact = Vec::with_capacity(n);
    let mut start = Vec::with_capacity(n);
    let mut end = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut client_id: Vec<Uuid> = Vec::with_capacity(n);
    let mut trigger = Vec::with_capacity(n);
    for x in batch {
        let c = &x.campaign;
        restaurant.push(c.restaurant_id);
        campaign.push(c.adv_campaign_id);
        content.push(c.adv_campaign_content.as_str());
        owner.push(c.adv_campaign_owner.as_deref());
        contact.push(c.adv_campaign_owner_contact.as_deref());
        start.push(unix(c.adv_campaign_datetime_start));
        end.push(unix(c.adv_campaign_datetime_end));
        created.push(unix(c.datetime_created));
        client_id.push(x.client_id);
        trigger.push(unix(x.trigger_datetime_created));
    }
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            INSERT,
            &[
                &restaurant,
                &campaign,
                &content,
                &owner,
                &contact,
                &start,
                &end,
                &created,
                &client_id,
                &trigger,
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(inserted)
}
