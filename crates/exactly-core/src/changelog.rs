//! Restoring a state store from its changelog when the broker may show aborted records.
//!
//! Every change record carries the processing transaction it was written in ([`TxnSeq`], unique
//! per attempt: a retried transaction gets a new number). A transaction's commit is recorded by a
//! marker written in the *next* transaction, which begins only after the commit returned; so a
//! marker proves its transaction committed, even where aborted records stay visible (Tansu
//! 0.6.0), and even if the transaction carrying the marker later aborts. Restore applies a
//! transaction's changes when its marker arrives, in marker order, and drops the rest.
//!
//! The last committed transaction has no marker yet, so restore stops one transaction short.
//! That is consistent as long as the input offsets live in the same store (as changes of the same
//! transactions): the processor resumes reading at the offsets the restored state reflects, not
//! at the group's committed offsets, and recomputes the rest. Outputs it writes again are the
//! same window results, which the sinks absorb (upsert, newer wins).

use std::collections::{BTreeMap, HashMap};

/// A processing transaction's number: the producer epoch (bumped on every restart) and the
/// sequence inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnSeq {
    /// Restart count of the task.
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
    /// Transaction `txn` committed (written by a later transaction).
    Committed {
        /// The committed transaction.
        txn: TxnSeq,
    },
}

/// Folds changelog entries into the committed state.
#[derive(Debug)]
pub struct Restore<K, V> {
    pending: HashMap<TxnSeq, Vec<(K, Option<V>)>>,
    state: BTreeMap<K, V>,
    applied: u64,
    last: Option<TxnSeq>,
}

impl<K: Ord + Clone, V: Clone> Default for Restore<K, V> {
    fn default() -> Self {
        Restore {
            pending: HashMap::new(),
            state: BTreeMap::new(),
            applied: 0,
            last: None,
        }
    }
}

impl<K: Ord + Clone, V: Clone> Restore<K, V> {
    /// An empty restore.
    pub fn new() -> Self {
        Restore::default()
    }

    /// Reads one entry, in changelog order.
    pub fn push(&mut self, entry: ChangelogEntry<K, V>) {
        match entry {
            ChangelogEntry::Change { txn, key, value } => {
                self.pending.entry(txn).or_default().push((key, value))
            }
            ChangelogEntry::Committed { txn } => {
                // A marker read twice (a resent transaction) applies nothing the second time.
                for (key, value) in self.pending.remove(&txn).unwrap_or_default() {
                    match value {
                        Some(v) => {
                            self.state.insert(key, v);
                        }
                        None => {
                            self.state.remove(&key);
                        }
                    }
                }
                self.applied += 1;
                self.last = Some(txn);
            }
        }
    }

    /// The committed state, the last transaction applied, and how many changes were dropped
    /// (aborted, or committed without a marker yet).
    pub fn finish(self) -> (BTreeMap<K, V>, Option<TxnSeq>, usize) {
        let dropped = self.pending.values().map(Vec::len).sum();
        (self.state, self.last, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One processing attempt: its changes and whether it committed.
    #[derive(Debug, Clone)]
    struct Attempt {
        changes: Vec<(u8, Option<u32>)>,
        committed: bool,
    }

    fn attempts() -> impl Strategy<Value = Vec<Attempt>> {
        proptest::collection::vec(
            (
                proptest::collection::vec((0u8..8, proptest::option::of(0u32..100)), 0..6),
                any::<bool>(),
            )
                .prop_map(|(changes, committed)| Attempt { changes, committed }),
            0..30,
        )
    }

    /// Writes the log a task produces; `shows_aborted` keeps aborted records (Tansu).
    fn log(history: &[Attempt], shows_aborted: bool) -> Vec<ChangelogEntry<u8, u32>> {
        let mut out = Vec::new();
        let mut unmarked: Option<TxnSeq> = None;
        for (i, attempt) in history.iter().enumerate() {
            let txn = TxnSeq {
                epoch: 0,
                seq: i as u64,
            };
            let mut records = Vec::new();
            if let Some(previous) = unmarked.take() {
                records.push(ChangelogEntry::Committed { txn: previous });
            }
            for (k, v) in &attempt.changes {
                records.push(ChangelogEntry::Change {
                    txn,
                    key: *k,
                    value: *v,
                });
            }
            if attempt.committed {
                unmarked = Some(txn);
            } else if let Some(ChangelogEntry::Committed { txn: previous }) = records.first().cloned() {
                // The marker travelled in an aborted transaction: it is written again next time.
                unmarked = Some(previous);
            }
            if attempt.committed || shows_aborted {
                out.extend(records);
            }
        }
        out
    }

    proptest! {
        /// Restore equals the state of every committed transaction but the last (whose marker
        /// is not written yet), whether or not the broker shows aborted records, and wherever
        /// the log ends.
        #[test]
        fn restore_applies_exactly_the_marked_commits(history in attempts(), shows_aborted in any::<bool>()) {
            let entries = log(&history, shows_aborted);
            let mut restore = Restore::new();
            for e in entries { restore.push(e); }
            let (state, last, _) = restore.finish();

            // A commit is applied once a later visible attempt carried its marker.
            let mut expected = BTreeMap::new();
            let mut expected_last = None;
            let mut unmarked: Option<usize> = None;
            for (i, attempt) in history.iter().enumerate() {
                let visible = attempt.committed || shows_aborted;
                if let (Some(c), true) = (unmarked, visible) {
                    for (k, v) in &history[c].changes {
                        match v { Some(v) => { expected.insert(*k, *v); } None => { expected.remove(k); } }
                    }
                    expected_last = Some(TxnSeq { epoch: 0, seq: c as u64 });
                    if attempt.committed { unmarked = None; }
                }
                if attempt.committed { unmarked = Some(i); }
            }
            prop_assert_eq!(state, expected);
            prop_assert_eq!(last, expected_last);
        }
    }

    #[test]
    fn header_form_round_trips() {
        let t = TxnSeq { epoch: 3, seq: 17 };
        assert_eq!(TxnSeq::from_header(&t.to_header()), Some(t));
        assert_eq!(TxnSeq::from_header("3"), None);
    }
}
