//! The changelog topic's records: each change of a processing transaction, tagged with the
//! transaction, plus a commit marker for the previous transaction; and the restore that turns
//! such records back into the committed store state (see [`exactly_core::changelog`]).

use exactly_core::changelog::{ChangelogEntry, Restore, TxnSeq};

use crate::store::{Batch, Change};

/// Header carrying the writing transaction (`epoch.seq`).
pub const TXN_HEADER: &str = "exactly-txn";
/// Key of a commit marker record; its value is the committed transaction (`epoch.seq`).
pub const COMMIT_MARKER_KEY: &str = "exactly-committed";

/// One changelog record: key, value (None: tombstone), and the transaction header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    /// Record key.
    pub key: String,
    /// Record value.
    pub value: Option<String>,
    /// `exactly-txn` header.
    pub txn: String,
}

/// The records transaction `txn` writes: first the marker of `previous_committed` (if any),
/// then every change of `batch`.
pub fn records_for(txn: TxnSeq, previous_committed: Option<TxnSeq>, batch: &Batch) -> Vec<ChangelogRecord> {
    let header = txn.to_header();
    let marker = previous_committed.map(|p| ChangelogRecord {
        key: COMMIT_MARKER_KEY.to_owned(),
        value: Some(p.to_header()),
        txn: header.clone(),
    });
    marker
        .into_iter()
        .chain(batch.changes.iter().map(|c| {
            let (key, value) = c.to_changelog();
            ChangelogRecord {
                key,
                value,
                txn: header.clone(),
            }
        }))
        .collect()
}

/// Reads changelog records in order and returns the committed state as one batch to commit into
/// an empty store, the last transaction restored, and how many records were dropped (aborted,
/// not yet marked, or unreadable).
pub fn restore(records: impl IntoIterator<Item = ChangelogRecord>) -> (Batch, Option<TxnSeq>, usize) {
    let mut restore: Restore<String, Option<String>> = Restore::new();
    let mut unreadable = 0;
    for record in records {
        if record.key == COMMIT_MARKER_KEY {
            match record.value.as_deref().and_then(TxnSeq::from_header) {
                Some(txn) => restore.push(ChangelogEntry::Committed { txn }),
                None => unreadable += 1,
            }
            continue;
        }
        match TxnSeq::from_header(&record.txn) {
            // The value is kept as written, tombstones included, so a later change of the same
            // entry overwrites an earlier one in order.
            Some(txn) => restore.push(ChangelogEntry::Change {
                txn,
                key: record.key,
                value: Some(record.value),
            }),
            None => unreadable += 1,
        }
    }
    let (state, last, dropped) = restore.finish();
    let changes = state
        .into_iter()
        .filter_map(|(key, value)| Change::from_changelog(&key, value.as_deref()))
        .filter(|c| {
            !matches!(
                c,
                Change::Count { count: None, .. } | Change::Seen { seen: false, .. }
            )
        })
        .collect();
    (Batch { changes }, last, dropped + unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_core::UnixMillis;

    fn count(key: &str, c: Option<u64>) -> Change {
        Change::Count {
            window_start: UnixMillis(0),
            key: key.into(),
            count: c,
        }
    }

    #[test]
    fn aborted_and_unmarked_transactions_are_not_restored() {
        let t = |seq| TxnSeq { epoch: 1, seq };
        let mut log = Vec::new();
        // t0 commits; t1 (carrying t0's marker) aborts but stays visible; t2 carries the
        // marker again and commits; t3 marks t2 and commits, unmarked itself.
        log.extend(records_for(
            t(0),
            None,
            &Batch {
                changes: vec![count("a", Some(1))],
            },
        ));
        log.extend(records_for(
            t(1),
            Some(t(0)),
            &Batch {
                changes: vec![count("a", Some(99))],
            },
        ));
        log.extend(records_for(
            t(2),
            Some(t(0)),
            &Batch {
                changes: vec![count("b", Some(1)), count("a", Some(2))],
            },
        ));
        log.extend(records_for(
            t(3),
            Some(t(2)),
            &Batch {
                changes: vec![count("a", None)],
            },
        ));
        let (batch, last, dropped) = restore(log);
        assert_eq!(last, Some(t(2)));
        assert_eq!(batch.changes, vec![count("a", Some(2)), count("b", Some(1))]);
        assert_eq!(dropped, 2, "t1's change and t3's unmarked tombstone");
    }
}
