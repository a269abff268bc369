//! The proxy's side of a hand-off (docs/design.md §6): freeze, dump, ship, steer — or fall
//! back — and the table of handed-off flows until their agents report them closed.
//!
//! [`Dsr::hand_off`] runs the sequence for one connection whose key header has been peeked:
//!
//! 1. the agent's link must be up (connecting if needed; a link in its retry pause fails at
//!    once), so nothing is frozen for an agent that cannot answer;
//! 2. freeze the socket (a drop-all socket filter: the client's packets are dropped before
//!    TCP sees them and retransmitted later, with no firewall transaction on this path), then
//!    dump it with `TCP_REPAIR` — it stays open, in repair mode;
//! 3. send the state (the key header removed from its receive queue if the header is
//!    stripped) and wait, at most the hand-off timeout, for `Imported`;
//! 4. steer the flow to the agent's host and unfreeze it, in one nftables transaction;
//!    then `Steered` to the agent, which only now gives the socket to the application.
//!
//! The proxy's socket is left in repair mode: the caller closes it, and the kernel sends
//! nothing. Any failure before step 4 completes takes the socket out of repair mode and
//! removes the filter, and the caller splices the connection as usual: the bytes the dump
//! peeked are still queued, and the client's packets dropped meanwhile are retransmitted.
//! A failure after `Imported` also sends `Abort`, so the agent drops its copy without a
//! word. Each outcome is counted in `shardproxy_dsr_handoffs_total{result}`.
//!
//! Flows: every handed-off flow is kept (client, agent) until its agent reports `Closed`;
//! then its steering entry and the proxy host's conntrack entry are removed. The flow holds
//! the connection's slot in its backend's `max_connections` (an [`ActiveSlot`], taken by the
//! caller before the hand-off), so a handed-off connection counts against the cap, and in
//! the backend's active-connections gauge, exactly until its flow is forgotten. Every third of
//! the flow timeout the proxy asks each agent whose link is up which of its flows it still
//! holds, renews those and forgets the others (a `Closed` lost with a broken control
//! connection); a flow whose agent stays away for a whole flow timeout expires (its entry by
//! nftables element timeout, its record here).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::control::{now_ms, Auth, Limits, Message, Role, Secret, MAX_IDS};
use super::link::{AgentLink, ClosedReport, LinkError};
use super::repair::{self, RepairError};
use super::steer::{table_name, SteerConfig, SteerError, Steering, MAX_BATCH};
use crate::config::DsrConfig;
use crate::metrics::DsrMetrics;
use crate::routing::ActiveSlot;

/// How a hand-off ended: `Ok` or the reason it fell back to splicing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffResult {
    /// Handed off: the agent's host now owns the connection.
    Ok,
    /// `nft` is not installed (steering never started).
    NftMissing,
    /// No CAP_NET_ADMIN: nftables or `TCP_REPAIR` refused.
    NoPermission,
    /// Steering failed to start for another reason, or an nftables update failed.
    SteeringFailed,
    /// The socket was not ESTABLISHED (e.g. the client already half-closed).
    NotEstablished,
    /// The kernel lacks `TCP_REPAIR` or an option of it.
    Unsupported,
    /// The socket's state was over a bound (a queue over 64 MiB).
    Invalid,
    /// Another system call failed while dumping.
    Io,
    /// The agent could not be reached.
    AgentUnreachable,
    /// The agent failed authentication (wrong secret?).
    AgentAuth,
    /// The agent did not answer in time.
    AgentTimeout,
    /// The agent answered `Failed`.
    AgentRefused,
    /// The control connection broke mid-hand-off.
    AgentLost,
    /// The control connection broke after the flow was steered: the agent's copy may have
    /// taken client bytes, so the connection can be neither handed off nor kept. It is
    /// reset (the one result that is not a fallback).
    LostAfterSteer,
}

