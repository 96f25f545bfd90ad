//! The story on each database: writers, consumer handlers, and the queries the demo's
//! reconciliation reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use exactly_core::{Envelope, HandlerError, Inbound, UnixMillis};
use exactly_postgres::PgHandler;
use exactly_sqlite::SqliteHandler;
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::story::{effects, pg_placeholders, SqlValue, StoryConsumer, Topics};

/// Where the demo keeps its data.
#[derive(Debug, Clone)]
pub enum Backend {
    /// One SQLite file for the service and one per consumer, in `dir`.
    Sqlite { dir: PathBuf },
    /// One PostgreSQL database for the service and the consumers.
    Postgres { url: String },
}

impl Backend {
    pub fn sqlite_path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.db"))
    }
}

/// The handler every story consumer runs, on either database.
#[derive(Debug, Clone, Copy)]
pub struct StoryHandler(pub StoryConsumer);

impl SqliteHandler for StoryHandler {
    fn handle(&self, tx: &rusqlite::Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        for effect in effects(self.0, inbound.delivery)? {
            let params: Vec<Box<dyn rusqlite::ToSql>> = effect
                .params
                .into_iter()
                .map(|p| -> Box<dyn rusqlite::ToSql> {
                    match p {
                        SqlValue::Int(i) => Box::new(i),
                        SqlValue::Text(t) => Box::new(t),
                    }
                })
                .collect();
            tx.execute(effect.sql, rusqlite::params_from_iter(params.iter()))
                .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        }
        Ok(())
    }
}

/// A story consumer is a handler `exactly consume --handler story-NAME` runs: its rows carry
/// its own name, and its tables are made when it opens its database.
impl exactly_daemon::handlers::CustomHandler for StoryHandler {
    fn consumer_name(&self) -> Option<&str> {
        Some(self.0.name())
    }

    fn schema(&self) -> &str {
        crate::story::CONSUMER_SCHEMA
    }
}

impl PgHandler for StoryHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for effect in effects(self.0, inbound.delivery)? {
                let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = effect
                    .params
                    .into_iter()
                    .map(|p| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                        match p {
                            SqlValue::Int(i) => Box::new(i),
                            SqlValue::Text(t) => Box::new(t),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| &**p as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                tx.execute(&pg_placeholders(effect.sql), &refs)
                    .await
                    .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            }
            Ok(())
        })
    }
}

/// One business transaction the writers perform.
#[derive(Debug, Clone)]
pub enum Operation {
    Order {
        order_id: String,
        product: String,
        coupon: String,
    },
    /// Likes the product, or unlikes it if the user already does.
    ToggleLike {
        user: String,
        product: String,
    },
    Rename {
        product: String,
        name: String,
    },
}

/// Picks operations with a seeded RNG so a run can be reproduced.
pub struct Workload {
    rng: StdRng,
    writer: usize,
    counter: u64,
    products: usize,
    users: usize,
}

impl Workload {
    pub fn new(seed: u64, writer: usize) -> Self {
        Workload {
            rng: StdRng::seed_from_u64(seed ^ (writer as u64 * 0x9E37_79B9)),
            writer,
            counter: 0,
            products: 50,
            users: 40,
        }
    }

    /// The next operation and whether its transaction should roll back (about 5%).
    pub fn next_operation(&mut self) -> (Operation, bool) {
        self.counter += 1;
        let product = format!("P-{}", self.rng.random_range(0..self.products));
        let user = format!("U-{}", self.rng.random_range(0..self.users));
        let op = match self.rng.random_range(0..10) {
            0..=2 => Operation::Order {
                order_id: format!("O-{}-{}", self.writer, self.counter),
                product,
                coupon: format!("C-{}-{}", self.writer, self.counter),
            },
            3..=7 => Operation::ToggleLike { user, product },
            _ => Operation::Rename {
                product,
                name: format!("name-{}-{}", self.writer, self.counter),
            },
        };
        (op, self.rng.random_range(0..100) < 5)
    }
}

