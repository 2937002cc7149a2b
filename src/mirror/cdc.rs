//! `mirror-mode = cdc`: the mirror kept live from Postgres logical
//! replication, through a `pgoutput` slot read with the SQL interface
//! (`pg_logical_slot_peek_binary_changes`, then `pg_replication_slot_advance`
//! once the changes are durable in the store).
//!
//! **Hand-off from snapshot to stream.** The SQL interface cannot export a
//! snapshot, so the slot is created *before* the snapshot is read: every
//! transaction the snapshot misses is in the stream, and those it already
//! holds are replayed on top of it. Replaying is idempotent (rows are put and
//! deleted by row id, in commit order), and the stream up to the snapshot's
//! WAL position (`catch_up_until`) notifies no late subscriber, since those
//! rows were in the snapshot already.
//!
//! **Positions.** The end LSN of the last applied transaction is written in
//! the same synced write batch as the rows it changed; the slot is advanced
//! to it only after that. On restart, transactions at or below the stored LSN
//! are skipped, so a crash between the two repeats nothing. An idle table
//! does not pin WAL: every [`KEEPALIVE`] with nothing to apply, the store and
//! the slot move to the server's current WAL position.
//!
//! **A missing or invalidated slot** (dropped by hand, or `wal_status = lost`
//! after `max_slot_wal_keep_size`) cannot be resumed without a gap: the mirror
//! is re-snapshotted through a new slot, with an error line and
//! `promo_fanout_mirror_resnapshots_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use promo_fanout_state::{Commit, MirrorMode, MirrorPosition, Store, StoreError, Subscription};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use crate::infra::health::Health;
use crate::infra::retry::{backoff, classify, Disposition, Failure};
use crate::mirror::pgoutput::{self, Message, Tuple, Value};
use crate::mirror::{self, SyncPlan, SyncStats};

/// Changes asked of the slot per poll at most (whole transactions: a larger
/// one comes whole).
const MAX_CHANGES: i32 = 20_000;

/// With nothing to apply, how often the slot is moved to the current WAL
/// position anyway, so that other tables' WAL is not kept for it.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// The pause after a peek is at least this many times the peek's duration.
const PEEK_SHARE: u32 = 4;

/// The source table.
const TABLE: &str = "subscribers_restaurants";

/// Where the change feed comes from.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub postgres_url: String,
    pub slot: String,
    pub publication: String,
    pub poll: Duration,
}

impl FeedConfig {
    pub fn new(settings: &Settings) -> FeedConfig {
        FeedConfig {
            postgres_url: settings.postgres_url.clone(),
            slot: settings.cdc_slot(),
            publication: settings.cdc_publication.clone(),
            poll: settings.cdc_poll_interval,
        }
    }
}

/// What keeps the server from feeding changes, each with its fix; empty when
/// nothing does.
pub async fn missing(client: &Client, feed: &FeedConfig) -> Result<Vec<String>, Failure> {
    let pg = Failure::Postgres;
    let mut out = Vec::new();
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(pg)?
        .get(0);
    if wal_level != "logical" {
        out.push(format!(
            "wal_level is {wal_level}, not logical (ALTER SYSTEM SET wal_level = logical, then restart Postgres)"
        ));
    }
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(pg)?;
    let (user, may): (String, bool) = (row.get(0), row.get(1));
    if !may {
        out.push(format!(
            "role {user} lacks the REPLICATION attribute (ALTER ROLE {user} REPLICATION)"
        ));
    }
    let published: Option<bool> = client
        .query_opt(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables \
             WHERE pubname = $1 AND tablename = $2 AND schemaname = current_schema()) \
             FROM pg_publication WHERE pubname = $1",
            &[&feed.publication, &TABLE],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    match published {
        None => out.push(format!(
            "publication {p} does not exist (promo-fanout migrate creates it; or CREATE PUBLICATION {p} FOR TABLE {TABLE})",
            p = feed.publication
        )),
        Some(false) => out.push(format!(
            "publication {p} does not publish {TABLE} (ALTER PUBLICATION {p} ADD TABLE {TABLE})",
            p = feed.publication
        )),
        Some(true) => {}
    }
    let row = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&feed.slot],
        )
        .await
        .map_err(pg)?;
    let (max, used, ours): (i32, i32, bool) = (row.get(0), row.get(1), row.get(2));
    if !ours && used >= max {
        out.push(format!(
            "no free replication slot (max_replication_slots = {max}, all in use)"
        ));
    }
    Ok(out)
}

