//! One client connection's life, read top to bottom as phases:
//! read header → route → connect and write the preamble → forward → finish.
//!
//! Each phase has its own deadline and error variant; the connection ends with exactly one
//! log event and its metrics. The header phase is the only one under the header deadline
//! (go-proxyproto#65: a deadline never cleared later kills healthy connections); the drain
//! deadline (`kill`) ends every phase. A connection the proxy gives up on — an error, the
//! idle timeout, the drain deadline — is reset on both sides, never closed with a FIN that
//! would make a truncated transfer look complete.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{timeout, Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::admission::PendingHeader;
use super::connect::connect;
use super::forward::{Activity, Forward, ForwardOptions, Transfer};
use super::io::recv_draining;
use super::sockopt::set_reset_on_close;
use super::Shared;
use crate::config::OwnerChange;
use crate::error::{ConnError, Side};
use crate::header::{HeaderError, HeaderFormat, HeaderMode, Parse};
use crate::routing::KeyDigest;

/// Bytes read from a new client before its header length is known: a slow client holds
/// no more than this until it sends a length, then at most the header it announced.
const FIRST_READ: usize = 512;

/// Serves one accepted client to the end. Never panics, never returns an error: the outcome
/// is logged once and counted. `kill` (the drain deadline) ends any phase. `pending` holds
/// the connection's header-phase slot; it is released as soon as the header phase ends.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    kill: CancellationToken,
    pending: PendingHeader,
) {
    let _active = shared.metrics.active_connection();
    let started = Instant::now();
    let outcome = phases(&shared, &client, &kill, pending).await;
    let elapsed = started.elapsed();
    // The peer address is looked up only for a log line that will be written: an idle
    // connection should not carry it.
    let peer = || {
        client
            .peer_addr()
            .map_or_else(|_| "-".to_string(), |a| a.to_string())
    };
    match outcome {
        Ok((backend, t)) => debug!(
            peer = %peer(), %backend, to_backend = t.to_backend, to_client = t.to_client,
            ?elapsed, "connection closed"
        ),
        Err((ConnError::Header(e), _)) => {
            shared.metrics.header_error(e);
            debug!(peer = %peer(), reason = e.reason(), ?elapsed, "bad key header: closed before routing");
        }
        Err((e, backend)) => {
            shared.metrics.connection_error(e.reason());
            let backend = backend.as_deref().unwrap_or("-");
            match e.side() {
                Side::Backend => {
                    info!(peer = %peer(), backend, reason = e.reason(), error = %e, "connection failed")
                }
                Side::Proxy if matches!(e, ConnError::Local(_)) => {
                    info!(peer = %peer(), reason = e.reason(), error = %e, "connection failed: the proxy is short of resources")
                }
                _ => {
                    debug!(peer = %peer(), backend, reason = e.reason(), error = %e, "connection ended")
                }
            }
        }
    }
    // Closed only now, so the outcome is counted before the client can observe the close.
    drop(client);
}

type Outcome = Result<(Arc<str>, Transfer), (ConnError, Option<Arc<str>>)>;

