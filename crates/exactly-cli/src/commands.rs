//! `exactly relay`, `exactly consume`, `exactly status`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use exactly_core::{Delivery, EffectStore, HandlerError, KeyMode, OutboxStore};
use exactly_kafka::{
    ConsumerConfig, ExactlyOnce, FaultPoint, Faults, IdempotentConsumer, Relay, RelayConfig, WalRelay,
    WalRelayConfig,
};
use exactly_postgres::{PgChangeFeed, PgEffects, PgHandler, PgOutbox, WalConfig};
use exactly_sqlite::{SqliteEffects, SqliteHandler, SqliteOutbox};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::backend::StoryHandler;
use crate::settings::{ConsumeSettings, Keys, OutboxMode, RelayMode, RelaySettings, StreamSettings};
use crate::story::StoryConsumer;
use crate::telemetry::{
    broker_probe, consumer_probe, database_probe, outbox_gauges, register_metrics, slot_gauges,
    ComponentKind, SlotLimits,
};

/// A database argument: a `postgres://` URL or a SQLite file path.
#[derive(Debug, Clone)]
pub enum Database {
    Postgres(String),
    Sqlite(PathBuf),
}

impl Database {
    pub fn parse(text: &str) -> Database {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Database::Postgres(text.to_owned())
        } else {
            Database::Sqlite(PathBuf::from(text.strip_prefix("sqlite://").unwrap_or(text)))
        }
    }
}

/// Stops on SIGINT/SIGTERM.
pub fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// Kills this process with SIGKILL at the `n`-th time `point` is reached: a real crash, no
/// destructors, no flush, for tests.
pub fn kill_at(point: FaultPoint, n: Option<u64>) -> Faults {
    let Some(n) = n else { return Faults::none() };
    let seen = std::sync::atomic::AtomicU64::new(0);
    Faults::new(move |p| {
        if p == point && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
            let _ = std::process::Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
        }
        false
    })
}

/// Like [`kill_at`], for several points at once.
pub fn kill_at_points(points: Vec<(FaultPoint, Option<u64>)>) -> Faults {
    let points: Vec<(FaultPoint, u64, std::sync::atomic::AtomicU64)> = points
        .into_iter()
        .filter_map(|(p, n)| n.map(|n| (p, n, std::sync::atomic::AtomicU64::new(0))))
        .collect();
    if points.is_empty() {
        return Faults::none();
    }
    Faults::new(move |at| {
        for (point, n, seen) in &points {
            if *point == at && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == *n {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(5));
            }
        }
        false
    })
}

/// What a component does about metrics: nothing, or the gauges of its database under its
/// name (the listener is the process's, served once by the caller).
#[derive(Debug, Clone)]
pub enum Gauges {
    Off,
    /// `name` labels the gauges; `component` names it in /readyz and /healthz.
    On {
        name: String,
        component: String,
    },
}

impl Gauges {
    /// Declares the component's readiness aspects and starts the broker probe (every
    /// component talks to the broker), and exports its counters from zero; the other aspects'
    /// probes are the caller's.
    fn start_probes(&self, kafka: &exactly_kafka::KafkaSettings, aspects: &[&str], kind: ComponentKind) {
        if let Gauges::On { component, .. } = self {
            register_metrics(kind);
            crate::health::global().register(component, aspects);
            tokio::spawn(broker_probe(kafka.clone(), component.clone()));
        }
    }
}

/// Fails a command at start when Kafka refuses its TLS or login settings.
pub async fn check_kafka(kafka: &exactly_kafka::KafkaSettings) -> Result<()> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || exactly_kafka::check_connection(&kafka, Duration::from_secs(5)))
        .await
        .context("Kafka connection check")??;
    Ok(())
}

/// One relay, polling or WAL by its settings, until `stop`.
pub async fn relay(
    settings: RelaySettings,
    kafka: &exactly_kafka::KafkaSettings,
    gauges: Gauges,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    match settings.mode {
        RelayMode::Poll => poll_relay(settings, kafka, gauges, stop).await,
        RelayMode::Wal => wal_relay(settings, kafka, gauges, stop).await,
    }
}

