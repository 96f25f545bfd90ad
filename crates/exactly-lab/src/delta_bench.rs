//! `exactly bench sink-delta`: the Delta sink's rate into a local table against a plain read
//! of the same topic (read_committed, every record's headers decoded), in one run, and the
//! Parquet bytes it writes per record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exactly_core::{Envelope, IdempotencyKey, UnixMillis};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::watch;

use crate::bench::{produce_raw, BenchServices};
use crate::broker::given_or_local;

/// Settings of `exactly bench sink-delta`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeltaBench {
    #[command(flatten)]
    pub services: BenchServices,
    /// Records on the topic (3 partitions).
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Payload size of each event (JSON).
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// The sink appends every this many records (its flush interval is long enough never to
    /// cut an append short).
    #[arg(long, default_value_t = 50_000)]
    pub flush_records: usize,
}

pub async fn delta_bench(options: DeltaBench) -> Result<()> {
    let run_id = exactly_kafka::now().0;
    let (brokers, _local_broker) = given_or_local(options.services.brokers.as_deref()).await?;
    let kafka = options.services.kafka(&brokers)?;
    let topic = format!("bench-delta-{run_id}");
    exactly_kafka::ensure_topics(&kafka, &[&topic], 3).await?;
    let payload = format!(
        "{{\"amount\":12.5,\"pad\":\"{}\"}}",
        "x".repeat(options.payload_bytes.saturating_sub(27))
    );
    let records: Vec<_> = (0..options.events)
        .map(|i| {
            let e = Envelope {
                event_id: uuid::Uuid::now_v7(),
                event_type: "OrderPlaced".into(),
                aggregate_type: "order".into(),
                aggregate_id: format!("O-{}", i % 5000),
                occurred_at: UnixMillis(exactly_kafka::now().0),
                payload: payload.clone().into_bytes(),
                headers: vec![],
            };
            (e.to_headers(&IdempotencyKey::UuidV7(e.event_id)), e)
        })
        .collect();
    eprintln!("bench: producing {} records to {topic}", options.events);
    produce_raw(&kafka, &topic, &records)?;
    drop(records);

    let (k, t, n) = (kafka.clone(), topic.clone(), options.events);
    let read = tokio::task::spawn_blocking(move || plain_read(&k, &t, n, run_id)).await??;

    let dir = tempfile::tempdir().context("a directory for the table")?;
    let table = dir.path().join("bench");
    let config = exactly_delta::SinkConfig {
        kafka: kafka.clone(),
        topics: vec![topic.clone()],
        table_uri: table.to_string_lossy().into_owned(),
        storage_options: Default::default(),
        name: format!("bench-delta-sink-{run_id}"),
        group: format!("bench-delta-sink-{run_id}"),
        instance_id: None,
        layout: exactly_delta::Layout {
            input: exactly_delta::InputKind::Envelope,
            columns: Vec::new(),
            partition_by: Some(exactly_delta::EVENT_DATE.into()),
        },
        flush_records: options.flush_records.max(1),
        flush_interval: Duration::from_secs(600),
        target_file_size: 128 * 1024 * 1024,
        dedupe_horizon_ms: 3_600_000,
        dead_letter_topic: format!("bench-delta-dead-{run_id}"),
        faults: exactly_kafka::Faults::none(),
    };
    let counters = Arc::new(exactly_delta::SinkCounters::default());
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(exactly_delta::run(config, counters.clone(), stop));
    // From the first append on: the group join before it is the broker's, not the sink's.
    let (mut first, deadline) = (None, Instant::now() + Duration::from_secs(900));
    loop {
        let written = counters.written.load(Ordering::Relaxed);
        if written > 0 && first.is_none() {
            first = Some((Instant::now(), written));
        }
        if written >= options.events {
            break;
        }
        if running.is_finished() || Instant::now() > deadline {
            bail!("the sink wrote {written} of {} records", options.events);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ((started, at_first), ended) = (first.unwrap_or((Instant::now(), 0)), Instant::now());
    let _ = stop_tx.send(true);
    running.await??;
    let sink = (options.events - at_first) as f64 / ended.duration_since(started).as_secs_f64().max(1e-9);
    let bytes = counters.bytes.load(Ordering::Relaxed) as f64;
    let files = counters.files.load(Ordering::Relaxed);
    println!("exactly bench sink-delta: {} records of {} payload bytes, 3 partitions, appends of {} records; one machine (2 cores shared by the broker and exactly)", options.events, options.payload_bytes, options.flush_records);
    println!("| run | records/s | vs plain read |");
    println!("|---|---:|---:|");
    println!("| plain read (read_committed, headers decoded) | {read:.0} | 1.00 |");
    println!(
        "| exactly sink delta (envelope columns + JSON payload) | {sink:.0} | {:.2} |",
        sink / read.max(1e-9)
    );
    println!(
        "Parquet: {:.1} bytes per record ({} files, {:.1} MiB; payload {} bytes per record before compression)",
        bytes / options.events as f64,
        files,
        bytes / 1_048_576.0,
        options.payload_bytes
    );
    Ok(())
}

/// Reads every record of `topic` once and decodes its headers, as the sink does first; records
/// per second from the first record to the last.
fn plain_read(kafka: &exactly_kafka::KafkaSettings, topic: &str, events: u64, run_id: i64) -> Result<f64> {
    let consumer: BaseConsumer =
        exactly_kafka::reader_config(kafka, &format!("bench-delta-read-{run_id}"), "read_committed")
            .create()
            .context("plain reader")?;
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let (mut read, mut started) = (0u64, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while read < events && Instant::now() < deadline {
        let m = match consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => continue,
            Some(m) => m?,
        };
        started.get_or_insert_with(Instant::now);
        if exactly_kafka::decode_message(&m).is_ok() {
            read += 1;
        }
    }
    if read < events {
        bail!("the plain read got {read} of {events} records within 600 s");
    }
    Ok(read as f64 / started.map_or(1e-9, |s| s.elapsed().as_secs_f64()))
}
