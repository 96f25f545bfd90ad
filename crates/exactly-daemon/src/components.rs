//! The components exactly runs, one entry each, built from their settings: [`relay`] (polling
//! or WAL), [`consume`], [`stream`]; [`migrate`] installs the tables without starting anything.
//! `exactly run` and each subcommand call these, and so can your own `main`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use exactly_core::{EffectStore, KeyMode, OutboxStore};
use exactly_kafka::{
    ConsumerConfig, ExactlyOnce, FaultPoint, Faults, IdempotentConsumer, Relay, RelayConfig, WalRelay,
    WalRelayConfig,
};
use exactly_postgres::{PgChangeFeed, PgOutbox, WalConfig};
use exactly_sqlite::SqliteOutbox;
use tokio::sync::watch;

use crate::database::Database;
use crate::handlers::{ConsumerStore, Opening};
use crate::process::{kill_at, kill_at_points};
use crate::settings::{
    ConsumeSettings, DebeziumSettings, Keys, OutboxMode, RelayMode, RelaySettings, StreamSettings,
};
use crate::telemetry::{
    broker_probe, consumer_probe, database_probe, outbox_gauges, register_metrics, slot_gauges,
    ComponentKind, SlotLimits,
};

/// What a component does about metrics: nothing, or the gauges of its database under its
/// name (the listener is the process's, served once by the caller).
#[derive(Debug, Clone)]
pub enum Gauges {
    /// No gauges, no probes (`--no-metrics`).
    Off,
    /// Gauges and readiness probes.
    On {
        /// Labels the gauges (`source` label).
        name: String,
        /// Names it in /readyz and /healthz.
        component: String,
    },
}