/// The slot as the server sees it.
#[derive(Debug, Clone)]
struct SlotState {
    confirmed: Option<u64>,
    lost: bool,
    active_pid: Option<i32>,
}

async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, Failure> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn, coalesce(wal_status = 'lost', false), active_pid \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Failure::Postgres)?;
    Ok(row.map(|r| SlotState {
        confirmed: r.get::<_, Option<PgLsn>>(0).map(u64::from),
        lost: r.get(1),
        active_pid: r.get(2),
    }))
}

/// Drops this pipeline's slot if there is one, e.g. when the service runs in
/// `refresh` mode and the slot would only pin WAL.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, Failure> {
    let Some(state) = slot_state(client, slot).await? else {
        return Ok(false);
    };
    if let Some(pid) = state.active_pid {
        // Another process is reading it: not ours to drop. The caller's
        // retry or error says so.
        tracing::warn!(slot, pid, "replication slot in use by another process");
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(Failure::Postgres)?;
    Ok(true)
}

/// Makes the mirror ready to follow the slot: resumes when the store's
/// position and the slot agree, else (first start, a switch from `refresh`,
/// a lost slot) creates the slot and takes a snapshot after it.
pub async fn prepare(store: Arc<Store>, feed: &FeedConfig, now: i64) -> Result<(), Failure> {
    let client = crate::sinks::postgres_connect(&feed.postgres_url)
        .await
        .map_err(Failure::Postgres)?;
    let position = store.mirror_position()?;
    let slot = slot_state(&client, &feed.slot).await?;
    let reason = match how_to_start(position.as_ref(), slot.as_ref(), feed) {
        Start::Resume => return Ok(()),
        Start::Fresh => None,
        Start::Resnapshot(reason) => Some(reason),
    };
    let had_mirror = position.as_ref().is_some_and(|p| p.snapshot_complete);
    match reason {
        Some(reason) => {
            tracing::error!(
                slot = %feed.slot,
                reason,
                "the change feed cannot resume without a gap; taking a fresh snapshot"
            );
            metrics::counter!("promo_fanout_mirror_resnapshots_total", "reason" => reason)
                .increment(1);
        }
        None => tracing::info!(slot = %feed.slot, "starting the change feed: slot, then snapshot"),
    }
    if let Some(s) = &slot {
        if let Some(pid) = s.active_pid {
            wait_released(&client, &feed.slot, pid).await?;
        }
        drop_slot(&client, &feed.slot).await?;
    }
    let start: u64 = client
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&feed.slot],
        )
        .await
        .map_err(Failure::Postgres)?
        .get::<_, PgLsn>(0)
        .into();
    // Until the snapshot is merged, the mirror may not be trusted.
    let mut pending = Commit::new();
    pending.set_mirror_position(&MirrorPosition {
        mode: MirrorMode::Cdc,
        snapshot_complete: false,
        lsn: Some(start),
        slot: Some(feed.slot.clone()),
        catch_up_until: None,
        synced_at: now,
    });
    store.commit(pending)?;
    let slot_name = feed.slot.clone();
    let plan = SyncPlan {
        finish: Box::new(move |snapshot_lsn| MirrorPosition {
            mode: MirrorMode::Cdc,
            snapshot_complete: true,
            lsn: Some(start),
            slot: Some(slot_name),
            catch_up_until: snapshot_lsn,
            synced_at: now,
        }),
        late_seq: had_mirror.then_some(start),
    };
    let started = Instant::now();
    let SyncStats { rows, .. } = mirror::sync(store, &feed.postgres_url, plan).await?;
    tracing::info!(
        rows,
        seconds = started.elapsed().as_secs_f64(),
        slot_lsn = %PgLsn::from(start),
        "snapshot loaded; following the change feed"
    );
    Ok(())
}

