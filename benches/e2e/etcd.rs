//! A real etcd for the `shardproxy-churn` target: one member on free 127.0.0.1 ports for the
//! whole harness run, its data directory and log in the scratch folder, registered with the
//! kill-on-exit table of [`crate::procs`].
//!
//! The harness talks to it through etcd's v3 JSON gateway (plain HTTP/1.1 on the client
//! port: `POST /v3/kv/put`, `POST /v3/kv/deleterange`, keys and values in base64) with a tiny
//! blocking client, so it needs neither `etcdctl` nor a gRPC stack. Every request is bounded
//! by [`HTTP_TIMEOUT`].
//!
//! Layout (`docs/design.md` §9): `/bench/backends/NAME` = `{"addr":"HOST:PORT","weight":N}`.
//! [`Etcd::seed`] writes `b1..bN` with the addresses plain shardproxy gets as `--backend`
//! flags, so both route alike. [`churn`] is the thread that, once a second, puts and deletes
//! `/bench/backends/churn` (weight 0: it takes no keys, but every change is a full membership
//! update in the proxy).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::procs::{self, Backends, Guard};

/// The membership prefix the churn target's shardproxy follows.
pub const PREFIX: &str = "/bench";
/// The backend the churn thread adds and removes.
pub const CHURN_NAME: &str = "churn";
/// Its value: weight 0 takes no keys, so the benchmark's routing does not change.
pub const CHURN_VALUE: &str = r#"{"addr":"127.0.0.1:1","weight":0}"#;
/// Time between two membership changes.
pub const CHURN_PERIOD: Duration = Duration::from_secs(1);
/// Delay from the proxy's ready line to the first change.
pub const CHURN_FIRST: Duration = Duration::from_millis(500);
/// How long etcd has to answer after being started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect, read and write timeout of one gateway or admin request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// The harness's etcd member.
pub struct Etcd {
    /// Client URL's address (`http://ADDR`).
    pub client: SocketAddr,
    /// The revision of the last write the harness made (a put, or a delete of a present key).
    last_rev: AtomicI64,
    guard: Guard,
}

