//! The WAL relay (`exactly relay --mode wal`) on real PostgreSQL logical replication.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use exactly_core::{IdempotencyKey, UnixMillis};
use exactly_postgres::wal::{ensure_slot, slot_stats, WalConfig};
use exactly_testkit::{brokers, fresh_pg_database, read_topic, unique, TopicRecord};
use rand::{Rng, SeedableRng};

use crate::support::*;

/// A relay process, SIGKILLed when dropped (also when a test fails).
pub struct RelayProcess(pub Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `exactly relay --mode wal` in the background.
pub fn spawn_wal_relay(url: &str, brokers: &str, extra: &[&str]) -> RelayProcess {
    let child = Command::new(EXACTLY)
        .args([
            "relay",
            "--mode",
            "wal",
            "--database",
            url,
            "--brokers",
            brokers,
            "--no-metrics",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn exactly relay --mode wal");
    RelayProcess(child)
}

pub fn kill9(relay: &mut RelayProcess) {
    let _ = relay.0.kill();
    let _ = relay.0.wait();
}

/// Publication and slot first: only what commits after the slot exists is streamed.
pub async fn prepared_database() -> (String, tokio_postgres::Client) {
    let url = fresh_pg_database().await;
    ensure_slot(&WalConfig::new(&url)).await.expect("slot");
    let client = exactly_postgres::connect(&url).await.expect("connect");
    (url, client)
}

pub async fn drop_slot(url: &str) {
    let slot = exactly_postgres::wal::default_slot_name(url);
    exactly_postgres::wal::drop_slot(url, &slot)
        .await
        .expect("drop slot");
}

/// Reads the topic until it holds at least `n` records (or 60 s).
pub async fn wait_for_records(brokers: &str, topic: &str, partitions: i32, n: usize) -> Vec<TopicRecord> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = read_topic(brokers, topic, partitions, "read_committed");
        if records.len() >= n || Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub fn sequence_value(record: &TopicRecord) -> u128 {
    match record.headers["exactly-key"].parse::<IdempotencyKey>() {
        Ok(IdempotencyKey::Sequence { value, .. }) => value,
        other => panic!("not a sequence key: {other:?}"),
    }
}

/// The invariant: per partition, every key is either above all before it or a repeat of one
/// already seen (a rewind); returns how many repeats there were.
pub fn assert_ordered_prefix_with_repeats(records: &[TopicRecord]) -> usize {
    let mut by_position = records.to_vec();
    by_position.sort_by_key(|r| (r.partition, r.offset));
    let mut high: HashMap<i32, u128> = HashMap::new();
    let mut seen: HashSet<(i32, u128)> = HashSet::new();
    let mut repeats = 0;
    for r in &by_position {
        let value = sequence_value(r);
        match high.get(&r.partition) {
            Some(h) if value <= *h => {
                assert!(
                    seen.contains(&(r.partition, value)),
                    "partition {}: key {value:032x} at offset {} is below {h:032x} and was never sent before: a watermark would drop it",
                    r.partition,
                    r.offset
                );
                repeats += 1;
            }
            _ => {
                high.insert(r.partition, value);
            }
        }
        seen.insert((r.partition, value));
    }
    repeats
}

/// Multi-row inserts get distinct keys in row order under one commit LSN; rolled-back
/// transactions are never published; all three outbox modes (kept rows, delete-after-insert,
/// pg_logical_emit_message) go through the same relay; a malformed row is kept dead with its
/// reason, and kept rows are marked SENT.
#[tokio::test(flavor = "multi_thread")]
async fn wal_relay_keys_modes_rollbacks_and_dead_rows() {
    let brokers = brokers();
    let (url, mut client) = prepared_database().await;
    // The publication streams inserts only, and only the columns the relay reads (PostgreSQL
    // 15+): the sweeper's SENT updates and the lease columns never reach the walsender's output.
    let publication = client
        .query_one(
            "SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, t.attnames::text[]
             FROM pg_publication p JOIN pg_publication_tables t USING (pubname)
             WHERE p.pubname = 'exactly_outbox'",
            &[],
        )
        .await
        .expect("publication");
    assert_eq!(
        (
            publication.get::<_, bool>(0),
            publication.get::<_, bool>(1),
            publication.get::<_, bool>(2),
            publication.get::<_, bool>(3)
        ),
        (true, false, false, false),
        "inserts only"
    );
    assert_eq!(
        publication.get::<_, Vec<String>>(4),
        [
            "id",
            "event_id",
            "event_type",
            "aggregate_type",
            "aggregate_id",
            "topic",
            "payload",
            "headers",
            "occurred_at",
            "created_at"
        ],
        "the relayed columns only"
    );
    let topic = unique("wal-basic");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");

    let a: Vec<_> = (0..3).map(|i| event("A-1", i, b"")).collect();
    let tx = client.transaction().await.expect("begin");
    // One statement, three rows: they share a commit LSN (and their event LSNs say nothing).
    tx.execute(
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
         SELECT e::uuid, 'Tested', 'thing', 'A-1', $2, convert_to('{\"n\":' || ord || '}', 'UTF8'), now()
         FROM unnest($1::text[]) WITH ORDINALITY AS t(e, ord)",
        &[&ids(&a), &topic],
    )
    .await
    .expect("multi-row insert");
    tx.commit().await.expect("commit");

    let rolled_back = event("A-1", 99, b"");
    let tx = client.transaction().await.expect("begin");
    exactly_postgres::enqueue(&tx, &topic, &rolled_back)
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");

    let deleted = event("A-2", 0, b"");
    let tx = client.transaction().await.expect("begin");
    exactly_postgres::enqueue_deleted(&tx, &topic, &deleted)
        .await
        .expect("enqueue+delete");
    tx.commit().await.expect("commit");

    // A binary payload (not UTF-8): the table-less path carries it as base64 inside the message.
    let message = event("A-3", 0, &[0, 0xff, 0xfe, b'{', 0x80]);
    let tx = client.transaction().await.expect("begin");
    exactly_postgres::emit_event(&tx, &topic, &message)
        .await
        .expect("emit");
    tx.commit().await.expect("commit");

    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
         VALUES ('01900000-0000-7000-8000-0000000000aa', 'Tested', 'thing', NULL, $1, '\\x7b7d')",
        &[&topic],
    )
    .await
    .expect("malformed row");
    tx.execute(
        "SELECT pg_logical_emit_message(true, 'exactly', 'this is not json')",
        &[],
    )
    .await
    .expect("malformed message");
    tx.commit().await.expect("commit");
    let after = event("A-1", 3, b"");
    exactly_postgres::enqueue(&client, &topic, &after)
        .await
        .expect("enqueue");

    let mut relay = spawn_wal_relay(&url, &brokers, &[]);
    let records = wait_for_records(&brokers, &topic, 1, 6).await;
    let got: Vec<String> = records
        .iter()
        .map(|r| r.headers["exactly-event-id"].clone())
        .collect();
    let expected: Vec<String> = ids(&[&a[..], &[deleted, message.clone(), after]].concat());
    assert_eq!(got, expected, "commit order, rolled-back event absent");
    assert_eq!(
        records[4].payload, message.payload,
        "the emitted binary payload, byte for byte"
    );
    let values: Vec<u128> = records.iter().map(sequence_value).collect();
    let commit = values[0] >> 64;
    assert_eq!(
        values[..3],
        [commit << 64, (commit << 64) | 1, (commit << 64) | 2],
        "one commit LSN, ordinals 0, 1, 2"
    );
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:x?}");
    let source = &records[0].headers["exactly-source"];
    assert!(source.starts_with("pg:") && source.contains("@"), "{source}");

    let (dead, kept_dead, kept_sent) = {
        let mut result = (0, 0, 0);
        for _ in 0..50 {
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM exactly_relay_dead),
                            (SELECT count(*) FROM outbox WHERE status = 'DEAD' AND last_error LIKE '%aggregate_id%'),
                            (SELECT count(*) FROM outbox WHERE status = 'SENT')",
                    &[],
                )
                .await
                .expect("counts");
            result = (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2));
            if result == (2, 1, 4) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        result
    };
    assert_eq!(
        (dead, kept_dead, kept_sent),
        (2, 1, 4),
        "two dead events recorded, the malformed kept row DEAD, four kept rows SENT"
    );
    let reasons: Vec<String> = client
        .query("SELECT reason FROM exactly_relay_dead ORDER BY key_text", &[])
        .await
        .expect("reasons")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(reasons[0].contains("aggregate_id is NULL"), "{reasons:?}");
    assert!(reasons[1].contains("not valid"), "{reasons:?}");

    // `exactly dead`: both listed; the row, fixed in place, is sent again after everything
    // published so far; the message, which has no row, is left and then discarded.
    let dead = crate::support::exactly_json(&["dead", "--database", &url, "list", "--json"]);
    let dead = dead.as_array().expect("a list");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|d| d["kind"] == "wal"), "{dead:?}");
    client
        .execute(
            "UPDATE outbox SET aggregate_id = 'A-9' WHERE event_id = '01900000-0000-7000-8000-0000000000aa'",
            &[],
        )
        .await
        .expect("fix the row");
    let requeued = crate::support::exactly_json(&["dead", "--database", &url, "requeue", "--yes", "--json"]);
    assert_eq!(requeued, serde_json::json!({ "requeued": 1, "left": 1 }));
    let records = wait_for_records(&brokers, &topic, 1, 7).await;
    assert_eq!(records.len(), 7, "the requeued event went out once");
    assert_eq!(
        records[6].headers["exactly-event-id"],
        "01900000-0000-7000-8000-0000000000aa"
    );
    assert_eq!(records[6].headers["exactly-aggregate-id"], "A-9");
    assert!(
        sequence_value(&records[6]) > sequence_value(&records[5]),
        "a requeued event gets a later key"
    );
    let discarded = crate::support::exactly_json(&["dead", "--database", &url, "discard", "--json"]);
    assert_eq!(discarded["discarded"], 1);
    assert_eq!(
        crate::support::exactly_json(&["dead", "--database", &url, "list", "--json"]),
        serde_json::json!([])
    );
    kill9(&mut relay);
    drop_slot(&url).await;
}

