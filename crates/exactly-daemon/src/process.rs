//! What a process does around its components: stop on a signal, fail fast when Kafka refuses
//! its settings, and (for the fault tests of the lab) die at a chosen point.

use std::time::Duration;

use anyhow::{Context, Result};
use exactly_kafka::{FaultPoint, Faults};
use tokio::sync::watch;

/// Stops on SIGINT/SIGTERM.
pub fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// Kills this process with SIGKILL at the `n`-th time `point` is reached: a real crash, no
/// destructors, no flush, for tests.
pub fn kill_at(point: FaultPoint, n: Option<u64>) -> Faults {
    let Some(n) = n else { return Faults::none() };
    let seen = std::sync::atomic::AtomicU64::new(0);
    Faults::new(move |p| {
        if p == point && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
            let _ = std::process::Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
        }
        false
    })
}

/// Like [`kill_at`], for several points at once.
pub fn kill_at_points(points: Vec<(FaultPoint, Option<u64>)>) -> Faults {
    let points: Vec<(FaultPoint, u64, std::sync::atomic::AtomicU64)> = points
        .into_iter()
        .filter_map(|(p, n)| n.map(|n| (p, n, std::sync::atomic::AtomicU64::new(0))))
        .collect();
    if points.is_empty() {
        return Faults::none();
    }
    Faults::new(move |at| {
        for (point, n, seen) in &points {
            if *point == at && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == *n {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(5));
            }
        }
        false
    })
}

/// Fails a command at start when Kafka refuses its TLS or login settings.
pub async fn check_kafka(kafka: &exactly_kafka::KafkaSettings) -> Result<()> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || exactly_kafka::check_connection(&kafka, Duration::from_secs(5)))
        .await
        .context("Kafka connection check")??;
    Ok(())
}