impl Etcd {
    /// Whether `etcd` runs at all (`etcd --version`).
    pub fn available() -> bool {
        Command::new("etcd")
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts `etcd --name bench` on two free loopback ports with its data directory and log
    /// under `scratch`, and waits (bounded) until it answers `GET /health`.
    pub fn start(scratch: &Path) -> io::Result<Self> {
        // Held together while chosen, so the two ports differ.
        let held = [
            std::net::TcpListener::bind("127.0.0.1:0")?,
            std::net::TcpListener::bind("127.0.0.1:0")?,
        ];
        let client = held[0].local_addr()?;
        let peer = held[1].local_addr()?;
        drop(held);
        let data = scratch.join("etcd-data");
        let log = scratch.join("etcd.log");
        let client_url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let child = Command::new("etcd")
            .arg("--name")
            .arg("bench")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("bench={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log)?,
            ))
            .spawn()?;
        let guard = Guard::register(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = guard.exited() {
                return Err(procs::with_log(
                    io::Error::other(format!("etcd exited at start ({status})")),
                    &log,
                ));
            }
            match http(client, "GET", "/health", None) {
                Ok((200, body)) if body.contains("true") => break,
                _ if Instant::now() >= deadline => {
                    return Err(procs::with_log(
                        io::Error::other(format!(
                            "etcd did not answer GET /health on {client} within \
                             {START_TIMEOUT:?}"
                        )),
                        &log,
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Ok(Etcd {
            client,
            last_rev: AtomicI64::new(0),
            guard,
        })
    }

    /// etcd's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// `etcd://ADDR/bench`, for `shardproxy run --membership`.
    pub fn url(&self) -> String {
        format!("etcd://{}{PREFIX}", self.client)
    }

    /// A client for the churn thread.
    pub fn client(&self) -> Client {
        Client { addr: self.client }
    }

    /// The revision of the last write through [`Etcd::put`] / [`Etcd::delete`] or a churn
    /// run (recorded with [`Etcd::wrote`]).
    pub fn last_revision(&self) -> i64 {
        self.last_rev.load(Ordering::Relaxed)
    }

    /// Records a write made elsewhere (the churn thread).
    pub fn wrote(&self, revision: i64) {
        self.last_rev.fetch_max(revision, Ordering::Relaxed);
    }

    /// Puts `PREFIX/backends/NAME` = `value`; returns the revision of the write.
    pub fn put(&self, name: &str, value: &str) -> io::Result<i64> {
        let rev = self.client().put(name, value)?;
        self.wrote(rev);
        Ok(rev)
    }

    /// Deletes `PREFIX/backends/NAME`; returns the store revision after it.
    pub fn delete(&self, name: &str) -> io::Result<i64> {
        let rev = self.client().delete(name)?;
        self.wrote(rev);
        Ok(rev)
    }

    /// Writes `b1..bN` = `{"addr":"ADDR","weight":1}`: the names and addresses plain
    /// shardproxy gets as `--backend NAME=ADDR`.
    pub fn seed(&self, backends: &Backends) -> io::Result<()> {
        for (name, addr) in backends.names().iter().zip(&backends.addrs) {
            self.put(name, &format!(r#"{{"addr":"{addr}","weight":1}}"#))?;
        }
        Ok(())
    }
}

/// A gateway client (just the address: each request is its own connection).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    addr: SocketAddr,
}

impl Client {
    /// Puts `PREFIX/backends/NAME` = `value`; returns the revision of the write.
    pub fn put(&self, name: &str, value: &str) -> io::Result<i64> {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            base64(backend_key(name).as_bytes()),
            base64(value.as_bytes())
        );
        self.call("/v3/kv/put", &body)
    }

    /// Deletes `PREFIX/backends/NAME`; returns the store revision after it.
    pub fn delete(&self, name: &str) -> io::Result<i64> {
        let body = format!(r#"{{"key":"{}"}}"#, base64(backend_key(name).as_bytes()));
        self.call("/v3/kv/deleterange", &body)
    }

    /// POSTs `body` to `path`; returns the answer's `header.revision`.
    fn call(&self, path: &str, body: &str) -> io::Result<i64> {
        let (status, answer) = http(self.addr, "POST", path, Some(body))?;
        if status != 200 {
            return Err(io::Error::other(format!(
                "etcd {path}: HTTP {status}: {}",
                answer.trim()
            )));
        }
        let v: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|e| io::Error::other(format!("etcd {path}: {e} in {answer:?}")))?;
        json_i64(&v["header"]["revision"])
            .ok_or_else(|| io::Error::other(format!("etcd {path}: no header.revision in {answer}")))
    }
}

/// `PREFIX/backends/NAME`.
fn backend_key(name: &str) -> String {
    format!("{PREFIX}/backends/{name}")
}

/// An integer given as a JSON number or as a string (the gateway's int64s are strings).
pub fn json_i64(v: &serde_json::Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// What one churn thread did.
#[derive(Debug, Clone, Default)]
pub struct ChurnOutcome {
    /// Membership changes made (puts plus deletes).
    pub changes: u64,
    /// The revision of the last change, if any.
    pub last_rev: Option<i64>,
    /// Whether the churn backend is present at the end (an odd number of changes).
    pub present: bool,
    /// The first failed write, which ended the thread.
    pub error: Option<String>,
}

/// A running churn thread: dropping it without [`Churn::stop`] leaves it to stop at its next
/// tick.
pub struct Churn {
    stop: mpsc::Sender<()>,
    done: mpsc::Receiver<ChurnOutcome>,
}

/// Starts the churn thread: [`CHURN_FIRST`] from now, then every [`CHURN_PERIOD`] (on a fixed
/// schedule), alternately puts and deletes `PREFIX/backends/churn`, until [`Churn::stop`].
pub fn churn(client: Client) -> io::Result<Churn> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("churn".into())
        .spawn(move || {
            let mut out = ChurnOutcome::default();
            let mut next = Instant::now() + CHURN_FIRST;
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                match stop_rx.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // Stopped, or the harness side is gone.
                    _ => break,
                }
                let r = if out.present {
                    client.delete(CHURN_NAME)
                } else {
                    client.put(CHURN_NAME, CHURN_VALUE)
                };
                match r {
                    Ok(rev) => {
                        out.changes += 1;
                        out.last_rev = Some(rev);
                        out.present = !out.present;
                    }
                    Err(e) => {
                        out.error = Some(format!("churn change {}: {e}", out.changes + 1));
                        break;
                    }
                }
                next += CHURN_PERIOD;
            }
            let _ = done_tx.send(out);
        })?;
    Ok(Churn {
        stop: stop_tx,
        done: done_rx,
    })
}

impl Churn {
    /// Stops the thread and returns what it did; waits at most one request's time (plus a
    /// margin) for a change in flight.
    pub fn stop(self) -> Result<ChurnOutcome, String> {
        let _ = self.stop.send(());
        let bound = HTTP_TIMEOUT * 2 + Duration::from_secs(1);
        self.done
            .recv_timeout(bound)
            .map_err(|_| format!("the churn thread did not stop within {bound:?}"))
    }
}

/// Polls `GET /membership` on the proxy's admin address (bounded by `within`) until its
/// `revision` equals `want`. Returns the last revision seen on failure.
pub fn wait_followed(admin: SocketAddr, want: i64, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let last = match http(admin, "GET", "/membership", None) {
            Ok((200, body)) => {
                let v: Option<serde_json::Value> = serde_json::from_str(&body).ok();
                match v.as_ref().and_then(|v| json_i64(&v["revision"])) {
                    Some(rev) if rev == want => return Ok(()),
                    Some(rev) => format!("revision {rev}"),
                    None => format!("no revision in {body:?}"),
                }
            }
            Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "the proxy did not follow etcd within {within:?}: the last write is revision \
                 {want}, GET /membership says {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request (`Connection: close`); returns the status and the body (chunked
/// bodies decoded).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("{method} {path}: no HTTP header end")))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{method} {path}: bad status line")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes a chunked body (`SIZE\r\nDATA\r\n` ... `0\r\n\r\n`).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        let (Some(data), Some(after)) = (rest.get(..size), rest.get(size..)) else {
            break;
        };
        if size == 0 {
            break;
        }
        out.push_str(data);
        s = after.strip_prefix("\r\n").unwrap_or(after);
    }
    out
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
