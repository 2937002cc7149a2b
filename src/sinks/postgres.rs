//! `subscribers_feedback`: one transaction per batch, appended by binary COPY
//! and written again idempotently when rows of it are already there, in
//! which the campaigns whose rows Postgres refuses (a constraint, a trigger,
//! a value out of range) are isolated and left out, and the rest written; committed
//! with the state of the batch's partitions once its pushes are acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use promo_fanout_state::{Action, Ownership};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, Statement};
use uuid::Uuid;

use crate::fanout::{key_of, CampaignKey, Notification};
use crate::infra::retry::{classify, postgres_text, Disposition, Failure};
use crate::partitions::{self, Scope};

/// Campaigns a sink refused for what is in them, with the sink's reason.
pub type Refusals = BTreeMap<CampaignKey, String>;

/// The columns a notification fills, in the order [`INSERT`] and [`COPY`]
/// take them.
macro_rules! feedback_columns {
    () => {
        "restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, \
         adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end, \
         datetime_created, client_id, trigger_datetime_created"
    };
}

/// The unique key that makes a batch written twice add its rows once: a
/// binary COPY of rows already there fails on it, and the batch is written
/// again with `ON CONFLICT` on it.
macro_rules! feedback_key {
    () => {
        "restaurant_id, adv_campaign_id, client_id"
    };
}

/// Inserts rows, leaving those already there alone: a batch written again.
const INSERT: &str = concat!(
    "INSERT INTO subscribers_feedback (",
    feedback_columns!(),
    ") SELECT * FROM UNNEST(\
     $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
     $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::uuid[], $10::timestamptz[]) \
     ON CONFLICT (",
    feedback_key!(),
    ") DO NOTHING"
);

/// Appends rows; fails on a row already there. Binary COPY writes a page of
/// rows per WAL record where `INSERT … ON CONFLICT` writes two per row
/// (the speculative insertion and its confirmation), which is also less
/// for the change feed's walsender to decode.
pub const COPY: &str = concat!(
    "COPY subscribers_feedback (",
    feedback_columns!(),
    ") FROM STDIN (FORMAT binary)"
);

/// The types of [`COPY`]'s columns, as the migrations create them.
pub const COPY_TYPES: [Type; 10] = [
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::UUID,
    Type::TIMESTAMPTZ,
];

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
///
/// A batch's rows are written in a transaction that stays [`Open`] while
/// its pushes are produced, and is committed with the state of the batch's
/// partitions (see [`crate::partitions`]) when the batch is recorded: a
/// feedback row is durable only once its push is, and only together with
/// the state that says it was sent.
pub struct FeedbackSink {
    url: String,
    /// `None` until first used, and after a connection error until the next
    /// write reconnects.
    sessions: Vec<Arc<Mutex<Option<Session>>>>,
}

/// How long a batch's transaction may wait on the broker.
const IDLE_IN_TRANSACTION: &str = "SET idle_in_transaction_session_timeout = '60s'";

/// A connection of the sink, taken for one batch.
type Connection = OwnedMutexGuard<Option<Session>>;

/// A connection of the sink as every batch uses it.
struct Session {
    client: Client,
    /// [`COPY`], prepared once rather than per batch.
    copy: Statement,
}

impl Session {
    async fn open(url: &str) -> Result<Session, tokio_postgres::Error> {
        let client = connect(url).await?;
        // A batch's transaction waits on the broker; one left idle longer
        // (an outage, an instance frozen and fenced meanwhile) is ended by
        // the server, releasing its row locks, and the batch commits
        // through a new one.
        client.batch_execute(IDLE_IN_TRANSACTION).await?;
        let copy = client.prepare(COPY).await?;
        Ok(Session { client, copy })
    }
}

/// A connection to the Postgres at `url`, with TLS as the URL asks
/// ([`crate::infra::tls`]).
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let url = crate::infra::tls::PostgresUrl::parse(url)?;
    let (client, connection) = url.config.connect(url.connector()).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            let error = crate::infra::retry::postgres_text(&error);
            tracing::warn!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

pub fn unix(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A batch's feedback rows, written in a transaction not yet committed. If
/// dropped uncommitted (the batch failed or was abandoned), its connection
/// is closed, which rolls the transaction back.
pub struct Open {
    connection: Option<Connection>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(mut connection) = self.connection.take() {
            *connection = None;
        }
    }
}

impl FeedbackSink {
    /// Checks now that the database is there and that its feedback table, if
    /// it has one, takes the service's rows; the `connections` (at least
    /// one) connect on first use.
    pub async fn connect(url: &str, connections: usize) -> Result<FeedbackSink, Failure> {
        let client = connect(url).await.map_err(Failure::Postgres)?;
        check_table(&client).await?;
        let sessions = (0..connections.max(1))
            .map(|_| Arc::new(Mutex::new(None)))
            .collect();
        Ok(FeedbackSink {
            url: url.to_owned(),
            sessions,
        })
    }

