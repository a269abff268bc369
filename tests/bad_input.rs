//! Bad key headers: each kind (zero length, too long, EOF inside the header, silence, a
//! dribble slower than the header deadline) is closed before any backend is contacted and
//! counted once in `shardproxy_header_errors_total{reason}`. Also: good connections keep
//! working while bad ones are open or flooding in, and the header deadline ends with the
//! header phase (go-proxyproto#65).
//!
//! "No backend contacted" is proved by a [`CountingBackend`] that counts every accept; a
//! control test shows that a valid header does reach it, so the zero counts can fail.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use shardproxy::config::{BackendSpec, ProxyConfig};
use shardproxy::fixtures::client::{read_name, round_trip};
use shardproxy::header::{HeaderError, Parse};
use shardproxy::{HeaderFormat, ProxyHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hang guard for every test (never a timing assertion).
const GUARD: Duration = Duration::from_secs(60);
/// The short header deadline the timeout cases use.
const SHORT_HEADER_TIMEOUT: Duration = Duration::from_millis(300);

/// Runs `fut` under the hang guard.
async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("hang guard: test did not finish within {GUARD:?}"))
}

/// The `shardproxy_header_errors_total` sample for `reason`.
fn header_sample(reason: &str) -> String {
    format!("shardproxy_header_errors_total{{reason=\"{reason}\"}}")
}

/// Every header error count, in `HeaderError::ALL` order.
fn header_errors(text: &str) -> Vec<(&'static str, f64)> {
    HeaderError::ALL
        .iter()
        .map(|e| (e.reason(), metric(text, &header_sample(e.reason()))))
        .collect()
}

/// `shardproxy_backend_connections_total` for `backend`.
fn backend_connections(text: &str, backend: &str) -> f64 {
    metric(
        text,
        &format!("shardproxy_backend_connections_total{{backend=\"{backend}\"}}"),
    )
}

