//! Restoring a state store from its changelog, on a broker that hides aborted records from
//! read_committed readers (Apache Kafka) and on one that shows them (Tansu 0.6.0).
//!
//! Every change record carries the processing transaction it was written in ([`TxnSeq`]).
//! How restore decides which changes committed is a [`RestoreMode`], chosen by probing the broker:
//!
//! - [`RestoreMode::ReadCommitted`] (aborted records hidden): everything a read_committed reader
//!   sees committed, so restore applies every change in log order, as Kafka Streams does. No
//!   marker is written or needed, and a compacted changelog restores to the same state: the
//!   cleaner keeps the last value of each key, drops aborted batches and, later, tombstones,
//!   none of which changes the last committed value of any key.
//! - [`RestoreMode::Markers`] (aborted records visible): a transaction's commit is proved by a
//!   marker written in a *later* transaction, which begins only after the commit returned; the
//!   marker proves the commit even if its own transaction aborts. A processor starts a new
//!   epoch whenever it starts and whenever a transaction aborts, so inside one epoch every
//!   transaction before the last committed one committed too: one marker per epoch, keyed by
//!   the epoch (`exactly-committed/<epoch>`), says "every transaction of this epoch up to `seq`
//!   committed". Markers of one epoch only grow, so compaction keeping the last one per key
//!   loses nothing (a single marker key for all epochs, as before, kept only the newest epoch's
//!   marker once the cleaner ran, and restore then dropped every older transaction).
//!
//! In marker mode the last committed transaction of an epoch has no marker until the next
//! transaction, so restore may stop one transaction short. That is consistent as long as the
//! input offsets live in the same store (as changes of the same transactions): the processor
//! resumes reading at the offsets the restored state reflects and recomputes the rest. A broker
//! that both showed aborted records and compacted could keep an aborted value over a committed
//! one, which no restore can undo; no broker exactly targets does both (Kafka hides aborts,
//! Tansu 0.6.0 does not compact).

use std::collections::{BTreeMap, HashMap};

/// A processing transaction's number: the epoch (a new one on every start and after every
/// abort) and the sequence inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnSeq {
    /// Started at every processor start and after every abort; only grows.
    pub epoch: u64,
    /// Transaction number within the epoch.
    pub seq: u64,
}

impl TxnSeq {
    /// The header text `epoch.seq`.
    pub fn to_header(self) -> String {
        format!("{}.{}", self.epoch, self.seq)
    }

    /// Parses [`TxnSeq::to_header`].
    pub fn from_header(text: &str) -> Option<TxnSeq> {
        let (epoch, seq) = text.split_once('.')?;
        Some(TxnSeq {
            epoch: epoch.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// How restore tells committed changes from aborted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// The broker hides aborted records from read_committed readers: apply everything read.
    ReadCommitted,
    /// Aborted records are visible: apply a change once a marker proves its transaction committed.
    Markers,
}

impl RestoreMode {
    /// The mode for a broker that does (`true`) or does not hide aborted records.
    pub fn for_broker(hides_aborted_records: bool) -> Self {
        if hides_aborted_records {
            RestoreMode::ReadCommitted
        } else {
            RestoreMode::Markers
        }
    }

    /// Whether processors write commit markers in this mode.
    pub fn writes_markers(self) -> bool {
        self == RestoreMode::Markers
    }

    /// The persisted name (pinned: the application's meta topic stores it).
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreMode::ReadCommitted => "read-committed",
            RestoreMode::Markers => "markers",
        }
    }

    /// The mode of a persisted name.
    pub fn parse(text: &str) -> Option<RestoreMode> {
        [RestoreMode::ReadCommitted, RestoreMode::Markers]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

/// A changelog written in one restore mode, about to be restored in another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the changelog was written in {written} restore mode, and this run would restore it in {now} mode: \
     read-committed restore of a changelog that relied on markers applies aborted changes (counted twice), \
     and markers restore of one written without markers drops every change (state rolled back). \
     The broker or the processing guarantee changed: keep them, or start under a new application id"
)]
pub struct ModeMismatch {
    /// The mode the changelog was written in.
    pub written: &'static str,
    /// The mode this run decided.
    pub now: &'static str,
}

/// Settles the restore mode of an application whose changelog was written in `written` (as
/// persisted; `None`: never recorded) when this run decided `decided`: the mode to run in and
/// whether it must be recorded now, or a refusal. A mode is never changed under a changelog.
pub fn settle_mode(
    written: Option<RestoreMode>,
    decided: RestoreMode,
) -> Result<(RestoreMode, bool), ModeMismatch> {
    match written {
        None => Ok((decided, true)),
        Some(mode) if mode == decided => Ok((mode, false)),
        Some(mode) => Err(ModeMismatch {
            written: mode.as_str(),
            now: decided.as_str(),
        }),
    }
}

/// One changelog record as restore reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangelogEntry<K, V> {
    /// `key` set to `value` (None: deleted) by transaction `txn`.
    Change {
        /// The writing transaction.
        txn: TxnSeq,
        /// Store key.
        key: K,
        /// New value, or a tombstone.
        value: Option<V>,
    },
    /// Every transaction of `txn.epoch` up to `txn.seq` committed (written by a later
    /// transaction).
    Committed {
        /// The last committed transaction of its epoch known when the marker was written.
        txn: TxnSeq,
    },
}

