//! A Debezium-style outbox table relayed unchanged: a trigger mirrors each row inserted into
//! it into exactly's `outbox` in the writer's transaction (see [`exactly_core::debezium`]).
//!
//! The mirror is a row trigger (`AFTER INSERT … FOR EACH ROW`), so a writer that deletes its
//! row in the same transaction, as Debezium's documentation suggests, is mirrored too. Every
//! identifier is checked and quoted, every name and pattern is a literal; the table and its
//! columns must exist (their types choose how the payload and the timestamp are read).

use exactly_core::debezium::{posix_route, HeaderField, RouteError};
use tokio_postgres::Client;

use crate::error::PgError;

/// The Outbox Event Router's view of a table, with Debezium's defaults in [`Default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebeziumTable {
    /// `table` or `schema.table`.
    pub table: String,
    /// `table.field.event.id`: the event id, also sent as the `id` header.
    pub id_column: String,
    /// `table.field.event.key`: the record key.
    pub key_column: String,
    /// The aggregate type.
    pub aggregate_type_column: String,
    /// `table.field.event.type`.
    pub type_column: String,
    /// `table.field.event.payload` (jsonb, json, text, varchar or bytea).
    pub payload_column: String,
    /// `table.field.event.timestamp` (timestamptz, timestamp or bigint milliseconds); none:
    /// the time of the insert.
    pub timestamp_column: Option<String>,
    /// `route.by.field`.
    pub route_by_field: String,
    /// `route.topic.regex`.
    pub route_topic_regex: String,
    /// `route.topic.replacement`.
    pub route_topic_replacement: String,
    /// `table.fields.additional.placement` (headers).
    pub headers: Vec<HeaderField>,
}

impl Default for DebeziumTable {
    fn default() -> Self {
        DebeziumTable {
            table: "outboxevent".into(),
            id_column: "id".into(),
            key_column: "aggregateid".into(),
            aggregate_type_column: "aggregatetype".into(),
            type_column: "type".into(),
            payload_column: "payload".into(),
            timestamp_column: None,
            route_by_field: "aggregatetype".into(),
            route_topic_regex: exactly_core::debezium::DEFAULT_ROUTE_REGEX.into(),
            route_topic_replacement: exactly_core::debezium::DEFAULT_ROUTE_REPLACEMENT.into(),
            headers: Vec::new(),
        }
    }
}

