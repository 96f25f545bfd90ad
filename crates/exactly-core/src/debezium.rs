//! Debezium outbox compatibility: the Outbox Event Router's settings, and their translation to
//! what PostgreSQL runs.
//!
//! exactly relays a Debezium-style table (`id`, `aggregatetype`, `aggregateid`, `type`,
//! `payload`, optionally a timestamp) without changing its columns or its writers: a trigger
//! mirrors each inserted row into exactly's outbox in the writer's transaction, routed to the
//! topic Debezium would pick (`route.by.field`, `route.topic.regex`,
//! `route.topic.replacement`), with Debezium's `id` header and the additional fields placed as
//! headers. Both relays then publish it with every guarantee they give exactly's own rows.
//!
//! Debezium's regular expressions are Java's and its routing is Kafka Connect's RegexRouter: a
//! value the whole pattern matches becomes the replacement, any other value is the topic as
//! it is. PostgreSQL's `regexp_replace` takes numbered groups (`\1`), so named groups
//! (`(?<routedByValue>…)`, `${routedByValue}`) are numbered here.

use std::fmt;

/// The default `route.topic.regex`.
pub const DEFAULT_ROUTE_REGEX: &str = "(?<routedByValue>.*)";
/// The default `route.topic.replacement`.
pub const DEFAULT_ROUTE_REPLACEMENT: &str = "outbox.event.${routedByValue}";

/// A topic route, as PostgreSQL's `regexp_replace` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosixRoute {
    /// The pattern, anchored to the whole value.
    pub pattern: String,
    /// The replacement, with `\N` for group N and literal backslashes doubled.
    pub replacement: String,
}

/// Why a route cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `${name}` names no group of the pattern.
    #[error("route.topic.replacement names group {0:?}, which route.topic.regex does not have")]
    UnknownGroup(String),
    /// PostgreSQL's replacement reaches groups 1 to 9 only.
    #[error("route.topic.replacement uses group {0}; PostgreSQL reaches groups 1 to 9")]
    GroupTooHigh(usize),
    /// A `$` that starts no group reference.
    #[error("route.topic.replacement has a $ that is not $N or ${{name}} (write \\$ for a dollar)")]
    BadDollar,
}

/// Translates Debezium's `route.topic.regex` and `route.topic.replacement`.
pub fn posix_route(regex: &str, replacement: &str) -> Result<PosixRoute, RouteError> {
    let chars: Vec<char> = regex.chars().collect();
    let mut pattern = String::new();
    let mut names: Vec<Option<String>> = Vec::new();
    let mut i = 0;
    let mut in_class = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                pattern.push(c);
                if let Some(next) = chars.get(i + 1) {
                    pattern.push(*next);
                }
                i += 2;
                continue;
            }
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' if !in_class => {
                let rest: String = chars[i + 1..].iter().take(3).collect();
                if rest.starts_with("?<") && !rest.starts_with("?<=") && !rest.starts_with("?<!") {
                    let start = i + 3;
                    let end = chars[start..]
                        .iter()
                        .position(|c| *c == '>')
                        .map_or(chars.len(), |p| start + p);
                    names.push(Some(chars[start..end].iter().collect()));
                    pattern.push('(');
                    i = end + 1;
                    continue;
                }
                if !rest.starts_with('?') {
                    names.push(None);
                }
            }
            _ => {}
        }
        pattern.push(c);
        i += 1;
    }
    let group = |n: usize| {
        if n > 9 {
            Err(RouteError::GroupTooHigh(n))
        } else {
            Ok(format!("\\{n}"))
        }
    };
    let r: Vec<char> = replacement.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < r.len() {
        match r[i] {
            '\\' => {
                // Java's escape of the next character: a literal.
                if let Some(next) = r.get(i + 1) {
                    if *next == '\\' {
                        out.push_str("\\\\");
                    } else {
                        out.push(*next);
                    }
                }
                i += 2;
            }
            '$' if r.get(i + 1) == Some(&'{') => {
                let end = r[i + 2..]
                    .iter()
                    .position(|c| *c == '}')
                    .ok_or(RouteError::BadDollar)?
                    + i
                    + 2;
                let name: String = r[i + 2..end].iter().collect();
                let n = names
                    .iter()
                    .position(|g| g.as_deref() == Some(name.as_str()))
                    .ok_or_else(|| RouteError::UnknownGroup(name.clone()))?
                    + 1;
                out.push_str(&group(n)?);
                i = end + 1;
            }
            '$' if r.get(i + 1).is_some_and(char::is_ascii_digit) => {
                let digits: String = r[i + 1..].iter().take_while(|c| c.is_ascii_digit()).collect();
                let n: usize = digits.parse().map_err(|_| RouteError::BadDollar)?;
                out.push_str(&if n == 0 { "\\&".to_owned() } else { group(n)? });
                i += 1 + digits.len();
            }
            '$' => return Err(RouteError::BadDollar),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(PosixRoute {
        pattern: format!("^(?:{pattern})$"),
        replacement: out,
    })
}

/// One `table.fields.additional.placement` entry placed as a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderField {
    /// The table's column.
    pub column: String,
    /// The header's name (the column's unless an alias is given).
    pub header: String,
}

