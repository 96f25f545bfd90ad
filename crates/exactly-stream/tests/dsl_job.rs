//! A job declared in `exactly.toml` and the same job written with the Rust DSL
//! (`examples/orders_per_product.rs`) produce the same records from the same input.

#[path = "../examples/orders_per_product.rs"]
mod example;

use exactly_stream::dsl::JobSpec;
use proptest::prelude::*;

const JOB: &str = r#"
input = "orders"
key = "/product_id"
filter = { pointer = "/status", equals = "paid" }
window = { kind = "tumbling", size_ms = 300000, grace_ms = 60000 }
aggregate = "count"
emit = "final"
output = "orders-per-product"
"#;

fn orders() -> impl Strategy<Value = Vec<(String, String, String, i64)>> {
    proptest::collection::vec(
        (0u8..30, 0u8..4, prop::bool::weighted(0.8), 0i64..2_000_000),
        1..120,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(order, product, paid, at)| {
                (
                    format!("o-{order}"),
                    format!("p{product}"),
                    if paid {
                        "paid".to_owned()
                    } else {
                        "cancelled".to_owned()
                    },
                    at,
                )
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_config_file_job_and_the_rust_example_send_the_same_records(orders in orders()) {
        // A redelivery repeats its original exactly: keep the first sighting's fields.
        let mut first = std::collections::BTreeMap::new();
        let orders: Vec<(String, String, String, i64)> = orders
            .into_iter()
            .map(|o| first.entry(o.0.clone()).or_insert(o).clone())
            .collect();
        let borrowed: Vec<(&str, &str, &str, i64)> =
            orders.iter().map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.as_str(), *d)).collect();
        let records = example::outbox_records(&borrowed);
        let spec: JobSpec = toml::from_str(JOB).expect("the job parses");
        let from_file = example::run(spec.topology("orders-agg").expect("builds"), &records);
        let from_rust = example::run(example::topology(), &records);
        let sent = |d: &exactly_stream::dsl::TestDriver| -> Vec<exactly_stream::dsl::OutputRecord> {
            d.outputs("orders-per-product").into_iter().cloned().collect()
        };
        prop_assert_eq!(sent(&from_file), sent(&from_rust));
        prop_assert_eq!(from_file.duplicates(), from_rust.duplicates());
        prop_assert_eq!(from_file.late(), from_rust.late());
    }
}

#[test]
fn the_example_counts_a_redelivered_order_once() {
    let records = example::outbox_records(&[
        ("o-1", "lamp", "paid", 1_000),
        ("o-4", "lamp", "paid", 4_000),
        ("o-4", "lamp", "paid", 4_000),
        ("o-3", "lamp", "cancelled", 3_000),
        ("o-5", "lamp", "paid", 400_000),
    ]);
    let driver = example::run(example::topology(), &records);
    let values: Vec<serde_json::Value> = driver
        .outputs("orders-per-product")
        .iter()
        .map(|o| serde_json::from_slice(o.value.as_deref().expect("value")).expect("json"))
        .collect();
    assert_eq!(
        values,
        vec![serde_json::json!({"key": "lamp", "window_start": 0, "window_end": 300000, "count": 2})]
    );
    assert_eq!(driver.duplicates(), 1);
}
