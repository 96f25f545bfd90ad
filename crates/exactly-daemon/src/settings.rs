//! One settings type per component the binary runs. The same fields are the flags of
//! `exactly relay`, `exactly consume` and `exactly stream` (clap) and the keys of a
//! `[source.NAME]`, `[consumer.NAME]` or `[stream.NAME]` table in `exactly.toml` (serde), so a
//! setting is declared once: its flag, its key, its default (in [`defaults`]) and its help.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::database::{resolve_database, Database};
use crate::handlers::HandlerChoice;

/// Default values, each used by the flag and by the file key.
pub mod defaults {
    // Each function is the default of the setting of its name.
    #![allow(missing_docs)]
    pub fn partition_by() -> String {
        exactly_delta::EVENT_DATE.to_owned()
    }
    pub fn flush_records() -> usize {
        100_000
    }
    pub fn flush_interval_ms() -> u64 {
        60_000
    }
    pub fn target_file_size() -> u64 {
        128 * 1024 * 1024
    }
    pub fn dedupe_horizon_ms() -> i64 {
        3_600_000
    }
    pub fn max_lag_records() -> i64 {
        100_000
    }
    pub fn key_retention_ms() -> i64 {
        exactly_core::DedupePolicy::default().retention_ms
    }
    pub fn key_horizon_ms() -> i64 {
        exactly_core::DedupePolicy::default().horizon_ms
    }
    pub fn max_retained_wal() -> bytesize::ByteSize {
        bytesize::ByteSize::gib(1)
    }
    pub fn max_lag() -> bytesize::ByteSize {
        bytesize::ByteSize::mib(256)
    }
    pub fn batch_size() -> usize {
        500
    }
    pub fn lease_ms() -> i64 {
        30_000
    }
    pub fn poll_ms() -> u64 {
        500
    }
    pub fn max_retries() -> u32 {
        10
    }
    pub fn publication() -> String {
        "exactly_outbox".into()
    }
    pub fn heartbeat_ms() -> u64 {
        10_000
    }
    pub fn progress_topic() -> String {
        "exactly-progress".into()
    }
    pub fn one() -> i32 {
        1
    }
    pub fn commit_interval_ms() -> u64 {
        100
    }
    pub fn batch_events() -> u64 {
        50_000
    }
    pub fn max_batch() -> usize {
        500
    }
    pub fn handler() -> String {
        "record".into()
    }
    pub fn instance() -> String {
        "0".into()
    }
    pub fn threads() -> u32 {
        1
    }
    pub fn input() -> String {
        "coupon-events".into()
    }
    pub fn output() -> String {
        "agg-out".into()
    }
    pub fn group_by() -> String {
        "product_id".into()
    }
    pub fn partitions() -> i32 {
        3
    }
    pub fn window_ms() -> i64 {
        300_000
    }
    pub fn grace_ms() -> i64 {
        60_000
    }
    pub fn retention_ms() -> i64 {
        86_400_000
    }
    pub fn max_event_time_skew_ms() -> i64 {
        exactly_stream::DEFAULT_MAX_EVENT_TIME_SKEW_MS
    }
    pub fn salts() -> u32 {
        1
    }
}

/// How a relay reads the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    /// Claim rows from the outbox table (NOTIFY wakes it on PostgreSQL).
    #[default]
    Poll,
    /// Follow PostgreSQL logical replication (pgoutput): commit order, 128-bit LSN keys.
    Wal,
}

/// How writers use the outbox table (WAL relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboxMode {
    /// Rows stay in the table; a sweeper marks them SENT after the broker's ack.
    #[default]
    Keep,
    /// Writers delete each row in the inserting transaction; nothing to mark.
    Delete,
    /// Writers use pg_logical_emit_message; no table.
    Message,
}

/// The idempotency keys a polling relay gives records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keys {
    /// The event's UUID (v7 by default): consumers keep a key set.
    #[default]
    EventId,
    /// A sequence assigned at claim time by one leader relay: consumers keep one watermark.
    Sequence,
}

/// `exactly stream --processing-guarantee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessingGuarantee {
    /// Kafka transactions: input offsets, changelog and output commit together.
    #[default]
    ExactlyOnce,
    /// The same job without transactions (a baseline).
    AtLeastOnce,
}

