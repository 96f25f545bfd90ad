//! The consumer's side on PostgreSQL: dedupe record and effect in one transaction.

use std::collections::HashSet;
use std::sync::Arc;

use exactly_core::dedupe::refusal_detail;
use exactly_core::operate::ReplayOutcome;
use exactly_core::record::raw_headers_to_json;
use exactly_core::{
    ApplyOutcome, BatchOutcome, EffectStore, EpochWatermark, HandlerError, IdempotencyKey, Inbound,
    ParkReason, ParkedMessage, SequenceVerdict, StoreError, UnixMillis,
};
use futures::future::BoxFuture;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Transaction};

use crate::db::{connect, reconnect_if_closed};
use crate::error::PgError;
use crate::migrations::migrate;

/// Application code run inside the dedupe transaction. Whatever it writes through `tx`
/// commits together with the dedupe record, or not at all.
pub trait PgHandler: Send + Sync + 'static {
    /// Applies one event, received as `inbound` (the decoded record and where it was read).
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Applies several events, in order, in the batch's transaction. The default calls
    /// [`PgHandler::handle`] for each; a handler that can write them with one multi-row
    /// statement saves a round trip per event. An error rolls back the whole batch, and the
    /// consumer then applies the events one by one through `handle`.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        batch: &'a [Inbound<'a>],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for inbound in batch {
                self.handle(tx, inbound).await?;
            }
            Ok(())
        })
    }
}

/// An idempotent consumer's database: key set or watermark, handler, parking lot.
///
/// One connection, reopened on the next call after it closed (a PostgreSQL restart): a call
/// that fails meanwhile returns a retryable [`StoreError`], the consumer backs off and commits no
/// offset until the effect is applied.
pub struct PgEffects<H> {
    consumer: String,
    url: String,
    client: Mutex<Client>,
    handler: Arc<H>,
    /// False only for the benchmark's baseline ([`PgEffects::connect_without_dedupe`]).
    dedupe: bool,
}

impl<H: PgHandler> PgEffects<H> {
    /// Connects, migrates; `consumer` names this consumer's rows in the shared tables.
    pub async fn connect(url: &str, consumer: &str, handler: H) -> Result<Self, PgError> {
        let mut client = connect(url).await?;
        migrate(&mut client).await?;
        Ok(PgEffects {
            consumer: consumer.to_owned(),
            url: url.to_owned(),
            client: Mutex::new(client),
            handler: Arc::new(handler),
            dedupe: true,
        })
    }

    /// The same store with no dedupe: every delivery runs the handler, repeats included. Not
    /// exactly once; it exists as the benchmark's baseline, so the cost of dedupe is measured
    /// against the same handler, batching and connection.
    pub async fn connect_without_dedupe(url: &str, consumer: &str, handler: H) -> Result<Self, PgError> {
        let mut store = PgEffects::connect(url, consumer, handler).await?;
        store.dedupe = false;
        Ok(store)
    }
}

/// A batch record's dedupe verdict: new (`Ok(true)`), a repeat (`Ok(false)`) or refused with
/// the reason; `None` while not judged yet.
type Verdicts = Vec<Option<Result<bool, String>>>;

