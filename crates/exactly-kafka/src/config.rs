//! Client settings exactly depends on, in one place: how to reach the cluster
//! ([`KafkaSettings`]: bootstrap servers and librdkafka properties passed through, security
//! included), and the producer and consumer settings exactly-once rests on, which no
//! passed-through property may override.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;

/// How to reach a Kafka cluster: the bootstrap servers and any librdkafka properties
/// (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`, timeouts, …), passed to every
/// client exactly creates. A value `env:NAME` is read from the environment variable `NAME` when
/// a client is made, so a secret (`sasl.password=env:KAFKA_PASSWORD`) never sits in a file or
/// on a command line. `Debug` hides the values of secret properties.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// librdkafka properties, by name.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// A property exactly sets itself, and why: overriding it would break a guarantee.
const PROTECTED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set it as brokers"),
    (
        "acks",
        "every record must reach all in-sync replicas before it counts as published",
    ),
    (
        "enable.idempotence",
        "the producer's retries must not duplicate or reorder records",
    ),
    (
        "enable.gapless.guarantee",
        "sequence keys need it where exactly turns it on",
    ),
    (
        "max.in.flight.requests.per.connection",
        "idempotence keeps order only up to 5 in flight",
    ),
    ("max.in.flight", "idempotence keeps order only up to 5 in flight"),
    (
        "transactional.id",
        "exactly derives it from the source or application, so zombies are fenced",
    ),
    (
        "isolation.level",
        "consumers must read committed transactions only",
    ),
    (
        "enable.auto.commit",
        "offsets are committed only after the effect is durable",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored only after the effect is durable",
    ),
    ("group.id", "set the group with --group (or the application id)"),
];

/// A property that cannot be passed through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyError {
    /// exactly-once depends on exactly's own value.
    #[error("kafka property {name} cannot be set: {why}")]
    Protected {
        /// The property.
        name: String,
        /// What it protects.
        why: &'static str,
    },
    /// `name=value` expected.
    #[error("kafka property {0:?} is not name=value")]
    Malformed(String),
    /// `env:NAME` names a variable that is not set.
    #[error("kafka property {name} reads the environment variable {variable}, which is not set")]
    MissingVariable {
        /// The property.
        name: String,
        /// The variable.
        variable: String,
    },
}

impl KafkaSettings {
    /// Bootstrap servers only.
    pub fn new(brokers: &str) -> Self {
        KafkaSettings {
            brokers: brokers.to_owned(),
            properties: BTreeMap::new(),
        }
    }