/// Folds changelog entries into the committed state.
#[derive(Debug)]
pub struct Restore<K, V> {
    mode: RestoreMode,
    /// Changes in log order (marker mode keeps them until every marker is read).
    changes: Vec<(TxnSeq, K, Option<V>)>,
    /// Marker mode: the highest committed sequence per epoch.
    committed: HashMap<u64, u64>,
    state: BTreeMap<K, V>,
}

impl<K: Ord + Clone, V: Clone> Restore<K, V> {
    /// An empty restore in `mode`.
    pub fn new(mode: RestoreMode) -> Self {
        Restore {
            mode,
            changes: Vec::new(),
            committed: HashMap::new(),
            state: BTreeMap::new(),
        }
    }

    /// Reads one entry, in changelog order.
    pub fn push(&mut self, entry: ChangelogEntry<K, V>) {
        match (self.mode, entry) {
            (RestoreMode::ReadCommitted, ChangelogEntry::Change { key, value, .. }) => {
                apply(&mut self.state, key, value)
            }
            // Written by older versions, or by a processor that probed another way: every
            // record a read_committed reader sees here committed, markers add nothing.
            (RestoreMode::ReadCommitted, ChangelogEntry::Committed { .. }) => {}
            (RestoreMode::Markers, ChangelogEntry::Change { txn, key, value }) => {
                self.changes.push((txn, key, value))
            }
            (RestoreMode::Markers, ChangelogEntry::Committed { txn }) => {
                let seq = self.committed.entry(txn.epoch).or_insert(txn.seq);
                *seq = (*seq).max(txn.seq);
            }
        }
    }

    /// The committed state, the last transaction applied (marker mode), and how many changes
    /// were dropped (aborted, or committed without a marker yet).
    pub fn finish(mut self) -> (BTreeMap<K, V>, Option<TxnSeq>, usize) {
        let mut dropped = 0;
        let mut last = None;
        for (txn, key, value) in std::mem::take(&mut self.changes) {
            if self.committed.get(&txn.epoch).is_some_and(|&s| txn.seq <= s) {
                apply(&mut self.state, key, value);
                last = last.max(Some(txn));
            } else {
                dropped += 1;
            }
        }
        (self.state, last, dropped)
    }
}