async fn phases(
    shared: &Shared,
    client: &TcpStream,
    kill: &CancellationToken,
    pending: PendingHeader,
) -> Outcome {
    let cfg = shared.config.load_full();
    let fmt = cfg.header;

    // Phase 0 (with --dsr): peek the header and hand the connection off if its backend has
    // an agent. Anything else — no agent, a failed hand-off — goes on below as usual: the
    // peeked bytes are still queued, so phase 1 reads them at once.
    if let Some(dsr) = &shared.dsr {
        let handed = Box::pin(hand_off(shared, dsr, client, kill)).await;
        match handed {
            Ok(Some(name)) => return Ok((name, Transfer::default())),
            Ok(None) => {}
            Err(e) => {
                if let ConnError::Shutdown = e {
                    set_reset_on_close(client);
                }
                return Err((e, None));
            }
        }
    }

    // Phase 1: the key header, under the header deadline only. The header and connect
    // phases are boxed: their futures (timers, connect state) are larger than forwarding's,
    // and an unboxed phase would size every connection's future — held for the
    // connection's whole life — to the largest one. `biased`: a header that came with the
    // first packet never touches the kill token (whose waiter list is shared by all
    // connections).
    let header = Box::pin(async {
        tokio::select! {
            biased;
            r = timeout(cfg.header_timeout, read_header(client, &fmt)) => match r {
                Ok(r) => r,
                Err(_) => Err(HeaderError::Timeout.into()),
            },
            () = kill.cancelled() => Err(ConnError::Shutdown),
        }
    })
    .await;
    let (buf, head) = header.map_err(|e| {
        if let ConnError::Shutdown = e {
            set_reset_on_close(client);
        }
        (e, None)
    })?;
    // The header phase is over (an early return above releases it too).
    drop(pending);
    let key = match fmt.parse(&buf[..head.filled]) {
        Parse::Done { key, .. } => key,
        // read_header returns only once the header parsed as Done.
        _ => return Err((HeaderError::Eof.into(), None)),
    };

    // Phase 2 and 3: route on one table snapshot; connect in rank order and deliver the
    // preamble (the header unless stripped, and whatever came after it) as part of the
    // connect, so a backend that fails before taking a byte is failed over.
    let start = match fmt.mode {
        HeaderMode::Forward => 0,
        HeaderMode::Strip => head.consumed,
    };
    let preamble = &buf[start..head.filled];
    let digest = KeyDigest::of(key);
    let table = shared.table.load_full();
    let connected = Box::pin(async {
        tokio::select! {
            biased;
            r = connect(&cfg, &table, digest, preamble, client) => r,
            () = kill.cancelled() => Err((ConnError::Shutdown, None)),
        }
    })
    .await;
    let (index, backend, _slot) = connected.inspect_err(|(e, _)| {
        if let ConnError::Shutdown = e {
            set_reset_on_close(client);
        }
    })?;
    let be = &table.backends[index];
    let name = be.name.clone();
    be.metrics.bytes_to_backend.increment(preamble.len() as u64);
    let forwarded = (head.filled - start) as u64;
    drop(buf); // nothing of the header phase lives on into a long connection

    // Phase 4: forward both ways.
    let activity = Activity::new();
    let options = ForwardOptions {
        idle_timeout: cfg.idle_timeout,
        splice: cfg.splice,
    };
    let owner_change = cfg.owner_change;
    drop(cfg); // a reload's new settings are for new connections
    let mut forward = Forward::new(
        client,
        &backend,
        &be.metrics.bytes_to_backend,
        &be.metrics.bytes_to_client,
        options,
        shared.metrics.splice_fallbacks(),
        &activity,
    );
    let forwarded_result = match owner_change {
        OwnerChange::Keep => forward.run(kill).await,
        // Boxed: only connections under this policy carry the watcher's state.
        OwnerChange::Close { grace } => {
            Box::pin(forward_watched(
                shared,
                &mut forward,
                kill,
                digest,
                name.clone(),
                grace,
            ))
            .await
        }
    };
    match forwarded_result {
        Ok(mut t) => {
            t.to_backend += forwarded;
            Ok((name, t))
        }
        Err(e) => {
            // Every way forwarding ends early is reset on both sides: the healthy side of
            // a broken connection learns by RST, and a connection cut by the idle timeout
            // or the drain deadline — bytes may still be in flight — must not end in a FIN
            // that makes the truncation look like a clean end.
            set_reset_on_close(client);
            set_reset_on_close(&backend);
            Err((e, Some(name)))
        }
    }
}

/// Forwards until done, or until the key's owner has moved away from `backend` for `grace`
/// (owner-change policy `close`): then the forwarder is cut as at the drain deadline and the
/// connection ends with [`ConnError::OwnerChanged`] (and is reset, as every cut one is).
async fn forward_watched(
    shared: &Shared,
    forward: &mut Forward<'_>,
    kill: &CancellationToken,
    digest: KeyDigest,
    backend: Arc<str>,
    grace: Duration,
) -> Result<Transfer, ConnError> {
    let cut = kill.child_token();
    let mut run = std::pin::pin!(forward.run(&cut));
    tokio::select! {
        r = run.as_mut() => r,
        () = owner_moved(shared, digest, backend, grace) => {
            cut.cancel();
            let _ = run.await;
            shared.metrics.owner_change_closed();
            Err(ConnError::OwnerChanged)
        }
    }
}

