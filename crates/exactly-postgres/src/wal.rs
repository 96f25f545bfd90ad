//! The change feed of the WAL relay: a pgoutput logical replication stream over the outbox
//! table (and `pg_logical_emit_message` events), with a heartbeat that keeps the slot moving on
//! an idle database, a sweeper that marks published rows SENT, and a table for events that can
//! never be published.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use exactly_core::wal::{
    decode_message_event, BinaryOutboxColumns, PayloadType, HEARTBEAT_PREFIX, MESSAGE_PREFIX,
};
use exactly_core::{ChangeFeed, DeadEvent, FeedItem, RowDefect, StoreError, UnixMillis};
use pg_walstream::{
    CancellationToken, ChangeEvent, ColumnValue, EventType, LogicalReplicationStream,
    ReplicationStreamConfig, RetryConfig, RowData, SharedLsnFeedback, StreamingMode,
};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::db::{connect, ReconnectingClient};
use crate::error::{replication, PgError};
use crate::migrations::migrate;

/// How the WAL relay's feed runs.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// A normal connection URL; the replication connection adds `replication=database`.
    pub url: String,
    /// The logical replication slot (created when absent).
    pub slot: String,
    /// The publication on the outbox table (created when absent).
    pub publication: String,
    /// Emit a heartbeat when nothing of the relay's own arrived for this long.
    pub heartbeat_interval: Duration,
    /// Mark published rows SENT (outbox rows kept); off when writers delete their rows in the
    /// inserting transaction or use table-less messages.
    pub mark_sent: bool,
}

impl WalConfig {
    /// Defaults: slot `exactly_<database>`, publication `exactly_outbox`, heartbeat 10 s.
    pub fn new(url: &str) -> Self {
        WalConfig {
            url: url.to_owned(),
            slot: default_slot_name(url),
            publication: "exactly_outbox".to_owned(),
            heartbeat_interval: Duration::from_secs(10),
            mark_sent: true,
        }
    }
}

impl WalConfig {
    /// Refuses names PostgreSQL would refuse, before any SQL runs: a slot name is 1-63 of
    /// `a-z`, `0-9` and `_`; a publication name 1-63 bytes without NUL (it is always quoted).
    pub fn validate(&self) -> Result<(), PgError> {
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(PgError::Config(format!(
                "slot {:?} is not a valid replication slot name: use 1-63 of a-z, 0-9 and _",
                self.slot
            )));
        }
        if self.publication.is_empty() || self.publication.len() > 63 || self.publication.contains('\0') {
            return Err(PgError::Config(format!(
                "publication {:?} is not a valid identifier: 1-63 bytes, no NUL",
                self.publication
            )));
        }
        Ok(())
    }
}

/// `exactly_<database>`: slots are cluster-wide, so the name carries the database.
pub fn default_slot_name(url: &str) -> String {
    let database = url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .filter(|d| !d.is_empty() && !d.contains('@'))
        .unwrap_or("postgres");
    let clean: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("exactly_{clean}")
}

/// A slot's position as the server sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// WAL the slot keeps from being recycled (current position − restart_lsn).
    pub retained_bytes: i64,
    /// WAL written but not yet confirmed (current position − confirmed_flush_lsn).
    pub lag_bytes: i64,
    /// The slot's confirmed_flush_lsn.
    pub confirmed_flush: u64,
    /// True while a relay streams from it.
    pub active: bool,
}

/// Creates the publication and the slot when absent, so rows committed from now on are
/// streamed. Run before writers start: rows committed before the slot existed are not in its
/// stream (drain those with the polling relay). Returns how many rows are NEW at creation.
pub async fn ensure_slot(config: &WalConfig) -> Result<i64, PgError> {
    config.validate()?;
    let mut client = connect(&config.url).await?;
    migrate(&mut client).await?;
    ensure_publication(&client, &config.publication).await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(PgError::at("look up slot"))?
        .is_some();
    if !exists {
        let created = client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&config.slot],
            )
            .await;
        // Two relays starting at once: the loser finds the slot made.
        if let Err(e) = created {
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                return Err(PgError::at("create slot")(e));
            }
        }
    }
    let backlog: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE status = 'NEW'", &[])
        .await
        .map_err(PgError::at("count NEW rows"))?
        .get(0);
    Ok(backlog)
}

