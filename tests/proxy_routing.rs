//! Routing through the proxy, end to end: every key reaches the backend an independently
//! built [`Router`] predicts, the same key always reaches the same backend, two proxy
//! processes configured in different orders agree with each other and with `shardproxy
//! route`, weights split keys proportionally, and membership changes through
//! [`shardproxy::ProxyHandle::set_backends`] move exactly the keys rendezvous hashing says
//! they move (names are identity: a new address keeps a shard's keys; a new node only takes
//! keys; a drained node only gives its keys away).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shardproxy::config::BackendSpec;
use shardproxy::fixtures::client::{read_name, round_trip};
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::{HeaderFormat, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Generous guard against a hang; never a performance assertion.
const HANG_GUARD: Duration = Duration::from_secs(30);
/// Round trips in flight at once.
const CONCURRENCY: usize = 16;

/// Sends every key through `addr` (one verified round trip each) and returns, per key, the
/// name of the backend that answered.
async fn route_all(addr: SocketAddr, keys: &[Vec<u8>]) -> Vec<String> {
    let fmt = Arc::new(HeaderFormat::default());
    run_bounded(keys.len(), CONCURRENCY, |i| {
        let k = keys[i].clone();
        let fmt = fmt.clone();
        async move {
            let payload = format!("payload for key #{i}").into_bytes();
            timeout(HANG_GUARD, round_trip(addr, &fmt, &k, &payload))
                .await
                .unwrap_or_else(|_| panic!("key #{i}: round trip hung"))
                .unwrap_or_else(|e| panic!("key #{i}: round trip failed: {e}"))
                .backend
        }
    })
    .await
}

/// The owner `router` predicts for each key.
fn predicted(router: &Router, keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            router
                .name(router.pick(k).expect("a node takes keys"))
                .to_string()
        })
        .collect()
}

fn count<'a>(owners: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in owners {
        *m.entry(o.clone()).or_default() += 1;
    }
    m
}

fn spec(name: &str, addr: SocketAddr, weight: u32) -> BackendSpec {
    BackendSpec {
        name: name.to_string(),
        addr,
        weight,
        agent: None,
        max_connections: None,
        proxy_protocol: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_reaches_the_backend_the_router_predicts_and_stays_there() {
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    // Built independently of the proxy, from the names and weights alone.
    let router = Router::new([("b1", 1), ("b2", 1), ("b3", 1)]).unwrap();
    let keys = keys(1200);
    let want = predicted(&router, &keys);

    let first = route_all(proxy.local_addr(), &keys).await;
    for (i, (got, want)) in first.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "key #{i} reached {got}, the router says {want}");
    }
    let again = route_all(proxy.local_addr(), &keys).await;
    assert_eq!(
        first, again,
        "a key reached a different backend the second time"
    );

    // Each backend saw exactly its keys, twice, and nothing else.
    let per = count(&want);
    assert_eq!(per.len(), 3, "every backend owns some keys: {per:?}");
    for b in &backends {
        assert_eq!(
            b.accepted(),
            2 * per[b.name()] as u64,
            "{} accepted a different number of connections than it owns keys",
            b.name()
        );
    }
}

/// A `shardproxy` child process, killed and reaped when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `shardproxy run` with `args` and returns it with the addresses of its ready line
/// (`listening on ADDR` or `listening on ADDR admin ADDR`).
fn spawn_proxy(args: &[String]) -> (ChildGuard, SocketAddr, Option<SocketAddr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardproxy"))
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn shardproxy run");
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard(child);
    // Read the ready line on a thread so a silent child cannot hang the test; the thread
    // then keeps draining stdout until the child exits.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        lines.for_each(drop);
    });
    let line = rx
        .recv_timeout(HANG_GUARD)
        .expect("no ready line from shardproxy run")
        .expect("shardproxy run exited without a ready line")
        .expect("read the ready line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let (listen, admin) = match words.as_slice() {
        ["listening", "on", addr] => (addr.parse().expect("listen address"), None),
        ["listening", "on", addr, "admin", admin] => (
            addr.parse().expect("listen address"),
            Some(admin.parse().expect("admin address")),
        ),
        _ => panic!("unexpected ready line {line:?}"),
    };
    (guard, listen, admin)
}

