//! `mirror-mode = cdc`: the mirror kept live from Postgres logical
//! replication, through a `pgoutput` slot of its own. This module owns the
//! slot's life: created with the snapshot that loads the mirror, resumed,
//! replaced when lost, dropped when renamed or no longer read; [`stream`]
//! reads it.
//!
//! **Hand-off from snapshot to stream.** The slot is created on a
//! replication connection that exports its snapshot
//! (`CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`); the table is read in
//! that snapshot (`SET TRANSACTION SNAPSHOT`), and the stream starts at the
//! slot's consistent point. Every transaction is in exactly one of the two:
//! nothing is replayed on top of the snapshot, and nothing falls between.
//!
//! **A missing or invalidated slot** (dropped by hand, or `wal_status = lost`
//! after `max_slot_wal_keep_size`) cannot be resumed without a gap: the mirror
//! is re-snapshotted through a new slot, with an error line and
//! `promo_fanout_mirror_resnapshots_total`.
//!
//! [`stream`]: crate::mirror::stream

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig};
use promo_fanout_state::{Commit, MirrorMode, MirrorPosition, Store};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::infra::health::Health;
use crate::infra::retry::{backoff, classify, until_done, Disposition, Failure, Stopped};
use crate::infra::tls::PostgresUrl;
use crate::mirror::changes::TABLE;
use crate::mirror::{self, stream, SyncPlan, SyncStats};

/// Events the replication session buffers ahead of the mirror at most.
const BUFFERED_EVENTS: usize = 1024;

/// The largest message the replication session accepts: a row of the
/// source table is well under a kilobyte, but a publication may hold other
/// tables.
const MAX_MESSAGE: usize = 64 << 20;

/// Where the change feed comes from.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub postgres_url: String,
    pub slot: String,
    pub publication: String,
    /// How often the durable position is reported to the server, and an
    /// idle feed's position moved.
    pub status_interval: Duration,
}

impl FeedConfig {
    pub fn new(settings: &Settings) -> FeedConfig {
        FeedConfig {
            postgres_url: settings.postgres_url.clone(),
            slot: settings.cdc_slot(),
            publication: settings.cdc_publication.clone(),
            status_interval: settings.cdc_status_interval,
        }
    }

    /// A replication session on this feed's slot, reading from `start` (and
    /// reporting it as flushed until told more), from the Postgres URL's
    /// host (or `hostaddr`), port, user, password, database and TLS
    /// parameters.
    pub fn replication(&self, start: Lsn) -> Result<ReplicationConfig, Failure> {
        use tokio_postgres::config::Host;
        let url = PostgresUrl::parse(&self.postgres_url)
            .map_err(|e| Failure::Config(format!("postgres-url: {e}")))?;
        let pg = &url.config;
        let name = match pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(dir)) => dir.display().to_string(),
            None => "localhost".into(),
        };
        // Connected to `hostaddr` if given, the certificate checked against
        // the host name, as libpq does.
        let (host, server_name) = match pg.get_hostaddrs().first() {
            Some(addr) => (addr.to_string(), Some(name.as_str())),
            None => (name.clone(), None),
        };
        let user = pg
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = pg.get_dbname().unwrap_or(&user).to_owned();
        let tls = url
            .replication_tls(server_name)
            .map_err(|e| Failure::Config(format!("postgres-url: {e}")))?;
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let publication = self.publication.clone();
        Ok(
            ReplicationConfig::new(host, user, password, database, &self.slot, publication)
                .with_port(port)
                .with_tls(tls)
                .with_start_lsn(start)
                .with_status_interval(self.status_interval)
                .with_wakeup_interval(self.status_interval)
                .with_buffer_size(BUFFERED_EVENTS)
                .with_max_message_size(MAX_MESSAGE)
                .with_application_name(format!("promo-fanout {}", self.slot)),
        )
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
    if let Some(refused) = probe_replication(feed).await? {
        out.push(refused);
    }
    Ok(out)
}

