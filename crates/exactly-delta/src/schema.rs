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

    /// Empty rows in this layout, to gather records into.
    pub fn rows(&self) -> Rows {
        Rows {
            columns: self
                .fields()
                .into_iter()
                .map(|(_, kind, _)| Builder::new(kind))
                .collect(),
            len: 0,
            cells: Vec::new(),
        }
    }

    /// Adds an event (its idempotency key, its envelope), where it came from, and its payload,
    /// written straight into the columns; a record that does not fit adds nothing.
    pub fn push_envelope(
        &self,
        rows: &mut Rows,
        key: &impl fmt::Display,
        e: &exactly_core::Envelope,
        origin: Origin<'_>,
    ) -> Result<(), String> {
        let at = micros(e.occurred_at.0)?;
        let payload = self.payload(&e.payload, &mut rows.cells)?;
        rows.display(0, key);
        rows.display(1, &e.event_id);
        rows.text(2, &e.event_type);
        rows.text(3, &e.aggregate_type);
        rows.text(4, &e.aggregate_id);
        rows.cell(5, at);
        if e.headers.is_empty() {
            rows.text(6, "{}");
        } else {
            let mut headers = serde_json::Map::new();
            for (name, value) in &e.headers {
                headers.insert(name.clone(), String::from_utf8_lossy(value).into_owned().into());
            }
            rows.text(6, &serde_json::Value::Object(headers).to_string());
        }
        self.push_rest(rows, 7, origin, payload, days(e.occurred_at.0));
        Ok(())
    }

    /// Adds any record: its key and timestamp, where it came from, and its payload. The date
    /// partition is the record's timestamp's (`now_ms` when it has none). A record that does
    /// not fit adds nothing.
    pub fn push_plain(
        &self,
        rows: &mut Rows,
        record: PlainRecord<'_>,
        origin: Origin<'_>,
        now_ms: i64,
    ) -> Result<(), String> {
        let key = match record.key {
            None => None,
            Some(k) => Some(std::str::from_utf8(k).map_err(|_| "the key is not UTF-8".to_owned())?),
        };
        let at = record.timestamp_ms.map_or(Ok(Cell::Null), micros)?;
        let payload = self.payload(record.payload, &mut rows.cells)?;
        match key {
            Some(k) => rows.text(0, k),
            None => rows.cell(0, Cell::Null),
        }
        rows.cell(1, at);
        self.push_rest(
            rows,
            2,
            origin,
            payload,
            days(record.timestamp_ms.unwrap_or(now_ms)),
        );
        Ok(())
    }

    /// The payload judged: as one JSON text column (checked, and kept as it came: a parse into
    /// values and back would cost more than the rest of the row), or the declared columns'
    /// cells, left in `cells`.
    fn payload<'p>(&self, payload: &'p [u8], cells: &mut Vec<Cell>) -> Result<Option<&'p str>, String> {
        if self.columns.is_empty() {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map_err(|e| format!("the payload is not JSON: {e}"))?;
            let text = std::str::from_utf8(payload).map_err(|e| format!("the payload is not UTF-8: {e}"))?;
            return Ok(Some(text));
        }
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
        cells.clear();
        for column in &self.columns {
            let found = value.pointer(&column.pointer()).filter(|v| !v.is_null());
            let cell = match found {
                None if column.nullable => Cell::Null,
                None => return Err(format!("column {}: {} is missing", column.name, column.pointer())),
                Some(v) => cell(column.kind, v).map_err(|why| format!("column {}: {why}", column.name))?,
            };
            cells.push(cell);
        }
        Ok(None)
    }

    /// The columns after a record's own ones, from column `at`: where it came from, the payload
    /// (its text, or the cells `payload` left), the date partition. Ends the row.
    fn push_rest(&self, rows: &mut Rows, at: usize, origin: Origin<'_>, payload: Option<&str>, day: Cell) {
        rows.text(at, origin.topic);
        rows.cell(at + 1, Cell::Int(origin.partition));
        rows.cell(at + 2, Cell::Long(origin.offset));
        let mut next = at + 3;
        match payload {
            Some(text) => {
                rows.text(next, text);
                next += 1;
            }
            None => {
                let cells = std::mem::take(&mut rows.cells);
                for c in &cells {
                    rows.cell(next, c.clone());
                    next += 1;
                }
                rows.cells = cells;
            }
        }
        rows.cell(next, day);
        rows.len += 1;
    }

    /// The rows gathered as one Arrow batch in the layout's schema; `rows` is empty after.
    pub fn batch(&self, rows: &mut Rows) -> Result<RecordBatch, ArrowError> {
        let arrays: Vec<ArrayRef> = rows.columns.iter_mut().map(Builder::finish).collect();
        rows.len = 0;
        RecordBatch::try_new(self.arrow_schema(), arrays)
    }
}

