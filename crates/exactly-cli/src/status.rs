//! `exactly status`: what an on-call person needs, for one database or a whole configuration
//! file. It only reads: no file, table, slot or migration is created.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use exactly_core::operate::{ConsumerState, Selection, SlotState};
use exactly_core::OutboxStats;
use serde_json::json;

use exactly_daemon::config_file::{self, RunArgs};
use exactly_daemon::settings::defaults;
use exactly_daemon::Database;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// One database (postgres://… or a SQLite file).
    #[arg(
        long,
        env = "EXACTLY_DATABASE",
        conflicts_with = "config",
        required_unless_present = "config"
    )]
    database: Option<String>,
    /// Every source, consumer and stream job of a configuration file, consumer-group lag included.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// JSON for scripts instead of text.
    #[arg(long)]
    json: bool,
}

/// One database's state.
struct DatabaseStatus {
    /// The source or consumer names that use it.
    used_by: Vec<String>,
    /// The database, password hidden.
    shown: String,
    outbox: Option<OutboxStats>,
    dead_events: usize,
    slots: Vec<SlotState>,
    consumers: Vec<ConsumerState>,
    /// Above this retained WAL a slot is flagged.
    max_retained_wal: u64,
}

/// One consumer group's lag.
struct GroupStatus {
    used_by: String,
    group: String,
    lags: Result<Vec<exactly_kafka::PartitionLag>, String>,
}

pub async fn status(args: StatusArgs) -> Result<()> {
    let mut databases: Vec<(Database, Vec<String>, u64)> = Vec::new();
    let mut groups = Vec::new();
    let mut add = |database: Database, name: String, limit: u64| {
        let key = shown(&database);
        match databases.iter_mut().find(|(d, _, _)| shown(d) == key) {
            Some((_, names, max)) => {
                names.push(name);
                *max = (*max).min(limit);
            }
            None => databases.push((database, vec![name], limit)),
        }
    };
    let default_limit = defaults::max_retained_wal().as_u64();
    if let Some(path) = &args.config {
        let run_args = RunArgs {
            config: path.clone(),
            brokers: None,
            kafka_properties: Vec::new(),
            metrics_addr: None,
            no_metrics: true,
        };
        let config = config_file::load(&run_args, std::env::vars())?;
        for (name, source) in &config.source {
            add(
                source.database()?,
                format!("source {name}"),
                source.max_retained_wal.as_u64(),
            );
        }
        for (name, consumer) in &config.consumer {
            add(consumer.database()?, format!("consumer {name}"), default_limit);
            groups.push((
                format!("consumer {name}"),
                consumer.group.clone(),
                consumer.topics.clone(),
            ));
        }
        for (name, stream) in &config.stream {
            groups.push((
                format!("stream {name}"),
                stream.application_id.clone(),
                vec![stream.input.clone()],
            ));
        }
        let mut statuses = Vec::new();
        for (database, used_by, limit) in databases {
            statuses.push(database_status(&database, used_by, limit).await?);
        }
        // Exactly-once sources: where their progress topics say each source stands.
        let mut progress = Vec::new();
        let mut topics: Vec<String> = config
            .source
            .values()
            .filter(|s| s.exactly_once)
            .map(|s| s.progress_topic.clone())
            .collect();
        topics.sort();
        topics.dedup();
        for topic in topics {
            let (kafka, t) = (config.kafka.clone(), topic.clone());
            let positions =
                tokio::task::spawn_blocking(move || exactly_kafka::progress_positions(&kafka, &t))
                    .await?
                    .map_err(|e| e.to_string());
            progress.push((topic, positions));
        }
        let mut group_statuses = Vec::new();
        for (used_by, group, topics) in groups {
            let (kafka, g) = (config.kafka.clone(), group.clone());
            let lags = tokio::task::spawn_blocking(move || {
                exactly_kafka::group_lag(&kafka, &g, &topics, Duration::from_secs(10))
            })
            .await?
            .map_err(|e| e.to_string());
            group_statuses.push(GroupStatus { used_by, group, lags });
        }
        print(&statuses, &group_statuses, &progress, args.json);
    } else if let Some(text) = &args.database {
        let status = database_status(&Database::parse(text), Vec::new(), default_limit).await?;
        print(&[status], &[], &[], args.json);
    }
    Ok(())
}

fn shown(database: &Database) -> String {
    match database {
        Database::Sqlite(path) => path.display().to_string(),
        Database::Postgres(url) => exactly_postgres::redact_url(url),
    }
}

async fn database_status(
    database: &Database,
    used_by: Vec<String>,
    max_retained_wal: u64,
) -> Result<DatabaseStatus> {
    let now = exactly_kafka::now();
    let mut status = DatabaseStatus {
        used_by,
        shown: shown(database),
        outbox: None,
        dead_events: 0,
        slots: Vec::new(),
        consumers: Vec::new(),
        max_retained_wal,
    };
    match database {
        Database::Sqlite(path) => {
            let conn = exactly_sqlite::open_existing(path)?;
            status.outbox = Some(exactly_sqlite::outbox_stats(&conn, now)?);
            status.dead_events = exactly_sqlite::operate::dead_events(&conn, &Selection::default())?.len();
            status.consumers = exactly_sqlite::operate::consumer_states(&conn)?;
        }
        Database::Postgres(url) => {
            let client = exactly_postgres::connect(url).await?;
            let tables: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM pg_catalog.pg_tables
                     WHERE schemaname = current_schema() AND tablename IN ('outbox', 'exactly_parked')",
                    &[],
                )
                .await?
                .get(0);
            if tables < 2 {
                bail!(
                    "{} has no exactly tables (a relay or consumer creates them on its first start)",
                    exactly_postgres::redact_url(url)
                );
            }
            status.outbox = Some(exactly_postgres::outbox_stats(&client, now).await?);
            status.dead_events = exactly_postgres::operate::dead_events(&client, &Selection::default())
                .await?
                .len();
            status.consumers = exactly_postgres::operate::consumer_states(&client).await?;
            status.slots = exactly_postgres::operate::slot_states(&client).await?;
        }
    }
    Ok(status)
}

