//! What a consumer does when the next record it is handed is not at the offset after the last.
//!
//! On Kafka the offsets a partition serves have gaps that hold no record: a transaction's
//! commit or abort marker, aborted records under `read_committed`, compacted-away records.
//! librdkafka steps over them silently, as it must. A broker can also leave a gap that does
//! hold records: Tansu 0.6.0 assigns a produce its offsets (moves the high watermark) before it
//! stores the batch, so with two producers on one partition a fetch in between is served the
//! later batch and not the earlier one. librdkafka then steps over records that exist, and the
//! group commits past them: they are lost for that group, and under watermark dedupe a later
//! redelivery of them would count as a repeat too.
//!
//! The client cannot tell the two kinds of gap apart, so [`OffsetGapCheck`] reads each gap
//! twice: the first time the consumer is told to seek back to the first missing offset and
//! read again; a gap still there after that is taken as one that holds nothing. A broker that
//! served past records it had not stored yet serves them on the second read; a real gap costs
//! one extra fetch, and never stalls the partition.

use std::collections::HashMap;
use std::hash::Hash;

/// What to do with the record at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapVerdict {
    /// It follows the last one (or is the first seen, or comes again after a seek back): take it.
    Take,
    /// Offsets before it were skipped and not read again yet: drop it (and whatever else was
    /// fetched from its partition), seek the partition to `from` and read again.
    Refetch {
        /// The first offset not seen.
        from: i64,
    },
    /// The second read served the offset the first one skipped: the broker had served past
    /// records it held. Take it.
    Filled {
        /// Offsets the first read skipped over.
        skipped: i64,
    },
    /// The gap was read twice and is still there: it holds no record (a transaction marker,
    /// aborted or compacted records). Take it.
    AcrossGap {
        /// Offsets in the gap.
        missing: i64,
    },
}

/// Where a partition's next record is expected, and whether the gap before it was read again.
#[derive(Debug, Clone, Copy)]
struct Expected {
    next: i64,
    /// The gap from `next` was met once and the consumer sought back to it: the end of the gap
    /// it saw then.
    reread: Option<i64>,
}

/// The offsets a consumer was handed, per partition (`P`: a topic and partition).
#[derive(Debug, Clone)]
pub struct OffsetGapCheck<P> {
    partitions: HashMap<P, Expected, ahash::RandomState>,
}

impl<P> Default for OffsetGapCheck<P> {
    fn default() -> Self {
        OffsetGapCheck {
            partitions: HashMap::default(),
        }
    }
}

impl<P: Hash + Eq + Clone> OffsetGapCheck<P> {
    /// Judges the record at `offset` of `partition`, handed to the consumer now.
    pub fn observe(&mut self, partition: &P, offset: i64) -> GapVerdict {
        let Some(expected) = self.partitions.get_mut(partition) else {
            self.partitions.insert(
                partition.clone(),
                Expected {
                    next: offset.saturating_add(1),
                    reread: None,
                },
            );
            return GapVerdict::Take;
        };
        let verdict = match (offset.cmp(&expected.next), expected.reread) {
            // In order, or earlier: a redelivery after a seek back or a restart. The next
            // record is expected after this one.
            (std::cmp::Ordering::Less, _) | (std::cmp::Ordering::Equal, None) => GapVerdict::Take,
            (std::cmp::Ordering::Equal, Some(seen)) => GapVerdict::Filled {
                skipped: seen - expected.next,
            },
            (std::cmp::Ordering::Greater, None) => {
                expected.reread = Some(offset);
                return GapVerdict::Refetch { from: expected.next };
            }
            (std::cmp::Ordering::Greater, Some(_)) => GapVerdict::AcrossGap {
                missing: offset - expected.next,
            },
        };
        *expected = Expected {
            next: offset.saturating_add(1),
            reread: None,
        };
        verdict
    }

    /// The seek of a [`GapVerdict::Refetch`] failed: the gap was not read again, so the next
    /// record after it asks for the refetch once more (the one now handed may be stale).
    pub fn refetch_failed(&mut self, partition: &P) {
        if let Some(expected) = self.partitions.get_mut(partition) {
            expected.reread = None;
        }
    }

    /// The partition moved (assigned anew, revoked, or sought elsewhere by the consumer) to a
    /// position not known here: its next record starts a fresh count.
    pub fn forget(&mut self, partition: &P) {
        self.partitions.remove(partition);
    }

