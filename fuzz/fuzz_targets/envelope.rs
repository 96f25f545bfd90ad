//! The envelope decoder a consumer runs on every record (headers as the client yields them,
//! a header possibly without value), and the table-less outbox message decoder. Neither may
//! panic; a decoded record re-encoded from its envelope must decode to the same delivery.
#![no_main]

use arbitrary::Arbitrary;
use exactly_core::{decode_record, header, source_header, IdempotencyKey};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Record<'a> {
    headers: Vec<(&'a str, Option<&'a [u8]>)>,
    payload: &'a [u8],
    message: &'a [u8],
}

fuzz_target!(|input: Record<'_>| {
    if let Ok(delivery) = decode_record(input.headers.iter().copied(), input.payload) {
        let mut headers = delivery.envelope.to_headers(&delivery.key);
        if let (Some(epoch), IdempotencyKey::Sequence { source, .. }) = (delivery.source_epoch, &delivery.key)
        {
            headers.push((
                header::SOURCE.to_owned(),
                source_header(source, epoch).into_bytes(),
            ));
        }
        let again = decode_record(
            headers.iter().map(|(n, v)| (n.as_str(), Some(v.as_slice()))),
            &delivery.envelope.payload,
        )
        .expect("a re-encoded delivery must decode");
        assert_eq!(again, delivery);
    }
    let _ = exactly_core::wal::decode_message_event(input.message);
});