/// Why a placement entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Not `column:placement[:alias]`.
    #[error("additional placement {0:?} is not column:header[:alias]")]
    Malformed(String),
    /// `envelope` or `partition`, which exactly does not do.
    #[error("additional placement {0:?}: exactly places additional fields as headers only")]
    Unsupported(String),
}

impl HeaderField {
    /// Parses `column:header[:alias]`.
    pub fn parse(entry: &str) -> Result<HeaderField, PlacementError> {
        let parts: Vec<&str> = entry.trim().split(':').collect();
        match parts.as_slice() {
            [column, "header"] if !column.is_empty() => Ok(HeaderField {
                column: (*column).to_owned(),
                header: (*column).to_owned(),
            }),
            [column, "header", alias] if !column.is_empty() && !alias.is_empty() => Ok(HeaderField {
                column: (*column).to_owned(),
                header: (*alias).to_owned(),
            }),
            [_, _] | [_, _, _] if !parts[1].is_empty() && parts[1] != "header" => {
                Err(PlacementError::Unsupported(entry.to_owned()))
            }
            _ => Err(PlacementError::Malformed(entry.to_owned())),
        }
    }
}

impl fmt::Display for HeaderField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:header:{}", self.column, self.header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_is_outbox_event_and_the_value() {
        let route = posix_route(DEFAULT_ROUTE_REGEX, DEFAULT_ROUTE_REPLACEMENT).expect("translates");
        assert_eq!(route.pattern, "^(?:(.*))$");
        assert_eq!(route.replacement, "outbox.event.\\1");
    }

    #[test]
    fn named_and_numbered_groups_are_numbered_in_order() {
        let route = posix_route(
            r"(?:pre-)?(?<kind>[a-z]+)\((\d+)\)(?<=x)(?<rest>.*)",
            "${rest}.$2.${kind}.$0",
        )
        .expect("ok");
        assert_eq!(route.pattern, r"^(?:(?:pre-)?([a-z]+)\((\d+)\)(?<=x)(.*))$");
        assert_eq!(route.replacement, "\\3.\\2.\\1.\\&");
        // A parenthesis in a class opens no group.
        let route = posix_route("[(](?<a>.)", "${a}").expect("ok");
        assert_eq!(route.replacement, "\\1");
    }

    #[test]
    fn bad_replacements_are_refused() {
        assert_eq!(
            posix_route("(.*)", "${nope}"),
            Err(RouteError::UnknownGroup("nope".into()))
        );
        assert_eq!(posix_route("(.*)", "cost$"), Err(RouteError::BadDollar));
        assert_eq!(posix_route("(.*)", "$10"), Err(RouteError::GroupTooHigh(10)));
        assert_eq!(
            posix_route("(.*)", "a\\$b\\\\").expect("ok").replacement,
            "a$b\\\\"
        );
    }

    #[test]
    fn placements_are_headers_only() {
        assert_eq!(
            HeaderField::parse("type:header:eventType"),
            Ok(HeaderField {
                column: "type".into(),
                header: "eventType".into()
            })
        );
        assert_eq!(
            HeaderField::parse("trace:header").map(|f| f.header),
            Ok("trace".into())
        );
        assert!(matches!(
            HeaderField::parse("type:envelope:t"),
            Err(PlacementError::Unsupported(_))
        ));
        assert!(matches!(
            HeaderField::parse("type"),
            Err(PlacementError::Malformed(_))
        ));
    }
}
