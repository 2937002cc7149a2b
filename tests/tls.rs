//! TLS to Postgres against the local server: a CA and a server certificate
//! the test makes (with the `openssl` command), put in place with ALTER
//! SYSTEM and a reload, and `pg_hba.conf` made to refuse plaintext; every
//! server setting is restored afterwards, whatever happens. One test, its
//! cases in turn: they share the server's configuration.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// A certificate authority and, optionally, a server certificate it signs.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA named `name`, its files in `dir`.
    fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            dir,
            &format!(
                "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name} \
                 -keyout ca.key -out ca.crt"
            ),
        );
        Pki {
            dir: dir.to_owned(),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A server key and certificate for `names` (subjectAltName entries),
    /// readable by the server: (certificate, key).
    fn server(&self, names: &str) -> (PathBuf, PathBuf) {
        std::fs::write(
            self.dir.join("server.ext"),
            format!("subjectAltName={names}\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        openssl(
            &self.dir,
            "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr",
        );
        openssl(
            &self.dir,
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile server.ext -out server.crt",
        );
        let key = self.dir.join("server.key");
        // The server refuses a key others can read; it runs as `postgres`.
        run("chown", &["postgres", key.to_str().unwrap()]);
        run("chmod", &["600", key.to_str().unwrap()]);
        (self.dir.join("server.crt"), key)
    }
}

/// `openssl ARGS` in `dir` (the arguments split at spaces).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(program: &str, args: &[&str]) {
    assert!(Command::new(program).args(args).status().unwrap().success());
}

/// The server's TLS settings and `pg_hba.conf` as the test sets them; both
/// files (`postgresql.auto.conf`, where ALTER SYSTEM writes, and
/// `pg_hba.conf`) are put back as they were when dropped, and reloaded.
struct ServerTls {
    files: Vec<(PathBuf, String)>,
    hba_file: PathBuf,
    /// Where the certificates go: in the data directory, so that a test
    /// killed midway leaves none of the server's settings pointing at a
    /// file that is gone (a restart would fail).
    dir: PathBuf,
}

impl ServerTls {
    fn new() -> ServerTls {
        let mut admin = admin();
        let mut show = |what: &str| -> PathBuf {
            let value: String = admin
                .query_one(&format!("SHOW {what}"), &[])
                .unwrap()
                .get(0);
            value.into()
        };
        let hba_file = show("hba_file");
        let data = show("data_directory");
        let auto = data.join("postgresql.auto.conf");
        let files = [&hba_file, &auto]
            .map(|f| (f.clone(), std::fs::read_to_string(f).unwrap()))
            .to_vec();
        let dir = data.join("promo-fanout-test-tls");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ServerTls {
            files,
            hba_file,
            dir,
        }
    }

    fn use_certificate(&self, cert: &Path, key: &Path) {
        let mut admin = admin();
        admin.batch_execute("ALTER SYSTEM SET ssl = on").unwrap();
        for (setting, path) in [("ssl_cert_file", cert), ("ssl_key_file", key)] {
            admin
                .batch_execute(&format!(
                    "ALTER SYSTEM SET {setting} = '{}'",
                    path.display()
                ))
                .unwrap();
        }
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    }

    /// Puts `line` first in `pg_hba.conf` and reloads.
    fn hba_first(&self, line: &str) {
        let (_, hba) = &self.files[0];
        std::fs::write(&self.hba_file, format!("{line}\n{hba}")).unwrap();
        admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    }
}

impl Drop for ServerTls {
    fn drop(&mut self) {
        for (file, text) in &self.files {
            let _ = std::fs::write(file, text);
        }
        // No panic here: this may run while a failed test unwinds.
        if let Ok(mut admin) = postgres::Client::connect(&admin_url(), postgres::NoTls) {
            let _ = admin.batch_execute("SELECT pg_reload_conf()");
        }
    }
}

fn admin() -> postgres::Client {
    postgres::Client::connect(&admin_url(), postgres::NoTls).unwrap()
}

/// `db`'s URL with `params` added.
fn url_with(db: &Db, host: &str, params: &str) -> String {
    let url = db.url().replace("127.0.0.1", host);
    format!("{url}?{params}")
}

