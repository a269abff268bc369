//! Splice pipes are budgeted with the connections: under a 512-fd limit, 140 stalled bulk
//! downloads (each wanting a pipe) must not fill the fd table. Over the pipe budget a bulk
//! direction copies instead (counted), accept never meets EMFILE, and a good client is
//! served at once. Before the budget, pipes took the fds that accept needed.
//!
//! The proxy runs as its own process (`ulimit -n 512`), so this test's sockets do not count
//! against its fd limit.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{any_port, http_get, metric};
use shardproxy::fixtures::client::round_trip;
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::{HeaderFormat, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Downloads held open at once.
const STALLED: usize = 140;

/// The proxy process; killed (by PID) when dropped.
struct Proxy {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(backends: &[String]) -> Proxy {
    let mut args = vec![
        "run".to_string(),
        "--listen=127.0.0.1:0".into(),
        "--admin=127.0.0.1:0".into(),
        "--workers=1".into(),
    ];
    args.extend(backends.iter().map(|b| format!("--backend={b}")));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 512 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_shardproxy"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    // `listening on ADDR admin ADDR`
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 5, "ready line: {line:?}");
    Proxy {
        child,
        listen: words[2].parse().expect("listen addr"),
        admin: words[4].parse().expect("admin addr"),
    }
}

/// A backend that answers every connection with an endless stream (bounded: 256 MiB).
async fn streaming_backend() -> SocketAddr {
    let l = TcpListener::bind(any_port()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5Au8; 64 * 1024];
                for _ in 0..4096 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_never_crowd_out_accept() {
    let bulk = streaming_backend().await;
    let echo = EchoBackend::start(any_port(), "echo").await.expect("echo");
    let proxy = start_proxy(&[
        format!("bulk={bulk}"),
        format!("echo={}", echo.local_addr()),
    ]);
    let router = Router::new([("bulk", 1), ("echo", 1)]).expect("router");
    let keys_of = |owner: &'static str, n: usize| -> Vec<Vec<u8>> {
        (0..)
            .map(|i| format!("key:{i}").into_bytes())
            .filter(|k| router.rank_names(k)[0] == owner)
            .take(n)
            .collect()
    };
    let fmt = HeaderFormat::default();

    // Stalled downloads: each reads one byte (so its bytes flow), then never again.
    let mut held = Vec::new();
    for key in keys_of("bulk", STALLED) {
        let mut c = TcpStream::connect(proxy.listen).await.expect("connect");
        c.write_all(&fmt.encode(&key).expect("key"))
            .await
            .expect("header");
        let mut first = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut first))
            .await
            .expect("download starts")
            .expect("read");
        held.push(c);
    }
    // Let every proxied download fill its buffers and stall on its client.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let key = keys_of("echo", 1).remove(0);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        round_trip(proxy.listen, &fmt, &key, b"still served"),
    )
    .await
    .expect("a good client is served promptly while bulk downloads hold their pipes")
    .expect("round trip");
    assert_eq!(reply.backend, "echo");

    let (status, text) = http_get(proxy.admin, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        metric(
            &text,
            "shardproxy_accept_errors_total{reason=\"fd_exhausted\"}"
        ),
        0.0,
        "accept met a full fd table:\n{text}"
    );
    assert!(
        metric(&text, "shardproxy_splice_fallbacks_total") >= 1.0,
        "no download was refused a pipe; the test did not reach the budget:\n{text}"
    );
    let fds = metric(&text, "shardproxy_open_fds");
    assert!(fds < 512.0, "{fds} fds open under a limit of 512");
    drop(held);
}
