use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use exactly_core::header;
use exactly_testkit::{brokers, read_topic, unique};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::*;

/// `exactly consume` SIGKILLed after an effect committed and before its offset was committed:
/// the next consumer of the group gets the record again and the dedupe record suppresses it.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_killed_between_db_commit_and_offset_commit_redelivers_and_dedupes() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("consumer-crash");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let events = insert_sqlite(&service, &topic, 200);
    assert!(relay(service.to_str().expect("path"), &brokers, &[])
        .status
        .success());

    let consumer_db = dir.path().join("consumer.db");
    let group = unique("g");
    let killed = Command::new(EXACTLY)
        .args([
            "consume",
            "--database",
            consumer_db.to_str().expect("path"),
            "--brokers",
            &brokers,
            "--group",
            &group,
        ])
        .args([
            "--topic",
            &topic,
            "--handler",
            "record",
            "--no-metrics",
            "--kill-after-apply",
            "120",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run consumer");
    assert_eq!(killed.status.signal(), Some(9), "{killed:?}");
    let conn = rusqlite::Connection::open(&consumer_db).expect("open");
    let applied: i64 = conn
        .query_row("SELECT COUNT(*) FROM exactly_consumed", [], |r| r.get(0))
        .expect("count");
    // The 120th effect committed before the kill, with the rest of its batch.
    assert!(
        (120..=200).contains(&applied),
        "{applied} effects committed before the kill"
    );

    // Continue the same group in-process, on the same dedupe table (consumer name = group).
    let store = exactly_sqlite::SqliteEffects::open(&consumer_db, &group, |tx: &rusqlite::Transaction<'_>, d: &exactly_core::Delivery| {
        tx.execute(
            "INSERT INTO exactly_consumed (consumer, event_id, event_type, aggregate_id, occurred_at, payload)
             VALUES ('record', ?1, ?2, ?3, ?4, '')",
            rusqlite::params![d.envelope.event_id.hyphenated().to_string(), d.envelope.event_type, d.envelope.aggregate_id, d.envelope.occurred_at.0],
        )
        .map(|_| ())
        .map_err(|e| exactly_core::HandlerError::Retryable(e.to_string()))
    })
    .expect("effects");
    let counters = std::sync::Arc::new(exactly_kafka::ConsumerCounters::default());
    let consumer = exactly_kafka::IdempotentConsumer::new(
        store,
        exactly_kafka::ConsumerConfig::new(&brokers, &group, &[&topic]),
    )
    .expect("consumer")
    .with_counters(counters.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(async move { consumer.run(stop_rx).await });
    let watched = counters.clone();
    let done = exactly_testkit::eventually(std::time::Duration::from_secs(60), || {
        let c = watched.clone();
        async move {
            c.applied.load(Ordering::Relaxed) as i64 >= 200 - applied
                && c.duplicates.load(Ordering::Relaxed) >= 1
        }
    })
    .await;
    let _ = stop_tx.send(true);
    run.await.expect("join").expect("run");
    assert!(
        done,
        "second consumer did not apply the remaining {}: {counters:?}",
        200 - applied
    );
    assert_eq!(counters.applied.load(Ordering::Relaxed) as i64, 200 - applied);
    assert!(
        counters.duplicates.load(Ordering::Relaxed) >= 1,
        "the record whose offset was not committed comes again"
    );
    let mut stmt = conn
        .prepare("SELECT event_id FROM exactly_consumed")
        .expect("prepare");
    let consumed: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("q")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        sorted(consumed),
        sorted(ids(&events)),
        "every event applied exactly once"
    );
}

