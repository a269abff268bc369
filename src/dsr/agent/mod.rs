//! The DSR agent (`shardproxy agent`): runs on a backend host, rebuilds the connections
//! proxies hand to it, and gives them to the local application (docs/design.md §6).
//!
//! Per control connection (one per proxy, authenticated as in [`crate::dsr::control`]):
//! - `Ping` → `Pong` (the proxy's handshake and heartbeat);
//! - `Handoff` → decode the state, check it is for this agent's VIP, make sure the
//!   application can take a connection (`--forward`: connect to it; `--handoff-socket`:
//!   connect to its Unix socket), rebuild the socket ([`crate::dsr::repair::rebuild`]) and
//!   answer `Imported`, or `Failed` with the errno and what failed;
//! - `Steered` → the flow's packets now reach this host: give the socket to the application
//!   (only now may it see a byte) and watch it until it ends, then report `Closed`;
//! - `Abort`, no `Steered` within `--steer-timeout`, or the control connection closing first
//!   → discard the rebuilt socket in repair mode, so the client is sent nothing (the proxy
//!   kept or will keep the connection);
//! - `Query` → `Alive` with those of the ids that this agent still holds for that proxy
//!   (by its address: a reconnected proxy finds the flows of its earlier connections).
//!
//! Any frame that fails authentication or decoding, a message only an agent sends, or a
//! connection silent for [`CONTROL_IDLE`] closes that control connection (counted by reason)
//! and nothing else: hand-offs it announced but never steered are discarded; flows already
//! delivered live on.
//!
//! Delivery (`deliver.rs`): `--forward HOST:PORT` relays the rebuilt socket to an unmodified
//! application with the proxy's own forwarding engine (splice); `--handoff-socket PATH` passes
//! the socket itself over a Unix socket (SCM_RIGHTS, [`crate::dsr::fdpass`]) and keeps no
//! copy, so the agent learns the connection ended by asking the kernel (sock_diag,
//! [`crate::dsr::netlink`]) every [`WATCH_INTERVAL`].

mod deliver;
pub mod metrics;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::deliver::{Delivery, Imported};
use self::metrics::{AgentMetrics, AgentResult};
use super::control::{read_message, write_message, Auth, Limits, Message, Role, Secret};
use super::netlink::SockDiag;
use crate::metrics::ActiveGuard;

/// A control connection silent this long is closed (proxies ping every 5 s).
pub const CONTROL_IDLE: Duration = Duration::from_secs(30);
/// How often the agent asks the kernel which `--handoff-socket` connections still live.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Default time a rebuilt socket waits for `Steered` before it is discarded.
pub const DEFAULT_STEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on control connections served at once.
pub const DEFAULT_MAX_CONTROL_CONNECTIONS: usize = 64;

/// Where rebuilt connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Relay to an unmodified application at this address (`--forward`).
    Forward(SocketAddr),
    /// Pass the socket over the Unix stream socket at this path (`--handoff-socket`).
    HandoffSocket(PathBuf),
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Control listener (`--control`).
    pub control: SocketAddr,
    /// The virtual IP (on this host's `lo`); only states bound to it are rebuilt.
    pub vip: Ipv4Addr,
    /// Shared secret file (`--secret-file`).
    pub secret_file: PathBuf,
    /// Where rebuilt connections go.
    pub target: Target,
    /// Admin/metrics listener (`--admin`).
    pub admin: Option<SocketAddr>,
    /// Time a rebuilt socket waits for `Steered`.
    pub steer_timeout: Duration,
    /// Control connections served at once.
    pub max_control_connections: usize,
}

