//! `promo-fanout demo`: the whole pipeline on an embedded setup. Kafka is
//! librdkafka's in-process mock cluster; Postgres is a scratch database on
//! `postgres-url`, or, when no server answers there, a throwaway cluster from
//! the local `initdb`/`pg_ctl`. It seeds subscribers, publishes a handful of
//! actions and prints what reached each sink, and why the rest did not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::commands::migrate;
use crate::config::Settings;
use crate::infra::clock;
use crate::infra::scratch_db::ScratchDb;
use crate::pipeline;
use crate::sinks::postgres_connect;

pub async fn demo(mut settings: Settings) -> anyhow::Result<()> {
    println!("promo-fanout demo\n=================\n");
    let kafka = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    settings.brokers = kafka.bootstrap_servers();
    settings.kafka.clear();
    settings.input_topic = "restaurant_actions".into();
    settings.output_topic = "push_message".into();
    settings.dlq_topic = "restaurant_actions.dlq".into();
    kafka.create_topic(&settings.input_topic, 2, 1)?;
    kafka.create_topic(&settings.output_topic, 2, 1)?;
    kafka.create_topic(&settings.dlq_topic, 1, 1)?;
    println!("Kafka:    librdkafka mock cluster at {}", settings.brokers);

    let postgres = ScratchPostgres::start(&settings.postgres_url).await?;
    settings.postgres_url = postgres.url.clone();
    println!("Postgres: {}", postgres.describe());
    let state = tempfile::tempdir()?;
    settings.state_dir = state.path().join("state");
    settings.metrics_addr = "127.0.0.1:0".parse()?;
    settings.expiry_margin = Duration::from_secs(600);
    println!("State:    {}\n", settings.state_dir.display());

    let result = run_demo(&settings, &postgres).await;
    postgres.stop().await;
    result
}

struct Restaurant {
    name: &'static str,
    id: Uuid,
}

/// The demo's restaurants, clients and campaigns, with the names it prints.
struct Cast {
    pizza: Restaurant,
    sushi: Restaurant,
    empty: Restaurant,
    clients: [(&'static str, Uuid); 3],
    /// Campaign ids and how they are shown: the live ones, then the others.
    pizza_deal: Uuid,
    sushi_deal: Uuid,
    happy_hour: Uuid,
}

impl Cast {
    fn new() -> Cast {
        let restaurant = |name| Restaurant {
            name,
            id: Uuid::new_v4(),
        };
        Cast {
            pizza: restaurant("Pizza Place"),
            sushi: restaurant("Sushi Bar"),
            empty: restaurant("Empty Cafe"),
            clients: [
                ("Anna", Uuid::new_v4()),
                ("Boris", Uuid::new_v4()),
                ("Chen", Uuid::new_v4()),
            ],
            pizza_deal: Uuid::new_v4(),
            sushi_deal: Uuid::new_v4(),
            happy_hour: Uuid::new_v4(),
        }
    }

    fn client_name(&self, id: &str) -> &'static str {
        self.clients
            .iter()
            .find(|(_, c)| c.to_string() == id)
            .map_or("?", |(name, _)| name)
    }

    fn campaign_label(&self, id: &str) -> &'static str {
        [
            (self.pizza_deal, "Pizza Place: Two pizzas for one"),
            (self.sushi_deal, "Sushi Bar: Free miso soup"),
            (self.happy_hour, "Pizza Place: Happy hour (scheduled)"),
        ]
        .into_iter()
        .find(|(k, _)| k.to_string() == id)
        .map_or("?", |(_, label)| label)
    }

