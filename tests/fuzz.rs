//! Fuzzing the real binary: tens of thousands of generated messages — valid
//! actions with strange Unicode, NUL bytes, lone surrogates, integers across
//! the whole i64 range, floats, wrong types, huge and empty strings,
//! duplicate keys — into `run`. The process never exits, every message ends
//! in the DLQ or is processed, exactly as its generator meant, and the good
//! actions among them all reach both sinks.
//!
//! `PF_FUZZ_MESSAGES` sets the size (20,000 by default);
//! `scripts/fuzz.sh` runs a million.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

/// The storable range of Unix seconds (SPEC §1): Postgres's first day, 4714
/// BC, to chrono's last, 262142 AD.
const EARLIEST: i64 = -210_866_803_200;
const LATEST: i64 = 8_210_266_876_799;

/// One generated message and what the service must make of it.
struct Case {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    /// Bad input: the DLQ, with an `error` header.
    bad: bool,
    /// A valid action that is eligible now: one notification per subscriber.
    notifies: Option<(Uuid, Uuid)>,
}

struct Generator {
    rng: StdRng,
    restaurants: Vec<Uuid>,
    now: i64,
}

/// Text a producer might send that both sinks can store.
const STRANGE: [&str; 10] = [
    "скидка 50% на всё",
    "\u{202e}evil\u{202c} right-to-left",
    "🍕🍕 two pizzas 🎉",
    "e\u{301} combining",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP",
    "tab\tand\nnewline",
    "quote \" and backslash \\",
    "\u{feff}byte order mark",
    "\u{7f}\u{1}control",
    "日本語のメニュー",
];

impl Generator {
    fn valid(&mut self, content: &str) -> (Value, Uuid, Uuid) {
        let r = self.restaurants[self.rng.random_range(0..self.restaurants.len())];
        let k = Uuid::new_v4();
        let mut a = action(r, k, self.now - 60, self.now + 3600);
        a["adv_campaign_content"] = content.into();
        (a, r, k)
    }

