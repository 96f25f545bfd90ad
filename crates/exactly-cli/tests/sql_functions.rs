//! The Python example consumer (confluent-kafka + psycopg + `exactly_claim`), killed between
//! its database commit and its offset commit, applies each event once. The functions' own
//! rules are tested with exactly-postgres (`crates/exactly-postgres/tests/sql_functions.rs`).

use std::process::{Command, Stdio};

use exactly_testkit::{brokers, fresh_pg_database, python, unique};

use crate::support::*;

async fn migrated(url: &str) -> tokio_postgres::Client {
    let out = exactly(&["migrate", "--database", url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    exactly_postgres::connect(url).await.expect("connect")
}

/// A writer in plain SQL (`exactly_enqueue`), the polling relay, and the Python example
/// consumer killed twice between its database commit and its offset commit: every event is
/// applied once, and the kills caused repeats that the claim turned into no-ops.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_consumer_killed_between_its_commits_applies_each_event_once() {
    let python = python();
    let brokers = brokers();
    let url = fresh_pg_database().await;
    let client = migrated(&url).await;
    let topic = unique("py");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 2)
        .await
        .expect("topic");
    client
        .batch_execute(&format!(
            "SELECT exactly_enqueue('{topic}', 'OrderPlaced', 'order', 'O-' || (n % 9), jsonb_build_object('n', n))
             FROM generate_series(1, 200) AS n"
        ))
        .await
        .expect("write in SQL");
    let out = relay(&url, &brokers, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/python/exactly_consumer.py"
    );
    let group = unique("pyg");
    let run = |extra: &[&str]| {
        Command::new(&python)
            .arg(script)
            .args([
                "--brokers",
                &brokers,
                "--topic",
                &topic,
                "--group",
                &group,
                "--database",
                &url,
            ])
            .args(["--session-timeout-ms", "6000"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run the Python consumer")
    };
    for kill_after in ["40", "70"] {
        let out = run(&["--kill-after", kill_after]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "killed after its {kill_after}th commit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["--exit-when-idle", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let counts = client
        .query_one(
            "SELECT (SELECT COUNT(*) FROM py_applied), (SELECT COUNT(DISTINCT event_id) FROM py_applied),
                    (SELECT COUNT(*) FROM py_repeats), (SELECT COUNT(*) FROM py_parked),
                    (SELECT COUNT(*) FROM exactly_processed WHERE consumer = $1),
                    (SELECT COUNT(*) FROM outbox o JOIN py_applied a ON a.event_id = o.event_id::text)",
            &[&group],
        )
        .await
        .expect("counts");
    let counts: Vec<i64> = (0..6).map(|i| counts.get(i)).collect();
    assert_eq!(counts[0], 200, "every event applied: {counts:?}");
    assert_eq!(counts[1], 200, "each once: {counts:?}");
    assert!(
        counts[2] >= 2,
        "each kill left a committed message to redeliver: {counts:?}"
    );
    assert_eq!(counts[3], 0, "nothing parked: {counts:?}");
    assert_eq!(counts[4], 200, "one claim per event: {counts:?}");
    assert_eq!(
        counts[5], 200,
        "the applied events are the written ones: {counts:?}"
    );
}
