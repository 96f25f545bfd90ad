//! `exactly soak`: a steady load for a long time, with a fault every few minutes, sampling each
//! process's memory, descriptors and sockets, the dedupe tables and the slot's retained WAL,
//! to show that nothing grows without bound. Two pipelines run side by side on the durable
//! broker: the WAL relay to a consumer keeping watermarks, the polling relay (UUIDv7 event
//! ids) to a consumer keeping a pruned key set; both consumers on PostgreSQL.
//!
//! The faults make the processes reconnect without killing them (broker restart, PostgreSQL
//! crash-restart, every connection reset, a blackhole): a leak on a reconnection path shows in
//! the samples, while a killed process would start from a fresh heap and hide it. A process
//! that dies anyway is restarted and fails the soak.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::demo::with_database;
use crate::fault_proxy::{Condition, FaultProxy};
use crate::verify::{
    connect_retrying, postgres_address, restart_postgres, through_proxy, Broker, Supervised,
};

/// Settings of `exactly soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakOptions {
    /// The PostgreSQL server (fresh databases per soak).
    #[arg(
        long,
        env = "EXACTLY_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database: String,
    /// How long the load runs.
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Events committed per second into each pipeline.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// A fault this often (broker restart, PostgreSQL restart, connection resets, a blackhole,
    /// in turn).
    #[arg(long, default_value_t = 180)]
    pub fault_every_secs: u64,
    /// The faults, taken in turn.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "broker-restart,postgres-restart,resets,blackhole"
    )]
    pub faults: Vec<SoakFault>,
    /// A sample this often.
    #[arg(long, default_value_t = 10)]
    pub sample_every_secs: u64,
    /// Growth is measured from the end of the warm-up.
    #[arg(long, default_value_t = 5.0)]
    pub warmup_minutes: f64,
    /// The key-set consumer's retention (its horizon is the same): bounds its dedupe table.
    #[arg(long, default_value_t = 300_000)]
    pub key_retention_ms: i64,
    /// Retained WAL above this after the warm-up fails the soak.
    #[arg(long, default_value = "256MiB")]
    pub max_retained_wal: bytesize::ByteSize,
    /// Allowed growth of RSS and descriptors from the warm-up to the end.
    #[arg(long, default_value_t = 0.10)]
    pub max_growth: f64,
    /// Where soak.csv, soak.png and soak.json go.
    #[arg(long, default_value = "target/soak")]
    pub out: PathBuf,
}

/// A fault that makes the processes reconnect without killing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SoakFault {
    /// The broker stopped and started on its storage.
    BrokerRestart,
    /// PostgreSQL crash-restarted.
    PostgresRestart,
    /// Every connection through the proxies reset.
    Resets,
    /// Nothing passes the proxies for 15 s.
    Blackhole,
}

impl SoakFault {
    fn name(self) -> &'static str {
        match self {
            SoakFault::BrokerRestart => "broker restart",
            SoakFault::PostgresRestart => "postgres restart",
            SoakFault::Resets => "connection resets",
            SoakFault::Blackhole => "blackhole 15 s",
        }
    }
}

/// What one process looked like at one sample.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct ProcessSample {
    rss_kib: u64,
    fds: u64,
    sockets: u64,
    /// A client replaced while its predecessor's close hangs shows here before it shows in RSS.
    threads: u64,
}

/// One sample of the whole soak.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    seconds: f64,
    processes: Vec<ProcessSample>,
    committed: u64,
    applied: [u64; 2],
    key_set_rows: u64,
    watermark_rows: u64,
    retained_wal: u64,
}

/// A process's growth from the warm-up to the end.
#[derive(Debug, serde::Serialize)]
struct Growth {
    process: String,
    rss_kib_at_warmup: u64,
    rss_kib_at_end: u64,
    fds_at_warmup: u64,
    fds_at_end: u64,
    sockets_at_end: u64,
    threads_at_warmup: u64,
    threads_at_end: u64,
    rss_growth: f64,
    fds_growth: f64,
}