    /// `brokers` with `properties` (as `--kafka-property` gives them), every one checked: none
    /// protected, every `env:` variable set.
    pub fn checked(
        brokers: &str,
        properties: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, PropertyError> {
        let settings = KafkaSettings {
            brokers: brokers.to_owned(),
            properties: properties.into_iter().collect(),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Adds a property; refuses the ones exactly-once depends on.
    pub fn with_property(mut self, name: &str, value: &str) -> Result<Self, PropertyError> {
        check_property(name)?;
        self.properties.insert(name.to_owned(), value.to_owned());
        Ok(self)
    }

    /// Checks every property: none protected, every `env:` variable set.
    pub fn validate(&self) -> Result<(), PropertyError> {
        for (name, value) in &self.properties {
            check_property(name)?;
            resolve(name, value)?;
        }
        Ok(())
    }

    /// A client configuration with the bootstrap servers and every property (environment
    /// references resolved); exactly's own settings are applied on top by the callers.
    pub fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (name, value) in &self.properties {
            match resolve(name, value) {
                Ok(value) => {
                    config.set(name, value.as_ref());
                }
                // validate() refused this at start; a variable unset since is reported here.
                Err(e) => tracing::error!("{e}"),
            }
        }
        config
    }
}

/// Parses `name=value` (the `--kafka-property` form), refusing protected names.
pub fn parse_property(text: &str) -> Result<(String, String), PropertyError> {
    let (name, value) = text
        .split_once('=')
        .filter(|(n, _)| !n.trim().is_empty())
        .ok_or_else(|| PropertyError::Malformed(redacted_pair(text)))?;
    check_property(name.trim())?;
    Ok((name.trim().to_owned(), value.to_owned()))
}

fn check_property(name: &str) -> Result<(), PropertyError> {
    match PROTECTED.iter().find(|(p, _)| *p == name) {
        Some((_, why)) => Err(PropertyError::Protected {
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

fn resolve<'a>(name: &str, value: &'a str) -> Result<Cow<'a, str>, PropertyError> {
    match value.strip_prefix("env:") {
        Some(variable) => {
            std::env::var(variable)
                .map(Cow::Owned)
                .map_err(|_| PropertyError::MissingVariable {
                    name: name.to_owned(),
                    variable: variable.to_owned(),
                })
        }
        None => Ok(Cow::Borrowed(value)),
    }
}

/// Properties whose names look secret but hold a path or an address: shown.
const NOT_SECRET: &[&str] = &[
    "ssl.key.location",
    "ssl.keystore.location",
    "https.client.key.location",
    "sasl.kerberos.keytab",
    "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.assertion.private.key.file",
];

/// Whether a property's value is a secret (never printed): every name that contains
/// `password`, `secret`, `key.pem`, `passphrase`, `token` or `.key` (librdkafka's
/// `ssl.key.pem`, `ssl.keystore.password`, `sasl.oauthbearer.assertion.private.key.pem` and
/// `…passphrase`, `sasl.oauthbearer.client.secret`), and `sasl.oauthbearer.config`, except the
/// few known names among those that hold a path or a URL ([`NOT_SECRET`]). A name nobody
/// foresaw is hidden rather than shown.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if NOT_SECRET.contains(&name.as_str()) {
        return false;
    }
    [
        "password",
        "secret",
        "key.pem",
        "passphrase",
        "token",
        ".key",
        "ssl_key",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// A malformed `name=value` as an error may show it: the name only, never a value (a secret's
/// name may be misspelt, so no value is safe to echo).
fn redacted_pair(text: &str) -> String {
    match text.split_once('=') {
        Some((name, _)) => format!("{name}=…"),
        None if text.chars().count() > 64 => format!("{}…", text.chars().take(64).collect::<String>()),
        None => text.to_owned(),
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) && !v.starts_with("env:") {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("properties", &shown)
            .finish()
    }
}

/// Anything that says how to reach a cluster: a bootstrap list (`"127.0.0.1:9092"`) or whole
/// [`KafkaSettings`]. Functions that make clients take this, so a plain broker list still works
/// wherever no security settings are needed.
pub trait Cluster {
    /// The settings, borrowed or made from a bootstrap list.
    fn settings(&self) -> Cow<'_, KafkaSettings>;
}

impl Cluster for str {
    fn settings(&self) -> Cow<'_, KafkaSettings> {
        Cow::Owned(KafkaSettings::new(self))
    }
}

impl Cluster for String {
    fn settings(&self) -> Cow<'_, KafkaSettings> {
        Cow::Owned(KafkaSettings::new(self))
    }
}

impl Cluster for KafkaSettings {
    fn settings(&self) -> Cow<'_, KafkaSettings> {
        Cow::Borrowed(self)
    }
}

/// A producer that cannot duplicate or reorder on its own retries: acks from every in-sync
/// replica, idempotence on (which also caps in-flight requests at 5 and keeps order).
/// `gapless` asks librdkafka to fail fatally rather than leave a gap in a partition, which
/// sequence keys need (a gap followed by a resend would put a lower key after a higher one).
pub fn producer_config(kafka: &(impl Cluster + ?Sized), gapless: bool) -> ClientConfig {
    let mut config = kafka.settings().client();
    config.set("acks", "all").set("enable.idempotence", "true");
    tuning_default(&mut config, "linger.ms", "5");
    tuning_default(&mut config, "message.timeout.ms", "30000");
    tuning_default(&mut config, "queue.buffering.max.messages", "200000");
    if gapless {
        config.set("enable.gapless.guarantee", "true");
    }
    config
}

/// A consumer that commits only what the application committed: no auto commit, start from
/// the earliest record when the group has no offset, read only committed transactions.
pub fn consumer_config(kafka: &(impl Cluster + ?Sized), group_id: &str) -> ClientConfig {
    let mut config = kafka.settings().client();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    tuning_default(&mut config, "session.timeout.ms", "6000");
    // Kafka's default. The consumer retries a failing handler (about 100 s at the default
    // backoff) and a down database without polling; a shorter interval would put a live
    // member out of its group for it, and its partitions would wait on a rejoin.
    tuning_default(&mut config, "max.poll.interval.ms", "300000");
    tuning_default(&mut config, "heartbeat.interval.ms", "1000");
    // Kafka answers a fetch as soon as fetch.min.bytes (1) arrived, so this only paces idle
    // fetches there; Tansu holds every fetch for the whole wait, and at librdkafka's 500 ms the
    // commit-to-effect p50 was 130 ms instead of 11 ms (exactly bench e2e).
    tuning_default(&mut config, "fetch.wait.max.ms", "10");
    // When a partition's prefetch queue is full (queued.min.messages, 100,000 by default),
    // librdkafka postpones its next fetch by this much: 1 s by default. A consumer that takes
    // the queue in bursts (the Delta sink between appends, the stream processor between
    // commits) then waited up to a second for records the broker had ready: the Delta sink ran
    // at 0.22-0.25 of a plain read with the default and 0.49 with 10 ms (exactly bench
    // sink-delta, 400,000 records).
    tuning_default(&mut config, "fetch.queue.backoff.ms", "10");
    config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    config
}

/// Makes a consumer a static member of its group (`group.instance.id`, KIP-345), unless the
/// user's settings name one already: a member restarted within the session timeout takes back
/// its partitions without a rebalance of the whole group, and one that sent JoinGroup and died
/// cannot hold the group in a rebalance for longer than the session timeout. A static member
/// does not leave its group when it stops; the coordinator drops it after the session timeout.
/// Every live member of a group needs its own id.
pub fn static_membership(config: &mut ClientConfig, instance_id: Option<&str>) {
    if let Some(id) = instance_id {
        tuning_default(config, "group.instance.id", id);
    }
}

/// Sets a performance or liveness property unless the user's settings already did: these are
/// exactly's defaults, not its guarantees (those are protected and always set).
fn tuning_default(config: &mut ClientConfig, name: &str, value: &str) {
    if config.get(name).is_none() {
        config.set(name, value);
    }
}

/// A reader that is assigned partitions (no group membership) and reports reaching their end:
/// topic scans, restores, the progress read.
pub fn reader_config(kafka: &(impl Cluster + ?Sized), group_id: &str, isolation: &str) -> ClientConfig {
    let mut config = kafka.settings().client();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation);
    // Readers catch up on whole partitions (restores, scans): larger fetches, fewer round trips.
    tuning_default(&mut config, "max.partition.fetch.bytes", "16777216");
    tuning_default(&mut config, "fetch.wait.max.ms", "10");
    // A bounded prefetch, so memory does not grow with the partition: librdkafka prefetches
    // until a partition holds queued.min.messages (100,000 by default) or the kbytes, and a
    // restore of 100 MiB held 60 MiB of fetch responses with the default. A full queue then
    // postpones the next fetch by fetch.queue.backoff.ms (1 s by default): with records of
    // 500 B a restore read 5 MB/s against 90 MB/s.
    tuning_default(&mut config, "queued.min.messages", "10000");
    tuning_default(&mut config, "queued.max.messages.kbytes", "16384");
    tuning_default(&mut config, "fetch.max.bytes", "16777216");
    tuning_default(&mut config, "fetch.queue.backoff.ms", "10");
    config
}

