//! `exactly run`: every component of a configuration file in one process, with one metrics
//! listener and one stop. A component that stops with an error stops the others, and the
//! process exits non-zero naming it: an orchestrator restarts the whole process, as it would
//! Debezium Server, and every component resumes from its own durable position.

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::components::{self, Gauges};
use crate::config_file::ConfigFile;
use crate::process;
use crate::telemetry::serve_metrics;

/// Runs until SIGINT/SIGTERM or the first component's failure.
pub async fn run(config: ConfigFile) -> Result<()> {
    let gauges = |kind: &str, name: &str| {
        if config.metrics.enabled {
            Gauges::On {
                name: name.to_owned(),
                component: format!("{kind} {name}"),
            }
        } else {
            Gauges::Off
        }
    };
    if config.metrics.enabled {
        serve_metrics(config.metrics.addr)?;
    }
    process::check_kafka(&config.kafka).await?;
    let (stop_all, stop) = watch::channel(false);
    let mut signal = process::stop_on_signal();
    let on_signal = stop_all.clone();
    tokio::spawn(async move {
        if signal.changed().await.is_ok() {
            let _ = on_signal.send(true);
        }
    });
    let mut components: JoinSet<(String, Result<()>)> = JoinSet::new();
    for (name, settings) in config.source.clone() {
        let (kafka, stop, gauges) = (config.kafka.clone(), stop.clone(), gauges("source", &name));
        components.spawn(async move {
            let result = components::relay(settings, &kafka, gauges, stop).await;
            (format!("source {name}"), result)
        });
    }
    for (name, settings) in config.consumer.clone() {
        let (kafka, stop, gauges) = (config.kafka.clone(), stop.clone(), gauges("consumer", &name));
        components.spawn(async move {
            let result = components::consume(settings, &kafka, gauges, stop).await;
            (format!("consumer {name}"), result)
        });
    }
    for (name, settings) in config.stream.clone() {
        let (kafka, stop, gauges) = (config.kafka.clone(), stop.clone(), gauges("stream", &name));
        components.spawn(async move {
            let result = components::stream(settings, &kafka, gauges, stop).await;
            (format!("stream {name}"), result)
        });
    }
    for (name, settings) in config.sink.clone() {
        let (kafka, stop) = (config.kafka.clone(), stop.clone());
        components.spawn(async move {
            let result = crate::delta_sink::delta_sink(&settings, &kafka, stop).await;
            (format!("sink {name}"), result)
        });
    }
    tracing::info!(
        sinks = config.sink.len(),
        sources = config.source.len(),
        consumers = config.consumer.len(),
        streams = config.stream.len(),
        "exactly run started"
    );
    let mut failure = None;
    while let Some(joined) = components.join_next().await {
        let (component, result) = joined.context("a component panicked")?;
        match result {
            Ok(()) => tracing::info!(component, "stopped"),
            Err(e) => {
                tracing::error!(component, "stopped: {e:#}");
                if failure.is_none() {
                    failure = Some(e.context(component));
                }
                let _ = stop_all.send(true);
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
