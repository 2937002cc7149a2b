//! promo-fanout's state store: typed RocksDB tables and one atomic, synced commit.
//!
//! The crate knows RocksDB and serde only. Kafka and Postgres live in the binary;
//! this crate stores what they need to resume after a crash.

mod codec;
mod commit;
mod dump;
mod error;
mod keys;
mod records;
mod store;

pub use commit::Commit;
pub use dump::{lsn_text, Entry};
pub use error::StoreError;
pub use records::{
    Action, Campaign, Identity, MirrorMode, MirrorPosition, Origin, Ownership, Progress,
    Subscription, SCHEMA_VERSION,
};
pub use store::{Store, Subscribers, Table};