/// One relay: `exactly relay`, or a `[source.NAME]` table.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// poll: claim rows from the outbox table; wal: follow PostgreSQL logical replication.
    #[arg(long, value_enum, default_value_t)]
    #[serde(default)]
    pub mode: RelayMode,
    /// postgres://… or a SQLite file.
    #[arg(long, env = "EXACTLY_DATABASE")]
    pub database: String,
    /// The environment variable that holds the PostgreSQL password (otherwise the URL's,
    /// PGPASSWORD, or a passfile, as libpq looks).
    #[arg(long, value_name = "VARIABLE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// poll: event-id (consumers keep key sets) or sequence (one leader assigns a sequence:
    /// consumers keep watermarks; PostgreSQL only).
    #[arg(long, value_enum, default_value_t)]
    #[serde(default)]
    pub keys: Keys,
    /// poll: rows claimed per round.
    #[arg(long, default_value_t = defaults::batch_size())]
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// poll: how long a claim holds rows before another relay may take them.
    #[arg(long, default_value_t = defaults::lease_ms())]
    #[serde(default = "defaults::lease_ms")]
    pub lease_ms: i64,
    /// poll: poll interval when no NOTIFY arrives.
    #[arg(long, default_value_t = defaults::poll_ms())]
    #[serde(default = "defaults::poll_ms")]
    pub poll_ms: u64,
    /// poll: publish failures before a row is DEAD.
    #[arg(long, default_value_t = defaults::max_retries())]
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// poll: drain what is claimable, then exit.
    #[arg(long)]
    #[serde(default)]
    pub exit_when_idle: bool,
    /// wal: the replication slot (default exactly_<database>).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// wal: the publication on the outbox table.
    #[arg(long, default_value_t = defaults::publication())]
    #[serde(default = "defaults::publication")]
    pub publication: String,
    /// wal: emit a heartbeat when none of the relay's own transactions arrived for this long.
    #[arg(long, default_value_t = defaults::heartbeat_ms())]
    #[serde(default = "defaults::heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// wal: above this much WAL held back by the slot the relay reports not ready and logs an
    /// error naming the slot (PostgreSQL keeps every segment a slot still needs; see the README
    /// on max_slot_wal_keep_size).
    #[arg(long, default_value_t = defaults::max_retained_wal())]
    #[serde(default = "defaults::max_retained_wal")]
    pub max_retained_wal: bytesize::ByteSize,
    /// wal: above this much WAL not yet confirmed by the relay it reports not ready.
    #[arg(long, default_value_t = defaults::max_lag())]
    #[serde(default = "defaults::max_lag")]
    pub max_lag: bytesize::ByteSize,
    /// wal: how writers use the outbox (keep: a sweeper marks rows SENT).
    #[arg(long, value_enum, default_value_t)]
    #[serde(default)]
    pub outbox: OutboxMode,
    /// wal: write records and the source position in one Kafka transaction.
    #[arg(long)]
    #[serde(default)]
    pub exactly_once: bool,
    /// A Debezium-style outbox table to relay unchanged (in a file: a `[source.NAME.debezium]`
    /// table). PostgreSQL only.
    #[command(flatten)]
    #[serde(default, skip_serializing_if = "DebeziumSettings::is_off")]
    pub debezium: DebeziumSettings,
    /// wal, exactly once: compacted single-partition topic of source positions.
    #[arg(long, default_value_t = defaults::progress_topic())]
    #[serde(default = "defaults::progress_topic")]
    pub progress_topic: String,
    /// wal, exactly once: replication factor of the progress topic (use 3 on a production
    /// cluster).
    #[arg(long, default_value_t = defaults::one())]
    #[serde(default = "defaults::one")]
    pub replication_factor: i32,
    /// wal, exactly once: `min.insync.replicas` of the progress topic (use 2 with 3 replicas).
    #[arg(long, default_value_t = defaults::one())]
    #[serde(default = "defaults::one")]
    pub min_insync_replicas: i32,
    /// wal, exactly once: commit a Kafka transaction this often (at a source-transaction
    /// boundary).
    #[arg(long, default_value_t = defaults::commit_interval_ms())]
    #[serde(default = "defaults::commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// wal, exactly once: …or once it holds this many events.
    #[arg(long, default_value_t = defaults::batch_events())]
    #[serde(default = "defaults::batch_events")]
    pub batch_events: u64,
    /// Test fault: SIGKILL this process after the N-th batch was acknowledged, before it is
    /// marked SENT (wal: before the slot is confirmed).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub kill_after_publish: Option<u64>,
    /// Test fault: SIGKILL after the N-th progress record was sent, before the commit.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub kill_before_commit: Option<u64>,
    /// Test fault: SIGKILL after the N-th Kafka commit, before the slot is confirmed.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub kill_after_commit: Option<u64>,
    /// Test fault: SIGKILL when the N-th abort starts.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub kill_during_abort: Option<u64>,
    /// Test fault: abort every N-th Kafka transaction on purpose.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub abort_every: Option<u64>,
}

