//! Connect phase: the failover loop over a key's rank order, and one connect-plus-preamble.
//!
//! A backend is blamed only for what it did: refused, timed out, or failed the handshake.
//! The proxy's own shortages — no fd for a socket (`EMFILE`/`ENFILE`), no memory, no free
//! local port (`EADDRNOTAVAIL`) — end the connection at once as the proxy's error: no
//! failover (the key would be misrouted to its second choice while its owner is healthy),
//! no backend counter, no backend marked down.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use nix::errno::Errno;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::sockopt::set_stream_options;
use crate::config::{Failover, ProxyConfig, MAX_TRIES};
use crate::error::ConnError;
use crate::metrics::ConnectFailure;
use crate::routing::{ActiveSlot, Health, KeyDigest, RoutingTable};

/// Why one connect attempt failed, by whose fault.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The proxy could not make the attempt (fds, memory, local ports).
    Local(io::Error),
    /// The backend refused, reset or failed the handshake.
    Backend(io::Error),
}

/// Connects to the first reachable backend in the key's order, never trying one twice, and
/// delivers `preamble` to it (after a PROXY v2 header when the backend wants one, built for
/// `client`). A backend that fails before it took the preamble is failed over: no byte of
/// this client reached it.
///
/// Health applies: a backend marked down is skipped (its keys go to their next choice,
/// exactly as if it had been tried and failed), unless the table is in panic. With
/// `failover = "none"` the key goes to its owner or nowhere: a down owner fails fast. A
/// backend at its `max_connections` fails the connection at once (`backend_full`), never
/// moving the key. The returned slot holds the connection's place in the backend's cap.
pub(super) async fn connect(
    cfg: &ProxyConfig,
    table: &RoutingTable,
    digest: KeyDigest,
    preamble: &[u8],
    client: &TcpStream,
) -> Result<(usize, TcpStream, ActiveSlot), (ConnError, Option<Arc<str>>)> {
    let tries = (cfg.effective_tries() as usize).min(MAX_TRIES as usize);
    let mut tried = [usize::MAX; MAX_TRIES as usize];
    let mut n = 0;
    while n < tries {
        let picked = match cfg.failover {
            Failover::Next => table.pick(digest, &tried[..n]),
            Failover::None => match table.owner(digest) {
                Some(i)
                    if !table.in_panic() && table.backends[i].state.health() == Health::Down =>
                {
                    return Err((ConnError::BackendDown, Some(table.backends[i].name.clone())))
                }
                owner => owner,
            },
        };
        let Some(index) = picked else {
            break;
        };
        if n > 0 {
            // The previous choice failed and the key moves on: a failover off that backend.
            table.backends[tried[n - 1]].metrics.failovers.increment(1);
        }
        tried[n] = index;
        n += 1;
        let be = &table.backends[index];
        let Some(slot) = be.state.try_reserve(be.max_connections) else {
            return Err((ConnError::BackendFull, Some(be.name.clone())));
        };
        let header = if be.proxy_protocol {
            match super::proxy_protocol::header(client) {
                Ok(h) => Some(h),
                Err(e) => return Err((ConnError::Local(e), None)),
            }
        } else {
            None
        };
        let started = Instant::now();
        let attempt = open_with(be.addr, header.as_deref(), preamble);
        let failure = match timeout(cfg.connect_timeout, attempt).await {
            Ok(Ok(stream)) => {
                be.metrics.connected(started.elapsed());
                be.state.connect_succeeded();
                return Ok((index, stream, slot));
            }
            Ok(Err(OpenError::Local(e))) => return Err((ConnError::Local(e), None)),
            Ok(Err(OpenError::Backend(e))) if e.kind() == io::ErrorKind::ConnectionRefused => {
                ConnectFailure::Refused
            }
            Ok(Err(OpenError::Backend(_))) => ConnectFailure::Other,
            Err(_) => ConnectFailure::Timeout,
        };
        be.metrics.connect_failed(failure);
        be.state.connect_failed(cfg.health.eject_after);
    }
    match n {
        0 => Err((ConnError::NoBackend, None)),
        // The log names the last backend tried (the earlier ones are in the metrics).
        tries => Err((
            ConnError::ConnectFailed {
                tries: tries as u32,
            },
            Some(table.backends[tried[tries - 1]].name.clone()),
        )),
    }
}