/// How the change feed starts from what the store and the slot hold.
enum Start {
    /// The store's position and the slot agree.
    Resume,
    /// No cdc mirror yet: slot, then snapshot.
    Fresh,
    /// The slot cannot be resumed without a gap: a new slot and snapshot.
    Resnapshot(&'static str),
}

fn how_to_start(
    position: Option<&MirrorPosition>,
    slot: Option<&SlotState>,
    feed: &FeedConfig,
) -> Start {
    let Some(p) = position.filter(|p| p.mode == MirrorMode::Cdc && p.snapshot_complete) else {
        return Start::Fresh;
    };
    let Some(s) = slot else {
        return Start::Resnapshot("slot missing");
    };
    if s.lost {
        return Start::Resnapshot("slot invalidated");
    }
    if p.slot.as_deref() != Some(feed.slot.as_str()) {
        return Start::Resnapshot("slot renamed");
    }
    match (p.lsn, s.confirmed) {
        (Some(ours), Some(theirs)) if theirs <= ours => {
            tracing::info!(
                slot = %feed.slot,
                mirror_lsn = %PgLsn::from(ours),
                slot_lsn = %PgLsn::from(theirs),
                "mirror present; resuming the change feed without a snapshot"
            );
            Start::Resume
        }
        _ => Start::Resnapshot("slot ahead of the mirror"),
    }
}

/// Waits for a slot held by another backend to be let go: after a `kill -9`
/// the server backend of the dead process may still be finishing its query.
/// A slot held for long belongs to a live reader: another promo-fanout with
/// this group, which is an error.
async fn wait_released(client: &Client, slot: &str, pid: i32) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match slot_state(client, slot).await? {
            Some(SlotState {
                active_pid: Some(_),
                ..
            }) => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => return Ok(()),
        }
    }
    Err(Failure::Config(format!(
        "replication slot {slot} has been in use by another process (pid {pid}) for 30 s: \
         is another promo-fanout running with this group?"
    )))
}

/// One committed transaction's changes to the source table.
#[derive(Debug)]
struct Txn {
    end_lsn: u64,
    commit_time: i64,
    changes: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Upsert(Subscription),
    Delete(i64),
    Truncate,
}

/// Which columns of the source table hold what.
#[derive(Debug, Clone, Copy)]
struct Layout {
    id: usize,
    restaurant: usize,
    client: usize,
}

/// Reads the feed's messages into transactions of changes to the source
/// table; other tables' changes (a publication may hold more) are skipped.
fn assemble(
    messages: impl IntoIterator<Item = Message>,
    relations: &mut HashMap<u32, Option<Layout>>,
) -> Result<Vec<Txn>, Failure> {
    let mut out = Vec::new();
    let mut current: Option<Txn> = None;
    for m in messages {
        match m {
            Message::Begin { commit_time, .. } => {
                current = Some(Txn {
                    end_lsn: 0,
                    commit_time,
                    changes: Vec::new(),
                })
            }
            Message::Relation {
                oid, name, columns, ..
            } => {
                relations.insert(oid, layout(&name, &columns)?);
            }
            Message::Commit { end_lsn, .. } => {
                let mut txn = current
                    .take()
                    .ok_or_else(|| Failure::Feed("commit without begin".into()))?;
                txn.end_lsn = end_lsn;
                out.push(txn);
            }
            Message::Other(_) => {}
            change => {
                for c in changes(change, relations)? {
                    push(&mut current, c)?;
                }
            }
        }
    }
    Ok(out)
}

/// Where the source table keeps its columns; `None` for another table.
fn layout(name: &str, columns: &[pgoutput::Column]) -> Result<Option<Layout>, Failure> {
    if name != TABLE {
        return Ok(None);
    }
    let find = |col: &str| {
        columns
            .iter()
            .position(|c| c.name == col)
            .ok_or_else(|| Failure::Feed(format!("{TABLE} has no column {col}")))
    };
    Ok(Some(Layout {
        id: find("id")?,
        restaurant: find("restaurant_id")?,
        client: find("client_id")?,
    }))
}

