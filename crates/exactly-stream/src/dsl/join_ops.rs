//! The windowed stream–stream inner join: a record of either side joins every record of the
//! other side with the same key whose event time is at most `window` apart. Each side's
//! records are buffered in the join's store until no record of the other side can still join
//! them (`t + 2 × window + grace` of stream time); a record later than `t + window + grace`
//! is dropped as late. Every pair is emitted once, when its second record arrives.
//!
//! Store keys: `l`/`r` + event time + key + sequence → value; `m/…` → numbers.

use std::sync::Arc;

use exactly_core::UnixMillis;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::graph::{OpCx, Rec, Refusal, StatefulOp};
use super::state::{get_number, put_number, read_sized, read_time, sized, time_key, StateAccess, StateError};
use super::window_ops::{advance_stream_time, from_json, to_json};

/// How far apart two records may be to join, and how long late records are still accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinWindows {
    /// The largest distance of the two event times.
    pub window_ms: i64,
    /// Grace after the window.
    pub grace_ms: i64,
}

impl JoinWindows {
    /// Records at most `window_ms` apart join; no grace.
    pub fn of(window_ms: i64) -> Self {
        JoinWindows {
            window_ms: window_ms.max(0),
            grace_ms: 0,
        }
    }

    /// With a grace period.
    pub fn grace(mut self, grace_ms: i64) -> Self {
        self.grace_ms = grace_ms.max(0);
        self
    }
}

type Joiner<K, This, Other, R> = Arc<dyn Fn(&K, &This, &Other) -> R + Send + Sync>;

/// One side of the join.
pub(crate) struct JoinSide<K, This, Other, R> {
    pub(crate) store: String,
    /// This side's buffer prefix (`l` or `r`).
    pub(crate) this: u8,
    pub(crate) other: u8,
    pub(crate) windows: JoinWindows,
    /// (key, this side's value, the other side's value) → result; the runtime calls it with
    /// the left value first whichever side arrives.
    pub(crate) joiner: Joiner<K, This, Other, R>,
}

fn buffer_key(side: u8, t: i64, key: &[u8], seq: i64) -> Vec<u8> {
    let mut k = vec![side];
    k.extend_from_slice(&time_key(t));
    k.extend_from_slice(&sized(key));
    k.extend_from_slice(&time_key(seq));
    k
}

impl<K, This, Other, R> StatefulOp for JoinSide<K, This, Other, R>
where
    K: Clone + Send + Sync + Serialize + 'static,
    This: Send + Sync + Serialize + 'static,
    Other: Send + Sync + DeserializeOwned + 'static,
    R: Send + Sync + 'static,
{
    fn stores(&self) -> Vec<String> {
        vec![self.store.clone()]
    }

    fn process(&self, rec: Rec, cx: &mut OpCx<'_, '_>, out: &mut Vec<(usize, Rec)>) -> Result<(), Refusal> {
        let store = self.store.as_str();
        let t = rec.time;
        let w = self.windows.window_ms;
        let (Some(lo), Some(hi)) = (
            t.0.checked_sub(w),
            t.0.checked_add(w).and_then(|h| h.checked_add(1)),
        ) else {
            return Err(Refusal::Park(format!("event time {} ms is out of range", t.0)));
        };
        let (before, st) = advance_stream_time(cx.state, store, t)?;
        let late = t.0.saturating_add(w).saturating_add(self.windows.grace_ms) <= st.0;
        if late {
            *cx.late += 1;
        } else {
            let key: &K = rec.key();
            let key_bytes = to_json("the join key", key)?;
            let value: &This = rec.value();
            let seq = get_number(cx.state, store, "m/seq")?.unwrap_or(0) + 1;
            put_number(cx.state, store, "m/seq", seq)?;
            cx.state.put(
                store,
                &buffer_key(self.this, t.0, &key_bytes, seq),
                Some(to_json("the join value", value)?),
            )?;
            let matches = cx.state.range(
                store,
                &[&[self.other][..], &time_key(lo)].concat(),
                &[&[self.other][..], &time_key(hi)].concat(),
            )?;
            for (k, v) in matches {
                let bad = || Refusal::State(StateError(format!("store {store}: a join key is malformed")));
                let rest = k.get(1..).ok_or_else(bad)?;
                let other_t = read_time(rest).ok_or_else(bad)?;
                let (other_key, _) = read_sized(rest.get(8..).ok_or_else(bad)?).ok_or_else(bad)?;
                if other_key != key_bytes.as_slice() {
                    continue;
                }
                let other: Other = from_json(store, &v)?;
                let joined = (self.joiner)(key, value, &other);
                out.push((
                    0,
                    Rec::new(key.clone(), joined, UnixMillis(t.0.max(other_t)), None),
                ));
            }
        }
        if before.is_none_or(|b| st.0 > b) {
            // Buffered records no later record can join any more.
            let keep_from =
                st.0.saturating_sub(w.saturating_mul(2))
                    .saturating_sub(self.windows.grace_ms)
                    .saturating_add(1);
            let from = get_number(cx.state, store, "m/exp")?.unwrap_or(i64::MIN);
            if keep_from > from {
                for side in [b'l', b'r'] {
                    let gone =
                        cx.state
                            .range(store, &[side], &[&[side][..], &time_key(keep_from)].concat())?;
                    for (k, _) in gone {
                        cx.state.put(store, &k, None)?;
                    }
                }
                put_number(cx.state, store, "m/exp", keep_from)?;
            }
        }
        Ok(())
    }
}
