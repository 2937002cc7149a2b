//! The live mirror (`mirror-mode = cdc`): Postgres logical replication into
//! the state store, on the real local Postgres (wal_level=logical, set up by
//! scripts/test.sh). What is checked is what an operator would look at: the
//! mirror in `state dump` against the table, the slot in
//! `pg_replication_slots`, the rows in `subscribers_feedback`, the metrics.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rand::Rng;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn start_cdc(db: &Db, topics: &Topics, state: &std::path::Path) -> Service {
    Service::start(db, topics, state, &["--mirror-mode", "cdc"])
}

fn wait_mirror_equals_table(db: &Db, state: &std::path::Path) {
    let mut last = (Vec::new(), Vec::new());
    let done = (0..600).any(|_| {
        last = (mirror_rows(state), db.subscription_rows());
        if last.0 == last.1 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
        false
    });
    assert!(
        done,
        "the mirror never matched the table: {} mirrored rows, {} in the table",
        last.0.len(),
        last.1.len()
    );
}

/// The slot `run` names after the group and the instance.
fn slot_of(topics: &Topics) -> String {
    format!("promo_fanout_{}_{INSTANCE}", topics.group)
}

fn slot_confirmed(db: &Db) -> String {
    postgres::Client::connect(&admin_url(), postgres::NoTls)
        .unwrap()
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE database = $1",
            &[&db.name()],
        )
        .unwrap()
        .get(0)
}

/// Postgres and the push topic hold exactly the `expected` notifications,
/// each once.
fn assert_each_notified_once(db: &Db, topics: &Topics, expected: &BTreeSet<(Uuid, Uuid, Uuid)>) {
    let rows: BTreeSet<_> = db.feedback().into_iter().collect();
    assert_eq!(&rows, expected);
    let mut push = Reader::new(&topics.output);
    push.exactly(
        expected.len(),
        WAIT,
        "each notification once on the push topic",
    );
    let on_topic: BTreeSet<_> = triples(&push.seen).into_iter().collect();
    assert_eq!(&on_topic, expected);
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[test]
fn a_random_workload_leaves_the_mirror_equal_to_the_table() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let restaurants: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let clients: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for r in &restaurants {
        db.subscribe_many(*r, &clients[..10]);
    }
    let mut service = start_cdc(&db, &topics, state.path());
    assert_eq!(
        mirror_position(state.path()).unwrap()["mode"],
        "cdc",
        "the server allows the change feed"
    );

    let mut rng = rand::rng();
    let mut pg = db.client();
    let mut truncates = 0;
    for step in 0..400 {
        let r = restaurants[rng.random_range(0..restaurants.len())];
        let c = clients[rng.random_range(0..clients.len())];
        match rng.random_range(0..100) {
            // Inserts, the same pair again as often as not.
            0..=44 => {
                db.subscribe(r, c);
            }
            // Several changes in one transaction.
            45..=54 => {
                let mut tx = pg.transaction().unwrap();
                tx.execute(
                    "INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2), ($1, $2)",
                    &[&c, &r],
                )
                .unwrap();
                tx.execute(
                    "DELETE FROM subscribers_restaurants WHERE id = (SELECT min(id) FROM subscribers_restaurants)",
                    &[],
                )
                .unwrap();
                tx.commit().unwrap();
            }
            55..=84 => {
                pg.execute(
                    "DELETE FROM subscribers_restaurants WHERE id = \
                     (SELECT id FROM subscribers_restaurants ORDER BY random() LIMIT 1)",
                    &[],
                )
                .unwrap();
            }
            // Updates: a row moves to another client.
            85..=97 => {
                pg.execute(
                    "UPDATE subscribers_restaurants SET client_id = $1 WHERE id = \
                     (SELECT id FROM subscribers_restaurants ORDER BY random() LIMIT 1)",
                    &[&c],
                )
                .unwrap();
            }
            _ => {
                pg.batch_execute("TRUNCATE subscribers_restaurants")
                    .unwrap();
                truncates += 1;
            }
        }
        if step == 200 && truncates == 0 {
            pg.batch_execute("TRUNCATE subscribers_restaurants")
                .unwrap();
            truncates += 1;
        }
    }
    wait_mirror_equals_table(&db, state.path());
    assert!(truncates > 0);
    assert_eq!(service.metric("promo_fanout_mirror_snapshots_total"), 1.0);
    // Postgres 15 skips transactions that changed nothing (a delete of no
    // row): count what was applied, and its freshness, one for one.
    let applied = service.metric("promo_fanout_mirror_transactions_total");
    assert!(applied >= 200.0, "{applied} transactions applied");
    assert_eq!(
        service.metric("promo_fanout_mirror_freshness_seconds_count"),
        applied,
        "every applied transaction's freshness is measured"
    );
    assert_eq!(db.slots(), vec![slot_of(&topics)]);
    // `promo-fanout group` lists the slot, in use, and who holds the input.
    let report = group_report(&Service::settings(&db, &topics, state.path()));
    let slot = report
        .lines()
        .find(|l| l.starts_with(&slot_of(&topics)))
        .unwrap_or_else(|| panic!("the slot is listed: {report}"));
    assert_eq!(slot.split_whitespace().nth(1), Some("true"), "{report}");
    let partition = report
        .lines()
        .find(|l| l.starts_with("0 "))
        .unwrap_or_else(|| panic!("partition 0 is listed: {report}"));
    assert_eq!(partition.split_whitespace().nth(1), Some(INSTANCE));
    assert!(service.stop().success());
}

