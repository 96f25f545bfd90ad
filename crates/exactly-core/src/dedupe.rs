//! Dedupe rules as pure state machines. Adapters persist the same rules in tables;
//! these are the reference the proptests pin down.

use std::collections::{HashMap, VecDeque};

use crate::key::IdempotencyKey;
use crate::time::UnixMillis;

/// What a dedupe rule says of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First sighting: apply the effect.
    New,
    /// Seen before: skip the effect (a dedupe hit).
    Duplicate,
}

/// One high watermark for one (source, partition): constant space, for monotonic sequences.
///
/// Correct only if every key of the source reaches this partition in increasing order,
/// which is the ordering invariant relays keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermark {
    high: Option<u128>,
}

impl Watermark {
    /// A watermark that has seen `high` already.
    pub fn at(high: Option<u128>) -> Self {
        Watermark { high }
    }

    /// The highest value applied.
    pub fn high(&self) -> Option<u128> {
        self.high
    }

    /// Accepts `value` only if it is above everything seen, and then moves up to it.
    pub fn observe(&mut self, value: u128) -> Verdict {
        match self.high {
            Some(high) if value <= high => Verdict::Duplicate,
            _ => {
                self.high = Some(value);
                Verdict::New
            }
        }
    }
}

/// What a watermark that knows its source's epochs says of one sequence key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceVerdict {
    /// Above the watermark, from the current or a newer epoch: apply.
    New,
    /// At or below the watermark, from the watermark's epoch or an older one: a repeat.
    Duplicate,
    /// At or below the watermark but from a newer epoch: the source went backwards (a restore, a
    /// failover to a lagging replica). These are new events that a plain watermark would
    /// discard as repeats; they must be parked, not dropped.
    Regressed {
        /// The watermark's value.
        high: u128,
        /// The watermark's epoch.
        epoch: u64,
    },
    /// Above the watermark but from an epoch older than the watermark's: a write of an
    /// abandoned history (for example the old primary's last commits after a failover).
    StaleEpoch {
        /// The watermark's epoch.
        epoch: u64,
    },
}

/// A [`Watermark`] that also remembers the newest source epoch it applied.
///
/// Without epochs (`None`), it is exactly a plain watermark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochWatermark {
    high: Option<u128>,
    epoch: u64,
}

impl EpochWatermark {
    /// A watermark that has applied `high`, last in `epoch`.
    pub fn at(high: Option<u128>, epoch: u64) -> Self {
        EpochWatermark { high, epoch }
    }

    /// The highest value applied.
    pub fn high(&self) -> Option<u128> {
        self.high
    }

    /// The newest epoch applied.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Judges `value` from `epoch` without changing anything.
    pub fn judge(&self, value: u128, epoch: Option<u64>) -> SequenceVerdict {
        let Some(high) = self.high else {
            return SequenceVerdict::New;
        };
        let epoch = epoch.unwrap_or(self.epoch);
        match (value > high, epoch.cmp(&self.epoch)) {
            (true, std::cmp::Ordering::Less) => SequenceVerdict::StaleEpoch { epoch: self.epoch },
            (true, _) => SequenceVerdict::New,
            (false, std::cmp::Ordering::Greater) => SequenceVerdict::Regressed {
                high,
                epoch: self.epoch,
            },
            (false, _) => SequenceVerdict::Duplicate,
        }
    }

    /// Judges `value` and, if it is new, moves up to it.
    pub fn observe(&mut self, value: u128, epoch: Option<u64>) -> SequenceVerdict {
        let verdict = self.judge(value, epoch);
        if verdict == SequenceVerdict::New {
            self.high = Some(value);
            self.epoch = self.epoch.max(epoch.unwrap_or(self.epoch));
        }
        verdict
    }
}