impl AgentConfig {
    /// Settings with the defaults.
    pub fn new(
        control: SocketAddr,
        vip: Ipv4Addr,
        secret_file: impl Into<PathBuf>,
        target: Target,
    ) -> Self {
        AgentConfig {
            control,
            vip,
            secret_file: secret_file.into(),
            target,
            admin: None,
            steer_timeout: DEFAULT_STEER_TIMEOUT,
            max_control_connections: DEFAULT_MAX_CONTROL_CONNECTIONS,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The secret file is missing, unreadable or too short.
    #[error("--secret-file: {0}")]
    Secret(#[source] super::control::ControlError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// A running agent.
pub struct AgentHandle {
    control_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    metrics: AgentMetrics,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// The bound control address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The bound admin address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// Stops accepting control connections and closes them. Delivered flows are left to the
    /// application (`--handoff-socket`) or cut (`--forward`, the relay ends with the agent).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What every control connection of one agent shares.
struct Ctx {
    config: AgentConfig,
    auth: Auth,
    metrics: AgentMetrics,
    delivery: Delivery,
    /// Every hand-off this agent holds (rebuilt, then delivered, until it ends), by the
    /// proxy's address and its id: what a `Query` is answered from. A proxy that reconnects
    /// (from the same address) finds its flows here.
    held: Mutex<HashSet<(IpAddr, u64)>>,
}

impl Ctx {
    fn hold(&self, proxy: IpAddr, id: u64, held: bool) {
        let mut set = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            set.insert((proxy, id));
        } else {
            set.remove(&(proxy, id));
        }
    }
}

/// Starts the agent on the current runtime.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    if config.steer_timeout.is_zero() {
        return Err(AgentError::Invalid(
            "--steer-timeout must be greater than zero".into(),
        ));
    }
    if config.max_control_connections == 0 {
        return Err(AgentError::Invalid(
            "--max-control-connections must be at least 1".into(),
        ));
    }
    let secret = Secret::from_file(&config.secret_file).map_err(AgentError::Secret)?;
    let auth = Auth::new(&secret, Role::Agent, Limits::default());
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Bind { addr, source })
    };
    let listener = bind(config.control).await?;
    let control_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: config.control,
        source,
    })?;
    let admin = match config.admin {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let metrics = AgentMetrics::new();
    let stop = CancellationToken::new();
    let delivery = Delivery::start(&config.target, metrics.clone(), stop.clone());
    info!(control = %control_addr, vip = %config.vip, target = ?config.target, "DSR agent listening");
    let ctx = Arc::new(Ctx {
        auth,
        metrics: metrics.clone(),
        delivery,
        config,
        held: Mutex::new(HashSet::new()),
    });
    let mut tasks = vec![tokio::spawn(accept_loop(listener, ctx, stop.clone()))];
    if let Some(l) = admin {
        tasks.push(tokio::spawn(crate::admin::run_admin(
            l,
            metrics.clone(),
            crate::config::DEFAULT_ADMIN_HEADER_TIMEOUT,
            stop.clone(),
            axum::Router::new(),
        )));
    }
    Ok(AgentHandle {
        control_addr,
        admin_addr,
        metrics,
        stop,
        tasks,
    })
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(ctx.config.max_control_connections));
    let tracker = TaskTracker::new();
    loop {
        // At the cap, wait for a slot: new proxies queue in the backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let _open = ActiveGuard::new(ctx.metrics.control_connections());
            tokio::select! {
                () = serve_control(stream, peer, &ctx) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Rebuilt sockets of one control connection waiting for `Steered`.
type Pending = Arc<Mutex<HashMap<u64, Imported>>>;

async fn serve_control(stream: TcpStream, peer: SocketAddr, ctx: &Arc<Ctx>) {
    let (mut reader, mut writer) = stream.into_split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let auth = ctx.auth.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if let Err(e) = write_message(&mut writer, &auth, &msg).await {
                debug!(error = %e, "control write failed");
                return;
            }
        }
    });
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let ended = loop {
        let msg = match tokio::time::timeout(CONTROL_IDLE, read_message(&mut reader, &ctx.auth))
            .await
        {
            Err(_) => break "idle",
            Ok(Err(e)) => {
                if !matches!(e, super::control::ControlError::Closed) {
                    ctx.metrics.control_error(&e);
                    warn!(%peer, reason = e.reason(), error = %e, "closing a control connection");
                }
                break e.reason();
            }
            Ok(Ok(m)) => m,
        };
        match msg {
            Message::Ping => {
                let _ = out.send(Message::Pong);
            }
            Message::Pong => {}
            Message::Handoff { id, state, .. } => {
                let (ctx, out, pending) = (ctx.clone(), out.clone(), pending.clone());
                tokio::spawn(async move { import(ctx, peer.ip(), id, state, out, pending).await });
            }
            Message::Query { port, flows } => {
                let (ctx, out) = (ctx.clone(), out.clone());
                tokio::spawn(async move {
                    let ids = still_held(&ctx, peer.ip(), port, flows).await;
                    let _ = out.send(Message::Alive { ids });
                });
            }
            Message::Steered { id } => {
                let taken = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                match taken {
                    Some(imported) => {
                        let (ctx, out) = (ctx.clone(), out.clone());
                        tokio::spawn(async move {
                            let report = ctx.delivery.deliver(imported).await;
                            ctx.hold(peer.ip(), id, false);
                            if let Some((from, to)) = report {
                                let _ = out.send(Message::Closed {
                                    id,
                                    bytes_from_client: from,
                                    bytes_to_client: to,
                                });
                            }
                        });
                    }
                    None => debug!(%peer, id, "Steered for no pending hand-off"),
                }
            }
            Message::Abort { id } => {
                let taken = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(imported) = taken {
                    imported.discard();
                    ctx.hold(peer.ip(), id, false);
                    ctx.metrics.result(AgentResult::Aborted);
                }
            }
            other => {
                ctx.metrics.control_error_label("protocol");
                warn!(%peer, message = ?other, "closing a control connection: a proxy never sends this");
                break "protocol";
            }
        }
    };
    if ended == "idle" {
        ctx.metrics.control_error_label("idle");
    }
    // Hand-offs announced on this connection and never steered: the proxy that asked is
    // gone or will keep the connection, so nothing may reach the client from here.
    let left: Vec<(u64, Imported)> = pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (id, imported) in left {
        imported.discard();
        ctx.hold(peer.ip(), id, false);
        ctx.metrics.result(AgentResult::Aborted);
    }
    // The connection closes now; reports of flows delivered over it are lost with it (their
    // steering entries expire at the proxy).
    drop(out);
    writer_task.abort();
}

