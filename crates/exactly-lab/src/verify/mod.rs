//! `exactly verify`: seeds events through concurrent writers (some transactions roll back),
//! runs the relay and the consumers as separate OS processes, kills and restarts them, the
//! broker and PostgreSQL while they run, injects bad input, then checks the history with
//! [`exactly_core::check`] and reconciles the bad input (applied + parked = total).

mod network;
mod observe;
mod processes;
mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use exactly_core::check::{check, Anomaly, CommittedEvent, Findings, History};
use rand::{Rng, SeedableRng};

use crate::demo::with_database;
use crate::fault_proxy::FaultProxy;

pub(crate) use network::{postgres_address, through_proxy};
use network::{Network, NetworkFault};
use observe::{applied_counts, consumer_db, consumer_history, parked_count, topic_event_ids};
pub(crate) use processes::{restart_postgres, Broker, Supervised};
pub(crate) use workload::connect_retrying;
use workload::{inject_bad_rows, inject_foreign_records, writer, Writes};

/// Which relay moves the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyRelay {
    Poll,
    Wal,
    WalExactlyOnce,
}

/// Faults that can be switched off one by one.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct FaultSwitches {
    /// No relay kills.
    #[arg(long)]
    pub no_relay_kills: bool,
    /// No consumer kills.
    #[arg(long)]
    pub no_consumer_kills: bool,
    /// No broker restarts.
    #[arg(long)]
    pub no_broker_restarts: bool,
    /// No PostgreSQL restart.
    #[arg(long)]
    pub no_pg_restart: bool,
    /// No malformed rows, payloads or foreign records.
    #[arg(long)]
    pub no_bad_input: bool,
    /// Kills per process kind (broker restarts at most 2, PostgreSQL once).
    #[arg(long, default_value_t = 3)]
    pub fault_rounds: usize,
    /// Also network faults, through a loopback proxy in front of the broker and another in
    /// front of the relay's PostgreSQL: added latency, connection resets, a blackhole longer
    /// than the session, lease and delivery timeouts, and one-way partitions, at random points.
    #[arg(long)]
    pub network_faults: bool,
}

impl FaultSwitches {
    fn relay_kills(&self) -> bool {
        !self.no_relay_kills
    }
    fn consumer_kills(&self) -> bool {
        !self.no_consumer_kills
    }
    fn broker_restarts(&self) -> bool {
        !self.no_broker_restarts
    }
    fn pg_restart(&self) -> bool {
        !self.no_pg_restart
    }
    fn bad_input(&self) -> bool {
        !self.no_bad_input
    }
}

/// Settings of `exactly verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyOptions {
    /// The PostgreSQL server (a fresh database per run).
    #[arg(
        long,
        env = "EXACTLY_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database: String,
    /// Events to commit per run.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub writers: usize,
    /// Consumer processes.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub consumers: usize,
    /// Which relay moves the events.
    #[arg(long, value_enum, default_value = "poll")]
    pub relay: VerifyRelay,
    /// Poll relay key kind: event-id (consumers keep key sets) or sequence (watermarks).
    #[arg(long, default_value = "event-id")]
    pub keys: String,
    /// Runs, each with the next seed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Seed of the first run's workload and fault schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub faults: FaultSwitches,
    /// Write the runs' reports here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Give up a run after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
}

const EVENT_TYPE: &str = "VerifyEvent";
const AGGREGATES_PER_WRITER: u64 = 10;
/// Outbox rows of the corpus the relay must refuse (oversized payload, NULL and oversized
/// aggregate id), and those that reach consumers and must be parked there (not JSON, not
/// UTF-8, unknown type), and foreign records (no headers, garbled key, duplicate key header).
const BAD_AT_RELAY: u64 = 3;
const BAD_AT_CONSUMER: u64 = 3;
const FOREIGN: u64 = 3;