impl HandoffResult {
    /// Every result, for registering the counters up front.
    pub const ALL: [HandoffResult; 14] = [
        HandoffResult::Ok,
        HandoffResult::NftMissing,
        HandoffResult::NoPermission,
        HandoffResult::SteeringFailed,
        HandoffResult::NotEstablished,
        HandoffResult::Unsupported,
        HandoffResult::Invalid,
        HandoffResult::Io,
        HandoffResult::AgentUnreachable,
        HandoffResult::AgentAuth,
        HandoffResult::AgentTimeout,
        HandoffResult::AgentRefused,
        HandoffResult::AgentLost,
        HandoffResult::LostAfterSteer,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            HandoffResult::Ok => "ok",
            HandoffResult::NftMissing => "nft_missing",
            HandoffResult::NoPermission => "no_permission",
            HandoffResult::SteeringFailed => "steering_failed",
            HandoffResult::NotEstablished => "not_established",
            HandoffResult::Unsupported => "unsupported",
            HandoffResult::Invalid => "invalid",
            HandoffResult::Io => "io",
            HandoffResult::AgentUnreachable => "agent_unreachable",
            HandoffResult::AgentAuth => "agent_auth",
            HandoffResult::AgentTimeout => "agent_timeout",
            HandoffResult::AgentRefused => "agent_refused",
            HandoffResult::AgentLost => "agent_lost",
            HandoffResult::LostAfterSteer => "lost_after_steer",
        }
    }

    fn of_repair(e: &RepairError) -> Self {
        use super::repair::FallbackReason as R;
        match e.reason() {
            R::NotEstablished => HandoffResult::NotEstablished,
            R::NoPermission => HandoffResult::NoPermission,
            R::Unsupported => HandoffResult::Unsupported,
            R::Invalid => HandoffResult::Invalid,
            R::Io => HandoffResult::Io,
        }
    }

    fn of_steer(e: &SteerError) -> Self {
        match e {
            SteerError::NftMissing { .. } => HandoffResult::NftMissing,
            SteerError::Permission { .. } => HandoffResult::NoPermission,
            _ => HandoffResult::SteeringFailed,
        }
    }

    fn of_link(e: &LinkError) -> Self {
        match e {
            LinkError::Unreachable(_) => HandoffResult::AgentUnreachable,
            LinkError::Auth(_) => HandoffResult::AgentAuth,
            LinkError::Timeout => HandoffResult::AgentTimeout,
            LinkError::Refused { .. } => HandoffResult::AgentRefused,
            LinkError::Lost(_) => HandoffResult::AgentLost,
        }
    }
}

/// Time an agent has to answer a flow query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handed-off flow, until its agent reports it closed.
#[derive(Debug)]
struct Flow {
    client: SocketAddrV4,
    agent: SocketAddr,
    /// Last time its steering entry was renewed (or set).
    renewed: Instant,
    /// Its place in the backend's `max_connections`, given back when the flow is forgotten
    /// (dropped with the record).
    _slot: ActiveSlot,
}

/// A flow [`Dsr::forget`] removed (its slot already given back).
#[derive(Debug, Clone, Copy)]
struct Forgotten {
    client: SocketAddrV4,
    agent: SocketAddr,
}

/// The proxy's DSR state: steering, agent links, handed-off flows.
pub struct Dsr {
    config: DsrConfig,
    vip: SocketAddrV4,
    /// The steering, or why it could not start (every hand-off then falls back with it).
    steering: Result<Steering, HandoffResult>,
    auth: Auth,
    links: Mutex<HashMap<SocketAddr, Arc<AgentLink>>>,
    flows: Mutex<HashMap<u64, Flow>>,
    next_id: AtomicU64,
    metrics: DsrMetrics,
    closed_tx: mpsc::UnboundedSender<ClosedReport>,
    /// The runtime the links run on (the proxy's main runtime, not a worker's).
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
}

