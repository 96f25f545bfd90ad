//! `exactly sink-counts`: window results from a topic into PostgreSQL `order_counts`, with an
//! UPSERT that keeps the larger partial count, so repeats and reorderings change nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use exactly_postgres::counts::{ensure_counts_schema, upsert_counts, WindowCount};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;
use tokio::sync::watch;

fn parse(payload: &[u8]) -> Option<WindowCount> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some(WindowCount {
        key: v.get("key")?.as_str()?.to_owned(),
        window_start: v.get("window_start")?.as_i64()?,
        window_end: v.get("window_end")?.as_i64()?,
        part: v.get("partial")?.as_str()?.to_owned(),
        count: v.get("count")?.as_i64()?,
    })
}

/// Consumes `topic` until `stop`; each batch is upserted in one database transaction, and its
/// offsets are committed only after that commit. With `instance_id` the consumer is a static
/// member of `group` (see `exactly_kafka::static_membership`).
pub async fn sink_counts(
    url: &str,
    kafka: &exactly_kafka::KafkaSettings,
    topic: &str,
    group: &str,
    instance_id: Option<&str>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut client = exactly_postgres::connect(url).await?;
    ensure_counts_schema(&client).await?;
    let mut config = exactly_kafka::consumer_config(kafka, group);
    exactly_kafka::static_membership(&mut config, instance_id);
    let consumer: StreamConsumer<exactly_kafka::TokenContext> = config
        .create_with_context(exactly_kafka::TokenContext)
        .context("creating the sink consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    loop {
        let first = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return Ok(()),
        };
        let first = match first {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!("sink consumer: {e}");
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < 500 {
            match tokio::time::timeout(Duration::from_millis(20), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        let counts: Vec<WindowCount> = batch
            .iter()
            .filter_map(|m| {
                let parsed = parse(m.payload().unwrap_or_default());
                if parsed.is_none() {
                    tracing::warn!(
                        "{}/{}@{}: not a window result, skipped",
                        m.topic(),
                        m.partition(),
                        m.offset()
                    );
                }
                parsed
            })
            .collect();
        let tx = client.transaction().await.context("begin")?;
        upsert_counts(&tx, &counts).await?;
        tx.commit().await.context("commit counts")?;
        for m in &batch {
            if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
                tracing::debug!("store offset: {e}");
            }
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
            // A lost commit only replays results, which the upsert absorbs.
            tracing::debug!("offset commit: {e}");
        }
    }
}
