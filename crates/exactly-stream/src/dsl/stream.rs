//! The typed builder: [`StreamsBuilder`], [`KStream`], [`KGroupedStream`], the windowed
//! streams and [`KTable`], in the shape of Kafka Streams' DSL.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

use exactly_core::windowing::{SessionWindows, TimeWindows};
use exactly_core::UnixMillis;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::consumed::{Consumed, Grouped, Produced, EVENT_ID_HEADER, TIME_HEADER};
use super::graph::{clone_rec, CloneFn, Node, Op, Rec, StatefulOp, TopicRef, Topology};
use super::join_ops::{JoinSide, JoinWindows};
use super::table_ops::{StreamTableJoin, TableAgg, TableSource};
use super::window_ops::{Emit, SessionAgg, TimeWindowAgg, Windowed};

/// What flows through a stream: owned, cloneable (fan-out) and shareable between tasks.
pub trait Data: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> Data for T {}

/// What is kept in a store or crosses a repartition topic: [`Data`] with a serde form.
pub trait StateData: Data + Serialize + DeserializeOwned {}
impl<T: Data + Serialize + DeserializeOwned> StateData for T {}

/// A branch's predicate ([`KStream::split`]).
pub type Predicate<K, V> = Box<dyn Fn(&K, &V) -> bool + Send + Sync>;

/// The topology could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream topology: {0}")]
pub struct BuildError(pub String);

/// How long a non-windowed aggregation remembers event ids to skip repeats, by default: a day
/// of stream time.
pub const DEFAULT_DEDUPE_HORIZON_MS: i64 = 24 * 3_600_000;

struct Inner {
    nodes: Vec<Node>,
    late_topic: Option<String>,
    errors: Vec<String>,
    names: Vec<String>,
}

impl Inner {
    fn add(&mut self, kind: &str, op: Op, clone: CloneFn, parents: &[(usize, usize)]) -> usize {
        let id = self.nodes.len();
        self.nodes.push(Node {
            name: format!("{kind}-{id:04}"),
            op,
            children: Vec::new(),
            clone,
        });
        for (parent, port) in parents {
            if let Some(p) = self.nodes.get_mut(*parent) {
                p.children.push((*port, id));
            }
        }
        id
    }

    /// A store name, the user's or the next number; checked to be usable in topic names.
    fn store_name(&mut self, kind: &str, wanted: Option<&str>) -> String {
        let name = wanted.map_or_else(|| format!("{kind}-{:04}", self.nodes.len()), str::to_owned);
        if name.is_empty()
            || name.len() > 180
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            self.errors.push(format!(
                "{name:?} cannot name an aggregation: use 1 to 180 of [A-Za-z0-9._-] (it names topics)"
            ));
        }
        if self.names.contains(&name) {
            self.errors.push(format!("two aggregations are named {name}"));
        }
        self.names.push(name.clone());
        name
    }
}

/// Builds a [`Topology`].
pub struct StreamsBuilder {
    inner: Rc<RefCell<Inner>>,
}

impl Default for StreamsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamsBuilder {
    /// An empty topology.
    pub fn new() -> Self {
        StreamsBuilder {
            inner: Rc::new(RefCell::new(Inner {
                nodes: Vec::new(),
                late_topic: None,
                errors: Vec::new(),
                names: Vec::new(),
            })),
        }
    }

    /// A stream of `topic`'s records.
    pub fn stream<K: Data, V: Data>(&self, topic: &str, consumed: Consumed<K, V>) -> KStream<K, V> {
        let decode = consumed.decode;
        let op = Op::Source {
            topic: TopicRef {
                name: topic.to_owned(),
                internal: false,
            },
            decode: Arc::new(move |input| {
                let (k, v, t, id) = decode(input)?;
                Ok(Rec::new(k, v, t, id))
            }),
        };
        let node = self.inner.borrow_mut().add("source", op, clone_rec::<K, V>, &[]);
        KStream::at(&self.inner, node, false)
    }

