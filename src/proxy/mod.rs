//! The proxy: start-up (validate, size to the fd limit, bind, spawn) and the state the
//! connections share. [`start`] returns a [`ProxyHandle`] (`handle.rs`) that reports the bound
//! addresses, swaps the routing table, and shuts down gracefully: stop accepting, let
//! connections finish up to the drain deadline, then reset what is left.
//!
//! A connection's way through the modules: `listener` (admission: connection and
//! header-phase budgets, per-source caps) → `connection` (the phases) → `connect` (failover,
//! connect-and-preamble) → `forward` (the pump state machine) over `io` (syscall steps),
//! `pipe` (splice pipes and their budget) and `sockopt`.

mod admission;
mod connect;
mod connection;
mod forward;
mod handle;
mod io;
mod listener;
mod pipe;
mod proxy_protocol;
mod rate;
pub mod sockopt;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub(crate) use connect::{open as open_backend, OpenError};
pub use forward::{Activity, Transfer};
pub(crate) use forward::{Forward, ForwardOptions};
use handle::run_worker;
pub use handle::{ProxyHandle, Workers};
pub use pipe::DEFAULT_PIPE_SIZE;
pub(crate) use pipe::{limit as pipe_limit, open_count as pipes_open};

use crate::admin;
use crate::config::ProxyConfig;
use crate::control::Control;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::routing::RoutingTable;

/// Listen backlog: the kernel queue absorbs bursts while the accept loop catches up.
const LISTEN_BACKLOG: i32 = 4096;
/// fds kept free when sizing connections and pipes: the admin listener's connections (its
/// own cap, [`admin::ADMIN_MAX_FDS`]) plus 64 for listeners, logs and the process's files.
const FD_RESERVE: u64 = admin::ADMIN_MAX_FDS as u64 + 64;

/// State shared by the accept loop and every connection task.
pub(crate) struct Shared {
    /// The validated configuration; a reload swaps in one with the live settings changed.
    pub config: ArcSwap<ProxyConfig>,
    /// The routing snapshot; replaced whole, read lock-free.
    pub table: ArcSwap<RoutingTable>,
    /// Metric handles.
    pub metrics: Metrics,
    /// One permit per admitted connection.
    pub limit: Arc<Semaphore>,
    /// The header-phase budgets (global and per source).
    pub admission: Arc<admission::Admission>,
    /// The per-source connection rate limit (`source_rate`; off: one atomic load per
    /// connection). A reload changes it with [`rate::SourceRates::set`].
    pub rates: rate::SourceRates,
    /// Direct server return, with `--dsr`.
    pub dsr: Option<Arc<crate::dsr::handoff::Dsr>>,
    /// Bumped whenever routing may have changed (a new table, a health transition): what
    /// connections under the owner-change policy `close` wait on.
    pub routing_epoch: tokio::sync::watch::Sender<u64>,
}

/// Validates `config`, binds, and starts serving on the current tokio runtime.
pub async fn start(config: ProxyConfig) -> Result<ProxyHandle, Error> {
    start_with(config, Workers::Current).await
}

