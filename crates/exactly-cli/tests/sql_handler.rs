//! `exactly consume --handler sql` on both stores: the user's statements run in the dedupe
//! transaction with the envelope as named parameters; a resend applies once; what the
//! statements refuse (a CHECK, `RAISE EXCEPTION`, a trigger's `RAISE(ABORT, …)`) parks the
//! event with the database's message; a replay after the fix applies it once; a file that
//! does not prepare stops the consumer before it reads.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exactly_core::{Envelope, IdempotencyKey, UnixMillis};
use exactly_testkit::{brokers, fresh_pg_database, unique};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::*;

const PG_SCHEMA: &str = "
CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INT NOT NULL CHECK (qty >= 0), updated_ms BIGINT NOT NULL);
CREATE TABLE ledger (event_id UUID PRIMARY KEY, event_type TEXT NOT NULL, topic TEXT NOT NULL,
    part INT NOT NULL, off BIGINT NOT NULL, payload JSONB NOT NULL, headers JSONB NOT NULL,
    at TIMESTAMPTZ NOT NULL, idem TEXT NOT NULL);
CREATE FUNCTION inventory_check(event_type TEXT) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF event_type NOT IN ('StockAdded', 'StockRemoved') THEN
        RAISE EXCEPTION 'unknown event type %', event_type;
    END IF;
END $$;";

/// The fix a replay follows: the function learns the new event type.
const PG_FIX: &str = "
CREATE OR REPLACE FUNCTION inventory_check(event_type TEXT) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF event_type NOT IN ('StockAdded', 'StockRemoved', 'StockCounted') THEN
        RAISE EXCEPTION 'unknown event type %', event_type;
    END IF;
END $$;";

const PG_HANDLER: &str = "
-- Refuse what the inventory does not know (RAISE EXCEPTION parks the event).
SELECT inventory_check(:event_type);
-- One row per SKU; the CHECK keeps it from going negative (a violation parks the event).
INSERT INTO stock (sku, qty, updated_ms) VALUES (:aggregate_id, 0, :occurred_at) ON CONFLICT (sku) DO NOTHING;
UPDATE stock SET qty = qty + (:payload_json::jsonb ->> 'delta')::int, updated_ms = :occurred_at
WHERE sku = :aggregate_id;
/* Every parameter, each in the type its column takes. */
INSERT INTO ledger (event_id, event_type, topic, part, off, payload, headers, at, idem)
VALUES (:event_id, :event_type, :topic, :partition, :offset, :payload, :headers, :occurred_at, :key);";

const SQLITE_SCHEMA: &str = "
CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL CHECK (qty >= 0), updated_ms INTEGER NOT NULL);
CREATE TABLE ledger (event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, topic TEXT NOT NULL,
    part INTEGER NOT NULL, off INTEGER NOT NULL, payload TEXT NOT NULL, headers TEXT NOT NULL,
    at INTEGER NOT NULL, idem TEXT NOT NULL);
CREATE TRIGGER ledger_types BEFORE INSERT ON ledger
WHEN NEW.event_type NOT IN ('StockAdded', 'StockRemoved')
BEGIN SELECT RAISE(ABORT, 'unknown event type'); END;";

const SQLITE_FIX: &str = "
DROP TRIGGER ledger_types;
CREATE TRIGGER ledger_types BEFORE INSERT ON ledger
WHEN NEW.event_type NOT IN ('StockAdded', 'StockRemoved', 'StockCounted')
BEGIN SELECT RAISE(ABORT, 'unknown event type'); END;";

const SQLITE_HANDLER: &str = "
INSERT INTO ledger (event_id, event_type, topic, part, off, payload, headers, at, idem)
VALUES (:event_id, :event_type, :topic, :partition, :offset, :payload, :headers, :occurred_at, :key);
INSERT INTO stock (sku, qty, updated_ms) VALUES (:aggregate_id, 0, :occurred_at) ON CONFLICT (sku) DO NOTHING;
UPDATE stock SET qty = qty + json_extract(:payload_json, '$.delta'), updated_ms = :occurred_at
WHERE sku = :aggregate_id;";

