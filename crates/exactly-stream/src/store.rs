//! The redb-backed windowed state store and the changelog form of its changes.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use exactly_core::UnixMillis;
use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};

/// (window start, key) → count.
const COUNTS: TableDefinition<'static, (i64, &str), u64> = TableDefinition::new("counts");
/// (window start, key, idempotency key) → 1: already counted.
const SEEN: TableDefinition<'static, (i64, &str, &str), u8> = TableDefinition::new("seen");
/// (topic, partition) → next input offset the state reflects.
const OFFSETS: TableDefinition<'static, (&str, i32), i64> = TableDefinition::new("offsets");
/// (store name, key) → value: the stores of a DSL topology's task.
const ENTRIES: TableDefinition<'static, (&str, &[u8]), &[u8]> = TableDefinition::new("entries");
/// Named numbers: stream time, and the changelog offset an interrupted restore resumes from.
const META: TableDefinition<'static, &str, i64> = TableDefinition::new("meta");
const RESTORE_POSITION: &str = "restore_position";
/// The page cache of one store file.
const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The store failed.
#[derive(Debug, thiserror::Error)]
#[error("state store: {context}: {source}")]
pub struct StoreError {
    context: &'static str,
    #[source]
    source: redb::Error,
}

fn at<E: Into<redb::Error>>(context: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError {
        context,
        source: e.into(),
    }
}

/// One change of the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A window's count; None removes the window (retention passed).
    Count {
        /// Window start.
        window_start: UnixMillis,
        /// Grouping key.
        key: String,
        /// New count.
        count: Option<u64>,
    },
    /// An idempotency key counted in a window; `seen: false` forgets it with its window.
    Seen {
        /// Window start.
        window_start: UnixMillis,
        /// Grouping key.
        key: String,
        /// The input's idempotency key text.
        idempotency_key: String,
        /// Recorded or forgotten.
        seen: bool,
    },
    /// The next input offset of a partition.
    Offset {
        /// Input topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Next offset to read.
        offset: i64,
    },
    /// The largest event time seen.
    StreamTime(UnixMillis),
    /// An entry of a DSL topology's store; None removes it.
    Entry {
        /// The store (an operator's name).
        store: String,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Option<Vec<u8>>,
    },
}

impl Change {
    /// The changelog record: key text, and value text (None: a tombstone). Keys are distinct per
    /// store entry, so log compaction keeps exactly the latest state.
    pub fn to_changelog(&self) -> (String, Option<String>) {
        match self {
            Change::Count {
                window_start,
                key,
                count,
            } => (
                format!("c|{}|{key}", window_start.0),
                count.map(|c| c.to_string()),
            ),
            Change::Seen {
                window_start,
                key,
                idempotency_key,
                seen,
            } => (
                // The key's length lets it hold any character, '|' included.
                format!("s|{}|{}|{key}|{idempotency_key}", window_start.0, key.len()),
                seen.then(|| "1".to_owned()),
            ),
            Change::Offset {
                topic,
                partition,
                offset,
            } => (format!("o|{partition}|{topic}"), Some(offset.to_string())),
            Change::StreamTime(t) => ("t".to_owned(), Some(t.0.to_string())),
            // Store names are [A-Za-z0-9._-] (the builder checks), so '|' ends one; the key
            // and value are bytes, written as base64.
            Change::Entry { store, key, value } => (
                format!("e|{store}|{}", BASE64.encode(key)),
                value.as_ref().map(|v| BASE64.encode(v)),
            ),
        }
    }

