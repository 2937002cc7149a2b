//! What a failure means, decided in one place ([`classify`]): an outage to
//! wait out, data a sink refuses (isolated and dead-lettered by the sink's
//! caller), or a mistake that stops the service. And the backoff outages are
//! retried with.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio_util::sync::CancellationToken;

/// An operation on Postgres, Kafka or the store that failed: what
/// [`classify`] judges. Each variant's text includes its cause's, so a log
/// line or the one line `main` prints says everything once.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("postgres: {}", postgres_text(.0))]
    Postgres(tokio_postgres::Error),
    /// The change feed's replication connection.
    #[error("postgres replication: {0}")]
    Replication(pgwire_replication::PgWireError),
    #[error("kafka: {0}")]
    Kafka(KafkaError),
    #[error("state store: {0}")]
    Store(Box<promo_fanout_state::StoreError>),
    /// The change feed said something this build cannot apply.
    #[error("change feed: {0}")]
    Feed(String),
    /// A setup that waiting cannot fix.
    #[error("{0}")]
    Config(String),
    /// The DLQ refuses a dead letter for something no payload change can
    /// mend (its configuration): retried until a person fixes it, since a
    /// dead letter is never skipped.
    #[error("the DLQ refuses a dead letter: {0}")]
    DlqRefused(String),
    /// Another instance holds input partitions this one was recording.
    #[error(transparent)]
    Fenced(crate::partitions::Fenced),
}

impl From<promo_fanout_state::StoreError> for Failure {
    fn from(error: promo_fanout_state::StoreError) -> Self {
        Failure::Store(Box::new(error))
    }
}

impl Failure {
    /// A short label for logs and the retries metric.
    pub fn cause(&self) -> &'static str {
        match self {
            Failure::Postgres(_) | Failure::Replication(_) => "postgres",
            Failure::Kafka(_) | Failure::DlqRefused(_) => "kafka",
            Failure::Store(_) => "state",
            Failure::Feed(_) | Failure::Config(_) => "mirror",
            Failure::Fenced(_) => "fenced",
        }
    }
}

/// A Postgres error in one line: the server's severity, SQLSTATE, message
/// and detail, or the client's own description and its causes.
pub fn postgres_text(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

/// What to do about a failed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// An outage (a connection lost, a timeout, overload, a conflict between
    /// transactions): wait and try again; nothing is given up.
    Retry,
    /// The sink refuses what is in the data: never retried as it is. A sink
    /// isolates the action(s) it refuses and dead-letters them; anywhere
    /// else it stops the service like [`Disposition::Fatal`].
    Refuse,
    /// A mistake waiting cannot fix (a missing table, authentication,
    /// authorization, configuration): the service stops with one line.
    Fatal,
}

/// The one place that decides whether a failure is retried.
pub fn classify(error: &Failure) -> Disposition {
    match error {
        Failure::Postgres(e) => match e.code() {
            Some(code) => classify_sqlstate(code.code()),
            // No SQLSTATE: the client's own error (connection, encoding).
            None => classify_postgres_client(e),
        },
        Failure::Kafka(e) => match e.rdkafka_error_code() {
            Some(code) => classify_kafka(code),
            // The client was dropped, or a local I/O error: an outage.
            None => match e {
                KafkaError::ClientCreation(_) | KafkaError::Nul(_) => Disposition::Fatal,
                _ => Disposition::Retry,
            },
        },
        Failure::Replication(e) => classify_replication(e),
        Failure::DlqRefused(_) => Disposition::Retry,
        // The local disk failing is not an outage that passes; nor is a feed
        // this build cannot read, or a setup mistake.
        Failure::Store(_) | Failure::Feed(_) | Failure::Config(_) => Disposition::Fatal,
        // Waiting does not give the partitions back.
        Failure::Fenced(_) => Disposition::Fatal,
    }
}

/// The replication connection's errors: the server's by the SQLSTATE in
/// their text; a connection lost is an outage; authentication, TLS and a
/// stream this build cannot read are not.
fn classify_replication(error: &pgwire_replication::PgWireError) -> Disposition {
    match error {
        pgwire_replication::PgWireError::Server(text) => {
            sqlstate_in(text).map_or(Disposition::Fatal, classify_sqlstate)
        }
        e if e.is_transient() => Disposition::Retry,
        pgwire_replication::PgWireError::Tls(text) => tls_handshake(text),
        // The session ended and its worker's error was already taken (a
        // receive cancelled just as it ended): a new session meets the cause
        // again, and is judged by it.
        pgwire_replication::PgWireError::Internal(_) => Disposition::Retry,
        _ => Disposition::Fatal,
    }
}

