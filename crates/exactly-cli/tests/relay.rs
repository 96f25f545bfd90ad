use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use exactly_testkit::{brokers, fresh_pg_database, read_topic, unique};

use crate::support::*;

/// A relay SIGKILLed after its first batch was acknowledged and before the batch was marked
/// SENT: the rows stay leased, are not claimed while the lease runs, are republished once it
/// expired, and the consumer applies every event exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn relay_killed_mid_batch_loses_nothing_and_expired_lease_republishes() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("killed-relay");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .expect("topic");
    let events = insert_sqlite(&service, &topic, 300);
    let db = service.to_str().expect("utf-8 path");

    let killed = relay(
        db,
        &brokers,
        &[
            "--batch-size",
            "100",
            "--lease-ms",
            "3000",
            "--kill-after-publish",
            "1",
        ],
    );
    assert_eq!(
        killed.status.signal(),
        Some(9),
        "relay should die by SIGKILL: {killed:?}"
    );
    assert_eq!(
        outbox_status_counts(&service),
        vec![("NEW".into(), 200), ("SENDING".into(), 100)]
    );

    // While the dead relay's lease runs its rows are not taken, and neither are later rows of the
    // same aggregates: they wait behind them, or they would overtake them on the topic.
    let second = relay(db, &brokers, &["--batch-size", "100", "--lease-ms", "3000"]);
    assert!(second.status.success(), "{second:?}");
    assert_eq!(
        outbox_status_counts(&service),
        vec![("NEW".into(), 200), ("SENDING".into(), 100)]
    );

    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let third = relay(db, &brokers, &["--batch-size", "100"]);
    assert!(third.status.success(), "{third:?}");
    assert_eq!(outbox_status_counts(&service), vec![("SENT".into(), 300)]);

    let records = read_topic(&brokers, &topic, 3, "read_committed");
    assert_eq!(records.len(), 400, "the first batch is on the topic twice");
    let distinct: HashSet<_> = records
        .iter()
        .map(|r| r.headers["exactly-event-id"].clone())
        .collect();
    assert_eq!(distinct.len(), 300);

    let consumer_db = dir.path().join("consumer.db");
    let counters = consume_until(&consumer_db, &brokers, &unique("g"), &topic, 300).await;
    assert_eq!(counters.applied.load(std::sync::atomic::Ordering::Relaxed), 300);
    assert_eq!(
        counters.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    assert_eq!(sorted(applied_event_ids(&consumer_db)), sorted(ids(&events)));
}