/// [`open`] with an optional PROXY header sent before `preamble` (one write when both fit).
async fn open_with(
    addr: SocketAddr,
    proxy_header: Option<&[u8]>,
    preamble: &[u8],
) -> Result<TcpStream, OpenError> {
    match proxy_header {
        None => open(addr, preamble).await,
        Some(h) => {
            let mut both = Vec::with_capacity(h.len() + preamble.len());
            both.extend_from_slice(h);
            both.extend_from_slice(preamble);
            open(addr, &both).await
        }
    }
}

/// Whether a `socket(2)`/`connect(2)` error is the proxy's own shortage, not the backend's.
pub(super) fn is_local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(
            Errno::EMFILE
                | Errno::ENFILE
                | Errno::ENOBUFS
                | Errno::ENOMEM
                | Errno::EADDRNOTAVAIL
                | Errno::EAGAIN
        )
    )
}

/// Opens a connection to `addr` (with `TCP_NODELAY` and the stream options) and writes
/// `preamble` to it.
///
/// The preamble is sent as soon as `connect(2)` returns, without waiting for the poller:
/// on loopback or a fast network the handshake is usually complete by then, which saves a
/// trip through the event loop and the `getsockopt(SO_ERROR)` of tokio's connect. A handshake
/// still in flight makes that send return `EAGAIN` (then we wait for writability); a failed
/// one makes it return the connect error itself (`sk_stream_wait_connect` reports `sk_err`).
pub(crate) async fn open(addr: SocketAddr, preamble: &[u8]) -> Result<TcpStream, OpenError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(OpenError::Local)?;
    // Failure only costs latency; never fail a connection for it.
    let _ = socket.set_tcp_nodelay(true);
    set_stream_options(&socket).map_err(OpenError::Local)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::EINPROGRESS as i32) => {}
        // A non-blocking connect's own EAGAIN on TCP means no local port (as EADDRNOTAVAIL).
        Err(e) if is_local_shortage(&e) => return Err(OpenError::Local(e)),
        Err(e) => return Err(OpenError::Backend(e)),
    }
    let stream = TcpStream::from_std(socket.into()).map_err(OpenError::Local)?;
    let backend = OpenError::Backend;
    let mut sent = 0;
    if !preamble.is_empty() {
        match SockRef::from(&stream).send(preamble) {
            Ok(n) => sent = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(backend(e)),
        }
    }
    if sent < preamble.len() {
        // Still connecting, or the send buffer is full: the rest waits for the poller, and
        // a failed connect surfaces as the write's error.
        let mut stream = stream;
        stream.write_all(&preamble[sent..]).await.map_err(backend)?;
        return Ok(stream);
    }
    if preamble.is_empty() {
        // Nothing to send reveals the outcome: wait for the handshake and ask for it.
        stream.writable().await.map_err(backend)?;
        if let Some(e) = stream.take_error().map_err(backend)? {
            return Err(backend(e));
        }
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_shortages_are_not_the_backends_fault() {
        for errno in [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::EADDRNOTAVAIL,
            Errno::ENOBUFS,
        ] {
            assert!(is_local_shortage(&io::Error::from(errno)), "{errno}");
        }
        for errno in [
            Errno::ECONNREFUSED,
            Errno::ECONNRESET,
            Errno::ETIMEDOUT,
            Errno::EHOSTUNREACH,
            Errno::ENETUNREACH,
        ] {
            assert!(!is_local_shortage(&io::Error::from(errno)), "{errno}");
        }
    }
}
