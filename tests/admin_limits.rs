//! The admin listener cannot take the proxy down: a flood of admin connections that send a
//! request head slowly (a byte at a time, never finishing) holds at most the admin cap of
//! fds, a fresh `GET /metrics` still answers while the flood holds, the data path keeps
//! serving, and trickling heads are closed at the admin header timeout, freeing their slots.
//!
//! Both tests count the process's fds (the proxy runs in-process), so they take turns.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shardproxy::fixtures::client::round_trip;
use shardproxy::HeaderFormat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// The admin connection cap (`admin::ADMIN_MAX_CONNECTIONS`, crate-private; documented in
/// the README).
const ADMIN_CAP: usize = 64;
/// Slow clients in the flood: many more than the cap.
const FLOOD: usize = 300;
/// A slow client sends one more byte of its head this often.
const TRICKLE: Duration = Duration::from_millis(250);
/// Bound on any single wait; generous for a loaded 2-core box.
const GUARD: Duration = Duration::from_secs(30);
/// fds the process may open besides the flood's own client sockets and the admin's
/// accepted sockets (runtime, the proxy's own sockets, the scrape and probe sockets).
const SLACK: usize = 16;
/// The fd-counting tests take turns (the count is process-wide).
static FD_COUNTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const EVICTED: &str = "shardproxy_admin_connections_total{result=\"evicted\"}";
const HEADER_TIMEOUT: &str = "shardproxy_admin_connections_total{result=\"header_timeout\"}";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Sockets this process holds on the server side of `admin` (accepted admin connections):
/// the fds in `/proc/self/fd` whose socket inode `/proc/net/tcp` lists with local port
/// `admin`'s and a state other than LISTEN.
fn admin_fds(admin: SocketAddr) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let port = format!(":{:04X}", admin.port());
    std::fs::read_to_string("/proc/net/tcp")
        .expect("read /proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9 && f[1].ends_with(&port) && f[3] != "0A" && ours.contains(f[9])
        })
        .count()
}

/// An admin client that sends a partial request head and then one more byte every
/// [`TRICKLE`], never finishing it, for at most `rounds` bytes or until `stop`. Returns how
/// long after connecting the server closed it, or `None` if it was still open at the end.
async fn slow_client(
    admin: SocketAddr,
    rounds: u32,
    connected: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Option<Duration> {
    let mut s = timeout(GUARD, TcpStream::connect(admin))
        .await
        .expect("admin connect hung")
        .expect("admin connect");
    let start = Instant::now();
    connected.fetch_add(1, Ordering::SeqCst);
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await
        .is_err()
    {
        return Some(start.elapsed());
    }
    let mut buf = [0u8; 256];
    for _ in 0..rounds {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {}
            },
            () = tokio::time::sleep(TRICKLE) => {
                if s.write_all(b"a").await.is_err() {
                    return Some(start.elapsed());
                }
            }
            () = stop.cancelled() => return None,
        }
    }
    None
}

/// Starts `n` slow clients and waits until all have connected.
async fn flood(
    admin: SocketAddr,
    n: usize,
    rounds: u32,
    stop: &CancellationToken,
) -> JoinSet<Option<Duration>> {
    let connected = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..n {
        set.spawn(slow_client(admin, rounds, connected.clone(), stop.clone()));
    }
    let deadline = Instant::now() + GUARD;
    while connected.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} slow clients connected",
            connected.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set
}

/// `GET /metrics` on a fresh connection, bounded; panics unless it answers 200.
async fn fresh_scrape(admin: SocketAddr) -> String {
    let (status, body) = timeout(GUARD, http_get(admin, "/metrics"))
        .await
        .expect("a fresh GET /metrics did not answer");
    assert!(status.contains("200"), "GET /metrics: {status}");
    body
}

/// A good client still gets a verified round trip through the echo backend.
async fn data_path_serves(proxy: &shardproxy::ProxyHandle, key: &[u8]) {
    let reply = timeout(
        GUARD,
        round_trip(
            proxy.local_addr(),
            &HeaderFormat::default(),
            key,
            b"data path alive",
        ),
    )
    .await
    .expect("data path round trip hung")
    .expect("data path round trip");
    assert_eq!(reply.backend, "b1");
}