/// Records gathered as the table's rows, a builder per column.
pub struct Rows {
    columns: Vec<Builder>,
    len: usize,
    /// The declared columns' cells of the record being added.
    cells: Vec<Cell>,
}

impl fmt::Debug for Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rows({} rows, {} columns)", self.len, self.columns.len())
    }
}

impl Rows {
    /// How many rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn text(&mut self, i: usize, s: &str) {
        match self.columns.get_mut(i) {
            Some(Builder::Text(b)) => b.append_value(s),
            Some(other) => other.append_null(),
            None => {}
        }
    }

    /// A value's text form, written into the column without a `String` of its own.
    fn display(&mut self, i: usize, v: &impl fmt::Display) {
        use std::fmt::Write;
        match self.columns.get_mut(i) {
            Some(Builder::Text(b)) => {
                // Writing into a string builder cannot fail.
                let _ = write!(b, "{v}");
                b.append_value("");
            }
            Some(other) => other.append_null(),
            None => {}
        }
    }

    fn cell(&mut self, i: usize, c: Cell) {
        let Some(b) = self.columns.get_mut(i) else {
            return;
        };
        match (b, c) {
            (Builder::Text(b), Cell::Text(s)) => b.append_value(s),
            (Builder::Long(b), Cell::Long(n)) => b.append_value(n),
            (Builder::Int(b), Cell::Int(n)) => b.append_value(n),
            (Builder::Double(b), Cell::Double(n)) => b.append_value(n),
            (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
            (Builder::Micros(b), Cell::Micros(n)) => b.append_value(n),
            (Builder::Days(b), Cell::Days(n)) => b.append_value(n),
            (b, _) => b.append_null(),
        }
    }
}

/// One column being built.
enum Builder {
    Text(StringBuilder),
    Long(Int64Builder),
    Int(Int32Builder),
    Double(Float64Builder),
    Bool(BooleanBuilder),
    Micros(TimestampMicrosecondBuilder),
    Days(Date32Builder),
}

impl Builder {
    fn new(kind: ColumnType) -> Self {
        match kind {
            ColumnType::String | ColumnType::Json => Builder::Text(StringBuilder::new()),
            ColumnType::Long => Builder::Long(Int64Builder::new()),
            ColumnType::Integer => Builder::Int(Int32Builder::new()),
            ColumnType::Double => Builder::Double(Float64Builder::new()),
            ColumnType::Boolean => Builder::Bool(BooleanBuilder::new()),
            ColumnType::Timestamp => Builder::Micros(TimestampMicrosecondBuilder::new().with_timezone("UTC")),
            ColumnType::Date => Builder::Days(Date32Builder::new()),
        }
    }

    fn append_null(&mut self) {
        match self {
            Builder::Text(b) => b.append_null(),
            Builder::Long(b) => b.append_null(),
            Builder::Int(b) => b.append_null(),
            Builder::Double(b) => b.append_null(),
            Builder::Bool(b) => b.append_null(),
            Builder::Micros(b) => b.append_null(),
            Builder::Days(b) => b.append_null(),
        }
    }

    /// The column built so far; the builder starts again empty (its type kept).
    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Long(b) => Arc::new(b.finish()),
            Builder::Int(b) => Arc::new(b.finish()),
            Builder::Double(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Micros(b) => Arc::new(b.finish()),
            Builder::Days(b) => Arc::new(b.finish()),
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

    fn push(l: &Layout, rows: &mut Rows, payload: &str) -> Result<(), String> {
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
        l.push_plain(rows, record, origin, 0)
    }

    fn column<T: 'static>(batch: &RecordBatch, i: usize) -> &T {
        batch
            .column(i)
            .as_any()
            .downcast_ref::<T>()
            .expect("the column's type")
    }

