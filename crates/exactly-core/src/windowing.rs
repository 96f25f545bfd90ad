//! The window kinds of the stream DSL: time windows (tumbling and hopping) and session windows,
//! each with a grace period, and when a window closes (its result is final) or may be forgotten.
//!
//! Kafka Streams' rules, on stream time (the largest event time a task has seen):
//! - a time window `[start, start + size)` accepts records until stream time reaches
//!   `start + size + grace`; it is then closed, and its result final;
//! - a session is the run of a key's records whose gaps are shorter than or equal to the
//!   inactivity gap; it closes when stream time reaches `end + gap + grace`.
//!
//! One deliberate difference for sessions: Kafka Streams drops a record as late only when the
//! merged session it would form is closed, so a record can still extend a session whose
//! `end + gap + grace` has passed (and whose "final" result `suppress` already emitted). Here a
//! record is late when it would merge into any closed session: an emitted final result never
//! changes. (Proptested below and in the DSL against a reference.)

use crate::time::UnixMillis;

/// A window configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WindowSpecError {
    /// Size, advance and gap must be positive.
    #[error("{what} must be positive, got {value} ms")]
    NotPositive {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: i64,
    },
    /// Grace and retention must not be negative.
    #[error("{what} must not be negative, got {value} ms")]
    Negative {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: i64,
    },
    /// A hopping window's advance must not exceed its size (records would fall in no window).
    #[error("the advance ({advance_ms} ms) must not exceed the window size ({size_ms} ms)")]
    AdvanceAboveSize {
        /// The size.
        size_ms: i64,
        /// The advance.
        advance_ms: i64,
    },
}

fn positive(what: &'static str, value: i64) -> Result<i64, WindowSpecError> {
    if value > 0 {
        Ok(value)
    } else {
        Err(WindowSpecError::NotPositive { what, value })
    }
}

fn not_negative(what: &'static str, value: i64) -> Result<i64, WindowSpecError> {
    if value >= 0 {
        Ok(value)
    } else {
        Err(WindowSpecError::Negative { what, value })
    }
}

/// Tumbling (advance = size) or hopping (advance < size) windows, aligned to the epoch:
/// windows start at every multiple of `advance_ms` and last `size_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindows {
    /// Window length.
    pub size_ms: i64,
    /// Distance between window starts.
    pub advance_ms: i64,
    /// How long after its end a window still accepts records.
    pub grace_ms: i64,
}

impl TimeWindows {
    /// Tumbling windows: each record in exactly one window.
    pub fn tumbling(size_ms: i64, grace_ms: i64) -> Result<Self, WindowSpecError> {
        Self::hopping(size_ms, size_ms, grace_ms)
    }

    /// Hopping windows: each record in `size / advance` windows (rounded up at the edges).
    pub fn hopping(size_ms: i64, advance_ms: i64, grace_ms: i64) -> Result<Self, WindowSpecError> {
        let size_ms = positive("window size", size_ms)?;
        let advance_ms = positive("advance", advance_ms)?;
        let grace_ms = not_negative("grace", grace_ms)?;
        if advance_ms > size_ms {
            return Err(WindowSpecError::AdvanceAboveSize { size_ms, advance_ms });
        }
        Ok(TimeWindows {
            size_ms,
            advance_ms,
            grace_ms,
        })
    }

    /// The starts of every window holding `t`, oldest first; empty when a bound overflows.
    pub fn starts_for(&self, t: UnixMillis) -> Vec<UnixMillis> {
        let Some(last) = t.0.checked_sub(t.0.rem_euclid(self.advance_ms)) else {
            return Vec::new();
        };
        // The oldest start s with s + size > t.
        let Some(lowest) = t.0.checked_sub(self.size_ms) else {
            return Vec::new();
        };
        let mut starts = Vec::new();
        let mut s = last;
        while s > lowest {
            if s.checked_add(self.size_ms)
                .and_then(|e| e.checked_add(self.grace_ms))
                .is_none()
            {
                return Vec::new();
            }
            starts.push(UnixMillis(s));
            match s.checked_sub(self.advance_ms) {
                Some(next) => s = next,
                None => break,
            }
        }
        starts.reverse();
        starts
    }

    /// When the window starting at `start` closes (saturating).
    pub fn closes_at(&self, start: UnixMillis) -> UnixMillis {
        UnixMillis(start.0.saturating_add(self.size_ms).saturating_add(self.grace_ms))
    }