/// One run's outcome.
#[derive(Debug, serde::Serialize)]
struct RunReport {
    seed: u64,
    relay: String,
    events_committed: u64,
    /// Records on the topic, resends and bad input included: what dedupe had to absorb.
    records_on_topic: u64,
    rolled_back: u64,
    seconds: f64,
    faults: BTreeMap<String, u64>,
    anomalies: BTreeMap<String, (u64, Vec<String>)>,
    applied: BTreeMap<String, u64>,
    parked: BTreeMap<String, u64>,
    relay_dead: u64,
    bad_input_total: u64,
    bad_input_reconciled: bool,
    verdict: String,
    /// A failed run keeps its logs and databases here (relay.log, consumer-N.log, broker.log).
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_logs: Option<PathBuf>,
}

/// Runs one seeded run and returns its report.
async fn run_once(
    options: &VerifyOptions,
    seed: u64,
    progress: &indicatif::ProgressBar,
) -> Result<RunReport> {
    let started = Instant::now();
    let run_id = exactly_kafka::now().0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exactly_once = options.relay == VerifyRelay::WalExactlyOnce;
    // The durable broker lacks transactions (EndTxn): the exactly-once relay runs on the
    // in-memory one, which cannot be restarted without losing the topic. Runs without broker
    // restarts use the in-memory one too.
    let broker_restarts = options.faults.broker_restarts() && !exactly_once;
    let broker_port = crate::broker::free_port()?;
    let broker_proxy = if options.faults.network_faults {
        Some(FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], broker_port))).await?)
    } else {
        None
    };
    let advertised = broker_proxy.as_ref().map_or(broker_port, |p| p.address().port());
    let mut broker = Broker::start(broker_restarts, broker_port, advertised)?;
    let brokers = broker.address();
    let topic = format!("verify-{run_id}");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3).await?;

    let admin = exactly_postgres::connect(&options.database).await?;
    let name = format!("exactly_verify_{run_id}");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let url = with_database(&options.database, &name);
    {
        let mut client = exactly_postgres::connect(&url).await?;
        exactly_postgres::migrations::migrate(&mut client).await?;
    }
    let slot = format!("exactly_verify_{run_id}");
    if options.relay != VerifyRelay::Poll {
        let mut config = exactly_postgres::WalConfig::new(&url);
        config.slot = slot.clone();
        exactly_postgres::wal::ensure_slot(&config).await?;
    }
    let dir = tempfile::tempdir()?;

    let mut relay_args: Vec<String> = ["relay", "--brokers", &brokers, "--no-metrics"]
        .map(String::from)
        .to_vec();
    match options.relay {
        VerifyRelay::Poll => relay_args.extend(["--mode", "poll", "--keys", &options.keys].map(String::from)),
        VerifyRelay::Wal => relay_args.extend(["--mode", "wal", "--slot", &slot].map(String::from)),
        VerifyRelay::WalExactlyOnce => {
            relay_args.extend(["--mode", "wal", "--slot", &slot, "--exactly-once"].map(String::from))
        }
    }
    // With network faults the relay reaches PostgreSQL through a proxy of its own; the
    // writers keep their direct connections, so commits go on while the relay is cut off.
    let mut network = match broker_proxy {
        Some(broker) => Some(Network {
            broker,
            postgres: FaultProxy::start(postgres_address(&url)?).await?,
            heals_at: None,
        }),
        None => None,
    };
    let relay_url = match &network {
        Some(network) => through_proxy(&url, &network.postgres)?,
        None => url.clone(),
    };
    let relay = Supervised::with_env(
        "relay",
        relay_args,
        vec![("EXACTLY_DATABASE".to_owned(), relay_url)],
        dir.path(),
    );
    let consumers: Vec<Arc<Supervised>> = (0..options.consumers)
        .map(|i| {
            let db = consumer_db(dir.path(), i);
            Supervised::new(
                &format!("consumer-{i}"),
                [
                    "consume",
                    "--database",
                    &db.to_string_lossy(),
                    "--brokers",
                    &brokers,
                    "--group",
                    &format!("verify-{run_id}-{i}"),
                    "--topic",
                    &topic,
                    "--event-types",
                    EVENT_TYPE,
                    "--no-metrics",
                ]
                .map(String::from)
                .to_vec(),
                dir.path(),
            )
        })
        .collect();
    relay.ensure_running()?;
    for c in &consumers {
        c.ensure_running()?;
    }

    // Fault schedule, in fractions of the slowest consumer's progress.
    let mut schedule: Vec<(f64, &'static str)> = Vec::new();
    let jitter = |rng: &mut rand::rngs::StdRng| rng.random_range(0.0..0.05);
    let rounds = options.faults.fault_rounds;
    if options.faults.relay_kills() {
        for at in [0.2, 0.4, 0.6].into_iter().take(rounds) {
            schedule.push((at + jitter(&mut rng), "relay kill"));
        }
    }
    if options.faults.consumer_kills() {
        for at in [0.25, 0.5, 0.75].into_iter().take(rounds) {
            schedule.push((at + jitter(&mut rng), "consumer kills"));
        }
    }
    if broker_restarts {
        for at in [0.35, 0.65].into_iter().take(rounds.min(2)) {
            schedule.push((at + jitter(&mut rng), "broker restart"));
        }
    }
    if options.faults.pg_restart() {
        schedule.push((0.45 + jitter(&mut rng), "postgres restart"));
    }
    if options.faults.bad_input() {
        schedule.push((0.3, "bad input"));
    }
    if network.is_some() {
        for fault in NetworkFault::ALL {
            schedule.push((rng.random_range(0.1..0.85), fault.name()));
        }
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Writers stay at most 10% of the events ahead of the next fault's point.
    let total = options.events;
    let gate_for = |schedule: &[(f64, &str)]| match schedule.first() {
        Some((at, _)) => ((at + 0.1).min(1.0) * total as f64) as u64,
        None => total,
    };
    let writes = Arc::new(Writes::default());
    writes.gate.store(gate_for(&schedule), Ordering::Relaxed);
    let per_writer = options.events / options.writers as u64;
    let mut writer_tasks = Vec::new();
    for w in 0..options.writers {
        let quota = if w == 0 {
            options.events - per_writer * (options.writers as u64 - 1)
        } else {
            per_writer
        };
        writer_tasks.push(tokio::spawn(writer(
            url.clone(),
            topic.clone(),
            w,
            quota,
            seed,
            writes.clone(),
        )));
    }

    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(options.timeout_secs);
    let stalled = AtomicBool::new(false);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        relay.ensure_running()?;
        for c in &consumers {
            c.ensure_running()?;
        }
        let applied = applied_counts(dir.path(), options.consumers);
        let slowest = applied.iter().copied().min().unwrap_or(0);
        progress.set_position(slowest);
        let fraction = slowest as f64 / total.max(1) as f64;
        if let Some(network) = network.as_mut() {
            network.heal_when_due();
        }
        let network_fault_on = network.as_ref().is_some_and(|n| n.heals_at.is_some());
        // One fault per turn, so every killed process is restarted before the next fault, and
        // none while a network fault is in force.
        let due = schedule
            .first()
            .copied()
            .filter(|(at, _)| fraction >= *at && !network_fault_on);
        if let Some((_, what)) = due {
            schedule.remove(0);
            writes.gate.store(gate_for(&schedule), Ordering::Relaxed);
            progress.set_message(what);
            match what {
                "relay kill" => relay.kill(),
                "consumer kills" => {
                    for c in &consumers {
                        c.kill();
                    }
                }
                "broker restart" => broker.restart()?,
                "postgres restart" => restart_postgres()?,
                "bad input" => {
                    inject_bad_rows(&url, &topic).await?;
                    let (b, t) = (brokers.clone(), topic.clone());
                    tokio::task::spawn_blocking(move || inject_foreign_records(&b, &t)).await??;
                }
                other => {
                    if let (Some(fault), Some(network)) = (NetworkFault::named(other), network.as_mut()) {
                        let target = network.inject(fault, &mut rng);
                        *faults.entry(format!("{what} ({target})")).or_insert(0) += 1;
                        continue;
                    }
                }
            }
            *faults.entry(what.to_owned()).or_insert(0) += 1;
        }
        let writers_done = writer_tasks.iter().all(|t| t.is_finished());
        let parked_done = !options.faults.bad_input()
            || (0..options.consumers).all(|i| parked_count(dir.path(), i) >= BAD_AT_CONSUMER + FOREIGN);
        if writers_done && slowest >= total && schedule.is_empty() && parked_done && !network_fault_on {
            // A little longer, so a late repeat would still show up as a duplicate.
            tokio::time::sleep(Duration::from_secs(2)).await;
            break;
        }
        if Instant::now() > deadline {
            stalled.store(true, Ordering::Relaxed);
            break;
        }
    }
    for t in writer_tasks {
        if t.is_finished() {
            t.await??;
        } else {
            t.abort();
        }
    }
    relay.kill();
    for c in &consumers {
        c.kill();
    }
    faults.insert("relay restarts".into(), relay.restarts.load(Ordering::Relaxed));
    faults.insert(
        "consumer restarts".into(),
        consumers.iter().map(|c| c.restarts.load(Ordering::Relaxed)).sum(),
    );

    // The history.
    let client = connect_retrying(&url).await;
    let rows = client
        .query(
            "SELECT event_id::text, aggregate_id, convert_from(payload, 'UTF8') FROM outbox WHERE event_type = $1 AND aggregate_id LIKE 'A-%' ORDER BY id",
            &[&EVENT_TYPE],
        )
        .await?;
    let mut committed = Vec::with_capacity(rows.len());
    for row in rows {
        let payload: String = row.get(2);
        let v: serde_json::Value = serde_json::from_str(&payload)?;
        committed.push(CommittedEvent {
            id: row.get(0),
            aggregate: row.get(1),
            ordinal: v["ordinal"].as_u64().context("ordinal in a verify payload")?,
        });
    }
    let relay_dead: i64 = match options.relay {
        VerifyRelay::Poll => client
            .query_one("SELECT COUNT(*) FROM outbox WHERE status = 'DEAD'", &[])
            .await?
            .get(0),
        _ => client
            .query_one("SELECT COUNT(*) FROM exactly_relay_dead", &[])
            .await?
            .get(0),
    };
    let (b, t) = (brokers.clone(), topic.clone());
    let (on_topic, records_on_topic) = tokio::task::spawn_blocking(move || topic_event_ids(&b, &t)).await??;
    let consumers_history = (0..options.consumers)
        .map(|i| consumer_history(dir.path(), i))
        .collect::<Result<Vec<_>>>()?;
    let rolled_back = writes
        .rolled_back
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let history = History {
        committed,
        rolled_back,
        on_topic,
        consumers: consumers_history,
    };
    let findings = check(&history);
    let bad_total = if options.faults.bad_input() {
        BAD_AT_RELAY + BAD_AT_CONSUMER + FOREIGN
    } else {
        0
    };
    // applied + parked = total: every good event applied once (the checker), and every bad
    // input refused by the relay or parked by each consumer, none more.
    let reconciled = !options.faults.bad_input()
        || (relay_dead as u64 == BAD_AT_RELAY
            && (0..options.consumers).all(|i| parked_count(dir.path(), i) == BAD_AT_CONSUMER + FOREIGN));
    let parked: BTreeMap<String, u64> = (0..options.consumers)
        .map(|i| (format!("consumer-{i}"), parked_count(dir.path(), i)))
        .collect();
    let ok = findings.ok() && reconciled && !stalled.load(Ordering::Relaxed);
    let broker_log = broker.dir.path().join("broker.log");
    drop(broker);
    let kept_logs = if ok {
        None
    } else {
        let _ = std::fs::copy(&broker_log, dir.path().join("broker.log"));
        Some(dir.keep())
    };
    if options.relay != VerifyRelay::Poll {
        let _ = exactly_postgres::wal::drop_slot(&url, &slot).await;
    }
    drop(client);
    if ok {
        // A failed run keeps its database for inspection (scripts/setup drops leftovers).
        let admin = connect_retrying(&options.database).await;
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            tracing::warn!("cannot drop {name}: {e}");
        }
    }
    let mut report = report(
        parked,
        seed,
        options,
        &history,
        &findings,
        faults,
        relay_dead as u64,
        bad_total,
        reconciled,
        if ok {
            "exactly once".into()
        } else if stalled.load(Ordering::Relaxed) {
            format!("FAILED (not done within {} s)", options.timeout_secs)
        } else {
            "FAILED".into()
        },
        started.elapsed().as_secs_f64(),
    );
    report.kept_logs = kept_logs;
    report.records_on_topic = records_on_topic;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn report(
    parked: BTreeMap<String, u64>,
    seed: u64,
    options: &VerifyOptions,
    history: &History,
    findings: &Findings,
    faults: BTreeMap<String, u64>,
    relay_dead: u64,
    bad_input_total: u64,
    bad_input_reconciled: bool,
    verdict: String,
    seconds: f64,
) -> RunReport {
    RunReport {
        seed,
        relay: format!("{:?}", options.relay),
        events_committed: history.committed.len() as u64,
        records_on_topic: 0,
        rolled_back: history.rolled_back.len() as u64,
        seconds,
        faults,
        anomalies: Anomaly::ALL
            .iter()
            .map(|k| {
                let f = findings.anomalies.get(k).cloned().unwrap_or_default();
                (k.name().to_owned(), (f.count, f.examples))
            })
            .collect(),
        applied: findings.applied.clone(),
        parked,
        relay_dead,
        bad_input_total,
        bad_input_reconciled,
        verdict,
        kept_logs: None,
    }
}