    /// A table of `topic`: the latest value per key (a null value deletes the key). It is
    /// joined with streams of the same partitioning (same key, same partition count).
    pub fn table<K: StateData, V: StateData>(&self, topic: &str, consumed: Consumed<K, V>) -> KTable<K, V> {
        let mut inner = self.inner.borrow_mut();
        let Some(decode) = consumed.table else {
            inner.errors.push(format!(
                "table {topic}: an envelope topic is a stream, not a table"
            ));
            drop(inner);
            return KTable::at(&self.inner, 0, None);
        };
        let source = inner.add(
            "table-source",
            Op::Source {
                topic: TopicRef {
                    name: topic.to_owned(),
                    internal: false,
                },
                decode: Arc::new(move |input| {
                    let (k, v, t) = decode(input)?;
                    Ok(Rec::new(k, v, t, None))
                }),
            },
            clone_rec::<K, Option<V>>,
            &[],
        );
        let store = inner.store_name("table", Some(&format!("{topic}-table")));
        let op: Arc<dyn StatefulOp> = Arc::new(TableSource::<K, V> {
            store: store.clone(),
            types: PhantomData,
        });
        let node = inner.add(
            "table",
            Op::Stateful(op),
            clone_rec::<K, Option<V>>,
            &[(source, 0)],
        );
        drop(inner);
        KTable::at(&self.inner, node, Some(store))
    }

    /// Copies of input records that came too late for a window (or a join) go to `topic`, with
    /// the reason and origin headers of the dead-letter topic.
    pub fn late_records_to(&self, topic: &str) {
        self.inner.borrow_mut().late_topic = Some(topic.to_owned());
    }

    /// The topology.
    pub fn build(self) -> Result<Topology, BuildError> {
        // Streams still held elsewhere keep an emptied builder: nothing more can be added.
        let inner = std::mem::replace(
            &mut *self.inner.borrow_mut(),
            Inner {
                nodes: Vec::new(),
                late_topic: None,
                errors: vec!["this builder was built already".to_owned()],
                names: Vec::new(),
            },
        );
        if let Some(e) = inner.errors.first() {
            return Err(BuildError(e.clone()));
        }
        Topology::from_nodes(inner.nodes, inner.late_topic).map_err(BuildError)
    }
}

/// A stream of keyed records.
pub struct KStream<K, V> {
    inner: Rc<RefCell<Inner>>,
    node: usize,
    /// A key-changing operation happened since the source: grouping by key repartitions.
    key_changed: bool,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for KStream<K, V> {
    fn clone(&self) -> Self {
        KStream {
            inner: self.inner.clone(),
            node: self.node,
            key_changed: self.key_changed,
            types: PhantomData,
        }
    }
}

impl<K: Data, V: Data> KStream<K, V> {
    fn at(inner: &Rc<RefCell<Inner>>, node: usize, key_changed: bool) -> Self {
        KStream {
            inner: inner.clone(),
            node,
            key_changed,
            types: PhantomData,
        }
    }

    fn stateless<K2: Data, V2: Data>(
        &self,
        kind: &str,
        key_changed: bool,
        f: impl Fn(Rec, &mut Vec<(usize, Rec)>) -> Result<(), String> + Send + Sync + 'static,
    ) -> KStream<K2, V2> {
        let node = self.inner.borrow_mut().add(
            kind,
            Op::Stateless(Arc::new(f)),
            clone_rec::<K2, V2>,
            &[(self.node, 0)],
        );
        KStream::at(&self.inner, node, self.key_changed || key_changed)
    }

    /// Keeps the records `keep` says yes to.
    pub fn filter(&self, keep: impl Fn(&K, &V) -> bool + Send + Sync + 'static) -> KStream<K, V> {
        self.stateless("filter", false, move |r, out| {
            if keep(r.key::<K>(), r.value::<V>()) {
                out.push((0, r));
            }
            Ok(())
        })
    }

