//! Byte integrity through the in-process proxy: bulk random data both ways on concurrent
//! connections (header forwarded and stripped) with the byte metrics checked against what
//! really moved, half-close in each direction, reset propagation each way (the peer sees
//! `ECONNRESET`, never a clean EOF, with splice and with the buffered copy), and slow readers
//! on either side (the proxy's `EAGAIN`/writable path), including a reset from one side while
//! the proxy is blocked writing to a stalled other side. Every byte is checked in order as it
//! arrives against a deterministic stream; nothing is buffered whole.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use shardproxy::config::BackendSpec;
use shardproxy::fixtures::client::read_name;
use shardproxy::header::HeaderMode;
use shardproxy::{HeaderFormat, ProxyHandle};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Hang guard for the bulk tests (they move 512 MiB each way through the proxy).
const BULK_GUARD: Duration = Duration::from_secs(180);
/// Hang guard for everything else.
const GUARD: Duration = Duration::from_secs(60);
/// Largest single write (the write sizes are 1 B ..= this).
const MAX_WRITE: usize = 256 * 1024;

/// A write size in 1 ..= `MAX_WRITE`; a quarter are tiny (1 ..= 1024 B) so odd chunk
/// boundaries are common, the rest uniform.
fn write_size(rng: &mut Rng) -> usize {
    if rng.below(4) == 0 {
        1 + rng.below(1024) as usize
    } else {
        1 + rng.below(MAX_WRITE as u64) as usize
    }
}
/// Read buffer of the verifiers.
const READ_BUF: usize = 256 * 1024;

/// Runs `fut` under a hang guard (never a timing assertion: the limit is generous).
async fn guard<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("hang guard: test did not finish within {limit:?}"))
}

/// Writes `len` bytes of `PrngStream::new(seed)` in random-sized writes (sizes seeded by
/// `size_seed`). Does not shut down.
async fn send_prng<W: AsyncWrite + Unpin>(
    wr: &mut W,
    seed: u64,
    size_seed: u64,
    len: u64,
) -> io::Result<()> {
    let mut data = PrngStream::new(seed);
    let mut sizes = Rng(size_seed);
    let mut buf = vec![0u8; MAX_WRITE];
    let mut left = len;
    while left > 0 {
        let n = (write_size(&mut sizes) as u64).min(left) as usize;
        data.fill(&mut buf[..n]);
        wr.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Checks `got` against the next bytes of `expected`; `offset` is where `got` starts.
fn check_chunk(
    got: &[u8],
    expected: &mut PrngStream,
    want: &mut [u8],
    offset: u64,
    what: &str,
) -> io::Result<()> {
    let want = &mut want[..got.len()];
    expected.fill(want);
    if let Some(i) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: byte {} differs (got {:#04x}, want {:#04x})",
                offset + i as u64,
                got[i],
                want[i]
            ),
        ));
    }
    Ok(())
}

/// Reads exactly `len` bytes, checking each against `expected` as it arrives.
async fn read_verified<R: AsyncRead + Unpin>(
    rd: &mut R,
    expected: &mut PrngStream,
    len: u64,
    what: &str,
) -> io::Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    let mut want = vec![0u8; READ_BUF];
    let mut done = 0u64;
    while done < len {
        let cap = (len - done).min(READ_BUF as u64) as usize;
        let n = rd.read(&mut buf[..cap]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{what}: EOF after {done} of {len} bytes"),
            ));
        }
        check_chunk(&buf[..n], expected, &mut want, done, what)?;
        done += n as u64;
    }
    Ok(())
}

/// Reads until EOF, checking every byte against `expected`; returns the count.
async fn verify_until_eof<R: AsyncRead + Unpin>(
    rd: &mut R,
    expected: &mut PrngStream,
    what: &str,
) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_BUF];
    let mut want = vec![0u8; READ_BUF];
    let mut done = 0u64;
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Ok(done);
        }
        check_chunk(&buf[..n], expected, &mut want, done, what)?;
        done += n as u64;
    }
}

