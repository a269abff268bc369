//! Metrics: every metric name in one place, and the handles the data path bumps.
//!
//! Each proxy owns its own Prometheus recorder (no global state, so several proxies in one
//! process — tests, the demo — keep separate counts). Handles are registered once, at start
//! or when a backend joins the table, so the per-connection and per-chunk cost is an atomic
//! add. Labels are bounded (`backend`, `reason`, `direction`, `result`); a key is never a
//! label.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::error::ConnError;
use crate::header::HeaderError;

/// Client connections accepted.
pub const CONNECTIONS_ACCEPTED: &str = "shardproxy_connections_accepted_total";
/// Client connections currently open.
pub const CONNECTIONS_ACTIVE: &str = "shardproxy_connections_active";
/// Client connections closed at once because a limit was reached, by `reason`
/// (`source_pending_headers`, `source_rate`; `max_connections` stays registered but is no longer counted:
/// at that limit the proxy stops accepting, see [`ACCEPT_PAUSED`]).
pub const CONNECTIONS_REJECTED: &str = "shardproxy_connections_rejected_total";
/// Client connections in the header phase now (accepted, key header not yet complete).
pub const CONNECTIONS_PENDING_HEADERS: &str = "shardproxy_connections_pending_headers";
/// Times an accept loop stopped accepting to wait for a free slot, by `reason`
/// (`max_connections`, `pending_headers`).
pub const ACCEPT_PAUSED: &str = "shardproxy_accept_paused_total";
/// Connections that ended in an error, by `reason`.
pub const CONNECTION_ERRORS: &str = "shardproxy_connection_errors_total";
/// Malformed or late key headers, by `reason`.
pub const HEADER_ERRORS: &str = "shardproxy_header_errors_total";
/// Accept failures, by `reason` (`fd_exhausted`, `other`).
pub const ACCEPT_ERRORS: &str = "shardproxy_accept_errors_total";
/// Connections established to a backend, by `backend`.
pub const BACKEND_CONNECTIONS: &str = "shardproxy_backend_connections_total";
/// Proxied connections currently open to a backend, by `backend`.
pub const BACKEND_ACTIVE: &str = "shardproxy_backend_connections_active";
/// Failed connect attempts, by `backend` and `reason` (`refused`, `timeout`, `other`).
pub const BACKEND_CONNECT_FAILURES: &str = "shardproxy_backend_connect_failures_total";
/// Bytes forwarded, by `backend` and `direction` (`client_to_backend`, `backend_to_client`).
pub const BACKEND_BYTES: &str = "shardproxy_backend_bytes_total";
/// Time to establish a backend connection, by `backend`.
pub const BACKEND_CONNECT_SECONDS: &str = "shardproxy_backend_connect_duration_seconds";
/// Keys sent to a later choice because an earlier one failed, by the failed `backend`.
pub const FAILOVERS: &str = "shardproxy_failovers_total";
/// Routing table generation (increments on every membership change).
pub const TABLE_GENERATION: &str = "shardproxy_routing_table_generation";
/// Routing table fingerprint (low 52 bits, exact in a float): equal on proxies that agree.
pub const TABLE_FINGERPRINT: &str = "shardproxy_routing_table_fingerprint";
/// Buffered-copy fallbacks taken because no splice pipe could be had.
pub const SPLICE_FALLBACKS: &str = "shardproxy_splice_fallbacks_total";
/// File descriptors open in the process (sampled at scrape).
pub const OPEN_FDS: &str = "shardproxy_open_fds";
/// Splice pipes open in the process (in use or pooled; two fds each).
pub const PIPES_OPEN: &str = "shardproxy_pipes_open";
/// The process-wide pipe budget (`--max-pipes`).
pub const PIPE_LIMIT: &str = "shardproxy_pipe_limit";
/// The process's soft fd limit.
pub const FD_LIMIT: &str = "shardproxy_fd_limit";
/// Admin connections ended, by `result` (`closed`, `header_timeout`, `evicted`, `rejected`,
/// `lifetime`, `error`).
pub const ADMIN_CONNECTIONS: &str = "shardproxy_admin_connections_total";

