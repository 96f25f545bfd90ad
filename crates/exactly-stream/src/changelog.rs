//! The changelog topic's records: each change of a processing transaction, tagged with the
//! transaction, plus a commit marker for the previous transaction; and the restore that turns
//! such records back into the committed store state (see [`exactly_core::changelog`]).

use exactly_core::changelog::{ChangelogEntry, Restore, RestoreMode, TxnSeq};

use crate::store::{Batch, Change};

/// Header carrying the writing transaction (`epoch.seq`).
pub const TXN_HEADER: &str = "exactly-txn";
/// Key prefix of a commit marker record: `exactly-committed/<epoch>`, one key per epoch so that
/// compaction keeps every epoch's newest marker; its value is the committed transaction
/// (`epoch.seq`). (Versions before per-epoch markers used the bare prefix as the key.)
pub const COMMIT_MARKER_KEY: &str = "exactly-committed";

/// The key of the marker of `txn`'s epoch.
pub fn marker_key(txn: TxnSeq) -> String {
    format!("{COMMIT_MARKER_KEY}/{}", txn.epoch)
}

fn is_marker_key(key: &str) -> bool {
    key == COMMIT_MARKER_KEY
        || key
            .strip_prefix(COMMIT_MARKER_KEY)
            .is_some_and(|rest| rest.starts_with('/'))
}

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

/// The records transaction `txn` writes: first the marker of `previous_committed` (if any:
/// marker mode only), then every change of `batch`.
pub fn records_for(txn: TxnSeq, previous_committed: Option<TxnSeq>, batch: &Batch) -> Vec<ChangelogRecord> {
    let header = txn.to_header();
    let marker = previous_committed.map(|p| ChangelogRecord {
        key: marker_key(p),
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

/// What restore makes of one changelog record (key, value, `exactly-txn` header): a commit
/// marker, a change, or `None` for a record it cannot use (no readable transaction).
pub fn entry_of(key: &str, value: Option<&str>, txn: &str) -> Option<ChangelogEntry<String, String>> {
    if is_marker_key(key) {
        return value
            .and_then(TxnSeq::from_header)
            .map(|txn| ChangelogEntry::Committed { txn });
    }
    TxnSeq::from_header(txn).map(|txn| ChangelogEntry::Change {
        txn,
        key: key.to_owned(),
        value: value.map(str::to_owned),
    })
}

/// Reads changelog records in order and returns the committed state as one batch to commit into
/// an empty store, the last transaction restored (marker mode), and how many records were
/// dropped (aborted, not yet marked, or unreadable).
pub fn restore(
    mode: RestoreMode,
    records: impl IntoIterator<Item = ChangelogRecord>,
) -> (Batch, Option<TxnSeq>, usize) {
    let mut restore: Restore<String, Option<String>> = Restore::new(mode);
    let mut unreadable = 0;
    for record in records {
        if is_marker_key(&record.key) {
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
        let t = |epoch, seq| TxnSeq { epoch, seq };
        let batch = |changes| Batch { changes };
        let mut log = Vec::new();
        // (1,0) commits; (1,1), carrying (1,0)'s marker, aborts but stays visible (Tansu), which
        // starts epoch 2; (2,0) carries the marker again and commits; (2,1) marks (2,0) and
        // commits, unmarked itself.
        log.extend(records_for(t(1, 0), None, &batch(vec![count("a", Some(1))])));
        log.extend(records_for(
            t(1, 1),
            Some(t(1, 0)),
            &batch(vec![count("a", Some(99))]),
        ));
        log.extend(records_for(
            t(2, 0),
            Some(t(1, 0)),
            &batch(vec![count("b", Some(1)), count("a", Some(2))]),
        ));
        log.extend(records_for(
            t(2, 1),
            Some(t(2, 0)),
            &batch(vec![count("a", None)]),
        ));
        let (restored, last, dropped) = restore(RestoreMode::Markers, log.clone());
        assert_eq!(last, Some(t(2, 0)));
        assert_eq!(restored.changes, vec![count("a", Some(2)), count("b", Some(1))]);
        assert_eq!(dropped, 2, "(1,1)'s change and (2,1)'s unmarked tombstone");

        // Read committed (aborted records hidden): (1,1) is not in the log, everything else
        // committed, the unmarked tombstone included.
        let hidden: Vec<ChangelogRecord> = log.into_iter().filter(|r| r.txn != "1.1").collect();
        let (restored, _, dropped) = restore(RestoreMode::ReadCommitted, hidden);
        assert_eq!(restored.changes, vec![count("b", Some(1))]);
        assert_eq!(dropped, 0);
    }

    #[test]
    fn each_epoch_has_its_own_marker_key() {
        let marker = |epoch| {
            records_for(
                TxnSeq { epoch: 9, seq: 0 },
                Some(TxnSeq { epoch, seq: 4 }),
                &Batch::default(),
            )
            .remove(0)
        };
        assert_eq!(marker(7).key, "exactly-committed/7");
        assert_eq!(marker(7).value.as_deref(), Some("7.4"));
        assert_ne!(marker(7).key, marker(8).key);
        assert!(is_marker_key("exactly-committed") && is_marker_key("exactly-committed/3"));
        assert!(!is_marker_key("exactly-committedX"));
    }
}
