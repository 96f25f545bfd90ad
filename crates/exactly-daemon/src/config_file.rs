//! `exactly.toml`: everything one `exactly run` process serves. The file's tables are the
//! components' own settings types ([`crate::settings`]); precedence is flags, then `EXACTLY_*`
//! environment variables, then the file. Every error names the key and, where the key is in
//! the file, its line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use exactly_kafka::KafkaSettings;
use serde::{Deserialize, Serialize};

use crate::database::Database;
use crate::settings::{ConsumeSettings, DeltaSinkSettings, RelayMode, RelaySettings, StreamSettings};

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The Kafka cluster every component uses.
    pub kafka: KafkaSettings,
    /// The one Prometheus listener of the process.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Relays, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source: BTreeMap<String, RelaySettings>,
    /// Idempotent consumers, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumer: BTreeMap<String, ConsumeSettings>,
    /// Stream jobs, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stream: BTreeMap<String, StreamSettings>,
    /// Delta Lake sinks, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sink: BTreeMap<String, DeltaSinkSettings>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where /metrics is served (loopback by default: metrics reveal topic names and volumes).
    #[serde(default = "default_metrics_addr")]
    pub addr: SocketAddr,
    /// `false`: no listener.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

fn enabled() -> bool {
    true
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            addr: default_metrics_addr(),
            enabled: true,
        }
    }
}

/// Flags of `exactly run` and `exactly config check`: they win over the environment and the
/// file.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The configuration file.
    #[arg(long, short = 'c', env = "EXACTLY_CONFIG")]
    pub config: PathBuf,
    /// Overrides kafka.brokers.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Adds or overrides a kafka.properties entry (repeatable); `env:NAME` values read NAME.
    #[arg(long = "kafka-property", value_name = "NAME=VALUE", value_parser = exactly_kafka::parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Overrides metrics.addr.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// No metrics listener.
    #[arg(long)]
    pub no_metrics: bool,
}

/// A configuration that cannot be used: where, which key, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {}{message}{}", line.map(|l| format!(" line {l}")).unwrap_or_default(),
        key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default(),
        excerpt.as_ref().map(|e| format!("\n    {e}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The line of the key, when it is in the file.
    pub line: Option<usize>,
    /// The key (`source.orders.slot`) or the environment variable.
    pub key: Option<String>,
    /// Why.
    pub message: String,
    /// The line's text.
    pub excerpt: Option<String>,
}

/// Reads, overlays and validates a configuration file. `environment` is the process
/// environment (passed in so tests need not change it).
pub fn load(
    args: &RunArgs,
    environment: impl IntoIterator<Item = (String, String)>,
) -> Result<ConfigFile, ConfigError> {
    let path = &args.config;
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: None,
        key: None,
        message: format!("cannot read it: {e}"),
        excerpt: None,
    })?;
    let locate = Locator {
        file: &file,
        text: &text,
    };
    // The file alone first, so its errors carry their lines.
    let parsed: ConfigFile = toml::from_str(&text).map_err(|e| locate.parse_error(&e))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| locate.parse_error(&e))?;
    let mut overridden = Vec::new();
    let overrides: Vec<(Vec<String>, String)> = environment
        .into_iter()
        .filter_map(|(name, value)| {
            let path = environment_key(&name)?;
            overridden.push(name);
            Some((path, value))
        })
        .collect();
    apply_environment(&mut table, &overrides);
    if let Some(brokers) = &args.brokers {
        set_path(
            &mut table,
            &["kafka", "brokers"],
            toml::Value::String(brokers.clone()),
        );
        overridden.push("--brokers".into());
    }
    for (name, value) in &args.kafka_properties {
        set_path(
            &mut table,
            &["kafka", "properties", name],
            toml::Value::String(value.clone()),
        );
        overridden.push("--kafka-property".into());
    }
    if let Some(addr) = args.metrics_addr {
        set_path(
            &mut table,
            &["metrics", "addr"],
            toml::Value::String(addr.to_string()),
        );
        overridden.push("--metrics-addr".into());
    }
    if args.no_metrics {
        set_path(&mut table, &["metrics", "enabled"], toml::Value::Boolean(false));
        overridden.push("--no-metrics".into());
    }
    let mut config = if overridden.is_empty() {
        parsed
    } else {
        table.try_into().map_err(|e: toml::de::Error| ConfigError {
            file: file.clone(),
            line: None,
            key: Some(overridden.join(", ")),
            message: format!(
                "after these overrides: {}",
                hide_values(e.message(), overrides.iter().map(|(_, value)| value.as_str()))
            ),
            excerpt: None,
        })?
    };
    for (name, consumer) in &mut config.consumer {
        if consumer.group.is_empty() {
            consumer.group = name.clone();
        }
    }
    for (name, stream) in &mut config.stream {
        if stream.application_id.is_empty() {
            stream.application_id = name.clone();
        }
    }
    for (name, sink) in &mut config.sink {
        if sink.name.is_empty() {
            sink.name = name.clone();
        }
    }
    validate(&config, &locate, &raw_keys(&text))?;
    // Show and use the slot a WAL source will take.
    for source in config.source.values_mut() {
        if source.mode == RelayMode::Wal && source.slot.is_none() {
            source.slot = Some(exactly_postgres::wal::default_slot_name(&source.database));
        }
    }
    Ok(config)
}