/// Replays of parked records, judged by the same rule as live deliveries.
///
/// A parked record was never applied: the parked row is the proof (the live path removes it in
/// the transaction that applies the record, a replay in the one that replays it). A replay
/// therefore applies it whatever the watermark says, and records its key in the key set so a
/// second replay finds it. What keeps the live path from applying it a second time:
///
/// - a replayed key above its partition's watermark moves the watermark up to it
///   ([`replay_moves_watermark`]) and the resume offset past it, in the replay's transaction, so
///   a consumer that reads the record again (after a restart, a rebalance, or racing the replay)
///   judges it a repeat. Every key below it on the partition was read before the record was
///   parked (the relays' ordering), so moving the watermark skips nothing;
/// - a replayed key the watermark refuses (an older or newer epoch, [`SequenceVerdict::Regressed`]
///   or [`SequenceVerdict::StaleEpoch`]) stays below or beside the watermark: when the live path
///   meets it again it finds the key recorded and takes it for a repeat
///   ([`after_replays`]) instead of parking it again.
///
/// Both paths hold the partition's watermark row (PostgreSQL: `FOR UPDATE`, a concurrent first
/// write refused by the primary key; SQLite: the write lock) while they judge, so a replay and a
/// live member never both apply one record.
pub fn replay_moves_watermark(watermark: &mut EpochWatermark, value: u128, epoch: Option<u64>) -> bool {
    watermark.observe(value, epoch) == SequenceVerdict::New
}

/// The key-set entry a replay records: the key's text, and for a sequence key that came with
/// its source's epoch, `@epoch` after it, so a replayed event and a new event with the same
/// position in a later history (a failover's timeline) are told apart.
pub fn replayed_key_text(key: &IdempotencyKey, epoch: Option<u64>) -> String {
    match (key, epoch) {
        (IdempotencyKey::Sequence { .. }, Some(epoch)) => format!("{key}@{epoch}"),
        _ => key.to_string(),
    }
}

/// The live path's verdict on a sequence key once replays are known: a key the watermark
/// refuses but a replay applied (`replayed`: found in the key set) is a repeat.
pub fn after_replays(verdict: SequenceVerdict, replayed: bool) -> SequenceVerdict {
    match verdict {
        SequenceVerdict::Regressed { .. } | SequenceVerdict::StaleEpoch { .. } if replayed => {
            SequenceVerdict::Duplicate
        }
        verdict => verdict,
    }
}

/// Words for a parked sequence key that the epoch watermark refused.
pub fn refusal_detail(key: &IdempotencyKey, epoch: Option<u64>, verdict: SequenceVerdict) -> String {
    let epoch = epoch.map_or_else(|| "none".to_owned(), |e| e.to_string());
    match verdict {
        SequenceVerdict::Regressed { high, epoch: at } => format!(
            "source went backwards: key {key} (epoch {epoch}) is at or below the watermark {high:032x} of epoch {at}; a plain watermark would have dropped it as a repeat"
        ),
        SequenceVerdict::StaleEpoch { epoch: at } => format!(
            "key {key} comes from epoch {epoch}, older than the watermark's epoch {at}: an abandoned history"
        ),
        SequenceVerdict::New | SequenceVerdict::Duplicate => format!("key {key}: not refused"),
    }
}

/// Every key seen within a retention window, for keys with no usable order (UUIDv4).
#[derive(Debug, Clone)]
pub struct KeySet {
    retention_ms: i64,
    seen: HashMap<IdempotencyKey, UnixMillis, ahash::RandomState>,
    by_time: VecDeque<(UnixMillis, IdempotencyKey)>,
}

impl KeySet {
    /// An empty set that forgets keys `retention_ms` after they were recorded.
    pub fn new(retention_ms: i64) -> Self {
        KeySet {
            retention_ms,
            seen: HashMap::default(),
            by_time: VecDeque::new(),
        }
    }

