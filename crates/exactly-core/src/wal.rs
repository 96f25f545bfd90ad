//! The pure half of the WAL relay: turning decoded change-stream values into outbox rows, the
//! table-less message format, and the in-order acknowledgement tracker that decides how far the
//! replication slot may be confirmed.
//!
//! Keys: commit LSN in the high 64 bits, the event's ordinal inside its transaction in the low
//! 64 ([`crate::lsn_sequence`]); event LSNs alone repeat for multi-row inserts.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::envelope::Envelope;
use crate::record::{headers_from_json, headers_to_json, RawRow, RowDefect};
use crate::time::UnixMillis;

/// The prefix of `pg_logical_emit_message` events the relay publishes (table-less outbox).
pub const MESSAGE_PREFIX: &str = "exactly";
/// The prefix of the relay's own heartbeat messages, which only advance the slot.
pub const HEARTBEAT_PREFIX: &str = "exactly-heartbeat";

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The type of the outbox's `payload` column: `bytea` as created, or `jsonb`, `json`, `text`
/// or `varchar` where a team keeps JSON or text (the payload is then the text's UTF-8 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PayloadType {
    /// Bytes as they are.
    #[default]
    Bytea,
    /// `jsonb`: pgoutput's binary form is a version byte (1) and the JSON text.
    Jsonb,
    /// `json`, `text`, `varchar`: the text.
    Text,
}

impl PayloadType {
    /// The type for PostgreSQL's `format_type` name, or None for one exactly does not read.
    pub fn from_type_name(name: &str) -> Option<PayloadType> {
        match name {
            "bytea" => Some(PayloadType::Bytea),
            "jsonb" => Some(PayloadType::Jsonb),
            "json" | "text" => Some(PayloadType::Text),
            n if n.starts_with("character varying") => Some(PayloadType::Text),
            _ => None,
        }
    }

    /// The payload bytes of a binary column value, or why it is unreadable.
    pub fn payload(self, raw: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            PayloadType::Bytea | PayloadType::Text => Ok(raw.to_vec()),
            PayloadType::Jsonb => match raw.split_first() {
                Some((1, json)) => Ok(json.to_vec()),
                _ => Err("payload: unknown jsonb version".into()),
            },
        }
    }
}

/// An outbox row's columns as the change stream carries them in pgoutput's binary format
/// (`None` = SQL NULL). Only the columns the relay reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct BinaryOutboxColumns<'a> {
    /// The type of the payload column.
    pub payload_type: PayloadType,
    /// `id` (int8).
    pub id: Option<&'a [u8]>,
    /// `event_id` (uuid).
    pub event_id: Option<&'a [u8]>,
    /// `event_type` (text).
    pub event_type: Option<&'a [u8]>,
    /// `aggregate_type` (text).
    pub aggregate_type: Option<&'a [u8]>,
    /// `aggregate_id` (text).
    pub aggregate_id: Option<&'a [u8]>,
    /// `topic` (text).
    pub topic: Option<&'a [u8]>,
    /// `payload` (bytea).
    pub payload: Option<&'a [u8]>,
    /// `headers` (jsonb).
    pub headers: Option<&'a [u8]>,
    /// `occurred_at` (timestamptz).
    pub occurred_at: Option<&'a [u8]>,
    /// `created_at` (timestamptz), used when occurred_at is NULL.
    pub created_at: Option<&'a [u8]>,
}

/// Decodes a PostgreSQL binary `timestamptz` to Unix milliseconds.
pub fn timestamptz_millis(bytes: &[u8]) -> Option<UnixMillis> {
    let micros = i64::from_be_bytes(bytes.try_into().ok()?);
    Some(UnixMillis(
        micros.checked_add(PG_EPOCH_OFFSET_MICROS)?.div_euclid(1000),
    ))
}

