//! `exactly consume --handler sql`: the user's statements, run in the consumer's transaction
//! with the envelope as named parameters.
//!
//! Each statement is prepared once at start, so a syntax error or a missing table stops the
//! consumer before it reads anything, and PostgreSQL says which type each parameter takes
//! there: `:occurred_at` binds as a timestamp into a `timestamptz` column and as milliseconds
//! into a `bigint`, `:payload` as `jsonb`, `text` or `bytea`. Each event then runs the
//! statements with those types in one round trip apiece (`execute_typed`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use exactly_core::sql_template::{self, json_text, EnvelopeParam, ParamValue, TemplateError};
use exactly_core::{HandlerError, Inbound};
use futures::future::BoxFuture;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, Transaction};

use crate::effects::PgHandler;

/// The statements of a SQL file, checked against the database.
#[derive(Debug, Clone)]
pub struct SqlHandler {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
struct Statement {
    sql: String,
    /// Each `$n`'s envelope parameter and the type the database takes it as.
    params: Vec<(EnvelopeParam, Type)>,
}

/// Why a SQL file cannot be a handler on this database.
#[derive(Debug, thiserror::Error)]
pub enum SqlHandlerError {
    /// The file does not scan.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// PostgreSQL refused to prepare a statement.
    #[error("statement {number} does not prepare: {message}")]
    Prepare {
        /// 1-based.
        number: usize,
        /// The database's message.
        message: String,
    },
    /// A parameter is used where exactly cannot bind it.
    #[error(
        "statement {number}: {param} is taken as {ty} there; exactly binds it as {binds}: add a cast, for example {param}::text"
    )]
    Unbindable {
        /// 1-based.
        number: usize,
        /// The parameter.
        param: EnvelopeParam,
        /// The type PostgreSQL inferred.
        ty: String,
        /// The types it can take.
        binds: &'static str,
    },
}

impl SqlHandler {
    /// Scans `sql` and prepares each statement on `client`.
    pub async fn prepare(client: &Client, sql: &str) -> Result<SqlHandler, SqlHandlerError> {
        let mut statements = Vec::new();
        for (index, template) in sql_template::parse(sql)?.iter().enumerate() {
            let number = index + 1;
            let (sql, params) = template.render(|n| format!("${n}"));
            let prepared = client.prepare(&sql).await.map_err(|e| SqlHandlerError::Prepare {
                number,
                message: database_message(&e),
            })?;
            let mut typed = Vec::with_capacity(params.len());
            for (param, ty) in params.into_iter().zip(prepared.params()) {
                if !bindable(param, ty) {
                    return Err(SqlHandlerError::Unbindable {
                        number,
                        param,
                        ty: ty.name().to_owned(),
                        binds: binds(param),
                    });
                }
                typed.push((param, ty.clone()));
            }
            statements.push(Statement { sql, params: typed });
        }
        Ok(SqlHandler { statements })
    }

    /// How many statements run per event.
    pub fn statements(&self) -> usize {
        self.statements.len()
    }
}

impl PgHandler for SqlHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for statement in &self.statements {
                let mut values = Vec::with_capacity(statement.params.len());
                for (param, ty) in &statement.params {
                    let value = param.value(inbound).map_err(HandlerError::Rejected)?;
                    let bound = PgValue::convert(value, ty)
                        .map_err(|why| HandlerError::Rejected(format!("{param}: {why}")))?;
                    values.push((bound, ty.clone()));
                }
                let params: Vec<(&(dyn ToSql + Sync), Type)> = values
                    .iter()
                    .map(|(v, ty)| (v as &(dyn ToSql + Sync), ty.clone()))
                    .collect();
                tx.execute_typed(&statement.sql, &params)
                    .await
                    .map_err(handler_error)?;
            }
            Ok(())
        })
    }
}

/// A failed statement: what the statements themselves refuse (`RAISE EXCEPTION`, a CHECK or
/// unique violation, bad data) parks the message with the database's message; a lost
/// connection, a serialization failure, a deadlock, a lock timeout or a changed schema (a
/// dropped table: an operator's fix away) retries.
pub fn handler_error(error: tokio_postgres::Error) -> HandlerError {
    let message = database_message(&error);
    if is_retryable(&error) {
        HandlerError::Retryable(message)
    } else {
        HandlerError::Rejected(message)
    }
}