    /// Anna, Boris (in two rows) and Chen follow Pizza Place; Anna follows
    /// Sushi Bar; nobody follows Empty Cafe.
    async fn subscribe(&self, db: &tokio_postgres::Client) -> anyhow::Result<()> {
        let [(_, anna), (_, boris), (_, chen)] = self.clients;
        let rows = [
            (&self.pizza, anna),
            (&self.pizza, boris),
            (&self.pizza, boris),
            (&self.pizza, chen),
            (&self.sushi, anna),
        ];
        for (r, c) in rows {
            db.execute(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)",
                &[&c, &r.id],
            )
            .await?;
        }
        println!("\nSubscribers: Pizza Place ← Anna, Boris (two rows), Chen; Sushi Bar ← Anna; Empty Cafe ← nobody\n");
        Ok(())
    }

    /// The input messages, each with what it shows.
    fn inputs(&self, now: i64) -> Vec<(&'static str, String)> {
        let action = |r: &Restaurant, k: Uuid, content: &str, start: i64, end: i64| {
            json!({
                "restaurant_id": r.id, "adv_campaign_id": k, "adv_campaign_content": content,
                "adv_campaign_owner": format!("{} manager", r.name),
                "adv_campaign_owner_contact": "owner@example.com",
                "adv_campaign_datetime_start": start, "adv_campaign_datetime_end": end,
                "datetime_created": now,
            })
            .to_string()
        };
        let (pizza, hour) = (&self.pizza, 3600);
        let deal = action(
            pizza,
            self.pizza_deal,
            "Two pizzas for one",
            now - 60,
            now + hour,
        );
        let malformed = action(pizza, self.pizza_deal, "x", now, now + 60)
            .replace(&self.pizza_deal.to_string(), "12-x");
        vec![
            (
                "eligible: Pizza Place, 2 for 1 until an hour from now",
                deal.clone(),
            ),
            (
                "eligible: Sushi Bar",
                action(
                    &self.sushi,
                    self.sushi_deal,
                    "Free miso soup",
                    now - 60,
                    now + 2 * hour,
                ),
            ),
            (
                "expired: Pizza Place, ended an hour ago",
                action(
                    pizza,
                    Uuid::new_v4(),
                    "Yesterday's deal",
                    now - 2 * hour,
                    now - hour,
                ),
            ),
            (
                "scheduled: Pizza Place, starts in 3 s",
                action(pizza, self.happy_hour, "Happy hour", now + 3, now + hour),
            ),
            ("duplicate: the Pizza Place action again", deal),
            (
                "no subscribers: Empty Cafe",
                action(
                    &self.empty,
                    Uuid::new_v4(),
                    "Nobody will hear this",
                    now - 60,
                    now + hour,
                ),
            ),
            ("malformed: adv_campaign_id is not a UUID", malformed),
        ]
    }
}

/// What the demo expects to see: push messages, feedback rows, dead letters.
const EXPECTED: (usize, usize, usize) = (7, 7, 1);

async fn run_demo(settings: &Settings, postgres: &ScratchPostgres) -> anyhow::Result<()> {
    for m in migrate::migrate(&postgres.url).await? {
        println!("migrate:  applied {m}");
    }
    let cast = Cast::new();
    let db = postgres_connect(&postgres.url).await?;
    cast.subscribe(&db).await?;

    let stop = CancellationToken::new();
    let service = tokio::spawn(pipeline::run(settings.clone(), stop.clone()));
    publish(settings, &cast.inputs(clock::now())).await?;
    println!("\nWaiting for the pipeline (the scheduled campaign fires in 3 s)…");
    let (brokers, wait) = (&settings.brokers, Duration::from_secs(30));
    let push = read_topic(brokers, &settings.output_topic, EXPECTED.0, wait).await?;
    let dlq = read_topic(brokers, &settings.dlq_topic, EXPECTED.2, wait / 3).await?;
    stop.cancel();
    service.await??;

    println!(
        "\n{} push messages on {} (key = client_id):",
        push.len(),
        settings.output_topic
    );
    for (key, value, _) in &push {
        let v: serde_json::Value = serde_json::from_slice(value)?;
        println!(
            "  → {:<6} {:<38} trigger_datetime_created={}",
            cast.client_name(&String::from_utf8_lossy(key)),
            cast.campaign_label(v["adv_campaign_id"].as_str().unwrap_or("")),
            v["trigger_datetime_created"]
        );
    }
    let rows = show_feedback(&db, &cast).await?;
    println!("\n{} message on {}:", dlq.len(), settings.dlq_topic);
    for (key, _, error) in &dlq {
        println!("  ✗ \"{}\": error = {error}", String::from_utf8_lossy(key));
    }
    println!(
        "\nAnd the rest:\n  • expired (Pizza Place, ended an hour ago): skipped and counted, not stored\n  \
         • duplicate (Pizza Place again): everyone already had it, nobody notified twice\n  \
         • Empty Cafe: no subscribers, nobody to notify\n  \
         • Boris stands in two rows for Pizza Place and got one notification"
    );
    show_state(settings)?;
    if (push.len(), rows, dlq.len()) != EXPECTED {
        bail!("the demo expected 7 push messages, 7 feedback rows and 1 dead letter");
    }
    Ok(())
}

async fn publish(settings: &Settings, inputs: &[(&str, String)]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()?;
    println!("Publishing to {}:", settings.input_topic);
    for (label, value) in inputs {
        let record = FutureRecord::to(&settings.input_topic)
            .key(label.as_bytes())
            .payload(value.as_bytes());
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
        println!("  • {label}");
    }
    Ok(())
}

