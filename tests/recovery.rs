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

/// An operator's way past a message: with the service stopped, `state
/// set-position` moves the partition's recorded position in Postgres, says
/// what it skips, refuses while a service here holds the store and for a
/// partition the topic does not have. The move holds for whichever instance
/// takes the partition next: one with an empty store, and the one whose
/// store still has the old position.
#[test]
fn set_position_steps_over_a_message_deliberately() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let (first, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (r, client) = (Uuid::new_v4(), Uuid::new_v4());
    db.subscribe(r, client);
    let settings = Service::settings(&db, &topics, first.path());
    let set_position = |partition: &str, offset: &str| {
        let mut args: Vec<String> = ["state", "set-position", "--partition", partition]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--offset".into(), offset.into()]);
        args.extend(settings.iter().cloned());
        std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap()
    };

    let mut service = Service::start(&db, &topics, first.path(), &[]);
    let p = Producer::new();
    let (k_first, k_skipped, k_after, k_last) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    p.send_action(&topics.input, &live_action(r, k_first));
    wait_for("the first action", WAIT, || {
        (input_positions(first.path()) == vec![(0, 1)]).then_some(())
    });
    let held = set_position("0", "2");
    assert_eq!(held.status.code(), Some(1));
    let said = String::from_utf8_lossy(&held.stderr);
    assert!(said.contains("held by another process"), "{said}");
    assert!(service.stop().success());

    let missing = set_position("5", "2");
    assert_eq!(missing.status.code(), Some(1));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains(&format!("{} has no partition 5 (it has 1)", topics.input)),
        "{said}"
    );

    p.send_action(&topics.input, &live_action(r, k_skipped));
    p.send_action(&topics.input, &live_action(r, k_after));
    let moved = set_position("0", "2");
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let said = String::from_utf8_lossy(&moved.stdout);
    assert!(
        said.contains(&format!(
            "{} partition 0: position 1 -> 2; skips 1 message(s), offsets 1 to 1",
            topics.input
        )),
        "{said}"
    );
    let report = group_report(&settings);
    assert!(
        report.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first() == Some(&"0")
                && cols.get(1) == Some(&"set-position")
                && cols.last() == Some(&"2")
        }),
        "{report}"
    );

    // Another instance, with an empty store, takes the partition.
    let mut args = Service::settings(&db, &topics, other.path());
    Service::set_flag(&mut args, "--instance-id", "elsewhere".into());
    let mut elsewhere = Service::spawn(args, vec![], other.path());
    wait_for("the action after the skipped one", WAIT, || {
        (feedback_of(&db, k_after) == 1).then_some(())
    });
    assert!(elsewhere.stop().success());
    // The first instance, whose store still says 1, takes it back.
    service.restart();
    p.send_action(&topics.input, &live_action(r, k_last));
    wait_for("the last action", WAIT, || {
        (feedback_of(&db, k_last) == 1).then_some(())
    });
    assert_eq!(input_positions(first.path()), vec![(0, 4)]);
    assert_eq!(feedback_of(&db, k_first), 1);
    assert_eq!(feedback_of(&db, k_after), 1);
    assert_eq!(
        feedback_of(&db, k_skipped),
        0,
        "the skipped message is not processed"
    );
    assert!(service.stop().success());
}
