//! Topic set-up.

use std::time::Duration;

use crate::config::Cluster;
use crate::error::KafkaFlowError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

/// Creates the topics that do not exist yet, with `partitions` each.
pub async fn ensure_topics(
    kafka: &(impl Cluster + ?Sized),
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaFlowError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    create_missing(kafka, &new).await
}

/// Sends CreateTopics; a topic that already exists is fine.
async fn create_missing(kafka: &(impl Cluster + ?Sized), new: &[NewTopic<'_>]) -> Result<(), KafkaFlowError> {
    let admin: AdminClient<crate::TokenContext> = kafka
        .settings()
        .client()
        .create_with_context(crate::TokenContext)
        .map_err(KafkaFlowError::at("create admin client"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new, &options)
        .await
        .map_err(KafkaFlowError::at("create topics"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!("creating topic {topic} failed: {code}");
                return Err(KafkaFlowError::Kafka {
                    context: "create topic",
                    source: rdkafka::error::KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// How an internal topic (changelog, progress, dead letters) is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalTopic {
    /// Topic name.
    pub name: String,
    /// Partitions (a changelog has one per input partition).
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i32,
    /// `min.insync.replicas`: with acks=all, a write needs this many replicas.
    pub min_insync_replicas: i32,
    /// `cleanup.policy=compact` (changelogs and positions keep the latest value per key).
    pub compacted: bool,
}

/// Creates internal topics that do not exist yet with their partitions, replication and
/// configs; an existing topic with fewer partitions than asked is an error (its keys would map
/// to the wrong tasks).
pub async fn ensure_internal_topics(
    kafka: &(impl Cluster + ?Sized),
    topics: &[InternalTopic],
) -> Result<(), KafkaFlowError> {
    let min_isr: Vec<String> = topics.iter().map(|t| t.min_insync_replicas.to_string()).collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&min_isr)
        .map(|(t, isr)| {
            NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(t.replication_factor),
            )
            .set("min.insync.replicas", isr)
            .set("cleanup.policy", if t.compacted { "compact" } else { "delete" })
        })
        .collect();
    create_missing(kafka, &new).await?;
    for t in topics {
        let have = partition_count(kafka, &t.name)?;
        if have < t.partitions {
            return Err(KafkaFlowError::Layout(format!(
                "topic {} has {have} partitions, {} needed",
                t.name, t.partitions
            )));
        }
    }
    Ok(())
}

/// The number of partitions of `topic` (0 when it does not exist).
pub fn partition_count(kafka: &(impl Cluster + ?Sized), topic: &str) -> Result<i32, KafkaFlowError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer<crate::TokenContext> = kafka
        .settings()
        .client()
        .create_with_context(crate::TokenContext)
        .map_err(KafkaFlowError::at("create metadata client"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(KafkaFlowError::at("fetch metadata"))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32))
}

/// The configs a broker reports for `topic` (name → value), for checks and `exactly status`.
pub async fn topic_configs(
    kafka: &(impl Cluster + ?Sized),
    topic: &str,
) -> Result<std::collections::BTreeMap<String, String>, KafkaFlowError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<crate::TokenContext> = kafka
        .settings()
        .client()
        .create_with_context(crate::TokenContext)
        .map_err(KafkaFlowError::at("create admin client"))?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await
        .map_err(KafkaFlowError::at("describe configs"))?;
    let mut configs = std::collections::BTreeMap::new();
    for result in results {
        let resource = result.map_err(|code| KafkaFlowError::Kafka {
            context: "describe topic configs",
            source: rdkafka::error::KafkaError::AdminOp(code),
        })?;
        for entry in resource.entries {
            if let Some(value) = entry.value {
                configs.insert(entry.name, value);
            }
        }
    }
    Ok(configs)
}

/// Remembers what librdkafka reported, so a failed metadata request can say why (an untrusted
/// certificate, a refused SASL login) instead of only timing out. A misconfiguration is kept
/// over the generic errors that follow it ("all brokers down").
#[derive(Default)]
struct LastError(std::sync::Mutex<Option<(rdkafka::error::KafkaError, String)>>);

impl rdkafka::ClientContext for LastError {
    crate::oauth::oauth_token_refresh!();

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!("librdkafka: {error}: {reason}");
        if let Ok(mut last) = self.0.lock() {
            let keep = last.as_ref().is_some_and(|(e, _)| is_misconfiguration(e));
            if !keep {
                *last = Some((error, reason.to_owned()));
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LastError {}

/// Whether a client error is a misconfiguration that retrying cannot fix.
fn is_misconfiguration(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::KafkaError;
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::UnsupportedSASLMechanism
                | RDKafkaErrorCode::IllegalSASLState
        )
    ) || matches!(error, KafkaError::ClientCreation(_))
}

/// Asks the cluster for its metadata within `timeout`, once, at a command's start. A TLS or
/// authentication failure (an untrusted certificate, a wrong password) is an error with
/// librdkafka's reason: retrying would never fix it. A broker that does not answer is only
/// logged, since it may be restarting; the clients retry on their own.
pub fn check_connection(kafka: &(impl Cluster + ?Sized), timeout: Duration) -> Result<(), KafkaFlowError> {
    let settings = kafka.settings();
    match ask_metadata(kafka, timeout)? {
        None => Ok(()),
        Some(Unanswered {
            misconfigured: true,
            reason,
        }) => Err(KafkaFlowError::Unreachable {
            brokers: settings.brokers.clone(),
            reason,
        }),
        Some(Unanswered { reason, .. }) => {
            tracing::warn!(
                "Kafka at {} does not answer yet ({reason}); going on, the clients retry",
                settings.brokers
            );
            Ok(())
        }
    }
}

/// Whether the cluster answers a metadata request within `timeout`, for readiness probes: any
/// failure, a broker that is down included, is an error with librdkafka's reason.
pub fn broker_answers(kafka: &(impl Cluster + ?Sized), timeout: Duration) -> Result<(), KafkaFlowError> {
    match ask_metadata(kafka, timeout)? {
        None => Ok(()),
        Some(Unanswered { reason, .. }) => Err(KafkaFlowError::Unreachable {
            brokers: kafka.settings().brokers.clone(),
            reason,
        }),
    }
}

/// Why a metadata request got no answer.
struct Unanswered {
    /// Settings that retrying will not fix (TLS, authentication).
    misconfigured: bool,
    reason: String,
}

fn ask_metadata(
    kafka: &(impl Cluster + ?Sized),
    timeout: Duration,
) -> Result<Option<Unanswered>, KafkaFlowError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let settings = kafka.settings();
    let consumer: BaseConsumer<LastError> = settings
        .client()
        .create_with_context(LastError::default())
        .map_err(KafkaFlowError::at("create metadata client"))?;
    let answered = consumer.fetch_metadata(None, timeout);
    if answered.is_err() {
        // Error events reach the context only while the client is polled.
        for _ in 0..5 {
            let _ = consumer.poll(Duration::from_millis(100));
        }
    }
    let last = consumer.context().0.lock().ok().and_then(|last| last.clone());
    Ok(match (answered, last) {
        (Ok(_), _) => None,
        (Err(e), last) => Some(Unanswered {
            misconfigured: last.as_ref().is_some_and(|(error, _)| is_misconfiguration(error)),
            reason: last.map_or_else(|| e.to_string(), |(error, reason)| format!("{error}: {reason}")),
        }),
    })
}

/// How far a consumer group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (None: nothing committed yet).
    pub committed: Option<i64>,
    /// The partition's high watermark.
    pub end: i64,
    /// `end - committed`, or everything from the low watermark when nothing is committed.
    pub lag: i64,
}

/// The committed offsets of `group` on every partition of `topics`, and how far each is behind
/// the end (read only: the group is not joined). For `exactly status`.
pub fn group_lag(
    kafka: &(impl Cluster + ?Sized),
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<PartitionLag>, KafkaFlowError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer<crate::TokenContext> = kafka
        .settings()
        .client()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create_with_context(crate::TokenContext)
        .map_err(KafkaFlowError::at("create lag reader"))?;
    let mut list = rdkafka::TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(KafkaFlowError::at("read topic metadata"))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                list.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer
        .committed_offsets(list, timeout)
        .map_err(KafkaFlowError::at("read committed offsets"))?;
    let mut lags = Vec::new();
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), timeout)
            .map_err(KafkaFlowError::at("read watermarks"))?;
        let committed = match element.offset() {
            rdkafka::Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        };
        lags.push(PartitionLag {
            topic: element.topic().to_owned(),
            partition: element.partition(),
            committed,
            end: high,
            lag: (high - committed.unwrap_or(low)).max(0),
        });
    }
    Ok(lags)
}
