//! `exactly stream`: exactly-once windowed counts with a changelog-backed state store.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_core::{Envelope, IdempotencyKey, UnixMillis};
use exactly_testkit::{brokers, read_topic, unique};
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::support::EXACTLY;

const WINDOW: i64 = 300_000;

/// A child process, killed when dropped (SIGKILL: a crash at whatever point it was).
pub struct StreamProcess(pub Child);

impl StreamProcess {
    /// A stand-in while a killed processor is replaced.
    fn placeholder() -> Self {
        StreamProcess(Command::new("true").spawn().expect("spawn true"))
    }
}

impl Drop for StreamProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_stream(
    brokers: &str,
    app: &str,
    input: &str,
    output: &str,
    state: &std::path::Path,
    metrics: Option<&str>,
) -> StreamProcess {
    spawn_member(brokers, app, input, output, state, metrics, None)
}

/// How a processor of [`spawn_member`] joins its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Static,
    Dynamic,
}

/// `exactly stream` as instance `member` (`--instance`, and `--dynamic-membership` if asked).
fn spawn_member(
    brokers: &str,
    app: &str,
    input: &str,
    output: &str,
    state: &std::path::Path,
    metrics: Option<&str>,
    member: Option<(&str, Membership)>,
) -> StreamProcess {
    let mut command = Command::new(EXACTLY);
    command.args([
        "stream",
        "--brokers",
        brokers,
        "--application-id",
        app,
        "--input",
        input,
        "--output",
        output,
        "--group-by",
        "product_id",
        "--grace-ms",
        "86400000",
        "--retention-ms",
        "172800000",
        "--state-dir",
        state.to_str().expect("utf-8 path"),
    ]);
    match metrics {
        Some(addr) => command.args(["--metrics-addr", addr]),
        None => command.arg("--no-metrics"),
    };
    if let Some((instance, membership)) = member {
        command.args(["--instance", instance]);
        if membership == Membership::Dynamic {
            command.arg("--dynamic-membership");
        }
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn exactly stream");
    StreamProcess(child)
}

/// A metric's value from a Prometheus endpoint (None while it is not up or not reported yet).
pub fn scrape(addr: &str, metric: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

fn order(i: usize, at: UnixMillis) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7(),
        event_type: "OrderPlaced".into(),
        aggregate_type: "order".into(),
        aggregate_id: format!("O-{}", i % 50),
        occurred_at: at,
        payload: format!("{{\"product_id\":\"P-{}\",\"n\":{i}}}", i % 7).into_bytes(),
        headers: vec![],
    }
}

