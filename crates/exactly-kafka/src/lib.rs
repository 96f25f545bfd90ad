//! Kafka side of exactly, on rdkafka (librdkafka).
//!
//! - [`Relay`] moves outbox rows to topics: claim, publish in claim order with acks=all and
//!   idempotence (Kafka key = aggregate id), mark SENT only after the ack.
//! - [`WalRelay`] follows a [`exactly_core::ChangeFeed`] (PostgreSQL logical replication) and
//!   publishes in commit order with 128-bit LSN keys, confirming the feed only after acks.
//! - [`IdempotentConsumer`] reads with manual offsets and applies each record once through an
//!   [`exactly_core::EffectStore`], committing the offset only after the effect committed.
//! - [`Faults`] are crash points for tests and the demo.

mod admin;
mod config;
mod consumer;
mod eos;
mod error;
mod faults;
mod fetched;
mod gap;
mod oauth;
mod relay;
mod scan;
mod wal_relay;
mod wire;

pub use admin::{
    broker_answers, check_connection, ensure_internal_topics, ensure_topics, group_lag, partition_count,
    topic_configs, InternalTopic, PartitionLag,
};
pub use config::{
    consumer_config, export_consumer_lag, is_secret_property, parse_property, producer_config, reader_config,
    static_membership, Cluster, KafkaSettings, PropertyError,
};
pub use consumer::{ConsumerConfig, ConsumerCounters, IdempotentConsumer};
pub use eos::{
    broker_hides_aborted_records, is_fenced, progress_positions, prove_broker_hides_aborted_records,
    ExactlyOnce, QuietEof,
};
pub use error::KafkaFlowError;
pub use faults::{FaultPoint, Faults};
pub use fetched::fetched_watermarks;
pub use gap::{follow_gap_verdict, GapFollowed};
pub use oauth::{generate as oauth_token, refresh as refresh_oauth_token, TokenContext, TokenError};
pub use relay::{now, BatchReport, Relay, RelayConfig, RelayCounters};
pub use scan::{read_assigned, read_to_stable_end, scan_topic, EndWatch, END_IDLE};
pub use wal_relay::{WalRelay, WalRelayConfig, WalRelayCounters};
pub use wire::{decode_message, decode_message_keyed_by, envelope_headers, record_headers};
