//! The compiled topology: nodes over type-erased records, their grouping into sub-topologies
//! (what one task runs), and the processing of one input record through them. The typed
//! builder ([`super::stream`]) is the only place records are created, so every downcast here
//! matches the type its node was built with.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use exactly_core::UnixMillis;

use super::state::{RecordState, StateAccess, StateError};

/// A key or value whose type only its nodes know.
pub(crate) type Erased = Box<dyn Any + Send>;

/// A record between nodes.
pub(crate) struct Rec {
    pub(crate) key: Erased,
    pub(crate) value: Erased,
    /// Event time.
    pub(crate) time: UnixMillis,
    /// The event's idempotency key, when its source has one (deduplication of aggregates).
    pub(crate) event_id: Option<Arc<str>>,
}

impl Rec {
    pub(crate) fn new<K: Send + 'static, V: Send + 'static>(
        key: K,
        value: V,
        time: UnixMillis,
        event_id: Option<Arc<str>>,
    ) -> Rec {
        Rec {
            key: Box::new(key),
            value: Box::new(value),
            time,
            event_id,
        }
    }

    pub(crate) fn key<K: 'static>(&self) -> &K {
        self.key
            .downcast_ref::<K>()
            .expect("the builder typed this node's keys")
    }

    pub(crate) fn value<V: 'static>(&self) -> &V {
        self.value
            .downcast_ref::<V>()
            .expect("the builder typed this node's values")
    }

    /// The key and value, moved out, and the rest.
    pub(crate) fn into_parts<K: 'static, V: 'static>(self) -> (K, V, UnixMillis, Option<Arc<str>>) {
        let key = *self
            .key
            .downcast::<K>()
            .expect("the builder typed this node's keys");
        let value = *self
            .value
            .downcast::<V>()
            .expect("the builder typed this node's values");
        (key, value, self.time, self.event_id)
    }
}

/// Copies a record of known types (fan-out to several children).
pub(crate) type CloneFn = fn(&Rec) -> Rec;

pub(crate) fn clone_rec<K: Clone + Send + 'static, V: Clone + Send + 'static>(r: &Rec) -> Rec {
    Rec::new(
        r.key::<K>().clone(),
        r.value::<V>().clone(),
        r.time,
        r.event_id.clone(),
    )
}

/// An input record as a runner hands it to the topology.
#[derive(Debug, Clone, Copy)]
pub struct InputRecord<'a> {
    /// Topic (as the topology names it: internal topics without the application prefix).
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<&'a [u8]>,
    /// Value bytes.
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    /// The record's timestamp.
    pub timestamp: Option<i64>,
    /// The latest event time accepted (the wall clock plus the allowed skew); a record whose
    /// event time is later is parked instead of moving stream time, which would make every later
    /// record of its task late. None: no limit (the in-memory runner's default).
    pub latest_event_time: Option<i64>,
}

/// A record the topology sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    /// Topic (internal topics without the application prefix).
    pub topic: String,
    /// Whether the topic is one of the topology's own (repartition).
    pub internal: bool,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes (None: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Timestamp: the event time of the result.
    pub timestamp: i64,
}

/// What one input record did.
#[derive(Debug, Default)]
pub struct Processed {
    /// Records to send, in order.
    pub outputs: Vec<OutputRecord>,
    /// The record was refused whole (nothing of it was applied): the reason to park it.
    pub parked: Option<String>,
    /// Windows (or joins) the record came too late for.
    pub late: u64,
    /// Aggregations the record was already counted in (same event id).
    pub duplicates: u64,
}

/// Why a record stops.
pub(crate) enum Refusal {
    /// Park it with this reason; nothing of it is applied.
    Park(String),
    /// The store failed: the task stops.
    State(StateError),
}

impl From<StateError> for Refusal {
    fn from(e: StateError) -> Self {
        Refusal::State(e)
    }
}

/// What a stateful node sees besides its record.
pub(crate) struct OpCx<'s, 'a> {
    pub(crate) state: &'s mut RecordState<'a>,
    pub(crate) late: &'s mut u64,
    pub(crate) duplicates: &'s mut u64,
}

/// A node with state in named stores.
pub(crate) trait StatefulOp: Send + Sync {
    /// The stores it reads or writes (nodes sharing a store run in one task).
    fn stores(&self) -> Vec<String>;
    /// Processes one record, pushing `(port, record)` downstream.
    fn process(&self, rec: Rec, cx: &mut OpCx<'_, '_>, out: &mut Vec<(usize, Rec)>) -> Result<(), Refusal>;
}

pub(crate) type DecodeFn = dyn Fn(&InputRecord<'_>) -> Result<Rec, String> + Send + Sync;
pub(crate) type StatelessFn = dyn Fn(Rec, &mut Vec<(usize, Rec)>) -> Result<(), String> + Send + Sync;
pub(crate) type EncodeFn = dyn Fn(&Rec) -> Encoded + Send + Sync;

/// A record in bytes: key, value, headers.
pub(crate) type Encoded = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// A topic a node reads or writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TopicRef {
    pub(crate) name: String,
    /// The topology's own (prefixed with the application id by the runtime).
    pub(crate) internal: bool,
}