/// Records the key-set keys of a batch with one statement: `Ok(true)` for a record whose key is
/// new (the first record of the batch with that key), `Ok(false)` for one recorded before (or
/// earlier in the batch); sequence keys are left to [`record_sequence_keys`]. Key-set keys go
/// into `exactly_processed`.
async fn record_set_keys(
    tx: &Transaction<'_>,
    consumer: &str,
    batch: &[Inbound<'_>],
) -> Result<Verdicts, PgError> {
    let mut ordinals = Vec::new();
    let (mut keys, mut event_ids, mut topics, mut partitions, mut offsets, mut times) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (index, inbound) in batch.iter().enumerate() {
        if matches!(inbound.delivery.key, IdempotencyKey::Sequence { .. }) {
            continue;
        }
        ordinals.push(index as i32);
        keys.push(inbound.delivery.key.to_string());
        event_ids.push(inbound.delivery.envelope.event_id.hyphenated().to_string());
        topics.push(inbound.topic.to_owned());
        partitions.push(inbound.partition);
        offsets.push(inbound.offset);
        times.push(inbound.now.0 as f64);
    }
    let mut fresh = vec![None; batch.len()];
    if keys.is_empty() {
        return Ok(fresh);
    }
    // The first record of the batch with a key is the one that applies it.
    let inserted = tx
        .query(
            "INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, \"offset\", processed_at)
             SELECT DISTINCT ON (key) $1::text, key, event_id::uuid, topic, partition, \"offset\",
                    to_timestamp(at / 1000)
             FROM unnest($2::text[], $3::text[], $4::text[], $5::int4[], $6::int8[], $7::float8[], $8::int4[])
                  AS b(key, event_id, topic, partition, \"offset\", at, ordinal)
             ORDER BY key, ordinal
             ON CONFLICT DO NOTHING
             RETURNING key",
            &[
                &consumer, &keys, &event_ids, &topics, &partitions, &offsets, &times, &ordinals,
            ],
        )
        .await
        .map_err(PgError::at("record keys"))?;
    let mut new: HashSet<String> = inserted.iter().map(|row| row.get::<_, String>(0)).collect();
    for (ordinal, key) in ordinals.iter().zip(&keys) {
        fresh[*ordinal as usize] = Some(Ok(new.remove(key)));
    }
    Ok(fresh)
}

/// Judges the batch's sequence keys by their watermarks: one row-locked read and at most one
/// write per source, topic and partition, each record judged in order as
/// if they came one by one (the watermark written is the one the last new record left). The row
/// lock makes concurrent appliers of one partition serialize.
async fn record_sequence_keys(
    tx: &Transaction<'_>,
    consumer: &str,
    batch: &[Inbound<'_>],
    verdicts: &mut Verdicts,
) -> Result<(), PgError> {
    // (source, topic, partition) → the batch's records of it, in order.
    type Group<'b> = ((&'b str, &'b str, i32), Vec<usize>);
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (index, inbound) in batch.iter().enumerate() {
        if let IdempotencyKey::Sequence { source, .. } = &inbound.delivery.key {
            let id = (source.as_str(), inbound.topic, inbound.partition);
            match groups.iter_mut().find(|(g, _)| *g == id) {
                Some((_, members)) => members.push(index),
                None => groups.push((id, vec![index])),
            }
        }
    }
    for ((source, topic, partition), members) in groups {
        let row = tx
            .query_opt(
                "SELECT high_key, source_epoch FROM exactly_watermarks
                 WHERE consumer = $1 AND source = $2 AND topic = $3 AND partition = $4 FOR UPDATE",
                &[&consumer, &source, &topic, &partition],
            )
            .await
            .map_err(PgError::at("read watermark"))?;
        let mut watermark = match row {
            None => EpochWatermark::default(),
            Some(r) => {
                let high: &str = r.get(0);
                let high = u128::from_str_radix(high, 16)
                    .map_err(|e| PgError::Corrupt(format!("watermark {high:?} is not hex: {e}")))?;
                EpochWatermark::at(Some(high), r.get::<_, i64>(1).max(0) as u64)
            }
        };
        let mut advanced: Option<(u128, i64)> = None;
        for index in members {
            let inbound = &batch[index];
            let IdempotencyKey::Sequence { value, .. } = &inbound.delivery.key else {
                continue;
            };
            verdicts[index] = Some(match watermark.observe(*value, inbound.delivery.source_epoch) {
                SequenceVerdict::New => {
                    advanced = Some((*value, inbound.offset + 1));
                    Ok(true)
                }
                SequenceVerdict::Duplicate => Ok(false),
                refused => Err(refusal_detail(
                    &inbound.delivery.key,
                    inbound.delivery.source_epoch,
                    refused,
                )),
            });
        }
        if let Some((high, next_offset)) = advanced {
            tx.execute(
                "INSERT INTO exactly_watermarks (consumer, source, topic, partition, high_key, next_offset, source_epoch)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (consumer, source, topic, partition)
                 DO UPDATE SET high_key = excluded.high_key, next_offset = excluded.next_offset,
                               source_epoch = excluded.source_epoch",
                &[
                    &consumer,
                    &source,
                    &topic,
                    &partition,
                    &format!("{high:032x}"),
                    &next_offset,
                    &(watermark.epoch() as i64),
                ],
            )
            .await
            .map_err(PgError::at("advance watermark"))?;
        }
    }
    Ok(())
}

impl<H: PgHandler> PgEffects<H> {
    /// Applies parked message `id` of this consumer through the handler, in one transaction
    /// with its key recorded in the key set and its parked row removed. A key found recorded
    /// means it was applied already: only the parked row goes. A handler error changes nothing.
    pub async fn replay_parked(&self, id: i64) -> Result<ReplayOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::at("begin replay"))?;
        let row = tx
            .query_opt(
                &format!(
                    "DELETE FROM exactly_parked p WHERE p.consumer = $1 AND p.id = $2 RETURNING {}",
                    crate::operate::PARKED_COLUMNS
                ),
                &[&self.consumer, &id],
            )
            .await
            .map_err(PgError::at("take parked message"))?;
        let Some(row) = row else {
            return Ok(ReplayOutcome::NotFound);
        };
        let parked = crate::operate::parked_row(&row);
        let delivery = match parked.delivery() {
            Ok(delivery) => delivery,
            // Dropping the transaction keeps the row.
            Err(why) => return Ok(ReplayOutcome::Unreplayable(why)),
        };
        let recorded = tx
            .query_opt(
                "INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, \"offset\", processed_at)
                 VALUES ($1, $2, $3::text::uuid, $4, $5, $6, clock_timestamp())
                 ON CONFLICT DO NOTHING RETURNING 1",
                &[
                    &self.consumer,
                    &delivery.key.to_string(),
                    &delivery.envelope.event_id.hyphenated().to_string(),
                    &parked.topic,
                    &parked.partition,
                    &parked.offset,
                ],
            )
            .await
            .map_err(PgError::at("record replayed key"))?;
        if recorded.is_none() {
            tx.commit().await.map_err(PgError::at("commit replay"))?;
            return Ok(ReplayOutcome::AlreadyApplied);
        }
        let inbound = Inbound {
            topic: &parked.topic,
            partition: parked.partition,
            offset: parked.offset,
            delivery: &delivery,
            now: UnixMillis(crate::wal::now_ms()),
        };
        if let Err(error) = self.handler.handle(&tx, &inbound).await {
            return Ok(ReplayOutcome::HandlerFailed(error.to_string()));
        }
        tx.commit().await.map_err(PgError::at("commit replay"))?;
        Ok(ReplayOutcome::Applied)
    }
}

impl<H> PgEffects<H> {
    /// The connection, reopened first if it closed.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, PgError> {
        let mut client = self.client.lock().await;
        reconnect_if_closed(&self.url, &mut client).await?;
        Ok(client)
    }
}

