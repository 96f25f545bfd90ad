//! A record's headers on the wire, both ways, in one place for relays, consumers and the
//! stream processor.

use exactly_core::{
    decode_keyed_by_header, decode_record, Delivery, Envelope, HeaderError, IdempotencyKey, UnixMillis,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

/// The Kafka headers of `envelope` published under `key`, then `extra`: each copied once, into
/// librdkafka (the relays' per-event path).
pub fn envelope_headers(envelope: &Envelope, key: &IdempotencyKey, extra: &[(&str, &[u8])]) -> OwnedHeaders {
    // `insert` takes the list by value; the slot is never empty between calls.
    let mut slot = Some(OwnedHeaders::new_with_capacity(
        6 + envelope.headers.len() + extra.len(),
    ));
    let mut add = |name: &str, value: &[u8]| {
        slot = slot.take().map(|headers| {
            headers.insert(Header {
                key: name,
                value: Some(value),
            })
        });
    };
    envelope.each_header(key, &mut add);
    for (name, value) in extra {
        add(name, value);
    }
    slot.unwrap_or_default()
}

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
