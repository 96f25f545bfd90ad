//! `exactly verify` at CI size: 10,000 events, one fault of each kind (relay kill, consumer
//! kills, a durable-broker restart, a PostgreSQL crash-restart) and the bad-input
//! corpus, for the polling and the WAL relay (and again with network faults), and the exactly-once WAL relay (on the in-memory
//! broker, which cannot restart). A binary of its own: cargo runs test binaries one after
//! another, so restarting PostgreSQL here never breaks another test; the runs inside go one by
//! one for the same reason.

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const EXACTLY: &str = env!("CARGO_BIN_EXE_exactly");

/// Tests here restart PostgreSQL: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Running {
    Running(
        Command::new(EXACTLY)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn exactly"),
    )
}

/// Commits `events` outbox rows for `topic`, `per_txn` a transaction, through one connection
/// that is reopened when PostgreSQL restarts. A commit whose outcome is unknown is retried: the
/// event_id is unique, so a retried row lands once.
async fn write_events(url: &str, topic: &str, ids: &[uuid::Uuid], per_txn: usize) {
    let mut client = exactly_postgres::connect(url).await.expect("connect writer");
    for chunk in ids.chunks(per_txn) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = async {
                let tx = client.transaction().await?;
                for id in chunk {
                    tx.execute(
                        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
                         VALUES ($1::text::uuid, 'Tested', 'thing', $2, $3, convert_to('{}', 'UTF8'))
                         ON CONFLICT (event_id) DO NOTHING",
                        &[&id.hyphenated().to_string(), &format!("A-{}", id.as_u128() % 7), &topic],
                    )
                    .await?;
                }
                tx.commit().await
            }
            .await;
            match attempt {
                Ok(()) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "writer could not commit for 60 s: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if client.is_closed() {
                        if let Ok(c) = exactly_postgres::connect(url).await {
                            client = c;
                        }
                    }
                }
            }
        }
    }
}

