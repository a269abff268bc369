//! The accept loop: admits connections within the limits and spawns one task per connection.
//!
//! Each accepted client is first charged to its source's token bucket when `source_rate` is
//! set ([`super::rate`]): a source over its rate has the new connection reset at once and
//! counted (`rejected{reason="source_rate"}`). It is then counted against its source's
//! header-phase cap: a source at
//! its cap has the new connection reset at once and counted (`rejected{reason=
//! "source_pending_headers"}`), so a host flooding slow headers hurts only itself (see
//! [`super::admission`]). An admitted client then needs a connection slot
//! (`max_connections`) and a header-phase slot (`max_pending_headers`); while either is
//! taken the loop holds that one client and **stops accepting** — new clients wait in the
//! kernel backlog and are served once a slot frees, instead of being accepted and closed.
//! The loop takes a slot only for a client it holds, so with several `SO_REUSEPORT` workers
//! an idle worker never sits on a slot that a client queued at another worker needs.
//!
//! Accept errors back off ([`AcceptBackoff`]): fd exhaustion (EMFILE/ENFILE) pauses at once,
//! other errors after a few immediate retries, so a listener that keeps failing never spins.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::admission::SourceTicket;
use super::connection::serve;
use super::rate::Verdict;
use super::Shared;

/// First pause after an fd-exhaustion accept error.
const FD_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while fds are exhausted.
const FD_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Other accept errors (ECONNABORTED and friends) usually concern one client: this many in a
/// row are retried at once; after that the error is taken to be the listener's and paused on.
const OTHER_FREE_RETRIES: u32 = 3;
/// First pause after more than [`OTHER_FREE_RETRIES`] other accept errors in a row.
const OTHER_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while other errors persist.
const OTHER_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning of each kind per this interval (a flood must not flood the log).
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// The pause policy after failed accepts: exponential in the number of consecutive
/// failures, reset by a successful accept.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// An accept succeeded: the next failure starts over.
    pub(crate) fn on_success(&mut self) {
        self.failures = 0;
    }

    /// An accept failed: how long to pause before the next attempt (`None`: retry at once).
    pub(crate) fn on_error(&mut self, fd_exhaustion: bool) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        if fd_exhaustion {
            Some(exponential(
                FD_BACKOFF_MIN,
                FD_BACKOFF_MAX,
                self.failures - 1,
            ))
        } else {
            let over = self.failures.checked_sub(OTHER_FREE_RETRIES + 1)?;
            Some(exponential(OTHER_BACKOFF_MIN, OTHER_BACKOFF_MAX, over))
        }
    }
}

/// `min` doubled `doublings` times, at most `max`.
fn exponential(min: Duration, max: Duration, doublings: u32) -> Duration {
    min.saturating_mul(1 << doublings.min(20)).min(max)
}

/// Lets a log line through at most once per [`WARN_INTERVAL`].
#[derive(Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        if self.0.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            self.0 = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

/// Accepts until `stop` is cancelled. Connection tasks go to `tracker` and end early only if
/// `kill` is cancelled (the drain deadline passed).
pub(crate) async fn run_accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = AcceptBackoff::default();
    let (mut error_log, mut source_log, mut pause_log, mut rate_log) = (
        Throttle::default(),
        Throttle::default(),
        Throttle::default(),
        Throttle::default(),
    );
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                let fd_exhaustion = is_fd_exhaustion(&e);
                shared.metrics.accept_error(fd_exhaustion);
                let Some(pause) = backoff.on_error(fd_exhaustion) else {
                    // ECONNABORTED and friends: that one client is gone, the listener is fine.
                    debug!(error = %e, "accept failed");
                    continue;
                };
                if Throttle::ready(&mut error_log) {
                    if fd_exhaustion {
                        warn!(error = %e, ?pause, "out of file descriptors: pausing accept");
                    } else {
                        warn!(error = %e, ?pause, "accept keeps failing: pausing accept");
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        backoff.on_success();
        shared.metrics.accepted();
        match shared.rates.admit(peer.ip()) {
            Verdict::Admit => {}
            Verdict::Reject => {
                // RST, as for the pending-header cap: no TIME_WAIT left by a flood.
                let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
                drop(client);
                shared.metrics.rejected_source_rate();
                if Throttle::ready(&mut rate_log) {
                    warn!(source = %peer.ip(), "source over its connection rate: resetting its new connections");
                }
                continue;
            }
            Verdict::Untracked => {
                if Throttle::ready(&mut rate_log) {
                    warn!(source = %peer.ip(), "source-rate table full of active sources: new sources are not rate-limited until it frees");
                }
            }
        }
        let Some(ticket) = admit_source(&shared, &client, peer.ip()).await else {
            shared.metrics.rejected_source_pending_headers();
            if Throttle::ready(&mut source_log) {
                warn!(source = %peer.ip(), "source at its pending-header cap: closing its new connections");
            }
            continue;
        };
        // Holding this one client, wait for a connection slot and then a header-phase slot;
        // meanwhile nothing more is accepted.
        let permit = match shared.limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                shared.metrics.accept_paused(true);
                if Throttle::ready(&mut pause_log) {
                    warn!("max connections reached: accepting paused until a connection ends");
                }
                tokio::select! {
                    () = stop.cancelled() => {
                        tracker.spawn(serve_held(shared.clone(), client, ticket, kill.clone()));
                        break;
                    }
                    p = shared.limit.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break, // closed: never, but then nothing can be admitted
                    },
                }
            }
        };
        let pending = match shared.admission.try_pending(ticket) {
            Ok(g) => g,
            Err(ticket) => {
                shared.metrics.accept_paused(false);
                if Throttle::ready(&mut pause_log) {
                    warn!("header-phase budget full: accepting paused until a header completes");
                }
                // Not given up when accepting stops (a drain or a hand-over): header phases
                // end within the header timeout, and the client is served before the loop
                // exits; only the drain deadline cuts it.
                tokio::select! {
                    () = kill.cancelled() => break,
                    g = shared.admission.pending_slot(ticket) => g,
                }
            }
        };
        tracker.spawn(HoldingPermit {
            conn: serve(shared.clone(), client, kill.clone(), pending),
            _permit: permit,
        });
    }
}