/// Whether `handler_error` retries it: the connection, the server or a concurrent
/// transaction failed, not the statement's data.
pub(crate) fn is_retryable(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        return true;
    };
    matches!(
        code.code().get(..2),
        Some("08" | "40" | "42" | "53" | "57" | "58" | "XX")
    ) || *code == SqlState::LOCK_NOT_AVAILABLE
}

/// The server's message with its SQLSTATE (and detail), or the client's error.
pub(crate) fn database_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}): {detail}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => error.to_string(),
    }
}

fn is_text(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    )
}

/// Whether `param` can bind as `ty` (text takes everything).
fn bindable(param: EnvelopeParam, ty: &Type) -> bool {
    use EnvelopeParam::*;
    if is_text(ty) {
        return true;
    }
    match *ty {
        Type::UUID => param == EventId,
        Type::INT8 | Type::INT4 | Type::INT2 => matches!(param, OccurredAt | Partition | Offset),
        Type::TIMESTAMPTZ | Type::TIMESTAMP => param == OccurredAt,
        Type::JSON | Type::JSONB => matches!(param, Payload | PayloadJson | Headers),
        Type::BYTEA => matches!(param, Payload | PayloadJson | PayloadBytes),
        _ => false,
    }
}

fn binds(param: EnvelopeParam) -> &'static str {
    use EnvelopeParam::*;
    match param {
        EventId => "text or uuid",
        OccurredAt => "bigint (milliseconds), timestamptz or text",
        Partition | Offset => "an integer or text",
        Payload | PayloadJson => "text, json, jsonb or bytea",
        PayloadBytes => "bytea or text",
        Headers => "json, jsonb or text",
        Key | EventType | AggregateType | AggregateId | Topic => "text",
    }
}

/// A value in the form its parameter's type takes on the wire.
#[derive(Debug)]
enum PgValue {
    Text(String),
    Int8(i64),
    Int4(i32),
    Int2(i16),
    Time(SystemTime),
    Uuid(uuid::Uuid),
    /// JSON text, written as `json` or `jsonb` by the parameter's type.
    Json(String),
    Bytes(Vec<u8>),
}

impl PgValue {
    /// `value` as type `ty`, or why it cannot be (a reason to park: it is about this event).
    fn convert(value: ParamValue, ty: &Type) -> Result<PgValue, String> {
        let utf8 = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"));
        Ok(match (value, ty.clone()) {
            (ParamValue::Text(s), t) if is_text(&t) => PgValue::Text(s),
            (ParamValue::Int(i) | ParamValue::Millis(i), t) if is_text(&t) => PgValue::Text(i.to_string()),
            (ParamValue::Int(i) | ParamValue::Millis(i), Type::INT8) => PgValue::Int8(i),
            (ParamValue::Int(i) | ParamValue::Millis(i), Type::INT4) => {
                PgValue::Int4(i32::try_from(i).map_err(|_| format!("{i} does not fit an integer"))?)
            }
            (ParamValue::Int(i) | ParamValue::Millis(i), Type::INT2) => {
                PgValue::Int2(i16::try_from(i).map_err(|_| format!("{i} does not fit a smallint"))?)
            }
            (ParamValue::Millis(ms), Type::TIMESTAMPTZ | Type::TIMESTAMP) => {
                let offset = Duration::from_millis(ms.unsigned_abs());
                let time = if ms >= 0 {
                    UNIX_EPOCH.checked_add(offset)
                } else {
                    UNIX_EPOCH.checked_sub(offset)
                };
                PgValue::Time(time.ok_or_else(|| format!("{ms} ms is out of range"))?)
            }
            (ParamValue::Uuid(u), Type::UUID) => PgValue::Uuid(u),
            (ParamValue::Uuid(u), t) if is_text(&t) => PgValue::Text(u.hyphenated().to_string()),
            (ParamValue::Json(s), Type::JSON | Type::JSONB) => PgValue::Json(s),
            (ParamValue::Json(s), Type::BYTEA) => PgValue::Bytes(s.into_bytes()),
            (ParamValue::Json(s), t) if is_text(&t) => PgValue::Text(s),
            (ParamValue::Payload(b), Type::JSON | Type::JSONB) => PgValue::Json(json_text(&b)?),
            (ParamValue::Payload(b) | ParamValue::Bytes(b), Type::BYTEA) => PgValue::Bytes(b),
            (ParamValue::Payload(b) | ParamValue::Bytes(b), t) if is_text(&t) => PgValue::Text(utf8(b)?),
            (_, t) => return Err(format!("cannot be bound as {}", t.name())),
        })
    }
}

