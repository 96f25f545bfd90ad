//! The Delta Lake sink: records from Kafka topics (read_committed) appended to a Delta table
//! exactly once, in the manner of kafka-delta-ingest.
//!
//! Each append is one Delta log entry holding the new Parquet files and, per topic partition,
//! a `txn` action whose version is the next offset to read ([`table`]). The data and the
//! positions commit together, so a sink restarted (or a partition moved to another member)
//! resumes from the log, not from the group's committed offsets, and a second writer racing it
//! for a partition loses the log's optimistic-concurrency check instead of writing twice.
//! Repeats from at-least-once upstreams (the same idempotency key twice) are written once
//! within the dedupe horizon ([`sink`]). Records that do not fit the layout ([`schema`]) go to
//! the dead-letter topic with their reason before the append that moves past them.

mod appender;
pub mod maintain;
pub mod schema;
pub mod sink;
pub mod table;

pub use maintain::{compact, vacuum, Compacted};
pub use schema::{Column, ColumnType, InputKind, Layout, EVENT_DATE};
pub use sink::{run, SinkConfig, SinkCounters};
pub use table::{AppendError, Appended, DeltaTarget};

/// Why the sink stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeltaSinkError {
    /// The table could not be opened or created.
    #[error("the Delta table {uri}: {source}")]
    Table {
        /// Where.
        uri: String,
        /// Why.
        #[source]
        source: deltalake::DeltaTableError,
    },
    /// The table exists with other columns than this sink writes.
    #[error("the Delta table {uri} has the columns [{have}]; this sink writes [{want}] (another layout: use another table)")]
    Columns {
        /// Where.
        uri: String,
        /// The table's.
        have: String,
        /// The sink's.
        want: String,
    },
    /// The layout is refused.
    #[error("the sink's columns: {0}")]
    Layout(String),
    /// Reading the table's log or files failed.
    #[error("reading the Delta table: {0}")]
    Read(#[source] deltalake::DeltaTableError),
    /// The dead-letter topic could not be created.
    #[error("creating the dead-letter topic: {0}")]
    DeadLetterTopic(#[source] exactly_kafka::KafkaFlowError),
    /// The task that appends stopped without an answer (it panicked), or the loop broke its
    /// order (a bug): the sink stops rather than guess where the table is.
    #[error("the append task: {0}")]
    Appender(String),
    /// Kafka refused the client or the subscription.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl DeltaSinkError {
    fn table(uri: &str, source: deltalake::DeltaTableError) -> Self {
        DeltaSinkError::Table {
            uri: uri.to_owned(),
            source,
        }
    }
}
