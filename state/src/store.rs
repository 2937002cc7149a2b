//! The store itself: opening (and refusing) a directory, typed reads, and the
//! one synced commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBRawIterator, Direction, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteOptions, DB,
};
use uuid::Uuid;

use crate::codec::{decode, encode};
use crate::commit::{Commit, Op};
use crate::{keys, Campaign, Identity, MirrorPosition, Ownership, StoreError, SCHEMA_VERSION};

/// The column families, in the order `state dump` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Subscriptions,
    Campaigns,
    Sent,
    Positions,
    Meta,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Subscriptions,
        Table::Campaigns,
        Table::Sent,
        Table::Positions,
        Table::Meta,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Subscriptions => "subscriptions",
            Table::Campaigns => "campaigns",
            Table::Sent => "sent",
            Table::Positions => "positions",
            Table::Meta => "meta",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Block cache shared by every table: the read path's memory is bounded by it
/// rather than by the number of subscribers.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// A key and its value, as stored.
pub(crate) type RawEntry = (Box<[u8]>, Box<[u8]>);

/// A RocksDB state store.
pub struct Store {
    db: DB,
    path: PathBuf,
    /// Opened as a secondary instance beside a running service: reads only.
    secondary: bool,
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_max_open_files(256);
    // One write-ahead log serves every table, and a log is kept until every
    // table with data in it has flushed. Without a cap, a table written
    // rarely (positions, meta) pins the logs of a whole 10M-row snapshot,
    // and the next start replays them all: seconds instead of milliseconds.
    // Past this size the tables holding the oldest log are flushed.
    opts.set_max_total_wal_size(64 << 20);
    // All tables' memtables together, so that a fast fan-out (the sent
    // table) or a snapshot cannot grow memory past it before flushing.
    opts.set_db_write_buffer_size(MEMTABLE_BYTES);
    opts
}

/// The memtables of all tables together: with the block cache, the bulk of
/// the process's memory.
const MEMTABLE_BYTES: usize = 64 << 20;

fn cf_descriptors(cache: &Cache) -> Vec<ColumnFamilyDescriptor> {
    Table::ALL
        .iter()
        .map(|t| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(cache);
            if matches!(t, Table::Sent) {
                // `sent` is read by point lookups; a bloom filter answers most
                // "not sent yet" without touching a data block.
                block.set_bloom_filter(10.0, false);
            }
            let mut opts = Options::default();
            opts.set_block_based_table_factory(&block);
            opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(t.name(), opts)
        })
        .collect()
}

impl Store {
    /// Opens (creating if needed) the store of the pipeline `identity`, and
    /// refuses one of another schema version or another pipeline.
    pub fn open(path: &Path, identity: &Identity) -> Result<Store, StoreError> {
        not_a_file(path)?;
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let db = DB::open_cf_descriptors(&db_options(), path, cf_descriptors(&cache)).map_err(
            |error| {
                // RocksDB's lock file: another process has the store open.
                if error.as_ref().contains("While lock file") {
                    StoreError::InUse {
                        path: path.to_owned(),
                    }
                } else {
                    StoreError::Open {
                        path: path.to_owned(),
                        error,
                    }
                }
            },
        )?;
        let store = Store {
            db,
            path: path.to_owned(),
            secondary: false,
        };
        store.check_schema()?;
        store.check_identity(identity)?;
        Ok(store)
    }