/// Two relay processes on one PostgreSQL outbox while four writers commit: every row is
/// published exactly once (SKIP LOCKED claims, serialized) and each aggregate's events reach
/// its partition in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn two_relays_at_once_publish_each_row_once_in_aggregate_order() {
    let brokers = brokers();
    let url = fresh_pg_database().await;
    let topic = unique("two-relays");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .expect("topic");
    let mut migrate = exactly_postgres::connect(&url).await.expect("connect");
    exactly_postgres::migrations::migrate(&mut migrate)
        .await
        .expect("migrate");

    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, topic) = (url.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut client = exactly_postgres::connect(&url).await.expect("connect");
            let mut written = Vec::new();
            for i in 0..250 {
                let tx = client.transaction().await.expect("begin");
                // More aggregates than a batch holds, so the per-aggregate rule leaves rows for the
                // other relay.
                let aggregate = format!("A-{}", (w * 250 + i) % 211);
                // Writers of one aggregate serialize, as a real service's row lock would make them.
                tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&aggregate])
                    .await
                    .expect("lock");
                let e = event(&aggregate, i, b"");
                exactly_postgres::enqueue(&tx, &topic, &e).await.expect("enqueue");
                tx.commit().await.expect("commit");
                written.push(e);
            }
            written
        }));
    }
    // Relays start once a backlog exists, so both have rows to claim from their first round
    // (started on an empty table, one relay alone could keep up with the writers).
    let seeded = exactly_testkit::eventually(Duration::from_secs(30), || async {
        migrate
            .query_one("SELECT COUNT(*) FROM outbox", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
            >= 300
    })
    .await;
    assert!(seeded, "writers did not commit 300 rows within 30 s");
    let relays: Vec<_> = (0..2)
        .map(|_| {
            Command::new(EXACTLY)
                .args([
                    "relay",
                    "--database",
                    &url,
                    "--brokers",
                    &brokers,
                    "--no-metrics",
                    "--batch-size",
                    "50",
                    "--poll-ms",
                    "50",
                ])
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn relay")
        })
        .collect();
    let mut events = Vec::new();
    for w in writers {
        events.extend(w.await.expect("writer"));
    }
    let client = exactly_postgres::connect(&url).await.expect("connect");
    let all_sent = exactly_testkit::eventually(Duration::from_secs(60), || async {
        client
            .query_one("SELECT COUNT(*) FROM outbox WHERE status = 'SENT'", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
            == 1000
    })
    .await;
    for mut r in relays {
        let _ = r.kill();
        let _ = r.wait();
    }
    assert!(all_sent, "relays did not send all 1000 rows within 60 s");
    let owners: i64 = client
        .query_one("SELECT COUNT(DISTINCT lease_owner) FROM outbox", &[])
        .await
        .expect("owners")
        .get(0);
    assert_eq!(owners, 2, "both relays should have claimed rows");

    let records = read_topic(&brokers, &topic, 3, "read_committed");
    assert_eq!(records.len(), 1000, "no row published twice in the normal path");
    // Commit order of each aggregate = outbox id order; the topic must keep it per partition.
    let id_of: HashMap<String, i64> = client
        .query("SELECT event_id::text, id FROM outbox", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut by_position = records.clone();
    by_position.sort_by_key(|r| (r.partition, r.offset));
    for r in &by_position {
        let id = id_of[&r.headers["exactly-event-id"]];
        let aggregate = r.headers["exactly-aggregate-id"].clone();
        if let Some(previous) = last.insert(aggregate.clone(), id) {
            assert!(
                previous < id,
                "aggregate {aggregate}: row {id} published after row {previous}"
            );
        }
    }
    assert_eq!(events.len(), 1000);
}

/// A business transaction that rolls back takes its outbox row with it: nothing is published.
#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_transaction_publishes_nothing_on_sqlite_and_postgres() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("rollback");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");

    let mut conn = exactly_sqlite::open(&service).expect("open");
    let rolled = event("A", 0, b"");
    let tx = conn.transaction().expect("begin");
    exactly_sqlite::enqueue(&tx, &topic, &rolled).expect("enqueue");
    tx.rollback().expect("rollback");
    let kept = event("A", 1, b"");
    let tx = conn.transaction().expect("begin");
    exactly_sqlite::enqueue(&tx, &topic, &kept).expect("enqueue");
    tx.commit().expect("commit");

    let url = fresh_pg_database().await;
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    exactly_postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    let pg_rolled = event("B", 0, b"");
    let tx = client.transaction().await.expect("begin");
    exactly_postgres::enqueue(&tx, &topic, &pg_rolled)
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    let pg_kept = event("B", 1, b"");
    let tx = client.transaction().await.expect("begin");
    exactly_postgres::enqueue(&tx, &topic, &pg_kept)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    assert!(relay(service.to_str().expect("path"), &brokers, &[])
        .status
        .success());
    assert!(relay(&url, &brokers, &[]).status.success());
    let published: HashSet<String> = read_topic(&brokers, &topic, 1, "read_committed")
        .into_iter()
        .map(|r| r.headers["exactly-event-id"].clone())
        .collect();
    assert_eq!(
        published,
        HashSet::from([ids(&[kept])[0].clone(), ids(&[pg_kept])[0].clone()])
    );
}

/// Rows a relay can never publish are DEAD with the reason, and the rows around them go out.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_outbox_rows_are_dead_with_a_reason() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("malformed");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    insert_sqlite(&service, &topic, 2);
    let conn = exactly_sqlite::open(&service).expect("open");
    conn.execute_batch(&format!(
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
           VALUES ('{}', 'T', 'thing', NULL, '{topic}', CAST('{{}}' AS BLOB));
         INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers)
           VALUES ('{}', 'T', 'thing', 'A', '{topic}', CAST('{{}}' AS BLOB), '{{not json');
         INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
           VALUES ('{}', 'T', 'thing', 'A', '{topic}', zeroblob(2000000));",
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7()
    ))
    .expect("insert malformed rows");
    insert_sqlite(&service, &topic, 2);
    assert!(relay(service.to_str().expect("path"), &brokers, &[])
        .status
        .success());
    let rows = outbox_statuses_and_errors(&conn);
    let statuses: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["SENT", "SENT", "DEAD", "DEAD", "DEAD", "SENT", "SENT"]);
    assert!(rows[2].1.contains("aggregate_id is NULL"), "{}", rows[2].1);
    assert!(rows[3].1.contains("headers column"), "{}", rows[3].1);
    assert!(rows[4].1.contains("above the maximum"), "{}", rows[4].1);
    assert_eq!(read_topic(&brokers, &topic, 1, "read_committed").len(), 4);
}

