//! `exactly demo`: the story end to end, with faults, and a reconciliation at the end.

use exactly_daemon::settings::RelayMode;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use exactly_core::{EffectStore, OutboxStore};
use exactly_kafka::{
    ConsumerConfig, ConsumerCounters, FaultPoint, Faults, IdempotentConsumer, KafkaFlowError, Relay,
    RelayConfig, RelayCounters, WalRelay, WalRelayConfig, WalRelayCounters,
};
use exactly_postgres::{PgEffects, PgOutbox};
use exactly_sqlite::{SqliteEffects, SqliteOutbox};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::backend::{
    observe_postgres, observe_sqlite, write_postgres, write_sqlite, Backend, Observed, StoryHandler, Workload,
};
use crate::broker::given_or_local;
use crate::story::{StoryConsumer, Topics, CONSUMER_SCHEMA, SERVICE_SCHEMA};
use exactly_postgres::{PgChangeFeed, WalConfig};

/// Demo settings (see `exactly demo --help`).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Events to commit.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub writers: usize,
    /// Concurrent relays.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub relays: usize,
    /// postgres://… to run on PostgreSQL (a fresh database per run); default: SQLite files.
    #[arg(long)]
    pub database: Option<String>,
    /// Use this broker instead of starting one.
    #[arg(long, env = "EXACTLY_DEMO_BROKERS")]
    pub brokers: Option<String>,
    /// Where the SQLite files go (default: a new folder in the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Turn off the injected crashes.
    #[arg(long)]
    pub no_faults: bool,
    /// Seed of the workload and the fault schedule.
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Which relay moves the events (wal needs --database postgres://…).
    #[arg(long, value_enum, default_value_t)]
    pub relay: RelayMode,
    /// Topic name suffix (default: -<run id>, so runs on a shared broker stay apart);
    /// `--topic-suffix ""` writes coupon-events and product-events, the topics `exactly stream`
    /// reads by default.
    #[arg(long)]
    pub topic_suffix: Option<String>,
}

impl DemoOptions {
    fn faults(&self) -> bool {
        !self.no_faults
    }

    fn wal(&self) -> bool {
        self.relay == RelayMode::Wal
    }
}

/// Crash budgets, shared by the restarts of each role.
struct FaultBudget {
    relay_crashes: AtomicU64,
    consumer_crashes: AtomicU64,
}

/// What the demo counted while it ran.
#[derive(Default)]
struct Live {
    committed: AtomicU64,
    committed_coupons: AtomicU64,
    rolled_back: Mutex<Vec<String>>,
    relay: Arc<RelayCounters>,
    wal: Arc<WalRelayCounters>,
    consumers: Vec<(StoryConsumer, Arc<ConsumerCounters>)>,
    relay_crashes: AtomicU64,
    consumer_crashes: AtomicU64,
}

