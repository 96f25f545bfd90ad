//! The user's SQL for `exactly consume --handler sql`: statements with named envelope
//! parameters (`:event_id`, `:payload`, …), split and scanned here, bound by the adapters.
//!
//! The scanner knows enough of PostgreSQL's and SQLite's lexical rules to never see a
//! parameter or a statement end inside a string, a quoted identifier, a comment or a
//! dollar-quoted body (`$$ … $$`, so a `DO` block or a function body passes through whole);
//! `::` is a cast, not a parameter.

use std::fmt;

use crate::ports::Inbound;
use crate::record::headers_to_json;

/// A value a SQL handler can bind, named `:name` in the statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnvelopeParam {
    /// The event id (UUID).
    EventId,
    /// The idempotency key in its text form.
    Key,
    /// The event type.
    EventType,
    /// The aggregate type.
    AggregateType,
    /// The aggregate id.
    AggregateId,
    /// The event time: milliseconds since the Unix epoch, or a timestamp where the database
    /// expects one.
    OccurredAt,
    /// The payload: text (it must be UTF-8), JSON where the database expects JSON (it must
    /// parse), or bytes where it expects bytes.
    Payload,
    /// The payload as JSON: it must parse, whatever the statement's type for it.
    PayloadJson,
    /// The payload's bytes, untouched.
    PayloadBytes,
    /// The application's headers as a JSON object of strings.
    Headers,
    /// The topic the record was read from.
    Topic,
    /// Its partition.
    Partition,
    /// Its offset.
    Offset,
}

impl EnvelopeParam {
    /// Every parameter, in the order the documentation lists them.
    pub const ALL: [EnvelopeParam; 13] = [
        EnvelopeParam::EventId,
        EnvelopeParam::Key,
        EnvelopeParam::EventType,
        EnvelopeParam::AggregateType,
        EnvelopeParam::AggregateId,
        EnvelopeParam::OccurredAt,
        EnvelopeParam::Payload,
        EnvelopeParam::PayloadJson,
        EnvelopeParam::PayloadBytes,
        EnvelopeParam::Headers,
        EnvelopeParam::Topic,
        EnvelopeParam::Partition,
        EnvelopeParam::Offset,
    ];

    /// The name after the colon.
    pub fn name(self) -> &'static str {
        match self {
            EnvelopeParam::EventId => "event_id",
            EnvelopeParam::Key => "key",
            EnvelopeParam::EventType => "event_type",
            EnvelopeParam::AggregateType => "aggregate_type",
            EnvelopeParam::AggregateId => "aggregate_id",
            EnvelopeParam::OccurredAt => "occurred_at",
            EnvelopeParam::Payload => "payload",
            EnvelopeParam::PayloadJson => "payload_json",
            EnvelopeParam::PayloadBytes => "payload_bytes",
            EnvelopeParam::Headers => "headers",
            EnvelopeParam::Topic => "topic",
            EnvelopeParam::Partition => "partition",
            EnvelopeParam::Offset => "offset",
        }
    }

    fn parse(name: &str) -> Option<EnvelopeParam> {
        EnvelopeParam::ALL.into_iter().find(|p| p.name() == name)
    }

    /// This parameter's value for one received record. An error is a reason to park it: the
    /// value cannot be what the parameter promises (a payload that is not UTF-8 text or not
    /// JSON, a header that is not text).
    pub fn value(self, inbound: &Inbound<'_>) -> Result<ParamValue, String> {
        let e = &inbound.delivery.envelope;
        Ok(match self {
            EnvelopeParam::EventId => ParamValue::Uuid(e.event_id),
            EnvelopeParam::Key => ParamValue::Text(inbound.delivery.key.to_string()),
            EnvelopeParam::EventType => ParamValue::Text(e.event_type.clone()),
            EnvelopeParam::AggregateType => ParamValue::Text(e.aggregate_type.clone()),
            EnvelopeParam::AggregateId => ParamValue::Text(e.aggregate_id.clone()),
            EnvelopeParam::OccurredAt => {
                let ms = e.occurred_at.0;
                if !OCCURRED_AT_RANGE.contains(&ms) {
                    return Err(format!(
                        ":occurred_at {ms} ms is outside the years 0000 to 9999 a database timestamp holds"
                    ));
                }
                ParamValue::Millis(ms)
            }
            EnvelopeParam::Payload => ParamValue::Payload(e.payload.clone()),
            EnvelopeParam::PayloadJson => ParamValue::Json(json_text(&e.payload)?),
            EnvelopeParam::PayloadBytes => ParamValue::Bytes(e.payload.clone()),
            EnvelopeParam::Headers => {
                if let Some((name, _)) = e.headers.iter().find(|(_, v)| std::str::from_utf8(v).is_err()) {
                    return Err(format!(
                        "header {name:?} is not UTF-8, so :headers cannot hold it"
                    ));
                }
                ParamValue::Json(headers_to_json(&e.headers))
            }
            EnvelopeParam::Topic => ParamValue::Text(inbound.topic.to_owned()),
            EnvelopeParam::Partition => ParamValue::Int(i64::from(inbound.partition)),
            EnvelopeParam::Offset => ParamValue::Int(inbound.offset),
        })
    }
}