/// The outbox event an operation emits; `unliked` says a toggle removed a like.
pub fn event_for(op: &Operation, unliked: bool, now: UnixMillis, topics: &Topics) -> (String, Envelope) {
    let (topic, event_type, aggregate_type, aggregate_id, payload) = match op {
        Operation::Order {
            order_id,
            product,
            coupon,
        } => (
            topics.coupons.clone(),
            "CouponUsed",
            "coupon",
            coupon.clone(),
            serde_json::json!({"coupon": coupon, "order_id": order_id, "product_id": product}),
        ),
        Operation::ToggleLike { user, product } => {
            let event_type = if unliked { "ProductUnliked" } else { "ProductLiked" };
            (
                topics.products.clone(),
                event_type,
                "product",
                product.clone(),
                serde_json::json!({"product_id": product, "user_id": user}),
            )
        }
        Operation::Rename { product, name } => (
            topics.products.clone(),
            "ProductRenamed",
            "product",
            product.clone(),
            serde_json::json!({"product_id": product, "name": name}),
        ),
    };
    let envelope = Envelope {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_owned(),
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id,
        occurred_at: now,
        payload: payload.to_string().into_bytes(),
        headers: vec![("source".into(), b"exactly-demo".to_vec())],
    };
    (topic, envelope)
}

/// Runs one operation in one SQLite transaction with its outbox row. Returns the event id.
pub fn write_sqlite(
    conn: &mut rusqlite::Connection,
    op: &Operation,
    rollback: bool,
    topics: &Topics,
) -> Result<Uuid> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let like_existed = match op {
        Operation::Order {
            order_id,
            product,
            coupon,
        } => {
            tx.execute(
                "INSERT INTO orders (id, product_id, coupon) VALUES (?1, ?2, ?3)",
                [order_id, product, coupon],
            )?;
            false
        }
        Operation::ToggleLike { user, product } => {
            let removed = tx.execute(
                "DELETE FROM likes WHERE user_id = ?1 AND product_id = ?2",
                [user, product],
            )? == 1;
            if !removed {
                tx.execute(
                    "INSERT INTO likes (user_id, product_id) VALUES (?1, ?2)",
                    [user, product],
                )?;
            }
            removed
        }
        Operation::Rename { product, name } => {
            tx.execute(
                "INSERT INTO products (id, name) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                [product, name],
            )?;
            false
        }
    };
    let (topic, envelope) = event_for(op, like_existed, exactly_kafka::now(), topics);
    exactly_sqlite::enqueue(&tx, &topic, &envelope)?;
    if rollback {
        tx.rollback()?;
    } else {
        tx.commit()?;
    }
    Ok(envelope.event_id)
}

