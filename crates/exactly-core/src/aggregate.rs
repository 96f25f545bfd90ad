//! The aggregations a stream job declared in `exactly.toml` can run over JSON payloads: `count`,
//! `sum`, `min` and `max` of a number at a JSON pointer, and `count_distinct` of the value at a
//! pointer. Each has a state that adds one record, merges with another state (session windows
//! merge), and shows as a JSON result.

use std::collections::BTreeSet;

use serde_json::Value;

/// What a job computes per key (and window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aggregation {
    /// Records.
    Count,
    /// The sum of the number at a JSON pointer.
    Sum(String),
    /// The smallest number at a JSON pointer.
    Min(String),
    /// The largest number at a JSON pointer.
    Max(String),
    /// Distinct values at a JSON pointer (compared as their JSON text).
    CountDistinct(String),
}

/// Why a record cannot be aggregated: the runtime parks it with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// Nothing at the pointer.
    #[error("the payload has nothing at {0}")]
    Missing(String),
    /// Not a number at the pointer (sum, min, max).
    #[error("the payload's {pointer} is {found}, not a number")]
    NotANumber {
        /// The pointer.
        pointer: String,
        /// What is there, shortened.
        found: String,
    },
    /// The integer sum left 64 bits.
    #[error("the sum at {0} overflows 64-bit integers")]
    Overflow(String),
}

/// A number as JSON holds it: integers stay exact.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Num {
    /// An integer.
    Int(i64),
    /// Anything else.
    Float(f64),
}

impl Num {
    fn of(value: &Value) -> Option<Num> {
        if let Some(i) = value.as_i64() {
            Some(Num::Int(i))
        } else {
            value.as_f64().map(Num::Float)
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn add(self, other: Num) -> Option<Num> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a.checked_add(b).map(Num::Int),
            (a, b) => Some(Num::Float(a.as_f64() + b.as_f64())),
        }
    }

    fn less(self, other: Num) -> bool {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a < b,
            (a, b) => a.as_f64() < b.as_f64(),
        }
    }

    fn to_json(self) -> Value {
        match self {
            Num::Int(i) => Value::from(i),
            Num::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        }
    }
}

/// The running state of an [`Aggregation`] (serialised into the state store and changelog).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggState {
    /// Records counted.
    Count(u64),
    /// Sum so far.
    Sum(Num),
    /// Smallest so far (None: nothing yet).
    Min(Option<Num>),
    /// Largest so far.
    Max(Option<Num>),
    /// The distinct values' JSON texts.
    Distinct(BTreeSet<String>),
}

impl Aggregation {
    /// The state before any record.
    pub fn init(&self) -> AggState {
        match self {
            Aggregation::Count => AggState::Count(0),
            Aggregation::Sum(_) => AggState::Sum(Num::Int(0)),
            Aggregation::Min(_) => AggState::Min(None),
            Aggregation::Max(_) => AggState::Max(None),
            Aggregation::CountDistinct(_) => AggState::Distinct(BTreeSet::new()),
        }
    }

    /// The JSON pointer the aggregation reads, if any.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            Aggregation::Count => None,
            Aggregation::Sum(p)
            | Aggregation::Min(p)
            | Aggregation::Max(p)
            | Aggregation::CountDistinct(p) => Some(p),
        }
    }

    /// What one record contributes, read from its payload before it touches any state (so a
    /// record that does not fit is refused whole).
    pub fn read(&self, payload: &Value) -> Result<Contribution, AggregateError> {
        let Some(pointer) = self.pointer() else {
            return Ok(Contribution::One);
        };
        let value = payload
            .pointer(pointer)
            .ok_or_else(|| AggregateError::Missing(pointer.to_owned()))?;
        if let Aggregation::CountDistinct(_) = self {
            return Ok(Contribution::Value(value.to_string()));
        }
        Num::of(value)
            .map(Contribution::Number)
            .ok_or_else(|| AggregateError::NotANumber {
                pointer: pointer.to_owned(),
                found: shorten(&value.to_string()),
            })
    }

    /// Adds a contribution (from [`Aggregation::read`]) to a state.
    pub fn add(&self, state: AggState, contribution: &Contribution) -> Result<AggState, AggregateError> {
        let pointer = || self.pointer().unwrap_or_default().to_owned();
        Ok(match (state, contribution) {
            (AggState::Count(c), _) => AggState::Count(c.saturating_add(1)),
            (AggState::Sum(s), Contribution::Number(n)) => {
                AggState::Sum(s.add(*n).ok_or_else(|| AggregateError::Overflow(pointer()))?)
            }
            (AggState::Min(m), Contribution::Number(n)) => {
                AggState::Min(Some(m.map_or(*n, |m| if n.less(m) { *n } else { m })))
            }
            (AggState::Max(m), Contribution::Number(n)) => {
                AggState::Max(Some(m.map_or(*n, |m| if m.less(*n) { *n } else { m })))
            }
            (AggState::Distinct(mut d), Contribution::Value(v)) => {
                d.insert(v.clone());
                AggState::Distinct(d)
            }
            (state, _) => state,
        })
    }

    /// Two states of one key as one (session windows that a record joins).
    pub fn merge(&self, a: AggState, b: AggState) -> Result<AggState, AggregateError> {
        let pointer = || self.pointer().unwrap_or_default().to_owned();
        Ok(match (a, b) {
            (AggState::Count(x), AggState::Count(y)) => AggState::Count(x.saturating_add(y)),
            (AggState::Sum(x), AggState::Sum(y)) => {
                AggState::Sum(x.add(y).ok_or_else(|| AggregateError::Overflow(pointer()))?)
            }
            (AggState::Min(x), AggState::Min(y)) => AggState::Min(match (x, y) {
                (Some(x), Some(y)) => Some(if y.less(x) { y } else { x }),
                (x, y) => x.or(y),
            }),
            (AggState::Max(x), AggState::Max(y)) => AggState::Max(match (x, y) {
                (Some(x), Some(y)) => Some(if x.less(y) { y } else { x }),
                (x, y) => x.or(y),
            }),
            (AggState::Distinct(mut x), AggState::Distinct(y)) => {
                x.extend(y);
                AggState::Distinct(x)
            }
            (a, _) => a,
        })
    }
}

