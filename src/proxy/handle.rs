//! What a running proxy is made of: the [`ProxyHandle`] its owner holds (addresses, table
//! swaps, graceful shutdown) and the worker threads that serve connections.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::Shared;
use crate::config::BackendSpec;
use crate::control::{Control, ControlError};
use crate::error::{ConfigError, Error};
use crate::routing::RoutingTable;

/// A running proxy. Dropping it stops accepting and closes connections at once; call
/// [`ProxyHandle::shutdown`] for a graceful drain.
pub struct ProxyHandle {
    /// The control plane (membership changes, health).
    pub(super) control: Arc<Control>,
    /// The client-facing address (resolved if the port was 0).
    pub(super) local_addr: SocketAddr,
    /// Every client-facing address: `local_addr`, then the extra listen addresses.
    pub(super) local_addrs: Vec<SocketAddr>,
    /// The admin listener's address, if any.
    pub(super) admin_addr: Option<SocketAddr>,
    /// What the connections share (config, table, metrics, limits).
    pub(super) shared: Arc<Shared>,
    /// Cancelled to stop accepting.
    pub(super) stop: CancellationToken,
    /// Cancelled at the drain deadline: cuts what is left.
    pub(super) kill: CancellationToken,
    /// Every connection task, to wait for the drain.
    pub(super) tracker: TaskTracker,
    /// Accept loops on the caller's runtime, the metrics upkeep and the admin listener.
    pub(super) tasks: Vec<JoinHandle<()>>,
    /// Worker threads (`Workers::Threads`).
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
    /// Cancelled when a successor took the listening sockets over (`--upgrade-socket`).
    pub(super) handed_over: CancellationToken,
}

/// Where the accept loops and their connections run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One accept loop on the caller's tokio runtime (tests, the demo, embedding).
    #[default]
    Current,
    /// N threads, each a single-threaded runtime with its own `SO_REUSEPORT` listener: the
    /// kernel spreads connections over them and a connection never changes thread.
    Threads(usize),
}

/// A worker thread: a single-threaded runtime that accepts and serves its connections, and
/// keeps driving them after accepting stops until they finish or `kill` fires.
pub(super) fn run_worker<F, Fut>(
    listener: std::net::TcpListener,
    accept: F,
    kill: CancellationToken,
    tracker: TaskTracker,
) where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "worker runtime failed to start");
            return;
        }
    };
    rt.block_on(async move {
        match TcpListener::from_std(listener) {
            Ok(l) => accept(l).await,
            Err(e) => error!(error = %e, "worker cannot register its listener"),
        }
        tokio::select! {
            () = tracker.wait() => {}
            () = kill.cancelled() => {}
        }
    });
}

impl ProxyHandle {
    /// The address clients connect to (resolved if the port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every client-facing address, [`local_addr`](Self::local_addr) first, then the extra
    /// listen addresses ([`ProxyConfig::also_listen`](crate::ProxyConfig::also_listen)).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Cancelled once a successor process has taken over the listening sockets through the
    /// upgrade socket and accepts on them. Its owner should then call
    /// [`shutdown`](Self::shutdown), as on SIGTERM: this process stops accepting (its
    /// listeners are closed, but the sockets and their accept queues live on in the
    /// successor) and drains. Never cancelled without an upgrade socket.
    pub fn handed_over(&self) -> CancellationToken {
        self.handed_over.clone()
    }

    /// The admin address, if an admin listener runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The Prometheus text exposition, as `GET /metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// The routing table in force.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.shared.table.load_full()
    }

    /// Replaces the membership atomically. Established connections are untouched; new ones
    /// route on the new table. On error (an empty set, a duplicate or empty name, a weight
    /// out of range) the old table stays.
    pub fn set_backends(&self, backends: &[BackendSpec]) -> Result<u64, Error> {
        self.control.replace(backends).map_err(|e| match e {
            ControlError::Invalid(e) => Error::Config(e),
            ControlError::NotFound(name) => Error::Config(ConfigError::Invalid {
                field: "backend",
                why: format!("no backend named {name:?}"),
            }),
        })
    }

    /// The control plane: the admin API's operations (put, delete, drain, route, reload).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Stops accepting, waits up to the drain timeout for connections to finish, then
    /// closes the rest. Returns how many connections were cut at the deadline.
    pub async fn shutdown(mut self) -> usize {
        self.stop.cancel();
        self.tracker.close();
        let drain = self.shared.config.load().drain_timeout;
        let open = self.tracker.len();
        if open > 0 {
            info!(open, ?drain, "draining connections");
        }
        let cut = match tokio::time::timeout(drain, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let cut = self.tracker.len();
                warn!(cut, "drain deadline passed: closing remaining connections");
                self.kill.cancel();
                self.tracker.wait().await;
                cut
            }
        };
        if let Some(dsr) = &self.shared.dsr {
            // Handed-off flows get the same drain deadline; then the steering goes.
            let open = dsr.active_flows();
            if open > 0 {
                info!(open, ?drain, "waiting for handed-off flows to close");
            }
            let left = dsr.drain(drain).await;
            if left > 0 {
                warn!(
                    left,
                    "drain deadline passed: handed-off flows lose their steering"
                );
            }
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        cut
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        self.kill.cancel();
    }
}