#[test]
fn a_restart_resumes_the_feed_without_a_new_snapshot() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 50);
    let mut service = start_cdc(&db, &topics, state.path());
    db.new_subscribers(r, 20);
    wait_mirror_equals_table(&db, state.path());

    service.kill();
    // While the service is down, the table changes.
    db.new_subscribers(r, 30);
    db.client()
        .execute("DELETE FROM subscribers_restaurants WHERE id % 3 = 0", &[])
        .unwrap();
    service.restart();
    wait_mirror_equals_table(&db, state.path());
    assert_eq!(
        service.metric("promo_fanout_mirror_snapshots_total"),
        0.0,
        "the restart resumed the stream"
    );
    assert_eq!(service.metric("promo_fanout_mirror_resnapshots_total"), 0.0);
    // The slot is confirmed up to what the store holds.
    let stored = mirror_position(state.path()).unwrap()["lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("the slot to be confirmed up to the mirror", WAIT, || {
        (lsn(&slot_confirmed(&db)) >= lsn(&stored)).then_some(())
    });
    assert!(service.stop().success());
}

#[test]
fn a_late_subscriber_is_notified_once_and_an_unsubscribed_one_nothing_new() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    let (a, b, c, late) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    db.subscribe_many(r, &[a, b, c]);
    let mut service = start_cdc(&db, &topics, state.path());

    let k1 = Uuid::new_v4();
    Producer::new().send_action(&topics.input, &live_action(r, k1));
    wait_for("the campaign's fan-out", WAIT, || {
        (db.feedback_count() == 3).then_some(())
    });
    let c_row: i64 = db
        .client()
        .query_one(
            "SELECT id FROM subscribers_restaurants WHERE client_id = $1",
            &[&c],
        )
        .unwrap()
        .get(0);

    // A client favourites the restaurant while the campaign runs.
    db.subscribe(r, late);
    wait_for("the late subscriber's notification", WAIT, || {
        db.feedback().contains(&(r, k1, late)).then_some(())
    });
    // The same pair again, in a second row: nothing new.
    db.subscribe(r, late);
    wait_for("the second marker to be handled", WAIT, || {
        let rows = mirror_rows(state.path());
        let markers = dump(state.path(), Some("subscriptions"))
            .iter()
            .filter(|e| e["kind"] == "late")
            .count();
        (rows.iter().filter(|x| x.2 == late).count() == 2 && markers == 0).then_some(())
    });
    assert_eq!(service.metric("promo_fanout_late_notifications_total"), 1.0);

    // Client c unsubscribes; the next campaign does not reach them.
    db.client()
        .execute(
            "DELETE FROM subscribers_restaurants WHERE id = $1",
            &[&c_row],
        )
        .unwrap();
    wait_for("the mirror to drop the row", WAIT, || {
        (!mirror_rows(state.path()).iter().any(|x| x.0 == c_row)).then_some(())
    });
    let k2 = Uuid::new_v4();
    Producer::new().send_action(&topics.input, &live_action(r, k2));
    wait_for("the second campaign's fan-out", WAIT, || {
        (db.feedback().iter().filter(|t| t.1 == k2).count() == 3).then_some(())
    });

    let expected: BTreeSet<_> = [
        (r, k1, a),
        (r, k1, b),
        (r, k1, c),
        (r, k1, late),
        (r, k2, a),
        (r, k2, b),
        (r, k2, late),
    ]
    .into_iter()
    .collect();
    assert_each_notified_once(&db, &topics, &expected);
    assert!(service.stop().success());
}

