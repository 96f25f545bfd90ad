//! The UPSERT sink of windowed counts: partial counts (one per input partition or salt) are
//! upserted under UNIQUE (key, window_start, part), keeping the larger value, so a result that
//! arrives twice or out of order never lowers a count; `order_counts` adds the parts up.

use tokio_postgres::GenericClient;

use crate::error::PgError;

/// One partial window result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowCount {
    /// Grouping key (for example a product id).
    pub key: String,
    /// Window start, Unix ms.
    pub window_start: i64,
    /// Window end, Unix ms.
    pub window_end: i64,
    /// Which partial count (input partition, salt).
    pub part: String,
    /// The partial count so far.
    pub count: i64,
}

/// Creates the tables and the view when absent.
pub async fn ensure_counts_schema<C: GenericClient>(client: &C) -> Result<(), PgError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS order_count_parts (
                 key          TEXT NOT NULL,
                 window_start BIGINT NOT NULL,
                 window_end   BIGINT NOT NULL,
                 part         TEXT NOT NULL,
                 count        BIGINT NOT NULL,
                 updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
                 UNIQUE (key, window_start, part)
             );
             CREATE OR REPLACE VIEW order_counts AS
                 SELECT key, window_start, max(window_end) AS window_end, sum(count)::bigint AS count
                 FROM order_count_parts GROUP BY key, window_start;",
        )
        .await
        .map_err(PgError::at("create order_counts"))
}

/// Upserts `counts`; a count lower than the stored one (an older result) changes nothing.
pub async fn upsert_counts<C: GenericClient>(client: &C, counts: &[WindowCount]) -> Result<(), PgError> {
    let statement = client
        .prepare(
            "INSERT INTO order_count_parts (key, window_start, window_end, part, count)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (key, window_start, part) DO UPDATE
             SET count = GREATEST(order_count_parts.count, excluded.count), updated_at = now()",
        )
        .await
        .map_err(PgError::at("prepare count upsert"))?;
    for c in counts {
        client
            .execute(
                &statement,
                &[&c.key, &c.window_start, &c.window_end, &c.part, &c.count],
            )
            .await
            .map_err(PgError::at("upsert count"))?;
    }
    Ok(())
}