    /// Case `i`. Its key starts with `i` and a colon, then random bytes:
    /// the DLQ keeps keys, so a dead letter names its case. (Offsets would
    /// not: on the local broker, a produce acknowledgement's offset did not
    /// always match where the message is read back.)
    fn case(&mut self, i: usize) -> Case {
        let mut key = format!("{i}:").into_bytes();
        key.extend((0..self.rng.random_range(0..48)).map(|_| self.rng.random::<u8>()));
        let key = Some(key);
        let strange = STRANGE[self.rng.random_range(0..STRANGE.len())];
        let (mut a, r, k) = self.valid(strange);
        let good = |a: &Value| (a.to_string().into_bytes(), false, Some((r, k)));
        let bad = |bytes: Vec<u8>| (bytes, true, None);
        let (value, bad, notifies) = match self.rng.random_range(0..14) {
            0 | 1 => good(&a),
            2 => {
                let field = [
                    "adv_campaign_content",
                    "adv_campaign_owner",
                    "adv_campaign_owner_contact",
                ][self.rng.random_range(0..3)];
                a[field] = format!("{strange}\u{0}").into();
                bad(a.to_string().into_bytes())
            }
            3 => {
                // A lone surrogate: valid-looking JSON no decoder can turn into text.
                let surrogate = [r"\ud800", r"\udc00", r"\udbff x"][self.rng.random_range(0..3)];
                let field = "\"adv_campaign_content\":\"";
                let text = a
                    .to_string()
                    .replacen(field, &format!("{field}{surrogate}"), 1);
                bad(text.into_bytes())
            }
            4 => return self.times(a, r, k, key),
            5 => {
                let field = [
                    "adv_campaign_datetime_start",
                    "adv_campaign_datetime_end",
                    "datetime_created",
                ][self.rng.random_range(0..3)];
                a[field] = json!(self.rng.random::<f64>() * 1e12);
                bad(a.to_string().into_bytes())
            }
            6 => {
                let field = [
                    "restaurant_id",
                    "adv_campaign_id",
                    "adv_campaign_content",
                    "datetime_created",
                ][self.rng.random_range(0..4)];
                // Any type but the field's own: a number for a string, a
                // string for a number.
                let other = if field == "datetime_created" {
                    json!("42")
                } else {
                    json!(42)
                };
                a[field] = [
                    json!(true),
                    json!([1, 2]),
                    json!({"x": 1}),
                    other,
                    Value::Null,
                ][self.rng.random_range(0..5)]
                .clone();
                bad(a.to_string().into_bytes())
            }
            // Huge values are rare, so that a million messages fit the broker's memory.
            7 if self.rng.random_range(0..20) == 0 => {
                // Over max-message-bytes (256 KiB).
                a["adv_campaign_content"] = "я".repeat(140_000).into();
                bad(a.to_string().into_bytes())
            }
            8 => {
                a["adv_campaign_content"] = ["", "   ", "\n\t"][self.rng.random_range(0..3)].into();
                bad(a.to_string().into_bytes())
            }
            9 => {
                // A key twice, both values valid.
                let text = a.to_string();
                let dup = format!(
                    "{{\"adv_campaign_id\":\"{}\",{}",
                    Uuid::new_v4(),
                    &text[1..]
                );
                bad(dup.into_bytes())
            }
            10 => {
                let bytes: Vec<u8> = (0..self.rng.random_range(0..200))
                    .map(|_| self.rng.random())
                    .collect();
                // Random bytes are almost never an object with every field.
                bad(bytes)
            }
            11 if self.rng.random_range(0..20) == 0 => {
                // Large but under the limit: both sinks take it.
                a["adv_campaign_owner"] = "x".repeat(100_000).into();
                good(&a)
            }
            12 => {
                a["restaurant_id"] = ["12-x", "", "not-a-uuid", "00000000-0000-0000-0000"]
                    [self.rng.random_range(0..4)]
                .into();
                bad(a.to_string().into_bytes())
            }
            _ => {
                a["unknown_extra"] = json!({"nested": [strange, 1.5, null]});
                a["adv_campaign_owner"] = Value::Null;
                good(&a)
            }
        };
        Case {
            key,
            value,
            bad,
            notifies,
        }
    }

    /// Times across the whole i64 range: bad outside the storable range or
    /// when the window closes before it opens; otherwise valid, and
    /// eligible only when the window holds now (kept far from its edges).
    fn times(&mut self, mut a: Value, r: Uuid, k: Uuid, key: Option<Vec<u8>>) -> Case {
        let mut t = || -> i64 {
            match self.rng.random_range(0..3) {
                0 => self.rng.random(),
                1 => self.rng.random_range(EARLIEST - 10..=LATEST + 10),
                _ => self.rng.random_range(-4_000_000_000..4_000_000_000),
            }
        };
        let (start, end, created) = (t(), t(), t());
        a["adv_campaign_datetime_start"] = start.into();
        a["adv_campaign_datetime_end"] = end.into();
        a["datetime_created"] = created.into();
        let storable = |x: i64| (EARLIEST..=LATEST).contains(&x);
        let bad = !(storable(start) && storable(end) && storable(created)) || start > end;
        let day = 86_400;
        let near_now = |x: i64| (x - self.now).abs() < day;
        if !bad && (near_now(start) || near_now(end)) {
            // Too close to call from here: draw again.
            return self.times(a, r, k, key);
        }
        let eligible = !bad && start <= self.now && self.now <= end - 600;
        Case {
            key,
            value: a.to_string().into_bytes(),
            bad,
            notifies: eligible.then_some((r, k)),
        }
    }
}