/// Final figures; `ok()` is the exit status.
#[derive(Debug, Default)]
pub struct DemoReport {
    pub committed: u64,
    pub rolled_back: u64,
    pub published: u64,
    pub delivered: u64,
    pub applied_once: u64,
    pub applied_twice: u64,
    pub duplicates_suppressed: u64,
    pub parked: u64,
    /// Offset gaps a consumer read again and found records in (the broker had served past
    /// them; see `exactly_core::offset_gap`).
    pub gaps_filled: u64,
    pub lost: u64,
    pub aborted_visible: u64,
    pub unsent_rows: i64,
    pub state_mismatches: Vec<String>,
    pub relay_crashes: u64,
    pub consumer_crashes: u64,
    pub seconds: f64,
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.applied_twice == 0
            && self.aborted_visible == 0
            && self.state_mismatches.is_empty()
    }

    pub fn print(&self) {
        let rate = self.committed as f64 / self.seconds.max(0.001);
        println!();
        println!("  {:<34} {:>10}", "events committed", self.committed);
        println!(
            "  {:<34} {:>10}",
            "rolled back (must never appear)", self.rolled_back
        );
        println!(
            "  {:<34} {:>10}",
            "published (acks, repeats included)", self.published
        );
        println!("  {:<34} {:>10}", "delivered (repeats included)", self.delivered);
        println!("  {:<34} {:>10}", "applied once", self.applied_once);
        println!(
            "  {:<34} {:>10}",
            "duplicates suppressed", self.duplicates_suppressed
        );
        println!("  {:<34} {:>10}", "parked", self.parked);
        println!(
            "  {:<34} {:>10}",
            "skipped by the broker, read again", self.gaps_filled
        );
        println!("  {:<34} {:>10}", "applied twice", self.applied_twice);
        println!("  {:<34} {:>10}", "lost", self.lost);
        println!(
            "  {:<34} {:>10}",
            "rolled-back events visible", self.aborted_visible
        );
        println!("  {:<34} {:>10}", "state mismatches", self.state_mismatches.len());
        println!("  {:<34} {:>10}", "outbox rows not SENT", self.unsent_rows);
        println!("  {:<34} {:>10}", "relay crashes injected", self.relay_crashes);
        println!(
            "  {:<34} {:>10}",
            "consumer crashes injected", self.consumer_crashes
        );
        println!("  {:<34} {:>10.1}", "seconds", self.seconds);
        println!("  {:<34} {:>10.0}", "events/s end to end", rate);
        for m in self.state_mismatches.iter().take(5) {
            println!("  mismatch: {m}");
        }
        println!(
            "\n  verdict: {}",
            if self.ok() { "exactly once" } else { "FAILED" }
        );
    }
}

