//! The generalised UPSERT sink: records of a results topic (a stream job's output) into a
//! table the user names, one row per key (UNIQUE on the key columns), the later record in the
//! topic winning or the larger version. Each partition's next offset is written in the
//! transaction that applies the rows before it (`exactly_sink_positions`), so a record read
//! again (a restart, a rebalance, a second member) changes nothing, and the table always holds
//! what a prefix of each partition gives. Records that are not rows, and rows the table
//! refuses (a value of the wrong type, a CHECK), are parked in `exactly_parked` with the
//! database's reason, in the same transaction; the partition goes on.

use std::collections::HashMap;

use exactly_core::recipes::quoted_identifier;
use exactly_core::upsert::{judge, Conflict, RowChange};
use exactly_core::ParkReason;
use serde_json::Value;
use tokio_postgres::{Client, Transaction};

use crate::error::PgError;
use crate::sql_handler::{database_message, is_retryable};

/// The table and how its rows are keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertSpec {
    /// The table, `name` or `schema.name`.
    pub table: String,
    /// The columns of its UNIQUE constraint (or primary key).
    pub key_columns: Vec<String>,
    /// Which row wins a conflict.
    pub conflict: Conflict,
    /// (column, field of the record key) where a tombstone's key names a key column otherwise.
    pub key_fields: Vec<(String, String)>,
}

/// One record to apply.
#[derive(Debug, Clone, Copy)]
pub struct SinkRecord<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record key.
    pub key: Option<&'a [u8]>,
    /// Record value (none: a tombstone).
    pub value: Option<&'a [u8]>,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows inserted or updated (a row that lost to a larger version counts too).
    pub upserted: usize,
    /// Tombstones applied.
    pub deleted: usize,
    /// Records parked with their reason.
    pub parked: usize,
    /// Records at offsets applied before: skipped.
    pub replayed: usize,
}

/// A sink opened on one table: its statements built and checked against the table.
#[derive(Debug, Clone)]
pub struct UpsertSink {
    name: String,
    spec: UpsertSpec,
    upsert_sql: String,
    delete_sql: String,
}

fn quoted(what: &str, name: &str) -> Result<String, PgError> {
    quoted_identifier(name).ok_or_else(|| {
        PgError::Config(format!(
            "{what} {name:?} is not a plain identifier (letters, digits, _ and $, not starting with a digit)"
        ))
    })
}

/// Creates `table` when absent: `columns` (name, SQL type), all NOT NULL but the last, and a
/// primary key on `key_columns`. An existing table is left as it is (`open` checks it).
pub async fn create_table_if_absent(
    client: &Client,
    table: &str,
    columns: &[(&str, &str)],
    key_columns: &[&str],
) -> Result<(), PgError> {
    let table = quoted("the table", table)?;
    let mut defs = Vec::new();
    for (i, (name, ty)) in columns.iter().enumerate() {
        let null = if i + 1 < columns.len() { " NOT NULL" } else { "" };
        defs.push(format!("{} {ty}{null}", quoted("the column", name)?));
    }
    let keys = key_columns
        .iter()
        .map(|k| quoted("the column", k))
        .collect::<Result<Vec<_>, _>>()?;
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} ({}, PRIMARY KEY ({}))",
            defs.join(", "),
            keys.join(", ")
        ))
        .await
        .map_err(PgError::at("create the results table"))
}

