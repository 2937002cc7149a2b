//! Crash safety: the process dies at every step of the delivery order (and by
//! SIGKILL at random instants), restarts, and the sinks must hold every
//! notification: exactly once in Postgres, at least once on the push topic
//! with repeats only from the batches in flight. Needs `--features failpoints`.

#![cfg(feature = "failpoints")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use rand::Rng;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// What the sinks and the store hold after recovery, checked against the
/// expected notifications. Returns every push message read, repeats
/// included, as (restaurant, campaign, client).
fn check_recovered(
    db: &Db,
    topics: &Topics,
    state: &std::path::Path,
    expected: &BTreeSet<(Uuid, Uuid, Uuid)>,
    input_messages: i64,
) -> Vec<(Uuid, Uuid, Uuid)> {
    let deadline = std::time::Instant::now() + WAIT;
    while db.feedback_count() as usize != expected.len() {
        if std::time::Instant::now() > deadline {
            // What a reader of a failed run needs: how far it got, and
            // whether work was still pending in the store.
            let late = dump(state, Some("subscriptions"))
                .iter()
                .filter(|e| e["kind"] == "late")
                .count();
            let campaigns = dump(state, Some("campaigns"));
            panic!(
                "timed out waiting for every feedback row: {} of {}; sent entries {}; \
                 late markers {late}; campaigns {campaigns:?}",
                db.feedback_count(),
                expected.len(),
                dump(state, Some("sent")).len(),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rows: BTreeSet<_> = db.feedback().into_iter().collect();
    assert_eq!(&rows, expected, "Postgres holds exactly the expected rows");

    let mut push = Reader::new(&topics.output);
    push.until(expected.len(), WAIT);
    let positions_done = || {
        let entries = dump(state, Some("positions"));
        let next: i64 = entries
            .iter()
            .filter(|e| e["kind"] == "input")
            .map(|e| e["next_offset"].as_i64().unwrap())
            .sum();
        let sent = dump(state, Some("sent")).len();
        (next == input_messages && sent == expected.len()).then_some(())
    };
    wait_for(
        "positions and sent set to cover everything",
        WAIT,
        positions_done,
    );
    push.drain(Duration::from_secs(1));
    let got = triples(&push.seen);
    let distinct: BTreeSet<_> = got.iter().copied().collect();
    assert_eq!(
        &distinct, expected,
        "every notification reached the push topic"
    );
    got
}

/// The notifications recorded in the store (its sent set), as (restaurant,
/// campaign, client).
fn recorded(state: &std::path::Path) -> BTreeSet<(Uuid, Uuid, Uuid)> {
    let id = |e: &serde_json::Value, f: &str| Uuid::parse_str(e[f].as_str().unwrap()).unwrap();
    dump(state, Some("sent"))
        .iter()
        .map(|e| {
            (
                id(e, "restaurant_id"),
                id(e, "adv_campaign_id"),
                id(e, "client_id"),
            )
        })
        .collect()
}

/// Asserts that nothing recorded before a crash was sent again after it:
/// each appears exactly once on the push topic.
fn assert_recorded_once(
    before_crash: &BTreeSet<(Uuid, Uuid, Uuid)>,
    pushed: &[(Uuid, Uuid, Uuid)],
) {
    for t in before_crash {
        let times = pushed.iter().filter(|p| *p == t).count();
        assert_eq!(
            times, 1,
            "{t:?}, recorded before the crash, was pushed {times} times"
        );
    }
}

/// [`crash_in_pipeline`] with one batch in flight at a time, so that each
/// step of the delivery order is hit by exactly one batch.
fn crash_at(point: &str, spec: &str) -> usize {
    crash_in_pipeline(point, spec, 1, |_| {})
}

/// What the sinks held when the process died.
struct AtCrash {
    feedback_rows: i64,
    pushed: usize,
}

/// Dies at `point` (as the fail point `spec` says), shows `at_crash` what
/// the sinks hold then, restarts without fail points, and checks the sinks:
/// every notification there, Postgres exact, and nothing recorded before the
/// crash pushed again. A fan-out of 30 in chunks of 10 makes three batches,
/// up to `depth` of them delivered at once. Returns the repeats on the push
/// topic.
fn crash_in_pipeline(
    point: &str,
    spec: &str,
    depth: usize,
    at_crash: impl FnOnce(AtCrash),
) -> usize {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    let clients = db.new_subscribers(r, 30);
    let k = Uuid::new_v4();
    let expected: BTreeSet<_> = clients.iter().map(|c| (r, k, *c)).collect();

    let failpoints = format!("{point}={spec}");
    let mut service = Service::start_with_env(
        &db,
        &topics,
        state.path(),
        &["--chunk-size", "10", "--pipeline-depth", &depth.to_string()],
        &[("PROMO_FANOUT_FAILPOINTS", failpoints.as_str())],
    );
    Producer::new().send_action(&topics.input, &live_action(r, k));
    let status = service.wait_exit(WAIT);
    assert!(
        !status.success(),
        "{point}: the process died at the fail point"
    );
    let before_crash = recorded(state.path());
    let mut push = Reader::new(&topics.output);
    push.drain(Duration::from_secs(1));
    at_crash(AtCrash {
        feedback_rows: db.feedback_count(),
        pushed: push.seen.len(),
    });

    service.restart_with_env(&[]);
    let pushed = check_recovered(&db, &topics, state.path(), &expected, 1);
    assert_recorded_once(&before_crash, &pushed);
    let repeats = pushed.len() - expected.len();
    assert!(
        repeats <= 10 * depth,
        "{point}: {repeats} repeats, more than the {depth} batches in flight"
    );
    assert!(service.stop().success());
    repeats
}

#[test]
fn crash_after_validation() {
    assert_eq!(
        crash_at("after-validation", "return"),
        0,
        "nothing was sent before the crash"
    );
}

#[test]
fn crash_after_the_postgres_write() {
    // Postgres had the first chunk in a transaction not yet committed, Kafka
    // had not been asked yet: the rows died with the process, and after the
    // restart each client is in Postgres and on the push topic once.
    let repeats = crash_in_pipeline("after-postgres", "return", 1, |sinks| {
        assert_eq!(
            sinks.feedback_rows, 0,
            "the uncommitted rows were rolled back"
        );
        assert_eq!(sinks.pushed, 0, "Kafka had none of it");
    });
    assert_eq!(repeats, 0);
}

#[test]
fn crash_after_both_sinks() {
    // Kafka had the first chunk, Postgres's transaction was still open: it is
    // pushed again, exactly once more, and written once.
    let repeats = crash_in_pipeline("after-sinks", "return", 1, |sinks| {
        assert_eq!((sinks.feedback_rows, sinks.pushed), (0, 10));
    });
    assert_eq!(repeats, 10);
}

#[test]
fn crash_between_the_postgres_and_the_store_commits() {
    // Postgres committed the first chunk with its partition's state; the
    // store did not. The restart finds the store behind Postgres, restores
    // the partition from Postgres (its campaign, the sent set from the
    // feedback rows) and repeats nobody.
    let repeats = crash_in_pipeline("after-postgres-commit", "return", 1, |sinks| {
        assert_eq!((sinks.feedback_rows, sinks.pushed), (10, 10));
    });
    assert_eq!(repeats, 0, "the restored sent set stopped every repeat");
}

#[test]
fn crash_after_the_store_commit() {
    assert_eq!(
        crash_at("after-store-commit", "return"),
        0,
        "a committed batch is never repeated"
    );
}

#[test]
fn crash_after_the_offset_commit() {
    assert_eq!(crash_at("after-offset-commit", "return"), 0);
}

#[test]
fn crash_mid_way_through_a_large_fan_out() {
    // The second chunk dies after both sinks: the first stays committed, the
    // second is repeated once, the third is sent after the restart.
    assert_eq!(crash_at("after-sinks", "1*off->return"), 10);
}

#[test]
fn crash_after_both_sinks_with_batches_in_flight() {
    // The first batch dies after both sinks; the two behind it may have been
    // delivered too. None was recorded, so all are replayed: nothing lost,
    // Postgres exact, the push topic repeats at most the three.
    let repeats = crash_in_pipeline("after-sinks", "return", 3, |_| {});
    assert!(
        repeats >= 10,
        "the first batch was delivered before the crash"
    );
}

#[test]
fn crash_after_a_store_commit_with_batches_in_flight() {
    // The first batch is recorded; the ones behind it, delivered or not, are
    // not, and are replayed: never the recorded one.
    let repeats = crash_in_pipeline("after-store-commit", "return", 3, |_| {});
    assert!(
        repeats <= 20,
        "{repeats} repeats: the recorded batch was repeated"
    );
}

#[test]
fn crash_after_the_postgres_write_with_batches_in_flight() {
    crash_in_pipeline("after-postgres", "return", 3, |_| {});
}

/// A campaign Postgres refuses (a CHECK constraint on its content) beside one
/// it accepts, in one batch; the process dies after the refused one's dead
/// letter is written and before the batch is recorded. After the restart the
/// refused campaign is in the DLQ (the replay may write it again), the other
/// is delivered to both sinks, and the refused one reached no sink.
#[test]
fn crash_after_a_refused_campaign_is_dead_lettered() {
    let db = Db::migrated();
    db.client()
        .batch_execute(
            "ALTER TABLE subscribers_feedback ADD CONSTRAINT no_forbidden_offer \
             CHECK (adv_campaign_content <> 'forbidden offer')",
        )
        .unwrap();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (good, bad) = (Uuid::new_v4(), Uuid::new_v4());
    let good_clients = db.new_subscribers(good, 5);
    db.new_subscribers(bad, 5);
    let (k_good, k_bad) = (Uuid::new_v4(), Uuid::new_v4());
    // Sent once the service is ready, so that it cannot die before the test
    // has seen it ready.
    let mut service = Service::start_with_env(
        &db,
        &topics,
        state.path(),
        &[],
        &[("PROMO_FANOUT_FAILPOINTS", "after-refusals=return")],
    );
    let producer = Producer::new();
    let mut refused = live_action(bad, k_bad);
    refused["adv_campaign_content"] = "forbidden offer".into();
    producer.send_actions(&topics.input, &[refused, live_action(good, k_good)]);
    assert!(!service.wait_exit(WAIT).success());
    let mut dlq = Reader::new(&topics.dlq);
    dlq.until(1, WAIT);
    assert!(recorded(state.path()).is_empty(), "nothing recorded yet");

    service.restart_with_env(&[]);
    let expected: BTreeSet<_> = good_clients.iter().map(|c| (good, k_good, *c)).collect();
    let pushed = check_recovered(&db, &topics, state.path(), &expected, 2);
    assert!(
        pushed.iter().all(|t| t.1 == k_good),
        "no push for the refused campaign"
    );
    dlq.drain(Duration::from_secs(1));
    assert!(!dlq.seen.is_empty());
    for letter in &dlq.seen {
        assert_eq!(letter.json()["adv_campaign_id"], k_bad.to_string());
        assert!(
            letter.headers["error"].contains("no_forbidden_offer"),
            "{:?}",
            letter.headers
        );
        assert_eq!(letter.headers["source_offset"], "0");
    }
    let campaigns = dump(state.path(), Some("campaigns"));
    assert!(
        campaigns
            .iter()
            .all(|c| c["adv_campaign_id"] != k_bad.to_string()),
        "the refused campaign is not kept: {campaigns:?}"
    );
    assert!(service.stop().success());
}

/// A service in `cdc` mode that has fanned out a live campaign (restaurant,
/// campaign) to its three subscribers (returned), then stopped.
fn fanned_out_under_cdc(
    db: &Db,
    topics: &Topics,
    state: &std::path::Path,
) -> (Service, Uuid, Uuid, Vec<Uuid>) {
    let r = Uuid::new_v4();
    let first = db.new_subscribers(r, 3);
    let mut service = Service::start(db, topics, state, &["--mirror-mode", "cdc"]);
    let k = Uuid::new_v4();
    Producer::new().send_action(&topics.input, &live_action(r, k));
    wait_for("the campaign's fan-out", WAIT, || {
        (db.feedback_count() == 3).then_some(())
    });
    assert!(service.stop().success());
    (service, r, k, first)
}

/// The process dies after the first part of a transaction too large to
/// apply at once is in the mirror (written before the transaction's end
/// LSN). After the restart the whole transaction is applied once: the mirror
/// equals the table, and each of its subscribers, late for a live campaign,
/// is notified exactly once in Postgres.
#[test]
fn crash_between_the_parts_of_a_large_transaction() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (mut service, r, k, _) = fanned_out_under_cdc(&db, &topics, state.path());
    service.restart_with_env(&[("PROMO_FANOUT_FAILPOINTS", "cdc-after-apply=return")]);
    db.client()
        .execute(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
             SELECT gen_random_uuid(), $1 FROM generate_series(1, 12000)",
            &[&r],
        )
        .unwrap();
    assert!(
        !service.wait_exit(WAIT).success(),
        "died after the first part"
    );
    let mirrored = mirror_rows(state.path()).len();
    assert!(
        mirrored > 3 && mirrored < 12_003,
        "a part of the transaction is in the mirror: {mirrored} rows"
    );

    service.restart_with_env(&[]);
    assert_eq!(service.metric("promo_fanout_mirror_snapshots_total"), 0.0);
    let expected: BTreeSet<_> = db
        .subscription_rows()
        .into_iter()
        .map(|(_, r, c)| (r, k, c))
        .collect();
    assert_eq!(expected.len(), 12_003);
    check_recovered(&db, &topics, state.path(), &expected, 1);
    assert_eq!(mirror_rows(state.path()), db.subscription_rows());
    assert!(service.stop().success());
}

/// SIGKILL at random instants while tens of thousands of notifications fan
/// out and clients keep subscribing to restaurants whose campaigns are
/// under way; every restart resumes. 0 lost anywhere, 0 repeated in
/// Postgres.
///
/// CI-sized by default (8 kills); `scripts/soak.sh` runs it larger through
/// `PF_SOAK_KILLS`, `PF_SOAK_RESTAURANTS` (per wave) and `PF_SOAK_SUBSCRIBERS`
/// (per restaurant). Whenever everything sent so far has been delivered, a
/// new wave of actions is sent, so every kill lands during a fan-out.
#[test]
fn kill_9_at_random_instants_loses_nothing() {
    let target_kills = env_or("PF_SOAK_KILLS", 8);
    let per_wave = env_or("PF_SOAK_RESTAURANTS", 10);
    let subscribers = env_or("PF_SOAK_SUBSCRIBERS", 1000);
    let chunk = 500;
    let db = Db::migrated();
    let topics = Topics::new(4);
    let state = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    let mut expected = BTreeSet::new();
    let mut actions = 0i64;
    let producer = Producer::new();
    // Clients who subscribe once their restaurant's campaign is under way:
    // late subscribers, or reached by the fan-out itself, once either way.
    const LATE: usize = 5;
    let mut wave = |expected: &mut BTreeSet<(Uuid, Uuid, Uuid)>| {
        let mut sent = Vec::new();
        for _ in 0..per_wave {
            let r = Uuid::new_v4();
            let clients = db.new_subscribers(r, subscribers);
            let k = Uuid::new_v4();
            expected.extend(clients.iter().map(|c| (r, k, *c)));
            producer.send_action(&topics.input, &live_action(r, k));
            actions += 1;
            sent.push((r, k));
        }
        for (r, k) in sent {
            let late = db.new_subscribers(r, LATE);
            expected.extend(late.iter().map(|c| (r, k, *c)));
        }
    };
    let chunk_flag = chunk.to_string();
    let mut service = Service::start(&db, &topics, state.path(), &["--chunk-size", &chunk_flag]);
    wave(&mut expected);
    wave(&mut expected);
    let started = std::time::Instant::now();
    let mut kills = 0;
    while kills < target_kills {
        if db.feedback_count() as usize >= expected.len() {
            wave(&mut expected);
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..600)));
        service.kill();
        kills += 1;
        service.restart();
    }
    let actions = actions;
    let repeats =
        check_recovered(&db, &topics, state.path(), &expected, actions).len() - expected.len();
    eprintln!(
        "kill -9 soak: {kills} kills in {:.0} s, {actions} actions, {} notifications, \
         0 lost, 0 repeated in Postgres, {repeats} repeated on the push topic",
        started.elapsed().as_secs_f64(),
        expected.len()
    );
    // At most the default pipeline depth (3) of chunks in flight per kill.
    assert!(
        repeats <= kills * chunk * 3,
        "repeats only from batches in flight"
    );
    let by_campaign: BTreeMap<Uuid, usize> =
        db.feedback().iter().fold(BTreeMap::new(), |mut m, t| {
            *m.entry(t.1).or_default() += 1;
            m
        });
    assert!(by_campaign.values().all(|n| *n == subscribers + LATE));
}