    /// Whether the window starting at `start` no longer accepts records at `stream_time`.
    pub fn is_closed(&self, start: UnixMillis, stream_time: UnixMillis) -> bool {
        stream_time >= self.closes_at(start)
    }

    /// Every window starting before this is closed at `stream_time` (and those from it on are
    /// open): stream time − size − grace + 1, saturating.
    pub fn open_from(&self, stream_time: UnixMillis) -> UnixMillis {
        UnixMillis(
            stream_time
                .0
                .saturating_sub(self.size_ms)
                .saturating_sub(self.grace_ms)
                .saturating_add(1),
        )
    }

    /// The window's end (exclusive).
    pub fn end_of(&self, start: UnixMillis) -> UnixMillis {
        UnixMillis(start.0.saturating_add(self.size_ms))
    }

    /// How long after an event's time the last window holding it closes: a repeat of the event
    /// arriving later than this is late in every window, so its dedupe entry can go.
    pub fn horizon_ms(&self) -> i64 {
        self.size_ms.saturating_add(self.grace_ms)
    }
}

/// Session windows: a key's records closer than or equal to `gap_ms` apart form one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionWindows {
    /// Inactivity gap.
    pub gap_ms: i64,
    /// How long after `end + gap` a session still accepts records.
    pub grace_ms: i64,
}

/// One session: the event times of its first and last record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Session {
    /// First record's event time.
    pub start: UnixMillis,
    /// Last record's event time.
    pub end: UnixMillis,
}

/// What a record does to a key's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionPlacement {
    /// It joins `merged` (itself and the sessions in `absorbed`, which are replaced by it).
    Merge {
        /// The session after the record.
        merged: Session,
        /// The stored sessions it replaces (possibly none: a new session).
        absorbed: Vec<Session>,
    },
    /// It would touch a closed session (or start one already closed): dropped as late.
    Late,
}

impl SessionWindows {
    /// Checks the configuration.
    pub fn new(gap_ms: i64, grace_ms: i64) -> Result<Self, WindowSpecError> {
        Ok(SessionWindows {
            gap_ms: positive("inactivity gap", gap_ms)?,
            grace_ms: not_negative("grace", grace_ms)?,
        })
    }

    /// When `session` closes (saturating).
    pub fn closes_at(&self, session: Session) -> UnixMillis {
        UnixMillis(
            session
                .end
                .0
                .saturating_add(self.gap_ms)
                .saturating_add(self.grace_ms),
        )
    }

    /// Whether `session` no longer accepts records at `stream_time`.
    pub fn is_closed(&self, session: Session, stream_time: UnixMillis) -> bool {
        stream_time >= self.closes_at(session)
    }

    /// The range of session ends a record at `t` can merge with: sessions with
    /// `end >= t - gap` and `start <= t + gap` (a store looks them up by this range).
    pub fn search_range(&self, t: UnixMillis) -> (UnixMillis, UnixMillis) {
        (
            UnixMillis(t.0.saturating_sub(self.gap_ms)),
            UnixMillis(t.0.saturating_add(self.gap_ms)),
        )
    }

    /// Where a record at `t` goes, given the key's stored sessions (any superset of those within
    /// the gap; others are ignored) and the stream time (the record's own included).
    pub fn place(&self, t: UnixMillis, stored: &[Session], stream_time: UnixMillis) -> SessionPlacement {
        let (from, to) = self.search_range(t);
        let mut merged = Session { start: t, end: t };
        let mut absorbed = Vec::new();
        for s in stored {
            if s.end >= from && s.start <= to {
                merged.start = merged.start.min(s.start);
                merged.end = merged.end.max(s.end);
                absorbed.push(*s);
            }
        }
        let touches_closed = absorbed.iter().any(|s| self.is_closed(*s, stream_time));
        if touches_closed || self.is_closed(Session { start: t, end: t }, stream_time) {
            return SessionPlacement::Late;
        }
        absorbed.sort();
        SessionPlacement::Merge { merged, absorbed }
    }

    /// How long after an event's time its session's singleton closes: a repeat of the event
    /// arriving later than this is late, so its dedupe entry can go.
    pub fn horizon_ms(&self) -> i64 {
        self.gap_ms.saturating_add(self.grace_ms)
    }
}

