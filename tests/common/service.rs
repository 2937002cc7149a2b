//! The `promo-fanout` binary as a child process: started, probed over HTTP,
//! stopped or killed, and its store dumped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::{brokers, wait_for, Db, Topics};

pub const BIN: &str = env!("CARGO_BIN_EXE_promo-fanout");

/// The service as a child process.
/// The `instance-id` [`Service::settings`] gives.
pub const INSTANCE: &str = "one";

pub struct Service {
    pub child: Child,
    /// Where it serves /metrics: it binds port 0 and logs the address.
    metrics: Arc<OnceLock<String>>,
    /// Its log lines so far, colours removed.
    log: Arc<Mutex<Vec<String>>>,
    pub state_dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Service {
    pub fn settings(db: &Db, topics: &Topics, state_dir: &Path) -> Vec<String> {
        vec![
            "--brokers".into(),
            brokers(),
            "--postgres-url".into(),
            db.url().to_owned(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--input-topic".into(),
            topics.input.clone(),
            "--output-topic".into(),
            topics.output.clone(),
            "--dlq-topic".into(),
            topics.dlq.clone(),
            "--group-id".into(),
            topics.group.clone(),
            "--instance-id".into(),
            INSTANCE.into(),
            "--refresh-interval".into(),
            "1s".into(),
        ]
    }

    /// Replaces the value of `flag` in settings made by [`Service::settings`].
    pub fn set_flag(args: &mut [String], flag: &str, value: String) {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value;
    }

    /// Starts `promo-fanout run` and waits until it reports ready.
    pub fn start(db: &Db, topics: &Topics, state_dir: &Path, extra: &[&str]) -> Service {
        Self::start_with_env(db, topics, state_dir, extra, &[])
    }

    pub fn start_with_env(
        db: &Db,
        topics: &Topics,
        state_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Service {
        let mut args = Self::settings(db, topics, state_dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut s = Self::spawn(args, envs, state_dir);
        s.wait_ready();
        s
    }

    pub fn spawn(args: Vec<String>, envs: Vec<(String, String)>, state_dir: &Path) -> Service {
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args(&args)
            .args(["--metrics-addr", "127.0.0.1:0"]);
        cmd.envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.env("RUST_LOG", "info");
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let metrics = Arc::new(OnceLock::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        relay_logs(child.stderr.take().unwrap(), metrics.clone(), log.clone());
        Service {
            child,
            metrics,
            log,
            state_dir: state_dir.to_owned(),
            args,
            envs,
        }
    }

    /// The same service again with other environment variables (e.g. no
    /// fail points), after a stop or a crash.
    pub fn restart_with_env(&mut self, envs: &[(&str, &str)]) {
        self.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// Waits for the process to end by itself, e.g. at a fail point.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_for("the service to exit", timeout, || {
            self.child.try_wait().unwrap()
        })
    }

    /// The same service again, after a stop or a crash.
    pub fn restart(&mut self) {
        let next = Self::spawn(
            self.args.clone(),
            self.envs.clone(),
            &self.state_dir.clone(),
        );
        *self = next;
        self.wait_ready();
    }

    /// How many log lines so far contain `needle`.
    pub fn logged_times(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Whether a log line so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Where the service serves /metrics, once it listens.
    pub fn metrics_addr(&self) -> Option<String> {
        self.metrics.get().cloned()
    }

    /// GET `path` from the service's HTTP endpoint: (status, body); `None`
    /// until it listens, or if it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("http://{}{path}", self.metrics.get()?))
    }

    /// Waits for /readyz to answer 200; fails at once if the process ends
    /// first.
    pub fn wait_ready(&mut self) {
        wait_for(
            "the service to report ready",
            Duration::from_secs(60),
            || {
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("the service exited ({status}) before it reported ready");
                }
                (self.get("/readyz")?.0 == 200).then_some(())
            },
        );
    }

    /// A counter's value from /metrics (summed over labels).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        super::signal(&self.child, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().unwrap()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url`: (status, body), whatever the status; `None` if nothing
/// answers within 5 s.
pub fn http_get(url: &str) -> Option<(u16, String)> {
    let response = match ureq::get(url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(_) => return None,
    };
    let status = response.status();
    Some((status, response.into_string().ok()?))
}

/// Copies the service's log to the test's stderr and keeps it, and takes
/// from it the address the metrics endpoint bound.
fn relay_logs(stderr: ChildStderr, metrics: Arc<OnceLock<String>>, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            eprintln!("{line}");
            let line = plain(&line);
            if metrics.get().is_none() {
                if let Some(addr) = bound_address(&line) {
                    let _ = metrics.set(addr);
                }
            }
            log.lock().unwrap().push(line);
        }
    });
}

/// A log line with its ANSI colours (ESC [ ... m) removed.
fn plain(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The `metrics_addr=` field of a log line.
fn bound_address(line: &str) -> Option<String> {
    let at = line.find("metrics_addr=")? + "metrics_addr=".len();
    line[at..].split_whitespace().next().map(str::to_owned)
}

/// `promo-fanout group` with these settings: its report.
pub fn group_report(settings: &[String]) -> String {
    let out = Command::new(BIN)
        .arg("group")
        .args(settings)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "group failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `promo-fanout state dump` as parsed JSON lines.
pub fn dump(state_dir: &Path, table: Option<&str>) -> Vec<Value> {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "state",
        "dump",
        "--state-dir",
        &state_dir.display().to_string(),
    ]);
    if let Some(t) = table {
        cmd.args(["--table", t]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "state dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `promo-fanout ARGS...` run to its end: (exit code, stderr).
pub fn run_cli(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The mirror in a state dump, as (row id, restaurant, client) by row id.
pub fn mirror_rows(state_dir: &Path) -> Vec<(i64, Uuid, Uuid)> {
    mirror_index(state_dir, "by_row")
}

/// One of the mirror's indexes in a state dump (`by_row`, `by_restaurant`),
/// as (row id, restaurant, client) sorted by row id.
pub fn mirror_index(state_dir: &Path, kind: &str) -> Vec<(i64, Uuid, Uuid)> {
    let mut rows: Vec<(i64, Uuid, Uuid)> = dump(state_dir, Some("subscriptions"))
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| {
            (
                e["row_id"].as_i64().unwrap(),
                e["restaurant_id"].as_str().unwrap().parse().unwrap(),
                e["client_id"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// The mirror position in a state dump.
pub fn mirror_position(state_dir: &Path) -> Option<Value> {
    dump(state_dir, Some("positions"))
        .into_iter()
        .find(|e| e["kind"] == "mirror")
}