/// The SQLSTATE a replication server error's text ends with.
pub fn sqlstate_in(text: &str) -> Option<&str> {
    let (_, rest) = text.rsplit_once("(SQLSTATE ")?;
    rest.get(..5)
}

/// Postgres errors by SQLSTATE (README, "What a failure means").
pub fn classify_sqlstate(code: &str) -> Disposition {
    use Disposition::*;
    match code {
        // Lock not available, object in use (a replication slot still held
        // by the backend of a killed predecessor), a read-only transaction
        // (a connection that reached a standby during a failover).
        "55P03" | "55006" | "25006" => return Retry,
        _ => {}
    }
    match code.get(..2).unwrap_or("") {
        // Connection exception, insufficient resources, operator
        // intervention (57P01 admin shutdown, 57014 canceled), system
        // error, transaction rollback (40001 serialization, 40P01 deadlock).
        "08" | "53" | "57" | "58" | "40" => Retry,
        // Data exception, integrity constraint violation, program limit
        // exceeded (a row too big), and a trigger's own RAISE (PL/pgSQL).
        "22" | "23" | "54" | "P0" => Refuse,
        // Authorization, missing objects, syntax, privileges, features,
        // internal errors and anything unknown: a person must look.
        _ => Fatal,
    }
}

/// The Postgres client's own errors, which carry no SQLSTATE; told apart by
/// tokio-postgres's description of its kind.
fn classify_postgres_client(error: &tokio_postgres::Error) -> Disposition {
    if error.is_closed() {
        return Disposition::Retry;
    }
    classify_postgres_client_text(&error.to_string())
}

fn classify_postgres_client_text(text: &str) -> Disposition {
    const OUTAGE: [&str; 7] = [
        "error communicating with the server",
        "error connecting to server",
        "connection closed",
        "timeout waiting for server",
        "unexpected message from server",
        "error parsing response from server",
        "error encoding message to server",
    ];
    if OUTAGE.iter().any(|p| text.starts_with(p)) {
        Disposition::Retry
    } else if text.starts_with("error performing TLS handshake") {
        tls_handshake(text)
    } else if text.starts_with("error serializing parameter") {
        // A value the client cannot encode: the data, not an outage.
        Disposition::Refuse
    } else {
        // TLS, authentication, configuration, an unexpected column type.
        Disposition::Fatal
    }
}

/// A TLS handshake that failed: the connection lost during it is an
/// outage; anything TLS itself decided (a certificate refused, no common
/// protocol, a file the URL names missing) needs a person.
fn tls_handshake(text: &str) -> Disposition {
    const LOST: [&str; 5] = [
        "connection reset",
        "unexpected end of file",
        "broken pipe",
        "timed out",
        "connection refused",
    ];
    let text = text.to_ascii_lowercase();
    if LOST.iter().any(|p| text.contains(p)) {
        Disposition::Retry
    } else {
        Disposition::Fatal
    }
}

/// Kafka errors by code, from a delivery report or a client call.
pub fn classify_kafka(code: RDKafkaErrorCode) -> Disposition {
    use Disposition::*;
    use RDKafkaErrorCode as C;
    match code {
        // The record itself: too large, or refused by the broker's checks.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidRecord
        | C::KeySerialization
        | C::ValueSerialization => Refuse,
        // Authentication, authorization and configuration; a producer
        // librdkafka has declared unusable.
        C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::Authentication
        | C::SSL
        | C::InvalidTopic
        | C::InvalidConfig
        | C::InvalidArgument
        | C::InvalidRequiredAcks
        | C::UnsupportedCompressionType
        | C::UnsupportedVersion
        // A produce request over the broker's segment size (`batch.size`
        // against `segment.bytes`), a clock too far off the broker's: setup.
        | C::MessageBatchTooLarge
        | C::InvalidTimestamp
        | C::Fatal => Fatal,
        // Timeouts, transport, leadership, replicas, a full queue, a topic
        // not (yet) known: outages.
        _ => Retry,
    }
}

/// The longest wait between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Capped exponential backoff with jitter, without end: outages are waited
/// out, not given up on. The n-th wait is drawn from [d/2, d), where d
/// doubles from 0.1 s up to the cap, so that instances retrying together
/// spread out and no wait exceeds the cap. (backon's jitter adds up to d
/// on top of d, hence the halving; its seed is random with its `std`
/// feature, which Cargo.toml turns on.)
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(BACKOFF_CAP)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .map(|d| d / 2)
}

/// How long an attempt may go on before it is reported like a failed one.
const STALLED_AFTER: Duration = Duration::from_secs(15);

