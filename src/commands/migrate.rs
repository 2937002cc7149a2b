//! `promo-fanout migrate`: the SQL files of `migrations/`, embedded at build
//! time and applied with refinery.

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies every migration not yet applied; returns the names applied now.
pub async fn migrate(postgres_url: &str) -> anyhow::Result<Vec<String>> {
    let mut client = super::connect(postgres_url).await?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}