/// The sessions of one key's event times, computed from scratch (sorted, split where the gap
/// exceeds `gap_ms`): the reference the incremental merge is tested against.
pub fn sessions_of(mut times: Vec<i64>, gap_ms: i64) -> Vec<Session> {
    times.sort_unstable();
    let mut sessions: Vec<Session> = Vec::new();
    for t in times {
        match sessions.last_mut() {
            Some(last) if t.saturating_sub(last.end.0) <= gap_ms => last.end = UnixMillis(t),
            _ => sessions.push(Session {
                start: UnixMillis(t),
                end: UnixMillis(t),
            }),
        }
    }
    sessions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn configurations_are_checked() {
        assert!(TimeWindows::tumbling(0, 0).is_err());
        assert!(TimeWindows::hopping(10, 11, 0).is_err());
        assert!(TimeWindows::hopping(10, 5, -1).is_err());
        assert!(SessionWindows::new(0, 0).is_err());
        assert_eq!(
            TimeWindows::hopping(10, 11, 0),
            Err(WindowSpecError::AdvanceAboveSize {
                size_ms: 10,
                advance_ms: 11
            })
        );
    }

    #[test]
    fn hopping_windows_of_a_time() {
        let w = TimeWindows::hopping(10, 4, 0).expect("valid");
        let starts: Vec<i64> = w.starts_for(UnixMillis(9)).into_iter().map(|s| s.0).collect();
        assert_eq!(starts, vec![0, 4, 8]);
        let starts: Vec<i64> = w.starts_for(UnixMillis(-1)).into_iter().map(|s| s.0).collect();
        assert_eq!(starts, vec![-8, -4]);
        assert!(w.starts_for(UnixMillis(i64::MAX)).is_empty());
        assert!(w.starts_for(UnixMillis(i64::MIN)).is_empty());
    }

    #[test]
    fn a_record_touching_a_closed_session_is_late() {
        let w = SessionWindows::new(10, 0).expect("valid");
        let closed = Session {
            start: UnixMillis(0),
            end: UnixMillis(0),
        };
        // Closed at 10: a record at 10 is within the gap of it (Kafka Streams would extend it).
        assert_eq!(
            w.place(UnixMillis(10), &[closed], UnixMillis(10)),
            SessionPlacement::Late
        );
        // Before it closes, the record merges.
        assert_eq!(
            w.place(UnixMillis(9), &[closed], UnixMillis(9)),
            SessionPlacement::Merge {
                merged: Session {
                    start: UnixMillis(0),
                    end: UnixMillis(9)
                },
                absorbed: vec![closed]
            }
        );
    }

    proptest! {
        #[test]
        fn time_windows_hold_exactly_the_times_within_them(
            t in -1_000_000i64..1_000_000, size in 1i64..1000, advance_div in 1i64..10, grace in 0i64..100
        ) {
            let advance = (size / advance_div).max(1);
            let w = TimeWindows::hopping(size, advance, grace).expect("valid");
            let starts = w.starts_for(UnixMillis(t));
            let mut expected = Vec::new();
            let mut s = (t - size - advance).div_euclid(advance) * advance;
            while s <= t {
                if s + size > t { expected.push(UnixMillis(s)); }
                s += advance;
            }
            prop_assert_eq!(starts, expected);
        }

        #[test]
        fn window_math_never_panics(t in any::<i64>(), st in any::<i64>(), size in 1i64..i64::MAX, grace in 0i64..i64::MAX) {
            let w = TimeWindows::tumbling(size, grace).expect("valid");
            for s in w.starts_for(UnixMillis(t)) {
                let _ = w.is_closed(s, UnixMillis(st));
            }
            let _ = w.open_from(UnixMillis(st));
            let s = SessionWindows::new(size, grace).expect("valid");
            let _ = s.place(UnixMillis(t), &[Session { start: UnixMillis(t), end: UnixMillis(t) }], UnixMillis(st));
        }

        /// Merging records one at a time (in any order, no record late) gives the sessions a
        /// sort-and-split of all their times gives.
        #[test]
        fn incremental_session_merge_equals_the_sorted_split(
            times in proptest::collection::vec(0i64..500, 1..60), gap in 1i64..40
        ) {
            let w = SessionWindows::new(gap, 1_000_000).expect("valid");
            let mut stored: Vec<Session> = Vec::new();
            let mut stream_time = UnixMillis(i64::MIN);
            for t in &times {
                stream_time = stream_time.max(UnixMillis(*t));
                match w.place(UnixMillis(*t), &stored, stream_time) {
                    SessionPlacement::Merge { merged, absorbed } => {
                        stored.retain(|s| !absorbed.contains(s));
                        stored.push(merged);
                    }
                    SessionPlacement::Late => prop_assert!(false, "nothing is late with this grace"),
                }
            }
            stored.sort();
            prop_assert_eq!(stored, sessions_of(times, gap));
        }
    }
}