impl UpsertSink {
    /// Brings exactly's tables up to date, reads the table's columns and tries the
    /// statements: a missing table or column, or no UNIQUE constraint on the key columns, is
    /// refused here with the reason, not on the first record.
    pub async fn open(client: &mut Client, name: &str, spec: UpsertSpec) -> Result<Self, PgError> {
        crate::migrations::migrate(client).await?;
        if spec.key_columns.is_empty() {
            return Err(PgError::Config("name at least one key column".into()));
        }
        let table = quoted("the table", &spec.table)?;
        // Columns with a default (a serial id, updated_at) are left to it.
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                   AND NOT a.atthasdef AND a.attgenerated = ''
                 ORDER BY a.attnum",
                &[&table],
            )
            .await
            .map_err(PgError::at("read the table's columns"))?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if columns.is_empty() {
            return Err(PgError::Config(format!(
                "table {table} does not exist (or has no column without a default): create it with UNIQUE ({})",
                spec.key_columns.join(", ")
            )));
        }
        let version = match &spec.conflict {
            Conflict::LargerWins(v) => Some(v),
            Conflict::LastWins => None,
        };
        for c in spec.key_columns.iter().chain(version) {
            if !columns.contains(c) {
                return Err(PgError::Config(format!(
                    "table {table} has no column {c:?} without a default (its columns: {})",
                    columns.join(", ")
                )));
            }
        }
        let q = |c: &String| quoted("the column", c);
        let cols = columns.iter().map(q).collect::<Result<Vec<_>, _>>()?;
        let keys = spec.key_columns.iter().map(q).collect::<Result<Vec<_>, _>>()?;
        let of_r = |c: &String| format!("(s.r).{c}");
        let mut order: Vec<String> = keys.iter().map(of_r).collect();
        if let Some(v) = version {
            order.push(format!("{} DESC", of_r(&q(v)?)));
        }
        order.push("s.n DESC".into());
        let updates: Vec<String> = cols
            .iter()
            .filter(|c| !keys.contains(c))
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let on_conflict = if updates.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            let guard = match version {
                Some(v) => format!(" WHERE t.{v} <= excluded.{v}", v = q(v)?),
                None => String::new(),
            };
            format!("DO UPDATE SET {}{guard}", updates.join(", "))
        };
        // One row per key of the batch (the last, or the largest version), as ON CONFLICT
        // cannot touch a row twice in one statement.
        let upsert_sql = format!(
            "WITH s AS (SELECT jsonb_populate_record(NULL::{table}, e.doc) AS r, e.n
                        FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS e(doc, n)),
                  d AS (SELECT DISTINCT ON ({distinct}) (s.r).* FROM s ORDER BY {order})
             INSERT INTO {table} AS t ({cols}) SELECT {cols} FROM d
             ON CONFLICT ({keys}) {on_conflict}",
            distinct = keys.iter().map(of_r).collect::<Vec<_>>().join(", "),
            order = order.join(", "),
            cols = cols.join(", "),
            keys = keys.join(", "),
        );
        let delete_sql = format!(
            "DELETE FROM {table} AS t USING jsonb_populate_record(NULL::{table}, $1::text::jsonb) AS d WHERE {}",
            keys.iter()
                .map(|k| format!("t.{k} = d.{k}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        );
        // Run on no rows, in a transaction rolled back: ON CONFLICT finds its UNIQUE
        // constraint only when planned.
        let tx = client.transaction().await.map_err(PgError::at("begin"))?;
        tx.execute(&upsert_sql, &[&"[]"]).await.map_err(PgError::at(
            "check the upsert (is there a UNIQUE constraint on exactly the key columns?)",
        ))?;
        tx.execute(&delete_sql, &[&"{}"])
            .await
            .map_err(PgError::at("check the tombstone delete"))?;
        tx.rollback().await.map_err(PgError::at("roll back"))?;
        Ok(UpsertSink {
            name: name.to_owned(),
            spec,
            upsert_sql,
            delete_sql,
        })
    }

    /// The next offset to apply per (topic, partition), as committed.
    pub async fn positions(&self, client: &Client) -> Result<HashMap<(String, i32), i64>, PgError> {
        let rows = client
            .query(
                "SELECT topic, partition, next_offset FROM exactly_sink_positions WHERE sink = $1",
                &[&self.name],
            )
            .await
            .map_err(PgError::at("read sink positions"))?;
        Ok(rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
    }

    /// Applies `records` (each partition's in offset order) in one transaction with their
    /// positions. An error is the database's or the connection's: nothing was applied, and
    /// the same records may be applied again.
    pub async fn apply(&self, client: &mut Client, records: &[SinkRecord<'_>]) -> Result<Applied, PgError> {
        let mut applied = Applied::default();
        let mut tx = client.transaction().await.map_err(PgError::at("begin"))?;
        let mut next = self.lock_positions(&tx, records).await?;
        let mut run: Vec<(SinkRecord<'_>, Value)> = Vec::new();
        for r in records {
            let at = next.entry((r.topic.to_owned(), r.partition)).or_insert(0);
            if r.offset < *at {
                applied.replayed += 1;
                continue;
            }
            *at = r.offset + 1;
            let change = judge(
                r.key,
                r.value,
                &self.spec.key_columns,
                &self.spec.key_fields,
                &self.spec.conflict,
            );
            match change {
                Ok(RowChange::Upsert(row)) => run.push((*r, Value::Object(row))),
                Ok(RowChange::Delete(key)) => {
                    self.upsert_run(&mut tx, &mut run, &mut applied).await?;
                    let key = Value::Object(key).to_string();
                    // A key the table cannot compare (text for a BIGINT column) is refused.
                    match in_savepoint(&mut tx, &self.delete_sql, &key, "delete a row").await? {
                        Ok(()) => applied.deleted += 1,
                        Err(refused) => {
                            let reason = format!("the table refused the tombstone's key: {refused}");
                            self.park(&tx, r, &reason).await?;
                            applied.parked += 1;
                        }
                    }
                }
                Err(reason) => {
                    self.park(&tx, r, &reason).await?;
                    applied.parked += 1;
                }
            }
        }
        self.upsert_run(&mut tx, &mut run, &mut applied).await?;
        let (topics, partitions, offsets): (Vec<String>, Vec<i32>, Vec<i64>) = next.into_iter().fold(
            (vec![], vec![], vec![]),
            |(mut t, mut p, mut o), ((topic, partition), n)| {
                t.push(topic);
                p.push(partition);
                o.push(n);
                (t, p, o)
            },
        );
        tx.execute(
            "UPDATE exactly_sink_positions s SET next_offset = u.n, updated_at = now()
             FROM unnest($2::text[], $3::int4[], $4::int8[]) AS u(t, p, n)
             WHERE s.sink = $1 AND s.topic = u.t AND s.partition = u.p AND s.next_offset < u.n",
            &[&self.name, &topics, &partitions, &offsets],
        )
        .await
        .map_err(PgError::at("write sink positions"))?;
        tx.commit().await.map_err(PgError::at("commit"))?;
        Ok(applied)
    }

    /// The positions of the batch's partitions, created at 0 when new and row-locked, so two
    /// members applying the same partition take turns and the second skips what the first did.
    async fn lock_positions(
        &self,
        tx: &Transaction<'_>,
        records: &[SinkRecord<'_>],
    ) -> Result<HashMap<(String, i32), i64>, PgError> {
        let mut seen: Vec<(String, i32)> = records
            .iter()
            .map(|r| (r.topic.to_owned(), r.partition))
            .collect();
        seen.sort();
        seen.dedup();
        let (topics, partitions): (Vec<String>, Vec<i32>) = seen.into_iter().unzip();
        tx.execute(
            "INSERT INTO exactly_sink_positions (sink, topic, partition, next_offset)
             SELECT $1, u.t, u.p, 0 FROM unnest($2::text[], $3::int4[]) AS u(t, p)
             ON CONFLICT DO NOTHING",
            &[&self.name, &topics, &partitions],
        )
        .await
        .map_err(PgError::at("create sink positions"))?;
        let rows = tx
            .query(
                "SELECT s.topic, s.partition, s.next_offset FROM exactly_sink_positions s
                 JOIN unnest($2::text[], $3::int4[]) AS u(t, p) ON s.topic = u.t AND s.partition = u.p
                 WHERE s.sink = $1 ORDER BY s.topic, s.partition FOR UPDATE OF s",
                &[&self.name, &topics, &partitions],
            )
            .await
            .map_err(PgError::at("lock sink positions"))?;
        Ok(rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
    }

    /// Upserts the rows gathered since the last tombstone in one statement; when the table
    /// refuses one, each row on its own, the refused ones parked with the reason.
    async fn upsert_run(
        &self,
        tx: &mut Transaction<'_>,
        run: &mut Vec<(SinkRecord<'_>, Value)>,
        applied: &mut Applied,
    ) -> Result<(), PgError> {
        if run.is_empty() {
            return Ok(());
        }
        let rows = Value::Array(run.iter().map(|(_, v)| v.clone()).collect()).to_string();
        if in_savepoint(tx, &self.upsert_sql, &rows, "upsert rows")
            .await?
            .is_ok()
        {
            applied.upserted += run.len();
            run.clear();
            return Ok(());
        }
        for (record, row) in run.drain(..) {
            let one = Value::Array(vec![row]).to_string();
            match in_savepoint(tx, &self.upsert_sql, &one, "upsert a row").await? {
                Ok(()) => applied.upserted += 1,
                Err(refused) => {
                    let reason = format!("the table refused the row: {refused}");
                    self.park(tx, &record, &reason).await?;
                    applied.parked += 1;
                }
            }
        }
        Ok(())
    }

    async fn park(&self, tx: &Transaction<'_>, r: &SinkRecord<'_>, reason: &str) -> Result<(), PgError> {
        tracing::warn!(
            "sink {}: {}/{}@{} parked: {reason}",
            self.name,
            r.topic,
            r.partition,
            r.offset
        );
        let key_text = r.key.map(|k| String::from_utf8_lossy(k).into_owned());
        tx.execute(
            "INSERT INTO exactly_parked (consumer, topic, partition, \"offset\", reason, detail, key_text, record_key, headers, payload, parked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '[]', $9, now())
             ON CONFLICT (consumer, topic, partition, \"offset\") DO NOTHING",
            &[
                &self.name,
                &r.topic,
                &r.partition,
                &r.offset,
                &ParkReason::Rejected.as_str(),
                &reason,
                &key_text,
                &r.key,
                &r.value,
            ],
        )
        .await
        .map_err(PgError::at("park a record"))?;
        Ok(())
    }
}

/// Runs `sql` with its one parameter inside a savepoint: `Ok(Ok(()))` applied; `Ok(Err(why))`
/// the statement's data was refused (the savepoint rolled back, the transaction goes on); `Err`
/// a retryable failure (the connection, a deadlock): the whole transaction is to be run again.
async fn in_savepoint(
    tx: &mut Transaction<'_>,
    sql: &str,
    param: &str,
    what: &'static str,
) -> Result<Result<(), String>, PgError> {
    let sp = tx
        .savepoint("exactly_sink")
        .await
        .map_err(PgError::at("savepoint"))?;
    match sp.execute(sql, &[&param]).await {
        Ok(_) => {
            sp.commit().await.map_err(PgError::at("release savepoint"))?;
            Ok(Ok(()))
        }
        Err(e) if is_retryable(&e) => Err(PgError::at(what)(e)),
        Err(e) => {
            sp.rollback()
                .await
                .map_err(PgError::at("roll back to savepoint"))?;
            Ok(Err(database_message(&e)))
        }
    }
}
