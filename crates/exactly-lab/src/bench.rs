//! `exactly bench relay`: WAL relay catch-up against raw librdkafka produce of the same records
//! to the same broker, measured in one run, and the polling relay on the same rows.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exactly_core::{Envelope, IdempotencyKey, UnixMillis};
use exactly_kafka::{ExactlyOnce, Relay, RelayConfig, WalRelay, WalRelayConfig, WalRelayCounters};
use exactly_postgres::{PgChangeFeed, PgOutbox, WalConfig};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::sync::watch;

use crate::broker::given_or_local;
use crate::demo::with_database;

/// Settings of `exactly bench relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayBench {
    #[command(flatten)]
    pub services: BenchServices,
    /// Events per measured run.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Payload size of each event.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Events for the one-row-per-transaction polling relay (the baseline; it is slow).
    #[arg(long, default_value_t = 3_000)]
    pub baseline_events: u64,
}

/// Where a benchmark runs: a PostgreSQL server (each run makes a fresh database on it) and a
/// broker (started for the run unless given).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchServices {
    /// The PostgreSQL server (a fresh database is created on it).
    #[arg(
        long,
        env = "EXACTLY_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database: String,
    /// Use this broker instead of starting one.
    #[arg(long, env = "EXACTLY_BENCH_BROKERS")]
    pub brokers: Option<String>,
    /// A librdkafka property for every client the bench makes (repeatable), as the other
    /// commands take it: security settings for a real cluster, or a tuning to compare (say
    /// linger.ms=1). exactly's own guarantees (acks, idempotence, isolation…) are refused.
    #[arg(long = "kafka-property", value_name = "NAME=VALUE", value_parser = exactly_kafka::parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

impl BenchServices {
    /// How the bench's clients reach `brokers`, with the properties given.
    pub(crate) fn kafka(&self, brokers: &str) -> Result<exactly_kafka::KafkaSettings> {
        Ok(exactly_kafka::KafkaSettings::checked(
            brokers,
            self.kafka_properties.iter().cloned(),
        )?)
    }

    /// A new database named `<prefix>_<run_id>` on the server: its name and URL.
    pub(crate) async fn fresh_database(&self, prefix: &str, run_id: i64) -> Result<(String, String)> {
        let name = format!("{prefix}_{run_id}");
        exactly_postgres::connect(&self.database)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("creating the bench database")?;
        let url = with_database(&self.database, &name);
        Ok((name, url))
    }
}

/// One measured run.
pub(crate) struct Figure {
    pub(crate) name: &'static str,
    pub(crate) events: u64,
    pub(crate) seconds: f64,
}

impl Figure {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

pub async fn relay_bench(options: RelayBench) -> Result<()> {
    let run_id = exactly_kafka::now().0;
    let (brokers, _local_broker) = given_or_local(options.services.brokers.as_deref()).await?;
    let kafka = options.services.kafka(&brokers)?;
    let (name, url) = options.services.fresh_database("exactly_bench", run_id).await?;
    let mut wal_config = WalConfig::new(&url);
    // Rows stay NEW after the WAL run, so the polling relay can publish the same rows next.
    wal_config.mark_sent = false;
    exactly_postgres::wal::ensure_slot(&wal_config).await?;
    // A second slot sees the same commits, for the exactly-once relay's run.
    let mut eos_config = wal_config.clone();
    eos_config.slot = format!("{}_eos", wal_config.slot);
    exactly_postgres::wal::ensure_slot(&eos_config).await?;
    let client = exactly_postgres::connect(&url).await?;

    let (raw_topic, wal_topic, poll_topic) = (
        format!("bench-raw-{run_id}"),
        format!("bench-wal-{run_id}"),
        format!("bench-poll-{run_id}"),
    );
    exactly_kafka::ensure_topics(&kafka, &[&raw_topic, &wal_topic, &poll_topic], 3).await?;

    eprintln!(
        "bench: inserting {} outbox rows ({} B payloads) into {name}",
        options.events, options.payload_bytes
    );
    let payload = format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(options.payload_bytes.saturating_sub(10))
    );
    let per_txn = 100u64;
    let mut inserted = 0u64;
    while inserted < options.events {
        let n = per_txn.min(options.events - inserted) as i64;
        client
            .execute(
                "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
                 SELECT gen_random_uuid(), 'Bench', 'thing', 'A-' || (g % 1000), $1, convert_to($2, 'UTF8'), now()
                 FROM generate_series(1, $3::bigint) g",
                &[&wal_topic, &payload, &n],
            )
            .await
            .context("inserting bench rows")?;
        inserted += n as u64;
    }

