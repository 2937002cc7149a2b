//! The core pipeline end to end, on the real broker and Postgres: every row of
//! SPEC §2, the DLQ, restarts and `state dump`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn u() -> Uuid {
    Uuid::new_v4()
}

/// Waits until the service has consumed `n` input messages in all.
fn consumed(service: &Service, n: usize) {
    wait_for(&format!("{n} input messages consumed"), WAIT, || {
        (service.metric("promo_fanout_messages_consumed_total") >= n as f64).then_some(())
    });
}

#[test]
fn every_case_of_the_semantics() {
    let db = Db::migrated();
    let topics = Topics::new(2);
    let state = tempfile::tempdir().unwrap();

    let (r1, r2, r_empty, r_unknown) = (u(), u(), u(), u());
    let (a, b, c) = (u(), u(), u());
    db.subscribe(r1, a);
    db.subscribe(r1, a); // the same pair in two rows
    db.subscribe(r1, b);
    db.subscribe(r2, a); // one client in two restaurants
    db.subscribe(r2, c);
    let _ = r_empty;

    let mut service = Service::start(&db, &topics, state.path(), &["--expiry-margin", "10m"]);
    let p = Producer::new();
    let now = now();
    let (k_live, k_r2, k_empty, k_unknown, k_expired, k_margin, k_sched) =
        (u(), u(), u(), u(), u(), u(), u());
    let start_at = now + 6;
    p.send_action(&topics.input, &live_action(r1, k_live));
    p.send_action(&topics.input, &live_action(r2, k_r2));
    p.send_action(&topics.input, &live_action(r_empty, k_empty));
    p.send_action(&topics.input, &live_action(r_unknown, k_unknown));
    p.send_action(
        &topics.input,
        &action(r1, k_expired, now - 7200, now - 3600),
    );
    // Ends in 5 minutes: inside the 10-minute margin.
    p.send_action(&topics.input, &action(r1, k_margin, now - 60, now + 300));
    p.send_action(&topics.input, &action(r1, k_sched, start_at, now + 3600));
    // The same campaign again, and once more with new content.
    p.send_action(&topics.input, &live_action(r1, k_live));
    let mut updated = live_action(r1, k_live);
    updated["adv_campaign_content"] = "now two for one".into();
    p.send_action(&topics.input, &updated);
    consumed(&service, 9);

    let mut push = Reader::new(&topics.output);
    let expected_now = {
        let mut v = vec![
            (r1, k_live, a),
            (r1, k_live, b),
            (r2, k_r2, a),
            (r2, k_r2, c),
        ];
        v.sort();
        v
    };
    push.until(4, WAIT);
    push.drain(Duration::from_secs(1));
    // Read after the drain: if the scheduled start is still ahead, nothing
    // read so far can be the scheduled campaign's.
    if common::now() + 1 < start_at {
        // Everything before the scheduled one is in, and it is not yet.
        assert_eq!(
            triples(&push.seen),
            expected_now,
            "before the scheduled start"
        );
    }

    // The scheduled campaign fires once it starts.
    push.until(6, WAIT);
    push.drain(Duration::from_secs(2));
    let mut expected = expected_now.clone();
    expected.extend([(r1, k_sched, a), (r1, k_sched, b)]);
    expected.sort();
    assert_eq!(triples(&push.seen), expected);
    for r in push
        .seen
        .iter()
        .filter(|r| r.json()["adv_campaign_id"] == k_sched.to_string())
    {
        assert!(r.json()["trigger_datetime_created"].as_i64().unwrap() >= start_at);
    }

    // The push message: keyed by client, the spec's fields, integer times.
    let first = push
        .seen
        .iter()
        .find(|r| r.json()["adv_campaign_id"] == k_r2.to_string())
        .unwrap();
    let j = first.json();
    assert_eq!(
        first.key.as_deref(),
        Some(j["client_id"].as_str().unwrap().as_bytes())
    );
    let fields: BTreeSet<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "restaurant_id",
            "adv_campaign_id",
            "adv_campaign_content",
            "adv_campaign_owner",
            "adv_campaign_owner_contact",
            "adv_campaign_datetime_start",
            "adv_campaign_datetime_end",
            "datetime_created",
            "client_id",
            "trigger_datetime_created",
        ])
    );
    assert_eq!(j["adv_campaign_owner"], "Ivan Ivanov");
    assert!(j["adv_campaign_datetime_start"].is_i64() && j["trigger_datetime_created"].is_i64());

    // Postgres: the same set, once each, with the spec's columns.
    assert_eq!(db.feedback(), expected);
    let row = db
        .client()
        .query_one(
            "SELECT adv_campaign_content, adv_campaign_owner_contact, feedback, \
                    extract(epoch FROM adv_campaign_datetime_end)::int8 \
             FROM subscribers_feedback WHERE adv_campaign_id = $1 LIMIT 1",
            &[&k_r2],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), format!("campaign {k_r2}"));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("ivan@example.com")
    );
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert!((row.get::<_, i64>(3) - (now + 3600)).abs() <= 2);

    // The updated action changed the stored campaign, not the recipients.
    let campaigns = dump(state.path(), Some("campaigns"));
    let live = campaigns
        .iter()
        .find(|c| c["adv_campaign_id"] == k_live.to_string())
        .unwrap();
    assert_eq!(live["adv_campaign_content"], "now two for one");
    // Expired and inside-the-margin actions are counted, never stored.
    assert!(campaigns
        .iter()
        .all(|c| c["adv_campaign_id"] != k_expired.to_string()
            && c["adv_campaign_id"] != k_margin.to_string()));
    assert_eq!(service.metric("promo_fanout_actions_expired_total"), 2.0);
    assert!(Reader::new(&topics.dlq)
        .drain(Duration::from_millis(500))
        .is_empty());
    assert!(service.stop().success());
}

