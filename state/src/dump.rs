//! `state dump`: every entry of the store as a typed, printable value.

use serde::Serialize;
use uuid::Uuid;

use crate::codec::{decode, hex};
use crate::{
    keys, Action, Campaign, Identity, MirrorMode, MirrorPosition, Origin, Ownership, Progress,
    Store, StoreError, Table,
};

/// One stored entry, in the shape `state dump` prints it (with a `table` field).
#[derive(Debug, Serialize)]
#[serde(tag = "table", rename_all = "snake_case")]
pub enum Entry {
    Subscriptions(SubscriptionEntry),
    Campaigns(CampaignEntry),
    Sent {
        restaurant_id: Uuid,
        adv_campaign_id: Uuid,
        client_id: Uuid,
        expires_at: i64,
    },
    Positions(PositionEntry),
    Meta(MetaEntry),
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SubscriptionEntry {
    /// The fan-out index: restaurant, then client, then source row.
    ByRestaurant {
        restaurant_id: Uuid,
        client_id: Uuid,
        row_id: i64,
    },
    /// The row index a row-level delete needs.
    ByRow {
        row_id: i64,
        restaurant_id: Uuid,
        client_id: Uuid,
    },
    /// A subscription that arrived through the change feed, not yet checked
    /// against the campaigns under way.
    Late {
        restaurant_id: Uuid,
        client_id: Uuid,
        seq: u64,
    },
}

/// A campaign as printed: the action's fields, progress spelled out, and
/// where it came from.
#[derive(Debug, Serialize)]
pub struct CampaignEntry {
    #[serde(flatten)]
    pub action: Action,
    pub progress: ProgressEntry,
    pub origin: Option<Origin>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "state", content = "after_client_id", rename_all = "snake_case")]
pub enum ProgressEntry {
    NotStarted,
    After(Uuid),
    Done,
}

impl From<Campaign> for CampaignEntry {
    fn from(c: Campaign) -> Self {
        CampaignEntry {
            action: c.action,
            origin: c.origin,
            progress: match c.progress {
                Progress::NotStarted => ProgressEntry::NotStarted,
                Progress::After(client) => ProgressEntry::After(client),
                Progress::Done => ProgressEntry::Done,
            },
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PositionEntry {
    Input {
        partition: i32,
        next_offset: i64,
    },
    Ownership {
        partition: i32,
        epoch: i64,
        version: i64,
    },
    Mirror {
        mode: &'static str,
        snapshot_complete: bool,
        lsn: Option<String>,
        slot: Option<String>,
        catch_up_until: Option<String>,
        synced_at: i64,
    },
}

impl From<MirrorPosition> for PositionEntry {
    fn from(p: MirrorPosition) -> Self {
        PositionEntry::Mirror {
            mode: match p.mode {
                MirrorMode::Refresh => "refresh",
                MirrorMode::Cdc => "cdc",
            },
            snapshot_complete: p.snapshot_complete,
            // Postgres's own notation, e.g. 0/16B3748.
            lsn: p.lsn.map(lsn_text),
            slot: p.slot,
            catch_up_until: p.catch_up_until.map(lsn_text),
            synced_at: p.synced_at,
        }
    }
}

/// An LSN in Postgres's own notation, e.g. `0/16B3748`.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[derive(Debug, Serialize)]
#[serde(tag = "key", rename_all = "snake_case")]
pub enum MetaEntry {
    SchemaVersion { value: u32 },
    Identity(Identity),
    Instance { value: String },
    Unknown { raw_key: String },
}

impl Store {
    /// Every entry of `table`, in key order.
    pub fn dump(&self, table: Table) -> impl Iterator<Item = Result<Entry, StoreError>> + '_ {
        self.raw_entries(table)
            .map(move |item| item.and_then(|(k, v)| decode_entry(table, &k, &v)))
    }
}

fn decode_entry(table: Table, k: &[u8], v: &[u8]) -> Result<Entry, StoreError> {
    let name = table.name();
    let bad_key = || StoreError::Corrupt {
        table: name,
        key: hex(k),
        reason: "unexpected key layout".into(),
    };
    Ok(match table {
        Table::Subscriptions => match (k.first(), k.len()) {
            (Some(&keys::SUB_BY_RESTAURANT), 41) => {
                Entry::Subscriptions(SubscriptionEntry::ByRestaurant {
                    restaurant_id: keys::uuid_at(k, 1),
                    client_id: keys::uuid_at(k, 17),
                    row_id: keys::from_ordered_i64(&k[33..]),
                })
            }
            (Some(&keys::SUB_BY_ROW), 9) => {
                let (r, c): (Uuid, Uuid) = decode(name, k, v)?;
                Entry::Subscriptions(SubscriptionEntry::ByRow {
                    row_id: keys::from_ordered_i64(&k[1..]),
                    restaurant_id: r,
                    client_id: c,
                })
            }
            (Some(&keys::SUB_LATE), 41) => Entry::Subscriptions(SubscriptionEntry::Late {
                restaurant_id: keys::uuid_at(k, 1),
                client_id: keys::uuid_at(k, 17),
                seq: keys::u64_at(k, 33),
            }),
            _ => return Err(bad_key()),
        },
        Table::Campaigns => Entry::Campaigns(crate::codec::decode_campaign(k, v)?.into()),
        Table::Sent if k.len() == 48 => Entry::Sent {
            restaurant_id: keys::uuid_at(k, 0),
            adv_campaign_id: keys::uuid_at(k, 16),
            client_id: keys::uuid_at(k, 32),
            expires_at: decode(name, k, v)?,
        },
        Table::Sent => return Err(bad_key()),
        Table::Positions => match (k.first(), k.len()) {
            (Some(&keys::INPUT_POSITION), 5) => Entry::Positions(PositionEntry::Input {
                partition: keys::from_ordered_i32(&k[1..]),
                next_offset: decode(name, k, v)?,
            }),
            (Some(&keys::OWNERSHIP), 5) => {
                let o: Ownership = decode(name, k, v)?;
                Entry::Positions(PositionEntry::Ownership {
                    partition: keys::from_ordered_i32(&k[1..]),
                    epoch: o.epoch,
                    version: o.version,
                })
            }
            (Some(&keys::MIRROR_POSITION), 1) => {
                Entry::Positions(decode::<MirrorPosition>(name, k, v)?.into())
            }
            _ => return Err(bad_key()),
        },
        Table::Meta => Entry::Meta(match k {
            keys::META_SCHEMA_VERSION => MetaEntry::SchemaVersion {
                value: decode(name, k, v)?,
            },
            keys::META_IDENTITY => MetaEntry::Identity(decode(name, k, v)?),
            keys::META_INSTANCE => MetaEntry::Instance {
                value: decode(name, k, v)?,
            },
            _ => MetaEntry::Unknown { raw_key: hex(k) },
        }),
    })
}
