//! The admin listener: Prometheus metrics, health and the admin API over HTTP (loopback by
//! default).
//!
//! Routes:
//! - `GET /metrics` — Prometheus text exposition (`metrics-exporter-prometheus`).
//! - `GET /healthz` — `{"status":"ok"}` while the proxy runs.
//! - the routes its owner adds: the proxy's admin API (`crate::control::api`); none for the
//!   DSR agent.
//!
//! HTTP is served by hyper's HTTP/1 connection driver with the axum router as its service;
//! nothing here is hand-written protocol code. It never touches the data path, but it shares
//! the process's fd table and memory with it, so it is bounded:
//!
//! - **A cap.** At most [`ADMIN_MAX_CONNECTIONS`] connections are served at once; with the
//!   listener and one newcomer being admitted, the admin holds at most [`ADMIN_MAX_FDS`] fds.
//! - **At the cap, a newcomer evicts the oldest connection** that has not yet sent a complete
//!   request (failing that, the oldest of all). Of the three choices this is the one that
//!   keeps `/metrics` reachable during a flood of slow clients. Stopping accepting would
//!   leave a scrape in the kernel backlog behind the flood, waiting for cap-fulls of slow
//!   heads to time out one after another; accept-and-close would turn every scrape away
//!   while the slow heads hold the slots. Evicting the oldest lets a fresh scrape in at once
//!   (it sends its head in one segment and is answered long before a cap-full of newer
//!   connections could push it out), while a flood still holds at most the cap of fds.
//!   A Prometheus keep-alive connection that has been served goes last.
//! - **Timeouts.** A request head must arrive within `ProxyConfig::admin_header_timeout`
//!   (default 5 s) of the accept or of the previous response, so a client that trickles its
//!   head, and an idle keep-alive connection, frees its slot. No connection lives longer than
//!   [`ADMIN_CONNECTION_LIFETIME`] (then it is shut down gracefully: a response in flight gets
//!   [`SHUTDOWN_GRACE`] to finish).
//! - **Memory.** hyper's read buffer is capped at [`MAX_BUF_SIZE`] per connection (a longer
//!   head is answered 431), so the admin's memory is bounded by the cap.
//!
//! Every admin connection is counted when it ends, in `shardproxy_admin_connections_total`
//! by `result`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::metrics::Metrics;

/// Admin connections served at once. The data path's fd budget should reserve
/// [`ADMIN_MAX_FDS`] for the admin listener.
pub(crate) const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The most fds the admin listener holds: its connections, the listener itself, and one
/// newcomer accepted at the cap while the connection it evicts closes.
pub(crate) const ADMIN_MAX_FDS: usize = ADMIN_MAX_CONNECTIONS + 2;
/// The longest an admin connection is kept, keep-alive included.
pub(crate) const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Time a response in flight gets to finish when its connection is shut down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Longest a newcomer at the cap waits for the evicted connection to close; then it is closed.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. EMFILE) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);
/// hyper's per-connection read buffer limit (its minimum is 8 KiB).
const MAX_BUF_SIZE: usize = 16 * 1024;

/// Content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How an admin connection ended: the `result` label of the admin connection counter.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The client closed, or the connection was shut down with the proxy.
    Closed,
    /// No complete request head within the header timeout (or idle keep-alive too long).
    HeaderTimeout,
    /// Closed to make room for a newer connection at the cap.
    Evicted,
    /// Closed at once: at the cap and no slot came free in time.
    Rejected,
    /// Shut down at [`ADMIN_CONNECTION_LIFETIME`].
    Lifetime,
    /// An HTTP or I/O error (malformed request, reset, client gone mid-request).
    Error,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Closed,
        Outcome::HeaderTimeout,
        Outcome::Evicted,
        Outcome::Rejected,
        Outcome::Lifetime,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::HeaderTimeout => "header_timeout",
            Outcome::Evicted => "evicted",
            Outcome::Rejected => "rejected",
            Outcome::Lifetime => "lifetime",
            Outcome::Error => "error",
        }
    }

    fn of(result: Result<(), hyper::Error>) -> Self {
        match result {
            Ok(()) => Outcome::Closed,
            Err(e) if e.is_timeout() => Outcome::HeaderTimeout,
            Err(_) => Outcome::Error,
        }
    }
}

/// What an admin listener serves: a Prometheus exposition and its own connection counter.
/// The proxy's [`Metrics`] and the DSR agent's metrics both are one.
pub(crate) trait Exposition: Clone + Send + Sync + 'static {
    /// The Prometheus text exposition, sampled now.
    fn render(&self) -> String;
    /// The admin connection counter for one `result` label.
    fn admin_connections(&self, result: &'static str) -> Counter;
}

impl Exposition for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }

    fn admin_connections(&self, result: &'static str) -> Counter {
        Metrics::admin_connections(self, result)
    }
}

/// The admin connection counters, one per [`Outcome`], registered once.
struct Counters([Counter; Outcome::ALL.len()]);

impl Counters {
    fn new(metrics: &impl Exposition) -> Self {
        Counters(Outcome::ALL.map(|o| metrics.admin_connections(o.label())))
    }

    fn count(&self, outcome: Outcome) {
        self.0[outcome as usize].increment(1);
    }
}

