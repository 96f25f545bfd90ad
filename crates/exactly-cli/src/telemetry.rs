//! Prometheus endpoint and the outbox gauges.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use exactly_core::OutboxStore;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Serves /metrics on `addr` (127.0.0.1 by default: metrics can reveal topic names and volumes).
pub fn serve_metrics(addr: SocketAddr) -> Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ])
        .context("metrics buckets")?
        .install()
        .with_context(|| format!("serving metrics on {addr}"))
}

/// Publishes outbox rows by status and the oldest NEW row's age, every `every`, labelled with
/// the source's name (one process may relay several databases).
pub async fn outbox_gauges<S: OutboxStore>(store: &S, source: &str, every: Duration) {
    loop {
        if let Ok(stats) = store.stats(exactly_kafka::now()).await {
            for (status, count) in [
                ("NEW", stats.new),
                ("SENDING", stats.sending),
                ("SENT", stats.sent),
                ("DEAD", stats.dead),
            ] {
                metrics::gauge!("exactly_outbox_rows", "source" => source.to_owned(), "status" => status)
                    .set(count as f64);
            }
            metrics::gauge!("exactly_outbox_oldest_new_age_seconds", "source" => source.to_owned())
                .set(stats.oldest_new_age_ms as f64 / 1000.0);
        }
        tokio::time::sleep(every).await;
    }
}

/// Publishes the replication slot's retained WAL and confirmed lag, every `every`.
pub async fn slot_gauges(client: &tokio_postgres::Client, source: &str, slot: &str, every: Duration) {
    loop {
        if let Ok(Some(stats)) = exactly_postgres::wal::slot_stats(client, slot).await {
            metrics::gauge!("exactly_wal_retained_bytes", "source" => source.to_owned(), "slot" => slot.to_owned())
                .set(stats.retained_bytes as f64);
            metrics::gauge!("exactly_relay_lag_bytes", "source" => source.to_owned(), "slot" => slot.to_owned())
                .set(stats.lag_bytes as f64);
        }
        tokio::time::sleep(every).await;
    }
}