    /// The partition reads from `next` (where it was assigned or sought to): a first record
    /// past it is a gap like any other. The first fetch after an assignment is at the end of
    /// the partition as often as any other, where a broker can serve past records.
    pub fn expect(&mut self, partition: &P, next: i64) {
        self.partitions
            .insert(partition.clone(), Expected { next, reread: None });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_records_and_redeliveries_are_taken() {
        let mut check = OffsetGapCheck::default();
        for offset in [5, 6, 7, 3, 4, 5, 6, 7, 8] {
            assert_eq!(check.observe(&0, offset), GapVerdict::Take, "offset {offset}");
        }
    }

    #[test]
    fn a_gap_is_read_again_once_then_taken() {
        let mut check = OffsetGapCheck::default();
        assert_eq!(check.observe(&0, 10), GapVerdict::Take);
        assert_eq!(check.observe(&0, 12), GapVerdict::Refetch { from: 11 });
        // The second read lands on the same record: the gap (a transaction marker) is real.
        assert_eq!(check.observe(&0, 12), GapVerdict::AcrossGap { missing: 1 });
        assert_eq!(check.observe(&0, 13), GapVerdict::Take);
        // A new gap later is read again too.
        assert_eq!(check.observe(&0, 20), GapVerdict::Refetch { from: 14 });
        assert_eq!(check.observe(&0, 14), GapVerdict::Filled { skipped: 6 });
    }

    #[test]
    fn partitions_are_judged_apart_and_forgotten_on_reassignment() {
        let mut check = OffsetGapCheck::default();
        assert_eq!(check.observe(&"a", 1), GapVerdict::Take);
        assert_eq!(check.observe(&"b", 100), GapVerdict::Take);
        assert_eq!(check.observe(&"a", 2), GapVerdict::Take);
        // Another member read "a" meanwhile; it comes back at that member's committed offset.
        check.forget(&"a");
        assert_eq!(check.observe(&"a", 50), GapVerdict::Take);
    }

    #[test]
    fn a_first_record_past_the_known_start_is_a_gap() {
        let mut check = OffsetGapCheck::default();
        // Assigned at the group's committed offset 40; the first fetch is served from 43.
        check.expect(&0, 40);
        assert_eq!(check.observe(&0, 43), GapVerdict::Refetch { from: 40 });
        assert_eq!(check.observe(&0, 40), GapVerdict::Filled { skipped: 3 });
        check.expect(&1, 7);
        assert_eq!(check.observe(&1, 7), GapVerdict::Take);
    }

    #[test]
    fn a_failed_seek_asks_for_the_refetch_again() {
        let mut check = OffsetGapCheck::default();
        check.observe(&0, 1);
        assert_eq!(check.observe(&0, 4), GapVerdict::Refetch { from: 2 });
        check.refetch_failed(&0);
        // Not sought back, so the next record handed is the one after 4: still a gap from 2.
        assert_eq!(check.observe(&0, 5), GapVerdict::Refetch { from: 2 });
    }

    /// A partition as a broker serves it: `records` are the offsets holding a record; a fetch
    /// from `position` returns the first one at or after it that is visible. `late` offsets
    /// are invisible to the first fetch that reaches past them (Tansu's produce race) and
    /// visible from then on; offsets never in `records` are gaps that hold nothing (markers).
    struct ModelPartition {
        records: Vec<i64>,
        late: std::collections::BTreeSet<i64>,
    }

    impl ModelPartition {
        fn fetch(&mut self, position: i64) -> Option<i64> {
            let Some(&next) = self
                .records
                .iter()
                .find(|&&o| o >= position && !self.late.contains(&o))
            else {
                // Nothing visible: a consumer polls again, and by then the late batches are
                // stored.
                self.late.clear();
                return self.records.iter().find(|&&o| o >= position).copied();
            };
            // Skipped now, stored by the time anyone reads again.
            let skipped: Vec<i64> = self.late.range(position..next).copied().collect();
            for o in skipped {
                self.late.remove(&o);
            }
            Some(next)
        }
    }

    proptest! {
        /// Whatever the markers and late batches, a consumer that follows the verdicts takes
        /// every record once, in offset order, with at most one extra read per gap.
        #[test]
        fn following_the_verdicts_takes_every_record_once_in_order(
            steps in proptest::collection::vec((1i64..4, any::<bool>()), 1..200),
        ) {
            let mut records = Vec::new();
            let mut late = std::collections::BTreeSet::new();
            let mut offset = 0i64;
            for (stride, is_late) in steps {
                // A stride of more than one leaves offsets that hold no record.
                offset += stride;
                records.push(offset);
                if is_late {
                    late.insert(offset);
                }
            }
            let gaps = records.windows(2).filter(|w| w[1] != w[0] + 1).count() + 1 + late.len();
            let mut broker = ModelPartition { records: records.clone(), late };
            let mut check = OffsetGapCheck::default();
            let mut taken = Vec::new();
            // The consumer starts at offset 0 with one record before it already taken.
            check.observe(&0, -1);
            let mut position = 0;
            let mut fetches = 0;
            while let Some(offset) = broker.fetch(position) {
                fetches += 1;
                prop_assert!(fetches <= records.len() + gaps, "the partition stalled");
                match check.observe(&0, offset) {
                    GapVerdict::Refetch { from } => position = from,
                    GapVerdict::Take | GapVerdict::Filled { .. } | GapVerdict::AcrossGap { .. } => {
                        taken.push(offset);
                        position = offset + 1;
                    }
                }
            }
            prop_assert_eq!(taken, records);
        }

        /// Without the second read (taking every record handed), a late batch is lost: the
        /// model above shows the broker fault, not a lenient check.
        #[test]
        fn taking_what_is_handed_loses_late_records(
            before in 1i64..5,
            after in 1i64..5,
        ) {
            let records: Vec<i64> = (0..before + 1 + after).collect();
            let mut broker = ModelPartition {
                records: records.clone(),
                late: [before].into_iter().collect(),
            };
            let mut taken = Vec::new();
            let mut position = 0;
            while let Some(offset) = broker.fetch(position) {
                taken.push(offset);
                position = offset + 1;
            }
            prop_assert!(!taken.contains(&before));
        }
    }
}