/// Validates `config`, binds, and starts serving with the given worker model. The admin
/// listener (if any) runs on the caller's runtime.
///
/// With [`ProxyConfig::upgrade_socket`] set, a proxy already answering on that socket hands
/// over its listening sockets instead (`proxy/upgrade.rs`): this process accepts on every one it
/// received (whatever its worker count), tells the predecessor it is ready (the predecessor
/// then drains), and serves the socket itself for the next upgrade.
pub async fn start_with(mut config: ProxyConfig, workers: Workers) -> Result<ProxyHandle, Error> {
    // With `--membership`, the backends are etcd's (or the cache file's).
    let membership = match &config.membership {
        Some(_) => {
            // Settings first (a bad TLS file is a configuration error, not an outage).
            config.validate()?;
            let boot = crate::membership::source::boot(&config)
                .await
                .map_err(|why| Error::Io {
                    context: "reading the membership",
                    source: std::io::Error::other(why),
                })?;
            config.backends = boot.specs();
            Some(boot)
        }
        None => None,
    };
    config.validate()?;
    fit_to_fd_limit(&mut config);
    let metrics = Metrics::new();
    // `rebuild`, not `build`: the proxy-wide PROXY v2 setting is the default of backends
    // that do not say (`build` assumes it off). From etcd, the set may be empty.
    let rebuild = match membership {
        Some(_) => RoutingTable::rebuild_maybe_empty,
        None => RoutingTable::rebuild,
    };
    let table = rebuild(
        &config.backends,
        &Default::default(),
        config.proxy_protocol,
        1,
        &metrics,
        None,
    )?;
    let count = match workers {
        Workers::Current => 1,
        Workers::Threads(n) => n.max(1),
    };
    let inherited = match &config.upgrade_socket {
        Some(path) => upgrade::take_over(path, &config).await?,
        None => None,
    };
    // Bound before the listeners (a bad path fails the start before any port is taken) and
    // before a predecessor is told "ready" (it keeps serving if this fails).
    let upgrade_socket = match &config.upgrade_socket {
        Some(path) => Some(upgrade::UpgradeSocket::prepare(path)?),
        None => None,
    };
    let (listeners, admin_std, predecessor) = match inherited {
        Some(i) => {
            let n = i.data.len() + usize::from(i.admin.is_some());
            metrics.set_inherited_listeners(n);
            info!(
                inherited = n,
                client_listeners = i.data.len(),
                admin = i.admin.is_some(),
                "took over the running proxy's listening sockets"
            );
            let per_addr = i.data.len() / (1 + config.also_listen.len());
            if matches!(workers, Workers::Threads(_)) && per_addr != count {
                info!(
                    requested = count,
                    inherited = per_addr,
                    "worker count differs from the predecessor's: one worker per inherited listener"
                );
            }
            (i.data, i.admin, Some(i.predecessor))
        }
        None => {
            let mut all = Vec::new();
            for addr in std::iter::once(config.listen).chain(config.also_listen.iter().copied()) {
                for l in bind_listeners(addr, count)? {
                    let bound = l
                        .local_addr()
                        .map_err(|source| Error::Bind { addr, source })?;
                    all.push((bound, l));
                }
            }
            (all, bind_admin(config.admin)?, None)
        }
    };
    let local_addrs = distinct(listeners.iter().map(|(addr, _)| *addr));
    let local_addr = local_addrs.first().copied().ok_or(Error::Io {
        context: "starting the listeners",
        source: std::io::Error::other("no client listener"),
    })?;
    let admin_addr = match &admin_std {
        Some(l) => Some(l.local_addr().map_err(|source| Error::Io {
            context: "reading the admin listener's address",
            source,
        })?),
        None => None,
    };
    // Duplicates of every listening socket, for a successor.
    let mut handed = Vec::new();
    if upgrade_socket.is_some() {
        let dup = |l: &std::net::TcpListener| {
            l.try_clone()
                .map(std::os::fd::OwnedFd::from)
                .map_err(|source| Error::Io {
                    context: "duplicating a listener for the upgrade socket",
                    source,
                })
        };
        for (addr, l) in &listeners {
            handed.push(upgrade::Listening {
                role: upgrade::Role::Listen,
                addr: *addr,
                fd: dup(l)?,
            });
        }
        if let (Some(l), Some(addr)) = (&admin_std, admin_addr) {
            handed.push(upgrade::Listening {
                role: upgrade::Role::Admin,
                addr,
                fd: dup(l)?,
            });
        }
    }
    let admin_listener = match admin_std {
        Some(l) => Some(from_std_admin(l)?),
        None => None,
    };
    log_settings(&config, &local_addrs, admin_addr, listeners.len());
    let stop = CancellationToken::new();
    let dsr = match (&config.dsr, local_addr) {
        (Some(d), SocketAddr::V4(vip)) => Some(
            crate::dsr::handoff::Dsr::start(d.clone(), vip, metrics.dsr())
                .await
                .map_err(|e| Error::Io {
                    context: "starting DSR",
                    source: std::io::Error::other(e.to_string()),
                })?,
        ),
        _ => None,
    };

    let shared = Arc::new(Shared {
        limit: Arc::new(Semaphore::new(config.max_connections)),
        admission: Arc::new(admission::Admission::new(
            config.pending_headers(),
            config.pending_headers_per_source(),
            metrics.clone(),
        )),
        rates: rate::SourceRates::new(config.source_rate),
        table: ArcSwap::from_pointee(table),
        metrics: metrics.clone(),
        routing_epoch: tokio::sync::watch::Sender::new(0),
        dsr,
        config: ArcSwap::from_pointee(config),
    });
    let control = Control::start(shared.clone(), stop.clone());
    let membership_task = membership
        .map(|boot| crate::membership::source::spawn(control.clone(), boot, stop.clone()));
    let kill = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    for (i, (_, std_listener)) in listeners.into_iter().enumerate() {
        let accept = {
            let (shared, stop, kill, tracker) =
                (shared.clone(), stop.clone(), kill.clone(), tracker.clone());
            move |listener| listener::run_accept(listener, shared, stop, kill, tracker)
        };
        match workers {
            Workers::Current => {
                let listener = from_std(std_listener)?;
                tasks.push(tokio::spawn(accept(listener)));
            }
            Workers::Threads(_) => {
                let (kill, tracker) = (kill.clone(), tracker.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("shardproxy-w{i}"))
                    .spawn(move || run_worker(std_listener, accept, kill, tracker))
                    .map_err(|source| Error::Io {
                        context: "spawning a worker thread",
                        source,
                    })?;
                threads.push(thread);
            }
        }
    }
    tasks.push(tokio::spawn(crate::metrics::run_upkeep(
        metrics.clone(),
        stop.clone(),
    )));
    tasks.extend(membership_task);
    if let Some(l) = admin_listener {
        let config = shared.config.load();
        let token = match &config.admin_token_file {
            Some(path) => Some(crate::config::read_token(path).map_err(|why| {
                Error::Config(crate::error::ConfigError::Invalid {
                    field: "--admin-token-file",
                    why,
                })
            })?),
            None => None,
        };
        tasks.push(tokio::spawn(admin::run_admin(
            l,
            metrics.clone(),
            config.admin_header_timeout,
            stop.clone(),
            crate::control::api::routes(control.clone(), token),
        )));
    }
    if let Some(predecessor) = predecessor {
        // Every socket has an accept loop now; the predecessor may stop accepting. If it
        // cannot be told, it keeps accepting too: both serve until it is stopped.
        match predecessor.ready().await {
            Ok(()) => info!("told the predecessor to drain"),
            Err(e) => {
                warn!(error = %e, "could not tell the predecessor to drain; it keeps serving too")
            }
        }
    }
    // In place before the ready line, so the next upgrade can follow at once. This process
    // serves either way: failing here only means it cannot be upgraded in place.
    let handed_over = CancellationToken::new();
    match upgrade_socket.map(upgrade::UpgradeSocket::install) {
        Some(Ok(socket)) => tasks.push(tokio::spawn(socket.serve(
            handed,
            metrics,
            stop.clone(),
            handed_over.clone(),
        ))),
        Some(Err(e)) => {
            warn!(error = %e, "cannot install the upgrade socket: this process cannot be upgraded in place")
        }
        None => {}
    }
    Ok(ProxyHandle {
        control,
        local_addr,
        local_addrs,
        admin_addr,
        shared,
        stop,
        kill,
        tracker,
        tasks,
        threads,
        handed_over,
    })
}