    /// New keys are recorded at `now`; keys still retained are duplicates.
    pub fn observe(&mut self, key: &IdempotencyKey, now: UnixMillis) -> Verdict {
        self.expire(now);
        match self.seen.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => Verdict::Duplicate,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(now);
                self.by_time.push_back((now, key.clone()));
                Verdict::New
            }
        }
    }

    /// Forgets keys recorded more than the retention ago; returns how many.
    pub fn expire(&mut self, now: UnixMillis) -> usize {
        let cutoff = now.plus_ms(-self.retention_ms);
        let mut forgotten = 0;
        while let Some((at, _)) = self.by_time.front() {
            if *at >= cutoff {
                break;
            }
            if let Some((_, key)) = self.by_time.pop_front() {
                self.seen.remove(&key);
                forgotten += 1;
            }
        }
        forgotten
    }

    /// Whether `key` is remembered (as a duplicate), without recording it.
    pub fn contains(&self, key: &IdempotencyKey) -> bool {
        self.seen.contains_key(key)
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// How a consumer deduplicates, by key kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupePolicy {
    /// How long key-set entries are kept.
    pub retention_ms: i64,
    /// Time-ordered keys older than this are refused. Must not exceed `retention_ms`:
    /// a key accepted by the horizon whose record was already pruned would apply twice.
    pub horizon_ms: i64,
}

impl Default for DedupePolicy {
    fn default() -> Self {
        const DAY: i64 = 24 * 60 * 60 * 1000;
        DedupePolicy {
            retention_ms: 7 * DAY,
            horizon_ms: 7 * DAY,
        }
    }
}

/// A policy whose horizon outlives its retention.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dedupe horizon ({horizon_ms} ms) exceeds key retention ({retention_ms} ms): old keys could be applied twice")]
pub struct PolicyError {
    /// The horizon asked for.
    pub horizon_ms: i64,
    /// The retention asked for.
    pub retention_ms: i64,
}

/// Which store decides a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupeRoute {
    /// Look the key up in the key set (insert-if-absent).
    KeySet,
    /// Compare with the watermark of this source (per topic and partition).
    Watermark {
        /// The sequence's source.
        source: String,
        /// The sequence value.
        value: u128,
    },
    /// Refuse: a time-ordered key older than the horizon, reported instead of applied.
    TooOld {
        /// How old it is.
        age_ms: i64,
    },
}

