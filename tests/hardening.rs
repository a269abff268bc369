//! Ways the data path used to lose bytes while both ends saw a clean close, each reproduced
//! with small clients and backends on loopback, in both forwarding modes where it applies:
//! - TCP urgent data: splice stops at the urgent mark (and returned 0 → a false EOF); a
//!   short read at the mark made the copy path wait for the next packet;
//! - the idle timeout cut transfers that were still moving (only whole chunks counted);
//! - an idle or drain-deadline cut ended in FIN, so truncation looked like success.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::{any_port, fill_prng, metric, start_proxy, PrngStream};
use shardproxy::config::{BackendSpec, ProxyConfig};
use shardproxy::header::HeaderFormat;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const KEY: &[u8] = b"user:urgent";

fn header() -> Vec<u8> {
    HeaderFormat::default().encode(KEY).expect("key fits")
}

fn spec(addr: SocketAddr) -> BackendSpec {
    BackendSpec {
        name: "only".into(),
        addr,
        weight: 1,
        agent: None,
        max_connections: None,
        proxy_protocol: None,
    }
}

fn modes() -> [(bool, &'static str); 2] {
    [(true, "splice"), (false, "copy")]
}

/// Sends one urgent (`MSG_OOB`) byte: the kernel marks it as the urgent pointer.
fn send_urgent(stream: &TcpStream, byte: u8) {
    let sent = SockRef::from(stream)
        .send_out_of_band(&[byte])
        .expect("send MSG_OOB");
    assert_eq!(sent, 1);
}

/// Writes `n` bytes of the PRNG stream `seed`, continuing `stream`'s position.
async fn write_prng(s: &mut TcpStream, prng: &mut PrngStream, n: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        prng.fill(&mut buf[..k]);
        s.write_all(&buf[..k]).await.expect("write");
        left -= k;
    }
}

/// A backend that reads the header, then everything to EOF; returns what it read after the
/// header.
async fn sink_backend() -> (SocketAddr, tokio::task::JoinHandle<io::Result<Vec<u8>>>) {
    let l = TcpListener::bind(any_port()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut head = vec![0u8; header().len()];
        s.read_exact(&mut head).await?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).await?;
        Ok(all)
    });
    (addr, task)
}

/// The stream a client sends: 2 MiB, one urgent byte, 2 MiB — as the bytes the far end
/// must see in line.
fn urgent_stream(seed: u64) -> Vec<u8> {
    let mut want = vec![0u8; 2 << 20];
    fill_prng(seed, &mut want);
    want.push(0xA5);
    let mut tail = vec![0u8; 2 << 20];
    fill_prng(seed + 1, &mut tail);
    want.extend_from_slice(&tail);
    want
}

async fn send_urgent_stream(s: &mut TcpStream, seed: u64) {
    let mut buf = vec![0u8; 2 << 20];
    fill_prng(seed, &mut buf);
    s.write_all(&buf).await.expect("write first half");
    send_urgent(s, 0xA5);
    fill_prng(seed + 1, &mut buf);
    s.write_all(&buf).await.expect("write second half");
}

/// Client → backend: the urgent byte and everything after it reach the backend, in line.
/// Before the fix the splice path delivered exactly the first 2 MiB, then a clean EOF.
#[tokio::test]
async fn urgent_byte_upload_arrives_whole() {
    for (splice, mode) in modes() {
        let (addr, backend) = sink_backend().await;
        let proxy = start_proxy(vec![spec(addr)], |c| c.splice = splice).await;
        let mut c = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        c.write_all(&header()).await.expect("header");
        send_urgent_stream(&mut c, 7).await;
        c.shutdown().await.expect("FIN");
        let got = tokio::time::timeout(Duration::from_secs(30), backend)
            .await
            .unwrap_or_else(|_| panic!("{mode}: backend never saw EOF"))
            .expect("backend task")
            .expect("backend io");
        let want = urgent_stream(7);
        assert_eq!(got.len(), want.len(), "{mode}: bytes at the backend");
        assert!(got == want, "{mode}: bytes differ");
    }
}

/// Backend → client: a backend's urgent byte reaches the client in line, and the rest after it.
#[tokio::test]
async fn urgent_byte_download_arrives_whole() {
    for (splice, mode) in modes() {
        let l = TcpListener::bind(any_port()).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let backend = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut head = vec![0u8; header().len()];
            s.read_exact(&mut head).await.expect("header");
            send_urgent_stream(&mut s, 11).await;
        });
        let proxy = start_proxy(vec![spec(addr)], |c| c.splice = splice).await;
        let mut c = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        c.write_all(&header()).await.expect("header");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{mode}: no EOF"))
            .expect("read");
        backend.await.expect("backend");
        let want = urgent_stream(11);
        assert_eq!(got.len(), want.len(), "{mode}: bytes at the client");
        assert!(got == want, "{mode}: bytes differ");
    }
}

