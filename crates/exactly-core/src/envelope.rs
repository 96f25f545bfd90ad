//! The event envelope and its strict header encoding.
//!
//! On the wire a record is: Kafka key = aggregate id, value = payload, and these headers.
//! Decoding is strict: a missing or garbled header is an error that parks the message,
//! never a default that could merge two events into one dedupe key.

use uuid::Uuid;

use crate::key::{IdempotencyKey, KeyParseError};
use crate::time::UnixMillis;

/// Header names; pinned by a test because records on topics carry them.
pub mod header {
    /// The idempotency key in its text form (see [`crate::IdempotencyKey`]).
    pub const KEY: &str = "exactly-key";
    /// The event's UUID.
    pub const EVENT_ID: &str = "exactly-event-id";
    /// The event type, for example `CouponUsed`.
    pub const EVENT_TYPE: &str = "exactly-event-type";
    /// The aggregate's type, for example `coupon`.
    pub const AGGREGATE_TYPE: &str = "exactly-aggregate-type";
    /// The aggregate's id; also the Kafka record key.
    pub const AGGREGATE_ID: &str = "exactly-aggregate-id";
    /// When the business change happened, decimal Unix milliseconds.
    pub const OCCURRED_AT: &str = "exactly-occurred-at";
    /// Optional, on sequence keys: `<source>@<epoch>`, the key's source and the epoch its values
    /// were assigned in (PostgreSQL: the timeline). A newer epoch whose values fall below the
    /// watermark means the source went backwards (restore, failover to a lagging replica).
    pub const SOURCE: &str = "exactly-source";
    /// Prefix reserved for exactly; user headers must not use it.
    pub const RESERVED_PREFIX: &str = "exactly-";
}

/// The largest aggregate id accepted; it is the Kafka key and a dedupe column.
pub const MAX_AGGREGATE_ID_BYTES: usize = 512;

/// One business event as the outbox holds it and a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique per event; the outbox's UNIQUE column.
    pub event_id: Uuid,
    /// What happened, for example `ProductRenamed`.
    pub event_type: String,
    /// The kind of entity that changed, for example `product`.
    pub aggregate_type: String,
    /// Which entity; the Kafka key, so one aggregate's events stay in one partition, in order.
    pub aggregate_id: String,
    /// Event time, set by the writer.
    pub occurred_at: UnixMillis,
    /// Opaque bytes; their format is between producer and handler.
    pub payload: Vec<u8>,
    /// The application's own headers (names must not start with `exactly-`).
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A record as read back from a topic: envelope plus the key it is deduplicated by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The dedupe identity.
    pub key: IdempotencyKey,
    /// The event.
    pub envelope: Envelope,
    /// The epoch of a sequence key's source, from the `exactly-source` header (None: not sent).
    pub source_epoch: Option<u64>,
}

