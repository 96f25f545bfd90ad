//! Tumbling-window arithmetic for the stream processor: which window an event falls in, when a
//! record is too late to count (after window end + grace), when a window may be forgotten
//! (after its retention), and hot-key salting.

use crate::time::UnixMillis;

/// Tumbling windows of `size_ms`, accepting records up to `grace_ms` after a window's end and
/// keeping windows `retention_ms` after their end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TumblingWindows {
    /// Window length.
    pub size_ms: i64,
    /// How long after its end a window still accepts records.
    pub grace_ms: i64,
    /// How long after its end a window is kept (must be at least the grace).
    pub retention_ms: i64,
}

/// A window configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Size must be positive.
    #[error("window size must be positive, got {0} ms")]
    Size(i64),
    /// Grace must not be negative.
    #[error("grace must not be negative, got {0} ms")]
    Grace(i64),
    /// A window forgotten before its grace ends would be recreated by a late record and count
    /// from zero.
    #[error("retention ({retention_ms} ms) must be at least the grace ({grace_ms} ms)")]
    Retention {
        /// The retention asked for.
        retention_ms: i64,
        /// The grace asked for.
        grace_ms: i64,
    },
}

/// What happens to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Count it in the window starting here.
    Window(UnixMillis),
    /// Later than its window's end + grace, measured against the stream time: drop and count.
    Late {
        /// The window it would have belonged to.
        window_start: UnixMillis,
    },
    /// The event time is so far from now that its window's bounds do not fit in an i64.
    OutOfRange,
}

/// Why an event time is refused before it can move the stream time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventTimeError {
    /// Ahead of the wall clock by more than the allowed skew: counted, it would advance stream
    /// time and make every later record of the task late.
    #[error(
        "event time {event_time} ms is {ahead_ms} ms ahead of the wall clock (allowed skew {max_skew_ms} ms)"
    )]
    TooFarAhead {
        /// The record's event time.
        event_time: i64,
        /// How far ahead of now it is.
        ahead_ms: i64,
        /// The configured skew.
        max_skew_ms: i64,
    },
    /// Its window's bounds overflow.
    #[error("event time {0} ms is out of range: its window's bounds do not fit in 64 bits")]
    OutOfRange(i64),
}

impl TumblingWindows {
    /// Checks the configuration.
    pub fn new(size_ms: i64, grace_ms: i64, retention_ms: i64) -> Result<Self, WindowError> {
        if size_ms <= 0 {
            return Err(WindowError::Size(size_ms));
        }
        if grace_ms < 0 {
            return Err(WindowError::Grace(grace_ms));
        }
        if retention_ms < grace_ms {
            return Err(WindowError::Retention {
                retention_ms,
                grace_ms,
            });
        }
        Ok(TumblingWindows {
            size_ms,
            grace_ms,
            retention_ms,
        })
    }

    /// The start of the window holding `event_time` (windows are aligned to the epoch); None
    /// when it does not fit in an i64 (event times near `i64::MIN`).
    pub fn window_start(&self, event_time: UnixMillis) -> Option<UnixMillis> {
        event_time
            .0
            .checked_sub(event_time.0.rem_euclid(self.size_ms))
            .map(UnixMillis)
    }

    /// Where a record with `event_time` goes, given the stream time (the largest event time
    /// seen so far, the record's own included). Kafka Streams' rule: a window closes at
    /// end + grace of stream time.
    pub fn place(&self, event_time: UnixMillis, stream_time: UnixMillis) -> Placement {
        let Some(start) = self.window_start(event_time) else {
            return Placement::OutOfRange;
        };
        let Some(closes_at) = start
            .0
            .checked_add(self.size_ms)
            .and_then(|end| end.checked_add(self.grace_ms))
        else {
            return Placement::OutOfRange;
        };
        if stream_time.0 >= closes_at {
            Placement::Late { window_start: start }
        } else {
            Placement::Window(start)
        }
    }

    /// True when the window starting at `window_start` may be removed at `stream_time`.
    pub fn expired(&self, window_start: UnixMillis, stream_time: UnixMillis) -> bool {
        window_start
            .0
            .checked_add(self.size_ms)
            .and_then(|end| end.checked_add(self.retention_ms))
            .is_some_and(|gone_at| stream_time.0 >= gone_at)
    }

    /// The oldest window start still kept at `stream_time` is after this (saturating).
    pub fn expiry_cutoff(&self, stream_time: UnixMillis) -> UnixMillis {
        UnixMillis(
            stream_time
                .0
                .saturating_sub(self.size_ms)
                .saturating_sub(self.retention_ms)
                .saturating_add(1),
        )
    }

    /// Refuses an event time before it is counted: more than `max_skew_ms` ahead of `now` (the
    /// wall clock, an argument), or with window bounds that overflow.
    pub fn check_event_time(
        &self,
        event_time: UnixMillis,
        now: UnixMillis,
        max_skew_ms: i64,
    ) -> Result<(), EventTimeError> {
        let ahead_ms = event_time.0.saturating_sub(now.0);
        if ahead_ms > max_skew_ms {
            return Err(EventTimeError::TooFarAhead {
                event_time: event_time.0,
                ahead_ms,
                max_skew_ms,
            });
        }
        match self.place(event_time, event_time) {
            Placement::OutOfRange => Err(EventTimeError::OutOfRange(event_time.0)),
            _ => Ok(()),
        }
    }
}

