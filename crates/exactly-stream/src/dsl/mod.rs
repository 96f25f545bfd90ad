//! Stream jobs you write yourself: a topology builder in the manner of Kafka Streams' DSL.
//!
//! ```
//! use exactly_core::windowing::TimeWindows;
//! use exactly_stream::dsl::{Consumed, Emit, Grouped, Json, Produced, StreamsBuilder, TestDriver};
//!
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! struct Order { product_id: String, quantity: u32 }
//!
//! let builder = StreamsBuilder::new();
//! builder
//!     .stream("orders", Consumed::envelope(Json))
//!     .filter(|_, o: &Order| o.quantity > 0)
//!     .group_by(|_, o| o.product_id.clone(), Grouped::json().named("orders-per-product"))
//!     .windowed_by(TimeWindows::tumbling(300_000, 0).expect("valid windows"))
//!     .emit(Emit::OnWindowClose)
//!     .count()
//!     .to_stream()
//!     .to("orders-per-product", Produced::json());
//! let topology = builder.build().expect("a valid topology");
//! assert_eq!(topology.internal_topics(), vec!["orders-per-product-repartition".to_owned()]);
//! let driver = TestDriver::new(topology, 4);
//! assert!(driver.outputs("orders-per-product").is_empty());
//! ```
//!
//! - Sources: [`StreamsBuilder::stream`] with a [`Consumed`] (JSON, text, raw bytes, or
//!   exactly's envelope: key = aggregate id, event time = `occurred_at`, event id = the
//!   idempotency key), [`StreamsBuilder::table`] (the latest value per key).
//! - Stateless: `filter`, `filter_not`, `map`, `try_map` (park a record with a reason), `map_values`, `flat_map`, `flat_map_values`,
//!   `select_key`, `peek`, `split`, `merge`.
//! - Grouping: `group_by_key` (repartitions only after a key change), `group_by` (always
//!   through `<name>-repartition`, written in the task's transaction), so every result is the
//!   final one for its key, not a partial per input partition.
//! - Windows (`exactly_core::windowing`): tumbling, hopping, session, each with grace; late
//!   records dropped, counted, and copied to [`StreamsBuilder::late_records_to`] when set.
//! - Aggregations: `count`, `reduce`, `aggregate` (`try_aggregate` to refuse a record), with or
//!   without windows; results on every update or once when the window closes ([`Emit`]).
//!   Input repeats (same event id) are aggregated once per window (for tables: within
//!   [`DEFAULT_DEDUPE_HORIZON_MS`] of stream time).
//! - Joins: stream–table (`join`, `left_join`) and windowed stream–stream (`join_windowed`).
//! - Sinks: [`KStream::to`], [`KTable::to`] (deletions as tombstones).
//!
//! - Jobs as data ([`JobSpec`], `[stream.NAME.job]` in `exactly.toml`): count, sum, min,
//!   max, count_distinct over tumbling, hopping or session windows, or a table.
//!
//! A [`Topology`] runs in memory ([`TestDriver`]).

mod codec;
mod consumed;
mod driver;
mod graph;
mod job;
mod join_ops;
mod state;
mod stream;
mod table_ops;
mod window_ops;

pub use codec::{Codec, Json, NoKey, Raw, Utf8};
pub use consumed::{Consumed, Grouped, Produced};
pub use driver::{partition_for, Parked, TestDriver};
pub use graph::{InputRecord, OutputRecord, Processed, Subtopology, Topology, LATE_REASON};
pub use job::{
    AggregateSpec, EmitSpec, FilterSpec, JobError, JobSpec, ResultColumns, ResultType, WindowSpec, JOB_NAME,
};
pub use join_ops::JoinWindows;
pub use state::{Entries, MemoryState, StateAccess, StateError};
pub use stream::{
    BuildError, Data, KGroupedStream, KStream, KTable, Predicate, SessionWindowedKStream, StateData,
    StreamsBuilder, TimeWindowedKStream, DEFAULT_DEDUPE_HORIZON_MS,
};
pub use window_ops::{Emit, Windowed};
