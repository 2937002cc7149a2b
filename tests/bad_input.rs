//! Nothing a producer sends stops the pipeline: a value too large for the
//! pipeline is dead-lettered whole, or without its bytes if the broker
//! refuses even that, a campaign Postgres refuses for
//! what is in it (a rule the decoder cannot know) is isolated and
//! dead-lettered with Postgres's own error while the rest of its batch is
//! delivered once, and a sink that fails keeps its own part of `/readyz`
//! down while the other parts work.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// 1.5 MB: over `max-message-bytes` (256 KiB) and over the 1,000,000 bytes
/// the push producer may send, but not over what the broker takes.
fn oversized_action(restaurant: Uuid) -> Vec<u8> {
    let mut big = live_action(restaurant, Uuid::new_v4());
    big["adv_campaign_content"] = "x".repeat(1_500_000).into();
    big.to_string().into_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_value_too_large_for_the_pipeline_is_dead_lettered_whole() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (r, client, k) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    db.subscribe(r, client);
    let mut service = Service::start(&db, &topics, state.path(), &[]);

    let big = oversized_action(r);
    let p = Producer::with(&brokers(), &[("message.max.bytes", "4000000")]);
    p.send(&topics.input, Some(b"big"), &big, Some(0));
    p.send_action(&topics.input, &live_action(r, k));

    let push = Reader::new(&topics.output).until(1, WAIT).to_vec();
    assert_eq!(triples(&push), vec![(r, k, client)]);
    let mut dlq = Reader::new(&topics.dlq);
    dlq.until(1, WAIT);
    let letter = &dlq.seen[0];
    assert_eq!(letter.key.as_deref(), Some(&b"big"[..]));
    assert_eq!(
        letter.value.as_ref().map(|v| sha256_hex(v)),
        Some(sha256_hex(&big)),
        "the DLQ producer takes what the broker takes: the value is whole"
    );
    let h = &letter.headers;
    assert!(
        h["error"].starts_with(&format!(
            "value: {} bytes, over the 262144-byte limit",
            big.len()
        )),
        "{h:?}"
    );
    assert!(!h.contains_key("value_omitted_bytes"), "{h:?}");
    assert_eq!(h["source_offset"], "0");
    assert!(service.child.try_wait().unwrap().is_none(), "still running");
    assert!(service.stop().success());
}

/// The broker refuses the dead letter for its size (staged with librdkafka's
/// mock cluster, which has no size limit of its own): it is written again
/// without its value, with headers that identify what was left out, and the
/// pipeline goes on.
#[test]
fn a_dead_letter_the_broker_finds_too_large_is_written_without_its_bytes() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let db = Db::migrated();
    let state = tempfile::tempdir().unwrap();
    let mock = MockCluster::new(1).unwrap();
    let topics = Topics::on_mock(&mock, 1);
    let (r, client) = (Uuid::new_v4(), Uuid::new_v4());
    db.subscribe(r, client);
    let big = oversized_action(r);
    let p = Producer::with(
        &mock.bootstrap_servers(),
        &[("message.max.bytes", "4000000")],
    );
    p.send(&topics.input, Some(b"big"), &big, Some(0));
    // The dead letter is the service's first produce request, and the broker
    // refuses it.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );

    let mut args = Service::settings(&db, &topics, state.path());
    Service::set_flag(&mut args, "--brokers", mock.bootstrap_servers());
    let mut service = Service::spawn(args, vec![], state.path());
    let mut dlq = Reader::on(&mock.bootstrap_servers(), &topics.dlq);
    dlq.until(1, WAIT);
    let letter = &dlq.seen[0];
    assert_eq!(letter.key.as_deref(), Some(&b"big"[..]));
    assert_eq!(letter.value, None, "written without its value");
    let h = &letter.headers;
    assert!(h["error"].starts_with("value: "), "{h:?}");
    assert_eq!(h["value_omitted_bytes"], big.len().to_string());
    assert_eq!(h["value_omitted_sha256"], sha256_hex(&big));
    assert_eq!(h["source_topic"], topics.input);
    assert_eq!(h["source_offset"], "0");

    let k = Uuid::new_v4();
    p.send_action(&topics.input, &live_action(r, k));
    let push = Reader::on(&mock.bootstrap_servers(), &topics.output)
        .until(1, WAIT)
        .to_vec();
    assert_eq!(triples(&push), vec![(r, k, client)]);
    dlq.drain(Duration::from_secs(1));
    assert_eq!(dlq.seen.len(), 1, "one dead letter, written once");
    assert!(service.stop().success());
}

