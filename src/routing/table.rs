//! Backends and the routing table snapshot the data path reads.
//!
//! A [`RoutingTable`] joins the pure [`Router`] (who owns a key) with what the proxy needs to
//! reach each node (address, metric handles). It is immutable; a membership change builds a
//! new table with the next generation and swaps it in atomically, so a connection routes on
//! one consistent snapshot and established connections are never touched.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::Gauge;
use tokio::sync::Notify;

use crate::config::BackendSpec;
use crate::error::ConfigError;
use crate::metrics::{BackendMetrics, Metrics};
use crate::routing::{KeyDigest, Router};

/// A backend's health as the data path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Takes its keys.
    Up,
    /// Failed its health checks (or was ejected): its keys go to their next choice.
    Down,
}

/// A backend's live state: its health and its open connections. It outlives table swaps:
/// a new table keeps the state of every backend whose name and address it keeps, so a
/// membership change neither forgets a down backend nor resets a connection count.
#[derive(Debug)]
pub struct BackendState {
    /// Proxied connections open now.
    active: AtomicUsize,
    /// `Health` as a byte (0 up, 1 down).
    health: AtomicU8,
    /// Client connect failures in a row (passive checking); reset by a success.
    failures: AtomicU32,
    /// Woken when `failures` reaches the ejection threshold.
    ejection: Notify,
    /// The backend's open-connections gauge, moved with `active`.
    gauge: Gauge,
}

impl BackendState {
    /// A fresh state (up, no connections) whose connection count also moves `gauge`.
    pub fn new(gauge: Gauge) -> Self {
        BackendState {
            active: AtomicUsize::new(0),
            health: AtomicU8::new(0),
            failures: AtomicU32::new(0),
            ejection: Notify::new(),
            gauge,
        }
    }

    /// The health in force.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            0 => Health::Up,
            _ => Health::Down,
        }
    }

    /// Sets the health; returns whether it changed.
    pub fn set_health(&self, health: Health) -> bool {
        let byte = match health {
            Health::Up => 0,
            Health::Down => 1,
        };
        self.health.swap(byte, Ordering::Relaxed) != byte
    }

    /// Proxied connections open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Takes one of the backend's connection slots, or `None` when `max` are taken.
    pub fn try_reserve(self: &Arc<Self>, max: Option<usize>) -> Option<ActiveSlot> {
        let max = max.unwrap_or(usize::MAX);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.gauge.increment(1.0);
        Some(ActiveSlot(self.clone()))
    }

    /// A client connect to the backend failed (its fault). Returns `true` when this failure
    /// reaches `eject_after` in a row (0: passive checking off), after waking the task that
    /// ejects it.
    pub fn connect_failed(&self, eject_after: u32) -> bool {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let eject = eject_after > 0 && n == eject_after;
        if eject {
            self.ejection.notify_one();
        }
        eject
    }

    /// A client connect succeeded: the run of failures is over.
    pub fn connect_succeeded(&self) {
        // A load first: the common case (no failures) does not write the shared line.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Client connect failures in a row now.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Starts a new run of failures (after an ejection, or when a probe re-admits it).
    pub fn reset_failures(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Waits until the data path's failures reach the ejection threshold.
    pub async fn ejection_requested(&self) {
        self.ejection.notified().await;
    }
}

/// One of a backend's connection slots; given back when dropped.
#[derive(Debug)]
pub struct ActiveSlot(Arc<BackendState>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.decrement(1.0);
    }
}

/// A backend as the data path sees it.
pub struct Backend {
    /// Routing identity.
    pub name: Arc<str>,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of keys (as configured; a draining backend routes as weight 0).
    pub weight: u32,
    /// Its host's DSR agent, if any.
    pub agent: Option<SocketAddr>,
    /// Cap on its concurrent proxied connections.
    pub max_connections: Option<usize>,
    /// Connections to it start with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
    /// Draining: takes no new keys; its connections continue.
    pub draining: bool,
    /// Live state, shared with the tables before and after this one.
    pub state: Arc<BackendState>,
    /// Pre-registered metric handles (atomic adds on the hot path).
    pub metrics: BackendMetrics,
}