/// Opens a replication connection as the feed will: `Some` with the
/// server's refusal and its fix (no free walsender, a role or `pg_hba.conf`
/// that does not allow it), `Err` only for an outage.
async fn probe_replication(feed: &FeedConfig) -> Result<Option<String>, Failure> {
    let probe = async {
        let mut session = ReplicationClient::connect_gated(feed.replication(Lsn::ZERO)?)
            .await
            .map_err(Failure::Replication)?;
        session
            .identify_system()
            .await
            .map_err(Failure::Replication)
    };
    match tokio::time::timeout(Duration::from_secs(30), probe).await {
        // No answer is an outage, waited out like a connection refused.
        Err(_) => Err(Failure::Replication(
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a replication connection got no answer in 30 s",
            )
            .into(),
        )),
        Ok(Ok(_)) => Ok(None),
        Ok(Err(Failure::Replication(e))) if e.is_io() => Err(Failure::Replication(e)),
        Ok(Err(e)) => Ok(Some(format!(
            "a replication connection (replication=database) is refused: {e} \
             (check max_wal_senders, the role's REPLICATION attribute and pg_hba.conf)"
        ))),
    }
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
/// `refresh` mode and the slot would only pin WAL. A slot another session
/// holds cannot be dropped: the server's error says so.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, Failure> {
    if slot_state(client, slot).await?.is_none() {
        return Ok(false);
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(Failure::Postgres)?;
    Ok(true)
}

/// Makes the mirror ready to follow the slot: resumes when the store's
/// position and the slot agree, else (first start, a switch from `refresh`,
/// a lost or renamed slot) replaces the slot and loads the snapshot it
/// exports.
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
    announce(reason, feed);
    let old = position
        .and_then(|p| p.slot)
        .filter(|old| *old != feed.slot);
    for name in old.iter().chain([&feed.slot]) {
        release_and_drop(&client, name, *name != feed.slot).await?;
    }
    snapshot(store, feed, now).await
}

/// Drops a slot once no session holds it (a killed predecessor's backend may
/// still be letting it go).
async fn release_and_drop(client: &Client, name: &str, renamed: bool) -> Result<(), Failure> {
    if let Some(SlotState {
        active_pid: Some(pid),
        ..
    }) = slot_state(client, name).await?
    {
        wait_released(client, name, pid).await?;
    }
    if drop_slot(client, name).await? && renamed {
        tracing::info!(slot = %name, "dropped the replication slot this mirror used before it was renamed");
    }
    Ok(())
}

/// Creates the slot and loads the snapshot it exports into the mirror; the
/// stream then starts at the slot's consistent point.
async fn snapshot(store: Arc<Store>, feed: &FeedConfig, now: i64) -> Result<(), Failure> {
    // The rows a snapshot adds are late subscribers unless the mirror starts
    // empty (a first snapshot): it replaces a mirror, or one a crash left
    // half replaced. A marker too many costs a lookup; one too few, a
    // notification.
    let marks_late = store.subscription_rows().next().is_some();
    // The snapshot stays valid while the session that exported it is idle.
    let mut session = ReplicationClient::connect_gated(feed.replication(Lsn::ZERO)?)
        .await
        .map_err(Failure::Replication)?;
    let (start, exported) = create_slot(&mut session, &feed.slot).await?;
    // Until the snapshot is merged, the mirror may not be trusted.
    let position = |complete| MirrorPosition {
        mode: MirrorMode::Cdc,
        snapshot_complete: complete,
        lsn: Some(start),
        slot: Some(feed.slot.clone()),
        catch_up_until: None,
        synced_at: now,
    };
    let mut pending = Commit::new();
    pending.set_mirror_position(&position(false));
    store.commit(pending)?;
    let complete = position(true);
    let plan = SyncPlan {
        finish: Box::new(move |_| complete),
        late_seq: marks_late.then_some(start),
    };
    let started = Instant::now();
    let SyncStats { rows, .. } =
        mirror::sync(store, &feed.postgres_url, plan, Some(&exported)).await?;
    drop(session);
    tracing::info!(
        rows,
        seconds = started.elapsed().as_secs_f64(),
        slot_lsn = %PgLsn::from(start),
        "snapshot loaded; following the change feed from the slot's consistent point"
    );
    Ok(())
}