#[test]
fn generated_input_never_stops_the_service() {
    let n: usize = std::env::var("PF_FUZZ_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("PF_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz: {n} messages, PF_FUZZ_SEED={seed}");
    let db = Db::migrated();
    let topics = Topics::new(4);
    let state = tempfile::tempdir().unwrap();
    let restaurants: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let mut subscribers: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for r in &restaurants {
        subscribers.insert(*r, db.new_subscribers(*r, 2));
    }
    let mut service = Service::start(&db, &topics, state.path(), &[]);

    let mut gen = Generator {
        rng: StdRng::seed_from_u64(seed),
        restaurants,
        now: now(),
    };
    let cases: Vec<Case> = (0..n).map(|i| gen.case(i)).collect();
    let started = Instant::now();
    let producer = Producer::with(&brokers(), &[("linger.ms", "20")]);
    producer.send_all(
        &topics.input,
        cases.iter().map(|c| (c.key.as_deref(), c.value.as_slice())),
    );

    let expected: BTreeSet<(Uuid, Uuid, Uuid)> = cases
        .iter()
        .filter_map(|c| c.notifies)
        .flat_map(|(r, k)| subscribers[&r].iter().map(move |c| (r, k, *c)))
        .collect();
    let bad: BTreeSet<usize> = (0..n).filter(|i| cases[*i].bad).collect();
    // Generous, and growing with the run: a timeout here is a failure.
    let wait = Duration::from_secs(300.max(n as u64 / 400));
    wait_for("every message consumed", wait, || {
        assert!(
            service.child.try_wait().unwrap().is_none(),
            "the service exited"
        );
        (service.metric("promo_fanout_messages_consumed_total") >= n as f64).then_some(())
    });
    wait_for("every notification in Postgres", wait, || {
        (db.feedback_count() as usize >= expected.len()).then_some(())
    });
    let took = started.elapsed();

    // Every batch is recorded (the consumed count is taken at the store
    // commit), and a batch's dead letters are acknowledged before that: the
    // DLQ is complete. Read all of it.
    let mut dlq = Reader::new(&topics.dlq);
    dlq.drain(Duration::from_secs(3));
    let dead: BTreeSet<usize> = dlq
        .seen
        .iter()
        .map(|l| {
            assert!(!l.headers["error"].is_empty());
            assert!(l.headers.contains_key("source_offset"));
            let key = l.key.as_deref().expect("the original key");
            let colon = key.iter().position(|b| *b == b':').unwrap();
            let i: usize = std::str::from_utf8(&key[..colon]).unwrap().parse().unwrap();
            assert_eq!(l.key, cases[i].key, "the key unchanged");
            i
        })
        .collect();
    assert_eq!(dlq.seen.len(), dead.len(), "no message dead-lettered twice");
    let wrongly_dead: Vec<_> = dead.difference(&bad).collect();
    let wrongly_kept: Vec<_> = bad.difference(&dead).collect();
    assert!(
        wrongly_dead.is_empty() && wrongly_kept.is_empty(),
        "dead-lettered but valid: {wrongly_dead:?}; bad but not dead-lettered: {wrongly_kept:?}"
    );

    let rows: BTreeSet<_> = db.feedback().into_iter().collect();
    assert_eq!(
        rows, expected,
        "Postgres holds exactly the good actions' rows"
    );
    let mut push = Reader::new(&topics.output);
    push.until(expected.len(), wait);
    push.drain(Duration::from_secs(2));
    let pushed = triples(&push.seen);
    assert_eq!(pushed.len(), expected.len(), "no push message repeated");
    let pushed: BTreeSet<_> = pushed.into_iter().collect();
    assert_eq!(pushed, expected, "the push topic holds the good actions");
    assert!(service.child.try_wait().unwrap().is_none(), "still running");
    eprintln!(
        "fuzz: {n} messages ({} bad, {} valid) and {} notifications in {:.1} s \
         ({:.0} messages/s) through the running service, which never exited",
        bad.len(),
        n - bad.len(),
        expected.len(),
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    assert!(service.stop().success());
}