/// 1 while a backend is up (health checks), 0 while down, by `backend`.
pub const BACKEND_UP: &str = "shardproxy_backend_up";
/// 1 while a backend is in the membership, 0 after it was removed (its other series stay
/// in the exposition with their last values), by `backend`.
pub const BACKEND_CONFIGURED: &str = "shardproxy_backend_configured";
/// Health transitions, by `backend` and `to` (`up`, `down`).
pub const BACKEND_TRANSITIONS: &str = "shardproxy_backend_health_transitions_total";
/// Passive ejections (consecutive client connect failures), by `backend`.
pub const BACKEND_EJECTIONS: &str = "shardproxy_backend_ejections_total";
/// Active health probes, by `backend` and `result` (`ok`, `failed`).
pub const HEALTH_CHECKS: &str = "shardproxy_health_checks_total";
/// 1 while more backends are down than the panic threshold allows (health ignored).
pub const ROUTING_PANIC: &str = "shardproxy_routing_panic";
/// Config reloads (SIGHUP), by `result` (`ok`, `failed`).
pub const CONFIG_RELOADS: &str = "shardproxy_config_reloads_total";
/// Membership changes through the admin API, by `result` (`ok`, `rejected`).
pub const ADMIN_CHANGES: &str = "shardproxy_admin_changes_total";
/// Connections reset because their key changed owner (owner-change policy `close`).
pub const OWNER_CHANGE_CLOSED: &str = "shardproxy_owner_change_closed_total";
/// Listener hand-overs to a successor process (`--upgrade-socket`), counted by the old
/// process, by `result`: `handed_over` (the successor took the listeners; this process
/// drains), `refused` (the peer was another user), `failed` (the successor aborted, closed or
/// timed out; this process keeps serving).
pub const UPGRADES: &str = "shardproxy_upgrades_total";
/// Listening sockets this process inherited from its predecessor at start (0: it bound its
/// own).
pub const UPGRADE_INHERITED: &str = "shardproxy_upgrade_inherited_listeners";

/// DSR hand-offs, by `result` (`ok`, or the reason it fell back to splicing).
pub const DSR_HANDOFFS: &str = "shardproxy_dsr_handoffs_total";
/// Time from freezing a flow to steering it (a successful hand-off), in seconds.
pub const DSR_HANDOFF_SECONDS: &str = "shardproxy_dsr_handoff_duration_seconds";
/// Handed-off flows not yet reported closed.
pub const DSR_FLOWS_ACTIVE: &str = "shardproxy_dsr_flows_active";
/// Handed-off flows ended, by `reason` (`closed`: the agent reported it; `gone`: the agent
/// no longer held it when asked, its report lost; `expired`: its agent stayed away for the
/// flow timeout).
pub const DSR_FLOWS_ENDED: &str = "shardproxy_dsr_flows_ended_total";
/// Bytes of handed-off flows as their agents reported them, by `direction`.
pub const DSR_BYTES: &str = "shardproxy_dsr_bytes_total";

/// 1 while the proxy follows its etcd prefix (connected, watching), 0 while it routes on the
/// last table it had (`--membership`).
pub const MEMBERSHIP_CONNECTED: &str = "shardproxy_membership_connected";
/// The etcd store revision of the membership in force.
pub const MEMBERSHIP_REVISION: &str = "shardproxy_membership_revision";
/// Table swaps from etcd, by `result` (`applied`; `rejected`: the whole new set was invalid,
/// the old table stays).
pub const MEMBERSHIP_UPDATES: &str = "shardproxy_membership_updates_total";
/// etcd values that did not decode as a backend (logged with the key, skipped).
pub const MEMBERSHIP_INVALID_VALUES: &str = "shardproxy_membership_invalid_values_total";
/// Reconnections to etcd (after a failure, a compaction or at start from the cache).
pub const MEMBERSHIP_RECONNECTS: &str = "shardproxy_membership_reconnects_total";

