//! What came out: each consumer's applied and parked events and the topic's records, read
//! back for the checker.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use exactly_core::check::ConsumerHistory;

use super::*;

pub(super) fn consumer_db(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("consumer-{i}.db"))
}

/// Distinct good events applied, per consumer (0 while its database is not there yet).
pub(super) fn applied_counts(dir: &Path, consumers: usize) -> Vec<u64> {
    (0..consumers)
        .map(|i| {
            rusqlite::Connection::open(consumer_db(dir, i))
                .and_then(|c| {
                    c.query_row(
                        "SELECT COUNT(DISTINCT event_id) FROM exactly_consumed WHERE event_type = ?1",
                        [EVENT_TYPE],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .map_or(0, |n| n.max(0) as u64)
        })
        .collect()
}

/// Distinct inputs parked by consumer `i`.
pub(super) fn parked_count(dir: &Path, i: usize) -> u64 {
    rusqlite::Connection::open(consumer_db(dir, i))
        .and_then(|c| {
            // A relay rewind may resend a record the consumer parks: the same key parked again
            // is one bad input (records without a readable key are told apart by position).
            c.query_row(
                "SELECT COUNT(DISTINCT COALESCE(key_text, topic || '/' || partition || '@' || \"offset\")) FROM exactly_parked",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map_or(0, |n| n.max(0) as u64)
}

pub(super) fn event_id_from_headers(json: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value.as_array()?.iter().find_map(|pair| {
        let pair = pair.as_array()?;
        if pair.first()?.as_str()? != exactly_core::envelope::header::EVENT_ID {
            return None;
        }
        let bytes: Vec<u8> = pair
            .get(1)?
            .as_array()?
            .iter()
            .filter_map(|b| Some(b.as_u64()? as u8))
            .collect();
        String::from_utf8(bytes).ok()
    })
}

pub(super) fn consumer_history(dir: &Path, i: usize) -> Result<ConsumerHistory> {
    let conn = rusqlite::Connection::open(consumer_db(dir, i))?;
    let mut applied_query = conn.prepare("SELECT event_id FROM exactly_consumed ORDER BY applied_seq")?;
    let applied = applied_query
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut parked_query = conn.prepare("SELECT headers FROM exactly_parked")?;
    let parked = parked_query
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(|h| event_id_from_headers(&h.ok()?))
        .collect();
    Ok(ConsumerHistory {
        name: format!("consumer-{i}"),
        applied,
        parked,
    })
}

/// The event ids on the topic and how many records it holds in all (resends included).
pub(super) fn topic_event_ids(brokers: &str, topic: &str) -> Result<(HashSet<String>, u64)> {
    use rdkafka::message::{Headers, Message};
    let partitions = exactly_kafka::partition_count(brokers, topic)?;
    let (mut ids, mut records) = (HashSet::new(), 0u64);
    exactly_kafka::scan_topic(
        brokers,
        topic,
        partitions,
        "read_committed",
        Duration::from_secs(120),
        |m| {
            records += 1;
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == exactly_core::envelope::header::EVENT_ID)
                    .and_then(|h| String::from_utf8(h.value?.to_vec()).ok())
            });
            ids.extend(id);
        },
    )?;
    Ok((ids, records))
}
