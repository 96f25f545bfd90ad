//! The consumer's side on PostgreSQL: dedupe record and effect in one transaction.

use std::sync::Arc;

use exactly_core::record::raw_headers_to_json;
use exactly_core::{
    ApplyOutcome, Delivery, EffectStore, HandlerError, IdempotencyKey, Inbound, ParkedMessage, StoreError,
    UnixMillis,
};
use futures::future::BoxFuture;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Transaction};

use crate::db::connect;
use crate::error::PgError;
use crate::migrations::migrate;

/// Application code run inside the dedupe transaction. Whatever it writes through `tx`
/// commits together with the dedupe record, or not at all.
pub trait PgHandler: Send + Sync + 'static {
    /// Applies one event.
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// An idempotent consumer's database: key set or watermark, handler, parking lot.
pub struct PgEffects<H> {
    consumer: String,
    client: Mutex<Client>,
    handler: Arc<H>,
}

impl<H: PgHandler> PgEffects<H> {
    /// Connects, migrates; `consumer` names this consumer's rows in the shared tables.
    pub async fn connect(url: &str, consumer: &str, handler: H) -> Result<Self, PgError> {
        let mut client = connect(url).await?;
        migrate(&mut client).await?;
        Ok(PgEffects {
            consumer: consumer.to_owned(),
            client: Mutex::new(client),
            handler: Arc::new(handler),
        })
    }

    /// Forgets key-set entries recorded before `cutoff` (the retention window); returns how many.
    pub async fn prune(&self, cutoff: UnixMillis) -> Result<u64, PgError> {
        let client = self.client.lock().await;
        client
            .execute(
                "DELETE FROM exactly_processed WHERE consumer = $1 AND processed_at < to_timestamp($2::float8 / 1000)",
                &[&self.consumer, &(cutoff.0 as f64)],
            )
            .await
            .map_err(PgError::at("prune processed keys"))
    }
}

/// Records the key: true if new. Sequence keys compare with the watermark of their source,
/// topic and partition (row-locked, so concurrent appliers of one partition serialize);
/// other keys go into the key set.
async fn record_key(tx: &Transaction<'_>, consumer: &str, inbound: &Inbound<'_>) -> Result<bool, PgError> {
    let delivery = inbound.delivery;
    match &delivery.key {
        IdempotencyKey::Sequence { source, value } => {
            let value_text = format!("{value:032x}");
            let row = tx
                .query_opt(
                    "SELECT high_key FROM exactly_watermarks
                     WHERE consumer = $1 AND source = $2 AND topic = $3 AND partition = $4 FOR UPDATE",
                    &[&consumer, source, &inbound.topic, &inbound.partition],
                )
                .await
                .map_err(PgError::at("read watermark"))?;
            if row.is_some_and(|r| value_text.as_str() <= r.get::<_, &str>(0)) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO exactly_watermarks (consumer, source, topic, partition, high_key, next_offset)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (consumer, source, topic, partition)
                 DO UPDATE SET high_key = excluded.high_key, next_offset = excluded.next_offset",
                &[
                    &consumer,
                    source,
                    &inbound.topic,
                    &inbound.partition,
                    &value_text,
                    &(inbound.offset + 1),
                ],
            )
            .await
            .map_err(PgError::at("advance watermark"))?;
            Ok(true)
        }
        key => {
            let inserted = tx
                .execute(
                    "INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, \"offset\", processed_at)
                     VALUES ($1, $2, $3::text::uuid, $4, $5, $6, to_timestamp($7::float8 / 1000))
                     ON CONFLICT DO NOTHING",
                    &[
                        &consumer,
                        &key.to_string(),
                        &delivery.envelope.event_id.hyphenated().to_string(),
                        &inbound.topic,
                        &inbound.partition,
                        &inbound.offset,
                        &(inbound.now.0 as f64),
                    ],
                )
                .await
                .map_err(PgError::at("record key"))?;
            Ok(inserted == 1)
        }
    }
}

impl<H: PgHandler> EffectStore for PgEffects<H> {
    async fn apply(&self, inbound: Inbound<'_>) -> Result<ApplyOutcome, StoreError> {
        let mut client = self.client.lock().await;
        let tx = client.transaction().await.map_err(PgError::at("begin apply"))?;
        if !record_key(&tx, &self.consumer, &inbound).await? {
            return Ok(ApplyOutcome::Duplicate);
        }
        match self.handler.handle(&tx, inbound.delivery).await {
            Ok(()) => {
                tx.commit().await.map_err(PgError::at("commit apply"))?;
                Ok(ApplyOutcome::Applied)
            }
            // Dropping the transaction rolls back the key together with any partial effect.
            Err(e) => Ok(ApplyOutcome::Failed(e)),
        }
    }

    async fn park(&self, m: &ParkedMessage) -> Result<(), StoreError> {
        let client = self.client.lock().await;
        client
            .execute(
                "INSERT INTO exactly_parked (consumer, topic, partition, \"offset\", reason, detail, key_text, record_key, headers, payload, parked_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, to_timestamp($11::float8 / 1000))
                 ON CONFLICT (consumer, topic, partition, \"offset\") DO NOTHING",
                &[
                    &self.consumer,
                    &m.topic,
                    &m.partition,
                    &m.offset,
                    &m.reason.as_str(),
                    &m.detail,
                    &m.key_text,
                    &m.record_key,
                    &raw_headers_to_json(&m.headers),
                    &m.payload,
                    &(m.parked_at.0 as f64),
                ],
            )
            .await
            .map_err(PgError::at("park message"))?;
        Ok(())
    }
}
