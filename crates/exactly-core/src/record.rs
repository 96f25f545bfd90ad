//! Turning raw outbox rows into records, and the persisted form of headers.
//!
//! Writers in any language insert rows with plain SQL, so a row may be malformed; the relay
//! must not crash on one. [`RawRow::into_record`] names the defect, and the relay marks the row
//! DEAD with that reason.

use uuid::Uuid;

use crate::envelope::{Envelope, HeaderError};
use crate::key::IdempotencyKey;
use crate::time::UnixMillis;

/// Default largest payload a relay publishes (Kafka's default message.max.bytes is about 1 MB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 900 * 1024;

/// An outbox row as read, before any checks. Every column a writer supplies is optional here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRow {
    /// Primary key.
    pub id: i64,
    /// event_id column as text.
    pub event_id: Option<String>,
    /// event_type column.
    pub event_type: Option<String>,
    /// aggregate_type column.
    pub aggregate_type: Option<String>,
    /// aggregate_id column.
    pub aggregate_id: Option<String>,
    /// topic column.
    pub topic: Option<String>,
    /// payload column.
    pub payload: Option<Vec<u8>>,
    /// headers column: a JSON object of string values, or NULL.
    pub headers_json: Option<String>,
    /// occurred_at in Unix ms (created_at when the writer gave none).
    pub occurred_at: UnixMillis,
    /// Failures so far.
    pub retry_count: u32,
    /// Sequence assigned at claim time, in sequence-key mode.
    pub sequence: Option<u128>,
    /// Set by the adapter when a column could not be read as its type (a BLOB where text
    /// belongs, text that is not UTF-8, a timestamp of `infinity`): the row is DEAD with this
    /// reason instead of failing the claim for every row behind it.
    pub unreadable: Option<String>,
}

/// A row ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Primary key.
    pub id: i64,
    /// Destination topic.
    pub topic: String,
    /// The dedupe key the record carries.
    pub key: IdempotencyKey,
    /// The event.
    pub envelope: Envelope,
    /// Failures so far.
    pub retry_count: u32,
}