impl BinaryOutboxColumns<'_> {
    /// The row as the relay validates it. Wrong-sized values become values that fail validation
    /// with a named defect (never a panic): a UUID of the wrong size is an invalid event id.
    pub fn to_raw_row(&self) -> RawRow {
        let text = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
        let event_id = self.event_id.map(|b| match <[u8; 16]>::try_from(b) {
            Ok(bytes) => Uuid::from_bytes(bytes).hyphenated().to_string(),
            Err(_) => format!("<{} bytes>", b.len()),
        });
        // jsonb's binary form is a version byte (1) and the JSON text.
        let headers_json = self.headers.map(|b| match b.split_first() {
            Some((1, json)) => String::from_utf8_lossy(json).into_owned(),
            _ => "<unknown jsonb version>".to_owned(),
        });
        let occurred_at = self
            .occurred_at
            .and_then(timestamptz_millis)
            .or_else(|| self.created_at.and_then(timestamptz_millis))
            .unwrap_or(UnixMillis(0));
        let payload = self.payload.map(|raw| self.payload_type.payload(raw)).transpose();
        RawRow {
            id: self
                .id
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0),
            event_id,
            event_type: text(self.event_type),
            aggregate_type: text(self.aggregate_type),
            aggregate_id: text(self.aggregate_id),
            topic: text(self.topic),
            payload: payload.as_ref().ok().cloned().flatten(),
            headers_json,
            occurred_at,
            retry_count: 0,
            sequence: None,
            unreadable: payload.err(),
        }
    }
}

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// The JSON a writer passes to `pg_logical_emit_message(true, 'exactly', …)` for the
/// table-less outbox. The payload goes in `payload` as text when it is UTF-8, else in
/// `payload_base64` (standard alphabet, padded), so binary payloads arrive byte for byte.
pub fn encode_message_event(topic: &str, envelope: &Envelope) -> String {
    let (field, payload) = match std::str::from_utf8(&envelope.payload) {
        Ok(text) => ("payload", text.to_owned()),
        Err(_) => ("payload_base64", BASE64.encode(&envelope.payload)),
    };
    let mut message = serde_json::json!({
        "topic": topic,
        "event_id": envelope.event_id.hyphenated().to_string(),
        "event_type": envelope.event_type,
        "aggregate_type": envelope.aggregate_type,
        "aggregate_id": envelope.aggregate_id,
        "occurred_at": envelope.occurred_at.0,
        "headers": serde_json::from_str::<serde_json::Value>(&headers_to_json(&envelope.headers))
            .unwrap_or(serde_json::Value::Null),
    });
    message[field] = serde_json::Value::String(payload);
    message.to_string()
}

/// Bytes kept as text for an operator (dead events): as they are when UTF-8, else `base64:`
/// and their base64, so nothing is lost to a lossy conversion.
pub fn raw_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("base64:{}", BASE64.encode(bytes)),
    }
}

/// Reads a table-less outbox message; anything but the documented JSON object is a defect.
pub fn decode_message_event(content: &[u8]) -> Result<RawRow, RowDefect> {
    let bad = |why: String| RowDefect::BadMessage(why);
    let value: serde_json::Value = serde_json::from_slice(content).map_err(|e| bad(e.to_string()))?;
    let object = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let text = |name: &str| -> Result<Option<String>, RowDefect> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("{name} is not a string"))),
        }
    };
    let occurred_at = match object.get("occurred_at") {
        Some(v) => v
            .as_i64()
            .map(UnixMillis)
            .ok_or_else(|| bad("occurred_at is not integer milliseconds".into()))?,
        None => return Err(RowDefect::MissingColumn("occurred_at")),
    };
    let headers_json = match object.get("headers") {
        None | Some(serde_json::Value::Null) => None,
        Some(h) => {
            let text = h.to_string();
            headers_from_json(&text)?;
            Some(text)
        }
    };
    Ok(RawRow {
        id: 0,
        event_id: text("event_id")?,
        event_type: text("event_type")?,
        aggregate_type: text("aggregate_type")?,
        aggregate_id: text("aggregate_id")?,
        topic: text("topic")?,
        payload: match (text("payload")?, text("payload_base64")?) {
            (Some(_), Some(_)) => return Err(bad("both payload and payload_base64 are set".into())),
            (Some(text), None) => Some(text.into_bytes()),
            (None, Some(encoded)) => Some(
                BASE64
                    .decode(encoded.as_bytes())
                    .map_err(|e| bad(format!("payload_base64 is not base64: {e}")))?,
            ),
            (None, None) => None,
        },
        headers_json,
        occurred_at,
        retry_count: 0,
        sequence: None,
        unreadable: None,
    })
}