/// `SELECT event_id, count(*) FROM exactly_consumed`, or nothing while PostgreSQL is down.
async fn consumed(url: &str) -> Option<Vec<(String, i64)>> {
    let client = exactly_postgres::connect(url).await.ok()?;
    let rows = client
        .query(
            "SELECT event_id, count(*) FROM exactly_consumed GROUP BY event_id",
            &[],
        )
        .await
        .ok()?;
    Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// PostgreSQL crash-restarted (`-m immediate`) under a running polling relay and a running
/// consumer whose effect store is PostgreSQL: both reconnect in the same process (neither
/// exits), nothing is committed to Kafka meanwhile that was not applied, and every event is
/// applied exactly once.
#[test]
fn polling_relay_and_consumer_outlive_a_postgres_crash_restart() {
    let _serial = serial();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let brokers = exactly_testkit::brokers();
    let url = runtime.block_on(exactly_testkit::fresh_pg_database());
    let topic = exactly_testkit::unique("pg-restart");
    runtime.block_on(async {
        exactly_kafka::ensure_topics(&brokers, &[&topic], 3)
            .await
            .expect("topic");
        let mut client = exactly_postgres::connect(&url).await.expect("connect");
        exactly_postgres::migrations::migrate(&mut client)
            .await
            .expect("migrate");
    });
    let mut relay = spawn(&[
        "relay",
        "--mode",
        "poll",
        "--database",
        &url,
        "--brokers",
        &brokers,
        "--no-metrics",
        "--lease-ms",
        "3000",
        "--poll-ms",
        "100",
    ]);
    let mut consumer = spawn(&[
        "consume",
        "--database",
        &url,
        "--brokers",
        &brokers,
        "--group",
        &topic,
        "--topic",
        &topic,
        "--no-metrics",
    ]);
    let ids: Vec<uuid::Uuid> = (0..1_500).map(|_| uuid::Uuid::now_v7()).collect();
    runtime.block_on(async {
        write_events(&url, &topic, &ids[..500], 10).await;
        let applied_some = exactly_testkit::eventually(Duration::from_secs(60), || async {
            consumed(&url).await.is_some_and(|c| c.len() >= 200)
        })
        .await;
        assert!(applied_some, "the consumer applied nothing before the restart");
        exactly_testkit::crash_restart_postgres();
        write_events(&url, &topic, &ids[500..], 10).await;
        let all = exactly_testkit::eventually(Duration::from_secs(120), || async {
            consumed(&url).await.is_some_and(|c| c.len() >= ids.len())
        })
        .await;
        let rows = consumed(&url).await.unwrap_or_default();
        assert!(
            all,
            "{} of {} events applied within 120 s of the restart",
            rows.len(),
            ids.len()
        );
        // Late redeliveries would show as second rows.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let rows = runtime.block_on(consumed(&url)).expect("read consumed");
    let twice: Vec<&(String, i64)> = rows.iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "applied twice: {twice:?}");
    let mut applied: Vec<String> = rows.into_iter().map(|(id, _)| id).collect();
    applied.sort();
    let mut expected: Vec<String> = ids.iter().map(|i| i.hyphenated().to_string()).collect();
    expected.sort();
    assert_eq!(applied, expected, "lost or foreign events");
    assert!(
        relay.0.try_wait().expect("relay status").is_none(),
        "the relay exited instead of reconnecting"
    );
    assert!(
        consumer.0.try_wait().expect("consumer status").is_none(),
        "the consumer exited instead of reconnecting"
    );
}

/// Events per run on the durable broker (it restarts). Tansu's sqlite storage scanned its
/// whole header table per fetched record until `exactly verify` indexed it (see
/// `index_tansu_headers`); 100,000 events now take minutes, and the CI size is 10,000.
const EVENTS_ON_DURABLE_TANSU: u64 = 10_000;

/// The test server's `postgres` database: verify and soak make their own databases.
fn admin_url() -> String {
    let url = exactly_testkit::pg_url();
    format!(
        "{}/postgres",
        url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b)
    )
}

fn verify(relay: &str, events: u64, extra: &[&str]) -> serde_json::Value {
    let report = tempfile::NamedTempFile::new().expect("report file");
    let admin = admin_url();
    let output = Command::new(EXACTLY)
        .args([
            "verify",
            "--database",
            &admin,
            "--relay",
            relay,
            "--fault-rounds",
            "1",
        ])
        .args([
            "--events",
            &events.to_string(),
            "--seed",
            "7",
            "--quiet",
            "--timeout-secs",
            "600",
        ])
        .args(extra)
        .arg("--report")
        .arg(report.path())
        .envs(exactly_testkit::tansu_env())
        .output()
        .expect("run exactly verify");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "exactly verify --relay {relay} failed:\n{stdout}\n{stderr}"
    );
    let text = std::fs::read_to_string(report.path()).expect("read report");
    let mut runs: Vec<serde_json::Value> = serde_json::from_str(&text).expect("report is JSON");
    assert_eq!(runs.len(), 1);
    runs.remove(0)
}

fn assert_exactly_once(run: &serde_json::Value, events: u64, broker_restarts: u64) {
    assert_eq!(run["verdict"], "exactly once", "{run:#}");
    assert_eq!(run["events_committed"], events);
    // Every event, 3 bad rows the consumers park and 3 foreign records, plus any resends.
    assert!(
        run["records_on_topic"].as_u64().unwrap_or(0) >= events + 6,
        "{run:#}"
    );
    assert!(
        run["rolled_back"].as_u64().unwrap_or(0) > 0,
        "some transactions roll back"
    );
    for (name, finding) in run["anomalies"].as_object().expect("anomalies") {
        assert_eq!(finding[0], 0, "{name}: {finding}");
    }
    for (consumer, applied) in run["applied"].as_object().expect("applied") {
        assert_eq!(
            applied.as_u64(),
            Some(events),
            "{consumer} applied each event once"
        );
        assert_eq!(
            run["parked"][consumer], 6,
            "{consumer} parked 3 bad rows and 3 foreign records"
        );
    }
    assert_eq!(run["relay_dead"], 3, "the relay refused 3 rows");
    assert_eq!(run["bad_input_total"], 9);
    assert_eq!(run["bad_input_reconciled"], true);
    let faults = &run["faults"];
    assert_eq!(faults["relay kill"], 1, "{faults}");
    assert_eq!(faults["consumer kills"], 1, "{faults}");
    assert_eq!(faults["postgres restart"], 1, "{faults}");
    assert_eq!(
        faults["broker restart"].as_u64().unwrap_or(0),
        broker_restarts,
        "{faults}"
    );
    assert!(faults["relay restarts"].as_u64().unwrap_or(0) >= 1, "{faults}");
    assert!(faults["consumer restarts"].as_u64().unwrap_or(0) >= 2, "{faults}");
}

