//! The consumer's side on SQLite: dedupe record and effect in one transaction.

use std::path::Path;
use std::sync::Arc;

use exactly_core::dedupe::{after_replays, refusal_detail, replay_moves_watermark, replayed_key_text};
use exactly_core::operate::ReplayOutcome;
use exactly_core::record::raw_headers_to_json;
use exactly_core::{
    ApplyOutcome, BatchOutcome, Delivery, EffectStore, EpochWatermark, HandlerError, IdempotencyKey, Inbound,
    ParkReason, ParkedMessage, SequenceVerdict, StoreError, UnixMillis,
};
use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::{open, Shared};
use crate::error::SqliteError;

/// Application code run inside the dedupe transaction. Whatever it writes through `tx`
/// commits together with the dedupe record, or not at all.
pub trait SqliteHandler: Send + Sync + 'static {
    /// Applies one event, received as `inbound` (the decoded record and where it was read).
    fn handle(&self, tx: &Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError>;
}

/// A closure over the decoded record is a handler.
impl<F> SqliteHandler for F
where
    F: Fn(&Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, tx: &Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        self(tx, inbound.delivery)
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
}

/// What recording a key found.
pub(crate) enum Recorded {
    New,
    Duplicate,
    Refused(String),
}

/// A partition's watermark and its stored resume offset (`None`: no row yet).
fn read_watermark(
    tx: &Transaction<'_>,
    consumer: &str,
    (source, topic, partition): (&str, &str, i32),
) -> Result<(EpochWatermark, Option<i64>), SqliteError> {
    let stored: Option<(String, i64, i64)> = tx
        .query_row(
            "SELECT high_key, source_epoch, next_offset FROM exactly_watermarks WHERE consumer = ?1 AND source = ?2 AND topic = ?3 AND partition = ?4",
            params![consumer, source, topic, partition],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(SqliteError::at("read watermark"))?;
    let Some((high, epoch, next)) = stored else {
        return Ok((EpochWatermark::default(), None));
    };
    let high = u128::from_str_radix(&high, 16)
        .map_err(|e| SqliteError::Runtime(format!("watermark {high:?} is not hex: {e}")))?;
    Ok((EpochWatermark::at(Some(high), epoch.max(0) as u64), Some(next)))
}

/// Stores a partition's watermark and resume offset.
fn write_watermark(
    tx: &Transaction<'_>,
    consumer: &str,
    (source, topic, partition): (&str, &str, i32),
    watermark: &EpochWatermark,
    next_offset: i64,
) -> Result<(), SqliteError> {
    let Some(high) = watermark.high() else {
        return Ok(());
    };
    tx.execute(
        "INSERT INTO exactly_watermarks (consumer, source, topic, partition, high_key, next_offset, source_epoch)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (consumer, source, topic, partition) DO UPDATE SET high_key = excluded.high_key,
            next_offset = excluded.next_offset, source_epoch = excluded.source_epoch",
        params![
            consumer,
            source,
            topic,
            partition,
            format!("{high:032x}"),
            next_offset,
            watermark.epoch() as i64
        ],
    )
    .map_err(SqliteError::at("advance watermark"))?;
    Ok(())
}

/// Whether a replay recorded this sequence key (see [`replayed_key_text`]).
fn replayed(tx: &Transaction<'_>, consumer: &str, delivery: &Delivery) -> Result<bool, SqliteError> {
    tx.query_row(
        "SELECT 1 FROM exactly_processed WHERE consumer = ?1 AND key = ?2",
        params![consumer, replayed_key_text(&delivery.key, delivery.source_epoch)],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(SqliteError::at("look up replayed key"))
}

/// Records `key` for `consumer`. Sequence keys are judged by the watermark of their source,
/// topic and partition (with the source's epoch; a refused key a replay applied is a repeat);
/// others go into the key set. The transaction holds SQLite's write lock, so a replay and a
/// live apply never judge at once.
pub(crate) fn record_key(
    tx: &Transaction<'_>,
    consumer: &str,
    inbound: &InboundOwned,
) -> Result<Recorded, SqliteError> {
    match &inbound.delivery.key {
        IdempotencyKey::Sequence { source, value } => {
            let id = (source.as_str(), inbound.topic.as_str(), inbound.partition);
            let (mut watermark, _) = read_watermark(tx, consumer, id)?;
            let delivery = &inbound.delivery;
            match watermark.observe(*value, delivery.source_epoch) {
                SequenceVerdict::New => {}
                SequenceVerdict::Duplicate => return Ok(Recorded::Duplicate),
                refused => {
                    return Ok(match after_replays(refused, replayed(tx, consumer, delivery)?) {
                        SequenceVerdict::Duplicate => Recorded::Duplicate,
                        refused => {
                            Recorded::Refused(refusal_detail(&delivery.key, delivery.source_epoch, refused))
                        }
                    });
                }
            }
            write_watermark(tx, consumer, id, &watermark, inbound.offset + 1)?;
            Ok(Recorded::New)
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
            Ok(if inserted == 1 {
                Recorded::New
            } else {
                Recorded::Duplicate
            })
        }
    }
}

/// A message parked earlier (retries exhausted, then redelivered and applied) is applied now:
/// it must not stay parked, or a replay would apply it twice.
fn unpark(tx: &Transaction<'_>, consumer: &str, delivery: &Delivery) -> Result<(), SqliteError> {
    tx.execute(
        "DELETE FROM exactly_parked WHERE consumer = ?1 AND key_text = ?2",
        params![consumer, delivery.key.to_string()],
    )
    .map_err(SqliteError::at("unpark applied message"))?;
    Ok(())
}

impl<H: SqliteHandler> SqliteEffects<H> {
    /// Applies parked message `id` of this consumer through the handler, in one transaction
    /// with its key recorded in the key set and its parked row removed; a sequence key above
    /// its partition's watermark also moves the watermark and the resume offset past it (see
    /// [`exactly_core::dedupe::replay_moves_watermark`]). It holds the write lock, so it never
    /// runs beside a live member's apply. A key found recorded
    /// means it was applied already: only the parked row goes. A handler error changes nothing.
    pub async fn replay_parked(&self, id: i64) -> Result<ReplayOutcome, StoreError> {
        let (consumer, handler) = (self.consumer.clone(), self.handler.clone());
        let outcome = self
            .db
            .run(move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(SqliteError::at("begin replay"))?;
                let parked = tx
                    .query_row(
                        &format!(
                            "SELECT {} FROM exactly_parked p WHERE p.consumer = ?1 AND p.id = ?2",
                            crate::operate::PARKED_COLUMNS
                        ),
                        params![&*consumer, id],
                        crate::operate::parked_row,
                    )
                    .optional()
                    .map_err(SqliteError::at("read parked message"))?;
                let Some(parked) = parked else {
                    return Ok(ReplayOutcome::NotFound);
                };
                let delivery = match parked.delivery() {
                    Ok(delivery) => delivery,
                    Err(why) => return Ok(ReplayOutcome::Unreplayable(why)),
                };
                tx.execute(
                    "DELETE FROM exactly_parked WHERE consumer = ?1 AND id = ?2",
                    params![&*consumer, id],
                )
                .map_err(SqliteError::at("remove parked message"))?;
                let recorded = tx
                    .execute(
                        "INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, \"offset\", processed_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
                         ON CONFLICT DO NOTHING",
                        params![
                            &*consumer,
                            replayed_key_text(&delivery.key, delivery.source_epoch),
                            delivery.envelope.event_id.hyphenated().to_string(),
                            parked.topic,
                            parked.partition,
                            parked.offset
                        ],
                    )
                    .map_err(SqliteError::at("record replayed key"))?;
                if recorded == 0 {
                    tx.commit().map_err(SqliteError::at("commit replay"))?;
                    return Ok(ReplayOutcome::AlreadyApplied);
                }
                if let IdempotencyKey::Sequence { source, value } = &delivery.key {
                    let id = (source.as_str(), parked.topic.as_str(), parked.partition);
                    let (mut watermark, stored_next) = read_watermark(&tx, &consumer, id)?;
                    if replay_moves_watermark(&mut watermark, *value, delivery.source_epoch) {
                        let next_offset = stored_next.unwrap_or(0).max(parked.offset + 1);
                        write_watermark(&tx, &consumer, id, &watermark, next_offset)?;
                    }
                }
                let inbound = Inbound {
                    topic: &parked.topic,
                    partition: parked.partition,
                    offset: parked.offset,
                    delivery: &delivery,
                    now: UnixMillis(now_ms()),
                };
                if let Err(error) = handler.handle(&tx, &inbound) {
                    return Ok(ReplayOutcome::HandlerFailed(error.to_string()));
                }
                tx.commit().map_err(SqliteError::at("commit replay"))?;
                Ok(ReplayOutcome::Applied)
            })
            .await?;
        Ok(outcome)
    }
}

pub(crate) struct InboundOwned {
    topic: String,
    partition: i32,
    offset: i64,
    delivery: Delivery,
    now: UnixMillis,
}

impl InboundOwned {
    fn borrowed(&self) -> Inbound<'_> {
        Inbound {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            delivery: &self.delivery,
            now: self.now,
        }
    }
}