impl Dsr {
    /// Starts DSR for the listener at `vip`: reads the secret, creates the nftables ruleset
    /// (a failure is logged and turns every hand-off into a counted fallback), and starts the
    /// flow upkeep. Must be called on the runtime that outlives the connections. The links
    /// and the upkeep run until [`Dsr::drain`] or the drop of the last reference.
    pub async fn start(
        config: DsrConfig,
        vip: SocketAddrV4,
        metrics: DsrMetrics,
    ) -> Result<Arc<Dsr>, crate::dsr::control::ControlError> {
        let stop = CancellationToken::new();
        let secret = Secret::from_file(&config.secret_file)?;
        let auth = Auth::new(&secret, Role::Proxy, Limits::default());
        let table = table_name(&format!("{}_{}", vip.ip(), vip.port()));
        let mut steer = SteerConfig::new(table, config.device.clone(), vip);
        // Renewed every third of it while the agent is up.
        steer.flow_timeout = config.flow_timeout;
        let steering = match Steering::start_with(steer).await {
            Ok(s) => {
                info!(table = s.table(), device = %config.device, "DSR steering ready");
                Ok(s)
            }
            Err(e) => {
                let why = HandoffResult::of_steer(&e);
                warn!(error = %e, reason = why.label(), "DSR steering unavailable: every connection will be spliced");
                Err(why)
            }
        };
        Ok(Self::with_steering(
            config, vip, steering, auth, metrics, stop,
        ))
    }

    /// The [`Dsr`] around a steering that started (or why it did not), with its upkeep
    /// spawned on the current runtime.
    fn with_steering(
        config: DsrConfig,
        vip: SocketAddrV4,
        steering: Result<Steering, HandoffResult>,
        auth: Auth,
        metrics: DsrMetrics,
        stop: CancellationToken,
    ) -> Arc<Dsr> {
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        let dsr = Arc::new(Dsr {
            config,
            vip,
            steering,
            auth,
            links: Mutex::new(HashMap::new()),
            flows: Mutex::new(HashMap::new()),
            // Ids differ across restarts, which keeps logs of both runs apart.
            next_id: AtomicU64::new(now_ms() << 16),
            metrics,
            closed_tx,
            runtime: tokio::runtime::Handle::current(),
            stop: stop.clone(),
        });
        tokio::spawn(upkeep(Arc::downgrade(&dsr), closed_rx, stop));
        dsr
    }

    /// The settings in force.
    pub fn config(&self) -> &DsrConfig {
        &self.config
    }