pub(crate) enum Op {
    Source { topic: TopicRef, decode: Arc<DecodeFn> },
    Stateless(Arc<StatelessFn>),
    Stateful(Arc<dyn StatefulOp>),
    Sink { topic: TopicRef, encode: Arc<EncodeFn> },
}

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) op: Op,
    /// (output port, child).
    pub(crate) children: Vec<(usize, usize)>,
    /// Copies this node's output records.
    pub(crate) clone: CloneFn,
}

/// The group of nodes one task runs for a partition: the topics it reads (co-partitioned) and
/// the stores it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subtopology {
    /// Topics read (internal ones unprefixed).
    pub sources: Vec<String>,
    /// Which of them are internal (repartition) topics.
    pub internal_sources: Vec<String>,
    /// Stores (each with its own changelog).
    pub stores: Vec<String>,
    /// Topics written.
    pub sinks: Vec<String>,
}

/// A built topology: what `StreamsBuilder::build` returns, shared by every task.
pub struct Topology {
    pub(crate) nodes: Vec<Node>,
    /// Source node per topic name.
    pub(crate) sources: BTreeMap<String, usize>,
    pub(crate) subtopologies: Vec<Subtopology>,
    /// Copies of inputs that came too late for a window go here, when set.
    pub(crate) late_topic: Option<String>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field(
                "nodes",
                &self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            )
            .field("subtopologies", &self.subtopologies)
            .finish()
    }
}

/// Header of a dead letter: why.
pub const LATE_REASON: &str = "later than its window's end plus grace";

impl Topology {
    pub(crate) fn from_nodes(nodes: Vec<Node>, late_topic: Option<String>) -> Result<Topology, String> {
        let mut sources = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            if let Op::Source { topic, .. } = &n.op {
                if sources.insert(topic.name.clone(), i).is_some() {
                    return Err(format!("topic {} is read by two sources", topic.name));
                }
            }
        }
        if sources.is_empty() {
            return Err("the topology reads no topic".to_owned());
        }
        let subtopologies = group(&nodes);
        Ok(Topology {
            nodes,
            sources,
            subtopologies,
            late_topic,
        })
    }

    /// The sub-topologies, in a stable order (by their first node).
    pub fn subtopologies(&self) -> &[Subtopology] {
        &self.subtopologies
    }

    /// The sub-topology that reads `topic`.
    pub fn subtopology_of(&self, topic: &str) -> Option<usize> {
        self.subtopologies
            .iter()
            .position(|s| s.sources.iter().any(|t| t == topic))
    }

    /// Every topic the topology reads that is not its own.
    pub fn input_topics(&self) -> Vec<String> {
        self.subtopologies
            .iter()
            .flat_map(|s| {
                s.sources
                    .iter()
                    .filter(|t| !s.internal_sources.contains(t))
                    .cloned()
            })
            .collect()
    }

    /// Whether `topic` (unprefixed) is one of the topology's own topics.
    pub fn is_internal(&self, topic: &str) -> bool {
        self.subtopologies
            .iter()
            .any(|s| s.internal_sources.iter().any(|t| t == topic))
    }

    /// The topology's own topics (repartition), unprefixed.
    pub fn internal_topics(&self) -> Vec<String> {
        self.subtopologies
            .iter()
            .flat_map(|s| s.internal_sources.iter().cloned())
            .collect()
    }

    /// Every topic written that is not the topology's own.
    pub fn output_topics(&self) -> Vec<String> {
        let internal: BTreeSet<String> = self.internal_topics().into_iter().collect();
        let mut out: BTreeSet<String> = self
            .subtopologies
            .iter()
            .flat_map(|s| s.sinks.iter().cloned())
            .filter(|t| !internal.contains(t))
            .collect();
        if let Some(late) = &self.late_topic {
            out.insert(late.clone());
        }
        out.into_iter().collect()
    }

    /// Every store, all sub-topologies.
    pub fn stores(&self) -> Vec<String> {
        self.subtopologies
            .iter()
            .flat_map(|s| s.stores.iter().cloned())
            .collect()
    }

    /// Runs one input record through the nodes reading its topic. Its state writes reach
    /// `state` only if it is processed whole; a record refused anywhere is parked with its
    /// reason and leaves nothing. An error is a store failure (stop the task).
    pub fn process(
        &self,
        input: &InputRecord<'_>,
        state: &mut dyn StateAccess,
    ) -> Result<Processed, StateError> {
        let mut done = Processed::default();
        let Some(&source) = self.sources.get(input.topic) else {
            done.parked = Some(format!("the topology does not read {}", input.topic));
            return Ok(done);
        };
        let rec = match &self.nodes[source].op {
            Op::Source { decode, .. } => match decode(input) {
                Ok(rec) if input.latest_event_time.is_some_and(|latest| rec.time.0 > latest) => {
                    done.parked = Some(format!(
                        "event time {} ms is later than the wall clock allows ({} ms, the allowed skew included)",
                        rec.time.0,
                        input.latest_event_time.unwrap_or_default()
                    ));
                    return Ok(done);
                }
                Ok(rec) => rec,
                Err(reason) => {
                    done.parked = Some(reason);
                    return Ok(done);
                }
            },
            _ => unreachable!("sources map to source nodes"),
        };
        let mut record_state = RecordState::new(state);
        let mut outputs = Vec::new();
        let (mut late, mut duplicates) = (0, 0);
        let mut stack = vec![(source, rec)];
        let mut out = Vec::new();
        while let Some((id, rec)) = stack.pop() {
            let node = &self.nodes[id];
            out.clear();
            let result = match &node.op {
                Op::Source { .. } => {
                    out.push((0, rec));
                    Ok(())
                }
                Op::Stateless(f) => f(rec, &mut out).map_err(Refusal::Park),
                Op::Stateful(op) => {
                    let mut cx = OpCx {
                        state: &mut record_state,
                        late: &mut late,
                        duplicates: &mut duplicates,
                    };
                    op.process(rec, &mut cx, &mut out)
                }
                Op::Sink { topic, encode } => {
                    let (key, value, headers) = encode(&rec);
                    outputs.push(OutputRecord {
                        topic: topic.name.clone(),
                        internal: topic.internal,
                        key,
                        value,
                        headers,
                        timestamp: rec.time.0,
                    });
                    Ok(())
                }
            };
            match result {
                Ok(()) => {}
                Err(Refusal::Park(reason)) => {
                    done.parked = Some(format!("{}: {reason}", node.name));
                    return Ok(done);
                }
                Err(Refusal::State(e)) => return Err(e),
            }
            // Depth first, children in the order they were attached.
            let mut next = Vec::new();
            for (port, r) in out.drain(..) {
                let children: Vec<usize> = node
                    .children
                    .iter()
                    .filter(|(p, _)| *p == port)
                    .map(|(_, c)| *c)
                    .collect();
                if let Some((&last, rest)) = children.split_last() {
                    for &c in rest {
                        next.push((c, (node.clone)(&r)));
                    }
                    next.push((last, r));
                }
            }
            stack.extend(next.into_iter().rev());
        }
        record_state.apply()?;
        if late > 0 {
            if let Some(topic) = &self.late_topic {
                let mut headers: Vec<(String, Vec<u8>)> = input
                    .headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.unwrap_or_default().to_vec()))
                    .collect();
                headers.push((
                    crate::DEAD_REASON_HEADER.to_owned(),
                    LATE_REASON.as_bytes().to_vec(),
                ));
                headers.push((
                    crate::DEAD_ORIGIN_HEADER.to_owned(),
                    format!("{}/{}@{}", input.topic, input.partition, input.offset).into_bytes(),
                ));
                outputs.push(OutputRecord {
                    topic: topic.clone(),
                    internal: false,
                    key: input.key.map(<[u8]>::to_vec),
                    value: input.value.map(<[u8]>::to_vec),
                    headers,
                    timestamp: input.timestamp.unwrap_or_default(),
                });
            }
        }
        done.outputs = outputs;
        done.late = late;
        done.duplicates = duplicates;
        Ok(done)
    }
}

