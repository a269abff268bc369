//! The agent's two ways to give a rebuilt connection to the application, and how it learns
//! each connection's end.
//!
//! - `--forward HOST:PORT`: before answering `Imported` the agent connects to the application
//!   (so an application that is down fails the hand-off, and the proxy splices the client to
//!   another backend as usual); after `Steered` it relays both ways with the proxy's own
//!   forwarding engine (splice, half-close and resets as in the proxy), and the relay's end is
//!   the connection's end.
//! - `--handoff-socket PATH`: before `Imported` the agent makes sure its Unix connection to
//!   the application is up; after `Steered` it passes the socket (SCM_RIGHTS) and closes its
//!   own fd, so the application's close really closes the connection. The agent then asks the
//!   kernel every [`super::WATCH_INTERVAL`] which sockets bound to the VIP still exist
//!   (sock_diag, one dump per VIP address for all flows); a flow gone from the dump, or only in
//!   TIME_WAIT, has ended, with the byte counts of its last sighting.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::{AgentMetrics, AgentResult};
use super::{Target, WATCH_INTERVAL};
use crate::dsr::fdpass::HandoffSender;
use crate::dsr::netlink::SockDiag;
use crate::dsr::repair::{self, TcpState};
use crate::metrics::ActiveGuard;
use crate::proxy::sockopt::{set_reset_on_close, set_stream_options};
use crate::proxy::{open_backend, Activity, Forward, ForwardOptions, OpenError};

/// Time the agent gives the application to accept a connection (`--forward`) or to take a
/// passed one (`--handoff-socket`).
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an import failed: what the agent answers in `Failed`.
#[derive(Debug)]
pub(super) struct Failure {
    pub errno: i32,
    pub reason: String,
}

/// A rebuilt socket waiting for `Steered`.
///
/// Dropped without [`Imported::take`] — discarded, timed out, or lost on any path — it is
/// closed in repair mode: the kernel sends the client nothing. A plain close would send a
/// FIN with valid sequence numbers, and the client would take it for the end of a
/// connection that the proxy kept.
pub(super) struct Imported {
    socket: Option<std::net::TcpStream>,
    /// `--forward`: the connection to the application, opened before `Imported`.
    app: Option<TcpStream>,
}

impl Imported {
    /// Drops the hand-off without a word to the client (what dropping it does too).
    pub fn discard(self) {
        drop(self);
    }

    /// The socket and the application connection, for delivery.
    fn take(mut self) -> (Option<std::net::TcpStream>, Option<TcpStream>) {
        (self.socket.take(), self.app.take())
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            repair::discard(socket);
            if let Some(app) = self.app.take() {
                // The application saw a connection and no byte: a reset says it was not a
                // client's clean close.
                set_reset_on_close(&app);
            }
        }
    }
}

/// How this agent delivers.
pub(super) enum Delivery {
    Forward {
        addr: SocketAddr,
        metrics: AgentMetrics,
        stop: CancellationToken,
    },
    Handoff {
        sender: AsyncMutex<HandoffSender>,
        watch: mpsc::UnboundedSender<Watch>,
        metrics: AgentMetrics,
    },
}

/// A flow passed to the application, to be watched until it ends.
pub(super) struct Watch {
    local: SocketAddrV4,
    peer: SocketAddrV4,
    done: oneshot::Sender<(u64, u64)>,
}

impl Delivery {
    /// Sets up delivery to `target` (the watcher task for `--handoff-socket`).
    pub fn start(target: &Target, metrics: AgentMetrics, stop: CancellationToken) -> Delivery {
        match target {
            Target::Forward(addr) => Delivery::Forward {
                addr: *addr,
                metrics,
                stop,
            },
            Target::HandoffSocket(path) => {
                let (watch, rx) = mpsc::unbounded_channel();
                tokio::spawn(watch_flows(rx, metrics.clone(), stop));
                Delivery::Handoff {
                    sender: AsyncMutex::new(HandoffSender::new(path.clone())),
                    watch,
                    metrics,
                }
            }
        }
    }

