//! The accept loop: admits connections up to the limit and spawns one task per connection.
//!
//! Over `max_connections` a client is closed at once and counted (never left hanging).
//! fd exhaustion (EMFILE/ENFILE) pauses accepting with exponential backoff instead of
//! spinning on a listener that stays readable; other accept errors are counted and skipped.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::connection::serve;
use super::Shared;

/// First pause after an fd-exhaustion accept error.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while fds are exhausted.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop` is cancelled. Connection tasks go to `tracker` and end early only if
/// `kill` is cancelled (the drain deadline passed).
pub(crate) async fn run_accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                shared.metrics.accepted();
                let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
                    shared.metrics.rejected_max_connections();
                    debug!(%peer, "max connections reached: closed");
                    continue;
                };
                let shared = shared.clone();
                let kill = kill.clone();
                tracker.spawn(async move {
                    serve(shared, client, kill).await;
                    drop(permit);
                });
            }
            Err(e) if is_fd_exhaustion(&e) => {
                shared.metrics.accept_error(true);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, pause = ?backoff, "out of file descriptors: pausing accept");
                    last_warning = Some(Instant::now());
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Err(e) => {
                // ECONNABORTED and friends: that one client is gone, the listener is fine.
                shared.metrics.accept_error(false);
                debug!(error = %e, "accept failed");
            }
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}
