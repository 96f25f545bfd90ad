//! The two handler kinds on SQLite: state sync converges on the newest event whatever the delivery order and repeats;
//! an aggregate never goes below zero, parking or clamping (the consumer's store: dedupe and
//! handler in one transaction).

use exactly_core::recipes::BelowZero;
use exactly_core::{ApplyOutcome, Delivery};
use exactly_testkit::scenarios::{aggregate_deliveries, apply_all, latest_state_deliveries, rejected};

#[tokio::test(flavor = "multi_thread")]
async fn latest_state_and_aggregate_on_sqlite() {
    use exactly_sqlite::recipes::{Aggregate, LatestState};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("effects.db");
    let conn = exactly_sqlite::open(&path).expect("open");

    let latest = LatestState::new("thing_state").expect("names");
    conn.execute_batch(&latest.create_table_sql()).expect("table");
    let store = exactly_sqlite::SqliteEffects::open(&path, "latest", latest).expect("store");
    let (events, order, newest) = latest_state_deliveries();
    let sent: Vec<&Delivery> = order.iter().map(|i| &events[*i]).collect();
    let outcomes = apply_all(&store, &sent).await;
    assert_eq!(
        outcomes.iter().filter(|o| **o == ApplyOutcome::Applied).count(),
        events.len()
    );
    for (aggregate, at) in &newest {
        let (state, stored_at): (String, i64) = conn
            .query_row(
                "SELECT state, updated_at_ms FROM thing_state WHERE id = ?1",
                [aggregate],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("state");
        assert_eq!(stored_at, *at, "{aggregate}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&state).expect("json"),
            serde_json::json!({"at": at})
        );
    }

    for (name, below_zero, total, refused) in [
        ("parking", BelowZero::Park, 4, true),
        ("clamping", BelowZero::Clamp, 2, false),
    ] {
        let aggregate = Aggregate::with_columns(&format!("stock_{name}"), "sku", "qty", "qty")
            .expect("names")
            .below_zero(below_zero);
        conn.execute_batch(&aggregate.create_table_sql()).expect("table");
        let store = exactly_sqlite::SqliteEffects::open(&path, name, aggregate).expect("store");
        let events = aggregate_deliveries();
        let sent: Vec<&Delivery> = [0, 0, 1, 2, 3].iter().map(|i| &events[*i]).collect();
        let outcomes = apply_all(&store, &sent).await;
        assert_eq!(outcomes[1], ApplyOutcome::Duplicate);
        assert_eq!(rejected(&outcomes[3]), refused, "{name}: {outcomes:?}");
        let qty: i64 = conn
            .query_row(
                &format!("SELECT qty FROM stock_{name} WHERE sku = 'SKU-1'"),
                [],
                |r| r.get(0),
            )
            .expect("qty");
        assert_eq!(qty, total, "{name}");
    }
    assert!(exactly_sqlite::recipes::LatestState::new("x; DROP TABLE y").is_err());
}
