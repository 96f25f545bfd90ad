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

mod report;
mod verdict;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::demo::with_database;
use crate::fault_proxy::{Condition, FaultProxy};
use crate::verify::{
    connect_retrying, postgres_address, restart_postgres, through_proxy, Broker, Supervised,
};

use report::{plot, write_csv};
use verdict::{judge, key_set_bounds, print};

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
