//! A Debezium-shaped outbox table relayed unchanged, by the polling relay and by the WAL relay:
//! routed as the Outbox Event Router routes (`route.by.field`, `route.topic.regex`,
//! `route.topic.replacement`), keyed by `aggregateid`, with Debezium's `id` header and the
//! additional fields as headers beside exactly's; rows deleted in the inserting transaction
//! (Debezium's advice) go out too, rolled-back ones never; and a consumer deduplicating by the
//! `id` header (`--key-header id`) applies a topic written without exactly's headers once.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exactly_testkit::{brokers, fresh_pg_database, read_topic, unique, TopicRecord};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::*;
use crate::wal::{spawn_wal_relay, wait_for_records};

/// The table of Debezium's outbox documentation, with a tracing column.
const DEBEZIUM_SCHEMA: &str = r#"
CREATE TABLE outboxevent (
    id UUID PRIMARY KEY,
    aggregatetype VARCHAR(255) NOT NULL,
    aggregateid VARCHAR(255) NOT NULL,
    type VARCHAR(255) NOT NULL,
    "timestamp" TIMESTAMP NOT NULL,
    payload JSONB,
    tracingspancontext VARCHAR(256)
);"#;

/// Writers as a Debezium user has them: plain inserts, some deleted in the same transaction,
/// one rolled back. Returns the ids that committed, in commit order.
async fn write(client: &tokio_postgres::Client, n: usize) -> Vec<String> {
    let mut committed = Vec::new();
    for i in 0..n {
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let (aggregate_type, event_type) = if i.is_multiple_of(3) {
            ("Customer", "CustomerCreated")
        } else {
            ("Order", "OrderPlaced")
        };
        let insert = format!(
            "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, \"timestamp\", payload, tracingspancontext)
             VALUES ('{id}', '{aggregate_type}', '{aggregate_type}-{}', '{event_type}', '2026-01-02 03:04:05.{:03}',
                     '{{\"n\": {i}}}', 'span-{i}')",
            i % 4,
            i % 1000
        );
        let delete = format!("DELETE FROM outboxevent WHERE id = '{id}'");
        let sql = match i % 5 {
            // Debezium's advice: delete in the inserting transaction.
            0 => format!("BEGIN; {insert}; {delete}; COMMIT;"),
            4 => format!("BEGIN; {insert}; ROLLBACK;"),
            _ => format!("BEGIN; {insert}; COMMIT;"),
        };
        client.batch_execute(&sql).await.expect("write");
        if i % 5 != 4 {
            committed.push(id);
        }
    }
    committed
}

fn check_records(records: &[TopicRecord], committed: &[String], aggregate_type: &str) {
    let expected: Vec<&String> = committed
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let original = committed_index(*i, committed.len());
            original.is_multiple_of(3) == (aggregate_type == "Customer")
        })
        .map(|(_, id)| id)
        .collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        *seen.entry(r.headers["id"].clone()).or_default() += 1;
        assert_eq!(
            r.headers["exactly-event-id"], r.headers["id"],
            "the event id is Debezium's id"
        );
        assert_eq!(r.headers["exactly-aggregate-type"], aggregate_type);
        assert_eq!(
            r.key.as_deref().map(String::from_utf8_lossy).as_deref(),
            Some(r.headers["exactly-aggregate-id"].as_str()),
            "keyed by aggregateid"
        );
        assert!(
            r.headers["tracingspancontext"].starts_with("span-"),
            "{:?}",
            r.headers
        );
        assert_eq!(r.headers["eventType"], r.headers["exactly-event-type"]);
        let n: i64 = serde_json::from_slice::<serde_json::Value>(&r.payload).expect("json payload")["n"]
            .as_i64()
            .expect("n");
        assert_eq!(r.headers["tracingspancontext"], format!("span-{n}"));
        // The timestamp column (TIMESTAMP, read as UTC) is the event time.
        let at: i64 = r.headers["exactly-occurred-at"].parse().expect("millis");
        assert_eq!(at, 1_767_323_045_000 + n % 1000, "{:?}", r.headers);
    }
    let distinct: Vec<&String> = seen.keys().collect();
    let mut want: Vec<&String> = expected.clone();
    want.sort();
    assert_eq!(
        distinct, want,
        "every committed {aggregate_type} event, no rolled-back one"
    );
}

/// Which of the `n` writes the `i`-th committed one was (every 5th write rolled back).
fn committed_index(i: usize, _n: usize) -> usize {
    i / 4 * 5 + i % 4
}

