//! The table's columns and how one Kafka record becomes one row of them: exactly's envelope (or
//! a plain record's key and timestamp), where the record came from, and its payload, either as
//! one JSON string column or as the columns the user declares. A record that does not fit is
//! refused with the reason; the sink parks it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{DataType as ArrowType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::{DataType, PrimitiveType, StructField};
use serde::{Deserialize, Serialize};

/// The partition column the sink adds by default: the event's UTC date.
pub const EVENT_DATE: &str = "event_date";
const MS_PER_DAY: i64 = 86_400_000;

/// A column's type, as Delta names it (JSON: any value, kept as its JSON text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// UTF-8 text.
    String,
    /// 64-bit integer.
    Long,
    /// 32-bit integer.
    Integer,
    /// 64-bit float.
    Double,
    /// true or false.
    Boolean,
    /// Microseconds since the epoch, UTC: from epoch milliseconds or an RFC 3339 string.
    Timestamp,
    /// A calendar date: from `YYYY-MM-DD`.
    Date,
    /// Any JSON value, stored as its JSON text (a string column).
    Json,
}

impl ColumnType {
    const NAMES: [(&'static str, ColumnType); 8] = [
        ("string", ColumnType::String),
        ("long", ColumnType::Long),
        ("integer", ColumnType::Integer),
        ("double", ColumnType::Double),
        ("boolean", ColumnType::Boolean),
        ("timestamp", ColumnType::Timestamp),
        ("date", ColumnType::Date),
        ("json", ColumnType::Json),
    ];

    fn arrow(self) -> ArrowType {
        match self {
            ColumnType::String | ColumnType::Json => ArrowType::Utf8,
            ColumnType::Long => ArrowType::Int64,
            ColumnType::Integer => ArrowType::Int32,
            ColumnType::Double => ArrowType::Float64,
            ColumnType::Boolean => ArrowType::Boolean,
            ColumnType::Timestamp => ArrowType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ColumnType::Date => ArrowType::Date32,
        }
    }

    fn delta(self) -> PrimitiveType {
        match self {
            ColumnType::String | ColumnType::Json => PrimitiveType::String,
            ColumnType::Long => PrimitiveType::Long,
            ColumnType::Integer => PrimitiveType::Integer,
            ColumnType::Double => PrimitiveType::Double,
            ColumnType::Boolean => PrimitiveType::Boolean,
            ColumnType::Timestamp => PrimitiveType::Timestamp,
            ColumnType::Date => PrimitiveType::Date,
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, t)| t == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// A payload column the user declares: its name, type, and where in the JSON payload its value
/// is (a JSON pointer; `/name` unless given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// The column's name in the table.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// JSON pointer into the payload (default `/<name>`).
    #[serde(default)]
    pub pointer: Option<String>,
    /// Whether a record may lack it (default true; a required column missing parks the record).
    #[serde(default = "yes")]
    pub nullable: bool,
}

fn yes() -> bool {
    true
}

/// Why a column declaration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {text:?}: {reason}")]
pub struct ColumnError {
    text: String,
    reason: String,
}

/// `name:type[:pointer][:required]`, for example `amount:double:/order/amount`.
impl FromStr for Column {
    type Err = ColumnError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let refuse = |reason: &str| ColumnError {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = text.split(':');
        let name = parts.next().unwrap_or_default();
        let kind = parts
            .next()
            .ok_or_else(|| refuse("expected name:type[:pointer][:required]"))?;
        let kind = ColumnType::NAMES
            .iter()
            .find(|(n, _)| *n == kind)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                refuse("types are string, long, integer, double, boolean, timestamp, date, json")
            })?;
        let mut column = Column {
            name: name.to_owned(),
            kind,
            pointer: None,
            nullable: true,
        };
        for part in parts {
            match part {
                "required" => column.nullable = false,
                p if p.is_empty() || p.starts_with('/') => column.pointer = Some(p.to_owned()),
                _ => return Err(refuse("a pointer starts with / ; the only flag is `required`")),
            }
        }
        column.validate().map_err(|reason| refuse(&reason))?;
        Ok(column)
    }
}

