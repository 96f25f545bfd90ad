//! The two handler kinds as library builders, on both stores, through the consumer's store
//! (dedupe + handler in one transaction): state sync converges on the newest event whatever
//! the delivery order and repeats; an aggregate never goes below zero, parking or clamping.

use exactly_core::recipes::BelowZero;
use exactly_core::{
    ApplyOutcome, Delivery, EffectStore, Envelope, HandlerError, IdempotencyKey, Inbound, UnixMillis,
};
use exactly_testkit::fresh_pg_database;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn delivery(aggregate: &str, at: i64, payload: serde_json::Value) -> Delivery {
    let event_id = uuid::Uuid::now_v7();
    Delivery {
        key: IdempotencyKey::UuidV7(event_id),
        envelope: Envelope {
            event_id,
            event_type: "Changed".into(),
            aggregate_type: "thing".into(),
            aggregate_id: aggregate.to_owned(),
            occurred_at: UnixMillis(at),
            payload: payload.to_string().into_bytes(),
            headers: vec![],
        },
        source_epoch: None,
    }
}

/// Applies `deliveries` in order, one transaction each; the outcomes.
async fn apply_all<S: EffectStore>(store: &S, deliveries: &[&Delivery]) -> Vec<ApplyOutcome> {
    let mut outcomes = Vec::new();
    for (offset, d) in deliveries.iter().enumerate() {
        let inbound = Inbound {
            topic: "t",
            partition: 0,
            offset: offset as i64,
            delivery: d,
            now: exactly_kafka::now(),
        };
        outcomes.push(store.apply(inbound).await.expect("apply"));
    }
    outcomes
}

/// Three aggregates, eight events each at shuffled times, delivered in a random order with a
/// third of them repeated: each aggregate ends with its newest event's state.
fn latest_state_deliveries() -> (Vec<Delivery>, Vec<usize>, Vec<(String, i64)>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut events = Vec::new();
    let mut newest = Vec::new();
    for a in 0..3 {
        let mut times: Vec<i64> = (0..8).map(|t| 1_000 + t * 10).collect();
        times.shuffle(&mut rng);
        for at in &times {
            events.push(delivery(&format!("A-{a}"), *at, serde_json::json!({"at": at})));
        }
        newest.push((format!("A-{a}"), 1_070));
    }
    let mut order: Vec<usize> = (0..events.len()).chain((0..events.len()).step_by(3)).collect();
    order.shuffle(&mut rng);
    (events, order, newest)
}

fn aggregate_deliveries() -> Vec<Delivery> {
    [5, -3, -4, 2]
        .iter()
        .enumerate()
        .map(|(i, d)| delivery("SKU-1", i as i64, serde_json::json!({"qty": d})))
        .collect()
}

fn rejected(outcome: &ApplyOutcome) -> bool {
    matches!(outcome, ApplyOutcome::Failed(HandlerError::Rejected(why)) if why.contains("below zero"))
}

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