#[derive(Debug, serde::Serialize)]
struct Verdict {
    minutes: f64,
    rate_per_pipeline: u64,
    committed: u64,
    applied: [u64; 2],
    duplicates: [u64; 2],
    parked: [u64; 2],
    faults: Vec<(f64, String)>,
    restarts: u64,
    growth: Vec<Growth>,
    key_set_rows_max: u64,
    /// The sample where the key set came closest to its bound: seconds, rows, bound.
    key_set_worst: KeySetCheck,
    retained_wal_max_after_warmup: u64,
    failures: Vec<String>,
}

/// The key set against its retention at one sample.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct KeySetCheck {
    seconds: f64,
    rows: u64,
    bound: u64,
}

/// What the key set may hold at each sample: every key the consumer applied within the
/// retention, one prune interval and one sampling period before it, plus 10%. The bound counts
/// keys by when they were applied, as pruning does: a consumer catching up after an outage
/// applies minutes of events at once, and those keys rightly stay a full retention from then.
fn key_set_bounds(options: &SoakOptions, samples: &[Sample]) -> Vec<KeySetCheck> {
    let window_s =
        (options.key_retention_ms + PRUNE_INTERVAL_MS) as f64 / 1000.0 + options.sample_every_secs as f64;
    let applied = |s: &Sample| s.applied[1];
    samples
        .iter()
        .map(|s| {
            let before = samples
                .iter()
                .rev()
                .find(|earlier| earlier.seconds <= s.seconds - window_s)
                .map_or(0, applied);
            KeySetCheck {
                seconds: s.seconds,
                rows: s.key_set_rows,
                bound: (applied(s).saturating_sub(before) as f64 * 1.1).ceil() as u64,
            }
        })
        .collect()
}

const PIPELINES: [&str; 2] = ["wal", "poll"];
const PROCESSES: [&str; 4] = ["relay-wal", "relay-poll", "consumer-wal", "consumer-poll"];
/// The consumer's prune round interval: keys live at most retention + this before they go.
const PRUNE_INTERVAL_MS: i64 = 60_000;

/// A process's memory, descriptors and sockets, from /proc.
fn process_sample(pid: u32) -> Option<ProcessSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let (mut fds, mut sockets) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            sockets += 1;
        }
    }
    Some(ProcessSample {
        rss_kib,
        fds,
        sockets,
        threads,
    })
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> u64 {
    match client.query_one(sql, &[]).await {
        Ok(row) => row.try_get::<_, i64>(0).map_or(0, |n| n.max(0) as u64),
        Err(_) => 0,
    }
}

/// Commits `rate` events a second into `url`'s outbox until `stop`, catching up after an
/// outage (the due count comes from the clock, not from the ticks that went through).
async fn writer(
    url: String,
    topic: String,
    rate: u64,
    committed: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut done = 0u64;
    let mut client = connect_retrying(&url).await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let n = due.saturating_sub(done).min(rate.max(1) * 5);
        if n == 0 {
            continue;
        }
        let inserted = client
            .execute(
                "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
                 SELECT exactly_uuidv7(), 'Soak', 'thing', 'A-' || (g % 100), $1,
                        convert_to('{\"n\":' || g || '}', 'UTF8'), now()
                 FROM generate_series(1, $2::bigint) g",
                &[&topic, &(n as i64)],
            )
            .await;
        match inserted {
            Ok(_) => {
                done += n;
                committed.fetch_add(n, Ordering::Relaxed);
            }
            // A commit whose outcome is unknown cannot happen here: one statement, autocommit,
            // and an error before the answer means the server restarted: a restart rolls an
            // uncommitted statement back, and a committed one is counted by the final tally.
            Err(_) => client = connect_retrying(&url).await,
        }
    }
}