/// Polls until the sum of header errors reaches `n` (the proxy closes a connection just
/// before it counts it, so the client can see the close first); returns the metrics then.
async fn wait_header_errors(proxy: &ProxyHandle, n: f64) -> String {
    loop {
        let text = scrape(proxy).await;
        let sum: f64 = header_errors(&text).iter().map(|(_, v)| v).sum();
        if sum >= n {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy whose only backend is a [`CountingBackend`] named `counting`.
async fn counting_proxy(tweak: impl FnOnce(&mut ProxyConfig)) -> (ProxyHandle, CountingBackend) {
    let counting = CountingBackend::start().await;
    let spec = BackendSpec {
        name: "counting".to_string(),
        addr: counting.addr,
        weight: 1,
        agent: None,
        max_connections: None,
        proxy_protocol: None,
    };
    (start_proxy(vec![spec], tweak).await, counting)
}

/// The proxy never writes to a client whose header is bad: the next read must report the
/// close (EOF, or ECONNRESET when unread bytes were discarded).
async fn expect_closed(s: &mut TcpStream, case: &str) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf).await {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{case}: expected the proxy to close, got {other:?}"),
    }
}

/// Waits for exactly one header error, for `reason`, and checks no backend was contacted.
async fn expect_one_header_error(proxy: &ProxyHandle, counting: &CountingBackend, reason: &str) {
    let text = wait_header_errors(proxy, 1.0).await;
    for (r, v) in header_errors(&text) {
        let want = if r == reason { 1.0 } else { 0.0 };
        assert_eq!(
            v, want,
            "header errors for reason {r} (case {reason})\n{text}"
        );
    }
    assert_eq!(counting.accepted(), 0, "{reason}: a backend was contacted");
    assert_eq!(backend_connections(&text, "counting"), 0.0, "{text}");
}

/// Connects, sends `bytes`, optionally half-closes, and expects the proxy to close and count
/// one header error for `reason`.
async fn bad_header_case(
    tweak: impl FnOnce(&mut ProxyConfig),
    bytes: &[u8],
    half_close: bool,
    reason: &str,
) {
    let (proxy, counting) = counting_proxy(tweak).await;
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    expect_closed(&mut s, reason).await;
    expect_one_header_error(&proxy, &counting, reason).await;
}

/// Control: a valid header does reach the counting backend, so `accepted() == 0` elsewhere is
/// a real observation. Also pins the boundary: a key of exactly `max_key_len` is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_valid_header_contacts_backend() {
    guard(async {
        let (proxy, counting) = counting_proxy(|c| c.header.max_key_len = 16).await;
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(b"\x00\x10").await.unwrap();
        s.write_all(&[b'k'; 16]).await.unwrap();
        while counting.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counting.accepted(), 1);
        let text = scrape(&proxy).await;
        assert!(
            header_errors(&text).iter().all(|(_, v)| *v == 0.0),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_is_rejected() {
    guard(bad_header_case(|_| {}, b"\x00\x00", false, "zero_length")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_with_trailing_bytes_is_rejected() {
    guard(bad_header_case(
        |_| {},
        b"\x00\x00payload",
        false,
        "zero_length",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_over_max_key_len_is_rejected() {
    guard(bad_header_case(
        |c| c.header.max_key_len = 16,
        b"\x00\x11",
        false,
        "too_long",
    ))
    .await;
}

/// The length alone decides: the proxy rejects without waiting for the 17 key bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_u16_length_is_rejected() {
    guard(bad_header_case(
        |c| c.header.max_key_len = 16,
        b"\xff\xff",
        false,
        "too_long",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eof_inside_header_is_rejected() {
    guard(bad_header_case(|_| {}, b"\x00\x05ab", true, "eof")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eof_inside_length_field_is_rejected() {
    guard(bad_header_case(|_| {}, b"\x00", true, "eof")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_past_header_timeout_is_rejected() {
    guard(bad_header_case(
        |c| c.header_timeout = SHORT_HEADER_TIMEOUT,
        b"",
        false,
        "timeout",
    ))
    .await;
}

/// One byte every 100 ms: each read makes progress, but the deadline covers the whole header,
/// so a 257-byte header can never complete under a 300 ms deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribble_slower_than_header_timeout_is_rejected() {
    guard(async {
        let (proxy, counting) = counting_proxy(|c| c.header_timeout = SHORT_HEADER_TIMEOUT).await;
        let mut wire = vec![0x00, 0xFF];
        wire.extend_from_slice(&[b'd'; 255]);
        let s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let mut sent = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => {
                    match r {
                        Ok(0) => break,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                        other => panic!("dribble: expected the proxy to close, got {other:?}"),
                    }
                }
                _ = tick.tick(), if sent < wire.len() => {
                    if wr.write_all(&wire[sent..sent + 1]).await.is_err() {
                        // Already closed by the proxy; the read reports how.
                        sent = wire.len();
                    } else {
                        sent += 1;
                    }
                }
            }
        }
        assert!(sent > 0, "the dribble never started");
        expect_one_header_error(&proxy, &counting, "timeout").await;
    })
    .await;
}

/// Twenty silent clients hold the header phase open; a good connection is served meanwhile,
/// and the silent ones are still open after it (then counted as `eof` when they leave).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_connection_served_while_silent_clients_wait() {
    const SILENT: usize = 20;
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |c| {
            c.header_timeout = Duration::from_secs(30);
        })
        .await;
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            silent.push(TcpStream::connect(proxy.local_addr()).await.unwrap());
        }
        // All twenty are in the header phase at the proxy.
        loop {
            let text = scrape(&proxy).await;
            if metric(&text, "shardproxy_connections_active") >= SILENT as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let fmt = HeaderFormat::default();
        let reply = round_trip(
            proxy.local_addr(),
            &fmt,
            b"good",
            b"hello while others wait",
        )
        .await
        .expect("good round trip");
        assert_eq!(reply.backend, "b1");

        for (i, s) in silent.iter().enumerate() {
            let mut buf = [0u8; 1];
            match s.try_read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("silent client {i} was closed early: {other:?}"),
            }
        }
        let text = scrape(&proxy).await;
        assert!(
            header_errors(&text).iter().all(|(_, v)| *v == 0.0),
            "{text}"
        );

        drop(silent);
        let text = wait_header_errors(&proxy, SILENT as f64).await;
        assert_eq!(
            metric(&text, &header_sample("eof")),
            SILENT as f64,
            "{text}"
        );
        assert_eq!(metric(&text, &header_sample("timeout")), 0.0, "{text}");
        assert_eq!(
            backends[0].accepted(),
            1,
            "only the good connection reached b1"
        );
        assert_eq!(backend_connections(&text, "b1"), 1.0, "{text}");
    })
    .await;
}

/// The header deadline belongs to the header phase only: a connection idle for longer than it
/// after a complete header still works (go-proxyproto#65).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_deadline_does_not_outlive_the_header() {
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |c| {
            c.header_timeout = SHORT_HEADER_TIMEOUT;
        })
        .await;
        let hdr = HeaderFormat::default()
            .encode(b"idle-after-header")
            .unwrap();
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&hdr).await.unwrap();
        assert_eq!(read_name(&mut s).await.unwrap(), "b1");
        let mut echoed = vec![0u8; hdr.len()];
        s.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, hdr);

        // Idle for more than three header deadlines.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let payload = b"still here after the header deadline";
        s.write_all(payload).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, payload);
        let text = scrape(&proxy).await;
        assert!(
            header_errors(&text).iter().all(|(_, v)| *v == 0.0),
            "{text}"
        );
    })
    .await;
}