impl<H: PgHandler> EffectStore for PgEffects<H> {
    /// A batch of one: the same transaction as [`EffectStore::apply_batch`], with the
    /// handler's error returned for the consumer's retry-or-park decision.
    async fn apply(&self, inbound: Inbound<'_>) -> Result<ApplyOutcome, StoreError> {
        match self.apply_batch(std::slice::from_ref(&inbound)).await? {
            BatchOutcome::Committed(mut outcomes) => outcomes
                .pop()
                .ok_or_else(|| PgError::Corrupt("a batch of one gave no outcome".into()).into()),
            BatchOutcome::HandlerFailed { error, .. } => Ok(ApplyOutcome::Failed(error)),
        }
    }

    async fn apply_batch(&self, batch: &[Inbound<'_>]) -> Result<BatchOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::at("begin apply"))?;
        let verdicts = if self.dedupe {
            let mut verdicts = record_set_keys(&tx, &self.consumer, batch).await?;
            record_sequence_keys(&tx, &self.consumer, batch, &mut verdicts).await?;
            verdicts
        } else {
            vec![Some(Ok(true)); batch.len()]
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut new: Vec<Inbound<'_>> = Vec::with_capacity(batch.len());
        for (inbound, verdict) in batch.iter().zip(verdicts) {
            outcomes.push(match verdict {
                Some(Ok(true)) => {
                    new.push(*inbound);
                    ApplyOutcome::Applied
                }
                Some(Ok(false)) => ApplyOutcome::Duplicate,
                // Nothing was written for it: the batch goes on without it.
                Some(Err(detail)) => ApplyOutcome::Refused(ParkReason::SourceRegressed, detail),
                None => return Err(PgError::Corrupt("a record's key was not judged".into()).into()),
            });
        }
        let applied_keys: Vec<String> = new.iter().map(|i| i.delivery.key.to_string()).collect();
        if let Err(error) = self.handler.handle_batch(&tx, &new).await {
            // Dropping the transaction rolls back the whole batch, keys and partial effects; the
            // consumer applies the records one by one, the failing one retried or parked in its
            // place.
            let index = outcomes
                .iter()
                .position(|o| matches!(o, ApplyOutcome::Applied))
                .unwrap_or(0);
            return Ok(BatchOutcome::HandlerFailed { index, error });
        }
        if !applied_keys.is_empty() {
            // A message parked earlier (retries exhausted, then redelivered and applied) is
            // applied now: it must not stay parked, or a replay would apply it twice.
            tx.execute(
                "DELETE FROM exactly_parked WHERE consumer = $1 AND key_text = ANY($2)",
                &[&self.consumer, &applied_keys],
            )
            .await
            .map_err(PgError::at("unpark applied messages"))?;
        }
        tx.commit().await.map_err(PgError::at("commit apply"))?;
        Ok(BatchOutcome::Committed(outcomes))
    }

    async fn forget_keys_before(&self, cutoff: UnixMillis, limit: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let forgotten = client
            .execute(
                "DELETE FROM exactly_processed WHERE ctid = ANY (ARRAY(
                     SELECT ctid FROM exactly_processed
                     WHERE consumer = $1 AND processed_at < to_timestamp($2::float8 / 1000) LIMIT $3))",
                &[&self.consumer, &(cutoff.0 as f64), &limit],
            )
            .await
            .map_err(PgError::at("prune processed keys"))?;
        Ok(forgotten)
    }

    async fn resume_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT max(next_offset) FROM exactly_watermarks WHERE consumer = $1 AND topic = $2 AND partition = $3",
                &[&self.consumer, &topic, &partition],
            )
            .await
            .map_err(PgError::at("read resume offset"))?;
        Ok(row.get(0))
    }

    async fn park(&self, m: &ParkedMessage) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO exactly_parked (consumer, topic, partition, \"offset\", reason, detail, key_text, record_key, headers, payload, parked_at)
                 SELECT $1::text, $2::text, $3::int4, $4::int8, $5::text, $6::text, $7::text, $8::bytea,
                        $9::text, $10::bytea, to_timestamp($11::float8 / 1000)
                 WHERE $7::text IS NULL OR NOT EXISTS
                     (SELECT 1 FROM exactly_parked WHERE consumer = $1::text AND key_text = $7::text)
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
