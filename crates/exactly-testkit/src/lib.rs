//! Test support for exactly: the services `scripts/setup` starts, unique names, topic reads.
//!
//! Every test gets its own database, topics and consumer groups, so tests run in parallel and
//! leave nothing another test could see. A missing service fails the test with the command that
//! starts it; nothing is skipped silently.

pub mod scenarios;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message};

fn setup_env() -> HashMap<String, String> {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.exactly/env");
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn setting(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| setup_env().remove(name).filter(|v| !v.is_empty()))
}

fn reachable(address: &str) -> bool {
    address
        .parse()
        .ok()
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// The broker started by `scripts/setup` (or `$EXACTLY_BROKERS`).
pub fn brokers() -> String {
    let brokers = setting("EXACTLY_BROKERS")
        .unwrap_or_else(|| panic!("no Kafka-protocol broker configured: run scripts/setup (it starts Tansu and writes .exactly/env)"));
    assert!(
        reachable(&brokers),
        "broker {brokers} does not answer: run scripts/setup to start it"
    );
    brokers
}

/// A Python 3 with psycopg and confluent-kafka (the example consumer's libraries).
pub fn python() -> String {
    let python = setting("EXACTLY_PYTHON")
        .unwrap_or_else(|| panic!("no Python with psycopg and confluent-kafka configured: run scripts/setup (it installs them and writes .exactly/env)"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import psycopg, confluent_kafka"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import psycopg and confluent_kafka: run scripts/setup to install them"
    );
    python
}

/// The PostgreSQL server URL (database `test`).
pub fn pg_url() -> String {
    let url = setting("EXACTLY_PG_URL").unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    assert!(
        reachable("127.0.0.1:5432"),
        "PostgreSQL does not answer on 127.0.0.1:5432: run scripts/setup to start it"
    );
    url
}

/// The Tansu binaries `scripts/setup` installed: `EXACTLY_TANSU` (transactions, memory
/// storage) and `EXACTLY_TANSU_DURABLE` (sqlite storage, for broker restarts), as environment
/// variables to hand to a child process.
pub fn tansu_env() -> Vec<(String, String)> {
    let tansu = setting("EXACTLY_TANSU")
        .unwrap_or_else(|| panic!("no Tansu binary configured: run scripts/setup (it writes .exactly/env)"));
    let durable = setting("EXACTLY_TANSU_DURABLE").unwrap_or_else(|| {
        panic!("no durable (sqlite) Tansu build configured: run scripts/setup --durable (cargo install, 20-35 min once)")
    });
    for path in [&tansu, &durable] {
        assert!(
            std::path::Path::new(path).exists(),
            "{path} is missing: run scripts/setup --durable"
        );
    }
    vec![
        ("EXACTLY_TANSU".into(), tansu),
        ("EXACTLY_TANSU_DURABLE".into(), durable),
    ]
}

/// `prefix-<random>`, for topics, groups and databases.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Creates an empty database for one test and returns its URL.
pub async fn fresh_pg_database() -> String {
    let url = pg_url();
    let name = unique("exactly_test").replace('-', "_");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}; run scripts/setup"));
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

/// One record as read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// Reads every record of `topic` (all `partitions`) from the beginning up to the current end,
/// with `isolation` (`read_committed` or `read_uncommitted`).
pub fn read_topic(brokers: &str, topic: &str, partitions: i32, isolation: &str) -> Vec<TopicRecord> {
    let mut records = Vec::new();
    exactly_kafka::scan_topic(
        brokers,
        topic,
        partitions,
        isolation,
        Duration::from_secs(30),
        |m| {
            records.push(TopicRecord {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                payload: m.payload().unwrap_or_default().to_vec(),
            })
        },
    )
    .unwrap_or_else(|e| panic!("reading {topic}: {e}"));
    records
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Crash-restarts the local PostgreSQL cluster (`pg_ctlcluster … restart -m immediate`): the
/// server dies without a checkpoint and recovers from its WAL, as after a power loss. Only test
/// binaries that run alone may call it (every other test's connections die too).
pub fn crash_restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a local Debian PostgreSQL cluster (/etc/postgresql): run scripts/setup")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .expect("no cluster in /etc/postgresql: run scripts/setup");
    let status = std::process::Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "immediate",
        ])
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {version} main restart failed");
}