fn print(report: &RunReport) {
    println!();
    println!(
        "  run seed {} · relay {} · {:.1} s",
        report.seed, report.relay, report.seconds
    );
    println!("  {:<46} {:>10}", "events committed", report.events_committed);
    println!("  {:<46} {:>10}", "rolled back", report.rolled_back);
    println!(
        "  {:<46} {:>10}  (resends and bad input included)",
        "records on the topic", report.records_on_topic
    );
    for (what, n) in &report.faults {
        println!("  {:<46} {:>10}", what, n);
    }
    println!("  {:<46} {:>10}  first examples", "anomaly", "count");
    for (name, (count, examples)) in &report.anomalies {
        println!("  {:<46} {:>10}  {}", name, count, examples.join(", "));
    }
    for (name, n) in &report.applied {
        println!(
            "  {:<46} {:>10}  (parked {})",
            format!("{name} applied"),
            n,
            report.parked.get(name).copied().unwrap_or(0)
        );
    }
    println!(
        "  {:<46} {:>10}  (relay refused {}; reconciled: {})",
        "bad input injected", report.bad_input_total, report.relay_dead, report.bad_input_reconciled
    );
    println!("  verdict: {}", report.verdict);
    if let Some(dir) = &report.kept_logs {
        println!("  logs and consumer databases kept in {}", dir.display());
    }
}

/// Runs `--runs` seeded runs; Ok(true) when every run is exactly once.
pub async fn verify(options: VerifyOptions) -> Result<bool> {
    let mut reports = Vec::new();
    for run in 0..options.runs {
        let seed = options.seed + u64::from(run);
        let progress = if options.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(options.events)
        };
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "  run {prefix} [{bar:40}] {pos}/{len} applied by the slowest consumer · {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        progress.set_prefix(format!("{}/{}", run + 1, options.runs));
        let report = run_once(&options, seed, &progress).await?;
        progress.finish_and_clear();
        print(&report);
        reports.push(report);
    }
    if let Some(path) = &options.report {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(reports.iter().all(|r| r.verdict == "exactly once"))
}
