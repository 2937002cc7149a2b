//! The errors the state store reports, each naming the problem and the way out.

use std::path::PathBuf;

/// Everything that can go wrong opening, reading or committing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the state store at {path}: {error}; if the directory is damaged, move it \
         aside and start `promo-fanout run` with an empty --state-dir: it restores the store \
         from Postgres"
    )]
    Open {
        path: PathBuf,
        error: rocksdb::Error,
    },

    #[error(
        "the state store at {path} is a file, not a directory; point --state-dir at a directory"
    )]
    NotADirectory { path: PathBuf },

    #[error(
        "the state store at {path} is held by another process (a running `promo-fanout run`?); \
         stop it first"
    )]
    InUse { path: PathBuf },

    #[error(
        "the state store at {path} has schema version {found}, this build understands {supported}; \
         use a matching promo-fanout build, or move the directory aside and start \
         `promo-fanout run` with an empty --state-dir"
    )]
    SchemaVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error(
        "the state store at {path} belongs to group {found_group:?} on topic {found_topic:?}, not \
         group {group:?} on topic {topic:?}; point --state-dir at this pipeline's own directory, \
         or move it aside and start `promo-fanout run` with an empty --state-dir"
    )]
    ForeignStore {
        path: PathBuf,
        found_group: String,
        found_topic: String,
        group: String,
        topic: String,
    },

    #[error(
        "the state store at {path} belongs to instance {found:?} of the group, not {instance:?}: \
         each instance has its own --state-dir; give this one its own directory (its partitions \
         are restored from Postgres), or run it with --instance-id {found}"
    )]
    OtherInstance {
        path: PathBuf,
        found: String,
        instance: String,
    },

    #[error(
        "the state store at {path} holds data but no schema version: it was not written by \
         promo-fanout; point --state-dir at an empty directory or a promo-fanout store"
    )]
    NotAStore { path: PathBuf },

    #[error("{table} entry {key} cannot be decoded: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },

    #[error("state store I/O failed: {0}")]
    Io(rocksdb::Error),
}

// By hand rather than `#[from]`, which would also make the cause the error's
// source: the text already says it, and a chain would say it twice.
impl From<rocksdb::Error> for StoreError {
    fn from(error: rocksdb::Error) -> Self {
        StoreError::Io(error)
    }
}