    /// Drops the records `drop` says yes to.
    pub fn filter_not(&self, drop: impl Fn(&K, &V) -> bool + Send + Sync + 'static) -> KStream<K, V> {
        self.filter(move |k, v| !drop(k, v))
    }

    /// A new key and value per record.
    pub fn map<K2: Data, V2: Data>(
        &self,
        f: impl Fn(K, V) -> (K2, V2) + Send + Sync + 'static,
    ) -> KStream<K2, V2> {
        self.stateless("map", true, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            let (k2, v2) = f(k, v);
            out.push((0, Rec::new(k2, v2, t, id)));
            Ok(())
        })
    }

    /// A new key and value per record, or the reason to park it (nothing of the record is
    /// applied, and the partition goes on).
    pub fn try_map<K2: Data, V2: Data>(
        &self,
        f: impl Fn(K, V) -> Result<(K2, V2), String> + Send + Sync + 'static,
    ) -> KStream<K2, V2> {
        self.stateless("try-map", true, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            let (k2, v2) = f(k, v)?;
            out.push((0, Rec::new(k2, v2, t, id)));
            Ok(())
        })
    }

    /// A new value per record, or the reason to park it; the key stays.
    pub fn try_map_values<V2: Data>(
        &self,
        f: impl Fn(&K, V) -> Result<V2, String> + Send + Sync + 'static,
    ) -> KStream<K, V2> {
        self.stateless("try-map-values", false, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            let v2 = f(&k, v)?;
            out.push((0, Rec::new(k, v2, t, id)));
            Ok(())
        })
    }

    /// A new value per record; the key stays.
    pub fn map_values<V2: Data>(&self, f: impl Fn(V) -> V2 + Send + Sync + 'static) -> KStream<K, V2> {
        self.stateless("map-values", false, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            out.push((0, Rec::new(k, f(v), t, id)));
            Ok(())
        })
    }

    /// Zero or more records per record.
    pub fn flat_map<K2: Data, V2: Data>(
        &self,
        f: impl Fn(K, V) -> Vec<(K2, V2)> + Send + Sync + 'static,
    ) -> KStream<K2, V2> {
        self.stateless("flat-map", true, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            for (k2, v2) in f(k, v) {
                out.push((0, Rec::new(k2, v2, t, id.clone())));
            }
            Ok(())
        })
    }

    /// Zero or more values per record; the key stays.
    pub fn flat_map_values<V2: Data>(
        &self,
        f: impl Fn(V) -> Vec<V2> + Send + Sync + 'static,
    ) -> KStream<K, V2> {
        self.stateless("flat-map-values", false, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            for v2 in f(v) {
                out.push((0, Rec::new(k.clone(), v2, t, id.clone())));
            }
            Ok(())
        })
    }

    /// A new key per record.
    pub fn select_key<K2: Data>(&self, f: impl Fn(&K, &V) -> K2 + Send + Sync + 'static) -> KStream<K2, V> {
        self.stateless("select-key", true, move |r, out| {
            let (k, v, t, id) = r.into_parts::<K, V>();
            let k2 = f(&k, &v);
            out.push((0, Rec::new(k2, v, t, id)));
            Ok(())
        })
    }

    /// Looks at each record (logging, metrics) and passes it on.
    pub fn peek(&self, f: impl Fn(&K, &V) + Send + Sync + 'static) -> KStream<K, V> {
        self.stateless("peek", false, move |r, out| {
            f(r.key::<K>(), r.value::<V>());
            out.push((0, r));
            Ok(())
        })
    }

    /// Splits the stream: each record goes to the first branch whose predicate holds, or to
    /// the last stream returned (the default branch) when none does. Returns
    /// `predicates.len() + 1` streams.
    pub fn split(&self, predicates: Vec<Predicate<K, V>>) -> Vec<KStream<K, V>> {
        let n = predicates.len();
        let node = self.inner.borrow_mut().add(
            "split",
            Op::Stateless(Arc::new(move |r, out| {
                let port = predicates
                    .iter()
                    .position(|p| p(r.key::<K>(), r.value::<V>()))
                    .unwrap_or(n);
                out.push((port, r));
                Ok(())
            })),
            clone_rec::<K, V>,
            &[(self.node, 0)],
        );
        (0..=n)
            .map(|port| {
                let branch = self.inner.borrow_mut().add(
                    "branch",
                    Op::Stateless(Arc::new(|r, out| {
                        out.push((0, r));
                        Ok(())
                    })),
                    clone_rec::<K, V>,
                    &[(node, port)],
                );
                KStream::at(&self.inner, branch, self.key_changed)
            })
            .collect()
    }

    /// Both streams as one.
    pub fn merge(&self, other: &KStream<K, V>) -> KStream<K, V> {
        let node = self.inner.borrow_mut().add(
            "merge",
            Op::Stateless(Arc::new(|r, out| {
                out.push((0, r));
                Ok(())
            })),
            clone_rec::<K, V>,
            &[(self.node, 0), (other.node, 0)],
        );
        KStream::at(&self.inner, node, self.key_changed || other.key_changed)
    }

    /// Writes the stream to `topic`.
    pub fn to(&self, topic: &str, produced: Produced<K, V>) {
        let Produced { key, value } = produced;
        self.inner.borrow_mut().add(
            "sink",
            Op::Sink {
                topic: TopicRef {
                    name: topic.to_owned(),
                    internal: false,
                },
                encode: Arc::new(move |r| {
                    (key.encode(r.key::<K>()), value.encode(r.value::<V>()), Vec::new())
                }),
            },
            clone_rec::<K, V>,
            &[(self.node, 0)],
        );
    }

    /// Groups by the record key. After a key-changing operation (`map`, `flat_map`,
    /// `select_key`) the records go through a repartition topic first, so all of a key's
    /// records meet in one task.
    pub fn group_by_key(&self, grouped: Grouped<K, V>) -> KGroupedStream<K, V> {
        KGroupedStream {
            stream: self.clone(),
            repartition: self.key_changed,
            grouped,
        }
    }

    /// Groups by a new key: always through a repartition topic.
    pub fn group_by<K2: Data>(
        &self,
        key: impl Fn(&K, &V) -> K2 + Send + Sync + 'static,
        grouped: Grouped<K2, V>,
    ) -> KGroupedStream<K2, V> {
        KGroupedStream {
            stream: self.select_key(key),
            repartition: true,
            grouped,
        }
    }

    fn join_table_with<T: StateData, R: Data>(
        &self,
        table: &KTable<K, T>,
        left: bool,
        joiner: impl Fn(&K, &V, Option<&T>) -> R + Send + Sync + 'static,
    ) -> KStream<K, R>
    where
        K: Serialize,
    {
        let mut inner = self.inner.borrow_mut();
        let Some(store) = table.store.clone() else {
            inner
                .errors
                .push("a stream joins only a table read from a topic (`StreamsBuilder::table`)".to_owned());
            drop(inner);
            return KStream::at(&self.inner, self.node, self.key_changed);
        };
        if self.key_changed {
            inner.errors.push(format!(
                "a stream whose key changed cannot join table {store} without repartitioning: write it to a topic keyed like the table first"
            ));
        }
        let op: Arc<dyn StatefulOp> = Arc::new(StreamTableJoin::<K, V, T, R> {
            store,
            left,
            joiner: Arc::new(joiner),
        });
        let node = inner.add(
            "join-table",
            Op::Stateful(op),
            clone_rec::<K, R>,
            &[(self.node, 0)],
        );
        drop(inner);
        KStream::at(&self.inner, node, self.key_changed)
    }

    /// Enriches each record with the table's value for its key; records the table has no
    /// value for are dropped. Stream and table must be partitioned alike.
    pub fn join<T: StateData, R: Data>(
        &self,
        table: &KTable<K, T>,
        joiner: impl Fn(&K, &V, &T) -> R + Send + Sync + 'static,
    ) -> KStream<K, R>
    where
        K: Serialize,
    {
        self.join_table_with(table, false, move |k, v, t| match t {
            Some(t) => joiner(k, v, t),
            None => unreachable!("an inner join calls its joiner with a table value"),
        })
    }

    /// Enriches each record with the table's value for its key, `None` when it has none.
    pub fn left_join<T: StateData, R: Data>(
        &self,
        table: &KTable<K, T>,
        joiner: impl Fn(&K, &V, Option<&T>) -> R + Send + Sync + 'static,
    ) -> KStream<K, R>
    where
        K: Serialize,
    {
        self.join_table_with(table, true, joiner)
    }

    /// Joins with another stream: every pair of records with the same key at most
    /// `windows.window_ms` apart in event time, once. Both streams must be partitioned alike.
    pub fn join_windowed<W: StateData, R: Data>(
        &self,
        other: &KStream<K, W>,
        windows: JoinWindows,
        name: Option<&str>,
        joiner: impl Fn(&K, &V, &W) -> R + Send + Sync + 'static,
    ) -> KStream<K, R>
    where
        K: Serialize,
        V: Serialize + DeserializeOwned,
    {
        let mut inner = self.inner.borrow_mut();
        if self.key_changed || other.key_changed {
            inner.errors.push(
                "a stream whose key changed cannot join another stream without repartitioning: write it to a topic first"
                    .to_owned(),
            );
        }
        let store = inner.store_name("join", name);
        let joiner = Arc::new(joiner);
        let flipped = joiner.clone();
        let left: Arc<dyn StatefulOp> = Arc::new(JoinSide::<K, V, W, R> {
            store: store.clone(),
            this: b'l',
            other: b'r',
            windows,
            joiner: Arc::new(move |k, v, w| joiner(k, v, w)),
        });
        let right: Arc<dyn StatefulOp> = Arc::new(JoinSide::<K, W, V, R> {
            store,
            this: b'r',
            other: b'l',
            windows,
            joiner: Arc::new(move |k, w, v| flipped(k, v, w)),
        });
        let l = inner.add(
            "join-left",
            Op::Stateful(left),
            clone_rec::<K, R>,
            &[(self.node, 0)],
        );
        let r = inner.add(
            "join-right",
            Op::Stateful(right),
            clone_rec::<K, R>,
            &[(other.node, 0)],
        );
        let node = inner.add(
            "join-merge",
            Op::Stateless(Arc::new(|r, out| {
                out.push((0, r));
                Ok(())
            })),
            clone_rec::<K, R>,
            &[(l, 0), (r, 0)],
        );
        drop(inner);
        KStream::at(&self.inner, node, false)
    }
}