/// The distinct values of `addrs`, in first-seen order.
fn distinct(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addrs {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Binds the admin listener, if one is configured (a plain listener, `SO_REUSEADDR`).
fn bind_admin(addr: Option<SocketAddr>) -> Result<Option<std::net::TcpListener>, Error> {
    match addr {
        Some(addr) => std::net::TcpListener::bind(addr)
            .map(Some)
            .map_err(|source| Error::Bind { addr, source }),
        None => Ok(None),
    }
}

/// Registers the admin listener with the caller's runtime.
fn from_std_admin(listener: std::net::TcpListener) -> Result<TcpListener, Error> {
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|source| Error::Io {
            context: "registering the admin listener with the runtime",
            source,
        })
}

/// Binds `count` listeners on `addr` (with `SO_REUSEPORT` when more than one; a port 0 is
/// resolved by the first and shared by the rest).
fn bind_listeners(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, Error> {
    let first = bind_one(addr, count > 1)?;
    let bound = first
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(bind_one(bound, true)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> Result<std::net::TcpListener, Error> {
    use socket2::{Domain, Socket, Type};
    let bind_err = |source| Error::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(bind_err)?;
    }
    // Accepted sockets inherit TCP_NODELAY, SO_OOBINLINE and TCP_INQ from the listener: no
    // setsockopt per client.
    socket.set_tcp_nodelay(true).map_err(bind_err)?;
    sockopt::set_stream_options(&socket).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_err)?;
    Ok(socket.into())
}

fn from_std(listener: std::net::TcpListener) -> Result<TcpListener, Error> {
    TcpListener::from_std(listener).map_err(|source| Error::Io {
        context: "registering the listener with the runtime",
        source,
    })
}

/// Sizes the connection cap and the pipe budget to the fd limit: each connection holds two
/// sockets and each pipe two fds, and [`FD_RESERVE`] stays free for listeners, the admin
/// listener's connections, logs and the process. Lowers `max_connections` (with a warning)
/// only when they cannot all fit; fills in the pipe budget when it was not given, and sets it
/// process-wide.
fn fit_to_fd_limit(config: &mut ProxyConfig) {
    let limit = sockopt::fd_limit().unwrap_or(u64::MAX);
    let pairs = usize::try_from(limit.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX);
    let (connections, pipes) = fit_budget(pairs, config.max_connections, config.max_pipes);
    if connections < config.max_connections {
        warn!(
            requested = config.max_connections,
            allowed = connections,
            max_pipes = pipes,
            fd_limit = limit,
            "max connections lowered to fit the fd limit (two sockets per connection, two fds per pipe)"
        );
    }
    config.max_connections = connections;
    config.max_pipes = Some(pipes);
    pipe::set_limit(pipes);
}

/// Splits `pairs` fd pairs between connections and pipes: `(max_connections, max_pipes)`.
/// A given pipe budget is kept (connections give way, never below 1); without one, pipes get
/// a quarter of the connection cap if the fds allow, else what the fds leave — and if that
/// is under an eighth, both shrink together to keep the quarter.
fn fit_budget(pairs: usize, connections: usize, pipes: Option<usize>) -> (usize, usize) {
    match pipes {
        Some(p) => (connections.min(pairs.saturating_sub(p)).max(1), p),
        None => {
            let left = pairs.saturating_sub(connections);
            if connections <= pairs && left >= connections / 8 {
                (connections, left.min(connections / 4))
            } else {
                let c = (pairs * 4 / 5).clamp(1, connections);
                (c, pairs.saturating_sub(c).min(c / 4))
            }
        }
    }
}

fn log_settings(
    config: &ProxyConfig,
    listen: &[SocketAddr],
    admin: Option<SocketAddr>,
    listeners: usize,
) {
    let workers = match listeners {
        1 => tokio::runtime::Handle::current().metrics().num_workers(),
        n => n,
    };
    let listen = listen
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let fd_limit = sockopt::fd_limit().unwrap_or(0);
    info!(
        %listen,
        listeners,
        upgrade_socket = %config
            .upgrade_socket
            .as_ref()
            .map_or_else(|| "off".to_string(), |p| p.display().to_string()),
        admin = %admin.map_or_else(|| "off".to_string(), |a| a.to_string()),
        backends = config.backends.len(),
        header = %config.header,
        header_timeout = ?config.header_timeout,
        connect_timeout = ?config.connect_timeout,
        max_tries = config.max_tries,
        failover = ?config.failover,
        idle_timeout = ?config.idle_timeout,
        splice = config.splice,
        max_connections = config.max_connections,
        max_pending_headers = config.pending_headers(),
        max_pending_headers_per_source = config.pending_headers_per_source(),
        drain_timeout = ?config.drain_timeout,
        workers,
        fd_limit,
        max_pipes = config.max_pipes.unwrap_or(0),
        pipe_size = DEFAULT_PIPE_SIZE,
        max_pipe_size = pipe::MAX_PIPE_SIZE,
        "shardproxy started; limits and timeouts in force"
    );
    let h = &config.health;
    info!(
        active = h.active,
        interval = ?h.interval,
        jitter = h.jitter,
        timeout = ?h.timeout,
        fall = h.fall,
        rise = h.rise,
        send = h.send.is_some(),
        expect = h.expect.is_some(),
        eject_after = h.eject_after,
        eject_time = ?h.eject_time,
        max_eject_time = ?h.max_eject_time,
        max_down_share = h.max_down_share,
        owner_change = ?config.owner_change,
        source_rate = ?config.source_rate,
        proxy_protocol = config.proxy_protocol,
        admin_token = config.admin_token_file.is_some(),
        "health checks and control-plane settings in force"
    );
}
#[cfg(test)]
impl Shared {
    /// A `Shared` without a listener, for unit tests of the connection phases.
    pub(crate) fn for_tests(config: ProxyConfig, table: RoutingTable, metrics: Metrics) -> Self {
        Shared {
            limit: Arc::new(Semaphore::new(1)),
            admission: Arc::new(admission::Admission::new(1, 1, metrics.clone())),
            rates: rate::SourceRates::new(config.source_rate),
            table: ArcSwap::from_pointee(table),
            metrics,
            routing_epoch: tokio::sync::watch::Sender::new(0),
            dsr: None,
            config: ArcSwap::from_pointee(config),
        }
    }
}

#[cfg(test)]
mod fit_tests {
    use super::fit_budget;

    #[test]
    fn connections_and_pipes_share_the_fd_table() {
        // 20000 fds, 128 reserved: 9936 pairs. The defaults fit without lowering anything.
        assert_eq!(fit_budget(9936, 8192, None), (8192, 1744));
        // The 512-fd case: 192 pairs. Both shrink, pipes a quarter of connections.
        let (c, p) = fit_budget(192, 8192, None);
        assert_eq!((c, p), (153, 38));
        assert!(c + p <= 192);
        // A given pipe budget is kept; connections give way.
        assert_eq!(fit_budget(192, 8192, Some(100)), (92, 100));
        assert_eq!(fit_budget(192, 50, Some(100)), (50, 100));
        assert_eq!(fit_budget(192, 8192, Some(0)), (192, 0));
        // Plenty of fds: a quarter of the cap.
        assert_eq!(fit_budget(1_000_000, 1000, None), (1000, 250));
        for pairs in [1, 2, 10, 100, 5000] {
            for conns in [1, 7, 100, 8192] {
                let (c, p) = fit_budget(pairs, conns, None);
                assert!(c >= 1 && c <= conns, "{pairs} {conns}: {c}");
                assert!(c + p <= pairs.max(1), "{pairs} {conns}: {c}+{p}");
            }
        }
    }
}
