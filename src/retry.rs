//! Which failures are retried, decided in one place, and the backoff they are
//! retried with.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio_postgres::error::SqlState;

/// A sink or source operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("postgres: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[source] KafkaError),
    #[error("state store: {0}")]
    Store(#[from] promo_fanout_state::StoreError),
    /// The change feed said something this build cannot apply.
    #[error("change feed: {0}")]
    Feed(String),
    /// A setup that waiting cannot fix.
    #[error("{0}")]
    Config(String),
}

impl SinkError {
    /// A short label for logs and the retries metric.
    pub fn cause(&self) -> &'static str {
        match self {
            SinkError::Postgres(_) => "postgres",
            SinkError::Kafka(_) => "kafka",
            SinkError::Store(_) => "state",
            SinkError::Feed(_) | SinkError::Config(_) => "mirror",
        }
    }
}

/// Whether waiting and trying again can make `error` go away. Outages
/// (connections refused or cut, brokers down, timeouts, overload) can; a
/// missing table, a refused authorization or a message too large cannot, and
/// stop the service with the error instead of spinning forever.
pub fn is_retryable(error: &SinkError) -> bool {
    match error {
        SinkError::Postgres(e) => match e.code() {
            // No SQLSTATE: the connection itself failed or was closed.
            None => true,
            Some(code) => {
                let class = &code.code()[..2];
                matches!(class, "08" | "53" | "57" | "58" | "40")
                    || *code == SqlState::LOCK_NOT_AVAILABLE
                    // A replication slot still held by the server backend of
                    // a predecessor killed mid-query: it lets go shortly.
                    || *code == SqlState::OBJECT_IN_USE
            }
        },
        SinkError::Kafka(e) => !matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidArgument
            )
        ),
        // The local disk failing is not an outage that passes; nor is a feed
        // this build cannot read, or a setup mistake.
        SinkError::Store(_) | SinkError::Feed(_) | SinkError::Config(_) => false,
    }
}

/// Capped exponential backoff with jitter, without end: outages are waited
/// out, not given up on.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_and_never_ends() {
        let delays: Vec<Duration> = backoff().take(40).collect();
        assert_eq!(delays.len(), 40);
        assert!(delays[0] < Duration::from_millis(250));
        // With jitter a delay may reach twice the cap at most.
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(20)));
        assert!(delays[39] >= Duration::from_secs(10));
    }

    #[test]
    fn outages_are_retried_and_mistakes_are_not() {
        let timeout = SinkError::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        assert!(is_retryable(&timeout));
        let too_big = SinkError::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert!(!is_retryable(&too_big));
    }
}

/// Why a retried operation stopped without succeeding.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("shutting down")]
    Shutdown,
    #[error(transparent)]
    Fatal(#[from] SinkError),
}

/// Runs `op` until it succeeds, waiting out retryable failures with
/// [`backoff`]; `on_failure` and `on_success` let the caller report readiness.
/// Returns early on shutdown or on an error that retrying cannot fix.
pub async fn until_done<T, F, Fut>(
    what: &'static str,
    mut op: F,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    mut on_change: impl FnMut(bool),
) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SinkError>>,
{
    let mut delays = backoff();
    loop {
        match op().await {
            Ok(v) => {
                on_change(true);
                return Ok(v);
            }
            Err(error) if is_retryable(&error) => {
                on_change(false);
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                metrics::counter!("promo_fanout_retries_total", "cause" => error.cause())
                    .increment(1);
                tracing::warn!(%error, step = what, retry_in_ms = delay.as_millis() as u64, "step failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Err(Stopped::Shutdown),
                }
            }
            Err(error) => {
                on_change(false);
                return Err(Stopped::Fatal(error));
            }
        }
    }
}