/// Runs the story and returns the reconciled report.
pub async fn run_demo(options: DemoOptions) -> Result<DemoReport> {
    let run_id = exactly_kafka::now().0;
    let (brokers, _local_broker) = given_or_local(options.brokers.as_deref()).await?;
    let topics = Topics::with_suffix(
        &options
            .topic_suffix
            .clone()
            .unwrap_or_else(|| format!("-{run_id}")),
    );
    if !options.quiet {
        println!(
            "  topics: {} (orders, coupons) and {} (likes, renames)",
            topics.coupons, topics.products
        );
    }
    exactly_kafka::ensure_topics(&brokers, &[&topics.coupons, &topics.products], 3)
        .await
        .with_context(|| {
            format!("creating topics on {brokers} (is the broker running? scripts/setup starts one)")
        })?;
    let backend = prepare_backend(&options, run_id).await?;
    let wal_slot = match (&backend, options.wal()) {
        (Backend::Postgres { url }, true) => {
            // The slot must exist before the first business commit, or it would miss it.
            let config = WalConfig::new(url);
            exactly_postgres::wal::ensure_slot(&config).await?;
            Some((url.clone(), config.slot))
        }
        (Backend::Sqlite { .. }, true) => {
            anyhow::bail!("--relay wal follows PostgreSQL logical replication: add --database postgres://…")
        }
        _ => None,
    };
    if !options.quiet {
        match &backend {
            Backend::Sqlite { dir } => eprintln!("demo: SQLite files in {}, broker {brokers}", dir.display()),
            Backend::Postgres { url } => eprintln!(
                "demo: PostgreSQL {}, broker {brokers}",
                exactly_postgres::redact_url(url)
            ),
        }
    }

    let live = Arc::new(Live {
        consumers: StoryConsumer::ALL.iter().map(|c| (*c, Arc::default())).collect(),
        ..Live::default()
    });
    let budget = Arc::new(FaultBudget {
        relay_crashes: AtomicU64::new(if options.faults() { 3 } else { 0 }),
        consumer_crashes: AtomicU64::new(if options.faults() { 2 } else { 0 }),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();

    let wakes: Vec<Arc<Notify>> = (0..options.relays).map(|_| Arc::new(Notify::new())).collect();
    for (index, wake) in wakes.iter().enumerate() {
        let (backend, brokers, live, budget, stop, wake) = (
            backend.clone(),
            brokers.clone(),
            live.clone(),
            budget.clone(),
            stop_rx.clone(),
            wake.clone(),
        );
        let seed = options.seed ^ (index as u64 + 1);
        if options.wal() {
            // Every WAL relay tries the one slot: the first streams, the others wait as standbys.
            tasks.spawn(async move { supervise_wal_relay(backend, brokers, live, budget, stop, seed).await });
        } else {
            tasks.spawn(
                async move { supervise_relay(backend, brokers, live, budget, stop, wake, seed).await },
            );
        }
    }
    for (consumer, counters) in live.consumers.clone() {
        let (backend, brokers, live, budget, stop, topics) = (
            backend.clone(),
            brokers.clone(),
            live.clone(),
            budget.clone(),
            stop_rx.clone(),
            topics.clone(),
        );
        let seed = options.seed ^ (0x100 + consumer as u64);
        tasks.spawn(async move {
            supervise_consumer(
                backend, brokers, topics, consumer, counters, live, budget, stop, seed, run_id,
            )
            .await
        });
    }
    let writers_done = spawn_writers(&options, &backend, &topics, live.clone(), wakes.clone()).await?;

    let bar = if options.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(options.events * 2)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} applied  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let deadline = started + Duration::from_secs(options.timeout_secs);
    loop {
        let committed = live.committed.load(Ordering::Relaxed);
        let coupons = live.committed_coupons.load(Ordering::Relaxed);
        // Coupon events reach one consumer, product events two (likes and product cache).
        let expected = coupons + 2 * (committed - coupons.min(committed));
        let done: u64 = live
            .consumers
            .iter()
            .map(|(_, c)| c.applied.load(Ordering::Relaxed) + c.parked.load(Ordering::Relaxed))
            .sum();
        let writing = writers_done.load(Ordering::Relaxed) > 0;
        bar.set_length(if writing {
            expected.max(options.events)
        } else {
            expected
        });
        bar.set_position(done);
        bar.set_message(format!(
            "committed {committed}, relay crashes {}, consumer crashes {}",
            live.relay_crashes.load(Ordering::Relaxed),
            live.consumer_crashes.load(Ordering::Relaxed)
        ));
        if !writing && done >= expected {
            break;
        }
        if Instant::now() > deadline {
            bar.println("demo: timed out waiting for consumers; reporting what arrived");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    while let Some(result) = tasks.join_next().await {
        if let Ok(Err(e)) = result {
            tracing::warn!("demo task ended with: {e:#}");
        }
    }

    if let Some((url, slot)) = wal_slot {
        // A slot left behind would keep WAL from being recycled for good.
        exactly_postgres::wal::drop_slot(&url, &slot).await?;
    }
    let observed = match &backend {
        Backend::Sqlite { dir } => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || observe_sqlite(&dir)).await??
        }
        Backend::Postgres { url } => observe_postgres(url).await?,
    };
    Ok(reconcile(&observed, &live, seconds))
}

fn reconcile(observed: &Observed, live: &Live, seconds: f64) -> DemoReport {
    let rolled_back: HashSet<String> = live
        .rolled_back
        .lock()
        .map(|v| v.iter().cloned().collect())
        .unwrap_or_default();
    let mut report = DemoReport {
        committed: observed.committed.len() as u64,
        rolled_back: rolled_back.len() as u64,
        published: live.relay.published.load(Ordering::Relaxed) + live.wal.acked.load(Ordering::Relaxed),
        unsent_rows: observed.unsent,
        state_mismatches: observed.state_mismatches.clone(),
        relay_crashes: live.relay_crashes.load(Ordering::Relaxed),
        consumer_crashes: live.consumer_crashes.load(Ordering::Relaxed),
        seconds,
        ..DemoReport::default()
    };
    for (consumer, counters) in &live.consumers {
        report.delivered += counters.delivered.load(Ordering::Relaxed);
        report.duplicates_suppressed += counters.duplicates.load(Ordering::Relaxed);
        report.gaps_filled += counters.offset_gaps_filled.load(Ordering::Relaxed);
        let empty = Default::default();
        let effects = observed.effects.get(consumer.name()).unwrap_or(&empty);
        let (parked_ids, parked_count) = observed.parked.get(consumer.name()).cloned().unwrap_or_default();
        report.parked += parked_count as u64;
        let parked: HashSet<String> = parked_ids.into_iter().collect();
        for (event_id, event_type) in &observed.committed {
            if !consumer.wants(event_type) {
                continue;
            }
            match effects.get(event_id).copied().unwrap_or(0) {
                0 if parked.contains(event_id) => {}
                0 => report.lost += 1,
                1 => report.applied_once += 1,
                _ => report.applied_twice += 1,
            }
        }
        report.aborted_visible += effects.keys().filter(|id| rolled_back.contains(*id)).count() as u64;
    }
    report.aborted_visible += observed
        .committed
        .keys()
        .filter(|id| rolled_back.contains(*id))
        .count() as u64;
    report
}

async fn prepare_backend(options: &DemoOptions, run_id: i64) -> Result<Backend> {
    match &options.database {
        None => {
            let dir = match &options.dir {
                Some(d) => d.clone(),
                None => std::env::temp_dir().join(format!("exactly-demo-{run_id}")),
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let service = exactly_sqlite::open(&Backend::sqlite_path(&dir, "service"))?;
            service.execute_batch(SERVICE_SCHEMA)?;
            for consumer in StoryConsumer::ALL {
                exactly_sqlite::open(&Backend::sqlite_path(&dir, consumer.name()))?
                    .execute_batch(CONSUMER_SCHEMA)?;
            }
            Ok(Backend::Sqlite { dir })
        }
        Some(url) => {
            // A fresh database per run, so reruns never see an earlier run's rows.
            let admin = exactly_postgres::connect(url).await?;
            let name = format!("exactly_demo_{run_id}");
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .context("creating the demo database")?;
            let url = with_database(url, &name);
            let mut client = exactly_postgres::connect(&url).await?;
            exactly_postgres::migrations::migrate(&mut client).await?;
            client.batch_execute(SERVICE_SCHEMA).await?;
            client.batch_execute(CONSUMER_SCHEMA).await?;
            Ok(Backend::Postgres { url })
        }
    }
}

/// `postgres://u@h:p/db?x` with the database replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{host_part}/{database}{query}")
}

async fn spawn_writers(
    options: &DemoOptions,
    backend: &Backend,
    topics: &Topics,
    live: Arc<Live>,
    wakes: Vec<Arc<Notify>>,
) -> Result<Arc<AtomicU64>> {
    let remaining = Arc::new(AtomicU64::new(options.events));
    let running = Arc::new(AtomicU64::new(options.writers as u64));
    for writer in 0..options.writers {
        let (remaining, running, live, wakes, topics) = (
            remaining.clone(),
            running.clone(),
            live.clone(),
            wakes.clone(),
            topics.clone(),
        );
        let mut workload = Workload::new(options.seed, writer);
        let finish = move |result: Result<()>| {
            if let Err(e) = result {
                eprintln!("demo: writer {writer} stopped: {e:#}");
            }
        };
        let take = {
            let remaining = remaining.clone();
            move || {
                remaining
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            }
        };
        let record = move |live: &Live, op: &crate::backend::Operation, rollback: bool, id: uuid::Uuid| {
            if rollback {
                if let Ok(mut v) = live.rolled_back.lock() {
                    v.push(id.hyphenated().to_string());
                }
            } else {
                live.committed.fetch_add(1, Ordering::Relaxed);
                if matches!(op, crate::backend::Operation::Order { .. }) {
                    live.committed_coupons.fetch_add(1, Ordering::Relaxed);
                }
                for w in &wakes {
                    w.notify_one();
                }
            }
        };
        match backend {
            Backend::Sqlite { dir } => {
                let path = Backend::sqlite_path(dir, "service");
                tokio::task::spawn_blocking(move || {
                    let result = (|| -> Result<()> {
                        let mut conn = exactly_sqlite::open(&path)?;
                        loop {
                            let (op, rollback) = workload.next_operation();
                            if !rollback && !take() {
                                return Ok(());
                            }
                            let id = write_sqlite(&mut conn, &op, rollback, &topics)?;
                            record(&live, &op, rollback, id);
                        }
                    })();
                    running.fetch_sub(1, Ordering::SeqCst);
                    finish(result);
                });
            }
            Backend::Postgres { url } => {
                let url = url.clone();
                tokio::spawn(async move {
                    let result = async {
                        let mut client = exactly_postgres::connect(&url).await?;
                        loop {
                            let (op, rollback) = workload.next_operation();
                            if !rollback && !take() {
                                return Ok(());
                            }
                            let id = write_postgres(&mut client, &op, rollback, &topics).await?;
                            record(&live, &op, rollback, id);
                        }
                    }
                    .await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    finish(result);
                });
            }
        }
    }
    Ok(running)
}

/// Crashes at the `first`-th time the point is reached (so every run with faults on crashes at
/// least once, however the batches fall), then at random with probability 1/`one_in`.
fn sometimes(seed: u64, first: u64, one_in: u64) -> impl Fn() -> bool + Send + Sync {
    let rng = Mutex::new(StdRng::seed_from_u64(seed));
    let calls = AtomicU64::new(0);
    move || {
        calls.fetch_add(1, Ordering::Relaxed) + 1 == first
            || rng
                .lock()
                .map(|mut r| r.random_range(0..one_in) == 0)
                .unwrap_or(false)
    }
}

fn relay_faults(budget: Arc<FaultBudget>, seed: u64) -> Faults {
    let fire = sometimes(seed, 2, 8);
    Faults::new(move |point| {
        point == FaultPoint::RelayAfterPublishBeforeSettle
            && fire()
            && budget
                .relay_crashes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    })
}

async fn supervise_relay(
    backend: Backend,
    brokers: String,
    live: Arc<Live>,
    budget: Arc<FaultBudget>,
    stop: watch::Receiver<bool>,
    wake: Arc<Notify>,
    seed: u64,
) -> Result<()> {
    let mut generation = 0u64;
    while !*stop.borrow() {
        generation += 1;
        let mut config = RelayConfig::new(&brokers);
        config.owner = format!("{}-{generation}", config.owner);
        // Short lease: a crashed relay's rows are taken over within a second and a half.
        config.lease_ms = 1_500;
        config.batch_size = 200;
        config.poll_interval = Duration::from_millis(100);
        let faults = relay_faults(budget.clone(), seed ^ generation);
        let result = match &backend {
            Backend::Sqlite { dir } => {
                let store = SqliteOutbox::open(&Backend::sqlite_path(dir, "service"))?;
                let wake_store = store.wake_handle();
                let forward = forward_wakes(wake.clone(), wake_store);
                let result = run_relay(store, config, faults, &live, stop.clone()).await;
                forward.abort();
                result
            }
            Backend::Postgres { url } => {
                let store = PgOutbox::connect(url).await?;
                run_relay(store, config, faults, &live, stop.clone()).await
            }
        };
        match result {
            Ok(()) => break,
            Err(KafkaFlowError::InjectedCrash(_)) => {
                live.relay_crashes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("relay failed, restarting: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

async fn supervise_wal_relay(
    backend: Backend,
    brokers: String,
    live: Arc<Live>,
    budget: Arc<FaultBudget>,
    stop: watch::Receiver<bool>,
    seed: u64,
) -> Result<()> {
    let Backend::Postgres { url } = backend else {
        anyhow::bail!("the WAL relay needs PostgreSQL");
    };
    let mut generation = 0u64;
    while !*stop.borrow() {
        generation += 1;
        let mut feed_config = WalConfig::new(&url);
        feed_config.heartbeat_interval = Duration::from_secs(1);
        let feed = match PgChangeFeed::connect(feed_config).await {
            Ok(feed) => feed,
            Err(e) => {
                // Another relay holds the slot: stand by and try again.
                tracing::debug!("wal relay standing by: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let faults = relay_faults(budget.clone(), seed ^ generation);
        let relay = WalRelay::new(feed, WalRelayConfig::new(&brokers));
        let result = match relay {
            Ok(relay) => {
                // Dropped unflushed on a crash, as a killed process would be.
                let mut relay = relay.with_faults(faults).with_counters(live.wal.clone());
                relay.run(stop.clone()).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => break,
            Err(KafkaFlowError::InjectedCrash(_)) => {
                live.relay_crashes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("wal relay failed, restarting: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

fn forward_wakes(from: Arc<Notify>, to: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            from.notified().await;
            to.notify_one();
        }
    })
}

async fn run_relay<S: OutboxStore>(
    store: S,
    config: RelayConfig,
    faults: Faults,
    live: &Live,
    stop: watch::Receiver<bool>,
) -> Result<(), KafkaFlowError> {
    // Dropping the relay on a crash drops its producer unflushed, as a killed process would.
    let mut relay = Relay::new(store, config)?
        .with_faults(faults)
        .with_counters(live.relay.clone());
    relay.run(stop).await
}

#[allow(clippy::too_many_arguments)]
async fn supervise_consumer(
    backend: Backend,
    brokers: String,
    topics: Topics,
    consumer: StoryConsumer,
    counters: Arc<ConsumerCounters>,
    live: Arc<Live>,
    budget: Arc<FaultBudget>,
    stop: watch::Receiver<bool>,
    seed: u64,
    run_id: i64,
) -> Result<()> {
    let group = format!("exactly-demo-{}-{run_id}", consumer.name());
    let config = ConsumerConfig::new(&brokers, &group, &[consumer.topic(&topics)]);
    let mut generation = 0u64;
    while !*stop.borrow() {
        generation += 1;
        let fire = sometimes(seed ^ generation, 100, 1500);
        let budget = budget.clone();
        let faults = Faults::new(move |point| {
            point == FaultPoint::ConsumerAfterApplyBeforeOffsetCommit
                && fire()
                && budget
                    .consumer_crashes
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
        });
        let result = match &backend {
            Backend::Sqlite { dir } => {
                let store = SqliteEffects::open(
                    &Backend::sqlite_path(dir, consumer.name()),
                    consumer.name(),
                    StoryHandler(consumer),
                )?;
                run_consumer(store, config.clone(), faults, counters.clone(), stop.clone()).await
            }
            Backend::Postgres { url } => {
                let store = PgEffects::connect(url, consumer.name(), StoryHandler(consumer)).await?;
                run_consumer(store, config.clone(), faults, counters.clone(), stop.clone()).await
            }
        };
        match result {
            Ok(()) => break,
            Err(KafkaFlowError::InjectedCrash(_)) => {
                live.consumer_crashes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("consumer {} failed, restarting: {e}", consumer.name());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

async fn run_consumer<S: EffectStore>(
    store: S,
    config: ConsumerConfig,
    faults: Faults,
    counters: Arc<ConsumerCounters>,
    stop: watch::Receiver<bool>,
) -> Result<(), KafkaFlowError> {
    // Dropping the consumer on a crash leaves the group without committing, as a killed
    // process would; its records are redelivered to the next generation.
    let consumer = IdempotentConsumer::new(store, config)?
        .with_faults(faults)
        .with_counters(counters);
    consumer.run(stop).await
}
