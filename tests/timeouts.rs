//! The idle timeout: a connection where neither direction moves a byte for the limit is
//! closed and counted; one that keeps moving bytes in either direction is not.

mod common;

use std::time::Duration;

use common::*;
use shardproxy::fixtures::client::read_name;
use shardproxy::HeaderFormat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const IDLE: Duration = Duration::from_secs(1);
const GUARD: Duration = Duration::from_secs(30);

async fn connect(proxy: &shardproxy::ProxyHandle, key: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let header = HeaderFormat::default().encode(key).unwrap();
    s.write_all(&header).await.unwrap();
    let _name = read_name(&mut s).await.unwrap();
    let mut echoed = vec![0u8; header.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, header);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_and_counted() {
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |c| c.idle_timeout = Some(IDLE)).await;
    let mut s = connect(&proxy, b"sleepy").await;
    // Say nothing; the proxy must close us (EOF), not the guard.
    let mut byte = [0u8; 1];
    let n = timeout(GUARD, s.read(&mut byte))
        .await
        .expect("the idle connection was never closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected EOF from the idle timeout");
    let text = scrape(&proxy).await;
    assert_eq!(
        metric(
            &text,
            "shardproxy_connection_errors_total{reason=\"idle_timeout\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "shardproxy_connections_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connection_outlives_the_idle_timeout() {
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |c| c.idle_timeout = Some(IDLE)).await;
    let mut s = connect(&proxy, b"chatty").await;
    // A byte every 100 ms for 3 idle periods: never idle, never closed.
    for i in 0u8..30 {
        tokio::time::sleep(IDLE / 10).await;
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        timeout(GUARD, s.read_exact(&mut b))
            .await
            .expect("hang guard")
            .unwrap_or_else(|e| panic!("closed while busy after {i} round trips: {e}"));
        assert_eq!(b[0], i);
    }
    let text = scrape(&proxy).await;
    assert_eq!(
        metric(
            &text,
            "shardproxy_connection_errors_total{reason=\"idle_timeout\"}"
        ),
        0.0
    );
    assert_eq!(metric(&text, "shardproxy_connections_active"), 1.0);
}

/// Shutdown lets connections finish up to the drain deadline, then closes the rest and says
/// how many it cut; new connections are refused from the start of the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_what_is_left() {
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |c| {
        c.drain_timeout = Duration::from_millis(300)
    })
    .await;
    let addr = proxy.local_addr();
    let mut lingering = connect(&proxy, b"lingering").await;
    let cut = timeout(GUARD, proxy.shutdown())
        .await
        .expect("shutdown hung past the drain deadline");
    assert_eq!(cut, 1, "one connection was still open at the deadline");
    let mut byte = [0u8; 1];
    let n = timeout(GUARD, lingering.read(&mut byte))
        .await
        .expect("the cut connection was never closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the cut connection to be closed");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener still accepts after shutdown"
    );
}
