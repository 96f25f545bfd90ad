//! One processing task's windowed counting over the store, with the open transaction's changes
//! held in an overlay: committing turns the overlay into a [`Batch`] (for the local store and the
//! changelog); aborting drops it, which restores the last committed state at no cost.

use std::collections::{HashMap, HashSet};

use exactly_core::window::{salted_key, EventTimeError, Placement, TumblingWindows};
use exactly_core::UnixMillis;

use crate::store::{Batch, Change, StateStore, StoreError};

/// One input record, as the task needs it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Grouping key (for example the product id).
    pub key: &'a str,
    /// The input's idempotency key text.
    pub idempotency_key: &'a str,
    /// Event time (the envelope's occurred_at): untrusted input.
    pub event_time: UnixMillis,
    /// The wall clock when the record was read (the runtime reads it, the task does not).
    pub now: UnixMillis,
}

/// What one input did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    /// Counted: the window's new result, to emit downstream.
    Updated {
        /// Window start.
        window_start: UnixMillis,
        /// Grouping key (salted when salting is on).
        key: String,
        /// The window's count now.
        count: u64,
    },
    /// Already counted in its window: nothing changes.
    Duplicate,
    /// Later than window end + grace: dropped and counted as late.
    Late,
    /// The event time cannot be counted (too far ahead of the wall clock, or out of range); the
    /// stream time did not move. The runtime parks the record with this reason.
    Refused(EventTimeError),
}

/// Default allowed skew of event time ahead of the wall clock: one hour.
pub const DEFAULT_MAX_EVENT_TIME_SKEW_MS: i64 = 3_600_000;

/// A task's counting state over a [`StateStore`].
pub struct WindowedCount {
    store: StateStore,
    windows: TumblingWindows,
    salts: u32,
    counts: HashMap<(i64, String), u64>,
    seen: HashSet<(i64, String, String)>,
    offsets: HashMap<(String, i32), i64>,
    stream_time: Option<UnixMillis>,
    late: u64,
    max_skew_ms: i64,
}

impl WindowedCount {
    /// Counting over `store` with `windows`; `salts` > 1 splits each key into partial counts.
    pub fn new(store: StateStore, windows: TumblingWindows, salts: u32) -> Result<Self, StoreError> {
        Ok(WindowedCount {
            stream_time: store.stream_time()?,
            store,
            windows,
            salts,
            counts: HashMap::new(),
            seen: HashSet::new(),
            offsets: HashMap::new(),
            late: 0,
            max_skew_ms: DEFAULT_MAX_EVENT_TIME_SKEW_MS,
        })
    }

    /// Event times more than `ms` ahead of the wall clock are refused (not counted).
    pub fn with_max_skew_ms(mut self, ms: i64) -> Self {
        self.max_skew_ms = ms.max(0);
        self
    }

    /// Processes one input inside the open transaction.
    pub fn process(&mut self, input: Input<'_>) -> Result<Counted, StoreError> {
        self.offsets
            .insert((input.topic.to_owned(), input.partition), input.offset + 1);
        // Checked before the stream time moves: one far-future record would otherwise make every
        // later record of this task late.
        if let Err(refused) = self
            .windows
            .check_event_time(input.event_time, input.now, self.max_skew_ms)
        {
            return Ok(Counted::Refused(refused));
        }
        let stream_time = self
            .stream_time
            .map_or(input.event_time, |t| UnixMillis(t.0.max(input.event_time.0)));
        self.stream_time = Some(stream_time);
        let window_start = match self.windows.place(input.event_time, stream_time) {
            Placement::Window(start) => start,
            Placement::Late { .. } => {
                self.late += 1;
                return Ok(Counted::Late);
            }
            Placement::OutOfRange => {
                // check_event_time refused these already; kept total for the type.
                return Ok(Counted::Refused(EventTimeError::OutOfRange(input.event_time.0)));
            }
        };
        let key = salted_key(input.key, input.idempotency_key, self.salts);
        let seen_entry = (window_start.0, key.clone(), input.idempotency_key.to_owned());
        if self.seen.contains(&seen_entry) || self.store.seen(window_start, &key, input.idempotency_key)? {
            return Ok(Counted::Duplicate);
        }
        self.seen.insert(seen_entry);
        let count = match self.counts.get(&(window_start.0, key.clone())) {
            Some(c) => *c,
            None => self.store.count(window_start, &key)?,
        } + 1;
        self.counts.insert((window_start.0, key.clone()), count);
        Ok(Counted::Updated {
            window_start,
            key,
            count,
        })
    }