/// `EXACTLY_SOURCE__ORDERS__BATCH_SIZE` → `source.orders.batch_size`; `EXACTLY_BROKERS` →
/// `kafka.brokers`; `EXACTLY_KAFKA__PROPERTIES__SASL_PASSWORD` → `kafka.properties.sasl.password`
/// (librdkafka names use dots). Other `EXACTLY_*` variables (EXACTLY_LOG, EXACTLY_DATABASE of
/// the single commands) are not keys.
fn environment_key(name: &str) -> Option<Vec<String>> {
    if name == "EXACTLY_BROKERS" {
        return Some(vec!["kafka".into(), "brokers".into()]);
    }
    let rest = name.strip_prefix("EXACTLY_")?;
    if !rest.contains("__") {
        return None;
    }
    let mut path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
    if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
        path[2] = path[2].replace('_', ".");
    }
    Some(path)
}

/// Sets each environment override, typed by the setting it names: a value is the string it is
/// (`'s3cr3t'` keeps its quotes, `0x1F` and `83920417` stay text) wherever a string fits, and a
/// number, boolean or array only where the setting wants one (`batch_size = 250`). Kafka's
/// `brokers` and librdkafka properties are always strings. Whether a string fits is asked of
/// the settings types themselves, with every override in place.
fn apply_environment(table: &mut toml::Table, overrides: &[(Vec<String>, String)]) {
    let typed = |path: &[String], text: &str| -> Option<toml::Value> {
        if path.first().is_some_and(|p| p == "kafka") {
            return None;
        }
        match toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()?
            .remove("v")?
        {
            toml::Value::String(_) => None,
            value => Some(value),
        }
    };
    for (path, text) in overrides {
        set_path(
            table,
            path,
            typed(path, text).unwrap_or_else(|| toml::Value::String(text.clone())),
        );
    }
    for (path, text) in overrides {
        if typed(path, text).is_none() {
            continue;
        }
        let mut as_text = table.clone();
        set_path(&mut as_text, path, toml::Value::String(text.clone()));
        if as_text.clone().try_into::<ConfigFile>().is_ok() {
            *table = as_text;
        }
    }
}

/// `message` with every override's value replaced, so no error shows one (a secret given where
/// a number was wanted would otherwise be echoed by the parser).
fn hide_values<'a>(message: &str, values: impl Iterator<Item = &'a str>) -> String {
    let mut shown = message.to_owned();
    for value in values.filter(|v| !v.trim().is_empty()) {
        shown = shown.replace(value, "…");
    }
    shown
}

/// Sets `path` in `table`, creating tables on the way; a table key already in the file matches
/// the variable's lower-case name with `-` and `_` alike.
fn set_path<S: AsRef<str>>(table: &mut toml::Table, path: &[S], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = table;
    for segment in parents {
        let wanted = segment.as_ref();
        let key = current
            .keys()
            .find(|k| same_name(k, wanted))
            .cloned()
            .unwrap_or_else(|| wanted.to_owned());
        let entry = current
            .entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else { return };
        current = next;
    }
    let key = current
        .keys()
        .find(|k| same_name(k, last.as_ref()))
        .cloned()
        .unwrap_or_else(|| last.as_ref().to_owned());
    current.insert(key, value);
}

fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.chars()
            .zip(b.chars())
            .all(|(x, y)| x.eq_ignore_ascii_case(&y) || (matches!(x, '-' | '_') && matches!(y, '-' | '_')))
}

/// Which keys each component's table sets in the file (to refuse settings its mode ignores).
fn raw_keys(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut keys = BTreeMap::new();
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return keys;
    };
    for section in ["source", "consumer", "stream", "sink"] {
        if let Some(toml::Value::Table(components)) = table.get(section) {
            for (name, value) in components {
                if let toml::Value::Table(settings) = value {
                    keys.insert(
                        (section.to_owned(), name.clone()),
                        settings.keys().cloned().collect(),
                    );
                }
            }
        }
    }
    keys
}

/// Finds lines of keys in the file's text.
struct Locator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn line_at(&self, offset: usize) -> (usize, String) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let excerpt = self
            .text
            .lines()
            .nth(line - 1)
            .unwrap_or_default()
            .trim()
            .to_owned();
        (line, excerpt)
    }

    fn parse_error(&self, error: &toml::de::Error) -> ConfigError {
        let (line, excerpt) = match error.span() {
            Some(span) => {
                let (line, excerpt) = self.line_at(span.start);
                (Some(line), Some(excerpt))
            }
            None => (None, None),
        };
        ConfigError {
            file: self.file.to_owned(),
            key: line.and_then(|l| self.section_of(l)),
            line,
            message: error.message().to_owned(),
            excerpt,
        }
    }

    /// The `[table]` a line is in.
    fn section_of(&self, line: usize) -> Option<String> {
        let lines: Vec<&str> = self.text.lines().take(line).collect();
        lines
            .into_iter()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && !l.starts_with("[["))
            .map(|l| format!("in {l}"))
    }

    /// The line of `path` (the deepest part of it found in the file).
    fn line_of(&self, path: &[&str]) -> (Option<usize>, Option<String>) {
        let Ok(document) = toml::de::DeTable::parse(self.text) else {
            return (None, None);
        };
        let mut table = document.get_ref();
        let mut found = None;
        for segment in path {
            let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *segment) else {
                break;
            };
            found = Some(key.span().start);
            match value.get_ref() {
                toml::de::DeValue::Table(next) => table = next,
                _ => break,
            }
        }
        match found {
            Some(offset) => {
                let (line, excerpt) = self.line_at(offset);
                (Some(line), Some(excerpt))
            }
            None => (None, None),
        }
    }

    fn error(&self, path: &[&str], message: impl Into<String>) -> ConfigError {
        let (line, excerpt) = self.line_of(path);
        ConfigError {
            file: self.file.to_owned(),
            line,
            key: Some(path.join(".")),
            message: message.into(),
            excerpt,
        }
    }
}