/// A Debezium-style outbox table, as the Outbox Event Router reads it: mirrored into exactly's
/// outbox by a trigger the relay installs on start (and `exactly migrate`), so the table, its
/// writers and the consumers of its topics stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumSettings {
    /// The table (`table` or `schema.table`); unset: no Debezium table.
    #[arg(long = "debezium-table", value_name = "TABLE")]
    #[serde(rename = "table", default, skip_serializing_if = "Option::is_none")]
    pub debezium_table: Option<String>,
    /// table.field.event.id: the event id column, also sent as the `id` header.
    #[arg(long = "debezium-id-column", value_name = "COLUMN")]
    #[serde(rename = "id_column", default, skip_serializing_if = "Option::is_none")]
    pub debezium_id_column: Option<String>,
    /// table.field.event.key: the record key column (default aggregateid).
    #[arg(long = "debezium-key-column", value_name = "COLUMN")]
    #[serde(rename = "key_column", default, skip_serializing_if = "Option::is_none")]
    pub debezium_key_column: Option<String>,
    /// The aggregate type column (default aggregatetype).
    #[arg(long = "debezium-aggregate-type-column", value_name = "COLUMN")]
    #[serde(
        rename = "aggregate_type_column",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub debezium_aggregate_type_column: Option<String>,
    /// table.field.event.type (default type).
    #[arg(long = "debezium-type-column", value_name = "COLUMN")]
    #[serde(rename = "type_column", default, skip_serializing_if = "Option::is_none")]
    pub debezium_type_column: Option<String>,
    /// table.field.event.payload (default payload; jsonb, json, text, varchar or bytea).
    #[arg(long = "debezium-payload-column", value_name = "COLUMN")]
    #[serde(rename = "payload_column", default, skip_serializing_if = "Option::is_none")]
    pub debezium_payload_column: Option<String>,
    /// table.field.event.timestamp (timestamptz, timestamp or bigint ms; default: insert time).
    #[arg(long = "debezium-timestamp-column", value_name = "COLUMN")]
    #[serde(rename = "timestamp_column", default, skip_serializing_if = "Option::is_none")]
    pub debezium_timestamp_column: Option<String>,
    /// route.by.field (default aggregatetype).
    #[arg(long = "route-by-field", value_name = "COLUMN")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_by_field: Option<String>,
    /// route.topic.regex (default `(?<routedByValue>.*)`).
    #[arg(long = "route-topic-regex", value_name = "REGEX")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_topic_regex: Option<String>,
    /// route.topic.replacement (default `outbox.event.${routedByValue}`).
    #[arg(long = "route-topic-replacement", value_name = "TEXT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_topic_replacement: Option<String>,
    /// table.fields.additional.placement: `column:header[:alias]`, comma-separated (headers
    /// only).
    #[arg(
        long = "additional-placement",
        value_delimiter = ',',
        value_name = "COLUMN:header:ALIAS"
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_placement: Vec<String>,
}

impl DebeziumSettings {
    fn is_off(&self) -> bool {
        *self == DebeziumSettings::default()
    }

    /// The table with Debezium's defaults filled in; None when no table is named. A setting
    /// given without a table is refused.
    pub fn table(&self) -> Result<Option<exactly_postgres::DebeziumTable>> {
        let Some(table) = &self.debezium_table else {
            if !self.is_off() {
                bail!("the Debezium settings need the table: debezium_table (--debezium-table)");
            }
            return Ok(None);
        };
        let defaults = exactly_postgres::DebeziumTable::default();
        let or = |given: &Option<String>, default: String| given.clone().unwrap_or(default);
        let headers = self
            .additional_placement
            .iter()
            .map(|entry| exactly_core::debezium::HeaderField::parse(entry))
            .collect::<Result<Vec<_>, _>>()?;
        let table = exactly_postgres::DebeziumTable {
            table: table.clone(),
            id_column: or(&self.debezium_id_column, defaults.id_column),
            key_column: or(&self.debezium_key_column, defaults.key_column),
            aggregate_type_column: or(
                &self.debezium_aggregate_type_column,
                defaults.aggregate_type_column,
            ),
            type_column: or(&self.debezium_type_column, defaults.type_column),
            payload_column: or(&self.debezium_payload_column, defaults.payload_column),
            timestamp_column: self.debezium_timestamp_column.clone(),
            route_by_field: or(&self.route_by_field, defaults.route_by_field),
            route_topic_regex: or(&self.route_topic_regex, defaults.route_topic_regex),
            route_topic_replacement: or(&self.route_topic_replacement, defaults.route_topic_replacement),
            headers,
        };
        exactly_core::debezium::posix_route(&table.route_topic_regex, &table.route_topic_replacement)?;
        Ok(Some(table))
    }
}

