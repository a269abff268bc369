//! Limits and PROXY protocol v2, end to end through an in-process proxy.
//!
//! - `source_rate`: a host opening connections faster than its token bucket allows has the
//!   excess reset at once and counted `rejected{reason="source_rate"}`; another host at a
//!   modest pace meanwhile sees no failure (the accept loop never stalls); after a pause for
//!   the bucket to refill the first host is served again.
//! - per-backend `max_connections`: over it a connection for one of the backend's keys is
//!   closed at once and counted `backend_full`, and the key is not sent to another backend;
//!   other backends' keys still work, and a freed slot is usable again.
//! - PROXY v2: a backend with `proxy_protocol` set (per backend, or proxy-wide) receives a
//!   header that parses back to the client's address and the proxy's listen address, followed
//!   by the key header and payload intact; a backend without it (or with the per-backend
//!   `none` override) receives none.
//!
//! Hosts are told apart by binding client sockets to 127.0.0.2, 127.0.0.3, ... .

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use shardproxy::config::SourceRate;
use shardproxy::fixtures::client::read_name;
use shardproxy::{HeaderFormat, ProxyHandle, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Hang guard for a whole test (never a timing assertion).
const GUARD: Duration = Duration::from_secs(120);
/// A refused connection must be closed within this (generous: the alternative is a
/// connection held until its 60 s header timeout, or served).
const CLOSED_FAST: Duration = Duration::from_secs(10);
/// The host that opens connections too fast.
const HAMMER_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The host that keeps a modest pace.
const STEADY_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// The payload every client sends after its key header.
const PAYLOAD: &[u8] = b"the payload, then a half-close";

/// Runs `fut` under the hang guard.
async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("hang guard: test did not finish within {GUARD:?}"))
}

/// Connects to `addr` from `source` (port chosen by the kernel).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The key header for `key` followed by [`PAYLOAD`]: what a client sends.
fn wire(key: &[u8]) -> Vec<u8> {
    let mut w = HeaderFormat::default().encode(key).expect("encode key");
    w.extend_from_slice(PAYLOAD);
    w
}

/// How one connection through the proxy ended.
#[derive(Debug)]
enum Outcome {
    /// The backend named itself and echoed everything back.
    Served(String),
    /// Closed (reset or EOF) before any byte came back, after this long.
    Refused(Duration),
    /// Anything else: a failed connect, a partial or wrong echo.
    Broken(String),
}

/// One keyed round trip from `source`: header and payload out, half-close, then read
/// everything back and classify it.
async fn attempt(source: IpAddr, addr: SocketAddr, key: &[u8]) -> Outcome {
    let started = Instant::now();
    let wire = wire(key);
    let mut s = match connect_from(source, addr).await {
        Ok(s) => s,
        // The kernel completed the handshake and the proxy reset the connection before the
        // connect call saw it: refused too.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Outcome::Refused(started.elapsed())
        }
        Err(e) => return Outcome::Broken(format!("connect: {e}")),
    };
    // A refused connection may be reset before these complete; the read below tells.
    let _ = s.write_all(&wire).await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let read = s.read_to_end(&mut got).await;
    if got.is_empty() {
        return Outcome::Refused(started.elapsed());
    }
    let Some(at) = got.iter().position(|b| *b == b'\n') else {
        return Outcome::Broken(format!("no name line in {} bytes ({read:?})", got.len()));
    };
    if read.is_err() || got[at + 1..] != wire[..] {
        return Outcome::Broken(format!(
            "echo differs: sent {} bytes, got {} after the name ({read:?})",
            wire.len(),
            got.len() - at - 1
        ));
    }
    Outcome::Served(String::from_utf8_lossy(&got[..at]).into_owned())
}