    /// Handed-off flows not yet reported closed.
    pub fn active_flows(&self) -> usize {
        self.flows.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Hands `client` (its key header peeked, not read) to the agent at `agent`, which
    /// serves `backend`; `strip` header bytes are removed from what the application will
    /// read. `slot` is the connection's place in `backend`'s `max_connections`: on `Ok` the
    /// flow's record keeps it until the flow is forgotten (its agent reports it closed, the
    /// reconciliation finds it gone, or it expires); on `Err` it has been given back, so the
    /// spliced path can take its own. On `Ok` the socket is in repair mode and must be
    /// closed by the caller without further use; on `Err` it is back to normal, every byte
    /// still queued, and the caller splices it — except [`HandoffResult::LostAfterSteer`],
    /// where the caller closes it (a reset).
    pub async fn hand_off(
        &self,
        client: &TcpStream,
        agent: SocketAddr,
        backend: &str,
        strip: usize,
        slot: ActiveSlot,
    ) -> Result<(), HandoffResult> {
        let r = self.try_hand_off(client, agent, backend, strip, slot).await;
        self.metrics.handoff(r.err().unwrap_or(HandoffResult::Ok));
        r
    }

    async fn try_hand_off(
        &self,
        client: &TcpStream,
        agent: SocketAddr,
        backend: &str,
        strip: usize,
        slot: ActiveSlot,
    ) -> Result<(), HandoffResult> {
        let steering = self.steering.as_ref().map_err(|why| *why)?;
        let Ok(SocketAddr::V4(peer)) = client.peer_addr() else {
            return Err(HandoffResult::Io);
        };
        let IpAddr::V4(agent_host) = agent.ip() else {
            return Err(HandoffResult::AgentUnreachable);
        };
        let link = self.link(agent);
        link.ready().await.map_err(|e| {
            debug!(agent = %agent, error = %e, "DSR link not ready");
            HandoffResult::of_link(&e)
        })?;

        // Freeze: a drop-all socket filter (no firewall transaction on the hot path), then
        // the dump. From here on every failure thaws and unblocks.
        let started = Instant::now();
        repair::block_input(client).map_err(|e| HandoffResult::of_repair(&e))?;
        // Undoes the freeze; `repaired`: the socket is in repair mode too.
        let unfreeze = |why: HandoffResult, repaired: bool| {
            let thawed = if repaired {
                repair::thaw(client)
            } else {
                Ok(())
            };
            if let Err(e) = thawed.and_then(|()| repair::unblock_input(client)) {
                // The socket stays frozen: it can neither be handed off nor spliced. Reset
                // it so the client learns at once.
                warn!(client = %peer, error = %e, "cannot unfreeze a socket; resetting it");
                let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
            }
            why
        };
        let undo = |why: HandoffResult| unfreeze(why, true);
        let mut state = match repair::freeze_and_dump(client) {
            Ok(s) => s,
            Err(e) => {
                debug!(client = %peer, error = %e, "cannot dump the socket");
                // freeze_and_dump left the socket out of repair mode.
                return Err(unfreeze(HandoffResult::of_repair(&e), false));
            }
        };
        if strip > 0 {
            if let Err(e) = state.strip_front(strip) {
                return Err(undo(HandoffResult::of_repair(&e)));
            }
        }
        let encoded = match state.encode() {
            Ok(bytes) => bytes,
            Err(e) => return Err(undo(HandoffResult::of_repair(&e))),
        };
        drop(state);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = Message::Handoff {
            id,
            backend: backend.to_owned(),
            state: encoded,
            strip_header: strip > 0,
        };
        match timeout(self.config.handoff_timeout, link.handoff(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(client = %peer, agent = %agent, error = %e, "hand-off refused");
                return Err(undo(HandoffResult::of_link(&e)));
            }
            Err(_) => {
                // A late Imported is answered with Abort by the link.
                return Err(undo(HandoffResult::AgentTimeout));
            }
        }
        if let Err(e) = steering.steer(peer, agent_host).await {
            warn!(client = %peer, error = %e, "cannot steer a handed-off flow; keeping it");
            link.notify_later(Message::Abort { id });
            return Err(undo(HandoffResult::of_steer(&e)));
        }
        self.metrics.handoff_duration(started.elapsed());
        self.record(id, peer, agent, slot);
        if let Err(e) = link.notify(Message::Steered { id }).await {
            // Steered, but the agent will never hear it: it drops its copy after its own
            // timeout, and the client's next packet is answered with a reset. Not a silent
            // truncation, but a lost connection: say so.
            warn!(client = %peer, agent = %agent, error = %e, "hand-off lost after steering: resetting the connection");
            self.forget(id).await;
            // Out of repair mode, with SO_LINGER 0: the caller's close sends a reset.
            let _ = unfreeze(HandoffResult::LostAfterSteer, true);
            let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
            return Err(HandoffResult::LostAfterSteer);
        }
        debug!(client = %peer, agent = %agent, id, backend, "handed off");
        Ok(())
    }

    /// Records the handed-off flow `id`; its record holds `slot` until the flow is forgotten.
    fn record(&self, id: u64, client: SocketAddrV4, agent: SocketAddr, slot: ActiveSlot) {
        self.flows.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Flow {
                client,
                agent,
                renewed: Instant::now(),
                _slot: slot,
            },
        );
        self.metrics.set_active(self.active_flows());
    }

