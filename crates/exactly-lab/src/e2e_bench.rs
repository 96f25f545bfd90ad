//! `exactly bench e2e`: commit-to-effect latency. Writers commit outbox rows at a fixed rate, a
//! relay (poll, WAL, or WAL with Kafka transactions) moves them, and an idempotent consumer
//! applies them on PostgreSQL. Per event, the time from the writer's commit returning to the
//! consumer's effect row goes into an HDR histogram; the bench prints p50, p99, p99.9 and max
//! per mode and rate, with the sustained rate and whether the backlog stayed bounded, and writes
//! a CSV and a PNG plot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exactly_core::{Delivery, HandlerError, Inbound};
use exactly_kafka::{
    ConsumerConfig, ConsumerCounters, ExactlyOnce, IdempotentConsumer, KafkaSettings, Relay, RelayConfig,
    WalRelay, WalRelayConfig,
};
use exactly_postgres::{PgChangeFeed, PgEffects, PgHandler, PgOutbox, WalConfig};
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bench::BenchServices;
use crate::broker::given_or_local;

/// The relays `exactly bench e2e` can put between the writers and the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum E2eMode {
    /// The polling relay (claim, publish, mark SENT).
    Poll,
    /// The WAL relay (logical replication slot).
    Wal,
    /// The WAL relay publishing in Kafka transactions.
    WalExactlyOnce,
}

impl E2eMode {
    fn name(self) -> &'static str {
        match self {
            E2eMode::Poll => "poll",
            E2eMode::Wal => "wal",
            E2eMode::WalExactlyOnce => "wal-exactly-once",
        }
    }
}

/// Settings of `exactly bench e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct E2eBench {
    #[command(flatten)]
    pub services: BenchServices,
    /// Commit rates to hold, events per second, in order.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    pub rates: Vec<u64>,
    /// Relays to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "poll,wal,wal-exactly-once"
    )]
    pub modes: Vec<E2eMode>,
    /// How long each rate is held.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Commit interval of the exactly-once relay's Kafka transactions.
    #[arg(long, default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// Where e2e.csv and e2e.png are written.
    #[arg(long, default_value = "target/bench-e2e")]
    pub out: PathBuf,
}

/// How often a writer commits: each commit holds the events due since the last one.
const WRITER_TICK: Duration = Duration::from_millis(5);

/// The figures of one mode at one rate.
struct Phase {
    mode: E2eMode,
    target_rate: u64,
    committed: u64,
    seconds: f64,
    latency_us: Histogram<u64>,
    max_backlog: u64,
    drain: Option<Duration>,
    rss_kib: Option<u64>,
}

impl Phase {
    fn sustained_rate(&self) -> f64 {
        self.committed as f64 / self.seconds.max(1e-9)
    }

