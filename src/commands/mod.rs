//! The commands besides `run`: each a function `main` dispatches to.

pub mod demo;
pub mod dump;
pub mod group;
pub mod migrate;
pub mod rebuild;
pub mod set_position;

/// A connection to `postgres_url` for a one-off command, or an error saying
/// where it could not connect (password masked) and why.
pub(crate) async fn connect(postgres_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    crate::sinks::postgres_connect(postgres_url)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to postgres at {}: {}",
                crate::config::redact_url(postgres_url),
                crate::infra::retry::postgres_text(&e)
            )
        })
}
