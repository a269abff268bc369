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
    /// Builds a table from backend specs, registering their metrics.
    pub fn build(
        specs: &[BackendSpec],
        generation: u64,
        metrics: &Metrics,
    ) -> Result<Self, ConfigError> {
        let router = Router::new(specs.iter().map(|b| (b.name.as_str(), b.weight)))?;
        let backends = specs
            .iter()
            .zip(router.nodes())
            .map(|(spec, node)| Backend {
                name: node.name.clone(),
                addr: spec.addr,
                weight: spec.weight,
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