    /// The committed state.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Moves past an input that is not counted (unreadable), so its offset commits with the state.
    pub fn skip(&mut self, topic: &str, partition: i32, offset: i64) {
        self.offsets.insert((topic.to_owned(), partition), offset + 1);
    }

    /// Late records dropped since the last [`WindowedCount::take_batch`].
    pub fn late(&self) -> u64 {
        self.late
    }

    /// The open transaction's changes, in a form for the local store and the changelog, with
    /// the windows past retention removed; the overlay starts empty again.
    pub fn take_batch(&mut self) -> Result<Batch, StoreError> {
        let mut changes = Vec::new();
        for (start, key, idempotency_key) in self.seen.drain() {
            changes.push(Change::Seen {
                window_start: UnixMillis(start),
                key,
                idempotency_key,
                seen: true,
            });
        }
        for ((start, key), count) in self.counts.drain() {
            changes.push(Change::Count {
                window_start: UnixMillis(start),
                key,
                count: Some(count),
            });
        }
        for ((topic, partition), offset) in self.offsets.drain() {
            changes.push(Change::Offset {
                topic,
                partition,
                offset,
            });
        }
        if let Some(t) = self.stream_time {
            changes.push(Change::StreamTime(t));
            // A window's end + retention passed: drop it (the oldest start still kept is the
            // one whose end + retention is after the stream time).
            let cutoff = self.windows.expiry_cutoff(t);
            let mut expired = self.store.expiry(cutoff)?;
            // Changes of this batch to expired windows are superseded by their removal.
            changes.append(&mut expired.changes);
        }
        self.late = 0;
        Ok(Batch { changes })
    }

    /// Drops the open transaction's changes (abort): the state is the last committed one.
    pub fn discard(&mut self) -> Result<(), StoreError> {
        self.counts.clear();
        self.seen.clear();
        self.offsets.clear();
        self.late = 0;
        self.stream_time = self.store.stream_time()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: i64 = 300_000;

    fn input<'a>(offset: i64, key: &'a str, id: &'a str, t: i64) -> Input<'a> {
        Input {
            topic: "orders",
            partition: 0,
            offset,
            key,
            idempotency_key: id,
            event_time: UnixMillis(t),
            now: UnixMillis(NOW),
        }
    }

    /// The wall clock in these tests: far after every ordinary event time used.
    const NOW: i64 = 1_000_000_000;

    #[test]
    fn a_far_future_or_extreme_event_time_is_refused_and_does_not_move_stream_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(&dir.path().join("s.redb")).expect("open");
        let windows = TumblingWindows::new(SIZE, 60_000, 3_600_000).expect("windows");
        let mut task = WindowedCount::new(store, windows, 1)
            .expect("task")
            .with_max_skew_ms(60_000);
        assert!(matches!(
            task.process(input(0, "P-1", "a", 10)).expect("p"),
            Counted::Updated { count: 1, .. }
        ));
        for (offset, t) in [(1, NOW + 60_001), (2, i64::MAX), (3, i64::MIN)] {
            assert!(
                matches!(
                    task.process(input(offset, "P-1", &format!("x{offset}"), t))
                        .expect("p"),
                    Counted::Refused(_)
                ),
                "event time {t} must be refused"
            );
        }
        // Stream time did not move: a record of the first window still counts.
        assert!(matches!(
            task.process(input(4, "P-1", "b", 20)).expect("p"),
            Counted::Updated { count: 2, .. }
        ));
        // Within the skew is fine.
        assert!(matches!(
            task.process(input(5, "P-9", "c", NOW + 60_000)).expect("p"),
            Counted::Updated { count: 1, .. }
        ));
        let batch = task.take_batch().expect("batch");
        task.store().commit(&batch).expect("commit");
        assert_eq!(
            task.store().offsets().expect("offsets"),
            vec![("orders".into(), 0, 6)]
        );
    }

