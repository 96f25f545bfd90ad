//! The rules of the generalised UPSERT sink: what one record of a results topic does to a
//! table with one row per key. A JSON object value is a row (its fields named after the
//! columns); a null value (a tombstone) deletes the row of the record key; anything else is
//! refused with a reason, to be parked.

use serde_json::{Map, Value};

/// How a row already in the table meets an incoming one for the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The record later in the topic wins (results in their partition's order: a stream job's
    /// updates, or its final results).
    LastWins,
    /// The row with the larger value in this column wins; an equal one replaces it (a repeat).
    LargerWins(String),
}

/// What one record does.
#[derive(Debug, Clone, PartialEq)]
pub enum RowChange {
    /// Insert or update the row: every field of the value, by column name.
    Upsert(Map<String, Value>),
    /// Delete the row with these key column values.
    Delete(Map<String, Value>),
}

/// Judges one record for a table keyed on `key_columns`.
///
/// - A value that is a JSON object upserts; each key column (and the version column of
///   [`Conflict::LargerWins`]) must be a non-null field of it.
/// - No value (a tombstone) deletes by the record key: a JSON object is read by the key
///   columns' names, where `key_fields` renames some of them (column, field of the key: a
///   windowed key's `start` is the row's `window_start`); a scalar key is the one key column's
///   value, when there is one.
/// - Anything else is refused with the reason.
pub fn judge(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    key_columns: &[String],
    key_fields: &[(String, String)],
    conflict: &Conflict,
) -> Result<RowChange, String> {
    let Some(value) = value else {
        return delete_by_key(key, key_columns, key_fields);
    };
    let row = match serde_json::from_slice::<Value>(value) {
        Ok(Value::Object(row)) => row,
        Ok(other) => {
            return Err(format!(
                "the value is JSON {}, not an object of column values",
                kind(&other)
            ))
        }
        Err(e) => return Err(format!("the value is not JSON: {e}")),
    };
    let version = match conflict {
        Conflict::LargerWins(column) => Some(column),
        Conflict::LastWins => None,
    };
    for column in key_columns.iter().chain(version) {
        if row.get(column).is_none_or(Value::is_null) {
            return Err(format!("the value has no {column:?} (a key or version column)"));
        }
    }
    Ok(RowChange::Upsert(row))
}

fn delete_by_key(
    key: Option<&[u8]>,
    key_columns: &[String],
    key_fields: &[(String, String)],
) -> Result<RowChange, String> {
    let Some(key) = key else {
        return Err("a tombstone (no value) without a key: no row to delete".into());
    };
    let key: Value = serde_json::from_slice(key)
        .or_else(|_| std::str::from_utf8(key).map(|s| Value::String(s.to_owned())))
        .map_err(|_| "a tombstone whose key is neither JSON nor UTF-8".to_owned())?;
    let mut row = Map::new();
    match (&key, key_columns) {
        (Value::Object(fields), _) => {
            for column in key_columns {
                let field = key_fields
                    .iter()
                    .find(|(c, _)| c == column)
                    .map_or(column.as_str(), |(_, f)| f.as_str());
                match fields.get(field) {
                    Some(v) if !v.is_null() => row.insert(column.clone(), v.clone()),
                    _ => return Err(format!("a tombstone whose key has no {field:?}")),
                };
            }
        }
        (Value::Null, _) => return Err("a tombstone with a null key".into()),
        (scalar, [one]) => {
            row.insert(one.clone(), scalar.clone());
        }
        (_, _) => {
            return Err(format!(
                "a tombstone with a {} key for {} key columns: the key must be an object",
                kind(&key),
                key_columns.len()
            ))
        }
    }
    Ok(RowChange::Delete(row))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_object_upserts_and_needs_its_key_and_version_columns() {
        let keys = cols(&["key", "window_start"]);
        let value = json!({"key": "P-1", "window_start": 0, "count": 3}).to_string();
        let got = judge(None, Some(value.as_bytes()), &keys, &[], &Conflict::LastWins);
        assert!(matches!(got, Ok(RowChange::Upsert(r)) if r["count"] == 3));
        let larger = Conflict::LargerWins("version".into());
        assert_eq!(
            judge(None, Some(value.as_bytes()), &keys, &[], &larger),
            Err("the value has no \"version\" (a key or version column)".into())
        );
        let no_key = json!({"key": null, "window_start": 0}).to_string();
        assert!(
            judge(None, Some(no_key.as_bytes()), &keys, &[], &Conflict::LastWins)
                .expect_err("null key")
                .contains("\"key\"")
        );
        assert_eq!(
            judge(None, Some(b"[1]"), &keys, &[], &Conflict::LastWins),
            Err("the value is JSON an array, not an object of column values".into())
        );
        assert!(judge(None, Some(b"{"), &keys, &[], &Conflict::LastWins)
            .expect_err("not JSON")
            .starts_with("the value is not JSON"));
    }

    #[test]
    fn a_tombstone_deletes_by_its_key_with_renamed_fields() {
        let keys = cols(&["key", "window_start"]);
        let renames = [("window_start".to_owned(), "start".to_owned())];
        let key = json!({"key": "P-1", "start": 10, "end": 20}).to_string();
        let got = judge(Some(key.as_bytes()), None, &keys, &renames, &Conflict::LastWins);
        assert_eq!(
            got,
            Ok(RowChange::Delete(
                json!({"key": "P-1", "window_start": 10})
                    .as_object()
                    .cloned()
                    .expect("object")
            ))
        );
        // Without the rename the key has no window_start.
        assert!(judge(Some(key.as_bytes()), None, &keys, &[], &Conflict::LastWins).is_err());
        // A scalar key (JSON or plain text) for one key column.
        let one = cols(&["key"]);
        for raw in [&b"\"P-1\""[..], b"P-1"] {
            assert_eq!(
                judge(Some(raw), None, &one, &[], &Conflict::LastWins),
                Ok(RowChange::Delete(
                    json!({"key": "P-1"}).as_object().cloned().expect("object")
                ))
            );
        }
        assert!(judge(Some(b"\"P-1\""), None, &keys, &[], &Conflict::LastWins).is_err());
        assert!(judge(None, None, &keys, &[], &Conflict::LastWins).is_err());
    }
}