/// A stream grouped by key, ready to aggregate.
pub struct KGroupedStream<K, V> {
    stream: KStream<K, V>,
    repartition: bool,
    grouped: Grouped<K, V>,
}

impl<K: StateData, V: Data> KGroupedStream<K, V> {
    /// The node an aggregation attaches to, and its store name: through the repartition topic
    /// `<store>-repartition` when needed.
    fn aggregation_input(&self, kind: &str) -> (usize, String) {
        let mut inner = self.stream.inner.borrow_mut();
        let store = inner.store_name(kind, self.grouped.name.as_deref());
        if !self.repartition {
            return (self.stream.node, store);
        }
        let topic = TopicRef {
            name: format!("{store}-repartition"),
            internal: true,
        };
        let (key, value) = (self.grouped.key.clone(), self.grouped.value.clone());
        inner.add(
            "repartition-sink",
            Op::Sink {
                topic: topic.clone(),
                encode: Arc::new(move |r| {
                    let mut headers = vec![(TIME_HEADER.to_owned(), r.time.0.to_string().into_bytes())];
                    if let Some(id) = &r.event_id {
                        headers.push((EVENT_ID_HEADER.to_owned(), id.as_bytes().to_vec()));
                    }
                    (key.encode(r.key::<K>()), value.encode(r.value::<V>()), headers)
                }),
            },
            clone_rec::<K, V>,
            &[(self.stream.node, 0)],
        );
        let (key, value) = (self.grouped.key.clone(), self.grouped.value.clone());
        let source = inner.add(
            "repartition-source",
            Op::Source {
                topic,
                decode: Arc::new(move |input| {
                    let k = key
                        .decode(input.key)
                        .map_err(|e| format!("repartitioned key: {e}"))?;
                    let v = value
                        .decode(input.value)
                        .map_err(|e| format!("repartitioned value: {e}"))?;
                    let header = |name: &str| {
                        input
                            .headers
                            .iter()
                            .find(|(n, _)| *n == name)
                            .and_then(|(_, v)| *v)
                            .and_then(|v| std::str::from_utf8(v).ok())
                    };
                    let time = header(TIME_HEADER)
                        .and_then(|t| t.parse().ok())
                        .or(input.timestamp)
                        .ok_or_else(|| "a repartitioned record without its event time".to_owned())?;
                    let id = header(EVENT_ID_HEADER).map(Arc::from);
                    Ok(Rec::new(k, v, UnixMillis(time), id))
                }),
            },
            clone_rec::<K, V>,
            &[],
        );
        (source, store)
    }