impl Column {
    fn pointer(&self) -> String {
        self.pointer.clone().unwrap_or_else(|| format!("/{}", self.name))
    }

    /// A name Delta and every reader accepts, unlike the sink's own columns.
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !self.name.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(format!(
                "column name {:?}: letters, digits and _ only, not starting with a digit",
                self.name
            ));
        }
        if let Some(p) = &self.pointer {
            if !(p.is_empty() || p.starts_with('/')) {
                return Err(format!("pointer {p:?} must start with /"));
            }
        }
        Ok(())
    }
}

/// What the topic's records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// exactly's events (relays, Debezium's router through the mirror): envelope headers
    /// required, repeats removed by idempotency key; a record without them is parked.
    #[default]
    Envelope,
    /// Any record (a stream job's results): the Kafka key and timestamp; no dedupe beyond the
    /// positions (a transactional producer's output needs none).
    Plain,
}

impl FromStr for InputKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "envelope" => Ok(InputKind::Envelope),
            "plain" => Ok(InputKind::Plain),
            _ => Err(format!("{text:?}: the input is `envelope` or `plain`")),
        }
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputKind::Envelope => "envelope",
            InputKind::Plain => "plain",
        })
    }
}

/// The table's layout: which record columns, which payload columns, which partition column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// What the records are.
    pub input: InputKind,
    /// Payload columns; empty: the payload as one JSON string column `payload`.
    pub columns: Vec<Column>,
    /// The partition column: `event_date` (the event's UTC date, the default), one of the
    /// declared columns, or none.
    pub partition_by: Option<String>,
}

/// A value of one cell.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Text(String),
    Long(i64),
    Int(i32),
    Double(f64),
    Bool(bool),
    Micros(i64),
    Days(i32),
}

/// One record turned into the table's row, in the layout's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(Vec<Cell>);

/// Where a record came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Its topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// A plain record's parts.
#[derive(Debug, Clone, Copy)]
pub struct PlainRecord<'a> {
    /// The Kafka key, if it had one.
    pub key: Option<&'a [u8]>,
    /// The record's timestamp (milliseconds), if it had one.
    pub timestamp_ms: Option<i64>,
    /// The value.
    pub payload: &'a [u8],
}

