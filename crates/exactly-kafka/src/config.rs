//! Client settings exactly depends on, in one place.

use rdkafka::ClientConfig;

/// A producer that cannot duplicate or reorder on its own retries: acks from every in-sync
/// replica, idempotence on (which also caps in-flight requests at 5 and keeps order).
/// `gapless` asks librdkafka to fail fatally rather than leave a gap in a partition, which
/// sequence keys need (a gap followed by a resend would put a lower key after a higher one).
pub fn producer_config(brokers: &str, gapless: bool) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "200000");
    if gapless {
        config.set("enable.gapless.guarantee", "true");
    }
    config
}

/// A consumer that commits only what the application committed: no auto commit, start from
/// the earliest record when the group has no offset, read only committed transactions.
pub fn consumer_config(brokers: &str, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    config
}

/// How often librdkafka reports statistics (consumer lag comes from them).
pub(crate) const STATISTICS_INTERVAL_MS: &str = "5000";

/// Exports each partition's consumer lag (records between the committed position and the high
/// watermark, as librdkafka measures it) as the gauge `metric{topic, partition}`.
pub fn export_consumer_lag(statistics: &rdkafka::Statistics, metric: &'static str) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            // -1: unknown (not assigned here, or no position yet); partition -1 is librdkafka's
            // internal unassigned-messages queue.
            if *partition < 0 || p.consumer_lag < 0 {
                continue;
            }
            metrics::gauge!(metric, "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
        }
    }
}
