//! What operators select and see: dead outbox events, parked consumer messages, and the
//! rules for putting them back. The adapters run the SQL; the binary prints.

use crate::envelope::{decode_record, Delivery, HeaderError};
use crate::time::UnixMillis;

/// Which rows an operator command touches. Every filter given must match; no filter at all
/// selects every row (the binary asks for confirmation before touching more than one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// These ids only (the `id` column `list` prints).
    pub ids: Vec<String>,
    /// Topic, exactly.
    pub topic: Option<String>,
    /// Aggregate id, exactly (dead outbox rows).
    pub aggregate: Option<String>,
    /// Idempotency key text, exactly (parked messages).
    pub key: Option<String>,
    /// Words the reason contains (case-sensitive).
    pub reason: Option<String>,
    /// Dead or parked before this instant.
    pub before: Option<UnixMillis>,
}

impl Selection {
    /// The reason filter as a SQL `LIKE` pattern: `%` and `_` in the words match themselves
    /// (escaped with `\`).
    pub fn reason_pattern(&self) -> Option<String> {
        self.reason.as_ref().map(|words| {
            let mut pattern = String::from("%");
            for c in words.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    pattern.push('\\');
                }
                pattern.push(c);
            }
            pattern.push('%');
            pattern
        })
    }

    /// The numeric ids among [`Selection::ids`]; an id that is not a number matches no row of
    /// a table keyed by numbers, so it is an error the operator sees.
    pub fn numeric_ids(&self) -> Result<Vec<i64>, String> {
        self.ids
            .iter()
            .map(|id| {
                id.parse::<i64>()
                    .map_err(|_| format!("{id:?} is not a row id (a number, as `list` prints it)"))
            })
            .collect()
    }
}

/// Where a dead event was set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// An outbox row the polling relay marked DEAD.
    Outbox,
    /// An outbox event the WAL relay could not publish (`exactly_relay_dead`).
    Wal,
}

impl DeadKind {
    /// The word `list` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::Outbox => "outbox",
            DeadKind::Wal => "wal",
        }
    }
}

/// A dead event as `exactly dead list|show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadEvent {
    /// Outbox row id (outbox), or the event's key (wal).
    pub id: String,
    /// Which relay set it aside.
    pub kind: DeadKind,
    /// The outbox row it came from (0: none could be read).
    pub outbox_id: i64,
    /// Topic, when the row had one.
    pub topic: Option<String>,
    /// Aggregate id, when the row had one.
    pub aggregate: Option<String>,
    /// Why.
    pub reason: String,
    /// When it was set aside (outbox: when the row was written).
    pub at: UnixMillis,
    /// The payload as text (outbox) or the event as the WAL carried it (wal).
    pub body: String,
}

/// A parked consumer message as `exactly parked list|show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRow {
    /// Row id.
    pub id: i64,
    /// The consumer (group) that parked it.
    pub consumer: String,
    /// Where it was read.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Reason code ([`crate::ParkReason::as_str`]).
    pub reason: String,
    /// The error in words.
    pub detail: String,
    /// The idempotency key, when readable.
    pub key_text: Option<String>,
    /// Headers as received (the parking lot's JSON form).
    pub headers_json: String,
    /// The value as received.
    pub payload: Option<Vec<u8>>,
    /// When parked.
    pub parked_at: UnixMillis,
}

impl ParkedRow {
    /// The message as the consumer would have decoded it, for a replay; an error when it
    /// never had readable headers (such a message cannot be replayed, only discarded).
    pub fn delivery(&self) -> Result<Delivery, String> {
        let headers = crate::record::raw_headers_from_json(&self.headers_json)?;
        decode_record(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())),
            self.payload.as_deref().unwrap_or_default(),
        )
        .map_err(|e: HeaderError| format!("its headers cannot be read: {e}"))
    }
}

/// What a replay of one parked message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The handler applied it; its key is recorded and the parked row gone, in one transaction.
    Applied,
    /// Its key was applied already: nothing applied, the parked row removed.
    AlreadyApplied,
    /// The handler failed again; nothing changed, the message stays parked.
    HandlerFailed(String),
    /// It cannot be replayed (no readable key); discard it after a look.
    Unreplayable(String),
    /// No parked row of this consumer has this id (replayed or discarded already).
    NotFound,
}

/// A consumer's dedupe state and parking lot, as `exactly status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerState {
    /// The consumer (group) name its rows carry.
    pub consumer: String,
    /// Entries in its key set.
    pub keys: u64,
    /// Watermarks (one per source, topic and partition).
    pub watermarks: u64,
    /// Parked messages by reason code.
    pub parked: std::collections::BTreeMap<String, u64>,
}

/// A logical replication slot, as `exactly status` shows it (PostgreSQL).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotState {
    /// Its name.
    pub slot: String,
    /// A walsender streams from it now.
    pub active: bool,
    /// The position the relay confirmed (`confirmed_flush_lsn`), as text.
    pub confirmed: Option<String>,
    /// WAL written since the confirmed position.
    pub lag_bytes: i64,
    /// The walsender's flush lag in seconds (while active and reported).
    pub lag_seconds: Option<f64>,
    /// WAL the slot holds back (since its restart position).
    pub retained_bytes: i64,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_words_match_literally() {
        let selection = Selection {
            reason: Some("100%_done\\".into()),
            ..Selection::default()
        };
        assert_eq!(selection.reason_pattern().as_deref(), Some("%100\\%\\_done\\\\%"));
        assert_eq!(Selection::default().reason_pattern(), None);
    }

    #[test]
    fn ids_must_be_numbers_where_rows_are_numbered() {
        let ok = Selection {
            ids: vec!["3".into(), "17".into()],
            ..Selection::default()
        };
        assert_eq!(ok.numeric_ids(), Ok(vec![3, 17]));
        let bad = Selection {
            ids: vec!["x1".into()],
            ..Selection::default()
        };
        assert!(bad.numeric_ids().expect_err("not a number").contains("x1"));
    }
}