/// Histogram buckets for connect latency, in seconds.
const CONNECT_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Histogram buckets for the DSR hand-off time, in seconds: fine below 2 ms, where a hand-off
/// on one L2 segment lands (p50/p99 read from them in the benchmark).
const HANDOFF_BUCKETS: &[f64] = &[
    0.000_1, 0.000_2, 0.000_3, 0.000_4, 0.000_5, 0.000_6, 0.000_75, 0.001, 0.001_25, 0.001_5,
    0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// A proxy's metrics: the recorder plus the handles that are not per backend.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    accepted: Counter,
    active: Gauge,
    header_errors: [Counter; HeaderError::ALL.len()],
    connection_errors: [Counter; ConnError::REASONS.len()],
    rejected_max_connections: Counter,
    rejected_source_pending_headers: Counter,
    rejected_source_rate: Counter,
    pending_headers: Gauge,
    paused_max_connections: Counter,
    paused_pending_headers: Counter,
    accept_fd_exhausted: Counter,
    accept_other: Counter,
    splice_fallbacks: Counter,
    open_fds: Gauge,
    pipes_open: Gauge,
    pipe_limit: Gauge,
    fd_limit: Gauge,
    generation: Gauge,
    fingerprint: Gauge,
    panic: Gauge,
    reloads_ok: Counter,
    reloads_failed: Counter,
    admin_changes_ok: Counter,
    admin_changes_rejected: Counter,
    owner_change_closed: Counter,
    upgrades: [Counter; UpgradeResult::ALL.len()],
    inherited: Gauge,
}

/// How a listener hand-over ended, on the old process's side (the `result` of [`UPGRADES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeResult {
    /// The successor took the listeners.
    HandedOver,
    /// The peer was refused (another user).
    Refused,
    /// The successor did not take over.
    Failed,
}

impl UpgradeResult {
    /// Every result, in label order.
    pub const ALL: [UpgradeResult; 3] = [
        UpgradeResult::HandedOver,
        UpgradeResult::Refused,
        UpgradeResult::Failed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            UpgradeResult::HandedOver => "handed_over",
            UpgradeResult::Refused => "refused",
            UpgradeResult::Failed => "failed",
        }
    }
}