async fn ensure_publication(client: &Client, publication: &str) -> Result<(), PgError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(PgError::at("look up publication"))?
        .is_some();
    if !exists {
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(PgError::at("read server version"))?
            .get(0);
        let sql = publication_sql(publication, version);
        if let Err(e) = client.batch_execute(&sql).await {
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                return Err(PgError::at("create publication")(e));
            }
        }
    }
    Ok(())
}

/// The outbox columns the relay reads (`to_feed_item`): a new publication carries only these.
const RELAYED_COLUMNS: &str =
    "id, event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at, created_at";

/// The publication the relay streams: inserts only, since the relay publishes nothing for
/// updates and deletes (the sweeper's SENT updates would otherwise be decoded and streamed again),
/// and from PostgreSQL 15 on only the columns the relay reads. Both cut the walsender's work per
/// event, which shares the machine with the relay. A publication that already exists is left as
/// it is.
fn publication_sql(publication: &str, server_version_num: i32) -> String {
    let columns = if server_version_num >= 150_000 {
        format!(" ({RELAYED_COLUMNS})")
    } else {
        String::new()
    };
    format!(
        "CREATE PUBLICATION {} FOR TABLE outbox{columns} WITH (publish = 'insert')",
        quote_ident(publication)
    )
}

/// Drops the slot (tests and demo clean-up); waits up to 10 s for a streaming relay to let go.
pub async fn drop_slot(url: &str, slot: &str) -> Result<(), PgError> {
    let client = connect(url).await?;
    let mut last_error = None;
    for _ in 0..50 {
        let left = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(PgError::at("look up slot"))?;
        match left {
            None => return Ok(()),
            Some(row) if !row.get::<_, bool>(0) => {
                // The walsender may still be exiting; a failed drop is retried.
                match client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) => last_error = Some(e),
                }
            }
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match last_error {
        Some(e) => Err(PgError::at("drop slot")(e)),
        None => Ok(()),
    }
}

/// The slot's retained WAL and lag.
pub async fn slot_stats(client: &Client, slot: &str) -> Result<Option<SlotStats>, PgError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint,
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint,
                    (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint,
                    active
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::at("read slot stats"))?;
    Ok(row.map(|r| SlotStats {
        retained_bytes: r.get::<_, Option<i64>>(0).unwrap_or(0),
        lag_bytes: r.get::<_, Option<i64>>(1).unwrap_or(0),
        confirmed_flush: r.get::<_, Option<i64>>(2).unwrap_or(0).max(0) as u64,
        active: r.get(3),
    }))
}

/// What the source is now: read on start and again before every stream restart, since a
/// failover changes the timeline and a slot can be invalidated while the relay runs.
struct SourceFacts {
    source: String,
    timeline: u64,
}

/// Reads the source name (system identifier and slot), the timeline, and the slot's health. A
/// slot PostgreSQL invalidated (`wal_status = 'lost'`) or one that was dropped stops the relay:
/// it cannot stream what it missed, and a new slot would skip it.
async fn read_source_facts(client: &Client, slot: &str) -> Result<SourceFacts, PgError> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    (SELECT timeline_id FROM pg_control_checkpoint()),
                    (SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1),
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(PgError::at("read source facts"))?;
    let (system_id, timeline): (String, i32) = (row.get(0), row.get(1));
    let wal_status: Option<String> = row.get(2);
    let exists: bool = row.get(3);
    let unusable = |state| {
        metrics::gauge!("exactly_wal_slot_unusable", "slot" => slot.to_owned()).set(1.0);
        Err(PgError::SlotUnusable {
            slot: slot.to_owned(),
            state,
        })
    };
    if !exists {
        return unusable("does not exist");
    }
    if wal_status.as_deref() == Some("lost") {
        return unusable("is lost (wal_status = 'lost')");
    }
    metrics::gauge!("exactly_wal_slot_unusable", "slot" => slot.to_owned()).set(0.0);
    Ok(SourceFacts {
        source: format!("pg:{system_id}:{slot}"),
        timeline: timeline.max(0) as u64,
    })
}

