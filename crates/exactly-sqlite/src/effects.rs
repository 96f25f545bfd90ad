//! The consumer's side on SQLite: dedupe record and effect in one transaction.

use std::path::Path;
use std::sync::Arc;

use exactly_core::record::raw_headers_to_json;
use exactly_core::{
    ApplyOutcome, Delivery, EffectStore, HandlerError, IdempotencyKey, Inbound, ParkedMessage, StoreError,
    UnixMillis,
};
use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::{open, Shared};
use crate::error::SqliteError;

/// Application code run inside the dedupe transaction. Whatever it writes through `tx`
/// commits together with the dedupe record, or not at all.
pub trait SqliteHandler: Send + Sync + 'static {
    /// Applies one event.
    fn handle(&self, tx: &Transaction<'_>, delivery: &Delivery) -> Result<(), HandlerError>;
}

impl<F> SqliteHandler for F
where
    F: Fn(&Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, tx: &Transaction<'_>, delivery: &Delivery) -> Result<(), HandlerError> {
        self(tx, delivery)
    }
}

/// An idempotent consumer's database: key set or watermark, handler, parking lot.
pub struct SqliteEffects<H> {
    consumer: Arc<str>,
    db: Shared,
    handler: Arc<H>,
}

impl<H> Clone for SqliteEffects<H> {
    fn clone(&self) -> Self {
        SqliteEffects {
            consumer: self.consumer.clone(),
            db: self.db.clone(),
            handler: self.handler.clone(),
        }
    }
}

impl<H: SqliteHandler> SqliteEffects<H> {
    /// Opens (and migrates) `path`; `consumer` names this consumer's rows in the shared tables.
    pub fn open(path: &Path, consumer: &str, handler: H) -> Result<Self, SqliteError> {
        Ok(SqliteEffects {
            consumer: consumer.into(),
            db: Shared::new(open(path)?),
            handler: Arc::new(handler),
        })
    }

    /// Forgets key-set entries recorded before `cutoff` (the retention window); returns how many.
    pub async fn prune(&self, cutoff: UnixMillis) -> Result<usize, SqliteError> {
        let consumer = self.consumer.clone();
        self.db
            .run(move |conn| {
                conn.execute(
                    "DELETE FROM exactly_processed WHERE consumer = ?1 AND processed_at < ?2",
                    params![&*consumer, cutoff.0],
                )
                .map_err(SqliteError::at("prune processed keys"))
            })
            .await
    }
}

/// Records `key` for `consumer`: true if new. Sequence keys compare with the watermark of their
/// source, topic and partition; others go into the key set.
pub(crate) fn record_key(
    tx: &Transaction<'_>,
    consumer: &str,
    inbound: &InboundOwned,
) -> Result<bool, SqliteError> {
    match &inbound.delivery.key {
        IdempotencyKey::Sequence { source, value } => {
            let high: Option<String> = tx
                .query_row(
                    "SELECT high_key FROM exactly_watermarks WHERE consumer = ?1 AND source = ?2 AND topic = ?3 AND partition = ?4",
                    params![consumer, source, inbound.topic, inbound.partition],
                    |r| r.get(0),
                )
                .optional()
                .map_err(SqliteError::at("read watermark"))?;
            let value_text = format!("{value:032x}");
            if high.is_some_and(|h| value_text <= h) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO exactly_watermarks (consumer, source, topic, partition, high_key, next_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (consumer, source, topic, partition) DO UPDATE SET high_key = excluded.high_key, next_offset = excluded.next_offset",
                params![consumer, source, inbound.topic, inbound.partition, value_text, inbound.offset + 1],
            )
            .map_err(SqliteError::at("advance watermark"))?;
            Ok(true)
        }
        key => {
            let inserted = tx
                .execute(
                    "INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, \"offset\", processed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                    params![
                        consumer,
                        key.to_string(),
                        inbound.delivery.envelope.event_id.hyphenated().to_string(),
                        inbound.topic,
                        inbound.partition,
                        inbound.offset,
                        inbound.now.0
                    ],
                )
                .map_err(SqliteError::at("record key"))?;
            Ok(inserted == 1)
        }
    }
}

pub(crate) struct InboundOwned {
    topic: String,
    partition: i32,
    offset: i64,
    delivery: Delivery,
    now: UnixMillis,
}

impl<H: SqliteHandler> EffectStore for SqliteEffects<H> {
    async fn apply(&self, inbound: Inbound<'_>) -> Result<ApplyOutcome, StoreError> {
        let owned = InboundOwned {
            topic: inbound.topic.to_owned(),
            partition: inbound.partition,
            offset: inbound.offset,
            delivery: inbound.delivery.clone(),
            now: inbound.now,
        };
        let (consumer, handler) = (self.consumer.clone(), self.handler.clone());
        let outcome = self
            .db
            .run(move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(SqliteError::at("begin apply"))?;
                if !record_key(&tx, &consumer, &owned)? {
                    return Ok(ApplyOutcome::Duplicate);
                }
                match handler.handle(&tx, &owned.delivery) {
                    Ok(()) => {
                        tx.commit().map_err(SqliteError::at("commit apply"))?;
                        Ok(ApplyOutcome::Applied)
                    }
                    // Dropping the transaction rolls back the key with the partial effect.
                    Err(e) => Ok(ApplyOutcome::Failed(e)),
                }
            })
            .await?;
        Ok(outcome)
    }

    async fn park(&self, message: &ParkedMessage) -> Result<(), StoreError> {
        let (consumer, m) = (self.consumer.clone(), message.clone());
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT INTO exactly_parked (consumer, topic, partition, \"offset\", reason, detail, key_text, record_key, headers, payload, parked_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (consumer, topic, partition, \"offset\") DO NOTHING",
                    params![
                        &*consumer,
                        m.topic,
                        m.partition,
                        m.offset,
                        m.reason.as_str(),
                        m.detail,
                        m.key_text,
                        m.record_key,
                        raw_headers_to_json(&m.headers),
                        m.payload,
                        m.parked_at.0
                    ],
                )
                .map_err(SqliteError::at("park message"))?;
                Ok(())
            })
            .await?;
        Ok(())
    }
}