impl fmt::Display for EnvelopeParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ":{}", self.name())
    }
}

/// The instants (Unix milliseconds) `:occurred_at` binds: the years 0000 to 9999, the range of
/// SQLite's date functions, inside PostgreSQL's timestamp range. An event time outside it (an
/// `exactly-occurred-at` header of `i64::MAX`) parks the record with the reason instead of
/// overflowing the driver's conversion.
pub const OCCURRED_AT_RANGE: std::ops::RangeInclusive<i64> = -62_167_219_200_000..=253_402_300_799_999;

/// The payload as JSON text, or why it is not.
pub fn json_text(payload: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8: {e}"))?;
    serde_json::from_str::<serde_json::Value>(text).map_err(|e| format!("payload is not JSON: {e}"))?;
    Ok(text.to_owned())
}

/// A parameter's value before an adapter converts it to the type its database expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamValue {
    /// Text.
    Text(String),
    /// An integer.
    Int(i64),
    /// Milliseconds since the Unix epoch.
    Millis(i64),
    /// A UUID.
    Uuid(uuid::Uuid),
    /// JSON text that parses.
    Json(String),
    /// Payload bytes: text, JSON or bytes, as the statement expects.
    Payload(Vec<u8>),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// One statement of the file: its text with each parameter cut out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateStatement {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(EnvelopeParam),
}

impl TemplateStatement {
    /// The statement with each distinct parameter replaced by `placeholder(n)` (1-based, in
    /// order of first use), and the parameters in that order.
    pub fn render(&self, placeholder: impl Fn(usize) -> String) -> (String, Vec<EnvelopeParam>) {
        let mut sql = String::new();
        let mut order: Vec<EnvelopeParam> = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => sql.push_str(text),
                Piece::Param(param) => {
                    let n = match order.iter().position(|p| p == param) {
                        Some(i) => i + 1,
                        None => {
                            order.push(*param);
                            order.len()
                        }
                    };
                    sql.push_str(&placeholder(n));
                }
            }
        }
        (sql, order)
    }

    /// The parameters it uses.
    pub fn params(&self) -> impl Iterator<Item = EnvelopeParam> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(param) => Some(*param),
            Piece::Text(_) => None,
        })
    }
}

/// Why a SQL file cannot be a handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `:name` that is not an envelope parameter.
    #[error("line {line}: unknown parameter :{name} (known: {known})")]
    UnknownParam {
        /// 1-based line.
        line: usize,
        /// The name.
        name: String,
        /// The known names.
        known: String,
    },
    /// A string, quoted identifier, comment or dollar-quoted body that never ends.
    #[error("line {line}: {what} is not closed")]
    Unterminated {
        /// 1-based line where it starts.
        line: usize,
        /// What it is.
        what: &'static str,
    },
    /// Nothing to run.
    #[error("the file has no statement")]
    Empty,
}

