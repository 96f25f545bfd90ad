//! Payload columns a team may keep instead of `bytea`: `jsonb` and `text`, relayed as their
//! text's bytes by the polling relay and by the WAL relay (whose pgoutput form of jsonb carries
//! a version byte that must not reach the topic).

use exactly_testkit::{brokers, fresh_pg_database, read_topic, unique};

use crate::support::*;
use crate::wal::{spawn_wal_relay, wait_for_records};

async fn relayed_payloads(column_type: &str, mode: &str) {
    let brokers = brokers();
    let url = fresh_pg_database().await;
    let out = exactly(&["migrate", "--database", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute(&format!(
            "ALTER TABLE outbox ALTER COLUMN payload TYPE {column_type} USING convert_from(payload, 'UTF8')::{column_type}"
        ))
        .await
        .expect("alter payload");
    if mode == "wal" {
        exactly_postgres::wal::ensure_slot(&exactly_postgres::WalConfig::new(&url))
            .await
            .expect("slot");
    }
    let topic = unique("payload");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    // Written in plain SQL with a JSON payload; jsonb normalises the text, so the test
    // compares parsed JSON and, for text, the exact bytes.
    for n in 0..5 {
        client
            .batch_execute(&format!(
                "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers)
                 VALUES (exactly_uuidv7(), 'Tested', 'thing', 'A-{n}', '{topic}', '{{\"n\": {n}, \"s\": \"é\"}}', '{{}}')"
            ))
            .await
            .expect("insert");
    }
    let records = if mode == "poll" {
        let out = relay(&url, &brokers, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        read_topic(&brokers, &topic, 1, "read_committed")
    } else {
        let _relay = spawn_wal_relay(&url, &brokers, &[]);
        wait_for_records(&brokers, &topic, 1, 5).await
    };
    assert_eq!(records.len(), 5, "{column_type} by {mode}");
    for (n, record) in records.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_slice(&record.payload)
            .unwrap_or_else(|e| panic!("{column_type} by {mode}: not JSON ({e}): {:?}", record.payload));
        assert_eq!(
            value,
            serde_json::json!({"n": n, "s": "é"}),
            "{column_type} by {mode}"
        );
        if column_type == "text" {
            assert_eq!(
                record.payload,
                format!("{{\"n\": {n}, \"s\": \"é\"}}").into_bytes()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jsonb_and_text_payload_columns_are_relayed_by_the_polling_relay() {
    relayed_payloads("jsonb", "poll").await;
    relayed_payloads("text", "poll").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jsonb_and_text_payload_columns_are_relayed_by_the_wal_relay() {
    relayed_payloads("jsonb", "wal").await;
    relayed_payloads("text", "wal").await;
}