/// A poison payload and records from a foreign producer with a missing or garbled key are
/// parked with their reason and bytes; the records after them are still applied, in order.
#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_parked_and_the_partition_moves_on() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("poison");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let mut events = insert_sqlite(&service, &topic, 3);
    let mut conn = exactly_sqlite::open(&service).expect("open");
    let poison = event("A-0", 99, b"{this is not json");
    let tx = conn.transaction().expect("begin");
    exactly_sqlite::enqueue(&tx, &topic, &poison).expect("enqueue");
    tx.commit().expect("commit");
    assert!(relay(service.to_str().expect("path"), &brokers, &[])
        .status
        .success());

    let producer: FutureProducer = exactly_kafka::producer_config(&brokers, false)
        .create()
        .expect("producer");
    let garbled = event("A-0", 100, b"");
    let mut headers = garbled.to_headers(&exactly_core::IdempotencyKey::UuidV7(garbled.event_id));
    headers[0].1 = b"v7:not-a-uuid".to_vec();
    for headers in [headers, vec![]] {
        let owned = exactly_kafka::record_headers(&headers);
        producer
            .send(
                FutureRecord::to(&topic).key("A-0").payload("{}").headers(owned),
                std::time::Duration::from_secs(10),
            )
            .await
            .expect("foreign produce");
    }
    events.extend(insert_sqlite(&service, &topic, 3));
    assert!(relay(service.to_str().expect("path"), &brokers, &[])
        .status
        .success());
    assert_eq!(read_topic(&brokers, &topic, 1, "read_committed").len(), 9);

    let consumer_db = dir.path().join("consumer.db");
    let counters = consume_until(&consumer_db, &brokers, &unique("g"), &topic, 9).await;
    assert_eq!(counters.applied.load(Ordering::Relaxed), 6);
    assert_eq!(counters.parked.load(Ordering::Relaxed), 3);
    assert_eq!(
        applied_event_ids(&consumer_db),
        ids(&events),
        "the good events, in their order"
    );
    let conn = rusqlite::Connection::open(&consumer_db).expect("open");
    let mut stmt = conn
        .prepare("SELECT reason, detail, length(payload) FROM exactly_parked ORDER BY \"offset\"")
        .expect("prepare");
    let parked: Vec<(String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("q")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(parked.len(), 3);
    assert_eq!(parked[0].0, "rejected");
    assert!(parked[0].1.contains("not JSON"), "{:?}", parked[0]);
    assert_eq!(parked[0].2, poison.payload.len() as i64, "original bytes kept");
    assert_eq!(parked[1].0, "bad_headers");
    assert!(parked[1].1.contains(header::KEY), "{:?}", parked[1]);
    assert_eq!(parked[2].0, "bad_headers");
    assert!(parked[2].1.contains("missing"), "{:?}", parked[2]);
}

struct NoEffect;