#[test]
fn bad_input_goes_to_the_dlq_and_the_partition_keeps_flowing() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (r, client, k) = (u(), u(), u());
    db.subscribe(r, client);
    let mut service = Service::start(&db, &topics, state.path(), &["--max-message-bytes", "2048"]);
    let p = Producer::new();

    let mut bad_uuid = live_action(r, k);
    bad_uuid["adv_campaign_id"] = "12-x".into();
    let mut missing = live_action(r, k);
    missing.as_object_mut().unwrap().remove("restaurant_id");
    let mut mistyped = live_action(r, k);
    mistyped["adv_campaign_datetime_start"] = "tomorrow".into();
    let mut empty = live_action(r, k);
    empty["adv_campaign_content"] = "".into();
    let mut backwards = live_action(r, k);
    backwards["adv_campaign_datetime_start"] = (now() + 7200).into();
    let mut huge = live_action(r, k);
    huge["adv_campaign_content"] = "x".repeat(4096).into();
    // What the decoder used to pass and Postgres refused (a crash loop).
    let with = |field: &str, value: Value| {
        let mut a = live_action(r, k);
        a[field] = value;
        a.to_string().into_bytes()
    };
    let year_5000_bc = -219_950_000_000i64;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe not utf-8".to_vec(), "value: not valid UTF-8"),
        (b"[1,2,3]".to_vec(), "value: expected a JSON object"),
        (b"{\"restaurant_id\": ".to_vec(), "value: not valid JSON"),
        (
            bad_uuid.to_string().into_bytes(),
            "adv_campaign_id: invalid UUID \"12-x\"",
        ),
        (missing.to_string().into_bytes(), "restaurant_id: missing"),
        (
            mistyped.to_string().into_bytes(),
            "adv_campaign_datetime_start: expected an integer",
        ),
        (
            empty.to_string().into_bytes(),
            "adv_campaign_content: must not be empty",
        ),
        (
            backwards.to_string().into_bytes(),
            "adv_campaign_datetime_start:",
        ),
        (huge.to_string().into_bytes(), "value: "),
        (
            with("adv_campaign_content", "free\u{0}coffee".into()),
            "adv_campaign_content: contains U+0000",
        ),
        (
            with("adv_campaign_owner", "\u{0}".into()),
            "adv_campaign_owner: contains U+0000",
        ),
        (
            with("adv_campaign_owner_contact", "a\u{0}".into()),
            "adv_campaign_owner_contact: contains U+0000",
        ),
        (
            with("adv_campaign_datetime_start", year_5000_bc.into()),
            "adv_campaign_datetime_start: -219950000000 is outside the storable range",
        ),
        (
            with("adv_campaign_datetime_end", i64::MAX.into()),
            "adv_campaign_datetime_end: 9223372036854775807 is outside",
        ),
        (
            with("adv_campaign_datetime_end", (1i64 << 62).into()),
            "adv_campaign_datetime_end: 4611686018427387904 is outside",
        ),
        (
            with("datetime_created", year_5000_bc.into()),
            "datetime_created: -219950000000 is outside",
        ),
    ];
    for (i, (bytes, _)) in cases.iter().enumerate() {
        p.send(
            &topics.input,
            Some(format!("key-{i}").as_bytes()),
            bytes,
            Some(0),
        );
    }
    // A good message behind the bad ones, in the same partition.
    p.send(
        &topics.input,
        Some(b"good"),
        live_action(r, k).to_string().as_bytes(),
        Some(0),
    );
    consumed(&service, cases.len() + 1);

    let mut dlq = Reader::new(&topics.dlq);
    dlq.until(cases.len(), WAIT);
    dlq.drain(Duration::from_millis(500));
    assert_eq!(dlq.seen.len(), cases.len());
    let mut by_key: BTreeMap<String, &Record> = BTreeMap::new();
    for rec in &dlq.seen {
        by_key.insert(String::from_utf8(rec.key.clone().unwrap()).unwrap(), rec);
    }
    for (i, (bytes, reason)) in cases.iter().enumerate() {
        let rec = by_key[&format!("key-{i}")];
        assert_eq!(
            rec.value.as_deref(),
            Some(bytes.as_slice()),
            "case {i}: bytes unchanged"
        );
        assert!(
            rec.headers["error"].starts_with(reason),
            "case {i}: {:?} vs {reason:?}",
            rec.headers["error"]
        );
        assert_eq!(rec.headers["source_topic"], topics.input);
        assert_eq!(rec.headers["source_partition"], "0");
        assert_eq!(rec.headers["source_offset"], i.to_string());
    }
    assert!(by_key["key-8"].headers["error"].contains("over the 2048-byte limit"));

    let push = Reader::new(&topics.output).until(1, WAIT).to_vec();
    assert_eq!(triples(&push), vec![(r, k, client)]);
    assert_eq!(db.feedback(), vec![(r, k, client)]);
    assert_eq!(
        service.metric("promo_fanout_messages_invalid_total"),
        cases.len() as f64
    );
    assert!(service.stop().success());
}