/// The TLS broker `scripts/setup --tls` started (Tansu behind stunnel), as settings that trust
/// the test certificate authority, and the path of a second authority that signed nothing.
pub fn tls_kafka() -> (exactly_kafka::KafkaSettings, String) {
    let missing = || panic!("no TLS broker configured: run scripts/setup --tls (scripts/test does)");
    let brokers = setting("EXACTLY_TLS_BROKERS").unwrap_or_else(missing);
    let ca = setting("EXACTLY_TLS_CA").unwrap_or_else(missing);
    let other_ca = setting("EXACTLY_TLS_OTHER_CA").unwrap_or_else(missing);
    let port = brokers.rsplit(':').next().unwrap_or_default();
    assert!(
        reachable(&format!("127.0.0.1:{port}")),
        "TLS broker {brokers} does not answer: run scripts/setup --tls to start it"
    );
    let settings = exactly_kafka::KafkaSettings::new(&brokers)
        .with_property("security.protocol", "SSL")
        .and_then(|s| s.with_property("ssl.ca.location", &ca))
        .expect("TLS properties are allowed");
    (settings, other_ca)
}

/// The SASL_SSL broker `scripts/setup --tls` started (durable Tansu with SCRAM-SHA-512 behind
/// stunnel): settings whose password is read from `password_variable`, and the password, for
/// the test to hand to a child process by environment (never by argument).
pub fn sasl_kafka(password_variable: &str) -> (exactly_kafka::KafkaSettings, String) {
    let missing =
        || panic!("no SASL broker configured: run scripts/setup --durable --tls (scripts/test does)");
    let brokers = setting("EXACTLY_SASL_BROKERS").unwrap_or_else(missing);
    let user = setting("EXACTLY_SASL_USER").unwrap_or_else(missing);
    let password_file = setting("EXACTLY_SASL_PASSWORD_FILE").unwrap_or_else(missing);
    let password = std::fs::read_to_string(&password_file)
        .unwrap_or_else(|e| panic!("{password_file}: {e}; run scripts/setup --durable --tls"));
    let (tls, _) = tls_kafka();
    let mut settings = exactly_kafka::KafkaSettings::new(&brokers);
    settings.properties = tls.properties;
    let settings = settings
        .with_property("security.protocol", "SASL_SSL")
        .and_then(|s| s.with_property("sasl.mechanism", "SCRAM-SHA-512"))
        .and_then(|s| s.with_property("sasl.username", &user))
        .and_then(|s| s.with_property("sasl.password", &format!("env:{password_variable}")))
        .expect("SASL properties are allowed");
    (settings, password.trim().to_owned())
}

/// The TLS-only PostgreSQL cluster `scripts/setup --tls` made (port 5433, scram-sha-256,
/// a certificate for `localhost` signed by the test CA): its `verify-full` URL (no password in
/// it) and the role's password, for the test to hand over by environment or passfile.
pub fn pg_tls() -> (String, String) {
    let missing = || panic!("no TLS PostgreSQL configured: run scripts/setup --tls (scripts/test does)");
    let url = setting("EXACTLY_PG_TLS_URL").unwrap_or_else(missing);
    let password_file = setting("EXACTLY_PG_TLS_PASSWORD_FILE").unwrap_or_else(missing);
    assert!(
        reachable("127.0.0.1:5433"),
        "the TLS PostgreSQL cluster does not answer on 127.0.0.1:5433: run scripts/setup --tls"
    );
    let password = std::fs::read_to_string(&password_file)
        .unwrap_or_else(|e| panic!("{password_file}: {e}; run scripts/setup --tls"));
    (url, password.trim().to_owned())
}
