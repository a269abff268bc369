//! Issue 10 end to end: the membership comes from etcd (a real `/usr/bin/etcd`, see
//! `common::etcd`). Proxies are the `shardproxy` binary (`run --membership etcd://...`), the
//! sidecar is `shardproxy register`; backends are in-process echo backends on 127.0.0.1:0.
//!
//! What is checked is behaviour: every proxy on one prefix routes each key the same way, a
//! change reaches all of them, an etcd outage costs no connection and no routing change, a
//! proxy can start from its cache file, the sidecar's key lives and dies with its check and
//! its lease, a bad value is skipped and counted, and the admin API says where the
//! membership comes from. Propagation times are printed, never asserted (only a generous
//! bound on each wait). The tests of this binary run one at a time (`SERIAL`): each starts
//! an etcd and several proxies on a small shared machine.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::{temp_dir, Etcd, EtcdApi, EtcdOptions};
use common::pki::Pki;
use common::process::{output_within, parse_ready, text, Daemon, HANG_GUARD};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use shardproxy::fixtures::client::round_trip;
use shardproxy::{HeaderFormat, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Generous bound on any wait for the proxies to see a change (printed times are the data).
const CONVERGE: Duration = Duration::from_secs(10);
/// Bound on a wait that spans a reconnect (backoff up to 5 s) or a lease expiry.
const RECONNECT: Duration = Duration::from_secs(30);

/// `PREFIX/backends/NAME`.
fn bkey(prefix: &str, name: &str) -> String {
    format!("{prefix}/backends/{name}")
}

/// The value of a backend's key.
fn bvalue(addr: SocketAddr, weight: u32) -> String {
    format!("{{\"addr\":\"{addr}\",\"weight\":{weight}}}")
}

/// A `shardproxy run --membership` child and its addresses.
struct Proxy {
    daemon: Daemon,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn start(url: &str, cache: Option<&Path>) -> Proxy {
        Self::start_with_log(url, cache, None)
    }

    fn start_with_log(url: &str, cache: Option<&Path>, log: Option<&str>) -> Proxy {
        Self::start_full(url, cache, log, &[])
    }

    /// A proxy with more `run` flags (the etcd TLS and login flags).
    fn start_with_args(url: &str, extra: &[&str]) -> Proxy {
        Self::start_full(url, None, None, extra)
    }

    fn start_full(url: &str, cache: Option<&Path>, log: Option<&str>, extra: &[&str]) -> Proxy {
        let mut args = vec![
            "run",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--membership",
            url,
        ];
        let cache = cache.map(|c| c.to_str().expect("a UTF-8 temp path").to_string());
        if let Some(c) = cache.as_deref() {
            args.extend(["--membership-cache", c]);
        }
        args.extend(extra);
        let (daemon, ready) = Daemon::start_with_log(&args, log);
        let (listen, admin) = parse_ready(&ready);
        Proxy {
            daemon,
            listen,
            admin: admin.expect("started with --admin"),
        }
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert!(status.contains("200"), "GET /metrics: {status}");
        body
    }

    async fn gauge(&self, sample: &str) -> f64 {
        metric(&self.metrics().await, sample)
    }

    /// The routing-table fingerprint, as printed (exact, not through an f64).
    async fn fingerprint(&self) -> String {
        raw_sample(
            &self.metrics().await,
            "shardproxy_routing_table_fingerprint",
        )
    }

    /// The names in `GET /backends`.
    async fn names(&self) -> BTreeSet<String> {
        let (status, body) = http_get(self.admin, "/backends").await;
        assert!(status.contains("200"), "GET /backends: {status} {body}");
        let v: Value = serde_json::from_str(&body).expect("GET /backends JSON");
        v.as_array()
            .expect("an array")
            .iter()
            .map(|b| b["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// `GET /route/{key}`'s ranking.
    async fn ranking(&self, key: &[u8]) -> Vec<String> {
        let key = std::str::from_utf8(key).expect("test keys are text");
        let (status, body) = http_get(self.admin, &format!("/route/{key}")).await;
        assert!(status.contains("200"), "GET /route/{key}: {status} {body}");
        let v: Value = serde_json::from_str(&body).expect("GET /route JSON");
        v["ranking"]
            .as_array()
            .expect("ranking")
            .iter()
            .map(|n| n.as_str().expect("a name").to_string())
            .collect()
    }

    /// Which backend answers `key` through this proxy.
    async fn answer(&self, key: &[u8]) -> String {
        round_trip(self.listen, &HeaderFormat::default(), key, b"ping")
            .await
            .unwrap_or_else(|e| panic!("round trip of {:?}: {e}", text(key)))
            .backend
    }
}

/// A sample's value exactly as exposed.
fn raw_sample(text: &str, sample: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

/// Polls `check` every 20 ms until it holds; fails with `what` after `bound`.
async fn until<F, Fut>(what: &str, bound: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every proxy's `shardproxy_membership_revision` is at least `rev`.
async fn seen_by_all(proxies: &[Proxy], rev: i64, bound: Duration) -> Duration {
    until(
        &format!("every proxy at membership revision {rev}"),
        bound,
        || async move {
            for p in proxies {
                if p.gauge("shardproxy_membership_revision").await < rev as f64 {
                    return false;
                }
            }
            true
        },
    )
    .await
}

/// Waits until every proxy lists exactly `names`.
async fn names_on_all(proxies: &[Proxy], names: &[&str], bound: Duration) {
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    let want = &want;
    until(
        &format!("every proxy lists {want:?}"),
        bound,
        || async move {
            for p in proxies {
                if p.names().await != *want {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Asserts that all proxies show the same routing-table fingerprint; returns it.
async fn same_fingerprint(proxies: &[Proxy], when: &str) -> String {
    let first = proxies[0].fingerprint().await;
    for (i, p) in proxies.iter().enumerate().skip(1) {
        assert_eq!(p.fingerprint().await, first, "proxy {i} {when}");
    }
    first
}

/// The first test key whose owner under `router` is `name`, and the next ones, `n` in all.
fn keys_owned_by(router: &Router, name: &str, n: usize) -> Vec<Vec<u8>> {
    (0..100_000)
        .map(key)
        .filter(|k| router.rank_names(k)[0] == name)
        .take(n)
        .collect()
}

fn router(nodes: &[(&str, u32)]) -> Router {
    Router::new(nodes.iter().copied()).expect("a valid test router")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn three_proxies_on_one_prefix_route_alike_and_follow_every_change() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let b = echo_backends(3).await;
    let prefix = "/shardproxy/follow";
    let url = etcd.url(prefix);
    etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let rev = etcd.put(&bkey(prefix, "b2"), &bvalue(b[1].local_addr(), 1));
    let dir = temp_dir("etcd-follow");
    let proxies: Vec<Proxy> = (0..3)
        .map(|i| Proxy::start(&url, Some(&dir.join(format!("cache{i}.json")))))
        .collect();
    seen_by_all(&proxies, rev, CONVERGE).await;
    names_on_all(&proxies, &["b1", "b2"], CONVERGE).await;
    same_fingerprint(&proxies, "on the starting membership").await;

    // A new backend: every proxy routes its keys to it, and ranks every key alike.
    let rev = etcd.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 1));
    let took = seen_by_all(&proxies, rev, CONVERGE).await;
    eprintln!("b3 added: seen by all three proxies after {took:?}");
    let r3 = router(&[("b1", 1), ("b2", 1), ("b3", 1)]);
    for k in keys(60) {
        let want: Vec<String> = r3.rank_names(&k).iter().map(|s| s.to_string()).collect();
        for (i, p) in proxies.iter().enumerate() {
            assert_eq!(p.ranking(&k).await, want, "proxy {i}, key {}", text(&k));
        }
    }
    let b3_keys = keys_owned_by(&r3, "b3", 10);
    for k in &b3_keys {
        for p in &proxies {
            assert_eq!(p.answer(k).await, "b3", "key {}", text(k));
        }
    }
    let with_b3 = same_fingerprint(&proxies, "after b3 was added").await;

    // 50 changes (b3's weight 2, 3, 4, 1, 2, ...): each reaches all three proxies, which
    // agree on the table after each.
    let mut took = Vec::new();
    for i in 0..50u32 {
        let rev = etcd.put(
            &bkey(prefix, "b3"),
            &bvalue(b[2].local_addr(), 1 + (i + 1) % 4),
        );
        took.push(seen_by_all(&proxies, rev, CONVERGE).await);
        same_fingerprint(&proxies, &format!("after change {i}")).await;
    }
    took.sort();
    eprintln!(
        "propagation of 50 changes to 3 proxies (put returned -> all three at the revision): \
         p50 {:?}, p99 {:?}, max {:?}",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took[took.len() - 1]
    );
    // The last change set weight 1 + 50 % 4 = 3; back to 1 gives the b3 table again.
    let rev = etcd.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 1));
    seen_by_all(&proxies, rev, CONVERGE).await;
    assert_eq!(
        same_fingerprint(&proxies, "with b3 at weight 1").await,
        with_b3
    );

    // Weight 0 drains b3 on every proxy: its keys go to their second choice.
    let rev = etcd.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 0));
    seen_by_all(&proxies, rev, CONVERGE).await;
    for k in &b3_keys {
        let second = r3.rank_names(k)[1];
        for (i, p) in proxies.iter().enumerate() {
            assert_eq!(
                p.answer(k).await,
                second,
                "drained: proxy {i}, key {}",
                text(k)
            );
        }
    }
    assert_ne!(same_fingerprint(&proxies, "with b3 drained").await, with_b3);
    let rev = etcd.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 1));
    seen_by_all(&proxies, rev, CONVERGE).await;
    for k in &b3_keys {
        for p in &proxies {
            assert_eq!(p.answer(k).await, "b3", "undrained: key {}", text(k));
        }
    }

    // History compacted under the watchers: changes keep arriving.
    etcd.compact();
    let rev = etcd.delete(&bkey(prefix, "b3"));
    let took = seen_by_all(&proxies, rev, CONVERGE).await;
    eprintln!("b3 deleted (after a compaction): seen by all three after {took:?}");
    names_on_all(&proxies, &["b1", "b2"], CONVERGE).await;
    // Its keys move to their second choice, on every proxy.
    for k in &b3_keys {
        let second = r3.rank_names(k)[1];
        for (i, p) in proxies.iter().enumerate() {
            assert_eq!(p.answer(k).await, second, "proxy {i}, key {}", text(k));
        }
    }
    same_fingerprint(&proxies, "after b3 was deleted").await;
    for (i, p) in proxies.iter().enumerate() {
        let m = p.metrics().await;
        assert_eq!(
            metric(&m, "shardproxy_membership_connected"),
            1.0,
            "proxy {i}"
        );
        assert!(
            metric(
                &m,
                "shardproxy_membership_updates_total{result=\"applied\"}"
            ) >= 2.0,
            "proxy {i}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn an_etcd_outage_costs_no_connection_and_the_proxies_resync_after_it() {
    let _serial = SERIAL.lock().await;
    let mut etcd = Etcd::start();
    let b = echo_backends(4).await;
    let prefix = "/shardproxy/outage";
    let url = etcd.url(prefix);
    for (i, be) in b.iter().take(3).enumerate() {
        etcd.put(
            &bkey(prefix, &format!("b{}", i + 1)),
            &bvalue(be.local_addr(), 1),
        );
    }
    let rev = etcd.revision();
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&url, None)).collect();
    seen_by_all(&proxies, rev, CONVERGE).await;
    names_on_all(&proxies, &["b1", "b2", "b3"], CONVERGE).await;
    let before = same_fingerprint(&proxies, "before the outage").await;

    // 3,000 connections over the three proxies; etcd is SIGKILLed after the first 1,000.
    let r3 = router(&[("b1", 1), ("b2", 1), ("b3", 1)]);
    let listens: Arc<Vec<SocketAddr>> = Arc::new(proxies.iter().map(|p| p.listen).collect());
    let expect: Arc<Vec<String>> = Arc::new(
        keys(300)
            .iter()
            .map(|k| r3.rank_names(k)[0].to_string())
            .collect(),
    );
    let done = Arc::new(AtomicUsize::new(0));
    let progress = done.clone();
    let load = tokio::spawn(async move {
        run_bounded(3000, 16, move |i| {
            let listens = listens.clone();
            let expect = expect.clone();
            let done = progress.clone();
            async move {
                let k = key(i % 300);
                let r = round_trip(listens[i % 3], &HeaderFormat::default(), &k, b"x").await;
                done.fetch_add(1, Ordering::SeqCst);
                match r {
                    Ok(reply) if reply.backend == expect[i % 300] => Ok(()),
                    Ok(reply) => Err(format!(
                        "key {i}: answered by {}, owner {}",
                        reply.backend,
                        expect[i % 300]
                    )),
                    Err(e) => Err(format!("connection {i}: {e}")),
                }
            }
        })
        .await
    });
    until("1,000 connections done", Duration::from_secs(120), || {
        let done = done.clone();
        async move { done.load(Ordering::SeqCst) >= 1000 }
    })
    .await;
    etcd.kill();
    let results = tokio::time::timeout(Duration::from_secs(300), load)
        .await
        .expect("the connection loop finished")
        .expect("the connection loop did not panic");
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 3000 connections failed or went astray, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    for (i, p) in proxies.iter().enumerate() {
        let took = until(
            &format!("proxy {i} reports etcd disconnected"),
            CONVERGE,
            || async move { p.gauge("shardproxy_membership_connected").await == 0.0 },
        )
        .await;
        eprintln!("proxy {i}: membership_connected 0 {took:?} after the loop ended");
        assert_eq!(
            p.fingerprint().await,
            before,
            "proxy {i}: routing unchanged"
        );
        assert!(p.daemon.stderr().len() < 1 << 20, "proxy {i} logs a flood");
    }
    // Still routing, still accepting, with etcd down.
    for k in keys(30) {
        assert_eq!(proxies[0].answer(&k).await, r3.rank_names(&k)[0]);
    }

    // etcd back on the same data dir and ports; a membership change reaches everyone.
    etcd.restart();
    for (i, p) in proxies.iter().enumerate() {
        let took = until(&format!("proxy {i} reconnects"), RECONNECT, || async move {
            p.gauge("shardproxy_membership_connected").await == 1.0
        })
        .await;
        eprintln!("proxy {i}: reconnected {took:?} after etcd answered again");
        assert!(p.gauge("shardproxy_membership_reconnects_total").await >= 1.0);
    }
    etcd.delete(&bkey(prefix, "b2"));
    let rev = etcd.put(&bkey(prefix, "b4"), &bvalue(b[3].local_addr(), 1));
    seen_by_all(&proxies, rev, CONVERGE).await;
    names_on_all(&proxies, &["b1", "b3", "b4"], CONVERGE).await;
    let after = same_fingerprint(&proxies, "after the outage and a change").await;
    assert_ne!(after, before);
    let r = router(&[("b1", 1), ("b3", 1), ("b4", 1)]);
    for k in keys(40) {
        let want = r.rank_names(&k)[0];
        for p in &proxies {
            assert_eq!(p.answer(&k).await, want, "key {}", text(&k));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn a_proxy_started_while_etcd_is_down_serves_from_its_cache_file() {
    let _serial = SERIAL.lock().await;
    let mut etcd = Etcd::start();
    let b = echo_backends(3).await;
    let prefix = "/shardproxy/cache";
    let url = etcd.url(prefix);
    etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let rev = etcd.put(&bkey(prefix, "b2"), &bvalue(b[1].local_addr(), 2));
    let dir = temp_dir("etcd-cache");
    let cache = dir.join("membership.json");

    // An earlier run writes the cache file.
    let first = Proxy::start(&url, Some(&cache));
    seen_by_all(std::slice::from_ref(&first), rev, CONVERGE).await;
    until("the cache file names b1 and b2", CONVERGE, || {
        let cache = cache.clone();
        async move {
            let t = std::fs::read_to_string(&cache).unwrap_or_default();
            t.contains("b1") && t.contains("b2")
        }
    })
    .await;
    let fingerprint = first.fingerprint().await;
    drop(first);
    etcd.kill();

    // etcd down: the new proxy starts from the cache and routes as the first one did.
    let second = Proxy::start(&url, Some(&cache));
    assert_eq!(
        second.names().await,
        BTreeSet::from(["b1".into(), "b2".into()])
    );
    assert_eq!(second.fingerprint().await, fingerprint);
    assert_eq!(second.gauge("shardproxy_membership_connected").await, 0.0);
    let r = router(&[("b1", 1), ("b2", 2)]);
    for k in keys(40) {
        assert_eq!(
            second.answer(&k).await,
            r.rank_names(&k)[0],
            "key {}",
            text(&k)
        );
    }

    // etcd back: it connects, resyncs and follows changes.
    etcd.restart();
    until("the cache-started proxy connects", RECONNECT, || async {
        second.gauge("shardproxy_membership_connected").await == 1.0
    })
    .await;
    let rev = etcd.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 1));
    seen_by_all(std::slice::from_ref(&second), rev, CONVERGE).await;
    names_on_all(std::slice::from_ref(&second), &["b1", "b2", "b3"], CONVERGE).await;
    drop(second);
    etcd.kill();

    // Neither etcd nor a cache file: exit 1, naming both.
    let missing = dir.join("no-such-cache.json");
    let missing = missing.to_str().expect("UTF-8");
    let cases: [&[&str]; 2] = [&[], &["--membership-cache", missing]];
    for extra in cases {
        let out = output_within(
            common::process::shardproxy()
                .args(["run", "--listen", "127.0.0.1:0", "--membership", &url])
                .args(extra),
            HANG_GUARD,
        );
        let err = text(&out.stderr).to_lowercase();
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains("etcd") && err.contains("cache"),
            "{extra:?}: the message names etcd and the cache: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP listener that accepts and closes, for `register --check`: up or down on demand.
struct CheckTarget {
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CheckTarget {
    async fn start() -> CheckTarget {
        let listener = tokio::net::TcpListener::bind(any_port())
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut t = CheckTarget { addr, task: None };
        t.serve(listener);
        t
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        self.task = Some(tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        }));
    }

    /// Closes the listener: connects are refused.
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same address.
    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind the check address");
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn the_register_sidecar_keeps_the_key_while_its_check_passes_and_its_lease_lives() {
    let _serial = SERIAL.lock().await;
    let mut etcd = Etcd::start();
    let b = echo_backends(3).await;
    let prefix = "/shardproxy/register";
    let url = etcd.url(prefix);
    etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let rev = etcd.put(&bkey(prefix, "b2"), &bvalue(b[1].local_addr(), 1));
    let proxies: Vec<Proxy> = (0..2).map(|_| Proxy::start(&url, None)).collect();
    seen_by_all(&proxies, rev, CONVERGE).await;
    let mut check = CheckTarget::start().await;
    let b3 = b[2].local_addr().to_string();
    let check_addr = check.addr.to_string();
    let sidecar_args = [
        "register",
        "--membership",
        &url,
        "--name",
        "b3",
        "--addr",
        &b3,
        "--check",
        &check_addr,
        "--ttl",
        "2s",
        "--check-interval",
        "200ms",
    ];
    let r3 = router(&[("b1", 1), ("b2", 1), ("b3", 1)]);
    let b3_keys = keys_owned_by(&r3, "b3", 8);
    let key3 = bkey(prefix, "b3");

    let registered = |proxies: &[Proxy]| {
        let proxies: Vec<(SocketAddr, SocketAddr)> =
            proxies.iter().map(|p| (p.listen, p.admin)).collect();
        let b3_keys = b3_keys.clone();
        async move {
            for (listen, _) in &proxies {
                for k in &b3_keys {
                    let reply = round_trip(*listen, &HeaderFormat::default(), k, b"x").await;
                    assert_eq!(reply.expect("round trip").backend, "b3");
                }
            }
        }
    };
    let routed_around = |proxies: &[Proxy]| {
        let listens: Vec<SocketAddr> = proxies.iter().map(|p| p.listen).collect();
        let b3_keys = b3_keys.clone();
        let r3 = &r3;
        let seconds: Vec<String> = b3_keys
            .iter()
            .map(|k| r3.rank_names(k)[1].to_string())
            .collect();
        async move {
            for listen in &listens {
                for (k, second) in b3_keys.iter().zip(&seconds) {
                    let reply = round_trip(*listen, &HeaderFormat::default(), k, b"x").await;
                    assert_eq!(&reply.expect("round trip").backend, second);
                }
            }
        }
    };

    // Registered: the ready line, the key (on a lease), the proxies route to b3.
    let (mut sidecar, ready) = Daemon::start(&sidecar_args);
    assert_eq!(ready, format!("registered b3 at {url}"));
    let entry = etcd
        .get(&key3)
        .expect("the key is there once the ready line is");
    let v: Value = serde_json::from_str(&entry.value).expect("the value is JSON");
    assert_eq!(v["addr"], b3.as_str());
    assert_eq!(v["weight"], 1);
    assert_ne!(entry.lease, 0, "the key is attached to a lease");
    names_on_all(&proxies, &["b1", "b2", "b3"], CONVERGE).await;
    registered(&proxies).await;

    // SIGKILL: nobody deletes the key; the lease expires after its TTL and takes it along.
    sidecar.signal(Signal::SIGKILL);
    sidecar.wait().await;
    let took = until("the key goes with the lease", RECONNECT, || async {
        etcd.get(&key3).is_none()
    })
    .await;
    eprintln!("SIGKILLed sidecar: key gone {took:?} later (TTL 2 s)");
    assert!(!etcd.leases().contains(&entry.lease), "the lease expired");
    names_on_all(&proxies, &["b1", "b2"], CONVERGE).await;
    routed_around(&proxies).await;

    // SIGTERM: key deleted and lease revoked before it exits 0.
    let (mut sidecar, ready) = Daemon::start(&sidecar_args);
    assert_eq!(ready, format!("registered b3 at {url}"));
    let entry = etcd.get(&key3).expect("registered again");
    names_on_all(&proxies, &["b1", "b2", "b3"], CONVERGE).await;
    sidecar.signal(Signal::SIGTERM);
    let status = sidecar.wait().await;
    assert_eq!(status.code(), Some(0), "{}", sidecar.stderr());
    assert_eq!(etcd.get(&key3), None, "deleted before the sidecar exited");
    assert!(!etcd.leases().contains(&entry.lease), "revoked before exit");
    names_on_all(&proxies, &["b1", "b2"], CONVERGE).await;

    // The check fails (fall 2): the key goes, the sidecar stays; it passes again: key back.
    let (mut sidecar, _) = Daemon::start(&sidecar_args);
    names_on_all(&proxies, &["b1", "b2", "b3"], CONVERGE).await;
    check.down().await;
    until("a failing check removes the key", CONVERGE, || async {
        etcd.get(&key3).is_none()
    })
    .await;
    assert!(sidecar.try_wait().is_none(), "{}", sidecar.stderr());
    names_on_all(&proxies, &["b1", "b2"], CONVERGE).await;
    routed_around(&proxies).await;
    check.up().await;
    until("a passing check restores the key", CONVERGE, || async {
        etcd.get(&key3).is_some()
    })
    .await;
    names_on_all(&proxies, &["b1", "b2", "b3"], CONVERGE).await;
    registered(&proxies).await;
    drop(sidecar);
    etcd.delete(&key3);

    // Started while etcd is down: it keeps retrying and registers once etcd is back.
    etcd.kill();
    let args: Vec<String> = sidecar_args.iter().map(|s| s.to_string()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = tx.send(Daemon::start(&args));
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)),
        "no ready line (and no exit) while etcd is down"
    );
    etcd.restart();
    let (sidecar, ready) = rx
        .recv_timeout(HANG_GUARD + Duration::from_secs(5))
        .expect("the sidecar registers once etcd is back");
    assert_eq!(ready, format!("registered b3 at {url}"));
    assert!(etcd.get(&key3).is_some());
    drop(sidecar);

    // Bad flags: exit 2.
    let out = output_within(
        common::process::shardproxy().args(["register", "--membership", &url, "--addr", &b3]),
        HANG_GUARD,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn a_malformed_value_is_skipped_and_counted_and_the_rest_apply() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let b = echo_backends(4).await;
    let prefix = "/shardproxy/malformed";
    let url = etcd.url(prefix);
    etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let rev = etcd.put(&bkey(prefix, "b2"), "not json");
    let p = Proxy::start_with_log(&url, None, Some("info"));
    let proxies = std::slice::from_ref(&p);
    seen_by_all(proxies, rev, CONVERGE).await;
    assert_eq!(p.names().await, BTreeSet::from(["b1".to_string()]));
    let invalid = "shardproxy_membership_invalid_values_total";
    let applied = "shardproxy_membership_updates_total{result=\"applied\"}";
    // The start-up read's bad value is counted (by the watch task, just after the start).
    until("the stored bad value is counted", CONVERGE, || async {
        p.gauge(invalid).await >= 1.0
    })
    .await;
    let m = p.metrics().await;
    let (invalid0, applied0) = (metric(&m, invalid), metric(&m, applied));
    p.daemon.wait_stderr(&bkey(prefix, "b2")).await;

    // Through the watch: an unknown field, a bad address, and a good value.
    etcd.put(
        &bkey(prefix, "b3"),
        &format!("{{\"addr\":\"{}\",\"colour\":\"red\"}}", b[2].local_addr()),
    );
    etcd.put(&bkey(prefix, "b5"), "{\"addr\":\"nowhere\",\"weight\":1}");
    let rev = etcd.put(&bkey(prefix, "b4"), &bvalue(b[3].local_addr(), 1));
    seen_by_all(proxies, rev, CONVERGE).await;
    names_on_all(proxies, &["b1", "b4"], CONVERGE).await;
    let m = p.metrics().await;
    assert!(
        metric(&m, invalid) >= invalid0 + 2.0,
        "two more bad values counted: {} -> {}",
        invalid0,
        metric(&m, invalid)
    );
    assert!(metric(&m, applied) > applied0, "the good one applied");
    p.daemon.wait_stderr(&bkey(prefix, "b3")).await;
    p.daemon.wait_stderr(&bkey(prefix, "b5")).await;
    let r = router(&[("b1", 1), ("b4", 1)]);
    for k in keys(20) {
        assert_eq!(p.answer(&k).await, r.rank_names(&k)[0]);
    }

    // Fixed values apply.
    let rev = etcd.put(&bkey(prefix, "b2"), &bvalue(b[1].local_addr(), 1));
    seen_by_all(proxies, rev, CONVERGE).await;
    names_on_all(proxies, &["b1", "b2", "b4"], CONVERGE).await;
}

/// One admin request; returns (status, head, body).
async fn http_full(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn the_admin_api_says_the_membership_comes_from_etcd_and_refuses_to_change_it() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let b = echo_backends(2).await;
    let prefix = "/shardproxy/admin";
    let url = etcd.url(prefix);
    etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let rev = etcd.put(&bkey(prefix, "b2"), &bvalue(b[1].local_addr(), 1));
    let p = Proxy::start(&url, None);
    seen_by_all(std::slice::from_ref(&p), rev, CONVERGE).await;

    let body = bvalue(b[0].local_addr(), 1);
    let mutations = [
        ("PUT", "/backends/b9", "b9", body.as_str()),
        ("PUT", "/backends/b1", "b1", body.as_str()),
        ("DELETE", "/backends/b1", "b1", ""),
        ("POST", "/backends/b2/drain", "b2", ""),
        ("POST", "/backends/b2/undrain", "b2", ""),
    ];
    for (method, path, name, body) in mutations {
        let (status, _, answer) = http_full(p.admin, method, path, body).await;
        assert_eq!(status, 409, "{method} {path}: {answer}");
        let v: Value = serde_json::from_str(&answer).expect("a JSON error");
        let error = v["error"].as_str().expect("an error string");
        assert!(
            error.contains(&url) && error.contains(&bkey(prefix, name)),
            "{method} {path}: the error names {url} and the key: {error}"
        );
    }
    assert_eq!(p.names().await, BTreeSet::from(["b1".into(), "b2".into()]));
    let m = p.metrics().await;
    assert_eq!(metric(&m, "shardproxy_membership_revision"), rev as f64);

    let (status, _, membership) = http_full(p.admin, "GET", "/membership", "").await;
    assert_eq!(status, 200, "{membership}");
    let v: Value = serde_json::from_str(&membership).expect("GET /membership JSON");
    assert_eq!(v["source"], "etcd", "{v}");
    assert_eq!(v["url"], url.as_str(), "{v}");
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(v["revision"], rev, "{v}");
    assert_eq!(v["backends"], 2, "{v}");

    let (status, head, list) = http_full(p.admin, "GET", "/backends", "").await;
    assert_eq!(status, 200, "{list}");
    let header = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-membership-revision")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no x-membership-revision header:\n{head}"));
    assert_eq!(header, rev.to_string());
    let v: Value = serde_json::from_str(&list).expect("GET /backends JSON");
    for entry in v.as_array().expect("an array") {
        assert_eq!(entry["source"], "etcd", "{entry}");
    }

    // Without etcd: local, and the mutations work as before.
    let local = start_proxy(specs(&b), |_| {}).await;
    let admin = local.admin_addr().expect("admin");
    let (status, _, membership) = http_full(admin, "GET", "/membership", "").await;
    assert_eq!(status, 200, "{membership}");
    let v: Value = serde_json::from_str(&membership).expect("GET /membership JSON");
    assert_eq!(v, serde_json::json!({"source": "local"}));
    let (_, _, list) = http_full(admin, "GET", "/backends", "").await;
    let v: Value = serde_json::from_str(&list).expect("GET /backends JSON");
    for entry in v.as_array().expect("an array") {
        assert_eq!(entry["source"], "local", "{entry}");
    }
    let (status, _, answer) = http_full(admin, "POST", "/backends/b2/drain", "").await;
    assert_eq!(status, 200, "{answer}");

    // --membership with --backend: exit 2 naming both.
    let out = output_within(
        common::process::shardproxy().args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--membership",
            &url,
            "--backend",
            &format!("b1={}", b[0].local_addr()),
        ]),
        HANG_GUARD,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--membership") && err.contains("--backend"),
        "names both flags: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn with_three_endpoints_a_proxy_follows_the_cluster_through_any_lost_member() {
    let _serial = SERIAL.lock().await;
    let mut cluster = common::etcd::EtcdCluster::start(3);
    let b = echo_backends(3).await;
    let prefix = "/shardproxy/cluster";
    let url = cluster.url(prefix);
    cluster.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    cluster.put(&bkey(prefix, "b2"), &bvalue(b[1].local_addr(), 1));
    let rev = cluster.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 1));
    let proxies = vec![Proxy::start(&url, None)];
    seen_by_all(&proxies, rev, CONVERGE).await;
    names_on_all(&proxies, &["b1", "b2", "b3"], CONVERGE).await;

    // Each member in turn is SIGKILLed (so the one the proxy watches through is, once); a
    // change made through the two others reaches the proxy, which stays connected.
    for i in 0..3 {
        cluster.kill(i);
        let weight = 2 + i as u32;
        let rev = cluster.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), weight));
        let took = seen_by_all(&proxies, rev, RECONNECT).await;
        eprintln!("member {i} killed: b3 weight {weight} (revision {rev}) applied after {took:?}");
        until(
            &format!("connected with member {i} down"),
            RECONNECT,
            || async { proxies[0].gauge("shardproxy_membership_connected").await == 1.0 },
        )
        .await;
        let r = router(&[("b1", 1), ("b2", 1), ("b3", weight)]);
        for k in keys(20) {
            assert_eq!(proxies[0].answer(&k).await, r.rank_names(&k)[0]);
        }
        cluster.restart(i);
    }
    let rev = cluster.delete(&bkey(prefix, "b2"));
    seen_by_all(&proxies, rev, RECONNECT).await;
    names_on_all(&proxies, &["b1", "b3"], CONVERGE).await;
}