/// The next read must be EOF.
async fn expect_eof<R: AsyncRead + Unpin>(rd: &mut R, what: &str) -> io::Result<()> {
    let mut extra = [0u8; 64];
    match rd.read(&mut extra).await? {
        0 => Ok(()),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: {n} unexpected bytes where EOF was due"),
        )),
    }
}

/// Reads a `[u16 BE len][key]` header (what a raw backend sees when the header is forwarded).
async fn read_key_header<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Vec<u8>> {
    let len = rd.read_u16().await?;
    let mut key = vec![0u8; usize::from(len)];
    rd.read_exact(&mut key).await?;
    Ok(key)
}

/// A backend spec for a raw test backend.
fn spec(name: &str, addr: SocketAddr) -> BackendSpec {
    BackendSpec {
        name: name.to_string(),
        addr,
        weight: 1,
        agent: None,
        max_connections: None,
        proxy_protocol: None,
    }
}

/// The default header for `key`.
fn header(key: &[u8]) -> Vec<u8> {
    HeaderFormat::default().encode(key).expect("encodable key")
}

/// A `shardproxy_backend_bytes_total` sample.
fn bytes_sample(backend: &str, direction: &str) -> String {
    format!("shardproxy_backend_bytes_total{{backend=\"{backend}\",direction=\"{direction}\"}}")
}

/// Polls the proxy's metrics until `sample` reaches at least `at_least` (hang-guarded by the
/// caller), and returns its value then.
async fn wait_metric(proxy: &ProxyHandle, sample: &str, at_least: f64) -> f64 {
    loop {
        let v = metric(&scrape(proxy).await, sample);
        if v >= at_least {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sets `SO_LINGER` 0 so that closing `stream` sends RST.
fn set_reset_on_close(stream: &TcpStream) {
    SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
}

/// What one bulk connection moved, as seen by the client.
struct BulkResult {
    backend: String,
    /// Bytes the backend received (header unless stripped, plus payload).
    to_backend: u64,
    /// Bytes the client received (greeting line, echoed header unless stripped, payload).
    to_client: u64,
}

/// One bulk connection: writes `payload` random bytes in random-sized writes while reading
/// and verifying the echo concurrently.
async fn bulk_connection(
    proxy: SocketAddr,
    fmt: HeaderFormat,
    key: Vec<u8>,
    seed: u64,
    payload: u64,
) -> io::Result<BulkResult> {
    let header = fmt
        .encode(&key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let sent_header = header.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent_header).await?;
        send_prng(&mut wr, seed, seed ^ 0x0051_57E5, payload).await?;
        wr.shutdown().await
    });

    let what = format!("key {:?}", String::from_utf8_lossy(&key));
    let backend = read_name(&mut rd).await?;
    let echoed_header: &[u8] = match fmt.mode {
        HeaderMode::Forward => &header,
        HeaderMode::Strip => &[],
    };
    let mut got = vec![0u8; echoed_header.len()];
    rd.read_exact(&mut got).await?;
    if got != echoed_header {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: echoed header {got:?}, want {echoed_header:?}"),
        ));
    }
    read_verified(&mut rd, &mut PrngStream::new(seed), payload, &what).await?;
    expect_eof(&mut rd, &what).await?;
    writer.await.expect("writer task")?;
    let echoed = echoed_header.len() as u64 + payload;
    Ok(BulkResult {
        to_client: backend.len() as u64 + 1 + echoed,
        backend,
        to_backend: echoed,
    })
}

/// Four concurrent connections, 64 MiB each way each, through the proxy to echo backends.
async fn bulk_integrity(mode: HeaderMode) {
    bulk_integrity_with(mode, true).await;
}