/// Connected groups of nodes: parent and child are together, and so are nodes sharing a store.
/// A sink and the source of the same internal topic are not connected (that is the repartition
/// boundary).
fn group(nodes: &[Node]) -> Vec<Subtopology> {
    let mut parent: Vec<usize> = (0..nodes.len()).collect();
    fn find(parent: &mut [usize], x: usize) -> usize {
        let mut root = x;
        while parent[root] != root {
            root = parent[root];
        }
        let mut x = x;
        while parent[x] != root {
            let next = parent[x];
            parent[x] = root;
            x = next;
        }
        root
    }
    let union = |parent: &mut Vec<usize>, a: usize, b: usize| {
        let (ra, rb) = (find(parent, a), find(parent, b));
        if ra != rb {
            parent[ra.max(rb)] = ra.min(rb);
        }
    };
    let mut by_store: BTreeMap<String, usize> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for (_, c) in &n.children {
            union(&mut parent, i, *c);
        }
        if let Op::Stateful(op) = &n.op {
            for s in op.stores() {
                match by_store.get(&s) {
                    Some(&other) => union(&mut parent, i, other),
                    None => {
                        by_store.insert(s, i);
                    }
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Subtopology> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let root = find(&mut parent, i);
        let g = groups.entry(root).or_insert_with(|| Subtopology {
            sources: Vec::new(),
            internal_sources: Vec::new(),
            stores: Vec::new(),
            sinks: Vec::new(),
        });
        match &n.op {
            Op::Source { topic, .. } => {
                g.sources.push(topic.name.clone());
                if topic.internal {
                    g.internal_sources.push(topic.name.clone());
                }
            }
            Op::Stateful(op) => {
                for s in op.stores() {
                    if !g.stores.contains(&s) {
                        g.stores.push(s);
                    }
                }
            }
            Op::Sink { topic, .. } => {
                if !g.sinks.contains(&topic.name) {
                    g.sinks.push(topic.name.clone());
                }
            }
            Op::Stateless(_) => {}
        }
    }
    groups.into_values().filter(|g| !g.sources.is_empty()).collect()
}