async fn poll_relay(
    settings: RelaySettings,
    kafka: &exactly_kafka::KafkaSettings,
    gauges: Gauges,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut config = RelayConfig::new(kafka);
    config.batch_size = settings.batch_size;
    config.lease_ms = settings.lease_ms;
    config.poll_interval = Duration::from_millis(settings.poll_ms);
    config.retry.max_retries = settings.max_retries;
    let faults = kill_at(
        FaultPoint::RelayAfterPublishBeforeSettle,
        settings.kill_after_publish,
    );
    let sequence_keys = settings.keys == Keys::Sequence;
    match settings.database()? {
        Database::Sqlite(path) => {
            if sequence_keys {
                bail!("--keys sequence needs PostgreSQL: on SQLite use event-id keys");
            }
            gauges.start_probes(kafka, &["database", "broker"], ComponentKind::PollRelay);
            if let Gauges::On { name, component } = gauges {
                let store = SqliteOutbox::open(&path)?;
                tokio::spawn(async move {
                    outbox_gauges(&store, &name, &component, Duration::from_secs(1)).await
                });
            }
            run_relay(
                SqliteOutbox::open(&path)?,
                config,
                faults,
                settings.exit_when_idle,
                stop,
            )
            .await
        }
        Database::Postgres(url) => {
            let store = if sequence_keys {
                let store = PgOutbox::connect_as_sequence_leader(&url, Duration::from_millis(500)).await?;
                config.keys = KeyMode::Sequence {
                    source: store.sequence_source().await?,
                };
                store
            } else {
                PgOutbox::connect(&url).await?
            };
            gauges.start_probes(kafka, &["database", "broker"], ComponentKind::PollRelay);
            if let Gauges::On { name, component } = gauges {
                let store = PgOutbox::connect(&url).await?;
                tokio::spawn(async move {
                    outbox_gauges(&store, &name, &component, Duration::from_secs(1)).await
                });
            }
            run_relay(store, config, faults, settings.exit_when_idle, stop).await
        }
    }
}

async fn run_relay<S: OutboxStore + 'static>(
    store: S,
    config: RelayConfig,
    faults: Faults,
    exit_when_idle: bool,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut relay = Relay::new(store, config)?.with_faults(faults);
    if exit_when_idle {
        // For scripts and tests: drain what is claimable now, then stop.
        while relay.run_once().await?.claimed > 0 {}
        relay.flush(Duration::from_secs(10));
        return Ok(());
    }
    relay.run(stop).await.context("relay stopped")
}

/// How a command reaches Kafka: the bootstrap servers and librdkafka properties passed
/// through (security, timeouts). The settings exactly-once depends on are refused here.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, host:port[,host:port…].
    #[arg(long, env = "EXACTLY_BROKERS")]
    pub brokers: String,
    /// A librdkafka property (repeatable), e.g. security.protocol=SASL_SSL. A value env:NAME is
    /// read from the environment variable NAME: give secrets that way, never on the command
    /// line. acks, enable.idempotence, isolation.level, enable.auto.commit, max.in.flight and
    /// transactional.id are exactly's own and are refused.
    #[arg(long = "kafka-property", value_name = "NAME=VALUE", value_parser = exactly_kafka::parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The settings, every environment reference checked.
    pub fn settings(&self) -> Result<exactly_kafka::KafkaSettings> {
        let settings = exactly_kafka::KafkaSettings {
            brokers: self.brokers.clone(),
            properties: self.kafka_properties.iter().cloned().collect(),
        };
        settings.validate()?;
        Ok(settings)
    }
}

async fn wal_relay(
    settings: RelaySettings,
    kafka: &exactly_kafka::KafkaSettings,
    gauges: Gauges,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let Database::Postgres(url) = settings.database()? else {
        bail!("the wal mode follows PostgreSQL logical replication: the database must be postgres://…");
    };
    let mut feed_config = WalConfig::new(&url);
    if let Some(slot) = &settings.slot {
        feed_config.slot = slot.clone();
    }
    feed_config.publication = settings.publication.clone();
    feed_config.heartbeat_interval = Duration::from_millis(settings.heartbeat_ms);
    feed_config.mark_sent = settings.outbox == OutboxMode::Keep;
    let slot = feed_config.slot.clone();
    let feed = PgChangeFeed::connect(feed_config)
        .await
        .with_context(|| format!("starting replication from slot {slot}"))?;
    let kind = if settings.exactly_once {
        ComponentKind::ExactlyOnceRelay
    } else {
        ComponentKind::WalRelay
    };
    gauges.start_probes(kafka, &["database", "broker", "slot"], kind);
    if let Gauges::On { name, component } = gauges {
        let client = exactly_postgres::connect(&url).await?;
        let store = PgOutbox::connect(&url).await?;
        let (source, slot_component) = (name.clone(), component.clone());
        let limits = SlotLimits {
            max_retained_bytes: settings.max_retained_wal.as_u64(),
            max_lag_bytes: settings.max_lag.as_u64(),
        };
        tokio::spawn(async move { outbox_gauges(&store, &name, &component, Duration::from_secs(1)).await });
        tokio::spawn(async move {
            slot_gauges(
                &client,
                &source,
                &slot,
                &slot_component,
                limits,
                Duration::from_secs(1),
            )
            .await
        });
    }
    let mut points = vec![(
        FaultPoint::RelayAfterPublishBeforeSettle,
        settings.kill_after_publish,
    )];
    let mut relay = WalRelay::new(feed, WalRelayConfig::new(kafka))?;
    if settings.exactly_once {
        points.extend([
            (FaultPoint::EosBeforeCommit, settings.kill_before_commit),
            (
                FaultPoint::EosAfterCommitBeforeConfirm,
                settings.kill_after_commit,
            ),
            (FaultPoint::EosDuringAbort, settings.kill_during_abort),
        ]);
        let mut eos = ExactlyOnce::for_source(relay.source());
        eos.progress_topic = settings.progress_topic.clone();
        eos.replication_factor = settings.replication_factor;
        eos.min_insync_replicas = settings.min_insync_replicas;
        eos.commit_interval = Duration::from_millis(settings.commit_interval_ms);
        eos.max_batch_events = settings.batch_events;
        eos.abort_every = settings.abort_every;
        relay = relay.exactly_once(eos).await?;
    }
    let mut relay = relay.with_faults(kill_at_points(points));
    relay.run(stop).await.context("wal relay stopped")
}

