//! Soak: 100,000 connections through a `shardproxy run` process while its membership changes
//! every second through the admin API (a fifth backend added, drained, deleted, in turn).
//! Every connection must succeed, and afterwards the process's open fds and resident memory
//! must be back near the baseline measured after a warm-up: nothing leaks per connection or
//! per table swap.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::{parse_ready, Daemon};
use common::*;
use shardproxy::fixtures::client::round_trip;
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::HeaderFormat;

const CONNECTIONS: usize = 100_000;
const CONCURRENCY: usize = 32;

/// A process's open fds and resident memory (KiB), from /proc.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the proxy's fd table")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    (fds, rss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_membership_changes_leave_no_fds_or_memory_behind() {
    let backends = echo_backends(4).await;
    let fifth = EchoBackend::start(any_port(), "b5").await.unwrap();
    let mut args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "2",
    ]
    .map(String::from)
    .to_vec();
    for b in specs(&backends) {
        args.push("--backend".into());
        args.push(b.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (proxy, ready) = Daemon::start(&args);
    let (listen, admin_addr) = parse_ready(&ready);
    let admin_addr = admin_addr.expect("admin listener");
    let pid = proxy.pid();
    let fmt = HeaderFormat::default();
    let keys = Arc::new(keys(5000));

    // Warm-up: pools, buffers and runtime structures reach their working size.
    let warm = run_bounded(5000, CONCURRENCY, |i| {
        let keys = keys.clone();
        async move {
            round_trip(listen, &fmt, &keys[i % keys.len()], b"warm")
                .await
                .is_ok()
        }
    })
    .await;
    assert!(warm.iter().all(|ok| *ok), "warm-up connections failed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds0, rss0) = fds_and_rss(pid);

    // Membership changes every second while the connections run.
    let done = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let changer = {
        let (done, changes) = (done.clone(), changes.clone());
        let b5 = format!("{{\"addr\":\"{}\",\"weight\":1}}", fifth.local_addr());
        tokio::spawn(async move {
            let steps: [(&str, &str, &str); 4] = [
                ("PUT", "/backends/b5", &b5),
                ("POST", "/backends/b5/drain", ""),
                ("POST", "/backends/b5/undrain", ""),
                ("DELETE", "/backends/b5", ""),
            ];
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (method, path, body) = steps[i % steps.len()];
                let body = (!body.is_empty()).then_some(body);
                let (status, _) = http_request(admin_addr, method, path, body, None).await;
                assert!(matches!(status, 200 | 201), "{method} {path}: {status}");
                changes.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let results = run_bounded(CONNECTIONS, CONCURRENCY, |i| {
        let keys = keys.clone();
        async move {
            round_trip(listen, &fmt, &keys[i % keys.len()], b"soak")
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    done.store(true, Ordering::Relaxed);
    changer.await.expect("membership changes all answered 2xx");
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {CONNECTIONS} connections failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let changes = changes.load(Ordering::Relaxed);
    assert!(changes >= 3, "only {changes} membership changes ran");

    // Closed connections' sockets and pipes are released; give the workers a moment.
    let mut settled = fds_and_rss(pid);
    for _ in 0..50 {
        if settled.0 <= fds0 + 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        settled = fds_and_rss(pid);
    }
    let (fds1, rss1) = settled;
    eprintln!(
        "soak: {CONNECTIONS} connections, {changes} membership changes; fds {fds0} -> {fds1}, \
         RSS {rss0} KiB -> {rss1} KiB"
    );
    assert!(fds1 <= fds0 + 8, "fds grew from {fds0} to {fds1}");
    assert!(
        rss1 <= rss0 + rss0 / 2 + 8 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
}
