//! Input partitions as durable state. Everything that belongs to a partition
//! (where its input stands, the campaigns its messages carried, with their
//! progress) is written to Postgres in the same transaction as each batch's
//! feedback rows, once the broker has acknowledged the batch's pushes; the
//! sent set of those campaigns is `subscribers_feedback` itself. The local
//! store holds the same state for speed, marked with the [`Ownership`] it
//! was written under.
//!
//! An instance [`take`]s a partition before it reads any of its messages:
//! the partition's epoch goes up, which fences every batch of an earlier
//! holder (a batch records only under the epoch its instance holds). Then
//! [`restore`] compares the store's ownership with the durable one: equal,
//! the store is current and kept; anything else (another instance held the
//! partition since, the disk was lost, a crash fell between the Postgres
//! commit and the store's) and the partition's state is read back from
//! Postgres, never trusted from the disk.

use std::collections::{BTreeMap, BTreeSet};

use futures::{pin_mut, TryStreamExt};
use promo_fanout_state::{Campaign, Commit, Ownership, Progress, Store};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::config::Settings;
use crate::fanout::{key_of, CampaignKey};
use crate::infra::retry::Failure;

/// Whose partitions: the consumer group and input topic, and this
/// instance's name (recorded as the holder).
#[derive(Debug, Clone)]
pub struct Scope {
    pub group_id: String,
    pub topic: String,
    pub instance: String,
}

impl Scope {
    pub fn of(settings: &Settings) -> Scope {
        Scope {
            group_id: settings.group_id.clone(),
            topic: settings.input_topic.clone(),
            instance: settings.instance_id.clone(),
        }
    }
}

/// A partition this instance has just taken.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    pub partition: i32,
    /// The hold now: a new epoch, the durable version.
    pub ownership: Ownership,
    /// The next offset to read, once any batch was recorded.
    pub next_offset: Option<i64>,
}

impl Taken {
    /// The ownership a store holding exactly the durable state carries.
    fn durable(&self) -> Ownership {
        Ownership {
            epoch: self.ownership.epoch - 1,
            version: self.ownership.version,
        }
    }
}

const TAKE: &str = "\
INSERT INTO promo_fanout_partitions AS p (group_id, topic, partition, epoch, owner)
SELECT $1, $2, partition, 1, $3 FROM unnest($4::int[]) AS partition
ON CONFLICT (group_id, topic, partition) DO UPDATE
    SET epoch = p.epoch + 1, owner = EXCLUDED.owner, taken_at = now()
RETURNING partition, epoch, version, next_offset";

/// Takes `partitions` for this instance: from now on only batches of this
/// instance record them.
pub async fn take(
    client: &impl GenericClient,
    scope: &Scope,
    partitions: &[i32],
) -> Result<Vec<Taken>, Failure> {
    let rows = client
        .query(
            TAKE,
            &[&scope.group_id, &scope.topic, &scope.instance, &partitions],
        )
        .await
        .map_err(Failure::Postgres)?;
    let mut taken: Vec<Taken> = rows
        .iter()
        .map(|row| Taken {
            partition: row.get(0),
            ownership: Ownership {
                epoch: row.get(1),
                version: row.get(2),
            },
            next_offset: row.get(3),
        })
        .collect();
    taken.sort_by_key(|t| t.partition);
    Ok(taken)
}

/// Who `promo-fanout group` shows as a partition's holder after
/// [`move_position`]: no instance, until one takes it.
const MOVED_BY: &str = "set-position";

/// Moves the partition's position and makes every holder's state of it
/// stale: a new epoch fences a running holder's batches (it takes the
/// partition again), and a new version makes whichever instance takes it
/// next read its state back from Postgres, the new position included.
const MOVE: &str = "\
INSERT INTO promo_fanout_partitions AS p
    (group_id, topic, partition, epoch, version, next_offset, owner, recorded_at)
VALUES ($1, $2, $3, 1, 1, $4, $5, now())
ON CONFLICT (group_id, topic, partition) DO UPDATE
    SET epoch = p.epoch + 1, version = p.version + 1, next_offset = EXCLUDED.next_offset,
        owner = EXCLUDED.owner, taken_at = now(), recorded_at = now()";

