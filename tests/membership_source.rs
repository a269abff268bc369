//! The proxy's membership from etcd, in process, against a real etcd (`/usr/bin/etcd`)
//! started by each test on free loopback ports with its data in a temporary directory:
//! put / delete / a malformed value / compaction / an etcd restart (resync) / start from the
//! cache file, and the admin API's view of it.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{any_port, echo_backends, http_request, metric, scrape};
use shardproxy::config::{MembershipConfig, ProxyConfig};
use shardproxy::fixtures::client::round_trip;
use shardproxy::header::HeaderFormat;
use shardproxy::membership::etcd::Etcd as EtcdClient;
use shardproxy::membership::{EtcdError, MembershipUrl};
use shardproxy::ProxyHandle;

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One etcd member on loopback; killed (by PID) and its data removed on drop.
struct Etcd {
    child: Option<Child>,
    client: u16,
    peer: u16,
    dir: PathBuf,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "shardproxy-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut e = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            dir,
        };
        e.spawn();
        e
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("/usr/bin/etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/etcd");
        self.child = Some(child);
        // Ready when it answers a read.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.try_ctl(&["get", "/ready-probe"]) {
            assert!(Instant::now() < deadline, "etcd did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_ctl(&self, args: &[&str]) -> bool {
        Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "--dial-timeout", "2s"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "--dial-timeout", "5s"])
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn put(&self, name: &str, value: &str) {
        self.ctl(&["put", &format!("{PREFIX}/backends/{name}"), value]);
    }

    fn del(&self, name: &str) {
        self.ctl(&["del", &format!("{PREFIX}/backends/{name}")]);
    }

    /// The store revision now.
    fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "/", "--prefix", "--keys-only", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("a revision")
    }

    fn url(&self) -> String {
        format!("etcd://{}{PREFIX}", self.endpoint())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PREFIX: &str = "/shardproxy/test";

fn body(addr: SocketAddr) -> String {
    format!(r#"{{"addr":"{addr}","weight":1}}"#)
}

fn config(etcd: &Etcd, cache: Option<PathBuf>) -> ProxyConfig {
    let mut c = ProxyConfig::new(any_port(), Vec::new());
    c.admin = Some(any_port());
    let mut m = MembershipConfig::new(etcd.url().parse().expect("url"));
    m.debounce = Duration::from_millis(50);
    m.cache_file = cache;
    c.membership = Some(m);
    c
}

/// The backend names in the table in force, sorted.
fn names(proxy: &ProxyHandle) -> Vec<String> {
    let mut v: Vec<String> = proxy
        .table()
        .backends
        .iter()
        .map(|b| b.name.to_string())
        .collect();
    v.sort();
    v
}

/// Waits (bounded) until the table holds exactly `want`.
async fn wait_names(proxy: &ProxyHandle, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = names(proxy);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "table {now:?}, waited for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_metric(proxy: &ProxyHandle, sample: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(&scrape(proxy).await, sample);
        if want(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{sample} = {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn served_by(proxy: &ProxyHandle, key: &[u8]) -> std::io::Result<String> {
    round_trip(proxy.local_addr(), &HeaderFormat::default(), key, b"ping")
        .await
        .map(|r| r.backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn the_table_follows_puts_deletes_and_skips_malformed_values() {
    let etcd = Etcd::start();
    let backends = echo_backends(3).await;
    // An empty prefix is a valid start: no backend, connections end with no_backend.
    let proxy = shardproxy::start(config(&etcd, None)).await.expect("start");
    assert!(names(&proxy).is_empty());
    assert!(served_by(&proxy, b"k").await.is_err());
    let admin = proxy.admin_addr().expect("admin");

    etcd.put("b1", &body(backends[0].local_addr()));
    wait_names(&proxy, &["b1"]).await;
    assert_eq!(served_by(&proxy, b"k").await.expect("served"), "b1");
    etcd.put("b2", &body(backends[1].local_addr()));
    etcd.put("b3", r#"{"addr":"127.0.0.1:1","wieght":2}"#);
    wait_names(&proxy, &["b1", "b2"]).await;
    wait_metric(&proxy, "shardproxy_membership_invalid_values_total", |v| {
        v == 1.0
    })
    .await;

    // The admin API shows where the membership comes from and refuses to change it.
    let (code, text) = http_request(admin, "GET", "/membership", None, None).await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["source"], "etcd");
    assert_eq!(v["url"], etcd.url());
    assert_eq!(v["connected"], true);
    assert_eq!(v["backends"], 2);
    assert!(v["revision"].as_i64().unwrap() >= 3, "{v}");
    let (code, text) = http_request(admin, "GET", "/backends", None, None).await;
    assert_eq!(code, 200);
    assert!(text.contains(r#""source":"etcd""#), "{text}");
    let (code, text) = http_request(
        admin,
        "PUT",
        "/backends/b9",
        Some(&body(backends[2].local_addr())),
        None,
    )
    .await;
    assert_eq!(code, 409, "{text}");
    assert!(
        text.contains(&format!("{PREFIX}/backends/b9 there")),
        "{text}"
    );
    for path in ["/backends/b1/drain", "/backends/b1/undrain"] {
        let (code, _) = http_request(admin, "POST", path, None, None).await;
        assert_eq!(code, 409, "{path}");
    }
    let (code, _) = http_request(admin, "DELETE", "/backends/b1", None, None).await;
    assert_eq!(code, 409);
    assert_eq!(names(&proxy), ["b1", "b2"]);

    // A reload (SIGHUP) applies the file's settings but keeps etcd's membership.
    let mut reread = config(&etcd, None);
    reread.connect_timeout = Duration::from_millis(1500);
    proxy.control().reload(reread).expect("reload");
    assert_eq!(names(&proxy), ["b1", "b2"]);

    // A fixed value makes the backend appear; a delete removes one; weight 0 drains.
    etcd.put("b3", &body(backends[2].local_addr()));
    wait_names(&proxy, &["b1", "b2", "b3"]).await;
    etcd.del("b1");
    wait_names(&proxy, &["b2", "b3"]).await;
    etcd.put(
        "b2",
        &format!(r#"{{"addr":"{}","weight":0}}"#, backends[1].local_addr()),
    );
    etcd.put(
        "b3",
        &format!(r#"{{"addr":"{}","weight":0}}"#, backends[2].local_addr()),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.table().backends.iter().any(|b| b.weight != 0) {
        assert!(Instant::now() < deadline, "weights did not go to 0");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(served_by(&proxy, b"k").await.is_err(), "all drained");
    etcd.del("b2");
    etcd.del("b3");
    wait_names(&proxy, &[]).await;
    let text = scrape(&proxy).await;
    assert!(
        metric(
            &text,
            "shardproxy_membership_updates_total{result=\"applied\"}"
        ) >= 4.0
    );
    assert_eq!(
        metric(
            &text,
            "shardproxy_membership_updates_total{result=\"rejected\"}"
        ),
        0.0
    );
    assert_eq!(metric(&text, "shardproxy_membership_connected"), 1.0);
    assert_eq!(
        metric(&text, "shardproxy_membership_revision"),
        etcd.revision() as f64
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn a_compaction_then_a_change_is_applied() {
    let etcd = Etcd::start();
    let backends = echo_backends(2).await;
    etcd.put("b1", &body(backends[0].local_addr()));
    etcd.put("bad", "{");
    let proxy = shardproxy::start(config(&etcd, None)).await.expect("start");
    assert_eq!(names(&proxy), ["b1"]);
    // A bad value found by the start-up read is counted too.
    wait_metric(&proxy, "shardproxy_membership_invalid_values_total", |v| {
        v == 1.0
    })
    .await;
    for i in 0..5 {
        etcd.put("noise", &format!(r#"{{"addr":"127.0.0.1:{}"}}"#, 1000 + i));
    }
    etcd.del("noise");
    let rev = etcd.revision();
    etcd.ctl(&["compact", &rev.to_string(), "--physical"]);
    // A watch from before the compaction is told so (the source then reads afresh).
    let url: MembershipUrl = etcd.url().parse().expect("url");
    let (mut client, _) = EtcdClient::connect(&url, &Default::default(), 0, Duration::from_secs(3))
        .await
        .expect("connect");
    let mut watch = client
        .watch_prefix(&url.backends_prefix(), 2)
        .await
        .expect("watch");
    let compacted = loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Ok((events, _))) if events.is_empty() => continue,
            other => break other,
        }
    };
    assert!(
        matches!(compacted, Ok(Err(EtcdError::Compacted(r))) if r == rev + 1 || r == rev),
        "{compacted:?}"
    );
    etcd.put("b2", &body(backends[1].local_addr()));
    wait_names(&proxy, &["b1", "b2"]).await;
    wait_metric(&proxy, "shardproxy_membership_revision", |v| {
        v == (rev + 1) as f64
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn an_etcd_restart_keeps_routing_then_resyncs() {
    let mut etcd = Etcd::start();
    let backends = echo_backends(2).await;
    etcd.put("b1", &body(backends[0].local_addr()));
    let proxy = shardproxy::start(config(&etcd, None)).await.expect("start");
    assert_eq!(names(&proxy), ["b1"]);
    wait_metric(&proxy, "shardproxy_membership_connected", |v| v == 1.0).await;

    etcd.kill();
    wait_metric(&proxy, "shardproxy_membership_connected", |v| v == 0.0).await;
    // Routing and accepting continue on the last table.
    assert_eq!(served_by(&proxy, b"k").await.expect("served"), "b1");
    let admin = proxy.admin_addr().expect("admin");
    let (_, text) = http_request(admin, "GET", "/membership", None, None).await;
    assert!(text.contains(r#""connected":false"#), "{text}");

    etcd.spawn();
    etcd.put("b2", &body(backends[1].local_addr()));
    wait_names(&proxy, &["b1", "b2"]).await;
    wait_metric(&proxy, "shardproxy_membership_connected", |v| v == 1.0).await;
    let text = scrape(&proxy).await;
    assert!(metric(&text, "shardproxy_membership_reconnects_total") >= 1.0);
    // And the watch works again after the resync.
    etcd.del("b1");
    wait_names(&proxy, &["b2"]).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real etcd (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn without_etcd_the_proxy_starts_from_the_cache_file_or_not_at_all() {
    let mut etcd = Etcd::start();
    let backends = echo_backends(2).await;
    etcd.put("b1", &body(backends[0].local_addr()));
    etcd.put("b2", &body(backends[1].local_addr()));
    let cache = etcd.dir.join("members.json");
    let proxy = shardproxy::start(config(&etcd, Some(cache.clone())))
        .await
        .expect("start");
    assert_eq!(names(&proxy), ["b1", "b2"]);
    etcd.del("b2");
    wait_names(&proxy, &["b1"]).await;
    proxy.shutdown().await;
    let cached = std::fs::read_to_string(&cache).expect("the cache file was written");
    assert!(
        cached.contains("\"b1\"") && !cached.contains("\"b2\""),
        "{cached}"
    );

    etcd.kill();
    let proxy = shardproxy::start(config(&etcd, Some(cache.clone())))
        .await
        .expect("start from the cache");
    assert_eq!(names(&proxy), ["b1"]);
    assert_eq!(served_by(&proxy, b"k").await.expect("served"), "b1");
    let text = scrape(&proxy).await;
    assert_eq!(metric(&text, "shardproxy_membership_connected"), 0.0);
    // etcd comes back: the proxy connects and follows it.
    etcd.spawn();
    etcd.put("b2", &body(backends[1].local_addr()));
    wait_names(&proxy, &["b1", "b2"]).await;
    proxy.shutdown().await;

    etcd.kill();
    let e = shardproxy::start(config(&etcd, None))
        .await
        .err()
        .expect("no etcd, no cache: no start")
        .to_string();
    assert!(
        e.contains("cannot be used") && e.contains("no cache file"),
        "{e}"
    );
    std::fs::write(&cache, "{not json").expect("write");
    let e = shardproxy::start(config(&etcd, Some(cache)))
        .await
        .err()
        .expect("no etcd, corrupt cache: no start")
        .to_string();
    assert!(
        e.contains("cannot be used") && e.contains("not a shardproxy membership cache"),
        "{e}"
    );
}