/// Settings only the polling relay reads.
const POLL_ONLY: &[&str] = &[
    "keys",
    "batch_size",
    "lease_ms",
    "poll_ms",
    "max_retries",
    "exit_when_idle",
];
/// Settings only the WAL relay reads.
const WAL_ONLY: &[&str] = &[
    "slot",
    "publication",
    "heartbeat_ms",
    "outbox",
    "exactly_once",
    "max_retained_wal",
    "max_lag",
];
/// Settings only the exactly-once WAL relay reads.
const EXACTLY_ONCE_ONLY: &[&str] = &[
    "progress_topic",
    "replication_factor",
    "min_insync_replicas",
    "commit_interval_ms",
    "batch_events",
    "kill_before_commit",
    "kill_after_commit",
    "kill_during_abort",
    "abort_every",
];

impl RelaySettings {
    /// The first setting given (by `given`, which knows whether a flag or key was set) that
    /// this relay's mode would not read, and which mode reads it. Such a setting is refused,
    /// not dropped, so `mode = poll` with `exactly_once = true` cannot look like it worked.
    pub fn unused_setting(&self, given: impl Fn(&str) -> bool) -> Option<(&'static str, &'static str)> {
        let first = |names: &[&'static str]| names.iter().copied().find(|name| given(name));
        match self.mode {
            RelayMode::Poll => first(WAL_ONLY)
                .map(|name| (name, "only the wal mode reads it"))
                .or_else(|| first(EXACTLY_ONCE_ONLY).map(|name| (name, "only the wal mode reads it"))),
            RelayMode::Wal => first(POLL_ONLY)
                .map(|name| (name, "only the poll mode reads it"))
                .or_else(|| {
                    (!self.exactly_once)
                        .then(|| first(EXACTLY_ONCE_ONLY))
                        .flatten()
                        .map(|name| (name, "only the wal mode with exactly_once reads it"))
                }),
        }
    }

    /// The database, its password read from `password_env` when one is named.
    pub fn database(&self) -> Result<Database> {
        resolve_database(&self.database, self.password_env.as_deref())
    }

    /// Whether this relay's mode reads `key` (for showing only the settings in effect).
    pub fn reads(&self, key: &str) -> bool {
        let this: [&str; 1] = [key];
        self.unused_setting(|k| this.contains(&k)).is_none()
    }
}

/// One idempotent consumer: `exactly consume`, or a `[consumer.NAME]` table.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumeSettings {
    /// The effect database (postgres://… or a SQLite file), shared by every member of the
    /// group.
    #[arg(long, env = "EXACTLY_DATABASE")]
    pub database: String,
    /// The environment variable that holds the PostgreSQL password.
    #[arg(long, value_name = "VARIABLE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Consumer group; also the name of this consumer's rows in the effect database (in a
    /// file: the table's name unless set).
    #[arg(long)]
    #[serde(default)]
    pub group: String,
    /// A topic to consume (repeatable).
    #[arg(long = "topic", required = true)]
    pub topics: Vec<String>,
    /// record (a row per event in exactly_consumed), sql (the statements of --sql-file),
    /// story-coupons, story-likes, story-products.
    #[arg(long, default_value_t = defaults::handler())]
    #[serde(default = "defaults::handler")]
    pub handler: String,
    /// record: the event types it accepts (comma-separated; others are parked). Default: any.
    #[arg(long, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// sql: a file of statements run for each new event in the dedupe transaction, with the
    /// envelope as named parameters (:event_id, :key, :event_type, :aggregate_type,
    /// :aggregate_id, :occurred_at, :payload, :payload_json, :payload_bytes, :headers, :topic,
    /// :partition, :offset). An error they raise parks the event with the database's message.
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_file: Option<PathBuf>,
    /// How long key-set entries (UUIDv4/v7, ULID keys) are kept before they are pruned, in
    /// bounded batches.
    #[arg(long, default_value_t = defaults::key_retention_ms())]
    #[serde(default = "defaults::key_retention_ms")]
    pub key_retention_ms: i64,
    /// Time-ordered keys (UUIDv7, ULID) older than this are parked as key_too_old instead of
    /// looked up (their entry may be pruned). At most the retention.
    #[arg(long, default_value_t = defaults::key_horizon_ms())]
    #[serde(default = "defaults::key_horizon_ms")]
    pub key_horizon_ms: i64,
    /// Above this many records behind (over its partitions) the consumer reports not ready.
    #[arg(long, default_value_t = defaults::max_lag_records())]
    #[serde(default = "defaults::max_lag_records")]
    pub max_lag_records: i64,
    /// Deduplicate by the UUID in this header instead of exactly's headers: `id` for a topic
    /// Debezium's Outbox Event Router writes (the same event relayed by Debezium and by exactly
    /// is then one key).
    #[arg(long, value_name = "HEADER")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_header: Option<String>,
    /// The most records applied in one database transaction (what one poll has ready; the
    /// consumer never waits to fill a batch).
    #[arg(long, default_value_t = defaults::max_batch())]
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    /// Step over gaps in a partition's offsets without reading each a second time. The second
    /// read keeps a broker that served past records it had not stored (Tansu 0.6.0) from
    /// making this consumer skip them; on Kafka it costs one fetch per gap. Set it for a
    /// compacted topic on Kafka, where most records follow a gap.
    #[arg(long)]
    #[serde(default)]
    pub trust_offset_gaps: bool,
    /// This member's stable name in its group (a StatefulSet's pod ordinal, a host name):
    /// makes it a static member (`group.instance.id` = `<group>-<instance>`), so a restart
    /// within the session timeout takes back its partitions without a rebalance of the group.
    /// Every live member needs its own. Unset: a dynamic member.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Test fault: SIGKILL this process after the N-th effect committed, before its offset
    /// commit.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub kill_after_apply: Option<u64>,
}

