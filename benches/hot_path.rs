//! The hot path, per operation: decode + validate an action, the eligibility
//! decision, the recipient scan from RocksDB, the once-per-client check, the
//! commit that marks a chunk sent, and the push message's JSON. `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use promo_fanout::action;
use promo_fanout::fanout::{self, Notification};
use promo_fanout::sinks::PushMessage;
use promo_fanout_state::{Action, Campaign, Commit, Identity, Progress, Store, Subscription};
use uuid::Uuid;

/// The service's defaults: `max-message-bytes` and librdkafka's `message.max.bytes`.
const LIMITS: action::Limits = action::Limits {
    max_message_bytes: 256 * 1024,
    max_push_bytes: 1_000_000 - action::Limits::PUSH_OVERHEAD,
};
const SUBSCRIBERS: usize = 20_000;
const CHUNK: usize = 5_000;

fn sample_action() -> Vec<u8> {
    serde_json::json!({
        "restaurant_id": Uuid::new_v4(),
        "adv_campaign_id": Uuid::new_v4(),
        "adv_campaign_content": "Two pizzas for the price of one, today only",
        "adv_campaign_owner": "Ivan Ivanov",
        "adv_campaign_owner_contact": "ivan@example.com",
        "adv_campaign_datetime_start": 1_700_000_000,
        "adv_campaign_datetime_end": 1_700_003_600,
        "datetime_created": 1_699_999_000,
    })
    .to_string()
    .into_bytes()
}

fn campaign(r: Uuid) -> Campaign {
    Campaign {
        action: Action {
            restaurant_id: r,
            adv_campaign_id: Uuid::new_v4(),
            adv_campaign_content: "Two pizzas for the price of one, today only".into(),
            adv_campaign_owner: Some("Ivan Ivanov".into()),
            adv_campaign_owner_contact: Some("ivan@example.com".into()),
            adv_campaign_datetime_start: 0,
            adv_campaign_datetime_end: i64::MAX / 2,
            datetime_created: 0,
        },
        origin: None,
        progress: Progress::NotStarted,
    }
}

/// A store whose restaurant `r` has `SUBSCRIBERS` subscribers, half of whom
/// have had campaign `k`.
fn store_with_subscribers() -> (tempfile::TempDir, Store, Campaign) {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity {
        group_id: "bench".into(),
        input_topic: "bench".into(),
    };
    let store = Store::open(dir.path(), &identity).unwrap();
    let r = Uuid::new_v4();
    let c = campaign(r);
    let mut commit = Commit::new();
    for i in 0..SUBSCRIBERS {
        let client = Uuid::new_v4();
        commit.put_subscription(&Subscription {
            row_id: i as i64,
            restaurant_id: r,
            client_id: client,
        });
        if i % 2 == 0 {
            commit.mark_sent(r, c.action.adv_campaign_id, client, i64::MAX);
        }
    }
    store.commit(commit).unwrap();
    (dir, store, c)
}

fn bench(c: &mut Criterion) {
    let bytes = sample_action();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_and_validate", |b| {
        b.iter(|| action::decode(Some(black_box(&bytes)), &LIMITS).unwrap())
    });
    let bad = br#"{"restaurant_id":"12-x","adv_campaign_id":5}"#;
    g.bench_function("reject_with_reason", |b| {
        b.iter(|| action::decode(Some(black_box(bad)), &LIMITS).unwrap_err())
    });
    g.finish();

    c.bench_function("eligibility", |b| {
        b.iter(|| {
            fanout::timing(
                black_box(100),
                black_box(5000),
                black_box(1000),
                black_box(600),
            )
        })
    });

    let (_dir, store, camp) = store_with_subscribers();
    let mut g = c.benchmark_group("rocksdb");
    g.throughput(Throughput::Elements(CHUNK as u64));
    g.bench_function("recipient_scan_5000", |b| {
        b.iter(|| {
            store
                .subscribers(camp.action.restaurant_id, None)
                .take(CHUNK)
                .count()
        })
    });
    let clients: Vec<Uuid> = store
        .subscribers(camp.action.restaurant_id, None)
        .take(CHUNK)
        .map(Result::unwrap)
        .collect();
    g.bench_function("once_per_client_check_5000", |b| {
        b.iter(|| {
            store
                .sent_flags(
                    camp.action.restaurant_id,
                    camp.action.adv_campaign_id,
                    black_box(&clients),
                )
                .unwrap()
        })
    });
    g.bench_function("next_chunk_5000", |b| {
        b.iter(|| fanout::next_chunk(&store, black_box(&camp), CHUNK).unwrap())
    });
    // What a batch's commit writes: 5,000 clients marked sent for a campaign,
    // in the scan's client order, on top of every earlier iteration's marks.
    g.bench_function("mark_sent_commit_5000", |b| {
        b.iter_batched(
            || {
                let mut commit = Commit::new();
                let k = Uuid::new_v4();
                for client in &clients {
                    commit.mark_sent(camp.action.restaurant_id, k, *client, i64::MAX);
                }
                commit
            },
            |commit| store.commit(commit).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let shared = Arc::new(camp);
    let notifications: Vec<Notification> = clients
        .iter()
        .map(|c| Notification {
            campaign: shared.clone(),
            client_id: *c,
            trigger_datetime_created: 1_700_000_100,
        })
        .collect();
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(CHUNK as u64));
    g.bench_function("push_json_5000", |b| {
        b.iter_batched(
            || Vec::with_capacity(CHUNK),
            |mut out: Vec<Vec<u8>>| {
                for n in &notifications {
                    out.push(serde_json::to_vec(&PushMessage::from(n)).unwrap());
                }
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
