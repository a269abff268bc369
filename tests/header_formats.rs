//! The key header formats other than the default `u16` big-endian, end to end: a 1-byte
//! length field, a 2-byte little-endian one, and 4-byte fields in both byte orders (the
//! little-endian one with the header stripped).
//!
//! For each format, keyed round trips through echo backends land on the backend that
//! [`shardproxy::Router`] ranks first for the key, with every byte echoed intact (the header
//! too when it is forwarded, not when it is stripped); keys of 1 byte, of exactly
//! `max_key_len` bytes and with every byte value are included. And a bad header of each
//! width is closed and counted under its reason before any backend is contacted; the
//! too-long cases are chosen so that reading the length field in the wrong byte order would
//! give a valid length and reach the backend instead.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use common::*;
use shardproxy::config::{BackendSpec, ProxyConfig};
use shardproxy::fixtures::client::round_trip;
use shardproxy::header::{Endian, HeaderError, HeaderFormat, HeaderMode, LenBytes};
use shardproxy::{ProxyHandle, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hang guard for every test (never a timing assertion).
const GUARD: Duration = Duration::from_secs(60);
/// Connections in flight at once in the round-trip tests.
const CONCURRENCY: usize = 8;
/// How long a client with a bad header may wait for the close (a hang guard well below
/// [`GUARD`], so a header that was wrongly taken as valid fails with a message).
const CLOSE_GUARD: Duration = Duration::from_secs(15);
/// Largest payload of one round trip.
const MAX_PAYLOAD: u64 = 32 * 1024;

/// Runs `fut` under the hang guard.
async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("hang guard: test did not finish within {GUARD:?}"))
}

fn format(len_bytes: LenBytes, endian: Endian, max_key_len: u32, mode: HeaderMode) -> HeaderFormat {
    HeaderFormat {
        len_bytes,
        endian,
        max_key_len,
        mode,
    }
}

/// `u8` length field (byte order does not apply), keys up to 255 bytes, forwarded.
fn one_byte() -> HeaderFormat {
    format(LenBytes::One, Endian::Big, 255, HeaderMode::Forward)
}

/// `u16` little-endian, keys up to 300 bytes (both length bytes in use), forwarded.
fn two_byte_le() -> HeaderFormat {
    format(LenBytes::Two, Endian::Little, 300, HeaderMode::Forward)
}

/// `u32` big-endian, keys up to 1000 bytes, forwarded.
fn four_byte_be() -> HeaderFormat {
    format(LenBytes::Four, Endian::Big, 1000, HeaderMode::Forward)
}

/// `u32` little-endian, keys up to 1000 bytes, stripped.
fn four_byte_le_strip() -> HeaderFormat {
    format(LenBytes::Four, Endian::Little, 1000, HeaderMode::Strip)
}

/// The test keys for `fmt`: `user:0..`, a 1-byte key, a key of exactly `max_key_len` bytes,
/// and binary keys holding every byte value (0x00 and 0xff included).
fn keys_for(fmt: &HeaderFormat) -> Vec<Vec<u8>> {
    let max = fmt.max_key_len as usize;
    let mut all = keys(48);
    all.push(b"k".to_vec());
    all.push((0..max).map(|i| b'a' + (i % 26) as u8).collect());
    let every_byte: Vec<u8> = (0..=255u8).collect();
    for chunk in every_byte.chunks(max.min(128)) {
        all.push(chunk.to_vec());
    }
    all
}

