//! What a reader does with a [`GapVerdict`]: the seek back and the log lines the idempotent
//! consumer and the stream processor share (each counts the verdicts under its own metrics).

use std::time::Duration;

use exactly_core::GapVerdict;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::Offset;

/// What became of the record a verdict was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapFollowed {
    /// Take the record.
    Take,
    /// Dropped; its partition reads the gap again.
    Rereading,
    /// Dropped, but the seek back failed: tell the check ([`exactly_core::OffsetGapCheck::refetch_failed`]),
    /// so the next record asks for the second read again.
    SeekFailed,
}

/// Carries out `verdict` on `message`: a first sight of a gap seeks its partition back to the
/// gap's first offset (librdkafka drops what it fetched from there before the seek).
pub fn follow_gap_verdict<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    message: &impl Message,
    verdict: GapVerdict,
) -> GapFollowed {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    match verdict {
        GapVerdict::Take => GapFollowed::Take,
        GapVerdict::Refetch { from } => {
            tracing::debug!(
                "{topic}/{partition}: handed offset {offset} after {}: reading from {from} again",
                from - 1
            );
            match consumer.seek(topic, partition, Offset::Offset(from), Duration::from_secs(10)) {
                Ok(()) => GapFollowed::Rereading,
                Err(e) => {
                    tracing::warn!("seek of {topic}/{partition} back to {from} failed (will retry): {e}");
                    GapFollowed::SeekFailed
                }
            }
        }
        GapVerdict::Filled { skipped } => {
            tracing::warn!(
                "{topic}/{partition}: the broker first served past {skipped} offsets from {offset} that hold records; read again, they are taken in order"
            );
            GapFollowed::Take
        }
        GapVerdict::AcrossGap { missing } => {
            tracing::trace!(
                "{topic}/{partition}: {missing} offsets before {offset} hold no record (transaction markers, aborted or compacted records)"
            );
            GapFollowed::Take
        }
    }
}