/// Why a record's headers cannot be turned into an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// A required header is absent.
    #[error("header {0} is missing")]
    Missing(&'static str),
    /// A required header appears more than once, so which one counts would be a guess.
    #[error("header {0} appears more than once")]
    Repeated(&'static str),
    /// A header has no value (null) or is not UTF-8.
    #[error("header {name} is not UTF-8 text")]
    NotText {
        /// The header.
        name: &'static str,
    },
    /// A header's text does not parse.
    #[error("header {name} = {value:?} is invalid: {reason}")]
    Invalid {
        /// The header.
        name: &'static str,
        /// Its text (cut to 64 characters).
        value: String,
        /// Why.
        reason: String,
    },
    /// The idempotency key does not parse.
    #[error("header exactly-key: {0}")]
    Key(#[from] KeyParseError),
    /// The `exactly-source` header names another source than the key, or is not `<source>@<epoch>`.
    #[error("header exactly-source = {0:?} does not match the key's source as <source>@<epoch>")]
    SourceMismatch(String),
    /// A user header uses the reserved prefix.
    #[error("user header {0:?} uses the reserved prefix exactly-")]
    ReservedName(String),
}

impl Envelope {
    /// The headers a record carries: key and metadata first, then the application's own.
    pub fn to_headers(&self, key: &IdempotencyKey) -> Vec<(String, Vec<u8>)> {
        let mut headers = Vec::with_capacity(6 + self.headers.len());
        self.each_header(key, |name, value| headers.push((name.to_owned(), value.to_vec())));
        headers
    }

    /// Hands each header of [`Envelope::to_headers`] to `visit`, in the same order, borrowed
    /// from the envelope where it holds the bytes: a relay copies them once, into the
    /// producer, instead of building the list first (a dozen allocations per event).
    pub fn each_header(&self, key: &IdempotencyKey, mut visit: impl FnMut(&str, &[u8])) {
        visit(header::KEY, key.to_string().as_bytes());
        let mut event_id = uuid::Uuid::encode_buffer();
        visit(
            header::EVENT_ID,
            self.event_id.hyphenated().encode_lower(&mut event_id).as_bytes(),
        );
        visit(header::EVENT_TYPE, self.event_type.as_bytes());
        visit(header::AGGREGATE_TYPE, self.aggregate_type.as_bytes());
        visit(header::AGGREGATE_ID, self.aggregate_id.as_bytes());
        visit(header::OCCURRED_AT, self.occurred_at.0.to_string().as_bytes());
        for (name, value) in &self.headers {
            visit(name, value);
        }
    }

    /// Checks what a writer put in the outbox before it is published.
    pub fn validate(&self) -> Result<(), HeaderError> {
        validate_parts(
            &self.aggregate_id,
            &self.event_type,
            &self.aggregate_type,
            &self.headers,
        )
    }
}

/// [`Envelope::validate`] on the parts, before an envelope is built of them.
pub(crate) fn validate_parts(
    aggregate_id: &str,
    event_type: &str,
    aggregate_type: &str,
    headers: &[(String, Vec<u8>)],
) -> Result<(), HeaderError> {
    validate_aggregate_id(aggregate_id)?;
    for (name, label) in [
        (event_type, header::EVENT_TYPE),
        (aggregate_type, header::AGGREGATE_TYPE),
    ] {
        if name.is_empty() {
            return Err(invalid(label, name, "empty"));
        }
    }
    if let Some((name, _)) = headers
        .iter()
        .find(|(name, _)| name.starts_with(header::RESERVED_PREFIX))
    {
        return Err(HeaderError::ReservedName(name.clone()));
    }
    Ok(())
}

fn validate_aggregate_id(id: &str) -> Result<(), HeaderError> {
    if id.is_empty() {
        return Err(invalid(header::AGGREGATE_ID, id, "empty"));
    }
    if id.len() > MAX_AGGREGATE_ID_BYTES {
        return Err(invalid(
            header::AGGREGATE_ID,
            id,
            &format!("{} bytes, more than {MAX_AGGREGATE_ID_BYTES}", id.len()),
        ));
    }
    Ok(())
}

fn invalid(name: &'static str, value: &str, reason: &str) -> HeaderError {
    HeaderError::Invalid {
        name,
        value: value.chars().take(64).collect(),
        reason: reason.to_owned(),
    }
}

/// Decodes a record's headers and value. `headers` are as the client library yields them
/// (a header may have no value).
pub fn decode_record<'a, I>(headers: I, payload: &[u8]) -> Result<Delivery, HeaderError>
where
    I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
{
    const REQUIRED: [&str; 6] = [
        header::KEY,
        header::EVENT_ID,
        header::EVENT_TYPE,
        header::AGGREGATE_TYPE,
        header::AGGREGATE_ID,
        header::OCCURRED_AT,
    ];
    let mut found: [Option<&str>; 6] = [None; 6];
    let mut source: Option<&str> = None;
    let mut user = Vec::new();
    for (name, value) in headers {
        if name == header::SOURCE {
            if source.is_some() {
                return Err(HeaderError::Repeated(header::SOURCE));
            }
            let text = value
                .and_then(|v| std::str::from_utf8(v).ok())
                .ok_or(HeaderError::NotText { name: header::SOURCE })?;
            source = Some(text);
            continue;
        }
        match REQUIRED.iter().position(|r| *r == name) {
            Some(i) => {
                if found[i].is_some() {
                    return Err(HeaderError::Repeated(REQUIRED[i]));
                }
                let text = value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .ok_or(HeaderError::NotText { name: REQUIRED[i] })?;
                found[i] = Some(text);
            }
            None => user.push((name.to_owned(), value.unwrap_or_default().to_vec())),
        }
    }
    let get = |i: usize| found[i].ok_or(HeaderError::Missing(REQUIRED[i]));
    let key: IdempotencyKey = get(0)?.parse()?;
    let event_id_text = get(1)?;
    let event_id = Uuid::try_parse(event_id_text)
        .map_err(|e| invalid(header::EVENT_ID, event_id_text, &e.to_string()))?;
    let occurred_text = get(5)?;
    let occurred_at = occurred_text
        .parse::<i64>()
        .map(UnixMillis)
        .map_err(|e| invalid(header::OCCURRED_AT, occurred_text, &e.to_string()))?;
    let envelope = Envelope {
        event_id,
        event_type: get(2)?.to_owned(),
        aggregate_type: get(3)?.to_owned(),
        aggregate_id: get(4)?.to_owned(),
        occurred_at,
        payload: payload.to_vec(),
        headers: user,
    };
    envelope.validate()?;
    let source_epoch = match source {
        None => None,
        Some(text) => Some(source_epoch_of(&key, text)?),
    };
    Ok(Delivery {
        key,
        envelope,
        source_epoch,
    })
}

/// Decodes a record deduplicated by header `key_header` (`--key-header id`): its idempotency key
/// is the UUID there (v7 keys get the horizon, any other version goes to the key set; exactly's
/// own key text is taken as it is). A record with exactly's headers keeps its envelope with
/// that key, so the same event relayed by Debezium and by exactly during a cut-over is one
/// key. A record some other producer wrote (Debezium's Outbox Event Router, say) has the UUID
/// as event id, the record's key as aggregate id, the record's timestamp as event time and
/// every other header as the application's; type and aggregate type are empty, the producer
/// did not say them.
pub fn decode_keyed_by_header<'a, I>(
    key_header: &str,
    headers: I,
    record_key: Option<&[u8]>,
    timestamp: Option<UnixMillis>,
    payload: &[u8],
) -> Result<Delivery, HeaderError>
where
    I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
{
    let mut key_text: Option<&str> = None;
    let mut user = Vec::new();
    let mut every = Vec::new();
    for (name, value) in headers {
        every.push((name, value));
        if name == key_header {
            if key_text.is_some() {
                return Err(HeaderError::Repeated(header::KEY));
            }
            key_text = Some(
                value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .ok_or(HeaderError::NotText { name: header::KEY })?,
            );
        } else if !name.starts_with("exactly-") {
            user.push((name.to_owned(), value.unwrap_or_default().to_vec()));
        }
    }
    let text = key_text.ok_or(HeaderError::Missing(header::KEY))?;
    let key = key_from_header(key_header, text)?;
    if let Ok(mut delivery) = decode_record(every, payload) {
        delivery.key = key;
        delivery.source_epoch = None;
        return Ok(delivery);
    }
    let event_id = match &key {
        IdempotencyKey::UuidV4(u) | IdempotencyKey::UuidV7(u) => *u,
        IdempotencyKey::Ulid(u) => Uuid::from_bytes(u.to_bytes()),
        IdempotencyKey::Sequence { .. } => Uuid::nil(),
    };
    Ok(Delivery {
        key,
        envelope: Envelope {
            event_id,
            event_type: String::new(),
            aggregate_type: String::new(),
            aggregate_id: record_key
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            occurred_at: timestamp.unwrap_or_default(),
            payload: payload.to_vec(),
            headers: user,
        },
        source_epoch: None,
    })
}

fn key_from_header(key_header: &str, text: &str) -> Result<IdempotencyKey, HeaderError> {
    Ok(match text.parse::<IdempotencyKey>() {
        Ok(key) => key,
        Err(_) => {
            let uuid = Uuid::try_parse(text.trim()).map_err(|e| {
                invalid(
                    header::KEY,
                    text,
                    &format!("header {key_header:?} is not a UUID: {e}"),
                )
            })?;
            match uuid.get_version_num() {
                7 => IdempotencyKey::UuidV7(uuid),
                _ => IdempotencyKey::UuidV4(uuid),
            }
        }
    })
}

/// The `exactly-source` header value for a sequence key assigned in `epoch`.
pub fn source_header(source: &str, epoch: u64) -> String {
    format!("{source}@{epoch}")
}

fn source_epoch_of(key: &IdempotencyKey, text: &str) -> Result<u64, HeaderError> {
    let mismatch = || HeaderError::SourceMismatch(text.chars().take(128).collect());
    let IdempotencyKey::Sequence { source, .. } = key else {
        return Err(mismatch());
    };
    let (named, epoch) = text.rsplit_once('@').ok_or_else(mismatch)?;
    if named != source {
        return Err(mismatch());
    }
    epoch.parse().map_err(|_| mismatch())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keyed_by_a_header_takes_the_uuid_there() {
        let id = Uuid::new_v4();
        let id_text = id.hyphenated().to_string();
        // Debezium's record: only `id` and the application's headers.
        let foreign = decode_keyed_by_header(
            "id",
            [("id", Some(id_text.as_bytes())), ("trace", Some(&b"t"[..]))],
            Some(b"O-1"),
            Some(UnixMillis(5)),
            b"{}",
        )
        .expect("decodes");
        assert_eq!(foreign.key, IdempotencyKey::UuidV4(id));
        assert_eq!(foreign.envelope.event_id, id);
        assert_eq!(foreign.envelope.aggregate_id, "O-1");
        assert_eq!(foreign.envelope.occurred_at, UnixMillis(5));
        assert_eq!(
            foreign.envelope.headers,
            vec![("trace".to_owned(), b"t".to_vec())]
        );
        // exactly's record of the same event: its envelope, the header's key.
        let (env, key) = sample();
        let mut headers = env.to_headers(&key);
        headers.push(("id".into(), id_text.clone().into_bytes()));
        let both = decode_keyed_by_header(
            "id",
            headers.iter().map(|(n, v)| (n.as_str(), Some(v.as_slice()))),
            None,
            None,
            &env.payload,
        )
        .expect("decodes");
        assert_eq!(both.key, IdempotencyKey::UuidV4(id));
        assert_eq!(both.envelope.event_type, env.event_type);
        // No header, or not a UUID: refused (the consumer parks it as bad headers).
        assert!(decode_keyed_by_header("id", [("x", Some(&b"1"[..]))], None, None, b"").is_err());
        assert!(decode_keyed_by_header("id", [("id", Some(&b"42"[..]))], None, None, b"").is_err());
    }

    fn sample() -> (Envelope, IdempotencyKey) {
        let event_id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let env = Envelope {
            event_id,
            event_type: "CouponUsed".into(),
            aggregate_type: "coupon".into(),
            aggregate_id: "C-42".into(),
            occurred_at: UnixMillis(1_700_000_000_000),
            payload: br#"{"coupon":"C-42"}"#.to_vec(),
            headers: vec![("trace".into(), b"abc".to_vec())],
        };
        (env, IdempotencyKey::UuidV7(event_id))
    }

    fn borrowed(h: &[(String, Vec<u8>)]) -> Vec<(&str, Option<&[u8]>)> {
        h.iter().map(|(n, v)| (n.as_str(), Some(v.as_slice()))).collect()
    }

    #[test]
    fn header_bytes_are_pinned() {
        let (env, key) = sample();
        let text: Vec<String> = env
            .to_headers(&key)
            .iter()
            .map(|(n, v)| format!("{n}={}", String::from_utf8_lossy(v)))
            .collect();
        assert_eq!(
            text,
            [
                "exactly-key=v7:01900000-0000-7000-8000-000000000001",
                "exactly-event-id=01900000-0000-7000-8000-000000000001",
                "exactly-event-type=CouponUsed",
                "exactly-aggregate-type=coupon",
                "exactly-aggregate-id=C-42",
                "exactly-occurred-at=1700000000000",
                "trace=abc",
            ]
        );
    }

    #[test]
    fn round_trip() {
        let (env, key) = sample();
        let headers = env.to_headers(&key);
        let delivery = decode_record(borrowed(&headers), &env.payload).expect("decodes");
        assert_eq!(
            delivery,
            Delivery {
                key,
                envelope: env,
                source_epoch: None
            }
        );
    }

    #[test]
    fn source_header_carries_the_epoch_of_its_own_source_only() {
        let (env, _) = sample();
        let key = IdempotencyKey::Sequence {
            source: "pg:73:exactly".into(),
            value: 5,
        };
        let with_source = |text: &str| {
            let mut h = env.to_headers(&key);
            h.push((header::SOURCE.into(), text.as_bytes().to_vec()));
            decode_record(borrowed(&h), b"{}")
        };
        assert_eq!(
            with_source(&source_header("pg:73:exactly", 2)).map(|d| d.source_epoch),
            Ok(Some(2))
        );
        for bad in ["pg:74:exactly@2", "pg:73:exactly", "pg:73:exactly@two"] {
            assert!(
                matches!(with_source(bad), Err(HeaderError::SourceMismatch(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn garbled_headers_are_errors() {
        let (env, key) = sample();
        let good = env.to_headers(&key);
        let without = |name: &str| -> Vec<(String, Vec<u8>)> {
            good.iter().filter(|(n, _)| n != name).cloned().collect()
        };
        let replaced = |name: &str, v: &[u8]| -> Vec<(String, Vec<u8>)> {
            good.iter()
                .map(|(n, old)| (n.clone(), if n == name { v.to_vec() } else { old.clone() }))
                .collect()
        };
        let mut twice = good.clone();
        twice.push((
            header::KEY.into(),
            b"v4:01234567-89ab-4def-8123-456789abcdef".to_vec(),
        ));
        let cases = [
            (without(header::KEY), "missing"),
            (replaced(header::KEY, b"v7:zzz"), "not a valid"),
            (replaced(header::KEY, &[0xff, 0xfe]), "not UTF-8"),
            (replaced(header::OCCURRED_AT, b"yesterday"), "invalid"),
            (replaced(header::EVENT_ID, b"42"), "invalid"),
            (replaced(header::AGGREGATE_ID, b""), "empty"),
            (replaced(header::AGGREGATE_ID, &[b'a'; 600]), "more than"),
            (twice, "more than once"),
        ];
        for (headers, expect) in cases {
            let err = decode_record(borrowed(&headers), b"{}").expect_err(expect);
            assert!(err.to_string().contains(expect), "{err} lacks {expect:?}");
        }
        let null_key: Vec<(&str, Option<&[u8]>)> = borrowed(&good)
            .into_iter()
            .map(|(n, v)| (n, if n == header::KEY { None } else { v }))
            .collect();
        assert!(decode_record(null_key, b"{}").is_err());
    }
}
