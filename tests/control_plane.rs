//! The control plane end to end (issue 9): membership changes through the admin API under a
//! stream of connections, drain and delete, health checks finding a dead backend and its
//! return, passive ejection, the panic cap, `failover = none` on a down owner, the admin
//! API's validation and bearer token, and the owner-change policy (including a key that
//! moves back within the grace), undrain, and a backend moved to a new address.
//!
//! Every proxy runs in process (`common::start_proxy`, admin listener on 127.0.0.1:0) in
//! front of echo backends that greet with their name, so each round trip says which backend
//! served it; expectations come from [`Router`] over the same names. Health checks use short
//! settings (probe every 100 ms, fall 2, rise 2); every wait for a transition is bounded by
//! [`DETECT`], many times fall × interval, so a loaded 2-core box does not make them flaky.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use shardproxy::config::{Failover, OwnerChange, ProxyConfig};
use shardproxy::fixtures::client::{read_name, round_trip};
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::{HeaderFormat, ProxyHandle, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Guard against a hang of one operation; never a performance assertion.
const HANG_GUARD: Duration = Duration::from_secs(10);
/// Bound on a health transition: 50 × fall × interval of [`fast_health`].
const DETECT: Duration = Duration::from_secs(10);
/// Connections in flight at once in the load loops.
const CONCURRENCY: usize = 8;

/// Active probes every 100 ms, fall 2, rise 2.
fn fast_health(c: &mut ProxyConfig) {
    c.health.interval = Duration::from_millis(100);
    c.health.timeout = Duration::from_millis(500);
    c.health.fall = 2;
    c.health.rise = 2;
}

fn router(names: &[&str]) -> Router {
    Router::new(names.iter().map(|n| (*n, 1))).expect("router")
}

fn owner(r: &Router, key: &[u8]) -> String {
    r.rank_names(key)[0].to_string()
}

/// The first `n` test keys whose owner in `r` is `name`.
fn keys_of(r: &Router, name: &str, n: usize) -> Vec<Vec<u8>> {
    (0..100_000)
        .map(key)
        .filter(|k| owner(r, k) == name)
        .take(n)
        .collect()
}

/// One verified round trip through the proxy; the name of the backend that served it.
async fn serve(proxy: SocketAddr, key: &[u8]) -> io::Result<String> {
    let fmt = HeaderFormat::default();
    match timeout(HANG_GUARD, round_trip(proxy, &fmt, key, b"control plane")).await {
        Ok(r) => r.map(|r| r.backend),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "round trip hung")),
    }
}

/// [`serve`] that must succeed.
async fn served_by(proxy: SocketAddr, key: &[u8]) -> String {
    match serve(proxy, key).await {
        Ok(name) => name,
        Err(e) => panic!("key {:?}: {e}", String::from_utf8_lossy(key)),
    }
}

/// A long-lived proxied connection whose echo can be checked at any time.
struct Held {
    stream: TcpStream,
    backend: String,
}

impl Held {
    /// Opens a connection for `key` and reads the greeting and the forwarded header back.
    async fn open(proxy: SocketAddr, key: &[u8]) -> Held {
        let header = HeaderFormat::default().encode(key).expect("encode");
        let mut stream = TcpStream::connect(proxy).await.expect("connect proxy");
        stream.write_all(&header).await.expect("send header");
        let backend = timeout(HANG_GUARD, read_name(&mut stream))
            .await
            .expect("greeting hung")
            .expect("greeting");
        let mut back = vec![0; header.len()];
        timeout(HANG_GUARD, stream.read_exact(&mut back))
            .await
            .expect("header echo hung")
            .expect("header echo");
        assert_eq!(back, header, "the forwarded header came back");
        Held { stream, backend }
    }

    /// Sends `payload` and checks it comes back whole.
    async fn echo(&mut self, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(payload).await?;
        let mut back = vec![0; payload.len()];
        match timeout(HANG_GUARD, self.stream.read_exact(&mut back)).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "echo hung")),
        };
        if back != payload {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
        }
        Ok(())
    }
}