impl Backend {
    /// `up`, `down` or `draining`, as the admin API reports it.
    pub fn state_name(&self) -> &'static str {
        match (self.draining, self.state.health()) {
            (true, _) => "draining",
            (false, Health::Up) => "up",
            (false, Health::Down) => "down",
        }
    }
}

/// An immutable routing snapshot: router plus backends, indexed alike.
pub struct RoutingTable {
    /// Who owns a key; indices point into `backends`.
    pub router: Router,
    /// The backends, in the order they were configured.
    pub backends: Vec<Backend>,
    /// Increments on every membership change.
    pub generation: u64,
    /// Set while more backends are down than the panic threshold allows: health is then
    /// ignored and every backend is routed to as if up.
    panic: AtomicBool,
}

impl RoutingTable {
    /// Builds a table from backend specs, registering their metrics. An empty set is
    /// rejected: a table must name at least one backend (weight 0 drains one without
    /// removing it).
    pub fn build(
        specs: &[BackendSpec],
        generation: u64,
        metrics: &Metrics,
    ) -> Result<Self, ConfigError> {
        Self::rebuild(specs, &HashSet::new(), false, generation, metrics, None)
    }

    /// Builds the table that follows `previous`: backends in `draining` take no new keys
    /// (they route as weight 0, which the fingerprint shows), and every backend `previous`
    /// had with the same name and address keeps its live state (and every one with the same
    /// name its metric handles: `previous` must have been built with the same `metrics`).
    /// `proxy_protocol` is the default for backends that do not say.
    pub fn rebuild(
        specs: &[BackendSpec],
        draining: &HashSet<String>,
        proxy_protocol: bool,
        generation: u64,
        metrics: &Metrics,
        previous: Option<&RoutingTable>,
    ) -> Result<Self, ConfigError> {
        if specs.is_empty() {
            return Err(ConfigError::Invalid {
                field: "backend set",
                why: "it is empty; give at least one backend NAME=HOST:PORT \
                      (to stop sending new keys to a backend, keep it with weight 0)"
                    .into(),
            });
        }
        Self::rebuild_maybe_empty(
            specs,
            draining,
            proxy_protocol,
            generation,
            metrics,
            previous,
        )
    }

    /// [`RoutingTable::rebuild`] that also accepts an empty set: a membership read from etcd
    /// may be empty (every connection then ends with `no_backend`). Local changes (flags,
    /// the config file, the admin API) go through `rebuild`, which refuses it.
    pub fn rebuild_maybe_empty(
        specs: &[BackendSpec],
        draining: &HashSet<String>,
        proxy_protocol: bool,
        generation: u64,
        metrics: &Metrics,
        previous: Option<&RoutingTable>,
    ) -> Result<Self, ConfigError> {
        let routed_weight = |b: &BackendSpec| {
            if draining.contains(&b.name) {
                0
            } else {
                b.weight
            }
        };
        let router = Router::new(specs.iter().map(|b| (b.name.as_str(), routed_weight(b))))?;
        // By name: a change to a table of n backends costs O(n), and the backends it keeps
        // keep their metric handles (registering them again costs more than the rest).
        let before: std::collections::HashMap<&str, &Backend> = previous
            .map(|p| p.backends.iter().map(|b| (&*b.name, b)).collect())
            .unwrap_or_default();
        let backends = specs
            .iter()
            .zip(router.nodes())
            .map(|(spec, node)| {
                let kept = before.get(spec.name.as_str());
                let metrics = match kept {
                    Some(b) => b.metrics.clone(),
                    None => metrics.backend(&spec.name),
                };
                let state = kept.filter(|b| b.addr == spec.addr).map_or_else(
                    || Arc::new(BackendState::new(metrics.active.clone())),
                    |b| b.state.clone(),
                );
                Backend {
                    name: node.name.clone(),
                    addr: spec.addr,
                    weight: spec.weight,
                    agent: spec.agent,
                    max_connections: spec.max_connections,
                    proxy_protocol: spec.proxy_protocol.unwrap_or(proxy_protocol),
                    draining: draining.contains(&spec.name),
                    state,
                    metrics,
                }
            })
            .collect();
        metrics.set_table(generation, router.fingerprint());
        Ok(RoutingTable {
            router,
            backends,
            generation,
            panic: AtomicBool::new(false),
        })
    }

