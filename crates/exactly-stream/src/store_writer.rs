//! A restoring task's store, written on a thread of its own: the restore reads and proves the
//! next slice of the changelog while the last one is parsed and written. Slices are written in
//! the order they were handed over, each in one local transaction with the changelog offset the
//! restore resumes from, so whenever the process dies the file holds a prefix of the changelog
//! and the offset after it, as when the restore wrote them itself. A slice is handed over only
//! when the writer is free, so memory holds two slices (one read, one written) whatever the
//! changelog's size.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::processor::ProcessorError;
use crate::store::{Change, StateStore};

/// Changelog records (key, value) known to have committed, in changelog order.
pub(crate) type Records = Vec<(String, Option<String>)>;

/// One slice to write.
struct Slice {
    records: Records,
    /// The changelog offset the restore resumes from once this slice is written; None: the
    /// restore is complete.
    resume_at: Option<i64>,
    durable: bool,
}

/// What the writer did, handed back with the store when it ends.
pub(crate) struct Written {
    pub(crate) store: StateStore,
    /// Changes written.
    pub(crate) entries: usize,
    /// Records no change could be read from (written by another version).
    pub(crate) dropped: usize,
    /// Time spent parsing and writing.
    pub(crate) busy: Duration,
}

/// The thread writing one task's store.
pub(crate) struct StoreWriter {
    slices: Option<SyncSender<Slice>>,
    thread: Option<JoinHandle<Result<Written, ProcessorError>>>,
}

impl StoreWriter {
    /// Starts writing `store` (task `partition`'s) on a thread of its own.
    pub(crate) fn start(store: StateStore, partition: i32) -> Result<Self, ProcessorError> {
        // A rendezvous: nothing waits in between, so at most one slice is written while the
        // next one is read.
        let (slices, incoming) = sync_channel::<Slice>(0);
        let thread = std::thread::Builder::new()
            .name(format!("restore-{partition}"))
            .spawn(move || {
                let mut written = Written {
                    store,
                    entries: 0,
                    dropped: 0,
                    busy: Duration::ZERO,
                };
                for slice in incoming {
                    let began = Instant::now();
                    let (mut entries, mut dropped) = (0, 0);
                    let changes = slice.records.iter().filter_map(|(key, value)| {
                        let change = Change::from_changelog(key, value.as_deref());
                        match change {
                            Some(_) => entries += 1,
                            None => dropped += 1,
                        }
                        change
                    });
                    written
                        .store
                        .commit_changes(changes, slice.resume_at, slice.durable)
                        .map_err(|e| ProcessorError::new(e.to_string()))?;
                    written.entries += entries;
                    written.dropped += dropped;
                    written.busy += began.elapsed();
                }
                Ok(written)
            })
            .map_err(|e| {
                ProcessorError::new(format!(
                    "partition {partition}: starting its restore's writer: {e}"
                ))
            })?;
        Ok(StoreWriter {
            slices: Some(slices),
            thread: Some(thread),
        })
    }

    /// Hands `records` over to be written with the offset the restore resumes from after them;
    /// waits while the writer is busy with the one before. A failed write surfaces here (or at
    /// [`StoreWriter::finish`]).
    pub(crate) fn write(
        &mut self,
        records: Records,
        resume_at: i64,
        durable: bool,
    ) -> Result<(), ProcessorError> {
        let slice = Slice {
            records,
            resume_at: Some(resume_at),
            durable,
        };
        let sent = match &self.slices {
            Some(slices) => slices.send(slice).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer ended: only a failed write ends it before finish.
        self.slices = None;
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(ProcessorError::new("the restore's writer ended early".to_owned())),
        }
    }

    /// Writes the last `records` (durably) with `resume_at` (None: the restore is complete),
    /// waits for every slice to be written and hands back the store.
    pub(crate) fn finish(
        mut self,
        records: Records,
        resume_at: Option<i64>,
    ) -> Result<Written, ProcessorError> {
        if let Some(slices) = self.slices.take() {
            // A send that fails means the writer failed; join says why.
            let _ = slices.send(Slice {
                records,
                resume_at,
                durable: true,
            });
        }
        self.join()
    }

    fn join(&mut self) -> Result<Written, ProcessorError> {
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| ProcessorError::new("the restore's writer panicked".to_owned()))?,
            None => Err(ProcessorError::new(
                "the restore's writer already ended".to_owned(),
            )),
        }
    }
}

impl Drop for StoreWriter {
    /// A writer dropped unfinished (its restore given up) still ends before the store file is
    /// opened again: what was handed over is written, then the file is closed.
    fn drop(&mut self) {
        self.slices = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_core::UnixMillis;

    fn record(window: i64, key: &str, count: Option<u64>) -> (String, Option<String>) {
        Change::Count {
            window_start: UnixMillis(window),
            key: key.into(),
            count,
        }
        .to_changelog()
    }

    #[test]
    fn slices_are_written_in_order_with_their_resume_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut writer = StoreWriter::start(StateStore::open(&path).expect("open"), 3).expect("start");
        // Later slices overwrite earlier ones: only the order handed over gives these counts.
        for round in 1..=20u64 {
            let records = (0..50)
                .map(|k| record(0, &format!("P-{k}"), Some(round * 100 + k)))
                .chain(std::iter::once(("x|unknown".to_owned(), Some("1".to_owned()))))
                .collect();
            writer
                .write(records, round as i64 * 51, round % 8 == 0)
                .expect("write");
        }
        let written = writer
            .finish(vec![record(0, "P-0", None)], Some(1_021))
            .expect("finish");
        assert_eq!(written.entries, 20 * 50 + 1);
        assert_eq!(written.dropped, 20, "the records this version cannot read");
        let counts = written.store.counts().expect("counts");
        assert_eq!(counts.len(), 49, "P-0 removed by the last slice");
        assert!(counts.iter().all(|(_, key, c)| {
            let k: u64 = key.trim_start_matches("P-").parse().expect("key");
            *c == 2_000 + k
        }));
        assert_eq!(written.store.restore_position().expect("position"), Some(1_021));
        drop(written);
        // Finished complete: the resume offset is gone.
        let mut writer = StoreWriter::start(StateStore::open(&path).expect("reopen"), 3).expect("start");
        writer
            .write(vec![record(5, "Q", Some(1))], 1_022, false)
            .expect("write");
        let written = writer.finish(Vec::new(), None).expect("finish");
        assert_eq!(written.store.restore_position().expect("position"), None);
        assert_eq!(written.store.count(UnixMillis(5), "Q").expect("count"), 1);
    }

    #[test]
    fn a_writer_dropped_unfinished_writes_what_it_was_handed_and_closes_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut writer = StoreWriter::start(StateStore::open(&path).expect("open"), 0).expect("start");
        writer
            .write(vec![record(0, "k", Some(4))], 9, true)
            .expect("write");
        drop(writer);
        // The file can be opened again at once (redb refuses a file still open).
        let store = StateStore::open(&path).expect("reopen");
        assert_eq!(store.count(UnixMillis(0), "k").expect("count"), 4);
        assert_eq!(store.restore_position().expect("position"), Some(9));
    }
}