/// `attempt`'s outcome. One still under way after [`STALLED_AFTER`] is
/// reported like a failed one, with `on_change(false)` and a warning
/// repeated every [`STALLED_AFTER`], until it ends: a broker or database
/// that takes requests and never answers (librdkafka retries a produce by
/// itself for up to `message.timeout.ms`, 5 min) is an outage too, and would
/// otherwise go unseen.
async fn watched<T>(
    what: &'static str,
    attempt: impl std::future::Future<Output = T>,
    on_change: &mut impl FnMut(bool),
) -> T {
    let started = tokio::time::Instant::now();
    tokio::pin!(attempt);
    loop {
        match tokio::time::timeout(STALLED_AFTER, &mut attempt).await {
            Ok(outcome) => return outcome,
            Err(_) => {
                tracing::warn!(
                    step = what,
                    waited_s = started.elapsed().as_secs(),
                    "step still waiting for an answer; not ready until it ends"
                );
                on_change(false);
            }
        }
    }
}

/// How long an attempt under way may go on after a shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why something stopped without succeeding: a shutdown, or an error
/// (by default a [`Failure`] that retrying cannot fix). The one way the
/// service says "stopped by shutdown" between its parts.
#[derive(Debug)]
pub enum Stopped<E = Failure> {
    Shutdown,
    Fatal(E),
}

impl<E> Stopped<E> {
    /// The same stop with its error turned into another.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> Stopped<F> {
        match self {
            Stopped::Shutdown => Stopped::Shutdown,
            Stopped::Fatal(e) => Stopped::Fatal(f(e)),
        }
    }
}

impl From<Failure> for Stopped {
    fn from(error: Failure) -> Self {
        Stopped::Fatal(error)
    }
}

/// Runs `op` until it succeeds, waiting out outages with [`backoff`];
/// `on_change` lets the caller report readiness. Returns early on shutdown or
/// on an error that retrying cannot fix (a refusal included: a caller that
/// can isolate refused data does so inside `op`).
pub async fn until_done<T, F, Fut>(
    what: &'static str,
    op: F,
    shutdown: &CancellationToken,
    on_change: impl FnMut(bool),
) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    retried(what, op, shutdown, on_change, false).await
}

/// [`until_done`] for a write to a sink, which answers in moments when
/// healthy: an attempt still unanswered after [`STALLED_AFTER`] is reported
/// like a failed one (see [`watched`]). Reads that stream for minutes by
/// design (a snapshot, a partition's sent set) use [`until_done`].
pub async fn until_written<T, F, Fut>(
    what: &'static str,
    op: F,
    shutdown: &CancellationToken,
    on_change: impl FnMut(bool),
) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    retried(what, op, shutdown, on_change, true).await
}