#[test]
fn verify_poll_wal_and_exactly_once_relays_under_one_fault_of_each_kind() {
    let _serial = serial();
    assert_exactly_once(&verify("wal-exactly-once", 10_000, &[]), 10_000, 0);
    let events = EVENTS_ON_DURABLE_TANSU;
    assert_exactly_once(&verify("wal", events, &[]), events, 1);
    assert_exactly_once(&verify("poll", events, &[]), events, 1);
}

/// Every fault above, plus the network's through the fault proxies in front of the broker and
/// the relay's PostgreSQL: 250 ms latency, connection resets, a 40 s blackhole, and both
/// one-way partitions, each on the broker's link, PostgreSQL's or both.
#[test]
fn verify_poll_and_wal_relays_under_network_faults() {
    let _serial = serial();
    for relay in ["poll", "wal"] {
        let run = verify(relay, 3_000, &["--network-faults"]);
        assert_exactly_once(&run, 3_000, 1);
        let faults = run["faults"].as_object().expect("faults");
        for kind in [
            "network latency",
            "network reset",
            "network blackhole",
            "one-way partition, answers lost",
            "one-way partition, requests lost",
        ] {
            let injected: u64 = faults
                .iter()
                .filter(|(name, _)| name.starts_with(kind))
                .filter_map(|(_, n)| n.as_u64())
                .sum();
            assert_eq!(injected, 1, "{relay}: {kind} once: {faults:?}");
        }
    }
}

/// Sets a server setting for one test and puts it back when the test ends, however it ends,
/// so the default server is never left weakened for other tests.
struct ServerSetting {
    admin: String,
    name: &'static str,
}

impl ServerSetting {
    fn set(admin: &str, name: &'static str, value: &str) -> ServerSetting {
        psql(admin, &format!("ALTER SYSTEM SET {name} = '{value}'"));
        psql(admin, "SELECT pg_reload_conf()");
        ServerSetting {
            admin: admin.to_owned(),
            name,
        }
    }
}

