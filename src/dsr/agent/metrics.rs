//! The agent's metrics: its own Prometheus recorder (an agent is not a proxy, so none of the
//! proxy's series appear), served by the same admin listener as the proxy's.

use std::sync::Arc;

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::dsr::control::ControlError;

/// Hand-offs by `result`: `imported`, `failed` (rebuild or application refused),
/// `delivered` (given to the application after `Steered`), `aborted` (the proxy called it
/// off), `unsteered` (no `Steered` in time), `delivery_failed`.
pub const AGENT_HANDOFFS: &str = "shardproxy_agent_handoffs_total";
/// Handed-off connections the agent watches now (delivered, not yet closed).
pub const AGENT_FLOWS_ACTIVE: &str = "shardproxy_agent_flows_active";
/// Control connections closed for a protocol or authentication error, by `reason`.
pub const AGENT_CONTROL_ERRORS: &str = "shardproxy_agent_control_errors_total";
/// Control connections open now.
pub const AGENT_CONTROL_CONNECTIONS: &str = "shardproxy_agent_control_connections";
/// Bytes of closed handed-off connections, by `direction`.
pub const AGENT_BYTES: &str = "shardproxy_agent_bytes_total";
/// Admin connections ended, by `result`.
pub const AGENT_ADMIN_CONNECTIONS: &str = "shardproxy_agent_admin_connections_total";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Results counted in [`AGENT_HANDOFFS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentResult {
    /// Rebuilt and answered `Imported`.
    Imported,
    /// Answered `Failed`.
    Failed,
    /// Given to the application after `Steered`.
    Delivered,
    /// Called off by the proxy (`Abort`) or its control connection closed before `Steered`.
    Aborted,
    /// No `Steered` within the steer timeout.
    Unsteered,
    /// The application could not take it after `Steered` (the client is reset).
    DeliveryFailed,
}

impl AgentResult {
    const ALL: [AgentResult; 6] = [
        AgentResult::Imported,
        AgentResult::Failed,
        AgentResult::Delivered,
        AgentResult::Aborted,
        AgentResult::Unsteered,
        AgentResult::DeliveryFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            AgentResult::Imported => "imported",
            AgentResult::Failed => "failed",
            AgentResult::Delivered => "delivered",
            AgentResult::Aborted => "aborted",
            AgentResult::Unsteered => "unsteered",
            AgentResult::DeliveryFailed => "delivery_failed",
        }
    }
}

/// Control error labels counted in [`AGENT_CONTROL_ERRORS`] (the [`ControlError::reason`]s
/// plus `idle` and `protocol`).
const CONTROL_REASONS: [&str; 12] = [
    "io",
    "too_large",
    "bad_mac",
    "replay",
    "stale",
    "replay_cache_full",
    "version",
    "malformed",
    "random",
    "secret",
    "idle",
    "protocol",
];

/// The agent's metric handles; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    results: [Counter; AgentResult::ALL.len()],
    control_errors: [Counter; CONTROL_REASONS.len()],
    flows: Gauge,
    control_connections: Gauge,
    from_client: Counter,
    to_client: Counter,
    splice_fallbacks: Counter,
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, *v))
            .collect::<Vec<_>>(),
    )
}

impl AgentMetrics {
    /// A fresh recorder with every series registered.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let d = |name: &'static str, help: &'static str| {
            (
                SharedString::const_str(name).into(),
                SharedString::const_str(help),
            )
        };
        for (name, help) in [
            d(AGENT_HANDOFFS, "Hand-offs by result."),
            d(
                AGENT_CONTROL_ERRORS,
                "Control connections closed for an error, by reason.",
            ),
            d(
                AGENT_BYTES,
                "Bytes of closed handed-off connections, by direction.",
            ),
            d(
                AGENT_ADMIN_CONNECTIONS,
                "Admin connections ended, by result.",
            ),
        ] {
            recorder.describe_counter(name, None, help);
        }
        for (name, help) in [
            d(
                AGENT_FLOWS_ACTIVE,
                "Handed-off connections delivered and not yet closed.",
            ),
            d(AGENT_CONTROL_CONNECTIONS, "Control connections open now."),
        ] {
            recorder.describe_gauge(name, None, help);
        }
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &METADATA)
        };
        let inner = Inner {
            results: AgentResult::ALL.map(|r| counter(AGENT_HANDOFFS, &[("result", r.label())])),
            control_errors: CONTROL_REASONS
                .map(|r| counter(AGENT_CONTROL_ERRORS, &[("reason", r)])),
            flows: recorder.register_gauge(&key(AGENT_FLOWS_ACTIVE, &[]), &METADATA),
            control_connections: recorder
                .register_gauge(&key(AGENT_CONTROL_CONNECTIONS, &[]), &METADATA),
            from_client: counter(AGENT_BYTES, &[("direction", "client_to_backend")]),
            to_client: counter(AGENT_BYTES, &[("direction", "backend_to_client")]),
            splice_fallbacks: counter("shardproxy_agent_splice_fallbacks_total", &[]),
            handle: recorder.handle(),
            recorder,
        };
        AgentMetrics {
            inner: Arc::new(inner),
        }
    }

    /// Counts a hand-off result.
    pub fn result(&self, r: AgentResult) {
        self.inner.results[r as usize].increment(1);
    }

    /// Counts a control connection closed for `e`.
    pub fn control_error(&self, e: &ControlError) {
        self.control_error_label(e.reason());
    }

    /// Counts a control connection closed for a labelled reason.
    pub fn control_error_label(&self, reason: &str) {
        if let Some(i) = CONTROL_REASONS.iter().position(|r| *r == reason) {
            self.inner.control_errors[i].increment(1);
        }
    }

    /// The gauge of open control connections.
    pub fn control_connections(&self) -> Gauge {
        self.inner.control_connections.clone()
    }

    /// The gauge of watched flows.
    pub fn flows(&self) -> Gauge {
        self.inner.flows.clone()
    }

    /// The byte counters (client → backend, backend → client), for the `--forward` relay
    /// to count as bytes move.
    pub fn byte_counters(&self) -> (&Counter, &Counter) {
        (&self.inner.from_client, &self.inner.to_client)
    }

    /// The relay's splice-fallback counter (`--forward`).
    pub fn splice_fallbacks(&self) -> &Counter {
        &self.inner.splice_fallbacks
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.inner.handle.run_upkeep();
        self.inner.handle.render()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::admin::Exposition for AgentMetrics {
    fn render(&self) -> String {
        AgentMetrics::render(self)
    }

    fn admin_connections(&self, result: &'static str) -> Counter {
        self.inner.recorder.register_counter(
            &key(AGENT_ADMIN_CONNECTIONS, &[("result", result)]),
            &METADATA,
        )
    }
}