    fn stateful<R: Data>(
        &self,
        kind: &str,
        make: impl FnOnce(String) -> Arc<dyn StatefulOp>,
    ) -> (usize, String) {
        let (input, store) = self.aggregation_input(kind);
        let op = make(store.clone());
        let node = self.stream.inner.borrow_mut().add(
            kind,
            Op::Stateful(op),
            clone_rec::<K, Option<R>>,
            &[(input, 0)],
        );
        (node, store)
    }

    /// Records per key.
    pub fn count(&self) -> KTable<K, u64> {
        self.aggregate(|| 0u64, |_, _, c| c + 1)
    }

    /// Combines the values per key.
    pub fn reduce(&self, f: impl Fn(V, &V) -> V + Send + Sync + 'static) -> KTable<K, V>
    where
        V: StateData,
    {
        self.try_aggregate(
            || None::<V>,
            move |_, v, acc| Ok(Some(acc.map_or_else(|| v.clone(), |a| f(a, v)))),
        )
        .map_values_unwrapped()
    }

    /// Folds the values per key into `A`, starting from `init()`.
    pub fn aggregate<A: StateData>(
        &self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&K, &V, A) -> A + Send + Sync + 'static,
    ) -> KTable<K, A> {
        self.try_aggregate(init, move |k, v, a| Ok(add(k, v, a)))
    }

