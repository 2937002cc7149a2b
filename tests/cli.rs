//! What a user sees when something is wrong before the service starts: one
//! readable line and a non-zero exit, never a silent default or reset.

mod common;

use std::process::{Command, Output};

use common::BIN;

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `promo-fanout run` with `args`, checks that it refuses to start
/// (exit 1), and returns what it said.
fn refused_at_start(args: &[&str]) -> String {
    refused_at_start_with(args, &[])
}

/// [`refused_at_start`] with environment variables.
fn refused_at_start_with(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut all = vec!["run", "--metrics-addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let o = run(&all, envs);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    stderr(&o)
}

/// `run` with its store in `state` and its database `db`.
fn on<'a>(state: &'a tempfile::TempDir, db: &'a common::Db) -> [&'a str; 4] {
    [
        "--state-dir",
        state.path().to_str().unwrap(),
        "--postgres-url",
        db.url(),
    ]
}

/// `run` with nothing listening where Postgres should be (port 1), given up
/// after `timeout`.
fn unreachable_database<'a>(state: &'a std::path::Path, timeout: &'a str) -> [&'a str; 6] {
    [
        "--state-dir",
        state.to_str().unwrap(),
        "--postgres-url",
        "postgres://postgres@127.0.0.1:1/postgres",
        "--startup-timeout",
        timeout,
    ]
}

#[test]
fn a_bad_config_file_is_named_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pf.toml");
    std::fs::write(&file, "brokers = [\n").unwrap();
    let o = run(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pf.toml"), "{}", stderr(&o));

    std::fs::write(&file, "chunk-size = \"lots\"\n").unwrap();
    let o = run(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("chunk-size"), "{}", stderr(&o));

    let o = run(&["run", "--config", "/nonexistent/pf.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn an_unknown_setting_is_refused() {
    let o = run(&["run"], &[("PROMO_FANOUT_BROKER", "typo:9092")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("broker"), "{}", stderr(&o));
    let o = run(&["run", "--expiry-margin", "ten"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--expiry-margin: invalid value string \"ten\", expected a duration"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run"], &[("PROMO_FANOUT_BATCH_SIZE", "many")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("PROMO_FANOUT_BATCH_SIZE: invalid type: found string \"many\""),
        "{}",
        stderr(&o)
    );
}

/// Each instance has its own state directory: one started on another
/// instance's is refused, and told what to do.
#[test]
fn a_store_of_another_instance_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let store = promo_fanout_state::Store::open(
            &state,
            &promo_fanout_state::Identity {
                group_id: "g1".into(),
                input_topic: "t1".into(),
            },
        )
        .unwrap();
        store.claim_instance("a").unwrap();
        store.claim_instance("a").unwrap();
    }
    let state = state.to_str().unwrap();
    let args = [
        "--state-dir",
        state,
        "--group-id",
        "g1",
        "--input-topic",
        "t1",
    ];
    let err = refused_at_start(&[&args[..], &["--instance-id", "b"]].concat());
    assert!(
        err.contains("belongs to instance \"a\"") && err.contains("its own --state-dir"),
        "{err}"
    );
}

#[test]
fn a_store_of_another_pipeline_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    {
        // Create the store as pipeline (g1, t1).
        let _ = promo_fanout_state::Store::open(
            std::path::Path::new(state),
            &promo_fanout_state::Identity {
                group_id: "g1".into(),
                input_topic: "t1".into(),
            },
        )
        .unwrap();
    }
    let err = refused_at_start(&[
        "--state-dir",
        state,
        "--group-id",
        "g2",
        "--input-topic",
        "t1",
    ]);
    assert!(
        err.contains("belongs to group \"g1\"") && err.contains("with an empty --state-dir"),
        "{err}"
    );
}

#[test]
fn a_damaged_store_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("CURRENT"), "MANIFEST-999999\n").unwrap();
    let err = refused_at_start(&["--state-dir", dir.path().to_str().unwrap()]);
    assert!(
        err.contains("cannot open the state store") && err.contains("with an empty --state-dir"),
        "{err}"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let err = refused_at_start(&["--state-dir", file.to_str().unwrap()]);
    assert!(err.contains("is a file, not a directory"), "{err}");
}

