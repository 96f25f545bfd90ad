//! The watch over the partitions this member does not hold: a group whose records wait
//! unread gets a rejoin, and a member that cannot read its group for three looks gets a new
//! Kafka client (see `rejoin_if_group_is_stuck`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use exactly_core::EffectStore;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::*;

/// How often the group is looked at: longer than a rebalance (session timeout 6 s, joins
/// waiting part of the 10 s rebalance timeout), so a look never mistakes one for a stall.
const GROUP_LOOK_INTERVAL: Duration = Duration::from_secs(15);

/// Looks in a row, with no partition held, that could not read the group or rejoined it,
/// before the client is replaced.
/// Seen on Tansu: after a network partition, a connection to the coordinator stayed open and
/// the broker never read from it again, so every group request timed out while new
/// connections worked. librdkafka keeps such a connection; on Kafka a half-open connection
/// after a partition does the same until TCP gives up. A new client has new connections.
pub(super) const FRUITLESS_LOOKS_BEFORE_REBUILD: u32 = 3;

/// Watches whether the partitions this member does not hold are read by somebody; due once
/// per look interval.
#[derive(Default)]
pub(super) struct GroupWatch {
    pub(super) last_look: Option<Instant>,
    /// The committed positions, at the last look, of the partitions this member did not hold
    /// and where records were waiting.
    pub(super) positions: Option<Vec<(String, i32, i64)>>,
    /// Looks in a row, with no partition held, that could not read the group or rejoined it.
    pub(super) fruitless: u32,
}

impl GroupWatch {
    pub(super) fn due(&mut self) -> bool {
        match self.last_look {
            None => {
                // The first look only after one interval: a new member is still joining.
                self.last_look = Some(Instant::now());
                false
            }
            Some(at) if at.elapsed() < GROUP_LOOK_INTERVAL => false,
            Some(_) => {
                self.last_look = Some(Instant::now());
                true
            }
        }
    }
}

impl<S: EffectStore> IdempotentConsumer<S> {
    /// Rejoins when records wait in partitions this member does not hold and nobody reads
    /// them: the group's committed offsets there did not move since the last look (one look
    /// interval ago). On Kafka a partition is always held by a live member that reads it, so
    /// this never fires; Tansu 0.6.0 gets there two ways. After a broker restart the leader
    /// synced an empty assignment and nothing triggered another. After a member's session
    /// expired while its group was forming, the group formed with that member's assignment
    /// still in it (one member, two assignments), and its partitions were never read again.
    /// Tansu's group descriptions list no members, hence offsets, not members. A rejoin (leave,
    /// join) makes Tansu form the group anew from the members alive.
    pub(super) fn rejoin_if_group_is_stuck(&self, watch: &mut GroupWatch) {
        // Short timeouts: these calls block this loop, and a rebalance waits for it to poll.
        const LOOK: Duration = Duration::from_millis(500);
        let group = &self.config.group_id;
        let consumer = self.consumer();
        let held: HashSet<(String, i32)> = match consumer.assignment() {
            Ok(list) => list
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(_) => HashSet::new(),
        };
        // Only a member without partitions counts looks that fail: one that holds partitions
        // is reading them, so its connections work.
        let fruitless = |watch: &mut GroupWatch| {
            if held.is_empty() {
                watch.fruitless += 1;
            }
        };
        let mut list = TopicPartitionList::new();
        for topic in &self.config.topics {
            match consumer.fetch_metadata(Some(topic), LOOK) {
                Ok(m) => {
                    for t in m.topics() {
                        for p in t.partitions() {
                            if !held.contains(&(t.name().to_owned(), p.id())) {
                                list.add_partition(t.name(), p.id());
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot read metadata of {topic} (group check): {e}");
                    fruitless(watch);
                    return;
                }
            }
        }
        if !held.is_empty() {
            watch.fruitless = 0;
        }
        if list.count() == 0 {
            watch.positions = None;
            return;
        }
        let committed = match consumer.committed_offsets(list, LOOK) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read the committed offsets of {group} (group check): {e}");
                fruitless(watch);
                return;
            }
        };
        let mut waiting = Vec::new();
        for e in committed.elements() {
            let Ok((low, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), LOOK) else {
                fruitless(watch);
                return;
            };
            let position = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            if high > position {
                waiting.push((e.topic().to_owned(), e.partition(), position));
            }
        }
        let waiting = (!waiting.is_empty()).then_some(waiting);
        let stuck = waiting.is_some() && watch.positions == waiting;
        watch.positions = waiting;
        if !stuck {
            return;
        }
        watch.positions = None;
        tracing::warn!(
            "group {group}: records wait in partitions no member reads ({} held here): rejoining",
            held.len()
        );
        metrics::counter!("exactly_consumer_rejoins_total").increment(1);
        fruitless(watch);
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer.unsubscribe();
        if let Err(e) = consumer.subscribe(&topics) {
            tracing::warn!("resubscribing failed (will retry): {e}");
        }
    }
}