    /// Reads a changelog record back; None for anything this version did not write.
    pub fn from_changelog(key: &str, value: Option<&str>) -> Option<Change> {
        let mut parts = key.splitn(2, '|');
        let kind = parts.next()?;
        let rest = parts.next().unwrap_or("");
        match kind {
            "c" => {
                let (start, key) = rest.split_once('|')?;
                Some(Change::Count {
                    window_start: UnixMillis(start.parse().ok()?),
                    key: key.to_owned(),
                    count: match value {
                        Some(v) => Some(v.parse().ok()?),
                        None => None,
                    },
                })
            }
            "s" => {
                let (start, rest) = rest.split_once('|')?;
                let (len, rest) = rest.split_once('|')?;
                let len: usize = len.parse().ok()?;
                let key = rest.get(..len)?;
                let idempotency_key = rest.get(len..)?.strip_prefix('|')?;
                Some(Change::Seen {
                    window_start: UnixMillis(start.parse().ok()?),
                    key: key.to_owned(),
                    idempotency_key: idempotency_key.to_owned(),
                    seen: value.is_some(),
                })
            }
            "o" => {
                let (partition, topic) = rest.split_once('|')?;
                Some(Change::Offset {
                    topic: topic.to_owned(),
                    partition: partition.parse().ok()?,
                    offset: value?.parse().ok()?,
                })
            }
            "t" => Some(Change::StreamTime(UnixMillis(value?.parse().ok()?))),
            "e" => {
                let (store, key) = rest.split_once('|')?;
                Some(Change::Entry {
                    store: store.to_owned(),
                    key: BASE64.decode(key).ok()?,
                    value: match value {
                        Some(v) => Some(BASE64.decode(v).ok()?),
                        None => None,
                    },
                })
            }
            _ => None,
        }
    }
}

/// Changes committed together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In order.
    pub changes: Vec<Change>,
}

/// The topology entries as one read transaction sees them.
type EntriesReader = ReadOnlyTable<(&'static str, &'static [u8]), &'static [u8]>;

/// The local windowed state.
pub struct StateStore {
    db: Database,
    /// The topology entries as of the last commit, kept open between lookups (a read
    /// transaction and table opened per lookup cost more than the lookup); every commit drops
    /// it, so a lookup never sees less than what was committed.
    entries_reader: Mutex<Option<EntriesReader>>,
}

