//! A scratch database on a running Postgres server, created for one run and
//! dropped with what holds it (its backends, the change feed's replication
//! slots): the one helper the demo, the tests and the benches share.

use std::time::Duration;

use uuid::Uuid;

use crate::sinks::postgres_connect;

/// A database named `PREFIX_<uuid>`, on the server `admin_url` reaches.
#[derive(Debug, Clone)]
pub struct ScratchDb {
    pub name: String,
    /// Connects to the scratch database.
    pub url: String,
    admin_url: String,
}

impl ScratchDb {
    pub async fn create(admin_url: &str, prefix: &str) -> Result<ScratchDb, tokio_postgres::Error> {
        let name = format!("{prefix}_{}", Uuid::new_v4().simple());
        let admin = postgres_connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) if admin_url.contains("://") => format!("{base}/{name}"),
            _ => format!("{admin_url} dbname={name}"),
        };
        Ok(ScratchDb {
            name,
            url,
            admin_url: admin_url.to_owned(),
        })
    }

    /// Drops the database: first its backends and replication slots (a slot
    /// keeps its database), waiting for readers to let go of them.
    pub async fn drop_all(&self) -> Result<(), tokio_postgres::Error> {
        let admin = postgres_connect(&self.admin_url).await?;
        for _ in 0..50 {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&self.name],
                )
                .await?;
            admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE database = $1 AND NOT active",
                    &[&self.name],
                )
                .await?;
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                    &[&self.name],
                )
                .await?
                .get(0);
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        admin.batch_execute(&drop).await
    }

    /// [`ScratchDb::create`] for synchronous callers (tests, benches).
    pub fn create_blocking(
        admin_url: &str,
        prefix: &str,
    ) -> Result<ScratchDb, tokio_postgres::Error> {
        blocking().block_on(Self::create(admin_url, prefix))
    }

    /// [`ScratchDb::drop_all`] for synchronous callers.
    pub fn drop_blocking(&self) -> Result<(), tokio_postgres::Error> {
        blocking().block_on(self.drop_all())
    }
}

fn blocking() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}
