//! Recovering from lost things: a lost state store rebuilt from Postgres, and
//! input positions whose messages the broker's retention deleted unread.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn input_positions(state: &std::path::Path) -> Vec<(i64, i64)> {
    dump(state, Some("positions"))
        .iter()
        .filter(|p| p["kind"] == "input")
        .map(|p| {
            (
                p["partition"].as_i64().unwrap(),
                p["next_offset"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn feedback_of(db: &Db, campaign: Uuid) -> usize {
    db.feedback().iter().filter(|t| t.1 == campaign).count()
}

/// The disk is lost: `state rebuild` restores the mirror and the sent set from
/// Postgres, the input replays from the start, and no client hears of the
/// same campaign twice, in Postgres or on the push topic.
#[test]
fn a_lost_store_is_rebuilt_without_notifying_anyone_twice() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (r1, r2) = (Uuid::new_v4(), Uuid::new_v4());
    db.new_subscribers(r1, 5);
    db.new_subscribers(r2, 3);
    let (k1, k2) = (Uuid::new_v4(), Uuid::new_v4());

    let mut service = Service::start(&db, &topics, &state, &[]);
    Producer::new().send_action(&topics.input, &live_action(r1, k1));
    wait_for("the first campaign's 5 notifications", WAIT, || {
        (dump(&state, Some("sent")).len() == 5).then_some(())
    });
    assert!(service.stop().success());
    std::fs::remove_dir_all(&state).unwrap();

    let mut rebuild = vec!["state".to_owned(), "rebuild".to_owned()];
    rebuild.extend(Service::settings(&db, &topics, &state));
    let (code, stderr) = run_cli(&rebuild);
    assert_eq!(code, Some(0), "{stderr}");

    let subs: Vec<Value> = dump(&state, Some("subscriptions"))
        .into_iter()
        .filter(|s| s["kind"] == "by_restaurant")
        .collect();
    assert_eq!(subs.len(), 8, "the mirror holds the table's 8 rows");
    let sent: BTreeSet<(String, String)> = dump(&state, Some("sent"))
        .iter()
        .map(|s| {
            (
                s["adv_campaign_id"].as_str().unwrap().to_owned(),
                s["client_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let from_feedback: BTreeSet<(String, String)> = db
        .feedback()
        .iter()
        .map(|(_, k, c)| (k.to_string(), c.to_string()))
        .collect();
    assert_eq!(sent, from_feedback, "the sent set is the feedback table");
    assert_eq!(
        input_positions(&state),
        vec![(0, 0)],
        "input restarts at the oldest retained message"
    );

    // A second rebuild over a store is refused: it would mix two stores.
    let (code, stderr) = run_cli(&rebuild);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is not empty"), "{stderr}");

    service.restart();
    Producer::new().send_action(&topics.input, &live_action(r2, k2));
    wait_for("the second campaign's notifications", WAIT, || {
        (dump(&state, Some("sent")).len() == 8).then_some(())
    });
    wait_for("both input messages to be committed", WAIT, || {
        (input_positions(&state) == vec![(0, 2)]).then_some(())
    });
    assert_eq!(feedback_of(&db, k1), 5);
    assert_eq!(feedback_of(&db, k2), 3);
    let mut push = Reader::new(&topics.output);
    push.until(8, WAIT);
    push.drain(Duration::from_secs(2));
    assert_eq!(
        push.seen.len(),
        8,
        "the replayed campaign was not pushed again"
    );
    assert!(service.stop().success());
}

/// A mock cluster (its partitions keep at most 5 MB, so filling one deletes
/// the oldest messages) with fresh topics, and a service that consumed one
/// action there and stopped at position 1; then the broker deleted unread
/// messages past it. Returns what the tests need.
struct Gap {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    db: Db,
    topics: Topics,
    dir: tempfile::TempDir,
    args: Vec<String>,
    r: Uuid,
    behind_the_gap: Uuid,
    low: i64,
}

fn retention_gap() -> Gap {
    let mock = MockCluster::new(1).unwrap();
    let db = Db::migrated();
    let topics = Topics::on_mock(&mock, 1);
    let dir = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 3);
    let mut args = Service::settings(&db, &topics, dir.path());
    Service::set_flag(&mut args, "--brokers", mock.bootstrap_servers());

    let producer = Producer::on(&mock.bootstrap_servers());
    let mut service = Service::spawn(args.clone(), vec![], dir.path());
    service.wait_ready();
    producer.send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    wait_for("position 1 to be committed", WAIT, || {
        (input_positions(dir.path()) == vec![(0, 1)]).then_some(())
    });
    assert!(service.stop().success());

    // While the service is down, 40 × 200 kB arrive: the partition keeps 5 MB,
    // so the oldest of them are deleted before anyone read them.
    let filler = vec![b'x'; 200_000];
    for _ in 0..40 {
        producer.send(&topics.input, None, &filler, Some(0));
    }
    let behind_the_gap = Uuid::new_v4();
    producer.send_action(&topics.input, &live_action(r, behind_the_gap));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .create()
        .unwrap();
    let (low, _) = consumer
        .fetch_watermarks(&topics.input, 0, Duration::from_secs(10))
        .unwrap();
    assert!(
        low > 1,
        "the broker deleted messages past position 1 (low {low})"
    );
    Gap {
        mock,
        db,
        topics,
        dir,
        args,
        r,
        behind_the_gap,
        low,
    }
}

#[test]
fn a_position_older_than_retention_stops_the_start_by_default() {
    let gap = retention_gap();
    let mut run = vec!["run".to_owned()];
    run.extend(gap.args.clone());
    run.extend(["--metrics-addr".into(), "127.0.0.1:0".to_owned()]);
    let (code, stderr) = run_cli(&run);
    assert_eq!(code, Some(1), "{stderr}");
    let expected = format!(
        "partition 0: the stored position 1 is older than the oldest message the broker still holds ({}); {} messages were deleted",
        gap.low,
        gap.low - 1
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("--position-out-of-range earliest"),
        "{stderr}"
    );
    assert_eq!(
        input_positions(gap.dir.path()),
        vec![(0, 1)],
        "nothing moved"
    );

    // The operator accepts the loss: resume at the oldest retained message.
    let mut args = gap.args.clone();
    args.extend(["--position-out-of-range".into(), "earliest".into()]);
    let mut service = Service::spawn(args, vec![], gap.dir.path());
    wait_for("the action behind the gap to be notified", WAIT, || {
        (feedback_of(&gap.db, gap.behind_the_gap) == 3).then_some(())
    });
    assert_eq!(
        service.metric("promo_fanout_positions_out_of_range_total"),
        1.0
    );
    // Every retained filler message went to the DLQ, none of the deleted ones.
    wait_for("the DLQ count", WAIT, || {
        let dead = service.metric("promo_fanout_messages_invalid_total");
        (dead > 0.0).then_some(dead)
    });
    let end = 1 + 40 + 1;
    wait_for("the end of the partition to be committed", WAIT, || {
        (input_positions(gap.dir.path()) == vec![(0, end)]).then_some(())
    });
    assert_eq!(
        service.metric("promo_fanout_messages_invalid_total"),
        (end - 1 - gap.low) as f64
    );
    assert!(service.stop().success());
    let _ = (&gap.mock, &gap.topics);
}

#[test]
fn latest_skips_to_the_end_of_the_partition() {
    let gap = retention_gap();
    let mut args = gap.args.clone();
    args.extend(["--position-out-of-range".into(), "latest".into()]);
    let mut service = Service::spawn(args, vec![], gap.dir.path());
    service.wait_ready();
    let after = Uuid::new_v4();
    Producer::on(&gap.mock.bootstrap_servers())
        .send_action(&gap.topics.input, &live_action(gap.r, after));
    wait_for("the action sent after the restart", WAIT, || {
        (feedback_of(&gap.db, after) == 3).then_some(())
    });
    assert_eq!(
        feedback_of(&gap.db, gap.behind_the_gap),
        0,
        "latest skipped what was unread"
    );
    assert_eq!(service.metric("promo_fanout_messages_invalid_total"), 0.0);
    assert_eq!(input_positions(gap.dir.path()), vec![(0, 1 + 40 + 1 + 1)]);
    assert!(service.stop().success());
}

/// `promo-fanout state set-position` with `settings`, its output.
fn set_position(settings: &[String], partition: i32, offset: i64) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["state", "set-position"])
        .args(["--partition", &partition.to_string()])
        .args(["--offset", &offset.to_string()])
        .args(settings)
        .output()
        .unwrap()
}

/// `set_position`'s output once it succeeded: its stdout.
fn moved(settings: &[String], partition: i32, offset: i64) -> String {
    let out = set_position(settings, partition, offset);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    String::from_utf8(out.stdout).unwrap()
}

/// An operator's way past a message: with the service stopped, `state
/// set-position` moves the partition's recorded position in Postgres, says
/// what it skips, refuses while a service here holds the store and for a
/// partition the topic does not have. The move holds for whichever instance
/// takes the partition next: the one whose store still has the old position,
/// and one with an empty store.
#[test]
fn set_position_steps_over_a_message_deliberately() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let (first, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r = Uuid::new_v4();
    db.subscribe(r, Uuid::new_v4());
    let settings = Service::settings(&db, &topics, first.path());
    let mut service = Service::start(&db, &topics, first.path(), &[]);
    let p = Producer::new();
    let k: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    p.send_action(&topics.input, &live_action(r, k[0]));
    wait_for("the first action", WAIT, || {
        (input_positions(first.path()) == vec![(0, 1)]).then_some(())
    });
    let held = set_position(&settings, 0, 2);
    assert_eq!(held.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&held.stderr).contains("held by another process"));
    assert!(service.stop().success());
    let missing = set_position(&settings, 5, 2);
    assert_eq!(missing.status.code(), Some(1));
    let said = String::from_utf8_lossy(&missing.stderr);
    let expected = format!("{} has no partition 5 (it has 1)", topics.input);
    assert!(said.contains(&expected), "{said}");

    // Offsets 1 (skipped) and 2; the same instance takes the partition again.
    p.send_action(&topics.input, &live_action(r, k[1]));
    p.send_action(&topics.input, &live_action(r, k[2]));
    let said = moved(&settings, 0, 2);
    let expected = format!(
        "{} partition 0: position 1 -> 2; skips 1 message(s), offsets 1 to 1",
        topics.input
    );
    assert!(said.contains(&expected), "{said}");
    let report = group_report(&settings);
    let row: Vec<&str> = report.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[4]),
        ("0", "set-position", "2"),
        "{report}"
    );
    service.restart();
    wait_for("the action after the skipped one", WAIT, || {
        (input_positions(first.path()) == vec![(0, 3)]).then_some(())
    });
    assert!(service.stop().success());

    // Offsets 3 (skipped) and 4; another instance, its store empty, takes it.
    p.send_action(&topics.input, &live_action(r, k[3]));
    p.send_action(&topics.input, &live_action(r, k[4]));
    moved(&settings, 0, 4);
    let mut args = Service::settings(&db, &topics, other.path());
    Service::set_flag(&mut args, "--instance-id", "elsewhere".into());
    let mut elsewhere = Service::spawn(args, vec![], other.path());
    wait_for("the last action", WAIT, || {
        (feedback_of(&db, k[4]) == 1).then_some(())
    });
    assert!(elsewhere.stop().success());
    assert_eq!(input_positions(other.path()), vec![(0, 5)]);
    let notified: Vec<usize> = k.iter().map(|k| feedback_of(&db, *k)).collect();
    assert_eq!(
        notified,
        [1, 0, 1, 0, 1],
        "the skipped messages are not processed"
    );
}
