//! Outages: the service keeps running, reports itself not ready, commits
//! nothing meanwhile, and resumes by itself with nothing lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::RDKafkaRespErr;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// How long each outage is held: the 30 s, longer than the backoff's
/// 10 s cap, so several retries happen at the cap.
const OUTAGE: Duration = Duration::from_secs(30);

/// Holds an outage for the rest of `OUTAGE` since `since`, checking `steady`
/// (nothing committed, still running) every second meanwhile.
fn hold(since: Instant, mut steady: impl FnMut()) {
    while since.elapsed() < OUTAGE {
        steady();
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_postgres_outage_is_waited_out() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 20);

    let proxy = Proxy::start("127.0.0.1:5432");
    let via_proxy = db
        .url()
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(via_proxy, db.url());
    let mut args = Service::settings(&db, &topics, state.path());
    Service::set_flag(&mut args, "--postgres-url", via_proxy);
    let mut service = Service::spawn(args, vec![], state.path());
    service.wait_ready();

    proxy.cut();
    let cut_at = Instant::now();
    let k = Uuid::new_v4();
    Producer::new().send_action(&topics.input, &live_action(r, k));
    wait_for("/readyz to report the outage", WAIT, || {
        let (status, body) = service.get("/readyz")?;
        (status == 503 && body.contains("postgres")).then_some(())
    });
    wait_for("a retry to be counted", WAIT, || {
        (service.metric("promo_fanout_retries_total") > 0.0).then_some(())
    });
    // Nothing is committed while Postgres is away.
    assert_eq!(db.feedback_count(), 0);
    let positions = dump(state.path(), Some("positions"));
    assert!(
        positions.iter().all(|p| p["kind"] != "input"),
        "{positions:?}"
    );
    hold(cut_at, || {
        assert_eq!(db.feedback_count(), 0);
        assert!(dump(state.path(), Some("sent")).is_empty());
        assert!(
            service.child.try_wait().unwrap().is_none(),
            "the service keeps running"
        );
    });
    assert!(service.metric("promo_fanout_retries_total") >= 3.0);

    proxy.restore();
    wait_for("every feedback row after the outage", WAIT, || {
        (db.feedback_count() == 20).then_some(())
    });
    service.wait_ready();
    wait_for("the input position to be committed", WAIT, || {
        dump(state.path(), Some("positions"))
            .iter()
            .any(|p| p["kind"] == "input" && p["next_offset"] == 1)
            .then_some(())
    });
    let mut push = Reader::new(&topics.output);
    push.exactly(20, WAIT, "every push message once: none repeated");
    assert!(service.stop().success());
}

/// The push topic made leaderless on librdkafka's mock cluster in the middle
/// of a service's run: an action for 10 subscribers waits on it.
struct LeaderlessPushTopic {
    db: Db,
    state: tempfile::TempDir,
    mock: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topics: Topics,
    service: Service,
}

impl LeaderlessPushTopic {
    /// Starts the service (with `extra` flags), makes the push topic
    /// leaderless, then sends the action.
    fn start(extra: &[&str]) -> LeaderlessPushTopic {
        let db = Db::migrated();
        let state = tempfile::tempdir().unwrap();
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        let topics = Topics::on_mock(&mock, 1);
        let r = Uuid::new_v4();
        db.new_subscribers(r, 10);
        let mut args = Service::settings(&db, &topics, state.path());
        Service::set_flag(&mut args, "--brokers", mock.bootstrap_servers());
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut service = Service::spawn(args, vec![], state.path());
        service.wait_ready();
        mock.topic_error(
            &topics.output,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        )
        .unwrap();
        Producer::on(&mock.bootstrap_servers())
            .send_action(&topics.input, &live_action(r, Uuid::new_v4()));
        LeaderlessPushTopic {
            db,
            state,
            mock,
            topics,
            service,
        }
    }

