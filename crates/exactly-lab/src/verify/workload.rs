//! What goes in: writers committing events (some roll back), gated behind the fault schedule,
//! and the bad input injected mid-run (broken outbox rows, foreign records).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};

use super::*;

/// What the writers did, shared with the fault loop.
#[derive(Default)]
pub(super) struct Writes {
    pub(super) committed: AtomicU64,
    pub(super) rolled_back: Mutex<HashSet<String>>,
    /// Writers pause once this many events are committed, so each fault lands while events
    /// are still being written (not after a fast run has already finished).
    pub(super) gate: AtomicU64,
}

impl Writes {
    pub(super) async fn wait_for_gate(&self) {
        while self.committed.load(Ordering::Relaxed) >= self.gate.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) async fn connect_retrying(url: &str) -> tokio_postgres::Client {
    loop {
        match exactly_postgres::connect(url).await {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One writer: transactions of 1–4 events on its own aggregates; 5% roll back. An ordinal per
/// aggregate grows only when its transaction commits; a commit whose outcome is unknown (the
/// server restarted) is settled by looking for its rows.
pub(super) async fn writer(
    url: String,
    topic: String,
    writer: usize,
    quota: u64,
    seed: u64,
    writes: Arc<Writes>,
) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (writer as u64) << 32);
    let mut ordinals = vec![0u64; AGGREGATES_PER_WRITER as usize];
    let mut client = connect_retrying(&url).await;
    let mut done = 0u64;
    while done < quota {
        writes.wait_for_gate().await;
        let n = rng.random_range(1..=4u64).min(quota - done);
        let rollback = rng.random_bool(0.05);
        let mut events = Vec::new();
        let mut next = ordinals.clone();
        for _ in 0..n {
            let a = rng.random_range(0..AGGREGATES_PER_WRITER) as usize;
            let aggregate = format!("A-{writer}-{a}");
            let payload = serde_json::json!({"aggregate": aggregate, "ordinal": next[a]}).to_string();
            next[a] += 1;
            events.push(exactly_core::Envelope {
                event_id: uuid::Uuid::now_v7(),
                event_type: EVENT_TYPE.into(),
                aggregate_type: "verify".into(),
                aggregate_id: aggregate,
                occurred_at: exactly_kafka::now(),
                payload: payload.into_bytes(),
                headers: vec![],
            });
        }
        let attempt = async {
            let tx = client.transaction().await?;
            for e in &events {
                exactly_postgres::enqueue(&tx, &topic, e)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            if rollback {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
            anyhow::Ok(())
        }
        .await;
        let committed = match attempt {
            Ok(()) => !rollback,
            Err(_) => {
                client = connect_retrying(&url).await;
                let id = events[0].event_id.hyphenated().to_string();
                client
                    .query_opt("SELECT 1 FROM outbox WHERE event_id = $1::text::uuid", &[&id])
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            }
        };
        if committed {
            ordinals = next;
            done += n;
            writes.committed.fetch_add(n, Ordering::Relaxed);
        } else if rollback {
            let mut rolled = writes
                .rolled_back
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rolled.extend(events.iter().map(|e| e.event_id.hyphenated().to_string()));
        }
        // A failed non-rollback attempt is simply retried with new event ids.
    }
    Ok(())
}

pub(super) async fn inject_bad_rows(url: &str, topic: &str) -> Result<()> {
    let client = connect_retrying(url).await;
    let insert =
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
                  VALUES (gen_random_uuid(), $1, 'verify', $2, $3, $4, now())";
    let rows: [(&str, Option<String>, Vec<u8>); 6] = [
        (EVENT_TYPE, Some("bad-json".into()), b"{not json".to_vec()),
        (EVENT_TYPE, Some("bad-utf8".into()), vec![0xff, 0xfe, 0x00, 0x80]),
        ("Mystery", Some("bad-type".into()), b"{}".to_vec()),
        (EVENT_TYPE, Some("bad-size".into()), vec![b' '; 1024 * 1024]),
        (EVENT_TYPE, None, b"{}".to_vec()),
        (EVENT_TYPE, Some("x".repeat(10_000)), b"{}".to_vec()),
    ];
    for (event_type, aggregate, payload) in rows {
        client
            .execute(insert, &[&event_type, &aggregate, &topic, &payload])
            .await
            .context("inserting a bad outbox row")?;
    }
    Ok(())
}

pub(super) fn inject_foreign_records(brokers: &str, topic: &str) -> Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let producer: ThreadedProducer<_> = exactly_kafka::producer_config(brokers, false)
        .create()
        .context("foreign producer")?;
    let header = |k: &'static str, v: &'static str| Header {
        key: k,
        value: Some(v),
    };
    let records = [
        OwnedHeaders::new(),
        OwnedHeaders::new().insert(header("exactly-key", "garbage")),
        OwnedHeaders::new()
            .insert(header("exactly-key", "v7:0190b2a4-8f11-7000-8000-000000000001"))
            .insert(header("exactly-key", "v7:0190b2a4-8f11-7000-8000-000000000002")),
    ];
    for headers in records {
        producer
            .send(
                BaseRecord::<str, str>::to(topic)
                    .key("foreign")
                    .payload("{}")
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .context("producing a foreign record")?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing foreign records")?;
    Ok(())
}