impl ConsumeSettings {
    /// The database, its password read from `password_env` when one is named.
    pub fn database(&self) -> Result<Database> {
        resolve_database(&self.database, self.password_env.as_deref())
    }

    /// The handler and what it reads, checked (a setting of another handler is refused).
    pub fn handler_choice(&self) -> Result<HandlerChoice> {
        HandlerChoice::new(&self.handler, &self.event_types, self.sql_file.as_deref())
    }

    /// The member's `group.instance.id` when it has an instance name.
    pub fn group_instance_id(&self) -> Option<String> {
        self.instance.as_ref().map(|i| format!("{}-{i}", self.group))
    }
}

/// One stream job (the orders-agg windowed count): `exactly stream`, or a `[stream.NAME]`
/// table.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// The application id: names the consumer group, the transactional ids and the internal
    /// topics (in a file: the table's name unless set).
    #[arg(long, default_value = "orders-agg")]
    #[serde(default)]
    pub application_id: String,
    /// Distinguishes processors of one application id.
    #[arg(long, default_value_t = defaults::instance())]
    #[serde(default = "defaults::instance")]
    pub instance: String,
    /// The input topic.
    #[arg(long, default_value_t = defaults::input())]
    #[serde(default = "defaults::input")]
    pub input: String,
    /// The output topic of window results.
    #[arg(long, default_value_t = defaults::output())]
    #[serde(default = "defaults::output")]
    pub output: String,
    /// Payload field to count by (empty: the aggregate id).
    #[arg(long, default_value_t = defaults::group_by())]
    #[serde(default = "defaults::group_by")]
    pub group_by: String,
    /// Partitions of the internal topics (the input's count).
    #[arg(long, default_value_t = defaults::partitions())]
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    /// Window length.
    #[arg(long, default_value_t = defaults::window_ms())]
    #[serde(default = "defaults::window_ms")]
    pub window_ms: i64,
    /// How late a record may arrive after its window ends.
    #[arg(long, default_value_t = defaults::grace_ms())]
    #[serde(default = "defaults::grace_ms")]
    pub grace_ms: i64,
    /// How long closed windows are kept in the store.
    #[arg(long, default_value_t = defaults::retention_ms())]
    #[serde(default = "defaults::retention_ms")]
    pub retention_ms: i64,
    /// Event times further ahead of the wall clock go to the dead-letter topic (they would
    /// otherwise advance stream time and make every later record late).
    #[arg(long, default_value_t = defaults::max_event_time_skew_ms())]
    #[serde(default = "defaults::max_event_time_skew_ms")]
    pub max_event_time_skew_ms: i64,
    /// Partial counts per hot key.
    #[arg(long, default_value_t = defaults::salts())]
    #[serde(default = "defaults::salts")]
    pub salts: u32,
    /// Commit a Kafka transaction this often.
    #[arg(long, default_value_t = defaults::commit_interval_ms())]
    #[serde(default = "defaults::commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Where task stores live (default: a folder per application in the temp dir).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// exactly-once (Kafka transactions) or at-least-once (the same job without them).
    #[arg(long, value_enum, default_value_t)]
    #[serde(default)]
    pub processing_guarantee: ProcessingGuarantee,
    /// Replication factor of the internal topics (use 3 on a production cluster).
    #[arg(long, default_value_t = defaults::one())]
    #[serde(default = "defaults::one")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of the internal topics (use 2 with 3 replicas).
    #[arg(long, default_value_t = defaults::one())]
    #[serde(default = "defaults::one")]
    pub min_insync_replicas: i32,
    /// Also upsert the results into this PostgreSQL database, in the same process: the
    /// built-in job's partial counts into `order_counts` (what `exactly sink-counts` does), a
    /// job table's results into its `table`.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_database: Option<String>,
    /// Join the group as a dynamic member. By default the processor (and its sink) is a static
    /// member named `<application_id>-<instance>`: a restart within the session timeout takes
    /// back its partitions without a rebalance, and a member that died mid-rebalance holds the
    /// group for at most the session timeout. Every live processor needs its own --instance.
    #[arg(long)]
    #[serde(default)]
    pub dynamic_membership: bool,
    /// Processing threads in this process (Kafka Streams' `num.stream.threads`): each has its
    /// own consumer, producer and tasks, and joins the group as `<instance>-<n>` with its
    /// stores under `<state_dir>/thread-<n>` (with one thread: `<instance>`, `<state_dir>`).
    #[arg(long, default_value_t = defaults::threads())]
    #[serde(default = "defaults::threads")]
    pub num_stream_threads: u32,
    /// A job declared as data (`[stream.NAME.job]`: input, key, filter, window, aggregate,
    /// emit, output), compiled into a DSL topology and run instead of the built-in orders job
    /// (whose `input`, `output`, `group_by`, window and salt settings it replaces).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<exactly_stream::dsl::JobSpec>,
}

