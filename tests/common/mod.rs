//! Shared fixtures for the integration tests: fake backends on port 0, an in-process proxy,
//! a Prometheus text reader and deterministic data. Everything binds 127.0.0.1:0.
#![allow(dead_code)]

pub mod etcd;
pub mod pki;
pub mod process;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shardproxy::config::{BackendSpec, ProxyConfig};
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::ProxyHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The loopback address with port 0.
pub fn any_port() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// Stops `backend` and keeps its port held: a socket bound to its address that does not
/// listen, so a connect (or a health probe) there is refused, and the kernel gives the port to
/// no other listener that binds port 0 (a test running in parallel could otherwise take it
/// and answer for the dead backend). Drop the holder before starting a listener there again.
pub async fn stop_and_hold(backend: EchoBackend) -> socket2::Socket {
    let addr = backend.local_addr();
    backend.stop().await;
    let hold = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a socket to hold the port");
    // Accepted connections may linger in TIME_WAIT on the port; SO_REUSEADDR binds over them
    // (port-0 allocation still skips a port with any bound socket).
    hold.set_reuse_address(true).expect("SO_REUSEADDR");
    hold.bind(&addr.into())
        .unwrap_or_else(|e| panic!("hold the stopped backend's port {addr}: {e}"));
    hold
}

/// Starts `n` echo backends named `b1..bn`.
pub async fn echo_backends(n: usize) -> Vec<EchoBackend> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(
            EchoBackend::start(any_port(), &format!("b{i}"))
                .await
                .expect("bind echo backend"),
        );
    }
    v
}

/// Backend specs (weight 1) for running echo backends.
pub fn specs(backends: &[EchoBackend]) -> Vec<BackendSpec> {
    backends
        .iter()
        .map(|b| BackendSpec {
            name: b.name().to_string(),
            addr: b.local_addr(),
            weight: 1,
            agent: None,
            max_connections: None,
            proxy_protocol: None,
        })
        .collect()
}

/// Starts an in-process proxy on 127.0.0.1:0 with an admin listener, after `tweak`.
pub async fn start_proxy(
    backends: Vec<BackendSpec>,
    tweak: impl FnOnce(&mut ProxyConfig),
) -> ProxyHandle {
    let mut config = ProxyConfig::new(any_port(), backends);
    config.admin = Some(any_port());
    tweak(&mut config);
    shardproxy::start(config).await.expect("start proxy")
}

/// The samples of Prometheus text as (`name{labels}`, value), comments skipped.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
}

/// The value of one sample in Prometheus text, e.g.
/// `metric(&text, "shardproxy_header_errors_total{reason=\"eof\"}")`.
///
/// Panics if the sample is absent (listing the samples with a similar name), so an assertion
/// that a counter is 0 cannot pass because the metric or a label was renamed: the proxy
/// pre-registers its metrics at start, so a sample it can report is there from the start.
pub fn metric(text: &str, sample: &str) -> f64 {
    match lookup(text, sample) {
        Some(v) => v,
        None => panic!(
            "metric sample {sample:?} is absent from the exposition; similar samples:\n{}",
            similar_samples(text, sample)
        ),
    }
}

fn lookup(text: &str, sample: &str) -> Option<f64> {
    samples(text).find_map(|(name, value)| {
        if name != sample {
            return None;
        }
        Some(
            value
                .parse()
                .unwrap_or_else(|_| panic!("metric sample {sample:?}: bad value {value:?}")),
        )
    })
}