/// The mirror's own crash points: killed between two batches of the first
/// snapshot, the restart completes the snapshot; killed between a change-feed
/// batch's store commit and the slot's advance, the restart neither loses nor
/// re-applies anything, and takes no new snapshot.
#[test]
fn crash_during_the_mirror_snapshot() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        db.new_subscribers(Uuid::new_v4(), 10_000);
    }
    let mut args = Service::settings(&db, &topics, state.path());
    args.extend(["--mirror-mode".into(), "cdc".into()]);
    let mut service = Service::spawn(
        args,
        vec![(
            "PROMO_FANOUT_FAILPOINTS".into(),
            "mirror-snapshot-batch=return".into(),
        )],
        state.path(),
    );
    assert!(!service.wait_exit(WAIT).success());
    let partial = mirror_rows(state.path()).len();
    assert!(
        partial > 0 && partial < 30_000,
        "died mid-snapshot ({partial} rows)"
    );
    assert_eq!(
        mirror_position(state.path()).unwrap()["snapshot_complete"],
        false
    );

    service.restart_with_env(&[]);
    assert_eq!(mirror_rows(state.path()), db.subscription_rows());
    assert_eq!(
        mirror_position(state.path()).unwrap()["snapshot_complete"],
        true
    );
    // The feed follows from there.
    db.new_subscribers(Uuid::new_v4(), 5);
    wait_for("the mirror to follow the table", WAIT, || {
        (mirror_rows(state.path()) == db.subscription_rows()).then_some(())
    });
    assert!(service.stop().success());
}

