//! The two handler kinds on PostgreSQL: state sync converges on the newest event whatever the delivery order and repeats;
//! an aggregate never goes below zero, parking or clamping (the consumer's store: dedupe and
//! handler in one transaction).

use exactly_core::recipes::BelowZero;
use exactly_core::{ApplyOutcome, Delivery};
use exactly_testkit::fresh_pg_database;
use exactly_testkit::scenarios::{aggregate_deliveries, apply_all, latest_state_deliveries, rejected};

#[tokio::test(flavor = "multi_thread")]
async fn latest_state_and_aggregate_on_postgres() {
    use exactly_postgres::recipes::{Aggregate, LatestState};
    let url = fresh_pg_database().await;
    let client = exactly_postgres::connect(&url).await.expect("connect");

    let latest = LatestState::new("thing_state").expect("names");
    client
        .batch_execute(&latest.create_table_sql())
        .await
        .expect("table");
    let store = exactly_postgres::PgEffects::connect(&url, "latest", latest)
        .await
        .expect("store");
    let (events, order, newest) = latest_state_deliveries();
    let sent: Vec<&Delivery> = order.iter().map(|i| &events[*i]).collect();
    let outcomes = apply_all(&store, &sent).await;
    let applied = outcomes.iter().filter(|o| **o == ApplyOutcome::Applied).count();
    assert_eq!(
        applied,
        events.len(),
        "each event once, the repeats are dedupe hits"
    );
    for (aggregate, at) in &newest {
        let row = client
            .query_one(
                "SELECT state::text, updated_at_ms FROM thing_state WHERE id = $1",
                &[aggregate],
            )
            .await
            .expect("state");
        assert_eq!(row.get::<_, i64>(1), *at, "{aggregate}");
        let state: serde_json::Value = serde_json::from_str(&row.get::<_, String>(0)).expect("json");
        assert_eq!(state, serde_json::json!({"at": at}), "{aggregate}");
    }

    for (name, below_zero, total, refused) in [
        ("parking", BelowZero::Park, 4, true),
        ("clamping", BelowZero::Clamp, 2, false),
    ] {
        let aggregate = Aggregate::with_columns(&format!("stock_{name}"), "sku", "qty", "qty")
            .expect("names")
            .below_zero(below_zero);
        client
            .batch_execute(&aggregate.create_table_sql())
            .await
            .expect("table");
        let store = exactly_postgres::PgEffects::connect(&url, name, aggregate)
            .await
            .expect("store");
        let events = aggregate_deliveries();
        // The first delta delivered twice.
        let sent: Vec<&Delivery> = [0, 0, 1, 2, 3].iter().map(|i| &events[*i]).collect();
        let outcomes = apply_all(&store, &sent).await;
        assert_eq!(outcomes[1], ApplyOutcome::Duplicate);
        assert_eq!(rejected(&outcomes[3]), refused, "{name}: {outcomes:?}");
        let qty: i64 = client
            .query_one(&format!("SELECT qty FROM stock_{name} WHERE sku = 'SKU-1'"), &[])
            .await
            .expect("qty")
            .get(0);
        assert_eq!(qty, total, "{name}: 5 - 3 (-4 refused or clamped to 0) + 2");
    }
}
