//! `exactly consume --handler sql` on SQLite: the user's statements, run in the consumer's
//! transaction with the envelope as named parameters.
//!
//! SQLite's columns take any value, so each parameter binds in its natural form: ids, names
//! and JSON as text, `:occurred_at`, `:partition` and `:offset` as integers, `:payload` as
//! text when it is UTF-8 and as a blob otherwise, `:payload_bytes` always as a blob.

use exactly_core::sql_template::{self, EnvelopeParam, ParamValue, TemplateError};
use exactly_core::{HandlerError, Inbound};
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, Transaction};

use crate::effects::SqliteHandler;

/// The statements of a SQL file, checked against the database.
#[derive(Debug, Clone)]
pub struct SqlHandler {
    statements: Vec<(String, Vec<EnvelopeParam>)>,
}

/// Why a SQL file cannot be a handler on this database.
#[derive(Debug, thiserror::Error)]
pub enum SqlHandlerError {
    /// The file does not scan.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// SQLite refused to prepare a statement.
    #[error("statement {number} does not prepare: {message}")]
    Prepare {
        /// 1-based.
        number: usize,
        /// SQLite's message.
        message: String,
    },
}

impl SqlHandler {
    /// Scans `sql` and prepares each statement on `conn` (syntax, tables and columns).
    pub fn prepare(conn: &Connection, sql: &str) -> Result<SqlHandler, SqlHandlerError> {
        let mut statements = Vec::new();
        for (index, template) in sql_template::parse(sql)?.iter().enumerate() {
            let (sql, params) = template.render(|n| format!("?{n}"));
            conn.prepare(&sql).map_err(|e| SqlHandlerError::Prepare {
                number: index + 1,
                message: e.to_string(),
            })?;
            statements.push((sql, params));
        }
        Ok(SqlHandler { statements })
    }
}

impl SqliteHandler for SqlHandler {
    fn handle(&self, tx: &Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        for (sql, params) in &self.statements {
            let mut statement = tx.prepare_cached(sql).map_err(handler_error)?;
            for (index, param) in params.iter().enumerate() {
                let value = match param.value(inbound).map_err(HandlerError::Rejected)? {
                    ParamValue::Text(s) | ParamValue::Json(s) => Value::Text(s),
                    ParamValue::Int(i) | ParamValue::Millis(i) => Value::Integer(i),
                    ParamValue::Uuid(u) => Value::Text(u.hyphenated().to_string()),
                    ParamValue::Payload(bytes) => match String::from_utf8(bytes) {
                        Ok(text) => Value::Text(text),
                        Err(e) => Value::Blob(e.into_bytes()),
                    },
                    ParamValue::Bytes(bytes) => Value::Blob(bytes),
                };
                statement
                    .raw_bind_parameter(index + 1, value)
                    .map_err(handler_error)?;
            }
            // Stepped to the end: a statement may return rows (RETURNING, a SELECT of a
            // function), which are not wanted.
            let mut rows = statement.raw_query();
            while rows.next().map_err(handler_error)?.is_some() {}
        }
        Ok(())
    }
}

/// A failed statement: what the statements refuse (a CHECK, NOT NULL or UNIQUE constraint, a
/// trigger's `RAISE(ABORT, …)`, a type mismatch in a STRICT table, bad JSON) parks the message
/// with SQLite's message; a busy or locked database, an I/O error or a changed schema (a
/// missing table or column: an operator's fix away) retries.
pub fn handler_error(error: rusqlite::Error) -> HandlerError {
    let message = error.to_string();
    let retry = match error.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig) => false,
        Some(ErrorCode::Unknown) => message.starts_with("no such") || message.contains("syntax error"),
        Some(_) => true,
        None => false,
    };
    if retry {
        HandlerError::Retryable(message)
    } else {
        HandlerError::Rejected(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event time no timestamp holds parks the record with the reason; one in range binds.
    #[test]
    fn an_occurred_at_out_of_range_is_rejected_not_bound() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE seen (ms INTEGER NOT NULL, day TEXT)")
            .expect("schema");
        let handler = SqlHandler::prepare(
            &conn,
            "INSERT INTO seen (ms, day) VALUES (:occurred_at, date(:occurred_at / 1000, 'unixepoch'))",
        )
        .expect("prepare");
        for (ms, fits) in [(i64::MAX, false), (i64::MIN, false), (1_700_000_000_123, true)] {
            let delivery = exactly_testkit::scenarios::delivery("1", ms, serde_json::json!({}));
            let inbound = Inbound {
                topic: "t",
                partition: 0,
                offset: 0,
                delivery: &delivery,
                now: exactly_core::UnixMillis(0),
            };
            let tx = conn.transaction().expect("begin");
            let outcome = handler.handle(&tx, &inbound);
            tx.commit().expect("commit");
            match (outcome, fits) {
                (Ok(()), true) => {}
                (Err(HandlerError::Rejected(why)), false) => assert!(why.contains(":occurred_at"), "{why}"),
                (other, _) => panic!("{ms}: {other:?}"),
            }
        }
        let rows: Vec<(i64, String)> = conn
            .prepare("SELECT ms, day FROM seen")
            .expect("select")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, [(1_700_000_000_123, "2023-11-14".to_owned())]);
    }
}