/// The fixture itself (no proxy): what the other tests rely on it for.
#[test]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
fn the_etcd_fixture_puts_gets_compacts_and_survives_a_restart() {
    let mut etcd = Etcd::start();
    let r1 = etcd.put("/t/a", "{\"addr\":\"127.0.0.1:1\"}");
    let r2 = etcd.put("/t/b", "-starts-with-a-dash");
    assert!(r2 > r1);
    assert_eq!(etcd.get("/t/b").expect("b").value, "-starts-with-a-dash");
    assert_eq!(etcd.compact(), r2);
    etcd.kill();
    assert!(etcd.pid().is_none());
    assert!(
        std::net::TcpStream::connect(etcd.client).is_err(),
        "nothing answers on the client port after the kill"
    );
    etcd.restart();
    assert_eq!(etcd.revision(), r2, "same data dir");
    let entry = etcd.get("/t/a").expect("kept across the restart");
    assert_eq!(entry.lease, 0);
    assert!(etcd.delete("/t/a") > r2);
    assert_eq!(etcd.get("/t/a"), None);
    assert!(etcd.leases().is_empty());
    let dir = etcd.dir().to_path_buf();
    drop(etcd);
    assert!(!dir.exists(), "the data dir is removed");
}

/// The cluster fixture: a write through two members while the third is down, seen by all
/// three once it is back.
#[test]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
fn the_etcd_cluster_fixture_writes_with_a_member_down_and_rejoins_it() {
    let mut cluster = common::etcd::EtcdCluster::start(3);
    cluster.kill(1);
    let rev = cluster.put("/t/k", "v");
    cluster.restart(1);
    // Each member, the restarted one included, has the write in its own store (a
    // serializable read answers locally; a restarted member may lag a moment: bounded wait).
    for m in &cluster.members {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = common::etcd::etcdctl(
                &m.client.to_string(),
                &["get", "--consistency=s", "--print-value-only", "/t/k"],
            );
            if out.status.success() && text(&out.stdout).trim() == "v" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "member {} lacks the write",
                m.client
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(cluster.get("/t/k").expect("the key").value, "v");
    assert!(cluster.revision() >= rev);
}

/// `register --membership URL --name NAME --addr ADDR --ttl 2s EXTRA...`.
fn register_args<'a>(
    url: &'a str,
    name: &'a str,
    addr: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "register",
        "--membership",
        url,
        "--name",
        name,
        "--addr",
        addr,
        "--ttl",
        "2s",
    ];
    args.extend(extra);
    args
}

