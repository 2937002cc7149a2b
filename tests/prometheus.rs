//! A real Prometheus (Debian's `prometheus`, installed by `scripts/test.sh`)
//! scrapes a running service with the project's alert rules loaded, and its
//! HTTP API reads back what the test caused.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// `prometheus` on a loopback port, scraping one target every second, with
/// `deploy/prometheus/alerts.yml` loaded. Stopped when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn scraping(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: promo-fanout\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "the prometheus binary (Debian package `prometheus`; scripts/test.sh installs it)",
            );
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        wait_for("prometheus to be ready", WAIT, || {
            (prometheus.get("/-/ready")?.0 == 200).then_some(())
        });
        prometheus
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("http://{}{path}", self.addr))
    }

    /// The API's `data` for `path`, once it answers with success.
    fn api(&self, path: &str) -> Option<Value> {
        let (status, body) = self.get(path)?;
        let answer: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && answer["status"] == "success").then(|| answer["data"].clone())
    }

    /// The value of an instant query that selects exactly one series.
    fn value(&self, query: &str) -> Option<f64> {
        let query =
            percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC);
        let data = self.api(&format!("/api/v1/query?query={query}"))?;
        match data["result"].as_array()?.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_what_the_service_did() {
    let db = Db::migrated();
    let topics = Topics::new(1);
    let state = tempfile::tempdir().unwrap();
    let mut service = Service::start(&db, &topics, state.path(), &[]);
    let target = service.metrics_addr().expect("the service listens");
    let prometheus = Prometheus::scraping(&target);

    let sent = "promo_fanout_notifications_sent_total{job=\"promo-fanout\"}";
    let before = wait_for("a first scrape of the service", WAIT, || {
        prometheus.value(sent)
    });
    assert_eq!(
        prometheus.value("up{job=\"promo-fanout\"}"),
        Some(1.0),
        "the target is up"
    );
    wait_for("the scraped service to be ready", WAIT, || {
        (prometheus.value("promo_fanout_ready")? == 1.0).then_some(())
    });

    let r = Uuid::new_v4();
    db.new_subscribers(r, 37);
    Producer::new().send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    wait_for("the feedback rows", WAIT, || {
        (db.feedback_count() == 37).then_some(())
    });
    let after = wait_for("the notifications in Prometheus", WAIT, || {
        prometheus.value(sent).filter(|&v| v > before)
    });
    assert_eq!(after - before, 37.0, "the counter rose by what was sent");

    // The alert rules loaded and evaluate against the real series without
    // an error; none fires for a healthy service.
    let rules = wait_for("the rules to be evaluated", WAIT, || {
        let data = prometheus.api("/api/v1/rules")?;
        let rules: Vec<Value> = data["groups"][0]["rules"].as_array()?.clone();
        rules
            .iter()
            .all(|r| r["lastEvaluation"].as_str() != Some("0001-01-01T00:00:00Z"))
            .then_some(rules)
    });
    let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(names.contains(&"PromoFanoutNotReady"), "{names:?}");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(rule["state"], "inactive", "{rule}");
    }
    assert!(service.stop().success());
}