    /// Decodes `state`, checks it, makes sure the application can take it, and rebuilds the
    /// socket (out of repair mode, but no byte goes to the client until the application
    /// writes, and no client packet arrives before the proxy steers the flow here).
    pub async fn import(&self, state: &[u8], vip: Ipv4Addr) -> Result<Imported, Failure> {
        let state = TcpState::decode(state).map_err(|e| Failure {
            errno: 0,
            reason: format!("bad state: {e}"),
        })?;
        match state.local {
            SocketAddr::V4(a) if *a.ip() == vip => {}
            other => {
                return Err(Failure {
                    errno: libc_errno(nix::errno::Errno::EADDRNOTAVAIL),
                    reason: format!("the connection is for {other}; this agent serves VIP {vip}"),
                })
            }
        }
        let app = match self {
            Delivery::Forward { addr, .. } => {
                let opened = tokio::time::timeout(APP_CONNECT_TIMEOUT, open_backend(*addr, &[]))
                    .await
                    .map_err(|_| Failure {
                        errno: libc_errno(nix::errno::Errno::ETIMEDOUT),
                        reason: format!("application at {addr} did not accept in time"),
                    })?;
                match opened {
                    Ok(s) => Some(s),
                    Err(OpenError::Local(e) | OpenError::Backend(e)) => {
                        return Err(Failure {
                            errno: e.raw_os_error().unwrap_or(0),
                            reason: format!("application at {addr}: {e}"),
                        })
                    }
                }
            }
            Delivery::Handoff { sender, .. } => {
                let ready = tokio::time::timeout(APP_CONNECT_TIMEOUT, async {
                    sender.lock().await.ready().await
                })
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                ready.map_err(|e| Failure {
                    errno: e.raw_os_error().unwrap_or(0),
                    reason: format!("application's hand-off socket: {e}"),
                })?;
                None
            }
        };
        let socket = repair::rebuild(&state).map_err(|e| Failure {
            errno: match &e {
                repair::RepairError::Sys { errno, .. } => libc_errno(*errno),
                _ => 0,
            },
            reason: format!("rebuild: {e}"),
        })?;
        Ok(Imported {
            socket: Some(socket),
            app,
        })
    }

    /// Gives a steered connection to the application and waits for its end; returns the
    /// bytes (from the client, to the client) for the `Closed` report.
    pub async fn deliver(&self, imported: Imported) -> Option<(u64, u64)> {
        match self {
            Delivery::Forward { metrics, stop, .. } => {
                match imported.take() {
                    (Some(socket), Some(app)) => relay(socket, app, metrics, stop).await,
                    (Some(socket), None) => {
                        // Cannot happen (import opens the application first); if it did,
                        // a reset, never a FIN that looks like a clean end.
                        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                        Some((0, 0))
                    }
                    _ => Some((0, 0)),
                }
            }
            Delivery::Handoff {
                sender,
                watch,
                metrics,
            } => {
                let (Some(socket), _) = imported.take() else {
                    return Some((0, 0));
                };
                let addrs = (socket.local_addr(), socket.peer_addr());
                let (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(peer))) = addrs else {
                    return Some((0, 0));
                };
                let sent = tokio::time::timeout(APP_CONNECT_TIMEOUT, async {
                    sender.lock().await.send(socket.as_fd()).await
                })
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                if let Err(e) = sent {
                    warn!(client = %peer, error = %e, "the application did not take a handed-off connection: resetting it");
                    metrics.result(AgentResult::DeliveryFailed);
                    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                    return Some((0, 0));
                }
                // Ours closes now: the application holds the connection.
                drop(socket);
                metrics.result(AgentResult::Delivered);
                let (done, ended) = oneshot::channel();
                watch.send(Watch { local, peer, done }).ok()?;
                let (from, to) = ended.await.ok()?;
                let (c_from, c_to) = metrics.byte_counters();
                c_from.increment(from);
                c_to.increment(to);
                Some((from, to))
            }
        }
    }
}

fn libc_errno(e: nix::errno::Errno) -> i32 {
    e as i32
}

