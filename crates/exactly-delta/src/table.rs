//! The Delta table the sink appends to, through delta-rs: opened (or created with the layout's
//! columns), the Kafka positions kept in its log as application transactions (`txn` actions,
//! one per topic partition: app id `<sink>-<topic>-<partition>`, version = the next offset to
//! read, as kafka-delta-ingest does), appends that commit data and positions in one log entry,
//! and the idempotency keys of recently added files, read back for the dedupe.

use std::collections::{HashMap, HashSet};

use deltalake::arrow::array::{Array, StringArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType as ArrowType;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Transaction};
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use crate::schema::{InputKind, Layout};
use crate::DeltaSinkError;

/// The column the dedupe reads back.
const KEY_COLUMN: &str = "idempotency_key";

/// A Delta table opened for appends by one sink.
pub struct DeltaTarget {
    table: DeltaTable,
    sink: String,
    target_file_size: u64,
}

/// What one append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The table version it committed.
    pub version: u64,
    /// Parquet files added.
    pub files: usize,
    /// Their bytes.
    pub bytes: i64,
}

/// Why an append did not commit.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer committed first and the positions may have moved (it wrote some of the
    /// same partitions, or the log moved under a commit that could not be rebased): read the
    /// positions again and redo from them. The data files written are never referenced.
    #[error("another writer committed first: {0}")]
    Conflict(String),
    /// The store or the log could not be written: try again later, from the log's positions.
    #[error("appending to the Delta table: {0}")]
    Failed(#[source] DeltaTableError),
}

fn is_conflict(error: &DeltaTableError) -> bool {
    match error {
        DeltaTableError::VersionAlreadyExists(_) => true,
        DeltaTableError::Transaction { source } => matches!(
            source,
            TransactionError::CommitConflict(_)
                | TransactionError::MaxCommitAttempts(_)
                | TransactionError::VersionAlreadyExists(_)
        ),
        _ => false,
    }
}

impl DeltaTarget {
    /// Opens the table at `uri` (a local path, or an object-store URL with `storage_options`),
    /// creating it with the layout's columns if there is none; refuses a table whose columns
    /// are not the layout's. `sink` names this sink's positions in the log.
    pub async fn open(
        uri: &str,
        storage_options: &HashMap<String, String>,
        layout: &Layout,
        sink: &str,
    ) -> Result<Self, DeltaSinkError> {
        let url = deltalake::ensure_table_uri(uri).map_err(|e| DeltaSinkError::table(uri, e))?;
        let builder = || {
            DeltaTableBuilder::from_url(url.clone())
                .map(|b| b.with_storage_options(storage_options.clone()))
                .map_err(|e| DeltaSinkError::table(uri, e))
        };
        let mut last = None;
        // A local directory without a log is no table yet: create it without asking delta-rs
        // to load it (which logs an error for the empty log).
        let mut fresh =
            url.scheme() == "file" && url.to_file_path().is_ok_and(|p| !p.join("_delta_log").exists());
        for _ in 0..3 {
            let loaded = if fresh {
                fresh = false;
                Err(DeltaTableError::NotATable(uri.to_owned()))
            } else {
                builder()?.load().await
            };
            match loaded {
                Ok(table) => {
                    check_columns(&table, layout, uri)?;
                    return Ok(Self::new(table, sink));
                }
                Err(DeltaTableError::NotATable(_)) => {}
                Err(e) => return Err(DeltaSinkError::table(uri, e)),
            }
            let created = builder()?
                .build()
                .map_err(|e| DeltaSinkError::table(uri, e))?
                .create()
                .with_columns(layout.delta_columns())
                .with_partition_columns(layout.partition_by.iter().cloned())
                .with_save_mode(SaveMode::ErrorIfExists)
                .await;
            match created {
                Ok(table) => {
                    tracing::info!("created the Delta table {uri}");
                    return Ok(Self::new(table, sink));
                }
                // Another sink created it meanwhile: load it.
                Err(e) => last = Some(e),
            }
        }
        Err(DeltaSinkError::table(
            uri,
            last.unwrap_or_else(|| DeltaTableError::Generic("could not open or create".into())),
        ))
    }