#[test]
fn a_lost_slot_is_replaced_by_a_fresh_snapshot() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 10);
    let mut service = start_cdc(&db, &topics, state.path());
    assert!(service.stop().success());

    // An operator (or max_slot_wal_keep_size) removes the slot meanwhile.
    let slot = slot_of(&topics);
    db.client()
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .unwrap();
    db.new_subscribers(r, 5);
    service.restart();
    assert_eq!(service.metric("promo_fanout_mirror_resnapshots_total"), 1.0);
    assert_eq!(service.metric("promo_fanout_mirror_snapshots_total"), 1.0);
    wait_mirror_equals_table(&db, state.path());
    assert_eq!(db.slots(), vec![slot]);
    assert!(service.stop().success());
}

#[test]
fn an_idle_table_does_not_pin_wal() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let mut service = start_cdc(&db, &topics, state.path());
    let before = lsn(&slot_confirmed(&db));
    // Other tables write WAL; ours stays idle.
    let mut pg = db.client();
    pg.batch_execute(
        "CREATE TABLE unrelated AS SELECT g AS n, md5(g::text) AS s FROM generate_series(1, 20000) g",
    )
    .unwrap();
    let written: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    assert!(lsn(&written) > before);
    wait_for("the slot to move past the unrelated writes", WAIT, || {
        (lsn(&slot_confirmed(&db)) >= lsn(&written)).then_some(())
    });
    let stored = mirror_position(state.path()).unwrap()["lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(lsn(&stored) >= lsn(&written), "the store moved first");
    assert!(service.stop().success());
}

/// The slot's exported snapshot hands over to its stream exactly. The slot
/// is lost while the service is down, so the restart loads a large snapshot
/// through a new slot; a writer adds subscribers of a restaurant whose
/// campaign has been fanned out all the while. Afterwards both of the
/// mirror's indexes hold each row of the table once, and every subscriber
/// (before, during and after the snapshot) is notified once.
#[test]
fn the_snapshot_hands_over_to_the_stream_exactly() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    let first = db.new_subscribers(r, 5);
    let mut service = start_cdc(&db, &topics, state.path());
    let k = Uuid::new_v4();
    Producer::new().send_action(&topics.input, &live_action(r, k));
    wait_for("the campaign's fan-out", WAIT, || {
        (db.feedback_count() == 5).then_some(())
    });
    assert!(service.stop().success());

    let rows = env_or("PF_TEST_SNAPSHOT_ROWS", 300_000);
    db.client()
        .execute(
            "INSERT INTO subscribers_restaurants (restaurant_id, client_id) \
             SELECT gen_random_uuid(), gen_random_uuid() FROM generate_series(1, $1::int)",
            &[&(rows as i32)],
        )
        .unwrap();
    let slot = slot_of(&topics);
    db.client()
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, written, url) = (stop.clone(), written.clone(), db.url().to_owned());
        std::thread::spawn(move || {
            let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let mut clients = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let c = Uuid::new_v4();
                pg.execute(
                    "INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)",
                    &[&c, &r],
                )
                .unwrap();
                clients.push(c);
                written.fetch_add(1, Ordering::Relaxed);
            }
            clients
        })
    };
    let at_least = |n: usize| {
        wait_for("the writer", WAIT, || {
            (written.load(Ordering::Relaxed) >= n).then_some(())
        })
    };
    at_least(20);
    service.restart();
    let during = written.load(Ordering::Relaxed);
    at_least(during + 50);
    stop.store(true, Ordering::Relaxed);
    let late = writer.join().unwrap();
    eprintln!(
        "{} subscribers added, {during} by the time the mirror was ready",
        late.len()
    );

    assert_eq!(service.metric("promo_fanout_mirror_resnapshots_total"), 1.0);
    wait_mirror_equals_table(&db, state.path());
    assert_eq!(
        mirror_index(state.path(), "by_restaurant"),
        db.subscription_rows()
    );
    let expected: BTreeSet<_> = first.iter().chain(&late).map(|c| (r, k, *c)).collect();
    wait_for("every late subscriber's notification", WAIT, || {
        (db.feedback_count() as usize >= expected.len()).then_some(())
    });
    assert_each_notified_once(&db, &topics, &expected);
    assert!(service.stop().success());
}