/// `exactly stream`: runs one processor until SIGINT/SIGTERM, and with `sink_database` the
/// UPSERT sink of its results beside it.
pub async fn stream(
    settings: StreamSettings,
    kafka: &exactly_kafka::KafkaSettings,
    gauges: Gauges,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    gauges.start_probes(kafka, &["broker"], ComponentKind::Stream);
    let config = settings.config(kafka)?;
    let partitions = settings.partitions;
    config
        .prepare_topics(partitions)
        .await
        .with_context(|| format!("preparing topics on {}", config.kafka.brokers))?;
    let sink = settings.sink_database.map(|url| {
        let (kafka, topic) = (config.kafka.clone(), config.output.clone());
        let group = format!("{}-sink", config.application_id);
        let stop = stop.clone();
        tokio::spawn(async move { crate::sink::sink_counts(&url, &kafka, &topic, &group, stop).await })
    });
    let counters = std::sync::Arc::new(exactly_stream::StreamCounters::default());
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(*stop.borrow()));
    let flag = stop_flag.clone();
    let mut signal = stop;
    tokio::spawn(async move {
        while !*signal.borrow() {
            if signal.changed().await.is_err() {
                break;
            }
        }
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    tokio::task::spawn_blocking(move || {
        let mut processor = exactly_stream::Processor::new(config, counters)?;
        processor.run(&stop_flag)
    })
    .await
    .context("stream processor task")?
    .context("stream processor stopped")?;
    if let Some(sink) = sink {
        sink.await.context("sink task")?.context("sink stopped")?;
    }
    Ok(())
}

/// The built-in handler of `exactly consume --handler record`: one row per event in
/// `exactly_consumed` (no unique key, so an event applied twice shows as two rows; applied_seq
/// is the order of application). The payload must be JSON, and with `event_types` set the event
/// type one of them; anything else is parked with the reason.
#[derive(Debug, Clone, Default)]
pub struct RecordHandler {
    pub event_types: Vec<String>,
}

pub const RECORD_SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS exactly_consumed (
    applied_seq INTEGER PRIMARY KEY, consumer TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL, occurred_at BIGINT NOT NULL, payload TEXT NOT NULL)";

pub const RECORD_SCHEMA_PG: &str = "CREATE TABLE IF NOT EXISTS exactly_consumed (
    applied_seq BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL, occurred_at BIGINT NOT NULL, payload TEXT NOT NULL)";

impl RecordHandler {
    fn check(&self, delivery: &Delivery) -> Result<String, HandlerError> {
        let event_type = &delivery.envelope.event_type;
        if !self.event_types.is_empty() && !self.event_types.iter().any(|t| t == event_type) {
            return Err(HandlerError::Rejected(format!(
                "unknown event type {event_type:?}"
            )));
        }
        decode_json(delivery)
    }
}

fn decode_json(delivery: &Delivery) -> Result<String, HandlerError> {
    let text = std::str::from_utf8(&delivery.envelope.payload)
        .map_err(|e| HandlerError::Rejected(format!("payload is not UTF-8: {e}")))?;
    serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| HandlerError::Rejected(format!("payload is not JSON: {e}")))?;
    Ok(text.to_owned())
}

const RECORD_INSERT: &str =
    "INSERT INTO exactly_consumed (consumer, event_id, event_type, aggregate_id, occurred_at, payload)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

impl SqliteHandler for RecordHandler {
    fn handle(&self, tx: &rusqlite::Transaction<'_>, d: &Delivery) -> Result<(), HandlerError> {
        let payload = self.check(d)?;
        let e = &d.envelope;
        tx.execute(
            RECORD_INSERT,
            rusqlite::params![
                "record",
                e.event_id.hyphenated().to_string(),
                e.event_type,
                e.aggregate_id,
                e.occurred_at.0,
                payload
            ],
        )
        .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        Ok(())
    }
}

