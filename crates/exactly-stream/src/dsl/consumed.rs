//! How a topic's records become typed keys and values ([`Consumed`]), how results become
//! records ([`Produced`]), and how a regrouped stream travels through its repartition topic
//! ([`Grouped`]).

use std::sync::Arc;

use exactly_core::{decode_record, Envelope, UnixMillis};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec::{Codec, Json, Utf8};
use super::graph::InputRecord;

/// A decoded record: key, value, event time, event id.
pub(crate) type Decoded<K, V> = (K, V, UnixMillis, Option<Arc<str>>);
type DecodeFn<K, V> = Arc<dyn Fn(&InputRecord<'_>) -> Result<Decoded<K, V>, String> + Send + Sync>;
type TableDecodeFn<K, V> =
    Arc<dyn Fn(&InputRecord<'_>) -> Result<(K, Option<V>, UnixMillis), String> + Send + Sync>;

/// How a source topic is read.
pub struct Consumed<K, V> {
    pub(crate) decode: DecodeFn<K, V>,
    pub(crate) table: Option<TableDecodeFn<K, V>>,
}

fn record_time(input: &InputRecord<'_>) -> UnixMillis {
    UnixMillis(input.timestamp.unwrap_or_default())
}

impl<K: Send + 'static, V: Send + 'static> Consumed<K, V> {
    /// Keys and values through codecs; the event time is the record's timestamp, and there is
    /// no event id (no deduplication) unless [`Consumed::with_event_id`] names one.
    pub fn with(key: impl Codec<K>, value: impl Codec<V>) -> Self {
        let key = Arc::new(key);
        let value = Arc::new(value);
        let (k2, v2) = (key.clone(), value.clone());
        Consumed {
            decode: Arc::new(move |input| {
                let k = key.decode(input.key).map_err(|e| format!("key: {e}"))?;
                let v = value.decode(input.value).map_err(|e| format!("value: {e}"))?;
                Ok((k, v, record_time(input), None))
            }),
            table: Some(Arc::new(move |input| {
                let k = k2.decode(input.key).map_err(|e| format!("key: {e}"))?;
                let v = match input.value {
                    None => None,
                    Some(bytes) => Some(v2.decode(Some(bytes)).map_err(|e| format!("value: {e}"))?),
                };
                Ok((k, v, record_time(input)))
            })),
        }
    }

    /// The event time from the key and value (for example a field of the payload).
    pub fn with_timestamp(self, extract: impl Fn(&K, &V) -> i64 + Send + Sync + 'static) -> Self {
        let decode = self.decode;
        Consumed {
            decode: Arc::new(move |input| {
                let (k, v, _, id) = decode(input)?;
                let t = extract(&k, &v);
                Ok((k, v, UnixMillis(t), id))
            }),
            table: self.table,
        }
    }

    /// The event's idempotency key from the key and value: repeats of it are aggregated once.
    pub fn with_event_id(self, extract: impl Fn(&K, &V) -> Option<String> + Send + Sync + 'static) -> Self {
        let decode = self.decode;
        Consumed {
            decode: Arc::new(move |input| {
                let (k, v, t, _) = decode(input)?;
                let id = extract(&k, &v).map(Arc::from);
                Ok((k, v, t, id))
            }),
            table: self.table,
        }
    }
}

impl<K: Serialize + DeserializeOwned + Send + 'static, V: Serialize + DeserializeOwned + Send + 'static>
    Consumed<K, V>
{
    /// JSON keys and values.
    pub fn json() -> Self {
        Consumed::with(Json, Json)
    }
}

impl<V: Send + 'static> Consumed<String, V> {
    /// exactly's envelope (an outbox topic): the key is the aggregate id, the value the payload
    /// through `payload`, the event time `occurred_at`, the event id the idempotency key. A
    /// record without readable exactly headers is parked.
    pub fn envelope(payload: impl Codec<V>) -> Self {
        let payload = Arc::new(payload);
        Consumed {
            decode: Arc::new(move |input| {
                let delivery = decode_record(input.headers.iter().copied(), input.value.unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                let value = payload
                    .decode(Some(&delivery.envelope.payload))
                    .map_err(|e| format!("payload: {e}"))?;
                Ok((
                    delivery.envelope.aggregate_id,
                    value,
                    delivery.envelope.occurred_at,
                    Some(Arc::from(delivery.key.to_string())),
                ))
            }),
            table: None,
        }
    }
}

impl Consumed<String, Envelope> {
    /// exactly's envelope, whole: the key is the aggregate id, the value the [`Envelope`].
    pub fn envelope_raw() -> Self {
        Consumed {
            decode: Arc::new(|input| {
                let delivery = decode_record(input.headers.iter().copied(), input.value.unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                Ok((
                    delivery.envelope.aggregate_id.clone(),
                    delivery.envelope.clone(),
                    delivery.envelope.occurred_at,
                    Some(Arc::from(delivery.key.to_string())),
                ))
            }),
            table: None,
        }
    }
}

impl Consumed<String, String> {
    /// UTF-8 keys and values.
    pub fn text() -> Self {
        Consumed::with(Utf8, Utf8)
    }
}

/// How results are written.
pub struct Produced<K, V> {
    pub(crate) key: Arc<dyn Codec<K>>,
    pub(crate) value: Arc<dyn Codec<V>>,
}

impl<K, V> Produced<K, V> {
    /// Keys and values through codecs.
    pub fn with(key: impl Codec<K>, value: impl Codec<V>) -> Self {
        Produced {
            key: Arc::new(key),
            value: Arc::new(value),
        }
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> Produced<K, V> {
    /// JSON keys and values.
    pub fn json() -> Self {
        Produced::with(Json, Json)
    }
}

/// How a regrouped stream is written to and read from its repartition topic, and the name of
/// the aggregation (its store, changelog and repartition topic).
pub struct Grouped<K, V> {
    pub(crate) key: Arc<dyn Codec<K>>,
    pub(crate) value: Arc<dyn Codec<V>>,
    pub(crate) name: Option<String>,
}

impl<K, V> Grouped<K, V> {
    /// Keys and values through codecs.
    pub fn with(key: impl Codec<K>, value: impl Codec<V>) -> Self {
        Grouped {
            key: Arc::new(key),
            value: Arc::new(value),
            name: None,
        }
    }

    /// Names the aggregation: its store is `name`, its topics `<application.id>-<name>-…`.
    /// Without a name it is numbered by its place in the topology, so adding a node before it
    /// renames it (and its changelog): name the ones you keep.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> Grouped<K, V> {
    /// JSON keys and values.
    pub fn json() -> Self {
        Grouped::with(Json, Json)
    }
}

/// Header of a repartition record: the event time it carries.
pub(crate) const TIME_HEADER: &str = "exactly-dsl-time";
/// Header of a repartition record: the event id it carries.
pub(crate) const EVENT_ID_HEADER: &str = "exactly-dsl-event-id";
