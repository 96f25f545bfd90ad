//! Windowed aggregations: time windows (tumbling, hopping) and session windows, each emitting
//! on every update or only the final result when a window closes; input duplicates (same
//! event id) are aggregated once; late records are dropped and counted; state past the
//! window's close (plus retention) is removed as stream time moves.
//!
//! One store per operator, its keys prefixed by what they hold:
//! `w` + window → aggregate; `c` + close time + window → () (session close index);
//! `s` + event time + key + event id → () (inputs already aggregated); `m/…` → numbers
//! (stream time and cursors).

use std::sync::Arc;

use exactly_core::windowing::{Session, SessionPlacement, SessionWindows, TimeWindows};
use exactly_core::UnixMillis;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::graph::{OpCx, Rec, Refusal, StatefulOp};
use super::state::{
    get_number, put_number, read_sized, read_time, sized, time_key, Entries, StateAccess, StateError,
};

/// A key and the window it is aggregated in (a windowed table's key). As JSON:
/// `{"key": …, "start": ms, "end": ms}`; for sessions `end` is the last record's time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Windowed<K> {
    /// The grouping key.
    pub key: K,
    /// Window start (inclusive).
    pub start: i64,
    /// Window end (exclusive for time windows; the last record's time for sessions).
    pub end: i64,
}

/// When a windowed aggregation sends its results (Kafka Streams' `EmitStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Emit {
    /// A result on every update of a window.
    #[default]
    OnUpdate,
    /// One result per window, when it closes (end + grace of stream time): final.
    OnWindowClose,
}

pub(crate) type InitFn<A> = Arc<dyn Fn() -> A + Send + Sync>;
pub(crate) type AddFn<K, V, A> = Arc<dyn Fn(&K, &V, A) -> Result<A, String> + Send + Sync>;
pub(crate) type MergeFn<K, A> = Arc<dyn Fn(&K, A, A) -> Result<A, String> + Send + Sync>;

pub(crate) fn to_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, Refusal> {
    serde_json::to_vec(value).map_err(|e| Refusal::Park(format!("{what} cannot be written as JSON: {e}")))
}

pub(crate) fn from_json<T: DeserializeOwned>(store: &str, bytes: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(bytes).map_err(|e| {
        Refusal::State(StateError(format!(
            "store {store} holds an unreadable entry: {e}"
        )))
    })
}