/// An admin request; (status, body as JSON or `Value::Null`).
async fn call(
    proxy: &ProxyHandle,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let admin = proxy.admin_addr().expect("admin listener");
    let (status, text) = http_request(admin, method, path, body, token).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn put_body(addr: SocketAddr) -> String {
    format!(r#"{{"addr":"{addr}","weight":1}}"#)
}

/// `GET /backends` as name → state.
async fn states(proxy: &ProxyHandle) -> BTreeMap<String, String> {
    states_at(proxy.admin_addr().expect("admin listener")).await
}

/// [`states`] from the admin listener at `admin`.
async fn states_at(admin: SocketAddr) -> BTreeMap<String, String> {
    let (status, text) = http_request(admin, "GET", "/backends", None, None).await;
    assert_eq!(status, 200, "GET /backends: {text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    body.as_array()
        .expect("an array")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().expect("name").to_string(),
                b["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

/// Waits until `GET /backends` shows `name` in `state`; returns the time it took.
async fn wait_state(proxy: &ProxyHandle, name: &str, state: &str) -> Duration {
    wait_state_at(proxy.admin_addr().expect("admin listener"), name, state).await
}

/// [`wait_state`] on the admin listener at `admin` (for a spawned watcher).
async fn wait_state_at(admin: SocketAddr, name: &str, state: &str) -> Duration {
    let start = Instant::now();
    loop {
        let now = states_at(admin).await;
        if now.get(name).map(String::as_str) == Some(state) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < DETECT,
            "{name} not {state:?} after {DETECT:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a metric sample has `value`.
async fn wait_metric(proxy: &ProxyHandle, sample: &str, value: f64) {
    let start = Instant::now();
    loop {
        let now = metric(&proxy.metrics_text(), sample);
        if now == value {
            return;
        }
        assert!(
            start.elapsed() < DETECT,
            "{sample} is {now}, not {value}, after {DETECT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn m(proxy: &ProxyHandle, sample: &str) -> f64 {
    metric(&proxy.metrics_text(), sample)
}

fn refused(name: &str) -> String {
    format!("shardproxy_backend_connect_failures_total{{backend=\"{name}\",reason=\"refused\"}}")
}

fn per_backend(metric_name: &str, name: &str) -> String {
    format!("{metric_name}{{backend=\"{name}\"}}")
}

/// The ranking `GET /route/{key}` answers.
async fn route(proxy: &ProxyHandle, key: &str) -> Vec<String> {
    let (status, body) = call(proxy, "GET", &format!("/route/{key}"), None, None).await;
    assert_eq!(status, 200, "GET /route/{key}: {body}");
    body["ranking"]
        .as_array()
        .expect("ranking")
        .iter()
        .map(|n| n.as_str().expect("a name").to_string())
        .collect()
}

/// Waits until `counter` reaches `n`.
async fn wait_count(counter: &AtomicUsize, n: usize) {
    let start = Instant::now();
    while counter.load(Ordering::SeqCst) < n {
        assert!(start.elapsed() < 3 * HANG_GUARD, "the load loop stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Issue 9, test 1: `PUT /backends/b5` while a bounded stream of new connections (3,000,
/// 8 at a time, keys from a fixed set of 2,000) runs: no connection fails, each is served by
/// its key's owner before or after the change, and afterwards exactly the keys the 5-node
/// router gives to b5 moved — all to b5, about 1/5 of them; every other key stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_under_a_steady_stream_moves_exactly_the_new_nodes_keys() {
    const KEYS: usize = 2000;
    const LOOP: usize = 3000;
    let backends = echo_backends(5).await;
    let proxy = start_proxy(specs(&backends[..4]), fast_health).await;
    let addr = proxy.local_addr();
    let r4 = router(&["b1", "b2", "b3", "b4"]);
    let r5 = router(&["b1", "b2", "b3", "b4", "b5"]);

    let before = run_bounded(
        KEYS,
        CONCURRENCY,
        |i| async move { serve(addr, &key(i)).await },
    )
    .await;
    for (i, got) in before.iter().enumerate() {
        let got = got.as_ref().expect("before the change");
        assert_eq!(*got, owner(&r4, &key(i)), "key {i} before the change");
    }

    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let stream = tokio::spawn(async move {
        run_bounded(LOOP, CONCURRENCY, move |i| {
            let counter = counter.clone();
            async move {
                let r = serve(addr, &key(i % KEYS)).await;
                counter.fetch_add(1, Ordering::SeqCst);
                r
            }
        })
        .await
    });
    wait_count(&done, LOOP / 3).await;
    let (status, body) = call(
        &proxy,
        "PUT",
        "/backends/b5",
        Some(&put_body(backends[4].local_addr())),
        None,
    )
    .await;
    assert_eq!(status, 201, "PUT /backends/b5: {body}");
    let at_change = done.load(Ordering::SeqCst);
    let during = stream.await.expect("load loop");
    assert!(
        at_change < LOOP,
        "the stream ended before the change was applied: nothing was measured"
    );

    let failed: Vec<String> = during
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("#{i}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {LOOP} connections failed around the PUT: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    let mut to_b5 = 0;
    for (i, r) in during.iter().enumerate() {
        let k = key(i % KEYS);
        let got = r.as_ref().expect("checked");
        let (old, new) = (owner(&r4, &k), owner(&r5, &k));
        assert!(
            *got == old || *got == new,
            "connection #{i} went to {got}, neither its old owner {old} nor its new {new}"
        );
        to_b5 += usize::from(got == "b5");
    }
    assert!(
        to_b5 > 0,
        "no connection of the stream reached b5 after the PUT"
    );

    let after = run_bounded(
        KEYS,
        CONCURRENCY,
        |i| async move { serve(addr, &key(i)).await },
    )
    .await;
    let mut moved = 0;
    for (i, got) in after.iter().enumerate() {
        let got = got.as_ref().expect("after the change");
        let old = before[i].as_ref().expect("checked");
        if owner(&r5, &key(i)) == "b5" {
            assert_eq!(got, "b5", "key {i} belongs to b5 now");
            moved += 1;
        } else {
            assert_eq!(got, old, "key {i} moved though b5 does not own it");
        }
    }
    let share = moved as f64 / KEYS as f64;
    assert!(
        (0.17..=0.23).contains(&share),
        "{moved} of {KEYS} keys moved to b5 ({share:.3}), not about 1/5"
    );
    assert_eq!(
        states(&proxy).await.get("b5").map(String::as_str),
        Some("up")
    );
}

/// Issue 9, test 2: drain, then delete. Open connections to b2 keep echoing through the drain
/// and the delete; new connections for b2's keys reach their second choice; b2 accepts no new
/// connection; `GET /backends` shows `draining`, then no b2, and
/// `shardproxy_backend_configured{backend="b2"}` drops to 0. (Active probes are off so b2's
/// accept count counts proxied connections only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_then_delete_keeps_open_connections_and_sends_new_ones_to_the_second_choice() {
    let backends = echo_backends(4).await;
    let proxy = start_proxy(specs(&backends), |c| c.health.active = false).await;
    let addr = proxy.local_addr();
    let r = router(&["b1", "b2", "b3", "b4"]);
    let b2_keys = keys_of(&r, "b2", 40);
    let second = |k: &[u8]| r.rank_names(k)[1].to_string();

    let mut held = Vec::new();
    for k in &b2_keys[..3] {
        let mut h = Held::open(addr, k).await;
        assert_eq!(h.backend, "b2");
        h.echo(b"before the drain")
            .await
            .expect("echo before the drain");
        held.push(h);
    }
    let accepted = backends[1].accepted();

    let (status, body) = call(&proxy, "POST", "/backends/b2/drain", None, None).await;
    assert_eq!(status, 200, "drain: {body}");
    let (_, list) = call(&proxy, "GET", "/backends", None, None).await;
    let b2 = list
        .as_array()
        .expect("array")
        .iter()
        .find(|b| b["name"] == "b2")
        .expect("b2 listed while draining");
    assert_eq!(b2["state"], "draining", "{list}");
    assert_eq!(b2["active_connections"], 3, "{list}");
    for h in &mut held {
        h.echo(b"during the drain")
            .await
            .expect("echo during the drain");
    }
    for k in &b2_keys {
        assert_eq!(served_by(addr, k).await, second(k), "draining b2's key");
        let ranking = route(&proxy, std::str::from_utf8(k).expect("utf-8")).await;
        assert!(!ranking.contains(&"b2".to_string()), "{ranking:?}");
    }
    assert_eq!(
        backends[1].accepted(),
        accepted,
        "a draining b2 got new connections"
    );

    let (status, body) = call(&proxy, "DELETE", "/backends/b2", None, None).await;
    assert_eq!(status, 200, "delete: {body}");
    for h in &mut held {
        h.echo(b"after the delete")
            .await
            .expect("echo after the delete");
    }
    for k in &b2_keys {
        assert_eq!(served_by(addr, k).await, second(k), "deleted b2's key");
    }
    for i in 0..200 {
        assert_ne!(served_by(addr, &key(i)).await, "b2", "key {i}");
    }
    assert_eq!(
        backends[1].accepted(),
        accepted,
        "a deleted b2 got new connections"
    );
    let now = states(&proxy).await;
    assert_eq!(
        now.keys().map(String::as_str).collect::<Vec<_>>(),
        ["b1", "b3", "b4"],
        "{now:?}"
    );
    let text = proxy.metrics_text();
    assert_eq!(
        metric(&text, &per_backend("shardproxy_backend_configured", "b2")),
        0.0
    );
    assert_eq!(
        metric(&text, &per_backend("shardproxy_backend_configured", "b1")),
        1.0
    );
}

/// Issue 9, test 3: b2 is stopped in the middle of a loop over keys of all three backends.
/// Connections whose owner is b1 or b3 never fail; those for b2's keys that start after the
/// stop succeed on their next choice; b2 is `down` (API and gauge) within [`DETECT`]; a new
/// b2 on the same address is `up` again and gets its keys back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_routed_around_marked_down_and_taken_back() {
    const LOOP: usize = 1500;
    let mut backends = echo_backends(3).await;
    // Passive ejection off: the active probes are what find b2 dead here (test 4 covers
    // ejection).
    let proxy = start_proxy(specs(&backends), |c| {
        fast_health(c);
        c.health.eject_after = 0;
    })
    .await;
    let addr = proxy.local_addr();
    let r = router(&["b1", "b2", "b3"]);
    let b2_addr = backends[1].local_addr();

    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let stream = tokio::spawn(async move {
        run_bounded(LOOP, CONCURRENCY, move |i| {
            let counter = counter.clone();
            async move {
                let started = Instant::now();
                let r = serve(addr, &key(i % 300)).await;
                counter.fetch_add(1, Ordering::SeqCst);
                (started, r)
            }
        })
        .await
    });
    wait_count(&done, LOOP / 3).await;
    let held = stop_and_hold(backends.remove(1)).await;
    let stopped = Instant::now();
    let at_stop = done.load(Ordering::SeqCst);
    // Watched from the stop on, while the loop runs.
    let admin = proxy.admin_addr().expect("admin listener");
    let detected = tokio::spawn(async move { wait_state_at(admin, "b2", "down").await });
    let results = stream.await.expect("load loop");
    assert!(at_stop < LOOP, "the loop ended before b2 stopped");

    let mut b2_after = 0;
    for (i, (started, result)) in results.iter().enumerate() {
        let k = key(i % 300);
        let ranking = r.rank_names(&k);
        if ranking[0] != "b2" {
            match result {
                Ok(name) => assert_eq!(name, ranking[0], "connection #{i}"),
                Err(e) => panic!("connection #{i} to {} failed: {e}", ranking[0]),
            }
        } else if *started >= stopped {
            b2_after += 1;
            match result {
                Ok(name) => assert_eq!(name, ranking[1], "connection #{i} (b2's key)"),
                Err(e) => panic!("connection #{i} for b2's key after the stop failed: {e}"),
            }
        }
    }
    assert!(
        b2_after > 0,
        "no connection for b2's keys started after the stop"
    );

    let took = detected.await.expect("watcher");
    assert_eq!(m(&proxy, &per_backend("shardproxy_backend_up", "b2")), 0.0);
    assert_eq!(
        m(
            &proxy,
            "shardproxy_backend_health_transitions_total{backend=\"b2\",to=\"down\"}"
        ),
        1.0
    );
    eprintln!("b2 marked down {took:?} after it stopped (fall 2 × interval 100 ms)");
    let text = proxy.metrics_text();
    assert!(
        metric(
            &text,
            "shardproxy_health_checks_total{backend=\"b2\",result=\"failed\"}"
        ) >= 2.0,
        "b2 went down without fall = 2 failed probes"
    );
    assert_eq!(
        metric(
            &text,
            &per_backend("shardproxy_backend_ejections_total", "b2")
        ),
        0.0
    );
    for k in keys_of(&r, "b2", 20) {
        assert_eq!(served_by(addr, &k).await, r.rank_names(&k)[1]);
    }

    drop(held);
    let _b2 = EchoBackend::start(b2_addr, "b2")
        .await
        .expect("restart b2 on its address");
    wait_state(&proxy, "b2", "up").await;
    assert_eq!(m(&proxy, &per_backend("shardproxy_backend_up", "b2")), 1.0);
    assert_eq!(
        m(
            &proxy,
            "shardproxy_backend_health_transitions_total{backend=\"b2\",to=\"up\"}"
        ),
        1.0
    );
    for k in keys_of(&r, "b2", 20) {
        assert_eq!(served_by(addr, &k).await, "b2", "b2's keys return to it");
    }
}

/// Issue 9, test 4: passive ejection with active probes off. b2 refuses: its 3rd failed
/// connect ejects it (`ejections_total` 1, `down`); its keys then go to their next choice
/// without another connect to b2 (its refused counter stays at 3). Past the ejection time,
/// still refusing, it stays down (the probes fail); once it listens again a probe re-admits
/// it (one transition to up) and its keys return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_skips_the_backend_until_a_probe_succeeds() {
    let eject_time = Duration::from_millis(400);
    let mut backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |c| {
        c.health.active = false;
        c.health.interval = Duration::from_millis(100);
        c.health.timeout = Duration::from_millis(500);
        c.health.eject_after = 3;
        c.health.eject_time = eject_time;
        c.health.max_eject_time = Duration::from_secs(10);
    })
    .await;
    let addr = proxy.local_addr();
    let r = router(&["b1", "b2", "b3"]);
    let b2_addr = backends[1].local_addr();
    let held = stop_and_hold(backends.remove(1)).await;
    let b2_keys = keys_of(&r, "b2", 25);

    for k in &b2_keys[..3] {
        assert_eq!(served_by(addr, k).await, r.rank_names(k)[1]);
    }
    assert_eq!(m(&proxy, &refused("b2")), 3.0);
    wait_state(&proxy, "b2", "down").await;
    let ejections = per_backend("shardproxy_backend_ejections_total", "b2");
    assert_eq!(m(&proxy, &ejections), 1.0);
    for k in &b2_keys[3..] {
        assert_eq!(served_by(addr, k).await, r.rank_names(k)[1]);
    }
    assert_eq!(
        m(&proxy, &refused("b2")),
        3.0,
        "an ejected b2 was still connected to"
    );

    // Still refusing well past the ejection time: it stays down, its probes failing.
    tokio::time::sleep(eject_time * 4).await;
    assert_eq!(
        states(&proxy).await["b2"],
        "down",
        "b2 was re-admitted after its ejection time without a good probe"
    );
    let text = proxy.metrics_text();
    assert!(
        metric(
            &text,
            "shardproxy_health_checks_total{backend=\"b2\",result=\"failed\"}"
        ) >= 1.0,
        "no probe of the ejected b2 ran after the ejection time"
    );
    let went_up = "shardproxy_backend_health_transitions_total{backend=\"b2\",to=\"up\"}";
    assert_eq!(metric(&text, went_up), 0.0);

    drop(held);
    let _b2 = EchoBackend::start(b2_addr, "b2")
        .await
        .expect("restart b2 on its address");
    wait_state(&proxy, "b2", "up").await;
    let text = proxy.metrics_text();
    assert_eq!(metric(&text, went_up), 1.0);
    assert!(
        metric(
            &text,
            "shardproxy_health_checks_total{backend=\"b2\",result=\"ok\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&text, &ejections), 1.0);
    for k in &b2_keys {
        assert_eq!(served_by(addr, k).await, "b2", "b2's keys return to it");
    }
}

/// Issue 9, test 5: the panic cap. Semantics: with `health.max_down_share = 0.5` and four
/// backends, up to two may be down and health applies (their keys go straight to the next
/// live choice; the dead ones are not even tried). A third one down is more than half:
/// the proxy is in panic (`shardproxy_routing_panic` 1) and routes as if every backend were
/// up, like Envoy's panic threshold — `GET /route` shows the full ranking, a live owner's
/// keys reach it, and a dead owner's keys fail over by connect failure in rank order (each
/// dead backend before the live one is tried and counted as refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_panic_cap_routing_ignores_health() {
    let mut backends = echo_backends(4).await;
    let proxy = start_proxy(specs(&backends), |c| {
        fast_health(c);
        c.health.max_down_share = 0.5;
        c.max_tries = 4;
    })
    .await;
    let addr = proxy.local_addr();
    let names = ["b1", "b2", "b3", "b4"];
    let r = router(&names);
    let b4 = backends.pop().expect("b4");
    let mut dead = backends;
    let b3 = dead.pop().expect("b3");
    let mut held = Vec::new();
    for b in dead {
        held.push(stop_and_hold(b).await);
    }
    wait_state(&proxy, "b1", "down").await;
    wait_state(&proxy, "b2", "down").await;
    assert_eq!(m(&proxy, "shardproxy_routing_panic"), 0.0);

    let probe_keys: Vec<Vec<u8>> = (0..60).map(key).collect();
    let refused_total = |p: &ProxyHandle| -> f64 { names.iter().map(|n| m(p, &refused(n))).sum() };
    let before = refused_total(&proxy);
    for k in &probe_keys {
        let live: Vec<&str> = r
            .rank_names(k)
            .into_iter()
            .filter(|n| ["b3", "b4"].contains(n))
            .collect();
        let text = std::str::from_utf8(k).expect("utf-8");
        assert_eq!(route(&proxy, text).await, live, "GET /route/{text}");
        assert_eq!(served_by(addr, k).await, live[0], "key {text}, two down");
    }
    assert_eq!(
        refused_total(&proxy),
        before,
        "under the cap a down backend was still tried"
    );

    held.push(stop_and_hold(b3).await);
    wait_state(&proxy, "b3", "down").await;
    wait_metric(&proxy, "shardproxy_routing_panic", 1.0).await;
    let before = refused_total(&proxy);
    let mut expected_refusals = 0;
    for k in &probe_keys {
        let full = r.rank_names(k);
        let text = std::str::from_utf8(k).expect("utf-8");
        assert_eq!(
            route(&proxy, text).await,
            full,
            "GET /route/{text} in panic"
        );
        assert_eq!(served_by(addr, k).await, "b4", "key {text} in panic");
        expected_refusals += full.iter().position(|n| *n == "b4").expect("b4 ranked");
    }
    assert!(expected_refusals > 0);
    assert_eq!(
        refused_total(&proxy),
        before + expected_refusals as f64,
        "in panic, each dead backend ranked before b4 is tried once"
    );
    drop(b4);
}

/// Issue 9, test 6: with `failover = none` a down owner's keys are closed at once
/// (`reason="backend_down"`), and no backend is contacted: neither the down owner (its
/// refused counter) nor another one (their connection counters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_none_closes_a_down_owners_keys_without_contacting_anyone() {
    let mut backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |c| {
        fast_health(c);
        c.failover = Failover::None;
    })
    .await;
    let addr = proxy.local_addr();
    let r = router(&["b1", "b2", "b3"]);
    let _held = stop_and_hold(backends.remove(1)).await;
    wait_state(&proxy, "b2", "down").await;

    let down = "shardproxy_connection_errors_total{reason=\"backend_down\"}";
    let connections = |n: &str| per_backend("shardproxy_backend_connections_total", n);
    let text = proxy.metrics_text();
    let before = (
        metric(&text, down),
        metric(&text, &refused("b2")),
        metric(&text, &connections("b1")),
        metric(&text, &connections("b3")),
    );
    let b2_keys = keys_of(&r, "b2", 10);
    for k in &b2_keys {
        let started = Instant::now();
        let got = closed_without_greeting(addr, k).await;
        assert!(got.is_ok(), "b2's key under failover=none: {got:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "closing took {:?}",
            started.elapsed()
        );
    }
    let text = proxy.metrics_text();
    assert_eq!(metric(&text, down), before.0 + b2_keys.len() as f64);
    assert_eq!(metric(&text, &refused("b2")), before.1, "b2 was contacted");
    assert_eq!(
        metric(&text, &connections("b1")),
        before.2,
        "b1 was contacted"
    );
    assert_eq!(
        metric(&text, &connections("b3")),
        before.3,
        "b3 was contacted"
    );
    for k in keys_of(&r, "b1", 5) {
        assert_eq!(served_by(addr, &k).await, "b1");
    }
}

/// Sends `key` and a payload; `Ok` if the proxy closed (EOF or reset) without a byte,
/// `Err` with what came back otherwise.
async fn closed_without_greeting(addr: SocketAddr, key: &[u8]) -> Result<(), String> {
    let mut sent = HeaderFormat::default().encode(key).expect("encode");
    sent.extend_from_slice(b"payload");
    let mut s = TcpStream::connect(addr).await.expect("connect proxy");
    let _ = s.write_all(&sent).await;
    let mut got = Vec::new();
    match timeout(HANG_GUARD, s.read_to_end(&mut got)).await {
        Err(_) => Err("no close".into()),
        Ok(Ok(_)) | Ok(Err(_)) if got.is_empty() => Ok(()),
        Ok(_) => Err(format!("got {:?}", String::from_utf8_lossy(&got))),
    }
}

/// Issue 9, test 7a: `GET /route/{key}` is `Router::rank_names` over the live table, for
/// text keys and (`?hex=1`) binary ones; bad hex is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_answers_the_live_tables_ranking() {
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |c| c.health.active = false).await;
    let table = proxy.table();
    for k in ["user:1", "user:2", "alpha", "x", "session-42"] {
        assert_eq!(
            route(&proxy, k).await,
            table.router.rank_names(k.as_bytes())
        );
    }
    let (status, body) = call(&proxy, "GET", "/route/00ff10?hex=1", None, None).await;
    assert_eq!(status, 200, "{body}");
    let ranking: Vec<&str> = body["ranking"]
        .as_array()
        .expect("ranking")
        .iter()
        .map(|v| v.as_str().expect("name"))
        .collect();
    assert_eq!(ranking, table.router.rank_names(&[0x00, 0xff, 0x10]));
    assert_ne!(
        table.router.rank_names(&[0x00, 0xff, 0x10]),
        table.router.rank_names(b"00ff10"),
        "pick a hex key whose ranking differs from its text's"
    );
    for bad in ["/route/zz?hex=1", "/route/abc?hex=1"] {
        let (status, body) = call(&proxy, "GET", bad, None, None).await;
        assert_eq!(status, 400, "GET {bad}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
}

/// Issue 9, test 7b: a refused change answers 4xx with a reason and leaves the table (its
/// generation, its members) as it was: PUT with a bad address, a weight over 1,000,000, an
/// unknown field or a malformed body; DELETE or drain of an unknown name (404); DELETE of
/// the last backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_changes_say_why_and_leave_the_table() {
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |c| c.health.active = false).await;
    let generation = proxy.table().generation;
    let members = states(&proxy).await;
    let bodies = [
        ("a bad address", r#"{"addr":"not-an-address","weight":1}"#),
        ("port 0", r#"{"addr":"127.0.0.1:0","weight":1}"#),
        (
            "weight 1000001",
            r#"{"addr":"127.0.0.1:9","weight":1000001}"#,
        ),
        ("an unknown field", r#"{"addr":"127.0.0.1:9","wieght":2}"#),
        ("a malformed body", r#"{"addr":"127.0.0.1:9","#),
        ("not JSON", "hello"),
    ];
    for (what, body) in bodies {
        let (status, answer) = call(&proxy, "PUT", "/backends/b9", Some(body), None).await;
        assert_eq!(status, 400, "PUT with {what}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "PUT with {what}: no reason in {answer}"
        );
        assert_eq!(proxy.table().generation, generation, "PUT with {what}");
    }
    for (method, path) in [
        ("DELETE", "/backends/nope"),
        ("POST", "/backends/nope/drain"),
    ] {
        let (status, answer) = call(&proxy, method, path, None, None).await;
        assert_eq!(status, 404, "{method} {path}: {answer}");
        assert!(answer["error"].as_str().is_some(), "{answer}");
    }
    assert_eq!(proxy.table().generation, generation);
    assert_eq!(states(&proxy).await, members);
    assert_eq!(
        m(
            &proxy,
            "shardproxy_admin_changes_total{result=\"rejected\"}"
        ),
        (bodies.len() + 2) as f64
    );
    assert_eq!(
        m(&proxy, "shardproxy_admin_changes_total{result=\"ok\"}"),
        0.0
    );

    // The last backend cannot go.
    let single = start_proxy(specs(&backends[..1]), |c| c.health.active = false).await;
    let generation = single.table().generation;
    let (status, answer) = call(&single, "DELETE", "/backends/b1", None, None).await;
    assert!(
        (400..500).contains(&status),
        "DELETE of the last backend: {status} {answer}"
    );
    assert!(answer["error"].as_str().is_some(), "{answer}");
    assert_eq!(single.table().generation, generation);
    assert_eq!(states(&single).await.len(), 1);
    assert_eq!(served_by(single.local_addr(), b"k").await, "b1");
}

/// Issue 9, test 7c: with `admin_token_file`, mutating routes without the token or with a
/// wrong one answer 401 and change nothing; with it they apply; reads stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_guards_every_change_and_no_read() {
    let backends = echo_backends(3).await;
    let extra = EchoBackend::start(any_port(), "b9").await.expect("b9");
    let token = "ctests-0123456789-abcdef";
    let path = std::env::temp_dir().join(format!(
        "shardproxy-ctests-token-{}-{}",
        std::process::id(),
        line!()
    ));
    std::fs::write(&path, format!("{token}\n")).expect("write token file");
    let file = path.clone();
    let proxy = start_proxy(specs(&backends), move |c| {
        c.health.active = false;
        c.admin_token_file = Some(file);
    })
    .await;
    let _ = std::fs::remove_file(&path);
    let generation = proxy.table().generation;
    let members = states(&proxy).await;
    let put = put_body(extra.local_addr());
    let changes = [
        ("PUT", "/backends/b9", Some(put.as_str())),
        ("POST", "/backends/b1/drain", None),
        ("DELETE", "/backends/b2", None),
    ];
    for (method, path, body) in changes {
        for given in [None, Some("wrong-token-0123456789"), Some("")] {
            let (status, answer) = call(&proxy, method, path, body, given).await;
            assert_eq!(status, 401, "{method} {path} with {given:?}: {answer}");
        }
    }
    assert_eq!(proxy.table().generation, generation);
    assert_eq!(states(&proxy).await, members);

    assert_eq!(call(&proxy, "GET", "/route/k", None, None).await.0, 200);
    let admin = proxy.admin_addr().expect("admin");
    assert!(http_get(admin, "/metrics").await.0.contains("200"));

    let mut expected = generation;
    for (method, path, body) in changes {
        let (status, answer) = call(&proxy, method, path, body, Some(token)).await;
        assert!(
            status == 200 || status == 201,
            "{method} {path} with the token: {status} {answer}"
        );
        expected += 1;
        assert_eq!(proxy.table().generation, expected, "{method} {path}");
    }
    let now = states(&proxy).await;
    assert_eq!(now.get("b9").map(String::as_str), Some("up"), "{now:?}");
    assert_eq!(
        now.get("b1").map(String::as_str),
        Some("draining"),
        "{now:?}"
    );
    assert!(!now.contains_key("b2"), "{now:?}");
}

/// Issue 9, test 7d: an admin listener off loopback without a token refuses to start, and
/// the error names `--admin-token-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_off_loopback_needs_a_token() {
    let backends = echo_backends(1).await;
    let mut config = ProxyConfig::new(any_port(), specs(&backends));
    config.admin = Some("0.0.0.0:0".parse().expect("addr"));
    match shardproxy::start(config).await {
        Ok(_) => panic!("an admin on 0.0.0.0 started without a token"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("--admin-token-file"), "{msg}");
        }
    }
}

/// A backend name that outranks `owner` (and every other of `names`) for `key`.
fn outranking_name(names: &[&str], key: &[u8]) -> String {
    (10..10_000)
        .map(|i| format!("n{i}"))
        .find(|n| {
            let mut all: Vec<&str> = names.to_vec();
            all.push(n);
            owner(&router(&all), key) == *n
        })
        .expect("some name outranks them")
}

/// A backend name that does *not* outrank the owner of `key` among `names`.
fn non_outranking_name(names: &[&str], key: &[u8]) -> String {
    (10..10_000)
        .map(|i| format!("m{i}"))
        .find(|n| {
            let mut all: Vec<&str> = names.to_vec();
            all.push(n);
            owner(&router(&all), key) != *n
        })
        .expect("some name does not outrank them")
}

/// Issue 9, test 8a: owner-change policy `close` with a 300 ms grace. A change that leaves the
/// key's owner alone leaves its connection alone; a backend added that takes the key resets
/// the connection after the grace (not before), counted in
/// `shardproxy_owner_change_closed_total` and `reason="owner_changed"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_change_close_resets_the_connection_after_the_grace() {
    let grace = Duration::from_millis(300);
    let names = ["b1", "b2", "b3"];
    let k = key(7);
    let taker = outranking_name(&names, &k);
    let bystander = non_outranking_name(&names, &k);
    let backends = echo_backends(3).await;
    let newcomer = EchoBackend::start(any_port(), &taker).await.expect("taker");
    let other = EchoBackend::start(any_port(), &bystander)
        .await
        .expect("bystander");
    let proxy = start_proxy(specs(&backends), move |c| {
        c.health.active = false;
        c.owner_change = OwnerChange::Close { grace };
    })
    .await;
    let addr = proxy.local_addr();
    let mut held = Held::open(addr, &k).await;
    assert_eq!(held.backend, owner(&router(&names), &k));
    held.echo(b"before").await.expect("echo before");

    let path = format!("/backends/{bystander}");
    let (status, body) = call(
        &proxy,
        "PUT",
        &path,
        Some(&put_body(other.local_addr())),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    tokio::time::sleep(grace * 3).await;
    held.echo(b"owner unchanged")
        .await
        .expect("a change that kept the owner cut it");
    let closed = "shardproxy_owner_change_closed_total";
    assert_eq!(m(&proxy, closed), 0.0);

    let path = format!("/backends/{taker}");
    let (status, body) = call(
        &proxy,
        "PUT",
        &path,
        Some(&put_body(newcomer.local_addr())),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let changed = Instant::now();
    assert_eq!(
        served_by(addr, &k).await,
        taker,
        "new connections go to the taker"
    );
    let mut buf = [0u8; 64];
    let read = timeout(HANG_GUARD, held.stream.read(&mut buf)).await;
    let elapsed = changed.elapsed();
    match read {
        Err(_) => panic!("the connection was not closed within {HANG_GUARD:?} of the change"),
        Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(Ok(n)) => panic!("read {n} bytes instead of a reset"),
    }
    assert!(
        elapsed >= grace - Duration::from_millis(20),
        "closed {elapsed:?} after the change, before the {grace:?} grace"
    );
    wait_metric(&proxy, closed, 1.0).await;
    assert_eq!(
        m(
            &proxy,
            "shardproxy_connection_errors_total{reason=\"owner_changed\"}"
        ),
        1.0
    );
}

/// Issue 9, test 8b: the same change under the default policy `keep` leaves the connection
/// working on its old backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_change_keep_leaves_the_connection() {
    let names = ["b1", "b2", "b3"];
    let k = key(7);
    let taker = outranking_name(&names, &k);
    let backends = echo_backends(3).await;
    let newcomer = EchoBackend::start(any_port(), &taker).await.expect("taker");
    let proxy = start_proxy(specs(&backends), |c| c.health.active = false).await;
    let addr = proxy.local_addr();
    let mut held = Held::open(addr, &k).await;
    let old = held.backend.clone();
    assert_eq!(old, owner(&router(&names), &k));

    let path = format!("/backends/{taker}");
    let (status, body) = call(
        &proxy,
        "PUT",
        &path,
        Some(&put_body(newcomer.local_addr())),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(served_by(addr, &k).await, taker);
    tokio::time::sleep(Duration::from_secs(1)).await;
    held.echo(b"after the change")
        .await
        .expect("keep: the connection works");
    assert_eq!(m(&proxy, "shardproxy_owner_change_closed_total"), 0.0);
    let seen: HashSet<String> = states(&proxy).await.into_keys().collect();
    assert!(seen.contains(&taker));
}

/// Owner-change policy `close`: a key whose owner changes and changes back within the grace
/// keeps its connection (the grace is a debounce, not a timer that always fires).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_change_close_spares_a_key_that_moves_back_within_the_grace() {
    let grace = Duration::from_secs(2);
    let names = ["b1", "b2", "b3"];
    let k = key(7);
    let taker = outranking_name(&names, &k);
    let backends = echo_backends(3).await;
    let newcomer = EchoBackend::start(any_port(), &taker).await.expect("taker");
    let proxy = start_proxy(specs(&backends), move |c| {
        c.health.active = false;
        c.owner_change = OwnerChange::Close { grace };
    })
    .await;
    let mut held = Held::open(proxy.local_addr(), &k).await;
    let path = format!("/backends/{taker}");
    let put = put_body(newcomer.local_addr());
    let started = Instant::now();
    let (status, body) = call(&proxy, "PUT", &path, Some(&put), None).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(&proxy, "DELETE", &path, None, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < grace,
        "the key was away for {:?}, longer than the grace: nothing measured",
        started.elapsed()
    );
    tokio::time::sleep(grace + Duration::from_secs(1)).await;
    held.echo(b"owner is back")
        .await
        .expect("the connection was cut");
    assert_eq!(m(&proxy, "shardproxy_owner_change_closed_total"), 0.0);
}

/// Undrain gives a backend its keys back; a PUT that moves a backend to a new address sends
/// its new connections there while the ones open on the old address keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undrain_returns_the_keys_and_an_address_change_moves_new_connections() {
    let backends = echo_backends(3).await;
    let moved = EchoBackend::start(any_port(), "b2").await.expect("new b2");
    let proxy = start_proxy(specs(&backends), |c| c.health.active = false).await;
    let addr = proxy.local_addr();
    let r = router(&["b1", "b2", "b3"]);
    let b2_keys = keys_of(&r, "b2", 10);

    let (status, body) = call(&proxy, "POST", "/backends/b2/drain", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        served_by(addr, &b2_keys[0]).await,
        r.rank_names(&b2_keys[0])[1]
    );
    let (status, body) = call(&proxy, "POST", "/backends/b2/undrain", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(states(&proxy).await["b2"], "up");
    for k in &b2_keys {
        assert_eq!(served_by(addr, k).await, "b2", "undrained b2's key");
    }

    let mut held = Held::open(addr, &b2_keys[0]).await;
    let (old_accepted, new_accepted) = (backends[1].accepted(), moved.accepted());
    let (status, body) = call(
        &proxy,
        "PUT",
        "/backends/b2",
        Some(&put_body(moved.local_addr())),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for k in &b2_keys {
        assert_eq!(served_by(addr, k).await, "b2");
    }
    assert_eq!(
        backends[1].accepted(),
        old_accepted,
        "the old address got new connections"
    );
    assert_eq!(moved.accepted(), new_accepted + b2_keys.len() as u64);
    held.echo(b"on the old address")
        .await
        .expect("the open connection was cut");
}
