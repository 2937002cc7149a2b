//! `run` called as a library function, as the demo does: when it returns
//! with an error, nothing it started is left running in the caller's runtime.

mod common;

use std::time::Duration;

use common::*;
use promo_fanout::config::{MirrorMode, Settings};
use uuid::Uuid;

/// The service's database role may read the subscriptions but not write
/// feedback: the first delivery fails for good while others are in flight.
#[test]
fn no_task_outlives_a_failed_run() {
    let db = Db::migrated();
    let role = unique("pf_reader");
    db.client()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT SELECT ON subscribers_restaurants TO {role};
             GRANT SELECT ON subscribers_feedback TO {role};"
        ))
        .unwrap();
    let r = Uuid::new_v4();
    db.new_subscribers(r, 30);
    let topics = Topics::new(1);
    Producer::new().send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    let state = tempfile::tempdir().unwrap();
    let settings = Settings {
        brokers: brokers(),
        postgres_url: db.url().replacen("postgres@", &format!("{role}@"), 1),
        state_dir: state.path().to_owned(),
        input_topic: topics.input.clone(),
        output_topic: topics.output.clone(),
        dlq_topic: topics.dlq.clone(),
        group_id: topics.group.clone(),
        mirror_mode: MirrorMode::Refresh,
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        chunk_size: 10,
        pipeline_depth: 3,
        ..Settings::default()
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let outcome = rt.block_on(promo_fanout::pipeline::run(settings, shutdown));
    let error = outcome.expect_err("the feedback writes are refused for good");
    assert!(
        error.to_string().contains("42501"),
        "stopped by the refused write: {error}"
    );
    // Nothing of the run is left: the metrics server, the mirror, the
    // recorder and the deliveries in flight were aborted, and the database
    // connections close once their clients are dropped.
    wait_for(
        "every task of the run to end",
        Duration::from_secs(10),
        || (rt.metrics().num_alive_tasks() == 0).then_some(()),
    );
    drop(rt);
    let _ = db
        .client()
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}
