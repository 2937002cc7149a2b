//! What the harness benches share: settings from the environment, a scratch
//! database, the service's HTTP endpoints, and where results are written.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use promo_fanout::infra::scratch_db::ScratchDb;

pub const BIN: &str = env!("CARGO_BIN_EXE_promo-fanout");

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A scratch database named `PREFIX_<uuid>` with the migrations applied.
/// Dropped by [`drop_db`].
pub fn scratch_db(admin_url: &str, prefix: &str) -> ScratchDb {
    let db = ScratchDb::create_blocking(admin_url, prefix).unwrap();
    let ok = Command::new(BIN)
        .args(["migrate", "--postgres-url", &db.url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    db
}

/// Drops a scratch database, and first the change feed's slots in it.
pub fn drop_db(db: &ScratchDb) {
    db.drop_blocking().unwrap();
}

/// A loopback address with a port free now, for the service's metrics.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Rows in `subscribers_feedback`.
pub fn feedback_rows(pg: &mut postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM subscribers_feedback", &[])
        .unwrap()
        .get(0)
}

/// `GET path` on the service's metrics address: (status, body).
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

/// `<target dir>/bench`, created.
pub fn bench_dir() -> std::path::PathBuf {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `<target dir>/bench/<file>`.
pub fn write_result(file: &str, text: &str) {
    std::fs::write(bench_dir().join(file), text).unwrap();
}

/// Where `scripts/peers.sh` puts the peers' Python environments:
/// `PF_PEERS_DIR`, by default `~/.cache/promo-fanout/peers`.
pub fn peers_dir() -> std::path::PathBuf {
    std::env::var_os("PF_PEERS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/promo-fanout/peers")
        })
}

/// (upper bound, cumulative count) of each bucket of a Prometheus histogram.
pub fn buckets(body: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound under which `q` of the observations fall.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

/// The value under which a share `p` of `sorted` falls.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}