#[test]
fn a_restart_resends_nothing_and_new_actions_flow() {
    let db = Db::migrated();
    let topics = Topics::new(2);
    let state = tempfile::tempdir().unwrap();
    let r = u();
    let clients = db.new_subscribers(r, 50);

    let mut service = Service::start(&db, &topics, state.path(), &[]);
    let p = Producer::new();
    let k1 = u();
    p.send_action(&topics.input, &live_action(r, k1));
    consumed(&service, 1);
    let mut push = Reader::new(&topics.output);
    push.until(50, WAIT);

    // While the service runs, the dump shows every table.
    let entries = dump(state.path(), None);
    let count = |t: &str| entries.iter().filter(|e| e["table"] == t).count();
    assert_eq!(count("subscriptions"), 100, "50 rows, each indexed twice");
    assert_eq!(count("campaigns"), 1);
    assert_eq!(count("sent"), 50);
    assert!(entries
        .iter()
        .any(|e| e["table"] == "positions" && e["kind"] == "input"));
    assert!(entries.iter().any(|e| e["table"] == "positions"
        && e["kind"] == "mirror"
        && e["snapshot_complete"] == true));
    assert!(entries
        .iter()
        .any(|e| e["table"] == "meta" && e["key"] == "schema_version"));
    let campaign = entries.iter().find(|e| e["table"] == "campaigns").unwrap();
    assert_eq!(campaign["progress"]["state"], "done");

    let (_, metrics) = service.get("/metrics").unwrap();
    assert!(
        metrics.contains("promo_fanout_consumer_lag{partition=\"0\"}"),
        "lag per partition"
    );
    assert!(
        metrics.contains("promo_fanout_commit_seconds_bucket"),
        "commit latency histogram"
    );
    assert!(service.stop().success(), "SIGTERM exits 0");
    service.restart();
    let k2 = u();
    p.send_action(&topics.input, &live_action(r, k2));
    consumed(&service, 1);
    push.exactly(100, WAIT, "the first campaign was not sent again");
    let mut expected: Vec<_> = clients
        .iter()
        .flat_map(|c| [(r, k1, *c), (r, k2, *c)])
        .collect();
    expected.sort();
    assert_eq!(triples(&push.seen), expected);
    assert_eq!(db.feedback(), expected);
}