/// The relay SIGKILLed at 20 random moments while 4 writers commit 50,000 events: the topic
/// only ever repeats (never skips or reorders) per partition, and a watermark consumer applies
/// every event exactly once, each aggregate's events in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn wal_relay_killed_20_times_during_50k_events_loses_nothing() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 12_500;
    let brokers = brokers();
    let (url, _client) = prepared_database().await;
    let topic = unique("wal-kills");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .expect("topic");

    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, topic, progress) = (url.clone(), topic.clone(), progress.clone());
        writers.push(tokio::spawn(async move {
            let mut client = exactly_postgres::connect(&url).await.expect("connect");
            let mut committed = Vec::new();
            let mut i = 0;
            while i < PER_WRITER {
                // Transactions of 1 to 5 events; aggregates belong to one writer, so the
                // writer's order is the aggregate's commit order.
                let tx = client.transaction().await.expect("begin");
                let size = 1 + i % 5;
                let mut batch = Vec::new();
                for _ in 0..size.min(PER_WRITER - i) {
                    let aggregate = format!("W{w}-{}", i % 11);
                    let e = event(&aggregate, i, format!("{{\"n\":{i}}}").as_bytes());
                    exactly_postgres::enqueue(&tx, &topic, &e).await.expect("enqueue");
                    batch.push(e);
                    i += 1;
                }
                tx.commit().await.expect("commit");
                progress.fetch_add(batch.len(), Ordering::Relaxed);
                committed.extend(batch);
                if i % 500 < 5 {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
            committed
        }));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut relay = spawn_wal_relay(&url, &brokers, &[]);
    let mut killed_at = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..900))).await;
        kill9(&mut relay);
        killed_at.push(progress.load(Ordering::Relaxed));
        relay = spawn_wal_relay(&url, &brokers, &[]);
    }
    let during = killed_at.iter().filter(|n| **n < WRITERS * PER_WRITER).count();
    eprintln!("kills at committed counts {killed_at:?}");
    assert!(
        during >= 15,
        "only {during} of 20 kills came while writers were committing"
    );
    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.expect("writer"));
    }
    let total = committed.len();
    assert_eq!(total, WRITERS * PER_WRITER);

    let records = wait_for_records(&brokers, &topic, 3, total).await;
    kill9(&mut relay);
    let repeats = assert_ordered_prefix_with_repeats(&records);
    let distinct: HashSet<&String> = records.iter().map(|r| &r.headers["exactly-event-id"]).collect();
    assert_eq!(distinct.len(), total, "every committed event is on the topic");
    eprintln!(
        "{} records for {total} events: {repeats} repeats after 20 kills",
        records.len()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let consumer_db = dir.path().join("consumer.db");
    let counters = consume_until(&consumer_db, &brokers, &unique("g"), &topic, total as u64).await;
    assert_eq!(counters.applied.load(Ordering::Relaxed), total as u64);
    assert_eq!(counters.parked.load(Ordering::Relaxed), 0);
    assert_eq!(sorted(applied_event_ids(&consumer_db)), sorted(ids(&committed)));

    // Per aggregate, the apply order is the commit order.
    let position: HashMap<String, usize> = ids(&committed)
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let aggregate_of: HashMap<String, String> = committed
        .iter()
        .map(|e| (e.event_id.hyphenated().to_string(), e.aggregate_id.clone()))
        .collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for id in applied_event_ids(&consumer_db) {
        let aggregate = aggregate_of[&id].as_str();
        let at = position[&id];
        if let Some(before) = last.insert(aggregate, at) {
            assert!(before < at, "{aggregate}: applied out of commit order");
        }
    }
    let conn = rusqlite::Connection::open(&consumer_db).expect("open");
    let key_set: i64 = conn
        .query_row("SELECT COUNT(*) FROM exactly_processed", [], |r| r.get(0))
        .expect("n");
    assert_eq!(key_set, 0, "watermarks only: constant space");
    drop_slot(&url).await;
}

