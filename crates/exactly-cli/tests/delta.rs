//! `exactly sink delta` on the broker: SIGKILLed while it runs (once between writing an
//! append's Parquet files and its log entry), raced by a second sink, fed repeats and records
//! that do not fit; the table is read back with delta-rs after each run.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Array, Int32Array, Int64Array, StringArray};
use exactly_core::{Envelope, IdempotencyKey};
use exactly_testkit::{brokers, read_topic, unique};
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::stream::StreamProcess as Sink;
use crate::support::{event, EXACTLY};

const PARTITIONS: i32 = 3;

/// A row as the test compares them: idempotency key → every (topic partition, offset) it was
/// written from.
type Rows = BTreeMap<String, Vec<(i32, i64)>>;

/// Every row the table's newest version references, read with delta-rs (a referenced file
/// that is missing fails the read), and how many files it references.
async fn table_rows(uri: &str) -> (Rows, usize) {
    let target = exactly_delta::DeltaTarget::open_existing(uri, &Default::default())
        .await
        .expect("open the table");
    let files = target.read_all().await.expect("every referenced file reads");
    let mut rows = Rows::new();
    for (_, batches) in &files {
        for b in batches {
            let col = |name: &str| b.column_by_name(name).unwrap_or_else(|| panic!("column {name}"));
            let keys = col("idempotency_key")
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8");
            let parts = col("partition")
                .as_any()
                .downcast_ref::<Int32Array>()
                .expect("int");
            let offsets = col("offset").as_any().downcast_ref::<Int64Array>().expect("long");
            for i in 0..b.num_rows() {
                rows.entry(keys.value(i).to_owned())
                    .or_default()
                    .push((parts.value(i), offsets.value(i)));
            }
        }
    }
    (rows, files.len())
}