impl StreamSettings {
    /// The processor's `group.instance.id`, unless it joins as a dynamic member.
    pub fn group_instance_id(&self) -> Option<String> {
        (!self.dynamic_membership).then(|| format!("{}-{}", self.application_id, self.instance))
    }

    /// The processor's configuration.
    pub fn config(&self, kafka: &exactly_kafka::KafkaSettings) -> Result<exactly_stream::StreamConfig> {
        let windows =
            exactly_core::window::TumblingWindows::new(self.window_ms, self.grace_ms, self.retention_ms)?;
        // A job table runs its topology; its input and output are the job's.
        let (topology, input, output) = match &self.job {
            Some(job) => (
                Some(std::sync::Arc::new(job.topology(exactly_stream::dsl::JOB_NAME)?)),
                job.input.clone(),
                job.output.clone(),
            ),
            None => (None, self.input.clone(), self.output.clone()),
        };
        Ok(exactly_stream::StreamConfig {
            kafka: kafka.clone(),
            application_id: self.application_id.clone(),
            instance: self.instance.clone(),
            input,
            output,
            group_by: if self.group_by.is_empty() {
                exactly_stream::GroupBy::AggregateId
            } else {
                exactly_stream::GroupBy::PayloadField(self.group_by.clone())
            },
            windows,
            salts: self.salts.max(1),
            commit_interval: Duration::from_millis(self.commit_interval_ms),
            guarantee: match self.processing_guarantee {
                ProcessingGuarantee::ExactlyOnce => exactly_stream::Guarantee::ExactlyOnce,
                ProcessingGuarantee::AtLeastOnce => exactly_stream::Guarantee::AtLeastOnce,
            },
            state_dir: self.state_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!(
                    "exactly-stream-{}-{}",
                    self.application_id, self.instance
                ))
            }),
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
            group_instance_id: self.group_instance_id(),
            max_event_time_skew_ms: self.max_event_time_skew_ms,
            topology,
        })
    }
}

/// How a command reaches Kafka: the bootstrap servers and librdkafka properties passed
/// through (security, timeouts). The settings exactly-once depends on are refused here.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, host:port[,host:port…].
    #[arg(long, env = "EXACTLY_BROKERS")]
    pub brokers: String,
    /// A librdkafka property (repeatable), e.g. security.protocol=SASL_SSL. A value env:NAME is
    /// read from the environment variable NAME: give secrets that way, never on the command
    /// line. acks, enable.idempotence, isolation.level, enable.auto.commit, max.in.flight and
    /// transactional.id are exactly's own and are refused.
    #[arg(long = "kafka-property", value_name = "NAME=VALUE", value_parser = exactly_kafka::parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The settings, every environment reference checked.
    pub fn settings(&self) -> Result<exactly_kafka::KafkaSettings> {
        Ok(exactly_kafka::KafkaSettings::checked(
            &self.brokers,
            self.kafka_properties.iter().cloned(),
        )?)
    }
}