    /// Gives the push topic its leader back: the batch commits, the service
    /// is ready, and every notification is in both sinks once.
    fn end(mut self) {
        let (mock, topics, state) = (&self.mock, &self.topics, self.state.path());
        mock.topic_error(&topics.output, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
            .unwrap();
        wait_for("the batch to commit after the outage", WAIT, || {
            (dump(state, Some("sent")).len() == 10).then_some(())
        });
        self.service.wait_ready();
        assert_eq!(self.db.feedback_count(), 10);
        let mut push = Reader::on(&mock.bootstrap_servers(), &topics.output);
        push.exactly(10, WAIT, "every push message once: none repeated");
        assert!(self.service.stop().success());
    }
}

/// The push topic becomes unavailable (staged with librdkafka's mock cluster:
/// its metadata answers "leader not available"): the service retries, reports
/// itself not ready, moves no position, and delivers everything once the
/// topic is back.
#[test]
fn a_kafka_outage_is_waited_out() {
    // Surface a stuck delivery as an error within seconds, not librdkafka's 5 minutes.
    let mut outage = LeaderlessPushTopic::start(&["--kafka", "message.timeout.ms=2000"]);
    let broken_at = Instant::now();
    let (service, state) = (&mut outage.service, outage.state.path());

    wait_for("/readyz to report the outage", WAIT, || {
        let (status, body) = service.get("/readyz")?;
        (status == 503 && body.contains("kafka")).then_some(())
    });
    wait_for("a kafka retry to be counted", WAIT, || {
        (service.metric("promo_fanout_retries_total") > 0.0).then_some(())
    });
    let positions = dump(state, Some("positions"));
    assert!(
        positions.iter().all(|p| p["kind"] != "input"),
        "no position moves: {positions:?}"
    );
    assert_eq!(dump(state, Some("sent")).len(), 0, "nothing is marked sent");
    hold(broken_at, || {
        assert!(dump(state, Some("sent")).is_empty());
        assert!(
            service.child.try_wait().unwrap().is_none(),
            "the service keeps running"
        );
        // The consumer fetches and the lag thread's watermarks succeed all
        // along; the producer's failures alone keep the service unready.
        let (status, body) = service.get("/readyz").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("kafka: producing failing"), "{body}");
        assert!(!body.contains("consumer"), "{body}");
    });

    outage.end();
}

/// The same outage with librdkafka's own delivery timeout (5 min): every
/// produce request is retried inside the client and no delivery report
/// comes back, so no step fails. After 15 s without an acknowledgement
/// /readyz names the producer all the same, the log says which step waits,
/// and once the topic has a leader again the batch commits, once.
#[test]
fn a_delivery_left_unacknowledged_is_reported() {
    let outage = LeaderlessPushTopic::start(&[]);
    let (service, state) = (&outage.service, outage.state.path());
    wait_for("/readyz to name the producer", WAIT, || {
        let (status, body) = service.get("/readyz")?;
        (status == 503 && body.contains("kafka: producing failing or not acknowledged"))
            .then_some(())
    });
    wait_for("the log to name the waiting step", WAIT, || {
        service
            .logged("step still waiting for an answer")
            .then_some(())
    });
    assert_eq!(
        service.metric("promo_fanout_retries_total"),
        0.0,
        "librdkafka retries by itself: no step failed"
    );
    assert!(dump(state, Some("sent")).is_empty());
    assert_eq!(outage.db.feedback_count(), 0);
    outage.end();
}