/// Resolves once `backend` has stopped being where the key's new connections go and stayed
/// so for `grace` (a key that moves back within the grace keeps its connection).
async fn owner_moved(shared: &Shared, digest: KeyDigest, backend: Arc<str>, grace: Duration) {
    let mut epochs = shared.routing_epoch.subscribe();
    loop {
        if epochs.changed().await.is_err() {
            return std::future::pending().await;
        }
        if crate::control::owns(shared, digest, &backend) {
            continue;
        }
        tokio::time::sleep(grace).await;
        epochs.borrow_and_update();
        if !crate::control::owns(shared, digest, &backend) {
            return;
        }
    }
}

/// The DSR phase: peeks the key header (under the header deadline) and, if the key's first
/// choice has an agent and the key is one to hand off, hands the connection to it. `Ok(Some)`
/// names the backend that now owns the connection (the socket is in repair mode: close it
/// without another call); `Ok(None)` leaves it to the spliced path, header still queued.
///
/// A handed-off connection holds a slot of its backend's `max_connections` until its agent
/// reports it closed (the flow's record keeps it). A backend at its cap is not handed off:
/// the spliced path fails the connection with `backend_full`, as it does every connection
/// for a full backend.
async fn hand_off(
    shared: &Shared,
    dsr: &crate::dsr::handoff::Dsr,
    client: &TcpStream,
    kill: &CancellationToken,
) -> Result<Option<Arc<str>>, ConnError> {
    let cfg = shared.config.load_full();
    let fmt = cfg.header;
    let mut buf = Vec::new();
    let head = tokio::select! {
        biased;
        r = timeout(cfg.header_timeout, peek_header(client, &fmt, &mut buf)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(HeaderError::Timeout.into()),
        },
        () = kill.cancelled() => return Err(ConnError::Shutdown),
    };
    let key = match fmt.parse(&buf[..head.filled]) {
        Parse::Done { key, .. } => key,
        _ => return Err(HeaderError::Eof.into()),
    };
    if !dsr.config().wants(key) {
        return Ok(None);
    }
    let table = shared.table.load();
    let Some(index) = table.pick(KeyDigest::of(key), &[]) else {
        return Ok(None);
    };
    let be = &table.backends[index];
    let Some(agent) = be.agent else {
        return Ok(None);
    };
    let Some(slot) = be.state.try_reserve(be.max_connections) else {
        return Ok(None);
    };
    let strip = match fmt.mode {
        HeaderMode::Forward => 0,
        HeaderMode::Strip => head.consumed,
    };
    let name = be.name.clone();
    // Not cut by the drain deadline: a hand-off dropped half-way would leave the socket
    // frozen (or its flow steered), and it is bounded by the hand-off timeout anyway.
    // A failed hand-off has given the slot back by the time it returns: the spliced path
    // takes its own.
    match dsr.hand_off(client, agent, &name, strip, slot).await {
        Ok(()) => Ok(Some(name)),
        Err(crate::dsr::handoff::HandoffResult::LostAfterSteer) => Err(ConnError::Forward {
            side: Side::Backend,
            source: io::Error::other("DSR hand-off lost after steering"),
        }),
        Err(_) => Ok(None),
    }
}

/// Where the header ended in the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeaderRead {
    /// Bytes the header occupies.
    pub consumed: usize,
    /// Bytes received (header plus any payload that arrived with it).
    pub filled: usize,
}

