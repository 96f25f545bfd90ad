//! `exactly dead` and `exactly parked` on both stores: a bad row ends DEAD, is fixed and
//! requeued and goes out; a poison message is parked, replayed after the handler accepts it,
//! and applied once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exactly_testkit::{brokers, fresh_pg_database, read_topic, unique};

use crate::support::*;

fn typed_event(n: usize, event_type: &str) -> exactly_core::Envelope {
    let mut e = event(&format!("A-{n}"), n, b"");
    e.event_type = event_type.to_owned();
    e
}

async fn dead_then_parked(db: Db, consumer_db: Db) {
    let brokers = brokers();
    let topic = unique("operate");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 1)
        .await
        .expect("topic");
    let database = db.arg();
    for n in 0..3 {
        db.enqueue(&topic, &typed_event(n, "Tested")).await;
    }
    db.enqueue(&topic, &typed_event(3, "Poison")).await;
    let broken = db.enqueue(&topic, &typed_event(4, "Tested")).await;
    db.execute(&format!(
        "UPDATE outbox SET aggregate_id = NULL WHERE id = {broken}"
    ))
    .await;
    let out = relay(&database, &brokers, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_topic(&brokers, &topic, 1, "read_committed").len(), 4);

    // The bad row is listed with its reason, fixed in place, requeued, and goes out.
    let dead = exactly_json(&["dead", "--database", &database, "list", "--json"]);
    let dead = dead.as_array().expect("a list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], broken.to_string());
    assert_eq!(dead[0]["kind"], "outbox");
    assert!(
        dead[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("aggregate_id")),
        "{dead:?}"
    );
    let filtered = exactly_json(&[
        "dead",
        "--database",
        &database,
        "list",
        "--reason",
        "no such words",
        "--json",
    ]);
    assert_eq!(filtered, serde_json::json!([]));
    db.execute(&format!(
        "UPDATE outbox SET aggregate_id = 'A-4' WHERE id = {broken}"
    ))
    .await;
    let requeued = exactly_json(&[
        "dead",
        "--database",
        &database,
        "requeue",
        "--id",
        &broken.to_string(),
        "--json",
    ]);
    assert_eq!(requeued["requeued"], 1);
    assert_eq!(
        exactly_json(&["dead", "--database", &database, "list", "--json"]),
        serde_json::json!([])
    );
    let out = relay(&database, &brokers, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records = read_topic(&brokers, &topic, 1, "read_committed");
    assert_eq!(records.len(), 5, "the requeued row went out once");
    assert_eq!(records[4].headers["exactly-aggregate-id"], "A-4");

    // A bulk change needs --yes away from a terminal, and says how many rows first.
    for n in 5..7 {
        let id = db.enqueue(&topic, &typed_event(n, "Tested")).await;
        db.execute(&format!("UPDATE outbox SET topic = NULL WHERE id = {id}"))
            .await;
    }
    assert!(relay(&database, &brokers, &[]).status.success());
    let refused = exactly(&["dead", "--database", &database, "discard"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("will touch 2 row(s)") && stderr.contains("--yes"),
        "{stderr}"
    );
    let discarded = exactly_json(&["dead", "--database", &database, "discard", "--yes", "--json"]);
    assert_eq!(discarded["discarded"], 2);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM outbox WHERE status = 'DEAD'")
            .await,
        0
    );

    // The consumer parks the poison message (a type its handler does not accept) and applies
    // the rest.
    let consumer_database = consumer_db.arg();
    let group = unique("ops");
    let mut consume = Command::new(EXACTLY)
        .args(["consume", "--database", &consumer_database, "--brokers", &brokers])
        .args(["--group", &group, "--topic", &topic, "--handler", "record"])
        .args(["--event-types", "Tested", "--no-metrics"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start consumer");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied_and_parked = (
            consumer_db
                .try_count("SELECT COUNT(*) FROM exactly_consumed")
                .await,
            consumer_db.try_count("SELECT COUNT(*) FROM exactly_parked").await,
        );
        if applied_and_parked == (Ok(4), Ok(1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not apply 4 and park 1 within 60 s: {applied_and_parked:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status();
    assert!(consume.wait().expect("consumer exits").success());

    let parked = exactly_json(&[
        "parked",
        "--database",
        &consumer_database,
        "--consumer",
        &group,
        "list",
        "--json",
    ]);
    let parked = parked.as_array().expect("a list");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0]["reason"], "rejected");
    assert!(
        parked[0]["detail"].as_str().is_some_and(|d| d.contains("Poison")),
        "{parked:?}"
    );
    let id = parked[0]["id"].to_string();
    let shown = exactly_json(&[
        "parked",
        "--database",
        &consumer_database,
        "--consumer",
        &group,
        "show",
        &id,
        "--json",
    ]);
    assert_eq!(shown["offset"], 3);

    // Replayed while the handler still refuses it: nothing changes.
    let replay = |types: &str| {
        exactly_json(&[
            "parked",
            "--database",
            &consumer_database,
            "--consumer",
            &group,
            "replay",
            "--id",
            &id,
            "--event-types",
            types,
            "--json",
        ])
    };
    assert_eq!(replay("Tested")[0]["outcome"], "failed");
    assert_eq!(consumer_db.count("SELECT COUNT(*) FROM exactly_parked").await, 1);
    // After the fix it applies, once.
    assert_eq!(replay("Tested,Poison")[0]["outcome"], "applied");
    assert_eq!(consumer_db.count("SELECT COUNT(*) FROM exactly_parked").await, 0);
    assert_eq!(
        consumer_db
            .count("SELECT COUNT(*) FROM exactly_consumed WHERE event_type = 'Poison'")
            .await,
        1
    );
    let again = exactly(&[
        "parked",
        "--database",
        &consumer_database,
        "--consumer",
        &group,
        "replay",
        "--id",
        &id,
        "--event-types",
        "Tested,Poison",
    ]);
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no row matches"),
        "{again:?}"
    );
    assert_eq!(
        consumer_db.count("SELECT COUNT(*) FROM exactly_consumed").await,
        5
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_rows_requeue_and_parked_messages_replay_once_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    dead_then_parked(
        Db::Sqlite(dir.path().join("service.db")),
        Db::Sqlite(dir.path().join("consumer.db")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_rows_requeue_and_parked_messages_replay_once_on_postgres() {
    let url = fresh_pg_database().await;
    dead_then_parked(Db::Pg(url.clone()), Db::Pg(url)).await;
}