/// The broker restarted without its data (tansu on memory storage) and the
/// topics made again: the broker no longer knows the producers' id, and
/// librdkafka retries under that id until the records time out (here after
/// 10 s), or the broker finds its sequence out of order (when it gave the
/// same id to the test's producer). The producers are then made again, and
/// the action produced after the loss reaches both sinks, each notification
/// once.
///
/// Not in CI: in about two runs of five the restarted tansu 0.6 never
/// answers the consumer's rejoin (no rebalance is logged after the restart),
/// so the input is never read again and the test waits out its limit; the
/// producers are not reached. Run it with `cargo test --all-features --test
/// outage -- --ignored`.
#[test]
#[ignore = "tansu 0.6 sometimes never answers the consumer's rejoin after its restart"]
fn a_broker_that_lost_its_data_gets_new_producers() {
    let mut broker = PrivateBroker::start();
    let db = Db::migrated();
    let topics = Topics::on(&broker.addr, 1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 20);

    let mut args = Service::settings(&db, &topics, state.path());
    Service::set_flag(&mut args, "--brokers", broker.addr.clone());
    args.extend(["--kafka".into(), "message.timeout.ms=10000".into()]);
    let mut service = Service::spawn(args, vec![], state.path());
    service.wait_ready();
    let (before, after) = (Uuid::new_v4(), Uuid::new_v4());
    Producer::on(&broker.addr).send_action(&topics.input, &live_action(r, before));
    wait_for("the fan-out before the loss", WAIT, || {
        (db.feedback_count() == 20).then_some(())
    });

    broker.restart_empty();
    topics.create_on(&broker.addr, 1);
    // The stored position is 1 and the new log starts at 0: the first
    // message there is never read (README, "No silent jumps").
    let input = Producer::on(&broker.addr);
    input.send_action(&topics.input, &live_action(r, before));
    input.send_action(&topics.input, &live_action(r, after));
    wait_for("the fan-out after the loss", WAIT, || {
        (db.feedback_count() == 40).then_some(())
    });
    wait_for("the log to say the producers were made again", WAIT, || {
        service
            .logged("the producers were made again")
            .then_some(())
    });
    service.wait_ready();
    let mut push = Reader::on(&broker.addr, &topics.output);
    let seen = push.exactly(20, WAIT, "every push message once: none repeated");
    assert!(seen
        .iter()
        .all(|m| m.json()["adv_campaign_id"] == after.to_string()));
    assert!(service.stop().success());
}

/// The real broker process frozen with SIGSTOP for 30 s in the middle of a
/// fan-out (connections open, nothing answering): the service reports itself
/// not ready, commits nothing more, keeps running, and after SIGCONT finishes
/// the fan-out with every notification once in Postgres.
#[test]
fn a_frozen_broker_is_waited_out() {
    let broker = PrivateBroker::start();
    let db = Db::migrated();
    let topics = Topics::on(&broker.addr, 1);
    let state = tempfile::tempdir().unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 10_000);

    let mut args = Service::settings(&db, &topics, state.path());
    Service::set_flag(&mut args, "--brokers", broker.addr.clone());
    // A group session longer than the freeze (librdkafka's own default):
    // the instance keeps its partition throughout. With the service's 6 s
    // the session ends during the freeze and the partition is lost; a real
    // Kafka then gives it back at the rejoin, but tansu 0.6 never answers
    // the rejoin of a member whose connection was frozen (a bare
    // confluent-kafka consumer waits forever the same way), so here that
    // would test the broker. Losing a partition and getting it back is
    // tested on librdkafka's mock cluster (tests/scale.rs).
    args.extend([
        "--chunk-size".into(),
        "50".into(),
        "--kafka".into(),
        "session.timeout.ms=45000".into(),
    ]);
    let mut service = Service::spawn(args, vec![], state.path());
    service.wait_ready();

    Producer::on(&broker.addr).send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    wait_for("the fan-out to begin", WAIT, || {
        (!dump(state.path(), Some("sent")).is_empty()).then_some(())
    });
    broker.freeze();
    let frozen_at = Instant::now();
    wait_for("/readyz to report the frozen broker", WAIT, || {
        let (status, body) = service.get("/readyz")?;
        (status == 503 && body.contains("kafka")).then_some(())
    });
    // A batch whose produce was acknowledged before the freeze commits at
    // once; by the time /readyz notices (seconds), nothing more can.
    let mut sent_during = dump(state.path(), Some("sent")).len();
    hold(frozen_at, || {
        let now = dump(state.path(), Some("sent")).len();
        assert_eq!(
            now, sent_during,
            "nothing commits while the broker is frozen"
        );
        sent_during = now;
        assert!(
            service.child.try_wait().unwrap().is_none(),
            "the service keeps running"
        );
    });
    assert!(sent_during < 10_000, "the freeze caught the fan-out midway");

    broker.thaw();
    wait_for(
        "the whole fan-out after the freeze",
        Duration::from_secs(180),
        || (dump(state.path(), Some("sent")).len() == 10_000).then_some(()),
    );
    service.wait_ready();
    assert_eq!(db.feedback_count(), 10_000);
    let mut push = Reader::on(&broker.addr, &topics.output);
    push.until(10_000, WAIT);
    push.drain(Duration::from_secs(1));
    let distinct: std::collections::BTreeSet<_> = push.seen.iter().map(|m| m.key.clone()).collect();
    assert_eq!(
        distinct.len(),
        10_000,
        "every subscriber is on the push topic"
    );
    assert_eq!(
        push.seen.len(),
        10_000,
        "every push message once: none repeated"
    );
    assert!(service.stop().success());
}