/// Feedback rows already in the table (written by the job this service
/// replaces, or by a holder that has since lost its partition) are left as
/// they are: the batch's append refuses them, and the batch is written
/// again, idempotently, around them.
#[test]
fn feedback_rows_already_written_are_left_alone() {
    let db = Db::migrated();
    let topics = Topics::new(2);
    let state = tempfile::tempdir().unwrap();
    let r = u();
    let clients = db.new_subscribers(r, 50);
    let k = u();
    let action = live_action(r, k);
    let already = &clients[..5];
    db.client()
        .execute(
            "INSERT INTO subscribers_feedback (restaurant_id, adv_campaign_id, \
             adv_campaign_content, adv_campaign_datetime_start, adv_campaign_datetime_end, \
             datetime_created, client_id, trigger_datetime_created, feedback) \
             SELECT $1, $2, 'written before', now(), now(), now(), c, now(), 'liked' \
             FROM unnest($3::uuid[]) c",
            &[&r, &k, &already],
        )
        .unwrap();

    let mut service = Service::start(&db, &topics, state.path(), &[]);
    Producer::new().send_action(&topics.input, &action);
    let mut push = Reader::new(&topics.output);
    push.until(50, WAIT);
    let campaign = wait_for("the campaign to be done", WAIT, || {
        let campaign = dump(state.path(), Some("campaigns")).pop()?;
        (campaign["progress"]["state"] == "done").then_some(campaign)
    });
    assert_eq!(campaign["progress"]["state"], "done");

    let mut expected: Vec<_> = clients.iter().map(|c| (r, k, *c)).collect();
    expected.sort();
    assert_eq!(db.feedback(), expected, "one row per client");
    let kept: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM subscribers_feedback \
             WHERE adv_campaign_content = 'written before' AND feedback = 'liked'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 5, "the rows written before are untouched");
    assert!(
        service.logged("rows of the batch are already in subscribers_feedback; writing it again")
    );
    assert!(service.stop().success());
}

#[test]
fn a_large_fan_out_goes_in_chunks_exactly_once() {
    let db = Db::migrated();
    let topics = Topics::new(4);
    let state = tempfile::tempdir().unwrap();
    let r = u();
    db.new_subscribers(r, 12_000);
    let mut service = Service::start(&db, &topics, state.path(), &["--chunk-size", "1000"]);
    let k = u();
    Producer::new().send_action(&topics.input, &live_action(r, k));
    wait_for("12,000 feedback rows", WAIT, || {
        (db.feedback_count() == 12_000).then_some(())
    });
    let mut push = Reader::new(&topics.output);
    push.until(12_000, WAIT);
    push.drain(Duration::from_secs(1));
    assert_eq!(push.seen.len(), 12_000);
    let distinct: BTreeSet<_> = triples(&push.seen).into_iter().collect();
    assert_eq!(distinct.len(), 12_000);
    assert!(
        service.metric("promo_fanout_batches_committed_total") >= 12.0,
        "one batch per chunk at least"
    );
    let campaign = &dump(state.path(), Some("campaigns"))[0];
    assert_eq!(campaign["progress"]["state"], "done");
    assert!(service.stop().success());
}