    /// The link to `agent`, started on first use.
    fn link(&self, agent: SocketAddr) -> Arc<AgentLink> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .entry(agent)
            .or_insert_with(|| {
                let _guard = self.runtime.enter();
                AgentLink::start(
                    agent,
                    self.auth.clone(),
                    self.config.handoff_timeout,
                    self.closed_tx.clone(),
                    self.stop.clone(),
                )
            })
            .clone()
    }

    /// Removes flow `id`'s record, steering entry and conntrack entry. The backend slot goes
    /// with the record, at once: the cap and `shardproxy_dsr_flows_active` move together.
    async fn forget(&self, id: u64) -> Option<Forgotten> {
        let removed = self
            .flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)?;
        let flow = Forgotten {
            client: removed.client,
            agent: removed.agent,
        };
        drop(removed); // gives the slot back
        self.metrics.set_active(self.active_flows());
        if let Ok(steering) = &self.steering {
            if let Err(e) = steering.remove(flow.client).await {
                warn!(client = %flow.client, error = %e, "cannot remove a flow's steering");
            }
            forget_conntrack(flow.client, self.vip).await;
        }
        Some(flow)
    }

    /// Handles a batch of `Closed` reports (removed together: their nftables updates join
    /// into one transaction).
    async fn on_closed(&self, reports: &[ClosedReport]) {
        let known = |r: &ClosedReport| {
            self.flows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&r.id)
                .is_some_and(|f| f.agent == r.agent)
        };
        let reports: Vec<&ClosedReport> = reports
            .iter()
            .filter(|r| {
                let k = known(r);
                if !k {
                    debug!(agent = %r.agent, id = r.id, "Closed for an unknown flow");
                }
                k
            })
            .collect();
        let forgotten = join_all(reports.iter().map(|r| self.forget(r.id))).await;
        for (r, flow) in reports.into_iter().zip(forgotten) {
            if let Some(flow) = flow {
                self.metrics
                    .flow_closed(r.bytes_from_client, r.bytes_to_client);
                debug!(client = %flow.client, agent = %flow.agent, from_client = r.bytes_from_client, to_client = r.bytes_to_client, "handed-off flow closed");
            }
        }
    }

    /// Reconciles the flow table with the agents, every third of the flow timeout: for each
    /// agent that has flows, (re)connects its link if needed, asks which of its flows it
    /// still holds (`Query`/`Alive`; the agent asks the kernel, so the answer survives an
    /// agent restart), renews those and forgets the rest (a `Closed` lost with a broken
    /// control connection cannot keep a flow steered forever). Flows of an agent that cannot
    /// be reached are left to expire: after a whole flow timeout without renewal they are
    /// forgotten here too.
    async fn renew(&self) {
        let Ok(steering) = &self.steering else {
            return;
        };
        let now = Instant::now();
        let timeout_all = self.config.flow_timeout;
        let mut by_agent: HashMap<SocketAddr, Vec<(u64, SocketAddrV4)>> = HashMap::new();
        for (id, f) in self.flows.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            by_agent.entry(f.agent).or_default().push((*id, f.client));
        }
        for (agent, flows) in by_agent {
            let link = self.link(agent);
            if link.ready().await.is_err() {
                // Unreachable: its flows expire once not renewed for a whole flow timeout.
                let stale: Vec<u64> = {
                    let table = self.flows.lock().unwrap_or_else(|p| p.into_inner());
                    flows
                        .iter()
                        .filter(|(id, _)| {
                            table
                                .get(id)
                                .is_some_and(|f| now.duration_since(f.renewed) >= timeout_all)
                        })
                        .map(|(id, _)| *id)
                        .collect()
                };
                for gone in join_all(stale.into_iter().map(|id| self.forget(id))).await {
                    if gone.is_some() {
                        self.metrics.flow_expired();
                    }
                }
                continue;
            }
            let mut alive = HashSet::new();
            let mut answered = true;
            for part in flows.chunks(MAX_IDS) {
                match timeout(QUERY_TIMEOUT, link.query(self.vip.port(), part.to_vec())).await {
                    Ok(Ok(ids)) => alive.extend(ids),
                    _ => {
                        answered = false;
                        break;
                    }
                }
            }
            if !answered {
                // Asked again next period; meanwhile the entries keep their timeout.
                debug!(agent = %agent, "no answer to a flow query");
                continue;
            }
            let (live, gone): (Vec<_>, Vec<_>) =
                flows.into_iter().partition(|(id, _)| alive.contains(id));
            let forgotten = join_all(gone.iter().map(|(id, _)| self.forget(*id))).await;
            for flow in forgotten.into_iter().flatten() {
                debug!(client = %flow.client, agent = %agent, "the agent no longer holds a flow: forgotten");
                self.metrics.flow_gone();
            }
            // Issued together, so the steering worker joins them into batches.
            let results = join_all(live.iter().map(|(_, c)| steering.refresh(*c))).await;
            let mut table = self.flows.lock().unwrap_or_else(|p| p.into_inner());
            for ((id, client), r) in live.into_iter().zip(results) {
                match r {
                    Ok(()) => {
                        if let Some(f) = table.get_mut(&id) {
                            f.renewed = now;
                        }
                    }
                    Err(e) => warn!(client = %client, error = %e, "cannot renew a flow's steering"),
                }
            }
        }
    }

    /// Waits until every handed-off flow is reported closed or `deadline` passes, then
    /// removes the steering ruleset. Returns the flows still open at the end (cut: their
    /// clients' packets reach this host again, which resets them).
    pub async fn drain(&self, deadline: Duration) -> usize {
        let end = Instant::now() + deadline;
        while self.active_flows() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.active_flows();
        self.stop.cancel();
        if let Ok(s) = &self.steering {
            if let Err(e) = s.shutdown().await {
                warn!(error = %e, "cannot remove the DSR steering table");
            }
        }
        left
    }
}

