//! The demo's story (seed 002): an order service and three downstream consumers.
//!
//! The service commits business rows and outbox events in one transaction: coupons used with
//! orders, products liked and unliked, products renamed. Consumers: a coupon ledger, a like
//! counter that never goes below zero, and a product cache that keeps the newest name.
//! Handlers are written once as SQL effects and run on SQLite or PostgreSQL.

use exactly_core::{Delivery, HandlerError};

/// The story's topic names; a run suffix keeps runs on a shared broker apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub coupons: String,
    pub products: String,
}

impl Topics {
    pub fn with_suffix(suffix: &str) -> Self {
        Topics {
            coupons: format!("coupon-events{suffix}"),
            products: format!("product-events{suffix}"),
        }
    }
}

/// Business tables of the order service.
pub const SERVICE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS likes (user_id TEXT NOT NULL, product_id TEXT NOT NULL, PRIMARY KEY (user_id, product_id));
CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, product_id TEXT NOT NULL, coupon TEXT NOT NULL);
";

/// Tables the consumers write. `demo_effects` has no key on purpose: it counts every time an
/// effect ran, so an effect applied twice shows up.
pub const CONSUMER_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS coupon_ledger (coupon TEXT PRIMARY KEY, order_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS like_counts (product_id TEXT PRIMARY KEY, likes BIGINT NOT NULL, clamped BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS product_cache (product_id TEXT PRIMARY KEY, name TEXT NOT NULL, occurred_at BIGINT NOT NULL, event_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS demo_effects (consumer TEXT NOT NULL, event_id TEXT NOT NULL);
";

/// The three consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoryConsumer {
    /// Marks coupons used.
    Coupons,
    /// Aggregates likes.
    Likes,
    /// Keeps product names, newest occurredAt wins.
    Products,
}

impl StoryConsumer {
    pub const ALL: [StoryConsumer; 3] = [
        StoryConsumer::Coupons,
        StoryConsumer::Likes,
        StoryConsumer::Products,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StoryConsumer::Coupons => "coupons",
            StoryConsumer::Likes => "likes",
            StoryConsumer::Products => "products",
        }
    }

    pub fn topic(self, topics: &Topics) -> &str {
        match self {
            StoryConsumer::Coupons => &topics.coupons,
            StoryConsumer::Likes | StoryConsumer::Products => &topics.products,
        }
    }

    /// Event types this consumer acts on (others on its topic are no-ops, still deduped).
    pub fn wants(self, event_type: &str) -> bool {
        match self {
            StoryConsumer::Coupons => event_type == "CouponUsed",
            StoryConsumer::Likes => matches!(event_type, "ProductLiked" | "ProductUnliked"),
            StoryConsumer::Products => event_type == "ProductRenamed",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        StoryConsumer::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// A bound SQL parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlValue {
    Int(i64),
    Text(String),
}

/// One statement (SQLite `?N` placeholders; [`pg_placeholders`] converts them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    pub sql: &'static str,
    pub params: Vec<SqlValue>,
}

/// `?N` → `$N`.
pub fn pg_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

fn field<'a>(json: &'a serde_json::Value, name: &str) -> Result<&'a str, HandlerError> {
    json.get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| HandlerError::Rejected(format!("payload has no string field {name:?}")))
}

/// The statements `consumer` runs for `delivery`, inside its dedupe transaction.
pub fn effects(consumer: StoryConsumer, delivery: &Delivery) -> Result<Vec<Effect>, HandlerError> {
    let envelope = &delivery.envelope;
    let known = ["CouponUsed", "ProductLiked", "ProductUnliked", "ProductRenamed"];
    if !known.contains(&envelope.event_type.as_str()) {
        return Err(HandlerError::Rejected(format!(
            "unknown event type {:?}",
            envelope.event_type
        )));
    }
    if !consumer.wants(&envelope.event_type) {
        return Ok(Vec::new());
    }
    let json: serde_json::Value = serde_json::from_slice(&envelope.payload)
        .map_err(|e| HandlerError::Rejected(format!("payload is not JSON: {e}")))?;
    let event_id = envelope.event_id.hyphenated().to_string();
    let mut out = vec![Effect {
        sql: "INSERT INTO demo_effects (consumer, event_id) VALUES (?1, ?2)",
        params: vec![
            SqlValue::Text(consumer.name().into()),
            SqlValue::Text(event_id.clone()),
        ],
    }];
    let text = |name: &str| field(&json, name).map(|v| SqlValue::Text(v.to_owned()));
    match envelope.event_type.as_str() {
        "CouponUsed" => out.push(Effect {
            sql: "INSERT INTO coupon_ledger (coupon, order_id) VALUES (?1, ?2)",
            params: vec![text("coupon")?, text("order_id")?],
        }),
        "ProductLiked" => out.push(Effect {
            sql: "INSERT INTO like_counts (product_id, likes, clamped) VALUES (?1, 1, 0)
                  ON CONFLICT (product_id) DO UPDATE SET likes = like_counts.likes + 1",
            params: vec![text("product_id")?],
        }),
        // Never below zero; a clamp is counted, because with ordered delivery it never happens.
        "ProductUnliked" => out.push(Effect {
            sql: "INSERT INTO like_counts (product_id, likes, clamped) VALUES (?1, 0, 1)
                  ON CONFLICT (product_id) DO UPDATE SET
                    likes = CASE WHEN like_counts.likes > 0 THEN like_counts.likes - 1 ELSE 0 END,
                    clamped = like_counts.clamped + CASE WHEN like_counts.likes > 0 THEN 0 ELSE 1 END",
            params: vec![text("product_id")?],
        }),
        // State sync: the newer occurredAt wins (event id breaks ties), whatever the arrival order.
        "ProductRenamed" => out.push(Effect {
            sql: "INSERT INTO product_cache (product_id, name, occurred_at, event_id) VALUES (?1, ?2, ?3, ?4)
                  ON CONFLICT (product_id) DO UPDATE SET name = excluded.name, occurred_at = excluded.occurred_at,
                    event_id = excluded.event_id
                  WHERE excluded.occurred_at > product_cache.occurred_at
                     OR (excluded.occurred_at = product_cache.occurred_at AND excluded.event_id > product_cache.event_id)",
            params: vec![
                text("product_id")?,
                text("name")?,
                SqlValue::Int(envelope.occurred_at.0),
                SqlValue::Text(event_id),
            ],
        }),
        _ => {}
    }
    Ok(out)
}