/// A request that ends in an urgent byte, with no FIN and nothing after it: the whole
/// request must be echoed. Before the fix a read stopped short at the mark, was taken for
/// "drained", and the rest waited for a next packet that never came.
#[tokio::test]
async fn urgent_byte_mid_conversation_is_not_held_back() {
    let echo = shardproxy::fixtures::echo::EchoBackend::start(any_port(), "only")
        .await
        .expect("echo");
    for (splice, mode) in modes() {
        let proxy = start_proxy(vec![spec(echo.local_addr())], |c| c.splice = splice).await;
        let mut c = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        c.write_all(&header()).await.expect("header");
        // The echo backend first sends its name and a newline, then echoes the header.
        let mut greeting = vec![0u8; 5 + header().len()];
        c.read_exact(&mut greeting).await.expect("greeting");
        assert_eq!(&greeting[..5], b"only\n");
        for round in 0..20u8 {
            let body = vec![round; 1000];
            c.write_all(&body).await.expect("body");
            send_urgent(&c, round);
            c.write_all(&body).await.expect("tail");
            let mut back = vec![0u8; 2001];
            tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back))
                .await
                .unwrap_or_else(|_| panic!("{mode}: round {round}: echo held back"))
                .expect("echo");
            assert!(back.iter().all(|b| *b == round), "{mode}: round {round}");
        }
    }
}

/// A backend that sends `total` bytes of PRNG stream 3 as fast as it may, then closes.
async fn streaming_backend(total: usize) -> SocketAddr {
    let l = TcpListener::bind(any_port()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = vec![0u8; header().len()];
                if s.read_exact(&mut head).await.is_ok() {
                    let mut prng = PrngStream::new(3);
                    write_prng(&mut s, &mut prng, total).await;
                }
            });
        }
    });
    addr
}

/// A client socket with a small receive buffer, so a slow reader holds the proxy's
/// deliveries back; it has sent the header for `key`.
async fn slow_client_for(proxy: SocketAddr, key: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut c = socket.connect(proxy).await.expect("connect");
    let head = HeaderFormat::default().encode(key).expect("key fits");
    c.write_all(&head).await.expect("header");
    c
}

async fn slow_client(proxy: SocketAddr) -> TcpStream {
    slow_client_for(proxy, KEY).await
}

/// Reads to the end; returns the bytes read and how the stream ended.
async fn read_until_end(
    c: &mut TcpStream,
    pace: Option<(usize, Duration)>,
) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let want = pace.map_or(buf.len(), |(n, _)| n);
        match c.read(&mut buf[..want]).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Err(e)),
        }
        if let Some((_, every)) = pace {
            tokio::time::sleep(every).await;
        }
    }
}

/// A slow reader keeps a download moving: every partial delivery is activity, so a 500 ms
/// idle timeout never cuts it. Before the fix only whole chunks (up to a 256 KiB pipe)
/// counted, and the download was cut as idle part-way.
#[tokio::test]
async fn slow_reader_is_not_cut_as_idle() {
    const TOTAL: usize = 2 << 20;
    let backend = streaming_backend(TOTAL).await;
    for (splice, mode) in modes() {
        let proxy = start_proxy(vec![spec(backend)], |c: &mut ProxyConfig| {
            c.splice = splice;
            c.idle_timeout = Some(Duration::from_millis(500));
        })
        .await;
        let mut c = slow_client(proxy.local_addr()).await;
        let (got, end) = read_until_end(&mut c, Some((16 * 1024, Duration::from_millis(25)))).await;
        let text = proxy.metrics_text();
        assert!(
            end.is_ok(),
            "{mode}: cut after {got} of {TOTAL} bytes: {end:?}; idle cuts: {}",
            metric(
                &text,
                "shardproxy_connection_errors_total{reason=\"idle_timeout\"}"
            )
        );
        assert_eq!(got, TOTAL as u64, "{mode}");
        assert_eq!(
            metric(
                &text,
                "shardproxy_connection_errors_total{reason=\"idle_timeout\"}"
            ),
            0.0,
            "{mode}"
        );
    }
}