    /// Opens a read-only view of a store another process may hold open,
    /// keeping RocksDB's secondary-instance files in `scratch`.
    pub fn open_secondary(path: &Path, scratch: &Path) -> Result<Store, StoreError> {
        not_a_file(path)?;
        let mut opts = Options::default();
        opts.set_max_open_files(-1);
        let names = Table::ALL.iter().map(|t| t.name());
        let db = DB::open_cf_as_secondary(&opts, path, scratch, names).map_err(|error| {
            StoreError::Open {
                path: path.to_owned(),
                error,
            }
        })?;
        db.try_catch_up_with_primary()
            .map_err(|error| StoreError::Open {
                path: path.to_owned(),
                error,
            })?;
        let store = Store {
            db,
            path: path.to_owned(),
            secondary: true,
        };
        store.check_schema()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, table: Table) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(table.name())
            .expect("every table is opened with the store")
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.meta_u32(keys::META_SCHEMA_VERSION)? {
            Some(SCHEMA_VERSION) => Ok(()),
            Some(found) => Err(StoreError::SchemaVersion {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            }),
            None if self.secondary => Err(StoreError::NotAStore {
                path: self.path.clone(),
            }),
            None => {
                let has_data = Table::ALL.iter().any(|t| {
                    self.db
                        .iterator_cf(self.cf(*t), IteratorMode::Start)
                        .next()
                        .is_some()
                });
                if has_data {
                    return Err(StoreError::NotAStore {
                        path: self.path.clone(),
                    });
                }
                self.put_meta(keys::META_SCHEMA_VERSION, &SCHEMA_VERSION)
            }
        }
    }

    fn check_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        match self.identity()? {
            Some(found) if &found == identity => Ok(()),
            Some(found) => Err(StoreError::ForeignStore {
                path: self.path.clone(),
                found_group: found.group_id,
                found_topic: found.input_topic,
                group: identity.group_id.clone(),
                topic: identity.input_topic.clone(),
            }),
            None => self.put_meta(keys::META_IDENTITY, identity),
        }
    }

    /// Records that this store is instance `instance`'s, or refuses if it
    /// is another instance's. (A store from before instances were named is
    /// claimed by the first instance that opens it.)
    pub fn claim_instance(&self, instance: &str) -> Result<(), StoreError> {
        let found: Option<String> = self
            .db
            .get_pinned_cf(self.cf(Table::Meta), keys::META_INSTANCE)?
            .map(|v| decode("meta", keys::META_INSTANCE, &v))
            .transpose()?;
        match found {
            Some(found) if found == instance => Ok(()),
            Some(found) => Err(StoreError::OtherInstance {
                path: self.path.clone(),
                found,
                instance: instance.to_owned(),
            }),
            None => self.put_meta(keys::META_INSTANCE, &instance.to_owned()),
        }
    }

    /// Writes one `meta` entry, synced.
    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .put_cf_opt(self.cf(Table::Meta), key, encode(value), &opts)?;
        Ok(())
    }

    fn meta_u32(&self, key: &[u8]) -> Result<Option<u32>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(Table::Meta), key)?
            .map(|v| decode("meta", key, &v))
            .transpose()
    }

    /// The pipeline this store belongs to, once recorded.
    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(Table::Meta), keys::META_IDENTITY)?
            .map(|v| decode("meta", keys::META_IDENTITY, &v))
            .transpose()
    }

    /// Brings a secondary instance up to the primary's latest writes.
    pub fn catch_up(&self) -> Result<(), StoreError> {
        Ok(self.db.try_catch_up_with_primary()?)
    }

    /// Applies `commit` as one atomic write batch, synced to disk before
    /// returning.
    pub fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for op in commit.ops {
            match op {
                Op::Put(t, k, v) => batch.put_cf(self.cf(t), k, v),
                Op::Delete(t, k) => batch.delete_cf(self.cf(t), k),
                Op::DeleteRange(t, lo, hi) => batch.delete_range_cf(self.cf(t), lo, hi),
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// The distinct subscribers of `restaurant` in client-id order, starting
    /// after `after` when given.
    pub fn subscribers(&self, restaurant: Uuid, after: Option<Uuid>) -> Subscribers<'_> {
        let prefix = keys::sub_prefix(restaurant, None);
        let mut fixed = [0u8; 17];
        fixed.copy_from_slice(&prefix);
        let upper = keys::next_prefix(&fixed).to_vec();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(upper);
        opts.fill_cache(true);
        let mut iter = self
            .db
            .raw_iterator_cf_opt(self.cf(Table::Subscriptions), opts);
        match after {
            Some(client) => {
                // Past every row of `client`: its key with the row id at max.
                let mut start = keys::sub_prefix(restaurant, Some(client));
                start.extend_from_slice(&[0xff; 8]);
                iter.seek(&start);
                if iter.valid() && iter.key() == Some(start.as_slice()) {
                    iter.next();
                }
            }
            None => iter.seek(&prefix),
        }
        Subscribers {
            iter,
            last: after,
            done: false,
        }
    }

    /// Whether the restaurant has a subscription row for the client.
    pub fn is_subscribed(&self, restaurant: Uuid, client: Uuid) -> Result<bool, StoreError> {
        let prefix = keys::sub_prefix(restaurant, Some(client));
        let mut iter = self.db.raw_iterator_cf(self.cf(Table::Subscriptions));
        iter.seek(&prefix);
        iter.status()?;
        Ok(iter.key().is_some_and(|k| k.starts_with(&prefix)))
    }

    /// Up to `limit` late-subscriber markers, as (restaurant, client, seq).
    pub fn late_subscribers(&self, limit: usize) -> Result<Vec<(Uuid, Uuid, u64)>, StoreError> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(vec![keys::SUB_LATE + 1]);
        let mut iter = self
            .db
            .raw_iterator_cf_opt(self.cf(Table::Subscriptions), opts);
        iter.seek([keys::SUB_LATE]);
        let mut out = Vec::new();
        while let Some(k) = iter.key() {
            if out.len() >= limit {
                break;
            }
            if k.len() == 41 {
                out.push((
                    keys::uuid_at(k, 1),
                    keys::uuid_at(k, 17),
                    keys::u64_at(k, 33),
                ));
            }
            iter.next();
        }
        iter.status()?;
        Ok(out)
    }

    /// The mirrored row with this id.
    pub fn subscription_row(&self, row_id: i64) -> Result<Option<crate::Subscription>, StoreError> {
        let key = keys::sub_by_row(row_id);
        self.db
            .get_pinned_cf(self.cf(Table::Subscriptions), key)?
            .map(|v| {
                decode::<(Uuid, Uuid)>("subscriptions", &key, &v).map(|(r, c)| {
                    crate::Subscription {
                        row_id,
                        restaurant_id: r,
                        client_id: c,
                    }
                })
            })
            .transpose()
    }

    /// Every mirrored row in id order: what a re-read of the table is
    /// compared against.
    pub fn subscription_rows(
        &self,
    ) -> impl Iterator<Item = Result<crate::Subscription, StoreError>> + '_ {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(vec![keys::SUB_BY_ROW + 1]);
        opts.fill_cache(false);
        self.db
            .iterator_cf_opt(
                self.cf(Table::Subscriptions),
                opts,
                IteratorMode::From(&[keys::SUB_BY_ROW], Direction::Forward),
            )
            .map(|item| {
                let (k, v) = item?;
                let (r, c) = decode::<(Uuid, Uuid)>("subscriptions", &k, &v)?;
                Ok(crate::Subscription {
                    row_id: keys::from_ordered_i64(&k[1..]),
                    restaurant_id: r,
                    client_id: c,
                })
            })
    }

    /// For each client, whether it has already been notified of the campaign.
    pub fn sent_flags(
        &self,
        restaurant: Uuid,
        campaign: Uuid,
        clients: &[Uuid],
    ) -> Result<Vec<bool>, StoreError> {
        let keys: Vec<[u8; 48]> = clients
            .iter()
            .map(|c| keys::sent(restaurant, campaign, *c))
            .collect();
        self.db
            .batched_multi_get_cf(self.cf(Table::Sent), keys.iter(), true)
            .into_iter()
            .map(|r| r.map(|v| v.is_some()).map_err(StoreError::from))
            .collect()
    }

    pub fn is_sent(
        &self,
        restaurant: Uuid,
        campaign: Uuid,
        client: Uuid,
    ) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(
                self.cf(Table::Sent),
                keys::sent(restaurant, campaign, client),
            )?
            .is_some())
    }

    /// Every stored campaign.
    pub fn campaigns(&self) -> Result<Vec<Campaign>, StoreError> {
        self.db
            .iterator_cf(self.cf(Table::Campaigns), IteratorMode::Start)
            .filter(|item| {
                item.as_ref()
                    .map(|(k, _)| k.first() == Some(&keys::CAMPAIGN))
                    .unwrap_or(true)
            })
            .map(|item| {
                let (k, v) = item?;
                crate::codec::decode_campaign(&k, &v)
            })
            .collect()
    }

    /// The next offset to read per input partition.
    pub fn input_positions(&self) -> Result<BTreeMap<i32, i64>, StoreError> {
        self.per_partition(keys::INPUT_POSITION)
    }

    /// The hold on each input partition this store's state is of.
    pub fn ownerships(&self) -> Result<BTreeMap<i32, Ownership>, StoreError> {
        self.per_partition(keys::OWNERSHIP)
    }

    /// The `positions` entries of one kind, keyed `[kind][partition]`.
    fn per_partition<T: serde::de::DeserializeOwned>(
        &self,
        kind: u8,
    ) -> Result<BTreeMap<i32, T>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self
            .db
            .prefix_iterator_cf(self.cf(Table::Positions), [kind])
        {
            let (k, v) = item?;
            if k.first() != Some(&kind) {
                break;
            }
            out.insert(
                keys::from_ordered_i32(&k[1..]),
                decode("positions", &k, &v)?,
            );
        }
        Ok(out)
    }

    pub fn mirror_position(&self) -> Result<Option<MirrorPosition>, StoreError> {
        let key = [keys::MIRROR_POSITION];
        self.db
            .get_pinned_cf(self.cf(Table::Positions), key)?
            .map(|v| decode("positions", &key, &v))
            .transpose()
    }

    pub(crate) fn raw_entries(
        &self,
        table: Table,
    ) -> impl Iterator<Item = Result<RawEntry, StoreError>> + '_ {
        self.db
            .iterator_cf(self.cf(table), IteratorMode::Start)
            .map(|item| item.map_err(StoreError::from))
    }
}

/// The distinct clients under one restaurant prefix. The same pair in several
/// source rows is adjacent in key order, so skipping repeats needs no memory.
pub struct Subscribers<'a> {
    iter: DBRawIterator<'a>,
    last: Option<Uuid>,
    done: bool,
}

impl Iterator for Subscribers<'_> {
    type Item = Result<Uuid, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(key) = self.iter.key() else {
                self.done = true;
                return self.iter.status().err().map(|e| Err(e.into()));
            };
            if key.len() != 41 {
                self.done = true;
                return None;
            }
            let client = keys::uuid_at(key, 17);
            self.iter.next();
            if self.last != Some(client) {
                self.last = Some(client);
                return Some(Ok(client));
            }
        }
        None
    }
}

/// RocksDB would report a file given as the store's directory as a failure
/// to create it, in Rust's debug notation.
fn not_a_file(path: &Path) -> Result<(), StoreError> {
    if path.exists() && !path.is_dir() {
        return Err(StoreError::NotADirectory {
            path: path.to_owned(),
        });
    }
    Ok(())
}
