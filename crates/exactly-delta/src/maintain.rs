//! Keeping a sink's table healthy: `compact` rewrites each partition's small files into files
//! of about the target size (an OPTIMIZE commit: the new files added and the old ones removed
//! with `dataChange = false`, so streaming readers skip it), and `vacuum` deletes files no
//! version within the retention references (delta-rs's VACUUM).
//!
//! delta-rs's own OPTIMIZE needs DataFusion, a build several times the size of the rest of
//! exactly; this one reads and writes through the same library (Parquet reader, record-batch
//! writer, commit builder) without it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{ArrayRef, RecordBatch, StringArray};
use deltalake::arrow::compute::cast;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};

use crate::table::DeltaTarget;
use crate::DeltaSinkError;

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Partitions rewritten.
    pub partitions: usize,
    /// Files removed.
    pub removed: usize,
    /// Files added.
    pub added: usize,
    /// The version committed (None: nothing to do).
    pub version: Option<u64>,
}

fn failed(e: impl Into<deltalake::DeltaTableError>) -> DeltaSinkError {
    DeltaSinkError::Read(e.into())
}

/// Rewrites, in every partition holding at least `min_files` files smaller than half of
/// `target_file_size`, those files into files of about that size, in one commit. A
/// concurrent append (a running sink) does not conflict with it; a concurrent compaction or
/// vacuum of the same files does, and this one then fails without changing anything.
pub async fn compact(
    uri: &str,
    storage_options: &HashMap<String, String>,
    target_file_size: u64,
    min_files: usize,
) -> Result<Compacted, DeltaSinkError> {
    let target = DeltaTarget::open_existing(uri, storage_options).await?;
    let table = target.table();
    let snapshot = table.snapshot().map_err(failed)?;
    let small = i64::try_from(target_file_size / 2).unwrap_or(i64::MAX);
    type Small = (deltalake::kernel::Remove, deltalake::Path);
    let mut groups: BTreeMap<Vec<(String, Option<String>)>, Vec<Small>> = BTreeMap::new();
    for file in snapshot.log_data() {
        if file.size() >= small {
            continue;
        }
        let mut partition: Vec<(String, Option<String>)> = file.partition_values_map().into_iter().collect();
        partition.sort();
        groups
            .entry(partition)
            .or_default()
            .push((file.remove_action(false), file.object_store_path()));
    }
    groups.retain(|_, files| files.len() >= min_files.max(2));
    if groups.is_empty() {
        return Ok(Compacted::default());
    }
    let mut writer = RecordBatchWriter::for_table(table)
        .map_err(failed)?
        .with_target_file_size(target_file_size);
    let schema = writer.arrow_schema();
    let mut report = Compacted::default();
    let mut actions = Vec::new();
    for (partition, removes) in &groups {
        let values: HashMap<&str, Option<&str>> = partition
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        for (remove, path) in removes {
            for batch in target.read_file(path, None).await? {
                let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
                for field in schema.fields() {
                    let column = match values.get(field.name().as_str()) {
                        // A partition column is in the log, not in the file: rebuild it.
                        Some(value) => {
                            let text: StringArray = std::iter::repeat_n(*value, batch.num_rows()).collect();
                            cast(&text, field.data_type()).map_err(failed)?
                        }
                        None => batch.column_by_name(field.name()).cloned().ok_or_else(|| {
                            failed(deltalake::DeltaTableError::Generic(format!(
                                "{} has no column {}",
                                remove.path,
                                field.name()
                            )))
                        })?,
                    };
                    columns.push(column);
                }
                let full = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(failed)?;
                writer.write(full).await.map_err(failed)?;
            }
        }
        report.partitions += 1;
        report.removed += removes.len();
        actions.extend(removes.iter().map(|(remove, _)| Action::Remove(remove.clone())));
    }
    let adds = writer.flush().await.map_err(failed)?;
    report.added = adds.len();
    actions.extend(adds.into_iter().map(|mut add| {
        add.data_change = false;
        Action::Add(add)
    }));
    let operation = DeltaOperation::Optimize {
        predicate: None,
        target_size: i64::try_from(target_file_size).unwrap_or(i64::MAX),
    };
    let done = CommitBuilder::from(CommitProperties::default())
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await
        .map_err(failed)?;
    report.version = Some(done.version());
    Ok(report)
}

/// Deletes the data files older than `retention` that the table's current version does not
/// reference: files older versions referenced, and orphans (an append's files whose log entry
/// never came: a sink killed between the two, or one that lost a race). Delta's default
/// retention is 7 days: readers of older versions and time travel need their files, and a
/// retention shorter than a running sink's append time would delete files it is about to
/// commit. `dry_run` only lists them.
pub async fn vacuum(
    uri: &str,
    storage_options: &HashMap<String, String>,
    retention: Duration,
    dry_run: bool,
) -> Result<Vec<String>, DeltaSinkError> {
    let target = DeltaTarget::open_existing(uri, storage_options).await?;
    let retention = chrono::Duration::from_std(retention)
        .map_err(|e| failed(deltalake::DeltaTableError::Generic(format!("retention: {e}"))))?;
    let (_, metrics) = target
        .into_table()
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
        .with_dry_run(dry_run)
        .await
        .map_err(failed)?;
    Ok(metrics.files_deleted)
}