/// The producer refuses one record (as a full queue or a record too large for the client
/// would): the later records of that aggregate in the batch are held back and go out only after
/// the refused one, while other aggregates go on; the topic holds each aggregate in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_send_holds_the_aggregates_later_records_and_keeps_order() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("refused");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let mut conn = exactly_sqlite::open(&service).expect("open");
    let mut committed = Vec::new();
    for i in 0..4 {
        for aggregate in ["A", "B"] {
            let tx = conn.transaction().expect("begin");
            let e = event(aggregate, i, b"");
            exactly_sqlite::enqueue(&tx, &topic, &e).expect("enqueue");
            tx.commit().expect("commit");
            committed.push(e);
        }
    }
    let mut config = exactly_kafka::RelayConfig::new(&brokers);
    config.retry.base_ms = 200;
    let sends = std::sync::atomic::AtomicU64::new(0);
    // The third send is A1's.
    let faults = exactly_kafka::Faults::new(move |point| {
        point == exactly_kafka::FaultPoint::RelaySendRefused
            && sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2
    });
    let store = exactly_sqlite::SqliteOutbox::open(&service).expect("outbox");
    let mut relay = exactly_kafka::Relay::new(store, config)
        .expect("relay")
        .with_faults(faults);
    let first = relay.run_once().await.expect("first round");
    assert_eq!(first.claimed, 8);
    assert_eq!(first.sent, 5, "A0 and B0..B3");
    assert_eq!(first.retrying, 3, "A1 refused, A2 and A3 held");
    let mut rounds = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let report = relay.run_once().await.expect("round");
        rounds += 1;
        if outbox_status_counts(&service) == vec![("SENT".to_owned(), 8)] {
            break;
        }
        assert!(
            rounds < 40,
            "rows not all sent: {:?} {report:?}",
            outbox_status_counts(&service)
        );
    }
    relay.flush(Duration::from_secs(10));
    let mut per_aggregate: HashMap<String, Vec<String>> = HashMap::new();
    for r in read_topic(&brokers, &topic, 1, "read_committed") {
        per_aggregate
            .entry(String::from_utf8(r.key.expect("key")).expect("utf-8"))
            .or_default()
            .push(r.headers["exactly-event-id"].clone());
    }
    for aggregate in ["A", "B"] {
        let expected: Vec<String> = ids(&committed)
            .into_iter()
            .zip(&committed)
            .filter(|(_, e)| e.aggregate_id == aggregate)
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            per_aggregate[aggregate], expected,
            "aggregate {aggregate} out of commit order"
        );
    }
}

