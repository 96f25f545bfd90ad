//! The consumer's side on PostgreSQL: dedupe record and effect in one transaction.

use std::collections::HashSet;
use std::sync::Arc;

use exactly_core::dedupe::{after_replays, refusal_detail, replay_moves_watermark, replayed_key_text};
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

/// A partition's watermark row, read row-locked: the watermark and whether the row exists.
async fn lock_watermark(
    tx: &Transaction<'_>,
    consumer: &str,
    (source, topic, partition): (&str, &str, i32),
) -> Result<(EpochWatermark, Option<i64>), PgError> {
    let row = tx
        .query_opt(
            "SELECT high_key, source_epoch, next_offset FROM exactly_watermarks
             WHERE consumer = $1 AND source = $2 AND topic = $3 AND partition = $4 FOR UPDATE",
            &[&consumer, &source, &topic, &partition],
        )
        .await
        .map_err(PgError::at("read watermark"))?;
    let Some(r) = row else {
        return Ok((EpochWatermark::default(), None));
    };
    let high: &str = r.get(0);
    let high = u128::from_str_radix(high, 16)
        .map_err(|e| PgError::Corrupt(format!("watermark {high:?} is not hex: {e}")))?;
    Ok((
        EpochWatermark::at(Some(high), r.get::<_, i64>(1).max(0) as u64),
        Some(r.get(2)),
    ))
}

/// Writes a partition's watermark. A row that did not exist when it was read is inserted, and
/// one that another transaction inserted meanwhile (a live member and a replay, or two members
/// in a rebalance, judging against no row at once) fails the transaction with a retryable
/// error, so the loser judges again against the winner's row instead of applying twice.
async fn write_watermark(
    tx: &Transaction<'_>,
    consumer: &str,
    (source, topic, partition): (&str, &str, i32),
    watermark: &EpochWatermark,
    next_offset: i64,
    existed: bool,
) -> Result<(), PgError> {
    let Some(high) = watermark.high() else {
        return Ok(());
    };
    let (high, epoch) = (format!("{high:032x}"), watermark.epoch() as i64);
    let written = if existed {
        tx.execute(
            "UPDATE exactly_watermarks SET high_key = $5, next_offset = $6, source_epoch = $7
             WHERE consumer = $1 AND source = $2 AND topic = $3 AND partition = $4",
            &[&consumer, &source, &topic, &partition, &high, &next_offset, &epoch],
        )
        .await
    } else {
        tx.execute(
            "INSERT INTO exactly_watermarks (consumer, source, topic, partition, high_key, next_offset, source_epoch)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            &[&consumer, &source, &topic, &partition, &high, &next_offset, &epoch],
        )
        .await
    }
    .map_err(PgError::at("advance watermark"))?;
    if written == 1 {
        Ok(())
    } else {
        Err(PgError::Concurrent(
            "another transaction wrote this partition's watermark first",
        ))
    }
}