    /// Opens an existing table to read (no sink's positions, no columns checked).
    pub async fn open_existing(
        uri: &str,
        storage_options: &HashMap<String, String>,
    ) -> Result<Self, DeltaSinkError> {
        let url = deltalake::ensure_table_uri(uri).map_err(|e| DeltaSinkError::table(uri, e))?;
        let table = DeltaTableBuilder::from_url(url)
            .map_err(|e| DeltaSinkError::table(uri, e))?
            .with_storage_options(storage_options.clone())
            .load()
            .await
            .map_err(|e| DeltaSinkError::table(uri, e))?;
        Ok(Self::new(table, ""))
    }

    fn new(table: DeltaTable, sink: &str) -> Self {
        DeltaTarget {
            table,
            sink: sink.to_owned(),
            target_file_size: 128 * 1024 * 1024,
        }
    }

    /// Parquet files are cut at about this size.
    pub fn with_target_file_size(mut self, bytes: u64) -> Self {
        self.target_file_size = bytes;
        self
    }

    /// The loaded version.
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// The application id of a topic partition's position in the log.
    pub fn app_id(&self, topic: &str, partition: i32) -> String {
        format!("{}-{topic}-{partition}", self.sink)
    }

    /// Reads the log's newest version.
    pub async fn refresh(&mut self) -> Result<(), DeltaTableError> {
        self.table.update_state().await
    }