/// Whether every backend of the service in `db` (its queries and its change
/// feed, all named `promo-fanout…`) is on TLS, and how many there are.
fn backends_on_tls(db: &Db) -> (bool, i64) {
    let row = admin()
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false), count(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = $1 AND a.application_name LIKE 'promo-fanout%'",
            &[&db.name()],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// `promo-fanout run` on `db` through `url`, ready.
fn start(db: &Db, topics: &Topics, state: &Path, url: &str) -> Service {
    let mut args = Service::settings(db, topics, state);
    Service::set_flag(&mut args, "--postgres-url", url.to_owned());
    args.extend(["--mirror-mode".into(), "cdc".into()]);
    let mut service = Service::spawn(args, vec![], state);
    service.wait_ready();
    service
}

/// `promo-fanout migrate` through `url`: whether it connected.
fn migrates(url: &str) -> bool {
    run_cli(&["migrate".into(), "--postgres-url".into(), url.into()]).0 == Some(0)
}

/// `run` refused at start: its exit code and its last stderr line. A retry
/// loop would run into `--startup-timeout 10m`, and a service that started
/// would not exit: either fails the wait.
fn refused(db: &Db, topics: &Topics, url: String, state: &Path) -> (Option<i32>, String) {
    let mut args = Service::settings(db, topics, state);
    Service::set_flag(&mut args, "--postgres-url", url);
    let mut child = Command::new(BIN)
        .arg("run")
        .args(args)
        .args(["--metrics-addr", "127.0.0.1:0", "--startup-timeout", "10m"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("run did not give up at start within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    (exited.code(), last)
}

#[test]
fn postgres_over_tls_as_libpq_urls_ask() {
    let server = ServerTls::new();
    let pki = Pki::new(&server.dir.join("ours"), "promo-fanout-test-CA");
    let other = Pki::new(&server.dir.join("other"), "another-CA");
    let (cert, key) = pki.server("DNS:localhost");
    server.use_certificate(&cert, &key);

    let db = Db::migrated();
    let topics = Topics::new(1);
    let ca = pki.ca().display().to_string();
    let localhost = "hostaddr=127.0.0.1";

    // verify-full against our CA, by the name the certificate carries: the
    // service starts, its queries and its change feed are on TLS, and a
    // fan-out goes through.
    let verify_full = url_with(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}&{localhost}"),
    );
    wait_for("the server to present the new certificate", WAIT, || {
        migrates(&verify_full).then_some(())
    });
    let state = tempfile::tempdir().unwrap();
    let mut service = start(&db, &topics, state.path(), &verify_full);
    let r = Uuid::new_v4();
    db.new_subscribers(r, 20);
    Producer::new().send_action(&topics.input, &live_action(r, Uuid::new_v4()));
    wait_for("the feedback rows", WAIT, || {
        (db.feedback_count() == 20).then_some(())
    });
    let (all_tls, backends) = backends_on_tls(&db);
    assert!(
        all_tls && backends >= 2,
        "{backends} backends, all on TLS: {all_tls}"
    );
    assert!(service.stop().success());

    // require: encrypted, nothing verified.
    let state = tempfile::tempdir().unwrap();
    let require = url_with(&db, "127.0.0.1", "sslmode=require");
    let mut service = start(&db, &topics, state.path(), &require);
    assert!(backends_on_tls(&db).0);
    assert!(service.stop().success());

    // verify-full against a certificate of another CA.
    let state = tempfile::tempdir().unwrap();
    let wrong_ca = url_with(
        &db,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}&{localhost}",
            other.ca().display()
        ),
    );
    let (code, line) = refused(&db, &topics, wrong_ca, state.path());
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.contains("TLS") && line.contains("UnknownIssuer"),
        "{line}"
    );

    // verify-full by a name the certificate does not carry.
    let wrong_name = url_with(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let (code, line) = refused(&db, &topics, wrong_name, state.path());
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.contains("TLS") && line.contains("not valid for name"),
        "{line}"
    );

    // A server that accepts this database over TLS only: plaintext is
    // refused, and the service says so.
    server.hba_first(&format!("hostnossl {} all 127.0.0.1/32 reject", db.name()));
    let plaintext = url_with(&db, "127.0.0.1", "sslmode=disable");
    wait_for("the server to reload pg_hba.conf", WAIT, || {
        (!migrates(&plaintext)).then_some(())
    });
    let (code, line) = refused(&db, &topics, plaintext, state.path());
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains("no encryption"), "{line}");
    let mut service = start(&db, &topics, state.path(), &require);
    assert!(backends_on_tls(&db).0);
    assert!(service.stop().success());
}
