//! fd exhaustion: when `accept` fails with EMFILE the proxy pauses accepting with backoff —
//! it neither spins nor crashes — counts it, and serves again once fds are free.
//!
//! This file holds a single test because it lowers the fd limit of its whole process.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::resource::{getrusage, UsageWho};
use shardproxy::fixtures::client::round_trip;
use shardproxy::HeaderFormat;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Soft fd limit for this process during the test.
const LOW_LIMIT: u64 = 160;

fn cpu_seconds() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_pauses_accept_then_recovers() {
    let backends = echo_backends(1).await;
    // Started before the limit drops, so `max_connections` is not lowered to fit it and the
    // accept loop, not the connection cap, meets the full fd table.
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let fmt = HeaderFormat::default();

    // Fill the process's fd table with placeholders, then trade one for a client socket:
    // the client connects (the kernel completes the handshake into the backlog) and the
    // proxy's accept() has no fd left for it.
    let mut full = FullFdTable::fill(LOW_LIMIT);
    full.free_one();
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect with the one free fd");
    let _ = client.write_all(b"\x00").await;

    // Give the accept loop time to hit EMFILE, then measure what it burns meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burned = cpu_seconds() - before;

    // Free the fds; the proxy must recover by itself.
    drop(full);
    let text = scrape(&proxy).await;
    let exhausted = metric(
        &text,
        "shardproxy_accept_errors_total{reason=\"fd_exhausted\"}",
    );
    assert!(
        exhausted >= 1.0,
        "accept never hit EMFILE; the test did not exercise the path:\n{text}"
    );
    // A spinning accept loop burns a whole core (~1 s of CPU per second); backoff sleeps.
    assert!(
        burned < 0.5,
        "{burned:.2} s of CPU in 1 s while fds were exhausted: accept is spinning"
    );
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        round_trip(proxy.local_addr(), &fmt, b"after", b"recovered"),
    )
    .await
    .expect("hang guard")
    .expect("the proxy serves again once fds are free");
    assert_eq!(reply.backend, "b1");
    drop(client);
}
