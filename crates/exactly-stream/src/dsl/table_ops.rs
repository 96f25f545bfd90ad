//! Tables: an aggregation without windows (the latest aggregate per key), a table read from a
//! topic (the latest value per key; a null value deletes), and the stream–table join that
//! enriches each stream record with the table's current value for its key.
//!
//! Store keys: `v` + key → value; `s` + event time + key + event id → () (inputs already
//! aggregated, kept for the dedupe horizon); `m/…` → numbers.

use std::marker::PhantomData;
use std::sync::Arc;

use exactly_core::UnixMillis;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::graph::{OpCx, Rec, Refusal, StatefulOp};
use super::state::StateAccess;
use super::window_ops::{advance_stream_time, forget_seen, from_json, seen_before, to_json, AddFn, InitFn};

fn value_key(key_bytes: &[u8]) -> Vec<u8> {
    let mut k = vec![b'v'];
    k.extend_from_slice(key_bytes);
    k
}

/// Aggregation per key without windows: every update is sent as the key's new value.
pub(crate) struct TableAgg<K, V, A> {
    pub(crate) store: String,
    /// How long (in stream time) an input's event id is remembered to skip its repeats.
    pub(crate) dedupe_horizon_ms: i64,
    pub(crate) init: InitFn<A>,
    pub(crate) add: AddFn<K, V, A>,
}

impl<K, V, A> StatefulOp for TableAgg<K, V, A>
where
    K: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    V: Send + Sync + 'static,
    A: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    fn stores(&self) -> Vec<String> {
        vec![self.store.clone()]
    }

    fn process(&self, rec: Rec, cx: &mut OpCx<'_, '_>, out: &mut Vec<(usize, Rec)>) -> Result<(), Refusal> {
        let store = self.store.as_str();
        let t = rec.time;
        let (before, st) = advance_stream_time(cx.state, store, t)?;
        let key: &K = rec.key();
        let key_bytes = to_json("the grouping key", key)?;
        let remembered = t.0 > st.0.saturating_sub(self.dedupe_horizon_ms);
        let duplicate = match rec.event_id.as_deref() {
            // An input older than the horizon cannot be checked: it is aggregated (the
            // horizon is documented; Kafka Streams does not deduplicate at all).
            Some(id) if remembered => seen_before(cx.state, store, t, &key_bytes, id)?,
            _ => false,
        };
        if duplicate {
            *cx.duplicates += 1;
        } else {
            let k = value_key(&key_bytes);
            let current = match cx.state.get(store, &k)? {
                Some(bytes) => from_json(store, &bytes)?,
                None => (self.init)(),
            };
            let next = (self.add)(key, rec.value::<V>(), current).map_err(Refusal::Park)?;
            cx.state.put(store, &k, Some(to_json("the aggregate", &next)?))?;
            out.push((0, Rec::new(key.clone(), Some(next), t, None)));
        }
        if before.is_none_or(|b| st.0 > b) {
            forget_seen(cx.state, store, st, self.dedupe_horizon_ms)?;
        }
        Ok(())
    }
}

/// A table read from a topic: keeps the latest value per key and passes each change on.
pub(crate) struct TableSource<K, V> {
    pub(crate) store: String,
    pub(crate) types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> StatefulOp for TableSource<K, V>
where
    K: Clone + Send + Sync + Serialize + 'static,
    V: Clone + Send + Sync + Serialize + 'static,
{
    fn stores(&self) -> Vec<String> {
        vec![self.store.clone()]
    }

    fn process(&self, rec: Rec, cx: &mut OpCx<'_, '_>, out: &mut Vec<(usize, Rec)>) -> Result<(), Refusal> {
        let key_bytes = to_json("the table key", rec.key::<K>())?;
        let value: &Option<V> = rec.value();
        let stored = value
            .as_ref()
            .map(|v| to_json("the table value", v))
            .transpose()?;
        cx.state.put(&self.store, &value_key(&key_bytes), stored)?;
        out.push((0, rec));
        Ok(())
    }
}

type TableJoiner<K, V, T, R> = Arc<dyn Fn(&K, &V, Option<&T>) -> R + Send + Sync>;

/// Joins each stream record with the table's value for its key: an inner join drops records
/// the table has no value for; a left join passes `None`.
pub(crate) struct StreamTableJoin<K, V, T, R> {
    /// The table's store.
    pub(crate) store: String,
    pub(crate) left: bool,
    pub(crate) joiner: TableJoiner<K, V, T, R>,
}

impl<K, V, T, R> StatefulOp for StreamTableJoin<K, V, T, R>
where
    K: Clone + Send + Sync + Serialize + 'static,
    V: Send + Sync + 'static,
    T: DeserializeOwned + Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    fn stores(&self) -> Vec<String> {
        vec![self.store.clone()]
    }

    fn process(&self, rec: Rec, cx: &mut OpCx<'_, '_>, out: &mut Vec<(usize, Rec)>) -> Result<(), Refusal> {
        let key: &K = rec.key();
        let key_bytes = to_json("the join key", key)?;
        let table: Option<T> = match cx.state.get(&self.store, &value_key(&key_bytes))? {
            Some(bytes) => Some(from_json(&self.store, &bytes)?),
            None => None,
        };
        if table.is_none() && !self.left {
            return Ok(());
        }
        let joined = (self.joiner)(key, rec.value::<V>(), table.as_ref());
        let time: UnixMillis = rec.time;
        out.push((0, Rec::new(key.clone(), joined, time, rec.event_id.clone())));
        Ok(())
    }
}
