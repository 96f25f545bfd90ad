//! Jobs declared as data (`[stream.NAME.job]` in `exactly.toml`): the common shape of a
//! windowed aggregation over an outbox topic, compiled into a [`Topology`] with the DSL.
//!
//! ```toml
//! [stream.orders-agg.job]
//! input = "orders"
//! key = "/product_id"                       # a JSON pointer into the payload; absent: the aggregate id
//! filter = { pointer = "/status", equals = "paid" }
//! window = { kind = "tumbling", size_ms = 300000, grace_ms = 60000 }
//! aggregate = "count"                       # or { sum = "/amount" }, min, max, count_distinct
//! emit = "final"                            # or "update"
//! output = "orders-per-product"
//! ```
//!
//! Output records: key `{"key": …, "start": ms, "end": ms}` (a table: the key alone), value
//! `{"key": …, "window_start": ms, "window_end": ms, "<aggregate>": result}`.

use exactly_core::aggregate::{AggState, Aggregation};
use exactly_core::windowing::{SessionWindows, TimeWindows, WindowSpecError};
use exactly_core::Envelope;
use serde_json::{json, Value};

use super::consumed::{Consumed, Grouped, Produced};
use super::graph::Topology;
use super::stream::{BuildError, KStream, KTable, StreamsBuilder};
use super::window_ops::{Emit, Windowed};

/// The name a job table's aggregation runs under (`JobSpec::topology(JOB_NAME)` in
/// `exactly run`): its store, and the topics `<application_id>-aggregate-changelog` and
/// `<application_id>-aggregate-repartition`.
pub const JOB_NAME: &str = "aggregate";

/// A windowed (or table) aggregation over an outbox topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The input topic (exactly's envelope: outbox events).
    pub input: String,
    /// A JSON pointer into the payload to group by; absent or empty: the aggregate id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Only events whose payload holds this value at this pointer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,
    /// The windows; absent: one running result per key (a table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
    /// What is computed per key and window.
    pub aggregate: AggregateSpec,
    /// On every update, or once when the window closes.
    #[serde(default)]
    pub emit: EmitSpec,
    /// The output topic.
    pub output: String,
    /// Where copies of late records go (none: dropped and counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_topic: Option<String>,
    /// A PostgreSQL table (in the stream's `sink_database`) that also holds the results, one
    /// row per key and window ([`JobSpec::result_columns`]), created when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

/// The type of a result column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultType {
    /// Text (the grouping key).
    Text,
    /// A 64-bit integer (window bounds, counts).
    Integer,
    /// Any number (a sum, min or max of numbers that may have fractions).
    Number,
}

/// The columns of a job's results: every field of an output value, by name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultColumns {
    /// Name and type of each column, in the output value's order.
    pub columns: Vec<(&'static str, ResultType)>,
    /// The columns that identify a result: the key, and the window start.
    pub key_columns: Vec<&'static str>,
    /// A tombstone's key names `window_start` `start` (an update-mode session merged away).
    pub key_fields: Vec<(&'static str, &'static str)>,
}

/// `filter = { pointer = "/status", equals = "paid" }`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// A JSON pointer into the payload.
    pub pointer: String,
    /// The value it must hold.
    pub equals: Value,
}

/// `window = { kind = "tumbling" | "hopping" | "session", … }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowSpec {
    /// Fixed windows of `size_ms`.
    Tumbling {
        /// Window length.
        size_ms: i64,
        /// How late a record may arrive after its window ends.
        #[serde(default)]
        grace_ms: i64,
    },
    /// Windows of `size_ms` starting every `advance_ms`.
    Hopping {
        /// Window length.
        size_ms: i64,
        /// Distance between starts.
        advance_ms: i64,
        /// Grace.
        #[serde(default)]
        grace_ms: i64,
    },
    /// A key's records at most `gap_ms` apart.
    Session {
        /// Inactivity gap.
        gap_ms: i64,
        /// Grace.
        #[serde(default)]
        grace_ms: i64,
    },
}

/// `aggregate = "count"`, or `{ sum | min | max | count_distinct = "/pointer" }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregateSpec {
    /// Records.
    Count,
    /// Sum of a number.
    Sum(String),
    /// Smallest number.
    Min(String),
    /// Largest number.
    Max(String),
    /// Distinct values.
    CountDistinct(String),
}

impl AggregateSpec {
    fn aggregation(&self) -> Aggregation {
        match self {
            AggregateSpec::Count => Aggregation::Count,
            AggregateSpec::Sum(p) => Aggregation::Sum(p.clone()),
            AggregateSpec::Min(p) => Aggregation::Min(p.clone()),
            AggregateSpec::Max(p) => Aggregation::Max(p.clone()),
            AggregateSpec::CountDistinct(p) => Aggregation::CountDistinct(p.clone()),
        }
    }

