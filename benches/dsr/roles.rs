//! The processes the DSR bench starts inside its network namespaces (re-execs of the bench
//! binary with a hidden role argument, run through `ip netns exec`):
//!
//! - [`APP`]: the application on the backend host. It listens on TCP (direct clients, the
//!   spliced proxy and the `--forward` agent connect there) and, optionally, on a Unix
//!   hand-off socket through [`shardproxy::dsr::Acceptor`] (the `--handoff-socket` agent passes
//!   each rebuilt connection's fd there). Every connection, however it arrived, starts with the
//!   key header (`[u16 BE len][key]`: the proxy forwards it, direct clients send it) and is
//!   served the same way, one thread per connection:
//!
//!   | key     | behaviour                                                                    |
//!   |---------|------------------------------------------------------------------------------|
//!   | `src:N` | write [`ID`], then N bytes of [`pattern`] (byte at offset o is `expected(o)`), FIN, read until the client's FIN |
//!   | `first` | write [`ID`], read until the client's FIN (the client closes first, so TIME_WAIT stays with the client and its port is not reused while the proxy may still steer that flow) |
//!
//! - [`BULK`]: one download (`src:N`), checked: the byte count, the whole first 4 MiB and three
//!   sampled bytes of every read against the pattern, and EOF right after. Prints
//!   `ok BYTES SECONDS`.
//! - [`SHORT`]: C threads opening short `first` connections (connect, header, read the first
//!   byte, close), either COUNT in all or for SECONDS. Prints the client-side connect→first
//!   byte latency summary.
//! - [`SCRAPE`]: an HTTP/1.0 GET of a local admin endpoint (the metrics live in the proxy's
//!   and the backend host's namespaces); prints the body.
//! - [`READ`]: prints a file (a namespace's `/sys/class/net/*/statistics/*`).
//!
//! Every role exits with status 1 and a message on stderr when anything is off, so a broken
//! transfer cannot pass for a fast one.

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use shardproxy::{HeaderFormat, Parse};

/// Role argument: the application.
pub const APP: &str = "__app";
/// Role argument: one checked bulk download.
pub const BULK: &str = "__bulk";
/// Role argument: short connections.
pub const SHORT: &str = "__short";
/// Role argument: HTTP GET of an admin endpoint.
pub const SCRAPE: &str = "__scrape";
/// Role argument: print a file.
pub const READ: &str = "__read";

/// The byte the application answers first.
pub const ID: u8 = b'A';
/// Size of the pattern buffer the application writes from.
const BUF: usize = 1 << 20;
/// Bytes of a download checked in full (the rest is sampled).
const FULL_CHECK: u64 = 4 << 20;
/// No read or write of any role blocks longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout of the clients.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The 1 MiB buffer the application writes from, again and again.
pub fn pattern() -> &'static [u8] {
    static SRC: OnceLock<Vec<u8>> = OnceLock::new();
    SRC.get_or_init(|| (0..BUF).map(|i| (i * 31 % 251) as u8).collect())
}

/// The byte at `offset` of a download (after [`ID`]).
pub fn expected(offset: u64) -> u8 {
    ((offset % BUF as u64) as usize * 31 % 251) as u8
}

/// The key header for `key`.
pub fn header(key: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(2 + key.len());
    h.extend_from_slice(&(key.len() as u16).to_be_bytes());
    h.extend_from_slice(key.as_bytes());
    h
}

/// Runs `role` with `args`; never returns.
pub fn run(role: &str, args: &[String]) -> ! {
    let result = match role {
        APP => app(args),
        BULK => bulk(args),
        SHORT => short(args),
        SCRAPE => scrape(args),
        READ => args
            .first()
            .ok_or_else(|| io::Error::other("usage: __read FILE"))
            .and_then(std::fs::read_to_string)
            .map(|s| print!("{s}")),
        _ => Err(io::Error::other(format!("unknown role {role}"))),
    };
    let _ = io::stdout().flush();
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{role}: {e}");
            std::process::exit(1)
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> io::Result<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other(format!("argument {} ({what}) missing or bad", i + 1)))
}

// ---------------------------------------------------------------------------------------
// Application
// ---------------------------------------------------------------------------------------

/// `__app LISTEN [HANDOFF_SOCKET]`: prints `ready` and serves until stdin closes.
fn app(args: &[String]) -> io::Result<()> {
    let listen: SocketAddr = arg(args, 0, "listen address")?;
    let listener = TcpListener::bind(listen)?;
    std::thread::spawn(move || loop {
        match listener.accept() {
            Ok((s, _)) => spawn_serve(s),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    });
    if let Some(path) = args.get(1).cloned() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let acceptor = match shardproxy::dsr::Acceptor::bind(&path) {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok((stream, _peer)) = acceptor.accept().await {
                    match stream
                        .into_std()
                        .and_then(|s| s.set_nonblocking(false).map(|()| s))
                    {
                        Ok(s) => spawn_serve(s),
                        Err(e) => eprintln!("app: a handed-off socket: {e}"),
                    }
                }
            });
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("hand-off acceptor thread died"))??;
    }
    println!("ready");
    io::stdout().flush()?;
    let mut line = String::new();
    while matches!(io::stdin().lock().read_line(&mut line), Ok(n) if n > 0) {
        line.clear();
    }
    Ok(())
}