    /// Like [`KGroupedStream::aggregate`], where `add` may refuse a record (it is parked with
    /// the reason, and nothing of it is applied).
    pub fn try_aggregate<A: StateData>(
        &self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&K, &V, A) -> Result<A, String> + Send + Sync + 'static,
    ) -> KTable<K, A> {
        let (node, store) = self.stateful::<A>("aggregate", |store| {
            Arc::new(TableAgg::<K, V, A> {
                store,
                dedupe_horizon_ms: DEFAULT_DEDUPE_HORIZON_MS,
                init: Arc::new(init),
                add: Arc::new(add),
            })
        });
        KTable::at(&self.stream.inner, node, Some(store))
    }

    /// Aggregates per key and time window.
    pub fn windowed_by(self, windows: TimeWindows) -> TimeWindowedKStream<K, V> {
        TimeWindowedKStream {
            grouped: self,
            windows,
            emit: Emit::OnUpdate,
            retention_ms: 0,
        }
    }

    /// Aggregates per key and session.
    pub fn session_windowed_by(self, windows: SessionWindows) -> SessionWindowedKStream<K, V> {
        SessionWindowedKStream {
            grouped: self,
            windows,
            emit: Emit::OnUpdate,
            retention_ms: 0,
        }
    }
}

/// A grouped stream aggregated per time window.
pub struct TimeWindowedKStream<K, V> {
    grouped: KGroupedStream<K, V>,
    windows: TimeWindows,
    emit: Emit,
    retention_ms: i64,
}