async fn bulk_integrity_with(mode: HeaderMode, splice: bool) {
    const CONNS: u64 = 4;
    const PAYLOAD: u64 = 64 << 20;
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |c| {
        c.header.mode = mode;
        c.splice = splice;
    })
    .await;
    let fmt = HeaderFormat {
        mode,
        ..HeaderFormat::default()
    };
    let table = proxy.table();
    let mut conns = Vec::new();
    for i in 0..CONNS {
        let key = format!("integrity-{mode:?}-{i}").into_bytes();
        let owner = table.router.pick(&key).expect("a backend takes keys");
        let expected = table.router.name(owner).to_string();
        let task = tokio::spawn(bulk_connection(
            proxy.local_addr(),
            fmt,
            key.clone(),
            0xB0_0000 + i,
            PAYLOAD,
        ));
        conns.push((key, expected, task));
    }
    let mut results = Vec::new();
    for (key, expected, task) in conns {
        let r = task
            .await
            .expect("connection task")
            .unwrap_or_else(|e| panic!("key {:?}: {e}", String::from_utf8_lossy(&key)));
        assert_eq!(
            r.backend,
            expected,
            "key {:?} greeted by the wrong backend",
            String::from_utf8_lossy(&key)
        );
        results.push(r);
    }

    // Every byte was received and the EOF seen, so both pumps have counted everything.
    let text = scrape(&proxy).await;
    for b in &backends {
        let mine = results.iter().filter(|r| r.backend == b.name());
        let (up, down) = mine.fold((0, 0), |(u, d), r| (u + r.to_backend, d + r.to_client));
        assert_eq!(
            metric(&text, &bytes_sample(b.name(), "client_to_backend")),
            up as f64,
            "client_to_backend bytes of {}\n{text}",
            b.name()
        );
        assert_eq!(
            metric(&text, &bytes_sample(b.name(), "backend_to_client")),
            down as f64,
            "backend_to_client bytes of {}\n{text}",
            b.name()
        );
    }
    let total_up: u64 = results.iter().map(|r| r.to_backend).sum();
    assert!(total_up >= CONNS * PAYLOAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_random_writes_header_forwarded() {
    guard(BULK_GUARD, bulk_integrity(HeaderMode::Forward)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_random_writes_header_stripped() {
    guard(BULK_GUARD, bulk_integrity(HeaderMode::Strip)).await;
}

/// The buffered-copy path (taken when no pipe can be had, or with `--no-splice`) keeps every
/// byte too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_random_writes_buffered_copy() {
    guard(BULK_GUARD, bulk_integrity_with(HeaderMode::Forward, false)).await;
}

/// Client → backend half-close: after `shutdown(Write)` the client still gets the whole echo,
/// then EOF (the backend saw EOF only after every byte, echoed it all, then closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_to_backend() {
    guard(GUARD, async {
        let backends = echo_backends(2).await;
        let proxy = start_proxy(specs(&backends), |_| {}).await;
        let table = proxy.table();

        // Small: everything is written and FIN sent before the client reads a byte.
        let key = b"half-close-a-small";
        let expected = table.router.name(table.router.pick(key).unwrap());
        let hdr = header(key);
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&hdr).await.unwrap();
        send_prng(&mut s, 0xA1, 0xA2, 60_000).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_name(&mut s).await.unwrap(), expected);
        let mut got = vec![0u8; hdr.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hdr);
        read_verified(&mut s, &mut PrngStream::new(0xA1), 60_000, "small")
            .await
            .unwrap();
        expect_eof(&mut s, "small").await.unwrap();

        // Large: the FIN arrives while megabytes are still in flight both ways.
        let key = b"half-close-a-large";
        let expected = table.router.name(table.router.pick(key).unwrap());
        let hdr = header(key);
        let s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let sent = hdr.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await?;
            send_prng(&mut wr, 0xA3, 0xA4, 8 << 20).await?;
            wr.shutdown().await?;
            Ok::<_, io::Error>(wr)
        });
        assert_eq!(read_name(&mut rd).await.unwrap(), expected);
        let mut got = vec![0u8; hdr.len()];
        rd.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hdr);
        read_verified(&mut rd, &mut PrngStream::new(0xA3), 8 << 20, "large")
            .await
            .unwrap();
        expect_eof(&mut rd, "large").await.unwrap();
        let _wr = writer.await.unwrap().unwrap();

        let text = scrape(&proxy).await;
        for reason in ["client_error", "backend_error"] {
            let sample = format!("shardproxy_connection_errors_total{{reason=\"{reason}\"}}");
            assert_eq!(metric(&text, &sample), 0.0, "{text}");
        }
    })
    .await;
}

