//! Failover when a backend cannot be reached: a key whose owner refuses (or never answers the
//! SYN) goes to its next choice in rank order, never to the same node twice and never past
//! `max_tries`; other keys do not move; `Failover::None` fails fast; when nothing can be
//! reached the client is closed without a greeting. The per-backend failure and failover
//! counters are checked against the exact number of attempts the routing implies.
//!
//! The connect-timeout case needs an address that silently drops SYNs. On loopback nothing
//! is routed into a black hole, so the test makes one: a listener with `listen(0)` that never
//! accepts, whose accept queue the test fills itself. Linux then drops further SYNs
//! (`tcp_conn_request` drops when the accept queue is full, before any SYN-cookie logic), so
//! a connect neither succeeds nor is refused until SYN retransmission gives up. The test
//! verifies this precondition before relying on it and says so if the kernel behaves
//! otherwise.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shardproxy::config::{BackendSpec, Failover};
use shardproxy::fixtures::client::round_trip;
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::{HeaderFormat, ProxyHandle, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Generous guard against a hang; never a performance assertion.
const HANG_GUARD: Duration = Duration::from_secs(10);
/// Round trips in flight at once.
const CONCURRENCY: usize = 16;

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

fn router3() -> Router {
    Router::new([("b1", 1), ("b2", 1), ("b3", 1)]).unwrap()
}

/// What happened to one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A verified round trip answered by this backend.
    Reached(String),
    /// Closed (EOF or reset) without a single byte from any backend.
    Closed,
}

/// One connection: sends `key` and a payload, half-closes, and reads everything back. Either
/// a backend greeted and echoed exactly what was sent, or the connection was closed (EOF or
/// reset) before a single byte arrived. Anything else (partial data, a hang) fails the test.
async fn attempt(addr: SocketAddr, key: &[u8]) -> Outcome {
    let fmt = HeaderFormat::default();
    let mut sent = fmt.encode(key).unwrap();
    sent.extend_from_slice(b"failover payload");
    let closed = |e: &std::io::Error| {
        use std::io::ErrorKind::*;
        matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted)
    };
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        // A proxy that gives up may close before or while we write: that is not an error.
        if let Err(e) = s.write_all(&sent).await {
            assert!(closed(&e), "sending: {e}");
        }
        if let Err(e) = s.shutdown().await {
            assert!(
                closed(&e) || e.kind() == std::io::ErrorKind::NotConnected,
                "{e}"
            );
        }
        let mut got = Vec::new();
        if let Err(e) = s.read_to_end(&mut got).await {
            assert!(closed(&e), "receiving: {e}");
            assert!(got.is_empty(), "reset after {} bytes", got.len());
        }
        if got.is_empty() {
            return Outcome::Closed;
        }
        let nl = got.iter().position(|b| *b == b'\n').expect("greeting line");
        let name = String::from_utf8(got[..nl].to_vec()).expect("UTF-8 name");
        assert_eq!(&got[nl + 1..], &sent[..], "echo from {name} differs");
        Outcome::Reached(name)
    };
    timeout(HANG_GUARD, run)
        .await
        .unwrap_or_else(|_| panic!("key {:?}: connection hung", String::from_utf8_lossy(key)))
}

/// [`attempt`] for every key, a few at a time; outcomes in key order.
async fn attempt_all(addr: SocketAddr, keys: &[Vec<u8>]) -> Vec<Outcome> {
    let keys = Arc::new(keys.to_vec());
    run_bounded(keys.len(), CONCURRENCY, |i| {
        let keys = keys.clone();
        async move { attempt(addr, &keys[i]).await }
    })
    .await
}

