//! /healthz and /readyz on the metrics listener: a relay is ready while its database and broker
//! answer, not ready (with the reason) while its broker is down, and ready again when it returns.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly_testkit::{tansu_env, unique};

use crate::support::*;

/// GET `path`: the status code and body (0 and empty when nothing answers).
pub fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// A memory Tansu of this test's own, on `port`, so stopping it stops no other test.
fn start_broker(port: u16) -> Child {
    let tansu = tansu_env()
        .into_iter()
        .find(|(name, _)| name == "EXACTLY_TANSU")
        .map(|(_, path)| path)
        .expect("EXACTLY_TANSU");
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tansu did not open {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// A polling relay of `service` with its metrics listener on `metrics_port`.
fn spawn_relay(service: &std::path::Path, brokers: &str, metrics_port: u16) -> Child {
    Command::new(EXACTLY)
        .args(["relay", "--mode", "poll", "--database"])
        .arg(service)
        .args([
            "--brokers",
            brokers,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start relay")
}

fn wait_for(port: u16, path: &str, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (got, body) = get(port, path);
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {status} within {within:?}; last: {got} {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_broker_and_healthz_stays_alive() {
    let broker_port = free_port();
    let mut broker = start_broker(broker_port);
    let brokers = format!("127.0.0.1:{broker_port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("health");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    insert_sqlite(&service, &topic, 3);
    let metrics_port = free_port();
    let mut relay = spawn_relay(&service, &brokers, metrics_port);

    let ready = wait_for(metrics_port, "/readyz", 200, Duration::from_secs(30));
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("JSON");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["components"]["relay"]["ready"], true, "{ready}");
    assert_eq!(get(metrics_port, "/healthz").0, 200);
    assert!(get(metrics_port, "/metrics").1.contains("exactly_outbox_rows"));
    assert_eq!(get(metrics_port, "/nothing").0, 404);

    // The broker stops: not ready, saying why; still alive (a restart would not help).
    broker.kill().expect("stop broker");
    broker.wait().expect("broker stopped");
    let not_ready = wait_for(metrics_port, "/readyz", 503, Duration::from_secs(30));
    let not_ready: serde_json::Value = serde_json::from_str(&not_ready).expect("JSON");
    assert_eq!(not_ready["ready"], false, "{not_ready}");
    let reason = not_ready["components"]["relay"]["not_ready"]["broker"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.starts_with("broker:"), "{not_ready}");
    assert!(
        not_ready["components"]["relay"]["not_ready"]
            .get("database")
            .is_none(),
        "the database is fine: {not_ready}"
    );
    assert_eq!(get(metrics_port, "/healthz").0, 200);

    // It returns: ready again.
    let mut broker = start_broker(broker_port);
    wait_for(metrics_port, "/readyz", 200, Duration::from_secs(60));
    let _ = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    assert!(relay.wait().expect("relay exits").success());
    let _ = broker.kill();
    let _ = broker.wait();
}

/// Retained WAL above --max-retained-wal: the WAL relay reports not ready, naming the slot, and
/// logs an error; with a limit it is under, the same relay is ready.
#[tokio::test(flavor = "multi_thread")]
async fn retained_wal_above_the_limit_makes_the_wal_relay_not_ready() {
    let brokers = exactly_testkit::brokers();
    let (url, _client) = crate::wal::prepared_database().await;
    let slot = exactly_postgres::wal::default_slot_name(&url);
    let run = |limit: &str| {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(EXACTLY)
            .args([
                "relay",
                "--mode",
                "wal",
                "--database",
                &url,
                "--brokers",
                &brokers,
            ])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--max-retained-wal",
                limit,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("start WAL relay");
        (port, child, log)
    };
    // A slot always retains some WAL (at least the segment it starts in): 1 byte is exceeded.
    let (port, mut relay, log) = run("1B");
    let body = wait_for(port, "/readyz", 503, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let slot_reason = |body: &serde_json::Value| {
        body["components"]["relay"]["not_ready"]["slot"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    while !slot_reason(&body).contains("max_retained_wal") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        body = serde_json::from_str(&get(port, "/readyz").1).expect("JSON");
    }
    let reason = slot_reason(&body);
    assert!(
        reason.contains(&slot) && reason.contains("above max_retained_wal"),
        "{body}"
    );
    let _ = relay.kill();
    let _ = relay.wait();
    let logged = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(
        logged.contains("ERROR") && logged.contains(&format!("replication slot {slot} holds back")),
        "{logged}"
    );
    let (port, mut relay, _log) = run("1GiB");
    wait_for(port, "/readyz", 200, Duration::from_secs(30));
    let _ = relay.kill();
    let _ = relay.wait();
    crate::wal::drop_slot(&url).await;
}

/// Sockets a process holds open (from /proc).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Idle clients cannot starve the process: 200 connections that never send a request hold at
/// most the listener's cap of the relay's descriptors, each is closed after the header-read
/// timeout, /healthz answers meanwhile, and the relay keeps publishing.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_to_the_metrics_listener_neither_pile_up_nor_block_healthz() {
    let brokers = exactly_testkit::brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("idle-conns");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    insert_sqlite(&service, &topic, 5);
    let metrics_port = free_port();
    let mut relay = spawn_relay(&service, &brokers, metrics_port);
    wait_for(metrics_port, "/healthz", 200, Duration::from_secs(30));
    let before = open_sockets(relay.id());

    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|i| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect");
            if i % 2 == 0 {
                // Half send a request head that never ends.
                let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            }
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let during = open_sockets(relay.id());
    // 64 for the listener's cap, and room for the relay's own broker and database connections,
    // which come and go; uncapped, the 200 idle connections would all be held.
    assert!(
        during <= before + 64 + 30,
        "the relay holds {during} sockets (was {before}): idle connections are not capped"
    );

    // /healthz answers while the idle ones wait (they are closed after the header timeout).
    let started = Instant::now();
    wait_for(metrics_port, "/healthz", 200, Duration::from_secs(30));
    let answered = started.elapsed();
    assert!(answered < Duration::from_secs(20), "/healthz took {answered:?}");
    let mut first = idle.into_iter().next().expect("a connection");
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buffer = Vec::new();
    let read = first.read_to_end(&mut buffer);
    assert!(
        read.is_ok(),
        "the server closes an idle connection by itself: {read:?}"
    );

    // The relay still publishes.
    insert_sqlite(&service, &topic, 5);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = exactly_testkit::read_topic(&brokers, &topic, 1, "read_committed");
        if records.len() >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay published {} of 10 events",
            records.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    assert!(relay.wait().expect("relay exits").success());
}