/// The wall clock (the replay's receive time).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl From<&Inbound<'_>> for InboundOwned {
    /// A copy that can move to the blocking pool.
    fn from(inbound: &Inbound<'_>) -> Self {
        InboundOwned {
            topic: inbound.topic.to_owned(),
            partition: inbound.partition,
            offset: inbound.offset,
            delivery: inbound.delivery.clone(),
            now: inbound.now,
        }
    }
}

impl<H: SqliteHandler> EffectStore for SqliteEffects<H> {
    /// A batch of one: the same transaction as [`EffectStore::apply_batch`], with the
    /// handler's error returned for the consumer's retry-or-park decision.
    async fn apply(&self, inbound: Inbound<'_>) -> Result<ApplyOutcome, StoreError> {
        match self.apply_batch(std::slice::from_ref(&inbound)).await? {
            BatchOutcome::Committed(mut outcomes) => outcomes
                .pop()
                .ok_or_else(|| StoreError::stop("apply", "a batch of one gave no outcome")),
            BatchOutcome::HandlerFailed { error, .. } => Ok(ApplyOutcome::Failed(error)),
        }
    }

    async fn apply_batch(&self, batch: &[Inbound<'_>]) -> Result<BatchOutcome, StoreError> {
        let owned: Vec<InboundOwned> = batch.iter().map(InboundOwned::from).collect();
        let (consumer, handler) = (self.consumer.clone(), self.handler.clone());
        let outcome = self
            .db
            .run(move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(SqliteError::at("begin apply"))?;
                let mut outcomes = Vec::with_capacity(owned.len());
                for (index, inbound) in owned.iter().enumerate() {
                    outcomes.push(match record_key(&tx, &consumer, inbound)? {
                        Recorded::New => match handler.handle(&tx, &inbound.borrowed()) {
                            Ok(()) => {
                                unpark(&tx, &consumer, &inbound.delivery)?;
                                ApplyOutcome::Applied
                            }
                            // Dropping the transaction rolls back the whole batch, keys and
                            // partial effects.
                            Err(error) => return Ok(BatchOutcome::HandlerFailed { index, error }),
                        },
                        Recorded::Duplicate => ApplyOutcome::Duplicate,
                        // Nothing was written for it: the batch goes on without it.
                        Recorded::Refused(detail) => {
                            ApplyOutcome::Refused(ParkReason::SourceRegressed, detail)
                        }
                    });
                }
                tx.commit().map_err(SqliteError::at("commit apply"))?;
                Ok(BatchOutcome::Committed(outcomes))
            })
            .await?;
        Ok(outcome)
    }