pub async fn soak(options: SoakOptions) -> Result<bool> {
    std::fs::create_dir_all(&options.out).with_context(|| format!("creating {}", options.out.display()))?;
    let run_id = exactly_kafka::now().0;
    let logs = tempfile::tempdir()?;

    // The broker behind a proxy it advertises, PostgreSQL behind another for the processes.
    let broker_port = crate::broker::free_port()?;
    let broker_proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], broker_port))).await?;
    let mut broker = Broker::start(true, broker_port, broker_proxy.address().port())?;
    let brokers = broker.address();
    let pg_proxy = FaultProxy::start(postgres_address(&options.database)?).await?;

    let admin = exactly_postgres::connect(&options.database).await?;
    let mut urls = Vec::new();
    for pipeline in PIPELINES {
        let name = format!("exactly_soak_{run_id}_{pipeline}");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        let url = with_database(&options.database, &name);
        let mut client = exactly_postgres::connect(&url).await?;
        exactly_postgres::migrations::migrate(&mut client).await?;
        urls.push(url);
    }
    let slot = format!("exactly_soak_{run_id}");
    {
        let mut config = exactly_postgres::WalConfig::new(&urls[0]);
        config.slot = slot.clone();
        exactly_postgres::wal::ensure_slot(&config).await?;
    }
    let topics: Vec<String> = PIPELINES.iter().map(|p| format!("soak-{run_id}-{p}")).collect();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    exactly_kafka::ensure_topics(&brokers, &topic_refs, 3).await?;

    let env = |url: &str| -> Result<Vec<(String, String)>> {
        Ok(vec![(
            "EXACTLY_DATABASE".to_owned(),
            through_proxy(url, &pg_proxy)?,
        )])
    };
    let retention = options.key_retention_ms.to_string();
    let consumer_args = |pipeline: &str, topic: &str| -> Vec<String> {
        [
            "consume",
            "--brokers",
            &brokers,
            "--group",
            &format!("soak-{pipeline}"),
            "--topic",
            topic,
            "--key-retention-ms",
            &retention,
            "--key-horizon-ms",
            &retention,
            "--no-metrics",
        ]
        .map(String::from)
        .to_vec()
    };
    let processes: Vec<Arc<Supervised>> = vec![
        Supervised::with_env(
            "relay-wal",
            [
                "relay",
                "--brokers",
                &brokers,
                "--mode",
                "wal",
                "--slot",
                &slot,
                "--no-metrics",
            ]
            .map(String::from)
            .to_vec(),
            env(&urls[0])?,
            logs.path(),
        ),
        Supervised::with_env(
            "relay-poll",
            [
                "relay",
                "--brokers",
                &brokers,
                "--mode",
                "poll",
                "--keys",
                "event-id",
                "--no-metrics",
            ]
            .map(String::from)
            .to_vec(),
            env(&urls[1])?,
            logs.path(),
        ),
        Supervised::with_env(
            "consumer-wal",
            consumer_args("wal", &topics[0]),
            env(&urls[0])?,
            logs.path(),
        ),
        Supervised::with_env(
            "consumer-poll",
            consumer_args("poll", &topics[1]),
            env(&urls[1])?,
            logs.path(),
        ),
    ];
    for p in &processes {
        p.ensure_running()?;
    }

    let committed = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = urls
        .iter()
        .zip(&topics)
        .map(|(url, topic)| {
            tokio::spawn(writer(
                url.clone(),
                topic.clone(),
                options.rate,
                committed.clone(),
                stopped.clone(),
            ))
        })
        .collect();

    let started = Instant::now();
    let length = Duration::from_secs_f64(options.minutes * 60.0);
    let mut samples: Vec<Sample> = Vec::new();
    let mut faults: Vec<(f64, String)> = Vec::new();
    let mut next_sample = Instant::now();
    let mut next_fault = started + Duration::from_secs(options.fault_every_secs);
    let mut heal_at: Option<Instant> = None;
    let mut stats = [connect_retrying(&urls[0]).await, connect_retrying(&urls[1]).await];
    let progress = indicatif::ProgressBar::new(length.as_secs());
    progress.set_style(
        indicatif::ProgressStyle::with_template("  soak [{bar:40}] {pos}/{len} s · {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.set_position(started.elapsed().as_secs());
        for p in &processes {
            p.ensure_running()?;
        }
        if heal_at.is_some_and(|at| Instant::now() >= at) {
            broker_proxy.set(Condition::Healthy);
            pg_proxy.set(Condition::Healthy);
            heal_at = None;
        }
        if Instant::now() >= next_fault && heal_at.is_none() && !options.faults.is_empty() {
            let kind = options.faults[faults.len() % options.faults.len()];
            progress.set_message(kind.name());
            match kind {
                SoakFault::BrokerRestart => broker.restart()?,
                SoakFault::PostgresRestart => restart_postgres()?,
                SoakFault::Resets => {
                    broker_proxy.reset_connections();
                    pg_proxy.reset_connections();
                }
                SoakFault::Blackhole => {
                    broker_proxy.set(Condition::Blackhole);
                    pg_proxy.set(Condition::Blackhole);
                    heal_at = Some(Instant::now() + Duration::from_secs(15));
                }
            }
            faults.push((started.elapsed().as_secs_f64(), kind.name().to_owned()));
            next_fault += Duration::from_secs(options.fault_every_secs);
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(options.sample_every_secs);
            samples.push(sample(&processes, &mut stats, &urls, &slot, &committed, started).await);
        }
    }
    progress.finish_and_clear();
    stop.send_replace(true);
    for w in writers {
        let _ = w.await;
    }
    broker_proxy.set(Condition::Healthy);
    pg_proxy.set(Condition::Healthy);

    // The tail: every committed event applied, once.
    let mut stats = [connect_retrying(&urls[0]).await, connect_retrying(&urls[1]).await];
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut applied, mut in_outbox) = ([0u64; 2], [0u64; 2]);
    while Instant::now() < deadline {
        for i in 0..2 {
            in_outbox[i] = count(&stats[i], "SELECT COUNT(*) FROM outbox WHERE event_type = 'Soak'").await;
            applied[i] = count(&stats[i], "SELECT COUNT(DISTINCT event_id) FROM exactly_consumed").await;
        }
        if applied == in_outbox {
            break;
        }
        for p in &processes {
            p.ensure_running()?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut duplicates = [0u64; 2];
    let mut parked = [0u64; 2];
    for i in 0..2 {
        duplicates[i] = count(
            &stats[i],
            "SELECT COUNT(*) - COUNT(DISTINCT event_id) FROM exactly_consumed",
        )
        .await;
        parked[i] = count(&stats[i], "SELECT COUNT(*) FROM exactly_parked").await;
    }
    samples.push(sample(&processes, &mut stats, &urls, &slot, &committed, started).await);
    let restarts: u64 = processes.iter().map(|p| p.restarts()).sum();
    for p in &processes {
        p.kill();
    }
    let _ = exactly_postgres::wal::drop_slot(&urls[0], &slot).await;
    drop(stats);

    let verdict = judge(
        &options, &samples, faults, restarts, in_outbox, applied, duplicates, parked,
    );
    write_csv(&options.out.join("soak.csv"), &samples)?;
    plot(&options.out.join("soak.png"), &samples, &options)?;
    std::fs::write(
        options.out.join("soak.json"),
        serde_json::to_string_pretty(&verdict)?,
    )?;
    print(&verdict, &options.out);
    let ok = verdict.failures.is_empty();
    if ok {
        for url in &urls {
            let name = url
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .split('?')
                .next()
                .unwrap_or_default();
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    } else {
        let kept = logs.keep();
        println!("  process logs kept in {}", kept.display());
    }
    Ok(ok)
}

async fn sample(
    processes: &[Arc<Supervised>],
    stats: &mut [tokio_postgres::Client; 2],
    urls: &[String],
    slot: &str,
    committed: &AtomicU64,
    started: Instant,
) -> Sample {
    for (client, url) in stats.iter_mut().zip(urls) {
        if client.is_closed() {
            *client = connect_retrying(url).await;
        }
    }
    let processes = processes
        .iter()
        .map(|p| p.pid().and_then(process_sample).unwrap_or_default())
        .collect();
    let retained = match stats[0]
        .query_one(
            "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    {
        Ok(row) => row.try_get::<_, i64>(0).map_or(0, |n| n.max(0) as u64),
        Err(_) => 0,
    };
    Sample {
        seconds: started.elapsed().as_secs_f64(),
        processes,
        committed: committed.load(Ordering::Relaxed),
        applied: [
            count(&stats[0], "SELECT COUNT(*) FROM exactly_consumed").await,
            count(&stats[1], "SELECT COUNT(*) FROM exactly_consumed").await,
        ],
        key_set_rows: count(&stats[1], "SELECT COUNT(*) FROM exactly_processed").await,
        watermark_rows: count(&stats[0], "SELECT COUNT(*) FROM exactly_watermarks").await,
        retained_wal: retained,
    }
}

/// The mean of a process's figure over the samples within a minute after `from_s`.
fn window_mean(samples: &[Sample], from_s: f64, process: usize, figure: fn(&ProcessSample) -> u64) -> u64 {
    let window: Vec<u64> = samples
        .iter()
        .filter(|s| s.seconds >= from_s && s.seconds < from_s + 60.0)
        .filter_map(|s| s.processes.get(process).map(figure))
        .collect();
    if window.is_empty() {
        0
    } else {
        window.iter().sum::<u64>() / window.len() as u64
    }
}

#[allow(clippy::too_many_arguments)]
fn judge(
    options: &SoakOptions,
    samples: &[Sample],
    faults: Vec<(f64, String)>,
    restarts: u64,
    in_outbox: [u64; 2],
    applied: [u64; 2],
    duplicates: [u64; 2],
    parked: [u64; 2],
) -> Verdict {
    let mut failures = Vec::new();
    let warmup_s = options.warmup_minutes * 60.0;
    let end_s = (options.minutes * 60.0 - 60.0).max(warmup_s);
    let mut growth = Vec::new();
    for (i, name) in PROCESSES.iter().enumerate() {
        let rss = (
            window_mean(samples, warmup_s, i, |p| p.rss_kib),
            window_mean(samples, end_s, i, |p| p.rss_kib),
        );
        let fds = (
            window_mean(samples, warmup_s, i, |p| p.fds),
            window_mean(samples, end_s, i, |p| p.fds),
        );
        let ratio = |(a, b): (u64, u64)| if a == 0 { 0.0 } else { b as f64 / a as f64 - 1.0 };
        let g = Growth {
            process: (*name).to_owned(),
            rss_kib_at_warmup: rss.0,
            rss_kib_at_end: rss.1,
            fds_at_warmup: fds.0,
            fds_at_end: fds.1,
            sockets_at_end: window_mean(samples, end_s, i, |p| p.sockets),
            threads_at_warmup: window_mean(samples, warmup_s, i, |p| p.threads),
            threads_at_end: window_mean(samples, end_s, i, |p| p.threads),
            rss_growth: ratio(rss),
            fds_growth: ratio(fds),
        };
        if g.rss_growth >= options.max_growth {
            failures.push(format!("{name}: RSS grew {:.1}%", g.rss_growth * 100.0));
        }
        if g.fds_growth >= options.max_growth {
            failures.push(format!("{name}: descriptors grew {:.1}%", g.fds_growth * 100.0));
        }
        growth.push(g);
    }
    let key_set_rows_max = samples.iter().map(|s| s.key_set_rows).max().unwrap_or(0);
    let key_set_worst = key_set_bounds(options, samples)
        .into_iter()
        .max_by(|a, b| {
            let share = |c: &KeySetCheck| c.rows as f64 / c.bound.max(1) as f64;
            share(a).total_cmp(&share(b))
        })
        .unwrap_or_default();
    if key_set_worst.rows > key_set_worst.bound {
        failures.push(format!(
            "key set held {} rows at {:.0} s, above the {} keys applied within its retention",
            key_set_worst.rows, key_set_worst.seconds, key_set_worst.bound
        ));
    }
    let retained_wal_max_after_warmup = samples
        .iter()
        .filter(|s| s.seconds >= warmup_s)
        .map(|s| s.retained_wal)
        .max()
        .unwrap_or(0);
    if retained_wal_max_after_warmup > options.max_retained_wal.as_u64() {
        failures.push(format!(
            "retained WAL reached {}, above {}",
            bytesize::ByteSize(retained_wal_max_after_warmup),
            options.max_retained_wal
        ));
    }
    for i in 0..2 {
        if applied[i] != in_outbox[i] {
            failures.push(format!(
                "{}: {} events committed, {} applied",
                PIPELINES[i], in_outbox[i], applied[i]
            ));
        }
        if duplicates[i] > 0 {
            failures.push(format!("{}: {} applied twice", PIPELINES[i], duplicates[i]));
        }
        if parked[i] > 0 {
            failures.push(format!("{}: {} parked", PIPELINES[i], parked[i]));
        }
    }
    if restarts > 0 {
        failures.push(format!("{restarts} process restarts (a process died)"));
    }
    Verdict {
        minutes: options.minutes,
        rate_per_pipeline: options.rate,
        committed: in_outbox.iter().sum(),
        applied,
        duplicates,
        parked,
        faults,
        restarts,
        growth,
        key_set_rows_max,
        key_set_worst,
        retained_wal_max_after_warmup,
        failures,
    }
}

fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from(
        "seconds,committed,applied_wal,applied_poll,key_set_rows,watermark_rows,retained_wal_bytes",
    );
    for name in PROCESSES {
        out.push_str(&format!(
            ",{name}_rss_kib,{name}_fds,{name}_sockets,{name}_threads"
        ));
    }
    out.push('\n');
    for s in samples {
        out.push_str(&format!(
            "{:.1},{},{},{},{},{},{}",
            s.seconds,
            s.committed,
            s.applied[0],
            s.applied[1],
            s.key_set_rows,
            s.watermark_rows,
            s.retained_wal
        ));
        for p in &s.processes {
            out.push_str(&format!(",{},{},{},{}", p.rss_kib, p.fds, p.sockets, p.threads));
        }
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Four panels over time: RSS per process, descriptors per process, the key set against its
/// bound, retained WAL.
fn plot(path: &Path, samples: &[Sample], options: &SoakOptions) -> Result<()> {
    use plotters::prelude::*;
    crate::e2e_bench::register_plot_font()?;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let minutes = |s: &Sample| s.seconds / 60.0;
    let x_max = samples.iter().map(minutes).fold(1.0f64, f64::max);
    let colours = [RED, BLUE, GREEN, MAGENTA];

    let per_process = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                       title: &str,
                       unit: &str,
                       figure: fn(&ProcessSample) -> f64|
     -> Result<()> {
        let y_max = samples
            .iter()
            .flat_map(|s| s.processes.iter().map(figure))
            .fold(1.0f64, f64::max)
            * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .label_style(("sans-serif", 12))
            .draw()?;
        for (i, name) in PROCESSES.iter().enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(
                    samples
                        .iter()
                        .filter_map(|s| s.processes.get(i).map(|p| (minutes(s), figure(p)))),
                    colour.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        Ok(())
    };
    per_process(&panels[0], "resident memory per process", "MiB", |p| {
        p.rss_kib as f64 / 1024.0
    })?;
    per_process(&panels[1], "open descriptors per process", "descriptors", |p| {
        p.fds as f64
    })?;

    let single = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                  title: &str,
                  unit: &str,
                  values: Vec<(f64, f64)>,
                  limit: Vec<(f64, f64)>|
     -> Result<()> {
        let y_max = values.iter().chain(&limit).map(|v| v.1).fold(0.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .label_style(("sans-serif", 12))
            .draw()?;
        chart.draw_series(LineSeries::new(values, BLUE.stroke_width(2)))?;
        chart.draw_series(LineSeries::new(limit, RED.stroke_width(1)))?;
        Ok(())
    };
    single(
        &panels[2],
        "key-set rows (red: keys applied within the retention, +10%)",
        "rows",
        samples
            .iter()
            .map(|s| (minutes(s), s.key_set_rows as f64))
            .collect(),
        key_set_bounds(options, samples)
            .iter()
            .map(|c| (c.seconds / 60.0, c.bound as f64))
            .collect(),
    )?;
    single(
        &panels[3],
        "retained WAL (red: limit)",
        "MiB",
        samples
            .iter()
            .map(|s| (minutes(s), s.retained_wal as f64 / 1048576.0))
            .collect(),
        {
            let limit = options.max_retained_wal.as_u64() as f64 / 1048576.0;
            vec![(0.0, limit), (x_max, limit)]
        },
    )?;
    root.present()?;
    Ok(())
}

fn print(verdict: &Verdict, out: &Path) {
    println!();
    println!(
        "  soak {:.1} min · {} events/s per pipeline · {} committed · applied wal {} poll {} · duplicates {:?} · parked {:?}",
        verdict.minutes,
        verdict.rate_per_pipeline,
        verdict.committed,
        verdict.applied[0],
        verdict.applied[1],
        verdict.duplicates,
        verdict.parked
    );
    println!(
        "  faults: {}",
        verdict
            .faults
            .iter()
            .map(|(at, what)| format!("{what} at {:.0} s", at))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  {:<14} {:>12} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "process", "RSS warm-up", "RSS end", "growth", "fds w-u", "fds end", "sockets", "thr w-u", "thr end"
    );
    for g in &verdict.growth {
        println!(
            "  {:<14} {:>9} KiB {:>8} KiB {:>7.1}% {:>8} {:>8} {:>8} {:>8} {:>8}",
            g.process,
            g.rss_kib_at_warmup,
            g.rss_kib_at_end,
            g.rss_growth * 100.0,
            g.fds_at_warmup,
            g.fds_at_end,
            g.sockets_at_end,
            g.threads_at_warmup,
            g.threads_at_end
        );
    }
    println!(
        "  key set: at most {} rows; closest to its bound at {:.0} s ({} of {}); retained WAL after warm-up: at most {}",
        verdict.key_set_rows_max,
        verdict.key_set_worst.seconds,
        verdict.key_set_worst.rows,
        verdict.key_set_worst.bound,
        bytesize::ByteSize(verdict.retained_wal_max_after_warmup)
    );
    if verdict.failures.is_empty() {
        println!("  verdict: flat");
    } else {
        println!("  verdict: FAILED: {}", verdict.failures.join("; "));
    }
    println!(
        "  {} · {} · {}",
        out.join("soak.csv").display(),
        out.join("soak.png").display(),
        out.join("soak.json").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        options: SoakOptions,
    }

    /// Samples every 10 s: `applied` keys so far and `rows` in the key set.
    fn samples(points: &[(u64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .enumerate()
            .map(|(i, &(applied, rows))| Sample {
                seconds: i as f64 * 10.0,
                processes: Vec::new(),
                committed: applied,
                applied: [0, applied],
                key_set_rows: rows,
                watermark_rows: 0,
                retained_wal: 0,
            })
            .collect()
    }

    #[test]
    fn the_key_set_bound_follows_what_was_applied_not_the_rate() {
        let options = Command::parse_from(["soak", "--key-retention-ms", "30000"]).options;
        // Window: 30 s retention + 60 s prune interval + 10 s sampling = 100 s, ten samples.
        // 100 keys a sample, then nothing for 5 samples, then a catch-up of 500 at once.
        let mut points: Vec<(u64, u64)> = (0..=20).map(|i| (i * 100, 0)).collect();
        points.extend((0..5).map(|_| (2000, 0)));
        points.push((2500, 0));
        let checks = key_set_bounds(&options, &samples(&points));
        // Before a whole window has passed, everything applied may still be there.
        assert_eq!(checks[5].bound, 550);
        // At sample 20 the window holds samples 11..=20: 1000 keys, +10%.
        assert_eq!(checks[20].bound, 1100);
        // Right after the catch-up, the 500 applied at once count in full.
        assert_eq!(checks[26].bound, ((2500 - 1600) as f64 * 1.1).ceil() as u64);
        // A key set that never prunes outgrows the bound once the first window has passed.
        let never_pruned: Vec<(u64, u64)> = (0..=20).map(|i| (i * 100, i * 100)).collect();
        let checks = key_set_bounds(&options, &samples(&never_pruned));
        assert!(checks[20].rows > checks[20].bound);
        assert!(checks[5].rows <= checks[5].bound);
    }
}
