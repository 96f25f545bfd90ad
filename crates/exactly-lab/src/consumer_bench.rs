//! `exactly bench consumer`: the idempotent consumer on PostgreSQL with the `record` handler,
//! against the same handler, batching and connection without dedupe, and against itself with
//! one transaction per record, all on the same topic in one run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use exactly_core::{EffectStore, Envelope, IdempotencyKey, UnixMillis};
use exactly_kafka::{ConsumerConfig, ConsumerCounters, IdempotentConsumer};
use exactly_postgres::PgEffects;
use tokio::sync::watch;

use crate::bench::{produce_raw, BenchServices, Figure};
use crate::broker::given_or_local;
use exactly_daemon::handlers::{RecordHandler, RECORD_SCHEMA_PG};

/// Settings of `exactly bench consumer`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerBench {
    #[command(flatten)]
    pub services: BenchServices,
    /// Records on the topic; the batched runs apply all of them.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Records the one-transaction-per-record run applies (it is slow: one fsync each).
    #[arg(long, default_value_t = 3_000)]
    pub unbatched_events: u64,
    /// Records per database transaction in the batched runs.
    #[arg(long, default_value_t = 500)]
    pub max_batch: usize,
    /// Payload size of each event.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
}

pub async fn consumer_bench(options: ConsumerBench) -> Result<()> {
    let run_id = exactly_kafka::now().0;
    let (brokers, _local_broker) = given_or_local(options.services.brokers.as_deref()).await?;
    let kafka = options.services.kafka(&brokers)?;
    let (name, url) = options
        .services
        .fresh_database("exactly_bench_consumer", run_id)
        .await?;
    exactly_postgres::connect(&url)
        .await?
        .batch_execute(RECORD_SCHEMA_PG)
        .await?;
    let (topic, sequenced) = (
        format!("bench-consumer-{run_id}"),
        format!("bench-consumer-seq-{run_id}"),
    );
    exactly_kafka::ensure_topics(&kafka, &[&topic, &sequenced], 3).await?;

    eprintln!(
        "bench: producing {} records to {topic} (UUIDv7 keys) and {sequenced} (sequence keys)",
        options.events
    );
    let payload = format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(options.payload_bytes.saturating_sub(10))
    );
    let envelopes: Vec<Envelope> = (0..options.events)
        .map(|i| Envelope {
            event_id: uuid::Uuid::now_v7(),
            event_type: "Bench".into(),
            aggregate_type: "thing".into(),
            aggregate_id: format!("A-{}", i % 1000),
            occurred_at: UnixMillis(exactly_kafka::now().0),
            payload: payload.clone().into_bytes(),
            headers: vec![],
        })
        .collect();
    let keyed: Vec<_> = envelopes
        .iter()
        .map(|e| (e.to_headers(&IdempotencyKey::UuidV7(e.event_id)), e.clone()))
        .collect();
    produce_raw(&kafka, &topic, &keyed)?;
    let keyed: Vec<_> = envelopes
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let key = IdempotencyKey::Sequence {
                source: "pg:bench".into(),
                value: i as u128 + 1,
            };
            (e.to_headers(&key), e.clone())
        })
        .collect();
    produce_raw(&kafka, &sequenced, &keyed)?;
    drop(keyed);

    let record = || RecordHandler { event_types: vec![] };
    let n = options.events;
    eprintln!(
        "bench: idempotent consumer, key set, batches of up to {}",
        options.max_batch
    );
    let store = PgEffects::connect(&url, "bench-set", record()).await?;
    let set = run(
        store,
        &kafka,
        &topic,
        "bench-set",
        options.max_batch,
        n,
        "idempotent, key set (UUIDv7 keys), batched",
    )
    .await?;
    eprintln!("bench: idempotent consumer, watermarks");
    let store = PgEffects::connect(&url, "bench-watermark", record()).await?;
    let watermark = run(
        store,
        &kafka,
        &sequenced,
        "bench-watermark",
        options.max_batch,
        n,
        "idempotent, watermarks (sequence keys), batched",
    )
    .await?;
    eprintln!("bench: the same consumer without dedupe");
    let store = PgEffects::connect_without_dedupe(&url, "bench-plain", record()).await?;
    let plain = run(
        store,
        &kafka,
        &topic,
        "bench-plain",
        options.max_batch,
        n,
        "same handler, no dedupe, batched",
    )
    .await?;
    let unbatched_events = options.unbatched_events.min(n);
    eprintln!("bench: idempotent consumer, one transaction per record ({unbatched_events} records)");
    let store = PgEffects::connect(&url, "bench-single", record()).await?;
    let single = run(
        store,
        &kafka,
        &topic,
        "bench-single",
        1,
        unbatched_events,
        "idempotent, key set, one transaction per record",
    )
    .await?;

    println!();
    println!(
        "  {} records on 3 partitions, {} B payloads, record handler, PostgreSQL {name}",
        options.events, options.payload_bytes
    );
    for f in [&set, &watermark, &plain, &single] {
        println!(
            "  {:<50} {:>9.0} events/s  ({:>6} in {:.2} s)  {:>5.2}x no-dedupe",
            f.name,
            f.rate(),
            f.events,
            f.seconds,
            f.rate() / plain.rate()
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "\n  goal >= 20,000 events/s: key set {}, watermarks {}",
        verdict(set.rate() >= 20_000.0),
        verdict(watermark.rate() >= 20_000.0)
    );
    println!(
        "  goal >= 0.8x without dedupe: key set {} ({:.2}x), watermarks {} ({:.2}x)",
        verdict(set.rate() >= 0.8 * plain.rate()),
        set.rate() / plain.rate(),
        verdict(watermark.rate() >= 0.8 * plain.rate()),
        watermark.rate() / plain.rate()
    );
    println!(
        "  batching: {:.1}x one transaction per record",
        set.rate() / single.rate()
    );
    Ok(())
}

/// Consumes the topic from the start in group `group` until `events` records are applied.
async fn run<S: EffectStore + 'static>(
    store: S,
    kafka: &exactly_kafka::KafkaSettings,
    topic: &str,
    group: &str,
    max_batch: usize,
    events: u64,
    name: &'static str,
) -> Result<Figure> {
    let mut config = ConsumerConfig::new(kafka, group, &[topic]);
    config.max_batch = max_batch;
    let counters = Arc::new(ConsumerCounters::default());
    let consumer = IdempotentConsumer::new(store, config)?.with_counters(counters.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = tokio::spawn(async move { consumer.run(stop_rx).await });
    // The clock starts at the first record: joining the group is not the consumer's speed.
    let wait_start = Instant::now();
    while counters.delivered.load(Ordering::Relaxed) == 0 {
        if wait_start.elapsed() > Duration::from_secs(60) {
            bail!("{name}: no record within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    while counters.applied.load(Ordering::Relaxed) < events {
        if started.elapsed() > Duration::from_secs(900) {
            bail!("{name}: not done within 900 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let figure = Figure {
        name,
        events,
        seconds: started.elapsed().as_secs_f64(),
    };
    let _ = stop_tx.send(true);
    running.await??;
    Ok(figure)
}