impl Layout {
    /// Refuses a layout whose names collide or whose partition column is unknown.
    pub fn validate(&self) -> Result<(), String> {
        let fields = self.fields();
        for column in &self.columns {
            column.validate()?;
        }
        for (i, (name, _, _)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(n, _, _)| n == name) {
                return Err(format!(
                    "column {name:?} is declared twice (or is one of the sink's own)"
                ));
            }
        }
        if let Some(p) = &self.partition_by {
            if !fields.iter().any(|(n, _, _)| n == p) {
                return Err(format!("partition column {p:?} is not a column of the table"));
            }
        }
        Ok(())
    }

    /// Every column: name, type, nullable.
    pub fn fields(&self) -> Vec<(String, ColumnType, bool)> {
        let own = |n: &str, t, null| (n.to_owned(), t, null);
        let mut fields = match self.input {
            InputKind::Envelope => vec![
                own("idempotency_key", ColumnType::String, false),
                own("event_id", ColumnType::String, false),
                own("event_type", ColumnType::String, false),
                own("aggregate_type", ColumnType::String, false),
                own("aggregate_id", ColumnType::String, false),
                own("event_time", ColumnType::Timestamp, false),
                own("headers", ColumnType::Json, false),
            ],
            InputKind::Plain => vec![
                own("key", ColumnType::String, true),
                own("timestamp", ColumnType::Timestamp, true),
            ],
        };
        fields.extend([
            own("topic", ColumnType::String, false),
            own("partition", ColumnType::Integer, false),
            own("offset", ColumnType::Long, false),
        ]);
        if self.columns.is_empty() {
            fields.push(own("payload", ColumnType::Json, false));
        } else {
            fields.extend(self.columns.iter().map(|c| (c.name.clone(), c.kind, c.nullable)));
        }
        fields.push(own(EVENT_DATE, ColumnType::Date, false));
        fields
    }

    /// How many columns a row has (without building their names).
    fn fields_len(&self) -> usize {
        let own = match self.input {
            InputKind::Envelope => 7,
            InputKind::Plain => 2,
        };
        own + 3 + self.columns.len().max(1) + 1
    }

    /// The Arrow schema of a batch of rows.
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .fields()
            .into_iter()
            .map(|(n, t, null)| Field::new(n, t.arrow(), null))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// The Delta columns, to create the table with.
    pub fn delta_columns(&self) -> Vec<StructField> {
        self.fields()
            .into_iter()
            .map(|(n, t, null)| StructField::new(n, DataType::Primitive(t.delta()), null))
            .collect()
    }

    /// An event (its key's text form, its envelope, taken apart rather than copied), where it
    /// came from, and its payload.
    pub fn envelope_row(
        &self,
        key: String,
        e: exactly_core::Envelope,
        origin: Origin<'_>,
    ) -> Result<Row, String> {
        let headers = if e.headers.is_empty() {
            "{}".to_owned()
        } else {
            let mut headers = serde_json::Map::new();
            for (name, value) in e.headers {
                headers.insert(name, String::from_utf8_lossy(&value).into_owned().into());
            }
            serde_json::Value::Object(headers).to_string()
        };
        let mut cells = Vec::with_capacity(self.fields_len());
        cells.extend([
            Cell::Text(key),
            Cell::Text(e.event_id.to_string()),
            Cell::Text(e.event_type),
            Cell::Text(e.aggregate_type),
            Cell::Text(e.aggregate_id),
            micros(e.occurred_at.0)?,
            Cell::Text(headers),
        ]);
        self.finish(&mut cells, origin, Payload::Owned(e.payload))?;
        cells.push(days(e.occurred_at.0));
        Ok(Row(cells))
    }

    /// Any record: its key and timestamp, where it came from, and its payload. The date
    /// partition is the record's timestamp's (`now_ms` when it has none).
    pub fn plain_row(&self, record: PlainRecord<'_>, origin: Origin<'_>, now_ms: i64) -> Result<Row, String> {
        let key = match record.key {
            None => Cell::Null,
            Some(k) => Cell::Text(
                std::str::from_utf8(k)
                    .map_err(|_| "the key is not UTF-8".to_owned())?
                    .to_owned(),
            ),
        };
        let mut cells = Vec::with_capacity(self.fields_len());
        cells.extend([key, record.timestamp_ms.map_or(Ok(Cell::Null), micros)?]);
        self.finish(&mut cells, origin, Payload::Borrowed(record.payload))?;
        cells.push(days(record.timestamp_ms.unwrap_or(now_ms)));
        Ok(Row(cells))
    }

    fn finish(&self, cells: &mut Vec<Cell>, origin: Origin<'_>, payload: Payload<'_>) -> Result<(), String> {
        cells.extend([
            Cell::Text(origin.topic.to_owned()),
            Cell::Int(origin.partition),
            Cell::Long(origin.offset),
        ]);
        if self.columns.is_empty() {
            // Checked, and kept as it came (a parse into values and back would cost more than
            // the rest of the row).
            serde_json::from_slice::<serde::de::IgnoredAny>(payload.bytes())
                .map_err(|e| format!("the payload is not JSON: {e}"))?;
            let text = match payload {
                Payload::Owned(bytes) => String::from_utf8(bytes).map_err(|e| e.utf8_error()),
                Payload::Borrowed(bytes) => std::str::from_utf8(bytes).map(str::to_owned),
            }
            .map_err(|e| format!("the payload is not UTF-8: {e}"))?;
            cells.push(Cell::Text(text));
            return Ok(());
        }
        let payload = payload.bytes();
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
        for column in &self.columns {
            let found = value.pointer(&column.pointer()).filter(|v| !v.is_null());
            let cell = match found {
                None if column.nullable => Cell::Null,
                None => return Err(format!("column {}: {} is missing", column.name, column.pointer())),
                Some(v) => cell(column.kind, v).map_err(|why| format!("column {}: {why}", column.name))?,
            };
            cells.push(cell);
        }
        Ok(())
    }

    /// The rows as one Arrow batch in the layout's schema.
    pub fn batch(&self, rows: &[Row]) -> Result<RecordBatch, ArrowError> {
        let fields = self.fields();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(fields.len());
        for (i, (_, kind, _)) in fields.iter().enumerate() {
            let cells = rows.iter().map(|r| r.0.get(i).unwrap_or(&Cell::Null));
            arrays.push(array(*kind, cells));
        }
        RecordBatch::try_new(self.arrow_schema(), arrays)
    }
}

