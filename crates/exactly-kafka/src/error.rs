use exactly_core::StoreError;
use rdkafka::error::KafkaError;

/// A relay or consumer stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaFlowError {
    /// Creating or using a Kafka client failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What was being done.
        context: &'static str,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The database failed in a way retrying did not fix.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The WAL relay's own bookkeeping failed.
    #[error("wal relay: {0}")]
    Feed(String),
    /// The transactional producer is fenced (another relay took over this source) or broken.
    #[error("exactly-once relay stopped: {0} (another relay with the same transactional.id took over, or the producer failed fatally)")]
    Fenced(String),
    /// A topic exists with a layout the flow cannot use.
    #[error("topic layout: {0}")]
    Layout(String),
    /// The cluster refused this client: TLS or authentication failed (retrying cannot help).
    #[error("cannot connect to Kafka at {brokers}: {reason} (check security.protocol, the CA in ssl.ca.location and the SASL settings)")]
    Unreachable {
        /// The bootstrap servers tried.
        brokers: String,
        /// librdkafka's last error.
        reason: String,
    },
    /// A fault point fired (tests and the demo simulate a crash this way).
    #[error("injected crash at {0:?}")]
    InjectedCrash(crate::FaultPoint),
}

impl KafkaFlowError {
    /// For `map_err`: wraps a client error with what was being done.
    pub fn at(context: &'static str) -> impl Fn(KafkaError) -> KafkaFlowError {
        move |source| KafkaFlowError::Kafka { context, source }
    }
}