fn producer() -> ThreadedProducer<DefaultProducerContext> {
    exactly_kafka::producer_config(&brokers(), false)
        .create()
        .expect("producer")
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, e: &Envelope, with_headers: bool) {
    let headers = exactly_kafka::record_headers(&e.to_headers(&IdempotencyKey::UuidV7(e.event_id)));
    let mut record = BaseRecord::to(topic)
        .key(e.aggregate_id.as_bytes())
        .payload(&e.payload);
    if with_headers {
        record = record.headers(headers);
    }
    let mut record = Some(record);
    while let Some(r) = record.take() {
        if let Err((_, r)) = producer.send(r) {
            record = Some(r);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// `exactly sink delta` into `table` from `topic`, with `extra` flags.
fn spawn_sink(topic: &str, table: &str, name: &str, extra: &[&str]) -> Sink {
    let brokers = brokers();
    let child = Command::new(EXACTLY)
        .args([
            "sink",
            "delta",
            "--brokers",
            &brokers,
            "--topic",
            topic,
            "--table",
            table,
            "--name",
            name,
            "--flush-records",
            "150",
            "--flush-interval-ms",
            "300",
            "--no-metrics",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn exactly sink delta");
    Sink(child)
}

/// Waits until the table holds `want` distinct keys (or 180 s passed) and returns its rows.
async fn settled(uri: &str, want: usize) -> (Rows, usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if std::path::Path::new(uri).join("_delta_log").exists() {
            let (rows, _) = table_rows(uri).await;
            if rows.len() >= want || Instant::now() > deadline {
                // One more look after a pause: a late duplicate would show now.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let again = table_rows(uri).await;
                return again;
            }
        }
        assert!(Instant::now() < deadline, "no table at {uri} after 180 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rows in the table while a sink runs, for the kill points (0 before the table exists).
async fn rows_now(uri: &str) -> usize {
    if !std::path::Path::new(uri).join("_delta_log").exists() {
        return 0;
    }
    match exactly_delta::DeltaTarget::open_existing(uri, &Default::default()).await {
        Ok(t) => t.read_all().await.map_or(0, |files| {
            files
                .iter()
                .flat_map(|(_, b)| b.iter().map(|b| b.num_rows()))
                .sum()
        }),
        Err(_) => 0,
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn keys_written_more_than_once(rows: &Rows) -> Vec<(&String, &Vec<(i32, i64)>)> {
    rows.iter().filter(|(_, at)| at.len() > 1).take(5).collect()
}

/// 3,000 events over 3 partitions (3% of them sent twice, as an at-least-once relay killed
/// mid-batch sends them) and 4 records without exactly's headers, while the sink is SIGKILLed
/// 4 times, the second time between writing an append's Parquet files and its log entry:
/// the table holds every event once, every file the log references exists and reads, and the
/// 4 records are on the dead-letter topic with their reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_delta_sink_killed_4_times_holds_every_event_once() {
    let _one = crate::support::one_kill_test_at_a_time();
    const EVENTS: usize = 3_000;
    let (topic, name) = (unique("delta-in"), unique("delta-sink"));
    exactly_kafka::ensure_topics(&brokers(), &[&topic], PARTITIONS)
        .await
        .expect("topics");
    let dir = tempfile::tempdir().expect("tempdir");
    let table = dir.path().join("orders");
    let uri = table.to_str().expect("utf-8").to_owned();
    let mut rng = rand::rngs::StdRng::seed_from_u64(35);
    let events: Vec<Envelope> = (0..EVENTS)
        .map(|i| event(&format!("A-{}", i % 40), i, b""))
        .collect();
    let p = producer();
    let mut repeats = 0;
    for (i, e) in events.iter().enumerate() {
        send(&p, &topic, e, true);
        if rng.random_range(0..100) < 3 {
            // The repeat lands later in the same partition, as a relay's resend does.
            send(
                &p,
                &topic,
                &events[i.saturating_sub(rng.random_range(0..20))],
                true,
            );
            repeats += 1;
        }
        if i % 750 == 10 {
            send(&p, &topic, &event("A-bad", i, b"{\"no\":\"headers\"}"), false);
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
    eprintln!("sent {EVENTS} events, {repeats} repeats, 4 without headers");

    let mut sink = spawn_sink(&topic, &uri, &name, &[]);
    for (kill, at) in [(0, 400), (1, 1_000), (2, 1_600), (3, 2_200)] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while rows_now(&uri).await < at {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: fewer than {at} rows after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(sink);
        if kill == 1 {
            // Dies by itself on its third append, after the files and before the log entry.
            let mut dying = spawn_sink(&topic, &uri, &name, &["--kill-between-files-and-log", "3"]);
            let deadline = Instant::now() + Duration::from_secs(120);
            let status = loop {
                if let Some(status) = dying.0.try_wait().expect("wait") {
                    break status;
                }
                assert!(Instant::now() < deadline, "the sink did not reach its kill point");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(!status.success(), "killed between files and log: {status}");
        }
        sink = spawn_sink(&topic, &uri, &name, &[]);
    }
    let (rows, files) = settled(&uri, EVENTS).await;
    drop(sink);
    let want: HashSet<String> = events
        .iter()
        .map(|e| IdempotencyKey::UuidV7(e.event_id).to_string())
        .collect();
    let got: HashSet<String> = rows.keys().cloned().collect();
    assert_eq!(got.len(), EVENTS, "{} of {EVENTS} events in the table", got.len());
    assert_eq!(got, want, "the table holds exactly the events sent");
    assert!(
        keys_written_more_than_once(&rows).is_empty(),
        "events written twice: {:?}",
        keys_written_more_than_once(&rows)
    );
    assert!(files > 0);

    // Compaction rewrites the small files without changing a row; vacuum then deletes the
    // compacted-away files and the orphans the kill between files and log left, and every
    // file the log still references is there.
    let on_disk = |dir: &std::path::Path| -> usize {
        walk(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count()
    };
    let before_disk = on_disk(&table);
    let compact = Command::new(EXACTLY)
        .args([
            "delta",
            "compact",
            "--table",
            &uri,
            "--target-file-size",
            "100000000",
            "--min-files",
            "2",
        ])
        .output()
        .expect("exactly delta compact");
    assert!(
        compact.status.success(),
        "{}",
        String::from_utf8_lossy(&compact.stderr)
    );
    let (compacted, fewer) = table_rows(&uri).await;
    assert_eq!(compacted, rows, "compaction changes no row");
    assert!(fewer < files, "{fewer} files after compaction, {files} before");
    let vacuum = Command::new(EXACTLY)
        .args(["delta", "vacuum", "--table", &uri, "--retention-hours", "0"])
        .output()
        .expect("exactly delta vacuum");
    assert!(
        vacuum.status.success(),
        "{}",
        String::from_utf8_lossy(&vacuum.stderr)
    );
    let (vacuumed, left) = table_rows(&uri).await;
    assert_eq!(
        (vacuumed, left),
        (rows, fewer),
        "vacuum deletes no referenced file"
    );
    assert_eq!(
        on_disk(&table),
        fewer,
        "only referenced files are left (were {before_disk})"
    );
    let dead: BTreeMap<String, String> =
        read_topic(&brokers(), &format!("{name}-dead-letters"), 1, "read_committed")
            .into_iter()
            .map(|r| {
                (
                    format!(
                        "{}@{}",
                        r.headers["exactly-origin-partition"], r.headers["exactly-origin-offset"]
                    ),
                    r.headers["exactly-parked-reason"].clone(),
                )
            })
            .collect();
    assert_eq!(
        dead.len(),
        4,
        "each record without headers parked (once or more): {dead:?}"
    );
    assert!(
        dead.values().all(|why| why.starts_with("not an exactly event")),
        "{dead:?}"
    );
}

/// Two sinks of one name in two consumer groups: both read every partition and race for the
/// same positions in the same table; the loser of each race reads the log's positions again.
/// Every event once.
#[tokio::test(flavor = "multi_thread")]
async fn two_sinks_racing_for_one_table_write_each_event_once() {
    let _one = crate::support::one_kill_test_at_a_time();
    const EVENTS: usize = 2_000;
    let (topic, name) = (unique("delta-race"), unique("delta-racer"));
    exactly_kafka::ensure_topics(&brokers(), &[&topic], PARTITIONS)
        .await
        .expect("topics");
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dir.path().join("race").to_str().expect("utf-8").to_owned();
    let events: Vec<Envelope> = (0..EVENTS)
        .map(|i| event(&format!("R-{}", i % 30), i, b""))
        .collect();
    let p = producer();
    for e in &events[..EVENTS / 2] {
        send(&p, &topic, e, true);
    }
    p.flush(Duration::from_secs(60)).expect("flush");
    let a = spawn_sink(&topic, &uri, &name, &["--group", &format!("{name}-a")]);
    let b = spawn_sink(&topic, &uri, &name, &["--group", &format!("{name}-b")]);
    for e in &events[EVENTS / 2..] {
        send(&p, &topic, e, true);
        std::thread::sleep(Duration::from_micros(500));
    }
    p.flush(Duration::from_secs(60)).expect("flush");
    let (rows, _) = settled(&uri, EVENTS).await;
    drop((a, b));
    assert_eq!(rows.len(), EVENTS, "{} of {EVENTS} events", rows.len());
    assert!(
        keys_written_more_than_once(&rows).is_empty(),
        "events written twice: {:?}",
        keys_written_more_than_once(&rows)
    );
    let log = std::fs::read_dir(std::path::Path::new(&uri).join("_delta_log"))
        .expect("log")
        .count();
    eprintln!("{log} log entries for {EVENTS} events from two racing sinks");
}

/// Declared columns: a record whose amount is not a number is parked with the reason, and the
/// records after it in its partition are written.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_that_does_not_fit_the_columns_is_parked_and_its_partition_goes_on() {
    let (topic, name) = (unique("delta-typed"), unique("delta-typed-sink"));
    exactly_kafka::ensure_topics(&brokers(), &[&topic], 1)
        .await
        .expect("topics");
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dir.path().join("typed").to_str().expect("utf-8").to_owned();
    let p = producer();
    let payloads = [
        r#"{"amount":1.5}"#,
        r#"{"amount":"lots"}"#,
        r#"{"amount":3}"#,
        r#"{}"#,
    ];
    let events: Vec<Envelope> = payloads
        .iter()
        .enumerate()
        .map(|(i, pl)| event("T-1", i, pl.as_bytes()))
        .collect();
    for e in &events {
        send(&p, &topic, e, true);
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    let sink = spawn_sink(
        &topic,
        &uri,
        &name,
        &["--column", "amount:double:/amount:required"],
    );
    let (rows, _) = settled(&uri, 2).await;
    drop(sink);
    let key = |i: usize| IdempotencyKey::UuidV7(events[i].event_id).to_string();
    assert_eq!(
        rows.keys().cloned().collect::<HashSet<_>>(),
        HashSet::from([key(0), key(2)]),
        "the fitting records, the one after the misfit included"
    );
    let dead: Vec<String> = read_topic(&brokers(), &format!("{name}-dead-letters"), 1, "read_committed")
        .into_iter()
        .map(|r| r.headers["exactly-parked-reason"].clone())
        .collect();
    assert!(
        dead.iter().any(|w| w.contains("column amount: expected double"))
            && dead.iter().any(|w| w.contains("missing")),
        "both misfits parked with their reason: {dead:?}"
    );
}

/// A one-partition topic holding `events` envelopes (`prefix` names it), and the configuration
/// of an in-process sink of envelope columns reading it into `uri`, appending after
/// `flush_interval`, with the lab's `faults`.
async fn one_partition_sink(
    prefix: &str,
    events: u64,
    uri: &str,
    flush_interval: Duration,
    faults: exactly_kafka::Faults,
) -> exactly_delta::SinkConfig {
    let topic = unique(prefix);
    exactly_kafka::ensure_topics(&brokers(), &[&topic], 1)
        .await
        .expect("topic");
    let producer = producer();
    for n in 0..events as usize {
        send(&producer, &topic, &event(&format!("A-{}", n % 50), n, b""), true);
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    let name = unique(&format!("{prefix}-sink"));
    exactly_delta::SinkConfig {
        kafka: exactly_kafka::KafkaSettings::new(&brokers()),
        topics: vec![topic],
        table_uri: uri.to_owned(),
        storage_options: Default::default(),
        name: name.clone(),
        group: name,
        instance_id: None,
        layout: exactly_delta::Layout {
            input: exactly_delta::InputKind::Envelope,
            columns: Vec::new(),
            partition_by: None,
        },
        flush_records: 100_000,
        flush_interval,
        target_file_size: 128 * 1024 * 1024,
        dedupe_horizon_ms: 3_600_000,
        dead_letter_topic: unique(&format!("{prefix}-dead")),
        faults,
    }
}

/// The sink takes what the client has ready in turns of at most 10,000 records; it used to take
/// one more record at the end of a full turn and drop it, so every 10,000 records a partition
/// showed a gap, was sought back and read again (with a warning blaming the broker). 30,000
/// records already in one partition: written once each, and nothing read again.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_read_in_long_turns_is_never_sought_back() {
    use std::sync::atomic::Ordering;
    const EVENTS: u64 = 30_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dir.path().join("table").to_string_lossy().into_owned();
    let config = one_partition_sink(
        "delta-turns",
        EVENTS,
        &uri,
        Duration::from_secs(1),
        exactly_kafka::Faults::none(),
    )
    .await;
    let counters = std::sync::Arc::new(exactly_delta::SinkCounters::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(exactly_delta::run(config, counters.clone(), stop));
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters.written.load(Ordering::Relaxed) < EVENTS {
        assert!(
            Instant::now() < deadline && !running.is_finished(),
            "the sink wrote {} of {EVENTS} records in 120 s",
            counters.written.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    running.await.expect("joined").expect("the sink stopped cleanly");
    assert_eq!(counters.written.load(Ordering::Relaxed), EVENTS);
    assert_eq!(
        counters.reread.load(Ordering::Relaxed),
        0,
        "no partition sought back to a record the sink had taken and dropped"
    );
}

/// A sink stopped while an append runs (held here between its Parquet files and its log entry)
/// lets the append end, never cuts it off, and counts it: the table and the sink's totals both
/// hold every record. The totals used to miss an append that ended while the sink stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_stopped_while_it_appends_lets_the_append_end_and_counts_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const EVENTS: u64 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dir.path().join("table").to_string_lossy().into_owned();
    let appending = Arc::new(AtomicBool::new(false));
    let held = appending.clone();
    let faults = exactly_kafka::Faults::new(move |point| {
        if point == exactly_kafka::FaultPoint::DeltaAfterFilesBeforeLog {
            held.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(2));
        }
        false
    });
    let config = one_partition_sink("delta-stop", EVENTS, &uri, Duration::from_millis(200), faults).await;
    let counters = Arc::new(exactly_delta::SinkCounters::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(exactly_delta::run(config, counters.clone(), stop));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !appending.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline && !running.is_finished(),
            "no append started in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    running.await.expect("joined").expect("the sink stopped cleanly");
    let (rows, _) = table_rows(&uri).await;
    assert_eq!(rows.len() as u64, EVENTS, "the running append committed");
    assert_eq!(
        counters.written.load(Ordering::Relaxed),
        EVENTS,
        "the sink's totals count the append that ended while it stopped"
    );
}
