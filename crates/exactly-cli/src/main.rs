//! The `exactly` binary: argument parsing and wiring; the work is in the library crates.

// In a binary crate `pub` only means visible to sibling modules.
#![allow(unreachable_pub)]

mod operate;
mod status;

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use exactly_daemon::components::{self, Gauges};
use exactly_daemon::config_file::{self, RunArgs};
use exactly_daemon::process::{check_kafka, stop_on_signal};
use exactly_daemon::settings::{self, ConsumeSettings, KafkaArgs, RelayMode, RelaySettings, StreamSettings};
use exactly_daemon::{memory, run, sink, telemetry};
use exactly_lab::demo::{run_demo, DemoOptions};
use exactly_lab::{bench, consumer_bench, delta_bench, e2e_bench, soak, stream_bench, verify};

#[derive(Parser)]
#[command(
    name = "exactly",
    version,
    about = "Exactly-once event delivery from a database outbox through Kafka"
)]
struct Cli {
    /// Log lines as text for people or as JSON objects, one event a line, for collectors.
    /// Levels come from EXACTLY_LOG (tracing's filter syntax).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EXACTLY_LOG_FORMAT")]
    log_format: LogFormat,
    /// Only warnings and errors: no start-up and progress lines (EXACTLY_LOG overrides).
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a file (with the environment and flags applied) and print the resolved settings,
    /// secrets redacted. Exit 2 with the key and line of the first error.
    Check {
        #[command(flatten)]
        args: RunArgs,
    },
}

