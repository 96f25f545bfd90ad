//! `--network-faults`: the proxies in front of the broker and the relay's PostgreSQL, and
//! the faults injected through them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;

use crate::fault_proxy::{Condition, FaultProxy};

/// The network faults of `--network-faults`, one of each kind per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NetworkFault {
    /// 250 ms each way for 15 s.
    Latency,
    /// Every open connection reset.
    Reset,
    /// Nothing passes for 40 s: past the consumers' 6 s session, the polling relay's 30 s
    /// lease and its 30 s delivery timeout.
    Blackhole,
    /// For 20 s requests arrive and take effect, their answers do not.
    AnswersLost,
    /// For 20 s answers would pass, requests do not.
    RequestsLost,
}

impl NetworkFault {
    pub(super) const ALL: [NetworkFault; 5] = [
        NetworkFault::Latency,
        NetworkFault::Reset,
        NetworkFault::Blackhole,
        NetworkFault::AnswersLost,
        NetworkFault::RequestsLost,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            NetworkFault::Latency => "network latency",
            NetworkFault::Reset => "network reset",
            NetworkFault::Blackhole => "network blackhole",
            NetworkFault::AnswersLost => "one-way partition, answers lost",
            NetworkFault::RequestsLost => "one-way partition, requests lost",
        }
    }

    pub(super) fn named(name: &str) -> Option<NetworkFault> {
        NetworkFault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The proxy condition and how long it lasts (a reset is instant).
    pub(super) fn condition(self) -> Option<(Condition, Duration)> {
        match self {
            NetworkFault::Latency => Some((
                Condition::Latency(Duration::from_millis(250)),
                Duration::from_secs(15),
            )),
            NetworkFault::Reset => None,
            NetworkFault::Blackhole => Some((Condition::Blackhole, Duration::from_secs(40))),
            NetworkFault::AnswersLost => Some((Condition::AnswersLost, Duration::from_secs(20))),
            NetworkFault::RequestsLost => Some((Condition::RequestsLost, Duration::from_secs(20))),
        }
    }
}

/// The fault proxies of a run: one the broker advertises (every client reaches the broker
/// through it), one in front of the relay's PostgreSQL.
pub(super) struct Network {
    pub(super) broker: FaultProxy,
    pub(super) postgres: FaultProxy,
    /// When the fault in force heals.
    pub(super) heals_at: Option<Instant>,
}

impl Network {
    /// Injects `fault` on the broker's link, PostgreSQL's or both (chosen by `rng`), and
    /// names the target.
    pub(super) fn inject(&mut self, fault: NetworkFault, rng: &mut rand::rngs::StdRng) -> &'static str {
        let (target, proxies): (&'static str, Vec<&FaultProxy>) = match rng.random_range(0..3) {
            0 => ("broker", vec![&self.broker]),
            1 => ("postgres", vec![&self.postgres]),
            _ => ("broker and postgres", vec![&self.broker, &self.postgres]),
        };
        match fault.condition() {
            Some((condition, lasting)) => {
                for proxy in proxies {
                    proxy.set(condition);
                }
                self.heals_at = Some(Instant::now() + lasting);
            }
            None => {
                for proxy in proxies {
                    proxy.reset_connections();
                }
            }
        }
        target
    }

    pub(super) fn heal_when_due(&mut self) {
        if self.heals_at.is_some_and(|at| Instant::now() >= at) {
            self.broker.set(Condition::Healthy);
            self.postgres.set(Condition::Healthy);
            self.heals_at = None;
        }
    }
}

/// The PostgreSQL server a URL names, as a socket address for a proxy to forward to.
pub(crate) fn postgres_address(url: &str) -> Result<SocketAddr> {
    let parsed = url::Url::parse(url).context("network faults need a postgres:// URL")?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .context("network faults need PostgreSQL over TCP (a host in the URL)")?;
    let port = parsed.port().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .with_context(|| format!("{host}:{port} resolves to no address"))
}

/// `url` pointed at `proxy` instead of the server.
pub(crate) fn through_proxy(url: &str, proxy: &FaultProxy) -> Result<String> {
    let mut parsed = url::Url::parse(url).context("network faults need a postgres:// URL")?;
    let address = proxy.address();
    parsed
        .set_host(Some(&address.ip().to_string()))
        .context("pointing the URL at the proxy")?;
    parsed
        .set_port(Some(address.port()))
        .map_err(|()| anyhow::anyhow!("pointing the URL at the proxy"))?;
    Ok(parsed.into())
}
