//! What the client's last fetch of a partition said of its end.
//!
//! librdkafka keeps, per partition it fetches, the low and high watermarks of its last fetch
//! response (`rd_kafka_get_watermark_offsets`). Kafka Streams decides whether a task waits for
//! a partition from the same source (the consumer's fetched lag), not from a `ListOffsets`
//! request: no round trip, and on Tansu 0.6.0 the only correct one (its `ListOffsets` answers
//! the last batch's base offset + 1 as the end: 1 for a partition of 40 records written in one
//! batch; its fetch responses carry the right high watermark). rdkafka 0.39 does not wrap the
//! call, so this is the workspace's one use of librdkafka's C API.

use std::ffi::CString;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// The (low, high) watermarks of `topic`/`partition` from the client's last fetch response,
/// or `None` before one arrived (or for a partition this client does not fetch).
pub fn fetched_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed; `topic` is a
    // NUL-terminated string that outlives the call; `low` and `high` are valid for writes.
    // The call only reads the client's cached partition state under its own lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    let known =
        err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0 && high >= 0;
    known.then_some((low, high))
}
