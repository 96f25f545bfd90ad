//! Reads a whole topic once, from the beginning to its end, for checkers and tests.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::error::KafkaFlowError;

/// Hands every record of `topic` (partitions 0..`partitions`) to `visit`, from the beginning up
/// to the end, read with `isolation` (`read_committed` or `read_uncommitted`). Errors when some
/// partition's end is not reached within `timeout`.
///
/// An end-of-partition event can come early (seen on Tansu under load: a fetch answered empty
/// below the high watermark). Once every partition reported its end, a partition whose position
/// is still below its high watermark gets up to 3 s more; records past the last stable offset (an
/// open transaction) never come, hence a bound rather than a wait for the mark.
pub fn scan_topic<F>(
    brokers: &str,
    topic: &str,
    partitions: i32,
    isolation: &str,
    timeout: Duration,
    mut visit: F,
) -> Result<(), KafkaFlowError>
where
    F: FnMut(&BorrowedMessage<'_>),
{
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Assigned, not subscribed: the group only has to be unused.
        .set(
            "group.id",
            format!("exactly-scan-{}-{}", std::process::id(), crate::now().0),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .map_err(KafkaFlowError::at("create topic reader"))?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(KafkaFlowError::at("list partitions"))?;
    }
    consumer
        .assign(&list)
        .map_err(KafkaFlowError::at("assign topic reader"))?;
    let deadline = Instant::now() + timeout;
    let mut at_end = HashSet::new();
    let mut grace: Option<Instant> = None;
    while Instant::now() < deadline {
        if at_end.len() == partitions as usize {
            match grace {
                None if behind(&consumer, topic, partitions) => {
                    grace = Some(Instant::now() + Duration::from_secs(3))
                }
                Some(until) if Instant::now() < until && behind(&consumer, topic, partitions) => {}
                _ => return Ok(()),
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => visit(&m),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(KafkaFlowError::at("read topic")(e)),
            None => {}
        }
    }
    if at_end.len() == partitions as usize {
        return Ok(());
    }
    Err(KafkaFlowError::Feed(format!(
        "did not reach the end of {topic} within {timeout:?}"
    )))
}

/// Whether the reader's position in some partition is below that partition's high watermark.
fn behind(consumer: &BaseConsumer, topic: &str, partitions: i32) -> bool {
    let Ok(positions) = consumer.position() else {
        return false;
    };
    (0..partitions).any(|p| {
        let position = match positions.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => return false,
        };
        consumer
            .fetch_watermarks(topic, p, Duration::from_secs(5))
            .is_ok_and(|(_, high)| position < high)
    })
}