impl Drop for Dsr {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Deletes the proxy host's conntrack entry of a finished flow (it would otherwise linger
/// ESTABLISHED for days: the flow's later packets never reached this host's stack). No
/// entry (conntrack not loaded, or not tracking) is fine.
async fn forget_conntrack(client: SocketAddrV4, vip: SocketAddrV4) {
    let deleted =
        tokio::task::spawn_blocking(move || super::netlink::conntrack_delete(client, vip)).await;
    match deleted {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => debug!(client = %client, error = %e, "cannot delete a conntrack entry"),
        Err(e) => debug!(error = %e, "conntrack task failed"),
    }
}

/// The flow upkeep: `Closed` reports, renewal, expiry. Ends with `stop` or the [`Dsr`].
async fn upkeep(
    dsr: std::sync::Weak<Dsr>,
    mut closed: mpsc::UnboundedReceiver<ClosedReport>,
    stop: CancellationToken,
) {
    let period = match dsr.upgrade() {
        Some(d) => (d.config.flow_timeout / 3).max(Duration::from_millis(100)),
        None => return,
    };
    let mut renew = tokio::time::interval(period);
    renew.tick().await;
    loop {
        tokio::select! {
            r = closed.recv() => match (r, dsr.upgrade()) {
                (Some(first), Some(d)) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match closed.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    d.on_closed(&batch).await;
                }
                _ => return,
            },
            _ = renew.tick() => match dsr.upgrade() {
                Some(d) => d.renew().await,
                None => return,
            },
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
impl Dsr {
    /// A `Dsr` whose steering did not start (`why`): it touches no nftables and needs no
    /// root; every hand-off falls back with `why`. For unit tests of the flow table and of
    /// its callers.
    pub(crate) fn for_tests(why: HandoffResult, metrics: DsrMetrics) -> Arc<Dsr> {
        let secret = Secret::from_bytes(vec![7; 32]).expect("a 32-byte secret");
        Self::with_steering(
            DsrConfig::new("eth0", "/nonexistent"),
            SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 7000),
            Err(why),
            Auth::new(&secret, Role::Proxy, Limits::default()),
            metrics,
            CancellationToken::new(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routing::BackendState;

    const CAP: Option<usize> = Some(2);

    /// A backend's live state whose connection count moves `b1`'s gauge in `metrics`.
    fn backend(metrics: &Metrics) -> Arc<BackendState> {
        Arc::new(BackendState::new(metrics.backend("b1").active.clone()))
    }

    fn gauge(metrics: &Metrics) -> String {
        let text = metrics.render();
        let prefix = format!("{}{{backend=\"b1\"}} ", crate::metrics::BACKEND_ACTIVE);
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or("absent")
            .to_owned()
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..200 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// A handed-off flow counts in its backend's `max_connections` (and active gauge) from
    /// the hand-off until it is forgotten: by its agent's `Closed` (through the upkeep, as a
    /// link delivers it) or by `forget` (the reconciliation, a hand-off lost after steering).
    #[tokio::test]
    async fn a_flow_holds_its_backend_slot_until_it_is_forgotten() {
        let metrics = Metrics::new();
        let dsr = Dsr::for_tests(HandoffResult::NftMissing, metrics.dsr());
        let state = backend(&metrics);
        let agent: SocketAddr = "10.0.0.11:7100".parse().unwrap();
        for (id, port) in [(1, 40001), (2, 40002)] {
            let slot = state.try_reserve(CAP).expect("a free slot");
            let client = SocketAddrV4::new([10, 0, 0, 10].into(), port);
            dsr.record(id, client, agent, slot);
        }
        assert_eq!(dsr.active_flows(), 2);
        assert_eq!(state.active(), 2, "the flows hold no slot");
        assert_eq!(gauge(&metrics), "2");
        assert!(
            state.try_reserve(CAP).is_none(),
            "a backend whose cap is taken by handed-off flows took another connection"
        );

        // A Closed from another agent is not this flow's: nothing changes.
        let stranger = "10.0.0.12:7100".parse().unwrap();
        let report = |agent, id| ClosedReport {
            agent,
            id,
            bytes_from_client: 1,
            bytes_to_client: 2,
        };
        dsr.closed_tx.send(report(stranger, 1)).unwrap();
        dsr.closed_tx.send(report(agent, 1)).unwrap();
        eventually("the Closed flow to give its slot back", || {
            state.active() == 1
        })
        .await;
        assert_eq!(dsr.active_flows(), 1);
        assert_eq!(gauge(&metrics), "1");
        assert!(state.try_reserve(CAP).is_some(), "the freed slot");

        assert!(dsr.forget(2).await.is_some());
        assert_eq!((state.active(), dsr.active_flows()), (0, 0));
        assert_eq!(gauge(&metrics), "0");
        assert!(dsr.forget(2).await.is_none(), "forgotten twice");
        assert_eq!(state.active(), 0);
    }

    /// A hand-off that falls back gives its slot back before returning, so the spliced path
    /// can take one (a cap of 1 would otherwise fail it as `backend_full`).
    #[tokio::test]
    async fn a_failed_hand_off_gives_its_slot_back() {
        let metrics = Metrics::new();
        let dsr = Dsr::for_tests(HandoffResult::NftMissing, metrics.dsr());
        let state = backend(&metrics);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let slot = state.try_reserve(Some(1)).unwrap();
        let agent = "127.0.0.1:7100".parse().unwrap();
        let r = dsr.hand_off(&s, agent, "b1", 0, slot).await;
        assert_eq!(r, Err(HandoffResult::NftMissing));
        assert_eq!((state.active(), dsr.active_flows()), (0, 0));
        assert!(state.try_reserve(Some(1)).is_some());
    }
}