/// A partition's durable position, the row locked until the transaction
/// ends: `None` when no batch of it was ever recorded (version 0), else
/// its next offset.
const RECORDED: &str = "\
SELECT version, next_offset FROM promo_fanout_partitions
WHERE group_id = $1 AND topic = $2 AND partition = $3
FOR UPDATE";

/// The partition's recorded next offset, if any batch of it was recorded;
/// the row stays locked until `tx` ends.
pub async fn recorded(
    tx: &tokio_postgres::Transaction<'_>,
    scope: &Scope,
    partition: i32,
) -> Result<Option<Option<i64>>, tokio_postgres::Error> {
    let row = tx
        .query_opt(RECORDED, &[&scope.group_id, &scope.topic, &partition])
        .await?;
    Ok(row
        .filter(|r| r.get::<_, i64>(0) > 0)
        .map(|r| r.get::<_, Option<i64>>(1)))
}

/// Moves the partition's durable position to `next_offset` for whichever
/// instance takes it next (`state set-position`).
pub async fn move_position(
    tx: &tokio_postgres::Transaction<'_>,
    scope: &Scope,
    partition: i32,
    next_offset: i64,
) -> Result<(), tokio_postgres::Error> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
        &scope.group_id,
        &scope.topic,
        &partition,
        &next_offset,
        &MOVED_BY,
    ];
    tx.execute(MOVE, &params).await.map(drop)
}

/// What recording a batch writes to its partitions' durable state.
#[derive(Debug, Default)]
pub struct Record {
    /// Every partition the batch touched (its positions, its campaigns):
    /// the batch records only if this instance still holds them all.
    pub touched: BTreeSet<i32>,
    /// The next offset to read, per partition.
    pub positions: BTreeMap<i32, i64>,
    /// Campaigns as the batch leaves them.
    pub puts: Vec<Campaign>,
    /// Campaigns that can no longer fire.
    pub deletes: Vec<CampaignKey>,
}

impl Record {
    pub fn put(&mut self, campaign: &Campaign) {
        self.touched.insert(campaign.partition());
        self.puts.push(campaign.clone());
    }
}

/// Another instance took partitions this one still had batches for.
#[derive(Debug, thiserror::Error)]
#[error(
    "input partitions {partitions:?} of group {group} were taken by another instance: this \
     instance no longer holds them and stops recording (the new holder replays what was in \
     flight)"
)]
pub struct Fenced {
    pub group: String,
    pub partitions: Vec<i32>,
}

const FENCE: &str = "\
UPDATE promo_fanout_partitions AS p
SET version = p.version + 1,
    next_offset = COALESCE(x.next_offset, p.next_offset),
    recorded_at = now()
FROM unnest($3::int[], $4::int8[], $5::int8[]) AS x(partition, epoch, next_offset)
WHERE p.group_id = $1 AND p.topic = $2 AND p.partition = x.partition AND p.epoch = x.epoch
RETURNING p.partition, p.epoch, p.version";

const PUT: &str = "\
INSERT INTO promo_fanout_campaigns AS c
    (group_id, topic, partition, restaurant_id, adv_campaign_id, campaign)
SELECT $1, $2, x.partition, x.restaurant_id, x.adv_campaign_id, x.campaign::jsonb
FROM unnest($3::int[], $4::uuid[], $5::uuid[], $6::text[])
    AS x(partition, restaurant_id, adv_campaign_id, campaign)
ON CONFLICT (group_id, topic, restaurant_id, adv_campaign_id) DO UPDATE
    SET partition = EXCLUDED.partition, campaign = EXCLUDED.campaign";

const DELETE: &str = "\
DELETE FROM promo_fanout_campaigns
WHERE group_id = $1 AND topic = $2
  AND (restaurant_id, adv_campaign_id) IN (SELECT * FROM unnest($3::uuid[], $4::uuid[]))";

