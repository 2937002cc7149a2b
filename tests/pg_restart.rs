//! The local Postgres restarted under a running service (its own test
//! binary: cargo runs test binaries one at a time, so no other test sees the
//! restart). `PF_TEST_PG_RESTART` is the restart command; scripts/test.sh sets
//! it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

#[test]
fn a_postgres_restart_mid_stream_is_ridden_out() {
    let restart = std::env::var("PF_TEST_PG_RESTART")
        .expect("PF_TEST_PG_RESTART is not set: run the suite with scripts/test.sh, which sets it");
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 20);
    let mut service = Service::start(&db, &topics, state.path(), &["--mirror-mode", "cdc"]);
    db.new_subscribers(r, 10);
    wait_for("the mirror to follow", WAIT, || {
        (mirror_rows(state.path()) == db.subscription_rows()).then_some(())
    });

    let status = Command::new("sh").args(["-c", &restart]).status().unwrap();
    assert!(status.success(), "{restart} failed");
    wait_for("Postgres to accept connections again", WAIT, || {
        postgres::Client::connect(db.url(), postgres::NoTls).ok()
    });
    // Changes after the restart reach the mirror; an action reaches both sinks.
    let after = db.new_subscribers(r, 5);
    wait_for("the mirror to follow after the restart", WAIT, || {
        (mirror_rows(state.path()) == db.subscription_rows()).then_some(())
    });
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "the service kept running"
    );
    let k = Uuid::new_v4();
    Producer::new().send_action(&topics.input, &live_action(r, k));
    wait_for("every subscriber's notification", WAIT, || {
        (db.feedback_count() == 35).then_some(())
    });
    assert!(db.feedback().contains(&(r, k, after[0])));
    // The first snapshot only: the restart was ridden out on the stream.
    assert_eq!(service.metric("promo_fanout_mirror_snapshots_total"), 1.0);
    assert_eq!(service.metric("promo_fanout_mirror_resnapshots_total"), 0.0);
    service.wait_ready();
    assert!(service.stop().success());
}