impl exactly_postgres::PgHandler for NoEffect {
    fn handle<'a>(
        &'a self,
        _tx: &'a tokio_postgres::Transaction<'a>,
        _inbound: &'a exactly_core::Inbound<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), exactly_core::HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

fn parked(offset: i64, key_text: Option<&str>) -> exactly_core::ParkedMessage {
    exactly_core::ParkedMessage {
        topic: "t".into(),
        partition: 0,
        offset,
        reason: exactly_core::ParkReason::Rejected,
        detail: "bad".into(),
        key_text: key_text.map(str::to_owned),
        record_key: None,
        headers: vec![],
        payload: Some(b"{".to_vec()),
        parked_at: exactly_kafka::now(),
    }
}

/// A relay resend puts the same poison record at a new offset: one parked row per key. Records
/// without a readable key are told apart by position; the same position twice is one row.
#[tokio::test(flavor = "multi_thread")]
async fn a_resent_poison_record_is_parked_once_per_key_on_both_stores() {
    use exactly_core::EffectStore;
    let key = "v7:0190b2a4-8f11-7000-8000-000000000001";
    let messages = [
        parked(5, Some(key)),
        parked(9, Some(key)),
        parked(5, Some(key)),
        parked(6, None),
        parked(7, None),
        parked(7, None),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let noop = |_: &rusqlite::Transaction<'_>, _: &exactly_core::Delivery| Ok(());
    let sqlite = exactly_sqlite::SqliteEffects::open(&dir.path().join("c.db"), "c", noop).expect("open");
    let url = exactly_testkit::fresh_pg_database().await;
    let pg = exactly_postgres::PgEffects::connect(&url, "c", NoEffect)
        .await
        .expect("connect");
    for m in &messages {
        sqlite.park(m).await.expect("park on sqlite");
        pg.park(m).await.expect("park on postgres");
    }
    let conn = rusqlite::Connection::open(dir.path().join("c.db")).expect("open");
    let mut rows = conn
        .prepare("SELECT \"offset\", key_text FROM exactly_parked ORDER BY \"offset\"")
        .expect("prepare");
    let sqlite_rows: Vec<(i64, Option<String>)> = rows
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let expected = vec![(5, Some(key.to_owned())), (6, None), (7, None)];
    assert_eq!(sqlite_rows, expected);
    let client = exactly_postgres::connect(&url).await.expect("connect");
    let pg_rows: Vec<(i64, Option<String>)> = client
        .query(
            "SELECT \"offset\", key_text FROM exactly_parked ORDER BY \"offset\"",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(pg_rows, expected);
}

/// The test's PostgreSQL effect: one row per applied event (no unique key, so an event applied
/// twice shows as two rows).
struct InsertApplied;

impl exactly_postgres::PgHandler for InsertApplied {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a exactly_core::Inbound<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), exactly_core::HandlerError>> {
        Box::pin(async move {
            let d = inbound.delivery;
            tx.execute(
                "INSERT INTO applied (event_id) VALUES ($1)",
                &[&d.envelope.event_id.hyphenated().to_string()],
            )
            .await
            .map_err(|e| exactly_core::HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }
}

/// One in-process member of a group on a shared PostgreSQL effect store.
struct Member {
    counters: std::sync::Arc<exactly_kafka::ConsumerCounters>,
    stop: tokio::sync::watch::Sender<bool>,
    run: tokio::task::JoinHandle<Result<(), exactly_kafka::KafkaFlowError>>,
}

impl Member {
    async fn join(url: &str, brokers: &str, group: &str, topic: &str) -> Member {
        let store = exactly_postgres::PgEffects::connect(url, group, InsertApplied)
            .await
            .expect("effects");
        let counters = std::sync::Arc::new(exactly_kafka::ConsumerCounters::default());
        let consumer = exactly_kafka::IdempotentConsumer::new(
            store,
            exactly_kafka::ConsumerConfig::new(brokers, group, &[topic]),
        )
        .expect("consumer")
        .with_counters(counters.clone());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(async move { consumer.run(stop_rx).await });
        Member { counters, stop, run }
    }

    async fn leave(self) -> std::sync::Arc<exactly_kafka::ConsumerCounters> {
        let _ = self.stop.send(true);
        self.run.await.expect("join").expect("member ran");
        self.counters
    }
}

/// Two members of a group on one PostgreSQL effect store; a third joins mid-stream and leaves
/// again. At each revoke a member commits what it applied from the revoked partitions and
/// forgets them, so the next owner starts right after: every event is applied once, none lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_joining_and_leaving_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let brokers = brokers();
    let topic = unique("rebalance");
    let group = unique("g");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .expect("topic");
    let url = exactly_testkit::fresh_pg_database().await;
    exactly_postgres::connect(&url)
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL)")
        .await
        .expect("schema");
    let events: Vec<exactly_core::Envelope> = (0..3_000)
        .map(|i| event(&format!("A-{}", i % 30), i, b""))
        .collect();
    let producer_events = events.clone();
    let producer_brokers = brokers.clone();
    let producer_topic = topic.clone();
    // A steady stream for about 24 s, so the rebalances land while records flow.
    let producing = tokio::spawn(async move {
        let producer: FutureProducer = exactly_kafka::producer_config(&producer_brokers, false)
            .create()
            .expect("producer");
        for chunk in producer_events.chunks(50) {
            for e in chunk {
                let headers = exactly_kafka::record_headers(
                    &e.to_headers(&exactly_core::IdempotencyKey::UuidV7(e.event_id)),
                );
                producer
                    .send(
                        FutureRecord::to(&producer_topic)
                            .key(e.aggregate_id.as_bytes())
                            .payload(&e.payload)
                            .headers(headers),
                        std::time::Duration::from_secs(30),
                    )
                    .await
                    .expect("produce");
            }
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        }
    });
    let first = Member::join(&url, &brokers, &group, &topic).await;
    let second = Member::join(&url, &brokers, &group, &topic).await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let third = Member::join(&url, &brokers, &group, &topic).await;
    // It leaves once it has applied something from the partitions the rebalance gave it (on a
    // loaded machine the broker's rebalance takes longer than any fixed wait).
    let joined = exactly_testkit::eventually(std::time::Duration::from_secs(60), || async {
        third.counters.applied.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(
        joined,
        "the third member held no partition within 60 s of joining"
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let third = third.leave().await;
    producing.await.expect("producer");
    let client = exactly_postgres::connect(&url).await.expect("connect");
    let done = exactly_testkit::eventually(std::time::Duration::from_secs(90), || async {
        client
            .query_one("SELECT count(DISTINCT event_id) FROM applied", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= 3_000)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let first = first.leave().await;
    let second = second.leave().await;
    assert!(done, "not every event was applied within 90 s");
    let rows = client
        .query("SELECT event_id, count(*) FROM applied GROUP BY event_id", &[])
        .await
        .expect("applied");
    let twice: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, i64>(1) > 1)
        .map(|r| r.get(0))
        .collect();
    assert!(twice.is_empty(), "applied twice: {twice:?}");
    let mut applied: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    applied.sort();
    assert_eq!(applied, sorted(ids(&events)), "lost events");
    let third_applied = third.applied.load(Ordering::Relaxed);
    assert!(
        third_applied > 0,
        "the third member never held a partition: the test did not rebalance"
    );
    let duplicates: u64 = [&first, &second, &third]
        .iter()
        .map(|c| c.duplicates.load(Ordering::Relaxed))
        .sum();
    println!(
        "applied per member: {}, {}, {}; dedupe hits {duplicates}",
        first.applied.load(Ordering::Relaxed),
        second.applied.load(Ordering::Relaxed),
        third_applied
    );
    // Offsets committed at revoke: the next owner of a partition starts right after what was
    // applied, so nothing even reaches the dedupe check twice (before, up to a commit interval
    // of records per revoked partition was delivered again).
    assert_eq!(duplicates, 0, "records delivered again after a rebalance");
}

/// A handler for the batch test: records each event in `applied`, and fails once (retryably)
/// on the event it is told to.
struct FlakyOnce {
    fail_on: uuid::Uuid,
    failed: std::sync::atomic::AtomicBool,
}

impl exactly_postgres::PgHandler for FlakyOnce {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a exactly_core::Inbound<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), exactly_core::HandlerError>> {
        Box::pin(async move {
            let d = inbound.delivery;
            if d.envelope.event_id == self.fail_on && !self.failed.swap(true, Ordering::SeqCst) {
                return Err(exactly_core::HandlerError::Retryable(
                    "lock timeout (once)".into(),
                ));
            }
            tx.execute(
                "INSERT INTO applied (event_id) VALUES ($1)",
                &[&d.envelope.event_id.hyphenated().to_string()],
            )
            .await
            .map_err(|e| exactly_core::HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }
}

/// Batched application on PostgreSQL: one poll's records go into one transaction, the keys
/// recorded with one statement. A record sent twice in the same batch applies once; a handler
/// failure in the middle of a batch rolls the batch back and the records are applied one by
/// one, the failing one retried in its place: every event once, in the order produced, none
/// parked.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_a_repeat_and_a_failing_record_applies_each_once_in_order() {
    let brokers = brokers();
    let url = exactly_testkit::fresh_pg_database().await;
    let client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute("CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL)")
        .await
        .expect("schema");
    let topic = unique("batch");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let events: Vec<exactly_core::Envelope> =
        (0..300).map(|i| event(&format!("A-{}", i % 7), i, b"")).collect();
    // Record 150 is a resend of record 100; then every event in order.
    let mut sent: Vec<&exactly_core::Envelope> = events.iter().collect();
    sent.insert(150, &events[100]);
    let producer: FutureProducer = exactly_kafka::producer_config(&brokers, false)
        .create()
        .expect("producer");
    // Produced before the consumer starts, so its first polls hold large batches.
    for e in &sent {
        let headers = e.to_headers(&exactly_core::IdempotencyKey::UuidV7(e.event_id));
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&e.aggregate_id)
                    .payload(&e.payload)
                    .headers(exactly_kafka::record_headers(&headers)),
                std::time::Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
    let handler = FlakyOnce {
        fail_on: events[200].event_id,
        failed: std::sync::atomic::AtomicBool::new(false),
    };
    let group = unique("g");
    let store = exactly_postgres::PgEffects::connect(&url, &group, handler)
        .await
        .expect("effects");
    let counters = std::sync::Arc::new(exactly_kafka::ConsumerCounters::default());
    let consumer = exactly_kafka::IdempotentConsumer::new(
        store,
        exactly_kafka::ConsumerConfig::new(&brokers, &group, &[&topic]),
    )
    .expect("consumer")
    .with_counters(counters.clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(async move { consumer.run(stop_rx).await });
    let watched = counters.clone();
    let done = exactly_testkit::eventually(std::time::Duration::from_secs(60), || {
        let c = watched.clone();
        async move { c.applied.load(Ordering::Relaxed) + c.duplicates.load(Ordering::Relaxed) >= 301 }
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let _ = stop.send(true);
    run.await.expect("join").expect("consumer ran");
    assert!(done, "{counters:?}");
    assert_eq!(counters.applied.load(Ordering::Relaxed), 300, "{counters:?}");
    assert_eq!(counters.duplicates.load(Ordering::Relaxed), 1, "{counters:?}");
    assert_eq!(counters.parked.load(Ordering::Relaxed), 0, "{counters:?}");
    assert_eq!(
        pg_applied(&client).await,
        ids(&events),
        "each event once, in the order produced"
    );
}

/// Offsets that hold no record: each committed transaction leaves its commit marker in the
/// partition, a gap of one offset before the next transaction's records. The consumer reads
/// every gap twice (it cannot tell a marker from records a broker served past, the Tansu
/// shortfall in `exactly_core::offset_gap`), so it seeks back once per marker, finds the gap
/// still there, and steps over it: every record once, in order, nothing filled, no stall.
/// With `trust_offset_gaps` the same records are applied without a second read.
#[tokio::test(flavor = "multi_thread")]
async fn transaction_markers_are_read_twice_then_stepped_over() {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let brokers = brokers();
    let url = exactly_testkit::fresh_pg_database().await;
    let client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute("CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL)")
        .await
        .expect("schema");
    let topic = unique("markers");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    const TRANSACTIONS: usize = 8;
    const PER_TRANSACTION: usize = 25;
    let events: Vec<exactly_core::Envelope> = (0..TRANSACTIONS * PER_TRANSACTION)
        .map(|i| event(&format!("M-{}", i % 5), i, b""))
        .collect();
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        exactly_kafka::producer_config(&brokers, false)
            .set("transactional.id", unique("markers-tx"))
            .create()
            .expect("producer");
    let timeout = std::time::Duration::from_secs(30);
    producer.init_transactions(timeout).expect("init");
    for chunk in events.chunks(PER_TRANSACTION) {
        producer.begin_transaction().expect("begin");
        for e in chunk {
            let headers = e.to_headers(&exactly_core::IdempotencyKey::UuidV7(e.event_id));
            producer
                .send(
                    BaseRecord::to(&topic)
                        .key(&e.aggregate_id)
                        .payload(&e.payload)
                        .headers(exactly_kafka::record_headers(&headers)),
                )
                .map_err(|(e, _)| e)
                .expect("produce");
        }
        producer.commit_transaction(timeout).expect("commit");
    }
    let expected = (TRANSACTIONS * PER_TRANSACTION) as u64;
    let config = exactly_kafka::ConsumerConfig::new(&brokers, &unique("g"), &[&topic]);
    let counters = apply_all(&url, config, expected).await;
    assert_eq!(
        pg_applied(&client).await,
        ids(&events),
        "each event once, in the order produced"
    );
    // One marker between each two transactions is crossed (the last one's is at the end).
    assert_eq!(
        counters.offset_gap_refetches.load(Ordering::Relaxed),
        (TRANSACTIONS - 1) as u64,
        "one second read per marker crossed: {counters:?}"
    );
    assert_eq!(
        counters.offset_gaps_filled.load(Ordering::Relaxed),
        0,
        "{counters:?}"
    );
    assert_eq!(counters.parked.load(Ordering::Relaxed), 0, "{counters:?}");

    // With trust_offset_gaps (compacted topics on Kafka) the markers are stepped over at once.
    client.batch_execute("TRUNCATE applied").await.expect("truncate");
    let mut config = exactly_kafka::ConsumerConfig::new(&brokers, &unique("g-trusting"), &[&topic]);
    config.trust_offset_gaps = true;
    let trusting = apply_all(&url, config, expected).await;
    assert_eq!(
        trusting.offset_gap_refetches.load(Ordering::Relaxed),
        0,
        "{trusting:?}"
    );
    assert_eq!(
        pg_applied(&client).await,
        ids(&events),
        "each event once, in the order produced"
    );
}

/// Runs a consumer of `config` on `url` with [`RecordApplied`] until it applied `expected`
/// records (or 60 s), then stops it and returns its counters.
async fn apply_all(
    url: &str,
    config: exactly_kafka::ConsumerConfig,
    expected: u64,
) -> std::sync::Arc<exactly_kafka::ConsumerCounters> {
    let store = exactly_postgres::PgEffects::connect(url, &config.group_id, RecordApplied)
        .await
        .expect("effects");
    let counters = std::sync::Arc::new(exactly_kafka::ConsumerCounters::default());
    let consumer = exactly_kafka::IdempotentConsumer::new(store, config)
        .expect("consumer")
        .with_counters(counters.clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(async move { consumer.run(stop_rx).await });
    let watched = counters.clone();
    let done = exactly_testkit::eventually(std::time::Duration::from_secs(60), || {
        let c = watched.clone();
        async move { c.applied.load(Ordering::Relaxed) >= expected }
    })
    .await;
    let _ = stop.send(true);
    run.await.expect("join").expect("consumer ran");
    assert!(done, "not every record was applied: {counters:?}");
    counters
}

/// The event ids in `applied`, in the order they were applied.
async fn pg_applied(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT event_id FROM applied ORDER BY seq", &[])
        .await
        .expect("applied")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Records each event in `applied`.
struct RecordApplied;

impl exactly_postgres::PgHandler for RecordApplied {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a exactly_core::Inbound<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), exactly_core::HandlerError>> {
        Box::pin(async move {
            tx.execute(
                "INSERT INTO applied (event_id) VALUES ($1)",
                &[&inbound.delivery.envelope.event_id.hyphenated().to_string()],
            )
            .await
            .map_err(|e| exactly_core::HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }
}