/// Backend → client half-close while client → backend keeps flowing: the client gets exactly
/// the N bytes sent before the backend's FIN, then EOF; its M-byte upload sent after that EOF
/// still reaches the backend whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_backend_to_client_upload_continues() {
    const N: u64 = 4 << 20;
    const M: u64 = 8 << 20;
    const DOWN: u64 = 0xD0;
    const UP: u64 = 0x0B;
    let key = b"half-close-b".to_vec();
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<io::Result<u64>>();
        let want_key = key.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let r = async {
                let got = read_key_header(&mut s).await?;
                if got != want_key {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong key"));
                }
                let (mut rd, mut wr) = s.split();
                send_prng(&mut wr, DOWN, DOWN + 1, N).await?;
                wr.shutdown().await?;
                // Keep reading the client's upload; write nothing else.
                verify_until_eof(&mut rd, &mut PrngStream::new(UP), "upload").await
            }
            .await;
            let _ = tx.send(r);
        });
        let proxy = start_proxy(vec![spec("raw", addr)], |_| {}).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let hdr = header(&key);
        s.write_all(&hdr).await.unwrap();
        read_verified(&mut s, &mut PrngStream::new(DOWN), N, "download")
            .await
            .unwrap();
        expect_eof(&mut s, "download").await.unwrap();
        // The read side is closed; the write side is not.
        send_prng(&mut s, UP, UP + 1, M).await.unwrap();
        s.shutdown().await.unwrap();
        let received = rx.await.expect("backend task").expect("backend upload");
        assert_eq!(
            received, M,
            "bytes the backend received after its half-close"
        );

        let text = scrape(&proxy).await;
        assert_eq!(
            metric(&text, &bytes_sample("raw", "client_to_backend")),
            (hdr.len() as u64 + M) as f64,
            "{text}"
        );
        assert_eq!(
            metric(&text, &bytes_sample("raw", "backend_to_client")),
            N as f64,
            "{text}"
        );
    })
    .await;
}

/// How long a peer may take to learn of a reset on the other side (a hang guard for a loaded
/// machine, not a performance bound: the reset is propagated as soon as the proxy sees it).
const RESET_GUARD: Duration = Duration::from_secs(20);