/// Splits `sql` into statements at top-level semicolons and cuts out `:name` parameters.
pub fn parse(sql: &str) -> Result<Vec<TemplateStatement>, TemplateError> {
    let chars: Vec<char> = sql.chars().collect();
    let line_at = |i: usize| chars[..i].iter().filter(|c| **c == '\n').count() + 1;
    let mut statements = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut text = String::new();
    // Whether the current statement has anything but whitespace and comments.
    let mut substance = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\'' | '"' | '`' => {
                // E'…' strings take backslash escapes.
                let backslash = c == '\''
                    && i > 0
                    && matches!(chars[i - 1], 'e' | 'E')
                    && (i < 2 || !is_ident_char(chars[i - 2]));
                let end = quoted_end(&chars, i, c, backslash).ok_or(TemplateError::Unterminated {
                    line: line_at(i),
                    what: if c == '\'' {
                        "a string"
                    } else {
                        "a quoted identifier"
                    },
                })?;
                text.extend(&chars[i..end]);
                substance = true;
                i = end;
            }
            '-' if next == Some('-') => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == '\n')
                    .map_or(chars.len(), |p| i + p);
                text.extend(&chars[i..end]);
                i = end;
            }
            '/' if next == Some('*') => {
                let end = block_comment_end(&chars, i).ok_or(TemplateError::Unterminated {
                    line: line_at(i),
                    what: "a comment",
                })?;
                text.extend(&chars[i..end]);
                i = end;
            }
            '$' if dollar_tag(&chars, i).is_some() => {
                let tag = dollar_tag(&chars, i).unwrap_or_default();
                let body = i + tag.len();
                let end = find(&chars, body, &tag).ok_or(TemplateError::Unterminated {
                    line: line_at(i),
                    what: "a dollar-quoted body",
                })? + tag.len();
                text.extend(&chars[i..end]);
                substance = true;
                i = end;
            }
            ':' if next == Some(':') => {
                text.push_str("::");
                i += 2;
            }
            ':' if next.is_some_and(|n| n.is_ascii_alphabetic() || n == '_') => {
                let start = i + 1;
                let end = start + chars[start..].iter().take_while(|c| is_ident_char(**c)).count();
                let name: String = chars[start..end].iter().collect();
                let param = EnvelopeParam::parse(&name).ok_or_else(|| TemplateError::UnknownParam {
                    line: line_at(i),
                    name: name.clone(),
                    known: EnvelopeParam::ALL.map(|p| p.to_string()).join(", "),
                })?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Param(param));
                substance = true;
                i = end;
            }
            ';' => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                if substance {
                    statements.push(TemplateStatement {
                        pieces: std::mem::take(&mut pieces),
                    });
                }
                pieces.clear();
                substance = false;
                i += 1;
            }
            c => {
                text.push(c);
                substance |= !c.is_whitespace();
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    if substance {
        statements.push(TemplateStatement { pieces });
    }
    if statements.is_empty() {
        return Err(TemplateError::Empty);
    }
    Ok(statements)
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The index just past the closing quote of the quoted text starting at `start`; a doubled
/// quote is an escaped quote.
fn quoted_end(chars: &[char], start: usize, quote: char, backslash: bool) -> Option<usize> {
    let mut i = start + 1;
    while i < chars.len() {
        if backslash && chars[i] == '\\' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// The index just past a block comment starting at `start` (PostgreSQL nests them).
fn block_comment_end(chars: &[char], start: usize) -> Option<usize> {
    let (mut depth, mut i) = (0usize, start);
    while i + 1 < chars.len() {
        match (chars[i], chars[i + 1]) {
            ('/', '*') => {
                depth += 1;
                i += 2;
            }
            ('*', '/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// A dollar-quote opening tag at `start` (`$$` or `$tag$`), not a positional `$1`.
fn dollar_tag(chars: &[char], start: usize) -> Option<Vec<char>> {
    if start > 0 && is_ident_char(chars[start - 1]) {
        return None;
    }
    let mut i = start + 1;
    if chars.get(i).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    while i < chars.len() && is_ident_char(chars[i]) {
        i += 1;
    }
    (chars.get(i) == Some(&'$')).then(|| chars[start..=i].to_vec())
}

fn find(chars: &[char], from: usize, needle: &[char]) -> Option<usize> {
    (from..=chars.len().saturating_sub(needle.len())).find(|&i| chars[i..].starts_with(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rendered(sql: &str) -> Vec<(String, Vec<&'static str>)> {
        parse(sql)
            .expect("parses")
            .iter()
            .map(|s| {
                let (text, params) = s.render(|n| format!("${n}"));
                (text, params.iter().map(|p| p.name()).collect())
            })
            .collect()
    }

    #[test]
    fn parameters_are_numbered_by_first_use_and_statements_split() {
        let out = rendered(
            "INSERT INTO t (id, body) VALUES (:event_id, :payload::jsonb);\n\
             UPDATE s SET n = n + 1, last = :event_id WHERE k = :aggregate_id;",
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "INSERT INTO t (id, body) VALUES ($1, $2::jsonb)");
        assert_eq!(out[0].1, ["event_id", "payload"]);
        assert_eq!(out[1].0, "\nUPDATE s SET n = n + 1, last = $1 WHERE k = $2");
        assert_eq!(out[1].1, ["event_id", "aggregate_id"]);
    }

    #[test]
    fn quotes_comments_and_dollar_bodies_are_left_alone() {
        let sql = "SELECT ':payload', \":topic\", E'it\\'s :key'; -- :offset;\n\
                   /* :partition; /* nested ; */ */ DO $body$ BEGIN RAISE EXCEPTION 'x: %', 1; END $body$;\n\
                   SELECT $$ ; :headers $$, :key";
        let out = rendered(sql);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].1.is_empty());
        assert!(out[1].1.is_empty(), "{out:?}");
        assert!(out[1].0.contains("RAISE EXCEPTION 'x: %', 1; END $body$"));
        assert_eq!(out[2].1, ["key"]);
        assert!(out[2].0.ends_with("$$ ; :headers $$, $1"));
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        assert!(matches!(
            parse("SELECT 1;\nSELECT :nope"),
            Err(TemplateError::UnknownParam { line: 2, .. })
        ));
        assert!(matches!(
            parse("SELECT 'open"),
            Err(TemplateError::Unterminated { line: 1, .. })
        ));
        assert!(matches!(
            parse("SELECT $x$ open"),
            Err(TemplateError::Unterminated { .. })
        ));
        assert_eq!(parse(" ; -- nothing\n ;"), Err(TemplateError::Empty));
        // A positional parameter and a cast are not parameters.
        assert_eq!(rendered("SELECT $1, x::int")[0].1.len(), 0);
    }

    proptest! {
        /// Any text scans without a panic, and a file scanned, rendered with the names put
        /// back, scans to the same statements.
        #[test]
        fn scanning_never_panics_and_round_trips(sql in ".{0,200}") {
            if let Ok(statements) = parse(&sql) {
                for s in &statements {
                    let (text, params) = s.render(|n| format!(":__{n}__"));
                    let restored = params.iter().enumerate().fold(text, |t, (i, p)| {
                        t.replace(&format!(":__{}__", i + 1), &p.to_string())
                    });
                    let again = parse(&restored).expect("rendered text parses");
                    prop_assert_eq!(again.len(), 1);
                    prop_assert_eq!(&again[0], s);
                }
            }
        }

        /// Parameters inside string literals are never bound.
        #[test]
        fn nothing_inside_a_string_is_a_parameter(inner in "[a-z_: ;$]{0,40}") {
            let sql = format!("SELECT '{}'", inner.replace('\'', "''"));
            let statements = parse(&sql).expect("parses");
            prop_assert_eq!(statements.len(), 1);
            prop_assert_eq!(statements[0].params().count(), 0);
        }
    }
    #[test]
    fn an_occurred_at_no_database_timestamp_holds_is_refused_with_the_reason() {
        let at = |ms: i64| {
            let delivery = crate::Delivery {
                key: crate::IdempotencyKey::UuidV4(uuid::Uuid::from_u128(
                    0x0123_4567_89ab_4def_8123_4567_89ab_cdef,
                )),
                envelope: crate::Envelope {
                    event_id: uuid::Uuid::from_u128(1),
                    event_type: "T".into(),
                    aggregate_type: "a".into(),
                    aggregate_id: "1".into(),
                    occurred_at: crate::UnixMillis(ms),
                    payload: b"{}".to_vec(),
                    headers: vec![],
                },
                source_epoch: None,
            };
            let inbound = crate::Inbound {
                topic: "t",
                partition: 0,
                offset: 0,
                delivery: &delivery,
                now: crate::UnixMillis(0),
            };
            EnvelopeParam::OccurredAt.value(&inbound)
        };
        assert_eq!(at(1_700_000_000_000), Ok(ParamValue::Millis(1_700_000_000_000)));
        assert_eq!(
            at(-62_167_219_200_000),
            Ok(ParamValue::Millis(-62_167_219_200_000))
        );
        assert_eq!(
            at(253_402_300_799_999),
            Ok(ParamValue::Millis(253_402_300_799_999))
        );
        for ms in [i64::MAX, i64::MIN, 253_402_300_800_000, -62_167_219_200_001] {
            let refused = at(ms).expect_err("out of range");
            assert!(
                refused.contains(":occurred_at") && refused.contains("0000 to 9999"),
                "{refused}"
            );
        }
    }
}