/// The PostgreSQL UPSERT sink: `exactly sink postgres` (docs/stream-dsl.md, "Into PostgreSQL").
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSinkSettings {
    /// The sink's name: its consumer group and the id of its positions and parked records in
    /// the database.
    #[arg(long, default_value = "pg-sink")]
    pub name: String,
    /// The database of the table (postgres://…; the password from PGPASSWORD or a passfile,
    /// not the command line).
    #[arg(long, env = "EXACTLY_DATABASE")]
    pub database: String,
    /// Distinguishes members of one sink: the static member id is `<name>-<instance>`.
    #[arg(long, default_value_t = defaults::instance())]
    #[serde(default = "defaults::instance")]
    pub instance: String,
    /// Join the group as a dynamic member (by default a static one).
    #[arg(long)]
    #[serde(default)]
    pub dynamic_membership: bool,
    /// Results topics to read (read_committed); repeat the flag for several.
    #[arg(long = "topic", required = true)]
    pub topics: Vec<String>,
    /// The table (`name` or `schema.name`); it must exist, with a UNIQUE constraint on the key
    /// columns. Each record's value is a JSON object whose fields fill the columns of the same
    /// names (columns with a default are left to it); a tombstone deletes its key's row.
    #[arg(long)]
    pub table: String,
    /// A column of the table's UNIQUE key; repeat for several.
    #[arg(long = "key-column", required = true)]
    pub key_columns: Vec<String>,
    /// The row with the larger value here wins; none: the later record in the topic wins.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_column: Option<String>,
    /// `COLUMN=FIELD`: a tombstone's key object names this key column FIELD.
    #[arg(long = "key-field", value_name = "COLUMN=FIELD", value_parser = parse_key_field)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_fields: Vec<(String, String)>,
}

fn parse_key_field(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((c, f)) if !c.is_empty() && !f.is_empty() => Ok((c.to_owned(), f.to_owned())),
        _ => Err(format!("{text:?}: give COLUMN=FIELD")),
    }
}

impl PgSinkSettings {
    /// The table and its keys as the sink applies them.
    pub fn spec(&self) -> exactly_postgres::upsert::UpsertSpec {
        exactly_postgres::upsert::UpsertSpec {
            table: self.table.clone(),
            key_columns: self.key_columns.clone(),
            conflict: match &self.version_column {
                Some(v) => exactly_core::upsert::Conflict::LargerWins(v.clone()),
                None => exactly_core::upsert::Conflict::LastWins,
            },
            key_fields: self.key_fields.clone(),
        }
    }

    /// The static member id, unless a dynamic member.
    pub fn instance_id(&self) -> Option<String> {
        (!self.dynamic_membership).then(|| format!("{}-{}", self.name, self.instance))
    }
}

/// The Delta Lake sink: `exactly sink delta`, or a `[sink.NAME]` table (docs/delta.md).
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaSinkSettings {
    /// The sink's name: its consumer group and the id of its positions in the Delta log (in a
    /// file: the table's name unless set).
    #[arg(long, default_value = "delta-sink")]
    #[serde(default)]
    pub name: String,
    /// The consumer group (empty: the name). Positions are the name's whatever the group:
    /// sinks of one name in two groups race for the same positions, and one loses each race.
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub group: String,
    /// Distinguishes members of one sink: the static member id is `<group>-<instance>`.
    #[arg(long, default_value_t = defaults::instance())]
    #[serde(default = "defaults::instance")]
    pub instance: String,
    /// Topics to read (read_committed); repeat the flag for several.
    #[arg(long = "topic", required = true)]
    pub topics: Vec<String>,
    /// The Delta table: a local path, or an object-store URL (s3://, gs://, az://) with
    /// `storage_option`s.
    #[arg(long)]
    pub table: String,
    /// Object-store settings for delta-rs, `KEY=VALUE`; a value `env:NAME` is read from the
    /// environment variable NAME (keep credentials out of files and command lines).
    #[arg(long = "storage-option", value_name = "KEY=VALUE")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_options: Vec<String>,
    /// `envelope`: exactly's events (headers required, repeats removed by idempotency key);
    /// `plain`: any record (a stream job's results), with its key and timestamp.
    #[arg(long, default_value_t = exactly_delta::InputKind::Envelope)]
    #[serde(default)]
    pub input: exactly_delta::InputKind,
    /// Payload columns, `name:type[:pointer][:required]` (types: string, long, integer, double,
    /// boolean, timestamp, date, json); none: the payload as one JSON string column.
    #[arg(long = "column", value_name = "NAME:TYPE[:POINTER][:required]")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<exactly_delta::Column>,
    /// The partition column: `event_date` (the event's UTC date), a declared column, or
    /// empty for none.
    #[arg(long, default_value_t = defaults::partition_by())]
    #[serde(default = "defaults::partition_by")]
    pub partition_by: String,
    /// Append when this many records are buffered.
    #[arg(long, default_value_t = defaults::flush_records())]
    #[serde(default = "defaults::flush_records")]
    pub flush_records: usize,
    /// Append at least this often while records are buffered.
    #[arg(long, default_value_t = defaults::flush_interval_ms())]
    #[serde(default = "defaults::flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Parquet files are cut at about this many bytes.
    #[arg(long, default_value_t = defaults::target_file_size())]
    #[serde(default = "defaults::target_file_size")]
    pub target_file_size: u64,
    /// A repeated idempotency key is skipped for this long after the file holding it was
    /// added (envelope input; the keys are kept in memory).
    #[arg(long, default_value_t = defaults::dedupe_horizon_ms())]
    #[serde(default = "defaults::dedupe_horizon_ms")]
    pub dedupe_horizon_ms: i64,
    /// Where records that do not fit are parked (empty: `<name>-dead-letters`).
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub dead_letter_topic: String,
    /// Lab only: die (SIGKILL) the n-th time an append's files are written and its log entry
    /// is not.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub kill_between_files_and_log: Option<u64>,
}

