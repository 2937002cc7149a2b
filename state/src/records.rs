//! The typed values of each table.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The layout of keys and tables this build reads and writes. A store with
/// another version is refused rather than misread.
///
/// 2: the mirror position records `catch_up_until`; late-subscriber markers.
pub const SCHEMA_VERSION: u32 = 2;

/// Which pipeline a store belongs to: a store carries the group and topic it
/// recorded positions for, so it is never resumed against another one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub group_id: String,
    pub input_topic: String,
}

/// One mirrored row of `subscribers_restaurants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub row_id: i64,
    pub restaurant_id: Uuid,
    pub client_id: Uuid,
}

/// A restaurant's action: the eight fields of the input topic's JSON, declared
/// once. The push message, the feedback row, the dump line and the stored
/// campaign are all made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub restaurant_id: Uuid,
    pub adv_campaign_id: Uuid,
    pub adv_campaign_content: String,
    #[serde(default)]
    pub adv_campaign_owner: Option<String>,
    #[serde(default)]
    pub adv_campaign_owner_contact: Option<String>,
    /// Unix seconds.
    pub adv_campaign_datetime_start: i64,
    /// Unix seconds.
    pub adv_campaign_datetime_end: i64,
    /// Unix seconds.
    pub datetime_created: i64,
}

/// A scheduled or active campaign and how far its fan-out has gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    /// The latest action for the campaign's ids.
    pub action: Action,
    pub progress: Progress,
    /// The input message that carried `action`: where the campaign came
    /// from, for a dead letter that names it. `None` for a campaign stored
    /// before origins were kept, or rebuilt from Postgres.
    pub origin: Option<Origin>,
}

impl Campaign {
    /// The input partition the campaign belongs to: the one whose message
    /// carried it (partition 0 for a campaign stored without an origin).
    pub fn partition(&self) -> i32 {
        self.origin.map_or(0, |o| o.partition)
    }
}

/// Which hold on an input partition a store's state of it is: the epoch the
/// instance took the partition under, and how many batches had been recorded
/// for it (here and in Postgres's `promo_fanout_partitions`) when the state
/// was written. A store whose ownership equals the durable one holds exactly
/// the durable state; any other is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub epoch: i64,
    pub version: i64,
}

/// An input message's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
}

/// A campaign as value format 1 stored it, before origins were kept.
#[derive(Deserialize)]
pub(crate) struct CampaignV1 {
    action: Action,
    progress: Progress,
}

impl From<CampaignV1> for Campaign {
    fn from(c: CampaignV1) -> Self {
        Campaign {
            action: c.action,
            progress: c.progress,
            origin: None,
        }
    }
}

/// How far the fan-out of a campaign has walked the restaurant's subscribers,
/// which come in client-id order.
///
/// Stored with bincode, which needs serde's default enum representation: the
/// dump's JSON shape is made in `dump.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Progress {
    /// Not started: waiting for its start time.
    NotStarted,
    /// Every subscriber up to and including this client has been handled.
    After(Uuid),
    /// Every subscriber present when the scan passed has been handled.
    Done,
}

/// How the subscription mirror is kept up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorMode {
    /// Snapshot, then periodic re-reads of the table.
    Refresh,
    /// Snapshot, then Postgres logical replication.
    Cdc,
}

/// Where the mirror stands, written in the same batch as the rows it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorPosition {
    pub mode: MirrorMode,
    /// The first full snapshot has been applied; until then the mirror is
    /// incomplete and no fan-out may trust it.
    pub snapshot_complete: bool,
    /// Logical replication: the last LSN whose changes are in the mirror.
    pub lsn: Option<u64>,
    /// Logical replication: the slot the stream comes from.
    pub slot: Option<String>,
    /// Logical replication: the stream up to here replays changes the
    /// snapshot already holds (the slot was made just before it); they bring
    /// the mirror to the table but notify no late subscriber.
    pub catch_up_until: Option<u64>,
    /// Unix seconds of the last snapshot or re-read applied.
    pub synced_at: i64,
}