impl<K: StateData, V: Data> TimeWindowedKStream<K, V> {
    /// When results are sent (Kafka Streams' `emitStrategy`).
    pub fn emit(mut self, emit: Emit) -> Self {
        self.emit = emit;
        self
    }

    /// How long a window is kept after it closes (0 by default: no interactive queries here).
    pub fn retention_ms(mut self, ms: i64) -> Self {
        self.retention_ms = ms.max(0);
        self
    }

    /// Records per key and window.
    pub fn count(&self) -> KTable<Windowed<K>, u64> {
        self.aggregate(|| 0u64, |_, _, c| c + 1)
    }

    /// Folds the values per key and window.
    pub fn aggregate<A: StateData>(
        &self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&K, &V, A) -> A + Send + Sync + 'static,
    ) -> KTable<Windowed<K>, A> {
        self.try_aggregate(init, move |k, v, a| Ok(add(k, v, a)))
    }

    /// Combines the values per key and window.
    pub fn reduce(&self, f: impl Fn(V, &V) -> V + Send + Sync + 'static) -> KTable<Windowed<K>, V>
    where
        V: StateData,
    {
        self.try_aggregate(
            || None::<V>,
            move |_, v, acc| Ok(Some(acc.map_or_else(|| v.clone(), |a| f(a, v)))),
        )
        .map_values_unwrapped()
    }

    /// Like `aggregate`, where `add` may refuse a record (parked with the reason).
    pub fn try_aggregate<A: StateData>(
        &self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&K, &V, A) -> Result<A, String> + Send + Sync + 'static,
    ) -> KTable<Windowed<K>, A> {
        let (windows, retention_ms, emit) = (self.windows, self.retention_ms, self.emit);
        let (node, _) = self.grouped.stateful::<A>("windowed", |store| {
            Arc::new(TimeWindowAgg::<K, V, A> {
                store,
                windows,
                retention_ms,
                emit,
                init: Arc::new(init),
                add: Arc::new(add),
            })
        });
        KTable::at(&self.grouped.stream.inner, node, None)
    }
}

/// A grouped stream aggregated per session.
pub struct SessionWindowedKStream<K, V> {
    grouped: KGroupedStream<K, V>,
    windows: SessionWindows,
    emit: Emit,
    retention_ms: i64,
}

impl<K: StateData, V: Data> SessionWindowedKStream<K, V> {
    /// When results are sent.
    pub fn emit(mut self, emit: Emit) -> Self {
        self.emit = emit;
        self
    }

    /// How long a session is kept after it closes.
    pub fn retention_ms(mut self, ms: i64) -> Self {
        self.retention_ms = ms.max(0);
        self
    }

    /// Records per key and session.
    pub fn count(&self) -> KTable<Windowed<K>, u64> {
        self.try_aggregate(|| 0u64, |_, _, c| Ok(c + 1), |_, a, b| Ok(a + b))
    }