/// One record's part in an aggregation.
#[derive(Debug, Clone, PartialEq)]
pub enum Contribution {
    /// Count it.
    One,
    /// A number to sum or compare.
    Number(Num),
    /// A value to count once.
    Value(String),
}

impl AggState {
    /// The result as JSON: a count, a number (null for min/max of nothing), or the number of
    /// distinct values.
    pub fn result(&self) -> Value {
        match self {
            AggState::Count(c) => Value::from(*c),
            AggState::Sum(s) => s.to_json(),
            AggState::Min(m) | AggState::Max(m) => m.map_or(Value::Null, Num::to_json),
            AggState::Distinct(d) => Value::from(d.len() as u64),
        }
    }
}

fn shorten(text: &str) -> String {
    if text.chars().count() <= 40 {
        text.to_owned()
    } else {
        let head: String = text.chars().take(40).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn run(agg: &Aggregation, payloads: &[Value]) -> Result<AggState, AggregateError> {
        let mut state = agg.init();
        for p in payloads {
            let c = agg.read(p)?;
            state = agg.add(state, &c)?;
        }
        Ok(state)
    }

    #[test]
    fn results_of_each_aggregation() {
        let ps = [json!({"n": 3}), json!({"n": -1}), json!({"n": 3})];
        assert_eq!(run(&Aggregation::Count, &ps).expect("ok").result(), json!(3));
        assert_eq!(
            run(&Aggregation::Sum("/n".into()), &ps).expect("ok").result(),
            json!(5)
        );
        assert_eq!(
            run(&Aggregation::Min("/n".into()), &ps).expect("ok").result(),
            json!(-1)
        );
        assert_eq!(
            run(&Aggregation::Max("/n".into()), &ps).expect("ok").result(),
            json!(3)
        );
        assert_eq!(
            run(&Aggregation::CountDistinct("/n".into()), &ps)
                .expect("ok")
                .result(),
            json!(2)
        );
        assert_eq!(
            run(
                &Aggregation::Sum("/n".into()),
                &[json!({"n": 1.5}), json!({"n": 1})]
            )
            .expect("ok")
            .result(),
            json!(2.5)
        );
        assert_eq!(Aggregation::Min("/n".into()).init().result(), Value::Null);
    }

    #[test]
    fn a_record_that_does_not_fit_is_refused_with_its_reason() {
        let sum = Aggregation::Sum("/amount".into());
        assert_eq!(
            sum.read(&json!({"x": 1})),
            Err(AggregateError::Missing("/amount".into()))
        );
        let err = sum.read(&json!({"amount": "12"})).expect_err("a string");
        assert_eq!(err.to_string(), "the payload's /amount is \"12\", not a number");
        let big = sum.add(
            AggState::Sum(Num::Int(i64::MAX)),
            &Contribution::Number(Num::Int(1)),
        );
        assert_eq!(big, Err(AggregateError::Overflow("/amount".into())));
    }

    #[test]
    fn states_survive_their_stored_form() {
        let state = run(
            &Aggregation::CountDistinct("/k".into()),
            &[json!({"k": "a"}), json!({"k": {"x": 1}})],
        )
        .expect("ok");
        let text = serde_json::to_string(&state).expect("serialise");
        assert_eq!(serde_json::from_str::<AggState>(&text).expect("parse"), state);
        let sum = AggState::Sum(Num::Float(2.5));
        let text = serde_json::to_string(&sum).expect("serialise");
        assert_eq!(serde_json::from_str::<AggState>(&text).expect("parse"), sum);
    }

    proptest! {
        /// Splitting the records in two, aggregating each part and merging gives the whole's
        /// aggregate (what a session merge relies on).
        #[test]
        fn merge_of_parts_equals_the_whole(ns in proptest::collection::vec(-1000i64..1000, 0..30), cut in 0usize..30) {
            let cut = cut.min(ns.len());
            let payloads: Vec<Value> = ns.iter().map(|n| json!({"n": n})).collect();
            for agg in [
                Aggregation::Count,
                Aggregation::Sum("/n".into()),
                Aggregation::Min("/n".into()),
                Aggregation::Max("/n".into()),
                Aggregation::CountDistinct("/n".into()),
            ] {
                let whole = run(&agg, &payloads).expect("ok");
                let a = run(&agg, &payloads[..cut]).expect("ok");
                let b = run(&agg, &payloads[cut..]).expect("ok");
                prop_assert_eq!(agg.merge(a, b).expect("ok").result(), whole.result());
            }
        }
    }
}