/// A backend that resets (SO_LINGER 0) right after the header: the client's read fails with
/// `ECONNRESET` (not a clean EOF: a reset must not look like a complete response), and the
/// proxy counts a backend-side forwarding error.
async fn backend_reset_reaches_client_with(splice: bool) {
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<io::Result<Vec<u8>>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let r = read_key_header(&mut s).await;
            set_reset_on_close(&s);
            drop(s);
            let _ = tx.send(r);
        });
        let proxy = start_proxy(vec![spec("resetter", addr)], |c| c.splice = splice).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&header(b"reset-me")).await.unwrap();
        let key = rx.await.unwrap().expect("backend read the header");
        assert_eq!(key, b"reset-me");
        let mut buf = [0u8; 64];
        let seen = tokio::time::timeout(RESET_GUARD, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("client: nothing within {RESET_GUARD:?} of the reset"));
        match seen {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("client (splice {splice}): expected ECONNRESET, got {other:?}"),
        }
        let sample = "shardproxy_connection_errors_total{reason=\"backend_error\"}";
        assert_eq!(wait_metric(&proxy, sample, 1.0).await, 1.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_client() {
    backend_reset_reaches_client_with(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_client_no_splice() {
    backend_reset_reaches_client_with(false).await;
}

/// A client that resets (SO_LINGER 0) mid-upload: the backend's read fails with
/// `ECONNRESET` (not a clean EOF: a truncated upload must not look complete), after at
/// least the bytes it acknowledged, and the proxy counts a client-side forwarding error.
async fn client_reset_reaches_backend_with(splice: bool) {
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<io::Result<(u64, io::Result<()>)>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let r = async {
                read_key_header(&mut s).await?;
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                let mut signalled = false;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => return Ok((total, Ok(()))),
                        Ok(n) => total += n as u64,
                        Err(e) => return Ok((total, Err(e))),
                    }
                    if !signalled && total >= 64 * 1024 {
                        // Tell the client the stream is flowing.
                        s.write_all(b"!").await?;
                        signalled = true;
                    }
                }
            }
            .await;
            let _ = tx.send(r);
        });
        let proxy = start_proxy(vec![spec("victim", addr)], |c| c.splice = splice).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&header(b"reset-from-client")).await.unwrap();
        send_prng(&mut s, 0xC1, 0xC2, 256 * 1024).await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), b'!');
        send_prng(&mut s, 0xC3, 0xC4, 256 * 1024).await.unwrap();
        set_reset_on_close(&s);
        drop(s);

        let (total, end) = tokio::time::timeout(RESET_GUARD, rx)
            .await
            .unwrap_or_else(|_| panic!("backend: no end within {RESET_GUARD:?} of the reset"))
            .expect("backend task")
            .expect("backend io");
        assert!(
            total >= 64 * 1024,
            "backend got {total} bytes before the end"
        );
        match end {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "backend (splice {splice}): expected ECONNRESET after {total} bytes, got {other:?}"
            ),
        }
        let sample = "shardproxy_connection_errors_total{reason=\"client_error\"}";
        assert_eq!(wait_metric(&proxy, sample, 1.0).await, 1.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_backend() {
    client_reset_reaches_backend_with(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_backend_no_splice() {
    client_reset_reaches_backend_with(false).await;
}

/// A backend that reads slowly (small reads with sleeps) under a 32 MiB upload: the proxy's
/// writes to it hit `EAGAIN` and wait for writability; every byte still arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_reader_gets_every_byte() {
    const LEN: u64 = 32 << 20;
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<io::Result<u64>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let r = async {
                read_key_header(&mut s).await?;
                let mut expected = PrngStream::new(0x51);
                let mut buf = vec![0u8; 16 * 1024];
                let mut want = vec![0u8; 16 * 1024];
                let mut total = 0u64;
                let mut reads = 0u64;
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(total);
                    }
                    check_chunk(&buf[..n], &mut expected, &mut want, total, "slow backend")?;
                    total += n as u64;
                    reads += 1;
                    if reads % 4 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            .await;
            let _ = tx.send(r);
        });
        let proxy = start_proxy(vec![spec("slow", addr)], |_| {}).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let hdr = header(b"slow-backend");
        s.write_all(&hdr).await.unwrap();
        send_prng(&mut s, 0x51, 0x52, LEN).await.unwrap();
        s.shutdown().await.unwrap();
        let got = rx.await.expect("backend task").expect("backend verified");
        assert_eq!(got, LEN);
        // The backend closed after EOF: the client sees EOF too, with nothing before it.
        expect_eof(&mut s, "client").await.unwrap();
        let text = scrape(&proxy).await;
        assert_eq!(
            metric(&text, &bytes_sample("slow", "client_to_backend")),
            (hdr.len() as u64 + LEN) as f64,
            "{text}"
        );
    })
    .await;
}