    /// A free connection, connected. With as many connections as batches in
    /// flight one is free; waiting for the first to be freed is a fallback.
    async fn connection(&self) -> Result<Connection, Failure> {
        let free = self
            .sessions
            .iter()
            .find_map(|c| c.clone().try_lock_owned().ok());
        let mut guard = match free {
            Some(guard) => guard,
            None => {
                let waits = self
                    .sessions
                    .iter()
                    .map(|c| Box::pin(c.clone().lock_owned()));
                futures::future::select_all(waits).await.0
            }
        };
        if guard.as_ref().is_none_or(|s| s.client.is_closed()) {
            *guard = Some(Session::open(&self.url).await.map_err(Failure::Postgres)?);
        }
        Ok(guard)
    }

    /// Begins a batch's transaction and inserts one row per notification;
    /// rows already there are left alone. The rows of a campaign Postgres
    /// refuses for their content are left out, and the campaign returned
    /// with the reason.
    pub async fn begin(&self, batch: &[&Notification]) -> Result<(Open, Refusals), Failure> {
        // Wrapped at once: dropped anywhere before the commit, it closes
        // the connection, and the transaction with it.
        let open = Open {
            connection: Some(self.connection().await?),
        };
        let refused = write_isolating(open.session(), batch).await?;
        Ok((open, refused))
    }

    /// Writes the batch's partition state and commits: in the transaction
    /// `open` began, or, when there is none (nothing to notify, or an
    /// earlier attempt failed), in a new one that first inserts `rows`
    /// again (idempotently). Returns each touched partition's new hold.
    pub async fn commit(
        &self,
        open: Option<Open>,
        rows: &[&Notification],
        scope: &Scope,
        held: &BTreeMap<i32, Ownership>,
        record: &partitions::Record,
    ) -> Result<BTreeMap<i32, Ownership>, Failure> {
        let pg = Failure::Postgres;
        let mut open = match open {
            Some(open) => open,
            None => {
                let open = Open {
                    connection: Some(self.connection().await?),
                };
                let client = &open.session().client;
                client.batch_execute("BEGIN").await.map_err(pg)?;
                if !rows.is_empty() {
                    insert(client, &Rows::new(rows.iter().copied()))
                        .await
                        .map_err(pg)?;
                }
                open
            }
        };
        let client = &open.session().client;
        let held = partitions::write(client, scope, held, record).await?;
        client.batch_execute("COMMIT").await.map_err(pg)?;
        // Committed: the connection goes back to the sink as it is.
        open.connection.take();
        Ok(held)
    }
}

/// Refuses a `subscribers_feedback` that would not take the rows as the
/// service writes them: binary COPY sends each value in its type's binary
/// form, which Postgres reads by the column's type without converting (a
/// `timestamp without time zone` would silently hold UTC wall time, a `text`
/// column the bytes of a UUID), and without [`feedback_key!`] a batch written
/// again would add its rows twice. A table that does not exist is left to
/// the start's next steps, which say to migrate.
async fn check_table(client: &Client) -> Result<(), Failure> {
    let pg = Failure::Postgres;
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::regtype::text, a.atttypid \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass('subscribers_feedback') \
               AND a.attnum > 0 AND NOT a.attisdropped",
            &[],
        )
        .await
        .map_err(pg)?;
    if rows.is_empty() {
        return Ok(());
    }
    let found: BTreeMap<String, (String, u32)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut wrong: Vec<String> = feedback_columns!()
        .split(',')
        .map(str::trim)
        .zip(&COPY_TYPES)
        .filter_map(|(column, ty)| match found.get(column) {
            None => Some(format!("column {column} is missing ({ty} expected)")),
            Some((name, oid)) if *oid != ty.oid() => {
                Some(format!("column {column} is {name}, not {ty}"))
            }
            Some(_) => None,
        })
        .collect();
    let mut key: Vec<&str> = feedback_key!().split(',').map(str::trim).collect();
    key.sort();
    let keyed: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
               WHERE i.indrelid = to_regclass('subscribers_feedback') \
                 AND i.indisunique AND i.indimmediate \
                 AND i.indpred IS NULL AND i.indexprs IS NULL \
                 AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
                      WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) = $1)",
            &[&key],
        )
        .await
        .map_err(pg)?
        .get(0);
    if !keyed {
        wrong.push(format!(
            "no unique key on ({}), which keeps a batch written twice from adding its rows twice",
            feedback_key!()
        ));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(Failure::Config(format!(
        "subscribers_feedback cannot take the service's rows ({}): alter the table to match \
         migrations/V1__subscriptions_and_feedback.sql, or migrate a database without it",
        wrong.join("; ")
    )))
}

