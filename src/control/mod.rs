//! The control plane: the membership in force and every way it changes — the admin API
//! (`api`), a SIGHUP reload, health checking (`health`) — and the notice connections get
//! when a key's owner may have changed.
//!
//! Every change is validated first and then swapped in whole: a new [`RoutingTable`] is
//! built from the new membership (backends that keep their name and address keep their live
//! state: health, open connections) and stored atomically; a rejected change leaves the
//! table untouched. Changes are serialized by one lock that no data-path task ever takes:
//! connections read the table lock-free.
//!
//! Draining is part of the membership: a draining backend routes as weight 0 (its keys go to
//! their next choice, its connections continue), so the table fingerprint shows it. Health is
//! not: a down backend keeps its place in the table and is skipped at pick time, so every
//! proxy with the same membership has the same fingerprint whatever its local health view.

pub(crate) mod api;
mod health;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tracing::{info, warn};

use serde::Deserialize;

use crate::config::{resolve, BackendSpec, ProxyConfig};
use crate::error::ConfigError;
use crate::membership::source::MembershipStatus;
use crate::proxy::Shared;
use crate::routing::MAX_WEIGHT;
use crate::routing::{Health, KeyDigest, RoutingTable};

pub use health::probe;

/// Why a membership change was refused (the table in force stays).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No backend has that name.
    #[error("no backend named {0:?}")]
    NotFound(String),
    /// The change would make an invalid membership or setting.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// One backend as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    /// The spec in force (name, address, weight, options).
    pub spec: BackendSpec,
    /// `up`, `down` or `draining`.
    pub state: &'static str,
    /// Proxied connections open now.
    pub active_connections: usize,
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The generation of the table now in force.
    pub generation: u64,
    /// Settings that differ in the new file but only take effect on a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The membership and its history.
struct Members {
    specs: Vec<BackendSpec>,
    draining: HashSet<String>,
    next_generation: u64,
}

/// The control plane of one proxy.
pub struct Control {
    me: Weak<Control>,
    shared: Arc<Shared>,
    members: Mutex<Members>,
    health: health::Supervisor,
    /// Set when the membership comes from etcd: the admin API then refuses changes.
    membership: Option<Arc<MembershipStatus>>,
}