fn prefixed(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![prefix];
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// The stream time after `t` (stored per operator), and the one before it.
pub(crate) fn advance_stream_time(
    state: &mut dyn StateAccess,
    store: &str,
    t: UnixMillis,
) -> Result<(Option<i64>, UnixMillis), StateError> {
    let before = get_number(state, store, "m/st")?;
    let after = before.map_or(t.0, |b| b.max(t.0));
    if before != Some(after) {
        put_number(state, store, "m/st", after)?;
    }
    Ok((before, UnixMillis(after)))
}

/// True when `id` was already aggregated for this key and time; else records it.
pub(crate) fn seen_before(
    state: &mut dyn StateAccess,
    store: &str,
    t: UnixMillis,
    key: &[u8],
    id: &str,
) -> Result<bool, StateError> {
    let k = prefixed(b's', &[&time_key(t.0), &sized(key), id.as_bytes()]);
    if state.get(store, &k)?.is_some() {
        return Ok(true);
    }
    state.put(store, &k, Some(Vec::new()))?;
    Ok(false)
}

/// Removes what is kept of a prefix with a time below `up_to`, from the cursor `name` on.
fn remove_below(
    state: &mut dyn StateAccess,
    store: &str,
    prefix: u8,
    name: &str,
    up_to: i64,
) -> Result<Entries, StateError> {
    let from = get_number(state, store, name)?.unwrap_or(i64::MIN);
    if up_to <= from {
        return Ok(Vec::new());
    }
    let gone = state.range(store, &[prefix], &prefixed(prefix, &[&time_key(up_to)]))?;
    for (k, _) in &gone {
        state.put(store, k, None)?;
    }
    put_number(state, store, name, up_to)?;
    Ok(gone)
}

/// Forgets inputs whose every window closed: a repeat of them is late anyway.
pub(crate) fn forget_seen(
    state: &mut dyn StateAccess,
    store: &str,
    stream_time: UnixMillis,
    horizon_ms: i64,
) -> Result<(), StateError> {
    let up_to = stream_time.0.saturating_sub(horizon_ms).saturating_add(1);
    remove_below(state, store, b's', "m/seen", up_to).map(drop)
}

/// Aggregation over time windows.
pub(crate) struct TimeWindowAgg<K, V, A> {
    pub(crate) store: String,
    pub(crate) windows: TimeWindows,
    pub(crate) retention_ms: i64,
    pub(crate) emit: Emit,
    pub(crate) init: InitFn<A>,
    pub(crate) add: AddFn<K, V, A>,
}

impl<K, V, A> TimeWindowAgg<K, V, A>
where
    K: Clone + Send + Serialize + DeserializeOwned + 'static,
    A: Clone + Send + Serialize + DeserializeOwned + 'static,
{
    fn result(&self, key: K, start: i64, value: Option<A>, time: UnixMillis) -> Rec {
        let end = self.windows.end_of(UnixMillis(start)).0;
        Rec::new(Windowed { key, start, end }, value, time, None)
    }

    /// Stream time moved: sends the windows that closed (final mode), removes what is past
    /// retention, forgets old inputs.
    fn advance(
        &self,
        state: &mut dyn StateAccess,
        st: UnixMillis,
        out: &mut Vec<(usize, Rec)>,
    ) -> Result<(), Refusal> {
        let store = self.store.as_str();
        let open_from = self.windows.open_from(st).0;
        if self.emit == Emit::OnWindowClose {
            let from = get_number(state, store, "m/emit")?.unwrap_or(i64::MIN);
            if open_from > from {
                let closed = state.range(
                    store,
                    &prefixed(b'w', &[&time_key(from)]),
                    &prefixed(b'w', &[&time_key(open_from)]),
                )?;
                for (k, v) in closed {
                    let (start, key) = parse_window_key(store, &k)?;
                    let key: K = from_json(store, key)?;
                    let value: A = from_json(store, &v)?;
                    out.push((0, self.result(key, start, Some(value), st)));
                }
                put_number(state, store, "m/emit", open_from)?;
            }
        }
        remove_below(
            state,
            store,
            b'w',
            "m/exp",
            open_from.saturating_sub(self.retention_ms),
        )?;
        forget_seen(state, store, st, self.windows.horizon_ms())?;
        Ok(())
    }
}

fn parse_window_key<'k>(store: &str, k: &'k [u8]) -> Result<(i64, &'k [u8]), Refusal> {
    let bad = || Refusal::State(StateError(format!("store {store}: a window key is malformed")));
    let rest = k.get(1..).ok_or_else(bad)?;
    let start = read_time(rest).ok_or_else(bad)?;
    Ok((start, rest.get(8..).ok_or_else(bad)?))
}

impl<K, V, A> StatefulOp for TimeWindowAgg<K, V, A>
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
        let starts = self.windows.starts_for(t);
        if starts.is_empty() {
            return Err(Refusal::Park(format!(
                "event time {} ms is out of range: its windows' bounds do not fit in 64 bits",
                t.0
            )));
        }
        let (before, st) = advance_stream_time(cx.state, store, t)?;
        let open: Vec<UnixMillis> = starts
            .into_iter()
            .filter(|s| !self.windows.is_closed(*s, st))
            .collect();
        let key: &K = rec.key();
        let key_bytes = to_json("the grouping key", key)?;
        if open.is_empty() {
            *cx.late += 1;
        } else if rec
            .event_id
            .as_deref()
            .map(|id| seen_before(cx.state, store, t, &key_bytes, id))
            .transpose()?
            == Some(true)
        {
            *cx.duplicates += 1;
        } else {
            let value: &V = rec.value();
            for start in open {
                let k = prefixed(b'w', &[&time_key(start.0), &key_bytes]);
                let current = match cx.state.get(store, &k)? {
                    Some(bytes) => from_json(store, &bytes)?,
                    None => (self.init)(),
                };
                let next = (self.add)(key, value, current).map_err(Refusal::Park)?;
                cx.state.put(store, &k, Some(to_json("the aggregate", &next)?))?;
                if self.emit == Emit::OnUpdate {
                    out.push((0, self.result(key.clone(), start.0, Some(next), t)));
                }
            }
        }
        if before.is_none_or(|b| st.0 > b) {
            self.advance(cx.state, st, out)?;
        }
        Ok(())
    }
}