/// A sample of `shardproxy_connections_rejected_total`.
fn rejected(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("shardproxy_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// A sample of `shardproxy_connection_errors_total`.
fn conn_errors(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("shardproxy_connection_errors_total{{reason=\"{reason}\"}}"),
    )
}

/// No active health probes: these tests count the connections each backend accepts, and a
/// probe is a connection too.
fn no_probes(c: &mut shardproxy::ProxyConfig) {
    c.health.active = false;
}

/// Polls the metrics until `ready` holds for them (the hang guard bounds it).
async fn wait_metrics(proxy: &ProxyHandle, ready: impl Fn(&str) -> bool) -> String {
    loop {
        let text = proxy.metrics_text();
        if ready(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first `n` test keys whose owner (first choice) among `names` is `owner`.
fn keys_owned_by(names: &[&str], owner: &str, n: usize) -> Vec<Vec<u8>> {
    let router = Router::new(names.iter().map(|name| (name.to_string(), 1))).expect("router");
    (0..)
        .map(key)
        .filter(|k| router.rank_names(k)[0] == owner)
        .take(n)
        .collect()
}

/// The hammering host opens [`HAMMER_CONCURRENCY`] connections at once, pauses
/// [`HAMMER_PAUSE`], and again, at most [`HAMMER_WAVES`] times (hundreds per second, far
/// over its 20/s).
const HAMMER_CONCURRENCY: usize = 25;
const HAMMER_PAUSE: Duration = Duration::from_millis(20);
const HAMMER_WAVES: usize = 200;
/// Round trips the steady host makes, one every [`STEADY_PAUSE`] at most (10/s, under the
/// 20/s limit, and never more than its burst of 10 at once).
const STEADY: usize = 20;
const STEADY_PAUSE: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_rate_resets_one_hosts_excess_and_spares_other_hosts() {
    guard(async {
        let backends = echo_backends(2).await;
        let proxy = start_proxy(specs(&backends), |c| {
            c.source_rate = Some(SourceRate {
                per_second: 20.0,
                burst: 10,
            });
            c.header_timeout = Duration::from_secs(60);
            no_probes(c);
        })
        .await;
        let addr = proxy.local_addr();
        assert_eq!(rejected(&proxy.metrics_text(), "source_rate"), 0.0);

        let steady = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..STEADY {
                outcomes.push(attempt(STEADY_HOST, addr, &key(i)).await);
                tokio::time::sleep(STEADY_PAUSE).await;
            }
            outcomes
        });
        // The hammer runs in waves for as long as the steady client does (bounded).
        let started = Instant::now();
        let mut hammer = Vec::new();
        for wave in 0..HAMMER_WAVES {
            if steady.is_finished() {
                break;
            }
            let base = 1000 + wave * HAMMER_CONCURRENCY;
            hammer.extend(
                run_bounded(HAMMER_CONCURRENCY, HAMMER_CONCURRENCY, |i| async move {
                    attempt(HAMMER_HOST, addr, &key(base + i)).await
                })
                .await,
            );
            tokio::time::sleep(HAMMER_PAUSE).await;
        }
        let hammer_time = started.elapsed();
        let steady = steady.await.expect("steady client");

        let served = hammer
            .iter()
            .filter(|o| matches!(o, Outcome::Served(_)))
            .count();
        let refused: Vec<Duration> = hammer
            .iter()
            .filter_map(|o| match o {
                Outcome::Refused(d) => Some(*d),
                _ => None,
            })
            .collect();
        let broken: Vec<&str> = hammer
            .iter()
            .filter_map(|o| match o {
                Outcome::Broken(why) => Some(why.as_str()),
                _ => None,
            })
            .collect();
        let slowest = refused.iter().max().copied().unwrap_or_default();
        println!(
            "hammer from {HAMMER_HOST}: {} connections in {hammer_time:?}: {served} served, \
             {} refused (slowest refusal {slowest:?}), {} broken",
            hammer.len(),
            refused.len(),
            broken.len()
        );
        assert!(broken.is_empty(), "hammer: {broken:?}");
        // The bucket holds 10 and refills 20 per second: nothing beyond that is served,
        // however slowly the hammer ran.
        let allowed = 10 + (20.0 * hammer_time.as_secs_f64()).ceil() as usize + 1;
        assert!(
            served <= allowed,
            "{served} served from {HAMMER_HOST}, at most {allowed} allowed in {hammer_time:?}"
        );
        assert!(served >= 10, "the burst of 10 is served: {served}");
        assert!(!refused.is_empty(), "the excess is refused");
        assert!(slowest < CLOSED_FAST, "a refusal took {slowest:?}");
        let text = proxy.metrics_text();
        assert_eq!(
            rejected(&text, "source_rate"),
            refused.len() as f64,
            "every refusal counted as source_rate"
        );

        let steady_failures: Vec<&Outcome> = steady
            .iter()
            .filter(|o| !matches!(o, Outcome::Served(_)))
            .collect();
        println!(
            "steady from {STEADY_HOST}: {} of {STEADY} served",
            STEADY - steady_failures.len()
        );
        assert!(
            steady_failures.is_empty(),
            "steady host: {steady_failures:?}"
        );

        // A full refill takes 0.5 s; wait twice that, then the host is served again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..5 {
            match attempt(HAMMER_HOST, addr, &key(5000 + i)).await {
                Outcome::Served(_) => {}
                other => panic!("after the refill, round trip {i} from {HAMMER_HOST}: {other:?}"),
            }
        }
        assert_eq!(
            rejected(&proxy.metrics_text(), "source_rate"),
            refused.len() as f64
        );
        proxy.shutdown().await;
    })
    .await;
}

/// Sends `key`'s header and some payload and reads the backend's name: a connection held
/// open through the proxy.
async fn hold(addr: SocketAddr, key: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&wire(key)).await.expect("send");
    let name = read_name(&mut s).await.expect("backend name");
    (s, name)
}