/// Polls the proxy's metrics until `sample` equals `want` (the connection-error counter is
/// bumped just after the client is closed), then returns it; gives up after the hang guard.
async fn settled_metric(proxy: &ProxyHandle, sample: &str, want: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let v = metric(&proxy.metrics_text(), sample);
        if v == want || tokio::time::Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failovers(b: &str) -> String {
    format!("shardproxy_failovers_total{{backend=\"{b}\"}}")
}

fn connect_failures(b: &str, reason: &str) -> String {
    format!("shardproxy_backend_connect_failures_total{{backend=\"{b}\",reason=\"{reason}\"}}")
}

fn backend_connections(b: &str) -> String {
    format!("shardproxy_backend_connections_total{{backend=\"{b}\"}}")
}

const CONNECT_FAILED: &str = "shardproxy_connection_errors_total{reason=\"connect_failed\"}";

/// [`start_proxy`] with health checking off: these tests count the connect attempts the
/// routing implies, which an ejection (tests/control_plane.rs covers it) would cut short.
async fn start_without_health(
    backends: Vec<BackendSpec>,
    tweak: impl FnOnce(&mut shardproxy::ProxyConfig),
) -> ProxyHandle {
    start_proxy(backends, |c| {
        c.health.active = false;
        c.health.eject_after = 0;
        tweak(c);
    })
    .await
}

/// Echo backends b1 and b3 around a b2 that refuses connections, behind a proxy configured
/// by `tweak`.
async fn b2_refusing(
    tweak: impl FnOnce(&mut shardproxy::ProxyConfig),
) -> (EchoBackend, EchoBackend, ProxyHandle) {
    let b1 = EchoBackend::start(any_port(), "b1").await.unwrap();
    let b3 = EchoBackend::start(any_port(), "b3").await.unwrap();
    let proxy = start_without_health(
        vec![
            spec("b1", b1.local_addr()),
            spec("b2", refusing_addr()),
            spec("b3", b3.local_addr()),
        ],
        tweak,
    )
    .await;
    (b1, b3, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_owner_sends_its_keys_to_their_second_choice_only() {
    let (b1, b3, proxy) = b2_refusing(|_| {}).await;
    let router = router3();
    let keys = keys(600);
    let got = attempt_all(proxy.local_addr(), &keys).await;
    let mut orphans = 0;
    for (i, k) in keys.iter().enumerate() {
        let rank = router.rank_names(k);
        let want = if rank[0] == "b2" {
            orphans += 1;
            rank[1]
        } else {
            rank[0]
        };
        assert_eq!(
            got[i],
            Outcome::Reached(want.to_string()),
            "key #{i} {rank:?}"
        );
    }
    assert!(
        orphans > 100,
        "b2 owns about a third of the keys: {orphans}"
    );

    // Each orphan cost exactly one refused attempt on b2 and one failover off it.
    let text = scrape(&proxy).await;
    assert_eq!(metric(&text, &failovers("b2")), orphans as f64, "{text}");
    assert_eq!(
        metric(&text, &connect_failures("b2", "refused")),
        orphans as f64
    );
    for b in ["b1", "b3"] {
        assert_eq!(metric(&text, &failovers(b)), 0.0);
        assert_eq!(metric(&text, &connect_failures(b, "refused")), 0.0);
    }
    assert_eq!(metric(&text, &backend_connections("b2")), 0.0);
    // Every key found a backend: one connection each, on the backend that answered.
    let (n1, n3) = (b1.accepted(), b3.accepted());
    assert_eq!((n1 + n3) as usize, keys.len());
    assert_eq!(metric(&text, &backend_connections("b1")), n1 as f64);
    assert_eq!(metric(&text, &backend_connections("b3")), n3 as f64);
    assert_eq!(metric(&text, CONNECT_FAILED), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_never_tries_a_node_twice_and_stops_at_max_tries() {
    // b2 and b3 refuse; only b1 answers.
    let b1 = EchoBackend::start(any_port(), "b1").await.unwrap();
    let members = vec![
        spec("b1", b1.local_addr()),
        spec("b2", refusing_addr()),
        spec("b3", refusing_addr()),
    ];
    let router = router3();
    let keys = keys(300);
    // Keys whose two first choices both refuse: only the third try reaches b1.
    let last_resort = keys
        .iter()
        .filter(|k| router.rank_names(k)[2] == "b1")
        .count();
    assert!(last_resort > 50, "{last_resort}");

    for max_tries in [3u32, 2, 1] {
        let proxy = start_without_health(members.clone(), |c| c.max_tries = max_tries).await;
        let got = attempt_all(proxy.local_addr(), &keys).await;
        let (mut refused_b2, mut refused_b3, mut failed) = (0, 0, 0);
        for (i, k) in keys.iter().enumerate() {
            let rank = router.rank_names(k);
            let pos = rank.iter().position(|n| *n == "b1").unwrap();
            // Attempts in rank order, each node once, at most max_tries of them.
            let tried = &rank[..(pos + 1).min(max_tries as usize)];
            let reached = tried.contains(&"b1");
            refused_b2 += usize::from(tried.contains(&"b2"));
            refused_b3 += usize::from(tried.contains(&"b3"));
            let want = if reached {
                Outcome::Reached("b1".to_string())
            } else {
                failed += 1;
                Outcome::Closed
            };
            assert_eq!(got[i], want, "max_tries={max_tries} key #{i} {rank:?}");
        }
        if max_tries == 3 {
            assert_eq!(failed, 0);
        } else {
            assert!(failed > 0);
        }
        let text = proxy.metrics_text();
        let ctx = format!("max_tries={max_tries}\n{text}");
        assert_eq!(
            metric(&text, &connect_failures("b2", "refused")),
            refused_b2 as f64,
            "{ctx}"
        );
        assert_eq!(
            metric(&text, &connect_failures("b3", "refused")),
            refused_b3 as f64,
            "{ctx}"
        );
        assert_eq!(
            settled_metric(&proxy, CONNECT_FAILED, failed as f64).await,
            failed as f64,
            "{ctx}"
        );
        if max_tries == 1 {
            assert_eq!(metric(&text, &failovers("b2")), 0.0, "{ctx}");
            assert_eq!(metric(&text, &failovers("b3")), 0.0, "{ctx}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tries_one_fails_the_refusing_nodes_keys_and_serves_the_rest() {
    let (_b1, _b3, proxy) = b2_refusing(|c| c.max_tries = 1).await;
    let router = router3();
    let keys = keys(300);
    let got = attempt_all(proxy.local_addr(), &keys).await;
    let mut b2_keys = 0;
    for (i, k) in keys.iter().enumerate() {
        let owner = router.rank_names(k)[0];
        if owner == "b2" {
            b2_keys += 1;
            assert_eq!(got[i], Outcome::Closed, "key #{i} of the refusing node");
        } else {
            assert_eq!(got[i], Outcome::Reached(owner.to_string()), "key #{i}");
        }
    }
    assert!(b2_keys > 0);
    assert_eq!(
        settled_metric(&proxy, CONNECT_FAILED, b2_keys as f64).await,
        b2_keys as f64
    );
    let text = proxy.metrics_text();
    assert_eq!(
        metric(&text, &connect_failures("b2", "refused")),
        b2_keys as f64
    );
    assert_eq!(metric(&text, &failovers("b2")), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_none_closes_the_client_and_no_other_backend_is_contacted() {
    let (b1, b3, proxy) = b2_refusing(|c| c.failover = Failover::None).await;
    let router = router3();
    let all = keys(200);
    let (orphans, others): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|k| router.rank_names(k)[0] == "b2");
    assert!(!orphans.is_empty() && !others.is_empty());

    let got = attempt_all(proxy.local_addr(), &orphans).await;
    assert!(got.iter().all(|o| *o == Outcome::Closed), "{got:?}");
    assert_eq!(
        b1.accepted() + b3.accepted(),
        0,
        "a key of the refusing node was sent to another backend"
    );
    assert_eq!(
        settled_metric(&proxy, CONNECT_FAILED, orphans.len() as f64).await,
        orphans.len() as f64
    );
    let text = proxy.metrics_text();
    assert_eq!(
        metric(&text, &connect_failures("b2", "refused")),
        orphans.len() as f64
    );
    assert_eq!(metric(&text, &failovers("b2")), 0.0);

    // The other keys still work, each on its owner.
    let got = attempt_all(proxy.local_addr(), &others).await;
    for (k, o) in others.iter().zip(&got) {
        assert_eq!(*o, Outcome::Reached(router.rank_names(k)[0].to_string()));
    }
}

/// A listener that never accepts and whose accept queue is full, so SYNs to it are dropped
/// and a connect attempt just waits. `None` if this kernel does not behave that way.
async fn black_hole() -> Option<(socket2::Socket, Vec<TcpStream>, SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.bind(&any_port().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue: connect until an attempt neither completes nor is refused, and
    // a second attempt confirms it (a slow first handshake on a loaded machine is not enough).
    let attempt = || timeout(Duration::from_millis(500), TcpStream::connect(addr));
    let mut filler = Vec::new();
    let mut waited = 0;
    for _ in 0..16 {
        match attempt().await {
            Ok(Ok(s)) => {
                filler.push(s);
                waited = 0;
            }
            Ok(Err(e)) => panic!("connecting to the full listener failed outright: {e}"),
            Err(_) => {
                waited += 1;
                if waited == 2 {
                    return Some((socket, filler, addr));
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_never_answers_times_out_and_its_keys_fail_over() {
    let Some((_hole, _filler, hole)) = black_hole().await else {
        panic!(
            "this kernel accepts connections beyond a full listen(0) queue; the black-hole \
             fixture needs to be replaced"
        );
    };
    let b1 = EchoBackend::start(any_port(), "b1").await.unwrap();
    let b3 = EchoBackend::start(any_port(), "b3").await.unwrap();
    let proxy = start_without_health(
        vec![
            spec("b1", b1.local_addr()),
            spec("b2", hole),
            spec("b3", b3.local_addr()),
        ],
        |c| c.connect_timeout = Duration::from_millis(200),
    )
    .await;
    let router = router3();
    // A handful of keys each way: every key of b2 costs one connect timeout.
    let all = keys(60);
    let orphans: Vec<_> = all
        .iter()
        .filter(|k| router.rank_names(k)[0] == "b2")
        .take(6)
        .cloned()
        .collect();
    let others: Vec<_> = all
        .iter()
        .filter(|k| router.rank_names(k)[0] != "b2")
        .take(6)
        .cloned()
        .collect();
    assert_eq!((orphans.len(), others.len()), (6, 6));

    let fmt = HeaderFormat::default();
    let mut set = JoinSet::new();
    for k in orphans.iter().chain(&others).cloned() {
        let addr = proxy.local_addr();
        set.spawn(async move {
            let reply = timeout(HANG_GUARD, round_trip(addr, &fmt, &k, b"slow owner"))
                .await
                .expect("round trip hung")
                .expect("round trip failed");
            (k, reply.backend)
        });
    }
    while let Some(done) = set.join_next().await {
        let (k, backend) = done.unwrap();
        let rank = router.rank_names(&k);
        let want = if rank[0] == "b2" { rank[1] } else { rank[0] };
        assert_eq!(
            backend,
            want,
            "key {:?} {rank:?}",
            String::from_utf8_lossy(&k)
        );
    }
    let text = proxy.metrics_text();
    assert_eq!(
        metric(&text, &connect_failures("b2", "timeout")),
        6.0,
        "{text}"
    );
    assert_eq!(metric(&text, &connect_failures("b2", "refused")), 0.0);
    assert_eq!(metric(&text, &failovers("b2")), 6.0);
    assert_eq!(metric(&text, &backend_connections("b2")), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_the_client_is_closed_without_a_greeting() {
    let proxy = start_without_health(
        vec![
            spec("b1", refusing_addr()),
            spec("b2", refusing_addr()),
            spec("b3", refusing_addr()),
        ],
        |_| {},
    )
    .await;
    let keys = keys(20);
    let got = attempt_all(proxy.local_addr(), &keys).await;
    assert!(got.iter().all(|o| *o == Outcome::Closed), "{got:?}");
    assert_eq!(
        settled_metric(&proxy, CONNECT_FAILED, keys.len() as f64).await,
        keys.len() as f64
    );
    // Every key tried each of the three nodes exactly once.
    let text = scrape(&proxy).await;
    for b in ["b1", "b2", "b3"] {
        assert_eq!(
            metric(&text, &connect_failures(b, "refused")),
            keys.len() as f64,
            "{b}: {text}"
        );
    }

    // Every node drained (weight 0): nothing to try at all, the client is closed likewise.
    let drained: Vec<_> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| BackendSpec {
            weight: 0,
            agent: None,
            max_connections: None,
            proxy_protocol: None,
            ..spec(n, refusing_addr())
        })
        .collect();
    proxy.set_backends(&drained).unwrap();
    let got = attempt_all(proxy.local_addr(), &keys[..5]).await;
    assert!(got.iter().all(|o| *o == Outcome::Closed), "{got:?}");
    let no_backend = "shardproxy_connection_errors_total{reason=\"no_backend\"}";
    assert_eq!(settled_metric(&proxy, no_backend, 5.0).await, 5.0);
}
