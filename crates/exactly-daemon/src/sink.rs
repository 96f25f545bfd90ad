//! The PostgreSQL sinks of stream results: `exactly sink-counts` (the built-in job's partial
//! counts into `order_counts`, the larger count winning) and `exactly sink postgres` (any
//! results topic into a table the user names, one row per key, positions kept in the table's
//! database so each record takes effect once).

use std::time::Duration;

use anyhow::{Context, Result};
use exactly_postgres::counts::{ensure_counts_schema, upsert_counts, WindowCount};
use exactly_postgres::upsert::{SinkRecord, UpsertSink, UpsertSpec};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
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

/// A sink's consumer of `topics` in `group` (read_committed, offsets committed by hand), a
/// static member when `instance_id` is given (see `exactly_kafka::static_membership`).
fn subscribe(
    kafka: &exactly_kafka::KafkaSettings,
    topics: &[&str],
    group: &str,
    instance_id: Option<&str>,
) -> Result<StreamConsumer<exactly_kafka::TokenContext>> {
    let mut config = exactly_kafka::consumer_config(kafka, group);
    exactly_kafka::static_membership(&mut config, instance_id);
    let consumer: StreamConsumer<exactly_kafka::TokenContext> = config
        .create_with_context(exactly_kafka::TokenContext)
        .context("creating the sink consumer")?;
    consumer.subscribe(topics).context("subscribing")?;
    Ok(consumer)
}

/// The next batch: what arrives within 20 ms of the first record, at most 500; `None` once
/// `stop` is set.
async fn next_batch(
    consumer: &StreamConsumer<exactly_kafka::TokenContext>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<OwnedMessage>> {
    let first = loop {
        let first = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return None,
        };
        match first {
            Ok(m) => break m.detach(),
            Err(e) => tracing::warn!("sink consumer: {e}"),
        }
    };
    let mut batch = vec![first];
    while batch.len() < 500 {
        match tokio::time::timeout(Duration::from_millis(20), consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            _ => break,
        }
    }
    Some(batch)
}

/// Commits the batch's offsets to the group, after the database commit: the group never
/// runs ahead of the database.
fn commit_offsets(consumer: &StreamConsumer<exactly_kafka::TokenContext>, batch: &[OwnedMessage]) {
    for m in batch {
        if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
            tracing::debug!("store offset: {e}");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
        // A lost commit only reads records again, which the sinks absorb.
        tracing::debug!("offset commit: {e}");
    }
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
    let consumer = subscribe(kafka, &[topic], group, instance_id)?;
    while let Some(batch) = next_batch(&consumer, &mut stop).await {
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
        commit_offsets(&consumer, &batch);
    }
    Ok(())
}

/// Where `sink_table` reads and writes.
#[derive(Debug, Clone)]
pub struct TableSink<'a> {
    /// The sink's name: the id of its positions and parked records in the database.
    pub name: &'a str,
    /// The consumer group.
    pub group: &'a str,
    /// The static member id, unless a dynamic member.
    pub instance_id: Option<&'a str>,
    /// The results topics.
    pub topics: &'a [String],
    /// The table and its keys.
    pub spec: UpsertSpec,
}

/// Consumes the topics until `stop`, applying each batch to the table in one transaction with
/// its positions (`exactly_postgres::upsert`); a database error retries the same batch, so a
/// partition never skips a record.
pub async fn sink_table(
    url: &str,
    kafka: &exactly_kafka::KafkaSettings,
    sink: TableSink<'_>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut client = exactly_postgres::connect(url).await?;
    let table = sink.spec.table.clone();
    let upsert = UpsertSink::open(&mut client, sink.name, sink.spec)
        .await
        .with_context(|| format!("the sink {} into {table}", sink.name))?;
    let topics: Vec<&str> = sink.topics.iter().map(String::as_str).collect();
    let consumer = subscribe(kafka, &topics, sink.group, sink.instance_id)?;
    tracing::info!(
        "sink {}: {} into PostgreSQL table {table}",
        sink.name,
        topics.join(", ")
    );
    let labels = |outcome: &'static str| [("sink", sink.name.to_owned()), ("outcome", outcome.to_owned())];
    while let Some(batch) = next_batch(&consumer, &mut stop).await {
        let records: Vec<SinkRecord<'_>> = batch
            .iter()
            .map(|m| SinkRecord {
                topic: m.topic(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
            })
            .collect();
        let applied = loop {
            match upsert.apply(&mut client, &records).await {
                Ok(applied) => break applied,
                Err(e) => {
                    tracing::warn!("sink {}: {e}; the batch is applied again", sink.name);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                    if client.is_closed() {
                        match exactly_postgres::connect(url).await {
                            Ok(c) => client = c,
                            Err(e) => tracing::warn!("sink {}: {e}", sink.name),
                        }
                    }
                }
            }
        };
        metrics::counter!("exactly_sink_rows_total", &labels("upserted")).increment(applied.upserted as u64);
        metrics::counter!("exactly_sink_rows_total", &labels("deleted")).increment(applied.deleted as u64);
        metrics::counter!("exactly_sink_rows_total", &labels("parked")).increment(applied.parked as u64);
        metrics::counter!("exactly_sink_rows_total", &labels("replayed")).increment(applied.replayed as u64);
        commit_offsets(&consumer, &batch);
    }
    Ok(())
}

/// `exactly sink postgres`: the sink of `settings`, its group and positions named after it.
pub async fn postgres_sink(
    settings: &crate::settings::PgSinkSettings,
    kafka: &exactly_kafka::KafkaSettings,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let instance = settings.instance_id();
    let sink = TableSink {
        name: &settings.name,
        group: &settings.name,
        instance_id: instance.as_deref(),
        topics: &settings.topics,
        spec: settings.spec(),
    };
    sink_table(&settings.database, kafka, sink, stop).await
}
