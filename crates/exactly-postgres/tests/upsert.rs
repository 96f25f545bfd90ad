//! The generalised UPSERT sink on PostgreSQL: one row per key, the later record or the larger
//! version winning, positions written with the rows (a batch read again changes nothing),
//! tombstones deleting, records that are not rows parked with their reason while the rest of
//! the batch applies, and a table it cannot key refused at open.

use std::collections::BTreeMap;

use exactly_core::upsert::Conflict;
use exactly_postgres::upsert::{Applied, SinkRecord, UpsertSink, UpsertSpec};
use exactly_testkit::fresh_pg_database;
use serde_json::json;

fn spec(table: &str, conflict: Conflict) -> UpsertSpec {
    UpsertSpec {
        table: table.into(),
        key_columns: vec!["key".into(), "window_start".into()],
        conflict,
        key_fields: vec![("window_start".into(), "start".into())],
    }
}

/// (offset, key, value).
type Raw = (i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// The records on partition 0 of `topic`.
fn records<'a>(topic: &'a str, rows: &'a [Raw]) -> Vec<SinkRecord<'a>> {
    rows.iter()
        .map(|(offset, key, value)| SinkRecord {
            topic,
            partition: 0,
            offset: *offset,
            key: key.as_deref(),
            value: value.as_deref(),
        })
        .collect()
}

fn row(key: &str, start: i64, count: serde_json::Value) -> Option<Vec<u8>> {
    Some(
        json!({"key": key, "window_start": start, "window_end": start + 10, "count": count})
            .to_string()
            .into_bytes(),
    )
}

async fn table(client: &tokio_postgres::Client, name: &str) -> BTreeMap<(String, i64), (i64, String)> {
    client
        .query(&format!("SELECT key, window_start, count, note FROM {name}"), &[])
        .await
        .expect("read the table")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn results_upsert_once_per_key_and_position_and_bad_records_are_parked() {
    let url = fresh_pg_database().await;
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE results (key TEXT NOT NULL, window_start BIGINT NOT NULL, window_end BIGINT,
                                   count BIGINT, note TEXT NOT NULL DEFAULT 'kept',
                                   UNIQUE (key, window_start))",
        )
        .await
        .expect("table");
    let sink = UpsertSink::open(&mut client, "results-sink", spec("results", Conflict::LastWins))
        .await
        .expect("open");

    let first = vec![
        (0, None, row("P-1", 0, json!(1))),
        (1, None, row("P-1", 0, json!(2))), // the same key in the batch: the later wins
        (2, None, row("P-2", 0, json!(5))),
        (3, None, Some(b"not json".to_vec())),
        (4, None, row("P-3", 0, json!("many"))), // the table refuses it: not a bigint
        (5, None, row("P-4", 10, json!(4))),
    ];
    let applied = sink
        .apply(&mut client, &records("out", &first))
        .await
        .expect("apply");
    assert_eq!(
        applied,
        Applied {
            upserted: 4,
            deleted: 0,
            parked: 2,
            replayed: 0
        }
    );
    let want = BTreeMap::from([
        (("P-1".to_owned(), 0), (2, "kept".to_owned())),
        (("P-2".to_owned(), 0), (5, "kept".to_owned())),
        (("P-4".to_owned(), 10), (4, "kept".to_owned())),
    ]);
    assert_eq!(
        table(&client, "results").await,
        want,
        "a column with a default is left to it"
    );
    let parked: Vec<(i64, String)> = client
        .query(
            "SELECT \"offset\", detail FROM exactly_parked WHERE consumer = 'results-sink' ORDER BY \"offset\"",
            &[],
        )
        .await
        .expect("parked")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert_eq!(parked[0].0, 3);
    assert!(parked[0].1.starts_with("the value is not JSON"), "{parked:?}");
    assert_eq!(parked[1].0, 4);
    assert!(parked[1].1.contains("22P02"), "the database's reason: {parked:?}");

    // The same batch again (a restart before the offset commit): nothing changes.
    let again = sink
        .apply(&mut client, &records("out", &first))
        .await
        .expect("apply again");
    assert_eq!(again.replayed, first.len());
    assert_eq!(table(&client, "results").await, want);

    // An overlapping batch: the applied part skipped, an update, a tombstone of a windowed key.
    let tombstone_key = Some(
        json!({"key": "P-2", "start": 0, "end": 10})
            .to_string()
            .into_bytes(),
    );
    let next = vec![
        (4, None, row("P-3", 0, json!(99))),
        (5, None, row("P-4", 10, json!(99))),
        (6, None, row("P-1", 0, json!(7))),
        (7, tombstone_key, None),
        (8, Some(b"{}".to_vec()), None), // a tombstone whose key names no key column: parked
        // A tombstone whose key the table cannot compare (text for a BIGINT): parked.
        (
            9,
            Some(json!({"key": "P-4", "start": "ten"}).to_string().into_bytes()),
            None,
        ),
    ];
    let applied = sink
        .apply(&mut client, &records("out", &next))
        .await
        .expect("apply");
    assert_eq!(
        applied,
        Applied {
            upserted: 1,
            deleted: 1,
            parked: 2,
            replayed: 2
        }
    );
    assert_eq!(
        table(&client, "results").await,
        BTreeMap::from([
            (("P-1".to_owned(), 0), (7, "kept".to_owned())),
            (("P-4".to_owned(), 10), (4, "kept".to_owned())),
        ])
    );
    let positions = sink.positions(&client).await.expect("positions");
    assert_eq!(positions.get(&("out".to_owned(), 0)), Some(&10));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_larger_version_wins_whatever_the_order() {
    let url = fresh_pg_database().await;
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE versions (key TEXT, window_start BIGINT, count BIGINT, note TEXT,
                                    PRIMARY KEY (key, window_start))",
        )
        .await
        .expect("table");
    let sink = UpsertSink::open(
        &mut client,
        "versions-sink",
        spec("versions", Conflict::LargerWins("count".into())),
    )
    .await
    .expect("open");
    let batch = vec![
        (0, None, row("A", 0, json!(5))),
        (1, None, row("A", 0, json!(3))), // older, later in the batch
        (2, None, row("B", 0, json!(1))),
    ];
    sink.apply(&mut client, &records("v", &batch))
        .await
        .expect("apply");
    let later = vec![(3, None, row("A", 0, json!(4))), (4, None, row("B", 0, json!(2)))];
    sink.apply(&mut client, &records("v", &later))
        .await
        .expect("apply");
    let got: BTreeMap<String, i64> = client
        .query("SELECT key, count FROM versions", &[])
        .await
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, BTreeMap::from([("A".to_owned(), 5), ("B".to_owned(), 2)]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_the_sink_cannot_key_is_refused_at_open_with_the_reason() {
    let url = fresh_pg_database().await;
    let mut client = exactly_postgres::connect(&url).await.expect("connect");
    client
        .batch_execute("CREATE TABLE unkeyed (key TEXT, window_start BIGINT, count BIGINT)")
        .await
        .expect("table");
    let refused = |e: exactly_postgres::PgError| e.to_string();
    let missing = UpsertSink::open(&mut client, "s", spec("absent", Conflict::LastWins))
        .await
        .map_err(refused)
        .expect_err("no table");
    assert!(missing.contains("does not exist"), "{missing}");
    let unkeyed = UpsertSink::open(&mut client, "s", spec("unkeyed", Conflict::LastWins))
        .await
        .map_err(refused)
        .expect_err("no unique");
    assert!(unkeyed.contains("UNIQUE"), "{unkeyed}");
    let no_column = UpsertSink::open(
        &mut client,
        "s",
        spec("unkeyed", Conflict::LargerWins("v".into())),
    )
    .await
    .map_err(refused)
    .expect_err("no version column");
    assert!(no_column.contains("no column \"v\""), "{no_column}");
    let injected = UpsertSink::open(
        &mut client,
        "s",
        spec("x; DROP TABLE unkeyed", Conflict::LastWins),
    )
    .await
    .map_err(refused)
    .expect_err("not an identifier");
    assert!(injected.contains("not a plain identifier"), "{injected}");
}