/// A payload the row may take over, or one it copies.
enum Payload<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl Payload<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Owned(b) => b,
            Payload::Borrowed(b) => b,
        }
    }
}

fn micros(ms: i64) -> Result<Cell, String> {
    ms.checked_mul(1000)
        .map(Cell::Micros)
        .ok_or_else(|| format!("event time {ms} ms is out of range"))
}

fn days(ms: i64) -> Cell {
    Cell::Days(i32::try_from(ms.div_euclid(MS_PER_DAY)).unwrap_or(i32::MAX))
}

/// A JSON value as a cell of `kind`, strictly: a number is no string and a string no number.
fn cell(kind: ColumnType, v: &serde_json::Value) -> Result<Cell, String> {
    use serde_json::Value;
    let wrong = || format!("expected {kind}, got {v}");
    Ok(match kind {
        ColumnType::Json => Cell::Text(v.to_string()),
        ColumnType::String => Cell::Text(v.as_str().ok_or_else(wrong)?.to_owned()),
        ColumnType::Long => Cell::Long(v.as_i64().ok_or_else(wrong)?),
        ColumnType::Integer => Cell::Int(v.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(wrong)?),
        ColumnType::Double => Cell::Double(v.as_f64().ok_or_else(wrong)?),
        ColumnType::Boolean => Cell::Bool(v.as_bool().ok_or_else(wrong)?),
        ColumnType::Timestamp => match v {
            Value::Number(n) => micros(n.as_i64().ok_or_else(wrong)?)?,
            Value::String(s) => Cell::Micros(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| format!("expected an RFC 3339 timestamp, got {s:?}: {e}"))?
                    .timestamp_micros(),
            ),
            _ => return Err(wrong()),
        },
        ColumnType::Date => {
            let s = v.as_str().ok_or_else(wrong)?;
            let date = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|e| format!("expected a date YYYY-MM-DD, got {s:?}: {e}"))?;
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).ok_or_else(wrong)?;
            Cell::Days(i32::try_from((date - epoch).num_days()).map_err(|_| wrong())?)
        }
    })
}

