//! Admission: connections still in the header phase cannot starve good clients.
//!
//! - A slow-header flood from one host fills only that host's share of the header phase
//!   (`--max-pending-headers-per-source`); the rest of it is closed at once and counted, and a
//!   good client on another address keeps being served.
//! - At `--max-connections` the proxy stops accepting instead of accepting and closing: a new
//!   client waits in the kernel backlog and is served once a slot frees.
//! - The per-source cap counts per source and never affects another source; a burst whose
//!   headers are already queued is not taken for a flood.
//! - A full header-phase budget pauses accepting (clients wait, then are served).
//! - A persistent accept error (not fd exhaustion) backs off instead of spinning.
//!
//! The flood and the good client look like different hosts by binding their sockets to
//! 127.0.0.1 and 127.0.0.2.

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shardproxy::fixtures::client::read_name;
use shardproxy::HeaderFormat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Hang guard for a whole test (never a timing assertion).
const GUARD: Duration = Duration::from_secs(120);
/// The flooding host.
const FLOOD_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// The well-behaved host.
const GOOD_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Runs `fut` under the hang guard.
async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("hang guard: test did not finish within {GUARD:?}"))
}

/// Connects to `addr` from `source` (port chosen by the kernel).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// One keyed round trip from `source`: header and payload out, half-close, then the backend's
/// name and the echo back, verified byte for byte.
async fn round_trip_from(
    source: IpAddr,
    addr: SocketAddr,
    key: &[u8],
    payload: &[u8],
) -> io::Result<String> {
    let fmt = HeaderFormat::default();
    let mut wire = fmt
        .encode(key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    wire.extend_from_slice(payload);
    let mut s = connect_from(source, addr).await?;
    s.write_all(&wire).await?;
    s.shutdown().await?;
    let name = read_name(&mut s).await?;
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed).await?;
    if echoed != wire {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "echo differs: sent {} bytes, got {}",
                wire.len(),
                echoed.len()
            ),
        ));
    }
    Ok(name)
}