    /// The backend for a key digest: the best one not in `tried` that is up (or any, in
    /// panic). O(n), no allocation.
    pub fn pick(&self, digest: KeyDigest, tried: &[usize]) -> Option<usize> {
        let panic = self.in_panic();
        self.router.pick_where(digest, |i| {
            !tried.contains(&i) && (panic || self.backends[i].state.health() == Health::Up)
        })
    }

    /// The key's owner with health ignored (what `failover = "none"` routes to).
    pub fn owner(&self, digest: KeyDigest) -> Option<usize> {
        self.router.pick_where(digest, |_| true)
    }

    /// Backends that take keys (weight above 0, not draining), best first for `key`, with
    /// health applied as [`RoutingTable::pick`] applies it.
    pub fn ranking(&self, key: &[u8]) -> Vec<usize> {
        let panic = self.in_panic();
        self.router
            .rank(key)
            .into_iter()
            .filter(|i| panic || self.backends[*i].state.health() == Health::Up)
            .collect()
    }

    /// Whether health is ignored now (too many backends down).
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    /// Recomputes the panic state: in panic when more than `max_down_share` of the backends
    /// that take keys are down. Returns `(down, taking_keys, panic)`.
    pub fn update_panic(&self, max_down_share: f64) -> (usize, usize, bool) {
        let taking: Vec<&Backend> = self
            .backends
            .iter()
            .enumerate()
            .filter(|(i, b)| !b.draining && self.router.nodes()[*i].weight > 0)
            .map(|(_, b)| b)
            .collect();
        let down = taking
            .iter()
            .filter(|b| b.state.health() == Health::Down)
            .count();
        let panic = !taking.is_empty() && down as f64 > max_down_share * taking.len() as f64;
        self.panic.store(panic, Ordering::Relaxed);
        (down, taking.len(), panic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TABLE_GENERATION;

    fn spec(name: &str, port: u16) -> BackendSpec {
        BackendSpec::new(name, ([127, 0, 0, 1], port).into())
    }

    #[test]
    fn an_empty_set_is_rejected_with_what_to_do() {
        let Err(e) = RoutingTable::build(&[], 1, &Metrics::new()) else {
            panic!("an empty backend set built a table");
        };
        let msg = e.to_string();
        assert!(
            matches!(e, ConfigError::Invalid { .. }) && msg.contains("at least one backend"),
            "{msg}"
        );
    }

    #[test]
    fn an_empty_set_from_etcd_builds_a_table_that_routes_nowhere() {
        let t = RoutingTable::rebuild_maybe_empty(
            &[],
            &HashSet::new(),
            false,
            3,
            &Metrics::new(),
            None,
        )
        .expect("an empty set from etcd is allowed");
        assert!(t.backends.is_empty());
        assert_eq!(t.pick(crate::routing::KeyDigest::of(b"k"), &[]), None);
    }

    /// `set_backends(&[])` fails and the table in force (and its generation gauge) stays.
    #[tokio::test]
    async fn set_backends_rejects_an_empty_set_and_keeps_the_old_table() {
        let config = crate::ProxyConfig::new(([127, 0, 0, 1], 0).into(), vec![spec("b1", 1)]);
        let proxy = crate::start(config).await.expect("start");
        let grown = proxy
            .set_backends(&[spec("b1", 1), spec("b2", 2)])
            .expect("a valid set");
        let before = proxy.table();
        assert_eq!(before.generation, grown);

        let err = proxy.set_backends(&[]).expect_err("empty set accepted");
        assert!(
            matches!(err, crate::Error::Config(ConfigError::Invalid { .. })),
            "{err}"
        );
        let after = proxy.table();
        assert!(Arc::ptr_eq(&before, &after), "the table was replaced");
        assert_eq!(after.backends.len(), 2);
        assert!(after.router.pick(b"k").is_some());
        let gauge = format!("{TABLE_GENERATION} {grown}");
        assert!(
            proxy.metrics_text().lines().any(|l| l == gauge),
            "generation gauge moved:\n{}",
            proxy.metrics_text()
        );
    }
}