    // 1. Raw librdkafka: the same records (key, payload, headers), same settings.
    let rows = client
        .query(
            "SELECT event_id::text, aggregate_id, payload, (extract(epoch from occurred_at) * 1000)::bigint FROM outbox ORDER BY id",
            &[],
        )
        .await?;
    let mut records = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let event_id: String = row.get(0);
        let envelope = Envelope {
            event_id: uuid::Uuid::try_parse(&event_id)?,
            event_type: "Bench".into(),
            aggregate_type: "thing".into(),
            aggregate_id: row.get(1),
            occurred_at: UnixMillis(row.get(3)),
            payload: row.get(2),
            headers: vec![],
        };
        let key = IdempotencyKey::Sequence {
            source: "pg:bench".into(),
            value: i as u128,
        };
        records.push((envelope.to_headers(&key), envelope));
    }
    drop(rows);
    eprintln!("bench: raw librdkafka produce");
    let raw = produce_raw(&kafka, &raw_topic, &records)?;

    // 2. The WAL relay catching up on the slot.
    eprintln!("bench: WAL relay catch-up");
    let feed = PgChangeFeed::connect(wal_config.clone()).await?;
    let counters = Arc::new(WalRelayCounters::default());
    let relay = WalRelay::new(feed, WalRelayConfig::new(&kafka))?.with_counters(counters.clone());
    let wal = catch_up(
        relay,
        &counters,
        options.events,
        "WAL relay (catch-up, acked + confirmed)",
    )
    .await?;
    exactly_postgres::wal::drop_slot(&url, &wal_config.slot).await?;

    // 3. The exactly-once WAL relay on the second slot: one Kafka transaction per 100 ms.
    eprintln!("bench: exactly-once WAL relay catch-up");
    let feed = PgChangeFeed::connect(eos_config.clone()).await?;
    let eos_counters = Arc::new(WalRelayCounters::default());
    let relay = WalRelay::new(feed, WalRelayConfig::new(&kafka))?.with_counters(eos_counters.clone());
    let mut settings = ExactlyOnce::for_source(relay.source());
    settings.progress_topic = format!("bench-progress-{run_id}");
    let relay = relay.exactly_once(settings).await?;
    let eos = catch_up(
        relay,
        &eos_counters,
        options.events,
        "exactly-once WAL relay (100 ms transactions)",
    )
    .await?;
    exactly_postgres::wal::drop_slot(&url, &eos_config.slot).await?;

    // 4. The polling relay over the same rows (still NEW): claim, publish and settle
    //    overlapping (`run`), then one round at a time (`run_once`), then the outbox pattern's
    //    textbook relay, one row per transaction, on the first `baseline_events` rows.
    eprintln!("bench: polling relay");
    reset_outbox(&client, &poll_topic, i64::MAX).await?;
    let mut config = RelayConfig::new(&kafka);
    config.batch_size = 2_000;
    let poll = poll_overlapped(&url, config.clone(), options.events).await?;
    eprintln!("bench: polling relay, one round at a time");
    reset_outbox(&client, &poll_topic, i64::MAX).await?;
    let poll_sequential = poll_rounds(
        &url,
        config.clone(),
        options.events,
        "polling relay, rounds not overlapped",
    )
    .await?;
    eprintln!("bench: polling relay, one row per transaction");
    let baseline_events = options.baseline_events.min(options.events);
    reset_outbox(&client, &poll_topic, baseline_events as i64).await?;
    config.batch_size = 1;
    let poll_one = poll_rounds(
        &url,
        config,
        baseline_events,
        "polling relay, one row per transaction",
    )
    .await?;

    println!();
    println!(
        "  {} events, {} B payloads, broker {brokers}, PostgreSQL {name}",
        options.events, options.payload_bytes
    );
    for f in [&raw, &wal, &eos, &poll, &poll_sequential, &poll_one] {
        println!(
            "  {:<44} {:>9.0} events/s  ({:.2} s)  {:>5.2}x raw",
            f.name,
            f.rate(),
            f.seconds,
            f.rate() / raw.rate()
        );
    }
    println!(
        "\n  WAL relay goal: >= 50,000 events/s and >= 0.5x raw: {}",
        if wal.rate() >= 50_000.0 && wal.rate() >= 0.5 * raw.rate() {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  polling relay goal: >= 30,000 events/s and >= 10x one row per transaction ({:.1}x): {}",
        poll.rate() / poll_one.rate(),
        if poll.rate() >= 30_000.0 && poll.rate() >= 10.0 * poll_one.rate() {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  exactly-once relay vs WAL relay: {:.2}x (goal >= 0.9x at 100 ms): {}",
        eos.rate() / wal.rate(),
        if eos.rate() >= 0.9 * wal.rate() {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

/// Makes the first `rows` outbox rows NEW again, for `topic` (the others SENT).
async fn reset_outbox(client: &tokio_postgres::Client, topic: &str, rows: i64) -> Result<()> {
    client
        .execute(
            "UPDATE outbox SET topic = $1, lease_owner = NULL, retry_count = 0, sent_at = NULL,
                    next_retry_at = now() - interval '1 s',
                    status = CASE WHEN id - (SELECT min(id) FROM outbox) < $2 THEN 'NEW' ELSE 'SENT' END",
            &[&topic, &rows],
        )
        .await
        .context("resetting the bench rows")?;
    client.batch_execute("VACUUM ANALYZE outbox").await?;
    Ok(())
}

/// The polling relay's `run` (claim, publish and settle overlapping) until `events` are acked.
async fn poll_overlapped(url: &str, config: RelayConfig, events: u64) -> Result<Figure> {
    let counters = Arc::new(exactly_kafka::RelayCounters::default());
    let mut relay = Relay::new(PgOutbox::connect(url).await?, config)?.with_counters(counters.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let running = tokio::spawn(async move { relay.run(stop_rx).await });
    while counters.published.load(Ordering::Relaxed) < events {
        if started.elapsed() > Duration::from_secs(600) || running.is_finished() {
            bail!(
                "the polling relay stalled at {}",
                counters.published.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let figure = Figure {
        name: "polling relay (claim, publish, settle overlap)",
        events,
        seconds: started.elapsed().as_secs_f64(),
    };
    let _ = stop_tx.send(true);
    running.await??;
    Ok(figure)
}

/// The polling relay one round at a time (`run_once`) until `events` are SENT.
async fn poll_rounds(url: &str, config: RelayConfig, events: u64, name: &'static str) -> Result<Figure> {
    let mut relay = Relay::new(PgOutbox::connect(url).await?, config)?;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < events {
        let report = relay.run_once().await?;
        sent += report.sent as u64;
        if report.claimed == 0 && started.elapsed() > Duration::from_secs(600) {
            bail!("{name} stalled at {sent}");
        }
    }
    Ok(Figure {
        name,
        events: sent,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs `relay` until it has confirmed `events` events and measures how long that took.
async fn catch_up(
    mut relay: WalRelay<PgChangeFeed>,
    counters: &WalRelayCounters,
    events: u64,
    name: &'static str,
) -> Result<Figure> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let running = tokio::spawn(async move { relay.run(stop_rx).await });
    while counters.events.load(Ordering::Relaxed) < events {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{name} did not catch up within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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

/// A record as the relay would send it: its headers and its event.
pub(crate) type PreparedRecord = (Vec<(String, Vec<u8>)>, Envelope);

/// Produces `records` as fast as librdkafka takes them and measures until all are acked.
pub(crate) fn produce_raw(
    kafka: &exactly_kafka::KafkaSettings,
    topic: &str,
    records: &[PreparedRecord],
) -> Result<Figure> {
    let producer: ThreadedProducer<_> = exactly_kafka::producer_config(kafka, true)
        .set("message.timeout.ms", "0")
        .create()
        .context("creating the raw producer")?;
    let started = Instant::now();
    for (headers, envelope) in records {
        let owned = exactly_kafka::record_headers(headers);
        let mut record = BaseRecord::to(topic)
            .key(envelope.aggregate_id.as_bytes())
            .payload(&envelope.payload)
            .headers(owned)
            .timestamp(envelope.occurred_at.0);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, returned)) => {
                    if !matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ) {
                        bail!("raw produce failed: {e}");
                    }
                    record = returned;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .context("flushing raw records")?;
    Ok(Figure {
        name: "raw librdkafka produce (same records)",
        events: records.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}