fn backend_connections(text: &str, backend: &str) -> f64 {
    metric(
        text,
        &format!("shardproxy_backend_connections_total{{backend=\"{backend}\"}}"),
    )
}

fn backend_active(text: &str, backend: &str) -> f64 {
    metric(
        text,
        &format!("shardproxy_backend_connections_active{{backend=\"{backend}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_fails_its_keys_fast_without_moving_them() {
    guard(async {
        let backends = echo_backends(2).await;
        let mut specs = specs(&backends);
        specs[0].max_connections = Some(3);
        let proxy = start_proxy(specs, |c| {
            c.header_timeout = Duration::from_secs(60);
            no_probes(c);
        })
        .await;
        let addr = proxy.local_addr();
        let b1_keys = keys_owned_by(&["b1", "b2"], "b1", 5);
        let b2_keys = keys_owned_by(&["b1", "b2"], "b2", 3);

        let mut held = Vec::new();
        for k in &b1_keys[..3] {
            let (s, name) = hold(addr, k).await;
            assert_eq!(name, "b1");
            held.push(s);
        }
        let text = proxy.metrics_text();
        assert_eq!(backend_active(&text, "b1"), 3.0);
        let b2_before = (backends[1].accepted(), backend_connections(&text, "b2"));

        let fourth = attempt(IpAddr::V4(Ipv4Addr::LOCALHOST), addr, &b1_keys[3]).await;
        println!("4th connection for a b1 key with b1 full: {fourth:?}");
        match fourth {
            Outcome::Refused(d) => assert!(d < CLOSED_FAST, "refusal took {d:?}"),
            other => panic!("4th b1 connection with b1 at max_connections=3: {other:?}"),
        }
        let text = proxy.metrics_text();
        assert_eq!(conn_errors(&text, "backend_full"), 1.0);
        assert_eq!(
            (backends[1].accepted(), backend_connections(&text, "b2")),
            b2_before,
            "the key of a full b1 was sent to b2 (accepted, proxied)"
        );
        assert_eq!(backends[0].accepted(), 3, "b1 got a 4th connection");

        for k in &b2_keys {
            match attempt(IpAddr::V4(Ipv4Addr::LOCALHOST), addr, k).await {
                Outcome::Served(name) => assert_eq!(name, "b2"),
                other => panic!("a b2 key while b1 is full: {other:?}"),
            }
        }

        // Close one of the three; once the proxy has let go of its slot, b1 takes a new one.
        let mut first = held.pop().expect("held");
        first.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).await.expect("echo to EOF");
        drop(first);
        wait_metrics(&proxy, |t| backend_active(t, "b1") == 2.0).await;
        match attempt(IpAddr::V4(Ipv4Addr::LOCALHOST), addr, &b1_keys[4]).await {
            Outcome::Served(name) => assert_eq!(name, "b1"),
            other => panic!("a b1 key after a slot freed: {other:?}"),
        }
        assert_eq!(conn_errors(&proxy.metrics_text(), "backend_full"), 1.0);
        drop(held);
        proxy.shutdown().await;
    })
    .await;
}

/// A test backend that records what each connection delivered (everything up to the
/// proxy's half-close), answers `ok` and closes.
struct RecordingBackend {
    addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl RecordingBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind(any_port()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    if s.read_to_end(&mut got).await.is_ok() {
                        let _ = tx.send(got);
                        let _ = s.write_all(b"ok").await;
                    }
                });
            }
        });
        RecordingBackend { addr, received }
    }

    /// What the next connection that sent anything delivered (a connection that sends
    /// nothing, such as a health probe, is not a client's).
    async fn next(&mut self) -> Vec<u8> {
        loop {
            let got = self.received.recv().await.expect("backend task alive");
            if !got.is_empty() {
                return got;
            }
        }
    }
}

/// A client from `source` sends `key` and the payload through the proxy and half-closes;
/// returns its own address and the reply.
async fn send_through(source: IpAddr, proxy: SocketAddr, key: &[u8]) -> (SocketAddr, Vec<u8>) {
    let mut s = connect_from(source, proxy).await.expect("connect");
    let me = s.local_addr().expect("local addr");
    s.write_all(&wire(key)).await.expect("send");
    s.shutdown().await.expect("half-close");
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.expect("reply");
    (me, reply)
}