/// The changes to the source table one row message makes.
fn changes(
    message: Message,
    relations: &HashMap<u32, Option<Layout>>,
) -> Result<Vec<Change>, Failure> {
    Ok(match message {
        Message::Insert { relation, new }
        | Message::Update {
            relation,
            new,
            old: None,
        } => match layout_of(relations, relation)? {
            Some(l) => vec![Change::Upsert(row(&l, &new)?)],
            None => vec![],
        },
        Message::Update {
            relation,
            new,
            old: Some(old),
        } => match layout_of(relations, relation)? {
            Some(l) => {
                let new = row(&l, &new)?;
                let old_id = row_id(&l, &old)?;
                let moved = (old_id != new.row_id).then_some(Change::Delete(old_id));
                moved.into_iter().chain([Change::Upsert(new)]).collect()
            }
            None => vec![],
        },
        Message::Delete { relation, old } => match layout_of(relations, relation)? {
            Some(l) => vec![Change::Delete(row_id(&l, &old)?)],
            None => vec![],
        },
        Message::Truncate { relations: rels } => {
            let mut ours = false;
            for r in rels {
                ours |= layout_of(relations, r)?.is_some();
            }
            if ours {
                vec![Change::Truncate]
            } else {
                vec![]
            }
        }
        _ => vec![],
    })
}

fn push(current: &mut Option<Txn>, change: Change) -> Result<(), Failure> {
    current
        .as_mut()
        .ok_or_else(|| Failure::Feed("change outside a transaction".into()))?
        .changes
        .push(change);
    Ok(())
}

fn layout_of(
    relations: &HashMap<u32, Option<Layout>>,
    oid: u32,
) -> Result<Option<Layout>, Failure> {
    relations
        .get(&oid)
        .copied()
        .ok_or_else(|| Failure::Feed(format!("change to relation {oid} before its description")))
}

fn text<'a>(tuple: &'a Tuple, at: usize, what: &str) -> Result<&'a str, Failure> {
    match tuple.get(at) {
        Some(Value::Text(t)) => Ok(t),
        other => Err(Failure::Feed(format!(
            "{TABLE}.{what}: expected a value, got {other:?}"
        ))),
    }
}

fn row_id(l: &Layout, tuple: &Tuple) -> Result<i64, Failure> {
    let t = text(tuple, l.id, "id")?;
    t.parse()
        .map_err(|_| Failure::Feed(format!("{TABLE}.id: {t:?} is not an integer")))
}

fn row(l: &Layout, tuple: &Tuple) -> Result<Subscription, Failure> {
    let uuid = |at: usize, what: &str| -> Result<Uuid, Failure> {
        let t = text(tuple, at, what)?;
        Uuid::parse_str(t)
            .map_err(|_| Failure::Feed(format!("{TABLE}.{what}: {t:?} is not a uuid")))
    };
    Ok(Subscription {
        row_id: row_id(l, tuple)?,
        restaurant_id: uuid(l.restaurant, "restaurant_id")?,
        client_id: uuid(l.client, "client_id")?,
    })
}

/// Applies transactions to the mirror as one commit, with the new position.
/// Reads the store for rows the batch has not touched yet. Transactions at
/// or below the stored LSN were applied before a crash: skipped.
fn apply(
    store: &Store,
    txns: &[Txn],
    position: &MirrorPosition,
) -> Result<(Commit, MirrorPosition), StoreError> {
    let mut commit = Commit::new();
    let mut touched: HashMap<i64, Option<(Uuid, Uuid)>> = HashMap::new();
    let mut truncated = false;
    // A row as this batch leaves it so far: its own changes first, then (but
    // not after a truncate) the store.
    let current = |touched: &HashMap<i64, Option<(Uuid, Uuid)>>,
                   truncated: bool,
                   row: i64|
     -> Result<Option<(Uuid, Uuid)>, StoreError> {
        match touched.get(&row) {
            Some(v) => Ok(*v),
            None if truncated => Ok(None),
            None => Ok(store
                .subscription_row(row)?
                .map(|s| (s.restaurant_id, s.client_id))),
        }
    };
    let mut next = position.clone();
    for txn in txns {
        if position.lsn.is_some_and(|done| txn.end_lsn <= done) {
            continue;
        }
        let late = position
            .catch_up_until
            .is_none_or(|until| txn.end_lsn > until);
        for change in &txn.changes {
            match change {
                Change::Upsert(new) => {
                    let old = current(&touched, truncated, new.row_id)?;
                    if old == Some((new.restaurant_id, new.client_id)) {
                        continue;
                    }
                    if let Some((r, c)) = old {
                        commit.delete_subscription(&Subscription {
                            row_id: new.row_id,
                            restaurant_id: r,
                            client_id: c,
                        });
                    }
                    commit.put_subscription(new);
                    if late {
                        commit.mark_late(new.restaurant_id, new.client_id, txn.end_lsn);
                    }
                    touched.insert(new.row_id, Some((new.restaurant_id, new.client_id)));
                }
                Change::Delete(id) => {
                    let old = current(&touched, truncated, *id)?;
                    if let Some((r, c)) = old {
                        commit.delete_subscription(&Subscription {
                            row_id: *id,
                            restaurant_id: r,
                            client_id: c,
                        });
                    }
                    touched.insert(*id, None);
                }
                Change::Truncate => {
                    commit.clear_subscriptions();
                    touched.clear();
                    truncated = true;
                }
            }
        }
        next.lsn = Some(txn.end_lsn);
    }
    next.synced_at = crate::infra::clock::now();
    commit.set_mirror_position(&next);
    Ok((commit, next))
}