/// Object-store options `KEY=VALUE` for delta-rs, a value `env:NAME` read from the
/// environment.
pub fn storage_options(options: &[String]) -> Result<std::collections::HashMap<String, String>> {
    let mut resolved = std::collections::HashMap::new();
    for option in options {
        // The option itself is not shown: it may be a credential typed without its key.
        let Some((key, value)) = option.split_once('=') else {
            bail!("a storage option is not KEY=VALUE");
        };
        let value = match value.strip_prefix("env:") {
            Some(var) => std::env::var(var).map_err(|_| {
                anyhow::anyhow!("storage option {key}: the environment variable {var} is not set")
            })?,
            None => value.to_owned(),
        };
        resolved.insert(key.to_owned(), value);
    }
    Ok(resolved)
}

impl DeltaSinkSettings {
    /// The sink's configuration; `env:` storage options resolved.
    pub fn config(&self, kafka: &exactly_kafka::KafkaSettings) -> Result<exactly_delta::SinkConfig> {
        let storage_options = storage_options(&self.storage_options)?;
        let layout = exactly_delta::Layout {
            input: self.input,
            columns: self.columns.clone(),
            partition_by: (!self.partition_by.is_empty()).then(|| self.partition_by.clone()),
        };
        layout
            .validate()
            .map_err(|e| anyhow::anyhow!("the sink's columns: {e}"))?;
        if self.name.is_empty() || self.topics.is_empty() || self.table.is_empty() {
            bail!("a Delta sink needs a name, at least one topic and a table");
        }
        let group = if self.group.is_empty() {
            self.name.clone()
        } else {
            self.group.clone()
        };
        Ok(exactly_delta::SinkConfig {
            kafka: kafka.clone(),
            topics: self.topics.clone(),
            table_uri: self.table.clone(),
            storage_options,
            name: self.name.clone(),
            group: group.clone(),
            instance_id: Some(format!("{group}-{}", self.instance)),
            layout,
            flush_records: self.flush_records.max(1),
            flush_interval: Duration::from_millis(self.flush_interval_ms.max(1)),
            target_file_size: self.target_file_size.max(1024),
            dedupe_horizon_ms: self.dedupe_horizon_ms.max(0),
            dead_letter_topic: if self.dead_letter_topic.is_empty() {
                format!("{}-dead-letters", self.name)
            } else {
                self.dead_letter_topic.clone()
            },
            faults: crate::process::kill_at(
                exactly_kafka::FaultPoint::DeltaAfterFilesBeforeLog,
                self.kill_between_files_and_log,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct RelayCli {
        #[command(flatten)]
        relay: RelaySettings,
    }

    /// A file table with only the required key and the command line with only the required
    /// flag give the same settings: the defaults are one.
    #[test]
    fn flag_and_file_defaults_agree() {
        let from_flags = RelayCli::parse_from(["x", "--database", "d.db"]).relay;
        let from_file: RelaySettings = toml::from_str("database = \"d.db\"").expect("parses");
        assert_eq!(
            toml::to_string(&from_flags).expect("serializes"),
            toml::to_string(&from_file).expect("serializes")
        );
        #[derive(Parser)]
        struct StreamCli {
            #[command(flatten)]
            stream: StreamSettings,
        }
        let mut from_flags = StreamCli::parse_from(["x"]).stream;
        let from_file: StreamSettings = toml::from_str("").expect("parses");
        // The one difference by design: in a file the table's name is the application id.
        from_flags.application_id.clear();
        assert_eq!(
            toml::to_string(&from_flags).expect("serializes"),
            toml::to_string(&from_file).expect("serializes")
        );
    }

    #[test]
    fn settings_a_mode_does_not_read_are_named() {
        let relay: RelaySettings = toml::from_str("database = \"d.db\"\nslot = \"s\"").expect("parses");
        assert_eq!(
            relay.unused_setting(|k| k == "slot"),
            Some(("slot", "only the wal mode reads it"))
        );
        let relay: RelaySettings =
            toml::from_str("database = \"postgres://h/d\"\nmode = \"wal\"").expect("parses");
        assert_eq!(
            relay.unused_setting(|k| k == "commit_interval_ms"),
            Some((
                "commit_interval_ms",
                "only the wal mode with exactly_once reads it"
            ))
        );
        assert_eq!(relay.unused_setting(|k| k == "publication"), None);
    }
}