/// Round trips every key of [`keys_for`] through a proxy speaking `fmt` to three echo
/// backends; each lands on the router's first choice with the echo intact.
async fn round_trips(fmt: HeaderFormat) {
    guard(async {
        let backends = echo_backends(3).await;
        let specs = specs(&backends);
        let router = Router::new(specs.iter().map(|b| (b.name.as_str(), b.weight))).unwrap();
        let proxy = start_proxy(specs, |c| c.header = fmt).await;
        let addr = proxy.local_addr();
        let keys = keys_for(&fmt);
        let shared_keys = std::sync::Arc::new(keys.clone());
        let replies = run_bounded(keys.len(), CONCURRENCY, |i| {
            let keys = shared_keys.clone();
            async move {
                let mut rng = Rng(i as u64);
                let mut payload = vec![0u8; rng.below(MAX_PAYLOAD + 1) as usize];
                fill_prng(i as u64 + 1, &mut payload);
                round_trip(addr, &fmt, &keys[i], &payload).await
            }
        })
        .await;

        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        for (i, reply) in replies.into_iter().enumerate() {
            let reply = reply.unwrap_or_else(|e| panic!("{fmt}: key #{i} {:?}: {e}", keys[i]));
            let want = router.rank_names(&keys[i])[0];
            assert_eq!(reply.backend, want, "{fmt}: key #{i} {:?}", keys[i]);
            *per_backend.entry(reply.backend).or_default() += 1;
        }
        assert_eq!(per_backend.len(), 3, "{fmt}: keys reached {per_backend:?}");

        let text = scrape(&proxy).await;
        for e in HeaderError::ALL {
            assert_eq!(
                metric(&text, &header_sample(e.reason())),
                0.0,
                "{fmt}\n{text}"
            );
        }
        let served: f64 = backends
            .iter()
            .map(|b| metric(&text, &backend_connections(b.name())))
            .sum();
        assert_eq!(served, keys.len() as f64, "{fmt}\n{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_length_round_trips_route_like_the_router() {
    round_trips(one_byte()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_byte_little_endian_round_trips_route_like_the_router() {
    round_trips(two_byte_le()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_byte_big_endian_round_trips_route_like_the_router() {
    round_trips(four_byte_be()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_byte_little_endian_stripped_round_trips_route_like_the_router() {
    round_trips(four_byte_le_strip()).await;
}

// ---------------------------------------------------------------------------------------
// Bad headers of each width
// ---------------------------------------------------------------------------------------

/// The `shardproxy_header_errors_total` sample for `reason`.
fn header_sample(reason: &str) -> String {
    format!("shardproxy_header_errors_total{{reason=\"{reason}\"}}")
}

/// The `shardproxy_backend_connections_total` sample for `backend`.
fn backend_connections(backend: &str) -> String {
    format!("shardproxy_backend_connections_total{{backend=\"{backend}\"}}")
}

/// One bad header: the bytes sent, whether the client then half-closes, and the reason the
/// proxy must count.
struct BadCase {
    what: &'static str,
    bytes: Vec<u8>,
    half_close: bool,
    reason: HeaderError,
}

fn bad(what: &'static str, bytes: &[u8], half_close: bool, reason: HeaderError) -> BadCase {
    BadCase {
        what,
        bytes: bytes.to_vec(),
        half_close,
        reason,
    }
}

/// `len` as the bytes of `fmt`'s length field, ignoring `max_key_len` (so out-of-range
/// lengths can be sent).
fn length_field(fmt: &HeaderFormat, len: u32) -> Vec<u8> {
    let width = fmt.len_bytes.width();
    let be = len.to_be_bytes();
    let mut field = be[4 - width..].to_vec();
    if fmt.endian == Endian::Little {
        field.reverse();
    }
    field
}

/// Sends each case to a fresh proxy speaking `fmt` whose only backend counts its accepts;
/// each must be closed and counted once under its reason, with no backend contacted.
async fn bad_headers(fmt: HeaderFormat, cases: Vec<BadCase>) {
    guard(async {
        for case in cases {
            let counting = CountingBackend::start().await;
            let spec = BackendSpec {
                name: "counting".to_string(),
                addr: counting.addr,
                weight: 1,
                agent: None,
                max_connections: None,
                proxy_protocol: None,
            };
            let proxy = start_proxy(vec![spec], |c: &mut ProxyConfig| c.header = fmt).await;
            let ctx = format!("{fmt}: {} ({:02x?})", case.what, case.bytes);

            let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
            s.write_all(&case.bytes).await.unwrap();
            if case.half_close {
                s.shutdown().await.unwrap();
            }
            // The proxy never writes to a client whose header is bad: the next read reports
            // the close (EOF, or ECONNRESET when unread bytes were discarded).
            let mut buf = [0u8; 64];
            let Ok(read) = tokio::time::timeout(CLOSE_GUARD, s.read(&mut buf)).await else {
                panic!(
                    "{ctx}: not closed within {CLOSE_GUARD:?}; backend accepts: {}",
                    counting.accepted()
                );
            };
            match read {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("{ctx}: expected the proxy to close, got {other:?}"),
            }

            let text = wait_header_errors(&proxy).await;
            for e in HeaderError::ALL {
                let want = if e == case.reason { 1.0 } else { 0.0 };
                let got = metric(&text, &header_sample(e.reason()));
                assert_eq!(got, want, "{ctx}: header errors {}\n{text}", e.reason());
            }
            assert_eq!(counting.accepted(), 0, "{ctx}: a backend was contacted");
            assert_eq!(
                metric(&text, &backend_connections("counting")),
                0.0,
                "{ctx}\n{text}"
            );
        }
    })
    .await;
}

/// Polls until a header error has been counted (the proxy closes a connection just before it
/// counts it, so the client can see the close first); returns the metrics then.
async fn wait_header_errors(proxy: &ProxyHandle) -> String {
    loop {
        let text = scrape(proxy).await;
        let sum: f64 = HeaderError::ALL
            .iter()
            .map(|e| metric(&text, &header_sample(e.reason())))
            .sum();
        if sum >= 1.0 {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `length_field(len)` followed by `len` key bytes (capped, for the too-long cases: the proxy
/// must decide on the length field alone).
fn with_key(field: Vec<u8>, key_bytes: usize) -> Vec<u8> {
    let mut v = field;
    v.extend(std::iter::repeat_n(b'k', key_bytes));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_length_bad_headers_are_counted_and_closed() {
    let f = format(LenBytes::One, Endian::Big, 10, HeaderMode::Forward);
    bad_headers(
        f,
        vec![
            bad("zero length", &[0], false, HeaderError::ZeroLength),
            bad(
                "zero length, payload after",
                &[0, b'x', b'y'],
                false,
                HeaderError::ZeroLength,
            ),
            BadCase {
                what: "one over max_key_len",
                bytes: with_key(length_field(&f, 11), 11),
                half_close: false,
                reason: HeaderError::TooLong,
            },
            bad("0xff", &[0xff], false, HeaderError::TooLong),
            bad("EOF inside the key", &[3, b'a'], true, HeaderError::Eof),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_byte_little_endian_bad_headers_are_counted_and_closed() {
    let f = two_byte_le();
    bad_headers(
        f,
        vec![
            bad("zero length", &[0, 0], false, HeaderError::ZeroLength),
            // Little-endian 0x0500 = 1280 > 300; read big-endian it would be a valid 5.
            bad(
                "1280 (5 if misread big-endian)",
                &[0x00, 0x05, b'a', b'b', b'c', b'd', b'e'],
                false,
                HeaderError::TooLong,
            ),
            BadCase {
                what: "one over max_key_len",
                bytes: with_key(length_field(&f, 301), 301),
                half_close: false,
                reason: HeaderError::TooLong,
            },
            bad("EOF inside the length field", &[7], true, HeaderError::Eof),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_byte_big_endian_bad_headers_are_counted_and_closed() {
    let f = four_byte_be();
    bad_headers(
        f,
        vec![
            bad("zero length", &[0, 0, 0, 0], false, HeaderError::ZeroLength),
            // Big-endian 0x05000000 > 1000; read little-endian it would be a valid 5.
            bad(
                "0x05000000 (5 if misread little-endian)",
                &[0x05, 0, 0, 0, b'a', b'b', b'c', b'd', b'e'],
                false,
                HeaderError::TooLong,
            ),
            BadCase {
                what: "one over max_key_len",
                bytes: with_key(length_field(&f, 1001), 1001),
                half_close: false,
                reason: HeaderError::TooLong,
            },
            bad("u32::MAX", &[0xff; 4], false, HeaderError::TooLong),
            bad(
                "EOF inside the length field",
                &[0, 0, 0],
                true,
                HeaderError::Eof,
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_byte_little_endian_stripped_bad_headers_are_counted_and_closed() {
    let f = four_byte_le_strip();
    bad_headers(
        f,
        vec![
            bad(
                "zero length, payload after",
                &[0, 0, 0, 0, b'p'],
                false,
                HeaderError::ZeroLength,
            ),
            // Little-endian 0x05000000 > 1000; read big-endian it would be a valid 5.
            bad(
                "0x05000000 (5 if misread big-endian)",
                &[0, 0, 0, 0x05, b'a', b'b', b'c', b'd', b'e'],
                false,
                HeaderError::TooLong,
            ),
            BadCase {
                what: "one over max_key_len",
                bytes: with_key(length_field(&f, 1001), 1001),
                half_close: false,
                reason: HeaderError::TooLong,
            },
            bad(
                "EOF inside the key",
                &[4, 0, 0, 0, b'a', b'b'],
                true,
                HeaderError::Eof,
            ),
        ],
    )
    .await;
}
