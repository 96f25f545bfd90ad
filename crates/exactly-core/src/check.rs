//! The end-to-end checker of `exactly verify`, after Jepsen's queue checker: given what the
//! source committed and rolled back, what the topic holds, and what each consumer applied and
//! parked, it finds every anomaly.
//!
//! - **lost**: committed, neither applied nor parked by a consumer;
//! - **duplicate**: applied more than once by one consumer;
//! - **unseen**: on the topic, neither applied nor parked by a consumer;
//! - **non-monotonic**: a consumer applied an aggregate's events out of commit order;
//! - **aborted read**: an event of a rolled-back transaction on the topic or applied.
//!
//! Ids are the events' idempotency identities as text (event ids), so the checker works for
//! every key kind.

use std::collections::{BTreeMap, HashMap, HashSet};

/// One committed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEvent {
    /// Event id.
    pub id: String,
    /// The aggregate it belongs to.
    pub aggregate: String,
    /// Its position among the aggregate's events, in commit order.
    pub ordinal: u64,
}

/// What one consumer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerHistory {
    /// Consumer name (for the report).
    pub name: String,
    /// Event ids in the order their effects were applied (repeats included).
    pub applied: Vec<String>,
    /// Event ids parked with a reason (records without a readable id are only counted).
    pub parked: HashSet<String>,
}

/// Everything the checker reads.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Committed events (the ones every consumer must apply once).
    pub committed: Vec<CommittedEvent>,
    /// Event ids of rolled-back transactions (must never appear).
    pub rolled_back: HashSet<String>,
    /// Event ids on the topic (read_committed, repeats removed).
    pub on_topic: HashSet<String>,
    /// The consumers.
    pub consumers: Vec<ConsumerHistory>,
}

/// The kinds of anomaly, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Anomaly {
    /// Committed, never applied nor parked.
    Lost,
    /// Applied more than once.
    Duplicate,
    /// On the topic, never applied nor parked.
    Unseen,
    /// An aggregate's events applied out of commit order.
    NonMonotonic,
    /// A rolled-back event visible.
    AbortedRead,
}

impl Anomaly {
    /// Every kind, in report order.
    pub const ALL: [Anomaly; 5] = [
        Anomaly::Lost,
        Anomaly::Duplicate,
        Anomaly::Unseen,
        Anomaly::NonMonotonic,
        Anomaly::AbortedRead,
    ];

    /// The report's name.
    pub fn name(self) -> &'static str {
        match self {
            Anomaly::Lost => "lost",
            Anomaly::Duplicate => "duplicate",
            Anomaly::Unseen => "unseen",
            Anomaly::NonMonotonic => "non-monotonic",
            Anomaly::AbortedRead => "aborted read",
        }
    }
}

/// How many examples per anomaly a [`Findings`] keeps.
pub const EXAMPLES: usize = 5;

/// One anomaly kind's count and first examples (`consumer: detail`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finding {
    /// How many.
    pub count: u64,
    /// The first few.
    pub examples: Vec<String>,
}

/// The checker's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Per anomaly kind.
    pub anomalies: BTreeMap<Anomaly, Finding>,
    /// Distinct events applied, per consumer.
    pub applied: BTreeMap<String, u64>,
    /// Events parked, per consumer.
    pub parked: BTreeMap<String, u64>,
}

impl Findings {
    fn record(&mut self, kind: Anomaly, example: impl FnOnce() -> String) {
        let finding = self.anomalies.entry(kind).or_default();
        finding.count += 1;
        if finding.examples.len() < EXAMPLES {
            finding.examples.push(example());
        }
    }

    /// How many of `kind`.
    pub fn count(&self, kind: Anomaly) -> u64 {
        self.anomalies.get(&kind).map_or(0, |f| f.count)
    }

    /// No anomaly at all.
    pub fn ok(&self) -> bool {
        Anomaly::ALL.iter().all(|k| self.count(*k) == 0)
    }
}