    /// Folds the values per key and session; `merge` joins two sessions' aggregates when a
    /// record bridges them.
    pub fn aggregate<A: StateData>(
        &self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&K, &V, A) -> A + Send + Sync + 'static,
        merge: impl Fn(&K, A, A) -> A + Send + Sync + 'static,
    ) -> KTable<Windowed<K>, A> {
        self.try_aggregate(
            init,
            move |k, v, a| Ok(add(k, v, a)),
            move |k, a, b| Ok(merge(k, a, b)),
        )
    }

    /// Like `aggregate`, where `add` and `merge` may refuse a record (parked with the reason).
    pub fn try_aggregate<A: StateData>(
        &self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&K, &V, A) -> Result<A, String> + Send + Sync + 'static,
        merge: impl Fn(&K, A, A) -> Result<A, String> + Send + Sync + 'static,
    ) -> KTable<Windowed<K>, A> {
        let (windows, retention_ms, emit) = (self.windows, self.retention_ms, self.emit);
        let (node, _) = self.grouped.stateful::<A>("session", |store| {
            Arc::new(SessionAgg::<K, V, A> {
                store,
                windows,
                retention_ms,
                emit,
                init: Arc::new(init),
                add: Arc::new(add),
                merge: Arc::new(merge),
            })
        });
        KTable::at(&self.grouped.stream.inner, node, None)
    }
}

/// A changelog of the latest value per key (a windowed aggregation's key is
/// [`Windowed`]). Its records carry `Option<V>`: `None` deletes the key (a session merged away).
pub struct KTable<K, V> {
    inner: Rc<RefCell<Inner>>,
    node: usize,
    /// The store holding the latest values, for joins (tables read from a topic).
    store: Option<String>,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K: Data, V: Data> KTable<K, V> {
    fn at(inner: &Rc<RefCell<Inner>>, node: usize, store: Option<String>) -> Self {
        KTable {
            inner: inner.clone(),
            node,
            store,
            types: PhantomData,
        }
    }

    /// The table's updates as a stream (deletions left out).
    pub fn to_stream(&self) -> KStream<K, V> {
        let node = self.inner.borrow_mut().add(
            "to-stream",
            Op::Stateless(Arc::new(|r, out| {
                let (k, v, t, id) = r.into_parts::<K, Option<V>>();
                if let Some(v) = v {
                    out.push((0, Rec::new(k, v, t, id)));
                }
                Ok(())
            })),
            clone_rec::<K, V>,
            &[(self.node, 0)],
        );
        KStream::at(&self.inner, node, false)
    }

    /// A new value per key; deletions stay deletions.
    pub fn map_values<V2: Data>(&self, f: impl Fn(V) -> V2 + Send + Sync + 'static) -> KTable<K, V2> {
        let node = self.inner.borrow_mut().add(
            "table-map-values",
            Op::Stateless(Arc::new(move |r, out| {
                let (k, v, t, id) = r.into_parts::<K, Option<V>>();
                out.push((0, Rec::new(k, v.map(&f), t, id)));
                Ok(())
            })),
            clone_rec::<K, Option<V2>>,
            &[(self.node, 0)],
        );
        KTable::at(&self.inner, node, None)
    }

    /// Writes the table's updates to `topic`, deletions as null values (tombstones).
    pub fn to(&self, topic: &str, produced: Produced<K, V>) {
        let Produced { key, value } = produced;
        self.inner.borrow_mut().add(
            "sink",
            Op::Sink {
                topic: TopicRef {
                    name: topic.to_owned(),
                    internal: false,
                },
                encode: Arc::new(move |r| {
                    (
                        key.encode(r.key::<K>()),
                        r.value::<Option<V>>().as_ref().and_then(|v| value.encode(v)),
                        Vec::new(),
                    )
                }),
            },
            clone_rec::<K, Option<V>>,
            &[(self.node, 0)],
        );
    }
}

impl<K: Data, V: Data> KTable<K, Option<V>> {
    /// `reduce` keeps `Option<V>` in its store (None before the first value); its table shows
    /// `V`.
    fn map_values_unwrapped(self) -> KTable<K, V> {
        let node = self.inner.borrow_mut().add(
            "unwrap",
            Op::Stateless(Arc::new(|r, out| {
                let (k, v, t, id) = r.into_parts::<K, Option<Option<V>>>();
                out.push((0, Rec::new(k, v.flatten(), t, id)));
                Ok(())
            })),
            clone_rec::<K, Option<V>>,
            &[(self.node, 0)],
        );
        KTable::at(&self.inner, node, None)
    }
}