/// Prints the feedback rows; returns how many there are.
async fn show_feedback(db: &tokio_postgres::Client, cast: &Cast) -> anyhow::Result<usize> {
    let rows = db
        .query(
            "SELECT client_id, adv_campaign_content, trigger_datetime_created::text \
             FROM subscribers_feedback ORDER BY trigger_datetime_created, adv_campaign_content",
            &[],
        )
        .await?;
    println!(
        "\n{} rows in subscribers_feedback (feedback NULL, waiting for the client):",
        rows.len()
    );
    for r in &rows {
        let client: Uuid = r.get(0);
        let content: String = r.get(1);
        let at: String = r.get(2);
        println!(
            "  ▸ {:<6} {:<20} at {at}",
            cast.client_name(&client.to_string()),
            content
        );
    }
    Ok(rows.len())
}

fn show_state(settings: &Settings) -> anyhow::Result<()> {
    let mut out = Vec::new();
    let entries = crate::commands::dump::dump(&settings.state_dir, None, &mut out)?;
    let text = String::from_utf8(out)?;
    let count = |t: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("\"table\":\"{t}\"")))
            .count()
    };
    println!(
        "\nState store: {entries} entries ({} subscriptions, {} campaigns, {} sent, {} positions); \
         on a real store `promo-fanout state dump --state-dir DIR` prints them \
         (this one is removed when the demo ends).",
        count("subscriptions"),
        count("campaigns"),
        count("sent"),
        count("positions")
    );
    Ok(())
}

/// Reads a topic from the start until `n` messages or `timeout`.
async fn read_topic(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>, String)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("demo-reader-{}", Uuid::new_v4()))
        .create()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m?;
                let error = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "error"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                out.push((
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                    error,
                ));
            }
        }
        Ok(out)
    })
    .await?
}

/// The demo's Postgres: a scratch database on a running server, or a
/// throwaway cluster started from `initdb`/`pg_ctl`.
struct ScratchPostgres {
    url: String,
    kind: Scratch,
}

enum Scratch {
    Database(ScratchDb),
    Cluster {
        dir: tempfile::TempDir,
        pg_ctl: PathBuf,
        as_postgres: bool,
    },
}

impl ScratchPostgres {
    async fn start(admin_url: &str) -> anyhow::Result<ScratchPostgres> {
        if let Ok(db) = ScratchDb::create(admin_url, "promo_fanout_demo").await {
            return Ok(ScratchPostgres {
                url: db.url.clone(),
                kind: Scratch::Database(db),
            });
        }
        Self::cluster().await
    }

    async fn cluster() -> anyhow::Result<ScratchPostgres> {
        let initdb = find_pg_tool("initdb").ok_or_else(|| {
            anyhow::anyhow!(
                "no Postgres server answers on postgres-url and no initdb was found: install \
                 PostgreSQL (e.g. `apt-get install postgresql`) or pass --postgres-url"
            )
        })?;
        let pg_ctl = find_pg_tool("pg_ctl").context("initdb found but pg_ctl missing")?;
        let as_postgres = unsafe_is_root();
        let dir = tempfile::Builder::new()
            .prefix("promo-fanout-demo-pg")
            .tempdir()?;
        let data = dir.path().join("data");
        if as_postgres {
            // initdb and pg_ctl refuse to run as root.
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("cannot hand {} to the postgres user", dir.path().display());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        run_pg(
            as_postgres,
            &initdb,
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical",
            dir.path().display()
        );
        run_pg(
            as_postgres,
            &pg_ctl,
            &[
                "-D",
                &data.display().to_string(),
                "-o",
                &opts,
                "-l",
                &dir.path().join("log").display().to_string(),
                "-w",
                "start",
            ],
        )?;
        Ok(ScratchPostgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            kind: Scratch::Cluster {
                dir,
                pg_ctl,
                as_postgres,
            },
        })
    }

    fn describe(&self) -> String {
        match &self.kind {
            Scratch::Database(db) => {
                format!("scratch database {} (dropped at the end)", db.name)
            }
            Scratch::Cluster { dir, .. } => {
                format!(
                    "throwaway cluster in {} at {}",
                    dir.path().display(),
                    self.url
                )
            }
        }
    }

    async fn stop(self) {
        match self.kind {
            Scratch::Database(db) => {
                if let Err(error) = db.drop_all().await {
                    eprintln!("could not drop the scratch database {}: {error}", db.name);
                }
            }
            Scratch::Cluster {
                dir,
                pg_ctl,
                as_postgres,
            } => {
                let data = dir.path().join("data").display().to_string();
                let _ = run_pg(
                    as_postgres,
                    &pg_ctl,
                    &["-D", &data, "-m", "immediate", "stop"],
                );
            }
        }
    }
}

fn find_pg_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    debian.sort();
    debian.reverse();
    on_path.into_iter().chain(debian).find(|p| p.is_file())
}

fn run_pg(as_postgres: bool, tool: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = if as_postgres {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(tool)
            .args(args)
            .output()?
    } else {
        Command::new(tool).args(args).output()?
    };
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn unsafe_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}
