//! `/healthz`, `/readyz` and `/metrics` on `metrics-addr`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// What readiness is made of. Each part is set only by the component it
/// describes, so one component succeeding never hides another failing (the
/// consumer fetching fine says nothing of the producer).
#[derive(Debug, Default)]
pub struct Health {
    /// The first snapshot of the mirror is complete.
    pub mirror_loaded: AtomicBool,
    /// The input topic exists.
    pub input_assigned: AtomicBool,
    /// The consumer group's first assignment (possibly of no partition) has
    /// been carried out: the instance reads what it holds.
    pub joined: AtomicBool,
    /// Feedback rows written to Postgres (and the sink's connection).
    pub feedback: Component,
    /// The change feed's reads of its replication slot.
    pub change_feed: Component,
    /// Push messages and dead letters produced to Kafka.
    pub producer: Component,
    /// The input consumer's metadata and watermark requests.
    pub consumer: Component,
}

/// One component's last outcome.
#[derive(Debug, Default)]
pub struct Component {
    failing: AtomicBool,
}

impl Component {
    pub fn set_ok(&self, ok: bool) {
        self.failing.store(!ok, Ordering::Relaxed);
    }

    pub fn ok(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }
}

impl Health {
    pub fn ready(&self) -> bool {
        self.reasons().is_empty()
    }

    fn reasons(&self) -> String {
        let mut out = Vec::new();
        if !self.mirror_loaded.load(Ordering::Relaxed) {
            out.push("mirror not loaded");
        }
        for (component, what) in [
            (
                &self.feedback,
                "postgres: feedback writes failing or not answering",
            ),
            (&self.change_feed, "postgres: change feed failing"),
            (
                &self.producer,
                "kafka: producing failing or not acknowledged",
            ),
            (&self.consumer, "kafka: consumer cannot reach the brokers"),
        ] {
            if !component.ok() {
                out.push(what);
            }
        }
        if !self.joined.load(Ordering::Relaxed) {
            out.push("waiting for the consumer group to assign input partitions");
        }
        if !self.input_assigned.load(Ordering::Relaxed) {
            out.push(
                "input topic not found or not assigned yet (create it, or check --input-topic)",
            );
        }
        out.join(", ")
    }
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .expect("static buckets")
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "promo_fanout_mirror_freshness_seconds".into(),
                    ),
                    &[
                        0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
                    ],
                )
                .expect("static buckets")
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// Serves the endpoints until `stop` resolves. Binding errors are returned at
/// once, so a taken port is reported at start; the address bound (a port 0
/// resolved) is logged.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(metrics_addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move |State(health): State<Arc<Health>>| {
                let metrics = metrics.clone();
                async move {
                    // Readiness as a metric, read at the scrape, for the
                    // not-ready alert.
                    metrics::gauge!("promo_fanout_ready").set(f64::from(u8::from(health.ready())));
                    metrics.render()
                }
            }),
        )
        .with_state(health);
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(%error, "health endpoint failed");
        }
    }))
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    if health.ready() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", health.reasons()),
        )
    }
}
