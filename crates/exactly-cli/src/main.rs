//! The `exactly` binary: argument parsing and wiring; the work is in the library crates.

// In a binary crate `pub` only means visible to sibling modules.
#![allow(unreachable_pub)]

mod backend;
mod bench;
mod broker;
mod commands;
mod demo;
mod sink;
mod story;
mod stream_bench;
mod telemetry;
mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::commands::{ConsumeArgs, Database, InternalTopicArgs, KafkaArgs, RelayArgs};
use crate::demo::{run_demo, DemoOptions};

#[derive(Parser)]
#[command(
    name = "exactly",
    version,
    about = "Exactly-once event delivery from a database outbox through Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `exactly stream --processing-guarantee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProcessingGuarantee {
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(Clone, Copy, ValueEnum)]
enum RelayMode {
    /// Claim rows from the outbox table (NOTIFY wakes it on PostgreSQL).
    Poll,
    /// Follow PostgreSQL logical replication (pgoutput): commit order, 128-bit LSN keys.
    Wal,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OutboxMode {
    /// Rows stay in the table; a sweeper marks them SENT after the broker's ack.
    Keep,
    /// Writers delete each row in the inserting transaction; nothing to mark.
    Delete,
    /// Writers use pg_logical_emit_message; no table.
    Message,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Keys {
    /// The event's UUID (v7 by default): consumers keep a key set.
    EventId,
    /// A sequence assigned at claim time by one leader relay: consumers keep one watermark.
    Sequence,
}

#[derive(Subcommand)]
enum BenchKind {
    /// WAL relay catch-up vs raw librdkafka produce of the same records, and the polling relay.
    Relay {
        /// The PostgreSQL server (a fresh database is created on it).
        #[arg(
            long,
            env = "EXACTLY_PG_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database: String,
        /// Use this broker instead of starting one.
        #[arg(long, env = "EXACTLY_BENCH_BROKERS")]
        brokers: Option<String>,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 200)]
        payload_bytes: usize,
    },
    /// The orders-agg job exactly once vs at least once (no transactions) on the same input,
    /// and the restore of a changelog with --restore-keys store keys.
    Stream {
        /// Use this broker instead of starting one.
        #[arg(long, env = "EXACTLY_BENCH_BROKERS")]
        brokers: Option<String>,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 1_000_000)]
        restore_keys: u64,
        #[arg(long, default_value_t = 100)]
        commit_interval_ms: u64,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the order-service story end to end with faults, and reconcile.
    Demo {
        /// Events to commit.
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// Concurrent writers.
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Concurrent relays.
        #[arg(long, default_value_t = 2)]
        relays: usize,
        /// postgres://… to run on PostgreSQL (a fresh database per run); default: SQLite files.
        #[arg(long)]
        database: Option<String>,
        /// Use this broker instead of starting one.
        #[arg(long, env = "EXACTLY_DEMO_BROKERS")]
        brokers: Option<String>,
        /// Where the SQLite files go (default: a new folder in the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Turn off the injected crashes.
        #[arg(long)]
        no_faults: bool,
        /// Seed of the workload and the fault schedule.
        #[arg(long, default_value_t = 2)]
        seed: u64,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Which relay moves the events (wal needs --database postgres://…).
        #[arg(long, value_enum, default_value = "poll")]
        relay: RelayMode,
        /// Topic name suffix (default: -<run id>); `--topic-suffix ""` writes coupon-events and
        /// product-events, the topics `exactly stream` reads by default.
        #[arg(long)]
        topic_suffix: Option<String>,
    },
    /// Publish outbox rows to Kafka.
    Relay {
        #[arg(long, value_enum, default_value = "poll")]
        mode: RelayMode,
        /// postgres://… or a SQLite file.
        #[arg(long, env = "EXACTLY_DATABASE")]
        database: String,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, value_enum, default_value = "event-id")]
        keys: Keys,
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// How long a claim holds rows before another relay may take them.
        #[arg(long, default_value_t = 30_000)]
        lease_ms: i64,
        /// Poll interval when no NOTIFY arrives.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Publish failures before a row is DEAD.
        #[arg(long, default_value_t = 10)]
        max_retries: u32,
        /// Prometheus endpoint.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: SocketAddr,
        /// No metrics endpoint.
        #[arg(long)]
        no_metrics: bool,
        /// Drain what is claimable, then exit.
        #[arg(long)]
        exit_when_idle: bool,
        /// Test fault: SIGKILL this process after the N-th batch was acknowledged, before it is
        /// marked SENT (wal: before the slot is confirmed).
        #[arg(long, hide = true)]
        kill_after_publish: Option<u64>,
        /// wal: the replication slot (default exactly_<database>).
        #[arg(long)]
        slot: Option<String>,
        /// wal: the publication on the outbox table.
        #[arg(long, default_value = "exactly_outbox")]
        publication: String,
        /// wal: emit a heartbeat when none of the relay's own transactions arrived for this long.
        #[arg(long, default_value_t = 10_000)]
        heartbeat_ms: u64,
        /// wal: how writers use the outbox (keep: a sweeper marks rows SENT).
        #[arg(long, value_enum, default_value = "keep")]
        outbox: OutboxMode,
        /// wal: write records and the source position in one Kafka transaction.
        #[arg(long)]
        exactly_once: bool,
        /// wal --exactly-once: compacted single-partition topic of source positions.
        #[arg(long, default_value = "exactly-progress")]
        progress_topic: String,
        #[command(flatten)]
        internal: InternalTopicArgs,
        /// wal --exactly-once: commit a Kafka transaction this often (at a source-transaction boundary).
        #[arg(long, default_value_t = 100)]
        commit_interval_ms: u64,
        /// wal --exactly-once: …or once it holds this many events.
        #[arg(long, default_value_t = 50_000)]
        batch_events: u64,
        /// Test fault: SIGKILL after the N-th progress record was sent, before the commit.
        #[arg(long, hide = true)]
        kill_before_commit: Option<u64>,
        /// Test fault: SIGKILL after the N-th Kafka commit, before the slot is confirmed.
        #[arg(long, hide = true)]
        kill_after_commit: Option<u64>,
        /// Test fault: SIGKILL when the N-th abort starts.
        #[arg(long, hide = true)]
        kill_during_abort: Option<u64>,
        /// Test fault: abort every N-th Kafka transaction on purpose.
        #[arg(long, hide = true)]
        abort_every: Option<u64>,
    },
    /// Consume topics and apply each event once.
    ///
    /// Every member of a consumer group must use the same effect database: the dedupe records
    /// live there under the group's name, and a partition moves between members on every
    /// rebalance. Members on different databases would each apply what the other already did.
    Consume {
        /// The effect database (postgres://… or a SQLite file), shared by every member of the
        /// group.
        #[arg(long, env = "EXACTLY_DATABASE")]
        database: String,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Consumer group; also the name of this consumer's rows in the effect database.
        #[arg(long)]
        group: String,
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// record (a row per event in exactly_consumed), story-coupons, story-likes, story-products.
        #[arg(long, default_value = "record")]
        handler: String,
        /// record: the event types it accepts (comma-separated; others are parked). Default: any.
        #[arg(long, value_delimiter = ',')]
        event_types: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:9465")]
        metrics_addr: SocketAddr,
        #[arg(long)]
        no_metrics: bool,
        /// Test fault: SIGKILL this process after the N-th effect committed, before its offset commit.
        #[arg(long, hide = true)]
        kill_after_apply: Option<u64>,
    },
    /// Exactly-once windowed counts (the orders-agg example): input topic → output topic.
    Stream {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "orders-agg")]
        application_id: String,
        /// Distinguishes processors of one application.id.
        #[arg(long, default_value = "0")]
        instance: String,
        #[arg(long, default_value = "coupon-events")]
        input: String,
        #[arg(long, default_value = "agg-out")]
        output: String,
        /// Payload field to count by (empty: the aggregate id).
        #[arg(long, default_value = "product_id")]
        group_by: String,
        /// Partitions of the internal topics (the input's count).
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        #[arg(long, default_value_t = 300_000)]
        window_ms: i64,
        #[arg(long, default_value_t = 60_000)]
        grace_ms: i64,
        #[arg(long, default_value_t = 86_400_000)]
        retention_ms: i64,
        /// Event times further ahead of the wall clock go to the dead-letter topic (they would
        /// otherwise advance stream time and make every later record late).
        #[arg(long, default_value_t = exactly_stream::DEFAULT_MAX_EVENT_TIME_SKEW_MS)]
        max_event_time_skew_ms: i64,
        /// Partial counts per hot key.
        #[arg(long, default_value_t = 1)]
        salts: u32,
        #[arg(long, default_value_t = 100)]
        commit_interval_ms: u64,
        /// Where task stores live (default: a folder per application in the temp dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// exactly-once (Kafka transactions) or at-least-once (the same job without them).
        #[arg(long, value_enum, default_value = "exactly-once")]
        processing_guarantee: ProcessingGuarantee,
        #[command(flatten)]
        internal: InternalTopicArgs,
        /// Also upsert the window results into this PostgreSQL database's `order_counts`
        /// (what `exactly sink-counts` does, in the same process).
        #[arg(long)]
        sink_database: Option<String>,
        #[arg(long, default_value = "127.0.0.1:9466")]
        metrics_addr: SocketAddr,
        #[arg(long)]
        no_metrics: bool,
    },
    /// Window results from a topic into PostgreSQL order_counts (UPSERT, larger count wins).
    SinkCounts {
        #[arg(long, env = "EXACTLY_DATABASE")]
        database: String,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "agg-out")]
        topic: String,
        #[arg(long, default_value = "orders-agg-sink")]
        group: String,
    },
    /// Benchmarks that print figures against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchKind,
    },
    /// Prove exactly-once end to end: writers, relay and consumers as processes, killed and
    /// restarted (and the broker and PostgreSQL) while they run, bad input injected; then the
    /// checker's table (lost, duplicate, unseen, non-monotonic, aborted read) and a verdict.
    Verify {
        /// The PostgreSQL server (a fresh database per run).
        #[arg(
            long,
            env = "EXACTLY_PG_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database: String,
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        #[arg(long, value_enum, default_value = "poll")]
        relay: verify::VerifyRelay,
        /// poll relay keys: event-id (consumers keep key sets) or sequence (watermarks).
        #[arg(long, default_value = "event-id")]
        keys: String,
        #[arg(long, default_value_t = 1)]
        runs: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        no_relay_kills: bool,
        #[arg(long)]
        no_consumer_kills: bool,
        #[arg(long)]
        no_broker_restarts: bool,
        #[arg(long)]
        no_pg_restart: bool,
        #[arg(long)]
        no_bad_input: bool,
        /// Kills per process kind (broker restarts at most 2, PostgreSQL once).
        #[arg(long, default_value_t = 3)]
        fault_rounds: usize,
        /// Write the runs' reports here as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
    },
    /// Outbox rows by status, oldest unsent row, parked messages.
    Status {
        #[arg(long, env = "EXACTLY_DATABASE")]
        database: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EXACTLY_LOG")
                .unwrap_or_else(|_| "warn,rdkafka=error,librdkafka=error,pg_walstream=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    if let Err(e) = refuse_ignored_relay_flags(&matches) {
        e.exit();
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("exactly: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("exactly: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Relay flags that only one mode reads, by clap id.
const POLL_ONLY_FLAGS: &[&str] = &[
    "keys",
    "batch_size",
    "lease_ms",
    "poll_ms",
    "max_retries",
    "exit_when_idle",
];
const WAL_ONLY_FLAGS: &[&str] = &["slot", "publication", "heartbeat_ms", "outbox", "exactly_once"];
const EXACTLY_ONCE_ONLY_FLAGS: &[&str] = &[
    "progress_topic",
    "replication_factor",
    "min_insync_replicas",
    "commit_interval_ms",
    "batch_events",
    "kill_before_commit",
    "kill_after_commit",
    "kill_during_abort",
    "abort_every",
];

/// `exactly relay` parses every mode's flags; a flag the chosen mode would not read is refused
/// (exit 2) instead of being dropped, so `--mode poll --exactly-once` cannot look like it worked.
fn refuse_ignored_relay_flags(matches: &ArgMatches) -> Result<(), clap::Error> {
    let Some(relay) = matches.subcommand_matches("relay") else {
        return Ok(());
    };
    let given = |id: &str| relay.value_source(id) == Some(ValueSource::CommandLine);
    let mode = relay
        .get_one::<RelayMode>("mode")
        .copied()
        .unwrap_or(RelayMode::Poll);
    let exactly_once = relay.get_flag("exactly_once");
    let (ignored, why): (Vec<&str>, &str) = match mode {
        RelayMode::Poll => (
            WAL_ONLY_FLAGS
                .iter()
                .chain(EXACTLY_ONCE_ONLY_FLAGS)
                .copied()
                .filter(|f| given(f))
                .collect(),
            "only --mode wal reads it",
        ),
        RelayMode::Wal if !exactly_once => {
            let mut flags: Vec<&str> = POLL_ONLY_FLAGS.iter().copied().filter(|f| given(f)).collect();
            if !flags.is_empty() {
                (flags, "only --mode poll reads it")
            } else {
                flags = EXACTLY_ONCE_ONLY_FLAGS
                    .iter()
                    .copied()
                    .filter(|f| given(f))
                    .collect();
                (flags, "only --mode wal --exactly-once reads it")
            }
        }
        RelayMode::Wal => (
            POLL_ONLY_FLAGS.iter().copied().filter(|f| given(f)).collect(),
            "only --mode poll reads it",
        ),
    };
    match ignored.first() {
        None => Ok(()),
        Some(flag) => Err(Cli::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "`exactly relay --{}` is not used with --mode {}{}: {why}",
                flag.replace('_', "-"),
                match mode {
                    RelayMode::Poll => "poll",
                    RelayMode::Wal => "wal",
                },
                if matches!(mode, RelayMode::Wal) && !exactly_once {
                    " (without --exactly-once)"
                } else {
                    ""
                },
            ),
        )),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Demo {
            events,
            writers,
            relays,
            database,
            brokers,
            dir,
            no_faults,
            seed,
            timeout_secs,
            quiet,
            relay,
            topic_suffix,
        } => {
            let report = run_demo(DemoOptions {
                events,
                writers: writers.max(1),
                relays: relays.max(1),
                database,
                brokers,
                dir,
                faults: !no_faults,
                seed,
                timeout: Duration::from_secs(timeout_secs),
                quiet,
                wal: matches!(relay, RelayMode::Wal),
                topic_suffix,
            })
            .await?;
            report.print();
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Relay {
            mode: RelayMode::Wal,
            database,
            kafka,
            metrics_addr,
            no_metrics,
            kill_after_publish,
            slot,
            publication,
            heartbeat_ms,
            outbox,
            exactly_once,
            progress_topic,
            internal,
            commit_interval_ms,
            batch_events,
            kill_before_commit,
            kill_after_commit,
            kill_during_abort,
            abort_every,
            ..
        } => {
            let Database::Postgres(url) = Database::parse(&database) else {
                anyhow::bail!(
                    "--mode wal follows PostgreSQL logical replication: --database must be postgres://…"
                );
            };
            commands::wal_relay(commands::WalRelayArgs {
                url,
                kafka: kafka.settings()?,
                slot,
                publication,
                heartbeat: Duration::from_millis(heartbeat_ms),
                mark_sent: outbox == OutboxMode::Keep,
                metrics: (!no_metrics).then_some(metrics_addr),
                kill_after_publish,
                exactly_once: exactly_once.then_some(commands::EosArgs {
                    progress_topic,
                    replication: internal,
                    commit_interval: Duration::from_millis(commit_interval_ms),
                    batch_events,
                    kill_before_commit,
                    kill_after_commit,
                    kill_during_abort,
                    abort_every,
                }),
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Relay {
            mode: RelayMode::Poll,
            database,
            kafka,
            keys,
            batch_size,
            lease_ms,
            poll_ms,
            max_retries,
            metrics_addr,
            no_metrics,
            exit_when_idle,
            kill_after_publish,
            ..
        } => {
            commands::relay(RelayArgs {
                database: Database::parse(&database),
                kafka: kafka.settings()?,
                sequence_keys: keys == Keys::Sequence,
                batch_size,
                lease_ms,
                poll_ms,
                max_retries,
                metrics: (!no_metrics).then_some(metrics_addr),
                kill_after_publish,
                exit_when_idle,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Consume {
            database,
            kafka,
            group,
            topics,
            handler,
            metrics_addr,
            no_metrics,
            kill_after_apply,
            event_types,
        } => {
            commands::consume(ConsumeArgs {
                database: Database::parse(&database),
                kafka: kafka.settings()?,
                group,
                topics,
                handler,
                event_types,
                metrics: (!no_metrics).then_some(metrics_addr),
                kill_after_apply,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchKind::Relay {
                    database,
                    brokers,
                    events,
                    payload_bytes,
                },
        } => {
            bench::relay_bench(bench::RelayBench {
                database,
                brokers,
                events,
                payload_bytes,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchKind::Stream {
                    brokers,
                    events,
                    restore_keys,
                    commit_interval_ms,
                },
        } => {
            stream_bench::stream_bench(stream_bench::StreamBench {
                brokers,
                events,
                restore_keys,
                commit_interval: Duration::from_millis(commit_interval_ms),
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stream {
            kafka,
            application_id,
            instance,
            input,
            output,
            group_by,
            partitions,
            window_ms,
            grace_ms,
            retention_ms,
            max_event_time_skew_ms,
            salts,
            commit_interval_ms,
            state_dir,
            processing_guarantee,
            internal,
            sink_database,
            metrics_addr,
            no_metrics,
        } => {
            if !no_metrics {
                telemetry::serve_metrics(metrics_addr)?;
            }
            let windows = exactly_core::window::TumblingWindows::new(window_ms, grace_ms, retention_ms)?;
            let state_dir = state_dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("exactly-stream-{application_id}-{instance}"))
            });
            let config = exactly_stream::StreamConfig {
                kafka: kafka.settings()?,
                application_id,
                instance,
                input,
                output,
                group_by: if group_by.is_empty() {
                    exactly_stream::GroupBy::AggregateId
                } else {
                    exactly_stream::GroupBy::PayloadField(group_by)
                },
                windows,
                salts: salts.max(1),
                commit_interval: Duration::from_millis(commit_interval_ms),
                guarantee: match processing_guarantee {
                    ProcessingGuarantee::ExactlyOnce => exactly_stream::Guarantee::ExactlyOnce,
                    ProcessingGuarantee::AtLeastOnce => exactly_stream::Guarantee::AtLeastOnce,
                },
                state_dir,
                replication_factor: internal.replication_factor,
                min_insync_replicas: internal.min_insync_replicas,
                max_event_time_skew_ms,
            };
            commands::stream(config, partitions, sink_database).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SinkCounts {
            database,
            kafka,
            topic,
            group,
        } => {
            sink::sink_counts(
                &database,
                &kafka.settings()?,
                &topic,
                &group,
                commands::stop_on_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            database,
            events,
            writers,
            consumers,
            relay,
            keys,
            runs,
            seed,
            no_relay_kills,
            no_consumer_kills,
            no_broker_restarts,
            no_pg_restart,
            no_bad_input,
            fault_rounds,
            report,
            quiet,
            timeout_secs,
        } => {
            let ok = verify::verify(verify::VerifyOptions {
                database,
                events: events.max(1),
                writers: writers.max(1),
                consumers: consumers.max(1),
                relay,
                keys,
                runs: runs.max(1),
                seed,
                faults: verify::FaultSwitches {
                    relay_kills: !no_relay_kills,
                    consumer_kills: !no_consumer_kills,
                    broker_restarts: !no_broker_restarts,
                    pg_restart: !no_pg_restart,
                    bad_input: !no_bad_input,
                    rounds: fault_rounds,
                },
                report,
                quiet,
                timeout: Duration::from_secs(timeout_secs),
            })
            .await?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Status { database } => {
            commands::status(Database::parse(&database)).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