fn validate(
    config: &ConfigFile,
    locate: &Locator<'_>,
    raw_keys: &BTreeMap<(String, String), Vec<String>>,
) -> Result<(), ConfigError> {
    if config.source.is_empty()
        && config.consumer.is_empty()
        && config.stream.is_empty()
        && config.sink.is_empty()
    {
        return Err(locate.error(
            &[],
            "the file describes nothing to run: add a [source.NAME], [consumer.NAME], [stream.NAME] or [sink.NAME] table",
        ));
    }
    if config.kafka.brokers.trim().is_empty() {
        return Err(locate.error(&["kafka", "brokers"], "is empty"));
    }
    if let Err(e) = config.kafka.validate() {
        let name = match &e {
            exactly_kafka::PropertyError::Protected { name, .. }
            | exactly_kafka::PropertyError::MissingVariable { name, .. } => name.clone(),
            _ => String::new(),
        };
        return Err(locate.error(&["kafka", "properties", &name], e.to_string()));
    }
    let given = |section: &str, name: &str, key: &str| {
        raw_keys
            .get(&(section.to_owned(), name.to_owned()))
            .is_some_and(|keys| keys.iter().any(|k| k == key))
    };
    // Replication slots are per server: two sources on one slot would steal each other's
    // changes and confirm each other's positions.
    let mut slots: BTreeMap<(String, String), &str> = BTreeMap::new();
    for (name, source) in &config.source {
        let at = |key: &'static str| ["source", name.as_str(), key];
        let database = source
            .database()
            .map_err(|e| locate.error(&at("database"), format!("{e:#}")))?;
        if let Some((key, why)) = source.unused_setting(|key| given("source", name, key)) {
            return Err(locate.error(
                &["source", name, key],
                format!("is not used with mode = {:?}: {why}", mode_name(source.mode)),
            ));
        }
        match (&database, source.mode) {
            (Database::Sqlite(_), RelayMode::Wal) => {
                return Err(locate.error(
                    &at("mode"),
                    "the wal mode follows PostgreSQL logical replication: database must be postgres://…",
                ))
            }
            (Database::Sqlite(_), _) if source.keys == crate::settings::Keys::Sequence => {
                return Err(locate.error(&at("keys"), "sequence keys need PostgreSQL"))
            }
            (Database::Postgres(url), RelayMode::Wal) => {
                let mut wal = exactly_postgres::WalConfig::new(url);
                if let Some(slot) = &source.slot {
                    wal.slot = slot.clone();
                }
                wal.publication = source.publication.clone();
                if let Err(e) = wal.validate() {
                    let key = if e.to_string().contains("publication") {
                        "publication"
                    } else {
                        "slot"
                    };
                    return Err(locate.error(&at(key), e.to_string()));
                }
                let server = server_of(url);
                if let Some(other) = slots.insert((server.clone(), wal.slot.clone()), name) {
                    return Err(locate.error(
                        &at(if source.slot.is_some() { "slot" } else { "database" }),
                        format!(
                            "sources {other} and {name} use the same replication slot {} on {server}: give each its own slot",
                            wal.slot
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    for (name, consumer) in &config.consumer {
        let at = |key: &'static str| ["consumer", name.as_str(), key];
        consumer
            .database()
            .map_err(|e| locate.error(&at("database"), format!("{e:#}")))?;
        if consumer.topics.is_empty() {
            return Err(locate.error(&at("topics"), "name at least one topic"));
        }
        if let Err(e) = consumer.handler_choice() {
            let key = if consumer.sql_file.is_some() && consumer.handler != "sql" {
                "sql_file"
            } else if !consumer.event_types.is_empty() && consumer.handler != "record" {
                "event_types"
            } else {
                "handler"
            };
            return Err(locate.error(&at(key), format!("{e:#}")));
        }
    }
    for (name, stream) in &config.stream {
        if let Some(job) = &stream.job {
            job.topology(exactly_stream::dsl::JOB_NAME)
                .map_err(|e| locate.error(&["stream", name, "job"], format!("{e}")))?;
            match (&stream.sink_database, &job.table) {
                (Some(_), None) => {
                    return Err(locate.error(
                        &["stream", name, "sink_database"],
                        "a job table's results go into the table its `table` names: set `table` in [stream.NAME.job]",
                    ))
                }
                (None, Some(_)) => {
                    return Err(locate.error(
                        &["stream", name, "job", "table"],
                        "the results table is in the stream's `sink_database`: set it (a postgres:// URL)",
                    ))
                }
                _ => {}
            }
        }
        let checked = stream
            .config(&config.kafka)
            .map_err(|e| locate.error(&["stream", name, "window_ms"], format!("{e:#}")))?;
        checked
            .check_topology()
            .map_err(|e| locate.error(&["stream", name, "job"], format!("{e}")))?;
        if let Some(url) = &stream.sink_database {
            if !matches!(Database::parse(url), Database::Postgres(_)) {
                return Err(locate.error(
                    &["stream", name, "sink_database"],
                    "the sink writes PostgreSQL: give a postgres:// URL",
                ));
            }
        }
    }
    for (name, sink) in &config.sink {
        let key = if sink.columns.is_empty() {
            "partition_by"
        } else {
            "columns"
        };
        sink.config(&config.kafka)
            .map_err(|e| locate.error(&["sink", name, key], format!("{e:#}")))?;
    }
    Ok(())
}

fn mode_name(mode: RelayMode) -> &'static str {
    match mode {
        RelayMode::Poll => "poll",
        RelayMode::Wal => "wal",
    }
}

/// `host:port` of a PostgreSQL URL.
fn server_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or("localhost"),
            u.port().unwrap_or(5432)
        ),
        Err(_) => url.to_owned(),
    }
}

/// The resolved settings as TOML, with every secret replaced: database URLs lose their
/// passwords and secret parameters, secret Kafka properties their values (an `env:NAME`
/// reference is shown: it names a variable, not a secret).
pub fn redacted(config: &ConfigFile) -> String {
    let mut shown = config.clone();
    for (name, value) in &mut shown.kafka.properties {
        if exactly_kafka::is_secret_property(name) && !value.starts_with("env:") {
            *value = "<redacted>".into();
        }
    }
    for source in shown.source.values_mut() {
        source.database = exactly_postgres::redact_url(&source.database);
    }
    for consumer in shown.consumer.values_mut() {
        consumer.database = exactly_postgres::redact_url(&consumer.database);
    }
    for stream in shown.stream.values_mut() {
        if let Some(url) = &mut stream.sink_database {
            *url = exactly_postgres::redact_url(url);
        }
    }
    // Object-store options are credentials as often as not: only their keys are shown.
    for sink in shown.sink.values_mut() {
        for option in &mut sink.storage_options {
            if let Some((key, value)) = option.split_once('=') {
                if !value.starts_with("env:") {
                    *option = format!("{key}=<redacted>");
                }
            } else {
                *option = "<redacted>".into();
            }
        }
        sink.table = exactly_postgres::redact_url(&sink.table);
    }
    let mut table = match toml::Table::try_from(&shown) {
        Ok(table) => table,
        Err(e) => return format!("# cannot show the settings: {e}\n"),
    };
    // Only the settings each source's mode reads.
    if let Some(toml::Value::Table(sources)) = table.get_mut("source") {
        for (name, settings) in sources.iter_mut() {
            if let (Some(source), toml::Value::Table(settings)) = (shown.source.get(name), settings) {
                settings.retain(|key, _| source.reads(key));
            }
        }
    }
    match toml::to_string_pretty(&table) {
        Ok(text) if text.ends_with('\n') => text,
        Ok(text) => text + "\n",
        Err(e) => format!("# cannot show the settings: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, environment: &[(&str, &str)]) -> Result<ConfigFile, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exactly.toml");
        std::fs::write(&path, text).expect("write");
        let args = RunArgs {
            config: path,
            brokers: None,
            kafka_properties: vec![],
            metrics_addr: None,
            no_metrics: false,
        };
        load(
            &args,
            environment.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    const TWO_SOURCES: &str = r#"
[kafka]
brokers = "localhost:9092"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.password" = "hunter2"

[source.orders]
database = "postgres://app:hunter2@db:5432/orders?sslmode=verify-full"
mode = "wal"
slot = "orders_slot"

[source.billing]
database = "billing.db"
batch_size = 100

[consumer.ledger]
database = "ledger.db"
topics = ["order-events"]
"#;

    #[test]
    fn a_stream_job_table_loads_and_a_bad_one_is_refused_at_its_key() {
        let text = r#"
[kafka]
brokers = "localhost:9092"

[stream.orders-agg.job]
input = "orders"
key = "/product_id"
filter = { pointer = "/status", equals = "paid" }
window = { kind = "session", gap_ms = 600000, grace_ms = 60000 }
aggregate = { count_distinct = "/customer_id" }
emit = "final"
output = "orders-per-product"
"#;
        let config = load_text(text, &[]).expect("loads");
        let job = config.stream["orders-agg"].job.as_ref().expect("a job");
        assert_eq!(job.emit, exactly_stream::dsl::EmitSpec::Final);
        let error = load_text(&text.replace("gap_ms = 600000", "gap_ms = 0"), &[])
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("stream.orders-agg.job") && error.contains("inactivity gap must be positive"),
            "{error}"
        );
        let error = load_text(&text.replace("\"/product_id\"", "\"product_id\""), &[])
            .expect_err("refused")
            .to_string();
        assert!(error.contains("is not a JSON pointer"), "{error}");

        // A results table needs the stream's database, and the database a table.
        let with_table = text.replace(
            "output = \"orders-per-product\"",
            "output = \"orders-per-product\"\ntable = \"orders_per_product\"",
        );
        let error = load_text(&with_table, &[]).expect_err("no database").to_string();
        assert!(
            error.contains("stream.orders-agg.job.table") && error.contains("sink_database"),
            "{error}"
        );
        let with_database = |t: &str| {
            t.replace(
                "[stream.orders-agg.job]",
                "[stream.orders-agg]\nsink_database = \"postgres://db/results\"\n\n[stream.orders-agg.job]",
            )
        };
        let config = load_text(&with_database(&with_table), &[]).expect("loads");
        let job = config.stream["orders-agg"].job.as_ref().expect("a job");
        assert_eq!(job.table.as_deref(), Some("orders_per_product"));
        let error = load_text(&with_database(text), &[])
            .expect_err("no table")
            .to_string();
        assert!(error.contains("set `table`"), "{error}");
        let error = load_text(
            &with_database(&with_table.replace("orders_per_product\"", "orders per product\"")),
            &[],
        )
        .expect_err("not an identifier")
        .to_string();
        assert!(error.contains("not a plain identifier"), "{error}");
    }

    #[test]
    fn a_file_with_two_sources_loads_with_defaults_and_names() {
        let config = load_text(TWO_SOURCES, &[]).expect("loads");
        assert_eq!(config.source.len(), 2);
        assert_eq!(config.source["billing"].batch_size, 100);
        assert_eq!(config.source["orders"].mode, RelayMode::Wal);
        assert_eq!(config.consumer["ledger"].group, "ledger");
        assert_eq!(config.consumer["ledger"].handler, "record");
        assert_eq!(config.metrics.addr, default_metrics_addr());
    }

    #[test]
    fn debezium_tables_sql_handlers_and_key_headers_load_and_wrong_pairs_are_refused() {
        let text = r#"
[kafka]
brokers = "localhost:9092"

[source.orders]
database = "postgres://app@db/orders"

[source.orders.debezium]
table = "public.outboxevent"
timestamp_column = "timestamp"
route_topic_replacement = "events.${routedByValue}"
additional_placement = ["type:header:eventType"]

[consumer.sink]
database = "postgres://app@db/sink"
topics = ["outbox.event.Order"]
handler = "sql"
sql_file = "apply.sql"
key_header = "id"
"#;
        let config = load_text(text, &[]).expect("loads");
        let table = config.source["orders"]
            .debezium
            .table()
            .expect("valid")
            .expect("a table");
        assert_eq!(table.table, "public.outboxevent");
        assert_eq!(table.route_topic_replacement, "events.${routedByValue}");
        assert_eq!(table.route_by_field, "aggregatetype", "Debezium's default");
        assert_eq!(table.headers.len(), 1);
        assert_eq!(config.consumer["sink"].key_header.as_deref(), Some("id"));
        assert!(matches!(
            config.consumer["sink"].handler_choice().expect("sql"),
            crate::handlers::HandlerChoice::Sql(_)
        ));

        let sql_file_without_sql = text.replace("handler = \"sql\"\n", "");
        let error = load_text(&sql_file_without_sql, &[])
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("sql_file") && error.contains("sql handler only"),
            "{error}"
        );
        let bad_route = text.replace("events.${routedByValue}", "events.${nope}");
        let config = load_text(&bad_route, &[]).expect("loads");
        let error = config.source["orders"]
            .debezium
            .table()
            .expect_err("refused")
            .to_string();
        assert!(error.contains("nope"), "{error}");
    }

    #[test]
    fn environment_values_are_the_strings_they_are_where_a_string_fits() {
        let config = load_text(
            TWO_SOURCES,
            &[
                ("EXACTLY_KAFKA__PROPERTIES__SASL_PASSWORD", "83920417"),
                ("EXACTLY_KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "'s3cr3t'"),
                ("EXACTLY_KAFKA__PROPERTIES__SASL_USERNAME", "0x1F"),
                ("EXACTLY_CONSUMER__LEDGER__GROUP", "0x1F"),
                ("EXACTLY_CONSUMER__LEDGER__DATABASE", "'quoted'.db"),
                ("EXACTLY_SOURCE__BILLING__BATCH_SIZE", "250"),
            ],
        )
        .expect("loads");
        assert_eq!(config.kafka.properties["sasl.password"], "83920417");
        assert_eq!(config.kafka.properties["ssl.key.password"], "'s3cr3t'");
        assert_eq!(config.kafka.properties["sasl.username"], "0x1F");
        assert_eq!(config.consumer["ledger"].group, "0x1F");
        assert_eq!(config.consumer["ledger"].database, "'quoted'.db");
        assert_eq!(
            config.source["billing"].batch_size, 250,
            "a number where a number is wanted"
        );
    }

    #[test]
    fn an_override_that_does_not_fit_is_refused_without_its_value() {
        let error = load_text(
            TWO_SOURCES,
            &[("EXACTLY_SOURCE__BILLING__BATCH_SIZE", "hunter2-83920417")],
        )
        .expect_err("a batch size is a number")
        .to_string();
        assert!(error.contains("EXACTLY_SOURCE__BILLING__BATCH_SIZE"), "{error}");
        assert!(!error.contains("hunter2-83920417"), "{error}");
    }

    #[test]
    fn environment_overrides_the_file_and_flags_override_both() {
        let config = load_text(
            TWO_SOURCES,
            &[
                ("EXACTLY_SOURCE__BILLING__BATCH_SIZE", "250"),
                ("EXACTLY_BROKERS", "from-env:9092"),
                ("EXACTLY_KAFKA__PROPERTIES__SASL_USERNAME", "app"),
                ("EXACTLY_LOG", "debug"),
            ],
        )
        .expect("loads");
        assert_eq!(config.source["billing"].batch_size, 250);
        assert_eq!(config.kafka.brokers, "from-env:9092");
        assert_eq!(config.kafka.properties["sasl.username"], "app");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exactly.toml");
        std::fs::write(&path, TWO_SOURCES).expect("write");
        let args = RunArgs {
            config: path,
            brokers: Some("from-flag:9092".into()),
            kafka_properties: vec![],
            metrics_addr: None,
            no_metrics: true,
        };
        let config = load(
            &args,
            [("EXACTLY_BROKERS".to_string(), "from-env:9092".to_string())],
        )
        .expect("loads");
        assert_eq!(config.kafka.brokers, "from-flag:9092");
        assert!(!config.metrics.enabled);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let text = TWO_SOURCES.replace("batch_size = 100", "batch_size = 100\nbatch_sise = 5");
        let err = load_text(&text, &[]).expect_err("unknown key").to_string();
        assert!(err.contains("line 17"), "{err}");
        assert!(err.contains("batch_sise"), "{err}");
        assert!(err.contains("[source.billing]"), "{err}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_line() {
        let text = TWO_SOURCES.replace("batch_size = 100", "batch_size = \"many\"");
        let err = load_text(&text, &[]).expect_err("wrong type").to_string();
        assert!(err.contains("line 16"), "{err}");
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn two_sources_on_one_slot_are_refused() {
        let text = format!(
            "{TWO_SOURCES}\n[source.orders2]\ndatabase = \"postgres://app@db/orders\"\nmode = \"wal\"\nslot = \"orders_slot\"\n"
        );
        let err = load_text(&text, &[]).expect_err("same slot").to_string();
        assert!(err.contains("same replication slot orders_slot"), "{err}");
        assert!(err.contains("source.orders2.slot"), "{err}");
        assert!(err.contains("line 25"), "{err}");
    }

    #[test]
    fn an_invalid_slot_name_is_refused_before_any_sql() {
        let text = TWO_SOURCES.replace("orders_slot", "orders; DROP TABLE outbox");
        let err = load_text(&text, &[]).expect_err("bad slot").to_string();
        assert!(err.contains("source.orders.slot"), "{err}");
        assert!(err.contains("line 12"), "{err}");
    }

    #[test]
    fn a_setting_the_mode_ignores_is_refused() {
        let text = TWO_SOURCES.replace("batch_size = 100", "slot = \"x\"");
        let err = load_text(&text, &[]).expect_err("slot on poll").to_string();
        assert!(err.contains("source.billing.slot"), "{err}");
        assert!(err.contains("only the wal mode reads it"), "{err}");
    }

    #[test]
    fn protected_kafka_properties_are_refused_with_their_line() {
        let text = TWO_SOURCES.replace(
            "\"sasl.password\"",
            "\"enable.idempotence\" = \"false\"\n\"sasl.password\"",
        );
        let err = load_text(&text, &[]).expect_err("protected").to_string();
        assert!(err.contains("kafka.properties.enable.idempotence"), "{err}");
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn the_resolved_settings_show_no_secret() {
        let config = load_text(TWO_SOURCES, &[]).expect("loads");
        let shown = redacted(&config);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("orders_slot"), "{shown}");
        assert!(shown.contains("sslmode=verify-full"), "{shown}");
    }
}
