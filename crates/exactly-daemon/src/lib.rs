//! The components exactly runs, built from their settings: what `exactly run` and each of
//! `exactly relay`, `exactly consume` and `exactly stream` start, for your own `main` too.
//!
//! - [`settings`]: one settings type per component ([`RelaySettings`], [`ConsumeSettings`],
//!   [`StreamSettings`]), each both clap flags and serde keys with one set of defaults;
//! - [`config_file`]: `exactly.toml` (the same types as `[source.*]`, `[consumer.*]`,
//!   `[stream.*]` tables; `EXACTLY_*` and flag overrides; errors with key and line);
//! - [`components`]: one entry per component kind ([`components::relay`],
//!   [`components::consume`], [`components::stream`]) that runs it until a stop signal;
//!   [`run::run`] runs every component of a file in one process;
//! - [`handlers`]: the consumer's handlers (`record`, `sql`, and your own through
//!   [`handlers::register_handler`]);
//! - [`telemetry`], [`health`], [`memory`], [`process`], [`progress`]: the metrics listener,
//!   readiness, a bounded heap, stopping on a signal, and the lines that say what runs.
//!
//! Nothing here depends on the lab (demo, verify, soak, benchmarks).
//!
//! # Example: a relay in your own process
//!
//! ```no_run
//! use exactly_daemon::components::{self, Gauges};
//! use exactly_daemon::process::stop_on_signal;
//! use exactly_daemon::RelaySettings;
//!
//! # async fn run() -> anyhow::Result<()> {
//! // The same keys as a `[source.NAME]` table of exactly.toml, with the same defaults.
//! let settings: RelaySettings = toml::from_str(r#"
//!     database = "postgres://app@db.internal:5432/orders"
//!     mode = "wal"
//! "#)?;
//! let kafka = exactly_kafka::KafkaSettings::new("b-1.kafka.internal:9092");
//! components::relay(settings, &kafka, Gauges::Off, stop_on_signal()).await?;
//! # Ok(())
//! # }
//! ```

pub mod components;
pub mod config_file;
pub mod database;
pub mod delta_sink;
pub mod handlers;
pub mod health;
pub mod memory;
pub mod process;
pub mod progress;
pub mod run;
pub mod settings;
pub mod sink;
pub mod telemetry;

pub use database::Database;
pub use settings::{ConsumeSettings, RelaySettings, StreamSettings};
