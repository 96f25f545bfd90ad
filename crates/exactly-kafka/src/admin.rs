//! Topic set-up.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::error::KafkaFlowError;

/// Creates the topics that do not exist yet, with `partitions` each.
pub async fn ensure_topics(brokers: &str, topics: &[&str], partitions: i32) -> Result<(), KafkaFlowError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    create_missing(brokers, &new).await
}

/// Sends CreateTopics; a topic that already exists is fine.
async fn create_missing(brokers: &str, new: &[NewTopic<'_>]) -> Result<(), KafkaFlowError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
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
pub async fn ensure_internal_topics(brokers: &str, topics: &[InternalTopic]) -> Result<(), KafkaFlowError> {
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
    create_missing(brokers, &new).await?;
    for t in topics {
        let have = partition_count(brokers, &t.name)?;
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
pub fn partition_count(brokers: &str, topic: &str) -> Result<i32, KafkaFlowError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
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
    brokers: &str,
    topic: &str,
) -> Result<std::collections::BTreeMap<String, String>, KafkaFlowError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
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
