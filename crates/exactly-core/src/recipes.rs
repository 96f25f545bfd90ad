//! The rules of the two handler kinds of the outbox design, which the adapters' handler
//! builders (`LatestState`, `Aggregate`) apply inside the consumer's transaction:
//!
//! - **State sync**: the newest event time wins. An event older than (or as old as) the stored
//!   state changes nothing, so deliveries out of order or repeated converge on the newest.
//! - **Aggregation**: apply a delta, never below zero; a delta that would go below zero is
//!   parked (the default) or clamped at zero, by choice.

/// What an aggregate does with a delta that would take it below zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BelowZero {
    /// Refuse the event: the consumer parks it with the reason.
    #[default]
    Park,
    /// Stop at zero.
    Clamp,
}

/// Whether an event at `incoming` replaces state stored at `stored` (None: nothing stored).
pub fn newer(stored: Option<i64>, incoming: i64) -> bool {
    stored.is_none_or(|at| incoming > at)
}

/// `current + delta` under `below_zero`, or why the event is refused (below zero when parking,
/// or an overflow).
pub fn apply_delta(current: i64, delta: i64, below_zero: BelowZero) -> Result<i64, String> {
    let total = current
        .checked_add(delta)
        .ok_or_else(|| format!("{current} + {delta} overflows"))?;
    match (total < 0, below_zero) {
        (false, _) => Ok(total),
        (true, BelowZero::Clamp) => Ok(0),
        (true, BelowZero::Park) => Err(format!("{current} {delta:+} would go below zero")),
    }
}

/// The integer at `field` of a JSON object payload, or why there is none.
pub fn delta_of(payload: &[u8], field: &str) -> Result<i64, String> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    value
        .get(field)
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| format!("payload has no integer {field:?}"))
}

/// `name` quoted as a SQL identifier, if it is a plain one (letters, digits, `_`, `$`, not
/// starting with a digit, at most 63 bytes); `schema.table` is quoted part by part.
pub fn quoted_identifier(name: &str) -> Option<String> {
    let part = |p: &str| {
        let mut chars = p.chars();
        let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
            && p.len() <= 63;
        plain.then(|| format!("\"{p}\""))
    };
    match name.split('.').collect::<Vec<_>>().as_slice() {
        [one] => part(one),
        [schema, table] => Some(format!("{}.{}", part(schema)?, part(table)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any order of any deliveries, repeats included, leaves the newest event's state.
        #[test]
        fn the_newest_wins_in_any_order(times in proptest::collection::vec(0i64..50, 1..30), seed in any::<u64>()) {
            let mut order: Vec<usize> = (0..times.len()).chain(0..times.len() / 2).collect();
            // A cheap deterministic shuffle.
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut stored: Option<i64> = None;
            for i in order {
                if newer(stored, times[i]) {
                    stored = Some(times[i]);
                }
            }
            prop_assert_eq!(stored, times.iter().copied().max());
        }

        /// An aggregate never goes below zero; clamping gives the running sum floored at zero
        /// after each step, parking refuses exactly the deltas that would go below it.
        #[test]
        fn an_aggregate_never_goes_below_zero(deltas in proptest::collection::vec(-20i64..20, 0..40)) {
            let (mut parked_total, mut clamped_total) = (0i64, 0i64);
            for d in &deltas {
                match apply_delta(parked_total, *d, BelowZero::Park) {
                    Ok(t) => { prop_assert!(t >= 0); prop_assert_eq!(t, parked_total + d); parked_total = t; }
                    Err(_) => prop_assert!(parked_total + d < 0),
                }
                clamped_total = apply_delta(clamped_total, *d, BelowZero::Clamp).expect("clamp never refuses");
                prop_assert!(clamped_total >= 0);
            }
        }
    }

    #[test]
    fn deltas_and_identifiers() {
        assert_eq!(delta_of(br#"{"qty": -3}"#, "qty"), Ok(-3));
        assert!(delta_of(br#"{"qty": "3"}"#, "qty").is_err());
        assert!(apply_delta(i64::MAX, 1, BelowZero::Clamp).is_err());
        assert_eq!(
            quoted_identifier("public.stock").as_deref(),
            Some("\"public\".\"stock\"")
        );
        assert_eq!(quoted_identifier("stock; DROP TABLE x"), None);
        assert_eq!(quoted_identifier("a.b.c"), None);
        assert_eq!(quoted_identifier("1st"), None);
    }
}