/// Rows whose columns cannot even be read as their types (a strict read failed the claim, and
/// the relay restarted into the same row forever) end DEAD with their reason, and the rows
/// around them go out. SQLite: a BLOB event_id, non-UTF-8 text, TEXT where Unix milliseconds
/// belong; a TEXT payload is published as its bytes. PostgreSQL: occurred_at = 'infinity'.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_outbox_rows_are_dead_and_do_not_stall_the_relay() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("unreadable");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    insert_sqlite(&service, &topic, 1);
    let conn = exactly_sqlite::open(&service).expect("open");
    let text_payload_id = uuid::Uuid::now_v7();
    conn.execute_batch(&format!(
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
           VALUES (X'0102030405', 'T', 'thing', 'A-0', '{topic}', CAST('{{}}' AS BLOB));
         INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
           VALUES ('{}', CAST(X'C328' AS TEXT), 'thing', 'A-0', '{topic}', CAST('{{}}' AS BLOB));
         INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
           VALUES ('{}', 'T', 'thing', 'A-0', '{topic}', CAST('{{}}' AS BLOB), 'yesterday');
         INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload)
           VALUES ('{text_payload_id}', 'T', 'thing', 'A-0', '{topic}', '{{\"text\":true}}');",
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    ))
    .expect("insert unreadable rows");
    insert_sqlite(&service, &topic, 1);
    let out = relay(service.to_str().expect("path"), &brokers, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = outbox_statuses_and_errors(&conn);
    let statuses: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        ["SENT", "DEAD", "DEAD", "DEAD", "SENT", "SENT"],
        "{rows:?}"
    );
    assert!(
        rows[1].1.contains("event_id holds a 5-byte BLOB"),
        "{}",
        rows[1].1
    );
    assert!(
        rows[2].1.contains("event_type is not valid UTF-8"),
        "{}",
        rows[2].1
    );
    assert!(rows[3].1.contains("occurred_at holds TEXT"), "{}", rows[3].1);
    let sqlite_records = read_topic(&brokers, &topic, 1, "read_committed");
    assert_eq!(sqlite_records.len(), 3);
    let text_payload = sqlite_records
        .iter()
        .find(|r| r.headers["exactly-event-id"] == text_payload_id.hyphenated().to_string())
        .expect("the TEXT payload row is published");
    assert_eq!(text_payload.payload, br#"{"text":true}"#);

    let url = fresh_pg_database().await;
    let pg_topic = unique("unreadable-pg");
    exactly_kafka::ensure_topics(&brokers, &[&pg_topic], 1)
        .await
        .expect("topic");
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    exactly_postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    for (i, occurred_at) in ["now()", "'infinity'", "'-infinity'", "now()"].iter().enumerate() {
        client
            .execute(
                &format!(
                    "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
                     VALUES ($1::text::uuid, 'T', 'thing', 'B', $2, '{{}}', {occurred_at})"
                ),
                &[&uuid::Uuid::now_v7().hyphenated().to_string(), &pg_topic],
            )
            .await
            .unwrap_or_else(|e| panic!("insert row {i}: {e}"));
    }
    let out = relay(&url, &brokers, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<(String, String)> = client
        .query(
            "SELECT status, COALESCE(last_error, '') FROM outbox ORDER BY id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let statuses: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["SENT", "DEAD", "DEAD", "SENT"], "{rows:?}");
    assert!(rows[1].1.contains("not a finite timestamp"), "{}", rows[1].1);
    assert_eq!(read_topic(&brokers, &pg_topic, 1, "read_committed").len(), 2);
}

/// Sequence keys: a leader relay SIGKILLed mid-batch, then restarted, resumes at the lowest
/// unsent sequence; per partition the keys only grow, so a consumer keeping one watermark per
/// source and partition applies every event exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sequence_keys_survive_a_killed_leader_with_watermark_dedupe() {
    let brokers = brokers();
    let url = fresh_pg_database().await;
    let topic = unique("sequence");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .expect("topic");
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    exactly_postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    let mut events = Vec::new();
    for i in 0..300 {
        let e = event(&format!("A-{}", i % 7), i, b"");
        exactly_postgres::enqueue(&client, &topic, &e)
            .await
            .expect("enqueue");
        events.push(e);
    }
    let flags = ["--keys", "sequence", "--batch-size", "100"];
    let killed = relay(
        &url,
        &brokers,
        &[&flags[..], &["--kill-after-publish", "2"]].concat(),
    );
    assert_eq!(killed.status.signal(), Some(9), "{killed:?}");
    let resumed = relay(&url, &brokers, &flags);
    assert!(resumed.status.success(), "{resumed:?}");
    let sent: i64 = client
        .query_one("SELECT COUNT(*) FROM outbox WHERE status = 'SENT'", &[])
        .await
        .expect("n")
        .get(0);
    assert_eq!(sent, 300);

    let records = read_topic(&brokers, &topic, 3, "read_committed");
    assert_eq!(
        records.len(),
        400,
        "the batch acknowledged before the kill went out twice"
    );
    let mut by_position = records.clone();
    by_position.sort_by_key(|r| (r.partition, r.offset));
    let mut high: HashMap<i32, String> = HashMap::new();
    let mut rewinds = 0;
    for r in &by_position {
        let key = r.headers["exactly-key"].clone();
        assert!(key.starts_with("seq:"), "{key}");
        if let Some(previous) = high.get(&r.partition) {
            // A resend repeats keys already seen (a rewind), never lands between them.
            if key <= *previous {
                rewinds += 1;
                continue;
            }
        }
        high.insert(r.partition, key);
    }
    assert_eq!(rewinds, 100);

    let dir = tempfile::tempdir().expect("tempdir");
    let consumer_db = dir.path().join("consumer.db");
    let counters = consume_until(&consumer_db, &brokers, &unique("g"), &topic, 300).await;
    assert_eq!(counters.applied.load(std::sync::atomic::Ordering::Relaxed), 300);
    assert_eq!(
        counters.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    assert_eq!(sorted(applied_event_ids(&consumer_db)), sorted(ids(&events)));
    let conn = rusqlite::Connection::open(&consumer_db).expect("open");
    let watermarks: i64 = conn
        .query_row("SELECT COUNT(*) FROM exactly_watermarks", [], |r| r.get(0))
        .expect("n");
    let keys: i64 = conn
        .query_row("SELECT COUNT(*) FROM exactly_processed", [], |r| r.get(0))
        .expect("n");
    let partitions = records.iter().map(|r| r.partition).collect::<HashSet<_>>().len() as i64;
    assert_eq!(
        (watermarks, keys),
        (partitions, 0),
        "one watermark per partition used, no key set"
    );
}

/// The relay's rounds overlap (the next batch is claimed while one is in flight, and may carry
/// later records of the aggregates in flight). Refused sends across batch boundaries hold their
/// aggregates' later records, in the batch in flight and in the next one, and a settle the
/// database fails leaves the claimed rows leased and holding their aggregates: on PostgreSQL,
/// 600 events of 4 aggregates in batches of 25, every record arrives (repeats only of records
/// whose settle failed) and each aggregate's records in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn overlapped_rounds_keep_aggregate_order_through_refused_sends() {
    let brokers = brokers();
    let url = fresh_pg_database().await;
    let topic = unique("overlap");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 2)
        .await
        .expect("topic");
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    exactly_postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    let mut committed = Vec::new();
    for i in 0..600 {
        let tx = client.transaction().await.expect("begin");
        let e = event(&format!("A-{}", i % 4), i, b"");
        exactly_postgres::enqueue(&tx, &topic, &e).await.expect("enqueue");
        tx.commit().await.expect("commit");
        committed.push(e);
    }
    let mut config = exactly_kafka::RelayConfig::new(&brokers);
    config.batch_size = 25;
    config.lease_ms = 2_000;
    config.retry.base_ms = 100;
    config.retry.max_retries = 50;
    let sends = std::sync::atomic::AtomicU64::new(0);
    let settles = std::sync::atomic::AtomicU64::new(0);
    // Refusals at the end of a batch (24), at the start of one (25, 26), and mid-batch later;
    // settles that fail as in a PostgreSQL restart, while the next batch is already claimed
    // (its rows stay leased, unsent, and must still go out before their aggregates' later rows).
    let faults = exactly_kafka::Faults::new(move |point| match point {
        exactly_kafka::FaultPoint::RelaySendRefused => {
            [24, 25, 26, 140, 141, 333].contains(&sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
        }
        exactly_kafka::FaultPoint::RelaySettleFails => {
            [3, 9].contains(&settles.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
        }
        _ => false,
    });
    let store = exactly_postgres::PgOutbox::connect(&url).await.expect("outbox");
    let counters = std::sync::Arc::new(exactly_kafka::RelayCounters::default());
    let mut relay = exactly_kafka::Relay::new(store, config)
        .expect("relay")
        .with_faults(faults)
        .with_counters(counters.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { relay.run(stop_rx).await });
    let all_sent = exactly_testkit::eventually(Duration::from_secs(60), || async {
        client
            .query_one("SELECT COUNT(*) FROM outbox WHERE status = 'SENT'", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
            == 600
    })
    .await;
    stop_tx.send(true).expect("stop");
    running.await.expect("join").expect("relay run");
    assert!(all_sent, "not all 600 rows SENT within 60 s");
    let records = read_topic(&brokers, &topic, 2, "read_committed");
    assert!(
        (600..=650).contains(&records.len()),
        "each record at least once, repeats only of the two batches whose settle failed: {}",
        records.len()
    );
    // Repeats removed (what a consumer's dedupe keeps), each aggregate in commit order.
    let mut per_aggregate: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut by_position = records;
    by_position.sort_by_key(|r| (r.partition, r.offset));
    for r in &by_position {
        if seen.insert(r.headers["exactly-event-id"].clone()) {
            per_aggregate
                .entry(r.headers["exactly-aggregate-id"].clone())
                .or_default()
                .push(r.headers["exactly-event-id"].clone());
        }
    }
    for aggregate in ["A-0", "A-1", "A-2", "A-3"] {
        let expected: Vec<String> = ids(&committed)
            .into_iter()
            .zip(&committed)
            .filter(|(_, e)| e.aggregate_id == aggregate)
            .map(|(id, _)| id)
            .collect();
        let got = &per_aggregate[aggregate];
        let first_difference = got.iter().zip(&expected).position(|(g, e)| g != e);
        assert!(
            got.len() == expected.len() && first_difference.is_none(),
            "aggregate {aggregate} out of commit order: {} of {} records, first difference at {first_difference:?}",
            got.len(),
            expected.len()
        );
    }
    assert!(
        counters.published.load(std::sync::atomic::Ordering::Relaxed) >= 600,
        "published counter"
    );
}

/// `exactly status` reads and creates nothing: a mistyped SQLite path is an error (no file
/// appears), a PostgreSQL database without exactly's tables is an error (no table appears), and
/// on real outboxes it counts rows by status.
#[tokio::test(flavor = "multi_thread")]
async fn status_reads_and_creates_nothing() {
    let status = |database: &str| {
        Command::new(EXACTLY)
            .args(["status", "--database", database])
            .stdin(Stdio::null())
            .output()
            .expect("run exactly status")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("mistyped.db");
    let out = status(missing.to_str().expect("utf-8 path"));
    assert!(!out.status.success(), "a missing file must fail: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!missing.exists(), "status created {}", missing.display());

    let service = dir.path().join("service.db");
    insert_sqlite(&service, "status-topic", 3);
    let out = status(service.to_str().expect("utf-8 path"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("NEW 3  SENDING 0  SENT 0  DEAD 0"), "{stdout}");

    let url = fresh_pg_database().await;
    let out = status(&url);
    assert!(!out.status.success(), "no tables must fail: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no exactly tables"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    let created: Option<String> = client
        .query_one("SELECT to_regclass('outbox')::text", &[])
        .await
        .expect("regclass")
        .get(0);
    assert_eq!(created, None, "status created the outbox table");
    exactly_postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    for i in 0..2 {
        exactly_postgres::enqueue(&client, "status-topic", &event("A", i, b""))
            .await
            .expect("enqueue");
    }
    let out = status(&url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("NEW 2  SENDING 0  SENT 0  DEAD 0"), "{stdout}");
}

/// A claim reads the pending rows, not every SENT row before them: behind 20,000 sent rows it
/// returns the first pending rows in id order, through the pending-rows index (before migration
/// 5 it walked the primary key over every sent row, on every claim, so a relay slowed down as
/// its outbox grew).
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_behind_many_sent_rows_reads_only_the_pending_ones() {
    use exactly_core::{ClaimRequest, Claimed, KeyMode, OutboxStore};
    let url = fresh_pg_database().await;
    let outbox = exactly_postgres::PgOutbox::connect(&url).await.expect("outbox");
    let client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at, status)
             SELECT gen_random_uuid(), 'T', 'thing', 'A-' || (g % 7), 'claim-topic', convert_to('{}', 'UTF8'), now(),
                    CASE WHEN g <= 20000 THEN 'SENT' ELSE 'NEW' END
             FROM generate_series(1, 20005) g;
             ANALYZE outbox;",
        )
        .await
        .expect("rows");
    let first_pending: i64 = client
        .query_one("SELECT min(id) FROM outbox WHERE status = 'NEW'", &[])
        .await
        .expect("min")
        .get(0);
    let claimed = outbox
        .claim(&ClaimRequest {
            owner: "claim-test".into(),
            max_rows: 3,
            now: exactly_kafka::now().plus_ms(1_000),
            lease_ms: 30_000,
            keys: KeyMode::EventId,
            max_payload_bytes: 1 << 20,
        })
        .await
        .expect("claim");
    let ids: Vec<i64> = claimed
        .iter()
        .map(|c| match c {
            Claimed::Ready(record) => record.id,
            Claimed::Malformed { id, defect, .. } => panic!("row {id} malformed: {defect:?}"),
        })
        .collect();
    assert_eq!(ids, (first_pending..first_pending + 3).collect::<Vec<_>>());
    // The claim's connection reports its index use when it goes idle.
    let mut scans = 0i64;
    for _ in 0..50 {
        scans = client
            .query_one(
                "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'outbox_pending'",
                &[],
            )
            .await
            .expect("index stats")
            .get(0);
        if scans > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(scans > 0, "the claim did not read the pending-rows index");
}

/// A long-running command says what it started and how far it got at the default level (the
/// database shown without its password), and nothing with --quiet.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_says_what_it_started_and_what_it_published_unless_quiet() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.db");
    let topic = unique("says");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    insert_sqlite(&service, &topic, 7);
    let database = service.display().to_string();
    // At the default level: EXACTLY_LOG unset.
    let relay = |extra: &[&str]| {
        Command::new(EXACTLY)
            .args([
                "relay",
                "--mode",
                "poll",
                "--database",
                &database,
                "--brokers",
                &brokers,
                "--no-metrics",
                "--exit-when-idle",
            ])
            .args(extra)
            .env_remove("EXACTLY_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("relay")
    };
    let out = relay(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "relay: polling relay from {database} to Kafka at {brokers}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("totals: published 7"), "{stderr}");

    insert_sqlite(&service, &topic, 2);
    let out = relay(&["--quiet"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "--quiet says nothing");
    assert_eq!(read_topic(&brokers, &topic, 1, "read_committed").len(), 9);
}