    #[test]
    fn declared_columns_take_their_values_strictly_and_park_what_does_not_fit() {
        use deltalake::arrow::array::{
            Array, Date32Array, Float64Array, Int32Array, TimestampMicrosecondArray,
        };
        let l = layout("amount:double:/order/amount,qty:integer:required,at:timestamp,day:date");
        l.validate().expect("valid");
        let mut rows = l.rows();
        let fits = r#"{"order":{"amount":2.5},"qty":3,"at":"1970-01-01T00:00:01Z","day":"1970-01-02"}"#;
        push(&l, &mut rows, fits).expect("fits");
        let missing = push(&l, &mut rows, r#"{"order":{"amount":2.5}}"#).expect_err("qty is required");
        assert!(missing.contains("column qty: /qty is missing"), "{missing}");
        let wrong = push(&l, &mut rows, r#"{"qty":"3"}"#).expect_err("a string is no integer");
        assert!(wrong.contains("column qty: expected integer"), "{wrong}");
        let big = push(&l, &mut rows, r#"{"qty":3000000000}"#).expect_err("out of i32");
        assert!(big.contains("expected integer"), "{big}");
        assert!(push(&l, &mut rows, "not json")
            .expect_err("no JSON")
            .contains("not JSON"));
        push(&l, &mut rows, r#"{"qty":4}"#).expect("fits, amount absent");
        assert_eq!(rows.len(), 2, "what does not fit adds nothing");
        let batch = l.batch(&mut rows).expect("a batch");
        assert_eq!((batch.num_rows(), batch.num_columns()), (2, 10));
        assert!(rows.is_empty());
        assert_eq!(column::<Float64Array>(&batch, 5).value(0), 2.5);
        assert!(column::<Float64Array>(&batch, 5).is_null(1));
        assert_eq!(column::<Int32Array>(&batch, 6).values(), &[3, 4]);
        assert_eq!(column::<TimestampMicrosecondArray>(&batch, 7).value(0), 1_000_000);
        assert_eq!(column::<Date32Array>(&batch, 8).value(0), 1);
        assert_eq!(
            column::<Date32Array>(&batch, 9).values(),
            &[3, 3],
            "partitioned by the record's date"
        );
        // The builders start again empty, their types kept.
        push(&l, &mut rows, fits).expect("fits");
        assert_eq!(l.batch(&mut rows).expect("a batch").num_rows(), 1);
    }

    #[test]
    fn the_payload_is_one_json_column_unless_columns_are_declared() {
        use deltalake::arrow::array::StringArray;
        let l = layout("");
        let mut rows = l.rows();
        push(&l, &mut rows, r#"{"b":1, "a":[true]}"#).expect("fits");
        assert!(push(&l, &mut rows, r#"{"b":1"#)
            .expect_err("cut short")
            .contains("not JSON"));
        let batch = l.batch(&mut rows).expect("a batch");
        assert_eq!(batch.schema().field(5).name(), "payload");
        assert_eq!(
            column::<StringArray>(&batch, 5).value(0),
            r#"{"b":1, "a":[true]}"#,
            "as it came"
        );
        assert_eq!(column::<StringArray>(&batch, 0).value(0), "k");
    }

    #[test]
    fn an_event_is_written_column_by_column() {
        use deltalake::arrow::array::StringArray;
        let l = Layout {
            input: InputKind::Envelope,
            ..layout("")
        };
        let e = exactly_core::Envelope {
            event_id: Default::default(),
            event_type: "Placed".into(),
            aggregate_type: "order".into(),
            aggregate_id: "O-1".into(),
            occurred_at: exactly_core::UnixMillis(5),
            payload: b"{}".to_vec(),
            headers: vec![("tenant".into(), b"a".to_vec())],
        };
        let mut rows = l.rows();
        let origin = Origin {
            topic: "t",
            partition: 0,
            offset: 1,
        };
        l.push_envelope(&mut rows, &"key-1", &e, origin).expect("fits");
        let batch = l.batch(&mut rows).expect("a batch");
        let text = |i| column::<StringArray>(&batch, i).value(0).to_owned();
        assert_eq!(
            [text(0), text(1), text(2), text(4), text(6), text(7), text(10)],
            [
                "key-1".to_owned(),
                "00000000-0000-0000-0000-000000000000".to_owned(),
                "Placed".into(),
                "O-1".into(),
                r#"{"tenant":"a"}"#.into(),
                "t".into(),
                "{}".into()
            ]
        );
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
