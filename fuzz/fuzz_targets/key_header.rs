//! The key and header parsers: idempotency key text (`v4:`, `v7:`, `ulid:`, `seq:`) and the
//! outbox's JSON header column. Neither may panic; whatever parses must print back to text
//! that parses to the same value (dedupe tables store the printed form).
#![no_main]

use exactly_core::record::{headers_from_json, headers_to_json};
use exactly_core::IdempotencyKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = text.parse::<IdempotencyKey>() {
        let printed = key.to_string();
        let again: IdempotencyKey = printed.parse().expect("a printed key must parse");
        assert_eq!(again, key);
        assert_eq!(again.to_string(), printed, "printing must be canonical");
        let _ = key.embedded_time();
    }
    if let Ok(headers) = headers_from_json(text) {
        let again = headers_from_json(&headers_to_json(&headers)).expect("printed headers must parse");
        assert_eq!(again, headers);
    }
});