    async fn forget_keys_before(&self, cutoff: UnixMillis, limit: u64) -> Result<u64, StoreError> {
        let consumer = self.consumer.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let forgotten = self
            .db
            .run(move |conn| {
                conn.execute(
                    "DELETE FROM exactly_processed WHERE rowid IN (
                         SELECT rowid FROM exactly_processed WHERE consumer = ?1 AND processed_at < ?2 LIMIT ?3)",
                    params![&*consumer, cutoff.0, limit],
                )
                .map_err(SqliteError::at("prune processed keys"))
            })
            .await?;
        Ok(forgotten as u64)
    }

    async fn resume_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let (consumer, topic) = (self.consumer.clone(), topic.to_owned());
        let offset = self
            .db
            .run(move |conn| {
                conn.query_row(
                    "SELECT max(next_offset) FROM exactly_watermarks WHERE consumer = ?1 AND topic = ?2 AND partition = ?3",
                    params![&*consumer, topic, partition],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .map_err(SqliteError::at("read resume offset"))
            })
            .await?;
        Ok(offset)
    }

    async fn park(&self, message: &ParkedMessage) -> Result<(), StoreError> {
        let (consumer, m) = (self.consumer.clone(), message.clone());
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT INTO exactly_parked (consumer, topic, partition, \"offset\", reason, detail, key_text, record_key, headers, payload, parked_at)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11
                     WHERE ?7 IS NULL OR NOT EXISTS
                         (SELECT 1 FROM exactly_parked WHERE consumer = ?1 AND key_text = ?7)
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

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_core::Envelope;

    fn delivery(n: u128) -> Delivery {
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_4def_8123_0000_0000_0000 | n);
        Delivery {
            key: IdempotencyKey::UuidV4(id),
            envelope: Envelope {
                event_id: id,
                event_type: "T".into(),
                aggregate_type: "thing".into(),
                aggregate_id: "A".into(),
                occurred_at: UnixMillis(0),
                payload: b"{}".to_vec(),
                headers: vec![],
            },
            source_epoch: None,
        }
    }

    fn sequence(value: u128) -> Delivery {
        exactly_testkit::scenarios::sequence("pg:1:shop", value, None)
    }

    fn parked(d: &Delivery, offset: i64) -> ParkedMessage {
        exactly_testkit::scenarios::parked(d, "t", 0, offset)
    }

    fn parked_id(path: &Path) -> i64 {
        rusqlite::Connection::open(path)
            .expect("open")
            .query_row("SELECT id FROM exactly_parked", [], |r| r.get(0))
            .expect("parked row")
    }

    /// A handler writing one `effects` row per application, failing while `failing` is set.
    fn recording(
        failing: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl Fn(&Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + Sync + 'static {
        move |tx: &Transaction<'_>, d: &Delivery| {
            if failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(HandlerError::Retryable("downstream is down".into()));
            }
            tx.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)", [])
                .and_then(|_| tx.execute("INSERT INTO effects (key) VALUES (?1)", [d.key.to_string()]))
                .map(|_| ())
                .map_err(|e| HandlerError::Retryable(e.to_string()))
        }
    }

    fn count_effects(path: &Path, key: &IdempotencyKey) -> i64 {
        let conn = rusqlite::Connection::open(path).expect("open");
        conn.query_row(
            "SELECT count(*) FROM effects WHERE key = ?1",
            [key.to_string()],
            |r| r.get(0),
        )
        .expect("count")
    }

    /// The review's scenario: the last record of a partition is parked (the watermark stays
    /// below it), replayed, and read again after a restart: it applies once.
    #[tokio::test]
    async fn a_replayed_sequence_record_read_again_after_a_restart_applies_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = SqliteEffects::open(&path, "c", recording(failing.clone())).expect("open");
        let records: Vec<Delivery> = (1..=10).map(sequence).collect();
        let at = |d, offset| Inbound {
            topic: "t",
            partition: 0,
            offset,
            delivery: d,
            now: UnixMillis(1),
        };
        for (offset, d) in records.iter().enumerate().take(9) {
            assert_eq!(
                store.apply(at(d, offset as i64 + 1)).await.expect("apply"),
                ApplyOutcome::Applied
            );
        }
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        let last = &records[9];
        assert!(matches!(
            store.apply(at(last, 10)).await.expect("apply"),
            ApplyOutcome::Failed(_)
        ));
        store.park(&parked(last, 10)).await.expect("park");
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        let id = parked_id(&path);
        assert_eq!(
            store.replay_parked(id).await.expect("replay"),
            ReplayOutcome::Applied
        );
        assert_eq!(store.resume_offset("t", 0).await.expect("resume"), Some(11));
        let restarted = SqliteEffects::open(&path, "c", recording(failing.clone())).expect("open");
        assert_eq!(
            restarted.apply(at(last, 10)).await.expect("apply"),
            ApplyOutcome::Duplicate
        );
        assert_eq!(count_effects(&path, &last.key), 1);

        // A key the watermark refuses (a newer epoch below it), replayed, then met again live:
        // a repeat, not parked a second time.
        let mut regressed = sequence(5);
        regressed.source_epoch = Some(1);
        assert!(matches!(
            store.apply(at(&regressed, 11)).await.expect("apply"),
            ApplyOutcome::Refused(ParkReason::SourceRegressed, _)
        ));
        store.park(&parked(&regressed, 11)).await.expect("park");
        let id = parked_id(&path);
        assert_eq!(
            store.replay_parked(id).await.expect("replay"),
            ReplayOutcome::Applied
        );
        assert_eq!(
            store.apply(at(&regressed, 11)).await.expect("apply"),
            ApplyOutcome::Duplicate
        );
        // The same position as the first history's event 5: that one and this one, once each.
        assert_eq!(count_effects(&path, &regressed.key), 2);
    }

    /// A replay and a live member (another process's connection) reading the parked record
    /// again at the same time: one applies it, the other sees that.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_replay_racing_a_live_consumer_applies_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = SqliteEffects::open(&path, "c", recording(failing.clone())).expect("open");
        let operator = SqliteEffects::open(&path, "c", recording(failing.clone())).expect("open");
        for round in 0..20u128 {
            let record = sequence(1_000 + round);
            live.park(&parked(&record, round as i64)).await.expect("park");
            let id = parked_id(&path);
            let inbound = Inbound {
                topic: "t",
                partition: 0,
                offset: round as i64,
                delivery: &record,
                now: UnixMillis(1),
            };
            let (replayed, applied) = tokio::join!(operator.replay_parked(id), live.apply(inbound));
            let (replayed, applied) = (replayed.expect("replay"), applied.expect("apply"));
            assert_eq!(count_effects(&path, &record.key), 1, "round {round}");
            match applied {
                ApplyOutcome::Applied => assert!(matches!(replayed, ReplayOutcome::NotFound)),
                ApplyOutcome::Duplicate => assert_eq!(replayed, ReplayOutcome::Applied),
                other => panic!("round {round}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn keys_past_the_retention_are_forgotten_and_younger_ones_still_dedupe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let noop = |_: &Transaction<'_>, _: &Delivery| Ok(());
        let store = SqliteEffects::open(&dir.path().join("c.db"), "c", noop).expect("open");
        let (old, young) = (delivery(1), delivery(2));
        for (d, at, offset) in [(&old, 1_000, 0), (&young, 5_000, 1)] {
            let inbound = Inbound {
                topic: "t",
                partition: 0,
                offset,
                delivery: d,
                now: UnixMillis(at),
            };
            assert_eq!(store.apply(inbound).await.expect("apply"), ApplyOutcome::Applied);
        }
        assert_eq!(
            store
                .forget_keys_before(UnixMillis(2_000), 100)
                .await
                .expect("prune"),
            1
        );
        let again = |d| Inbound {
            topic: "t",
            partition: 0,
            offset: 2,
            delivery: d,
            now: UnixMillis(6_000),
        };
        assert_eq!(
            store.apply(again(&young)).await.expect("apply"),
            ApplyOutcome::Duplicate
        );
        assert_eq!(
            store.apply(again(&old)).await.expect("apply"),
            ApplyOutcome::Applied
        );
    }

    #[tokio::test]
    async fn a_prune_deletes_at_most_its_limit_and_only_past_the_cutoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let noop = |_: &Transaction<'_>, _: &Delivery| Ok(());
        let store = SqliteEffects::open(&dir.path().join("c.db"), "c", noop).expect("open");
        for n in 0..27i64 {
            let d = delivery(100 + n as u128);
            let inbound = Inbound {
                topic: "t",
                partition: 0,
                offset: n,
                delivery: &d,
                // 25 old, 2 young.
                now: UnixMillis(if n < 25 { 1_000 } else { 9_000 }),
            };
            assert_eq!(store.apply(inbound).await.expect("apply"), ApplyOutcome::Applied);
        }
        let mut rounds = Vec::new();
        loop {
            let n = store
                .forget_keys_before(UnixMillis(5_000), 10)
                .await
                .expect("prune");
            rounds.push(n);
            if n < 10 {
                break;
            }
        }
        assert_eq!(rounds, [10, 10, 5]);
        assert_eq!(
            store
                .forget_keys_before(UnixMillis(5_000), 10)
                .await
                .expect("prune"),
            0,
            "the young keys stay"
        );
    }
}
