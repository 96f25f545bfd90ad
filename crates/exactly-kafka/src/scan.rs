//! Reads a whole topic once, from the beginning to its end, for checkers and tests.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{reader_config, Cluster};

use crate::error::KafkaFlowError;

/// How long a reader keeps reading once every partition reported its end, and then until no
/// record came for this long. ListOffsets and end-of-partition events can both be early: on
/// Tansu after relay kills a high watermark was reported 2 below records a consumer then read,
/// and under load a fetch can answer empty below the mark. A reader that stopped at the reported
/// end would miss those records (and the verifier would call them "unseen" or lost).
pub const END_IDLE: Duration = Duration::from_secs(3);

/// When a whole-topic read is over: every partition reported its end, and nothing arrived for
/// [`END_IDLE`] since the last record or end report. Time is an argument, so the rule is tested
/// without a broker.
#[derive(Debug)]
pub struct EndWatch {
    partitions: usize,
    at_end: HashSet<i32>,
    last_activity: Instant,
    idle: Duration,
}

impl EndWatch {
    /// A watch over `partitions` partitions, starting at `now`.
    pub fn new(partitions: i32, idle: Duration, now: Instant) -> Self {
        EndWatch {
            partitions: partitions.max(0) as usize,
            at_end: HashSet::new(),
            last_activity: now,
            idle,
        }
    }

    /// A record of `partition` arrived: that partition is not at its end after all.
    pub fn record(&mut self, partition: i32, now: Instant) {
        self.at_end.remove(&partition);
        self.last_activity = now;
    }

    /// `partition` reported its end.
    pub fn end(&mut self, partition: i32, now: Instant) {
        if self.at_end.insert(partition) {
            self.last_activity = now;
        }
    }

    /// Every partition reported its end and has stayed quiet for the idle period.
    pub fn done(&self, now: Instant) -> bool {
        self.at_end.len() >= self.partitions && now.duration_since(self.last_activity) >= self.idle
    }

    /// Every partition reported its end (perhaps not yet quiet for long).
    pub fn all_ended(&self) -> bool {
        self.at_end.len() >= self.partitions
    }
}

/// A group id no one else uses: readers are assigned partitions, not subscribed.
fn scan_group() -> String {
    format!(
        "exactly-scan-{}-{}",
        std::process::id(),
        crate::relay::unique_suffix()
    )
}

/// A reader of whole partitions with `isolation`; reaching a partition's end is its goal, not an
/// error worth a log line.
fn topic_reader(
    kafka: &(impl Cluster + ?Sized),
    group: &str,
    isolation: &str,
) -> Result<BaseConsumer<crate::QuietEof>, KafkaFlowError> {
    reader_config(kafka, group, isolation)
        .create_with_context(crate::QuietEof)
        .map_err(KafkaFlowError::at("create topic reader"))
}

/// Hands every record of `topic` (partitions 0..`partitions`) to `visit`, from the beginning up
/// to the end, read with `isolation` (`read_committed` or `read_uncommitted`). Errors when some
/// partition's end is not reached within `timeout`.
///
/// The end is not the reported high watermark: see [`END_IDLE`] and [`EndWatch`]. Records past
/// the last stable offset (an open transaction) never come; the idle period ends the read then.
pub fn scan_topic<F>(
    kafka: &(impl Cluster + ?Sized),
    topic: &str,
    partitions: i32,
    isolation: &str,
    timeout: Duration,
    mut visit: F,
) -> Result<(), KafkaFlowError>
where
    F: FnMut(&BorrowedMessage<'_>),
{
    let consumer = topic_reader(kafka, &scan_group(), isolation)?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(KafkaFlowError::at("list partitions"))?;
    }
    consumer
        .assign(&list)
        .map_err(KafkaFlowError::at("assign topic reader"))?;
    read_assigned(&consumer, topic, partitions, timeout, |m| {
        visit(m);
        Ok(())
    })
}