#[derive(Subcommand)]
enum BenchKind {
    /// WAL relay catch-up vs raw librdkafka produce of the same records, and the polling relay.
    Relay(bench::RelayBench),
    /// The orders-agg job exactly once vs at least once (no transactions) on the same input,
    /// and the restore of a changelog with --restore-keys store keys.
    Stream(stream_bench::StreamBench),
    /// The idempotent consumer (PostgreSQL, record handler, batched) vs the same handler without
    /// dedupe, and vs one transaction per record.
    Consumer(consumer_bench::ConsumerBench),
    /// Commit-to-effect latency through each relay and an idempotent consumer, at fixed commit
    /// rates (HDR histograms; CSV and PNG).
    E2e(e2e_bench::E2eBench),
    /// The Delta sink into a local table vs a plain read of the same topic, and the Parquet
    /// bytes per record.
    SinkDelta(delta_bench::DeltaBench),
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the order-service story end to end with faults, and reconcile.
    Demo(DemoOptions),
    /// Publish outbox rows to Kafka.
    Relay {
        #[command(flatten)]
        relay: RelaySettings,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Prometheus endpoint.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: SocketAddr,
        /// No metrics endpoint.
        #[arg(long)]
        no_metrics: bool,
    },
    /// Consume topics and apply each event once.
    ///
    /// Every member of a consumer group must use the same effect database: the dedupe records
    /// live there under the group's name, and a partition moves between members on every
    /// rebalance. Members on different databases would each apply what the other already did.
    Consume {
        #[command(flatten)]
        consumer: ConsumeSettings,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "127.0.0.1:9465")]
        metrics_addr: SocketAddr,
        #[arg(long)]
        no_metrics: bool,
    },
    /// Exactly-once windowed counts (the built-in orders-agg job): input topic → output topic.
    /// Jobs of your own: a [stream.NAME.job] table under `exactly run` (docs/stream-dsl.md).
    Stream {
        #[command(flatten)]
        stream: StreamSettings,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "127.0.0.1:9466")]
        metrics_addr: SocketAddr,
        #[arg(long)]
        no_metrics: bool,
    },
    /// Run every source, consumer and stream job a configuration file describes, in one
    /// process, until SIGINT/SIGTERM. Precedence: flags, then EXACTLY_* variables
    /// (EXACTLY_SOURCE__ORDERS__BATCH_SIZE=1000 sets source.orders.batch_size), then the file.
    Run {
        #[command(flatten)]
        args: RunArgs,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Sinks: topics into a table, exactly once (docs/delta.md).
    Sink {
        #[command(subcommand)]
        what: SinkCommand,
    },
    /// A Delta sink's table: compact small files, vacuum unreferenced ones.
    Delta {
        #[command(subcommand)]
        what: DeltaCommand,
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
    Verify(verify::VerifyOptions),
    /// A steady load with a fault every few minutes (broker and PostgreSQL restarts, connection
    /// resets, a blackhole), sampling each process's memory, descriptors and sockets, the
    /// dedupe tables and retained WAL into a CSV and a plot; fails when any grows past its
    /// bound after the warm-up, or an event is lost or applied twice.
    Soak(soak::SoakOptions),
    /// Dead outbox events (both relays): list, show, requeue after a fix, discard.
    Dead(operate::DeadArgs),
    /// A consumer's parked messages: list, show, replay through the handler, discard.
    Parked(operate::ParkedArgs),
    /// What an on-call person needs, for one database or a whole configuration file: outbox by
    /// status and oldest unsent row, dead events, replication slots (lag, retained WAL,
    /// wal_status), consumers' key sets, watermarks and parked messages by reason, and with
    /// --config the consumer groups' lag per partition. Reads only.
    Status(status::StatusArgs),
    /// Create or bring up to date exactly's tables and functions (outbox, dedupe tables,
    /// exactly_claim, exactly_enqueue, …) without starting anything: for writers and consumers
    /// in other languages, or a deploy step. Relays and consumers do the same on start.
    Migrate {
        /// postgres://… or a SQLite file (created if missing).
        #[arg(long, env = "EXACTLY_DATABASE")]
        database: String,
        /// The environment variable that holds the PostgreSQL password.
        #[arg(long, value_name = "VARIABLE")]
        password_env: Option<String>,
        /// Also mirror this Debezium-style table into the outbox (as `exactly relay` does on
        /// start): install before switching relays, so no event falls between them.
        #[command(flatten)]
        debezium: settings::DebeziumSettings,
    },
}

#[derive(Debug, Subcommand)]
enum SinkCommand {
    /// A results topic (a stream job's output) into a PostgreSQL table, one row per key: the
    /// later record (or the larger version) wins, each partition's position is written with
    /// the rows, so a restart or a second member applies nothing twice.
    Postgres {
        #[command(flatten)]
        sink: settings::PgSinkSettings,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "127.0.0.1:9468")]
        metrics_addr: SocketAddr,
        #[arg(long)]
        no_metrics: bool,
    },
    /// Topics into a Delta Lake table: the data and the Kafka positions commit together in the
    /// Delta log, so a restart, a rebalance or a second writer never writes a record twice.
    Delta {
        #[command(flatten)]
        sink: settings::DeltaSinkSettings,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "127.0.0.1:9467")]
        metrics_addr: SocketAddr,
        #[arg(long)]
        no_metrics: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeltaCommand {
    /// Rewrites each partition's small files into files of about the target size, in one
    /// OPTIMIZE commit (safe while sinks append).
    Compact {
        /// The table: a local path or an object-store URL.
        #[arg(long)]
        table: String,
        #[arg(long = "storage-option", value_name = "KEY=VALUE")]
        storage_options: Vec<String>,
        /// Files smaller than half of this are rewritten.
        #[arg(long, default_value_t = settings::defaults::target_file_size())]
        target_file_size: u64,
        /// A partition is rewritten once it has this many small files.
        #[arg(long, default_value_t = 4)]
        min_files: usize,
    },
    /// Deletes the files no version within the retention references.
    Vacuum {
        /// The table: a local path or an object-store URL.
        #[arg(long)]
        table: String,
        #[arg(long = "storage-option", value_name = "KEY=VALUE")]
        storage_options: Vec<String>,
        /// Versions this recent keep their files (Delta's default: 168 hours).
        #[arg(long, default_value_t = 168)]
        retention_hours: u64,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    exactly_lab::register_story_handlers();
    let matches = Cli::command().get_matches();
    if let Err(e) = refuse_ignored_relay_flags(&matches) {
        e.exit();
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let long_running = matches!(
        cli.command,
        Command::Relay { .. }
            | Command::Consume { .. }
            | Command::Stream { .. }
            | Command::Run { .. }
            | Command::Sink { .. }
    );
    init_logs(cli.log_format, long_running && !cli.quiet);
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
            eprintln!("exactly: {}", error_message(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, `outer: inner`, each said once: most errors here (the drivers'
/// too) already print their cause, so a cause the message holds is not repeated.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Logs go to stderr (stdout carries command output: tables, JSON, reports). The long-running
/// commands say at the info level what they started and how far they got (`say_progress`);
/// the others, and `--quiet`, only warn. `EXACTLY_LOG` (tracing's filter syntax) overrides both.
fn init_logs(format: LogFormat, say_progress: bool) {
    const QUIET: &str = "warn,rdkafka=error,librdkafka=error,pg_walstream=error";
    const PROGRESS: &str = "warn,exactly=info,exactly_daemon=info,exactly_kafka=info,exactly_postgres=info,\
         exactly_sqlite=info,exactly_stream=info,rdkafka=error,librdkafka=error,pg_walstream=error";
    let filter = tracing_subscriber::EnvFilter::try_from_env("EXACTLY_LOG")
        .unwrap_or_else(|_| if say_progress { PROGRESS } else { QUIET }.into());
    // Colours only for a person at a terminal, not for a file or a log collector.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// `exactly relay` parses every mode's flags; a flag the chosen mode would not read is refused
/// (exit 2) instead of being dropped, so `--mode poll --exactly-once` cannot look like it worked.
fn refuse_ignored_relay_flags(matches: &ArgMatches) -> Result<(), clap::Error> {
    let Some(relay) = matches.subcommand_matches("relay") else {
        return Ok(());
    };
    let settings = RelaySettings::from_arg_matches(relay)?;
    let given = |id: &str| relay.value_source(id) == Some(ValueSource::CommandLine);
    match settings.unused_setting(given) {
        None => Ok(()),
        Some((flag, why)) => Err(Cli::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "`exactly relay --{}` is not used with --mode {}{}: {why}",
                flag.replace('_', "-"),
                match settings.mode {
                    RelayMode::Poll => "poll",
                    RelayMode::Wal => "wal",
                },
                if settings.mode == RelayMode::Wal && !settings.exactly_once {
                    " (without --exactly-once)"
                } else {
                    ""
                },
            ),
        )),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let long_running = matches!(
        cli.command,
        Command::Relay { .. }
            | Command::Consume { .. }
            | Command::Stream { .. }
            | Command::Run { .. }
            | Command::Sink { .. }
    );
    if long_running {
        exactly_daemon::progress::report_progress(std::time::Duration::from_secs(10));
    }
    let code = dispatch(cli).await?;
    if long_running {
        exactly_daemon::progress::say_totals();
    }
    Ok(code)
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Migrate {
            database,
            password_env,
            debezium,
        } => {
            let database = exactly_daemon::database::resolve_database(&database, password_env.as_deref())?;
            components::migrate(&database, &debezium).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(options) => {
            let report = run_demo(options).await?;
            report.print();
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Relay {
            relay,
            kafka,
            metrics_addr,
            no_metrics,
        } => {
            let kafka = kafka.settings()?;
            let gauges = serve_metrics_unless(no_metrics, metrics_addr, "relay")?;
            memory::bound_resident_memory();
            check_kafka(&kafka).await?;
            components::relay(relay, &kafka, gauges, stop_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Consume {
            consumer,
            kafka,
            metrics_addr,
            no_metrics,
        } => {
            let kafka = kafka.settings()?;
            let gauges = serve_metrics_unless(no_metrics, metrics_addr, "consumer")?;
            memory::bound_resident_memory();
            check_kafka(&kafka).await?;
            components::consume(consumer, &kafka, gauges, stop_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sink {
            what:
                SinkCommand::Delta {
                    sink,
                    kafka,
                    metrics_addr,
                    no_metrics,
                },
        } => {
            let kafka = kafka.settings()?;
            serve_metrics_unless(no_metrics, metrics_addr, "delta sink")?;
            memory::bound_resident_memory();
            check_kafka(&kafka).await?;
            exactly_daemon::delta_sink::delta_sink(&sink, &kafka, stop_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sink {
            what:
                SinkCommand::Postgres {
                    sink,
                    kafka,
                    metrics_addr,
                    no_metrics,
                },
        } => {
            let kafka = kafka.settings()?;
            serve_metrics_unless(no_metrics, metrics_addr, "postgres sink")?;
            check_kafka(&kafka).await?;
            sink::postgres_sink(&sink, &kafka, stop_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delta {
            what:
                DeltaCommand::Compact {
                    table,
                    storage_options,
                    target_file_size,
                    min_files,
                },
        } => {
            let options = settings::storage_options(&storage_options)?;
            let done = exactly_delta::compact(&table, &options, target_file_size, min_files).await?;
            match done.version {
                Some(v) => println!(
                    "compacted {} partition(s): {} files into {} (version {v})",
                    done.partitions, done.removed, done.added
                ),
                None => println!("nothing to compact"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delta {
            what:
                DeltaCommand::Vacuum {
                    table,
                    storage_options,
                    retention_hours,
                    dry_run,
                },
        } => {
            let options = settings::storage_options(&storage_options)?;
            let retention = std::time::Duration::from_secs(retention_hours.saturating_mul(3600));
            let files = exactly_delta::vacuum(&table, &options, retention, dry_run).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            println!("{verb} {} file(s)", files.len());
            for f in files {
                println!("  {f}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { args } => {
            let config = config_file::load(&args, std::env::vars())?;
            memory::bound_resident_memory();
            run::run(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            what: ConfigCommand::Check { args },
        } => {
            let config = config_file::load(&args, std::env::vars())?;
            print!("{}", config_file::redacted(&config));
            eprintln!(
                "exactly: {} is valid: {} source(s), {} consumer(s), {} stream job(s), {} sink(s)",
                args.config.display(),
                config.source.len(),
                config.consumer.len(),
                config.stream.len(),
                config.sink.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchKind::Relay(options),
        } => {
            bench::relay_bench(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchKind::SinkDelta(options),
        } => {
            delta_bench::delta_bench(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchKind::Consumer(options),
        } => {
            consumer_bench::consumer_bench(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchKind::E2e(options),
        } => {
            e2e_bench::e2e_bench(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchKind::Stream(options),
        } => {
            stream_bench::stream_bench(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stream {
            stream,
            kafka,
            metrics_addr,
            no_metrics,
        } => {
            let kafka = kafka.settings()?;
            let gauges = serve_metrics_unless(no_metrics, metrics_addr, "stream")?;
            memory::bound_resident_memory();
            check_kafka(&kafka).await?;
            components::stream(stream, &kafka, gauges, stop_on_signal()).await?;
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
                None,
                stop_on_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(options) => {
            let ok = verify::verify(options).await?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Soak(options) => {
            let ok = soak::soak(options).await?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Dead(args) => {
            operate::dead(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Parked(args) => {
            operate::parked(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            status::status(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Serves the metrics listener of a single-component command; the gauges it turns on.
fn serve_metrics_unless(no_metrics: bool, addr: SocketAddr, name: &str) -> Result<Gauges> {
    if no_metrics {
        return Ok(Gauges::Off);
    }
    telemetry::serve_metrics(addr)?;
    Ok(Gauges::On {
        name: name.to_owned(),
        component: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_each_part_once() {
        let store =
            exactly_core::StoreError::from(exactly_postgres::PgError::Corrupt("row 7 is not hex".into()));
        let error = anyhow::Error::new(store).context("consumer ledger");
        assert_eq!(
            error_message(&error),
            "consumer ledger: postgres: row 7 is not hex"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_message(&plain), "outer: inner");
    }
}