/// The mirror image: a backend sends 32 MiB to a client that reads slowly; the proxy's writes
/// to the client hit `EAGAIN`; every byte still arrives in order, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_reader_gets_every_byte() {
    const LEN: u64 = 32 << 20;
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if read_key_header(&mut s).await.is_ok() {
                let _ = send_prng(&mut s, 0x61, 0x62, LEN).await;
                let _ = s.shutdown().await;
                // Hold the socket until the client is done.
                let _ = s.read(&mut [0u8; 1]).await;
            }
        });
        let proxy = start_proxy(vec![spec("fast", addr)], |_| {}).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&header(b"slow-client")).await.unwrap();
        let mut expected = PrngStream::new(0x61);
        let mut buf = vec![0u8; 16 * 1024];
        let mut want = vec![0u8; 16 * 1024];
        let mut total = 0u64;
        let mut reads = 0u64;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            check_chunk(&buf[..n], &mut expected, &mut want, total, "slow client").unwrap();
            total += n as u64;
            reads += 1;
            if reads % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(total, LEN);
        let text = scrape(&proxy).await;
        assert_eq!(
            metric(&text, &bytes_sample("fast", "backend_to_client")),
            LEN as f64,
            "{text}"
        );
    })
    .await;
}

/// Writes to `wr` until a write has been blocked for a while: every buffer on the way is full.
async fn fill_until_blocked<W: AsyncWrite + Unpin>(wr: &mut W, seed: u64) -> io::Result<u64> {
    let mut data = PrngStream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        data.fill(&mut buf);
        match tokio::time::timeout(Duration::from_millis(500), wr.write_all(&buf)).await {
            Ok(r) => r?,
            // Blocked (not an assertion: resetting earlier would only make the test easier).
            Err(_) => return Ok(total),
        }
        total += buf.len() as u64;
    }
}

/// Polls a socket's pending error (`SO_ERROR`) without reading, until there is one.
async fn wait_socket_error(s: &TcpStream) -> io::Result<io::Error> {
    loop {
        if let Some(e) = s.take_error()? {
            return Ok(e);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that resets mid-upload while the proxy is blocked writing to a backend that has
/// stopped reading: the proxy must still notice the reset (counted as a client error), and
/// reset the backend, which learns it without having to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_while_backend_stalled_is_noticed() {
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<io::Result<io::Error>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let r = async {
                read_key_header(&mut s).await?;
                // Stall: never read again.
                wait_socket_error(&s).await
            }
            .await;
            let _ = tx.send(r);
        });
        let proxy = start_proxy(vec![spec("stalled", addr)], |_| {}).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&header(b"stalled-backend")).await.unwrap();
        fill_until_blocked(&mut s, 0xE1).await.unwrap();
        set_reset_on_close(&s);
        drop(s);

        let sample = "shardproxy_connection_errors_total{reason=\"client_error\"}";
        assert_eq!(wait_metric(&proxy, sample, 1.0).await, 1.0);
        let e = rx.await.expect("backend task").expect("backend io");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    })
    .await;
}

/// The mirror image: a backend that resets mid-download while the proxy is blocked writing
/// to a client that has stopped reading: the proxy must notice (counted as a backend error)
/// and reset the client, which learns it without having to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_while_client_stalled_is_noticed() {
    guard(GUARD, async {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<io::Result<u64>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let r = async {
                read_key_header(&mut s).await?;
                let sent = fill_until_blocked(&mut s, 0xE2).await?;
                set_reset_on_close(&s);
                Ok(sent)
            }
            .await;
            let _ = tx.send(r);
        });
        let proxy = start_proxy(vec![spec("resetter", addr)], |_| {}).await;

        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&header(b"stalled-client")).await.unwrap();
        // Never read: the backend fills every buffer, then resets.
        rx.await.expect("backend task").expect("backend io");

        let sample = "shardproxy_connection_errors_total{reason=\"backend_error\"}";
        assert_eq!(wait_metric(&proxy, sample, 1.0).await, 1.0);
        let e = wait_socket_error(&s).await.expect("client socket");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    })
    .await;
}