/// Runs one operation in one PostgreSQL transaction with its outbox row. Returns the event id.
pub async fn write_postgres(
    client: &mut tokio_postgres::Client,
    op: &Operation,
    rollback: bool,
    topics: &Topics,
) -> Result<Uuid> {
    // Typed statements go out parsed, bound and executed in one round trip (an untyped one is
    // prepared first), as a service on a connection pool without a statement cache would.
    use tokio_postgres::types::Type;
    const TEXT: Type = Type::TEXT;
    let tx = client.transaction().await?;
    let like_existed = match op {
        Operation::Order {
            order_id,
            product,
            coupon,
        } => {
            tx.execute_typed(
                "INSERT INTO orders (id, product_id, coupon) VALUES ($1, $2, $3)",
                &[(order_id, TEXT), (product, TEXT), (coupon, TEXT)],
            )
            .await?;
            false
        }
        Operation::ToggleLike { user, product } => {
            // Lock the product's likes so concurrent writers flip one like in commit order.
            tx.execute_typed("SELECT pg_advisory_xact_lock(hashtext($1))", &[(product, TEXT)])
                .await?;
            let removed = tx
                .execute_typed(
                    "DELETE FROM likes WHERE user_id = $1 AND product_id = $2",
                    &[(user, TEXT), (product, TEXT)],
                )
                .await?
                == 1;
            if !removed {
                tx.execute_typed(
                    "INSERT INTO likes (user_id, product_id) VALUES ($1, $2)",
                    &[(user, TEXT), (product, TEXT)],
                )
                .await?;
            }
            removed
        }
        Operation::Rename { product, name } => {
            tx.execute_typed("SELECT pg_advisory_xact_lock(hashtext($1))", &[(product, TEXT)])
                .await?;
            tx.execute_typed(
                "INSERT INTO products (id, name) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                &[(product, TEXT), (name, TEXT)],
            )
            .await?;
            false
        }
    };
    let (topic, envelope) = event_for(op, like_existed, exactly_kafka::now(), topics);
    exactly_postgres::enqueue(&tx, &topic, &envelope).await?;
    if rollback {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(envelope.event_id)
}

/// What reconciliation reads from the databases.
#[derive(Debug, Default)]
pub struct Observed {
    /// Committed outbox events: event id → (event type, aggregate id, topic).
    pub committed: HashMap<String, String>,
    /// Per consumer: event id → times its effect ran.
    pub effects: HashMap<&'static str, HashMap<String, i64>>,
    /// Per consumer: event ids of parked messages (when the key named one) and the count.
    pub parked: HashMap<&'static str, (Vec<String>, i64)>,
    /// Expected and actual like counts, product names, coupons.
    pub state_mismatches: Vec<String>,
    /// Outbox rows that are not SENT.
    pub unsent: i64,
}

const EXPECTED_LIKES: &str = "SELECT product_id, COUNT(*) FROM likes GROUP BY product_id";
const ACTUAL_LIKES: &str = "SELECT product_id, likes FROM like_counts WHERE likes > 0";
const EXPECTED_COUPONS: &str = "SELECT coupon, id FROM orders";
const ACTUAL_COUPONS: &str = "SELECT coupon, order_id FROM coupon_ledger";
const ACTUAL_NAMES: &str = "SELECT product_id, name FROM product_cache";
const EFFECTS: &str = "SELECT event_id, COUNT(*) FROM demo_effects WHERE consumer = ?1 GROUP BY event_id";
const PARKED: &str = "SELECT COALESCE(key_text, ''), '' FROM exactly_parked WHERE consumer = ?1";
const COMMITTED: &str = "SELECT event_id, event_type FROM outbox";
const UNSENT: &str = "SELECT COUNT(*) FROM outbox WHERE status <> 'SENT'";
/// Newest rename per product by (occurredAt, event id): what a state-sync consumer must show.
const EXPECTED_NAMES_SQLITE: &str = "
SELECT json_extract(CAST(payload AS TEXT), '$.product_id') AS product, json_extract(CAST(payload AS TEXT), '$.name')
FROM outbox o WHERE event_type = 'ProductRenamed' AND NOT EXISTS (
  SELECT 1 FROM outbox n WHERE n.event_type = 'ProductRenamed' AND n.aggregate_id = o.aggregate_id
    AND (n.occurred_at > o.occurred_at OR (n.occurred_at = o.occurred_at AND n.event_id > o.event_id)))";
const EXPECTED_NAMES_PG: &str = "
SELECT DISTINCT ON (aggregate_id) aggregate_id, convert_from(payload, 'UTF8')::jsonb ->> 'name'
FROM outbox WHERE event_type = 'ProductRenamed'
ORDER BY aggregate_id, occurred_at DESC, event_id::text DESC";

fn compare(
    what: &str,
    expected: Vec<(String, String)>,
    actual: Vec<(String, String)>,
    out: &mut Vec<String>,
) {
    let expected: HashMap<_, _> = expected.into_iter().collect();
    let actual: HashMap<_, _> = actual.into_iter().collect();
    let mut keys: Vec<_> = expected.keys().chain(actual.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        if expected.get(key) != actual.get(key) {
            out.push(format!(
                "{what} {key}: expected {:?}, found {:?}",
                expected.get(key),
                actual.get(key)
            ));
        }
    }
}

fn sqlite_pairs(conn: &rusqlite::Connection, sql: &str, arg: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(sql).with_context(|| format!("prepare {sql}"))?;
    let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, String)> {
        let a: rusqlite::types::Value = r.get(0)?;
        let b: rusqlite::types::Value = r.get(1)?;
        Ok((value_text(a), value_text(b)))
    };
    let rows = match arg {
        Some(a) => stmt.query_map([a], map)?.collect::<rusqlite::Result<Vec<_>>>()?,
        None => stmt.query_map([], map)?.collect::<rusqlite::Result<Vec<_>>>()?,
    };
    Ok(rows)
}

fn value_text(v: rusqlite::types::Value) -> String {
    match v {
        rusqlite::types::Value::Integer(i) => i.to_string(),
        rusqlite::types::Value::Text(t) => t,
        rusqlite::types::Value::Real(r) => r.to_string(),
        rusqlite::types::Value::Null => String::new(),
        rusqlite::types::Value::Blob(b) => String::from_utf8_lossy(&b).into_owned(),
    }
}

