//! Topic set-up.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::error::KafkaFlowError;

/// Creates the topics that do not exist yet, with `partitions` each.
pub async fn ensure_topics(brokers: &str, topics: &[&str], partitions: i32) -> Result<(), KafkaFlowError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(KafkaFlowError::at("create admin client"))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(KafkaFlowError::at("create topics"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaFlowError::Kafka {
                    context: "create topic",
                    source: rdkafka::error::KafkaError::AdminOp(code),
                })
                .inspect_err(|_| tracing::error!("creating topic {topic} failed: {code}"));
            }
        }
    }
    Ok(())
}