async fn retried<T, F, Fut>(
    what: &'static str,
    mut op: F,
    shutdown: &CancellationToken,
    mut on_change: impl FnMut(bool),
    watch: bool,
) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut delays = backoff();
    loop {
        // A shutdown lets an attempt under way finish (the batch in flight
        // is committed), but not forever: one that hangs on a frozen broker
        // or a silent database would hold the exit. Every operation retried
        // here can be abandoned and done again after the restart.
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let attempt = async {
            if watch {
                watched(what, op(), &mut on_change).await
            } else {
                op().await
            }
        };
        let attempt = tokio::select! {
            outcome = attempt => outcome,
            _ = grace => return Err(Stopped::Shutdown),
        };
        match attempt {
            Ok(v) => {
                on_change(true);
                return Ok(v);
            }
            Err(error) if classify(&error) == Disposition::Retry => {
                on_change(false);
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                metrics::counter!("promo_fanout_retries_total", "cause" => error.cause())
                    .increment(1);
                tracing::warn!(%error, step = what, retry_in_ms = delay.as_millis() as u64, "step failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Err(Stopped::Shutdown),
                }
            }
            Err(error) => {
                on_change(false);
                return Err(Stopped::Fatal(error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::*;

    #[test]
    fn backoff_grows_to_a_cap_and_never_ends() {
        let delays: Vec<Duration> = backoff().take(40).collect();
        assert_eq!(delays.len(), 40);
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= BACKOFF_CAP), "{delays:?}");
        assert!(delays[39] >= BACKOFF_CAP / 2);
        // Jittered: not every wait at the cap is the same.
        let at_cap: std::collections::BTreeSet<_> = delays[20..].iter().collect();
        assert!(at_cap.len() > 1, "{delays:?}");
        // And seeded at random: two retry loops (two instances after one
        // outage) do not wait in step. backon's jitter has a fixed seed
        // without its `std` feature.
        let again: Vec<Duration> = backoff().take(40).collect();
        assert_ne!(delays, again);
    }

    #[test]
    fn sqlstates_by_class() {
        let cases = [
            // 08: connection exception.
            ("08006", Retry),
            ("08001", Retry),
            // 22: data exception (NUL in text, timestamp out of range, too long).
            ("22021", Refuse),
            ("22008", Refuse),
            ("22001", Refuse),
            // 23: integrity constraint violation (check, not null, unique, fk).
            ("23514", Refuse),
            ("23502", Refuse),
            ("23505", Refuse),
            ("23503", Refuse),
            // 25: invalid transaction state; a read-only standby is an outage.
            ("25006", Retry),
            ("25P02", Fatal),
            // 28: invalid authorization.
            ("28P01", Fatal),
            ("28000", Fatal),
            // 3D: no such database.
            ("3D000", Fatal),
            // 40: transaction rollback.
            ("40001", Retry),
            ("40P01", Retry),
            // 42: syntax or access rule (missing table, privileges).
            ("42P01", Fatal),
            ("42501", Fatal),
            ("42703", Fatal),
            // 53: insufficient resources.
            ("53300", Retry),
            ("53100", Retry),
            // 54: program limit exceeded (a row too big).
            ("54000", Refuse),
            // 55: object not in prerequisite state; locks and busy slots wait.
            ("55P03", Retry),
            ("55006", Retry),
            ("55000", Fatal),
            // 57: operator intervention.
            ("57P01", Retry),
            ("57014", Retry),
            ("57P03", Retry),
            // 58: system error.
            ("58030", Retry),
            // P0: a trigger's RAISE.
            ("P0001", Refuse),
            // XX: internal error, corruption.
            ("XX000", Fatal),
            ("XX001", Fatal),
            // 0A: feature not supported.
            ("0A000", Fatal),
        ];
        for (code, expected) in cases {
            assert_eq!(classify_sqlstate(code), expected, "SQLSTATE {code}");
        }
    }

    #[test]
    fn postgres_client_errors_are_outages_or_not() {
        let cases = [
            ("error communicating with the server: Broken pipe", Retry),
            ("error connecting to server: Connection refused", Retry),
            ("connection closed", Retry),
            ("timeout waiting for server", Retry),
            ("error serializing parameter 5: value too large", Refuse),
            ("error deserializing column 0: bad type", Fatal),
            (
                "error performing TLS handshake: invalid peer certificate: UnknownIssuer",
                Fatal,
            ),
            (
                "error performing TLS handshake: Connection reset by peer (os error 104)",
                Retry,
            ),
            (
                "error performing TLS handshake: unexpected end of file",
                Retry,
            ),
            ("invalid configuration: host missing", Fatal),
            ("authentication error: password missing", Fatal),
        ];
        for (text, expected) in cases {
            assert_eq!(classify_postgres_client_text(text), expected, "{text}");
        }
    }

    #[test]
    fn kafka_codes() {
        use RDKafkaErrorCode as C;
        let cases = [
            (C::MessageSizeTooLarge, Refuse),
            (C::InvalidMessageSize, Refuse),
            (C::InvalidRecord, Refuse),
            (C::MessageBatchTooLarge, Fatal),
            (C::InvalidTimestamp, Fatal),
            (C::MessageTimedOut, Retry),
            (C::RequestTimedOut, Retry),
            (C::BrokerTransportFailure, Retry),
            (C::AllBrokersDown, Retry),
            (C::LeaderNotAvailable, Retry),
            (C::NotLeaderForPartition, Retry),
            (C::NotEnoughReplicas, Retry),
            (C::NotEnoughReplicasAfterAppend, Retry),
            (C::NetworkException, Retry),
            (C::QueueFull, Retry),
            (C::UnknownTopicOrPartition, Retry),
            (C::ThrottlingQuotaExceeded, Retry),
            (C::TopicAuthorizationFailed, Fatal),
            (C::ClusterAuthorizationFailed, Fatal),
            (C::SaslAuthenticationFailed, Fatal),
            (C::Authentication, Fatal),
            (C::SSL, Fatal),
            (C::InvalidConfig, Fatal),
            (C::UnsupportedCompressionType, Fatal),
            (C::Fatal, Fatal),
        ];
        for (code, expected) in cases {
            assert_eq!(classify_kafka(code), expected, "{code:?}");
            let error = Failure::Kafka(KafkaError::MessageProduction(code));
            assert_eq!(classify(&error), expected, "{code:?} in an error");
        }
        assert_eq!(classify(&Failure::Kafka(KafkaError::Canceled)), Retry);
    }

    #[test]
    fn errors_say_each_cause_once() {
        let e = Failure::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        let line = format!("{:#}", anyhow::Error::new(e));
        let segments: Vec<&str> = line.split(": ").collect();
        let distinct: std::collections::BTreeSet<&str> = segments.iter().copied().collect();
        assert_eq!(segments.len(), distinct.len(), "{line}");
        assert!(line.contains("Message size too large"), "{line}");
    }
}