/// Feedback writes failing for longer than `max.poll.interval.ms` with the
/// pipeline full (the change feed works meanwhile, so a second action is
/// planned and waits for the one place in flight): a poll interval below
/// librdkafka's own 45 s session is accepted (the group's 6 s session
/// applies to every consumer of the input), the service keeps running, and
/// once the writes succeed every notification is in both sinks exactly once
/// and the partition is still read. librdkafka takes a member that stops
/// reading for longer than the interval out of the group (`MAXPOLL`, then
/// the partition lost and assigned again), which the test does not assert:
/// the second action was planned late in our runs (not yet understood), so
/// the loop was blocked for less than the whole outage, and what must hold
/// either way is that nothing is lost or repeated.
#[test]
fn feedback_writes_failing_longer_than_the_poll_interval_are_waited_out() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let (r, other) = (Uuid::new_v4(), Uuid::new_v4());
    db.new_subscribers(r, 20);
    db.new_subscribers(other, 20);
    // One batch in flight fills the pipeline; the shortest poll interval
    // librdkafka accepts (it may not be below the 6 s session).
    let mut service = Service::start(
        &db,
        &topics,
        state.path(),
        &[
            "--pipeline-depth",
            "1",
            "--kafka",
            "max.poll.interval.ms=6000",
        ],
    );

    db.stage_feedback_outage();
    let producer = Producer::new();
    producer.send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    wait_for(
        "the first batch's feedback write to be retried",
        WAIT,
        || service.logged("staged outage").then_some(()),
    );
    producer.send_action(&topics.input, &live_action(other, Uuid::new_v4()));
    // Ten attempts take at least 16 s of backoff (0.05 s doubling, each
    // wait at least half its step): well over twice the poll interval.
    wait_for("ten attempts at the feedback write", WAIT, || {
        (service.logged_times("staged outage") >= 10).then_some(())
    });
    assert_eq!(db.feedback_count(), 0);
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "the service keeps running"
    );

    db.end_feedback_outage();
    wait_for("every feedback row after the outage", WAIT, || {
        (db.feedback_count() == 40).then_some(())
    });
    wait_for("the input position to be committed", WAIT, || {
        dump(state.path(), Some("positions"))
            .iter()
            .any(|p| p["kind"] == "input" && p["next_offset"] == 2)
            .then_some(())
    });
    service.wait_ready();
    let mut push = Reader::new(&topics.output);
    push.exactly(40, WAIT, "every push message once: none repeated");
    // The partition is read again: a campaign sent now is delivered.
    producer.send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    wait_for("a campaign after the outage", WAIT, || {
        (db.feedback_count() == 60).then_some(())
    });
    push.exactly(60, WAIT, "the campaign after the outage, once");
    assert!(service.stop().success());
}