/// One open admin connection, as the accept loop sees it.
struct Slot {
    /// Cancelled to evict the connection.
    evict: CancellationToken,
    /// Set once the connection has sent a complete request.
    served: Arc<AtomicBool>,
}

/// The open admin connections, oldest first, and the permits that cap them.
struct Slots {
    permits: Arc<Semaphore>,
    open: Mutex<BTreeMap<u64, Slot>>,
}

impl Slots {
    fn new() -> Self {
        Slots {
            permits: Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)),
            open: Mutex::new(BTreeMap::new()),
        }
    }

    fn open(&self) -> MutexGuard<'_, BTreeMap<u64, Slot>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A permit for a newcomer: a free one, or the one the oldest evictable connection gives
    /// back when told to close. `None` if none came free within [`EVICTION_WAIT`].
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        self.evict_oldest();
        tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Tells the oldest connection that has not sent a complete request (else the oldest
    /// one) to close, skipping those already told.
    fn evict_oldest(&self) {
        let open = self.open();
        let mut candidates = open.values().filter(|s| !s.evict.is_cancelled());
        let never_served = candidates
            .clone()
            .find(|s| !s.served.load(Ordering::Relaxed));
        if let Some(slot) = never_served.or_else(|| candidates.next()) {
            slot.evict.cancel();
        }
    }
}

/// Holds a connection's slot: on drop it leaves the open set, then gives its permit back.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.open().remove(&self.id);
    }
}

/// Serves the admin routes until `stop` is cancelled, within the limits in the module doc.
/// Returns once every admin connection has closed (at most [`SHUTDOWN_GRACE`] after `stop`).
pub(crate) async fn run_admin(
    listener: TcpListener,
    metrics: impl Exposition,
    header_timeout: Duration,
    stop: CancellationToken,
    api: Router,
) {
    let counters = Arc::new(Counters::new(&metrics));
    let app = router(metrics).merge(api);
    let slots = Arc::new(Slots::new());
    let tracker = TaskTracker::new();
    let mut next_id: u64 = 0;
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "admin accept failed; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Some(permit) = slots.admit().await else {
            counters.count(Outcome::Rejected);
            continue;
        };
        let id = next_id;
        next_id += 1;
        let slot = Slot {
            evict: CancellationToken::new(),
            served: Arc::new(AtomicBool::new(false)),
        };
        let conn = Conn {
            app: app.clone(),
            header_timeout,
            evict: slot.evict.clone(),
            served: slot.served.clone(),
            stop: stop.clone(),
            counters: counters.clone(),
        };
        slots.open().insert(id, slot);
        let guard = SlotGuard {
            slots: slots.clone(),
            id,
            _permit: permit,
        };
        tracker.spawn(conn.serve(stream, guard));
    }
    tracker.close();
    tracker.wait().await;
}

/// What one admin connection task needs.
struct Conn {
    app: Router,
    header_timeout: Duration,
    evict: CancellationToken,
    served: Arc<AtomicBool>,
    stop: CancellationToken,
    counters: Arc<Counters>,
}

impl Conn {
    /// Serves one connection until it ends, is evicted, outlives its lifetime, or the proxy
    /// stops; counts how it ended, then frees its slot.
    async fn serve(self, stream: TcpStream, slot: SlotGuard) {
        let Conn {
            app,
            header_timeout,
            evict,
            served,
            stop,
            counters,
        } = self;
        let service = TowerToHyperService::new(app);
        let service = hyper::service::service_fn(move |req| {
            served.store(true, Ordering::Relaxed);
            hyper::service::Service::call(&service, req)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_BUF_SIZE);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let mut conn = std::pin::pin!(conn);
        let cut = tokio::select! {
            r = conn.as_mut() => Err(Outcome::of(r)),
            () = evict.cancelled() => Err(Outcome::Evicted),
            () = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME) => Ok(Outcome::Lifetime),
            () = stop.cancelled() => Ok(Outcome::Closed),
        };
        let outcome = match cut {
            Err(ended) => ended,
            Ok(cut) => {
                conn.as_mut().graceful_shutdown();
                match tokio::time::timeout(SHUTDOWN_GRACE, conn).await {
                    Ok(Err(e)) => Outcome::of(Err(e)),
                    Ok(Ok(())) | Err(_) => cut,
                }
            }
        };
        counters.count(outcome);
        drop(slot);
    }
}

/// The admin routes.
fn router(metrics: impl Exposition) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([(CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.render()) }
            }),
        )
        .route("/healthz", get(healthz))
}

async fn healthz() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_takes_the_oldest_unserved_then_the_oldest_served() {
        let slots = Slots::new();
        let mut tokens = Vec::new();
        for (id, served) in [(0, true), (1, false), (2, true), (3, false)] {
            let slot = Slot {
                evict: CancellationToken::new(),
                served: Arc::new(AtomicBool::new(served)),
            };
            tokens.push(slot.evict.clone());
            slots.open().insert(id, slot);
        }
        let evicted = |tokens: &[CancellationToken]| {
            tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| t.is_cancelled())
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        for expected in [vec![1], vec![1, 3], vec![0, 1, 3], vec![0, 1, 2, 3]] {
            slots.evict_oldest();
            assert_eq!(evicted(&tokens), expected);
        }
        // Nothing left to evict: a no-op.
        slots.evict_oldest();
        assert_eq!(evicted(&tokens), vec![0, 1, 2, 3]);
    }
}