/// The ids among `flows` this agent still holds for `proxy`: rebuilt and waiting for
/// `Steered`, or a connection at VIP:`port` ↔ client that the kernel still has (not in
/// TIME_WAIT) — asked of the kernel, so the answer survives an agent restart (the
/// application keeps `--handoff-socket` connections).
async fn still_held(
    ctx: &Ctx,
    proxy: IpAddr,
    port: u16,
    flows: Vec<(u64, SocketAddrV4)>,
) -> Vec<u64> {
    let (held, unknown): (Vec<_>, Vec<_>) = {
        let held = ctx.held.lock().unwrap_or_else(|p| p.into_inner());
        flows
            .into_iter()
            .partition(|(id, _)| held.contains(&(proxy, *id)))
    };
    let mut ids: Vec<u64> = held.into_iter().map(|(id, _)| id).collect();
    if unknown.is_empty() {
        return ids;
    }
    let local = SocketAddrV4::new(ctx.config.vip, port);
    let asked: Vec<u64> = unknown.iter().map(|(id, _)| *id).collect();
    let live = tokio::task::spawn_blocking(move || {
        let mut diag = SockDiag::open()?;
        let live = diag.sockets_at(local)?;
        Ok::<_, std::io::Error>(
            unknown
                .into_iter()
                .filter(|(_, client)| live.contains_key(client))
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
        )
    })
    .await;
    match live {
        Ok(Ok(more)) => ids.extend(more),
        // Without the kernel's answer, claim them alive: a wrong "gone" would cut live
        // connections, a wrong "alive" keeps a steering entry one period longer.
        other => {
            if let Ok(Err(e)) = other {
                warn!(error = %e, "sock_diag failed while answering a flow query");
            }
            ids.extend(asked);
        }
    }
    ids
}

/// Rebuilds one handed-off connection and answers; on success it waits in `pending` for
/// `Steered` (discarded after the steer timeout).
async fn import(
    ctx: Arc<Ctx>,
    proxy: IpAddr,
    id: u64,
    state: Vec<u8>,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
) {
    match ctx.delivery.import(&state, ctx.config.vip).await {
        Ok(imported) => {
            ctx.hold(proxy, id, true);
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, imported);
            ctx.metrics.result(AgentResult::Imported);
            if out.send(Message::Imported { id }).is_err() {
                // The control connection closed while we rebuilt: nobody will steer it.
                let orphan = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(imported) = orphan {
                    imported.discard();
                    ctx.hold(proxy, id, false);
                    ctx.metrics.result(AgentResult::Aborted);
                }
                return;
            }
            tokio::time::sleep(ctx.config.steer_timeout).await;
            let stale = pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Some(imported) = stale {
                warn!(id, "no Steered in time: discarding the rebuilt socket");
                imported.discard();
                ctx.hold(proxy, id, false);
                ctx.metrics.result(AgentResult::Unsteered);
            }
        }
        Err(failure) => {
            debug!(id, errno = failure.errno, reason = %failure.reason, "hand-off failed");
            ctx.metrics.result(AgentResult::Failed);
            let _ = out.send(Message::Failed {
                id,
                errno: failure.errno,
                reason: failure.reason,
            });
        }
    }
}