/// A transaction held open while the feed is idle and other tables write
/// WAL: the slot moves past its changes (nothing of ours is under way, and a
/// keepalive's position covers only what committed before it), and when it
/// commits it is applied all the same.
#[test]
fn a_transaction_held_open_while_the_slot_moves_is_applied_when_it_commits() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let mut service = Service::start(
        &db,
        &topics,
        state.path(),
        &["--mirror-mode", "cdc", "--cdc-status-interval", "1s"],
    );
    let mut held = db.client();
    let mut txn = held.transaction().unwrap();
    let (r, c) = (Uuid::new_v4(), Uuid::new_v4());
    txn.execute(
        "INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)",
        &[&c, &r],
    )
    .unwrap();
    let mut pg = db.client();
    pg.batch_execute("CREATE TABLE unrelated AS SELECT g AS n FROM generate_series(1, 20000) g")
        .unwrap();
    let written: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    wait_for("the slot to move past the open transaction", WAIT, || {
        (lsn(&slot_confirmed(&db)) >= lsn(&written)).then_some(())
    });
    let stored = mirror_position(state.path()).unwrap()["lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(lsn(&stored) >= lsn(&written), "the store moved first");
    assert!(mirror_rows(state.path()).is_empty());

    txn.commit().unwrap();
    wait_mirror_equals_table(&db, state.path());
    assert_eq!(mirror_rows(state.path()).len(), 1);
    assert!(service.stop().success());
}

/// A new `cdc-slot` name: the mirror is loaded through the new slot and the
/// old one is dropped, so that it does not keep WAL for nobody.
#[test]
fn a_renamed_slot_replaces_the_old_one() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    db.new_subscribers(Uuid::new_v4(), 10);
    let mut service = start_cdc(&db, &topics, state.path());
    assert!(service.stop().success());
    assert_eq!(db.slots(), vec![slot_of(&topics)]);

    let renamed = format!("renamed_{}", topics.group);
    let mut service = Service::start(
        &db,
        &topics,
        state.path(),
        &["--mirror-mode", "cdc", "--cdc-slot", &renamed],
    );
    assert_eq!(db.slots(), vec![renamed]);
    assert_eq!(service.metric("promo_fanout_mirror_resnapshots_total"), 1.0);
    wait_mirror_equals_table(&db, state.path());
    assert!(service.stop().success());
}

/// Rows, the sum of their ids and of their clients' first 32 bits: enough to
/// tell two copies of a table apart without printing millions of rows.
type Summary = (i64, i64, i64);

fn table_summary(db: &Db) -> Summary {
    let row = db
        .client()
        .query_one(
            "SELECT count(*), coalesce(sum(id), 0)::int8, \
             coalesce(sum(('x' || substr(client_id::text, 1, 8))::bit(32)::int8), 0)::int8 \
             FROM subscribers_restaurants",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

fn mirror_summary(state: &std::path::Path) -> Summary {
    let scratch = tempfile::tempdir().unwrap();
    let store = promo_fanout_state::Store::open_secondary(state, scratch.path()).unwrap();
    let mut summary = (0, 0, 0);
    for row in store.subscription_rows() {
        let row = row.unwrap();
        let head = u32::from_be_bytes(row.client_id.as_bytes()[..4].try_into().unwrap());
        summary.0 += 1;
        summary.1 += row.row_id;
        summary.2 += i64::from(head);
    }
    summary
}

/// Peak resident memory of a process, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One transaction of 2,000,000 rows (`PF_TEST_BIG_TXN_ROWS`) while the
/// service runs: it is applied in parts as it arrives, the mirror equals
/// the table afterwards, and the service's peak resident memory stays
/// within 256 MB.
#[test]
fn a_huge_transaction_is_applied_in_bounded_memory() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let mut service = start_cdc(&db, &topics, state.path());
    let before = peak_rss_kb(service.child.id());
    let rows = env_or("PF_TEST_BIG_TXN_ROWS", 2_000_000);
    let mut pg = db.client();
    pg.execute(
        "INSERT INTO subscribers_restaurants (restaurant_id, client_id) \
         SELECT gen_random_uuid(), gen_random_uuid() FROM generate_series(1, $1::int)",
        &[&(rows as i32)],
    )
    .unwrap();
    let table = table_summary(&db);
    wait_for(
        "the mirror to equal the table",
        Duration::from_secs(900),
        || (mirror_summary(state.path()) == table).then_some(()),
    );
    let peak = peak_rss_kb(service.child.id());
    eprintln!(
        "{rows} rows in one transaction: the service's peak RSS was {} MB ({} MB before)",
        peak / 1024,
        before / 1024
    );
    assert!(peak <= 256 * 1024, "peak RSS {peak} kB");
    assert!(service.stop().success());
}