/// Writes `record` inside the caller's transaction, fenced by the epochs in
/// `held`; returns the ownership of each touched partition after it. A
/// partition not held (or held under an older epoch than Postgres's) is
/// [`Fenced`], and the caller rolls back.
pub async fn write(
    client: &impl GenericClient,
    scope: &Scope,
    held: &BTreeMap<i32, Ownership>,
    record: &Record,
) -> Result<BTreeMap<i32, Ownership>, Failure> {
    let pg = Failure::Postgres;
    let partitions: Vec<i32> = record.touched.iter().copied().collect();
    let epochs: Vec<i64> = partitions
        .iter()
        .map(|p| held.get(p).map_or(-1, |o| o.epoch))
        .collect();
    let nexts: Vec<Option<i64>> = partitions
        .iter()
        .map(|p| record.positions.get(p).copied())
        .collect();
    let (g, t) = (&scope.group_id, &scope.topic);
    let fenced = async {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [g, t, &partitions, &epochs, &nexts];
        client.query(FENCE, &params).await
    };
    let put_partitions: Vec<i32> = record.puts.iter().map(Campaign::partition).collect();
    let put_restaurants: Vec<Uuid> = record.puts.iter().map(|c| key_of(c).0).collect();
    let put_ids: Vec<Uuid> = record.puts.iter().map(|c| key_of(c).1).collect();
    let put_values: Vec<String> = record
        .puts
        .iter()
        .map(|c| serde_json::to_string(c).expect("a campaign always serializes"))
        .collect();
    let puts = async {
        if record.puts.is_empty() {
            return Ok(0);
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            g,
            t,
            &put_partitions,
            &put_restaurants,
            &put_ids,
            &put_values,
        ];
        client.execute(PUT, &params).await
    };
    let (del_restaurants, del_ids): (Vec<Uuid>, Vec<Uuid>) = record.deletes.iter().copied().unzip();
    let deletes = async {
        if record.deletes.is_empty() {
            return Ok(0);
        }
        client
            .execute(DELETE, &[g, t, &del_restaurants, &del_ids])
            .await
    };
    // One round trip: the statements are pipelined on the connection.
    let (rows, _, _) = futures::try_join!(fenced, puts, deletes).map_err(pg)?;
    let after: BTreeMap<i32, Ownership> = rows
        .iter()
        .map(|row| {
            let ownership = Ownership {
                epoch: row.get(1),
                version: row.get(2),
            };
            (row.get::<_, i32>(0), ownership)
        })
        .collect();
    let lost: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| !after.contains_key(p))
        .collect();
    if !lost.is_empty() {
        return Err(Failure::Fenced(Fenced {
            group: scope.group_id.clone(),
            partitions: lost,
        }));
    }
    Ok(after)
}

/// How [`restore`] found each partition.
#[derive(Debug, Default)]
pub struct Restored {
    /// The store was current: kept as it is.
    pub kept: Vec<i32>,
    /// Postgres had no state yet, the store had: the store's was written
    /// there.
    pub seeded: Vec<i32>,
    /// Read back from Postgres: (partition, campaigns, sent entries).
    pub restored: Vec<(i32, usize, u64)>,
    /// The hold on every partition now.
    pub held: BTreeMap<i32, Ownership>,
}

/// Sent entries written to the store per commit while restoring.
const SENT_CHUNK: usize = 50_000;

/// Brings the store's state of each taken partition to the durable one (see
/// the module's documentation) and marks it with the new hold.
pub async fn restore(
    store: &Store,
    client: &mut tokio_postgres::Client,
    scope: &Scope,
    taken: &[Taken],
    retention: i64,
) -> Result<Restored, Failure> {
    // Read once: taking one partition changes none of another's entries.
    let local = store.ownerships()?;
    let positions = store.input_positions()?;
    let campaigns = store.campaigns()?;
    let of = |p: i32| campaigns.iter().filter(move |c| c.partition() == p);
    let mut out = Restored::default();
    for t in taken {
        let mut held = t.ownership;
        if local.get(&t.partition) == Some(&t.durable()) {
            out.kept.push(t.partition);
        } else if t.ownership.version == 0 {
            if let Some(next) = positions.get(&t.partition) {
                held = seed(client, scope, t, *next, of(t.partition)).await?;
                out.seeded.push(t.partition);
            }
        } else {
            let stale = of(t.partition);
            let (restored, sent) = read_back(store, client, scope, t, stale, retention).await?;
            out.restored.push((t.partition, restored, sent));
        }
        let mut commit = Commit::new();
        commit.set_ownership(t.partition, held);
        commit_now(store, commit)?;
        out.held.insert(t.partition, held);
    }
    Ok(out)
}