fn array<'a>(kind: ColumnType, cells: impl Iterator<Item = &'a Cell>) -> ArrayRef {
    macro_rules! build {
        ($builder:expr, $pat:pat => $value:expr) => {{
            let mut b = $builder;
            for c in cells {
                match c {
                    $pat => b.append_value($value),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    match kind {
        ColumnType::String | ColumnType::Json => build!(StringBuilder::new(), Cell::Text(s) => s),
        ColumnType::Long => build!(Int64Builder::new(), Cell::Long(n) => *n),
        ColumnType::Integer => build!(Int32Builder::new(), Cell::Int(n) => *n),
        ColumnType::Double => build!(Float64Builder::new(), Cell::Double(n) => *n),
        ColumnType::Boolean => build!(BooleanBuilder::new(), Cell::Bool(b) => *b),
        ColumnType::Timestamp => {
            let b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
            build!(b, Cell::Micros(n) => *n)
        }
        ColumnType::Date => build!(Date32Builder::new(), Cell::Days(n) => *n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(columns: &str) -> Layout {
        Layout {
            input: InputKind::Plain,
            columns: columns
                .split(',')
                .filter(|c| !c.is_empty())
                .map(|c| c.parse().expect("a column"))
                .collect(),
            partition_by: Some(EVENT_DATE.into()),
        }
    }

    fn row(l: &Layout, payload: &str) -> Result<Row, String> {
        let origin = Origin {
            topic: "t",
            partition: 1,
            offset: 7,
        };
        let record = PlainRecord {
            key: Some(b"k"),
            timestamp_ms: Some(86_400_000 * 3 + 5),
            payload: payload.as_bytes(),
        };
        l.plain_row(record, origin, 0)
    }

    #[test]
    fn declared_columns_take_their_values_strictly_and_park_what_does_not_fit() {
        let l = layout("amount:double:/order/amount,qty:integer:required,at:timestamp,day:date");
        l.validate().expect("valid");
        let ok = row(
            &l,
            r#"{"order":{"amount":2.5},"qty":3,"at":"1970-01-01T00:00:01Z","day":"1970-01-02"}"#,
        )
        .expect("fits");
        assert_eq!(
            ok.0[5..9],
            [
                Cell::Double(2.5),
                Cell::Int(3),
                Cell::Micros(1_000_000),
                Cell::Days(1)
            ]
        );
        assert_eq!(ok.0[9], Cell::Days(3), "partitioned by the record's date");
        let missing = row(&l, r#"{"order":{"amount":2.5}}"#).expect_err("qty is required");
        assert!(missing.contains("column qty: /qty is missing"), "{missing}");
        let wrong = row(&l, r#"{"qty":"3"}"#).expect_err("a string is no integer");
        assert!(wrong.contains("column qty: expected integer"), "{wrong}");
        let big = row(&l, r#"{"qty":3000000000}"#).expect_err("out of i32");
        assert!(big.contains("expected integer"), "{big}");
        assert!(row(&l, "not json").expect_err("no JSON").contains("not JSON"));
        let batch = l.batch(&[ok.clone(), ok]).expect("a batch");
        assert_eq!((batch.num_rows(), batch.num_columns()), (2, 10));
    }

    #[test]
    fn the_payload_is_one_json_column_unless_columns_are_declared() {
        let l = layout("");
        let r = row(&l, r#"{"b":1, "a":[true]}"#).expect("fits");
        assert_eq!(r.0[5], Cell::Text(r#"{"b":1, "a":[true]}"#.into()), "as it came");
        assert!(row(&l, r#"{"b":1"#).expect_err("cut short").contains("not JSON"));
        let batch = l.batch(&[r]).expect("a batch");
        assert_eq!(batch.schema().field(5).name(), "payload");
    }

    #[test]
    fn a_row_is_sized_for_its_layout() {
        for input in [InputKind::Envelope, InputKind::Plain] {
            for columns in ["", "a:long", "a:long,b:string:/x/y,c:json"] {
                let l = Layout {
                    input,
                    ..layout(columns)
                };
                assert_eq!(l.fields_len(), l.fields().len(), "{input} {columns:?}");
            }
        }
    }

    #[test]
    fn bad_declarations_are_refused_with_the_reason() {
        for (text, why) in [
            ("amount", "expected name:type"),
            ("amount:float", "types are"),
            ("amount:double:order", "pointer starts with /"),
            ("1st:long", "not starting with a digit"),
            ("a-b:long", "letters, digits and _"),
        ] {
            let e = text.parse::<Column>().expect_err(text).to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        let twice = layout("topic:string");
        assert!(twice.validate().expect_err("collides").contains("declared twice"));
        let l = Layout {
            partition_by: Some("region".into()),
            ..layout("")
        };
        assert!(l.validate().expect_err("unknown").contains("not a column"));
    }
}