impl ToSql for PgValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            PgValue::Text(s) => s.as_str().to_sql(ty, out),
            PgValue::Int8(v) => v.to_sql(ty, out),
            PgValue::Int4(v) => v.to_sql(ty, out),
            PgValue::Int2(v) => v.to_sql(ty, out),
            PgValue::Time(t) => t.to_sql(ty, out),
            PgValue::Uuid(u) => {
                out.put_slice(u.as_bytes());
                Ok(IsNull::No)
            }
            PgValue::Json(text) => {
                // jsonb's binary form is a version byte, then the text.
                if *ty == Type::JSONB {
                    out.put_u8(1);
                }
                out.put_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            PgValue::Bytes(b) => b.as_slice().to_sql(ty, out),
        }
    }

    /// The conversion already chose the form for the type.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the statements refuse parks; a lost connection or a changed schema retries.
    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_park_and_lost_connections_retry() {
        let url = exactly_testkit::fresh_pg_database().await;
        let client = crate::connect(&url).await.expect("connect");
        client
            .batch_execute(
                "CREATE TABLE t (n INT CHECK (n > 0));
                 CREATE FUNCTION refuse() RETURNS void LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'not today'; END $$;",
            )
            .await
            .expect("schema");
        let error = |sql: &'static str| {
            let client = &client;
            async move { handler_error(client.execute(sql, &[]).await.expect_err(sql)) }
        };
        assert!(
            matches!(error("INSERT INTO t VALUES (0)").await, HandlerError::Rejected(m) if m.contains("t_n_check") && m.contains("23514")),
        );
        assert!(
            matches!(error("SELECT refuse()").await, HandlerError::Rejected(m) if m.contains("not today"))
        );
        assert!(matches!(
            error("INSERT INTO t VALUES ('x')").await,
            HandlerError::Rejected(_)
        ));
        assert!(matches!(
            error("INSERT INTO gone VALUES (1)").await,
            HandlerError::Retryable(_)
        ));

        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        let other = crate::connect(&url).await.expect("connect");
        other
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("terminate");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let lost = handler_error(
            client
                .execute("SELECT 1", &[])
                .await
                .expect_err("connection lost"),
        );
        assert!(matches!(lost, HandlerError::Retryable(_)), "{lost:?}");
    }
    /// An event time no timestamp holds parks the record with the reason (it panicked in the
    /// driver's conversion in a debug build, and wrote 1969-12-31 in release); one in range binds.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_occurred_at_out_of_range_is_rejected_not_bound() {
        let url = exactly_testkit::fresh_pg_database().await;
        let mut client = crate::connect(&url).await.expect("connect");
        client
            .batch_execute("CREATE TABLE seen (at timestamptz NOT NULL)")
            .await
            .expect("schema");
        let handler = SqlHandler::prepare(&client, "INSERT INTO seen (at) VALUES (:occurred_at)")
            .await
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
            let tx = client.transaction().await.expect("begin");
            let outcome = handler.handle(&tx, &inbound).await;
            tx.commit().await.expect("commit");
            match (outcome, fits) {
                (Ok(()), true) => {}
                (Err(HandlerError::Rejected(why)), false) => assert!(why.contains(":occurred_at"), "{why}"),
                (other, _) => panic!("{ms}: {other:?}"),
            }
        }
        let rows = client
            .query("SELECT (extract(epoch FROM at) * 1000)::bigint FROM seen", &[])
            .await
            .expect("rows");
        let rows: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(rows, [1_700_000_000_123]);
    }
}
