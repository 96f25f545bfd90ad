//! The handler kinds' scenarios, shared by the PostgreSQL and SQLite recipe tests: the same
//! deliveries (shuffled, repeated), applied through each store, must end in the same state.

use exactly_core::{
    ApplyOutcome, Delivery, EffectStore, Envelope, HandlerError, IdempotencyKey, Inbound, UnixMillis,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A UUIDv7-keyed event of `aggregate` at `at` with `payload`.
pub fn delivery(aggregate: &str, at: i64, payload: serde_json::Value) -> Delivery {
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
pub async fn apply_all<S: EffectStore>(store: &S, deliveries: &[&Delivery]) -> Vec<ApplyOutcome> {
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
pub fn latest_state_deliveries() -> (Vec<Delivery>, Vec<usize>, Vec<(String, i64)>) {
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

/// One SKU's stock deltas: 5, -3, -4 (below zero), 2.
pub fn aggregate_deliveries() -> Vec<Delivery> {
    [5, -3, -4, 2]
        .iter()
        .enumerate()
        .map(|(i, d)| delivery("SKU-1", i as i64, serde_json::json!({"qty": d})))
        .collect()
}

/// Whether an outcome is the aggregate's below-zero refusal.
pub fn rejected(outcome: &ApplyOutcome) -> bool {
    matches!(outcome, ApplyOutcome::Failed(HandlerError::Rejected(why)) if why.contains("below zero"))
}

/// A WAL relay's record: sequence key `value` of `source`, from `epoch` when given.
pub fn sequence(source: &str, value: u128, epoch: Option<u64>) -> Delivery {
    Delivery {
        key: IdempotencyKey::Sequence {
            source: source.to_owned(),
            value,
        },
        source_epoch: epoch,
        ..delivery("A", 0, serde_json::json!({ "n": value as u64 }))
    }
}

/// `delivery` parked as the consumer parks a record whose handler retries ran out: its headers
/// as received (the source's epoch included), its payload.
pub fn parked(delivery: &Delivery, topic: &str, partition: i32, offset: i64) -> exactly_core::ParkedMessage {
    let mut headers: Vec<(String, Option<Vec<u8>>)> = delivery
        .envelope
        .to_headers(&delivery.key)
        .into_iter()
        .map(|(n, v)| (n, Some(v)))
        .collect();
    if let (IdempotencyKey::Sequence { source, .. }, Some(epoch)) = (&delivery.key, delivery.source_epoch) {
        headers.push((
            exactly_core::header::SOURCE.to_owned(),
            Some(exactly_core::source_header(source, epoch).into_bytes()),
        ));
    }
    exactly_core::ParkedMessage {
        topic: topic.to_owned(),
        partition,
        offset,
        reason: exactly_core::ParkReason::RetriesExhausted,
        detail: "downstream is down".into(),
        key_text: Some(delivery.key.to_string()),
        record_key: None,
        headers,
        payload: Some(delivery.envelope.payload.clone()),
        parked_at: UnixMillis(0),
    }
}