    /// The result's field name in the output value.
    pub fn field(&self) -> &'static str {
        match self {
            AggregateSpec::Count => "count",
            AggregateSpec::Sum(_) => "sum",
            AggregateSpec::Min(_) => "min",
            AggregateSpec::Max(_) => "max",
            AggregateSpec::CountDistinct(_) => "count_distinct",
        }
    }
}

/// `emit = "update" | "final"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmitSpec {
    /// A result on every update.
    #[default]
    Update,
    /// One final result per window, when it closes.
    Final,
}

/// A job that cannot run as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// A window setting.
    #[error("window: {0}")]
    Window(#[from] WindowSpecError),
    /// A JSON pointer that is not one (it must start with '/').
    #[error(
        "{what} {pointer:?} is not a JSON pointer: it must start with '/' (for example \"/product_id\")"
    )]
    Pointer {
        /// Which setting.
        what: &'static str,
        /// What was given.
        pointer: String,
    },
    /// A table name that is not a plain identifier.
    #[error("table {0:?} is not a plain identifier (letters, digits, _ and $, not starting with a digit; schema.table allowed)")]
    Table(String),
    /// Emitting final results needs windows.
    #[error("emit = \"final\" needs a window: without one a key's result is never final")]
    FinalWithoutWindow,
    /// The topology did not build.
    #[error(transparent)]
    Build(#[from] BuildError),
}

fn pointer(what: &'static str, p: &str) -> Result<(), JobError> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(JobError::Pointer {
            what,
            pointer: p.to_owned(),
        })
    }
}

/// The payload as JSON (not JSON: parked with the reason).
fn payload_json(envelope: &Envelope) -> Result<Value, String> {
    serde_json::from_slice(&envelope.payload).map_err(|e| format!("the payload is not JSON: {e}"))
}

impl JobSpec {
    /// The columns a table of this job's results has.
    pub fn result_columns(&self) -> ResultColumns {
        let value = match self.aggregate {
            AggregateSpec::Count | AggregateSpec::CountDistinct(_) => ResultType::Integer,
            AggregateSpec::Sum(_) | AggregateSpec::Min(_) | AggregateSpec::Max(_) => ResultType::Number,
        };
        let field = self.aggregate.field();
        if self.window.is_none() {
            return ResultColumns {
                columns: vec![("key", ResultType::Text), (field, value)],
                key_columns: vec!["key"],
                key_fields: vec![],
            };
        }
        ResultColumns {
            columns: vec![
                ("key", ResultType::Text),
                ("window_start", ResultType::Integer),
                ("window_end", ResultType::Integer),
                (field, value),
            ],
            key_columns: vec!["key", "window_start"],
            key_fields: vec![("window_start", "start")],
        }
    }

    /// Every setting checked, without building.
    pub fn check(&self) -> Result<(), JobError> {
        if let Some(k) = self.key.as_deref().filter(|k| !k.is_empty()) {
            pointer("key", k)?;
        }
        if let Some(f) = &self.filter {
            pointer("filter.pointer", &f.pointer)?;
        }
        if let Some(p) = self.aggregate.aggregation().pointer() {
            pointer("aggregate", p)?;
        }
        if let Some(t) = &self.table {
            if exactly_core::recipes::quoted_identifier(t).is_none() {
                return Err(JobError::Table(t.clone()));
            }
        }
        self.windows()?;
        if self.window.is_none() && self.emit == EmitSpec::Final {
            return Err(JobError::FinalWithoutWindow);
        }
        Ok(())
    }

    fn windows(&self) -> Result<Option<Result<TimeWindows, SessionWindows>>, JobError> {
        Ok(match self.window {
            None => None,
            Some(WindowSpec::Tumbling { size_ms, grace_ms }) => {
                Some(Ok(TimeWindows::tumbling(size_ms, grace_ms)?))
            }
            Some(WindowSpec::Hopping {
                size_ms,
                advance_ms,
                grace_ms,
            }) => Some(Ok(TimeWindows::hopping(size_ms, advance_ms, grace_ms)?)),
            Some(WindowSpec::Session { gap_ms, grace_ms }) => {
                Some(Err(SessionWindows::new(gap_ms, grace_ms)?))
            }
        })
    }