fn spawn_serve(s: TcpStream) {
    let spawned = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            if let Err(e) = serve(s) {
                eprintln!("app: {e}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("app: cannot spawn a thread: {e}");
    }
}

fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT * 3))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let fmt = HeaderFormat::default();
    let mut head = [0u8; 512];
    let mut filled = 0;
    let key = loop {
        match fmt.parse(&head[..filled]) {
            Parse::Done { key, .. } => break String::from_utf8_lossy(key).into_owned(),
            Parse::Need(_) => {}
            Parse::Error(e) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
            }
        }
        if filled == head.len() {
            return Err(io::Error::other("header too long"));
        }
        let n = s.read(&mut head[filled..])?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
    };
    if key == "first" {
        s.write_all(&[ID])?;
        return drain(&mut s);
    }
    let total: u64 = key
        .strip_prefix("src:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unknown key {key:?}")))?;
    s.write_all(&[ID])?;
    let src = pattern();
    let mut left = total;
    while left > 0 {
        let n = left.min(src.len() as u64) as usize;
        s.write_all(&src[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    drain(&mut s)
}

fn drain(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// `__bulk ADDR BYTES DEADLINE_SECS`: prints `ok BYTES SECONDS` (connect to EOF).
fn bulk(args: &[String]) -> io::Result<()> {
    let addr: SocketAddr = arg(args, 0, "address")?;
    let total: u64 = arg(args, 1, "bytes")?;
    let deadline_s: f64 = arg(args, 2, "deadline")?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(deadline_s);
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(&header(&format!("src:{total}")))?;
    let mut id = [0u8; 1];
    s.read_exact(&mut id)?;
    if id[0] != ID {
        return Err(io::Error::other(format!(
            "first byte {:#04x}, not the id",
            id[0]
        )));
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut got: u64 = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if got < FULL_CHECK {
            for (i, b) in chunk.iter().enumerate() {
                check(got + i as u64, *b)?;
            }
        } else {
            for i in [0, n / 2, n - 1] {
                check(got + i as u64, chunk[i])?;
            }
        }
        got += n as u64;
        if got > total {
            return Err(io::Error::other(format!("{got} bytes, more than {total}")));
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "deadline of {deadline_s} s passed after {got} of {total} bytes"
            )));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if got != total {
        return Err(io::Error::other(format!(
            "EOF after {got} of {total} bytes"
        )));
    }
    println!("ok {got} {secs:.6}");
    Ok(())
}

fn check(offset: u64, b: u8) -> io::Result<()> {
    if b == expected(offset) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "byte {offset} is {b:#04x}, expected {:#04x}",
            expected(offset)
        )))
    }
}

/// `__short ADDR THREADS COUNT SECONDS [GAP_MS]`: COUNT connections in all (COUNT > 0) or as
/// many as fit in SECONDS, each thread pausing GAP_MS (default 0) after each connection. Prints `ok N errors E wall S p50_us P p99_us P max_us M` and, if any
/// failed, the first error on a second line.
fn short(args: &[String]) -> io::Result<()> {
    let addr: SocketAddr = arg(args, 0, "address")?;
    let threads: usize = arg(args, 1, "threads")?;
    let count: u64 = arg(args, 2, "count")?;
    let secs: f64 = arg(args, 3, "seconds")?;
    let gap = Duration::from_millis(if args.len() > 4 {
        arg(args, 4, "gap ms")?
    } else {
        0
    });
    let started = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(secs);
    let hdr = header("first");
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let (started, errors, first_error, hdr) = (
            started.clone(),
            errors.clone(),
            first_error.clone(),
            hdr.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            loop {
                let now = Instant::now();
                if now > until || (count > 0 && started.fetch_add(1, Ordering::SeqCst) >= count) {
                    break;
                }
                match one_short(&addr, &hdr) {
                    Ok(d) => {
                        lat.push(d.as_nanos() as u64);
                        std::thread::sleep(gap);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::SeqCst);
                        let mut f = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert_with(|| e.to_string());
                        // Do not spin on a dead target.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            lat
        }));
    }
    let mut lat: Vec<u64> = Vec::new();
    for h in handles {
        lat.extend(
            h.join()
                .map_err(|_| io::Error::other("client thread panicked"))?,
        );
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    println!(
        "ok {} errors {} wall {wall:.6} p50_us {:.1} p99_us {:.1} max_us {:.1}",
        lat.len(),
        errors.load(Ordering::SeqCst),
        q(0.50),
        q(0.99),
        q(1.0)
    );
    if let Some(e) = first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        println!("first_error {e}");
    }
    Ok(())
}

/// One short connection: connect, header, the first byte; the time connect→first byte.
fn one_short(addr: &SocketAddr, hdr: &[u8]) -> io::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(hdr)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let d = t0.elapsed();
    if b[0] != ID {
        return Err(io::Error::other(format!("first byte {:#04x}", b[0])));
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------
// Helpers run inside a namespace
// ---------------------------------------------------------------------------------------

/// `__scrape HOST:PORT PATH`: HTTP/1.0 GET; prints the body.
fn scrape(args: &[String]) -> io::Result<()> {
    let addr: SocketAddr = arg(args, 0, "address")?;
    let path = args.get(1).map_or("/metrics", String::as_str);
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header end"))?;
    let ok = head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200");
    if !ok {
        return Err(io::Error::other(format!(
            "bad response: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    print!("{body}");
    Ok(())
}