    #[test]
    fn duplicates_count_once_late_records_are_dropped_and_aborts_cost_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(&dir.path().join("s.redb")).expect("open");
        let windows = TumblingWindows::new(SIZE, 60_000, 3_600_000).expect("windows");
        let mut task = WindowedCount::new(store, windows, 1).expect("task");
        assert!(matches!(
            task.process(input(0, "P-1", "a", 10)).expect("p"),
            Counted::Updated { count: 1, .. }
        ));
        assert_eq!(
            task.process(input(1, "P-1", "a", 10)).expect("p"),
            Counted::Duplicate
        );
        let batch = task.take_batch().expect("batch");
        task.store().commit(&batch).expect("commit");
        assert_eq!(
            task.process(input(2, "P-1", "a", 10)).expect("p"),
            Counted::Duplicate,
            "across commits"
        );

        // An aborted transaction leaves nothing behind.
        task.process(input(3, "P-1", "b", 20)).expect("p");
        task.discard().expect("discard");
        assert_eq!(task.store().count(UnixMillis(0), "P-1").expect("count"), 1);
        assert!(matches!(
            task.process(input(3, "P-1", "b", 20)).expect("p"),
            Counted::Updated { count: 2, .. }
        ));

        // Stream time moves past end + grace of window 0: a record for it is late.
        task.process(input(4, "P-2", "c", SIZE + 60_000)).expect("p");
        assert_eq!(task.process(input(5, "P-1", "d", 30)).expect("p"), Counted::Late);
        assert_eq!(task.late(), 1);
        let batch = task.take_batch().expect("batch");
        task.store().commit(&batch).expect("commit");
        assert_eq!(
            task.store().offsets().expect("offsets"),
            vec![("orders".into(), 0, 6)]
        );
    }

    proptest! {
        /// Whatever duplicates the input holds and wherever transactions abort and are redone,
        /// the committed counts equal the distinct inputs per window and key.
        #[test]
        fn committed_counts_equal_distinct_inputs(
            events in proptest::collection::vec((0u8..4, 0u16..40, 0i64..3), 1..120),
            aborts in proptest::collection::vec(any::<bool>(), 1..20),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = StateStore::open(&dir.path().join("s.redb")).expect("open");
            // Grace and retention longer than the test's time span: nothing is late.
            let windows = TumblingWindows::new(1000, 10_000, 10_000).expect("windows");
            let mut task = WindowedCount::new(store, windows, 1).expect("task");
            let mut expected: HashMap<(i64, String), HashSet<u16>> = HashMap::new();
            for (i, chunk) in events.chunks(7).enumerate() {
                let abort_first = aborts[i % aborts.len()];
                for attempt in 0..(1 + usize::from(abort_first)) {
                    for (j, (key, id, window)) in chunk.iter().enumerate() {
                        let key = format!("K{key}");
                        let id = format!("id-{id}");
                        task.process(input((i * 7 + j) as i64, &key, &id, window * 1000 + 5)).expect("p");
                    }
                    if abort_first && attempt == 0 {
                        task.discard().expect("discard");
                    } else {
                        let batch = task.take_batch().expect("batch");
                        task.store().commit(&batch).expect("commit");
                    }
                }
                for (key, id, window) in chunk {
                    expected.entry((window * 1000, format!("K{key}"))).or_default().insert(*id);
                }
            }
            let counts: HashMap<(i64, String), u64> = task
                .store()
                .counts()
                .expect("counts")
                .into_iter()
                .map(|(w, k, c)| ((w.0, k), c))
                .collect();
            let expected: HashMap<(i64, String), u64> =
                expected.into_iter().map(|(k, ids)| (k, ids.len() as u64)).collect();
            prop_assert_eq!(counts, expected);
        }
    }
}
