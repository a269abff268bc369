//! The demo backend: an echo server that says its name.
//!
//! On each connection it first writes its name and `\n`, then echoes every byte it receives
//! (the key header included, when the proxy forwards it), and half-closes when the client
//! does. Used by `shardproxy demo`, `shardproxy backend`, and the tests. Not on the proxy's
//! data path.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Echo buffer per connection.
const ECHO_BUF: usize = 64 * 1024;

/// A running echo backend.
pub struct EchoBackend {
    name: Arc<str>,
    local_addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl EchoBackend {
    /// Binds `addr` and starts serving on the current runtime.
    pub async fn start(addr: SocketAddr, name: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let name: Arc<str> = Arc::from(name);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_echo(
            listener,
            name.clone(),
            accepted.clone(),
            stop.clone(),
        ));
        Ok(EchoBackend {
            name,
            local_addr,
            accepted,
            stop,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The name it reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listener (new connections are refused) and every open connection.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run_echo(
    listener: TcpListener,
    name: Arc<str>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let Ok((stream, _)) = conn else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let name = name.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = echo(stream, &name) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Serves one connection: greeting, then echo until EOF, then FIN.
pub async fn echo(mut stream: TcpStream, name: &str) -> io::Result<u64> {
    let _ = stream.set_nodelay(true);
    let mut greeting = Vec::with_capacity(name.len() + 1);
    greeting.extend_from_slice(name.as_bytes());
    greeting.push(b'\n');
    stream.write_all(&greeting).await?;
    let mut buf = vec![0u8; ECHO_BUF];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    stream.shutdown().await?;
    Ok(total)
}