impl StateStore {
    /// Opens or creates the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb's default cache is 1 GiB per file; a task's working set is its open windows.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
            .map_err(at("open"))?;
        let tx = db.begin_write().map_err(at("begin"))?;
        {
            tx.open_table(COUNTS).map_err(at("create counts"))?;
            tx.open_table(SEEN).map_err(at("create seen"))?;
            tx.open_table(OFFSETS).map_err(at("create offsets"))?;
            tx.open_table(META).map_err(at("create meta"))?;
            tx.open_table(ENTRIES).map_err(at("create entries"))?;
        }
        tx.commit().map_err(at("commit"))?;
        Ok(StateStore {
            db,
            entries_reader: Mutex::new(None),
        })
    }

    /// Applies `batch` in one local transaction: all of it or none.
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.commit_restoring(batch, None, true)
    }

    /// Applies `batch` read from the changelog by a restore, with the changelog offset the
    /// restore resumes from if it is cut short (`None`: the restore is complete, and the store
    /// is a task's state from now on), in one local transaction. Not `durable`, it survives a
    /// crash only once a later durable commit is made (a crash reverts the file to the last
    /// durable commit, its resume offset included: still consistent), and costs no fsync.
    pub fn commit_restoring(
        &self,
        batch: &Batch,
        resume_at: Option<i64>,
        durable: bool,
    ) -> Result<(), StoreError> {
        self.commit_changes(&batch.changes, resume_at, durable)
    }

    /// [`StateStore::commit_restoring`] of changes made one at a time (a restore's writer
    /// parses each changelog record as it is written, not a slice's copy first).
    pub fn commit_changes<C: std::borrow::Borrow<Change>>(
        &self,
        changes: impl IntoIterator<Item = C>,
        resume_at: Option<i64>,
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(at("begin"))?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(at("durability"))?;
        }
        {
            let mut meta = tx.open_table(META).map_err(at("open meta"))?;
            match resume_at {
                Some(offset) => {
                    meta.insert(RESTORE_POSITION, offset)
                        .map_err(at("write restore position"))?;
                }
                None => {
                    meta.remove(RESTORE_POSITION)
                        .map_err(at("remove restore position"))?;
                }
            }
        }
        {
            let mut counts = tx.open_table(COUNTS).map_err(at("open counts"))?;
            let mut seen = tx.open_table(SEEN).map_err(at("open seen"))?;
            let mut offsets = tx.open_table(OFFSETS).map_err(at("open offsets"))?;
            let mut meta = tx.open_table(META).map_err(at("open meta"))?;
            let mut entries = tx.open_table(ENTRIES).map_err(at("open entries"))?;
            for change in changes {
                match change.borrow() {
                    Change::Count {
                        window_start,
                        key,
                        count: Some(c),
                    } => {
                        counts
                            .insert((window_start.0, key.as_str()), c)
                            .map_err(at("write count"))?;
                    }
                    Change::Count {
                        window_start,
                        key,
                        count: None,
                    } => {
                        counts
                            .remove((window_start.0, key.as_str()))
                            .map_err(at("remove count"))?;
                    }
                    Change::Seen {
                        window_start,
                        key,
                        idempotency_key,
                        seen: flag,
                    } => {
                        let entry = (window_start.0, key.as_str(), idempotency_key.as_str());
                        if *flag {
                            seen.insert(entry, 1).map_err(at("write seen"))?;
                        } else {
                            seen.remove(entry).map_err(at("remove seen"))?;
                        }
                    }
                    Change::Offset {
                        topic,
                        partition,
                        offset,
                    } => {
                        offsets
                            .insert((topic.as_str(), *partition), offset)
                            .map_err(at("write offset"))?;
                    }
                    Change::StreamTime(t) => {
                        meta.insert("stream_time", t.0).map_err(at("write stream time"))?;
                    }
                    Change::Entry {
                        store,
                        key,
                        value: Some(v),
                    } => {
                        entries
                            .insert((store.as_str(), key.as_slice()), v.as_slice())
                            .map_err(at("write entry"))?;
                    }
                    Change::Entry {
                        store,
                        key,
                        value: None,
                    } => {
                        entries
                            .remove((store.as_str(), key.as_slice()))
                            .map_err(at("remove entry"))?;
                    }
                }
            }
        }
        let committed = tx.commit().map_err(at("commit"));
        // Whether or not it committed, the next lookup reads afresh.
        *self.entries_reader.lock().unwrap_or_else(PoisonError::into_inner) = None;
        committed
    }

    /// Runs `read` on the topology entries as last committed.
    fn read_entries<T>(
        &self,
        read: impl FnOnce(&EntriesReader) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut cached = self.entries_reader.lock().unwrap_or_else(PoisonError::into_inner);
        let table = match cached.take() {
            Some(table) => table,
            None => {
                let tx = self.db.begin_read().map_err(at("begin read"))?;
                tx.open_table(ENTRIES).map_err(at("open entries"))?
            }
        };
        let out = read(&table);
        *cached = Some(table);
        out
    }

    /// The value at `key` in a topology store.
    pub fn entry(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_entries(|entries| {
            Ok(entries
                .get((store, key))
                .map_err(at("read entry"))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// The entries of a topology store with `from <= key < to`, in key order.
    pub fn entries(&self, store: &str, from: &[u8], to: &[u8]) -> Result<crate::dsl::Entries, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.read_entries(|entries| {
            let mut out = Vec::new();
            for item in entries
                .range((store, from)..(store, to))
                .map_err(at("range entries"))?
            {
                let (k, v) = item.map_err(at("read entry"))?;
                out.push((k.value().1.to_vec(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// The count of `key` in the window starting at `window_start` (0 when absent).
    pub fn count(&self, window_start: UnixMillis, key: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let counts = tx.open_table(COUNTS).map_err(at("open counts"))?;
        Ok(counts
            .get((window_start.0, key))
            .map_err(at("read count"))?
            .map_or(0, |v| v.value()))
    }

    /// True when `idempotency_key` was already counted for `key` in the window.
    pub fn seen(
        &self,
        window_start: UnixMillis,
        key: &str,
        idempotency_key: &str,
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let seen = tx.open_table(SEEN).map_err(at("open seen"))?;
        Ok(seen
            .get((window_start.0, key, idempotency_key))
            .map_err(at("read seen"))?
            .is_some())
    }

    /// Every count, ordered by window then key.
    pub fn counts(&self) -> Result<Vec<(UnixMillis, String, u64)>, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let counts = tx.open_table(COUNTS).map_err(at("open counts"))?;
        let mut out = Vec::new();
        for entry in counts.iter().map_err(at("scan counts"))? {
            let (k, v) = entry.map_err(at("scan counts"))?;
            let (start, key) = k.value();
            out.push((UnixMillis(start), key.to_owned(), v.value()));
        }
        Ok(out)
    }

    /// The input offsets the state reflects.
    pub fn offsets(&self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let offsets = tx.open_table(OFFSETS).map_err(at("open offsets"))?;
        let mut out = Vec::new();
        for entry in offsets.iter().map_err(at("scan offsets"))? {
            let (k, v) = entry.map_err(at("scan offsets"))?;
            let (topic, partition) = k.value();
            out.push((topic.to_owned(), partition, v.value()));
        }
        Ok(out)
    }

    /// Where an interrupted restore of this store resumes reading its changelog; `None` for a
    /// store whose restore completed (or never began), which is only used as a whole.
    pub fn restore_position(&self) -> Result<Option<i64>, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let meta = tx.open_table(META).map_err(at("open meta"))?;
        Ok(meta
            .get(RESTORE_POSITION)
            .map_err(at("read restore position"))?
            .map(|v| v.value()))
    }

    /// The stream time, if any record was processed.
    pub fn stream_time(&self) -> Result<Option<UnixMillis>, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let meta = tx.open_table(META).map_err(at("open meta"))?;
        Ok(meta
            .get("stream_time")
            .map_err(at("read stream time"))?
            .map(|v| UnixMillis(v.value())))
    }

    /// The changes that remove every window starting before `cutoff` with its seen keys (for
    /// retention); commit them, and send them to the changelog as tombstones.
    pub fn expiry(&self, cutoff: UnixMillis) -> Result<Batch, StoreError> {
        let tx = self.db.begin_read().map_err(at("begin read"))?;
        let counts = tx.open_table(COUNTS).map_err(at("open counts"))?;
        let seen = tx.open_table(SEEN).map_err(at("open seen"))?;
        let mut changes = Vec::new();
        for entry in counts
            .range((i64::MIN, "")..(cutoff.0, ""))
            .map_err(at("scan counts"))?
        {
            let (k, _) = entry.map_err(at("scan counts"))?;
            let (start, key) = k.value();
            changes.push(Change::Count {
                window_start: UnixMillis(start),
                key: key.to_owned(),
                count: None,
            });
        }
        for entry in seen
            .range((i64::MIN, "", "")..(cutoff.0, "", ""))
            .map_err(at("scan seen"))?
        {
            let (k, _) = entry.map_err(at("scan seen"))?;
            let (start, key, idempotency_key) = k.value();
            changes.push(Change::Seen {
                window_start: UnixMillis(start),
                key: key.to_owned(),
                idempotency_key: idempotency_key.to_owned(),
                seen: false,
            });
        }
        Ok(Batch { changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn count(start: i64, key: &str, c: Option<u64>) -> Change {
        Change::Count {
            window_start: UnixMillis(start),
            key: key.into(),
            count: c,
        }
    }

    #[test]
    fn a_batch_commits_whole_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        {
            let store = StateStore::open(&path).expect("open");
            store
                .commit(&Batch {
                    changes: vec![
                        count(0, "P-1", Some(2)),
                        Change::Seen {
                            window_start: UnixMillis(0),
                            key: "P-1".into(),
                            idempotency_key: "v7:a".into(),
                            seen: true,
                        },
                        Change::Offset {
                            topic: "orders".into(),
                            partition: 2,
                            offset: 41,
                        },
                        Change::StreamTime(UnixMillis(77)),
                    ],
                })
                .expect("commit");
        }
        let store = StateStore::open(&path).expect("reopen");
        assert_eq!(store.count(UnixMillis(0), "P-1").expect("count"), 2);
        assert!(store.seen(UnixMillis(0), "P-1", "v7:a").expect("seen"));
        assert!(!store.seen(UnixMillis(0), "P-1", "v7:b").expect("seen"));
        assert_eq!(store.offsets().expect("offsets"), vec![("orders".into(), 2, 41)]);
        assert_eq!(store.stream_time().expect("t"), Some(UnixMillis(77)));
    }

    #[test]
    fn a_restore_position_is_kept_until_the_restore_completes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        {
            let store = StateStore::open(&path).expect("open");
            assert_eq!(store.restore_position().expect("position"), None);
            store
                .commit_restoring(
                    &Batch {
                        changes: vec![count(0, "k", Some(1))],
                    },
                    Some(7),
                    true,
                )
                .expect("commit");
        }
        // Reopened (the process was killed): the restore resumes at 7, with what it wrote.
        let store = StateStore::open(&path).expect("reopen");
        assert_eq!(store.restore_position().expect("position"), Some(7));
        assert_eq!(store.count(UnixMillis(0), "k").expect("count"), 1);
        store
            .commit_restoring(
                &Batch {
                    changes: vec![count(0, "k", Some(2))],
                },
                Some(8),
                false,
            )
            .expect("a batch without fsync");
        assert_eq!(
            store.count(UnixMillis(0), "k").expect("count"),
            2,
            "visible at once"
        );
        store
            .commit_restoring(&Batch::default(), None, true)
            .expect("complete");
        assert_eq!(store.restore_position().expect("position"), None, "complete");
        store
            .commit_restoring(&Batch::default(), Some(9), true)
            .expect("again");
        store.commit(&Batch::default()).expect("a processing commit");
        assert_eq!(
            store.restore_position().expect("position"),
            None,
            "a store that processes is no restore in progress"
        );
    }

    fn entry(key: &[u8], value: Option<&[u8]>) -> Change {
        Change::Entry {
            store: "agg".into(),
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn a_lookup_after_a_commit_sees_it_though_readers_are_kept_between_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(&dir.path().join("s.redb")).expect("open");
        store
            .commit(&Batch {
                changes: vec![entry(b"a", Some(b"1"))],
            })
            .expect("commit");
        assert_eq!(store.entry("agg", b"a").expect("read"), Some(b"1".to_vec()));
        // The reader kept by that lookup must not hide the next commits, of either kind.
        store
            .commit(&Batch {
                changes: vec![entry(b"a", Some(b"2")), entry(b"b", Some(b"3"))],
            })
            .expect("commit");
        assert_eq!(store.entry("agg", b"a").expect("read"), Some(b"2".to_vec()));
        assert_eq!(store.entries("agg", b"a", b"c").expect("range").len(), 2);
        store
            .commit_changes([entry(b"a", None)], Some(4), false)
            .expect("commit while restoring");
        assert_eq!(store.entry("agg", b"a").expect("read"), None);
        assert_eq!(
            store.entries("agg", b"a", b"c").expect("range"),
            vec![(b"b".to_vec(), b"3".to_vec())]
        );
    }

    #[test]
    fn expiry_removes_old_windows_with_their_seen_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(&dir.path().join("s.redb")).expect("open");
        let seen = |start: i64| Change::Seen {
            window_start: UnixMillis(start),
            key: "k".into(),
            idempotency_key: "i".into(),
            seen: true,
        };
        store
            .commit(&Batch {
                changes: vec![
                    count(0, "k", Some(1)),
                    count(300, "k", Some(4)),
                    seen(0),
                    seen(300),
                ],
            })
            .expect("commit");
        let expiry = store.expiry(UnixMillis(300)).expect("expiry");
        assert_eq!(expiry.changes.len(), 2);
        store.commit(&expiry).expect("expire");
        assert_eq!(
            store.counts().expect("counts"),
            vec![(UnixMillis(300), "k".into(), 4)]
        );
        assert!(!store.seen(UnixMillis(0), "k", "i").expect("seen"));
        assert!(store.seen(UnixMillis(300), "k", "i").expect("seen"));
    }

    proptest! {
        #[test]
        fn changelog_form_round_trips(
            start in any::<i64>(), key in ".{0,20}", id in ".{0,20}", c in proptest::option::of(any::<u64>()),
            seen in any::<bool>(), partition in any::<i32>(), offset in any::<i64>()
        ) {
            let changes = [
                Change::Count { window_start: UnixMillis(start), key: key.clone(), count: c },
                Change::Seen { window_start: UnixMillis(start), key: key.clone(), idempotency_key: id.clone(), seen },
                Change::Offset { topic: key.clone(), partition, offset },
                Change::StreamTime(UnixMillis(start)),
                Change::Entry { store: "agg-1".into(), key: key.clone().into_bytes(), value: c.map(|c| c.to_be_bytes().to_vec()) },
            ];
            for change in changes {
                let (k, v) = change.to_changelog();
                let back = Change::from_changelog(&k, v.as_deref());
                prop_assert_eq!(Some(change.clone()), back);
            }
        }
    }
}
