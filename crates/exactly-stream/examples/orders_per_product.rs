//! Paid orders per product per 5 minutes, final results only, with the Rust DSL: the same job
//! as the `[stream.orders-agg.job]` table in the README (and the same output records).
//!
//! `cargo run -p exactly-stream --example orders_per_product` runs it in memory over a few
//! sample orders and prints the results.

use exactly_core::windowing::TimeWindows;
use exactly_stream::dsl::{Consumed, Emit, Grouped, Json, Produced, StreamsBuilder, TestDriver, Topology};
use serde_json::json;

/// An order event's payload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Order {
    /// What was ordered.
    pub(crate) product_id: String,
    /// `paid`, `cancelled`, …
    pub(crate) status: String,
}

/// The job.
pub(crate) fn topology() -> Topology {
    let builder = StreamsBuilder::new();
    builder
        .stream("orders", Consumed::envelope(Json))
        .filter(|_, order: &Order| order.status == "paid")
        .group_by(
            |_, order| order.product_id.clone(),
            Grouped::json().named("orders-agg"),
        )
        .windowed_by(TimeWindows::tumbling(300_000, 60_000).expect("valid windows"))
        .emit(Emit::OnWindowClose)
        .count()
        .to_stream()
        .map(|w, count| {
            let value = json!({ "key": w.key, "window_start": w.start, "window_end": w.end, "count": count });
            (w, value)
        })
        .to("orders-per-product", Produced::json());
    builder.build().expect("a valid topology")
}

/// One outbox record: key, value, headers, timestamp.
pub(crate) type Piped = (Vec<u8>, Vec<u8>, Vec<(String, Vec<u8>)>, i64);

/// Order events as the outbox relay publishes them: (order, product, status, event time); the
/// same order twice is a redelivery (same event id).
pub(crate) fn outbox_records(orders: &[(&str, &str, &str, i64)]) -> Vec<Piped> {
    orders
        .iter()
        .map(|(order, product, status, at)| {
            let n: u128 = order.bytes().fold(0, |h, b| h * 31 + u128::from(b));
            let id = uuid::Uuid::from_u128((n & 0xffff_ffff) | 0x4000_0000_0000_4000_8000_0000_0000_0000);
            let event = exactly_core::Envelope {
                event_id: id,
                event_type: "OrderPlaced".into(),
                aggregate_type: "order".into(),
                aggregate_id: (*order).into(),
                occurred_at: exactly_core::UnixMillis(*at),
                payload: serde_json::to_vec(&json!({ "product_id": product, "status": status }))
                    .expect("json"),
                headers: Vec::new(),
            };
            let headers = event.to_headers(&exactly_core::IdempotencyKey::UuidV4(id));
            (order.as_bytes().to_vec(), event.payload, headers, *at)
        })
        .collect()
}

/// Runs `topology` over `records` in memory.
pub(crate) fn run(topology: Topology, records: &[Piped]) -> TestDriver {
    let mut driver = TestDriver::new(topology, 4);
    for (key, value, headers, at) in records {
        let headers: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_slice())))
            .collect();
        driver
            .pipe("orders", Some(key), Some(value), &headers, *at)
            .expect("processed");
    }
    driver
}

#[allow(dead_code)]
fn main() {
    let records = outbox_records(&[
        ("o-1", "lamp", "paid", 1_000),
        ("o-2", "desk", "paid", 2_000),
        ("o-3", "lamp", "cancelled", 3_000),
        ("o-4", "lamp", "paid", 4_000),
        ("o-4", "lamp", "paid", 4_000),   // a redelivery of o-4: counted once
        ("o-5", "lamp", "paid", 400_000), // moves stream time past the first window's close
        ("o-6", "desk", "paid", 400_000),
    ]);
    let driver = run(topology(), &records);
    for record in driver.outputs("orders-per-product") {
        println!(
            "{}",
            String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
        );
    }
}