/// A `shardproxy_connections_rejected_total` sample.
fn rejected(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("shardproxy_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// Polls the metrics until `ready` holds for them; returns them then.
async fn wait_metrics(proxy: &shardproxy::ProxyHandle, ready: impl Fn(&str) -> bool) -> String {
    loop {
        let text = proxy.metrics_text();
        if ready(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raises the soft fd limit (the proxy runs in this process, so its fds count here too) and
/// checks the test can hold what it plans to.
fn fds_for(needed: u64) {
    let limit = shardproxy::proxy::sockopt::raise_fd_limit().expect("raise the fd limit");
    assert!(
        limit >= needed,
        "this test needs a soft fd limit of at least {needed} (it is {limit}): run `ulimit -n {needed}`"
    );
}

/// Sockets the flooding host keeps trickling header bytes on.
const FLOOD: usize = 2500;
/// A flood socket the proxy closed reconnects after this pause (bounds the churn).
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Round trips the good host makes, one after the other.
const GOOD_TRIPS: usize = 200;
/// Pause before each good round trip.
const GOOD_PAUSE: Duration = Duration::from_millis(10);

/// One flood socket: connect, announce a 255-byte key and send one byte of it per second —
/// the header never completes — until the proxy closes it; then reconnect after a pause.
async fn slow_header_flooder(addr: SocketAddr, stop: CancellationToken, connects: Arc<AtomicU64>) {
    while !stop.is_cancelled() {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            r = connect_from(FLOOD_HOST, addr) => r,
        };
        if let Ok(mut s) = connected {
            connects.fetch_add(1, Ordering::Relaxed);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut next = [0x00u8, 0xFF].into_iter().chain(std::iter::repeat(b'x'));
            let mut buf = [0u8; 16];
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    // The proxy never answers a header in progress: any read result is its close.
                    _ = s.read(&mut buf) => break,
                    _ = tick.tick() => {
                        let byte = next.next().unwrap_or(b'x');
                        if s.write_all(&[byte]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}

/// 2,500 sockets from one host trickle header bytes against a proxy with room for 1,000
/// connections and the default header deadline and budgets; meanwhile a good client on another
/// host makes 200 keyed round trips one after the other. Nearly all of them must succeed, and
/// the flood's closed connections must be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_flood_from_one_host_does_not_lock_out_another() {
    // Flood sockets, their proxy-side peers, and room for the rest.
    fds_for(2 * FLOOD as u64 + 2000);
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |c| c.max_connections = 1000).await;
        let addr = proxy.local_addr();
        let stop = CancellationToken::new();
        let connects = Arc::new(AtomicU64::new(0));
        let flood: Vec<_> = (0..FLOOD)
            .map(|_| tokio::spawn(slow_header_flooder(addr, stop.clone(), connects.clone())))
            .collect();
        // Every flood socket has connected once and the proxy has taken each off its backlog.
        while connects.load(Ordering::Relaxed) < FLOOD as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_metrics(&proxy, |t| {
            metric(t, "shardproxy_connections_accepted_total") >= FLOOD as f64
        })
        .await;

        let mut ok = 0;
        let mut failures = Vec::new();
        for i in 0..GOOD_TRIPS {
            // Spread over a few of the flood's reconnect rounds, so the good client meets the
            // flood's churn and not only its first wave.
            tokio::time::sleep(GOOD_PAUSE).await;
            let payload = format!("good round trip {i}").into_bytes();
            let key = key(i);
            let trip = tokio::time::timeout(
                Duration::from_secs(20),
                round_trip_from(GOOD_HOST, addr, &key, &payload),
            )
            .await;
            match trip {
                Ok(Ok(name)) => {
                    assert_eq!(name, "b1");
                    ok += 1;
                }
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(_) => failures.push("no answer within 20 s".to_string()),
            }
        }
        stop.cancel();
        for t in flood {
            t.await.expect("flood task");
        }
        let text = proxy.metrics_text();
        let rate = ok as f64 / GOOD_TRIPS as f64;
        eprintln!(
            "good client: {ok}/{GOOD_TRIPS} round trips ({:.1} %) during the flood; \
             flood connects: {}; rejected(source_pending_headers) = {}, \
             rejected(max_connections) = {}; first failures: {:?}",
            rate * 100.0,
            connects.load(Ordering::Relaxed),
            rejected(&text, "source_pending_headers"),
            rejected(&text, "max_connections"),
            &failures[..failures.len().min(3)],
        );
        assert!(
            rate >= 0.99,
            "only {ok}/{GOOD_TRIPS} good round trips succeeded during a one-host slow-header \
             flood; first failures: {:?}",
            &failures[..failures.len().min(5)]
        );
        // Most of the flood was turned away at once, and counted as such.
        assert!(
            rejected(&text, "source_pending_headers") >= (FLOOD / 2) as f64,
            "the flood's closed connections were not counted:\n{text}"
        );
    })
    .await;
}

/// Connects from `source` and sends nothing: a connection that stays in the header phase.
async fn silent_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    connect_from(source, addr).await.expect("connect")
}

/// Waits for the proxy to close `s` (EOF or reset) and fails if it sends anything.
async fn expect_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf).await {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected the proxy to close, got {other:?}"),
    }
}

/// Fails if the proxy closed `s` or sent anything on it (without blocking).
fn expect_open(s: &TcpStream, what: &str) {
    let mut buf = [0u8; 1];
    match s.try_read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("{what} was closed or answered: {other:?}"),
    }
}

const PENDING: &str = "shardproxy_connections_pending_headers";
const ACCEPTED: &str = "shardproxy_connections_accepted_total";

/// Each source may hold 4 connections in the header phase: a fifth from 127.0.0.1 is closed
/// at once and counted, while 127.0.0.2 still gets its 4 and 127.0.0.3 its round trips. A
/// completed header leaves the count, so 127.0.0.1 has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_cap_counts_and_never_affects_another_source() {
    const CAP: usize = 4;
    let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
        [127, 0, 0, 1].into(),
        [127, 0, 0, 2].into(),
        [127, 0, 0, 3].into(),
    );
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |cfg| {
            cfg.header_timeout = Duration::from_secs(60);
            cfg.max_pending_headers_per_source = Some(CAP);
        })
        .await;
        let addr = proxy.local_addr();
        let mut from_a = Vec::new();
        for _ in 0..CAP {
            from_a.push(silent_from(a, addr).await);
        }
        wait_metrics(&proxy, |t| metric(t, PENDING) >= CAP as f64).await;

        // Reset so soon that the connect itself may report it.
        match connect_from(a, addr).await {
            Ok(mut over) => tokio::time::timeout(
                Duration::from_secs(20),
                expect_closed(
                    &mut over,
                    "the fifth header-phase connection from 127.0.0.1",
                ),
            )
            .await
            .expect("the fifth header-phase connection from 127.0.0.1 was left open"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        let text = proxy.metrics_text();
        assert_eq!(rejected(&text, "source_pending_headers"), 1.0, "{text}");

        // Another source is not affected by the first being at its cap.
        let mut from_b = Vec::new();
        for _ in 0..CAP {
            from_b.push(silent_from(b, addr).await);
        }
        wait_metrics(&proxy, |t| metric(t, PENDING) >= 2.0 * CAP as f64).await;
        for i in 0..10 {
            let name = round_trip_from(c, addr, &key(i), b"from a third host")
                .await
                .expect("round trip from 127.0.0.3");
            assert_eq!(name, "b1");
        }
        for (i, s) in from_a.iter().chain(&from_b).enumerate() {
            expect_open(s, &format!("silent connection {i}"));
        }

        // A completed header frees its source's slot: 127.0.0.1 gets in again.
        let header = HeaderFormat::default()
            .encode(b"late but complete")
            .unwrap();
        from_a[0].write_all(&header).await.unwrap();
        assert_eq!(read_name(&mut from_a[0]).await.unwrap(), "b1");
        let name = round_trip_from(a, addr, b"room again", b"after a header completed")
            .await
            .expect("127.0.0.1 has room after one of its headers completed");
        assert_eq!(name, "b1");

        let text = proxy.metrics_text();
        assert_eq!(rejected(&text, "source_pending_headers"), 1.0, "{text}");
        assert_eq!(metric(&text, PENDING), (2 * CAP - 1) as f64, "{text}");
        drop((from_a, from_b));
        wait_metrics(&proxy, |t| metric(t, PENDING) == 0.0).await;
    })
    .await;
}

