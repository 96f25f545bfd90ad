//! Idempotency keys and their one text form, used in headers and dedupe tables.

use std::fmt;
use std::str::FromStr;

use ulid::Ulid;
use uuid::Uuid;

use crate::time::UnixMillis;

/// The identity a consumer deduplicates on. Each kind implies a dedupe rule:
/// random keys need a key set, time-ordered keys can be refused past a horizon,
/// sequences need only a watermark per source and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdempotencyKey {
    /// Random; the consumer must remember every key within a retention window.
    UuidV4(Uuid),
    /// Time-ordered UUID; the millisecond timestamp lets old keys be refused.
    UuidV7(Uuid),
    /// Time-ordered ULID; the millisecond timestamp lets old keys be refused.
    Ulid(Ulid),
    /// A monotonic 128-bit position in a named source (for example commit LSN << 64 | ordinal).
    Sequence {
        /// Names the ordered stream the value belongs to; values compare only within it.
        source: String,
        /// The position; strictly increasing in the source's commit order.
        value: u128,
    },
}

/// Which dedupe rule a key falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `v4:`
    UuidV4,
    /// `v7:`
    UuidV7,
    /// `ulid:`
    Ulid,
    /// `seq:`
    Sequence,
}

/// A key header that cannot be read. Keys are never defaulted: a garbled key parks the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// No `kind:` prefix.
    #[error("idempotency key {0:?} has no kind prefix (expected v4:, v7:, ulid: or seq:)")]
    MissingKind(String),
    /// Prefix not one of the four kinds.
    #[error("idempotency key kind {0:?} is unknown (expected v4, v7, ulid or seq)")]
    UnknownKind(String),
    /// The body does not parse for its kind.
    #[error("idempotency key {text:?} is not a valid {kind}: {reason}")]
    Malformed {
        /// The whole header text.
        text: String,
        /// The kind its prefix named.
        kind: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl IdempotencyKey {
    /// A UUIDv7 key for the given time (time and randomness are inputs so tests stay reproducible).
    pub fn new_v7_at(now: UnixMillis, random: [u8; 10]) -> Self {
        let ms = now.0.max(0) as u64;
        IdempotencyKey::UuidV7(uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid())
    }

    /// The rule this key is deduplicated by.
    pub fn kind(&self) -> KeyKind {
        match self {
            IdempotencyKey::UuidV4(_) => KeyKind::UuidV4,
            IdempotencyKey::UuidV7(_) => KeyKind::UuidV7,
            IdempotencyKey::Ulid(_) => KeyKind::Ulid,
            IdempotencyKey::Sequence { .. } => KeyKind::Sequence,
        }
    }

    /// The creation time carried inside time-ordered keys.
    pub fn embedded_time(&self) -> Option<UnixMillis> {
        match self {
            IdempotencyKey::UuidV7(u) => {
                let (secs, nanos) = u.get_timestamp()?.to_unix();
                Some(UnixMillis(secs as i64 * 1000 + i64::from(nanos / 1_000_000)))
            }
            IdempotencyKey::Ulid(u) => Some(UnixMillis(u.timestamp_ms() as i64)),
            IdempotencyKey::UuidV4(_) | IdempotencyKey::Sequence { .. } => None,
        }
    }
}

impl fmt::Display for IdempotencyKey {
    /// The persisted text form; pinned by a test because dedupe tables store it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdempotencyKey::UuidV4(u) => write!(f, "v4:{}", u.hyphenated()),
            IdempotencyKey::UuidV7(u) => write!(f, "v7:{}", u.hyphenated()),
            IdempotencyKey::Ulid(u) => write!(f, "ulid:{u}"),
            // Fixed-width hex so text order equals numeric order; source last because it may hold ':'.
            IdempotencyKey::Sequence { source, value } => write!(f, "seq:{value:032x}:{source}"),
        }
    }
}

impl FromStr for IdempotencyKey {
    type Err = KeyParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, body) = text
            .split_once(':')
            .ok_or_else(|| KeyParseError::MissingKind(text.to_owned()))?;
        let malformed = |kind: &'static str, reason: String| KeyParseError::Malformed {
            text: text.to_owned(),
            kind,
            reason,
        };
        match kind {
            "v4" | "v7" => {
                let uuid = Uuid::try_parse(body).map_err(|e| malformed("uuid", e.to_string()))?;
                match (kind, uuid.get_version_num()) {
                    ("v4", 4) => Ok(IdempotencyKey::UuidV4(uuid)),
                    ("v7", 7) => Ok(IdempotencyKey::UuidV7(uuid)),
                    (_, v) => Err(malformed("uuid", format!("prefix {kind} but version {v}"))),
                }
            }
            "ulid" => Ulid::from_string(body)
                .map(IdempotencyKey::Ulid)
                .map_err(|e| malformed("ulid", e.to_string())),
            "seq" => {
                let (hex, source) = body
                    .split_once(':')
                    .ok_or_else(|| malformed("sequence", "no source after the value".into()))?;
                if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(malformed("sequence", "value is not 32 hex digits".into()));
                }
                if source.is_empty() {
                    return Err(malformed("sequence", "source is empty".into()));
                }
                let value =
                    u128::from_str_radix(hex, 16).map_err(|e| malformed("sequence", e.to_string()))?;
                Ok(IdempotencyKey::Sequence {
                    source: source.to_owned(),
                    value,
                })
            }
            other => Err(KeyParseError::UnknownKind(other.to_owned())),
        }
    }
}

/// The WAL key layout: commit LSN in the high 64 bits, ordinal inside the transaction in the low 64.
pub fn lsn_sequence(commit_lsn: u64, ordinal: u64) -> u128 {
    (u128::from(commit_lsn) << 64) | u128::from(ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_text_forms_are_pinned() {
        let v4 = IdempotencyKey::UuidV4(Uuid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef));
        assert_eq!(v4.to_string(), "v4:01234567-89ab-4def-8123-456789abcdef");
        let seq = IdempotencyKey::Sequence {
            source: "pg:7:1:slot".into(),
            value: lsn_sequence(0x16B_3748, 2),
        };
        assert_eq!(
            seq.to_string(),
            "seq:00000000016b37480000000000000002:pg:7:1:slot"
        );
        let ulid = IdempotencyKey::Ulid(Ulid::from_parts(1_700_000_000_000, 42));
        assert_eq!(ulid.to_string(), "ulid:01HF7YAT00000000000000001A");
        for key in [v4, seq, ulid] {
            assert_eq!(key.to_string().parse::<IdempotencyKey>(), Ok(key));
        }
    }

    #[test]
    fn v7_keys_carry_their_time() {
        let key = IdempotencyKey::new_v7_at(UnixMillis(1_700_000_000_123), [7; 10]);
        assert_eq!(key.kind(), KeyKind::UuidV7);
        assert_eq!(key.embedded_time(), Some(UnixMillis(1_700_000_000_123)));
        assert_eq!(key.to_string().parse::<IdempotencyKey>(), Ok(key));
    }

    #[test]
    fn garbled_keys_are_errors_not_defaults() {
        for bad in [
            "",
            "nokind",
            "v9:01234567-89ab-4def-8123-456789abcdef",
            "v7:01234567-89ab-4def-8123-456789abcdef", // a v4 UUID under a v7 prefix
            "v4:not-a-uuid",
            "ulid:!!",
            "seq:12:src",
            "seq:00000000016b37480000000000000002:",
            "seq:00000000016b37480000000000000002",
        ] {
            assert!(bad.parse::<IdempotencyKey>().is_err(), "{bad:?} parsed");
        }
    }
}
