//! Backends and the routing table snapshot the data path reads.
//!
//! A [`RoutingTable`] joins the pure [`Router`] (who owns a key) with what the proxy needs to
//! reach each node (address, metric handles). It is immutable; a membership change builds a
//! new table with the next generation and swaps it in atomically, so a connection routes on
//! one consistent snapshot and established connections are never touched.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::BackendSpec;
use crate::error::ConfigError;
use crate::metrics::{BackendMetrics, Metrics};
use crate::routing::Router;

/// A backend as the data path sees it.
pub struct Backend {
    /// Routing identity.
    pub name: Arc<str>,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of keys.
    pub weight: u32,
    /// Its host's DSR agent, if any.
    pub agent: Option<SocketAddr>,
    /// Pre-registered metric handles (atomic adds on the hot path).
    pub metrics: BackendMetrics,
}

/// An immutable routing snapshot: router plus backends, indexed alike.
pub struct RoutingTable {
    /// Who owns a key; indices point into `backends`.
    pub router: Router,
    /// The backends, in the order they were configured.
    pub backends: Vec<Backend>,
    /// Increments on every membership change.
    pub generation: u64,
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
        if specs.is_empty() {
            return Err(ConfigError::Invalid {
                field: "backend set",
                why: "it is empty; give at least one backend NAME=HOST:PORT \
                      (to stop sending new keys to a backend, keep it with weight 0)"
                    .into(),
            });
        }
        let router = Router::new(specs.iter().map(|b| (b.name.as_str(), b.weight)))?;
        let backends = specs
            .iter()
            .zip(router.nodes())
            .map(|(spec, node)| Backend {
                name: node.name.clone(),
                addr: spec.addr,
                weight: spec.weight,
                agent: spec.agent,
                metrics: metrics.backend(&spec.name),
            })
            .collect();
        metrics.set_table(generation, router.fingerprint());
        Ok(RoutingTable {
            router,
            backends,
            generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TABLE_GENERATION;

    fn spec(name: &str, port: u16) -> BackendSpec {
        BackendSpec {
            name: name.to_string(),
            addr: ([127, 0, 0, 1], port).into(),
            weight: 1,
            agent: None,
            max_connections: None,
            proxy_protocol: None,
        }
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