impl Gauges {
    /// The component's name in logs: its metrics name, or `default` when metrics are off.
    fn name<'a>(&'a self, default: &'a str) -> &'a str {
        match self {
            Gauges::On { component, .. } => component,
            Gauges::Off => default,
        }
    }

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

/// One relay, polling or WAL by its settings, until `stop`.
pub async fn relay(
    settings: RelaySettings,
    kafka: &exactly_kafka::KafkaSettings,
    gauges: Gauges,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let database = settings.database()?;
    let mode = match (settings.mode, settings.exactly_once) {
        (RelayMode::Poll, _) => "polling",
        (RelayMode::Wal, false) => "WAL",
        (RelayMode::Wal, true) => "exactly-once WAL",
    };
    let keys = match (settings.mode, settings.keys) {
        (RelayMode::Wal, _) => "commit-position keys".to_owned(),
        (RelayMode::Poll, Keys::EventId) => "event-id keys".to_owned(),
        (RelayMode::Poll, Keys::Sequence) => "sequence keys".to_owned(),
    };
    tracing::info!(
        "{}: {mode} relay from {database} to Kafka at {} ({keys}{})",
        gauges.name("relay"),
        kafka.brokers,
        settings
            .slot
            .as_deref()
            .map(|s| format!(", slot {s}"))
            .unwrap_or_default()
    );
    install_debezium_mirror(&database, &settings.debezium).await?;
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

/// A job table's results table, created when absent. Results arrive in their key's partition
/// in order, so the later one wins.
async fn job_results_table(url: &str, table: &str, shape: &exactly_stream::dsl::ResultColumns) -> Result<()> {
    use exactly_stream::dsl::ResultType;
    let client = exactly_postgres::connect(url).await?;
    let columns: Vec<(&str, &str)> = shape
        .columns
        .iter()
        .map(|(name, ty)| {
            let sql = match ty {
                ResultType::Text => "TEXT",
                ResultType::Integer => "BIGINT",
                ResultType::Number => "NUMERIC",
            };
            (*name, sql)
        })
        .collect();
    exactly_postgres::upsert::create_table_if_absent(&client, table, &columns, &shape.key_columns)
        .await
        .with_context(|| format!("creating the results table {table}"))
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
    let what = match &settings.job {
        Some(job) => format!(
            "a job table: {} {:?}, emit {:?}",
            job.aggregate.field(),
            job.window,
            job.emit
        ),
        None => format!(
            "orders per {} per window of {} ms, grace {} ms",
            if settings.group_by.is_empty() {
                "aggregate id"
            } else {
                &settings.group_by
            },
            settings.window_ms,
            settings.grace_ms
        ),
    };
    tracing::info!(
        "{}: stream job {} from {} to {} ({what}) on Kafka at {}",
        gauges.name("stream"),
        settings.application_id,
        config.input,
        config.output,
        kafka.brokers
    );
    let partitions = settings.partitions;
    config
        .prepare_topics(partitions)
        .await
        .with_context(|| format!("preparing topics on {}", config.kafka.brokers))?;
    // Set when the job stops: on a signal, when a stream thread fails, or when the sink does
    // (a sink that cannot write must not leave the job running without it).
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(*stop.borrow()));
    let table = settings.job.as_ref().and_then(|job| {
        let table = job.table.clone()?;
        Some((table, job.result_columns()))
    });
    let sink = settings.sink_database.map(|url| {
        let (kafka, topic) = (config.kafka.clone(), config.output.clone());
        let group = format!("{}-sink", config.application_id);
        // The sink's own static member name, in its own group.
        let instance = config
            .group_instance_id
            .as_ref()
            .map(|_| format!("{group}-{}", config.instance));
        let stop = stop.clone();
        let job_stop = stop_flag.clone();
        let sink = async move {
            let Some((table, shape)) = table else {
                return crate::sink::sink_counts(&url, &kafka, &topic, &group, instance.as_deref(), stop)
                    .await;
            };
            job_results_table(&url, &table, &shape).await?;
            let sink = crate::sink::TableSink {
                name: &group,
                group: &group,
                instance_id: instance.as_deref(),
                topics: std::slice::from_ref(&topic),
                spec: exactly_postgres::upsert::UpsertSpec {
                    table: table.clone(),
                    key_columns: shape.key_columns.iter().map(|c| (*c).to_owned()).collect(),
                    conflict: exactly_core::upsert::Conflict::LastWins,
                    key_fields: shape
                        .key_fields
                        .iter()
                        .map(|(c, f)| ((*c).to_owned(), (*f).to_owned()))
                        .collect(),
                },
            };
            crate::sink::sink_table(&url, &kafka, sink, stop).await
        };
        tokio::spawn(async move {
            let result = sink.await;
            if let Err(e) = &result {
                tracing::error!("the results sink stopped: {e:#}; stopping the stream job");
                job_stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            result
        })
    });
    let counters = std::sync::Arc::new(exactly_stream::StreamCounters::default());
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
    // Kafka Streams' stream threads: each its own member of the group, with its own consumer,
    // transactional producer, tasks and stores; the counters are shared.
    let threads = settings.num_stream_threads.max(1);
    let mut running = Vec::new();
    for n in 0..threads {
        let config = if threads == 1 {
            config.clone()
        } else {
            exactly_stream::StreamConfig {
                instance: format!("{}-{n}", config.instance),
                state_dir: config.state_dir.join(format!("thread-{n}")),
                group_instance_id: config.group_instance_id.as_ref().map(|id| format!("{id}-{n}")),
                ..config.clone()
            }
        };
        let (counters, stop_flag) = (counters.clone(), stop_flag.clone());
        running.push(tokio::task::spawn_blocking(move || {
            let result = exactly_stream::Processor::new(config, counters).and_then(|mut p| p.run(&stop_flag));
            if result.is_err() {
                // One thread failing stops the others: the process exits and is restarted whole.
                stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            result
        }));
    }
    for (n, thread) in running.into_iter().enumerate() {
        thread
            .await
            .with_context(|| format!("stream thread {n}"))?
            .with_context(|| format!("stream thread {n} stopped"))?;
    }
    if let Some(sink) = sink {
        sink.await.context("sink task")?.context("sink stopped")?;
    }
    Ok(())
}

/// The trigger that mirrors a Debezium-style table into the outbox, when one is named (after
/// the migrations, which it needs).
async fn install_debezium_mirror(database: &Database, settings: &DebeziumSettings) -> Result<()> {
    let Some(table) = settings.table()? else {
        return Ok(());
    };
    let Database::Postgres(url) = database else {
        bail!("a Debezium table needs PostgreSQL");
    };
    let mut client = exactly_postgres::connect(url).await?;
    exactly_postgres::migrations::migrate(&mut client).await?;
    table
        .install_mirror(&mut client)
        .await
        .with_context(|| format!("the Debezium table {}", table.table))?;
    tracing::info!(table = %table.table, "Debezium table mirrored into the outbox");
    Ok(())
}

/// `exactly migrate`: the schema (and a Debezium table's mirror), and nothing else.
pub async fn migrate(database: &Database, debezium: &DebeziumSettings) -> Result<()> {
    install_debezium_mirror(database, debezium).await?;
    match database {
        Database::Sqlite(path) => {
            exactly_sqlite::open(path)?;
            eprintln!("exactly: {} is up to date", path.display());
        }
        Database::Postgres(url) => {
            let mut client = exactly_postgres::connect(url).await?;
            exactly_postgres::migrations::migrate(&mut client).await?;
            eprintln!("exactly: {} is up to date", exactly_postgres::redact_url(url));
        }
    }
    Ok(())
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
    tracing::info!(
        "{}: group {} applies {} from Kafka at {} into {} ({} handler)",
        gauges.name("consumer"),
        args.group,
        args.topics.join(", "),
        kafka.brokers,
        args.database()?,
        args.handler
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
    config.key_header = args.key_header.clone();
    config.trust_offset_gaps = args.trust_offset_gaps;
    config.group_instance_id = args.group_instance_id();
    config.dedupe = exactly_core::DedupePolicy {
        retention_ms: args.key_retention_ms,
        horizon_ms: args.key_horizon_ms,
    };
    config.dedupe.validate()?;
    let faults = kill_at(
        FaultPoint::ConsumerAfterApplyBeforeOffsetCommit,
        args.kill_after_apply,
    );
    let choice = args.handler_choice()?;
    let store = ConsumerStore::open(&args.database()?, &args.group, &choice, Opening::Consumer).await?;
    match store {
        ConsumerStore::Postgres(store) => run_consumer(store, config, faults, counters, stop).await,
        ConsumerStore::Sqlite(store) => run_consumer(store, config, faults, counters, stop).await,
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