async fn debezium_table_relayed(mode: &str) {
    let brokers = brokers();
    let url = fresh_pg_database().await;
    let client = exactly_postgres::connect(&url).await.expect("connect");
    client.batch_execute(DEBEZIUM_SCHEMA).await.expect("schema");
    let prefix = unique("dbz");
    let (orders, customers) = (
        format!("{prefix}.events.Order"),
        format!("{prefix}.events.Customer"),
    );
    exactly_kafka::ensure_topics(&brokers, &[&orders, &customers], 2)
        .await
        .expect("topics");
    let replacement = format!("{prefix}.events.${{aggregate}}");
    let debezium: Vec<&str> = vec![
        "--debezium-table",
        "public.outboxevent",
        "--debezium-timestamp-column",
        "timestamp",
        "--route-topic-regex",
        "(?<aggregate>.*)",
        "--route-topic-replacement",
        &replacement,
        "--additional-placement",
        "type:header:eventType,tracingspancontext:header",
    ];
    // A wrong column is refused with the setting that names it, before anything runs.
    let out = exactly(&[
        "migrate",
        "--database",
        &url,
        "--debezium-table",
        "outboxevent",
        "--debezium-payload-column",
        "body",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no column body (the payload_column setting)"),
        "{stderr}"
    );

    let mut migrate = vec!["migrate", "--database", &url];
    migrate.extend(&debezium);
    let out = exactly(&migrate);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if mode == "wal" {
        exactly_postgres::wal::ensure_slot(&exactly_postgres::WalConfig::new(&url))
            .await
            .expect("slot");
    }
    let committed = write(&client, 40).await;
    assert_eq!(committed.len(), 32);
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.expect(sql).get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT COUNT(*) FROM outboxevent").await,
        24,
        "the writers' deletes are theirs"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM outbox").await,
        32,
        "every committed insert mirrored"
    );

    let mut relay_args = vec!["--mode", mode];
    relay_args.extend(&debezium);
    let (order_records, customer_records) = if mode == "poll" {
        let out = relay(&url, &brokers, &relay_args[2..]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (
            read_topic(&brokers, &orders, 2, "read_committed"),
            read_topic(&brokers, &customers, 2, "read_committed"),
        )
    } else {
        let _relay = spawn_wal_relay(&url, &brokers, &relay_args[2..]);
        (
            wait_for_records(&brokers, &orders, 2, 21).await,
            wait_for_records(&brokers, &customers, 2, 11).await,
        )
    };
    check_records(&order_records, &committed, "Order");
    check_records(&customer_records, &committed, "Customer");
    assert_eq!(order_records.len() + customer_records.len(), 32, "each once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debezium_table_is_relayed_unchanged_by_the_polling_relay() {
    debezium_table_relayed("poll").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debezium_table_is_relayed_unchanged_by_the_wal_relay() {
    debezium_table_relayed("wal").await;
}

/// Records as Debezium's Outbox Event Router writes them (no exactly headers; the event id in
/// `id`), two of them resent: `--key-header id` applies each once.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_dedupes_a_debezium_topic_by_its_id_header() {
    let brokers = brokers();
    let topic = unique("dbzc");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let producer: FutureProducer = exactly_kafka::producer_config(&brokers, false)
        .create()
        .expect("producer");
    let ids: Vec<uuid::Uuid> = (0..10).map(|_| uuid::Uuid::new_v4()).collect();
    let mut sent: Vec<usize> = (0..10).collect();
    sent.extend([3, 7]);
    for i in sent {
        let id = ids[i].hyphenated().to_string();
        let payload = format!("{{\"n\": {i}}}");
        let key = format!("O-{i}");
        let headers = exactly_kafka::record_headers(&[("id".to_owned(), id.into_bytes())]);
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let database = db.display().to_string();
    let group = unique("dbzg");
    let mut consume = Command::new(EXACTLY)
        .args([
            "consume",
            "--database",
            &database,
            "--brokers",
            &brokers,
            "--group",
            &group,
        ])
        .args(["--topic", &topic, "--key-header", "id", "--no-metrics"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("consumer");
    let count = |sql: &str| -> Option<i64> {
        rusqlite::Connection::open(&db)
            .ok()?
            .query_row(sql, [], |r| r.get(0))
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count("SELECT COUNT(*) FROM exactly_consumed") != Some(10) {
        assert!(
            Instant::now() < deadline,
            "not 10 applied within 60 s: {:?}",
            count("SELECT COUNT(*) FROM exactly_consumed")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status();
    assert!(consume.wait().expect("exit").success());
    assert_eq!(
        count("SELECT COUNT(*) FROM exactly_consumed"),
        Some(10),
        "the resends applied once"
    );
    assert_eq!(
        count("SELECT COUNT(DISTINCT event_id) FROM exactly_consumed"),
        Some(10)
    );
    assert_eq!(count("SELECT COUNT(*) FROM exactly_parked"), Some(0));
    let keyed = format!(
        "SELECT COUNT(*) FROM exactly_consumed WHERE event_id = '{}' AND aggregate_id = 'O-3'",
        ids[3].hyphenated()
    );
    assert_eq!(
        count(&keyed),
        Some(1),
        "event id from the header, aggregate from the record key"
    );
}