/// Runs `shardproxy run --membership URL EXTRA...`, expecting it to refuse to start (no etcd
/// it may use, no cache file): exit 1; returns stderr.
fn refused_start(url: &str, extra: &[&str]) -> String {
    let out = output_within(
        common::process::shardproxy()
            .args(["run", "--listen", "127.0.0.1:0", "--membership", url])
            .args(extra),
        HANG_GUARD,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
    assert!(
        err.contains("cannot read the membership"),
        "{extra:?}: {err}"
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn over_tls_with_client_certificates_only_a_client_with_the_right_files_gets_in() {
    let _serial = SERIAL.lock().await;
    let dir = temp_dir("etcd-tls");
    let pki = Pki::generate(&dir);
    let etcd = Etcd::start_with(EtcdOptions {
        tls: Some(pki.clone()),
        ..EtcdOptions::default()
    });
    let b = echo_backends(2).await;
    let prefix = "/shardproxy/tls";
    let url = etcd.url(prefix);
    let rev = etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let path = |p: &Path| p.to_str().expect("a UTF-8 temp path").to_string();
    let (ca, cert, key, other_ca) = (
        path(&pki.ca),
        path(&pki.client_cert),
        path(&pki.client_key),
        path(&pki.other_ca),
    );
    let tls = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];

    // The right CA and a client certificate: it reads, watches and routes.
    let proxy = Proxy::start_with_args(&url, &tls);
    seen_by_all(std::slice::from_ref(&proxy), rev, CONVERGE).await;
    until("the proxy watches over TLS", CONVERGE, || async {
        proxy.gauge("shardproxy_membership_connected").await == 1.0
    })
    .await;
    assert_eq!(proxy.answer(b"k").await, "b1");

    // The sidecar over TLS registers b2; the proxy follows the watch.
    let b2 = b[1].local_addr().to_string();
    let (mut sidecar, ready) = Daemon::start(&register_args(&url, "b2", &b2, &tls));
    assert_eq!(ready, format!("registered b2 at {url}"));
    assert_ne!(etcd.get(&bkey(prefix, "b2")).expect("b2's key").lease, 0);
    names_on_all(std::slice::from_ref(&proxy), &["b1", "b2"], CONVERGE).await;
    let r = router(&[("b1", 1), ("b2", 1)]);
    for k in keys_owned_by(&r, "b2", 4) {
        assert_eq!(proxy.answer(&k).await, "b2", "key {}", text(&k));
    }
    sidecar.signal(Signal::SIGTERM);
    assert_eq!(sidecar.wait().await.code(), Some(0), "{}", sidecar.stderr());
    assert_eq!(etcd.get(&bkey(prefix, "b2")), None, "deleted at SIGTERM");
    names_on_all(std::slice::from_ref(&proxy), &["b1"], CONVERGE).await;

    // Each wrong setting is refused with a reason, not a silent stale table.
    let err = refused_start(&url, &[]);
    assert!(
        err.contains("give --etcd-ca"),
        "no TLS against a TLS etcd: {err}"
    );
    let err = refused_start(
        &url,
        &[
            "--etcd-ca",
            &other_ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    );
    assert!(
        err.to_lowercase().contains("certificate"),
        "a server certificate from another CA is named: {err}"
    );
    let err = refused_start(&url, &["--etcd-ca", &ca]);
    assert!(
        err.contains("give --etcd-cert and --etcd-key"),
        "no client certificate: {err}"
    );

    // Files that cannot work are a start-up error (exit 2) naming the flag and the file.
    let missing = dir.join("missing.pem");
    let missing = path(&missing);
    for (extra, flag) in [
        (vec!["--etcd-ca", missing.as_str()], "--etcd-ca"),
        (vec!["--etcd-ca", &ca, "--etcd-cert", &cert], "--etcd-key"),
        (
            vec!["--etcd-ca", &ca, "--etcd-cert", &key, "--etcd-key", &key],
            "--etcd-cert",
        ),
        (
            vec!["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &cert],
            "--etcd-key",
        ),
    ] {
        let out = output_within(
            common::process::shardproxy()
                .args(["run", "--listen", "127.0.0.1:0", "--membership", &url])
                .args(&extra),
            HANG_GUARD,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(flag), "{extra:?}: names {flag}: {err}");
    }
    drop(proxy);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn with_authentication_a_read_only_proxy_and_a_writing_sidecar_log_in_and_stay_in() {
    let _serial = SERIAL.lock().await;
    let dir = temp_dir("etcd-auth");
    // Tokens expire after 2 s idle: the clients must log in again, not fail.
    let mut etcd = Etcd::start_with(EtcdOptions {
        extra_args: vec!["--auth-token-ttl=2".into()],
        ..EtcdOptions::default()
    });
    let prefix = "/shardproxy/auth";
    let backends_prefix = format!("{prefix}/backends/");
    etcd.enable_auth(
        "root-secret",
        &[
            ("proxy", "proxy secret", &backends_prefix, "read"),
            (
                "registrar",
                "registrar-secret",
                &backends_prefix,
                "readwrite",
            ),
        ],
    );
    let b = echo_backends(4).await;
    let url = etcd.url(prefix);
    let rev = etcd.put(&bkey(prefix, "b1"), &bvalue(b[0].local_addr(), 1));
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write a password file");
        p.to_str().expect("a UTF-8 temp path").to_string()
    };
    // A space inside and a line ending after: the first line, as it is, is the password.
    let proxy_pw = write("proxy.pw", "proxy secret\n");
    let registrar_pw = write("registrar.pw", "registrar-secret\n");
    let wrong_pw = write("wrong.pw", "not it\n");

    let proxy_login = ["--etcd-user", "proxy", "--etcd-password-file", &proxy_pw];
    let proxy = Proxy::start_with_args(&url, &proxy_login);
    seen_by_all(std::slice::from_ref(&proxy), rev, CONVERGE).await;
    assert_eq!(proxy.answer(b"k").await, "b1");

    // The sidecar writes with its own user.
    let b2 = b[1].local_addr().to_string();
    let registrar_login = [
        "--etcd-user",
        "registrar",
        "--etcd-password-file",
        &registrar_pw,
    ];
    let (sidecar, ready) = Daemon::start(&register_args(&url, "b2", &b2, &registrar_login));
    assert_eq!(ready, format!("registered b2 at {url}"));
    names_on_all(std::slice::from_ref(&proxy), &["b1", "b2"], CONVERGE).await;

    // Past the token TTL: the watch still delivers, and the sidecar's lease stays alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rev = etcd.put(&bkey(prefix, "b3"), &bvalue(b[2].local_addr(), 1));
    seen_by_all(std::slice::from_ref(&proxy), rev, CONVERGE).await;
    names_on_all(std::slice::from_ref(&proxy), &["b1", "b2", "b3"], CONVERGE).await;
    assert!(etcd.get(&bkey(prefix, "b2")).is_some(), "the lease lived");

    // The proxy user's password is rotated: in etcd (the user recreated with the new one)
    // and in the password file. etcd restarts: on reconnect the proxy reads the file again
    // and logs in with the new password (the sidecar with its unchanged one).
    std::fs::write(&proxy_pw, "rotated secret\n").expect("rotate the password file");
    etcd.ctl_ok(&["user", "delete", "proxy"]);
    etcd.ctl_ok(&["user", "add", "proxy:rotated secret"]);
    etcd.ctl_ok(&["user", "grant-role", "proxy", "proxy-role"]);
    etcd.restart();
    until("the proxy is back on etcd", RECONNECT, || async {
        proxy.gauge("shardproxy_membership_connected").await == 1.0
    })
    .await;
    let rev = etcd.put(&bkey(prefix, "b4"), &bvalue(b[3].local_addr(), 1));
    seen_by_all(std::slice::from_ref(&proxy), rev, CONVERGE).await;
    names_on_all(
        std::slice::from_ref(&proxy),
        &["b1", "b2", "b3", "b4"],
        RECONNECT,
    )
    .await;
    let r = router(&[("b1", 1), ("b2", 1), ("b3", 1), ("b4", 1)]);
    for k in keys(24) {
        assert_eq!(
            proxy.answer(&k).await,
            r.rank_names(&k)[0],
            "key {}",
            text(&k)
        );
    }
    drop(sidecar);

    // A wrong password, and no login at all, are refused at start with the reason.
    let err = refused_start(
        &url,
        &["--etcd-user", "proxy", "--etcd-password-file", &wrong_pw],
    );
    assert!(err.contains("refused user \"proxy\""), "{err}");
    let err = refused_start(&url, &[]);
    assert!(
        err.contains("give --etcd-user"),
        "no login against an etcd with authentication: {err}"
    );
    // The read-only user cannot register: the sidecar keeps retrying, says why, writes nothing.
    let log = dir.join("readonly-sidecar.log");
    let mut child = common::process::shardproxy()
        .args([
            "register",
            "--membership",
            &url,
            "--name",
            "b9",
            "--addr",
            &b2,
        ])
        .args(["--etcd-user", "proxy", "--etcd-password-file", &proxy_pw])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the sidecar log"))
        .spawn()
        .expect("spawn the sidecar");
    let said = until(
        "the read-only sidecar reports the refusal",
        CONVERGE,
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("permission denied")
            }
        },
    )
    .await;
    eprintln!("read-only user's sidecar refused within {said:?}");
    assert!(
        child.try_wait().expect("poll the sidecar").is_none(),
        "it keeps retrying"
    );
    assert_eq!(etcd.get(&bkey(prefix, "b9")), None);
    // Not reaped yet, so the PID is still this child's.
    child.kill().expect("kill the sidecar");
    let _ = child.wait();
    drop(proxy);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