/// Why the mirror cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum DebeziumError {
    /// A name that is not a plain SQL identifier.
    #[error(
        "{what} {name:?} is not a plain identifier (letters, digits, _ and $, not starting with a digit)"
    )]
    BadIdentifier {
        /// What it names.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The table does not exist.
    #[error("table {0} does not exist")]
    NoTable(String),
    /// A column does not exist.
    #[error("table {table} has no column {column} (the {setting} setting)")]
    NoColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The setting that names it.
        setting: &'static str,
    },
    /// A payload or timestamp column of a type exactly does not read.
    #[error("column {column} is {ty}; {setting} must be {expected}")]
    Type {
        /// The column.
        column: String,
        /// Its type.
        ty: String,
        /// The setting.
        setting: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A header name exactly reserves.
    #[error("header {0:?}: names starting with exactly- are exactly's own")]
    ReservedHeader(String),
    /// A header name that is empty or holds control characters.
    #[error("header {0:?}: a header name must be non-empty text without control characters")]
    BadHeader(String),
    /// The route does not translate.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The database refused.
    #[error(transparent)]
    Database(#[from] PgError),
}

fn identifier(what: &'static str, name: &str) -> Result<String, DebeziumError> {
    let mut chars = name.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && name.len() <= 63;
    if !plain {
        return Err(DebeziumError::BadIdentifier {
            what,
            name: name.to_owned(),
        });
    }
    Ok(format!("\"{name}\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A dollar-quote tag (`$exactly$`, `$exactly1$`, …) that does not occur in `body`, so no value
/// placed in the body (a header name, a route pattern) can end the function's quoting.
fn dollar_tag(body: &str) -> String {
    let mut tag = "$exactly$".to_owned();
    let mut n = 0u32;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$exactly{n}$");
    }
    tag
}

/// The trigger's name, and its function's (one mirror per table).
pub const MIRROR_TRIGGER: &str = "exactly_mirror";

impl DebeziumTable {
    /// The table as `"schema"."table"` and its function's name.
    fn names(&self) -> Result<(String, String), DebeziumError> {
        let parts: Vec<&str> = self.table.split('.').collect();
        let quoted = match parts.as_slice() {
            [table] => identifier("table", table)?,
            [schema, table] => format!(
                "{}.{}",
                identifier("schema", schema)?,
                identifier("table", table)?
            ),
            _ => {
                return Err(DebeziumError::BadIdentifier {
                    what: "table",
                    name: self.table.clone(),
                })
            }
        };
        let function: String = format!("exactly_mirror_{}", self.table.replace('.', "_"))
            .chars()
            .take(63)
            .collect();
        Ok((quoted, format!("\"{function}\"")))
    }

    /// The SQL that installs (or replaces) the mirror, with the column types read from the
    /// catalog.
    pub async fn mirror_sql(&self, client: &Client) -> Result<String, DebeziumError> {
        let (table, function) = self.names()?;
        let exists = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(PgError::at("find the Debezium table"))?
            .get::<_, bool>(0);
        if !exists {
            return Err(DebeziumError::NoTable(self.table.clone()));
        }
        let columns: Vec<(String, String)> = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                &[&table],
            )
            .await
            .map_err(PgError::at("read the Debezium table's columns"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let column = |setting: &'static str, name: &str| -> Result<(String, String), DebeziumError> {
            let quoted = identifier("column", name)?;
            let ty = columns
                .iter()
                .find(|(c, _)| c == name)
                .map(|(_, ty)| ty.clone())
                .ok_or_else(|| DebeziumError::NoColumn {
                    table: self.table.clone(),
                    column: name.to_owned(),
                    setting,
                })?;
            Ok((format!("NEW.{quoted}"), ty))
        };
        let (id, _) = column("id_column", &self.id_column)?;
        let (key, _) = column("key_column", &self.key_column)?;
        let (aggregate_type, _) = column("aggregate_type_column", &self.aggregate_type_column)?;
        let (event_type, _) = column("type_column", &self.type_column)?;
        let (routed, _) = column("route_by_field", &self.route_by_field)?;
        let (payload, payload_type) = column("payload_column", &self.payload_column)?;
        let payload = match payload_type.as_str() {
            "bytea" => payload,
            t if t == "jsonb" || t == "json" || t == "text" || t.starts_with("character varying") => {
                format!("convert_to({payload}::text, 'UTF8')")
            }
            other => {
                return Err(DebeziumError::Type {
                    column: self.payload_column.clone(),
                    ty: other.to_owned(),
                    setting: "payload_column",
                    expected: "jsonb, json, text, varchar or bytea",
                })
            }
        };
        let occurred_at = match &self.timestamp_column {
            None => "clock_timestamp()".to_owned(),
            Some(name) => {
                let (value, ty) = column("timestamp_column", name)?;
                match ty.as_str() {
                    "timestamp with time zone" => value,
                    "timestamp without time zone" => format!("({value} AT TIME ZONE 'UTC')"),
                    "bigint" => format!("to_timestamp({value} / 1000.0)"),
                    other => {
                        return Err(DebeziumError::Type {
                            column: name.clone(),
                            ty: other.to_owned(),
                            setting: "timestamp_column",
                            expected: "timestamptz, timestamp or bigint (milliseconds)",
                        })
                    }
                }
            }
        };
        let mut headers = vec![format!("'id', {id}::text")];
        for field in &self.headers {
            if field.header.starts_with("exactly-") {
                return Err(DebeziumError::ReservedHeader(field.header.clone()));
            }
            if field.header.is_empty() || field.header.chars().any(char::is_control) {
                return Err(DebeziumError::BadHeader(field.header.clone()));
            }
            let (value, _) = column("additional_placement", &field.column)?;
            headers.push(format!("{}, {value}::text", literal(&field.header)));
        }
        let route = posix_route(&self.route_topic_regex, &self.route_topic_replacement)?;
        let (pattern, replacement) = (literal(&route.pattern), literal(&route.replacement));
        let body = format!(
            r#"
DECLARE
    routed text := {routed}::text;
    event_id uuid;
BEGIN
    -- Debezium's id is usually a UUID; another id travels in the id header only.
    IF {id}::text ~* '^[0-9a-f]{{8}}-?[0-9a-f]{{4}}-?[0-9a-f]{{4}}-?[0-9a-f]{{4}}-?[0-9a-f]{{12}}$' THEN
        event_id := {id}::text::uuid;
    ELSE
        event_id := exactly_uuidv7();
    END IF;
    INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at)
    VALUES (event_id, {event_type}::text, {aggregate_type}::text, {key}::text,
            CASE WHEN routed ~ {pattern} THEN regexp_replace(routed, {pattern}, {replacement}) ELSE routed END,
            {payload}, jsonb_strip_nulls(jsonb_build_object({headers})), {occurred_at});
    RETURN NULL;
END "#,
            headers = headers.join(", "),
        );
        let tag = dollar_tag(&body);
        Ok(format!(
            r#"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {tag}{body}{tag};
DROP TRIGGER IF EXISTS {MIRROR_TRIGGER} ON {table};
CREATE TRIGGER {MIRROR_TRIGGER} AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {function}();"#,
        ))
    }

    /// Installs or replaces the mirror, in one transaction (exactly's tables must exist:
    /// `migrate` first).
    pub async fn install_mirror(&self, client: &mut Client) -> Result<(), DebeziumError> {
        let sql = self.mirror_sql(client).await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::at("begin mirror install"))?;
        tx.batch_execute(&sql)
            .await
            .map_err(PgError::at("install the Debezium mirror"))?;
        tx.commit().await.map_err(PgError::at("commit mirror install"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header alias built to close the function's dollar quote installs as plain
    /// data: nothing they carry runs (even with `check_function_bodies = off`, which let the
    /// injected statement run before), and the hostile name is just a header's name.
    #[tokio::test(flavor = "multi_thread")]
    async fn hostile_header_aliases_and_routes_stay_data() {
        let url = exactly_testkit::fresh_pg_database().await;
        let mut client = crate::connect(&url).await.expect("connect");
        crate::migrations::migrate(&mut client).await.expect("migrate");
        client
            .batch_execute(
                "CREATE TABLE outboxevent (id uuid PRIMARY KEY, aggregatetype text NOT NULL,
                     aggregateid text NOT NULL, type text NOT NULL, payload jsonb, tenant text);
                 SET check_function_bodies = off;",
            )
            .await
            .expect("schema");
        let hostile = "h$exactly$; CREATE TABLE pwned (); --";
        let table = DebeziumTable {
            headers: vec![HeaderField {
                column: "tenant".into(),
                header: hostile.into(),
            }],
            ..DebeziumTable::default()
        };
        let sql = table.mirror_sql(&client).await.expect("sql");
        assert!(sql.contains("$exactly1$"), "a tag the values do not hold: {sql}");
        table.install_mirror(&mut client).await.expect("install");
        client
            .batch_execute(
                "INSERT INTO outboxevent VALUES
                 ('0190a0c4-0000-7000-8000-000000000001', 'Order', 'o-1', 'OrderPlaced', '{}', 'acme')",
            )
            .await
            .expect("insert");
        let pwned: bool = client
            .query_one("SELECT to_regclass('pwned') IS NOT NULL", &[])
            .await
            .expect("look")
            .get(0);
        assert!(!pwned, "the injected statement ran");
        let row = client
            .query_one("SELECT topic, headers ->> $1 FROM outbox", &[&hostile])
            .await
            .expect("mirrored row");
        assert_eq!(row.get::<_, String>(0), "outbox.event.Order");
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("acme"));

        let control = DebeziumTable {
            headers: vec![HeaderField {
                column: "tenant".into(),
                header: "a\nb".into(),
            }],
            ..DebeziumTable::default()
        };
        assert!(matches!(
            control.mirror_sql(&client).await,
            Err(DebeziumError::BadHeader(_))
        ));
    }
}
