//! Kafka over TLS: Tansu 0.6 does not wire its own TLS acceptor, so `scripts/setup --tls` puts
//! stunnel in front of it, with a test certificate authority.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exactly_testkit::{tls_kafka, unique};

use crate::support::*;

/// `--kafka-property` arguments for `settings`' properties.
fn property_args(settings: &exactly_kafka::KafkaSettings) -> Vec<String> {
    settings
        .properties
        .iter()
        .flat_map(|(k, v)| ["--kafka-property".to_owned(), format!("{k}={v}")])
        .collect()
}

/// The polling relay and an idempotent consumer run end to end through the TLS listener, with
/// the certificate checked against the test CA: every event applied once.
#[tokio::test(flavor = "multi_thread")]
async fn relay_and_consumer_run_over_tls() {
    let (kafka, _) = tls_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("tls");
    exactly_kafka::ensure_topics(&kafka, &[&topic], 2)
        .await
        .expect("topic over TLS");
    let events = insert_sqlite(&service, &topic, 300);
    let properties = property_args(&kafka);
    let properties: Vec<&str> = properties.iter().map(String::as_str).collect();
    let out = relay(service.to_str().expect("path"), &kafka.brokers, &properties);
    assert!(
        out.status.success(),
        "relay over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(outbox_status_counts(&service), vec![("SENT".to_owned(), 300)]);

    let consumer_db = dir.path().join("consumer.db");
    let group = unique("g");
    exactly_sqlite::open(&consumer_db)
        .expect("open")
        .execute_batch(APPLIED_SCHEMA)
        .expect("schema");
    let store = exactly_sqlite::SqliteEffects::open(&consumer_db, &group, apply_json).expect("effects");
    let counters = std::sync::Arc::new(exactly_kafka::ConsumerCounters::default());
    let consumer = exactly_kafka::IdempotentConsumer::new(
        store,
        exactly_kafka::ConsumerConfig::new(&kafka, &group, &[&topic]),
    )
    .expect("consumer")
    .with_counters(counters.clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(async move { consumer.run(stop_rx).await });
    let watched = counters.clone();
    let done = exactly_testkit::eventually(Duration::from_secs(60), || {
        let c = watched.clone();
        async move { c.applied.load(std::sync::atomic::Ordering::Relaxed) >= 300 }
    })
    .await;
    let _ = stop.send(true);
    run.await.expect("join").expect("consumer ran");
    assert!(done, "consumer over TLS applied {:?}", counters);
    assert_eq!(sorted(applied_event_ids(&consumer_db)), sorted(ids(&events)));
}

/// A client that does not trust the broker's certificate authority fails at start with the TLS
/// reason (and exit code 2), instead of retrying sends until they time out.
#[test]
fn a_client_that_does_not_trust_the_ca_fails_clearly() {
    let (kafka, other_ca) = tls_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    insert_sqlite(&service, &unique("tls-untrusted"), 1);
    let started = Instant::now();
    let untrusting = format!("ssl.ca.location={other_ca}");
    let out = relay(
        service.to_str().expect("path"),
        &kafka.brokers,
        &[
            "--kafka-property",
            "security.protocol=SSL",
            "--kafka-property",
            &untrusting,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot connect to Kafka"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate verify failed"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        outbox_status_counts(&service),
        vec![("NEW".to_owned(), 1)],
        "nothing was claimed"
    );
}

/// The settings exactly-once depends on cannot be passed through: refused, exit 2, with why.
#[test]
fn exactly_once_settings_cannot_be_overridden() {
    for property in [
        "acks=1",
        "enable.idempotence=false",
        "isolation.level=read_uncommitted",
        "enable.auto.commit=true",
    ] {
        let out = Command::new(EXACTLY)
            .args([
                "consume",
                "--database",
                "/nonexistent/x.db",
                "--brokers",
                "127.0.0.1:1",
                "--group",
                "g",
                "--topic",
                "t",
            ])
            .args(["--no-metrics", "--kafka-property", property])
            .stdin(Stdio::null())
            .output()
            .expect("run consume");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{property}: {stderr}");
        let name = property.split('=').next().expect("name");
        assert!(
            stderr.contains(&format!("kafka property {name} cannot be set")),
            "{stderr}"
        );
    }
}

/// SASL_SSL with SCRAM-SHA-512 (Tansu's SASL behind the TLS terminator): the relay and
/// `exactly consume` move every event once with the password given only by environment, a wrong
/// password stops a command at start with the reason, and no output of any of them, with debug
/// logging on, contains the password.
#[test]
fn sasl_scram_over_tls_end_to_end_and_the_password_never_shows() {
    const PASSWORD_VARIABLE: &str = "EXACTLY_TEST_KAFKA_PASSWORD";
    let (kafka, password) = exactly_testkit::sasl_kafka(PASSWORD_VARIABLE);
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let consumer_db = dir.path().join("consumer.db");
    let topic = unique("sasl");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    std::env::set_var(PASSWORD_VARIABLE, &password);
    runtime
        .block_on(exactly_kafka::ensure_topics(&kafka, &[&topic], 2))
        .expect("topic over SASL_SSL");
    let events = insert_sqlite(&service, &topic, 200);
    let mut outputs = Vec::new();
    let command = |args: &[&str]| {
        let mut c = Command::new(EXACTLY);
        c.args(args)
            .args(["--brokers", &kafka.brokers, "--no-metrics"])
            .args(property_args(&kafka))
            .env(PASSWORD_VARIABLE, &password)
            .env("EXACTLY_LOG", "debug")
            .stdin(Stdio::null());
        c
    };
    let relay = command(&[
        "relay",
        "--mode",
        "poll",
        "--database",
        service.to_str().expect("path"),
        "--exit-when-idle",
    ])
    .output()
    .expect("run relay");
    outputs.push(relay.stdout.clone());
    outputs.push(relay.stderr.clone());
    assert!(
        relay.status.success(),
        "relay over SASL_SSL: {}",
        String::from_utf8_lossy(&relay.stderr)
    );
    assert_eq!(outbox_status_counts(&service), vec![("SENT".to_owned(), 200)]);

    let log = dir.path().join("consume.log");
    let mut consume = command(&[
        "consume",
        "--database",
        consumer_db.to_str().expect("path"),
        "--group",
        &topic,
        "--topic",
        &topic,
    ])
    .stdout(std::fs::File::create(&log).expect("log"))
    .stderr(std::fs::File::options().append(true).open(&log).expect("log"))
    .spawn()
    .expect("spawn consume");
    let deadline = Instant::now() + Duration::from_secs(60);
    let applied = || -> i64 {
        rusqlite::Connection::open(&consumer_db)
            .and_then(|c| c.query_row("SELECT count(*) FROM exactly_consumed", [], |r| r.get(0)))
            .unwrap_or(0)
    };
    while applied() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status();
    let _ = consume.wait();
    outputs.push(std::fs::read(&log).expect("consume log"));
    let conn = rusqlite::Connection::open(&consumer_db).expect("open");
    let mut stmt = conn
        .prepare("SELECT event_id FROM exactly_consumed")
        .expect("prepare");
    let consumed: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        sorted(consumed),
        sorted(ids(&events)),
        "every event applied once over SASL_SSL"
    );

    let wrong = command(&[
        "relay",
        "--mode",
        "poll",
        "--database",
        service.to_str().expect("path"),
        "--exit-when-idle",
    ])
    .env(PASSWORD_VARIABLE, "not-the-password")
    .output()
    .expect("run relay");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("SASL authentication error"), "{stderr}");
    outputs.push(wrong.stdout);
    outputs.push(wrong.stderr);

    for output in &outputs {
        let text = String::from_utf8_lossy(output);
        assert!(!text.contains(&password), "the password appeared in an output");
        assert!(
            !text.contains("not-the-password"),
            "a password appeared in an output"
        );
    }
    assert!(
        outputs.iter().map(Vec::len).sum::<usize>() > 0,
        "the commands said nothing at all"
    );
}

/// PostgreSQL with TLS and a password: `sslmode=verify-full` against the test CA, scram-sha-256.
/// The polling relay, the WAL relay (its replication stream included) and a consumer with its
/// effect store there all run end to end; the password reaches them by `PGPASSWORD` (child
/// processes) or a passfile (this process). The wrong CA, a host name the certificate does not
/// name, and a wrong password each fail at once with the reason, and no output shows the
/// password.
#[test]
fn postgres_over_tls_with_scram_end_to_end_and_clear_failures() {
    let (url, password) = exactly_testkit::pg_tls();
    let brokers = exactly_testkit::brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, format!("localhost:5433:*:exactly_app:{password}\n")).expect("passfile");
    let in_process = format!("{url}&passfile={}", passfile.display());
    let (poll_topic, wal_topic) = (unique("pgtls-poll"), unique("pgtls-wal"));
    let slot = "exactly_tls_test";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let insert = |topic: &str, n: usize| {
        runtime.block_on(async {
            let mut client = exactly_postgres::connect(&in_process)
                .await
                .expect("connect over TLS");
            let tx = client.transaction().await.expect("begin");
            let events: Vec<exactly_core::Envelope> =
                (0..n).map(|i| event(&format!("A-{}", i % 5), i, b"")).collect();
            for e in &events {
                exactly_postgres::enqueue(&tx, topic, e).await.expect("enqueue");
            }
            tx.commit().await.expect("commit");
            events
        })
    };
    runtime.block_on(async {
        exactly_kafka::ensure_topics(&brokers, &[&poll_topic, &wal_topic], 1).await.expect("topics");
        let mut client = exactly_postgres::connect(&in_process).await.expect("connect over TLS");
        // The cluster is this test's alone: start from an empty schema and no slot.
        client
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}';
                 DROP PUBLICATION IF EXISTS exactly_outbox;
                 DROP SCHEMA public CASCADE; CREATE SCHEMA public;"
            ))
            .await
            .expect("reset");
        exactly_postgres::migrations::migrate(&mut client).await.expect("migrate");
    });
    let mut outputs: Vec<Vec<u8>> = Vec::new();
    let exactly = |args: &[&str]| {
        let mut c = Command::new(EXACTLY);
        c.args(args)
            .env("PGPASSWORD", &password)
            .env("EXACTLY_LOG", "debug")
            .stdin(Stdio::null());
        c
    };

    let polled = insert(&poll_topic, 40);
    let out = exactly(&[
        "relay",
        "--mode",
        "poll",
        "--database",
        &url,
        "--brokers",
        &brokers,
        "--no-metrics",
        "--exit-when-idle",
    ])
    .output()
    .expect("poll relay");
    assert!(
        out.status.success(),
        "poll relay over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    outputs.extend([out.stdout, out.stderr]);

    let wal_log = dir.path().join("wal.log");
    let mut wal = exactly(&[
        "relay",
        "--mode",
        "wal",
        "--database",
        &url,
        "--brokers",
        &brokers,
        "--no-metrics",
        "--slot",
        slot,
    ])
    .stdout(std::fs::File::create(&wal_log).expect("log"))
    .stderr(std::fs::File::options().append(true).open(&wal_log).expect("log"))
    .spawn()
    .expect("wal relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    let slot_active = || {
        runtime.block_on(async {
            let client = exactly_postgres::connect(&in_process).await.ok()?;
            let row = client
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()??;
            Some(row.get::<_, bool>(0))
        })
    };
    while slot_active() != Some(true) {
        assert!(
            Instant::now() < deadline,
            "the WAL relay never streamed over TLS: {}",
            std::fs::read_to_string(&wal_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let streamed = insert(&wal_topic, 40);
    let records = runtime.block_on(async {
        let mut got = Vec::new();
        for _ in 0..100 {
            got = exactly_testkit::read_topic(&brokers, &wal_topic, 1, "read_committed");
            if got.len() >= 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        got
    });
    let _ = Command::new("kill")
        .args(["-TERM", &wal.id().to_string()])
        .status();
    let _ = wal.wait();
    outputs.push(std::fs::read(&wal_log).expect("wal log"));
    let got: Vec<String> = records
        .iter()
        .map(|r| r.headers["exactly-event-id"].clone())
        .collect();
    assert_eq!(
        got,
        ids(&streamed),
        "the WAL relay over TLS streamed every event in order"
    );

    let consume_log = dir.path().join("consume.log");
    let mut consume = exactly(&[
        "consume",
        "--database",
        &url,
        "--brokers",
        &brokers,
        "--group",
        &poll_topic,
    ])
    .args(["--topic", &poll_topic, "--topic", &wal_topic, "--no-metrics"])
    .stdout(std::fs::File::create(&consume_log).expect("log"))
    .stderr(
        std::fs::File::options()
            .append(true)
            .open(&consume_log)
            .expect("log"),
    )
    .spawn()
    .expect("consume");
    let applied = || -> Vec<String> {
        runtime.block_on(async {
            let Ok(client) = exactly_postgres::connect(&in_process).await else {
                return Vec::new();
            };
            client
                .query("SELECT event_id FROM exactly_consumed", &[])
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied().len() < 80 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status();
    let _ = consume.wait();
    outputs.push(std::fs::read(&consume_log).expect("consume log"));
    let mut expected = ids(&polled);
    expected.extend(ids(&streamed));
    assert_eq!(
        sorted(applied()),
        sorted(expected),
        "the consumer applied every event once over TLS"
    );

    let refused = |url: &str, pgpassword: &str, reason: &str| {
        let out = exactly(&[
            "relay",
            "--mode",
            "poll",
            "--database",
            url,
            "--brokers",
            &brokers,
            "--no-metrics",
            "--exit-when-idle",
        ])
        .env("PGPASSWORD", pgpassword)
        .output()
        .expect("relay");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains("cannot connect to exactly_app@"), "{stderr}");
        assert!(
            stderr.to_lowercase().contains(reason),
            "expected {reason:?}: {stderr}"
        );
        stderr
    };
    let other_ca = std::env::var("EXACTLY_TLS_OTHER_CA")
        .ok()
        .unwrap_or_else(|| exactly_testkit::tls_kafka().1);
    let wrong_ca = url.replace(
        url.split("sslrootcert=").nth(1).expect("sslrootcert in the URL"),
        &other_ca,
    );
    outputs.push(refused(&wrong_ca, &password, "certificate verify failed").into_bytes());
    let wrong_host = url.replace("@localhost:", "@127.0.0.1:");
    outputs.push(refused(&wrong_host, &password, "certificate verify failed").into_bytes());
    outputs.push(refused(&url, "not-the-password", "password authentication failed").into_bytes());

    // libpq's rules for the root certificate. sslrootcert=system trusts the system's roots
    // (here the test CA, through OpenSSL's SSL_CERT_FILE) and so always checks the host name:
    // the certificate names localhost only, so 127.0.0.1 is refused even though its chain is
    // trusted. A weaker mode with system, and verify-ca with no root certificate, are refused
    // before connecting.
    let (base, ca) = url
        .split_once("?sslmode=verify-full&sslrootcert=")
        .expect("the TLS URL's form");
    let system = |url: &str| {
        exactly(&[
            "relay",
            "--mode",
            "poll",
            "--database",
            url,
            "--brokers",
            &brokers,
            "--no-metrics",
            "--exit-when-idle",
        ])
        .env("SSL_CERT_FILE", ca)
        .output()
        .expect("relay")
    };
    let out = system(&format!("{base}?sslrootcert=system"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "sslrootcert=system with the right host: {stderr}"
    );
    outputs.push(stderr.into_bytes());
    let out = system(&format!(
        "{}?sslrootcert=system",
        base.replace("@localhost:", "@127.0.0.1:")
    ));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("certificate verify failed"),
        "the host name is checked: {stderr}"
    );
    for (query, reason) in [
        (
            "sslmode=require&sslrootcert=system",
            "may not be used with sslrootcert=system",
        ),
        (
            "sslmode=verify-ca&sslrootcert=system",
            "may not be used with sslrootcert=system",
        ),
        ("sslmode=verify-ca", "needs a root certificate"),
        ("sslmode=verify-full", "needs a root certificate"),
    ] {
        let out = system(&format!("{base}?{query}"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{query}: {stderr}");
        assert!(stderr.contains(reason), "{query}: expected {reason:?}: {stderr}");
        outputs.push(stderr.into_bytes());
    }

    // The password from a variable the settings name (`password_env`, `--password-env`), with
    // no PGPASSWORD: the right one connects, a wrong one is refused with the reason.
    let with_password_env = |value: &str| {
        exactly(&[
            "relay",
            "--mode",
            "poll",
            "--database",
            &url,
            "--password-env",
            "EXACTLY_TEST_DB_PASSWORD",
            "--brokers",
            &brokers,
            "--no-metrics",
            "--exit-when-idle",
        ])
        .env_remove("PGPASSWORD")
        .env("EXACTLY_TEST_DB_PASSWORD", value)
        .output()
        .expect("relay")
    };
    let out = with_password_env(&password);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "--password-env: {stderr}");
    outputs.push(stderr.into_bytes());
    let out = with_password_env("not-the-password");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("password authentication failed"), "{stderr}");
    outputs.push(stderr.into_bytes());
    for output in &outputs {
        let text = String::from_utf8_lossy(output);
        assert!(!text.contains(&password), "the password appeared in an output");
    }
}

/// SASL/OAUTHBEARER with the token from a file: librdkafka asks exactly's clients for a token,
/// they read the file named in `sasl.oauthbearer.config`, and the broker receives it. Tansu 0.6
/// negotiates OAUTHBEARER but has no token validator (its authentication callback knows PLAIN
/// and SCRAM only), so it refuses every token: the test shows the path up to the broker's
/// verdict (a missing file stops the client with exactly's own reason; a token reaches the
/// broker and is refused there), and no output contains the token.
#[test]
fn oauthbearer_tokens_come_from_the_file_named_in_the_settings() {
    let (sasl, _) = exactly_testkit::sasl_kafka("EXACTLY_UNUSED_PASSWORD");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    let mut settings = exactly_kafka::KafkaSettings::new(&sasl.brokers);
    for (name, value) in &sasl.properties {
        if !name.starts_with("sasl.") {
            settings.properties.insert(name.clone(), value.clone());
        }
    }
    let settings = settings
        .with_property("sasl.mechanism", "OAUTHBEARER")
        .and_then(|s| {
            s.with_property(
                "sasl.oauthbearer.config",
                &format!("token_file={} principal=exactly-test", token_file.display()),
            )
        })
        .expect("OAUTHBEARER properties are allowed");
    let check = |settings: &exactly_kafka::KafkaSettings| {
        let args = property_args(settings);
        let out = Command::new(EXACTLY)
            .args(["consume", "--database"])
            .arg(dir.path().join("effects.db"))
            .args([
                "--group",
                "g",
                "--topic",
                "t",
                "--no-metrics",
                "--brokers",
                &settings.brokers,
            ])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run exactly consume");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, stderr) = check(&settings);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("OAUTHBEARER token from") && stderr.contains("No such file"),
        "the missing token file is the reason given: {stderr}"
    );

    let token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJleGFjdGx5LXRlc3QifQ.c2lnbmF0dXJl";
    std::fs::write(&token_file, token).expect("token");
    let (code, stderr) = check(&settings);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("authentication") && !stderr.contains("OAUTHBEARER token from"),
        "the token was read and the broker refused it: {stderr}"
    );
    assert!(!stderr.contains(token), "the token never shows: {stderr}");
}