    /// Bounded: the effects caught up with the commits within a second of the last commit.
    fn bounded(&self) -> bool {
        self.drain.is_some_and(|d| d <= Duration::from_secs(1))
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

pub async fn e2e_bench(options: E2eBench) -> Result<()> {
    if options.rates.is_empty() || options.rates.contains(&0) {
        bail!("--rates needs one or more rates above 0");
    }
    let run_id = exactly_kafka::now().0;
    let (brokers, _local_broker) = given_or_local(options.services.brokers.as_deref()).await?;
    let kafka = options.services.kafka(&brokers)?;
    let mut phases = Vec::new();
    for &mode in &options.modes {
        eprintln!("bench e2e: {}", mode.name());
        phases.extend(run_mode(&options, mode, &kafka, run_id).await?);
    }

    println!();
    println!(
        "  commit-to-effect latency, {} s per rate, consumer: idempotent, PostgreSQL, batched",
        options.seconds
    );
    if !kafka.properties.is_empty() {
        // Secret values are redacted by the settings' Debug.
        println!("  kafka properties given: {kafka:?}");
    }
    println!(
        "  {:<17} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9} {:>9}",
        "mode",
        "target",
        "sustained",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "max backlog",
        "bounded",
        "RSS MiB"
    );
    for p in &phases {
        println!(
            "  {:<17} {:>7} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11} {:>9} {:>9}",
            p.mode.name(),
            p.target_rate,
            p.sustained_rate(),
            p.ms(0.5),
            p.ms(0.99),
            p.ms(0.999),
            p.latency_us.max() as f64 / 1000.0,
            p.max_backlog,
            if p.bounded() { "yes" } else { "NO" },
            p.rss_kib
                .map_or("?".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0)),
        );
    }
    std::fs::create_dir_all(&options.out).with_context(|| format!("creating {}", options.out.display()))?;
    let csv = options.out.join("e2e.csv");
    write_csv(&csv, &phases)?;
    let png = options.out.join("e2e.png");
    plot(&png, &phases)?;
    println!("\n  wrote {} and {}", csv.display(), png.display());
    // The goals: the WAL relay's p50 and p99, the exactly-once relay's p99 only.
    for (mode, rate, p50, p99) in [
        (E2eMode::Wal, 5_000, Some(10.0), 50.0),
        (E2eMode::WalExactlyOnce, 5_000, None, 150.0),
    ] {
        if let Some(p) = phases.iter().find(|p| p.mode == mode && p.target_rate == rate) {
            let met = p50.is_none_or(|p50| p.ms(0.5) < p50) && p.ms(0.99) < p99;
            let p50_goal = p50.map_or(String::new(), |p50| format!("p50 < {p50} ms, "));
            println!(
                "  goal {} at {rate}/s: {p50_goal}p99 < {p99} ms: {}",
                mode.name(),
                if met { "met" } else { "NOT met" }
            );
        }
    }
    Ok(())
}

/// One fresh database, topic, relay and consumer for `mode`, held at each rate in turn.
async fn run_mode(
    options: &E2eBench,
    mode: E2eMode,
    kafka: &KafkaSettings,
    run_id: i64,
) -> Result<Vec<Phase>> {
    let prefix = format!("exactly_bench_e2e_{}", mode.name().replace('-', "_"));
    let (_, url) = options.services.fresh_database(&prefix, run_id).await?;
    let topic = format!("bench-e2e-{}-{run_id}", mode.name());
    exactly_kafka::ensure_topics(kafka, &[&topic], 3).await?;
    // Migrates the outbox; the relay connects its own.
    drop(PgOutbox::connect(&url).await?);
    let writer = exactly_postgres::connect(&url).await?;
    writer.batch_execute(EFFECTS_SCHEMA).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let relay = start_relay(
        mode,
        &url,
        kafka,
        options.commit_interval_ms,
        run_id,
        stop_rx.clone(),
    )
    .await?;
    let counters = Arc::new(ConsumerCounters::default());
    let group = format!("bench-e2e-{}-{run_id}", mode.name());
    let store = PgEffects::connect(&url, &group, LatencyHandler).await?;
    let consumer = IdempotentConsumer::new(store, ConsumerConfig::new(kafka, &group, &[&topic]))?
        .with_counters(counters.clone());
    let consumer_stop = stop_rx.clone();
    let consumer: JoinHandle<Result<()>> =
        tokio::spawn(async move { Ok(consumer.run(consumer_stop).await?) });

    // Warm-up: the group joined and the relay running before anything is measured.
    let mut written = Written::default();
    let warm_up = commit_at(&writer, &topic, 200, Duration::from_millis(500), &mut written).await?;
    wait_applied(
        &counters,
        warm_up.committed,
        Duration::from_secs(60),
        &relay,
        &consumer,
    )
    .await
    .context("warm-up: the first events never took effect")?;

    let mut phases = Vec::new();
    for &rate in &options.rates {
        let first_tick = written.next_tick;
        let applied_before = counters.applied.load(Ordering::Relaxed);
        let committed_before = written.events;
        let sampler = BacklogSampler::start(
            counters.clone(),
            written.shared.clone(),
            committed_before,
            applied_before,
        );
        let run = commit_at(
            &writer,
            &topic,
            rate,
            Duration::from_secs(options.seconds),
            &mut written,
        )
        .await?;
        let max_backlog = sampler.stop().await;
        let drain_started = Instant::now();
        let drained = wait_applied(
            &counters,
            applied_before + run.committed,
            Duration::from_secs(60),
            &relay,
            &consumer,
        )
        .await;
        let drain = drained.is_ok().then(|| drain_started.elapsed());
        let latency_us = latencies(&writer, &written.commit_us, first_tick, written.next_tick).await?;
        let phase = Phase {
            mode,
            target_rate: rate,
            committed: run.committed,
            seconds: run.seconds,
            latency_us,
            max_backlog,
            drain,
            rss_kib: rss_kib(),
        };
        eprintln!(
            "bench e2e: {} at {rate}/s: {:.0}/s sustained, p50 {:.1} ms, p99 {:.1} ms",
            mode.name(),
            phase.sustained_rate(),
            phase.ms(0.5),
            phase.ms(0.99)
        );
        phases.push(phase);
        drained?;
    }
    let _ = stop_tx.send(true);
    relay.await.context("relay task")??;
    consumer.await.context("consumer task")??;
    Ok(phases)
}

/// The effect table: one row per applied event, stamped inside the consumer's transaction.
const EFFECTS_SCHEMA: &str = "CREATE TABLE bench_effects (
    tick BIGINT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())";