/// Postgres has never recorded this partition, and the store has (an
/// instance upgraded from a single-node version): what the store holds is
/// the truth, and is written to Postgres under the new hold.
async fn seed(
    client: &mut tokio_postgres::Client,
    scope: &Scope,
    t: &Taken,
    next_offset: i64,
    campaigns: impl Iterator<Item = &Campaign>,
) -> Result<Ownership, Failure> {
    let mut record = Record::default();
    record.touched.insert(t.partition);
    record.positions.insert(t.partition, next_offset);
    for c in campaigns {
        record.put(c);
    }
    let tx = client.transaction().await.map_err(Failure::Postgres)?;
    let held = BTreeMap::from([(t.partition, t.ownership)]);
    let after = write(&tx, scope, &held, &record).await?;
    tx.commit().await.map_err(Failure::Postgres)?;
    Ok(after[&t.partition])
}

const CAMPAIGNS_OF: &str = "\
SELECT campaign::text FROM promo_fanout_campaigns
WHERE group_id = $1 AND topic = $2 AND partition = $3";

const SENT_OF: &str = "\
SELECT client_id FROM subscribers_feedback WHERE restaurant_id = $1 AND adv_campaign_id = $2";

/// Replaces the store's state of the partition (`stale`: the campaigns it
/// holds of it) with Postgres's: its
/// position, its campaigns, and their sent sets from `subscribers_feedback`.
/// A campaign under way starts its scan again from the first subscriber,
/// skipping the sent set: whoever subscribed while another instance held
/// the partition is found that way. Returns the campaigns and sent entries
/// restored.
async fn read_back(
    store: &Store,
    client: &tokio_postgres::Client,
    scope: &Scope,
    t: &Taken,
    stale: impl Iterator<Item = &Campaign>,
    retention: i64,
) -> Result<(usize, u64), Failure> {
    let pg = Failure::Postgres;
    let rows = client
        .query(CAMPAIGNS_OF, &[&scope.group_id, &scope.topic, &t.partition])
        .await
        .map_err(pg)?;
    let mut durable = Vec::with_capacity(rows.len());
    for row in &rows {
        let text: &str = row.get(0);
        let campaign: Campaign = serde_json::from_str(text).map_err(|e| {
            Failure::Config(format!(
                "promo_fanout_campaigns holds a campaign this build cannot read ({e}): {text}"
            ))
        })?;
        durable.push(campaign);
    }
    // Whatever the store had of the partition goes, with its sent sets.
    let mut clear = Commit::new();
    for (r, k) in stale.map(key_of).chain(durable.iter().map(key_of)) {
        clear.delete_campaign(r, k);
    }
    clear.release_partition(t.partition);
    commit_now(store, clear)?;

    let mut sent = 0;
    for c in &durable {
        sent += read_sent(store, client, c, retention).await?;
    }
    let mut commit = Commit::new();
    for c in durable.iter_mut() {
        if c.progress != Progress::NotStarted {
            c.progress = Progress::NotStarted;
        }
        commit.put_campaign(c);
    }
    if let Some(next) = t.next_offset {
        commit.set_input_position(t.partition, next);
    }
    commit_now(store, commit)?;
    Ok((durable.len(), sent))
}

/// The campaign's sent set from `subscribers_feedback`, into the store in
/// chunks; returns how many entries.
async fn read_sent(
    store: &Store,
    client: &tokio_postgres::Client,
    campaign: &Campaign,
    retention: i64,
) -> Result<u64, Failure> {
    let (r, k) = key_of(campaign);
    let expires_at = campaign
        .action
        .adv_campaign_datetime_end
        .saturating_add(retention);
    let rows = client
        .query_raw(SENT_OF, [&r, &k])
        .await
        .map_err(Failure::Postgres)?;
    pin_mut!(rows);
    let mut commit = Commit::new();
    let mut total = 0;
    while let Some(row) = rows.try_next().await.map_err(Failure::Postgres)? {
        commit.mark_sent(r, k, row.get(0), expires_at);
        total += 1;
        if commit.len() >= SENT_CHUNK {
            commit_now(store, std::mem::take(&mut commit))?;
        }
    }
    commit_now(store, commit)?;
    Ok(total)
}

/// A synced store commit from async code, off the runtime's other tasks.
fn commit_now(store: &Store, commit: Commit) -> Result<(), Failure> {
    tokio::task::block_in_place(|| store.commit(commit)).map_err(Failure::from)
}