/// Tracks source transactions from publish to acknowledgement, in commit order, and answers the
/// one question the slot needs: up to which commit end position has every record been
/// acknowledged? A transaction is confirmable only when it and every earlier one are complete,
/// so the slot never moves past a record the broker has not taken.
#[derive(Debug, Default)]
pub struct CommitTracker {
    open: Option<TxnId>,
    outstanding: u64,
    pending: VecDeque<PendingTxn>,
    first_id: u64,
    next_id: u64,
}

/// A transaction's handle in the tracker; records carry it to their acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxnId(pub u64);

#[derive(Debug)]
struct PendingTxn {
    end_position: Option<u64>,
    outstanding: u64,
    events: u64,
    committed_at: UnixMillis,
}

/// Transactions that became confirmable together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    /// The commit end position of the last one: the slot may be confirmed up to here.
    pub end_position: u64,
    /// How many transactions.
    pub transactions: u64,
    /// How many events they held.
    pub events: u64,
}

/// A tracker call out of order (a bug in the caller, reported instead of panicking).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("commit tracker: {0}")]
pub struct TrackerError(&'static str);

impl CommitTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        CommitTracker::default()
    }

    /// A source transaction begins.
    pub fn begin(&mut self, committed_at: UnixMillis) -> Result<TxnId, TrackerError> {
        if self.open.is_some() {
            return Err(TrackerError("begin inside an open transaction"));
        }
        let id = TxnId(self.next_id);
        self.next_id += 1;
        self.pending.push_back(PendingTxn {
            end_position: None,
            outstanding: 0,
            events: 0,
            committed_at,
        });
        self.open = Some(id);
        Ok(id)
    }

    /// A record of the open transaction was handed to the producer.
    pub fn sent(&mut self) -> Result<TxnId, TrackerError> {
        let id = self.open.ok_or(TrackerError("record outside a transaction"))?;
        let txn = self.get_mut(id)?;
        txn.outstanding += 1;
        txn.events += 1;
        self.outstanding += 1;
        Ok(id)
    }

    /// An event of the open transaction was settled without the producer (parked as dead).
    pub fn settled_inline(&mut self) -> Result<(), TrackerError> {
        let id = self.open.ok_or(TrackerError("record outside a transaction"))?;
        self.get_mut(id)?.events += 1;
        Ok(())
    }

    /// The open transaction committed at `end_position`.
    pub fn commit(&mut self, end_position: u64) -> Result<(), TrackerError> {
        let id = self.open.take().ok_or(TrackerError("commit without begin"))?;
        self.get_mut(id)?.end_position = Some(end_position);
        Ok(())
    }

    /// The broker acknowledged one record of `id`.
    pub fn acked(&mut self, id: TxnId) -> Result<(), TrackerError> {
        let txn = self.get_mut(id)?;
        txn.outstanding = txn
            .outstanding
            .checked_sub(1)
            .ok_or(TrackerError("more acks than records"))?;
        self.outstanding -= 1;
        Ok(())
    }

    /// Pops every leading transaction that is committed and fully acknowledged.
    pub fn take_confirmed(&mut self) -> Option<Confirmed> {
        let mut confirmed: Option<Confirmed> = None;
        while let Some(front) = self.pending.front() {
            let (Some(end), 0) = (front.end_position, front.outstanding) else {
                break;
            };
            let events = front.events;
            self.pending.pop_front();
            self.first_id += 1;
            let c = confirmed.get_or_insert(Confirmed {
                end_position: end,
                transactions: 0,
                events: 0,
            });
            c.end_position = end;
            c.transactions += 1;
            c.events += events;
        }
        confirmed
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Transactions not yet confirmable.
    pub fn pending_transactions(&self) -> usize {
        self.pending.len()
    }

    /// Commit time of the oldest transaction not yet confirmable (for relay lag).
    pub fn oldest_pending_commit(&self) -> Option<UnixMillis> {
        self.pending.front().map(|t| t.committed_at)
    }

    fn get_mut(&mut self, id: TxnId) -> Result<&mut PendingTxn, TrackerError> {
        let index =
            id.0.checked_sub(self.first_id)
                .ok_or(TrackerError("transaction already confirmed"))?;
        usize::try_from(index)
            .ok()
            .and_then(|i| self.pending.get_mut(i))
            .ok_or(TrackerError("unknown transaction"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binary_columns_decode_and_bad_sizes_become_defects() {
        let uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        // 2026-01-01T00:00:00Z in PostgreSQL microseconds.
        let ts = (1_767_225_600_000_000i64 - PG_EPOCH_OFFSET_MICROS).to_be_bytes();
        let id = 7i64.to_be_bytes();
        let headers = b"\x01{\"trace\": \"t\"}";
        let columns = BinaryOutboxColumns {
            payload_type: PayloadType::Bytea,
            id: Some(&id),
            event_id: Some(uuid.as_bytes()),
            event_type: Some(b"Liked"),
            aggregate_type: Some(b"product"),
            aggregate_id: Some(b"P-1"),
            topic: Some(b"t"),
            payload: Some(b"{}"),
            headers: Some(headers),
            occurred_at: None,
            created_at: Some(&ts),
        };
        // A jsonb payload column arrives with its version byte, which is not the payload's.
        let jsonb = BinaryOutboxColumns {
            payload_type: PayloadType::Jsonb,
            payload: Some(b"\x01{}"),
            ..columns
        };
        assert_eq!(jsonb.to_raw_row().payload.as_deref(), Some(&b"{}"[..]));
        let unknown = BinaryOutboxColumns {
            payload_type: PayloadType::Jsonb,
            payload: Some(b"\x02{}"),
            ..columns
        };
        assert!(unknown
            .to_raw_row()
            .unreadable
            .is_some_and(|r| r.contains("jsonb")));
        let row = columns.to_raw_row();
        assert_eq!(row.id, 7);
        assert_eq!(row.occurred_at, UnixMillis(1_767_225_600_000));
        let record = RawRow {
            sequence: Some(1),
            ..row
        }
        .into_record(&crate::KeyMode::Sequence { source: "s".into() }, 1000)
        .expect("valid");
        assert_eq!(record.envelope.event_id, uuid);
        assert_eq!(record.envelope.headers, vec![("trace".into(), b"t".to_vec())]);

        let short = BinaryOutboxColumns {
            event_id: Some(&[1, 2, 3]),
            ..columns
        };
        let err = short
            .to_raw_row()
            .into_record(&crate::KeyMode::EventId, 1000)
            .expect_err("bad uuid");
        assert!(err.to_string().contains("not a UUID"), "{err}");
    }

    #[test]
    fn messages_round_trip_and_garbage_is_a_defect() {
        let envelope = Envelope {
            event_id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002),
            event_type: "Liked".into(),
            aggregate_type: "product".into(),
            aggregate_id: "P-2".into(),
            occurred_at: UnixMillis(42),
            payload: br#"{"n":1}"#.to_vec(),
            headers: vec![("trace".into(), b"x".to_vec())],
        };
        let text = encode_message_event("topic-a", &envelope);
        let record = RawRow {
            sequence: Some(3),
            ..decode_message_event(text.as_bytes()).expect("decodes")
        }
        .into_record(&crate::KeyMode::Sequence { source: "s".into() }, 1000)
        .expect("valid");
        assert_eq!(record.envelope, envelope);
        assert_eq!(record.topic, "topic-a");
        for garbage in [
            &b"not json"[..],
            b"[]",
            b"{\"occurred_at\": \"soon\"}",
            b"\xff\xfe",
        ] {
            assert!(decode_message_event(garbage).is_err());
        }
    }

    #[test]
    fn binary_message_payloads_arrive_byte_for_byte() {
        let payload: Vec<u8> = vec![0, 0xff, 0xfe, b'{', 0x80, 7];
        let envelope = Envelope {
            event_id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0003),
            event_type: "Blob".into(),
            aggregate_type: "file".into(),
            aggregate_id: "F-1".into(),
            occurred_at: UnixMillis(42),
            payload: payload.clone(),
            headers: vec![],
        };
        let text = encode_message_event("files", &envelope);
        assert!(text.contains("payload_base64"), "{text}");
        let row = decode_message_event(text.as_bytes()).expect("decodes");
        assert_eq!(row.payload, Some(payload));
        let both = r#"{"occurred_at":1,"payload":"a","payload_base64":"YQ=="}"#;
        assert!(decode_message_event(both.as_bytes()).is_err());
        let not_base64 = r#"{"occurred_at":1,"payload_base64":"%%%"}"#;
        assert!(decode_message_event(not_base64.as_bytes()).is_err());
        assert_eq!(raw_text(b"plain"), "plain");
        assert_eq!(raw_text(&[0xff]), "base64:/w==");
    }

    #[test]
    fn tracker_rejects_calls_out_of_order() {
        let mut t = CommitTracker::new();
        assert!(t.sent().is_err());
        assert!(t.commit(1).is_err());
        let id = t.begin(UnixMillis(0)).expect("begin");
        assert!(t.begin(UnixMillis(0)).is_err());
        assert!(t.acked(id).is_err());
    }

    proptest! {
        /// Whatever order acks arrive in, the confirmed position never passes a transaction
        /// with an unacknowledged record, never goes backwards, and reaches the last commit
        /// once everything is acknowledged.
        #[test]
        fn confirmed_position_never_passes_an_unacknowledged_record(
            sizes in proptest::collection::vec(0u64..5, 1..40),
            order in proptest::collection::vec(any::<u64>(), 0..200),
        ) {
            let mut tracker = CommitTracker::new();
            let mut records: Vec<(TxnId, usize)> = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let id = tracker.begin(UnixMillis(0)).expect("begin");
                for _ in 0..*size {
                    prop_assert_eq!(tracker.sent().expect("sent"), id);
                    records.push((id, i));
                }
                tracker.commit((i as u64 + 1) * 100).expect("commit");
            }
            // Ack in a shuffled order driven by `order`.
            let mut unacked = records.clone();
            let mut confirmed_end = 0u64;
            let mut step = 0;
            while !unacked.is_empty() {
                let pick = order.get(step).copied().unwrap_or(0) as usize % unacked.len();
                step += 1;
                let (id, _) = unacked.swap_remove(pick);
                tracker.acked(id).expect("ack");
                if let Some(c) = tracker.take_confirmed() {
                    prop_assert!(c.end_position > confirmed_end);
                    confirmed_end = c.end_position;
                }
                let lowest_unacked = unacked.iter().map(|(_, i)| *i).min();
                if let Some(txn) = lowest_unacked {
                    prop_assert!(confirmed_end < (txn as u64 + 1) * 100);
                }
            }
            if let Some(c) = tracker.take_confirmed() {
                confirmed_end = c.end_position;
            }
            prop_assert_eq!(confirmed_end, sizes.len() as u64 * 100);
            prop_assert_eq!(tracker.pending_transactions(), 0);
            prop_assert_eq!(tracker.outstanding(), 0);
        }
    }
}
