//! Out of fds mid-connection: when a direction turns bulk and no splice pipe can be had, it
//! copies instead — every byte still arrives in order, and the fallback is counted.
//!
//! This file holds a single test because it lowers the fd limit of its whole process.

mod common;

use std::time::Duration;

use common::*;
use shardproxy::fixtures::client::read_name;
use shardproxy::HeaderFormat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Soft fd limit for this process during the test.
const LOW_LIMIT: u64 = 160;
/// Bytes sent each way once the fd table is full: in writes far above the 16 KiB at which a
/// direction switches to splicing.
const PAYLOAD: usize = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_without_pipes_copies_every_byte() {
    let backends = echo_backends(1).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let header = HeaderFormat::default().encode(b"no-pipes").unwrap();

    // Establish the connection while fds are plentiful; only small bytes have moved, so no
    // pipe has been opened yet.
    let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(&header).await.unwrap();
    assert_eq!(read_name(&mut rd).await.unwrap(), "b1");
    let mut echoed = vec![0u8; header.len()];
    rd.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, header);

    // Now take every fd: pipe2() in the proxy fails with EMFILE.
    let full = FullFdTable::fill(LOW_LIMIT);

    let writer = tokio::spawn(async move {
        let mut data = PrngStream::new(0xF0);
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < PAYLOAD {
            let n = buf.len().min(PAYLOAD - sent);
            data.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            sent += n;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let check = async {
        let mut expect = PrngStream::new(0xF0);
        let mut buf = vec![0u8; 256 * 1024];
        let mut want = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            expect.fill(&mut want[..n]);
            assert!(buf[..n] == want[..n], "echo differs near byte {got}");
            got += n;
        }
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(60), check)
        .await
        .expect("hang guard: the echo did not finish");
    let _wr = writer.await.unwrap().unwrap();

    drop(full);
    assert_eq!(got, PAYLOAD, "every byte comes back, then EOF");
    let fallbacks = metric(&proxy.metrics_text(), "shardproxy_splice_fallbacks_total");
    assert!(
        fallbacks >= 1.0,
        "no fallback was counted: the test did not take the no-pipe path"
    );
}