/// The salted key `key#n` for a hot key split into `salts` partial counts (FNV-1a of the
/// idempotency key picks n, so a redelivery lands in the same partial count). With one salt the
/// key is unchanged.
pub fn salted_key(key: &str, idempotency_key: &str, salts: u32) -> String {
    if salts <= 1 {
        return key.to_owned();
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in idempotency_key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{key}#{}", hash % u64::from(salts))
}

/// The key a salted key's partial count belongs to (merged downstream).
pub fn unsalted_key(salted: &str) -> &str {
    match salted.rsplit_once('#') {
        Some((key, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => key,
        _ => salted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN5: i64 = 5 * 60 * 1000;

    #[test]
    fn configuration_is_checked() {
        assert!(TumblingWindows::new(0, 0, 0).is_err());
        assert!(TumblingWindows::new(MIN5, -1, 0).is_err());
        assert!(TumblingWindows::new(MIN5, 1000, 999).is_err());
        assert!(TumblingWindows::new(MIN5, 1000, 1000).is_ok());
    }

    #[test]
    fn late_means_after_end_plus_grace_of_stream_time() {
        let w = TumblingWindows::new(MIN5, 60_000, 3_600_000).expect("valid");
        let t = UnixMillis(10 * MIN5 + 123);
        assert_eq!(w.window_start(t), Some(UnixMillis(10 * MIN5)));
        let end = 11 * MIN5;
        assert_eq!(
            w.place(t, UnixMillis(end + 59_999)),
            Placement::Window(UnixMillis(10 * MIN5))
        );
        assert_eq!(
            w.place(t, UnixMillis(end + 60_000)),
            Placement::Late {
                window_start: UnixMillis(10 * MIN5)
            }
        );
        assert!(!w.expired(UnixMillis(10 * MIN5), UnixMillis(end + 3_599_999)));
        assert!(w.expired(UnixMillis(10 * MIN5), UnixMillis(end + 3_600_000)));
    }

    #[test]
    fn salts_split_and_merge_back() {
        assert_eq!(salted_key("P-1", "v7:x", 1), "P-1");
        let salted = salted_key("P-1", "v7:abc", 8);
        assert!(salted.starts_with("P-1#"));
        assert_eq!(salted, salted_key("P-1", "v7:abc", 8), "same key, same salt");
        assert_eq!(unsalted_key(&salted), "P-1");
        assert_eq!(unsalted_key("a#b"), "a#b");
    }

    #[test]
    fn extreme_event_times_are_refused_not_overflowed() {
        let w = TumblingWindows::new(MIN5, 60_000, 3_600_000).expect("valid");
        let now = UnixMillis(1_700_000_000_000);
        assert_eq!(w.place(UnixMillis(i64::MIN), now), Placement::OutOfRange);
        assert_eq!(w.place(UnixMillis(i64::MAX), now), Placement::OutOfRange);
        assert!(!w.expired(UnixMillis(i64::MAX - 10), now));
        assert_eq!(
            w.check_event_time(UnixMillis(i64::MIN), now, 3_600_000),
            Err(EventTimeError::OutOfRange(i64::MIN))
        );
        assert!(matches!(
            w.check_event_time(UnixMillis(i64::MAX), now, 3_600_000),
            Err(EventTimeError::TooFarAhead { .. })
        ));
        assert!(matches!(
            w.check_event_time(now.plus_ms(3_600_001), now, 3_600_000),
            Err(EventTimeError::TooFarAhead {
                ahead_ms: 3_600_001,
                ..
            })
        ));
        assert_eq!(w.check_event_time(now.plus_ms(3_600_000), now, 3_600_000), Ok(()));
        assert_eq!(w.expiry_cutoff(UnixMillis(i64::MIN)), UnixMillis(i64::MIN + 1));
        assert_eq!(UnixMillis(i64::MAX).millis_since(UnixMillis(i64::MIN)), i64::MAX);
    }

    proptest! {
        /// No event time and no stream time makes the window math panic.
        #[test]
        fn window_math_never_overflows(t in any::<i64>(), stream in any::<i64>(), now in any::<i64>(), skew in 0i64..i64::MAX) {
            let w = TumblingWindows::new(MIN5, 60_000, 3_600_000).expect("valid");
            let _ = w.place(UnixMillis(t), UnixMillis(stream));
            let _ = w.expired(UnixMillis(t), UnixMillis(stream));
            let _ = w.expiry_cutoff(UnixMillis(stream));
            let _ = w.check_event_time(UnixMillis(t), UnixMillis(now), skew);
        }

        #[test]
        fn every_time_falls_in_exactly_one_window(t in -1_000_000_000_000i64..4_000_000_000_000, size in 1i64..10_000_000) {
            let w = TumblingWindows::new(size, 0, 0).expect("valid");
            let start = w.window_start(UnixMillis(t)).expect("in range");
            prop_assert!(start.0 <= t && t < start.0 + size);
            prop_assert_eq!(start.0.rem_euclid(size), 0);
        }

        #[test]
        fn a_record_is_never_late_while_its_window_is_open(
            t in 0i64..1_000_000_000, ahead in 0i64..1_000_000, size in 1i64..100_000, grace in 0i64..100_000
        ) {
            let w = TumblingWindows::new(size, grace, grace).expect("valid");
            let stream = UnixMillis(t + ahead);
            let start = w.window_start(UnixMillis(t)).expect("in range");
            let open = stream.0 < start.0 + size + grace;
            prop_assert_eq!(matches!(w.place(UnixMillis(t), stream), Placement::Window(_)), open);
            // A window is never removed while it still accepts records.
            if open { prop_assert!(!w.expired(start, stream)); }
        }

        #[test]
        fn unsalting_inverts_salting(key in "[A-Za-z0-9#-]{1,20}", id in ".{0,30}", salts in 2u32..64) {
            let salted = salted_key(&key, &id, salts);
            prop_assert_eq!(unsalted_key(&salted), key.as_str());
        }
    }
}
