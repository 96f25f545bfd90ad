//! `exactly sink delta`: the Delta Lake sink built from its settings.

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::settings::DeltaSinkSettings;

/// Runs one Delta sink until `stop`.
pub async fn delta_sink(
    settings: &DeltaSinkSettings,
    kafka: &exactly_kafka::KafkaSettings,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let config = settings.config(kafka)?;
    tracing::info!(
        "sink {}: {} from Kafka at {} into the Delta table {} ({} input, partitioned by {})",
        config.name,
        config.topics.join(", "),
        kafka.brokers,
        config.table_uri,
        config.layout.input,
        config.layout.partition_by.as_deref().unwrap_or("nothing")
    );
    let counters = std::sync::Arc::new(exactly_delta::SinkCounters::default());
    exactly_delta::run(config, counters, stop)
        .await
        .context("delta sink stopped")
}