/// A garbage opening for client `i` and the header error it must cause (the client
/// half-closes after sending it). Never a valid header.
fn garbage(i: u64, fmt: &HeaderFormat) -> (Vec<u8>, &'static str) {
    let mut rng = Rng(0x6A2B_A6E0 + i);
    let mut wire = match i % 4 {
        // Random bytes of random length (0 ..= 600).
        0 => {
            let n = rng.below(601) as usize;
            rng.bytes(n)
        }
        // Zero length, then junk.
        1 => {
            let n = rng.below(64) as usize;
            let mut w = vec![0, 0];
            w.extend(rng.bytes(n));
            w
        }
        // A length over max_key_len, then junk.
        2 => {
            let len = u64::from(fmt.max_key_len) + 1 + rng.below(0xFFFF - 256);
            let mut w = (len as u16).to_be_bytes().to_vec();
            let n = rng.below(64) as usize;
            w.extend(rng.bytes(n));
            w
        }
        // A valid length with fewer key bytes than it announces.
        _ => {
            let len = 1 + rng.below(u64::from(fmt.max_key_len));
            let mut w = (len as u16).to_be_bytes().to_vec();
            let n = rng.below(len) as usize;
            w.extend(rng.bytes(n));
            w
        }
    };
    let reason = loop {
        match fmt.parse(&wire) {
            Parse::Need(_) => break HeaderError::Eof.reason(),
            Parse::Error(e) => break e.reason(),
            // Random bytes happened to form a valid header: make the length too long.
            Parse::Done { .. } => wire[0] = 0xFF,
        }
    };
    (wire, reason)
}

/// Sends garbage, half-closes, and waits for the proxy to close (it never answers).
async fn garbage_client(addr: SocketAddr, wire: Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The proxy may already have rejected the opening bytes and reset: only the close counts.
    let _ = s.write_all(&wire).await;
    let _ = s.shutdown().await;
    expect_closed(&mut s, "garbage client").await;
}

/// 200 concurrent garbage connections mixed with good ones: the proxy keeps serving, no
/// garbage reaches a backend, and every rejected connection is counted under its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_flood_is_counted_and_good_connections_survive() {
    const BAD: u64 = 200;
    const GOOD: u64 = 10;
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), |c| {
            c.header_timeout = Duration::from_secs(30);
        })
        .await;
        let fmt = HeaderFormat::default();
        let addr = proxy.local_addr();
        let mut expected: Vec<(&'static str, f64)> =
            HeaderError::ALL.iter().map(|e| (e.reason(), 0.0)).collect();
        let mut bad = Vec::new();
        let mut good = Vec::new();
        for i in 0..BAD {
            let (wire, reason) = garbage(i, &fmt);
            expected.iter_mut().find(|(r, _)| *r == reason).unwrap().1 += 1.0;
            bad.push(tokio::spawn(garbage_client(addr, wire)));
            if i % (BAD / GOOD) == 0 {
                let payload = format!("good connection {i}").into_bytes();
                good.push(tokio::spawn(async move {
                    round_trip(addr, &fmt, format!("good-{i}").as_bytes(), &payload).await
                }));
            }
        }
        for t in bad {
            t.await.expect("garbage client");
        }
        for t in good {
            let reply = t.await.unwrap().expect("good round trip during the flood");
            assert_eq!(reply.backend, "b1");
        }
        // The proxy still serves after the flood.
        round_trip(addr, &fmt, b"after-flood", b"still alive")
            .await
            .expect("round trip after the flood");

        let text = wait_header_errors(&proxy, BAD as f64).await;
        assert_eq!(header_errors(&text), expected, "{text}");
        assert_eq!(
            metric(&text, "shardproxy_connections_accepted_total"),
            (BAD + GOOD + 1) as f64,
            "{text}"
        );
        assert_eq!(
            backends[0].accepted(),
            GOOD + 1,
            "garbage reached a backend"
        );
        assert_eq!(backend_connections(&text, "b1"), (GOOD + 1) as f64);
    })
    .await;
}