/// Reads (consuming) until the header is complete; returns the bytes read and where the
/// header ends in them. The buffer starts at [`FIRST_READ`] bytes and grows only to the
/// header the client announced, so a client can never make the proxy buffer more than
/// `max(FIRST_READ, its header)` — and a slow one, before it sent a length, no more than
/// [`FIRST_READ`].
pub(crate) async fn read_header(
    client: &TcpStream,
    fmt: &HeaderFormat,
) -> Result<(Vec<u8>, HeaderRead), ConnError> {
    let mut buf = vec![0u8; fmt.max_header_len().min(FIRST_READ)];
    // Clients send the header with their first packet, so it is usually queued by the time
    // the connection is accepted: read it at once instead of waiting for the poller to
    // report what the kernel already has (saves a trip through the event loop). A read that
    // drains the socket clears readiness (as in the forwarding pumps), so the client's pump
    // does not start with an EAGAIN read.
    let mut filled = match recv_draining(client, &mut buf, true) {
        Ok(0) => return Err(HeaderError::Eof.into()),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(ConnError::HeaderIo(e)),
    };
    loop {
        match fmt.parse(&buf[..filled]) {
            Parse::Need(more) => {
                // Room for exactly the rest of the header (known once the length is).
                if buf.len() < filled + more {
                    buf.resize(filled + more, 0);
                }
            }
            Parse::Done { consumed, .. } => return Ok((buf, HeaderRead { consumed, filled })),
            Parse::Error(e) => return Err(e.into()),
        }
        client.readable().await.map_err(ConnError::HeaderIo)?;
        match client.try_read(&mut buf[filled..]) {
            Ok(0) => return Err(HeaderError::Eof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ConnError::HeaderIo(e)),
        }
    }
}

