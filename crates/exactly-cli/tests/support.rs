use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use exactly_core::{Delivery, Envelope, HandlerError, UnixMillis};
use exactly_kafka::{ConsumerConfig, ConsumerCounters, IdempotentConsumer};
use exactly_sqlite::SqliteEffects;
use rusqlite::Transaction;
use tokio::sync::watch;

pub const EXACTLY: &str = env!("CARGO_BIN_EXE_exactly");

/// Held by the tests that kill processes of a multi-member group on the broker, so they run one
/// at a time: two of them at once on 2 cores starve each other's members of CPU past their
/// session timeouts, and the rebalances that follow are the load's, not the test's.
static BROKER_KILL_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`BROKER_KILL_TESTS`] (a test that failed while holding it does not hold up the rest).
pub fn one_kill_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    BROKER_KILL_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn event(aggregate: &str, n: usize, payload: &[u8]) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Tested".into(),
        aggregate_type: "thing".into(),
        aggregate_id: aggregate.to_owned(),
        occurred_at: exactly_kafka::now(),
        payload: if payload.is_empty() {
            format!("{{\"n\":{n}}}").into_bytes()
        } else {
            payload.to_vec()
        },
        headers: vec![],
    }
}

/// Commits `n` events, one transaction each, aggregates round-robin over 7 ids.
pub fn insert_sqlite(path: &Path, topic: &str, n: usize) -> Vec<Envelope> {
    let mut conn = exactly_sqlite::open(path).expect("open service db");
    (0..n)
        .map(|i| {
            let tx = conn.transaction().expect("begin");
            let e = event(&format!("A-{}", i % 7), i, b"");
            exactly_sqlite::enqueue(&tx, topic, &e).expect("enqueue");
            tx.commit().expect("commit");
            e
        })
        .collect()
}

/// Runs `exactly relay` to completion (`--exit-when-idle`) with extra flags.
pub fn relay(database: &str, brokers: &str, extra: &[&str]) -> Output {
    Command::new(EXACTLY)
        .args([
            "relay",
            "--mode",
            "poll",
            "--database",
            database,
            "--brokers",
            brokers,
            "--no-metrics",
            "--exit-when-idle",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run exactly relay")
}

pub fn outbox_status_counts(path: &Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(path).expect("open");
    let mut stmt = conn
        .prepare("SELECT status, COUNT(*) FROM outbox GROUP BY status ORDER BY status")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// Each outbox row's status and last error (empty when none), in id order.
pub fn outbox_statuses_and_errors(conn: &rusqlite::Connection) -> Vec<(String, String)> {
    let mut stmt = conn
        .prepare("SELECT status, COALESCE(last_error, '') FROM outbox ORDER BY id")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The test consumers' effect: one row per applied event, payload must be JSON.
pub const APPLIED_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS applied (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, aggregate_id TEXT NOT NULL)";

pub fn apply_json(tx: &Transaction<'_>, d: &Delivery) -> Result<(), HandlerError> {
    serde_json::from_slice::<serde_json::Value>(&d.envelope.payload)
        .map_err(|e| HandlerError::Rejected(format!("payload is not JSON: {e}")))?;
    tx.execute(
        "INSERT INTO applied (event_id, aggregate_id) VALUES (?1, ?2)",
        [
            d.envelope.event_id.hyphenated().to_string(),
            d.envelope.aggregate_id.clone(),
        ],
    )
    .map_err(|e| HandlerError::Retryable(e.to_string()))?;
    Ok(())
}

/// Runs an in-process consumer over `topic` until `applied + parked >= expected` (or 60 s),
/// then stops it and returns its counters.
pub async fn consume_until(
    db: &Path,
    brokers: &str,
    group: &str,
    topic: &str,
    expected: u64,
) -> Arc<ConsumerCounters> {
    exactly_sqlite::open(db)
        .expect("open consumer db")
        .execute_batch(APPLIED_SCHEMA)
        .expect("schema");
    let store = SqliteEffects::open(db, group, apply_json).expect("effects");
    let counters = Arc::new(ConsumerCounters::default());
    let consumer = IdempotentConsumer::new(store, ConsumerConfig::new(brokers, group, &[topic]))
        .expect("consumer")
        .with_counters(counters.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = tokio::spawn(async move { consumer.run(stop_rx).await });
    let watched = counters.clone();
    let done = exactly_testkit::eventually(Duration::from_secs(60), || {
        let c = watched.clone();
        async move {
            c.applied.load(std::sync::atomic::Ordering::Relaxed)
                + c.parked.load(std::sync::atomic::Ordering::Relaxed)
                >= expected
        }
    })
    .await;
    // Let any late redeliveries arrive before stopping, so duplicates are counted, not missed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    run.await.expect("join").expect("consumer ran");
    assert!(
        done,
        "consumer did not reach {expected} applied+parked within 60 s: {counters:?}"
    );
    counters
}

pub fn applied_event_ids(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).expect("open");
    let mut stmt = conn
        .prepare("SELECT event_id FROM applied ORDER BY seq")
        .expect("prepare");
    stmt.query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

pub fn ids(events: &[Envelope]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.event_id.hyphenated().to_string())
        .collect()
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[allow(dead_code)]
pub fn at(ms: i64) -> UnixMillis {
    UnixMillis(ms)
}

/// One database, as the CLI names it and as the test reads it.
pub enum Db {
    Sqlite(PathBuf),
    Pg(String),
}

impl Db {
    pub fn arg(&self) -> String {
        match self {
            Db::Sqlite(path) => path.display().to_string(),
            Db::Pg(url) => url.clone(),
        }
    }

    /// Runs one statement (the same SQL on both stores).
    pub async fn execute(&self, sql: &str) {
        match self {
            Db::Sqlite(path) => {
                rusqlite::Connection::open(path)
                    .expect("open")
                    .execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Db::Pg(url) => {
                exactly_postgres::connect(url)
                    .await
                    .expect("connect")
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.try_count(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A count, or the error (a table the consumer has not created yet).
    pub async fn try_count(&self, sql: &str) -> Result<i64, String> {
        match self {
            Db::Sqlite(path) => rusqlite::Connection::open(path)
                .map_err(|e| e.to_string())?
                .query_row(sql, [], |r| r.get(0))
                .map_err(|e| e.to_string()),
            Db::Pg(url) => Ok(exactly_postgres::connect(url)
                .await
                .map_err(|e| e.to_string())?
                .query_one(sql, &[])
                .await
                .map_err(|e| format!("{e:?}"))?
                .get(0)),
        }
    }

    /// Commits `event` to the outbox; returns its row id.
    pub async fn enqueue(&self, topic: &str, event: &exactly_core::Envelope) -> i64 {
        match self {
            Db::Sqlite(path) => {
                let conn = exactly_sqlite::open(path).expect("open");
                exactly_sqlite::enqueue(&conn, topic, event).expect("enqueue")
            }
            Db::Pg(url) => {
                let mut client = exactly_postgres::connect(url).await.expect("connect");
                exactly_postgres::migrations::migrate(&mut client)
                    .await
                    .expect("migrate");
                exactly_postgres::enqueue(&client, topic, event)
                    .await
                    .expect("enqueue")
            }
        }
    }
}

pub fn exactly(args: &[&str]) -> Output {
    Command::new(EXACTLY)
        .args(args)
        .env_remove("EXACTLY_DATABASE")
        .stdin(Stdio::null())
        .output()
        .expect("run exactly")
}

/// Runs `exactly` with `args`; it must succeed and print JSON.
pub fn exactly_json(args: &[&str]) -> serde_json::Value {
    let out = exactly(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