/// Items the relay takes from the reader at most at once.
const READY_BATCH: usize = 512;

/// A running replication stream: its reader task and the feedback it reports.
struct Stream {
    items: mpsc::Receiver<Result<FeedItem, PgError>>,
    /// Items taken from `items` and not yet handed out: the relay takes what the reader has
    /// ready in one receive, so reader and relay wake each other once per batch, not per event.
    ready: std::vec::IntoIter<Result<FeedItem, PgError>>,
    feedback: Arc<SharedLsnFeedback>,
    cancel: CancellationToken,
    reader: tokio::task::JoinHandle<()>,
}

/// [`ChangeFeed`] over a pgoutput slot.
pub struct PgChangeFeed {
    config: WalConfig,
    client: Arc<ReconnectingClient>,
    source: String,
    timeline: u64,
    stream: Option<Stream>,
    last_own_commit_ms: Arc<AtomicI64>,
    sweeper: Option<mpsc::UnboundedSender<Vec<i64>>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl PgChangeFeed {
    /// Connects, creates publication and slot when absent, and starts streaming from the slot's
    /// confirmed position. Fails while another relay streams from the slot.
    pub async fn connect(config: WalConfig) -> Result<Self, PgError> {
        let backlog = ensure_slot(&config).await?;
        let client = Arc::new(ReconnectingClient::connect(&config.url).await?);
        let facts = read_source_facts(&*client.get().await?, &config.slot).await?;
        if backlog > 0 && config.mark_sent {
            tracing::info!(
                "{backlog} outbox rows are NEW; rows committed before slot {} existed are not in its stream",
                config.slot
            );
        }
        let last_own_commit_ms = Arc::new(AtomicI64::new(now_ms()));
        let mut feed = PgChangeFeed {
            source: facts.source,
            timeline: facts.timeline,
            client: client.clone(),
            stream: None,
            last_own_commit_ms: last_own_commit_ms.clone(),
            sweeper: None,
            background: Vec::new(),
            config,
        };
        feed.stream = Some(feed.open_stream(None).await?);
        feed.background.push(tokio::spawn(heartbeat(
            client.clone(),
            feed.config.heartbeat_interval,
            last_own_commit_ms,
        )));
        if feed.config.mark_sent {
            let (tx, rx) = mpsc::unbounded_channel();
            feed.sweeper = Some(tx);
            feed.background.push(tokio::spawn(sweep(client, rx)));
        }
        Ok(feed)
    }

    /// A plain connection to the same database (stats, tests), reopened after a server restart.
    pub async fn client(&self) -> Result<Arc<Client>, PgError> {
        self.client.get().await
    }

    /// The slot name.
    pub fn slot(&self) -> &str {
        &self.config.slot
    }

    /// Starts streaming at the slot's confirmed position, or at `from` when it is later
    /// (PostgreSQL never goes below the confirmed position).
    async fn open_stream(&self, from: Option<u64>) -> Result<Stream, PgError> {
        let stream_config = ReplicationStreamConfig::builder(&self.config.slot, &self.config.publication)
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            .with_messages(true)
            .with_binary(true)
            .with_feedback_interval(Duration::from_secs(1))
            .with_connection_timeout(Duration::from_secs(10))
            .with_health_check_interval(Duration::from_secs(30))
            .with_retry_config(RetryConfig::default());
        let url = crate::db::PgTarget::parse(&self.config.url)?.replication_url();
        // The previous walsender may take a moment to release the slot after a restart.
        let mut attempt = 0;
        let mut stream = loop {
            let started = async {
                let mut s = LogicalReplicationStream::new(&url, stream_config.clone())
                    .await
                    .map_err(replication("connect for replication"))?;
                s.start(from).await.map_err(replication("start replication"))?;
                Ok::<_, PgError>(s)
            }
            .await;
            match started {
                Ok(s) => break s,
                Err(e) if attempt < 5 && e.to_string().contains("is active") => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(400 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        // Read at every (re)start: the column's type decides how its bytes are taken.
        let payload_type = crate::outbox::payload_type(&*self.client.get().await?).await?;
        let feedback = stream.shared_lsn_feedback.clone();
        let cancel = CancellationToken::new();
        let (tx, items) = mpsc::channel(8192);
        let token = cancel.clone();
        let own = self.last_own_commit_ms.clone();
        let reader = tokio::spawn(async move {
            let mut sent_flush = 0u64;
            let mut last_feedback = std::time::Instant::now();
            let mut in_heartbeat_only_txn = true;
            loop {
                let event = match stream.next_event(&token).await {
                    Ok(e) => e,
                    Err(pg_walstream::ReplicationError::Cancelled(_)) => break,
                    Err(e) => {
                        let _ = tx.send(Err(replication("read replication stream")(e))).await;
                        break;
                    }
                };
                let item = to_feed_item(event, payload_type);
                match &item {
                    FeedItem::Begin { .. } => in_heartbeat_only_txn = true,
                    FeedItem::Event(_) | FeedItem::Unreadable { .. } => in_heartbeat_only_txn = false,
                    FeedItem::Commit { .. } if !in_heartbeat_only_txn => {
                        own.store(now_ms(), Ordering::Relaxed)
                    }
                    _ => {}
                }
                if tx.send(Ok(item)).await.is_err() {
                    break;
                }
                // Report confirmations promptly (the library alone reports every 128 frames at
                // most once per feedback interval), but at most every 100 ms.
                let flushed = stream.shared_lsn_feedback.get_flushed_lsn();
                if flushed > sent_flush && last_feedback.elapsed() >= Duration::from_millis(100) {
                    sent_flush = flushed;
                    last_feedback = std::time::Instant::now();
                    if let Err(e) = stream.send_feedback().await {
                        tracing::debug!("standby status update failed: {e}");
                    }
                }
            }
            let _ = stream.stop().await;
        });
        Ok(Stream {
            items,
            ready: Vec::new().into_iter(),
            feedback,
            cancel,
            reader,
        })
    }

    async fn stop_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.cancel.cancel();
            drop(stream.items);
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.reader).await;
        }
    }
}

impl Drop for PgChangeFeed {
    fn drop(&mut self) {
        if let Some(stream) = &self.stream {
            stream.cancel.cancel();
        }
        // The heartbeat stops with the feed; the sweeper finishes the ids it was given (its
        // channel closes with the feed).
        if let Some(heartbeat) = self.background.first() {
            heartbeat.abort();
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn column<'a>(data: &'a RowData, name: &str) -> Option<&'a [u8]> {
    match data.get(name)? {
        ColumnValue::Null => None,
        ColumnValue::Text(b) | ColumnValue::Binary(b) => Some(b.as_ref()),
    }
}

/// One decoded pgoutput change as the relay sees it. Public so the pgoutput fuzz target drives
/// the same mapping the relay runs, from wire bytes to validated rows.
pub fn to_feed_item(event: ChangeEvent, payload_type: PayloadType) -> FeedItem {
    match event.event_type {
        EventType::Begin {
            final_lsn,
            commit_timestamp,
            ..
        } => FeedItem::Begin {
            commit_position: final_lsn.value(),
            committed_at: UnixMillis(commit_timestamp.timestamp_millis()),
        },
        EventType::Commit { end_lsn, .. } => FeedItem::Commit {
            end_position: end_lsn.value(),
        },
        EventType::Insert { table, data, .. } if &*table == "outbox" => {
            let columns = BinaryOutboxColumns {
                payload_type,
                id: column(&data, "id"),
                event_id: column(&data, "event_id"),
                event_type: column(&data, "event_type"),
                aggregate_type: column(&data, "aggregate_type"),
                aggregate_id: column(&data, "aggregate_id"),
                topic: column(&data, "topic"),
                payload: column(&data, "payload"),
                headers: column(&data, "headers"),
                occurred_at: column(&data, "occurred_at"),
                created_at: column(&data, "created_at"),
            };
            FeedItem::Event(columns.to_raw_row())
        }
        EventType::Insert { .. } => FeedItem::Ignored("insert into another table"),
        EventType::Update { .. } => FeedItem::Ignored("update"),
        EventType::Delete { .. } => FeedItem::Ignored("delete"),
        EventType::Truncate { .. } => FeedItem::Ignored("truncate"),
        EventType::Message {
            flags,
            prefix,
            content,
            ..
        } => match &*prefix {
            MESSAGE_PREFIX if flags & 1 == 1 => match decode_message_event(&content) {
                Ok(row) => FeedItem::Event(row),
                Err(defect) => FeedItem::Unreadable {
                    defect,
                    raw: exactly_core::wal::raw_text(&content),
                },
            },
            MESSAGE_PREFIX => FeedItem::Unreadable {
                defect: RowDefect::BadMessage(
                    "emitted with transactional = false; exactly messages must be transactional".into(),
                ),
                raw: exactly_core::wal::raw_text(&content),
            },
            HEARTBEAT_PREFIX => FeedItem::Ignored("heartbeat"),
            _ => FeedItem::Ignored("message with another prefix"),
        },
        _ => FeedItem::Ignored("other"),
    }
}

/// Emits a heartbeat message whenever no transaction of the relay's own committed for
/// `interval`, so the slot's confirmed position (and retained WAL) follows the server even
/// when only other tables change.
async fn heartbeat(client: Arc<ReconnectingClient>, interval: Duration, last_own_commit_ms: Arc<AtomicI64>) {
    let tick = (interval / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let idle_ms = now_ms() - last_own_commit_ms.load(Ordering::Relaxed);
        if idle_ms < interval.as_millis() as i64 {
            continue;
        }
        let emitted = match client.get().await {
            Ok(c) => c
                .execute(
                    "SELECT pg_logical_emit_message(true, $1, '')",
                    &[&HEARTBEAT_PREFIX],
                )
                .await
                .map_err(PgError::at("emit heartbeat")),
            Err(e) => Err(e),
        };
        match emitted {
            Ok(_) => {
                last_own_commit_ms.store(now_ms(), Ordering::Relaxed);
                metrics::counter!("exactly_wal_heartbeats_total").increment(1);
            }
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
    }
}

/// Marks published rows SENT in batches. Best effort: the rows are on the topic already, and a
/// crash before the mark only leaves them NEW (the WAL relay never re-reads the table).
async fn sweep(client: Arc<ReconnectingClient>, mut ids: mpsc::UnboundedReceiver<Vec<i64>>) {
    while let Some(first) = ids.recv().await {
        let mut batch = first;
        while let Ok(more) = ids.try_recv() {
            batch.extend(more);
        }
        for chunk in batch.chunks(10_000) {
            let marked = match client.get().await {
                Ok(c) => c
                    .execute(
                        "UPDATE outbox SET status = 'SENT', sent_at = clock_timestamp(), lease_owner = 'wal'
                         WHERE id = ANY($1) AND status <> 'SENT'",
                        &[&chunk],
                    )
                    .await
                    .map_err(PgError::at("mark rows SENT")),
                Err(e) => Err(e),
            };
            if let Err(e) = marked {
                tracing::warn!("sweeper could not mark {} rows SENT: {e}", chunk.len());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl ChangeFeed for PgChangeFeed {
    fn source(&self) -> (String, u64) {
        (self.source.clone(), self.timeline)
    }

    async fn next(&mut self) -> Result<FeedItem, StoreError> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| StoreError::new("wal feed", "stream stopped; restart it"))?;
        if let Some(item) = stream.ready.next() {
            return Ok(item?);
        }
        let mut taken = Vec::with_capacity(READY_BATCH);
        // Cancel safe: nothing is taken from the channel unless the call completes.
        if stream.items.recv_many(&mut taken, READY_BATCH).await == 0 {
            return Err(StoreError::new("wal feed", "replication stream ended"));
        }
        stream.ready = taken.into_iter();
        match stream.ready.next() {
            Some(item) => Ok(item?),
            None => Err(StoreError::new("wal feed", "replication stream ended")),
        }
    }

    fn confirm(&mut self, end_position: u64) {
        if let Some(stream) = &self.stream {
            stream.feedback.update_flushed_lsn(end_position);
            stream.feedback.update_applied_lsn(end_position);
        }
    }

    async fn restart(&mut self, from: Option<u64>) -> Result<(), StoreError> {
        self.stop_stream().await;
        // A failover may have moved the timeline, and the slot may be gone: look again.
        let facts = read_source_facts(&*self.client.get().await?, &self.config.slot).await?;
        if facts.timeline != self.timeline || facts.source != self.source {
            tracing::warn!(
                "source changed: {}@{} → {}@{}",
                self.source,
                self.timeline,
                facts.source,
                facts.timeline
            );
        }
        self.source = facts.source;
        self.timeline = facts.timeline;
        self.stream = Some(self.open_stream(from).await?);
        Ok(())
    }

    async fn park(&self, dead: &DeadEvent) -> Result<(), StoreError> {
        let client = self.client.get().await?;
        client
            .execute(
                "INSERT INTO exactly_relay_dead (key_text, outbox_id, reason, raw) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key_text) DO NOTHING",
                &[&dead.key_text, &dead.outbox_id, &dead.reason, &dead.raw],
            )
            .await
            .map_err(PgError::at("record dead event"))?;
        if dead.outbox_id > 0 && self.config.mark_sent {
            client
                .execute(
                    "UPDATE outbox SET status = 'DEAD', last_error = $2 WHERE id = $1",
                    &[&dead.outbox_id, &dead.reason],
                )
                .await
                .map_err(PgError::at("mark outbox row DEAD"))?;
        }
        Ok(())
    }

    fn mark_sent(&self, ids: Vec<i64>) {
        if let Some(sweeper) = &self.sweeper {
            let _ = sweeper.send(ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_and_publication_names_are_checked_before_sql() {
        let named = |slot: &str, publication: &str| WalConfig {
            slot: slot.into(),
            publication: publication.into(),
            ..WalConfig::new("postgres://u@h/db")
        };
        assert!(named("exactly_db_1", "exactly_outbox").validate().is_ok());
        assert!(named("Bad-Slot", "p").validate().is_err());
        assert!(named("s'; DROP TABLE outbox; --", "p").validate().is_err());
        assert!(named(&"a".repeat(64), "p").validate().is_err());
        assert!(named("s", "").validate().is_err());
        assert!(
            named("s", "has \"quotes\" and spaces").validate().is_ok(),
            "quoted, so fine"
        );
    }

    #[test]
    fn slot_names_carry_the_database() {
        assert_eq!(
            default_slot_name("postgres://postgres@127.0.0.1:5432/Test-1?sslmode=disable"),
            "exactly_test_1"
        );
        assert_eq!(
            default_slot_name("postgres://postgres@127.0.0.1:5432"),
            "exactly_postgres"
        );
        assert_eq!(
            crate::db::PgTarget::parse("postgres://u@h/db")
                .expect("parses")
                .replication_url(),
            "postgres://u@h/db?replication=database"
        );
    }
}