/// `--forward`: relays the rebuilt socket and the application connection until both ends
/// close (or one fails: then both are reset, as in the proxy).
async fn relay(
    socket: std::net::TcpStream,
    app: TcpStream,
    metrics: &AgentMetrics,
    stop: &CancellationToken,
) -> Option<(u64, u64)> {
    let socket = socket2::Socket::from(socket);
    let _ = socket.set_tcp_nodelay(true);
    if let Err(e) = set_stream_options(&socket) {
        debug!(error = %e, "cannot set the relay's stream options");
    }
    let client = match TcpStream::from_std(socket.into()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot register a rebuilt socket");
            return Some((0, 0));
        }
    };
    metrics.result(AgentResult::Delivered);
    let _active = ActiveGuard::new(metrics.flows());
    let (from_client, to_client) = metrics.byte_counters();
    let activity = Activity::new();
    let mut forward = Forward::new(
        &client,
        &app,
        from_client,
        to_client,
        ForwardOptions {
            idle_timeout: None,
            splice: true,
        },
        metrics.splice_fallbacks(),
        &activity,
    );
    match forward.run(stop).await {
        Ok(t) => Some((t.to_backend, t.to_client)),
        Err(e) => {
            debug!(error = %e, "relay ended early: resetting both sides");
            set_reset_on_close(&client);
            set_reset_on_close(&app);
            Some((0, 0))
        }
    }
}

/// A watched flow: where to report its end, and its bytes (from, to the client) at the last
/// sighting.
type Watched = (oneshot::Sender<(u64, u64)>, (u64, u64));

/// `--handoff-socket`: watches passed connections through sock_diag until each ends
/// (grouped by local address: one dump per VIP:port).
async fn watch_flows(
    mut rx: mpsc::UnboundedReceiver<Watch>,
    metrics: AgentMetrics,
    stop: CancellationToken,
) {
    let mut flows: HashMap<SocketAddrV4, HashMap<SocketAddrV4, Watched>> = HashMap::new();
    let mut diag: Option<SockDiag> = None;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gauge = metrics.flows();
    loop {
        tokio::select! {
            w = rx.recv() => match w {
                Some(w) => {
                    flows.entry(w.local).or_default().insert(w.peer, (w.done, (0, 0)));
                }
                None => return,
            },
            _ = tick.tick() => {
                if flows.is_empty() {
                    continue;
                }
                let locals: Vec<SocketAddrV4> = flows.keys().copied().collect();
                let mut d = match diag.take() {
                    Some(d) => d,
                    None => match SockDiag::open() {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(error = %e, "cannot open sock_diag: handed-off connections are not watched");
                            continue;
                        }
                    },
                };
                // Which watched peers of each VIP:port are missing from the dump. A dump is
                // not an atomic snapshot (a socket removed mid-dump can hide a live one),
                // so each missing flow is confirmed by an exact lookup before it is ended.
                let watched: Vec<(SocketAddrV4, Vec<SocketAddrV4>)> = locals
                    .iter()
                    .map(|l| (*l, flows[l].keys().copied().collect()))
                    .collect();
                let seen = tokio::task::spawn_blocking(move || {
                    let seen: Vec<_> = watched
                        .into_iter()
                        .map(|(local, peers)| {
                            let live = d.sockets_at(local).map(|mut live| {
                                let missing: Vec<SocketAddrV4> = peers
                                    .iter()
                                    .filter(|p| !live.contains_key(p))
                                    .copied()
                                    .collect();
                                for peer in missing {
                                    if let Ok(Some(info)) = d.socket(local, peer) {
                                        live.insert(peer, info);
                                    }
                                }
                                live
                            });
                            (local, live)
                        })
                        .collect();
                    (d, seen)
                })
                .await;
                let Ok((d, seen)) = seen else { continue };
                diag = Some(d);
                for (local, live) in seen {
                    let live = match live {
                        Ok(l) => l,
                        Err(e) => {
                            warn!(error = %e, %local, "sock_diag query failed");
                            continue;
                        }
                    };
                    let Some(peers) = flows.get_mut(&local) else { continue };
                    let ended: Vec<SocketAddrV4> = peers
                        .iter_mut()
                        .filter_map(|(peer, (_, bytes))| match live.get(peer) {
                            Some(info) => {
                                *bytes = (info.bytes_received, info.bytes_acked);
                                None
                            }
                            None => Some(*peer),
                        })
                        .collect();
                    for peer in ended {
                        if let Some((done, bytes)) = peers.remove(&peer) {
                            let _ = done.send(bytes);
                        }
                    }
                    if peers.is_empty() {
                        flows.remove(&local);
                    }
                }
            }
            () = stop.cancelled() => return,
        }
        gauge.set(flows.values().map(HashMap::len).sum::<usize>() as f64);
    }
}