/// Why a row can never be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RowDefect {
    /// A required column is NULL or empty.
    #[error("column {0} is NULL or empty")]
    MissingColumn(&'static str),
    /// event_id is not a UUID.
    #[error("event_id {0:?} is not a UUID")]
    BadEventId(String),
    /// headers is not a JSON object of strings.
    #[error("headers column is not a JSON object of string values: {0}")]
    BadHeaders(String),
    /// Envelope rules (aggregate id size, reserved header names).
    #[error(transparent)]
    Envelope(#[from] HeaderError),
    /// A column could not be read as its type.
    #[error("unreadable row: {0}")]
    Unreadable(String),
    /// A table-less outbox message that is not the documented JSON object.
    #[error("outbox message is not valid: {0}")]
    BadMessage(String),
    /// Payload larger than the relay publishes.
    #[error("payload is {size} bytes, above the maximum of {max}")]
    PayloadTooLarge {
        /// Its size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// How the record key is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMode {
    /// The event id itself (v7 by default, v4 if the writer chose one).
    EventId,
    /// The row's claim-time sequence in this source.
    Sequence {
        /// The source name put in every key.
        source: String,
    },
}

impl RawRow {
    /// Validates the row and derives its key.
    pub fn into_record(self, keys: &KeyMode, max_payload: usize) -> Result<OutboxRecord, RowDefect> {
        self.into_record_or_back(keys, max_payload)
            .map_err(|(defect, _)| defect)
    }

    /// [`RawRow::into_record`], handing a refused row back whole with its defect (the WAL
    /// relay records it as it came; checking first spares every good row a copy).
    pub fn into_record_or_back(
        self,
        keys: &KeyMode,
        max_payload: usize,
    ) -> Result<OutboxRecord, (RowDefect, Box<RawRow>)> {
        let (event_id, headers, key) = match self.check(keys, max_payload) {
            Ok(checked) => checked,
            Err(defect) => return Err((defect, Box::new(self))),
        };
        // Checked: every column below is present and valid.
        let text = |value: Option<String>| value.unwrap_or_default();
        Ok(OutboxRecord {
            id: self.id,
            topic: text(self.topic),
            key,
            envelope: Envelope {
                event_id,
                event_type: text(self.event_type),
                aggregate_type: text(self.aggregate_type),
                aggregate_id: text(self.aggregate_id),
                occurred_at: self.occurred_at,
                payload: self.payload.unwrap_or_default(),
                headers,
            },
            retry_count: self.retry_count,
        })
    }

    /// Everything [`RawRow::into_record`] refuses, found without taking the row apart: the
    /// parsed event id, the application headers and the key.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        keys: &KeyMode,
        max_payload: usize,
    ) -> Result<(Uuid, Vec<(String, Vec<u8>)>, IdempotencyKey), RowDefect> {
        if let Some(why) = &self.unreadable {
            return Err(RowDefect::Unreadable(why.clone()));
        }
        let required = |value: &Option<String>, column: &'static str| -> Result<(), RowDefect> {
            match value {
                Some(v) if !v.is_empty() => Ok(()),
                _ => Err(RowDefect::MissingColumn(column)),
            }
        };
        required(&self.event_id, "event_id")?;
        let event_id_text = self.event_id.as_deref().unwrap_or_default();
        let event_id =
            Uuid::try_parse(event_id_text).map_err(|_| RowDefect::BadEventId(event_id_text.to_owned()))?;
        let payload = self.payload.as_ref().ok_or(RowDefect::MissingColumn("payload"))?;
        if payload.len() > max_payload {
            return Err(RowDefect::PayloadTooLarge {
                size: payload.len(),
                max: max_payload,
            });
        }
        let headers = match self.headers_json.as_deref() {
            None | Some("") => Vec::new(),
            Some(text) => headers_from_json(text)?,
        };
        required(&self.event_type, "event_type")?;
        required(&self.aggregate_type, "aggregate_type")?;
        required(&self.aggregate_id, "aggregate_id")?;
        crate::envelope::validate_parts(
            self.aggregate_id.as_deref().unwrap_or_default(),
            self.event_type.as_deref().unwrap_or_default(),
            self.aggregate_type.as_deref().unwrap_or_default(),
            &headers,
        )?;
        let key = match keys {
            KeyMode::EventId => match event_id.get_version_num() {
                7 => IdempotencyKey::UuidV7(event_id),
                // Any other UUID is treated as random: it needs the key set.
                _ => IdempotencyKey::UuidV4(event_id),
            },
            KeyMode::Sequence { source } => IdempotencyKey::Sequence {
                source: source.clone(),
                value: self.sequence.ok_or(RowDefect::MissingColumn("sequence"))?,
            },
        };
        required(&self.topic, "topic")?;
        Ok((event_id, headers, key))
    }
}

/// Reads the outbox's headers column.
pub fn headers_from_json(text: &str) -> Result<Vec<(String, Vec<u8>)>, RowDefect> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RowDefect::BadHeaders(e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| RowDefect::BadHeaders("not an object".into()))?;
    object
        .iter()
        .map(|(name, v)| match v.as_str() {
            Some(s) => Ok((name.clone(), s.as_bytes().to_vec())),
            None => Err(RowDefect::BadHeaders(format!(
                "value of {name:?} is not a string"
            ))),
        })
        .collect()
}

