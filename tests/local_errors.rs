//! The proxy's own shortages are not a backend's fault: when `socket()` for the backend
//! connection fails with EMFILE, the client is closed and the error counted as the proxy's
//! (`reason="local_resources"`); no backend is counted as failing and the key does not fail
//! over to its second choice (which would misroute it while its owner is healthy).
//!
//! This file holds a single test because it lowers the fd limit of its whole process.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use shardproxy::HeaderFormat;

/// Soft fd limit for this process during the test.
const LOW_LIMIT: u64 = 160;

#[tokio::test]
async fn emfile_on_backend_socket_is_the_proxys_error() {
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let header = HeaderFormat::default().encode(b"user:1").expect("key");

    // A blocking client: connecting and sending do not yield, so the proxy (on this same
    // single-threaded runtime) accepts only once the fd table is full but for one fd.
    let mut client = std::net::TcpStream::connect(proxy.local_addr()).expect("connect");
    client.write_all(&header).expect("header");
    let mut full = FullFdTable::fill(LOW_LIMIT);
    full.free_one(); // for the proxy's accept; its backend socket() then meets EMFILE
    let local = "shardproxy_connection_errors_total{reason=\"local_resources\"}";
    let mut seen = 0.0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        seen = metric(&proxy.metrics_text(), local);
        if seen >= 1.0 {
            break;
        }
    }
    drop(full);

    let text = proxy.metrics_text();
    assert_eq!(
        seen, 1.0,
        "the shortage was not counted as the proxy's:\n{text}"
    );
    for b in ["b1", "b2", "b3"] {
        for reason in ["refused", "timeout", "other"] {
            let sample = format!(
                "shardproxy_backend_connect_failures_total{{backend=\"{b}\",reason=\"{reason}\"}}"
            );
            assert_eq!(
                metric(&text, &sample),
                0.0,
                "{b} blamed ({reason}):\n{text}"
            );
        }
        let failovers = format!("shardproxy_failovers_total{{backend=\"{b}\"}}");
        assert_eq!(
            metric(&text, &failovers),
            0.0,
            "{b}: key failed over:\n{text}"
        );
    }
    assert_eq!(
        metric(
            &text,
            "shardproxy_connection_errors_total{reason=\"connect_failed\"}"
        ),
        0.0
    );
    // The client is closed, not left hanging.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the client was not closed: {other:?}"),
    }
}
