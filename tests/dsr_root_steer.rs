//! Root-only tests of the nftables steering (`shardproxy::dsr::steer`, docs/design.md §6).
//!
//! Each test creates its own network namespace with a veth device, runs the `Steering`'s
//! `nft -i` inside it (`ip netns exec NAME nft`) and checks the ruleset with
//! `ip netns exec NAME nft list ...`. They need CAP_NET_ADMIN, so they are ignored in a plain
//! `cargo test`; run them with
//! `cargo test --test dsr_root_steer -- --ignored` (netns-tests/run.sh does).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardproxy::dsr::steer::{SteerConfig, SteerError, Steering};

/// A network namespace with veth pair `d0`/`d1` (both up), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "spsteer{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&[
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]);
        ns.exec(&["ip", "link", "set", "d0", "up"]);
        ns.exec(&["ip", "link", "set", "d1", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `nft list <what>` inside the namespace, or `None` if nft fails (e.g. no such table).
    fn nft_list(&self, what: &str) -> Option<String> {
        let mut args = vec!["ip", "netns", "exec", &self.name, "nft", "list"];
        args.extend(what.split(' '));
        let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn table(&self, table: &str) -> Option<String> {
        self.nft_list(&format!("table netdev {table}"))
    }

    fn frozen(&self, table: &str) -> String {
        self.nft_list(&format!("set netdev {table} frozen"))
            .expect("frozen set listed")
    }

    fn flows(&self, table: &str) -> String {
        self.nft_list(&format!("map netdev {table} flows"))
            .expect("flows map listed")
    }

    fn config(&self, table: &str) -> SteerConfig {
        let mut cfg = SteerConfig::new(table, "d0", vip());
        cfg.command = ["ip", "netns", "exec", &self.name, "nft"]
            .map(String::from)
            .to_vec();
        cfg
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 7000)
}

fn client(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(0x0a00_0000 + (i >> 8)),
        40000 + (i & 0xff) as u16,
    )
}

/// `a.b.c.d . port` as nft lists a set element.
/// Polls `list` until it no longer contains `needle` (bounded). A removed element is
/// re-added with `expires 1ms` (deletes stall the set, see src/dsr/steer/), so it stays
/// listed until the kernel's clock passes that millisecond — a jiffy or two.
async fn gone(list: impl Fn() -> String, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = list();
        if !text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn elem(c: SocketAddrV4) -> String {
    format!("{} . {}", c.ip(), c.port())
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn start_creates_the_ruleset_and_shutdown_removes_it() {
    let ns = Netns::new();
    let s = Steering::start_with(ns.config("shardproxy_t1"))
        .await
        .unwrap();
    assert_eq!(s.table(), "shardproxy_t1");
    let t = ns.table("shardproxy_t1").expect("table exists after start");
    for want in [
        "set frozen",
        "map flows",
        "type ipv4_addr . inet_service : ipv4_addr",
        "timeout 5s",
        "timeout 1h",
        "type filter hook ingress device \"d0\" priority filter; policy accept;",
        "ip daddr 10.9.9.9 tcp dport 7000 ip saddr . tcp sport @frozen drop",
        "ip daddr 10.9.9.9 tcp dport 7000 fwd ip to ip saddr . tcp sport map @flows device \"d0\"",
    ] {
        assert!(t.contains(want), "missing {want:?} in\n{t}");
    }
    assert!(t.find("@frozen drop") < t.find("fwd ip to"), "{t}");
    s.shutdown().await.unwrap();
    assert!(
        ns.table("shardproxy_t1").is_none(),
        "table left after shutdown"
    );
    assert!(matches!(s.freeze(client(1)).await, Err(SteerError::Closed)));
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn freeze_steer_unfreeze_remove_change_the_elements() {
    let ns = Netns::new();
    let t = "shardproxy_t2";
    let s = Steering::start_with(ns.config(t)).await.unwrap();
    let (a, b) = (client(1), client(2));
    let host = Ipv4Addr::new(10, 1, 0, 2);

    s.freeze(a).await.unwrap();
    s.freeze(b).await.unwrap();
    let frozen = ns.frozen(t);
    assert!(
        frozen.contains(&elem(a)) && frozen.contains(&elem(b)),
        "{frozen}"
    );

    s.steer(a, host).await.unwrap();
    let frozen = gone(|| ns.frozen(t), &elem(a)).await;
    let flows = ns.flows(t);
    assert!(
        !frozen.contains(&elem(a)),
        "steer left {a} frozen:\n{frozen}"
    );
    assert!(frozen.contains(&elem(b)), "{frozen}");
    assert!(
        flows.contains(&elem(a)) && flows.contains(": 10.1.0.2"),
        "{flows}"
    );

    s.unfreeze(b).await.unwrap();
    assert!(!gone(|| ns.frozen(t), &elem(b)).await.contains(&elem(b)));
    // Unfreezing or removing what is not there is no error.
    s.unfreeze(b).await.unwrap();
    s.remove(b).await.unwrap();

    // Re-steering moves the flow.
    s.steer(a, Ipv4Addr::new(10, 1, 0, 3)).await.unwrap();
    let flows = gone(|| ns.flows(t), ": 10.1.0.2").await;
    assert!(
        flows.contains(": 10.1.0.3") && !flows.contains(": 10.1.0.2"),
        "{flows}"
    );
    s.refresh(a).await.unwrap();
    assert!(ns.flows(t).contains(&elem(a)));

    s.remove(a).await.unwrap();
    let flows = gone(|| ns.flows(t), &elem(a)).await;
    assert!(!flows.contains(&elem(a)), "{flows}");
    s.remove(a).await.unwrap();
    assert!(matches!(s.refresh(a).await, Err(SteerError::NotSteered(_))));
    s.shutdown().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn concurrent_requests_are_batched_and_all_answered() {
    let ns = Netns::new();
    let t = "shardproxy_t3";
    let s = Arc::new(Steering::start_with(ns.config(t)).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let s = Arc::clone(&s);
        tasks.spawn(async move {
            s.freeze(client(i)).await?;
            s.steer(client(i), Ipv4Addr::new(10, 1, 0, 2)).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let flows = ns.flows(t);
    for i in 0..300 {
        assert!(flows.contains(&elem(client(i))), "{} missing", client(i));
    }
    let frozen = gone(|| ns.frozen(t), "elements =").await;
    assert!(!frozen.contains("elements ="), "{frozen}");
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn instances_coexist_and_clean_only_their_own() {
    let ns = Netns::new();
    let a = Steering::start_with(ns.config("shardproxy_a"))
        .await
        .unwrap();
    let mut cfg_b = ns.config("shardproxy_b");
    cfg_b.vip = SocketAddrV4::new(*vip().ip(), 7001);
    let b = Steering::start_with(cfg_b).await.unwrap();
    a.steer(client(1), Ipv4Addr::new(10, 1, 0, 2))
        .await
        .unwrap();
    b.steer(client(2), Ipv4Addr::new(10, 1, 0, 3))
        .await
        .unwrap();
    assert!(ns.flows("shardproxy_a").contains(&elem(client(1))));
    assert!(!ns.flows("shardproxy_a").contains(&elem(client(2))));
    assert!(ns.flows("shardproxy_b").contains(&elem(client(2))));

    a.shutdown().await.unwrap();
    assert!(ns.table("shardproxy_a").is_none());
    let tb = ns.table("shardproxy_b").expect("b survives a's shutdown");
    assert!(
        tb.contains(&elem(client(2))) && tb.contains("tcp dport 7001"),
        "{tb}"
    );

    // Dropping without shutdown removes the table too.
    drop(b);
    assert!(ns.table("shardproxy_b").is_none(), "drop left b's table");
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn start_removes_a_leftover_table() {
    let ns = Netns::new();
    let t = "shardproxy_t5";
    // What a crashed instance leaves: its table, with an extra set and elements.
    ns.exec(&["nft", "add", "table", "netdev", t]);
    ns.exec(&[
        "nft",
        "add",
        "set",
        "netdev",
        t,
        "stale",
        "{ type ipv4_addr ; }",
    ]);
    ns.exec(&[
        "nft",
        "add",
        "element",
        "netdev",
        t,
        "stale",
        "{ 10.7.7.7 }",
    ]);
    assert!(ns.table(t).unwrap().contains("10.7.7.7"));

    let s = Steering::start_with(ns.config(t)).await.unwrap();
    let listed = ns.table(t).unwrap();
    assert!(
        !listed.contains("stale") && !listed.contains("10.7.7.7"),
        "{listed}"
    );
    assert!(listed.contains("map flows"), "{listed}");
    s.shutdown().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn elements_expire_after_their_timeout() {
    let ns = Netns::new();
    let t = "shardproxy_t6";
    let mut cfg = ns.config(t);
    cfg.frozen_timeout = Duration::from_secs(1);
    cfg.flow_timeout = Duration::from_secs(1);
    let s = Steering::start_with(cfg).await.unwrap();
    s.freeze(client(1)).await.unwrap();
    s.steer(client(2), Ipv4Addr::new(10, 1, 0, 2))
        .await
        .unwrap();
    assert!(ns.frozen(t).contains(&elem(client(1))));
    assert!(ns.flows(t).contains(&elem(client(2))));
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (frozen, flows) = (ns.frozen(t), ns.flows(t));
        if !frozen.contains("elements =") && !flows.contains("elements =") {
            break;
        }
        assert!(Instant::now() < until, "not expired:\n{frozen}\n{flows}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Removing an expired flow is no error.
    s.remove(client(2)).await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn nft_errors_come_back_with_nfts_message() {
    let ns = Netns::new();
    let t = "shardproxy_t7";
    let s = Steering::start_with(ns.config(t)).await.unwrap();
    s.steer(client(2), Ipv4Addr::new(10, 1, 0, 2))
        .await
        .unwrap();
    // Without the frozen set, a freeze fails with the kernel's errno and the element, while a
    // removal in the same batch (or alone, after the batch's retry) still succeeds.
    ns.exec(&[
        "nft", "flush", "chain", "netdev", t, "ingress", ";", "delete", "set", "netdev", t,
        "frozen",
    ]);
    let (frozen, removed) = tokio::join!(s.freeze(client(1)), s.remove(client(2)));
    match frozen {
        Err(SteerError::Command { message }) => {
            assert!(message.contains("No such file or directory"), "{message}");
            assert!(message.contains(&elem(client(1))), "{message}");
        }
        other => panic!("{other:?}"),
    }
    removed.unwrap();
    ns.exec(&["nft", "delete", "table", "netdev", t]);
    match s.freeze(client(1)).await {
        Err(SteerError::Command { message }) => {
            assert!(message.contains("No such file or directory"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A device that does not exist fails the start, with nft's message.
    let mut cfg = ns.config("shardproxy_t7b");
    cfg.device = "nosuchdev0".to_owned();
    match Steering::start_with(cfg).await {
        Err(SteerError::Command { message }) => {
            assert!(message.contains("Error:"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(ns.table("shardproxy_t7b").is_none());
    // Shutdown after the table vanished still succeeds.
    s.shutdown().await.unwrap();
}

/// Element updates go over netlink: nft's input (logged by a wrapper) holds the ruleset's
/// set-up and teardown only, while the elements change as asked, including a flow moved to
/// another host (the one delete).
#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn element_updates_bypass_nft() {
    let ns = Netns::new();
    let t = "shardproxy_t10";
    let log = std::env::temp_dir().join(format!("{}-nft-input.log", ns.name));
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Remove(log.clone());
    let mut cfg = ns.config(t);
    let script = format!("tee -a '{}' | nft \"$@\"", log.display());
    cfg.command = ["ip", "netns", "exec", &ns.name, "sh", "-c", &script, "sh"]
        .map(String::from)
        .to_vec();
    let s = Steering::start_with(cfg).await.unwrap();
    let (h2, h3) = (Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3));
    s.freeze(client(0)).await.unwrap();
    assert!(ns.frozen(t).contains(&elem(client(0))));
    for i in 0..20 {
        s.freeze(client(i)).await.unwrap();
        s.steer(client(i), h2).await.unwrap();
    }
    for i in 0..10 {
        s.refresh(client(i)).await.unwrap();
        s.steer(client(i), h3).await.unwrap();
    }
    for i in 10..20 {
        s.remove(client(i)).await.unwrap();
    }
    s.unfreeze(client(21)).await.unwrap();
    let flows = gone(|| ns.flows(t), &h2.to_string()).await;
    for i in 0..10 {
        // `10.0.0.0 . 40000 expires 59m59s996ms : 10.1.0.3,`
        let listed = flows
            .split(&format!("{} ", elem(client(i))))
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next());
        assert!(
            listed.is_some_and(|l| l.trim_end().ends_with(&format!(": {h3}"))),
            "{} not moved: {flows}",
            client(i)
        );
    }
    for i in 10..20 {
        assert!(!flows.contains(&elem(client(i))), "{flows}");
    }
    assert!(!flows.contains(&h2.to_string()), "{flows}");
    let frozen = gone(|| ns.frozen(t), "elements =").await;
    assert!(!frozen.contains("elements ="), "{frozen}");
    s.shutdown().await.unwrap();
    let input = std::fs::read_to_string(&log).unwrap();
    assert!(input.contains("add chain"), "{input}");
    assert!(
        !input.contains("element"),
        "elements went through nft:\n{input}"
    );
}

/// Many flows moved to another host at once (add, delete, add per flow, joined into few
/// batches): every request answered, every flow listed with its new host.
#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn concurrent_moves_are_batched_and_all_answered() {
    let ns = Netns::new();
    let t = "shardproxy_t11";
    let s = Arc::new(Steering::start_with(ns.config(t)).await.unwrap());
    let (h2, h3) = (Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3));
    for host in [h2, h3] {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300 {
            let s = Arc::clone(&s);
            tasks.spawn(async move { s.steer(client(i), host).await });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
    }
    let flows = gone(|| ns.flows(t), &h2.to_string()).await;
    for i in 0..300 {
        assert!(flows.contains(&elem(client(i))), "{} missing", client(i));
    }
    assert!(!flows.contains(&h2.to_string()), "{flows}");
    s.shutdown().await.unwrap();
}

/// 1000 hand-offs one after another (freeze, steer, remove each), timed per operation.
#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn latency_of_1000_cycles() {
    let ns = Netns::new();
    let t = "shardproxy_t8";
    let s = Steering::start_with(ns.config(t)).await.unwrap();
    let host = Ipv4Addr::new(10, 1, 0, 2);
    let mut spent = [Duration::ZERO; 3];
    let started = Instant::now();
    for i in 0..1000 {
        let c = client(i);
        let t0 = Instant::now();
        s.freeze(c).await.unwrap();
        let t1 = Instant::now();
        s.steer(c, host).await.unwrap();
        let t2 = Instant::now();
        s.remove(c).await.unwrap();
        let t3 = Instant::now();
        spent[0] += t1 - t0;
        spent[1] += t2 - t1;
        spent[2] += t3 - t2;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "bounded in time"
        );
    }
    for (name, d) in ["freeze", "steer", "remove"].iter().zip(spent) {
        println!("{name}: {:.0} us per op", d.as_secs_f64() * 1e6 / 1000.0);
    }
    let flows = gone(|| ns.flows(t), "elements =").await;
    assert!(!flows.contains("elements ="), "{flows}");
    let frozen = gone(|| ns.frozen(t), "elements =").await;
    assert!(!frozen.contains("elements ="), "{frozen}");
    s.shutdown().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn an_unprivileged_nft_is_a_permission_error() {
    // root starts nft as `nobody`, which lacks CAP_NET_ADMIN.
    let mut cfg = SteerConfig::new("shardproxy_t9", "lo", vip());
    cfg.command = ["runuser", "-u", "nobody", "--", "nft"]
        .map(String::from)
        .to_vec();
    match Steering::start_with(cfg).await {
        Err(e @ SteerError::Permission { .. }) => {
            assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}