/// Checks `history`.
pub fn check(history: &History) -> Findings {
    let mut findings = Findings::default();
    for kind in Anomaly::ALL {
        findings.anomalies.insert(kind, Finding::default());
    }
    let committed: HashMap<&str, &CommittedEvent> =
        history.committed.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut on_topic: Vec<&String> = history.on_topic.iter().collect();
    on_topic.sort();
    for id in &on_topic {
        if history.rolled_back.contains(*id) {
            findings.record(Anomaly::AbortedRead, || format!("topic: {id}"));
        }
    }
    for consumer in &history.consumers {
        let name = &consumer.name;
        let mut times: HashMap<&str, u64> = HashMap::new();
        let mut last_ordinal: HashMap<&str, u64> = HashMap::new();
        for id in &consumer.applied {
            let n = times.entry(id.as_str()).or_insert(0);
            *n += 1;
            if *n == 2 {
                findings.record(Anomaly::Duplicate, || format!("{name}: {id}"));
            }
            if *n > 1 {
                continue;
            }
            if history.rolled_back.contains(id) {
                findings.record(Anomaly::AbortedRead, || format!("{name}: {id}"));
            }
            if let Some(event) = committed.get(id.as_str()) {
                let last = last_ordinal.entry(event.aggregate.as_str()).or_insert(0);
                if event.ordinal < *last {
                    findings.record(Anomaly::NonMonotonic, || {
                        format!(
                            "{name}: {} #{} applied after #{}",
                            event.aggregate, event.ordinal, *last
                        )
                    });
                }
                *last = (*last).max(event.ordinal);
            }
        }
        for event in &history.committed {
            if !times.contains_key(event.id.as_str()) && !consumer.parked.contains(&event.id) {
                findings.record(Anomaly::Lost, || format!("{name}: {}", event.id));
            }
        }
        for id in &on_topic {
            if !times.contains_key(id.as_str()) && !consumer.parked.contains(*id) {
                findings.record(Anomaly::Unseen, || format!("{name}: {id}"));
            }
        }
        findings.applied.insert(name.clone(), times.len() as u64);
        findings.parked.insert(name.clone(), consumer.parked.len() as u64);
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn committed(n: u64) -> Vec<CommittedEvent> {
        (0..n)
            .map(|i| CommittedEvent {
                id: format!("e{i}"),
                aggregate: format!("A{}", i % 3),
                ordinal: i / 3,
            })
            .collect()
    }

    #[test]
    fn each_anomaly_is_found_and_named() {
        let events = committed(6);
        let mut consumer = ConsumerHistory {
            name: "c".into(),
            // e0 twice, e3 (A0 #1) before e0 (A0 #0) is fine only the first time: here e3 comes
            // first, so e0 after it is non-monotonic; e5 lost; "rb" an aborted read.
            applied: ["e3", "e0", "e0", "e1", "e2", "rb"].map(String::from).to_vec(),
            parked: HashSet::new(),
        };
        consumer.parked.insert("e4".into());
        let history = History {
            committed: events,
            rolled_back: ["rb".to_owned()].into(),
            on_topic: ["e0", "e1", "e2", "e3", "e4", "e5", "x"].map(String::from).into(),
            consumers: vec![consumer],
        };
        let findings = check(&history);
        assert_eq!(findings.count(Anomaly::Duplicate), 1);
        assert_eq!(findings.count(Anomaly::NonMonotonic), 1);
        assert_eq!(findings.count(Anomaly::Lost), 1, "e5");
        assert_eq!(findings.count(Anomaly::Unseen), 2, "e5 and x");
        assert_eq!(findings.count(Anomaly::AbortedRead), 1);
        assert_eq!(
            findings.anomalies[&Anomaly::Lost].examples,
            vec!["c: e5".to_owned()]
        );
        assert!(!findings.ok());
    }

    proptest! {
        /// Any delivery that applies each event once in per-aggregate commit order (aggregates
        /// interleaved any way) is clean; dropping one event is exactly one loss and one unseen.
        #[test]
        fn an_exactly_once_history_is_clean_and_a_drop_is_caught(
            n in 1u64..60,
            interleave in proptest::collection::vec(0usize..3, 0..200),
            drop_at in any::<proptest::sample::Index>(),
        ) {
            let events = committed(n);
            let mut queues: Vec<Vec<&CommittedEvent>> = vec![vec![], vec![], vec![]];
            for e in &events {
                queues[e.aggregate[1..].parse::<usize>().unwrap_or(0)].push(e);
            }
            let mut applied = Vec::new();
            let mut picks = interleave.into_iter();
            while queues.iter().any(|q| !q.is_empty()) {
                let mut q = picks.next().unwrap_or(0) % 3;
                while queues[q].is_empty() {
                    q = (q + 1) % 3;
                }
                applied.push(queues[q].remove(0).id.clone());
            }
            let topic: HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
            let history = History {
                committed: events.clone(),
                rolled_back: HashSet::new(),
                on_topic: topic.clone(),
                consumers: vec![ConsumerHistory { name: "c".into(), applied: applied.clone(), parked: HashSet::new() }],
            };
            let findings = check(&history);
            prop_assert!(findings.ok(), "{:?}", findings);
            prop_assert_eq!(findings.applied["c"], n);

            let mut dropped = applied;
            dropped.remove(drop_at.index(dropped.len()));
            let history = History {
                consumers: vec![ConsumerHistory { name: "c".into(), applied: dropped, parked: HashSet::new() }],
                ..history
            };
            let findings = check(&history);
            prop_assert_eq!(findings.count(Anomaly::Lost), 1);
            prop_assert_eq!(findings.count(Anomaly::Unseen), 1);
            prop_assert_eq!(findings.count(Anomaly::Duplicate), 0);
        }
    }
}