fn stock_event(sku: &str, event_type: &str, delta: i64, at: i64) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.to_owned(),
        aggregate_type: "sku".into(),
        aggregate_id: sku.to_owned(),
        occurred_at: UnixMillis(at),
        payload: format!("{{\"delta\": {delta}}}").into_bytes(),
        headers: vec![("trace".into(), format!("t-{at}").into_bytes())],
    }
}

async fn produce(brokers: &str, topic: &str, events: &[&Envelope]) {
    let producer: FutureProducer = exactly_kafka::producer_config(brokers, false)
        .create()
        .expect("producer");
    for e in events {
        let headers = e.to_headers(&IdempotencyKey::UuidV7(e.event_id));
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&e.aggregate_id)
                    .payload(&e.payload)
                    .headers(exactly_kafka::record_headers(&headers)),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
}

async fn sql_handler_applies_once_and_parks_refusals(db: Db, schema: &str, handler_sql: &str, fix: &str) {
    let brokers = brokers();
    let topic = unique("sqlh");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    db.execute(schema).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sql_file = dir.path().join("apply.sql");
    std::fs::write(&sql_file, handler_sql).expect("write sql");
    let sql_file = sql_file.display().to_string();
    let database = db.arg();

    // A file that does not prepare stops the consumer before it reads, naming the statement.
    let bad = dir.path().join("bad.sql");
    std::fs::write(&bad, "INSERT INTO no_such_table (x) VALUES (:event_id);").expect("write");
    let out = exactly(&[
        "consume",
        "--database",
        &database,
        "--brokers",
        &brokers,
        "--group",
        "bad",
        "--topic",
        &topic,
        "--handler",
        "sql",
        "--sql-file",
        &bad.display().to_string(),
        "--no-metrics",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("statement 1 does not prepare") && stderr.contains("no_such_table"),
        "{stderr}"
    );
    std::fs::write(&bad, "SELECT :nope;").expect("write");
    let out = exactly(&[
        "consume",
        "--database",
        &database,
        "--brokers",
        &brokers,
        "--group",
        "bad",
        "--topic",
        &topic,
        "--handler",
        "sql",
        "--sql-file",
        &bad.display().to_string(),
        "--no-metrics",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown parameter :nope"), "{stderr}");

    let base = 1_700_000_000_000;
    let events = [
        stock_event("SKU-1", "StockAdded", 5, base),
        stock_event("SKU-1", "StockAdded", 3, base + 1),
        stock_event("SKU-2", "StockAdded", 1, base + 2),
        stock_event("SKU-1", "StockRemoved", -2, base + 3),
        // Would take SKU-2 below zero: the CHECK refuses it.
        stock_event("SKU-2", "StockRemoved", -4, base + 4),
        // A type the database does not know yet.
        stock_event("SKU-3", "StockCounted", 10, base + 5),
    ];
    // Two resends (a relay's retry): each applies once.
    let sent: Vec<&Envelope> = vec![
        &events[0], &events[1], &events[1], &events[2], &events[3], &events[4], &events[5], &events[3],
    ];
    produce(&brokers, &topic, &sent).await;

    let group = unique("sqlg");
    let mut consume = Command::new(EXACTLY)
        .args(["consume", "--database", &database, "--brokers", &brokers])
        .args([
            "--group",
            &group,
            "--topic",
            &topic,
            "--handler",
            "sql",
            "--sql-file",
            &sql_file,
        ])
        .arg("--no-metrics")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start consumer");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = (
            db.try_count("SELECT COUNT(*) FROM ledger").await,
            db.try_count("SELECT COUNT(*) FROM exactly_parked").await,
        );
        if seen == (Ok(4), Ok(2)) {
            break;
        }
        if Instant::now() > deadline {
            let _ = consume.kill();
            let parked = exactly_json(&[
                "parked",
                "--database",
                &database,
                "--consumer",
                &group,
                "list",
                "--json",
            ]);
            panic!("not 4 applied and 2 parked within 60 s: {seen:?}; parked: {parked}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Time for the resend at the end to arrive, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status();
    assert!(consume.wait().expect("consumer exits").success());

    assert_eq!(
        db.count("SELECT CAST(qty AS BIGINT) FROM stock WHERE sku = 'SKU-1'")
            .await,
        6,
        "5 + 3 - 2, the resends once"
    );
    assert_eq!(
        db.count("SELECT CAST(qty AS BIGINT) FROM stock WHERE sku = 'SKU-2'")
            .await,
        1,
        "the refused removal left it"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM stock WHERE sku = 'SKU-3'").await,
        0
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM ledger").await, 4);
    // Each parameter arrived as what it is.
    let e = &events[3];
    let ledger_row = format!(
        "SELECT COUNT(*) FROM ledger WHERE event_id = '{}' AND event_type = 'StockRemoved' AND topic = '{topic}' \
         AND part = 0 AND off = 4 AND idem = '{}' AND updated_ms_matches",
        e.event_id.hyphenated(),
        IdempotencyKey::UuidV7(e.event_id)
    );
    let check = match &db {
        Db::Pg(_) => ledger_row.replace(
            "updated_ms_matches",
            &format!(
                "payload = '{{\"delta\": -2}}'::jsonb AND headers = '{{\"trace\": \"t-{}\"}}'::jsonb \
                 AND at = to_timestamp({} / 1000.0)",
                e.occurred_at.0, e.occurred_at.0
            ),
        ),
        Db::Sqlite(_) => ledger_row.replace(
            "updated_ms_matches",
            &format!(
                "payload = '{{\"delta\": -2}}' AND json_extract(headers, '$.trace') = 't-{}' AND at = {}",
                e.occurred_at.0, e.occurred_at.0
            ),
        ),
    };
    assert_eq!(db.count(&check).await, 1, "{check}");
    assert_eq!(
        db.count("SELECT updated_ms FROM stock WHERE sku = 'SKU-1'").await,
        e.occurred_at.0
    );

    let parked = exactly_json(&[
        "parked",
        "--database",
        &database,
        "--consumer",
        &group,
        "list",
        "--json",
    ]);
    let parked = parked.as_array().expect("a list");
    assert_eq!(parked.len(), 2, "{parked:?}");
    let reasons: Vec<(&str, &str)> = parked
        .iter()
        .map(|p| {
            (
                p["reason"].as_str().unwrap_or(""),
                p["detail"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        reasons.iter().all(|(reason, _)| *reason == "rejected"),
        "refusals park at once: {reasons:?}"
    );
    assert!(
        reasons[0].1.contains("check") || reasons[0].1.contains("CHECK"),
        "{reasons:?}"
    );
    assert!(reasons[1].1.contains("unknown event type"), "{reasons:?}");

    // After the fix the refused type replays, once; the CHECK refusal still fails.
    db.execute(fix).await;
    let replayed = exactly_json(&[
        "parked",
        "--database",
        &database,
        "--consumer",
        &group,
        "replay",
        "--yes",
        "--handler",
        "sql",
        "--sql-file",
        &sql_file,
        "--json",
    ]);
    let outcomes: Vec<&str> = replayed
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, ["failed", "applied"], "{replayed}");
    assert_eq!(
        db.count("SELECT CAST(qty AS BIGINT) FROM stock WHERE sku = 'SKU-3'")
            .await,
        10
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM ledger").await, 5);
    assert_eq!(db.count("SELECT COUNT(*) FROM exactly_parked").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_handler_applies_once_and_parks_refusals_on_postgres() {
    let url = fresh_pg_database().await;
    sql_handler_applies_once_and_parks_refusals(Db::Pg(url), PG_SCHEMA, PG_HANDLER, PG_FIX).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_handler_applies_once_and_parks_refusals_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::Sqlite(dir.path().join("effects.db"));
    sql_handler_applies_once_and_parks_refusals(db, SQLITE_SCHEMA, SQLITE_HANDLER, SQLITE_FIX).await;
}
