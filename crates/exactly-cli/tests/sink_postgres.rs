//! `exactly sink postgres`: a results topic into a table with one row per key, SIGKILLed and
//! restarted while it runs; the table ends as one run over the topic leaves it.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exactly_testkit::{brokers, fresh_pg_database, unique};
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::stream::StreamProcess as Job;
use crate::support::EXACTLY;

const PARTITIONS: i32 = 3;

/// What the topic holds, per partition in order: (key, value); a value `None` is a tombstone.
type Sent = Vec<(i32, String, Option<String>)>;

/// 6,000 results over 200 keys: each key's count rising in its partition, a tenth of the keys
/// deleted by a tombstone and some of them written again, and every 500th record not a row.
fn results(seed: u64) -> Sent {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut counts: BTreeMap<u32, i64> = BTreeMap::new();
    let mut sent = Vec::new();
    for i in 0..6_000u32 {
        let k = rng.random_range(0..200u32);
        let key = format!("K-{k}");
        let partition = (k % PARTITIONS as u32) as i32;
        let record_key = serde_json::json!({"key": key, "start": 0, "end": 60_000}).to_string();
        if i % 500 == 499 {
            sent.push((partition, record_key, Some("{\"key\": 1".to_owned())));
        } else if k % 10 == 0 && rng.random_range(0..8) == 0 {
            counts.remove(&k);
            sent.push((partition, record_key, None));
        } else {
            let count = counts.entry(k).or_default();
            *count += 1;
            let value =
                serde_json::json!({"key": key, "window_start": 0, "window_end": 60_000, "count": *count});
            sent.push((partition, record_key, Some(value.to_string())));
        }
    }
    sent
}

/// The table one run over `sent` leaves: the last value per key, deleted keys absent.
fn expected(sent: &Sent) -> BTreeMap<String, i64> {
    let mut table = BTreeMap::new();
    for (_, key, value) in sent {
        let key: serde_json::Value = serde_json::from_str(key).expect("json key");
        let key = key["key"].as_str().expect("key").to_owned();
        match value.as_deref().map(serde_json::from_str::<serde_json::Value>) {
            None => {
                table.remove(&key);
            }
            Some(Ok(v)) => {
                table.insert(key, v["count"].as_i64().expect("count"));
            }
            Some(Err(_)) => {}
        }
    }
    table
}

fn produce(topic: &str, sent: &Sent) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        exactly_kafka::producer_config(&brokers(), false)
            .create()
            .expect("producer");
    for (partition, key, value) in sent {
        let mut record = BaseRecord::<str, str>::to(topic)
            .partition(*partition)
            .key(key.as_str());
        if let Some(v) = value {
            record = record.payload(v.as_str());
        }
        while let Err((_, r)) = producer.send(record) {
            record = r;
            std::thread::sleep(Duration::from_millis(2));
        }
        // A steady trickle, so the kills land mid-topic.
        std::thread::sleep(Duration::from_micros(300));
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

fn spawn(url: &str, topic: &str, name: &str) -> Job {
    Job(Command::new(EXACTLY)
        .args([
            "sink",
            "postgres",
            "--no-metrics",
            "--dynamic-membership",
            "--brokers",
        ])
        .arg(brokers())
        .args(["--topic", topic, "--name", name, "--table", "results"])
        .args(["--key-column", "key", "--key-column", "window_start"])
        .args(["--key-field", "window_start=start"])
        .env("EXACTLY_DATABASE", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start exactly sink postgres"))
}

/// Records the sink has taken (applied, deleted or parked), from its positions.
async fn taken(client: &tokio_postgres::Client, name: &str) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::int8 FROM exactly_sink_positions WHERE sink = $1",
            &[&name],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_sink_killed_3_times_leaves_the_table_one_run_over_the_topic_gives() {
    let _one = crate::support::one_kill_test_at_a_time();
    let url = fresh_pg_database().await;
    let client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE results (key TEXT NOT NULL, window_start BIGINT NOT NULL, window_end BIGINT NOT NULL,
                                   count BIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                                   PRIMARY KEY (key, window_start))",
        )
        .await
        .expect("table");
    let (topic, name) = (unique("pg-sink-in"), unique("pg-sink"));
    exactly_kafka::ensure_topics(&brokers(), &[&topic], PARTITIONS)
        .await
        .expect("topic");
    let sent = results(41);
    let total = sent.len() as i64;
    let (t, s) = (topic.clone(), sent.clone());
    let producing = tokio::task::spawn_blocking(move || produce(&t, &s));
    let mut sink = spawn(&url, &topic, &name);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut at = 0;
    for kill in 0..3 {
        at += rng.random_range(300..1_500);
        let deadline = Instant::now() + Duration::from_secs(120);
        while taken(&client, &name).await < at {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: the sink took fewer than {at} records in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(sink);
        eprintln!("kill {kill}: after {} records", taken(&client, &name).await);
        sink = spawn(&url, &topic, &name);
    }
    producing.await.expect("producer");
    let deadline = Instant::now() + Duration::from_secs(120);
    while taken(&client, &name).await < total {
        assert!(
            Instant::now() < deadline,
            "the sink took {} of {total} records in 120 s",
            taken(&client, &name).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(sink);
    let table: BTreeMap<String, i64> = client
        .query("SELECT key, count FROM results", &[])
        .await
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        table,
        expected(&sent),
        "the last value per key, deleted keys absent"
    );
    let parked: i64 = client
        .query_one(
            "SELECT count(*) FROM exactly_parked WHERE consumer = $1",
            &[&name],
        )
        .await
        .expect("parked")
        .get(0);
    assert_eq!(parked, 12, "every record that is not a row, parked");
    assert_eq!(
        taken(&client, &name).await,
        total,
        "positions at each partition's end"
    );
}