fn parked_event_ids(keys: Vec<String>) -> (Vec<String>, i64) {
    let count = keys.len() as i64;
    let ids = keys
        .into_iter()
        .filter_map(|k| k.split_once(':').map(|(_, id)| id.to_owned()))
        .collect();
    (ids, count)
}

/// Reads everything reconciliation needs from SQLite files in `dir`.
pub fn observe_sqlite(dir: &Path) -> Result<Observed> {
    let service = rusqlite::Connection::open(Backend::sqlite_path(dir, "service"))?;
    let mut observed = Observed {
        committed: sqlite_pairs(&service, COMMITTED, None)?.into_iter().collect(),
        unsent: service.query_row(UNSENT, [], |r| r.get(0))?,
        ..Observed::default()
    };
    for consumer in StoryConsumer::ALL {
        let conn = rusqlite::Connection::open(Backend::sqlite_path(dir, consumer.name()))?;
        let effects = sqlite_pairs(&conn, EFFECTS, Some(consumer.name()))?;
        observed.effects.insert(
            consumer.name(),
            effects
                .into_iter()
                .map(|(id, n)| (id, n.parse().unwrap_or(0)))
                .collect(),
        );
        let parked: Vec<String> = sqlite_pairs(&conn, PARKED, Some(consumer.name()))?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        observed.parked.insert(consumer.name(), parked_event_ids(parked));
        let mismatches = &mut observed.state_mismatches;
        match consumer {
            StoryConsumer::Coupons => compare(
                "coupon",
                sqlite_pairs(&service, EXPECTED_COUPONS, None)?,
                sqlite_pairs(&conn, ACTUAL_COUPONS, None)?,
                mismatches,
            ),
            StoryConsumer::Likes => compare(
                "likes of",
                sqlite_pairs(&service, EXPECTED_LIKES, None)?,
                sqlite_pairs(&conn, ACTUAL_LIKES, None)?,
                mismatches,
            ),
            StoryConsumer::Products => compare(
                "name of",
                sqlite_pairs(&service, EXPECTED_NAMES_SQLITE, None)?,
                sqlite_pairs(&conn, ACTUAL_NAMES, None)?,
                mismatches,
            ),
        }
    }
    Ok(observed)
}

async fn pg_pairs(
    client: &tokio_postgres::Client,
    sql: &str,
    arg: Option<&str>,
) -> Result<Vec<(String, String)>> {
    let sql = format!(
        "SELECT a::text, b::text FROM ({}) AS t(a, b)",
        pg_placeholders(sql)
    );
    let rows = match arg {
        Some(a) => client.query(&sql, &[&a]).await,
        None => client.query(&sql, &[]).await,
    }
    .with_context(|| format!("query {sql}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get::<_, Option<String>>(1).unwrap_or_default(),
            )
        })
        .collect())
}

/// Reads everything reconciliation needs from one PostgreSQL database.
pub async fn observe_postgres(url: &str) -> Result<Observed> {
    let client = exactly_postgres::connect(url).await?;
    let unsent: i64 = client.query_one(UNSENT, &[]).await?.get(0);
    let mut observed = Observed {
        committed: pg_pairs(&client, COMMITTED, None).await?.into_iter().collect(),
        unsent,
        ..Observed::default()
    };
    for consumer in StoryConsumer::ALL {
        let effects = pg_pairs(&client, EFFECTS, Some(consumer.name())).await?;
        observed.effects.insert(
            consumer.name(),
            effects
                .into_iter()
                .map(|(id, n)| (id, n.parse().unwrap_or(0)))
                .collect(),
        );
        let parked = pg_pairs(&client, PARKED, Some(consumer.name()))
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        observed.parked.insert(consumer.name(), parked_event_ids(parked));
        let (expected, actual) = match consumer {
            StoryConsumer::Coupons => (EXPECTED_COUPONS, ACTUAL_COUPONS),
            StoryConsumer::Likes => (EXPECTED_LIKES, ACTUAL_LIKES),
            StoryConsumer::Products => (EXPECTED_NAMES_PG, ACTUAL_NAMES),
        };
        let label = match consumer {
            StoryConsumer::Coupons => "coupon",
            StoryConsumer::Likes => "likes of",
            StoryConsumer::Products => "name of",
        };
        compare(
            label,
            pg_pairs(&client, expected, None).await?,
            pg_pairs(&client, actual, None).await?,
            &mut observed.state_mismatches,
        );
    }
    Ok(observed)
}