/// Only unrelated tables change: the heartbeat moves the slot, so the WAL it retains stays
/// bounded although far more is written.
#[tokio::test(flavor = "multi_thread")]
async fn idle_outbox_beside_busy_tables_keeps_retained_wal_bounded() {
    const BOUND: i64 = 16 * 1024 * 1024;
    let brokers = brokers();
    let (url, client) = prepared_database().await;
    client
        .batch_execute("CREATE TABLE busy (id BIGSERIAL PRIMARY KEY, filler TEXT NOT NULL)")
        .await
        .expect("busy table");
    let mut relay = spawn_wal_relay(&url, &brokers, &["--heartbeat-ms", "300"]);
    let start: i64 = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .expect("lsn")
        .get(0);
    for _ in 0..40 {
        client
            .execute(
                "INSERT INTO busy (filler) SELECT repeat('x', 900) FROM generate_series(1, 1500)",
                &[],
            )
            .await
            .expect("busy writes");
    }
    let written: i64 = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .expect("lsn")
        .get::<_, i64>(0)
        - start;
    // restart_lsn moves when decoding passes a running-transactions record: the background
    // writer logs one every 15 s on a busy server, a checkpoint logs one at once.
    client.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let slot = exactly_postgres::wal::default_slot_name(&url);
    let mut stats = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stats = slot_stats(&client, &slot).await.expect("stats");
        if stats.is_some_and(|s| s.retained_bytes < BOUND) {
            break;
        }
    }
    kill9(&mut relay);
    let stats = stats.expect("slot exists");
    assert!(written > 3 * BOUND, "the test wrote only {written} bytes of WAL");
    assert!(
        stats.retained_bytes < BOUND,
        "slot retains {} bytes after {written} bytes of unrelated WAL",
        stats.retained_bytes
    );
    assert!(stats.lag_bytes < BOUND, "{stats:?}");
    drop_slot(&url).await;
}