#[test]
fn dump_explains_what_is_missing() {
    let o = run(&["state", "dump", "--state-dir", "/nonexistent/state"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no state store at /nonexistent/state"),
        "{}",
        stderr(&o)
    );
    let o = run(&["state", "dump", "--table", "nope"], &[]);
    assert!(
        stderr(&o).contains("subscriptions, campaigns, sent, positions, meta"),
        "{}",
        stderr(&o)
    );
}

/// `--mirror-mode cdc` on a server that cannot feed changes names what is
/// missing and how to fix it; `auto` falls back to re-reading the table.
#[test]
fn the_change_feed_explains_what_the_server_lacks() {
    let db = common::Db::migrated();
    db.client()
        .batch_execute("DROP PUBLICATION promo_fanout")
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let err = refused_at_start(&[&on(&state, &db)[..], &["--mirror-mode", "cdc"]].concat());
    assert!(
        err.contains("publication promo_fanout does not exist")
            && err.contains("promo-fanout migrate creates it")
            && err.contains("--mirror-mode refresh"),
        "{err}"
    );
}

/// A `subscribers_feedback` left by an older job, with other column types
/// and no unique key, is refused at start, each difference named: binary
/// COPY would store a UTC time in a `timestamp` column as local wall time
/// without a word, and a batch written again would add its rows twice.
#[test]
fn a_feedback_table_of_other_types_is_refused_at_start() {
    let db = common::Db::new();
    db.client()
        .batch_execute(
            "CREATE TABLE subscribers_feedback (\
               restaurant_id uuid, adv_campaign_id uuid, adv_campaign_content text, \
               adv_campaign_owner text, adv_campaign_owner_contact text, \
               adv_campaign_datetime_start timestamp, adv_campaign_datetime_end timestamp, \
               datetime_created timestamp, client_id text, feedback text)",
        )
        .unwrap();
    let out = Command::new(BIN)
        .args(["migrate", "--postgres-url", db.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let state = tempfile::tempdir().unwrap();
    let err = refused_at_start(&on(&state, &db));
    for wrong in [
        "column adv_campaign_datetime_start is timestamp without time zone, not timestamptz",
        "column datetime_created is timestamp without time zone, not timestamptz",
        "column client_id is text, not uuid",
        "column trigger_datetime_created is missing (timestamptz expected)",
        "no unique key on (restaurant_id, adv_campaign_id, client_id)",
    ] {
        assert!(err.contains(wrong), "{wrong}: {err}");
    }
    assert!(!err.contains("column restaurant_id"), "{err}");
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("promo-fanout: "))
            .count(),
        1,
        "{err}"
    );
}

#[test]
fn a_bad_postgres_url_is_a_settings_error() {
    let o = run(
        &["run", "--postgres-url", "postgres://user@host:notaport/db"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("postgres-url"), "{}", stderr(&o));
}

#[test]
fn an_unreachable_database_stops_the_start_with_one_line() {
    let state = tempfile::tempdir().unwrap();
    let err = refused_at_start(&unreachable_database(state.path(), "2s"));
    assert!(
        err.contains("cannot reach Postgres at postgres://postgres@127.0.0.1:1/postgres")
            && err.contains("startup timeout (2s)"),
        "{err}"
    );
}

/// `cdc-poll-interval`, from before the change feed was pushed, still loads
/// (with a warning saying what to do); a status interval the server would
/// time out is refused.
#[test]
fn an_old_setting_is_accepted_with_a_warning_and_a_too_long_status_interval_refused() {
    let state = tempfile::tempdir().unwrap();
    let err = refused_at_start_with(
        &unreachable_database(state.path(), "1s"),
        &[("PROMO_FANOUT_CDC_POLL_INTERVAL", "50ms")],
    );
    assert!(err.contains("cdc-poll-interval is no longer used"), "{err}");
    let o = run(&["run", "--cdc-status-interval", "45s"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cdc-status-interval"), "{}", stderr(&o));
}

#[test]
fn an_unreachable_broker_stops_the_start_with_one_line() {
    let db = common::Db::migrated();
    let state = tempfile::tempdir().unwrap();
    let err = refused_at_start(
        &[
            &on(&state, &db)[..],
            &["--brokers", "127.0.0.1:1", "--startup-timeout", "3s"],
        ]
        .concat(),
    );
    assert!(
        err.contains("cannot reach the Kafka brokers at 127.0.0.1:1")
            && err.contains("startup timeout (3s)"),
        "{err}"
    );
}

/// A failure says each cause once: one line from `promo-fanout:`, no part of
/// it repeated, and the log does not say it again.
#[test]
fn a_fatal_error_says_each_cause_once() {
    let db = common::Db::new();
    let state = tempfile::tempdir().unwrap();
    let missing = db.url().replace(db.name(), "pf_no_such_database");
    for (url, cause) in [
        (
            missing.as_str(),
            r#"database "pf_no_such_database" does not exist"#,
        ),
        (
            db.url(),
            r#"relation "subscribers_restaurants" does not exist"#,
        ),
    ] {
        // No such database; a database without the tables (migrate not run).
        let o = run(
            &[
                "run",
                "--metrics-addr",
                "127.0.0.1:0",
                "--state-dir",
                state.path().to_str().unwrap(),
                "--postgres-url",
                url,
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let all = stderr(&o);
        assert_eq!(all.matches(cause).count(), 1, "said once: {all}");
        let line = all.lines().find(|l| l.contains(cause)).unwrap();
        assert!(line.starts_with("promo-fanout: "), "{all}");
        let parts: Vec<&str> = line.split(": ").collect();
        let distinct: std::collections::BTreeSet<&str> = parts.iter().copied().collect();
        assert_eq!(parts.len(), distinct.len(), "a part repeated: {line}");
    }
}
