//! Prometheus endpoint and the outbox gauges.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use exactly_core::OutboxStore;
use http_body_util::Full;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::health;

/// The process's metrics recorder, installed on first use (with or without a listener: the
/// progress lines read it too), its upkeep running every 5 s.
pub fn recorder() -> Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ])
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Connections the listener serves at once; further ones wait in the kernel's backlog (they
/// hold no descriptor of this process) until a slot frees.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent a whole request head by then is disconnected (slowloris, idle
/// keep-alive connections).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, keep-alive or not (a scraper reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves /metrics, /healthz and /readyz on `addr` (127.0.0.1 by default: metrics can reveal
/// topic names and volumes). Binds before returning, so a port in use is an error at start.
///
/// The listener cannot starve the process: at most [`MAX_CONNECTIONS`] connections at once,
/// each closed when its request head takes over [`HEADER_READ_TIMEOUT`] or it lives past
/// [`CONNECTION_LIFETIME`], and a failing `accept` (out of descriptors) backs off instead of
/// spinning, so idle clients can neither take the descriptors Kafka and PostgreSQL reconnects
/// need nor keep /healthz from answering for long.
pub fn serve_metrics(addr: SocketAddr) -> Result<()> {
    let handle = recorder()?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("serving metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
    tokio::spawn(async move {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut backoff = Duration::from_millis(50);
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(50);
                    stream
                }
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed ({e}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let handle = handle.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(request.uri().path(), &handle)) }
                    },
                );
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                drop(slot);
            });
        }
    });
    Ok(())
}

fn respond(path: &str, metrics: &PrometheusHandle) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        "/healthz" | "/readyz" => {
            let answer = if path == "/healthz" {
                health::global().liveness(std::time::Instant::now())
            } else {
                health::global().readiness()
            };
            (
                if answer.ok { 200 } else { 503 },
                "application/json",
                answer.body.to_string(),
            )
        }
        _ => (
            404,
            "text/plain",
            "not found: /metrics, /healthz, /readyz\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Publishes outbox rows by status and the oldest NEW row's age, every `every`, labelled with
/// the source's name (one process may relay several databases); reports the database aspect of
/// `component`'s readiness from the same query.
pub async fn outbox_gauges<S: OutboxStore>(store: &S, source: &str, component: &str, every: Duration) {
    loop {
        match store.stats(exactly_kafka::now()).await {
            Ok(stats) => {
                health::global().report(component, "database", None);
                for (status, count) in [
                    ("NEW", stats.new),
                    ("SENDING", stats.sending),
                    ("SENT", stats.sent),
                    ("DEAD", stats.dead),
                ] {
                    metrics::gauge!("exactly_outbox_rows", "source" => source.to_owned(), "status" => status)
                        .set(count as f64);
                }
                metrics::gauge!("exactly_outbox_oldest_new_age_seconds", "source" => source.to_owned())
                    .set(stats.oldest_new_age_ms as f64 / 1000.0);
            }
            Err(e) => health::global().report(component, "database", Some(format!("database: {e}"))),
        }
        tokio::time::sleep(every).await;
    }
}

/// Above these the WAL relay reports not ready.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// WAL the slot holds back (from its restart position).
    pub max_retained_bytes: u64,
    /// WAL not yet confirmed by the relay.
    pub max_lag_bytes: u64,
}

/// Publishes the replication slot's retained WAL and confirmed lag, every `every`, and reports
/// the slot aspect of `component`'s readiness: the slot exists, a relay streams from it, and it
/// is within `limits`. Retained WAL above its limit is also an error in the log, naming the
/// slot: left alone it fills the disk, or PostgreSQL invalidates the slot.
pub async fn slot_gauges(
    client: &tokio_postgres::Client,
    source: &str,
    slot: &str,
    component: &str,
    limits: SlotLimits,
    every: Duration,
) {
    let mut warned = false;
    loop {
        let problem = match exactly_postgres::wal::slot_stats(client, slot).await {
            Ok(Some(stats)) => {
                metrics::gauge!("exactly_wal_retained_bytes", "source" => source.to_owned(), "slot" => slot.to_owned())
                    .set(stats.retained_bytes as f64);
                metrics::gauge!("exactly_relay_lag_bytes", "source" => source.to_owned(), "slot" => slot.to_owned())
                    .set(stats.lag_bytes as f64);
                let retained = stats.retained_bytes.max(0) as u64;
                if retained > limits.max_retained_bytes {
                    if !warned {
                        tracing::error!(
                            slot,
                            retained_bytes = retained,
                            limit_bytes = limits.max_retained_bytes,
                            "replication slot {slot} holds back {} of WAL, above max_retained_wal {}",
                            bytesize::ByteSize::b(retained),
                            bytesize::ByteSize::b(limits.max_retained_bytes)
                        );
                        warned = true;
                    }
                    Some(format!(
                        "slot {slot} retains {} of WAL, above max_retained_wal {}",
                        bytesize::ByteSize::b(retained),
                        bytesize::ByteSize::b(limits.max_retained_bytes)
                    ))
                } else {
                    warned = false;
                    if !stats.active {
                        Some(format!("slot {slot} is not active: no relay streams from it"))
                    } else if stats.lag_bytes.max(0) as u64 > limits.max_lag_bytes {
                        Some(format!(
                            "slot {slot} lags {} behind, above max_lag {}",
                            bytesize::ByteSize::b(stats.lag_bytes.max(0) as u64),
                            bytesize::ByteSize::b(limits.max_lag_bytes)
                        ))
                    } else {
                        None
                    }
                }
            }
            Ok(None) => Some(format!("slot {slot} does not exist")),
            Err(e) => Some(format!("slot {slot}: {e}")),
        };
        health::global().report(component, "slot", problem);
        tokio::time::sleep(every).await;
    }
}