impl DedupePolicy {
    /// Checks the horizon/retention relation.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.horizon_ms > self.retention_ms {
            return Err(PolicyError {
                horizon_ms: self.horizon_ms,
                retention_ms: self.retention_ms,
            });
        }
        Ok(())
    }

    /// Picks the rule for `key` at time `now`.
    pub fn route(&self, key: &IdempotencyKey, now: UnixMillis) -> DedupeRoute {
        if let IdempotencyKey::Sequence { source, value } = key {
            return DedupeRoute::Watermark {
                source: source.clone(),
                value: *value,
            };
        }
        match key.embedded_time() {
            Some(at) if now.millis_since(at) > self.horizon_ms => DedupeRoute::TooOld {
                age_ms: now.millis_since(at),
            },
            _ => DedupeRoute::KeySet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    proptest! {
        #[test]
        fn watermark_never_accepts_a_key_at_or_below_itself(
            start in proptest::option::of(any::<u128>()), values in proptest::collection::vec(any::<u128>(), 0..200)
        ) {
            let mut wm = Watermark::at(start);
            for v in values {
                let before = wm.high();
                let verdict = wm.observe(v);
                if let Some(high) = before {
                    if v <= high {
                        prop_assert_eq!(verdict, Verdict::Duplicate);
                        prop_assert_eq!(wm.high(), before);
                    }
                }
                if verdict == Verdict::New {
                    prop_assert_eq!(wm.high(), Some(v));
                }
            }
        }

        #[test]
        fn watermark_accepts_every_next_key_of_an_ordered_stream_with_repeats(
            steps in proptest::collection::vec((1u128..1_000, 0usize..3), 1..200)
        ) {
            // An ordered stream where each key may be redelivered right after, or after a rewind.
            let mut wm = Watermark::default();
            let mut value = 0u128;
            let mut sent: Vec<u128> = Vec::new();
            let mut accepted = Vec::new();
            for (gap, repeats) in steps {
                value += gap;
                sent.push(value);
                if wm.observe(value) == Verdict::New { accepted.push(value); }
                // A rewind resends a suffix of what was sent.
                let from = sent.len().saturating_sub(repeats);
                for v in sent[from..].iter().copied() {
                    prop_assert_eq!(wm.observe(v), Verdict::Duplicate);
                }
            }
            prop_assert_eq!(accepted, sent);
        }

        #[test]
        fn key_set_applies_each_key_once_within_retention(
            picks in proptest::collection::vec((0u8..20, 0i64..50), 1..300)
        ) {
            let mut set = KeySet::new(1_000_000);
            let mut seen = std::collections::HashSet::new();
            let mut now = UnixMillis(0);
            for (k, dt) in picks {
                now = now.plus_ms(dt);
                let key = IdempotencyKey::UuidV4(Uuid::from_u128(u128::from(k)));
                let expected = if seen.insert(k) { Verdict::New } else { Verdict::Duplicate };
                prop_assert_eq!(set.observe(&key, now), expected);
            }
        }
    }

    proptest! {
        #[test]
        fn epoch_watermark_without_epochs_is_a_plain_watermark(
            values in proptest::collection::vec(any::<u128>(), 0..200)
        ) {
            let (mut plain, mut epochs) = (Watermark::default(), EpochWatermark::default());
            for v in values {
                let expected = match plain.observe(v) {
                    Verdict::New => SequenceVerdict::New,
                    Verdict::Duplicate => SequenceVerdict::Duplicate,
                };
                prop_assert_eq!(epochs.observe(v, None), expected);
            }
        }

        #[test]
        fn a_newer_epoch_below_the_watermark_is_never_taken_for_a_repeat(
            high in 1u128..1_000_000, back in 0u128..1_000, epoch in 0u64..10
        ) {
            let wm = EpochWatermark::at(Some(high), epoch);
            let value = high.saturating_sub(back);
            prop_assert_eq!(
                wm.judge(value, Some(epoch + 1)),
                SequenceVerdict::Regressed { high, epoch }
            );
            prop_assert_eq!(wm.judge(value, Some(epoch)), SequenceVerdict::Duplicate);
        }
    }

    /// One partition of sequence keys 1..=n at offsets 0..n, a handler that fails for some keys
    /// until the operator fixes it, and a consumer that parks, restarts at its resume offset and
    /// races replays: the rules above apply every key exactly once.
    #[derive(Default)]
    struct Model {
        watermark: EpochWatermark,
        next_offset: usize,
        position: usize,
        replayed: std::collections::HashSet<u128>,
        parked: std::collections::BTreeMap<u128, usize>,
        applied: std::collections::HashMap<u128, u32>,
    }

    impl Model {
        fn live_step(&mut self, n: usize, failing: &std::collections::HashSet<u128>) {
            if self.position >= n {
                return;
            }
            let (offset, key) = (self.position, self.position as u128 + 1);
            self.position += 1;
            let verdict = after_replays(self.watermark.judge(key, None), self.replayed.contains(&key));
            match verdict {
                SequenceVerdict::New if failing.contains(&key) => {
                    self.parked.entry(key).or_insert(offset);
                }
                SequenceVerdict::New => {
                    self.watermark.observe(key, None);
                    self.next_offset = offset + 1;
                    self.parked.remove(&key);
                    *self.applied.entry(key).or_default() += 1;
                }
                _ => {}
            }
        }

        fn replay(&mut self, key: u128, failing: &mut std::collections::HashSet<u128>) {
            failing.remove(&key);
            let Some(offset) = self.parked.remove(&key) else {
                return;
            };
            if !self.replayed.insert(key) {
                return;
            }
            if replay_moves_watermark(&mut self.watermark, key, None) {
                self.next_offset = self.next_offset.max(offset + 1);
            }
            *self.applied.entry(key).or_default() += 1;
        }
    }

    proptest! {
        #[test]
        fn a_parked_record_replayed_while_the_consumer_restarts_applies_once(
            n in 1usize..40,
            failing in proptest::collection::hash_set(1u128..40, 0..10),
            steps in proptest::collection::vec((0u8..4, 0usize..40), 0..200),
        ) {
            let mut failing = failing;
            let mut model = Model::default();
            for (step, pick) in steps {
                match step {
                    0 | 1 => model.live_step(n, &failing),
                    // A restart or a rebalance: resume at the stored offset.
                    2 => model.position = model.next_offset,
                    _ => {
                        let key = model.parked.keys().nth(pick % model.parked.len().max(1)).copied();
                        if let Some(key) = key { model.replay(key, &mut failing); }
                    }
                }
            }
            // The operator fixes the handler and replays what is left; the consumer restarts
            // and reads to the end.
            failing.clear();
            for key in model.parked.keys().copied().collect::<Vec<_>>() {
                model.replay(key, &mut failing);
            }
            model.position = model.next_offset;
            for _ in 0..n { model.live_step(n, &failing); }
            for key in 1..=n as u128 {
                prop_assert_eq!(model.applied.get(&key).copied().unwrap_or(0), 1, "key {}", key);
            }
        }
    }

    #[test]
    fn a_replayed_key_the_watermark_refused_is_a_repeat_when_it_comes_again() {
        let regressed = SequenceVerdict::Regressed { high: 10, epoch: 1 };
        assert_eq!(after_replays(regressed, true), SequenceVerdict::Duplicate);
        assert_eq!(after_replays(regressed, false), regressed);
        assert_eq!(after_replays(SequenceVerdict::New, true), SequenceVerdict::New);
        let mut wm = EpochWatermark::at(Some(10), 2);
        assert!(
            !replay_moves_watermark(&mut wm, 12, Some(1)),
            "a stale epoch stays beside it"
        );
        assert!(replay_moves_watermark(&mut wm, 12, Some(2)));
        assert_eq!((wm.high(), wm.epoch()), (Some(12), 2));
        let key = IdempotencyKey::Sequence {
            source: "pg:1:shop".into(),
            value: 12,
        };
        assert_ne!(replayed_key_text(&key, Some(1)), replayed_key_text(&key, Some(2)));
        assert_eq!(replayed_key_text(&key, None), key.to_string());
    }

    #[test]
    fn epochs_after_a_failover() {
        // Timeline 1 applied up to 1000; timeline 2 forked at 900.
        let mut wm = EpochWatermark::at(Some(1000), 1);
        assert_eq!(
            wm.observe(950, Some(2)),
            SequenceVerdict::Regressed { high: 1000, epoch: 1 }
        );
        assert_eq!(wm.observe(1001, Some(2)), SequenceVerdict::New);
        assert_eq!(wm.epoch(), 2);
        // A late repeat from timeline 1 is a repeat; a late timeline-1 write above is refused.
        assert_eq!(wm.observe(1000, Some(1)), SequenceVerdict::Duplicate);
        assert_eq!(
            wm.observe(1002, Some(1)),
            SequenceVerdict::StaleEpoch { epoch: 2 }
        );
    }

    #[test]
    fn key_set_forgets_after_retention() {
        let mut set = KeySet::new(100);
        let key = IdempotencyKey::UuidV4(Uuid::from_u128(1));
        assert_eq!(set.observe(&key, UnixMillis(0)), Verdict::New);
        assert_eq!(set.observe(&key, UnixMillis(100)), Verdict::Duplicate);
        assert_eq!(set.expire(UnixMillis(101)), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn horizon_refuses_old_time_keys_only() {
        let policy = DedupePolicy {
            retention_ms: 1000,
            horizon_ms: 500,
        };
        let now = UnixMillis(1_700_000_010_000);
        let old = IdempotencyKey::new_v7_at(UnixMillis(now.0 - 501), [0; 10]);
        let fresh = IdempotencyKey::new_v7_at(UnixMillis(now.0 - 499), [0; 10]);
        assert_eq!(policy.route(&old, now), DedupeRoute::TooOld { age_ms: 501 });
        assert_eq!(policy.route(&fresh, now), DedupeRoute::KeySet);
        let v4 = IdempotencyKey::UuidV4(Uuid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef));
        assert_eq!(policy.route(&v4, now), DedupeRoute::KeySet);
        assert!(DedupePolicy {
            retention_ms: 10,
            horizon_ms: 11
        }
        .validate()
        .is_err());
    }
}