/// A source whose positions go backwards in a newer epoch (a restore, a failover to a lagging
/// replica) is parked with a reason instead of being discarded as repeats; an old-epoch repeat
/// is still a repeat.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_going_backwards_is_parked_not_dropped() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let brokers = brokers();
    let topic = unique("regressed");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let producer: FutureProducer = exactly_kafka::producer_config(&brokers, false)
        .create()
        .expect("producer");
    let source = "pg:7000000000000000001:exactly_orders";
    let sends = [
        (1u64, 100u128, "applied"),
        (1, 200, "applied"),
        (2, 150, "parked: timeline 2 forked below the watermark"),
        (2, 300, "applied: timeline 2 passed the watermark"),
        (1, 200, "a repeat from timeline 1"),
    ];
    let mut events = Vec::new();
    for (i, (epoch, value, _)) in sends.iter().enumerate() {
        let e = event("A-1", i, b"");
        let key = IdempotencyKey::Sequence {
            source: source.into(),
            value: *value,
        };
        let mut wire = e.to_headers(&key);
        wire.push((
            "exactly-source".to_owned(),
            exactly_core::source_header(source, *epoch).into_bytes(),
        ));
        let headers = exactly_kafka::record_headers(&wire);
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("A-1")
                    .payload(&e.payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
        events.push(e);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("consumer.db");
    let counters = consume_until(&db, &brokers, &unique("g"), &topic, 4).await;
    assert_eq!(counters.applied.load(Ordering::Relaxed), 3);
    assert_eq!(counters.parked.load(Ordering::Relaxed), 1);
    assert_eq!(counters.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(
        applied_event_ids(&db),
        ids(&[events[0].clone(), events[1].clone(), events[3].clone()])
    );
    let conn = rusqlite::Connection::open(&db).expect("open");
    let (reason, detail, offset): (String, String, i64) = conn
        .query_row("SELECT reason, detail, \"offset\" FROM exactly_parked", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("parked row");
    assert_eq!((reason.as_str(), offset), ("source_regressed", 2));
    assert!(detail.contains("went backwards"), "{detail}");
    let _ = UnixMillis(0);
}

/// A watermark consumer resumes at the offset stored with its watermark, whatever the group's
/// committed offset says: a lost commit does not replay, an early one does not skip.
#[tokio::test(flavor = "multi_thread")]
async fn watermark_consumer_resumes_at_its_stored_offset() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let brokers = brokers();
    let (url, client) = prepared_database().await;
    let topic = unique("resume");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let mut relay = spawn_wal_relay(&url, &brokers, &[]);
    let mut events = Vec::new();
    for i in 0..60 {
        let e = event(&format!("A-{}", i % 3), i, b"");
        exactly_postgres::enqueue(&client, &topic, &e)
            .await
            .expect("enqueue");
        events.push(e);
    }
    wait_for_records(&brokers, &topic, 1, 60).await;
    let group = unique("g");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("consumer.db");
    let first = consume_until(&db, &brokers, &group, &topic, 60).await;
    assert_eq!(first.applied.load(Ordering::Relaxed), 60);

    let set_group_offset = |offset: i64| {
        let c: BaseConsumer = exactly_kafka::consumer_config(&brokers, &group)
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&topic, 0, Offset::Offset(offset))
            .expect("tpl");
        c.commit(&list, CommitMode::Sync).expect("commit offset");
    };
    // A lost offset commit: the group says 0, the database says 60.
    set_group_offset(0);
    for i in 60..80 {
        let e = event(&format!("A-{}", i % 3), i, b"");
        exactly_postgres::enqueue(&client, &topic, &e)
            .await
            .expect("enqueue");
        events.push(e);
    }
    wait_for_records(&brokers, &topic, 1, 80).await;
    let second = consume_until(&db, &brokers, &group, &topic, 20).await;
    assert_eq!(second.applied.load(Ordering::Relaxed), 20);
    assert_eq!(
        second.duplicates.load(Ordering::Relaxed),
        0,
        "nothing replayed below the stored offset"
    );

    // An early commit: the group says the end, the database says 80; ten more were published.
    for i in 80..90 {
        let e = event(&format!("A-{}", i % 3), i, b"");
        exactly_postgres::enqueue(&client, &topic, &e)
            .await
            .expect("enqueue");
        events.push(e);
    }
    wait_for_records(&brokers, &topic, 1, 90).await;
    set_group_offset(90);
    let third = consume_until(&db, &brokers, &group, &topic, 10).await;
    assert_eq!(third.applied.load(Ordering::Relaxed), 10, "nothing skipped");
    assert_eq!(applied_event_ids(&db), ids(&events));
    kill9(&mut relay);
    drop_slot(&url).await;
}