/// A stalled reader is cut by the idle timeout — and learns it by a reset, not by a FIN
/// after a truncated download.
#[tokio::test]
async fn idle_cut_resets_the_client() {
    let backend = streaming_backend(64 << 20).await;
    for (splice, mode) in modes() {
        let proxy = start_proxy(vec![spec(backend)], |c: &mut ProxyConfig| {
            c.splice = splice;
            c.idle_timeout = Some(Duration::from_millis(200));
        })
        .await;
        let mut c = slow_client(proxy.local_addr()).await;
        // Do not read until the proxy has given up on the connection.
        let idle = "shardproxy_connection_errors_total{reason=\"idle_timeout\"}";
        tokio::time::timeout(Duration::from_secs(20), async {
            while metric(&proxy.metrics_text(), idle) < 1.0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{mode}: never cut as idle"));
        let (got, end) = read_until_end(&mut c, None).await;
        let err = end.expect_err(&format!("{mode}: a clean EOF after {got} bytes of 64 MiB"));
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{mode}: {err}");
    }
}

/// At the drain deadline both sides of a busy connection are reset: the client of a download
/// and the backend of an upload each see a reset, never a clean end of a truncated stream.
#[tokio::test]
async fn drain_deadline_resets_both_sides() {
    for (splice, mode) in modes() {
        // Download: the backend streams; the client reads slowly.
        let backend = streaming_backend(1 << 30).await;
        // Upload: a backend that reads slowly and reports how its stream ended.
        let l = TcpListener::bind(any_port()).await.expect("bind");
        let up_addr = l.local_addr().expect("addr");
        let upload_end = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            read_until_end(&mut s, Some((16 * 1024, Duration::from_millis(5)))).await
        });
        let backends = vec![
            BackendSpec {
                name: "down".into(),
                addr: backend,
                weight: 1,
                agent: None,
                max_connections: None,
                proxy_protocol: None,
            },
            BackendSpec {
                name: "up".into(),
                addr: up_addr,
                weight: 1,
                agent: None,
                max_connections: None,
                proxy_protocol: None,
            },
        ];
        let router = shardproxy::Router::new([("down", 1), ("up", 1)]).expect("router");
        let key_for = |want: &str| {
            (0..)
                .map(|i| format!("k{i}").into_bytes())
                .find(|k| router.rank_names(k)[0] == want)
                .expect("a key")
        };
        let proxy = start_proxy(backends, |c: &mut ProxyConfig| {
            c.splice = splice;
            c.drain_timeout = Duration::from_millis(300);
        })
        .await;
        let mut down = slow_client_for(proxy.local_addr(), &key_for("down")).await;
        let mut up = slow_client_for(proxy.local_addr(), &key_for("up")).await;
        let uploader = tokio::spawn(async move {
            let mut prng = PrngStream::new(5);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                prng.fill(&mut buf);
                if up.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        let reader = tokio::spawn(async move {
            read_until_end(&mut down, Some((16 * 1024, Duration::from_millis(5)))).await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cut = proxy.shutdown().await;
        assert_eq!(cut, 2, "{mode}: both connections were cut at the deadline");
        assert_reset(reader, &format!("{mode}: client of the download")).await;
        assert_reset(upload_end, &format!("{mode}: backend of the upload")).await;
        uploader.abort();
    }
}

/// An address whose connects hang: a listener that never accepts, its backlog filled, so
/// the kernel drops further SYNs (the connect neither completes nor fails).
async fn hanging_backend() -> (SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    l.bind(&any_port().into()).expect("bind");
    l.listen(1).expect("listen");
    let addr = l.local_addr().expect("addr").as_socket().expect("inet");
    let mut fill = Vec::new();
    // A backlog of 1 holds two completed handshakes; a few more attempts make sure.
    for _ in 0..4 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.set_nonblocking(true).expect("nonblocking");
        let _ = s.connect(&addr.into());
        fill.push(s.into());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, fill, l)
}

/// The drain deadline ends every phase: a client still sending its header and one whose
/// backend connect hangs are cut at the deadline (reset), not after their own longer
/// timeouts. Before, shutdown waited out the header and connect timeouts.
#[tokio::test]
async fn drain_deadline_ends_header_and_connect_phases() {
    let (addr, _fill, _listener) = hanging_backend().await;
    let proxy = start_proxy(vec![spec(addr)], |c: &mut ProxyConfig| {
        c.header_timeout = Duration::from_secs(60);
        c.connect_timeout = Duration::from_secs(60);
        c.drain_timeout = Duration::from_millis(300);
    })
    .await;
    // One client sends half a header; the other a whole one, and its connect hangs.
    let mut half = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    half.write_all(&header()[..3]).await.expect("half a header");
    let mut whole = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    whole.write_all(&header()).await.expect("header");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = proxy.metrics_text();
    assert_eq!(
        metric(&text, "shardproxy_connections_active"),
        2.0,
        "both clients are still in their phases:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            "shardproxy_backend_connections_total{backend=\"only\"}"
        ),
        0.0,
        "the backend connect was meant to hang:\n{text}"
    );
    let cut = tokio::time::timeout(Duration::from_secs(20), proxy.shutdown())
        .await
        .expect("shutdown ends at the drain deadline, not after 60 s phase timeouts");
    assert_eq!(cut, 2);
    for (c, phase) in [(&mut half, "header"), (&mut whole, "connect")] {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{phase}: the client was left open"));
        let err = r.expect_err(&format!("{phase}: closed with FIN, not reset"));
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{phase}: {err}");
    }
}

/// Waits (bounded) for a reader task started with [`read_until_end`] and requires that its
/// stream ended in a reset, not a clean EOF.
async fn assert_reset(task: tokio::task::JoinHandle<(u64, io::Result<()>)>, who: &str) {
    let (got, end) = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap_or_else(|_| panic!("{who}: the read never ended"))
        .expect("reader task");
    let err = end.expect_err(&format!("{who}: ended cleanly after {got} bytes"));
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{who}: {err}");
}