    /// The next offset to read of a topic partition, as the loaded version's log says (None:
    /// this sink never wrote it).
    pub async fn position(&self, topic: &str, partition: i32) -> Result<Option<i64>, DeltaTableError> {
        let snapshot = self.table.snapshot()?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), self.app_id(topic, partition))
            .await
    }

    /// Writes `batch` as Parquet files and commits them with the positions (`(topic,
    /// partition, next offset)`) in one log entry, on top of the loaded version; `between` runs
    /// after the files are written and before the log entry (the lab's kill point). Appends of
    /// other partitions by other writers are rebased onto; a commit that moved one of the same
    /// positions is a conflict.
    pub async fn append(
        &mut self,
        batch: RecordBatch,
        positions: &[(String, i32, i64)],
        between: impl FnOnce(),
    ) -> Result<Appended, AppendError> {
        let mut writer = RecordBatchWriter::for_table(&self.table)
            .map_err(AppendError::Failed)?
            .with_target_file_size(self.target_file_size);
        if batch.num_rows() > 0 {
            writer.write(batch).await.map_err(AppendError::Failed)?;
        }
        let adds = writer.flush().await.map_err(AppendError::Failed)?;
        between();
        let (files, bytes) = (adds.len(), adds.iter().map(|a| a.size).sum());
        let txns = positions
            .iter()
            .map(|(t, p, next)| Transaction::new(self.app_id(t, *p), *next))
            .collect();
        let snapshot = self.table.snapshot().map_err(AppendError::Failed)?;
        let operation = DeltaOperation::StreamingUpdate {
            output_mode: deltalake::protocol::OutputMode::Append,
            query_id: self.sink.clone(),
            epoch_id: i64::try_from(snapshot.version())
                .unwrap_or(i64::MAX)
                .saturating_add(1),
        };
        let committed = CommitBuilder::from(CommitProperties::default().with_application_transactions(txns))
            .with_actions(adds.into_iter().map(Action::Add).collect())
            .build(Some(snapshot), self.table.log_store(), operation)
            .await;
        match committed {
            Ok(done) => {
                let version = done.version();
                self.table
                    .update_incremental(Some(version))
                    .await
                    .map_err(AppendError::Failed)?;
                Ok(Appended {
                    version,
                    files,
                    bytes,
                })
            }
            Err(e) if is_conflict(&e) => Err(AppendError::Conflict(e.to_string())),
            Err(e) => Err(AppendError::Failed(e)),
        }
    }

    /// The idempotency keys in files added at or after `since_ms` (their modification time)
    /// and not in `loaded`, with each file's time; the files read are added to `loaded`. Reads
    /// only the key column. Empty for plain layouts.
    pub async fn recent_keys(
        &self,
        layout: &Layout,
        since_ms: i64,
        loaded: &mut HashSet<String>,
    ) -> Result<Vec<(i64, String)>, DeltaSinkError> {
        if layout.input != InputKind::Envelope {
            return Ok(Vec::new());
        }
        let snapshot = self.table.snapshot().map_err(DeltaSinkError::Read)?;
        let mut files: Vec<(i64, String, deltalake::Path)> = snapshot
            .log_data()
            .into_iter()
            .filter(|f| f.modification_time() >= since_ms && !loaded.contains(f.path().as_ref()))
            .map(|f| {
                (
                    f.modification_time(),
                    f.path().into_owned(),
                    f.object_store_path(),
                )
            })
            .collect();
        files.sort();
        let mut keys = Vec::new();
        for (at, name, path) in files {
            for batch in self.read_file(&path, Some(KEY_COLUMN)).await? {
                let Some(column) = batch.column_by_name(KEY_COLUMN) else {
                    continue;
                };
                let column = cast(column, &ArrowType::Utf8).map_err(|e| DeltaSinkError::Read(e.into()))?;
                if let Some(strings) = column.as_any().downcast_ref::<StringArray>() {
                    keys.extend(
                        (0..strings.len())
                            .filter(|i| strings.is_valid(*i))
                            .map(|i| (at, strings.value(i).to_owned())),
                    );
                }
            }
            loaded.insert(name);
        }
        Ok(keys)
    }

    /// One data file's rows (partition columns are not in the files), all columns or one.
    pub(crate) async fn read_file(
        &self,
        path: &deltalake::Path,
        column: Option<&str>,
    ) -> Result<Vec<RecordBatch>, DeltaSinkError> {
        let read = |e: deltalake::DeltaTableError| DeltaSinkError::Read(e);
        let bytes = self
            .table
            .object_store()
            .get(path)
            .await
            .map_err(|e| read(e.into()))?
            .bytes()
            .await
            .map_err(|e| read(e.into()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| read(e.into()))?;
        let builder = match column {
            Some(c) => {
                let mask = ProjectionMask::columns(builder.parquet_schema(), [c]);
                builder.with_projection(mask)
            }
            None => builder,
        };
        let reader = builder.build().map_err(|e| read(e.into()))?;
        reader.map(|b| b.map_err(|e| read(e.into()))).collect()
    }

    /// Every row the loaded version references, file by file (without the partition column),
    /// with each file's path. A referenced file that cannot be read is an error.
    pub async fn read_all(&self) -> Result<Vec<(String, Vec<RecordBatch>)>, DeltaSinkError> {
        let snapshot = self.table.snapshot().map_err(DeltaSinkError::Read)?;
        let files: Vec<(String, deltalake::Path)> = snapshot
            .log_data()
            .into_iter()
            .map(|f| (f.path().into_owned(), f.object_store_path()))
            .collect();
        let mut out = Vec::with_capacity(files.len());
        for (name, path) in files {
            out.push((name, self.read_file(&path, None).await?));
        }
        Ok(out)
    }

    /// The table, to read.
    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    /// The table, for delta-rs's own operations.
    pub fn into_table(self) -> DeltaTable {
        self.table
    }
}

/// The table's columns must be the layout's, in name, type and order.
fn check_columns(table: &DeltaTable, layout: &Layout, uri: &str) -> Result<(), DeltaSinkError> {
    let schema = table
        .snapshot()
        .map_err(|e| DeltaSinkError::table(uri, e))?
        .schema();
    let have: Vec<String> = schema
        .fields()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect();
    let want: Vec<String> = layout
        .delta_columns()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect();
    if have != want {
        return Err(DeltaSinkError::Columns {
            uri: uri.to_owned(),
            have: have.join(", "),
            want: want.join(", "),
        });
    }
    Ok(())
}
