//! What a topology's stateful operators read and write: named stores of ordered byte keys and
//! byte values ([`StateAccess`]), in memory ([`MemoryState`], the test runner) or in a task's
//! state store under the open transaction (the broker runtime), and the key layouts the
//! operators build on (times sort as signed numbers, keys carry their length).

use std::collections::BTreeMap;

/// A store failed; the task stops (nothing of the open transaction commits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state: {0}")]
pub struct StateError(pub String);

/// Entries of a store, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Ordered key-value stores by name.
pub trait StateAccess {
    /// The value at `key` in `store`.
    fn get(&mut self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Sets (Some) or removes (None) `key` in `store`.
    fn put(&mut self, store: &str, key: &[u8], value: Option<Vec<u8>>) -> Result<(), StateError>;
    /// The entries of `store` with `from <= key < to`, in key order.
    fn range(&mut self, store: &str, from: &[u8], to: &[u8]) -> Result<Entries, StateError>;
}

/// Stores held in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryState {
    stores: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryState {
    /// Every entry of every store.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8], &[u8])> {
        self.stores.iter().flat_map(|(s, m)| {
            m.iter()
                .map(move |(k, v)| (s.as_str(), k.as_slice(), v.as_slice()))
        })
    }

    /// Entries held, all stores together.
    pub fn len(&self) -> usize {
        self.stores.values().map(BTreeMap::len).sum()
    }

    /// True when no store holds anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StateAccess for MemoryState {
    fn get(&mut self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.stores.get(store).and_then(|m| m.get(key)).cloned())
    }

    fn put(&mut self, store: &str, key: &[u8], value: Option<Vec<u8>>) -> Result<(), StateError> {
        match value {
            Some(v) => {
                self.stores
                    .entry(store.to_owned())
                    .or_default()
                    .insert(key.to_vec(), v);
            }
            None => {
                if let Some(m) = self.stores.get_mut(store) {
                    m.remove(key);
                }
            }
        }
        Ok(())
    }

    fn range(&mut self, store: &str, from: &[u8], to: &[u8]) -> Result<Entries, StateError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .stores
            .get(store)
            .map(|m| {
                m.range(from.to_vec()..to.to_vec())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// One input record's writes over a [`StateAccess`]: applied only if the record is processed
/// whole, dropped if it is parked (so a refused record leaves no trace).
pub(crate) struct RecordState<'a> {
    base: &'a mut dyn StateAccess,
    writes: BTreeMap<(String, Vec<u8>), Option<Vec<u8>>>,
}

impl<'a> RecordState<'a> {
    pub(crate) fn new(base: &'a mut dyn StateAccess) -> Self {
        RecordState {
            base,
            writes: BTreeMap::new(),
        }
    }

    /// Writes what the record did into the base.
    pub(crate) fn apply(self) -> Result<(), StateError> {
        for ((store, key), value) in self.writes {
            self.base.put(&store, &key, value)?;
        }
        Ok(())
    }
}

impl StateAccess for RecordState<'_> {
    fn get(&mut self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self.writes.get(&(store.to_owned(), key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(store, key),
        }
    }

    fn put(&mut self, store: &str, key: &[u8], value: Option<Vec<u8>>) -> Result<(), StateError> {
        self.writes.insert((store.to_owned(), key.to_vec()), value);
        Ok(())
    }

    fn range(&mut self, store: &str, from: &[u8], to: &[u8]) -> Result<Entries, StateError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.base.range(store, from, to)?.into_iter().collect();
        if from < to {
            let lo = (store.to_owned(), from.to_vec());
            let hi = (store.to_owned(), to.to_vec());
            for ((_, k), v) in self.writes.range(lo..hi) {
                match v {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }
}

/// A time as 8 bytes that sort like the signed number.
pub(crate) fn time_key(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

/// The time [`time_key`] wrote at the start of `bytes`.
pub(crate) fn read_time(bytes: &[u8]) -> Option<i64> {
    let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(raw) ^ (1 << 63)) as i64)
}

/// `bytes` preceded by its length, so a key never runs into what follows it.
pub(crate) fn sized(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 4);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Splits what [`sized`] wrote off the front of `bytes`: (the bytes, the rest).
pub(crate) fn read_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let end = 4usize.checked_add(len)?;
    Some((bytes.get(4..end)?, bytes.get(end..)?))
}

/// A named number of an operator (stream time, emit and expiry cursors).
pub(crate) fn get_number(
    state: &mut dyn StateAccess,
    store: &str,
    name: &str,
) -> Result<Option<i64>, StateError> {
    Ok(state.get(store, name.as_bytes())?.as_deref().and_then(read_time))
}

/// Sets a named number of an operator.
pub(crate) fn put_number(
    state: &mut dyn StateAccess,
    store: &str,
    name: &str,
    value: i64,
) -> Result<(), StateError> {
    state.put(store, name.as_bytes(), Some(time_key(value).to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn time_keys_sort_like_times(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(a.cmp(&b), time_key(a).cmp(&time_key(b)));
            prop_assert_eq!(read_time(&time_key(a)), Some(a));
        }

        #[test]
        fn a_record_state_reads_its_own_writes_over_the_base(
            base in proptest::collection::btree_map(0u8..20, 0u8..5, 0..10),
            writes in proptest::collection::vec((0u8..20, proptest::option::of(0u8..5)), 0..10),
            lo in 0u8..20, hi in 0u8..21,
        ) {
            let mut memory = MemoryState::default();
            for (k, v) in &base { memory.put("s", &[*k], Some(vec![*v])).expect("put"); }
            let mut expected = memory.clone();
            for (k, v) in &writes { expected.put("s", &[*k], v.map(|v| vec![v])).expect("put"); }
            let mut overlay = RecordState::new(&mut memory);
            for (k, v) in &writes { overlay.put("s", &[*k], v.map(|v| vec![v])).expect("put"); }
            prop_assert_eq!(overlay.range("s", &[lo], &[hi]).expect("range"), expected.range("s", &[lo], &[hi]).expect("range"));
            overlay.apply().expect("apply");
            prop_assert_eq!(memory.entries().collect::<Vec<_>>(), expected.entries().collect::<Vec<_>>());
        }
    }
}