impl PgHandler for RecordHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        d: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let payload = self.check(d)?;
            let e = &d.envelope;
            tx.execute(
                &crate::story::pg_placeholders(RECORD_INSERT),
                &[
                    &"record",
                    &e.event_id.hyphenated().to_string(),
                    &e.event_type,
                    &e.aggregate_id,
                    &e.occurred_at.0,
                    &payload,
                ],
            )
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }

    /// Every event of a batch with one multi-row INSERT, in order.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        deliveries: &'a [&'a Delivery],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let n = deliveries.len();
            let (mut event_ids, mut types, mut aggregates) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut times, mut payloads) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for d in deliveries {
                payloads.push(self.check(d)?);
                let e = &d.envelope;
                event_ids.push(e.event_id.hyphenated().to_string());
                types.push(e.event_type.as_str());
                aggregates.push(e.aggregate_id.as_str());
                times.push(e.occurred_at.0);
            }
            tx.execute(
                "INSERT INTO exactly_consumed (consumer, event_id, event_type, aggregate_id, occurred_at, payload)
                 SELECT 'record', event_id, event_type, aggregate_id, occurred_at, payload
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[]) WITH ORDINALITY
                      AS b(event_id, event_type, aggregate_id, occurred_at, payload, ordinal)
                 ORDER BY ordinal",
                &[&event_ids, &types, &aggregates, &times, &payloads],
            )
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }
}

/// One idempotent consumer until `stop`.
pub async fn consume(
    args: ConsumeSettings,
    kafka: &exactly_kafka::KafkaSettings,
    gauges: Gauges,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    gauges.start_probes(
        kafka,
        &["database", "broker", "partitions", "lag"],
        ComponentKind::Consumer,
    );
    let counters = std::sync::Arc::new(exactly_kafka::ConsumerCounters::default());
    if let Gauges::On { component, .. } = &gauges {
        tokio::spawn(database_probe(args.database()?, component.clone()));
        tokio::spawn(consumer_probe(
            counters.clone(),
            component.clone(),
            args.max_lag_records,
        ));
    }
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    let mut config = ConsumerConfig::new(kafka, &args.group, &topics);
    config.max_batch = args.max_batch.max(1);
    config.dedupe = exactly_core::DedupePolicy {
        retention_ms: args.key_retention_ms,
        horizon_ms: args.key_horizon_ms,
    };
    config.dedupe.validate()?;
    let faults = kill_at(
        FaultPoint::ConsumerAfterApplyBeforeOffsetCommit,
        args.kill_after_apply,
    );
    let consumer_name = args.group.clone();
    let record_handler = RecordHandler {
        event_types: args.event_types.clone(),
    };
    match (&args.database()?, args.handler.as_str()) {
        (Database::Sqlite(path), "record") => {
            exactly_sqlite::open(path)?.execute_batch(RECORD_SCHEMA_SQLITE)?;
            run_consumer(
                SqliteEffects::open(path, &consumer_name, record_handler)?,
                config,
                faults,
                counters.clone(),
                stop,
            )
            .await
        }
        (Database::Postgres(url), "record") => {
            exactly_postgres::connect(url)
                .await?
                .batch_execute(RECORD_SCHEMA_PG)
                .await?;
            run_consumer(
                PgEffects::connect(url, &consumer_name, record_handler).await?,
                config,
                faults,
                counters.clone(),
                stop,
            )
            .await
        }
        (database, name) => {
            let story = name
                .strip_prefix("story-")
                .and_then(StoryConsumer::parse)
                .with_context(|| {
                    format!(
                        "unknown handler {name:?}: use record, story-coupons, story-likes or story-products"
                    )
                })?;
            match database {
                Database::Sqlite(path) => {
                    exactly_sqlite::open(path)?.execute_batch(crate::story::CONSUMER_SCHEMA)?;
                    run_consumer(
                        SqliteEffects::open(path, story.name(), StoryHandler(story))?,
                        config,
                        faults,
                        counters.clone(),
                        stop,
                    )
                    .await
                }
                Database::Postgres(url) => {
                    exactly_postgres::connect(url)
                        .await?
                        .batch_execute(crate::story::CONSUMER_SCHEMA)
                        .await?;
                    run_consumer(
                        PgEffects::connect(url, story.name(), StoryHandler(story)).await?,
                        config,
                        faults,
                        counters.clone(),
                        stop,
                    )
                    .await
                }
            }
        }
    }
}

async fn run_consumer<S: EffectStore>(
    store: S,
    config: ConsumerConfig,
    faults: Faults,
    counters: std::sync::Arc<exactly_kafka::ConsumerCounters>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let consumer = IdempotentConsumer::new(store, config)?
        .with_faults(faults)
        .with_counters(counters);
    consumer.run(stop).await.context("consumer stopped")
}