/// A burst from one host, larger than its cap, whose headers are already queued when the proxy
/// gets to them, is served whole: before closing a connection over the cap, the accept loop
/// lets the ones it accepted just before read their (complete) headers and leave the count.
/// A current-thread runtime makes the burst deterministic: the test queues every connection
/// before the accept loop first runs.
#[tokio::test(flavor = "current_thread")]
async fn burst_with_headers_queued_is_not_taken_for_a_flood() {
    const CAP: usize = 4;
    const BURST: usize = 20;
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |cfg| {
            cfg.max_pending_headers_per_source = Some(CAP);
        })
        .await;
        let addr = proxy.local_addr();
        let fmt = HeaderFormat::default();
        let mut wires = Vec::new();
        let mut queued = Vec::new();
        // Blocking calls: the runtime (and with it the accept loop) does not run meanwhile.
        for i in 0..BURST {
            use std::io::Write;
            let mut wire = fmt.encode(&key(i)).unwrap();
            wire.extend_from_slice(format!("burst {i}").as_bytes());
            let mut s = std::net::TcpStream::connect(addr).expect("connect into the backlog");
            s.write_all(&wire).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s.set_nonblocking(true).unwrap();
            queued.push(TcpStream::from_std(s).unwrap());
            wires.push(wire);
        }
        for (i, (mut s, wire)) in queued.into_iter().zip(wires).enumerate() {
            let name = read_name(&mut s)
                .await
                .unwrap_or_else(|e| panic!("burst connection {i} was not served: {e}"));
            assert_eq!(name, "b1");
            let mut echoed = Vec::new();
            s.read_to_end(&mut echoed).await.unwrap();
            assert_eq!(echoed, wire, "burst connection {i}");
        }
        let text = proxy.metrics_text();
        assert_eq!(rejected(&text, "source_pending_headers"), 0.0, "{text}");
    })
    .await;
}

/// At `max_connections` the proxy stops accepting: a new client's connect completes in the
/// kernel, nothing closes it, and it is served once a slot frees. While waiting for a slot
/// the accept loop still stops at once on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_new_clients_wait_and_are_served() {
    const PAUSED: &str = "shardproxy_accept_paused_total{reason=\"max_connections\"}";
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |cfg| {
            cfg.max_connections = 2;
            cfg.drain_timeout = Duration::from_secs(60);
        })
        .await;
        let addr = proxy.local_addr();
        let fmt = HeaderFormat::default();
        // Two established connections hold the limit.
        let mut held = Vec::new();
        for i in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&fmt.encode(&key(i)).unwrap()).await.unwrap();
            assert_eq!(read_name(&mut s).await.unwrap(), "b1");
            held.push(s);
        }

        let mut wire = fmt.encode(b"waiting").unwrap();
        wire.extend_from_slice(b"served once a slot frees");
        let mut waiting = TcpStream::connect(addr)
            .await
            .expect("the kernel completes the connect");
        waiting.write_all(&wire).await.unwrap();
        waiting.shutdown().await.unwrap();
        // The accept loop took it off the backlog, or will: either way it must not close it.
        // Give a close every chance to arrive, then check there was none.
        wait_metrics(&proxy, |t| metric(t, ACCEPTED) >= 3.0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        expect_open(&waiting, "the client waiting for a slot");
        assert_eq!(metric(&proxy.metrics_text(), PAUSED), 1.0);

        // A slot frees: the waiting client is served.
        drop(held.pop());
        assert_eq!(read_name(&mut waiting).await.unwrap(), "b1");
        let mut echoed = Vec::new();
        waiting.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, wire);
        let text = proxy.metrics_text();
        assert_eq!(rejected(&text, "max_connections"), 0.0, "{text}");

        // Full again, with a client held by the accept loop: shutdown still stops accepting
        // (the listener closes, so new connects are refused) although no slot frees.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&fmt.encode(b"again").unwrap()).await.unwrap();
        assert_eq!(read_name(&mut s).await.unwrap(), "b1");
        held.push(s);
        let _parked = TcpStream::connect(addr).await.unwrap();
        wait_metrics(&proxy, |t| metric(t, ACCEPTED) >= 5.0).await;
        wait_metrics(&proxy, |t| metric(t, PAUSED) >= 2.0).await;
        let shutdown = tokio::spawn(proxy.shutdown());
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        drop(held);
        assert_eq!(
            shutdown.await.unwrap(),
            0,
            "the held connections ended by themselves"
        );
    })
    .await;
}

