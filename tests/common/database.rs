//! Scratch databases on the local Postgres, one per test.

use std::process::Command;

use promo_fanout::infra::scratch_db::ScratchDb;
use uuid::Uuid;

use super::BIN;

pub fn admin_url() -> String {
    std::env::var("PF_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A scratch database, dropped at the end of the test.
pub struct Db {
    scratch: ScratchDb,
}

impl Db {
    pub fn new() -> Db {
        Db {
            scratch: ScratchDb::create_blocking(&admin_url(), "pf_test").unwrap(),
        }
    }

    pub fn name(&self) -> &str {
        &self.scratch.name
    }

    pub fn url(&self) -> &str {
        &self.scratch.url
    }

    /// A database with the project's migrations applied by `promo-fanout migrate`.
    pub fn migrated() -> Db {
        let db = Db::new();
        let out = Command::new(BIN)
            .args(["migrate", "--postgres-url", db.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        db
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(self.url(), postgres::NoTls).unwrap()
    }

    pub fn subscribe(&self, restaurant: Uuid, client: Uuid) -> i64 {
        self.client()
            .query_one(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2) RETURNING id",
                &[&client, &restaurant],
            )
            .unwrap()
            .get(0)
    }

    /// `n` new clients subscribed to `restaurant`, in one statement.
    pub fn new_subscribers(&self, restaurant: Uuid, n: usize) -> Vec<Uuid> {
        let clients: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        self.subscribe_many(restaurant, &clients);
        clients
    }

    /// Subscribes `clients` to `restaurant` in one statement.
    pub fn subscribe_many(&self, restaurant: Uuid, clients: &[Uuid]) {
        self.client()
            .execute(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) SELECT c, $2 FROM unnest($1::uuid[]) c",
                &[&clients, &restaurant],
            )
            .unwrap();
    }

    /// Every feedback row as (restaurant, campaign, client).
    pub fn feedback(&self) -> Vec<(Uuid, Uuid, Uuid)> {
        self.client()
            .query(
                "SELECT restaurant_id, adv_campaign_id, client_id FROM subscribers_feedback ORDER BY 1, 2, 3",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    pub fn feedback_count(&self) -> i64 {
        self.client()
            .query_one("SELECT count(*) FROM subscribers_feedback", &[])
            .unwrap()
            .get(0)
    }

    /// Makes every feedback write fail with a serialization failure
    /// (`40001`, raised by a trigger) until [`Db::end_feedback_outage`],
    /// while the rest of the database, the change feed included, works.
    pub fn stage_feedback_outage(&self) {
        self.client()
            .batch_execute(
                "CREATE TABLE staged_outage (since timestamptz);
                 INSERT INTO staged_outage VALUES (now());
                 CREATE FUNCTION staged_outage() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF EXISTS (SELECT 1 FROM staged_outage) THEN
                     RAISE EXCEPTION 'staged outage' USING ERRCODE = '40001';
                   END IF;
                   RETURN NULL;
                 END $$;
                 CREATE TRIGGER outage BEFORE INSERT ON subscribers_feedback
                   FOR EACH STATEMENT EXECUTE FUNCTION staged_outage();",
            )
            .unwrap();
    }

    pub fn end_feedback_outage(&self) {
        self.client()
            .batch_execute("DELETE FROM staged_outage")
            .unwrap();
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Err(error) = self.scratch.drop_blocking() {
            eprintln!("could not drop {}: {error}", self.scratch.name);
        }
    }
}

impl Db {
    /// The table's rows as (row id, restaurant, client), by id.
    pub fn subscription_rows(&self) -> Vec<(i64, Uuid, Uuid)> {
        self.client()
            .query(
                "SELECT id, restaurant_id, client_id FROM subscribers_restaurants ORDER BY id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// This database's replication slots, by name.
    pub fn slots(&self) -> Vec<String> {
        postgres::Client::connect(&admin_url(), postgres::NoTls)
            .unwrap()
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE database = $1 ORDER BY 1",
                &[&self.name()],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}