/// Says why a snapshot is taken: a first start, or a feed that cannot be
/// resumed without a gap (`reason`).
fn announce(reason: Option<&'static str>, feed: &FeedConfig) {
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
        None => {
            tracing::info!(slot = %feed.slot, "starting the change feed: slot and its snapshot")
        }
    }
}

/// Creates the slot on a replication session: its consistent point, and the
/// name of the snapshot it exported (valid while `session` runs no other
/// command).
async fn create_slot(
    session: &mut ReplicationClient,
    slot: &str,
) -> Result<(u64, String), Failure> {
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT"
        ))
        .await
        .map_err(Failure::Replication)?;
    // slot_name, consistent_point, snapshot_name, output_plugin
    let column = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| Failure::Feed(format!("CREATE_REPLICATION_SLOT returned no column {i}")))
    };
    let point: PgLsn = column(1)?.parse().map_err(|_| {
        Failure::Feed("CREATE_REPLICATION_SLOT: unreadable consistent point".into())
    })?;
    Ok((point.into(), column(2)?))
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
    if p.slot.as_deref() != Some(feed.slot.as_str()) {
        return Start::Resnapshot("slot renamed");
    }
    let Some(s) = slot else {
        return Start::Resnapshot("slot missing");
    };
    if s.lost {
        return Start::Resnapshot("slot invalidated");
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
        let result = stream::follow_slot(&store, &feed, &health, &shutdown).await;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let error = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // The feed talks to Postgres all the time: while it cannot, the
        // service is not ready even when no batch is being written. (A slot
        // still held by a killed predecessor's backend is waited for
        // without going unready.)
        if unreachable(&error) {
            health.change_feed.set_ok(false);
        }
        if slot_gone(&error, &feed).await {
            tracing::error!(%error, slot = %feed.slot, "replication slot lost while following it");
            // `prepare` sees the missing or invalidated slot and re-snapshots.
            let again = || prepare(store.clone(), &feed, crate::infra::clock::now());
            match until_done("change feed re-snapshot", again, &shutdown, |_| {}).await {
                Ok(()) => continue,
                Err(Stopped::Shutdown) => return Ok(()),
                Err(Stopped::Fatal(e)) => return Err(e),
            }
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

/// The server's SQLSTATE, from either kind of connection.
fn sqlstate(error: &Failure) -> Option<&str> {
    match error {
        Failure::Postgres(e) => e.code().map(|c| c.code()),
        Failure::Replication(pgwire_replication::PgWireError::Server(text)) => {
            crate::infra::retry::sqlstate_in(text)
        }
        _ => None,
    }
}

/// Postgres cannot be reached, as opposed to refusing something.
fn unreachable(error: &Failure) -> bool {
    match (error, sqlstate(error)) {
        (_, Some(code)) => matches!(code.get(..2), Some("08" | "57" | "53")),
        (Failure::Postgres(_), None) => true,
        (Failure::Replication(e), None) => e.is_io(),
        _ => false,
    }
}

/// The slot was dropped or invalidated under us: the server refused it as
/// undefined (42704) or unusable (55000), and it is indeed missing or lost.
/// Asked of the server rather than read from the message, whose wording
/// changes between versions.
async fn slot_gone(error: &Failure, feed: &FeedConfig) -> bool {
    if !matches!(sqlstate(error), Some("42704" | "55000")) {
        return false;
    }
    let Ok(client) = crate::sinks::postgres_connect(&feed.postgres_url).await else {
        return false;
    };
    match slot_state(&client, &feed.slot).await {
        Ok(None) => true,
        Ok(Some(state)) => state.lost,
        Err(_) => false,
    }
}