/// The raw fd of this process's listening socket bound to `addr`.
fn listener_fd(addr: SocketAddr) -> std::os::fd::RawFd {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let want = SockaddrStorage::from(addr);
    std::fs::read_dir("/proc/self/fd")
        .expect("list fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|fd| {
            getsockname::<SockaddrStorage>(*fd).is_ok_and(|a| a == want)
                && getpeername::<SockaddrStorage>(*fd).is_err()
        })
        .expect("the proxy's listening socket")
}

/// An accept error other than fd exhaustion that persists: `shutdown(SHUT_RD)` on a listening
/// socket leaves it readable for ever while every `accept` fails with EINVAL. The accept loop
/// must back off instead of spinning on it (a spin makes thousands of failed accepts a second
/// even on a starved core), count the errors, and still stop on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_accept_error_backs_off() {
    const ERRORS: &str = "shardproxy_accept_errors_total{reason=\"other\"}";
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |_| {}).await;
        let fd = listener_fd(proxy.local_addr());
        nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read)
            .expect("shut the listener's read side");
        let first = wait_metrics(&proxy, |t| metric(t, ERRORS) >= 1.0).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = proxy.metrics_text();
        let errors = metric(&text, ERRORS) - metric(&first, ERRORS);
        // Backing off: a few immediate retries, then pauses of 10, 20, 40 ... ms.
        assert!(
            errors <= 50.0,
            "{errors} failed accepts in 1 s on a persistently failing listener: accept spins"
        );
        assert_eq!(
            metric(
                &text,
                "shardproxy_accept_errors_total{reason=\"fd_exhausted\"}"
            ),
            0.0
        );
        proxy.shutdown().await;
    })
    .await;
}

/// With the header-phase budget full (silent clients from several hosts), the proxy stops
/// accepting rather than closing: a new client waits, unanswered but open, and is served once
/// a silent client completes its header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_header_budget_pauses_accepting() {
    const PAUSED: &str = "shardproxy_accept_paused_total{reason=\"pending_headers\"}";
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |cfg| {
            cfg.header_timeout = Duration::from_secs(60);
            cfg.max_pending_headers = Some(2);
            cfg.max_pending_headers_per_source = Some(1);
        })
        .await;
        let addr = proxy.local_addr();
        let fmt = HeaderFormat::default();
        let mut silent = [
            silent_from([127, 0, 0, 1].into(), addr).await,
            silent_from([127, 0, 0, 2].into(), addr).await,
        ];
        wait_metrics(&proxy, |t| metric(t, PENDING) >= 2.0).await;

        let mut wire = fmt.encode(b"after the budget").unwrap();
        wire.extend_from_slice(b"served once a header completes");
        let mut waiting = connect_from([127, 0, 0, 3].into(), addr).await.unwrap();
        waiting.write_all(&wire).await.unwrap();
        waiting.shutdown().await.unwrap();
        wait_metrics(&proxy, |t| metric(t, ACCEPTED) >= 3.0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        expect_open(&waiting, "the client waiting for a header-phase slot");
        assert_eq!(metric(&proxy.metrics_text(), PAUSED), 1.0);

        // One silent client completes its header: its slot goes to the waiting one.
        silent[0]
            .write_all(&fmt.encode(b"finally").unwrap())
            .await
            .unwrap();
        assert_eq!(read_name(&mut silent[0]).await.unwrap(), "b1");
        assert_eq!(read_name(&mut waiting).await.unwrap(), "b1");
        let mut echoed = Vec::new();
        waiting.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, wire);
        expect_open(&silent[1], "the other silent client");
        let text = proxy.metrics_text();
        assert_eq!(rejected(&text, "source_pending_headers"), 0.0, "{text}");
    })
    .await;
}