fn backend_flags(backends: &[(&str, SocketAddr, Option<u32>)]) -> Vec<String> {
    let mut v = Vec::new();
    for (name, addr, weight) in backends {
        v.push("--backend".to_string());
        v.push(match weight {
            Some(w) => format!("{name}={addr},weight={w}"),
            None => format!("{name}={addr}"),
        });
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxy_processes_in_different_flag_orders_route_identically() {
    let backends = echo_backends(3).await;
    let addr = |i: usize| backends[i].local_addr();
    // Same membership (b1 weight 2, b2 and b3 weight 1), listed in different orders and with
    // the default weight written out in one and left implicit in the other.
    let mut a_args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    a_args.extend(backend_flags(&[
        ("b1", addr(0), Some(2)),
        ("b2", addr(1), None),
        ("b3", addr(2), Some(1)),
    ]));
    a_args.extend(["--admin".to_string(), "127.0.0.1:0".to_string()]);
    let mut b_args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    b_args.extend(backend_flags(&[
        ("b3", addr(2), None),
        ("b2", addr(1), Some(1)),
        ("b1", addr(0), Some(2)),
    ]));
    b_args.extend(["--admin".to_string(), "127.0.0.1:0".to_string()]);
    let (_a, a_listen, a_admin) = spawn_proxy(&a_args);
    let (_b, b_listen, b_admin) = spawn_proxy(&b_args);

    let router = Router::new([("b1", 2), ("b2", 1), ("b3", 1)]).unwrap();
    let keys = keys(1000);
    let want = predicted(&router, &keys);
    let through_a = route_all(a_listen, &keys).await;
    let through_b = route_all(b_listen, &keys).await;
    for i in 0..keys.len() {
        assert_eq!(
            (&through_a[i], &through_b[i]),
            (&want[i], &want[i]),
            "key #{i}: proxy A, proxy B, router disagree"
        );
    }
    // The weight is in force: b1 owns about half the keys.
    let b1 = count(&want)["b1"];
    assert!(
        (400..=600).contains(&b1),
        "b1 (weight 2 of 4) owns {b1} of 1000"
    );

    // Both processes publish the same membership fingerprint.
    let fingerprint = |text: &str| metric(text, "shardproxy_routing_table_fingerprint");
    let (_, a_text) = http_get(a_admin.expect("admin address"), "/metrics").await;
    let (_, b_text) = http_get(b_admin.expect("admin address"), "/metrics").await;
    assert_eq!(fingerprint(&a_text), fingerprint(&b_text));
    assert_eq!(
        fingerprint(&a_text),
        (router.fingerprint() & ((1 << 52) - 1)) as f64
    );

    // `shardproxy route` gives the same owner (and the router's full ranking) for every key.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardproxy"));
    cmd.arg("route").args(backend_flags(&[
        ("b2", addr(1), None),
        ("b1", addr(0), Some(2)),
        ("b3", addr(2), None),
    ]));
    for k in &keys {
        cmd.arg(String::from_utf8(k.clone()).unwrap());
    }
    let out = cmd.output().expect("run shardproxy route");
    assert!(out.status.success(), "route failed: {out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), keys.len());
    for (i, line) in lines.iter().enumerate() {
        let (k, ranking) = line.split_once('\t').expect("KEY\\tNAMES");
        assert_eq!(k.as_bytes(), keys[i].as_slice());
        let names: Vec<&str> = ranking.split(' ').collect();
        assert_eq!(names, router.rank_names(&keys[i]), "key #{i}");
        assert_eq!(names[0], through_a[i], "key #{i}: route vs proxy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_one_and_three_split_keys_a_quarter_and_three_quarters() {
    let backends = echo_backends(2).await;
    let specs = vec![
        spec("b1", backends[0].local_addr(), 1),
        spec("b2", backends[1].local_addr(), 3),
    ];
    let proxy = start_proxy(specs, |_| {}).await;
    let router = Router::new([("b1", 1), ("b2", 3)]).unwrap();
    let keys = keys(2000);
    let owners = route_all(proxy.local_addr(), &keys).await;
    assert_eq!(owners, predicted(&router, &keys));
    let per = count(&owners);
    let share = per["b1"] as f64 / keys.len() as f64;
    assert!(
        (share - 0.25).abs() < 0.03,
        "weight 1 of 4 got {:.1}% of the keys: {per:?}",
        100.0 * share
    );
    assert_eq!(per["b1"] + per["b2"], keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_keeps_its_keys_at_a_new_address_and_a_new_node_only_takes_keys() {
    let mut backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let keys = keys(1000);
    let before = route_all(proxy.local_addr(), &keys).await;
    let router3 = Router::new([("b1", 1), ("b2", 1), ("b3", 1)]).unwrap();
    assert_eq!(before, predicted(&router3, &keys));
    let b2_keys = before.iter().filter(|o| *o == "b2").count();
    assert!(b2_keys > 0);

    // Move shard b2 to another address: a new listener that reports the same name. The old
    // one is stopped, so a key still sent to the old address would fail over elsewhere.
    let old_b2 = backends.remove(1);
    assert_eq!(old_b2.accepted(), b2_keys as u64);
    old_b2.stop().await;
    let new_b2 = EchoBackend::start(any_port(), "b2").await.unwrap();
    let moved = vec![
        spec("b1", backends[0].local_addr(), 1),
        spec("b2", new_b2.local_addr(), 1),
        spec("b3", backends[1].local_addr(), 1),
    ];
    proxy.set_backends(&moved).unwrap();
    let after_move = route_all(proxy.local_addr(), &keys).await;
    assert_eq!(before, after_move, "moving b2's address moved keys");
    assert_eq!(
        new_b2.accepted(),
        b2_keys as u64,
        "b2's keys reached its new address"
    );

    // Add a fourth node: keys either stay or move onto b4, never between old nodes.
    let b4 = EchoBackend::start(any_port(), "b4").await.unwrap();
    let mut grown = moved.clone();
    grown.push(spec("b4", b4.local_addr(), 1));
    proxy.set_backends(&grown).unwrap();
    let after_grow = route_all(proxy.local_addr(), &keys).await;
    let router4 = Router::new([("b1", 1), ("b2", 1), ("b3", 1), ("b4", 1)]).unwrap();
    assert_eq!(after_grow, predicted(&router4, &keys));
    let mut onto_b4 = 0;
    for (i, (old, new)) in after_move.iter().zip(&after_grow).enumerate() {
        if old != new {
            assert_eq!(new, "b4", "key #{i} moved {old} → {new}, between old nodes");
            onto_b4 += 1;
        }
    }
    assert_eq!(after_grow.iter().filter(|o| *o == "b4").count(), onto_b4);
    assert_eq!(b4.accepted(), onto_b4 as u64);
    assert!(
        (150..=350).contains(&onto_b4),
        "about a quarter of the keys should move onto b4, {onto_b4} of 1000 did"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_gets_no_new_connections_and_only_its_keys_move() {
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let router = Router::new([("b1", 1), ("b2", 1), ("b3", 1)]).unwrap();
    let keys = keys(1000);
    let before = route_all(proxy.local_addr(), &keys).await;
    assert_eq!(before, predicted(&router, &keys));

    // A connection to b3 established before the drain, greeting read, echo not yet done.
    let b3_key = keys
        .iter()
        .zip(&before)
        .find(|(_, o)| *o == "b3")
        .map(|(k, _)| k.clone())
        .expect("b3 owns a key");
    let fmt = HeaderFormat::default();
    let header = fmt.encode(&b3_key).unwrap();
    let mut held = TcpStream::connect(proxy.local_addr()).await.unwrap();
    held.write_all(&header).await.unwrap();
    let name = timeout(HANG_GUARD, read_name(&mut held))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name, "b3");

    let mut drained = specs(&backends);
    drained[2].weight = 0;
    proxy.set_backends(&drained).unwrap();
    let b3_accepted = backends[2].accepted();
    let after = route_all(proxy.local_addr(), &keys).await;
    assert_eq!(
        backends[2].accepted(),
        b3_accepted,
        "the drained node received new connections"
    );
    for (i, (old, new)) in before.iter().zip(&after).enumerate() {
        if old == "b3" {
            assert_eq!(
                new,
                router.rank_names(&keys[i])[1],
                "key #{i}: a drained node's key goes to its second choice"
            );
        } else {
            assert_eq!(old, new, "key #{i} moved though its owner was not drained");
        }
    }

    // The established connection is untouched by the drain.
    held.write_all(b"still here").await.unwrap();
    held.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    timeout(HANG_GUARD, held.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    let mut want = header.clone();
    want.extend_from_slice(b"still here");
    assert_eq!(echoed, want);
}