/// How often librdkafka reports statistics (consumer lag comes from them).
pub(crate) const STATISTICS_INTERVAL_MS: &str = "5000";

/// Exports each partition's consumer lag (records between the position read and the last stable
/// offset; see `partition_lag`) as the gauge `metric{topic, partition}`; returns the total over
/// the partitions whose lag is known.
pub fn export_consumer_lag(statistics: &rdkafka::Statistics, metric: &'static str) -> Option<i64> {
    let mut total: Option<i64> = None;
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            // Partition -1 is librdkafka's internal unassigned-messages queue.
            if *partition < 0 {
                continue;
            }
            if let Some(lag) = partition_lag(p) {
                metrics::gauge!(metric, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(lag as f64);
                total = Some(total.unwrap_or(0) + lag);
            }
        }
    }
    total
}

/// Records between what this consumer has read and the end a read_committed reader can reach
/// (the last stable offset; the high watermark where librdkafka has none). From the position
/// handed to the application: a stream job commits its offsets inside its transactions, so
/// librdkafka's own `consumer_lag` (from offsets this client committed) stays unknown there.
/// None while unknown (not assigned here, or nothing read yet).
fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    if p.app_offset >= 0 && end >= 0 {
        Some((end - p.app_offset).max(0))
    } else if p.consumer_lag >= 0 {
        Some(p.consumer_lag)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_position_read_to_the_stable_end() {
        let partition = |app_offset, ls_offset, hi_offset, consumer_lag| rdkafka::statistics::Partition {
            app_offset,
            ls_offset,
            hi_offset,
            consumer_lag,
            ..Default::default()
        };
        assert_eq!(
            partition_lag(&partition(40, 100, 120, -1)),
            Some(60),
            "a stream job's position"
        );
        assert_eq!(
            partition_lag(&partition(40, -1, 120, -1)),
            Some(80),
            "no stable offset yet"
        );
        assert_eq!(
            partition_lag(&partition(-1, 100, 120, 7)),
            Some(7),
            "committed offsets only"
        );
        assert_eq!(partition_lag(&partition(-1, -1, -1, -1)), None, "not assigned");
        assert_eq!(
            partition_lag(&partition(130, 100, 120, -1)),
            Some(0),
            "never below zero"
        );
    }

    #[test]
    fn a_consumer_fetches_again_soon_after_its_queue_drains_unless_the_user_says_otherwise() {
        let settings = KafkaSettings::new("localhost:9092");
        let config = consumer_config(&settings, "g");
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("10"));
        let mine = KafkaSettings::checked(
            "localhost:9092",
            [("fetch.queue.backoff.ms".to_owned(), "250".to_owned())],
        )
        .expect("settings");
        assert_eq!(
            consumer_config(&mine, "g").get("fetch.queue.backoff.ms"),
            Some("250")
        );
    }

    #[test]
    fn protected_properties_are_refused_with_the_reason() {
        for name in [
            "acks",
            "enable.idempotence",
            "isolation.level",
            "enable.auto.commit",
            "max.in.flight",
        ] {
            let err = KafkaSettings::new("b:9092")
                .with_property(name, "x")
                .expect_err(name);
            assert!(err.to_string().contains(name), "{err}");
        }
        let err = parse_property("acks=1").expect_err("acks");
        assert!(err.to_string().contains("all in-sync replicas"), "{err}");
        assert_eq!(
            parse_property("security.protocol=SASL_SSL"),
            Ok(("security.protocol".into(), "SASL_SSL".into()))
        );
        assert!(matches!(
            parse_property("novalue"),
            Err(PropertyError::Malformed(_))
        ));
    }

    #[test]
    fn secret_property_names_follow_librdkafkas_secrets() {
        for secret in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.config",
            "SASL.PASSWORD",
            "some.future.token",
            "some.future.key",
        ] {
            assert!(is_secret_property(secret), "{secret} is a secret");
        }
        for shown in [
            "ssl.key.location",
            "ssl.keystore.location",
            "sasl.kerberos.keytab",
            "sasl.oauthbearer.token.endpoint.url",
            "sasl.oauthbearer.assertion.private.key.file",
            "sasl.username",
            "security.protocol",
            "ssl.ca.location",
        ] {
            assert!(!is_secret_property(shown), "{shown} is not a secret");
        }
        let settings = KafkaSettings {
            brokers: "b:9092".into(),
            properties: [
                (
                    "sasl.oauthbearer.assertion.private.key.pem".to_owned(),
                    "-----BEGIN KEY-----xyz".to_owned(),
                ),
                (
                    "sasl.oauthbearer.assertion.private.key.passphrase".to_owned(),
                    "pass-phrase-77".to_owned(),
                ),
            ]
            .into_iter()
            .collect(),
        };
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("xyz") && !shown.contains("pass-phrase-77"),
            "{shown}"
        );
    }

    #[test]
    fn secrets_come_from_the_environment_and_are_never_shown() {
        let settings = KafkaSettings::new("b:9092")
            .with_property("sasl.password", "hunter2-literal")
            .and_then(|s| s.with_property("sasl.username", "svc"))
            .expect("allowed");
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("svc"), "{shown}");
        let from_env = KafkaSettings::new("b:9092")
            .with_property("sasl.password", "env:EXACTLY_TEST_UNSET_VARIABLE_XYZ")
            .expect("allowed");
        assert!(matches!(
            from_env.validate(),
            Err(PropertyError::MissingVariable { .. })
        ));
        let malformed = parse_property("sasl.password").expect_err("malformed");
        assert!(!malformed.to_string().contains("hunter2"));
        let err = parse_property("=hunter2").expect_err("no name");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
