//! A record's headers on the wire, both ways, in one place for relays, consumers and the
//! stream processor.

use exactly_core::{decode_keyed_by_header, decode_record, Delivery, HeaderError, UnixMillis};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

/// Kafka headers carrying `headers` (as `Envelope::to_headers` lists them).
pub fn record_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (name, value)| {
            h.insert(Header {
                key: name,
                value: Some(value),
            })
        },
    )
}

/// Decodes a received record strictly (see [`exactly_core::decode_record`]).
pub fn decode_message<M: Message>(message: &M) -> Result<Delivery, HeaderError> {
    let headers: Vec<(&str, Option<&[u8]>)> = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    decode_record(headers, message.payload().unwrap_or_default())
}

/// Decodes a received record deduplicated by header `key_header` (see
/// [`exactly_core::decode_keyed_by_header`]): a topic another producer (Debezium) writes.
pub fn decode_message_keyed_by<M: Message>(message: &M, key_header: &str) -> Result<Delivery, HeaderError> {
    let headers: Vec<(&str, Option<&[u8]>)> = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    let timestamp = message.timestamp().to_millis().map(UnixMillis);
    decode_keyed_by_header(
        key_header,
        headers,
        message.key(),
        timestamp,
        message.payload().unwrap_or_default(),
    )
}