impl Metrics {
    /// A fresh recorder with every metric described and the fixed handles registered.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(BACKEND_CONNECT_SECONDS.to_string()),
                CONNECT_BUCKETS,
            )
            .expect("bucket list is non-empty")
            .set_buckets_for_metric(
                Matcher::Full(DSR_HANDOFF_SECONDS.to_string()),
                HANDOFF_BUCKETS,
            )
            .expect("bucket list is non-empty")
            .build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &METADATA)
        };
        let gauge = |name: &'static str| recorder.register_gauge(&key(name, &[]), &METADATA);
        let header_errors =
            HeaderError::ALL.map(|e| counter(HEADER_ERRORS, &[("reason", e.reason())]));
        let connection_errors =
            ConnError::REASONS.map(|r| counter(CONNECTION_ERRORS, &[("reason", r)]));
        Metrics {
            inner: Arc::new(Inner {
                connection_errors,
                accepted: counter(CONNECTIONS_ACCEPTED, &[]),
                active: gauge(CONNECTIONS_ACTIVE),
                header_errors,
                rejected_max_connections: counter(
                    CONNECTIONS_REJECTED,
                    &[("reason", "max_connections")],
                ),
                rejected_source_pending_headers: counter(
                    CONNECTIONS_REJECTED,
                    &[("reason", "source_pending_headers")],
                ),
                rejected_source_rate: counter(CONNECTIONS_REJECTED, &[("reason", "source_rate")]),
                pending_headers: gauge(CONNECTIONS_PENDING_HEADERS),
                paused_max_connections: counter(ACCEPT_PAUSED, &[("reason", "max_connections")]),
                paused_pending_headers: counter(ACCEPT_PAUSED, &[("reason", "pending_headers")]),
                accept_fd_exhausted: counter(ACCEPT_ERRORS, &[("reason", "fd_exhausted")]),
                accept_other: counter(ACCEPT_ERRORS, &[("reason", "other")]),
                splice_fallbacks: counter(SPLICE_FALLBACKS, &[]),
                open_fds: gauge(OPEN_FDS),
                pipes_open: gauge(PIPES_OPEN),
                pipe_limit: gauge(PIPE_LIMIT),
                fd_limit: gauge(FD_LIMIT),
                generation: gauge(TABLE_GENERATION),
                fingerprint: gauge(TABLE_FINGERPRINT),
                panic: gauge(ROUTING_PANIC),
                reloads_ok: counter(CONFIG_RELOADS, &[("result", "ok")]),
                reloads_failed: counter(CONFIG_RELOADS, &[("result", "failed")]),
                admin_changes_ok: counter(ADMIN_CHANGES, &[("result", "ok")]),
                admin_changes_rejected: counter(ADMIN_CHANGES, &[("result", "rejected")]),
                owner_change_closed: counter(OWNER_CHANGE_CLOSED, &[]),
                upgrades: UpgradeResult::ALL.map(|r| counter(UPGRADES, &[("result", r.label())])),
                inherited: gauge(UPGRADE_INHERITED),
                handle,
                recorder,
            }),
        }
    }

    /// The Prometheus text exposition of every metric, with process gauges sampled now.
    pub fn render(&self) -> String {
        self.inner.pipes_open.set(crate::proxy::pipes_open() as f64);
        if let Some(limit) = Some(crate::proxy::pipe_limit()).filter(|l| *l != usize::MAX) {
            self.inner.pipe_limit.set(limit as f64);
        }
        if let Some(n) = count_open_fds() {
            self.inner.open_fds.set(n as f64);
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            self.inner.fd_limit.set(soft as f64);
        }
        self.upkeep();
        self.inner.handle.render()
    }

    /// Folds recorded histogram samples into their buckets. Samples pile up until this runs,
    /// so it must run periodically even when nobody scrapes (see [`run_upkeep`]).
    pub fn upkeep(&self) {
        self.inner.handle.run_upkeep();
    }

    /// Counts an accepted client connection (admitted or not).
    pub fn accepted(&self) {
        self.inner.accepted.increment(1);
    }

    /// Marks a client connection active until the returned guard drops.
    pub fn active_connection(&self) -> ActiveGuard {
        ActiveGuard::new(self.inner.active.clone())
    }

    /// Counts a header error.
    pub fn header_error(&self, e: HeaderError) {
        self.inner.header_errors[e.index()].increment(1);
    }

    /// Counts a connection closed because `max_connections` was reached. The proxy no longer
    /// does that (it stops accepting instead); the sample stays for existing dashboards.
    pub fn rejected_max_connections(&self) {
        self.inner.rejected_max_connections.increment(1);
    }

    /// Counts a connection closed at once because its source had too many in the header phase.
    pub fn rejected_source_pending_headers(&self) {
        self.inner.rejected_source_pending_headers.increment(1);
    }

    /// Counts a connection reset at once because its source was over its connection rate
    /// (`source_rate`).
    pub fn rejected_source_rate(&self) {
        self.inner.rejected_source_rate.increment(1);
    }

    /// A connection entered the header phase.
    pub fn pending_header_started(&self) {
        self.inner.pending_headers.increment(1.0);
    }

    /// A connection left the header phase.
    pub fn pending_header_ended(&self) {
        self.inner.pending_headers.decrement(1.0);
    }

    /// Counts an accept loop pausing for a free slot: `max_connections` (a connection slot)
    /// or, when `false`, the header-phase budget.
    pub fn accept_paused(&self, max_connections: bool) {
        if max_connections {
            self.inner.paused_max_connections.increment(1);
        } else {
            self.inner.paused_pending_headers.increment(1);
        }
    }

    /// Counts an accept failure.
    pub fn accept_error(&self, fd_exhausted: bool) {
        if fd_exhausted {
            self.inner.accept_fd_exhausted.increment(1);
        } else {
            self.inner.accept_other.increment(1);
        }
    }

    /// Counts a buffered-copy fallback.
    pub fn splice_fallback(&self) {
        self.inner.splice_fallbacks.increment(1);
    }

    /// The splice-fallback counter, for a forwarder to bump.
    pub fn splice_fallbacks(&self) -> &Counter {
        &self.inner.splice_fallbacks
    }

    /// Counts a connection that ended in an error: one of [`ConnError::REASONS`], all
    /// registered at start (no registry lookup on the connection path).
    pub fn connection_error(&self, reason: &'static str) {
        if let Some(i) = ConnError::REASONS.iter().position(|r| *r == reason) {
            self.inner.connection_errors[i].increment(1);
        }
    }

    /// Publishes the routing table's generation and fingerprint.
    pub fn set_table(&self, generation: u64, fingerprint: u64) {
        self.inner.generation.set(generation as f64);
        self.inner
            .fingerprint
            .set((fingerprint & ((1 << 52) - 1)) as f64);
    }

    /// Sets the panic gauge.
    pub fn set_panic(&self, panic: bool) {
        self.inner.panic.set(if panic { 1.0 } else { 0.0 });
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        if ok {
            self.inner.reloads_ok.increment(1);
        } else {
            self.inner.reloads_failed.increment(1);
        }
    }

    /// Counts an admin membership change, applied or rejected.
    pub fn admin_change(&self, ok: bool) {
        if ok {
            self.inner.admin_changes_ok.increment(1);
        } else {
            self.inner.admin_changes_rejected.increment(1);
        }
    }

    /// Counts a connection reset by the owner-change policy.
    pub fn owner_change_closed(&self) {
        self.inner.owner_change_closed.increment(1);
    }

    /// Counts a listener hand-over attempt by its `result`.
    pub fn upgrade(&self, result: UpgradeResult) {
        let i = UpgradeResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        if let Some(c) = self.inner.upgrades.get(i) {
            c.increment(1);
        }
    }

    /// Publishes how many listening sockets this process inherited from its predecessor.
    pub fn set_inherited_listeners(&self, n: usize) {
        self.inner.inherited.set(n as f64);
    }

    /// Registers the admin connection counter for one `result`.
    pub(crate) fn admin_connections(&self, result: &'static str) -> Counter {
        self.inner
            .recorder
            .register_counter(&key(ADMIN_CONNECTIONS, &[("result", result)]), &METADATA)
    }

    /// Registers the etcd membership handles (only a proxy with `--membership` shows them).
    pub fn membership(&self) -> MembershipMetrics {
        let r = &self.inner.recorder;
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            r.register_counter(&key(name, labels), &METADATA)
        };
        MembershipMetrics {
            connected: r.register_gauge(&key(MEMBERSHIP_CONNECTED, &[]), &METADATA),
            revision: r.register_gauge(&key(MEMBERSHIP_REVISION, &[]), &METADATA),
            applied: counter(MEMBERSHIP_UPDATES, &[("result", "applied")]),
            rejected: counter(MEMBERSHIP_UPDATES, &[("result", "rejected")]),
            invalid_values: counter(MEMBERSHIP_INVALID_VALUES, &[]),
            reconnects: counter(MEMBERSHIP_RECONNECTS, &[]),
        }
    }

    /// Registers the DSR handles (only a proxy with `--dsr` shows them).
    pub fn dsr(&self) -> DsrMetrics {
        let r = &self.inner.recorder;
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            r.register_counter(&key(name, labels), &METADATA)
        };
        DsrMetrics {
            handoffs: Arc::new(
                crate::dsr::handoff::HandoffResult::ALL
                    .map(|res| counter(DSR_HANDOFFS, &[("result", res.label())])),
            ),
            seconds: r.register_histogram(&key(DSR_HANDOFF_SECONDS, &[]), &METADATA),
            active: r.register_gauge(&key(DSR_FLOWS_ACTIVE, &[]), &METADATA),
            closed: counter(DSR_FLOWS_ENDED, &[("reason", "closed")]),
            expired: counter(DSR_FLOWS_ENDED, &[("reason", "expired")]),
            gone: counter(DSR_FLOWS_ENDED, &[("reason", "gone")]),
            from_client: counter(DSR_BYTES, &[("direction", "client_to_backend")]),
            to_client: counter(DSR_BYTES, &[("direction", "backend_to_client")]),
        }
    }

    /// Registers the handles for one backend.
    pub fn backend(&self, name: &str) -> BackendMetrics {
        let label = |extra: &[(&'static str, &'static str)]| {
            let mut labels = vec![Label::new("backend", name.to_string())];
            labels.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            labels
        };
        let r = &self.inner.recorder;
        let counter = |metric: &'static str, extra: &[(&'static str, &'static str)]| {
            r.register_counter(&Key::from_parts(metric, label(extra)), &METADATA)
        };
        BackendMetrics {
            connections: counter(BACKEND_CONNECTIONS, &[]),
            active: r.register_gauge(&Key::from_parts(BACKEND_ACTIVE, label(&[])), &METADATA),
            refused: counter(BACKEND_CONNECT_FAILURES, &[("reason", "refused")]),
            timeout: counter(BACKEND_CONNECT_FAILURES, &[("reason", "timeout")]),
            other: counter(BACKEND_CONNECT_FAILURES, &[("reason", "other")]),
            failovers: counter(FAILOVERS, &[]),
            bytes_to_backend: counter(BACKEND_BYTES, &[("direction", "client_to_backend")]),
            bytes_to_client: counter(BACKEND_BYTES, &[("direction", "backend_to_client")]),
            connect_seconds: r.register_histogram(
                &Key::from_parts(BACKEND_CONNECT_SECONDS, label(&[])),
                &METADATA,
            ),
            up: r.register_gauge(&Key::from_parts(BACKEND_UP, label(&[])), &METADATA),
            configured: r
                .register_gauge(&Key::from_parts(BACKEND_CONFIGURED, label(&[])), &METADATA),
            went_up: counter(BACKEND_TRANSITIONS, &[("to", "up")]),
            went_down: counter(BACKEND_TRANSITIONS, &[("to", "down")]),
            ejections: counter(BACKEND_EJECTIONS, &[]),
            checks_ok: counter(HEALTH_CHECKS, &[("result", "ok")]),
            checks_failed: counter(HEALTH_CHECKS, &[("result", "failed")]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-backend handles, registered when the backend joins the table.
#[derive(Clone)]
pub struct BackendMetrics {
    /// Connections established.
    pub connections: Counter,
    /// Connections open now.
    pub active: Gauge,
    /// Connect attempts refused.
    pub refused: Counter,
    /// Connect attempts that timed out.
    pub timeout: Counter,
    /// Connect attempts that failed otherwise.
    pub other: Counter,
    /// Keys moved off this backend to a later choice.
    pub failovers: Counter,
    /// Bytes client → backend.
    pub bytes_to_backend: Counter,
    /// Bytes backend → client.
    pub bytes_to_client: Counter,
    /// Connect latency.
    pub connect_seconds: Histogram,
    /// 1 up, 0 down.
    pub up: Gauge,
    /// 1 in the membership, 0 removed.
    pub configured: Gauge,
    /// Transitions to up.
    pub went_up: Counter,
    /// Transitions to down.
    pub went_down: Counter,
    /// Passive ejections.
    pub ejections: Counter,
    /// Probes that passed.
    pub checks_ok: Counter,
    /// Probes that failed.
    pub checks_failed: Counter,
}

/// The etcd membership handles ([`Metrics::membership`]).
#[derive(Clone)]
pub struct MembershipMetrics {
    /// [`MEMBERSHIP_CONNECTED`].
    pub connected: Gauge,
    /// [`MEMBERSHIP_REVISION`].
    pub revision: Gauge,
    /// [`MEMBERSHIP_UPDATES`] `{result="applied"}`.
    pub applied: Counter,
    /// [`MEMBERSHIP_UPDATES`] `{result="rejected"}`.
    pub rejected: Counter,
    /// [`MEMBERSHIP_INVALID_VALUES`].
    pub invalid_values: Counter,
    /// [`MEMBERSHIP_RECONNECTS`].
    pub reconnects: Counter,
}

/// The DSR handles ([`Metrics::dsr`]).
#[derive(Clone)]
pub struct DsrMetrics {
    handoffs: Arc<[Counter; crate::dsr::handoff::HandoffResult::ALL.len()]>,
    seconds: Histogram,
    active: Gauge,
    closed: Counter,
    expired: Counter,
    gone: Counter,
    from_client: Counter,
    to_client: Counter,
}

impl DsrMetrics {
    /// Counts a hand-off by its result.
    pub fn handoff(&self, result: crate::dsr::handoff::HandoffResult) {
        let i = crate::dsr::handoff::HandoffResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.handoffs[i].increment(1);
    }

    /// Records a successful hand-off's freeze-to-steer time.
    pub fn handoff_duration(&self, took: std::time::Duration) {
        self.seconds.record(took.as_secs_f64());
    }

    /// Sets the number of handed-off flows.
    pub fn set_active(&self, n: usize) {
        self.active.set(n as f64);
    }

    /// Counts a flow its agent reported closed, with its bytes.
    pub fn flow_closed(&self, from_client: u64, to_client: u64) {
        self.closed.increment(1);
        self.from_client.increment(from_client);
        self.to_client.increment(to_client);
    }

    /// Counts a flow forgotten after its agent stayed away for the flow timeout.
    pub fn flow_expired(&self) {
        self.expired.increment(1);
    }

    /// Counts a flow forgotten because its agent no longer held it when asked.
    pub fn flow_gone(&self) {
        self.gone.increment(1);
    }
}

/// Why a backend connect attempt failed (the `reason` label of
/// [`BACKEND_CONNECT_FAILURES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The backend refused the connection.
    Refused,
    /// The attempt ran out of its connect timeout.
    Timeout,
    /// The handshake or the first write failed otherwise (reset, unreachable).
    Other,
}

impl BackendMetrics {
    /// Counts an established connection and its connect latency.
    pub fn connected(&self, took: std::time::Duration) {
        self.connect_seconds.record(took.as_secs_f64());
        self.connections.increment(1);
    }

    /// Counts a failed connect attempt.
    pub fn connect_failed(&self, why: ConnectFailure) {
        match why {
            ConnectFailure::Refused => &self.refused,
            ConnectFailure::Timeout => &self.timeout,
            ConnectFailure::Other => &self.other,
        }
        .increment(1);
    }
}

/// Decrements a gauge when dropped: an "active" count that cannot leak on any exit path.
pub struct ActiveGuard(Gauge);

impl ActiveGuard {
    /// Increments `gauge` now and decrements it on drop.
    pub fn new(gauge: Gauge) -> Self {
        gauge.increment(1.0);
        ActiveGuard(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How often [`run_upkeep`] folds histogram samples (the exporter's own default).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs [`Metrics::upkeep`] every [`UPKEEP_INTERVAL`] until `stop` is cancelled, so
/// histogram samples cannot accumulate without bound on a proxy nobody scrapes.
pub async fn run_upkeep(metrics: Metrics, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => metrics.upkeep(),
        }
    }
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

fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, help: &'static str| {
        (
            SharedString::const_str(name),
            unit,
            SharedString::const_str(help),
        )
    };
    let counters = [
        d(CONNECTIONS_ACCEPTED, None, "Client connections accepted."),
        d(
            CONNECTIONS_REJECTED,
            None,
            "Client connections closed at once because a limit was reached.",
        ),
        d(
            ACCEPT_PAUSED,
            None,
            "Times accepting paused until a connection or header-phase slot freed.",
        ),
        d(
            CONNECTION_ERRORS,
            None,
            "Connections that ended in an error, by reason.",
        ),
        d(
            HEADER_ERRORS,
            None,
            "Malformed or late key headers; no backend was contacted.",
        ),
        d(
            ACCEPT_ERRORS,
            None,
            "accept() failures; fd exhaustion pauses accepting.",
        ),
        d(
            BACKEND_CONNECTIONS,
            None,
            "Connections established to a backend.",
        ),
        d(
            BACKEND_CONNECT_FAILURES,
            None,
            "Failed backend connect attempts.",
        ),
        d(
            BACKEND_BYTES,
            Some(Unit::Bytes),
            "Bytes forwarded, by direction.",
        ),
        d(
            FAILOVERS,
            None,
            "Keys sent to their next choice because this backend failed.",
        ),
        d(
            SPLICE_FALLBACKS,
            None,
            "Buffered-copy fallbacks taken because no pipe could be had.",
        ),
        d(
            ADMIN_CONNECTIONS,
            None,
            "Admin connections ended, by result (evicted, header_timeout, ...).",
        ),
        d(
            BACKEND_TRANSITIONS,
            None,
            "Backend health transitions, by the state entered.",
        ),
        d(
            BACKEND_EJECTIONS,
            None,
            "Backends ejected after consecutive client connect failures.",
        ),
        d(HEALTH_CHECKS, None, "Active health probes, by result."),
        d(
            CONFIG_RELOADS,
            None,
            "Config file reloads (SIGHUP), by result; a failed one keeps the old table.",
        ),
        d(
            ADMIN_CHANGES,
            None,
            "Membership changes through the admin API, by result.",
        ),
        d(
            OWNER_CHANGE_CLOSED,
            None,
            "Connections reset because their key changed owner (policy close).",
        ),
        d(
            UPGRADES,
            None,
            "Listener hand-overs to a successor process, by result (handed_over, refused, failed).",
        ),
        d(
            DSR_HANDOFFS,
            None,
            "DSR hand-offs, by result: ok, or why the connection was spliced instead.",
        ),
        d(
            DSR_FLOWS_ENDED,
            None,
            "Handed-off flows ended: closed (reported by the agent), gone (not held by the agent when asked) or expired.",
        ),
        d(
            DSR_BYTES,
            Some(Unit::Bytes),
            "Bytes of handed-off flows, as their agents reported at the close.",
        ),
        d(
            MEMBERSHIP_UPDATES,
            None,
            "Routing table swaps from etcd: applied, or rejected (the old table stays).",
        ),
        d(
            MEMBERSHIP_INVALID_VALUES,
            None,
            "etcd values that did not decode as a backend (logged, skipped).",
        ),
        d(
            MEMBERSHIP_RECONNECTS,
            None,
            "Reconnections to etcd, each followed by a fresh read of the prefix.",
        ),
    ];
    for (name, unit, help) in counters {
        r.describe_counter(name.into(), unit, help);
    }
    let gauges = [
        d(CONNECTIONS_ACTIVE, None, "Client connections open now."),
        d(
            CONNECTIONS_PENDING_HEADERS,
            None,
            "Client connections whose key header is not complete yet.",
        ),
        d(
            BACKEND_ACTIVE,
            None,
            "Proxied connections open now, per backend.",
        ),
        d(TABLE_GENERATION, None, "Routing table generation."),
        d(
            MEMBERSHIP_CONNECTED,
            None,
            "1 while the membership follows etcd, 0 while routing on the last table.",
        ),
        d(
            MEMBERSHIP_REVISION,
            None,
            "etcd store revision of the membership in force.",
        ),
        d(
            TABLE_FINGERPRINT,
            None,
            "Routing table fingerprint (low 52 bits).",
        ),
        d(OPEN_FDS, None, "File descriptors open in the process."),
        d(
            PIPES_OPEN,
            None,
            "Splice pipes open in the process, in use or pooled.",
        ),
        d(
            PIPE_LIMIT,
            None,
            "Splice pipes allowed at once (--max-pipes).",
        ),
        d(FD_LIMIT, None, "Soft limit on open file descriptors."),
        d(
            BACKEND_UP,
            None,
            "1 while the backend passes its health checks, 0 while down.",
        ),
        d(
            BACKEND_CONFIGURED,
            None,
            "1 while the backend is in the membership, 0 once removed.",
        ),
        d(
            ROUTING_PANIC,
            None,
            "1 while too many backends are down and health is ignored.",
        ),
        d(
            UPGRADE_INHERITED,
            None,
            "Listening sockets inherited from the predecessor at start (0: bound here).",
        ),
        d(
            DSR_FLOWS_ACTIVE,
            None,
            "Handed-off flows not yet reported closed.",
        ),
    ];
    for (name, unit, help) in gauges {
        r.describe_gauge(name.into(), unit, help);
    }
    r.describe_histogram(
        SharedString::const_str(BACKEND_CONNECT_SECONDS).into(),
        Some(Unit::Seconds),
        SharedString::const_str("Time to establish a backend connection."),
    );
    r.describe_histogram(
        SharedString::const_str(DSR_HANDOFF_SECONDS).into(),
        Some(Unit::Seconds),
        SharedString::const_str("Time from freezing a flow to steering it to its agent."),
    );
}

fn count_open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}