/// While more than the cap of slow heads are held open (the header timeout is long, so none
/// times out), the admin holds at most the cap of fds, a fresh scrape still answers (it
/// evicts the oldest unfinished head) and the data path serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_head_flood_is_capped_and_a_fresh_scrape_still_answers() {
    let _turn = FD_COUNTING.lock().await;
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |c| {
        c.admin_header_timeout = Duration::from_secs(120);
    })
    .await;
    let admin = proxy.admin_addr().expect("admin listener");
    let baseline = open_fds();

    let stop = CancellationToken::new();
    // Enough rounds to outlast the checks below; `stop` ends them.
    let mut clients = flood(admin, FLOOD, 400, &stop).await;
    // The flood's own client sockets are in this process too: at most FLOOD of them.
    let bound = baseline + FLOOD + ADMIN_CAP + SLACK;
    let (mut peak, mut admin_peak) = (0, 0);
    for _ in 0..10 {
        peak = peak.max(open_fds());
        admin_peak = admin_peak.max(admin_fds(admin));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exactly: the admin's accepted sockets (one newcomer may be waiting for its slot).
    assert!(
        admin_peak <= ADMIN_CAP + 1,
        "the admin held {admin_peak} connections (cap {ADMIN_CAP})"
    );
    assert!(admin_peak > 0, "admin_fds found no admin sockets");
    assert!(
        peak <= bound,
        "{peak} fds open during the flood: more than baseline {baseline} + {FLOOD} client \
         sockets + admin cap {ADMIN_CAP} + slack {SLACK}"
    );

    let text = fresh_scrape(admin).await;
    data_path_serves(&proxy, b"during-admin-flood").await;
    peak = peak.max(open_fds());
    assert!(
        peak <= bound,
        "{peak} fds open during the flood (bound {bound})"
    );
    // The slots were held by the flood, not freed by a timeout: the scrape got in by
    // evicting the oldest unfinished head.
    assert_eq!(metric(&text, HEADER_TIMEOUT), 0.0, "{text}");
    assert!(
        metric(&text, EVICTED) >= (FLOOD + 1 - ADMIN_CAP) as f64,
        "{text}"
    );

    stop.cancel();
    while let Some(r) = clients.join_next().await {
        r.expect("slow client panicked");
    }
    proxy.shutdown().await;
}

/// Slow heads (a byte every 250 ms) are closed at the admin header timeout even though they
/// keep sending, and once the flood is over its slots and fds are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_heads_time_out_and_free_their_slots() {
    const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
    const N: usize = 2 * ADMIN_CAP;
    let _turn = FD_COUNTING.lock().await;
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |c| c.admin_header_timeout = HEAD_TIMEOUT).await;
    let admin = proxy.admin_addr().expect("admin listener");
    let baseline = open_fds();

    let stop = CancellationToken::new();
    // 80 rounds of 250 ms = 20 s of trickling: far past the 1 s header timeout.
    let mut clients = flood(admin, N, 80, &stop).await;
    let mut still_open = 0;
    while let Some(r) = clients.join_next().await {
        if r.expect("slow client panicked").is_none() {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "{still_open} of {N} trickling admin clients were never closed"
    );

    // The flood is over: the slots and fds are free, the admin and data path serve.
    let text = fresh_scrape(admin).await;
    data_path_serves(&proxy, b"after-admin-flood").await;
    let (timed_out, evicted) = (metric(&text, HEADER_TIMEOUT), metric(&text, EVICTED));
    assert!(timed_out >= ADMIN_CAP as f64, "{text}");
    assert_eq!(timed_out + evicted, N as f64, "{text}");
    let fds = open_fds();
    assert!(
        fds <= baseline + SLACK,
        "{fds} fds open after the flood (baseline {baseline})"
    );
    proxy.shutdown().await;
}

/// A request head longer than the admin's 16 KiB read buffer is refused with 431, not
/// buffered: per-connection memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_is_refused() {
    let _turn = FD_COUNTING.lock().await;
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let admin = proxy.admin_addr().expect("admin listener");
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    // The server may answer and close before taking the whole head: a failed write is fine.
    let _ = s.write_all(head.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = timeout(GUARD, s.read_to_end(&mut resp))
        .await
        .expect("no answer to an oversized head");
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "expected 431, got {:?}",
        resp.lines().next()
    );
    proxy.shutdown().await;
}