    /// The job as a topology named `name` (its store, changelog and repartition topic).
    pub fn topology(&self, name: &str) -> Result<Topology, JobError> {
        self.check()?;
        let builder = StreamsBuilder::new();
        if let Some(late) = &self.late_topic {
            builder.late_records_to(late);
        }
        let mut events: KStream<String, Envelope> = builder.stream(&self.input, Consumed::envelope_raw());
        if let Some(FilterSpec { pointer, equals }) = self.filter.clone() {
            // A payload that is not JSON does not match; the aggregation parks it if it gets there.
            events = events.filter(move |_, e| {
                payload_json(e)
                    .ok()
                    .and_then(|p| p.pointer(&pointer).cloned())
                    .is_some_and(|v| v == equals)
            });
        }
        let aggregation = self.aggregation_values(events);
        let field = self.aggregate.field();
        let agg = self.aggregate.aggregation();
        match self.windows()? {
            None => {
                let (a, i) = (agg.clone(), agg);
                let table: KTable<String, AggState> = aggregation
                    .group_by_key(Grouped::json().named(name))
                    .try_aggregate(move || i.init(), move |_, p: &Value, s| add(&a, p, s));
                table
                    .to_stream()
                    .map(move |k, s| {
                        let value = json!({ "key": k, field: s.result() });
                        (k, value)
                    })
                    .to(&self.output, Produced::json());
            }
            Some(windows) => {
                let emit = match self.emit {
                    EmitSpec::Update => Emit::OnUpdate,
                    EmitSpec::Final => Emit::OnWindowClose,
                };
                let grouped = aggregation.group_by_key(Grouped::json().named(name));
                let (a, i, m) = (agg.clone(), agg.clone(), agg);
                let table: KTable<Windowed<String>, AggState> = match windows {
                    Ok(time) => grouped
                        .windowed_by(time)
                        .emit(emit)
                        .try_aggregate(move || i.init(), move |_, p, s| add(&a, p, s)),
                    Err(sessions) => grouped.session_windowed_by(sessions).emit(emit).try_aggregate(
                        move || i.init(),
                        move |_, p, s| add(&a, p, s),
                        move |_, x, y| m.merge(x, y).map_err(|e| e.to_string()),
                    ),
                };
                table
                    .map_values(|s| s.result())
                    .to_stream()
                    .map(move |w, result| {
                        let value = json!({
                            "key": w.key, "window_start": w.start, "window_end": w.end, field: result
                        });
                        (w, value)
                    })
                    .to(&self.output, Produced::json());
            }
        }
        Ok(builder.build()?)
    }

    /// The events as (grouping key, payload JSON); a payload that is not JSON, or without the
    /// key, is parked with the reason.
    fn aggregation_values(&self, events: KStream<String, Envelope>) -> KStream<String, Value> {
        let Some(key) = self.key.clone().filter(|k| !k.is_empty()) else {
            // Grouped by the aggregate id, the record key: no repartition.
            return events.try_map_values(|_, e| payload_json(&e));
        };
        let key = Some(key);
        events.try_map(move |aggregate_id, e| {
            let payload = payload_json(&e)?;
            let group = match &key {
                None => aggregate_id,
                Some(pointer) => match payload.pointer(pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => {
                        return Err(format!("the payload has no grouping key at {pointer}"))
                    }
                    Some(other) => other.to_string(),
                },
            };
            Ok((group, payload))
        })
    }
}

fn add(agg: &Aggregation, payload: &Value, state: AggState) -> Result<AggState, String> {
    let contribution = agg.read(payload).map_err(|e| e.to_string())?;
    agg.add(state, &contribution).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<JobSpec, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn a_job_reads_from_toml_and_bad_settings_are_refused_with_a_reason() {
        let job = spec(
            r#"
            input = "orders"
            key = "/product_id"
            filter = { pointer = "/status", equals = "paid" }
            window = { kind = "hopping", size_ms = 600000, advance_ms = 300000, grace_ms = 1000 }
            aggregate = { sum = "/amount" }
            emit = "final"
            output = "revenue"
            "#,
        )
        .expect("parses");
        assert_eq!(job.aggregate, AggregateSpec::Sum("/amount".into()));
        assert!(job.topology("revenue-agg").is_ok());

        let unknown = spec("input = \"o\"\naggregate = \"count\"\noutput = \"x\"\nwindw = 1\n");
        assert!(unknown.expect_err("unknown key").to_string().contains("windw"));
        let bad = spec("input = \"o\"\naggregate = { sum = \"amount\" }\noutput = \"x\"\n").expect("parses");
        assert_eq!(
            bad.check().expect_err("not a pointer").to_string(),
            "aggregate \"amount\" is not a JSON pointer: it must start with '/' (for example \"/product_id\")"
        );
        let bad = spec(
            "input = \"o\"\naggregate = \"count\"\noutput = \"x\"\nwindow = { kind = \"hopping\", size_ms = 10, advance_ms = 20 }\n",
        )
        .expect("parses");
        assert!(bad
            .check()
            .expect_err("advance")
            .to_string()
            .contains("must not exceed"));
        let bad =
            spec("input = \"o\"\naggregate = \"count\"\noutput = \"x\"\nemit = \"final\"\n").expect("parses");
        assert_eq!(bad.check(), Err(JobError::FinalWithoutWindow));
    }
}