pin_project_lite::pin_project! {
    /// A connection's future with its connection slot, released when the task drops the
    /// future (as soon as it completes). Smaller than an `async` block around `serve`, which
    /// would hold serve's arguments twice in every connection's task.
    struct HoldingPermit<F> {
        #[pin]
        conn: F,
        _permit: OwnedSemaphorePermit,
    }
}

impl<F: Future> Future for HoldingPermit<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().conn.poll(cx)
    }
}

/// A client the loop held at `max_connections` when accepting stopped (a drain, or a
/// successor took the listeners): it was accepted, so it is served once a slot frees during
/// the drain, not dropped; only the drain deadline (`kill`) cuts it.
async fn serve_held(
    shared: Arc<Shared>,
    client: TcpStream,
    ticket: SourceTicket,
    kill: CancellationToken,
) {
    let slots = async {
        let permit = shared.limit.clone().acquire_owned().await.ok()?;
        Some((permit, shared.admission.pending_slot(ticket).await))
    };
    let held = tokio::select! {
        () = kill.cancelled() => None,
        s = slots => s,
    };
    let Some((permit, pending)) = held else {
        return;
    };
    HoldingPermit {
        conn: serve(shared.clone(), client, kill, pending),
        _permit: permit,
    }
    .await;
}

/// Counts `client` against its source's pending-header cap; at the cap, resets it and returns
/// `None`. Before giving up it yields once: connections accepted just before it (a burst from
/// one host whose headers are already queued) then run their header phase and leave the
/// count, so a burst of good clients is not taken for a flood.
async fn admit_source(
    shared: &Shared,
    client: &TcpStream,
    ip: std::net::IpAddr,
) -> Option<SourceTicket> {
    if let Some(t) = shared.admission.admit_source(ip) {
        return Some(t);
    }
    tokio::task::yield_now().await;
    let ticket = shared.admission.admit_source(ip);
    if ticket.is_none() {
        // RST rather than FIN: no TIME_WAIT left behind for a flood, and the client learns
        // at once that it was refused.
        let _ = SockRef::from(client).set_linger(Some(Duration::ZERO));
    }
    ticket
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pauses(b: &mut AcceptBackoff, fd: bool, n: usize) -> Vec<Option<u64>> {
        (0..n)
            .map(|_| b.on_error(fd).map(|d| d.as_millis() as u64))
            .collect()
    }

    #[test]
    fn fd_exhaustion_pauses_at_once_and_doubles_to_a_cap() {
        let mut b = AcceptBackoff::default();
        assert_eq!(
            pauses(&mut b, true, 9),
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000].map(Some)
        );
    }

    #[test]
    fn other_errors_pause_after_a_few_retries_and_never_spin() {
        let mut b = AcceptBackoff::default();
        assert_eq!(
            pauses(&mut b, false, 6),
            [None, None, None, Some(10), Some(20), Some(40)]
        );
        // A persistent error ends up pausing the longest, however long it lasts.
        let later = pauses(&mut b, false, 1000);
        assert_eq!(later.last(), Some(&Some(1000)));
        assert!(later.iter().all(|p| p.is_some()));
    }

    #[test]
    fn a_successful_accept_resets_the_backoff() {
        let mut b = AcceptBackoff::default();
        pauses(&mut b, false, 10);
        b.on_success();
        assert_eq!(pauses(&mut b, false, 4), [None, None, None, Some(10)]);
        pauses(&mut b, true, 5);
        b.on_success();
        assert_eq!(b.on_error(true), Some(Duration::from_millis(10)));
    }
}