/// Judges the batch's sequence keys by their watermarks: one row-locked read and at most one
/// write per source, topic and partition, each record judged in order as
/// if they came one by one (the watermark written is the one the last new record left). The row
/// lock makes concurrent appliers of one partition, and replays, serialize. A key the watermark
/// refuses is a repeat if a replay applied it ([`after_replays`]).
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
    let mut refused = Vec::new();
    for (id, members) in groups {
        let (mut watermark, stored_next) = lock_watermark(tx, consumer, id).await?;
        let mut advanced: Option<i64> = None;
        for index in members {
            let inbound = &batch[index];
            let IdempotencyKey::Sequence { value, .. } = &inbound.delivery.key else {
                continue;
            };
            verdicts[index] = Some(match watermark.observe(*value, inbound.delivery.source_epoch) {
                SequenceVerdict::New => {
                    advanced = Some(inbound.offset + 1);
                    Ok(true)
                }
                SequenceVerdict::Duplicate => Ok(false),
                verdict => {
                    refused.push((index, verdict));
                    Err(String::new())
                }
            });
        }
        if let Some(next_offset) = advanced {
            write_watermark(tx, consumer, id, &watermark, next_offset, stored_next.is_some()).await?;
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    // Refused keys are rare (a failover, a restore): one look at the key set for replays.
    let keys: Vec<String> = refused
        .iter()
        .map(|(index, _)| {
            let delivery = batch[*index].delivery;
            replayed_key_text(&delivery.key, delivery.source_epoch)
        })
        .collect();
    let replayed: HashSet<String> = tx
        .query(
            "SELECT key FROM exactly_processed WHERE consumer = $1 AND key = ANY($2)",
            &[&consumer, &keys],
        )
        .await
        .map_err(PgError::at("look up replayed keys"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for ((index, verdict), key) in refused.into_iter().zip(keys) {
        let delivery = batch[index].delivery;
        verdicts[index] = Some(match after_replays(verdict, replayed.contains(&key)) {
            SequenceVerdict::Duplicate => Ok(false),
            verdict => Err(refusal_detail(&delivery.key, delivery.source_epoch, verdict)),
        });
    }
    Ok(())
}

impl<H: PgHandler> PgEffects<H> {
    /// Applies parked message `id` of this consumer through the handler, in one transaction
    /// with its key recorded in the key set and its parked row removed; a sequence key above
    /// its partition's watermark also moves the watermark and the resume offset past it, so the
    /// live path takes the record for a repeat (see [`exactly_core::dedupe::replay_moves_watermark`]).
    /// A key found recorded means it was applied already: only the parked row goes. A handler
    /// error changes nothing.
    ///
    /// Safe beside live members of the group: the replay takes the partition's watermark row
    /// lock before the parked row, in the order the live path takes them, and a live member that
    /// applied the record first has removed the parked row (the replay then reports it applied).
    pub async fn replay_parked(&self, id: i64) -> Result<ReplayOutcome, StoreError> {
        let mut attempt = 0;
        loop {
            match self.replay_once(id).await {
                Err(error) if error.is_conflict() && attempt < 5 => attempt += 1,
                outcome => return Ok(outcome?),
            }
        }
    }

    async fn replay_once(&self, id: i64) -> Result<ReplayOutcome, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::at("begin replay"))?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {} FROM exactly_parked p WHERE p.consumer = $1 AND p.id = $2",
                    crate::operate::PARKED_COLUMNS
                ),
                &[&self.consumer, &id],
            )
            .await
            .map_err(PgError::at("read parked message"))?;
        let Some(row) = row else {
            return Ok(ReplayOutcome::NotFound);
        };
        let parked = crate::operate::parked_row(&row);
        let delivery = match parked.delivery() {
            Ok(delivery) => delivery,
            Err(why) => return Ok(ReplayOutcome::Unreplayable(why)),
        };
        let partition = match &delivery.key {
            IdempotencyKey::Sequence { source, value } => {
                let id = (source.as_str(), parked.topic.as_str(), parked.partition);
                let (watermark, stored_next) = lock_watermark(&tx, &self.consumer, id).await?;
                Some((id, *value, watermark, stored_next))
            }
            _ => None,
        };
        let taken = tx
            .execute(
                "DELETE FROM exactly_parked WHERE consumer = $1 AND id = $2",
                &[&self.consumer, &id],
            )
            .await
            .map_err(PgError::at("take parked message"))?;
        if taken == 0 {
            // A live member applied it (and unparked it) while this replay waited for the lock.
            return Ok(ReplayOutcome::AlreadyApplied);
        }
        let recorded = tx
            .query_opt(
                "INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, \"offset\", processed_at)
                 VALUES ($1, $2, $3::text::uuid, $4, $5, $6, clock_timestamp())
                 ON CONFLICT DO NOTHING RETURNING 1",
                &[
                    &self.consumer,
                    &replayed_key_text(&delivery.key, delivery.source_epoch),
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
        if let Some((id, value, mut watermark, stored_next)) = partition {
            if replay_moves_watermark(&mut watermark, value, delivery.source_epoch) {
                let next_offset = stored_next.unwrap_or(0).max(parked.offset + 1);
                write_watermark(
                    &tx,
                    &self.consumer,
                    id,
                    &watermark,
                    next_offset,
                    stored_next.is_some(),
                )
                .await?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_core::Delivery;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Writes one `effects` row per application; fails while `failing` is set.
    struct Recording {
        failing: Arc<AtomicBool>,
        pause: std::time::Duration,
    }

    impl PgHandler for Recording {
        fn handle<'a>(
            &'a self,
            tx: &'a Transaction<'a>,
            inbound: &'a Inbound<'a>,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                if self.failing.load(Ordering::SeqCst) {
                    return Err(HandlerError::Retryable("downstream is down".into()));
                }
                tx.execute(
                    "INSERT INTO effects (key) VALUES ($1)",
                    &[&inbound.delivery.key.to_string()],
                )
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?;
                tokio::time::sleep(self.pause).await;
                Ok(())
            })
        }
    }

    /// A WAL relay's record: sequence key `value` of source `pg:1:shop`.
    fn sequence(value: u128) -> Delivery {
        exactly_testkit::scenarios::sequence("pg:1:shop", value, None)
    }

    fn inbound(delivery: &Delivery, partition: i32, offset: i64) -> Inbound<'_> {
        Inbound {
            topic: "orders",
            partition,
            offset,
            delivery,
            now: UnixMillis(1_000),
        }
    }

    /// The record parked as the consumer parks one whose retries ran out.
    fn parked(delivery: &Delivery, partition: i32, offset: i64) -> ParkedMessage {
        exactly_testkit::scenarios::parked(delivery, "orders", partition, offset)
    }

    async fn store(url: &str, failing: &Arc<AtomicBool>, pause_ms: u64) -> PgEffects<Recording> {
        let handler = Recording {
            failing: failing.clone(),
            pause: std::time::Duration::from_millis(pause_ms),
        };
        PgEffects::connect(url, "ledger", handler).await.expect("connect")
    }

    async fn parked_id(client: &Client, partition: i32) -> i64 {
        client
            .query_one(
                "SELECT id FROM exactly_parked WHERE consumer = 'ledger' AND partition = $1",
                &[&partition],
            )
            .await
            .expect("parked row")
            .get(0)
    }

    async fn effects(client: &Client, key: &IdempotencyKey) -> i64 {
        client
            .query_one("SELECT count(*) FROM effects WHERE key = $1", &[&key.to_string()])
            .await
            .expect("count")
            .get(0)
    }

    /// The review's scenario: the last record of a partition is parked (the watermark stays
    /// below it), replayed, and read again after a restart: it applies once.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_replayed_sequence_record_read_again_after_a_restart_applies_once() {
        let url = exactly_testkit::fresh_pg_database().await;
        let failing = Arc::new(AtomicBool::new(false));
        let consumer = store(&url, &failing, 0).await;
        let client = crate::connect(&url).await.expect("connect");
        client
            .batch_execute("CREATE TABLE effects (key TEXT NOT NULL)")
            .await
            .expect("schema");
        let records: Vec<Delivery> = (1..=10).map(sequence).collect();
        for (offset, d) in records.iter().enumerate().take(9) {
            let outcome = consumer
                .apply(inbound(d, 0, offset as i64 + 1))
                .await
                .expect("apply");
            assert_eq!(outcome, ApplyOutcome::Applied);
        }
        failing.store(true, Ordering::SeqCst);
        let last = &records[9];
        assert!(matches!(
            consumer.apply(inbound(last, 0, 10)).await.expect("apply"),
            ApplyOutcome::Failed(_)
        ));
        consumer.park(&parked(last, 0, 10)).await.expect("park");
        assert_eq!(
            consumer.resume_offset("orders", 0).await.expect("resume"),
            Some(10)
        );
        failing.store(false, Ordering::SeqCst);
        let id = parked_id(&client, 0).await;
        assert_eq!(
            consumer.replay_parked(id).await.expect("replay"),
            ReplayOutcome::Applied
        );
        assert_eq!(
            consumer.resume_offset("orders", 0).await.expect("resume"),
            Some(11),
            "the replay moved the resume offset past the record"
        );
        // A restart that seeks to 10 anyway (an older stored offset, a rebalance) reads it again.
        let restarted = store(&url, &failing, 0).await;
        assert_eq!(
            restarted.apply(inbound(last, 0, 10)).await.expect("apply"),
            ApplyOutcome::Duplicate
        );
        assert_eq!(effects(&client, &last.key).await, 1);
        assert_eq!(
            consumer.replay_parked(id).await.expect("replay"),
            ReplayOutcome::NotFound
        );
    }

    /// A replay and a live member that reads the parked record again, at the same time, on
    /// partitions with and without a watermark row: one of them applies it, the other sees that.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_replay_racing_a_live_consumer_applies_once() {
        let url = exactly_testkit::fresh_pg_database().await;
        let failing = Arc::new(AtomicBool::new(false));
        let (live, operator) = (store(&url, &failing, 30).await, store(&url, &failing, 30).await);
        let client = crate::connect(&url).await.expect("connect");
        client
            .batch_execute("CREATE TABLE effects (key TEXT NOT NULL)")
            .await
            .expect("schema");
        for partition in 0..12 {
            // Even partitions have applied records before the parked one; odd ones have none.
            let base = partition as u128 * 100;
            if partition % 2 == 0 {
                let before = sequence(base + 1);
                live.apply(inbound(&before, partition, 0)).await.expect("apply");
            }
            let record = sequence(base + 2);
            live.park(&parked(&record, partition, 1)).await.expect("park");
            let id = parked_id(&client, partition).await;
            let again = async {
                loop {
                    match live.apply(inbound(&record, partition, 1)).await {
                        Ok(outcome) => break outcome,
                        Err(e) if e.is_retryable() => continue,
                        Err(e) => panic!("live apply: {e}"),
                    }
                }
            };
            let (replayed, applied) = tokio::join!(operator.replay_parked(id), again);
            let replayed = replayed.expect("replay");
            assert_eq!(effects(&client, &record.key).await, 1, "partition {partition}");
            match applied {
                ApplyOutcome::Applied => assert!(
                    matches!(replayed, ReplayOutcome::AlreadyApplied | ReplayOutcome::NotFound),
                    "partition {partition}: {replayed:?}"
                ),
                ApplyOutcome::Duplicate => assert_eq!(replayed, ReplayOutcome::Applied),
                other => panic!("partition {partition}: {other:?}"),
            }
            assert_eq!(
                live.apply(inbound(&record, partition, 1)).await.expect("apply"),
                ApplyOutcome::Duplicate
            );
        }
    }
}