/// Writes headers for the outbox's headers column (values must be UTF-8 there).
pub fn headers_to_json(headers: &[(String, Vec<u8>)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// Headers as a parking lot keeps them: every byte, names and values in hex-free JSON
/// (`[[name, [bytes...] | null], ...]`), so what arrived can be replayed exactly.
pub fn raw_headers_to_json(headers: &[(String, Option<Vec<u8>>)]) -> String {
    serde_json::Value::Array(
        headers
            .iter()
            .map(|(n, v)| {
                serde_json::json!([
                    n,
                    v.as_ref()
                        .map(|b| b.iter().map(|x| u64::from(*x)).collect::<Vec<_>>())
                ])
            })
            .collect(),
    )
    .to_string()
}

/// Headers as a record carries them: a name and perhaps a value, in order.
pub type RawHeaders = Vec<(String, Option<Vec<u8>>)>;

/// Reads headers back from the parking lot's form ([`raw_headers_to_json`]).
pub fn raw_headers_from_json(text: &str) -> Result<RawHeaders, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("parked headers are not JSON: {e}"))?;
    let entries = value
        .as_array()
        .ok_or_else(|| "parked headers are not a list".to_owned())?;
    entries
        .iter()
        .map(|entry| {
            let pair = entry.as_array().filter(|p| p.len() == 2);
            let (name, bytes) = match pair {
                Some(p) => (p[0].as_str(), &p[1]),
                None => return Err(format!("parked header {entry} is not [name, bytes]")),
            };
            let name = name.ok_or_else(|| format!("parked header {entry} has no name"))?;
            let value = match bytes {
                serde_json::Value::Null => None,
                serde_json::Value::Array(items) => Some(
                    items
                        .iter()
                        .map(|b| {
                            b.as_u64().and_then(|b| u8::try_from(b).ok()).ok_or_else(|| {
                                format!("parked header {name:?} has a value that is not a byte")
                            })
                        })
                        .collect::<Result<Vec<u8>, String>>()?,
                ),
                _ => return Err(format!("parked header {name:?} is not bytes")),
            };
            Ok((name.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_headers_round_trip_every_byte() {
        let headers = vec![
            ("exactly-key".to_owned(), Some(b"k".to_vec())),
            ("empty".to_owned(), None),
            ("binary".to_owned(), Some(vec![0, 255, 10])),
        ];
        assert_eq!(raw_headers_from_json(&raw_headers_to_json(&headers)), Ok(headers));
        assert!(raw_headers_from_json("{}").is_err());
        assert!(raw_headers_from_json("[[\"a\", [256]]]").is_err());
    }

    fn good() -> RawRow {
        RawRow {
            id: 1,
            event_id: Some("01900000-0000-7000-8000-000000000001".into()),
            event_type: Some("ProductLiked".into()),
            aggregate_type: Some("product".into()),
            aggregate_id: Some("P-1".into()),
            topic: Some("product-events".into()),
            payload: Some(b"{}".to_vec()),
            headers_json: Some(r#"{"trace":"t-1"}"#.into()),
            occurred_at: UnixMillis(5),
            retry_count: 0,
            sequence: Some(9),
            unreadable: None,
        }
    }

    #[test]
    fn keys_follow_the_mode() {
        let record = good().into_record(&KeyMode::EventId, 100).expect("valid");
        assert!(matches!(record.key, IdempotencyKey::UuidV7(_)));
        assert_eq!(
            record.envelope.headers,
            vec![("trace".to_owned(), b"t-1".to_vec())]
        );
        let seq = good()
            .into_record(&KeyMode::Sequence { source: "s".into() }, 100)
            .expect("valid");
        assert_eq!(
            seq.key,
            IdempotencyKey::Sequence {
                source: "s".into(),
                value: 9
            }
        );
    }

    #[test]
    fn defects_are_named() {
        let cases: Vec<(RawRow, &str)> = vec![
            (
                RawRow {
                    aggregate_id: None,
                    ..good()
                },
                "aggregate_id is NULL",
            ),
            (
                RawRow {
                    aggregate_id: Some("x".repeat(513)),
                    ..good()
                },
                "more than 512",
            ),
            (
                RawRow {
                    event_id: Some("nope".into()),
                    ..good()
                },
                "not a UUID",
            ),
            (
                RawRow {
                    headers_json: Some("{bad".into()),
                    ..good()
                },
                "headers column",
            ),
            (
                RawRow {
                    headers_json: Some(r#"{"a":1}"#.into()),
                    ..good()
                },
                "not a string",
            ),
            (
                RawRow {
                    headers_json: Some(r#"{"exactly-key":"x"}"#.into()),
                    ..good()
                },
                "reserved",
            ),
            (
                RawRow {
                    payload: Some(vec![0; 101]),
                    ..good()
                },
                "above the maximum",
            ),
            (
                RawRow {
                    topic: None,
                    ..good()
                },
                "topic",
            ),
        ];
        for (row, expect) in cases {
            let err = row.into_record(&KeyMode::EventId, 100).expect_err(expect);
            assert!(err.to_string().contains(expect), "{err} lacks {expect:?}");
        }
    }

    #[test]
    fn parked_header_form_is_pinned() {
        let text = raw_headers_to_json(&[("a".into(), Some(vec![0xff, 1])), ("b".into(), None)]);
        assert_eq!(text, r#"[["a",[255,1]],["b",null]]"#);
    }
}