/// Aggregation over session windows.
pub(crate) struct SessionAgg<K, V, A> {
    pub(crate) store: String,
    pub(crate) windows: SessionWindows,
    pub(crate) retention_ms: i64,
    pub(crate) emit: Emit,
    pub(crate) init: InitFn<A>,
    pub(crate) add: AddFn<K, V, A>,
    pub(crate) merge: MergeFn<K, A>,
}

fn session_suffix(s: Session) -> Vec<u8> {
    let mut out = time_key(s.end.0).to_vec();
    out.extend_from_slice(&time_key(s.start.0));
    out
}

impl<K, V, A> SessionAgg<K, V, A>
where
    K: Clone + Send + Serialize + DeserializeOwned + 'static,
    A: Clone + Send + Serialize + DeserializeOwned + 'static,
{
    fn result(key: K, s: Session, value: Option<A>, time: UnixMillis) -> Rec {
        Rec::new(
            Windowed {
                key,
                start: s.start.0,
                end: s.end.0,
            },
            value,
            time,
            None,
        )
    }

    /// The entries of a session: (its aggregate's key, its close-index key).
    fn keys(&self, key_bytes: &[u8], s: Session) -> (Vec<u8>, Vec<u8>) {
        let suffix = session_suffix(s);
        (
            prefixed(b'w', &[&sized(key_bytes), &suffix]),
            prefixed(
                b'c',
                &[&time_key(self.windows.closes_at(s).0), &sized(key_bytes), &suffix],
            ),
        )
    }

    fn parse_close_key(store: &str, k: &[u8]) -> Result<(Vec<u8>, Session), Refusal> {
        let bad = || Refusal::State(StateError(format!("store {store}: a session key is malformed")));
        let rest = k.get(9..).ok_or_else(bad)?;
        let (key, rest) = read_sized(rest).ok_or_else(bad)?;
        let end = read_time(rest).ok_or_else(bad)?;
        let start = read_time(rest.get(8..).ok_or_else(bad)?).ok_or_else(bad)?;
        Ok((
            key.to_vec(),
            Session {
                start: UnixMillis(start),
                end: UnixMillis(end),
            },
        ))
    }

    fn advance(
        &self,
        state: &mut dyn StateAccess,
        st: UnixMillis,
        out: &mut Vec<(usize, Rec)>,
    ) -> Result<(), Refusal> {
        let store = self.store.as_str();
        let closed_below = st.0.saturating_add(1);
        if self.emit == Emit::OnWindowClose {
            let from = get_number(state, store, "m/emit")?.unwrap_or(i64::MIN);
            if closed_below > from {
                let closed = state.range(
                    store,
                    &prefixed(b'c', &[&time_key(from)]),
                    &prefixed(b'c', &[&time_key(closed_below)]),
                )?;
                for (k, _) in closed {
                    let (key_bytes, session) = Self::parse_close_key(store, &k)?;
                    let (agg_key, _) = self.keys(&key_bytes, session);
                    if let Some(v) = state.get(store, &agg_key)? {
                        let key: K = from_json(store, &key_bytes)?;
                        let value: A = from_json(store, &v)?;
                        out.push((0, Self::result(key, session, Some(value), st)));
                    }
                }
                put_number(state, store, "m/emit", closed_below)?;
            }
        }
        // A closed session is kept one more gap: a record up to a gap after it would merge
        // into it, and must find it to be dropped as late rather than start a session that
        // overlaps it.
        let expired = remove_below(
            state,
            store,
            b'c',
            "m/exp",
            closed_below
                .saturating_sub(self.windows.gap_ms)
                .saturating_sub(self.retention_ms),
        )?;
        for (k, _) in expired {
            let (key_bytes, session) = Self::parse_close_key(store, &k)?;
            let (agg_key, _) = self.keys(&key_bytes, session);
            state.put(store, &agg_key, None)?;
        }
        forget_seen(state, store, st, self.windows.horizon_ms())?;
        Ok(())
    }
}

