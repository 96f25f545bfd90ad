//! The WAL relay's decoding path, from pgoutput wire bytes to a validated outbox record:
//! pg_walstream's decoder (relation cache included), exactly-postgres's mapping of a change to
//! a feed item, and the core's row validation. Input: messages, each a big-endian u16 length
//! and that many bytes (a stream from a replication start, as the relay receives it), after a
//! first byte that picks the payload column's type.
#![no_main]

use exactly_core::{FeedItem, KeyMode};
use libfuzzer_sys::fuzz_target;
use pg_walstream::{Lsn, PgOutputDecoder};

fuzz_target!(|data: &[u8]| {
    // The relay starts its feed with protocol version 1, binary values and messages on.
    let mut decoder = PgOutputDecoder::with_protocol_version(1);
    let Some((kind, mut rest)) = data.split_first() else {
        return;
    };
    let payload_type = match kind % 3 {
        0 => exactly_core::wal::PayloadType::Bytea,
        1 => exactly_core::wal::PayloadType::Jsonb,
        _ => exactly_core::wal::PayloadType::Text,
    };
    let mut position = 0u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[2 + body.len()..];
        position += 1;
        let Ok(Some(event)) = decoder.decode_message(bytes::Bytes::copy_from_slice(body), Lsn::new(position))
        else {
            continue;
        };
        if let FeedItem::Event(row) = exactly_postgres::wal::to_feed_item(event, payload_type) {
            let with_key = exactly_core::RawRow {
                sequence: Some(exactly_core::lsn_sequence(position, 0)),
                ..row
            };
            let keys = KeyMode::Sequence {
                source: "fuzz".into(),
            };
            if let Ok(record) = with_key.into_record(&keys, 4096) {
                // Whatever the relay accepts, a consumer must read back as the same event.
                assert!(
                    record.envelope.payload.len() <= 4096,
                    "payload over the limit passed"
                );
                let headers = record.envelope.to_headers(&record.key);
                let delivery = exactly_core::decode_record(
                    headers.iter().map(|(n, v)| (n.as_str(), Some(v.as_slice()))),
                    &record.envelope.payload,
                )
                .expect("a record the relay accepted must decode");
                assert_eq!(delivery.envelope, record.envelope);
                assert_eq!(delivery.key, record.key);
            }
        }
    }
});
