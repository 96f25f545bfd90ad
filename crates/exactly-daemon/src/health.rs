//! Liveness and readiness for orchestrators, served beside /metrics.
//!
//! Each component (a relay, a consumer, a stream job) has probes that run on their own timers
//! and report per aspect (database, broker, slot) either nothing (fine) or the reason it is
//! not. `/readyz` is 200 when every aspect of every component is fine, else 503 with the
//! reasons as JSON. `/healthz` is 200 while every component's probes keep reporting: a probe
//! that stopped reporting means the process is wedged, and a restart is the cure.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a component may go without any probe report before /healthz fails.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// How often the probes run.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Component {
    /// Aspect → why it is not ready (None: ready).
    aspects: BTreeMap<String, Option<String>>,
    reported: Instant,
}

/// The process's components and what their probes last said.
#[derive(Debug, Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, Component>>,
}

/// The one registry of this process (like the metrics recorder: one per process).
pub fn global() -> &'static Health {
    static HEALTH: OnceLock<Health> = OnceLock::new();
    HEALTH.get_or_init(Health::default)
}

/// A readiness or liveness answer: the HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// 200 when true, 503 otherwise.
    pub ok: bool,
    /// Each component's state and reasons.
    pub body: serde_json::Value,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Component>> {
        self.components
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Declares `component` with the aspects its probes will report; each is not ready until
    /// its first report.
    pub fn register(&self, component: &str, aspects: &[&str]) {
        let aspects = aspects
            .iter()
            .map(|a| ((*a).to_owned(), Some("not checked yet".to_owned())))
            .collect();
        self.lock().insert(
            component.to_owned(),
            Component {
                aspects,
                reported: Instant::now(),
            },
        );
    }

    /// A probe's finding: `None` when `aspect` of `component` is fine, else why not.
    pub fn report(&self, component: &str, aspect: &str, problem: Option<String>) {
        let mut components = self.lock();
        let entry = components
            .entry(component.to_owned())
            .or_insert_with(|| Component {
                aspects: BTreeMap::new(),
                reported: Instant::now(),
            });
        entry.aspects.insert(aspect.to_owned(), problem);
        entry.reported = Instant::now();
        let ready = entry.aspects.values().all(Option::is_none);
        metrics::gauge!("exactly_component_ready", "component" => component.to_owned()).set(if ready {
            1.0
        } else {
            0.0
        });
    }

    /// `/readyz`.
    pub fn readiness(&self) -> Answer {
        let components = self.lock();
        let mut ok = !components.is_empty();
        let mut body = serde_json::Map::new();
        for (name, component) in components.iter() {
            let problems: BTreeMap<&str, &str> = component
                .aspects
                .iter()
                .filter_map(|(aspect, problem)| problem.as_deref().map(|p| (aspect.as_str(), p)))
                .collect();
            ok &= problems.is_empty();
            body.insert(
                name.clone(),
                serde_json::json!({ "ready": problems.is_empty(), "not_ready": problems }),
            );
        }
        Answer {
            ok,
            body: serde_json::json!({ "ready": ok, "components": body }),
        }
    }

    /// `/healthz`.
    pub fn liveness(&self, now: Instant) -> Answer {
        let components = self.lock();
        let stale: Vec<&String> = components
            .iter()
            .filter(|(_, c)| now.duration_since(c.reported) > STALE_AFTER)
            .map(|(name, _)| name)
            .collect();
        Answer {
            ok: stale.is_empty(),
            body: serde_json::json!({ "alive": stale.is_empty(), "silent": stale }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_aspect_reported_fine() {
        let health = Health::default();
        assert!(!health.readiness().ok, "nothing registered is not ready");
        health.register("relay orders", &["database", "broker"]);
        assert!(!health.readiness().ok);
        health.report("relay orders", "database", None);
        let answer = health.readiness();
        assert!(!answer.ok);
        assert_eq!(
            answer.body["components"]["relay orders"]["not_ready"]["broker"],
            "not checked yet"
        );
        health.report("relay orders", "broker", None);
        assert!(health.readiness().ok);
        health.report("relay orders", "broker", Some("broker: unreachable".into()));
        let answer = health.readiness();
        assert!(!answer.ok);
        assert_eq!(
            answer.body["components"]["relay orders"]["not_ready"]["broker"],
            "broker: unreachable"
        );
    }

    #[test]
    fn alive_while_probes_report() {
        let health = Health::default();
        health.register("consumer ledger", &["broker"]);
        let now = Instant::now();
        assert!(health.liveness(now).ok);
        let later = now + STALE_AFTER + Duration::from_secs(1);
        let answer = health.liveness(later);
        assert!(!answer.ok);
        assert_eq!(answer.body["silent"][0], "consumer ledger");
    }
}