/// Five campaigns in one batch; Postgres refuses two for their content (a
/// CHECK constraint and a trigger's RAISE, both unknown to the decoder).
#[test]
fn campaigns_postgres_refuses_are_isolated_and_the_rest_of_their_batch_delivered() {
    let db = Db::migrated();
    db.client()
        .batch_execute(
            "ALTER TABLE subscribers_feedback ADD CONSTRAINT no_forbidden_offer \
               CHECK (adv_campaign_content <> 'forbidden offer');
             CREATE FUNCTION refuse_vetoed() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.adv_campaign_content = 'vetoed offer' THEN
                 RAISE EXCEPTION 'this offer is vetoed';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER veto BEFORE INSERT ON subscribers_feedback
               FOR EACH ROW EXECUTE FUNCTION refuse_vetoed();",
        )
        .unwrap();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let contents = [
        "two for one",
        "free dessert",
        "forbidden offer",
        "half price",
        "vetoed offer",
    ];
    let restaurants: Vec<Uuid> = contents.iter().map(|_| Uuid::new_v4()).collect();
    let campaigns: Vec<Uuid> = contents.iter().map(|_| Uuid::new_v4()).collect();
    let mut expected = Vec::new();
    let p = Producer::new();
    for (i, content) in contents.iter().enumerate() {
        let clients = db.new_subscribers(restaurants[i], 3);
        let mut a = live_action(restaurants[i], campaigns[i]);
        a["adv_campaign_content"] = (*content).into();
        p.send(&topics.input, None, a.to_string().as_bytes(), Some(0));
        if !content.ends_with("offer") {
            expected.extend(clients.iter().map(|c| (restaurants[i], campaigns[i], *c)));
        }
    }
    expected.sort();
    // Started after the five are on the topic: they come in one batch.
    let mut service = Service::start(&db, &topics, state.path(), &[]);

    let mut dlq = Reader::new(&topics.dlq);
    dlq.until(2, WAIT);
    let mut push = Reader::new(&topics.output);
    push.until(expected.len(), WAIT);
    wait_for("the batch to be recorded", WAIT, || {
        (service.metric("promo_fanout_notifications_sent_total") >= expected.len() as f64)
            .then_some(())
    });
    push.drain(Duration::from_secs(1));
    dlq.drain(Duration::from_secs(1));

    assert_eq!(
        triples(&push.seen),
        expected,
        "each accepted one once, nothing else"
    );
    let mut rows = db.feedback();
    rows.sort();
    assert_eq!(rows, expected);
    assert_eq!(
        dlq.seen.len(),
        2,
        "each refused campaign dead-lettered once"
    );
    let by_offset: BTreeMap<String, &Record> = dlq
        .seen
        .iter()
        .map(|l| (l.headers["source_offset"].clone(), l))
        .collect();
    for (offset, k, words) in [
        (
            "2",
            campaigns[2],
            ["postgres refused it", "23514", "no_forbidden_offer"],
        ),
        (
            "4",
            campaigns[4],
            ["postgres refused it", "P0001", "this offer is vetoed"],
        ),
    ] {
        let letter = by_offset[offset];
        let error = &letter.headers["error"];
        for w in words {
            assert!(error.contains(w), "{error:?} names {w:?}");
        }
        assert_eq!(letter.json()["adv_campaign_id"], k.to_string());
        assert_eq!(letter.headers["source_topic"], topics.input);
        assert_eq!(letter.headers["source_partition"], "0");
    }
    let stored = dump(state.path(), Some("campaigns"));
    assert_eq!(
        stored.len(),
        3,
        "the refused campaigns are not kept: {stored:?}"
    );
    assert_eq!(service.metric("promo_fanout_campaigns_refused_total"), 2.0);
    assert!(service.stop().success());
}

/// Feedback writes fail (a trigger raising a serialization failure, an
/// outage by its SQLSTATE) while the change feed reads happily: `/readyz`
/// names the feedback writes the whole time, the mirror keeps following the
/// table, and once the writes succeed everything arrives once.
#[test]
fn failing_feedback_writes_keep_postgres_unready_while_the_change_feed_reads() {
    let db = Db::migrated();
    db.stage_feedback_outage();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 5);
    let mut service = Service::start(&db, &topics, state.path(), &["--mirror-mode", "cdc"]);
    Producer::new().send_action(&topics.input, &live_action(r, Uuid::new_v4()));

    wait_for("/readyz to name the feedback writes", WAIT, || {
        let (status, body) = service.get("/readyz")?;
        (status == 503 && body.contains("feedback writes failing")).then_some(())
    });
    let since = Instant::now();
    let late = Uuid::new_v4();
    db.subscribe(Uuid::new_v4(), late);
    let mut mirrored = false;
    while since.elapsed() < Duration::from_secs(15) {
        let (status, body) = service.get("/readyz").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("postgres: feedback writes failing"), "{body}");
        assert!(
            !body.contains("change feed"),
            "the change feed works: {body}"
        );
        mirrored |= mirror_rows(state.path()).iter().any(|row| row.2 == late);
        assert_eq!(db.feedback_count(), 0);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(mirrored, "the change feed kept following the table");
    assert!(service.metric("promo_fanout_retries_total") >= 2.0);

    db.end_feedback_outage();
    wait_for("every row once the writes succeed", WAIT, || {
        (db.feedback_count() == 5).then_some(())
    });
    service.wait_ready();
    let mut push = Reader::new(&topics.output);
    push.exactly(5, WAIT, "Kafka was asked once, after Postgres");
    assert!(service.stop().success());
}