fn produce(brokers: &str, topic: &str, events: &[Envelope]) {
    let producer: ThreadedProducer<DefaultProducerContext> = exactly_kafka::producer_config(brokers, false)
        .create()
        .expect("producer");
    for e in events {
        let headers = exactly_kafka::record_headers(&e.to_headers(&IdempotencyKey::UuidV7(e.event_id)));
        let mut record = BaseRecord::to(topic)
            .key(e.aggregate_id.as_bytes())
            .payload(&e.payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// What a sink holds: per partial count the largest value seen (counts only grow, so a value
/// from a resent or aborted transaction never exceeds the committed one), summed per key and
/// window.
fn merged_counts(brokers: &str, topic: &str, partitions: i32) -> HashMap<(String, i64), u64> {
    let mut partials: HashMap<String, (String, i64, u64)> = HashMap::new();
    for r in read_topic(brokers, topic, partitions, "read_committed") {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json output");
        let (Some(key), Some(partial), Some(start), Some(count)) = (
            v["key"].as_str(),
            v["partial"].as_str(),
            v["window_start"].as_i64(),
            v["count"].as_u64(),
        ) else {
            panic!("malformed output {v}");
        };
        let entry = partials
            .entry(format!("{partial}@{start}"))
            .or_insert((key.to_owned(), start, 0));
        entry.2 = entry.2.max(count);
    }
    let mut merged = HashMap::new();
    for (key, start, count) in partials.into_values() {
        *merged.entry((key, start)).or_insert(0) += count;
    }
    merged
}

/// The processor SIGKILLed 3 times while it counts 100,000 orders (3% of them sent twice), its
/// state directory wiped before the second restart: each restart rebuilds its stores from the
/// changelog (or resumes a restore the kill cut short), and the final window counts equal the
/// counts computed directly from the distinct input.
#[tokio::test(flavor = "multi_thread")]
async fn stream_processor_killed_3_times_counts_exactly() {
    let _one = crate::support::one_kill_test_at_a_time();
    const EVENTS: usize = 100_000;
    let brokers = brokers();
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique("orders-agg"));
    exactly_kafka::ensure_topics(&brokers, &[&input, &output], 3)
        .await
        .expect("topics");
    let base = (exactly_kafka::now().0 / WINDOW) * WINDOW - 4 * WINDOW;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let events: Vec<Envelope> = (0..EVENTS)
        .map(|i| order(i, UnixMillis(base + rng.random_range(0..4 * WINDOW))))
        .collect();
    let mut expected: HashMap<(String, i64), u64> = HashMap::new();
    for e in &events {
        let product = format!("P-{}", e.payload_product());
        *expected
            .entry((product, e.occurred_at.0 - e.occurred_at.0.rem_euclid(WINDOW)))
            .or_insert(0) += 1;
    }
    let mut sent = events.clone();
    sent.extend(events.iter().step_by(33).cloned());
    let state = tempfile::tempdir().expect("tempdir");

    let metrics = free_address();
    let spawn = || spawn_stream(&brokers, &app, &input, &output, state.path(), Some(&metrics));
    let mut processor = spawn();
    let (b, i) = (brokers.clone(), input.clone());
    let producing = tokio::task::spawn_blocking(move || produce(&b, &i, &sent));
    // Each kill lands while the processor is counting: only once this process has counted a
    // random number of records (after its restore and group join), never before or after.
    for kill in 0..3 {
        let at = rng.random_range(1_000..8_000) as f64;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut counted = 0.0;
        while counted < at {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: the processor counted only {counted} records in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            counted = scrape(&metrics, "exactly_stream_records_total").unwrap_or(0.0);
        }
        drop(processor);
        if kill == 1 {
            for entry in std::fs::read_dir(state.path()).expect("state dir").flatten() {
                std::fs::remove_file(entry.path()).expect("wipe the state");
            }
        }
        let committed: u64 = merged_counts(&brokers, &output, 3).values().sum();
        eprintln!(
            "kill {kill}: after {counted} records of this process; {committed} counted in committed results"
        );
        assert!(
            committed < EVENTS as u64,
            "kill {kill} landed after the processor had finished"
        );
        processor = spawn();
    }
    producing.await.expect("producer");
    // The output is read once the processor is idle: a read_committed reader cannot pass a
    // transaction that is still open, so reading while it commits every 100 ms may not reach
    // the end of the topic.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut merged = HashMap::new();
    let mut last_seen = -1.0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The last process always has work left (the results were incomplete at the last
        // kill), so "idle" means it has counted and stopped counting; before its metrics are up
        // the killed process's transaction may still be open.
        let Some(counted) = scrape(&metrics, "exactly_stream_records_total") else {
            continue;
        };
        let seen = counted + scrape(&metrics, "exactly_stream_duplicates_total").unwrap_or(0.0);
        if seen != last_seen {
            last_seen = seen;
            continue;
        }
        let (b, o) = (brokers.clone(), output.clone());
        // A read that does not reach the end in time is tried again, not a failure.
        if let Ok(read) = std::panic::catch_unwind(move || merged_counts(&b, &o, 3)) {
            merged = read;
            if merged == expected {
                break;
            }
        }
    }
    drop(processor);
    let total: u64 = merged.values().sum();
    assert_eq!(total, EVENTS as u64, "every distinct order counted once");
    assert_eq!(merged, expected);
}

/// Issue 32's restart test: two processors of one application, and 10 times one of them (at
/// random) SIGKILLed while both count and restarted at once, its state directory wiped on every
/// other restart, while orders (3% of them twice) keep coming. Each restarted processor counts
/// again within the session timeout (6 s) and the processor's rebalance timeout (30 s) plus its
/// restore time and start-up, never after Kafka's default rebalance timeout (300 s, what the
/// issue saw a group wait); it restores outside the rebalance, so the other processor goes on
/// meanwhile. The merged window counts end equal to the distinct input's (the invariant: each
/// event once, whatever was killed or wiped).
///
/// Tansu shortfall, named: Tansu 0.6.0 does not implement static membership (KIP-345). On Kafka
/// a static member restarted within the session timeout takes back its partitions with no
/// rebalance; on Tansu the rejoin revokes the other member's partitions and, after four or five
/// restarts in a row, a rebalance never completed (docs/known-limits.md). So the test runs
/// dynamic members by default (what Tansu handles); `EXACTLY_RESTART_MEMBERSHIP=static` runs it
/// with static members (the product's default), for a broker that implements KIP-345.
///
/// Not in the default run: Tansu's group coordinator wedges under these kills (a rebalance
/// that never completes). Alone on the broker the dynamic run passed (10 kills, restarts
/// counting again in 6–14 s); in the full suite, with other tests on the same broker, the
/// group wedged at the fourth restart (docs/known-limits.md). Run it with
/// `cargo test -p exactly-cli --test main two_processors_one_killed -- --ignored`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "Tansu 0.6.0's group coordinator wedges under repeated member kills; run with --ignored (docs/known-limits.md)"]
async fn two_processors_one_killed_10_times_resume_within_the_session_timeout_and_count_exactly() {
    const EVENTS: usize = 30_000;
    const KILLS: usize = 10;
    let membership = match std::env::var("EXACTLY_RESTART_MEMBERSHIP").as_deref() {
        Ok("static") => Membership::Static,
        _ => Membership::Dynamic,
    };
    let brokers = brokers();
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique("restarts"));
    exactly_kafka::ensure_topics(&brokers, &[&input, &output], 4)
        .await
        .expect("topics");
    let base = (exactly_kafka::now().0 / WINDOW) * WINDOW - 3 * WINDOW;
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    let events: Vec<Envelope> = (0..EVENTS)
        .map(|i| order(i, UnixMillis(base + rng.random_range(0..3 * WINDOW))))
        .collect();
    let expected = expected_counts(&events);
    let mut sent = Vec::with_capacity(EVENTS + EVENTS / 33);
    for (i, e) in events.iter().enumerate() {
        sent.push(e.clone());
        if i % 33 == 0 {
            sent.push(e.clone());
        }
    }
    // Orders keep coming while the kills go on (200 a second), then the rest at once.
    let kills_done = Arc::new(AtomicBool::new(false));
    let (b, i, done) = (brokers.clone(), input.clone(), kills_done.clone());
    let producing = std::thread::spawn(move || {
        let mut rest = sent.as_slice();
        while !rest.is_empty() && !done.load(Ordering::Relaxed) {
            let (chunk, after) = rest.split_at(rest.len().min(60));
            produce(&b, &i, chunk);
            rest = after;
            std::thread::sleep(Duration::from_millis(300));
        }
        produce(&b, &i, rest);
    });
    let states = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let names = ["a", "b"];
    let spawn = |n: usize, metrics: &str| {
        spawn_member(
            &brokers,
            &app,
            &input,
            &output,
            states[n].path(),
            Some(metrics),
            Some((names[n], membership)),
        )
    };
    let mut metrics = [free_address(), free_address()];
    let mut members = [spawn(0, &metrics[0]), spawn(1, &metrics[1])];
    let counting = |addr: &str| scrape(addr, "exactly_stream_records_total").unwrap_or(0.0) > 0.0;
    wait_for("both processors to count", Duration::from_secs(120), || {
        counting(&metrics[0]) && counting(&metrics[1])
    });
    // (member, wiped, seconds to the first record counted, its restore seconds)
    let mut restarts: Vec<(usize, bool, f64, f64)> = Vec::new();
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..3_000)));
        let n = rng.random_range(0..2usize);
        let wipe = kill % 2 == 1;
        drop(std::mem::replace(&mut members[n], StreamProcess::placeholder()));
        if wipe {
            for entry in std::fs::read_dir(states[n].path()).expect("state dir").flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        metrics[n] = free_address();
        let restarted = Instant::now();
        members[n] = spawn(n, &metrics[n]);
        let limit = Duration::from_secs(300);
        while !counting(&metrics[n]) {
            assert!(
                restarted.elapsed() < limit,
                "kill {kill}: {} counted nothing within {limit:?} of its restart",
                names[n]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let first = restarted.elapsed().as_secs_f64();
        let restore = scrape(&metrics[n], "exactly_stream_restore_seconds").unwrap_or(0.0);
        eprintln!(
            "kill {kill}: {} restarted{}, counting again after {first:.1} s (restore {restore:.2} s)",
            names[n],
            if wipe { " with its state wiped" } else { "" }
        );
        restarts.push((n, wipe, first, restore));
    }
    kills_done.store(true, Ordering::Relaxed);
    producing.join().expect("producer");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut merged = HashMap::new();
    while Instant::now() < deadline {
        let (b, o) = (brokers.clone(), output.clone());
        if let Ok(read) = std::panic::catch_unwind(move || merged_counts(&b, &o, 4)) {
            merged = read;
            if merged == expected {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(members);
    let firsts: Vec<f64> = restarts.iter().map(|r| r.2).collect();
    eprintln!(
        "restarts ({membership:?} members): seconds to the first record counted {firsts:?}; \
         max {:.1}, mean {:.1}",
        firsts.iter().cloned().fold(0.0, f64::max),
        firsts.iter().sum::<f64>() / firsts.len() as f64
    );
    let total: u64 = merged.values().sum();
    assert_eq!(total, EVENTS as u64, "every distinct order counted once");
    assert_eq!(merged, expected);
    // Session timeout 6 s and rebalance timeout 30 s, plus the restore, plus the process's
    // start (probe, meta topic, group join) in a debug build on a 2-core machine shared with
    // the broker: far below the 300 s a rebalance could wait for a member that died joining.
    for (kill, (n, _, first, restore)) in restarts.iter().enumerate() {
        assert!(
            *first <= 6.0 + 30.0 + restore + 20.0,
            "kill {kill}: {} counted again only after {first:.1} s (restore {restore:.2} s)",
            names[*n]
        );
    }
}

trait ProductOf {
    fn payload_product(&self) -> String;
}

impl ProductOf for Envelope {
    fn payload_product(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.payload).expect("json");
        v["product_id"]
            .as_str()
            .expect("product")
            .trim_start_matches("P-")
            .to_owned()
    }
}

/// Late records beyond the grace are dropped and counted; an input sent twice counts once.
#[test]
fn late_records_are_dropped_and_duplicates_count_once() {
    let brokers = brokers();
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique("late"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = config_for(&brokers, &app, "0", &input, &output, state.path());
    config.windows = exactly_core::window::TumblingWindows::new(WINDOW, 1_000, 10 * WINDOW).expect("windows");
    runtime
        .block_on(exactly_kafka::ensure_topics(&brokers, &[&input], 1))
        .expect("topics");
    runtime
        .block_on(config.prepare_topics(1))
        .expect("internal topics");
    let t0 = 100 * WINDOW;
    let first = order(0, UnixMillis(t0 + 10));
    let events = vec![
        first.clone(),
        order(7, UnixMillis(t0 + 20)),
        first,                                  // a duplicate
        order(14, UnixMillis(t0 + 2 * WINDOW)), // stream time moves past window 0 + grace
        order(21, UnixMillis(t0 + 30)),         // late
    ];
    produce(&brokers, &input, &events);
    let processor = Running::start(config);
    let counters = processor.counters.clone();
    let seen = || {
        counters.counted.load(Ordering::Relaxed)
            + counters.duplicates.load(Ordering::Relaxed)
            + counters.late.load(Ordering::Relaxed)
    };
    wait_for("all 5 inputs processed", Duration::from_secs(60), || seen() >= 5);
    std::thread::sleep(Duration::from_millis(500));
    processor.stop();
    assert_eq!(counters.counted.load(Ordering::Relaxed), 3);
    assert_eq!(counters.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(counters.late.load(Ordering::Relaxed), 1);
    let merged = merged_counts(&brokers, &output, 1);
    assert_eq!(merged.get(&("P-0".to_owned(), t0)), Some(&2));
    assert_eq!(merged.get(&("P-0".to_owned(), t0 + 2 * WINDOW)), Some(&1));
}

/// Untrusted event time: a far-future timestamp and `i64::MIN` go to the dead-letter topic with
/// their reason, neither panics the processor, and the far-future one does not move stream time
/// (the record after it, in the first window, still counts instead of being dropped as late).
#[test]
fn far_future_and_extreme_event_times_go_to_the_dead_letter_topic() {
    let brokers = brokers();
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique("skew"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = config_for(&brokers, &app, "0", &input, &output, state.path());
    config.windows = exactly_core::window::TumblingWindows::new(WINDOW, 1_000, 10 * WINDOW).expect("windows");
    config.max_event_time_skew_ms = 60_000;
    runtime
        .block_on(exactly_kafka::ensure_topics(&brokers, &[&input], 1))
        .expect("topics");
    runtime
        .block_on(config.prepare_topics(1))
        .expect("internal topics");
    let t0 = 100 * WINDOW;
    let hash_key = Envelope {
        payload: br#"{"product_id":"P#3"}"#.to_vec(),
        ..order(28, UnixMillis(t0 + 30))
    };
    let events = vec![
        order(0, UnixMillis(t0 + 10)),
        order(7, exactly_kafka::now().plus_ms(2 * 3_600_000)),
        order(14, UnixMillis(i64::MIN)),
        order(21, UnixMillis(t0 + 20)),
        hash_key,
    ];
    produce(&brokers, &input, &events);
    let processor = Running::start(config.clone());
    let counters = processor.counters.clone();
    wait_for("5 inputs handled", Duration::from_secs(60), || {
        counters.counted.load(Ordering::Relaxed) + counters.unreadable.load(Ordering::Relaxed) >= 5
    });
    std::thread::sleep(Duration::from_millis(500));
    processor.stop();
    assert_eq!(
        counters.counted.load(Ordering::Relaxed),
        3,
        "the three first-window orders count"
    );
    assert_eq!(
        counters.late.load(Ordering::Relaxed),
        0,
        "stream time was not moved by the future record"
    );
    assert_eq!(counters.unreadable.load(Ordering::Relaxed), 2);
    let merged = merged_counts(&brokers, &output, 1);
    assert_eq!(merged.get(&("P-0".to_owned(), t0)), Some(&2));
    // With salting off, a key with `#` in it is the key itself, not a salted one.
    assert_eq!(merged.get(&("P#3".to_owned(), t0)), Some(&1), "{merged:?}");
    let dead = read_topic(&brokers, &config.dead_letter_topic(), 1, "read_committed");
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|r| {
            r.headers
                .get(exactly_stream::DEAD_REASON_HEADER)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("ahead of the wall clock")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("out of range")), "{reasons:?}");
}

/// Hot-key salting: every order is for one product on a one-partition input, which without
/// salting one task in one processor would count alone. With 4 salts the records go through the
/// repartition topic keyed by `P-HOT#n`, two processors count them, and the partial counts
/// merged downstream equal the input exactly.
#[test]
fn a_hot_key_is_counted_by_two_processors_and_merges_exactly() {
    let _one = crate::support::one_kill_test_at_a_time();
    const ORDERS: usize = 2_000;
    let brokers = brokers();
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique("hot"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (state_a, state_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut config_a = config_for(&brokers, &app, "a", &input, &output, state_a.path());
    let mut config_b = config_for(&brokers, &app, "b", &input, &output, state_b.path());
    config_a.salts = 4;
    config_b.salts = 4;
    runtime
        .block_on(exactly_kafka::ensure_topics(&brokers, &[&input], 1))
        .expect("input topic");
    runtime
        .block_on(config_a.prepare_topics(1))
        .expect("internal topics");
    assert_eq!(
        exactly_kafka::partition_count(&brokers, &config_a.repartition_topic()).expect("metadata"),
        4,
        "one repartition partition per salt"
    );
    let t0 = (exactly_kafka::now().0 / WINDOW) * WINDOW;
    let events: Vec<Envelope> = (0..ORDERS)
        .map(|i| Envelope {
            payload: format!("{{\"product_id\":\"P-HOT\",\"n\":{i}}}").into_bytes(),
            ..order(i, UnixMillis(t0 + (i as i64 % 1000)))
        })
        .collect();
    let a = Running::start(config_a);
    let b = Running::start(config_b);
    wait_for(
        "both processors to hold counting tasks",
        Duration::from_secs(60),
        || a.tasks() > 0 && b.tasks() > 0 && a.tasks() + b.tasks() == 4,
    );
    produce(&brokers, &input, &events);
    wait_for("every order counted", Duration::from_secs(120), || {
        a.counted() + b.counted() >= ORDERS as u64
    });
    std::thread::sleep(Duration::from_millis(500));
    let (counted_a, counted_b) = (a.counted(), b.counted());
    a.stop();
    b.stop();
    assert!(
        counted_a > 0 && counted_b > 0,
        "one processor counted everything: {counted_a} / {counted_b}"
    );
    let merged = merged_counts(&brokers, &output, 4);
    assert_eq!(
        merged.get(&("P-HOT".to_owned(), t0)),
        Some(&(ORDERS as u64)),
        "{merged:?}"
    );
    assert_eq!(merged.len(), 1, "{merged:?}");
}

/// The UPSERT sink: results that arrive twice or out of order never lower a count, partial
/// counts add up per (key, window), and a restarted sink (replaying from its last commit)
/// changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn upsert_sink_keeps_the_largest_result_when_outputs_repeat_or_reorder() {
    let brokers = brokers();
    let url = exactly_testkit::fresh_pg_database().await;
    let topic = unique("agg-out");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let result = |key: &str, part: &str, count: u64| {
        serde_json::json!({"key": key, "partial": part, "window_start": 0, "window_end": WINDOW, "count": count})
            .to_string()
    };
    let outputs = [
        result("P-1", "P-1#p0", 3),
        result("P-1", "P-1#p0", 1), // older, arriving late
        result("P-1", "P-1#p0", 3), // repeated
        result("P-1", "P-1#p1", 4),
        result("P-1", "P-1#p0", 2),
        result("P-2", "P-2#p0", 1),
    ];
    let producer: ThreadedProducer<DefaultProducerContext> = exactly_kafka::producer_config(&brokers, false)
        .create()
        .expect("producer");
    for o in &outputs {
        producer
            .send(BaseRecord::<str, str>::to(&topic).key("k").payload(o))
            .map_err(|(e, _)| e)
            .expect("send");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
    let group = unique("sink");
    let client = exactly_postgres::connect(&url).await.expect("connect");
    for run in 0..2 {
        let mut sink = Command::new(EXACTLY)
            .args([
                "sink-counts",
                "--database",
                &url,
                "--brokers",
                &brokers,
                "--topic",
                &topic,
                "--group",
                &group,
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sink");
        let done = exactly_testkit::eventually(Duration::from_secs(60), || async {
            client
                .query_opt("SELECT count FROM order_counts WHERE key = 'P-2'", &[])
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = sink.kill();
        let _ = sink.wait();
        assert!(done, "run {run}: the sink wrote nothing within 60 s");
        let rows: Vec<(String, i64)> = client
            .query("SELECT key, count FROM order_counts ORDER BY key", &[])
            .await
            .expect("rows")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            rows,
            vec![("P-1".to_owned(), 7), ("P-2".to_owned(), 1)],
            "run {run}"
        );
    }
}

pub fn config_for(
    brokers: &str,
    app: &str,
    instance: &str,
    input: &str,
    output: &str,
    state: &std::path::Path,
) -> exactly_stream::StreamConfig {
    exactly_stream::StreamConfig {
        kafka: exactly_kafka::KafkaSettings::new(brokers),
        application_id: app.to_owned(),
        instance: instance.to_owned(),
        input: input.to_owned(),
        output: output.to_owned(),
        group_by: exactly_stream::GroupBy::PayloadField("product_id".into()),
        windows: exactly_core::window::TumblingWindows::new(WINDOW, 86_400_000, 172_800_000)
            .expect("windows"),
        salts: 1,
        commit_interval: Duration::from_millis(100),
        guarantee: exactly_stream::Guarantee::ExactlyOnce,
        state_dir: state.to_owned(),
        replication_factor: 1,
        min_insync_replicas: 1,
        max_event_time_skew_ms: exactly_stream::DEFAULT_MAX_EVENT_TIME_SKEW_MS,
        group_instance_id: None,
        topology: None,
    }
}

/// A new application `name…` on a new one-partition input, its topics created.
fn one_partition_app(
    brokers: &str,
    name: &str,
    instance: &str,
    state: &std::path::Path,
) -> exactly_stream::StreamConfig {
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique(name));
    let config = config_for(brokers, &app, instance, &input, &output, state);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime
        .block_on(exactly_kafka::ensure_topics(brokers, &[&input], 1))
        .expect("input topic");
    runtime
        .block_on(config.prepare_topics(1))
        .expect("internal topics");
    config
}

/// A processor running on its own thread until its stop flag is set.
struct Running {
    counters: Arc<exactly_stream::StreamCounters>,
    stop: Arc<AtomicBool>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<Result<(), exactly_stream::ProcessorError>>>,
}

impl Running {
    fn start(config: exactly_stream::StreamConfig) -> Running {
        Running::start_with_faults(config, exactly_kafka::Faults::none())
    }

    fn start_with_faults(config: exactly_stream::StreamConfig, faults: exactly_kafka::Faults) -> Running {
        let counters = Arc::new(exactly_stream::StreamCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(std::sync::Mutex::new(None));
        let (c, s, f) = (counters.clone(), stop.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let ran = exactly_stream::Processor::new(config, c).and_then(|p| p.with_faults(faults).run(&s));
            if let Err(e) = &ran {
                *f.lock().expect("lock") = Some(e.to_string());
            }
            ran
        });
        Running {
            counters,
            stop,
            failed,
            thread: Some(thread),
        }
    }

    /// Its task count; a processor that stopped on its own fails the test with its error
    /// (a wait on its tasks would otherwise only time out).
    fn tasks(&self) -> u64 {
        if let Some(error) = self.failed.lock().expect("lock").as_ref() {
            panic!("a processor stopped by itself: {error}");
        }
        self.counters.tasks.load(Ordering::Relaxed)
    }

    fn counted(&self) -> u64 {
        self.counters.counted.load(Ordering::Relaxed)
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("join").expect("processor ran");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expected_counts(events: &[Envelope]) -> HashMap<(String, i64), u64> {
    let mut expected = HashMap::new();
    for e in events {
        let product = format!("P-{}", e.payload_product());
        *expected
            .entry((product, e.occurred_at.0 - e.occurred_at.0.rem_euclid(WINDOW)))
            .or_insert(0) += 1;
    }
    expected
}

/// Two processors with one application.id split the input's partitions (both count); when one
/// leaves, the other takes its tasks over from the changelog, and the merged window counts end
/// equal to the input's. Unreadable inputs land on the dead-letter topic with their reason, and
/// the internal topics are laid out as configured.
#[test]
fn two_processors_split_partitions_and_survive_a_rebalance() {
    let _one = crate::support::one_kill_test_at_a_time();
    const HALF: usize = 3_000;
    let brokers = brokers();
    let (input, output, app) = (unique("orders"), unique("agg-out"), unique("pair"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (state_a, state_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let config_a = config_for(&brokers, &app, "a", &input, &output, state_a.path());
    let config_b = config_for(&brokers, &app, "b", &input, &output, state_b.path());
    runtime
        .block_on(exactly_kafka::ensure_topics(&brokers, &[&input], 3))
        .expect("input topic");
    runtime
        .block_on(config_a.prepare_topics(3))
        .expect("internal topics");
    assert_eq!(
        exactly_kafka::partition_count(&brokers, &config_a.changelog_topic()).expect("metadata"),
        3,
        "one changelog partition per input partition"
    );
    let configs = runtime
        .block_on(exactly_kafka::topic_configs(
            &brokers,
            &config_a.changelog_topic(),
        ))
        .expect("describe changelog configs");
    assert_eq!(
        configs.get("cleanup.policy").map(String::as_str),
        Some("compact"),
        "{configs:?}"
    );
    assert_eq!(
        configs.get("min.insync.replicas").map(String::as_str),
        Some("1"),
        "{configs:?}"
    );

    let t0 = (exactly_kafka::now().0 / WINDOW) * WINDOW - WINDOW;
    let events: Vec<Envelope> = (0..2 * HALF)
        .map(|i| order(i, UnixMillis(t0 + (i as i64 * 97) % (2 * WINDOW))))
        .collect();
    let a = Running::start(config_a);
    let b = Running::start(config_b);
    let split = Instant::now() + Duration::from_secs(60);
    while !(a.tasks() > 0 && b.tasks() > 0 && a.tasks() + b.tasks() == 3) {
        assert!(
            Instant::now() < split,
            "after 60 s the processors do not split the 3 tasks: a holds {}, b holds {}",
            a.tasks(),
            b.tasks()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    produce(&brokers, &input, &events[..HALF]);
    // Unreadable inputs: no exactly headers at all, and an event without the grouping field.
    let producer: ThreadedProducer<DefaultProducerContext> = exactly_kafka::producer_config(&brokers, false)
        .create()
        .expect("producer");
    producer
        .send(
            BaseRecord::<str, str>::to(&input)
                .key("O-1")
                .payload("not an event"),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
    let mut no_product = order(0, UnixMillis(t0));
    no_product.payload = b"{\"sku\":\"X\"}".to_vec();
    produce(&brokers, &input, &[no_product]);
    wait_for("the first half counted", Duration::from_secs(60), || {
        a.counted() + b.counted() >= HALF as u64
    });
    assert!(
        a.counted() > 0 && b.counted() > 0,
        "a counted {}, b counted {}",
        a.counted(),
        b.counted()
    );

    // b leaves: a takes over its tasks (restoring them from the changelog) and counts the rest.
    b.stop();
    wait_for("a to hold every task", Duration::from_secs(60), || a.tasks() == 3);
    produce(&brokers, &input, &events[HALF..]);
    let expected = expected_counts(&events);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let merged = merged_counts(&brokers, &output, 3);
        if merged == expected {
            break;
        }
        if Instant::now() > deadline {
            let mut differ: Vec<String> = expected
                .iter()
                .filter(|(k, v)| merged.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k:?}: expected {v}, merged {:?}", merged.get(k)))
                .chain(
                    merged
                        .keys()
                        .filter(|k| !expected.contains_key(*k))
                        .map(|k| format!("{k:?}: not expected, merged {:?}", merged.get(k))),
                )
                .collect();
            differ.sort();
            panic!(
                "after 120 s the merged counts differ from the input's in {} of {} windows (a counted {}, a holds {} tasks): {:?}",
                differ.len(),
                expected.len(),
                a.counted(),
                a.tasks(),
                &differ[..differ.len().min(20)]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    a.stop();

    // Tansu shows aborted records to read_committed readers, so a dead letter from an aborted
    // transaction (the rebalance aborts one) may show twice there; distinct by origin, it is
    // exactly the two inputs (on Kafka the read itself has no repeats).
    let dead = read_topic(&brokers, &format!("{app}-dead-letters"), 3, "read_committed");
    let by_origin: std::collections::BTreeMap<String, String> = dead
        .iter()
        .map(|r| {
            let header = |name: &str| {
                r.headers
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| panic!("{name} header on a dead letter"))
            };
            (
                header(exactly_stream::DEAD_ORIGIN_HEADER),
                header(exactly_stream::DEAD_REASON_HEADER),
            )
        })
        .collect();
    let mut reasons: Vec<&String> = by_origin.values().collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "two inputs parked: {by_origin:?}");
    assert!(reasons[0].contains("grouping key missing"), "{reasons:?}");
    assert!(reasons[1].contains("header"), "{reasons:?}");
    assert!(dead.iter().any(|r| r.payload == b"not an event"), "bytes kept");
}

/// The seed's example end to end: `exactly demo` commits orders through its outbox and relays,
/// `exactly stream` (orders-agg) counts them per product per 5 minutes from the demo's order
/// topic, and its in-process sink fills `order_counts`, which ends equal to the committed
/// orders in the demo's outbox (rolled-back orders absent).
#[tokio::test(flavor = "multi_thread")]
async fn exactly_stream_counts_the_demo_orders_into_order_counts() {
    let brokers = brokers();
    let url = exactly_testkit::fresh_pg_database().await;
    let suffix = format!("-{}", unique("s"));
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = Command::new(EXACTLY)
        .args([
            "demo",
            "--events",
            "2000",
            "--quiet",
            "--no-faults",
            "--brokers",
            &brokers,
        ])
        .args([
            "--dir",
            dir.path().to_str().expect("path"),
            &format!("--topic-suffix={suffix}"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run demo");
    assert!(
        demo.status.success(),
        "demo failed:\n{}\n{}",
        String::from_utf8_lossy(&demo.stdout),
        String::from_utf8_lossy(&demo.stderr)
    );

    let mut expected: HashMap<(String, i64), i64> = HashMap::new();
    let service = rusqlite::Connection::open(dir.path().join("service.db")).expect("service db");
    let mut query = service
        .prepare("SELECT occurred_at, payload FROM outbox WHERE event_type = 'CouponUsed'")
        .expect("query");
    let rows = query
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .expect("rows");
    for row in rows {
        let (at, payload) = row.expect("row");
        let v: serde_json::Value = serde_json::from_slice(&payload).expect("json payload");
        let product = v["product_id"].as_str().expect("product_id").to_owned();
        *expected.entry((product, at - at.rem_euclid(WINDOW))).or_insert(0) += 1;
    }
    assert!(expected.values().sum::<i64>() > 100, "the demo committed orders");

    let state = tempfile::tempdir().expect("tempdir");
    let stream = Command::new(EXACTLY)
        .args([
            "stream",
            "--brokers",
            &brokers,
            "--application-id",
            &unique("orders-agg"),
        ])
        .args(["--input", &format!("coupon-events{suffix}")])
        .args(["--output", &format!("agg-out{suffix}")])
        .args(["--sink-database", &url, "--no-metrics"])
        .args(["--state-dir", state.path().to_str().expect("path")])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn exactly stream");
    let _stream = StreamProcess(stream);
    let client = exactly_postgres::connect(&url).await.expect("connect");
    let mut rows: HashMap<(String, i64), i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while rows != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(found) = client
            .query("SELECT key, window_start, count FROM order_counts", &[])
            .await
        {
            rows = found
                .iter()
                .map(|r| ((r.get::<_, String>(0), r.get::<_, i64>(1)), r.get::<_, i64>(2)))
                .collect();
        }
    }
    assert_eq!(rows, expected, "order_counts equal the committed orders");
}

/// A commit refused because the group moved on (IllegalGeneration: a rebalance between the last
/// poll and the commit, injected on every fourth commit) does not end the processor, in either
/// guarantee: it drops what it did not commit, goes on from its committed state, and the merged
/// counts equal the input's.
#[test]
fn a_commit_refused_by_a_group_that_moved_on_is_survived_in_both_guarantees() {
    for guarantee in [
        exactly_stream::Guarantee::ExactlyOnce,
        exactly_stream::Guarantee::AtLeastOnce,
    ] {
        let brokers = brokers();
        let (input, output, app) = (unique("orders"), unique("agg-out"), unique("refused"));
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let state = tempfile::tempdir().expect("dir");
        let mut config = config_for(&brokers, &app, "0", &input, &output, state.path());
        config.guarantee = guarantee;
        runtime
            .block_on(exactly_kafka::ensure_topics(&brokers, &[&input], 2))
            .expect("input topic");
        runtime
            .block_on(config.prepare_topics(2))
            .expect("internal topics");
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = commits.clone();
        let faults = exactly_kafka::Faults::new(move |point| {
            point == exactly_kafka::FaultPoint::StreamCommitRefused
                && (seen.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(4)
        });
        let running = Running::start_with_faults(config, faults);
        wait_for("both tasks", Duration::from_secs(60), || running.tasks() == 2);
        let t0 = (exactly_kafka::now().0 / WINDOW) * WINDOW - WINDOW;
        let events: Vec<Envelope> = (0..1_500)
            .map(|i| order(i, UnixMillis(t0 + (i as i64 * 97) % (2 * WINDOW))))
            .collect();
        for chunk in events.chunks(100) {
            produce(&brokers, &input, chunk);
            std::thread::sleep(Duration::from_millis(150));
        }
        let expected = expected_counts(&events);
        wait_for(
            &format!("{guarantee:?}: exact counts"),
            Duration::from_secs(120),
            || running.tasks() == 2 && merged_counts(&brokers, &output, 2) == expected,
        );
        let refused = running.counters.aborts.load(Ordering::Relaxed);
        assert!(refused >= 2, "{guarantee:?}: {refused} commits refused");
        running.stop();
    }
}

/// The restore mode is recorded per application on its first start, and a later start that
/// would restore the changelog in the other mode is refused with the reason. Here the first
/// start is exactly-once on this broker (which shows aborted records: markers mode), the second
/// at-least-once (read-committed mode, no markers): restoring the markers changelog that way
/// would apply aborted changes.
#[test]
fn a_changelog_written_in_one_restore_mode_refuses_the_other() {
    let brokers = brokers();
    let state = tempfile::tempdir().expect("dir");
    let config = one_partition_app(&brokers, "modes", "0", state.path());
    let counters = Arc::new(exactly_stream::StreamCounters::default());
    let first = exactly_stream::Processor::new(config.clone(), counters.clone()).expect("first start");
    drop(first);
    // The meta topic also holds the abort probe's records (another key).
    let recorded: Vec<String> = read_topic(&brokers, &config.meta_topic(), 1, "read_committed")
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"restore-mode".as_slice()))
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(
        recorded,
        ["markers"],
        "recorded once, in the mode this broker needs"
    );
    let again =
        exactly_stream::Processor::new(config.clone(), counters.clone()).expect("the same mode starts");
    drop(again);
    let mut other = config;
    other.guarantee = exactly_stream::Guarantee::AtLeastOnce;
    let refused = match exactly_stream::Processor::new(other, counters) {
        Ok(_) => panic!("a start in the other mode was not refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("written in markers restore mode") && refused.contains("read-committed"),
        "{refused}"
    );
}

/// Issue 32: a restore's memory does not grow with its changelog. `exactly bench stream
/// --restore-only` restores one task's store from a changelog of 200,000 keys padded to about
/// 100 MiB, with the restore reader's buffers set low (4 MiB), and samples its own resident
/// memory meanwhile: the restore holds one write batch, one transaction in marker mode and the
/// reader's buffers, never the changelog (the previous restore kept every record until the end).
#[test]
fn a_changelog_larger_than_the_restore_buffers_restores_in_bounded_memory() {
    let brokers = brokers();
    let output = Command::new(EXACTLY)
        .args([
            "bench",
            "stream",
            "--restore-only",
            "--restore-keys",
            "200000",
            "--key-padding",
            "500",
            "--restore-buffer-kib",
            "4096",
            "--brokers",
            &brokers,
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run exactly bench stream");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed: {stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("restore-figures "))
        .unwrap_or_else(|| panic!("no restore-figures line in {stdout}"));
    let figure = |name: &str| -> u64 {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from {line}"))
    };
    let changelog_mib = figure("changelog_bytes") / (1024 * 1024);
    let growth_mib = figure("rss_peak_kib").saturating_sub(figure("rss_before_kib")) / 1024;
    eprintln!("restore of {changelog_mib} MiB of changelog: resident memory grew by {growth_mib} MiB");
    assert_eq!(figure("entries"), 200_000, "every key restored");
    assert!(
        changelog_mib >= 90,
        "the changelog is {changelog_mib} MiB, meant to be about 99"
    );
    // The store's page cache (32 MiB), the reader's buffers (4 MiB queued, 4 MiB fetched, at
    // most 1,000 records prefetched) and two slices of at most 2 MiB (one read, one written on
    // the store writer's thread), with the allocator's slack (two threads: two arenas).
    // Measured: 42-50 MiB (24 MiB when the restore wrote on its own thread); before the
    // prefetch was bounded by count too, 133 MiB, and the restore before that kept the whole
    // changelog.
    assert!(
        growth_mib <= 64,
        "resident memory grew by {growth_mib} MiB restoring {changelog_mib} MiB"
    );
}

/// Issue 32: a restore waits for the previous owner's transaction. The previous owner of
/// partition 0 counted orders 0–4 (5 for P-1, in a committed transaction) and its next
/// transaction, which carries the commit marker of that one, is still open when a new
/// processor takes the partition over (held here by a producer of its own; a killed owner's
/// transaction stays open until its instance restarts or the transaction times out). The new
/// processor counts nothing while it is open: a restore that ended at a quiet period would find
/// no proven state, read orders 0–4 again and emit P-1's counts 1–5 a second time. Once the
/// transaction commits, the restore ends with count 5 at input offset 5, and the only results
/// emitted are 6–10.
///
/// Tansu shortfall, named: Tansu 0.6.0 reports a last stable offset of 0 while a transaction is
/// open, so librdkafka never signals the partition's end there and the old quiet-period restore
/// waited too, by accident (this test passes on it). On Kafka the end is signalled at the
/// stable offset and the quiet period ended the restore early; that is shown in the core's
/// model (`exactly_core::changelog` tests:
/// `a_quiet_period_ends_a_restore_before_a_late_commit_and_the_stable_end_does_not`).
#[test]
fn a_restore_waits_for_the_previous_owners_open_transaction_and_emits_nothing_twice() {
    use exactly_core::changelog::TxnSeq;
    use exactly_stream::changelog::{records_for, TXN_HEADER};
    use exactly_stream::{Batch, Change};
    use rdkafka::message::{Header, OwnedHeaders};
    let brokers = brokers();
    let state = tempfile::tempdir().expect("dir");
    let config = one_partition_app(&brokers, "late-commit", "new", state.path());
    let (input, output, app) = (
        config.input.clone(),
        config.output.clone(),
        config.application_id.clone(),
    );
    let window = (exactly_kafka::now().0 / WINDOW) * WINDOW;
    let events: Vec<Envelope> = (0..10)
        .map(|i| Envelope {
            payload: format!("{{\"product_id\":\"P-1\",\"n\":{i}}}").into_bytes(),
            ..order(i, UnixMillis(window + i as i64))
        })
        .collect();
    produce(&brokers, &input, &events);

    // The previous owner's state after orders 0–4, as its changelog records.
    let mut changes = vec![Change::Count {
        window_start: UnixMillis(window),
        key: "P-1".into(),
        count: Some(5),
    }];
    for e in &events[..5] {
        changes.push(Change::Seen {
            window_start: UnixMillis(window),
            key: "P-1".into(),
            idempotency_key: IdempotencyKey::UuidV7(e.event_id).to_string(),
            seen: true,
        });
    }
    changes.push(Change::Offset {
        topic: input.clone(),
        partition: 0,
        offset: 5,
    });
    changes.push(Change::StreamTime(UnixMillis(window + 4)));
    let owner: ThreadedProducer<DefaultProducerContext> = exactly_kafka::producer_config(&brokers, false)
        .set("transactional.id", format!("{app}-previous-owner"))
        .create()
        .expect("producer");
    owner.init_transactions(Duration::from_secs(30)).expect("init");
    let changelog = config.changelog_topic();
    let write = |txn: TxnSeq, marker: Option<TxnSeq>, batch: &Batch| {
        owner.begin_transaction().expect("begin");
        for r in records_for(txn, marker, batch) {
            let headers = OwnedHeaders::new().insert(Header {
                key: TXN_HEADER,
                value: Some(&r.txn),
            });
            let mut record = BaseRecord::<str, str>::to(&changelog)
                .key(&r.key)
                .partition(0)
                .headers(headers);
            if let Some(v) = &r.value {
                record = record.payload(v);
            }
            owner.send(record).map_err(|(e, _)| e).expect("send");
        }
        owner.flush(Duration::from_secs(30)).expect("flush");
    };
    let first = TxnSeq { epoch: 1, seq: 0 };
    write(first, None, &Batch { changes });
    owner.commit_transaction(Duration::from_secs(30)).expect("commit");
    // The next transaction: the marker of the first, still open.
    write(TxnSeq { epoch: 1, seq: 1 }, Some(first), &Batch::default());

    let processor = Running::start(config);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        processor.counted(),
        0,
        "nothing counted while the transaction is open"
    );
    assert_eq!(processor.tasks(), 0, "the task waits for its restore");
    owner
        .commit_transaction(Duration::from_secs(30))
        .expect("late commit");
    wait_for("orders 5–9 counted", Duration::from_secs(60), || {
        processor.counted() >= 5
    });
    std::thread::sleep(Duration::from_millis(500));
    processor.stop();
    let mut counts: Vec<u64> = read_topic(&brokers, &output, 1, "read_committed")
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json output");
            v["count"].as_u64().expect("count")
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        vec![6, 7, 8, 9, 10],
        "only the new owner's results, once each"
    );
}