#[test]
fn crash_between_the_mirror_commit_and_the_slot_advance() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (mut service, r, k, first) = fanned_out_under_cdc(&db, &topics, state.path());
    service.restart_with_env(&[("PROMO_FANOUT_FAILPOINTS", "cdc-after-apply=return")]);
    let late = db.new_subscribers(r, 2);
    assert!(
        !service.wait_exit(WAIT).success(),
        "died after the mirror commit"
    );
    // The store has the rows (and the late markers); the slot was not moved.
    assert_eq!(mirror_rows(state.path()), db.subscription_rows());

    service.restart_with_env(&[]);
    assert_eq!(service.metric("promo_fanout_mirror_snapshots_total"), 0.0);
    let mut expected: BTreeSet<_> = first.iter().map(|c| (r, k, *c)).collect();
    expected.extend(late.iter().map(|c| (r, k, *c)));
    wait_for("the late subscribers' notifications", WAIT, || {
        (db.feedback_count() == 5).then_some(())
    });
    assert_eq!(db.feedback().into_iter().collect::<BTreeSet<_>>(), expected);
    wait_for("every late marker to be handled", WAIT, || {
        dump(state.path(), Some("subscriptions"))
            .iter()
            .all(|e| e["kind"] != "late")
            .then_some(())
    });
    assert_eq!(mirror_rows(state.path()), db.subscription_rows());
    assert!(service.stop().success());
}