/// Reports the broker aspect of `component`'s readiness: whether the cluster answers a metadata
/// request (with exactly's connection settings: TLS, SASL), every [`health::PROBE_EVERY`].
pub async fn broker_probe(kafka: exactly_kafka::KafkaSettings, component: String) {
    loop {
        let settings = kafka.clone();
        let checked = tokio::task::spawn_blocking(move || {
            exactly_kafka::broker_answers(&settings, Duration::from_secs(2))
        })
        .await;
        let problem = match checked {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("broker: {e}")),
            Err(e) => Some(format!("broker check did not finish: {e}")),
        };
        health::global().report(&component, "broker", problem);
        tokio::time::sleep(health::PROBE_EVERY).await;
    }
}

/// Reports the database aspect of `component`'s readiness (a consumer's effect database):
/// whether a trivial query answers, every [`health::PROBE_EVERY`].
pub async fn database_probe(database: crate::database::Database, component: String) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let problem = match &database {
            crate::database::Database::Sqlite(path) => exactly_sqlite::open_existing(path)
                .err()
                .map(|e| format!("database: {e}")),
            crate::database::Database::Postgres(url) => {
                if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                    client = exactly_postgres::connect(url).await.ok();
                }
                match &client {
                    None => Some(format!(
                        "database: cannot connect to {}",
                        exactly_postgres::redact_url(url)
                    )),
                    Some(c) => c
                        .simple_query("SELECT 1")
                        .await
                        .err()
                        .map(|e| format!("database: {e}")),
                }
            }
        };
        health::global().report(&component, "database", problem);
        tokio::time::sleep(health::PROBE_EVERY).await;
    }
}

/// What a component is, for the metrics it always exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// `relay --mode poll`.
    PollRelay,
    /// `relay --mode wal`.
    WalRelay,
    /// `relay --mode wal --exactly-once`.
    ExactlyOnceRelay,
    /// `consume`.
    Consumer,
    /// `stream`.
    Stream,
}

/// Exports a component's counters at zero from its start, so a dashboard shows them and an
/// alert on their increase has a series before the first event (Prometheus sees no change in a
/// series that does not exist yet).
pub fn register_metrics(kind: ComponentKind) {
    let counters: &[&'static str] = match kind {
        ComponentKind::PollRelay => &[
            "exactly_relay_published_total",
            "exactly_relay_failures_total",
            "exactly_outbox_dead_total",
            "exactly_relay_store_errors_total",
        ],
        ComponentKind::WalRelay => &["exactly_wal_events_total", "exactly_wal_transactions_total"],
        ComponentKind::ExactlyOnceRelay => &[
            "exactly_wal_events_total",
            "exactly_wal_transactions_total",
            "exactly_eos_transactions_committed_total",
            "exactly_eos_transactions_aborted_total",
        ],
        ComponentKind::Consumer => &[
            "exactly_consumer_delivered_total",
            "exactly_consumer_applied_total",
            "exactly_consumer_dedupe_hits_total",
            "exactly_consumer_offset_gap_refetches_total",
            "exactly_consumer_offset_gaps_filled_total",
        ],
        ComponentKind::Stream => &[
            "exactly_stream_records_total",
            "exactly_stream_commits_total",
            "exactly_stream_aborts_total",
            "exactly_stream_dead_letters_total",
            "exactly_stream_offset_gap_refetches_total",
            "exactly_stream_offset_gaps_filled_total",
            "exactly_stream_commits_refused_total",
            "exactly_stream_restored_records_total",
        ],
    };
    for name in counters {
        metrics::counter!(*name).increment(0);
    }
    if kind == ComponentKind::Stream {
        metrics::gauge!("exactly_stream_tasks").set(0.0);
        metrics::gauge!("exactly_stream_tasks_restoring").set(0.0);
    }
    if kind == ComponentKind::Consumer {
        for reason in [
            exactly_core::ParkReason::BadHeaders,
            exactly_core::ParkReason::KeyTooOld,
            exactly_core::ParkReason::Rejected,
            exactly_core::ParkReason::RetriesExhausted,
            exactly_core::ParkReason::SourceRegressed,
        ] {
            metrics::counter!("exactly_consumer_parked_total", "reason" => reason.as_str()).increment(0);
        }
    }
}

/// Reports a consumer's partitions aspect (it holds partitions: it joined its group) and lag
/// aspect (at most `max_lag` records behind), from its counters, every [`health::PROBE_EVERY`].
pub async fn consumer_probe(
    counters: std::sync::Arc<exactly_kafka::ConsumerCounters>,
    component: String,
    max_lag: i64,
) {
    use std::sync::atomic::Ordering;
    loop {
        let assigned = counters.assigned.load(Ordering::Relaxed);
        health::global().report(
            &component,
            "partitions",
            (assigned == 0).then(|| {
                "no partitions assigned (joining, rebalancing, or more members than partitions)".to_owned()
            }),
        );
        let lag = counters.lag.load(Ordering::Relaxed);
        health::global().report(
            &component,
            "lag",
            (lag > max_lag).then(|| format!("{lag} records behind, above max_lag_records {max_lag}")),
        );
        tokio::time::sleep(health::PROBE_EVERY).await;
    }
}