impl<K, V, A> StatefulOp for SessionAgg<K, V, A>
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
        if t.0.checked_add(self.windows.horizon_ms()).is_none()
            || t.0.checked_sub(self.windows.gap_ms).is_none()
        {
            return Err(Refusal::Park(format!(
                "event time {} ms is out of range: its session's bounds do not fit in 64 bits",
                t.0
            )));
        }
        let (before, st) = advance_stream_time(cx.state, store, t)?;
        let key: &K = rec.key();
        let key_bytes = to_json("the grouping key", key)?;
        let (from, to) = self.windows.search_range(t);
        let prefix = prefixed(b'w', &[&sized(&key_bytes)]);
        let mut lo = prefix.clone();
        lo.extend_from_slice(&time_key(from.0));
        let mut hi = prefix.clone();
        hi.extend_from_slice(&[0xff; 17]);
        let mut nearby = Vec::new();
        for (k, v) in cx.state.range(store, &lo, &hi)? {
            let suffix = k.get(prefix.len()..).unwrap_or_default();
            let (Some(end), Some(start)) = (read_time(suffix), suffix.get(8..).and_then(read_time)) else {
                return Err(Refusal::State(StateError(format!(
                    "store {store}: a session key is malformed"
                ))));
            };
            if start <= to.0 {
                let s = Session {
                    start: UnixMillis(start),
                    end: UnixMillis(end),
                };
                nearby.push((s, v));
            }
        }
        let sessions: Vec<Session> = nearby.iter().map(|(s, _)| *s).collect();
        match self.windows.place(t, &sessions, st) {
            SessionPlacement::Late => *cx.late += 1,
            SessionPlacement::Merge { merged, absorbed } => {
                let duplicate = match rec.event_id.as_deref() {
                    Some(id) => seen_before(cx.state, store, t, &key_bytes, id)?,
                    None => false,
                };
                if duplicate {
                    *cx.duplicates += 1;
                } else {
                    let mut agg = (self.init)();
                    for (s, bytes) in &nearby {
                        if !absorbed.contains(s) {
                            continue;
                        }
                        let part: A = from_json(store, bytes)?;
                        agg = (self.merge)(key, agg, part).map_err(Refusal::Park)?;
                        let (agg_key, close_key) = self.keys(&key_bytes, *s);
                        cx.state.put(store, &agg_key, None)?;
                        cx.state.put(store, &close_key, None)?;
                        if self.emit == Emit::OnUpdate {
                            out.push((0, Self::result(key.clone(), *s, None, t)));
                        }
                    }
                    agg = (self.add)(key, rec.value::<V>(), agg).map_err(Refusal::Park)?;
                    let (agg_key, close_key) = self.keys(&key_bytes, merged);
                    cx.state
                        .put(store, &agg_key, Some(to_json("the aggregate", &agg)?))?;
                    cx.state.put(store, &close_key, Some(Vec::new()))?;
                    if self.emit == Emit::OnUpdate {
                        out.push((0, Self::result(key.clone(), merged, Some(agg), t)));
                    }
                }
            }
        }
        if before.is_none_or(|b| st.0 > b) {
            self.advance(cx.state, st, out)?;
        }
        Ok(())
    }
}