impl Control {
    /// Takes charge of `shared`'s table (generation 1) and starts its health checks on the
    /// current runtime; they stop with `stop`.
    pub(crate) fn start(
        shared: Arc<Shared>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Arc<Self> {
        let specs = shared.config.load().backends.clone();
        let membership = shared.config.load().membership.as_ref().map(|m| {
            Arc::new(MembershipStatus::new(
                m.url.clone(),
                shared.metrics.membership(),
            ))
        });
        let control = Arc::new_cyclic(|me| Control {
            membership,
            me: me.clone(),
            members: Mutex::new(Members {
                specs,
                draining: HashSet::new(),
                next_generation: 2,
            }),
            health: health::Supervisor::new(stop),
            shared,
        });
        let table = control.shared.table.load_full();
        for b in &table.backends {
            b.metrics.configured.set(1.0);
            b.metrics.up.set(1.0);
        }
        control.refresh(&table);
        control.health.reconcile(
            &table,
            &control.shared.config.load().health,
            Arc::downgrade(&control),
        );
        control
    }

    fn members(&self) -> MutexGuard<'_, Members> {
        // Every change is built aside and stored in one step: a panic mid-change leaves the
        // last consistent membership.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backends in force, in membership order, with their state.
    pub fn backends(&self) -> Vec<BackendView> {
        let members = self.members();
        let table = self.shared.table.load();
        members
            .specs
            .iter()
            .map(|spec| {
                let be = table.backends.iter().find(|b| *b.name == *spec.name);
                BackendView {
                    spec: spec.clone(),
                    state: be.map_or("up", |b| b.state_name()),
                    active_connections: be.map_or(0, |b| b.state.active()),
                }
            })
            .collect()
    }

    /// Adds a backend, or replaces the one with its name (its drain state stays). Returns
    /// the new generation and whether it was added.
    pub fn put(&self, spec: BackendSpec) -> Result<(u64, bool), ControlError> {
        let mut m = self.members();
        let mut specs = m.specs.clone();
        let added = match specs.iter_mut().find(|s| s.name == spec.name) {
            Some(s) => {
                *s = spec;
                false
            }
            None => {
                specs.push(spec);
                true
            }
        };
        let draining = m.draining.clone();
        let generation = self.apply(&mut m, specs, draining, false)?;
        Ok((generation, added))
    }

    /// Removes a backend: no new connection goes to it; its open ones continue.
    pub fn delete(&self, name: &str) -> Result<u64, ControlError> {
        let mut m = self.members();
        if !m.specs.iter().any(|s| s.name == name) {
            return Err(ControlError::NotFound(name.to_string()));
        }
        let specs: Vec<BackendSpec> = m.specs.iter().filter(|s| s.name != name).cloned().collect();
        let mut draining = m.draining.clone();
        draining.remove(name);
        self.apply(&mut m, specs, draining, false)
    }

    /// Drains a backend (`true`: no new connections, its keys go to their next choice, its
    /// connections continue) or ends its drain (`false`).
    pub fn set_draining(&self, name: &str, draining: bool) -> Result<u64, ControlError> {
        let mut m = self.members();
        if !m.specs.iter().any(|s| s.name == name) {
            return Err(ControlError::NotFound(name.to_string()));
        }
        let mut set = m.draining.clone();
        if draining {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
        let specs = m.specs.clone();
        self.apply(&mut m, specs, set, false)
    }

    /// Replaces the whole membership (drains of backends that stay, stay).
    pub fn replace(&self, specs: &[BackendSpec]) -> Result<u64, ControlError> {
        let mut m = self.members();
        let draining = retained_drains(&m.draining, specs);
        self.apply(&mut m, specs.to_vec(), draining, false)
    }

    /// Replaces the whole membership with the set read from etcd, which may be empty (then
    /// every connection ends with `no_backend` until a backend appears).
    pub(crate) fn replace_from_source(&self, specs: &[BackendSpec]) -> Result<u64, ControlError> {
        let mut m = self.members();
        let draining = retained_drains(&m.draining, specs);
        self.apply(&mut m, specs.to_vec(), draining, true)
    }

    /// The etcd membership's live status, when the membership comes from etcd.
    pub fn membership(&self) -> Option<&Arc<MembershipStatus>> {
        self.membership.as_ref()
    }

    /// The configuration in force.
    pub(crate) fn config(&self) -> Arc<ProxyConfig> {
        self.shared.config.load_full()
    }

    /// Applies a re-read configuration: the membership, and the settings that can change
    /// live (timeouts, tries, failover, health, owner-change policy, PROXY default, source
    /// rate). The others are reported in [`Reloaded::needs_restart`] and left as they are.
    pub fn reload(&self, new: ProxyConfig) -> Result<Reloaded, ControlError> {
        new.validate()?;
        let mut m = self.members();
        let old = self.shared.config.load_full();
        let needs_restart = restart_only_changes(&old, &new);
        let mut live = (*old).clone();
        // With etcd, the membership is etcd's, not the file's: it stays as it is.
        let new_backends = match &old.membership {
            Some(_) => m.specs.clone(),
            None => new.backends.clone(),
        };
        live.backends = new_backends.clone();
        live.header_timeout = new.header_timeout;
        live.connect_timeout = new.connect_timeout;
        live.max_tries = new.max_tries;
        live.failover = new.failover;
        live.idle_timeout = new.idle_timeout;
        live.health = new.health.clone();
        live.owner_change = new.owner_change;
        live.proxy_protocol = new.proxy_protocol;
        live.source_rate = new.source_rate;
        let draining = retained_drains(&m.draining, &new_backends);
        // The table is built (validated) before anything is stored.
        let generation = m.next_generation;
        let rebuild = if old.membership.is_some() {
            RoutingTable::rebuild_maybe_empty
        } else {
            RoutingTable::rebuild
        };
        let table = rebuild(
            &new_backends,
            &draining,
            live.proxy_protocol,
            generation,
            &self.shared.metrics,
            Some(&self.shared.table.load()),
        )?;
        let health_changed = old.health != live.health;
        if old.source_rate != live.source_rate {
            self.shared.rates.set(live.source_rate);
        }
        self.shared.config.store(Arc::new(live));
        self.install(&mut m, new_backends, draining, table);
        if health_changed {
            // New probe settings: every checker starts over with them.
            self.health.restart();
            self.health.reconcile(
                &self.shared.table.load_full(),
                &self.shared.config.load().health,
                self.weak(),
            );
        }
        Ok(Reloaded {
            generation,
            needs_restart,
        })
    }

    /// Counts a config reload attempt (`shardproxy_config_reloads_total{result}`).
    pub fn record_reload(&self, ok: bool) {
        self.shared.metrics.config_reload(ok);
    }

    /// The backends a key would go to now, best first (health and drains applied).
    pub fn route(&self, key: &[u8]) -> Vec<String> {
        let table = self.shared.table.load();
        table
            .ranking(key)
            .into_iter()
            .map(|i| table.backends[i].name.to_string())
            .collect()
    }

    /// The table in force.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.shared.table.load_full()
    }

    fn weak(&self) -> Weak<Control> {
        self.me.clone()
    }

    /// Builds, validates and installs a new membership.
    fn apply(
        &self,
        m: &mut Members,
        specs: Vec<BackendSpec>,
        draining: HashSet<String>,
        may_be_empty: bool,
    ) -> Result<u64, ControlError> {
        let generation = m.next_generation;
        let config = self.shared.config.load();
        for spec in &specs {
            validate_spec(spec, &config)?;
        }
        let rebuild = if may_be_empty {
            RoutingTable::rebuild_maybe_empty
        } else {
            RoutingTable::rebuild
        };
        let table = rebuild(
            &specs,
            &draining,
            config.proxy_protocol,
            generation,
            &self.shared.metrics,
            Some(&self.shared.table.load()),
        )?;
        self.install(m, specs, draining, table);
        Ok(generation)
    }

    fn install(
        &self,
        m: &mut Members,
        specs: Vec<BackendSpec>,
        draining: HashSet<String>,
        table: RoutingTable,
    ) {
        let table = Arc::new(table);
        for old in &m.specs {
            if !specs.iter().any(|s| s.name == old.name) {
                self.shared.metrics.backend(&old.name).configured.set(0.0);
            }
        }
        for b in &table.backends {
            b.metrics.configured.set(1.0);
            b.metrics.up.set(match b.state.health() {
                Health::Up => 1.0,
                Health::Down => 0.0,
            });
        }
        m.specs = specs;
        m.draining = draining;
        m.next_generation += 1;
        self.shared.table.store(table.clone());
        self.refresh(&table);
        self.health
            .reconcile(&table, &self.shared.config.load().health, self.weak());
        info!(
            generation = table.generation,
            backends = table.backends.len(),
            fingerprint = format_args!("{:016x}", table.router.fingerprint()),
            "routing table replaced"
        );
    }

    /// Recomputes the panic state of `table` and tells connections routing may have changed.
    fn refresh(&self, table: &RoutingTable) {
        let share = self.shared.config.load().health.max_down_share;
        let was = table.in_panic();
        let (down, taking, panic) = table.update_panic(share);
        self.shared.metrics.set_panic(panic);
        if panic != was {
            if panic {
                warn!(
                    down,
                    taking_keys = taking,
                    "more backends down than health.max_down_share allows: routing as if all were up"
                );
            } else {
                info!(down, taking_keys = taking, "health applies again");
            }
        }
        self.shared.routing_epoch.send_modify(|e| *e += 1);
    }

    /// A checker changed a backend's health.
    fn health_changed(&self) {
        let _m = self.members();
        self.refresh(&self.shared.table.load());
    }
}

/// Whether `backend` is (still) where `digest`'s connections would go now.
pub(crate) fn owns(shared: &Shared, digest: KeyDigest, backend: &str) -> bool {
    let table = shared.table.load();
    let pick = match shared.config.load().failover {
        crate::config::Failover::Next => table.pick(digest, &[]),
        crate::config::Failover::None => table.owner(digest),
    };
    // No backend at all takes keys: nothing better to move to, so the connection stays.
    pick.is_none_or(|i| *table.backends[i].name == *backend)
}

/// A backend as JSON: the admin API's `PUT /backends/{name}` body, and the value of an etcd
/// key `PREFIX/backends/NAME` — one decoder for both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendBody {
    pub(crate) addr: String,
    #[serde(default = "one")]
    pub(crate) weight: u32,
    #[serde(default)]
    pub(crate) max_connections: Option<usize>,
    #[serde(default)]
    pub(crate) agent: Option<String>,
    #[serde(default)]
    pub(crate) proxy_protocol: Option<String>,
}