#[test]
fn the_mirror_follows_the_table() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (r, a, b) = (u(), u(), u());
    let row_a = db.subscribe(r, a);
    let mut service = Service::start(&db, &topics, state.path(), &[]);
    let rows = |v: &[Value]| -> BTreeSet<(i64, String)> {
        v.iter()
            .filter(|e| e["kind"] == "by_row")
            .map(|e| {
                (
                    e["row_id"].as_i64().unwrap(),
                    e["client_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        rows(&dump(state.path(), Some("subscriptions"))),
        BTreeSet::from([(row_a, a.to_string())])
    );
    let row_b = db.subscribe(r, b);
    db.client()
        .execute(
            "DELETE FROM subscribers_restaurants WHERE id = $1",
            &[&row_a],
        )
        .unwrap();
    wait_for("the mirror to follow the table", WAIT, || {
        (rows(&dump(state.path(), Some("subscriptions")))
            == BTreeSet::from([(row_b, b.to_string())]))
        .then_some(())
    });
    assert!(service.stop().success());
}

#[test]
fn a_scheduled_campaign_survives_a_restart_and_fires_at_its_start() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (r, client, k) = (u(), u(), u());
    db.subscribe(r, client);
    let mut service = Service::start(&db, &topics, state.path(), &[]);
    // Far enough ahead that the stop below surely comes first.
    let start = now() + 20;
    Producer::new().send_action(&topics.input, &action(r, k, start, start + 3600));
    consumed(&service, 1);
    let stored = dump(state.path(), Some("campaigns"));
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["progress"]["state"], "not_started");
    assert!(service.stop().success());
    assert_eq!(db.feedback_count(), 0, "nothing before the start");

    service.restart();
    wait_for(
        "the scheduled campaign to fire after the restart",
        WAIT,
        || (db.feedback_count() == 1).then_some(()),
    );
    let push = Reader::new(&topics.output).until(1, WAIT).to_vec();
    assert_eq!(triples(&push), vec![(r, k, client)]);
    assert!(push[0].json()["trigger_datetime_created"].as_i64().unwrap() >= start);
    assert!(service.stop().success());
}

/// `--kafka` properties go to every Kafka client of the service. A consumer's
/// property is ignored by the producers and a producer's by the consumers,
/// which librdkafka reports at each start; the service logs that at debug
/// level, not as a warning, and the pipeline flows with both set.
#[test]
fn kafka_properties_of_one_kind_of_client_raise_no_warnings_in_the_other() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (r, a, k) = (u(), u(), u());
    db.subscribe(r, a);
    let consumer_only = "fetch.wait.max.ms=20";
    let producer_only = "linger.ms=1";
    let service = Service::start(
        &db,
        &topics,
        state.path(),
        &["--kafka", consumer_only, "--kafka", producer_only],
    );
    Producer::new().send_action(&topics.input, &live_action(r, k));
    let mut push = Reader::new(&topics.output);
    assert_eq!(triples(push.until(1, WAIT)), vec![(r, k, a)]);
    wait_for("the feedback row", WAIT, || {
        (db.feedback() == vec![(r, k, a)]).then_some(())
    });
    assert!(
        !service.logged("will be ignored"),
        "a property of one kind of client was warned about by the other"
    );
}

/// A push topic that does not exist is named at start: its first message
/// would otherwise fail only after librdkafka's metadata wait (30 s). The
/// topics that exist are not named.
#[test]
fn a_missing_push_topic_is_named_at_start() {
    let db = Db::migrated();
    let mut topics = Topics::new(1);
    topics.output = unique("push-never-created");
    let state = tempfile::tempdir().unwrap();
    let mut service = Service::start(&db, &topics, state.path(), &[]);
    service.wait_ready();
    let warning = "the push topic does not exist";
    wait_for("the missing push topic to be named", WAIT, || {
        (service.logged(warning) && service.logged(&topics.output)).then_some(())
    });
    // Logged after both topics were looked at.
    wait_for("the partitions to be taken", WAIT, || {
        service.logged("input partitions taken").then_some(())
    });
    assert!(!service.logged("the dead-letter topic does not exist"));
}
