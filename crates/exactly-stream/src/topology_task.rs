//! One task of a DSL topology on the broker runtime: its stores are the task's [`StateStore`]
//! (entries per store name), read through the open transaction's overlay. Committing turns the
//! overlay into a [`Batch`] (for the local store and the changelog); aborting drops it.

use std::collections::BTreeMap;

use crate::dsl::{Entries, StateAccess, StateError};
use crate::store::{Batch, Change, StateStore, StoreError};

/// A task's stores under the open transaction.
pub struct TopologyTask {
    store: StateStore,
    overlay: BTreeMap<(String, Vec<u8>), Option<Vec<u8>>>,
    offsets: BTreeMap<(String, i32), i64>,
}

fn state_error(e: StoreError) -> StateError {
    StateError(e.to_string())
}

impl TopologyTask {
    /// A task over its restored store.
    pub fn new(store: StateStore) -> Self {
        TopologyTask {
            store,
            overlay: BTreeMap::new(),
            offsets: BTreeMap::new(),
        }
    }

    /// The committed state.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// The input offset after `offset` commits with the state (processed, parked or skipped).
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        self.offsets.insert((topic.to_owned(), partition), offset + 1);
    }

    /// The open transaction's changes; the overlay starts empty again.
    pub fn take_batch(&mut self) -> Batch {
        let mut changes: Vec<Change> = std::mem::take(&mut self.overlay)
            .into_iter()
            .map(|((store, key), value)| Change::Entry { store, key, value })
            .collect();
        for ((topic, partition), offset) in std::mem::take(&mut self.offsets) {
            changes.push(Change::Offset {
                topic,
                partition,
                offset,
            });
        }
        Batch { changes }
    }

    /// Drops the open transaction's changes (abort).
    pub fn discard(&mut self) {
        self.overlay.clear();
        self.offsets.clear();
    }
}

impl StateAccess for TopologyTask {
    fn get(&mut self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self.overlay.get(&(store.to_owned(), key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.store.entry(store, key).map_err(state_error),
        }
    }

    fn put(&mut self, store: &str, key: &[u8], value: Option<Vec<u8>>) -> Result<(), StateError> {
        self.overlay.insert((store.to_owned(), key.to_vec()), value);
        Ok(())
    }

    fn range(&mut self, store: &str, from: &[u8], to: &[u8]) -> Result<Entries, StateError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self
            .store
            .entries(store, from, to)
            .map_err(state_error)?
            .into_iter()
            .collect();
        if from < to {
            let lo = (store.to_owned(), from.to_vec());
            let hi = (store.to_owned(), to.to_vec());
            for ((_, k), v) in self.overlay.range(lo..hi) {
                match v {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{records_for, restore};
    use crate::dsl::MemoryState;
    use exactly_core::changelog::{RestoreMode, TxnSeq};
    use proptest::prelude::*;

    proptest! {
        /// Writes committed through the store and the changelog, and a restore of that
        /// changelog into a new store, both read like the same writes in memory; aborted
        /// transactions leave nothing.
        #[test]
        fn committed_aborted_and_restored_state_reads_like_memory(
            txns in proptest::collection::vec(
                (proptest::collection::vec((0u8..2, 0u8..12, proptest::option::of(0u8..9)), 0..8), any::<bool>()),
                1..12,
            ),
            lo in 0u8..12, hi in 0u8..13,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut task = TopologyTask::new(StateStore::open(&dir.path().join("a.redb")).expect("open"));
            let mut memory = MemoryState::default();
            let mut log = Vec::new();
            for (seq, (writes, commit)) in txns.iter().enumerate() {
                for (store, key, value) in writes {
                    let store = format!("s{store}");
                    task.put(&store, &[*key], value.map(|v| vec![v])).expect("put");
                    if *commit {
                        memory.put(&store, &[*key], value.map(|v| vec![v])).expect("put");
                    }
                }
                if *commit {
                    let batch = task.take_batch();
                    log.extend(records_for(TxnSeq { epoch: 1, seq: seq as u64 }, None, &batch));
                    task.store().commit(&batch).expect("commit");
                } else {
                    task.discard();
                }
            }
            let restored_dir = tempfile::tempdir().expect("tempdir");
            let restored_store = StateStore::open(&restored_dir.path().join("b.redb")).expect("open");
            let (batch, _, _) = restore(RestoreMode::ReadCommitted, log);
            restored_store.commit(&batch).expect("commit");
            let mut restored = TopologyTask::new(restored_store);
            for store in ["s0", "s1"] {
                let expected = memory.range(store, &[lo], &[hi]).expect("range");
                prop_assert_eq!(task.range(store, &[lo], &[hi]).expect("range"), expected.clone());
                prop_assert_eq!(restored.range(store, &[lo], &[hi]).expect("range"), expected);
                for key in 0u8..12 {
                    prop_assert_eq!(restored.get(store, &[key]).expect("get"), memory.get(store, &[key]).expect("get"));
                }
            }
        }
    }
}