fn one() -> u32 {
    1
}

impl BackendBody {
    /// The backend `name` this body describes, or why it cannot be one.
    pub(crate) fn spec(self, name: String) -> Result<BackendSpec, String> {
        let addr = resolve(self.addr.trim())?;
        if self.weight > MAX_WEIGHT {
            return Err(format!(
                "weight {} is out of range 0..={MAX_WEIGHT}",
                self.weight
            ));
        }
        let agent = self.agent.as_deref().map(resolve).transpose()?;
        let proxy_protocol = match self.proxy_protocol.as_deref() {
            None => None,
            Some("v2") => Some(true),
            Some("none") => Some(false),
            Some(other) => return Err(format!("proxy_protocol {other:?} is not v2 or none")),
        };
        Ok(BackendSpec {
            weight: self.weight,
            agent,
            max_connections: self.max_connections,
            proxy_protocol,
            ..BackendSpec::new(name, addr)
        })
    }
}

/// Drains of backends that are still in `specs`.
fn retained_drains(draining: &HashSet<String>, specs: &[BackendSpec]) -> HashSet<String> {
    draining
        .iter()
        .filter(|n| specs.iter().any(|s| s.name == **n))
        .cloned()
        .collect()
}

/// Checks one backend the way the config file and flags are checked.
pub(crate) fn validate_spec(spec: &BackendSpec, config: &ProxyConfig) -> Result<(), ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        field: "backend",
        why,
    };
    if spec.name.is_empty()
        || spec
            .name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '=' | '/'))
    {
        return Err(invalid(format!(
            "name {:?}: 1 or more characters, no spaces, ',', '=' or '/'",
            spec.name
        )));
    }
    if spec.name.len() > 128 {
        return Err(invalid(format!("name {:?}: at most 128 bytes", spec.name)));
    }
    if spec.addr.port() == 0 || spec.addr.ip().is_unspecified() {
        return Err(invalid(format!(
            "{}: address {} cannot be connected to (port 0 or an unspecified IP)",
            spec.name, spec.addr
        )));
    }
    if spec.max_connections == Some(0) {
        return Err(invalid(format!(
            "{}: max_connections must be at least 1",
            spec.name
        )));
    }
    if spec.agent.is_some() && config.dsr.is_none() {
        warn!(backend = %spec.name, "agent given but --dsr is off: it is not used");
    }
    Ok(())
}

/// The settings that differ between `old` and `new` but are not applied live.
fn restart_only_changes(old: &ProxyConfig, new: &ProxyConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check(
        "listen",
        old.listen != new.listen || old.also_listen != new.also_listen,
    );
    check("admin", old.admin != new.admin);
    check("header", old.header != new.header);
    check("splice", old.splice != new.splice);
    check(
        "limits.max_connections",
        old.max_connections != new.max_connections,
    );
    check(
        "limits.max_pending_headers",
        old.max_pending_headers != new.max_pending_headers
            || old.max_pending_headers_per_source != new.max_pending_headers_per_source,
    );
    check(
        "limits.max_pipes",
        new.max_pipes.is_some() && old.max_pipes != new.max_pipes,
    );
    check("timeouts.drain", old.drain_timeout != new.drain_timeout);
    check(
        "timeouts.admin_header",
        old.admin_header_timeout != new.admin_header_timeout,
    );
    check("dsr", old.dsr != new.dsr);
    check(
        "admin_token_file",
        old.admin_token_file != new.admin_token_file,
    );
    check("upgrade_socket", old.upgrade_socket != new.upgrade_socket);
    check("membership", old.membership != new.membership);
    changed
}