fn over_limit(slot: &SlotState, limit: u64) -> bool {
    slot.retained_bytes.max(0) as u64 > limit
}

/// A progress topic and each source's last end position in it (or why it could not be read).
type Progress = (String, Result<std::collections::BTreeMap<String, u64>, String>);

/// A WAL position as PostgreSQL writes it.
fn lsn(position: u64) -> String {
    format!("{:X}/{:X}", position >> 32, position & 0xffff_ffff)
}

fn print(databases: &[DatabaseStatus], groups: &[GroupStatus], progress: &[Progress], as_json: bool) {
    if as_json {
        let databases: Vec<serde_json::Value> = databases
            .iter()
            .map(|d| {
                json!({
                    "database": d.shown,
                    "used_by": d.used_by,
                    "outbox": d.outbox.as_ref().map(|o| json!({
                        "new": o.new, "sending": o.sending, "sent": o.sent, "dead": o.dead,
                        "oldest_unsent_age_seconds": o.oldest_new_age_ms as f64 / 1000.0,
                    })),
                    "dead_events": d.dead_events,
                    "slots": d.slots.iter().map(|s| json!({
                        "slot": s.slot, "active": s.active, "confirmed": s.confirmed,
                        "lag_bytes": s.lag_bytes, "lag_seconds": s.lag_seconds,
                        "retained_bytes": s.retained_bytes, "wal_status": s.wal_status,
                        "over_max_retained_wal": over_limit(s, d.max_retained_wal),
                    })).collect::<Vec<_>>(),
                    "consumers": d.consumers.iter().map(|c| json!({
                        "consumer": c.consumer, "keys": c.keys, "watermarks": c.watermarks, "parked": c.parked,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let groups: Vec<serde_json::Value> = groups
            .iter()
            .map(|g| match &g.lags {
                Ok(lags) => json!({
                    "used_by": g.used_by, "group": g.group,
                    "lag": lags.iter().map(|l| l.lag).sum::<i64>(),
                    "partitions": lags.iter().map(|l| json!({
                        "topic": l.topic, "partition": l.partition, "committed": l.committed,
                        "end": l.end, "lag": l.lag,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => json!({ "used_by": g.used_by, "group": g.group, "error": e }),
            })
            .collect();
        let progress: Vec<serde_json::Value> = progress
            .iter()
            .map(|(topic, positions)| match positions {
                Ok(positions) => json!({
                    "topic": topic,
                    "sources": positions.iter().map(|(source, p)| json!({
                        "source": source, "end_position": p, "lsn": lsn(*p),
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => json!({ "topic": topic, "error": e }),
            })
            .collect();
        println!(
            "{}",
            json!({ "databases": databases, "groups": groups, "progress": progress })
        );
        return;
    }
    for d in databases {
        if d.used_by.is_empty() {
            println!("{}", d.shown);
        } else {
            println!("{} ({})", d.shown, d.used_by.join(", "));
        }
        if let Some(o) = &d.outbox {
            println!(
                "  outbox   NEW {}  SENDING {}  SENT {}  DEAD {}",
                o.new, o.sending, o.sent, o.dead
            );
            println!("  oldest NEW row: {:.1} s", o.oldest_new_age_ms as f64 / 1000.0);
        }
        println!("  dead events: {}", d.dead_events);
        for s in &d.slots {
            println!(
                "  slot {}: {}, confirmed {}, lag {}{}, retained {} ({}){}",
                s.slot,
                if s.active { "active" } else { "not active" },
                s.confirmed.as_deref().unwrap_or("-"),
                bytesize::ByteSize::b(s.lag_bytes.max(0) as u64),
                s.lag_seconds.map(|l| format!(" / {l:.1} s")).unwrap_or_default(),
                bytesize::ByteSize::b(s.retained_bytes.max(0) as u64),
                s.wal_status.as_deref().unwrap_or("-"),
                if over_limit(s, d.max_retained_wal) {
                    format!(
                        "  OVER max_retained_wal {}",
                        bytesize::ByteSize::b(d.max_retained_wal)
                    )
                } else {
                    String::new()
                }
            );
        }
        for c in &d.consumers {
            let parked: Vec<String> = c.parked.iter().map(|(r, n)| format!("{r} {n}")).collect();
            println!(
                "  consumer {}: {} keys, {} watermarks, parked {}",
                c.consumer,
                c.keys,
                c.watermarks,
                if parked.is_empty() {
                    "0".to_owned()
                } else {
                    parked.join(", ")
                }
            );
        }
    }
    for (topic, positions) in progress {
        match positions {
            Ok(positions) => {
                for (source, p) in positions {
                    println!("progress {topic}: {source} at {}", lsn(*p));
                }
            }
            Err(e) => println!("progress {topic}: cannot read it: {e}"),
        }
    }
    for g in groups {
        match &g.lags {
            Ok(lags) => {
                println!(
                    "{} group {}: lag {}",
                    g.used_by,
                    g.group,
                    lags.iter().map(|l| l.lag).sum::<i64>()
                );
                for l in lags {
                    println!(
                        "  {} [{}] committed {} end {} lag {}",
                        l.topic,
                        l.partition,
                        l.committed.map_or("-".to_owned(), |c| c.to_string()),
                        l.end,
                        l.lag
                    );
                }
            }
            Err(e) => println!("{} group {}: cannot read its lag: {e}", g.used_by, g.group),
        }
    }
}