/// Writes each event's writer tick (from its payload) into `bench_effects`.
struct LatencyHandler;

fn tick_of(delivery: &Delivery) -> Result<i64, HandlerError> {
    serde_json::from_slice::<serde_json::Value>(&delivery.envelope.payload)
        .ok()
        .and_then(|v| v.get("tick").and_then(serde_json::Value::as_i64))
        .ok_or_else(|| HandlerError::Rejected("payload has no \"tick\"".into()))
}

impl PgHandler for LatencyHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let tick = tick_of(inbound.delivery)?;
            tx.execute("INSERT INTO bench_effects (tick) VALUES ($1)", &[&tick])
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        batch: &'a [Inbound<'a>],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let ticks = batch
                .iter()
                .map(|i| tick_of(i.delivery))
                .collect::<Result<Vec<i64>, _>>()?;
            tx.execute(
                "INSERT INTO bench_effects (tick) SELECT unnest($1::int8[])",
                &[&ticks],
            )
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }
}

async fn start_relay(
    mode: E2eMode,
    url: &str,
    kafka: &KafkaSettings,
    commit_interval_ms: u64,
    run_id: i64,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<Result<()>>> {
    Ok(match mode {
        E2eMode::Poll => {
            let mut relay = Relay::new(PgOutbox::connect(url).await?, RelayConfig::new(kafka))?;
            tokio::spawn(async move { Ok(relay.run(stop).await?) })
        }
        E2eMode::Wal | E2eMode::WalExactlyOnce => {
            let config = WalConfig::new(url);
            exactly_postgres::wal::ensure_slot(&config).await?;
            let feed = PgChangeFeed::connect(config).await?;
            let relay = WalRelay::new(feed, WalRelayConfig::new(kafka))?;
            if mode == E2eMode::Wal {
                tokio::spawn(async move {
                    let mut relay = relay;
                    Ok(relay.run(stop).await?)
                })
            } else {
                let mut settings = ExactlyOnce::for_source(relay.source());
                settings.progress_topic = format!("bench-e2e-progress-{run_id}");
                settings.commit_interval = Duration::from_millis(commit_interval_ms);
                let relay = relay.exactly_once(settings).await?;
                tokio::spawn(async move {
                    let mut relay = relay;
                    Ok(relay.run(stop).await?)
                })
            }
        }
    })
}

/// What the writer committed so far: per tick, when its commit returned (µs since the epoch).
#[derive(Default)]
struct Written {
    next_tick: i64,
    events: u64,
    commit_us: Vec<i64>,
    shared: Arc<AtomicU64>,
}

struct WriterRun {
    committed: u64,
    seconds: f64,
}

/// Commits outbox rows at `rate` per second for `duration`: every tick one transaction with the
/// events due by then (so a slow commit is caught up by a larger next one, not lost as rate).
async fn commit_at(
    client: &tokio_postgres::Client,
    topic: &str,
    rate: u64,
    duration: Duration,
    written: &mut Written,
) -> Result<WriterRun> {
    let started = Instant::now();
    let mut committed = 0u64;
    let mut interval = tokio::time::interval(WRITER_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < duration {
        interval.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let n = due.saturating_sub(committed).min(rate.max(1));
        if n == 0 {
            continue;
        }
        let tick = written.next_tick;
        client
            .execute(
                "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
                 SELECT gen_random_uuid(), 'Bench', 'thing', 'A-' || (g % 1000), $1,
                        convert_to('{\"tick\":' || $2::bigint || '}', 'UTF8'), now()
                 FROM generate_series(1, $3::bigint) g",
                &[&topic, &tick, &(n as i64)],
            )
            .await
            .context("bench writer")?;
        written
            .commit_us
            .push(exactly_kafka::now().0 * 1000 + micros_in_ms());
        written.next_tick += 1;
        committed += n;
        written.events += n;
        written.shared.store(written.events, Ordering::Relaxed);
    }
    Ok(WriterRun {
        committed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The microseconds within the current millisecond of the wall clock.
fn micros_in_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.subsec_micros() % 1000) as i64)
        .unwrap_or(0)
}

async fn wait_applied(
    counters: &ConsumerCounters,
    target: u64,
    limit: Duration,
    relay: &JoinHandle<Result<()>>,
    consumer: &JoinHandle<Result<()>>,
) -> Result<()> {
    let started = Instant::now();
    while counters.applied.load(Ordering::Relaxed) < target {
        if relay.is_finished() || consumer.is_finished() {
            bail!("the relay or the consumer stopped");
        }
        if started.elapsed() > limit {
            bail!(
                "{} of {target} events applied after {} s",
                counters.applied.load(Ordering::Relaxed),
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Samples committed − applied every 50 ms while a rate is held.
struct BacklogSampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<u64>,
}

impl BacklogSampler {
    fn start(
        counters: Arc<ConsumerCounters>,
        committed: Arc<AtomicU64>,
        committed_base: u64,
        applied_base: u64,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut max = 0u64;
            loop {
                let c = committed.load(Ordering::Relaxed).saturating_sub(committed_base);
                let a = counters
                    .applied
                    .load(Ordering::Relaxed)
                    .saturating_sub(applied_base);
                max = max.max(c.saturating_sub(a));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stopped.changed() => return max,
                }
            }
        });
        BacklogSampler { stop, task }
    }

    async fn stop(self) -> u64 {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(0)
    }
}

/// Effect time − commit time of every event of ticks `from..to`, in µs.
async fn latencies(
    client: &tokio_postgres::Client,
    commit_us: &[i64],
    from: i64,
    to: i64,
) -> Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let rows = client
        .query(
            "SELECT tick, (extract(epoch from applied_at) * 1000000)::bigint FROM bench_effects
             WHERE tick >= $1 AND tick < $2",
            &[&from, &to],
        )
        .await?;
    for row in rows {
        let (tick, applied): (i64, i64) = (row.get(0), row.get(1));
        let Some(committed) = usize::try_from(tick).ok().and_then(|t| commit_us.get(t)) else {
            continue;
        };
        histogram.saturating_record(applied.saturating_sub(*committed).max(1) as u64);
    }
    Ok(histogram)
}

/// This process's resident set (relay, consumer and writer all run in it).
pub(crate) fn rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn write_csv(path: &Path, phases: &[Phase]) -> Result<()> {
    let mut out = String::from(
        "mode,target_rate,sustained_rate,events,p50_ms,p99_ms,p999_ms,max_ms,max_backlog,drain_ms,bounded,rss_kib\n",
    );
    for p in phases {
        out.push_str(&format!(
            "{},{},{:.0},{},{:.2},{:.2},{:.2},{:.2},{},{},{},{}\n",
            p.mode.name(),
            p.target_rate,
            p.sustained_rate(),
            p.latency_us.len(),
            p.ms(0.5),
            p.ms(0.99),
            p.ms(0.999),
            p.latency_us.max() as f64 / 1000.0,
            p.max_backlog,
            p.drain.map_or(String::new(), |d| d.as_millis().to_string()),
            p.bounded(),
            p.rss_kib.map_or(String::new(), |k| k.to_string()),
        ));
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Plots draw text with the font shipped in the binary (the machine may have none).
pub fn register_plot_font() -> Result<()> {
    static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the plot font did not load"))
}

/// Latency percentiles (log scale) against the commit rate, a colour per mode and
/// a line per percentile.
fn plot(path: &Path, phases: &[Phase]) -> Result<()> {
    use plotters::prelude::*;
    register_plot_font()?;
    let rates: Vec<u64> = phases.iter().map(|p| p.target_rate).collect();
    let max_rate = *rates.iter().max().unwrap_or(&1) as f64;
    let max_ms = phases.iter().map(|p| p.ms(0.999)).fold(1.0f64, f64::max) * 2.0;
    let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("exactly: commit-to-effect latency", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(max_rate * 1.1), (0.1f64..max_ms).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("commit rate, events/s")
        .y_desc("latency, ms")
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    let mut by_mode: HashMap<&'static str, Vec<&Phase>> = HashMap::new();
    for p in phases {
        by_mode.entry(p.mode.name()).or_default().push(p);
    }
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN];
    let mut modes: Vec<_> = by_mode.into_iter().collect();
    modes.sort_by_key(|(name, _)| *name);
    for (i, (mode, points)) in modes.iter().enumerate() {
        let colour = colours[i % colours.len()];
        for (quantile, label, width) in [(0.5, "p50", 1), (0.99, "p99", 3), (0.999, "p99.9", 5)] {
            let series: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.target_rate as f64, p.ms(quantile).max(0.1)))
                .collect();
            chart
                .draw_series(LineSeries::new(series.clone(), colour.stroke_width(width)))?
                .label(format!("{mode} {label}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width))
                });
            chart.draw_series(series.into_iter().map(|xy| Circle::new(xy, 3, colour.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