/// Like [`read_header`] but with `MSG_PEEK`: the bytes stay queued in the socket (so a
/// connection can be handed off with them, docs/design.md §6). Waits for *new* bytes between
/// peeks by clearing readiness when a peek sees nothing new. `buf` grows as
/// [`read_header`]'s does: from [`FIRST_READ`] bytes to the header the client announced.
pub(crate) async fn peek_header(
    client: &TcpStream,
    fmt: &HeaderFormat,
    buf: &mut Vec<u8>,
) -> Result<HeaderRead, ConnError> {
    buf.clear();
    buf.resize(fmt.max_header_len().min(FIRST_READ), 0);
    let mut seen = 0;
    loop {
        let ready = client
            .ready(Interest::READABLE)
            .await
            .map_err(ConnError::HeaderIo)?;
        // Closed states stay set once seen, so FIN with nothing new must end the loop here.
        let closed = ready.is_read_closed();
        let peeked = client.try_io(Interest::READABLE, || {
            let n = recv(
                client.as_raw_fd(),
                buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            if n == seen && !closed {
                // Nothing new: clear readiness so the next wait sleeps until more arrives.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match peeked {
            Ok(n) if n == seen => return Err(HeaderError::Eof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ConnError::HeaderIo(e)),
        };
        seen = n;
        match fmt.parse(&buf[..n]) {
            Parse::Need(more) => {
                if buf.len() < n + more {
                    buf.resize(n + more, 0);
                }
            }
            Parse::Done { consumed, .. } => {
                return Ok(HeaderRead {
                    consumed,
                    filled: n,
                })
            }
            Parse::Error(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn peek_leaves_bytes_queued_and_waits_for_more() {
        let (mut c, s) = pair().await;
        let fmt = HeaderFormat::default();
        let mut buf = Vec::new();
        c.write_all(b"\x00\x05ab").await.unwrap();
        let peek = tokio::spawn(async move {
            let r = peek_header(&s, &fmt, &mut buf)
                .await
                .map_err(|e| e.to_string());
            (r, s)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        c.write_all(b"cdeTAIL").await.unwrap();
        let (r, s) = peek.await.unwrap();
        assert_eq!(
            r.unwrap(),
            HeaderRead {
                consumed: 7,
                filled: 11
            }
        );
        // Everything is still queued: a consuming read gets the same header.
        let (buf, r) = read_header(&s, &fmt).await.unwrap();
        assert_eq!(r.consumed, 7);
        assert_eq!(&buf[..r.filled], b"\x00\x05abcdeTAIL");
    }

    #[tokio::test]
    async fn peek_reports_eof_and_bad_headers() {
        let (mut c, s) = pair().await;
        let fmt = HeaderFormat::default();
        let mut buf = Vec::new();
        c.write_all(b"\x00").await.unwrap();
        drop(c);
        let e = peek_header(&s, &fmt, &mut buf).await.unwrap_err();
        assert!(matches!(e, ConnError::Header(HeaderError::Eof)), "{e}");

        let (mut c, s) = pair().await;
        c.write_all(b"\x00\x00").await.unwrap();
        let e = peek_header(&s, &fmt, &mut buf).await.unwrap_err();
        assert!(
            matches!(e, ConnError::Header(HeaderError::ZeroLength)),
            "{e}"
        );
    }
}

#[cfg(test)]
mod dsr_tests {
    use super::*;
    use crate::dsr::handoff::{Dsr, HandoffResult};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn handoffs(metrics: &crate::metrics::Metrics, result: &str) -> String {
        let want = format!("shardproxy_dsr_handoffs_total{{result=\"{result}\"}} ");
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .unwrap_or("absent")
            .to_owned()
    }

    /// The DSR phase takes a slot of the backend's `max_connections` for the hand-off, and
    /// does not hand off a connection for a backend at its cap: it goes on to the spliced
    /// path (which fails it with `backend_full`), as every connection for a full backend.
    #[tokio::test]
    async fn a_backend_at_its_cap_is_not_handed_off() {
        let cfg = crate::config::ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec!["b1=127.0.0.1:1,agent=127.0.0.1:7100,max_connections=1"
                .parse()
                .unwrap()],
        );
        let metrics = crate::metrics::Metrics::new();
        let table = crate::routing::RoutingTable::build(&cfg.backends, 1, &metrics).unwrap();
        let shared = super::super::Shared::for_tests(cfg, table, metrics.clone());
        // Steering "never started": every attempt falls back, counted nft_missing.
        let dsr = Dsr::for_tests(HandoffResult::NftMissing, metrics.dsr());
        let state = shared.table.load().backends[0].state.clone();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let kill = CancellationToken::new();

        // A client that sent the header for key `k1` and some data; the DSR phase's answer.
        let offer = || async {
            let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            c.write_all(b"\x00\x02k1data").await.unwrap();
            let r = hand_off(&shared, &dsr, &s, &kill)
                .await
                .map_err(|e| e.to_string());
            (c, s, r)
        };

        // Room under the cap: the hand-off is tried (and falls back), its slot given back.
        let (_c, _s, r) = offer().await;
        assert_eq!(r, Ok(None));
        assert_eq!(handoffs(&metrics, "nft_missing"), "1");
        assert_eq!(state.active(), 0, "a fallen-back hand-off kept its slot");

        // At the cap: not tried at all, left to the spliced path with the header queued.
        let _held = state.try_reserve(Some(1)).expect("the one slot");
        let (_c, s, r) = offer().await;
        assert_eq!(r, Ok(None));
        assert_eq!(
            handoffs(&metrics, "nft_missing"),
            "1",
            "a connection for a full backend was offered to its agent"
        );
        assert_eq!(state.active(), 1);
        let (buf, head) = read_header(&s, &HeaderFormat::default()).await.unwrap();
        assert_eq!(&buf[..head.filled], b"\x00\x02k1data");
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// An idle connection holds little more than this future (docs/design.md §5: ≤ 2 KiB of proxy
    /// memory per established connection); a careless `select!` or a moved future can
    /// double it without any test noticing, so this one notices.
    #[test]
    fn connection_future_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cfg = crate::config::ProxyConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                vec!["a=127.0.0.1:1".parse().unwrap()],
            );
            let metrics = crate::metrics::Metrics::new();
            let table = crate::routing::RoutingTable::build(&cfg.backends, 1, &metrics).unwrap();
            let shared = Arc::new(super::super::Shared::for_tests(cfg, table, metrics));
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let pending = super::super::admission::PendingHeader::for_tests();
            let f = serve(shared, c, CancellationToken::new(), pending);
            let size = std::mem::size_of_val(&f);
            // serve's and phases' arguments each hold the header-phase guard; the boxed DSR
            // phase adds its pointer (8 bytes).
            let guard = 2 * std::mem::size_of::<super::super::admission::PendingHeader>();
            assert!(
                size <= 712 + guard,
                "a connection's future grew to {size} bytes"
            );
        });
    }
}