impl Open {
    fn session(&self) -> &Session {
        self.connection
            .as_ref()
            .and_then(|c| c.as_ref())
            .expect("an open transaction has its connection")
    }
}

/// The whole batch in one COPY, in a transaction left open; when rows of it
/// are already there (an earlier attempt of the batch committed), again in
/// one statement that leaves them alone; when Postgres refuses the content,
/// campaign by campaign (halving, each half under a savepoint) until the
/// refused ones are found.
async fn write_isolating(session: &Session, batch: &[&Notification]) -> Result<Refusals, Failure> {
    let (pg, client) = (Failure::Postgres, &session.client);
    client.batch_execute("BEGIN").await.map_err(pg)?;
    let mut error = match copy(session, batch).await {
        Ok(_) => return Ok(Refusals::new()),
        Err(e) => e,
    };
    if error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        tracing::info!(error = %postgres_text(&error), notifications = batch.len(), "rows of the batch are already in subscribers_feedback; writing it again, leaving them alone");
        client.batch_execute("ROLLBACK; BEGIN").await.map_err(pg)?;
        error = match insert(client, &Rows::new(batch.iter().copied())).await {
            Ok(_) => return Ok(Refusals::new()),
            Err(e) => e,
        };
    }
    let error = Failure::Postgres(error);
    if classify(&error) != Disposition::Refuse {
        return Err(error);
    }
    client.batch_execute("ROLLBACK; BEGIN").await.map_err(pg)?;
    tracing::warn!(%error, notifications = batch.len(), "postgres refused a batch for its content; isolating the campaigns it refuses");

    let mut by_campaign: BTreeMap<CampaignKey, Vec<&Notification>> = BTreeMap::new();
    for n in batch {
        by_campaign.entry(key_of(&n.campaign)).or_default().push(n);
    }
    let groups: Vec<(CampaignKey, Vec<&Notification>)> = by_campaign.into_iter().collect();
    let mut refused = Refusals::new();
    let mut todo = vec![&groups[..]];
    while let Some(part) = todo.pop() {
        // A savepoint rolled back is then released, so that savepoints do
        // not nest one per halving.
        client
            .batch_execute("SAVEPOINT isolate")
            .await
            .map_err(pg)?;
        let rows = Rows::new(part.iter().flat_map(|(_, rows)| rows.iter().copied()));
        let error = match insert(client, &rows).await {
            Ok(_) => {
                client
                    .batch_execute("RELEASE SAVEPOINT isolate")
                    .await
                    .map_err(pg)?;
                continue;
            }
            Err(e) => e,
        };
        client
            .batch_execute("ROLLBACK TO SAVEPOINT isolate; RELEASE SAVEPOINT isolate")
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
    Ok(refused)
}

/// Feedback rows, column by column as [`INSERT`] takes them: one per
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
            let row = Row::of(n);
            rows.restaurant.push(row.restaurant);
            rows.campaign.push(row.campaign);
            rows.content.push(row.content);
            rows.owner.push(row.owner);
            rows.contact.push(row.contact);
            rows.start.push(row.start);
            rows.end.push(row.end);
            rows.created.push(row.created);
            rows.client.push(row.client);
            rows.trigger.push(row.trigger);
        }
        rows
    }
}

/// A notification's row of `subscribers_feedback`: the action's fields, the
/// client and the trigger time.
struct Row<'a> {
    restaurant: Uuid,
    campaign: Uuid,
    content: &'a str,
    owner: Option<&'a str>,
    contact: Option<&'a str>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    created: DateTime<Utc>,
    client: Uuid,
    trigger: DateTime<Utc>,
}

impl<'a> Row<'a> {
    fn of(n: &'a Notification) -> Row<'a> {
        let a = &n.campaign.action;
        Row {
            restaurant: a.restaurant_id,
            campaign: a.adv_campaign_id,
            content: &a.adv_campaign_content,
            owner: a.adv_campaign_owner.as_deref(),
            contact: a.adv_campaign_owner_contact.as_deref(),
            start: unix(a.adv_campaign_datetime_start),
            end: unix(a.adv_campaign_datetime_end),
            created: unix(a.datetime_created),
            client: n.client_id,
            trigger: unix(n.trigger_datetime_created),
        }
    }

    /// Its values in the order of [`feedback_columns!`].
    fn values(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.restaurant,
            &self.campaign,
            &self.content,
            &self.owner,
            &self.contact,
            &self.start,
            &self.end,
            &self.created,
            &self.client,
            &self.trigger,
        ]
    }
}

/// One binary COPY of a row per notification.
async fn copy(session: &Session, batch: &[&Notification]) -> Result<u64, tokio_postgres::Error> {
    let sink = session.client.copy_in(&session.copy).await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    futures::pin_mut!(writer);
    for n in batch {
        writer.as_mut().write(&Row::of(n).values()).await?;
    }
    writer.finish().await
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
