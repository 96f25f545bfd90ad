//! `exactly run --config exactly.toml`: every component a file describes, in one process.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exactly_testkit::{brokers, unique};

use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The event ids in `exactly_consumed` (the record handler's table), one per application.
fn consumed_ids(db: &Path) -> Vec<String> {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return vec![];
    };
    let Ok(mut stmt) = conn.prepare("SELECT event_id FROM exactly_consumed ORDER BY applied_seq") else {
        return vec![];
    };
    stmt.query_map([], |r| r.get(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

fn scrape(port: u16) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// Two sources (a PostgreSQL database through the WAL relay, a SQLite file through the polling
/// relay) and one consumer of both topics, all from one file in one process with one metrics
/// listener: every event committed before and during the run is applied exactly once, and
/// SIGTERM stops the process cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_run_moves_two_sources_each_exactly_once() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pg_url, client) = crate::wal::prepared_database().await;
    let sqlite = dir.path().join("shop.db");
    let effects = dir.path().join("ledger.db");
    let (pg_topic, sqlite_topic) = (unique("run-orders"), unique("run-shop"));
    exactly_kafka::ensure_topics(brokers.as_str(), &[&pg_topic, &sqlite_topic], 2)
        .await
        .expect("topics");
    let mut expected = Vec::new();
    let write_pg = |from: usize| {
        let (client, topic) = (&client, pg_topic.clone());
        async move {
            let mut written = Vec::new();
            for i in from..from + 200 {
                let e = event(&format!("O-{}", i % 5), i, b"");
                exactly_postgres::enqueue(client, &topic, &e)
                    .await
                    .expect("enqueue");
                written.push(e);
            }
            written
        }
    };
    expected.extend(write_pg(0).await);
    expected.extend(insert_sqlite(&sqlite, &sqlite_topic, 200));

    let port = free_port();
    let config = dir.path().join("exactly.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{brokers}"

[metrics]
addr = "127.0.0.1:{port}"

[source.orders]
database = "{pg_url}"
mode = "wal"
heartbeat_ms = 1000
exactly_once = true

[source.shop]
database = "{sqlite}"
poll_ms = 100

[consumer.ledger]
database = "{effects}"
topics = ["{pg_topic}", "{sqlite_topic}"]

# Here so one scrape holds a relay's, a consumer's and a stream job's metrics (its input has no
# product_id: every record goes to its dead-letter topic).
[stream.agg]
application_id = "{stream_app}"
input = "{sqlite_topic}"
output = "{stream_app}-out"
state_dir = "{stream_state}"
"#,
            sqlite = sqlite.display(),
            effects = effects.display(),
            stream_app = unique("run-agg"),
            stream_state = dir.path().join("agg-state").display(),
        ),
    )
    .expect("write config");
    let log = dir.path().join("run.log");
    let mut run = Command::new(EXACTLY)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("EXACTLY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start exactly run");

    // More events while it runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    expected.extend(write_pg(200).await);
    expected.extend(insert_sqlite(&sqlite, &sqlite_topic, 200));

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut consumed = consumed_ids(&effects);
    while consumed.len() < expected.len() && Instant::now() < deadline {
        if let Ok(Some(status)) = run.try_wait() {
            panic!(
                "exactly run exited early ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        consumed = consumed_ids(&effects);
    }
    // Every component is ready: both sources (database, broker, and the slot of the WAL one), the
    // consumer (database, broker, partitions held, lag) and the stream job (broker).
    let readiness_until = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let (code, body) = crate::health::get(port, "/readyz");
        if code == 200 || Instant::now() > readiness_until {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(ready.0, 200, "{}", ready.1);
    let ready: serde_json::Value = serde_json::from_str(&ready.1).expect("readiness JSON");
    for component in ["source orders", "source shop", "consumer ledger", "stream agg"] {
        assert_eq!(ready["components"][component]["ready"], true, "{ready}");
    }
    // Every metric the shipped dashboard and alerts query is one the binary exports (the
    // stream's lag comes with its first statistics after its assignment: wait for it).
    let shipped = shipped_metric_names();
    let missing_from = |metrics: &str| -> Vec<String> {
        shipped
            .iter()
            .filter(|name| !metrics.contains(name.as_str()))
            .cloned()
            .collect()
    };
    let scraped_until = Instant::now() + Duration::from_secs(60);
    let mut metrics = scrape(port);
    while !missing_from(&metrics).is_empty() && Instant::now() < scraped_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        metrics = scrape(port);
    }
    // A little longer: anything applied twice would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status();
    let stopped = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = run.try_wait() {
            break Some(status);
        }
        if Instant::now() > stopped {
            let _ = run.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let consumed = consumed_ids(&effects);
    assert_eq!(
        consumed.len(),
        expected.len(),
        "applied {} of {} events; log:\n{log_text}",
        consumed.len(),
        expected.len()
    );
    assert_eq!(
        sorted(consumed),
        sorted(ids(&expected)),
        "each event exactly once"
    );
    assert!(
        metrics.contains("source=\"orders\"") && metrics.contains("source=\"shop\""),
        "one listener serves both sources' gauges:\n{metrics}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops every component cleanly ({status:?}); log:\n{log_text}"
    );
    let missing = missing_from(&metrics);
    assert!(
        missing.is_empty(),
        "deploy/ queries metrics this scrape does not have: {missing:?}\n{metrics}"
    );
    // `exactly status --config`: every database of the file, the slot, the consumer's dedupe
    // state (a key set for the polling source's UUIDv7 keys, watermarks for the WAL source's
    // sequences) and the groups' lag, nothing left to read now that everything was applied.
    let status = Command::new(EXACTLY)
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .expect("status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let databases = status["databases"].as_array().expect("databases");
    assert_eq!(databases.len(), 3, "{status}");
    let pg = databases
        .iter()
        .find(|d| d["used_by"] == serde_json::json!(["source orders"]))
        .expect("the PostgreSQL source");
    assert_eq!(pg["slots"].as_array().map(Vec::len), Some(1), "{pg}");
    assert_eq!(pg["outbox"]["new"], 0, "{pg}");
    let ledger = databases
        .iter()
        .find(|d| d["used_by"] == serde_json::json!(["consumer ledger"]))
        .expect("the consumer's database");
    assert_eq!(ledger["consumers"][0]["consumer"], "ledger", "{ledger}");
    assert_eq!(ledger["consumers"][0]["keys"], 200 + 200, "{ledger}");
    assert!(
        ledger["consumers"][0]["watermarks"].as_u64() > Some(0),
        "{ledger}"
    );
    let progress = &status["progress"][0];
    assert_eq!(progress["topic"], "exactly-progress", "{status}");
    assert!(
        progress["sources"].as_array().is_some_and(|s| !s.is_empty()),
        "the exactly-once source's position: {status}"
    );
    let group = status["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["used_by"] == "consumer ledger"))
        .expect("the consumer's group");
    // At most the last commit marker of each partition of the exactly-once source's topic: a
    // marker is an offset too, below the high watermark and never delivered (Kafka counts it the
    // same way). Tansu also reports high watermarks below what was read on the polling source's
    // topic (committed past "end"); lag never goes below 0 there.
    assert!(group["lag"].as_i64() <= Some(2), "{group}");
    assert!(
        group["partitions"].as_array().map(Vec::len) == Some(4),
        "two topics of 2 partitions: {group}"
    );
    // --log-format json: every line is one JSON event with its level and message.
    let events: Vec<serde_json::Value> = log_text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON event ({e}): {line}")))
        .collect();
    assert!(!events.is_empty(), "exactly run logged nothing at info");
    for event in &events {
        assert!(
            event.get("level").is_some_and(|l| l.is_string()) && event.get("message").is_some(),
            "an event without level or message: {event}"
        );
    }
    crate::wal::drop_slot(&pg_url).await;
}

/// A bad file exits 2 naming the key and its line; `exactly config check` prints the resolved
/// settings with no secret in any output.
#[test]
fn a_bad_config_exits_2_with_the_key_and_line_and_check_shows_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("exactly.toml");
    let good = r#"[kafka]
brokers = "localhost:9092"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "app"
"sasl.password" = "k4fka-s3cret"

[source.orders]
database = "postgres://app:pg-s3cret@db.internal:5432/orders?sslmode=verify-full"
mode = "wal"

[source.shop]
database = "shop.db"
"#;
    let exactly = |args: &[&str]| {
        Command::new(EXACTLY)
            .args(args)
            .arg(&config)
            .env_remove("EXACTLY_BROKERS")
            .stdin(Stdio::null())
            .output()
            .expect("run exactly")
    };

    std::fs::write(&config, good).expect("write");
    let checked = exactly(&["config", "check", "--config"]);
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(checked.status.success(), "{shown}");
    assert!(shown.contains("db.internal"), "{shown}");
    assert!(shown.contains("[source.shop]"), "{shown}");
    assert!(
        !shown.contains("pg-s3cret") && !shown.contains("k4fka-s3cret"),
        "{shown}"
    );

    std::fs::write(
        &config,
        good.replace("database = \"shop.db\"", "database = \"shop.db\"\nbatch_sise = 5"),
    )
    .expect("write");
    for command in [&["run", "--config"][..], &["config", "check", "--config"][..]] {
        let out = exactly(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(
            stderr.contains("line 16") && stderr.contains("batch_sise"),
            "{stderr}"
        );
    }

    std::fs::write(
        &config,
        format!("{good}\n[source.orders_again]\ndatabase = \"postgres://app@db.internal/orders\"\nmode = \"wal\"\n"),
    )
    .expect("write");
    let out = exactly(&["config", "check", "--config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("same replication slot exactly_orders"),
        "{stderr}"
    );
    assert!(!stderr.contains("pg-s3cret"), "{stderr}");
}

/// The configuration page's complete `exactly.toml` is `docs/exactly.toml`, and it validates
/// (with the environment variables it names set).
#[test]
fn the_documented_config_is_the_docs_file_and_it_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let file = std::fs::read_to_string(root.join("docs/exactly.toml")).expect("docs/exactly.toml");
    let page = std::fs::read_to_string(root.join("docs/configuration.md")).expect("docs/configuration.md");
    assert!(
        page.contains(&format!("```toml\n{file}```")),
        "docs/configuration.md must show docs/exactly.toml verbatim"
    );
    let out = Command::new(EXACTLY)
        .args(["config", "check", "--config"])
        .arg(root.join("docs/exactly.toml"))
        .env_remove("EXACTLY_BROKERS")
        .env("KAFKA_PASSWORD", "k")
        .env("ORDERS_DB_PASSWORD", "o")
        .env("BILLING_DB_PASSWORD", "b")
        .env("LEDGER_DB_PASSWORD", "l")
        .stdin(Stdio::null())
        .output()
        .expect("run exactly config check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 source(s), 1 consumer(s), 2 stream job(s), 1 sink(s)"),
        "{stderr}"
    );
}

/// The `exactly_*` names deploy/grafana/exactly.json and deploy/prometheus/alerts.yml query.
fn shipped_metric_names() -> std::collections::BTreeSet<String> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut names = std::collections::BTreeSet::new();
    for file in ["grafana/exactly.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(deploy.join(file)).expect("read deploy file");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("exactly_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    assert!(names.len() > 15, "found only {names:?}");
    names
}

/// The shipped alert rules are valid and their unit tests pass (promtool, from Debian's
/// prometheus package: scripts/setup --promtool).
#[test]
fn shipped_alert_rules_check_and_pass_their_tests() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&deploy)
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool ({e}): run scripts/setup --promtool"));
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