/// Splits a PROXY v2 header off `got`, checks it names `client` and `proxy`, and returns
/// what follows it.
fn parse_proxy_v2(got: &[u8], client: SocketAddr, proxy: SocketAddr) -> &[u8] {
    use ppp::v2;
    let header = v2::Header::try_from(got)
        .unwrap_or_else(|e| panic!("no PROXY v2 header in {} bytes: {e:?}", got.len()));
    println!(
        "PROXY v2 header ({} bytes): {:?} {:?} {:?}",
        header.len(),
        header.command,
        header.protocol,
        header.addresses
    );
    assert_eq!(header.command, v2::Command::Proxy);
    assert_eq!(header.protocol, v2::Protocol::Stream);
    match header.addresses {
        v2::Addresses::IPv4(a) => {
            assert_eq!(
                SocketAddr::from((a.source_address, a.source_port)),
                client,
                "source"
            );
            assert_eq!(
                SocketAddr::from((a.destination_address, a.destination_port)),
                proxy,
                "destination"
            );
        }
        other => panic!("not IPv4: {other:?}"),
    }
    &got[header.len()..]
}

/// The backend specs for two recording backends named `pp` and `plain`, with their
/// per-backend `proxy_protocol` settings.
fn two_specs(
    pp: &RecordingBackend,
    pp_setting: Option<bool>,
    plain: &RecordingBackend,
    plain_setting: Option<bool>,
) -> Vec<shardproxy::BackendSpec> {
    let spec = |name: &str, addr, proxy_protocol| shardproxy::BackendSpec {
        name: name.to_string(),
        addr,
        weight: 1,
        agent: None,
        max_connections: None,
        proxy_protocol,
    };
    vec![
        spec("pp", pp.addr, pp_setting),
        spec("plain", plain.addr, plain_setting),
    ]
}

/// Through `proxy`, one client per backend (keys owned by `pp` and by `plain`): `pp`'s gets
/// a PROXY v2 header naming the client and the proxy, `plain`'s none; both then get the key
/// header and payload intact.
async fn check_headers(
    proxy: &ProxyHandle,
    pp: &mut RecordingBackend,
    plain: &mut RecordingBackend,
) {
    let addr = proxy.local_addr();
    let pp_key = &keys_owned_by(&["pp", "plain"], "pp", 1)[0];
    let plain_key = &keys_owned_by(&["pp", "plain"], "plain", 1)[0];

    let (client, reply) = send_through(HAMMER_HOST, addr, pp_key).await;
    assert_eq!(reply, b"ok");
    let got = pp.next().await;
    let rest = parse_proxy_v2(&got, client, addr);
    assert_eq!(
        rest,
        wire(pp_key),
        "key header and payload after the PROXY header"
    );

    let (_, reply) = send_through(STEADY_HOST, addr, plain_key).await;
    assert_eq!(reply, b"ok");
    let got = plain.next().await;
    assert_eq!(
        got,
        wire(plain_key),
        "the plain backend gets no PROXY header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_per_backend_reaches_only_that_backend() {
    guard(async {
        let (mut pp, mut plain) = (
            RecordingBackend::start().await,
            RecordingBackend::start().await,
        );
        let specs = two_specs(&pp, Some(true), &plain, None);
        let proxy = start_proxy(specs, |c| {
            c.proxy_protocol = false;
            no_probes(c);
        })
        .await;
        check_headers(&proxy, &mut pp, &mut plain).await;
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_proxy_wide_with_a_per_backend_none_override() {
    guard(async {
        let (mut pp, mut plain) = (
            RecordingBackend::start().await,
            RecordingBackend::start().await,
        );
        let specs = two_specs(&pp, None, &plain, Some(false));
        let proxy = start_proxy(specs, |c| {
            c.proxy_protocol = true;
            no_probes(c);
        })
        .await;
        check_headers(&proxy, &mut pp, &mut plain).await;
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_source_rate_on_and_off() {
    guard(async {
        let backends = echo_backends(1).await;
        let proxy = start_proxy(specs(&backends), no_probes).await;
        let addr = proxy.local_addr();
        let host = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
        let burst = |base: usize| async move {
            let started = Instant::now();
            let outcomes = run_bounded(30, 30, |i| async move {
                attempt(host, addr, &key(base + i)).await
            })
            .await;
            let served = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Served(_)))
                .count();
            (served, started.elapsed())
        };
        let reload = |rate: Option<SourceRate>| {
            let mut c = shardproxy::ProxyConfig::new(any_port(), specs(&backends));
            no_probes(&mut c);
            c.source_rate = rate;
            proxy.control().reload(c).expect("reload");
        };
        assert_eq!(burst(0).await.0, 30, "off: all served");
        reload(Some(SourceRate {
            per_second: 1.0,
            burst: 2,
        }));
        let (served, took) = burst(100).await;
        println!("on (1/s, burst 2): {served} of 30 served in {took:?}");
        assert!(
            served <= 2 + took.as_secs() as usize + 1,
            "{served} in {took:?}"
        );
        assert_eq!(
            rejected(&proxy.metrics_text(), "source_rate"),
            (30 - served) as f64
        );
        reload(None);
        assert_eq!(burst(200).await.0, 30, "off again: all served");
        proxy.shutdown().await;
    })
    .await;
}