fn apply<K: Ord, V>(state: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => {
            state.insert(key, v);
        }
        None => {
            state.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_restore_mode_is_recorded_once_and_never_changed_under_a_changelog() {
        use RestoreMode::*;
        assert_eq!(settle_mode(None, Markers), Ok((Markers, true)));
        assert_eq!(settle_mode(Some(Markers), Markers), Ok((Markers, false)));
        let refused = settle_mode(Some(ReadCommitted), Markers).expect_err("refused");
        assert_eq!((refused.written, refused.now), ("read-committed", "markers"));
        for mode in [ReadCommitted, Markers] {
            assert_eq!(RestoreMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(ReadCommitted.as_str(), "read-committed", "persisted form");
        assert_eq!(Markers.as_str(), "markers", "persisted form");
    }

    /// One processing attempt: its changes, whether it committed, and whether the processor
    /// crashed right after it (a crash after a commit leaves that commit unmarked).
    #[derive(Debug, Clone)]
    struct Attempt {
        changes: Vec<(u8, Option<u32>)>,
        committed: bool,
        crash_after: bool,
    }

    fn attempts() -> impl Strategy<Value = Vec<Attempt>> {
        proptest::collection::vec(
            (
                proptest::collection::vec((0u8..8, proptest::option::of(0u32..100)), 0..6),
                any::<bool>(),
                proptest::bool::weighted(0.15),
            )
                .prop_map(|(changes, committed, crash_after)| Attempt {
                    changes,
                    committed,
                    crash_after,
                }),
            0..30,
        )
    }

    /// A record as the broker stores it: its key (store key, or the marker's epoch), the entry,
    /// and whether its transaction committed.
    #[derive(Debug, Clone)]
    struct Stored {
        key: String,
        entry: ChangelogEntry<u8, u32>,
        committed: bool,
    }

    /// The log a processor writes for `history`, as the processor does it: a new epoch at start,
    /// after every abort and after every crash; markers (in `Markers` mode) in the next
    /// transaction, written again after an abort or a crash.
    fn write_log(history: &[Attempt], mode: RestoreMode) -> Vec<Stored> {
        let mut out = Vec::new();
        let mut epoch = 0;
        let mut seq = 0;
        let mut unmarked: Option<TxnSeq> = None;
        for attempt in history {
            let txn = TxnSeq { epoch, seq };
            seq += 1;
            if let (Some(marked), true) = (unmarked, mode.writes_markers()) {
                out.push(Stored {
                    key: format!("marker/{}", marked.epoch),
                    entry: ChangelogEntry::Committed { txn: marked },
                    committed: attempt.committed,
                });
            }
            for (k, v) in &attempt.changes {
                out.push(Stored {
                    key: format!("k{k}"),
                    entry: ChangelogEntry::Change {
                        txn,
                        key: *k,
                        value: *v,
                    },
                    committed: attempt.committed,
                });
            }
            if attempt.committed {
                unmarked = Some(txn);
            }
            if !attempt.committed || attempt.crash_after {
                epoch += 1;
                seq = 0;
            }
            if attempt.crash_after {
                // A restarted processor knows nothing of the last commit: it stays unmarked.
                unmarked = None;
            }
        }
        out
    }

    /// What a read_committed reader sees where aborted records are hidden (Kafka), or all of it.
    fn visible(log: &[Stored], hides_aborted: bool) -> Vec<ChangelogEntry<u8, u32>> {
        log.iter()
            .filter(|r| r.committed || !hides_aborted)
            .map(|r| r.entry.clone())
            .collect()
    }

    /// Kafka's log cleaner: aborted batches removed, then the last record of each key kept,
    /// then tombstones removed (after delete.retention.ms).
    fn compact(log: &[Stored]) -> Vec<Stored> {
        let committed: Vec<&Stored> = log.iter().filter(|r| r.committed).collect();
        let mut last = HashMap::new();
        for (i, r) in committed.iter().enumerate() {
            last.insert(r.key.clone(), i);
        }
        committed
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                last.get(&r.key) == Some(i) && !matches!(r.entry, ChangelogEntry::Change { value: None, .. })
            })
            .map(|(_, r)| (*r).clone())
            .collect()
    }

    fn restore(mode: RestoreMode, entries: Vec<ChangelogEntry<u8, u32>>) -> BTreeMap<u8, u32> {
        let mut restore = Restore::new(mode);
        for e in entries {
            restore.push(e);
        }
        restore.finish().0
    }

    fn fold<'a>(changes: impl IntoIterator<Item = &'a Attempt>) -> BTreeMap<u8, u32> {
        let mut state = BTreeMap::new();
        for attempt in changes {
            for (k, v) in &attempt.changes {
                apply(&mut state, *k, *v);
            }
        }
        state
    }

    proptest! {
        /// Kafka: restore(compact(log)) == restore(log) == every committed transaction, for any
        /// history of commits, aborts and crashes.
        #[test]
        fn read_committed_restore_survives_compaction(history in attempts()) {
            let log = write_log(&history, RestoreMode::ReadCommitted);
            let expected = fold(history.iter().filter(|a| a.committed));
            let whole = restore(RestoreMode::ReadCommitted, visible(&log, true));
            let compacted = restore(RestoreMode::ReadCommitted, visible(&compact(&log), true));
            prop_assert_eq!(&whole, &expected);
            prop_assert_eq!(&compacted, &expected);
        }

        /// Tansu: with aborted records visible, restore applies exactly the committed
        /// transactions that some later transaction marked: every commit except one followed by
        /// a crash or by the end of the log.
        #[test]
        fn marker_restore_applies_exactly_the_marked_commits(history in attempts()) {
            let log = write_log(&history, RestoreMode::Markers);
            let marked = history
                .iter()
                .enumerate()
                .filter(|(i, a)| a.committed && !a.crash_after && i + 1 < history.len())
                .map(|(_, a)| a);
            prop_assert_eq!(restore(RestoreMode::Markers, visible(&log, false)), fold(marked));
        }

        /// Markers are never superseded by each other's compaction: keeping only the last marker
        /// per key leaves a marker-mode restore unchanged.
        #[test]
        fn markers_survive_compaction(history in attempts()) {
            let log = write_log(&history, RestoreMode::Markers);
            let mut last_marker = HashMap::new();
            for (i, r) in log.iter().enumerate() {
                if matches!(r.entry, ChangelogEntry::Committed { .. }) {
                    last_marker.insert(r.key.clone(), i);
                }
            }
            let compacted: Vec<Stored> = log
                .iter()
                .enumerate()
                .filter(|(i, r)| !matches!(r.entry, ChangelogEntry::Committed { .. }) || last_marker.get(&r.key) == Some(i))
                .map(|(_, r)| r.clone())
                .collect();
            prop_assert_eq!(
                restore(RestoreMode::Markers, visible(&compacted, false)),
                restore(RestoreMode::Markers, visible(&log, false))
            );
        }
    }

    /// The defect this module had: one marker key for every transaction. Once the cleaner kept
    /// only the newest marker, restore dropped every older transaction's changes.
    #[test]
    fn one_marker_key_for_all_epochs_would_lose_older_commits() {
        let t = |epoch, seq| TxnSeq { epoch, seq };
        let change = |txn, key, value| ChangelogEntry::Change {
            txn,
            key,
            value: Some(value),
        };
        let log = vec![
            change(t(1, 0), 1u8, 10u32),
            ChangelogEntry::Committed { txn: t(1, 0) },
            change(t(2, 0), 2, 20),
            ChangelogEntry::Committed { txn: t(2, 0) },
        ];
        // With per-epoch marker keys, compaction keeps both markers: both changes restore.
        let state = restore(RestoreMode::Markers, log.clone());
        assert_eq!(state, BTreeMap::from([(1, 10), (2, 20)]));
        // Under one key only the last marker would survive, and key 1 would be lost.
        let single_key: Vec<_> = log
            .into_iter()
            .filter(|e| *e != ChangelogEntry::Committed { txn: t(1, 0) })
            .collect();
        assert_eq!(
            restore(RestoreMode::Markers, single_key),
            BTreeMap::from([(2, 20)])
        );
    }

    #[test]
    fn header_form_round_trips() {
        let t = TxnSeq { epoch: 3, seq: 17 };
        assert_eq!(TxnSeq::from_header(&t.to_header()), Some(t));
        assert_eq!(TxnSeq::from_header("3"), None);
    }
}