/// Reads what `consumer` is assigned (`partitions` partitions of `topic`, with
/// `enable.partition.eof` on) until [`EndWatch`] says the end is reached, handing each record to
/// `visit`; an error from `visit` stops the read. Errors when the end is not reached within
/// `timeout`. Every reader that needs "everything up to the end" uses this: topic scans, the
/// exactly-once relay's progress, and the stream processor's changelog restore.
///
/// Gaps in a partition's offsets are stepped over, not read twice as the consumers do
/// ([`exactly_core::offset_gap`]): these readers read what was written before them (a
/// changelog whose writer is gone or fenced, a progress topic, a finished run), where a broker
/// has no batch left unstored, and on Kafka a compacted changelog has a gap before most of its
/// records: one more fetch for each would make a restore take minutes.
pub fn read_assigned<C, F>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: i32,
    timeout: Duration,
    mut visit: F,
) -> Result<(), KafkaFlowError>
where
    C: rdkafka::consumer::ConsumerContext,
    F: FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaFlowError>,
{
    let deadline = Instant::now() + timeout;
    let mut watch = EndWatch::new(partitions, END_IDLE, Instant::now());
    while Instant::now() < deadline {
        if watch.done(Instant::now()) {
            return Ok(());
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                watch.record(m.partition(), Instant::now());
                visit(&m)?;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => watch.end(p, Instant::now()),
            Some(Err(e)) => tracing::debug!("reading {topic}: {e}"),
            None => {}
        }
    }
    if watch.all_ended() {
        return Ok(());
    }
    Err(KafkaFlowError::Feed(format!(
        "did not reach the end of {topic} within {timeout:?}"
    )))
}

/// Hands every record of partition `partition` of `topic` to `visit`, read_committed, from the
/// beginning to its stable end: the read is over when nothing written is undecided (the last
/// stable offset equals the high watermark) and the reader's position has reached it. No quiet
/// period: a transaction still open holds the end back until it ends, and an error says so after
/// `timeout`.
pub fn read_to_stable_end<F>(
    kafka: &(impl Cluster + ?Sized),
    topic: &str,
    partition: i32,
    timeout: Duration,
    mut visit: F,
) -> Result<(), KafkaFlowError>
where
    F: FnMut(&BorrowedMessage<'_>),
{
    let group = scan_group();
    let committed = topic_reader(kafka, &group, "read_committed")?;
    let written = topic_reader(kafka, &group, "read_uncommitted")?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Beginning)
        .map_err(KafkaFlowError::at("list partitions"))?;
    committed
        .assign(&list)
        .map_err(KafkaFlowError::at("assign topic reader"))?;
    let deadline = Instant::now() + timeout;
    let mut at_end = false;
    let mut read_to = 0i64;
    let call = Duration::from_secs(10);
    while Instant::now() < deadline {
        match committed.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                at_end = false;
                read_to = read_to.max(m.offset() + 1);
                visit(&m);
                continue;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => at_end = true,
            Some(Err(e)) => tracing::debug!("reading {topic}: {e}"),
            None => {}
        }
        if !at_end {
            continue;
        }
        let (_, stable) = committed
            .fetch_watermarks(topic, partition, call)
            .map_err(KafkaFlowError::at("stable end"))?;
        let (_, end) = written
            .fetch_watermarks(topic, partition, call)
            .map_err(KafkaFlowError::at("end"))?;
        // librdkafka's position passes transaction markers, which are no records.
        let position = committed
            .position()
            .ok()
            .and_then(|l| l.find_partition(topic, partition).map(|e| e.offset()))
            .and_then(|o| match o {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(0)
            .max(read_to);
        if exactly_core::changelog::restore_end(stable, end, position)
            == exactly_core::changelog::RestoreEnd::Done
        {
            return Ok(());
        }
    }
    Err(KafkaFlowError::Feed(format!(
        "did not reach the stable end of {topic}/{partition} within {timeout:?} (a transaction left open on it \
         holds read_committed readers back until it ends)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_goes_on_past_the_reported_end_until_it_is_quiet() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut watch = EndWatch::new(2, Duration::from_secs(3), t0);
        watch.end(0, s(100));
        assert!(!watch.done(s(5_000)), "partition 1 has not reported its end");
        watch.end(1, s(200));
        assert!(!watch.done(s(3_100)), "quiet for less than the idle period");
        // A record below the end that was reported too early (Tansu after relay kills).
        watch.record(1, s(3_150));
        assert!(!watch.done(s(3_200)), "partition 1 is reading again");
        watch.end(1, s(3_300));
        assert!(
            !watch.done(s(6_200)),
            "the idle period starts again after the late record"
        );
        assert!(watch.done(s(6_300)));
    }

    #[test]
    fn a_repeated_end_report_does_not_extend_the_read() {
        let t0 = Instant::now();
        let mut watch = EndWatch::new(1, Duration::from_secs(1), t0);
        watch.end(0, t0);
        watch.end(0, t0 + Duration::from_millis(900));
        assert!(watch.done(t0 + Duration::from_millis(1_000)));
    }
}