/// The samples whose metric name matches `sample`'s (or, if none, that share its longest
/// prefix), one per line, for a failure message.
fn similar_samples(text: &str, sample: &str) -> String {
    let base = sample.split('{').next().unwrap_or(sample);
    let mut found: Vec<&str> = samples(text)
        .map(|(name, _)| name)
        .filter(|name| name.split('{').next() == Some(base))
        .collect();
    if found.is_empty() {
        let common = |name: &str| {
            name.bytes()
                .zip(sample.bytes())
                .take_while(|(a, b)| a == b)
                .count()
        };
        let best = samples(text).map(|(n, _)| common(n)).max().unwrap_or(0);
        found = samples(text)
            .map(|(name, _)| name)
            .filter(|name| best > 0 && common(name) == best)
            .collect();
    }
    if found.is_empty() {
        return "  (none)".to_string();
    }
    found
        .iter()
        .take(20)
        .map(|n| format!("  {n}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An address on which nothing listens: connects are refused at once.
pub fn refusing_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind(any_port()).expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// A backend that accepts, counts, and holds connections without ever reading or writing
/// (a "stalled" backend); also proves whether the proxy contacted it at all.
pub struct CountingBackend {
    /// Bound address.
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CountingBackend {
    /// Binds 127.0.0.1:0 and starts accepting.
    pub async fn start() -> Self {
        let listener = TcpListener::bind(any_port()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        CountingBackend {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The process's fd table, full: the soft fd limit lowered to `limit` and every free fd taken
/// by a `/dev/null` placeholder. Dropping it frees the fds and restores the limit (also when a
/// test panics). Only for test binaries with a single test: the limit is process-wide.
pub struct FullFdTable {
    filler: Vec<std::fs::File>,
    hard: u64,
}

impl FullFdTable {
    /// Lowers the soft fd limit to `limit` and fills the table.
    pub fn fill(limit: u64) -> Self {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, limit, hard).expect("lower the soft fd limit");
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
            assert!(filler.len() < 100_000, "the fd limit did not take effect");
        }
        FullFdTable { filler, hard }
    }

    /// Frees one fd, for the caller to take.
    pub fn free_one(&mut self) {
        self.filler.pop();
    }
}

impl Drop for FullFdTable {
    fn drop(&mut self) {
        use nix::sys::resource::{setrlimit, Resource};
        self.filler.clear();
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.hard, self.hard);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), cheap enough for hundreds of MiB.
pub fn fill_prng(seed: u64, buf: &mut [u8]) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let v = s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A stream of deterministic bytes: `PrngStream::new(seed)` yields the same sequence every
/// time, in chunks of any size, so a sender and a checker need not hold the whole payload.
pub struct PrngStream {
    state: u64,
    pending: [u8; 8],
    pending_len: usize,
}

impl PrngStream {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        PrngStream {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            if self.pending_len == 0 {
                let s = &mut self.state;
                *s ^= *s >> 12;
                *s ^= *s << 25;
                *s ^= *s >> 27;
                self.pending = s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.pending_len = 8;
            }
            *b = self.pending[8 - self.pending_len];
            self.pending_len -= 1;
        }
    }
}

/// `GET path` on the admin listener over plain HTTP/1.1; returns (status line, body).
pub async fn http_get(admin: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// Scrapes `/metrics` from a proxy's admin listener.
pub async fn scrape(proxy: &ProxyHandle) -> String {
    let admin = proxy
        .admin_addr()
        .expect("proxy started with an admin listener");
    let (status, body) = http_get(admin, "/metrics").await;
    assert!(status.contains("200"), "GET /metrics: {status}");
    body
}

/// splitmix64: a seeded source of sizes and garbage (independent of the data stream).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The `i`-th test key, `user:{i}`.
pub fn key(i: usize) -> Vec<u8> {
    format!("user:{i}").into_bytes()
}

/// Keys `user:0 .. user:{n-1}`.
pub fn keys(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(key).collect()
}

/// Runs `task(i)` for `i` in `0..n`, at most `concurrency` at a time, and returns the
/// results in index order. A panicking task fails the caller.
pub async fn run_bounded<T, F, Fut>(n: usize, concurrency: usize, task: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while next < n && set.len() < concurrency {
            let fut = task(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (i, v) = done.expect("task panicked");
        out[i] = Some(v);
    }
    out.into_iter()
        .map(|v| v.expect("every task ran"))
        .collect()
}

/// One admin request over plain HTTP/1.1 (`Connection: close`): `method path`, with `body`
/// sent as `application/json` when given and `Authorization: Bearer <token>` when `token`
/// is. Returns (status code, body); the status is 0 if the answer has no status line.
pub async fn http_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || matches!(method, "PUT" | "POST") {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}