impl Drop for ServerSetting {
    fn drop(&mut self) {
        psql(&self.admin, &format!("ALTER SYSTEM RESET {}", self.name));
        psql(&self.admin, "SELECT pg_reload_conf()");
    }
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-XAtqc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The WAL relay's slot is invalidated while it runs (it could not publish, so it confirmed
/// nothing, and the server removed the WAL past max_slot_wal_keep_size). The stream fails, the
/// relay reads the slot's state again before restarting it, finds `wal_status = 'lost'`, and
/// stops with an error that names the slot and the recovery, instead of retrying forever or
/// silently making a new slot that would skip events.
#[test]
fn a_lost_slot_stops_the_wal_relay_with_the_recovery() {
    let _serial = serial();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let url = runtime.block_on(exactly_testkit::fresh_pg_database());
    let admin = format!(
        "{}/postgres",
        url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b)
    );
    let slot = exactly_testkit::unique("exactly_test_lost").replace('-', "_");
    let _keep = ServerSetting::set(&admin, "max_slot_wal_keep_size", "1MB");
    // A broker nothing listens on, and no outbox row: nothing is in flight, so the rewind after
    // the stream fails has nothing to drain (a record waiting for a broker holds the rewind up
    // to its 60 s drain). Its log goes to a file: a pipe nobody reads would fill and block it.
    let log = tempfile::NamedTempFile::new().expect("log file");
    let relay = Command::new(EXACTLY)
        .args([
            "relay",
            "--mode",
            "wal",
            "--database",
            &url,
            "--brokers",
            "127.0.0.1:1",
            "--no-metrics",
            "--slot",
            &slot,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log file"))
        .spawn()
        .expect("spawn relay");
    let mut relay = Running(relay);
    let deadline = Instant::now() + Duration::from_secs(30);
    while psql(
        &admin,
        &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    ) != "t"
    {
        assert!(
            Instant::now() < deadline,
            "the relay never streamed from its slot"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Move the server well past the slot's limit: WAL segments, switched and checkpointed away.
    let mut lost = false;
    for _ in 0..20 {
        psql(&url, "CREATE TABLE IF NOT EXISTS filler (b bytea); INSERT INTO filler SELECT decode(repeat('ab', 4096), 'hex') FROM generate_series(1, 500)");
        psql(&admin, "SELECT pg_switch_wal()");
        psql(&admin, "CHECKPOINT");
        if psql(
            &admin,
            &format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        ) == "lost"
        {
            lost = true;
            break;
        }
    }
    assert!(lost, "the slot was not invalidated");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = relay.0.try_wait().expect("relay status") {
            break status;
        }
        assert!(Instant::now() < deadline, "the relay kept running on a lost slot");
        std::thread::sleep(Duration::from_millis(200));
    };
    let stderr = std::fs::read_to_string(log.path()).expect("read the relay's log");
    assert!(!status.success(), "the relay must fail: {stderr}");
    assert!(stderr.contains("is lost (wal_status = 'lost')"), "{stderr}");
    assert!(
        stderr.contains(&slot) && stderr.contains("pg_drop_replication_slot"),
        "{stderr}"
    );
    // Clean-up: the lost slot would otherwise stay.
    psql(&admin, &format!("SELECT pg_drop_replication_slot('{slot}')"));
}

/// `exactly soak` at CI size: 2 minutes, a fault every 25 s (broker restart, PostgreSQL
/// restart, connection resets, then again the first; the blackhole is left to the network-fault
/// verify test, since a consumer group on Tansu can take minutes to be served again after one,
/// see the README's known limits), both pipelines. Too short to judge growth (the 30-minute
/// `scripts/soak` does; growth up to 100% passes here): it checks that every event is applied
/// once on both pipelines, that the key set stays under its bound, and that the CSV, the plot
/// and the JSON verdict are written with a sample every 5 s.
#[test]
fn a_short_soak_applies_everything_once_and_writes_its_samples_and_plot() {
    let _serial = serial();
    let out = tempfile::tempdir().expect("out dir");
    let output = Command::new(EXACTLY)
        .args([
            "soak",
            "--database",
            &admin_url(),
            "--minutes",
            "2",
            "--warmup-minutes",
            "0.5",
            "--fault-every-secs",
            "25",
            "--sample-every-secs",
            "5",
            "--rate",
            "100",
            "--key-retention-ms",
            "600000",
            "--faults",
            "broker-restart,postgres-restart,resets",
            "--max-growth",
            "1.0",
            "--out",
        ])
        .arg(out.path())
        .envs(exactly_testkit::tansu_env())
        .output()
        .expect("run exactly soak");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "exactly soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verdict: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("soak.json")).expect("soak.json"))
            .expect("JSON verdict");
    assert_eq!(verdict["failures"], serde_json::json!([]), "{verdict:#}");
    let committed = verdict["committed"].as_u64().expect("committed");
    assert!(
        committed >= 2 * 100 * 100,
        "about 100 events/s per pipeline for 2 minutes: {committed}"
    );
    let applied: u64 = verdict["applied"]
        .as_array()
        .expect("applied")
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert_eq!(applied, committed);
    assert_eq!(verdict["duplicates"], serde_json::json!([0, 0]));
    assert_eq!(verdict["faults"].as_array().map(Vec::len), Some(4), "{verdict:#}");
    let key_set = |field: &str| verdict["key_set_worst"][field].as_u64().expect("key_set_worst");
    assert!(key_set("rows") <= key_set("bound"), "{verdict:#}");
    let csv = std::fs::read_to_string(out.path().join("soak.csv")).expect("soak.csv");
    assert!(
        csv.lines().count() >= 20,
        "a sample every 5 s for 2 minutes:\n{csv}"
    );
    assert!(csv.starts_with("seconds,committed,"));
    let png = std::fs::read(out.path().join("soak.png")).expect("soak.png");
    assert!(png.starts_with(b"\x89PNG"), "a PNG plot");
}