/// Follows the slot until shutdown. Outages are waited out with backoff; a
/// lost slot is re-snapshotted; anything else stops the service (returned).
pub async fn follow(
    store: Arc<Store>,
    feed: FeedConfig,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let mut delays = backoff();
    loop {
        let result = stream(&store, &feed, &health, &shutdown).await;
        // The feed polls Postgres all the time: while it fails, the service
        // is not ready even when no batch is being written.
        if let Err(Failure::Postgres(e)) = &result {
            // Unreachable, not merely busy (a slot still held by a killed
            // predecessor's backend is waited for without going unready).
            let unreachable = e
                .code()
                .is_none_or(|c| matches!(&c.code()[..2], "08" | "57" | "53"));
            if unreachable {
                health.change_feed.set_ok(false);
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let error = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if slot_gone(&error) {
            tracing::error!(%error, slot = %feed.slot, "replication slot lost while following it");
            let now = crate::infra::clock::now();
            // `prepare` sees the missing or invalidated slot and re-snapshots.
            if let Err(e) = prepare(store.clone(), &feed, now).await {
                if classify(&e) != Disposition::Retry {
                    return Err(e);
                }
                tracing::warn!(error = %e, "re-snapshot failed; retrying");
            }
            continue;
        }
        if classify(&error) != Disposition::Retry {
            return Err(error);
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        metrics::counter!("promo_fanout_retries_total", "cause" => "mirror").increment(1);
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "change feed failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The slot was dropped or invalidated under us.
fn slot_gone(error: &Failure) -> bool {
    let Failure::Postgres(e) = error else {
        return false;
    };
    let Some(db) = e.as_db_error() else {
        return false;
    };
    let msg = db.message();
    (msg.contains("replication slot") && msg.contains("does not exist"))
        || msg.contains("can no longer get changes from replication slot")
        || msg.contains("This slot has been invalidated")
}

async fn stream(
    store: &Arc<Store>,
    feed: &FeedConfig,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), Failure> {
    let mut reader = Reader::open(store, feed).await?;
    loop {
        let (full, peek_took) = reader.step(health).await?;
        if !full {
            // Each peek decodes all the database's WAL since the slot's
            // restart point, the feedback rows included, and forgets what
            // is not ours; under a heavy write load that is the main cost.
            // Pausing at least PEEK_SHARE times the peek's duration keeps
            // it to a bounded share of a core, at some freshness.
            let pause = feed.poll.max(peek_took * PEEK_SHARE);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// The slot being read: what of it the store holds, and the relations seen.
struct Reader<'a> {
    store: &'a Arc<Store>,
    feed: &'a FeedConfig,
    client: Client,
    position: MirrorPosition,
    relations: HashMap<u32, Option<Layout>>,
    idle_since: Instant,
}

impl<'a> Reader<'a> {
    async fn open(store: &'a Arc<Store>, feed: &'a FeedConfig) -> Result<Reader<'a>, Failure> {
        let client = crate::sinks::postgres_connect(&feed.postgres_url)
            .await
            .map_err(Failure::Postgres)?;
        let position = store
            .mirror_position()?
            .filter(|p| p.mode == MirrorMode::Cdc && p.snapshot_complete)
            .ok_or_else(|| Failure::Feed("the change feed started before its snapshot".into()))?;
        // Catch the slot up with a store that committed before a crash.
        if let (Some(done), Some(state)) = (position.lsn, slot_state(&client, &feed.slot).await?) {
            if state.confirmed.is_some_and(|c| c < done) {
                advance(&client, &feed.slot, done).await?;
            }
        }
        Ok(Reader {
            store,
            feed,
            client,
            position,
            relations: HashMap::new(),
            idle_since: Instant::now(),
        })
    }

    /// One peek at the slot, applied: returns whether it was full (more
    /// waits) and how long the peek took.
    async fn step(&mut self, health: &Health) -> Result<(bool, Duration), Failure> {
        let pg = Failure::Postgres;
        let before: u64 = self
            .client
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .map_err(pg)?
            .get::<_, PgLsn>(0)
            .into();
        let peek_started = Instant::now();
        let rows = self
            .client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                 'proto_version', '1', 'publication_names', $3)",
                &[&self.feed.slot, &MAX_CHANGES, &self.feed.publication],
            )
            .await
            .map_err(pg)?;
        let peek_took = peek_started.elapsed();
        health.change_feed.set_ok(true);
        let full = rows.len() as i32 >= MAX_CHANGES;
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            let data: &[u8] = r.get(0);
            messages.push(pgoutput::parse(data).map_err(|e| Failure::Feed(e.to_string()))?);
        }
        let mut txns = assemble(messages, &mut self.relations)?;
        let read = txns.len();
        // Transactions at or below the stored LSN were applied before a crash.
        txns.retain(|t| self.position.lsn.is_none_or(|done| t.end_lsn > done));
        if !txns.is_empty() {
            self.apply(txns).await?;
        } else if read > 0 {
            // Only transactions applied before a crash: confirm them.
            if let Some(lsn) = self.position.lsn {
                advance(&self.client, &self.feed.slot, lsn).await?;
            }
        } else if self.idle_since.elapsed() >= KEEPALIVE
            && self.position.lsn.is_some_and(|l| before > l)
        {
            self.skip_to(before).await?;
        }
        if let Some(lsn) = self.position.lsn {
            metrics::gauge!("promo_fanout_mirror_lag_bytes").set(before.saturating_sub(lsn) as f64);
        }
        Ok((full, peek_took))
    }

    /// Applies transactions to the store, then confirms them to the slot.
    async fn apply(&mut self, txns: Vec<Txn>) -> Result<(), Failure> {
        let fresh = txns.len();
        let store = self.store.clone();
        let done = self.position.clone();
        self.position = tokio::task::spawn_blocking(move || {
            let (commit, next) = apply(&store, &txns, &done)?;
            store.commit(commit)?;
            // Commit in Postgres to durable in the mirror.
            let now = crate::infra::clock::now_f64();
            for t in &txns {
                metrics::histogram!("promo_fanout_mirror_freshness_seconds")
                    .record((now - pgoutput::unix_seconds(t.commit_time)).max(0.0));
            }
            Ok::<_, StoreError>(next)
        })
        .await
        .expect("the mirror apply does not panic")?;
        crate::failpoint!("cdc-after-apply");
        metrics::counter!("promo_fanout_mirror_transactions_total").increment(fresh as u64);
        if let Some(lsn) = self.position.lsn {
            advance(&self.client, &self.feed.slot, lsn).await?;
        }
        self.idle_since = Instant::now();
        Ok(())
    }

    /// Nothing of ours up to `lsn` (read before the peek): moves the store,
    /// then the slot, so no WAL is kept for us.
    async fn skip_to(&mut self, lsn: u64) -> Result<(), Failure> {
        let mut next = self.position.clone();
        next.lsn = Some(lsn);
        next.synced_at = crate::infra::clock::now();
        let mut commit = Commit::new();
        commit.set_mirror_position(&next);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit(commit))
            .await
            .expect("the store commit does not panic")?;
        self.position = next;
        advance(&self.client, &self.feed.slot, lsn).await?;
        self.idle_since = Instant::now();
        Ok(())
    }
}

async fn advance(client: &Client, slot: &str, lsn: u64) -> Result<(), Failure> {
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2)",
            &[&slot, &PgLsn::from(lsn)],
        )
        .await
        .map_err(Failure::Postgres)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::pgoutput::Column;

    fn rel() -> Message {
        Message::Relation {
            oid: 1,
            namespace: "public".into(),
            name: TABLE.into(),
            columns: ["id", "client_id", "restaurant_id"]
                .iter()
                .map(|n| Column {
                    name: n.to_string(),
                    type_oid: 0,
                })
                .collect(),
        }
    }

    fn t(id: i64, c: u128, r: u128) -> Tuple {
        vec![
            Value::Text(id.to_string()),
            Value::Text(Uuid::from_u128(c).to_string()),
            Value::Text(Uuid::from_u128(r).to_string()),
        ]
    }

    fn txn(end: u64, body: Vec<Message>) -> Vec<Message> {
        let mut v = vec![Message::Begin {
            final_lsn: end,
            commit_time: 0,
            xid: 1,
        }];
        v.extend(body);
        v.push(Message::Commit {
            commit_lsn: end,
            end_lsn: end,
            commit_time: 0,
        });
        v
    }

    #[test]
    fn changes_of_the_source_table_are_assembled_in_order() {
        let mut msgs = vec![rel()];
        msgs.push(Message::Relation {
            oid: 2,
            namespace: "public".into(),
            name: "other".into(),
            columns: vec![],
        });
        msgs.extend(txn(
            10,
            vec![
                Message::Insert {
                    relation: 1,
                    new: t(1, 5, 6),
                },
                Message::Insert {
                    relation: 2,
                    new: vec![],
                },
                Message::Update {
                    relation: 1,
                    old: Some(t(1, 0, 0)),
                    new: t(2, 5, 7),
                },
                Message::Delete {
                    relation: 1,
                    old: t(2, 0, 0),
                },
                Message::Truncate {
                    relations: vec![2, 1],
                },
            ],
        ));
        let mut relations = HashMap::new();
        let txns = assemble(msgs, &mut relations).unwrap();
        assert_eq!(txns.len(), 1);
        assert_eq!(txns[0].end_lsn, 10);
        let sub = |id, c, r| Subscription {
            row_id: id,
            restaurant_id: Uuid::from_u128(r),
            client_id: Uuid::from_u128(c),
        };
        assert_eq!(
            txns[0].changes,
            vec![
                Change::Upsert(sub(1, 5, 6)),
                Change::Delete(1),
                Change::Upsert(sub(2, 5, 7)),
                Change::Delete(2),
                Change::Truncate,
            ]
        );
    }

    #[test]
    fn a_change_before_its_relation_is_an_error() {
        let msgs = txn(
            5,
            vec![Message::Insert {
                relation: 9,
                new: vec![],
            }],
        );
        assert!(assemble(msgs, &mut HashMap::new()).is_err());
    }

    #[test]
    fn replays_are_idempotent_and_catch_up_notifies_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            &promo_fanout_state::Identity {
                group_id: "g".into(),
                input_topic: "t".into(),
            },
        )
        .unwrap();
        let up = |id, c, r| {
            Change::Upsert(Subscription {
                row_id: id,
                restaurant_id: Uuid::from_u128(r),
                client_id: Uuid::from_u128(c),
            })
        };
        let txns = vec![
            Txn {
                end_lsn: 10,
                commit_time: 0,
                changes: vec![up(1, 1, 9), up(2, 2, 9)],
            },
            Txn {
                end_lsn: 20,
                commit_time: 0,
                changes: vec![Change::Delete(1), up(3, 3, 9)],
            },
        ];
        let start = MirrorPosition {
            mode: MirrorMode::Cdc,
            snapshot_complete: true,
            lsn: Some(5),
            slot: Some("s".into()),
            catch_up_until: Some(15),
            synced_at: 0,
        };
        let (commit, next) = apply(&store, &txns, &start).unwrap();
        store.commit(commit).unwrap();
        assert_eq!(next.lsn, Some(20));
        let rows: Vec<i64> = store
            .subscription_rows()
            .map(|s| s.unwrap().row_id)
            .collect();
        assert_eq!(rows, vec![2, 3]);
        // Only the transaction past the snapshot marks a late subscriber.
        let late = store.late_subscribers(10).unwrap();
        assert_eq!(late, vec![(Uuid::from_u128(9), Uuid::from_u128(3), 20)]);

        // The same feed again, as after a crash before the slot moved.
        let (commit, again) = apply(&store, &txns, &next).unwrap();
        store.commit(commit).unwrap();
        assert_eq!(again.lsn, Some(20));
        let rows: Vec<i64> = store
            .subscription_rows()
            .map(|s| s.unwrap().row_id)
            .collect();
        assert_eq!(rows, vec![2, 3]);
        assert_eq!(store.late_subscribers(10).unwrap().len(), 1);
    }
}
