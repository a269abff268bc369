//! The harness's own backends: one process (a re-exec of the bench binary with the hidden
//! role argument `__backends N`) serving N listeners on 127.0.0.1, kept apart from the
//! client process so the idle scenario's fds are split between them.
//!
//! Each connection starts with the key header (`[u16 BE len][key]`, consumed here — the
//! proxies forward it, and "direct" clients send it too). The backend answers with one byte,
//! its index as ASCII (`'0' + i`), so the harness sees which backend got the key, then acts
//! on the key's mode:
//!
//! | key            | behaviour                                                          |
//! |----------------|--------------------------------------------------------------------|
//! | `src:N[:...]`  | write N bytes from a shared 1 MiB buffer, FIN, wait for the client's FIN |
//! | `echo[:...]`   | echo every byte until FIN (bytes after the header included), then FIN |
//! | `pingup[:...]` | count bytes until FIN while sending an 8-byte ping (its `CLOCK_MONOTONIC` send time, ns, LE) every 20 ms; then `u64::MAX` and the byte count (LE), FIN |
//! | `ping[:...]`   | read 64 bytes, answer the id and those bytes, close first          |
//! | `idle[:...]`   | park the socket (no thread, no reads) until `ctl:drop`             |
//! | `ctl:drop`     | close every parked socket in the process, answer one more byte `k` |
//!
//! Serving is plain blocking std I/O: a per-listener pool of threads that each `accept` and
//! then serve one connection to its end. A worker that takes a connection starts another when
//! no idle worker is left, and workers beyond a spare cap exit, so 32 concurrent short
//! connections reuse threads and a bulk transfer never waits for one.
//!
//! The process exits when its stdin reaches EOF (the harness holds the pipe), so it never
//! outlives the harness.

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use shardproxy::{HeaderFormat, Parse};

/// Hidden first argument that selects the backend role.
pub const ROLE_ARG: &str = "__backends";

/// Message size of `ping` mode.
const PING: usize = 64;
/// Write/echo buffer size.
const BUF: usize = 1 << 20;
/// Idle workers kept waiting in `accept` per listener at most; extra ones exit.
const MAX_SPARE: usize = 48;
/// Stack of a worker thread (they use heap buffers).
const STACK: usize = 256 * 1024;
/// A stuck peer cannot pin a worker forever.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Interval between two pings of `pingup` mode.
const PING_EVERY: Duration = Duration::from_millis(20);
/// What `pingup` mode sends before the byte count, instead of a ping's timestamp.
pub const PINGUP_END: u64 = u64::MAX;

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the machine, so a
/// timestamp the backends process writes can be compared with the client's reading.
pub fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Sockets of `idle` connections, across all listeners.
static PARKED: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

/// The shared source buffer of `src:` mode.
fn source_buf() -> &'static [u8] {
    static SRC: OnceLock<Vec<u8>> = OnceLock::new();
    SRC.get_or_init(|| (0..BUF).map(|i| (i * 31 % 251) as u8).collect())
}

/// Entry point of the backend role: `__backends N`. Prints `ready ADDR...` and serves until
/// stdin closes.
pub fn main(args: &[String]) -> ! {
    let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(3);
    let _ = shardproxy::proxy::sockopt::raise_fd_limit();
    let mut addrs = Vec::new();
    for i in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a backend listener");
        addrs.push(listener.local_addr().expect("local addr").to_string());
        let pool = Arc::new(Pool {
            listener,
            id: b'0' + i as u8,
            idle: AtomicUsize::new(0),
        });
        // Two idle workers to begin with; the pool grows on demand.
        spawn_worker(&pool);
        spawn_worker(&pool);
    }
    println!("ready {}", addrs.join(" "));
    let _ = io::stdout().flush();
    // Serve until the harness goes away (EOF or error on stdin).
    let mut line = String::new();
    let stdin = io::stdin();
    while matches!(stdin.lock().read_line(&mut line), Ok(n) if n > 0) {
        line.clear();
    }
    std::process::exit(0)
}

struct Pool {
    listener: TcpListener,
    /// ASCII byte this backend answers with.
    id: u8,
    /// Workers blocked in `accept`.
    idle: AtomicUsize,
}

fn spawn_worker(pool: &Arc<Pool>) {
    let pool = pool.clone();
    let spawned = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || worker(&pool));
    if let Err(e) = spawned {
        eprintln!("backend: cannot spawn a worker: {e}");
    }
}

fn worker(pool: &Arc<Pool>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        pool.idle.fetch_add(1, Ordering::SeqCst);
        let accepted = pool.listener.accept();
        let idle_now = pool.idle.fetch_sub(1, Ordering::SeqCst) - 1;
        if idle_now == 0 {
            spawn_worker(pool);
        }
        match accepted {
            Ok((stream, _)) => {
                if let Err(e) = serve(stream, pool.id, &mut buf) {
                    // Resets at the end of a run (a proxy killed) are expected; stay quiet
                    // unless asked.
                    if std::env::var_os("E2E_BACKEND_DEBUG").is_some() {
                        eprintln!("backend {}: {e}", pool.id as char);
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
        if pool.idle.load(Ordering::SeqCst) >= MAX_SPARE {
            return;
        }
        if buf.capacity() > 64 * 1024 && pool.idle.load(Ordering::SeqCst) > 8 {
            // Do not keep 1 MiB per parked worker.
            buf = Vec::new();
        }
    }
}

fn serve(mut s: TcpStream, id: u8, buf: &mut Vec<u8>) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    // Read the header (and whatever arrived with it).
    let fmt = HeaderFormat::default();
    let mut head = [0u8; 2048];
    let mut filled = 0;
    let (key, consumed) = loop {
        match fmt.parse(&head[..filled]) {
            Parse::Done { key, consumed } => break (key.to_vec(), consumed),
            Parse::Need(_) => {}
            Parse::Error(e) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
            }
        }
        let n = s.read(&mut head[filled..])?;
        if n == 0 {
            return Ok(()); // a readiness probe
        }
        filled += n;
    };
    let key = String::from_utf8_lossy(&key).into_owned();
    let rest = &head[consumed..filled];
    let mode = key.split(':').next().unwrap_or("");
    match mode {
        "src" => {
            let total: u64 = key
                .split(':')
                .nth(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad src key"))?;
            s.write_all(&[id])?;
            let src = source_buf();
            let mut left = total;
            while left > 0 {
                let n = left.min(src.len() as u64) as usize;
                s.write_all(&src[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            drain(&mut s, buf)
        }
        "echo" => {
            // The id and any early payload in one segment.
            let mut first = Vec::with_capacity(1 + rest.len());
            first.push(id);
            first.extend_from_slice(rest);
            s.write_all(&first)?;
            if buf.len() < BUF {
                buf.resize(BUF, 0);
            }
            loop {
                let n = s.read(buf)?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n])?;
            }
            s.shutdown(Shutdown::Write)
        }
        "pingup" => {
            s.write_all(&[id])?;
            let pinger = s.try_clone()?;
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let pings = std::thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || ping_every(pinger, &stop2))?;
            if buf.len() < BUF {
                buf.resize(BUF, 0);
            }
            let mut count = rest.len() as u64;
            let read = loop {
                match s.read(buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => count += n as u64,
                    Err(e) => break Err(e),
                }
            };
            stop.store(true, Ordering::SeqCst);
            let pinged = pings
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("pinger panicked")));
            read?;
            pinged?;
            let mut end = [0u8; 16];
            end[..8].copy_from_slice(&PINGUP_END.to_le_bytes());
            end[8..].copy_from_slice(&count.to_le_bytes());
            s.write_all(&end)?;
            s.shutdown(Shutdown::Write)?;
            drain(&mut s, buf)
        }
        "ping" => {
            // One 64-byte echo, then this side closes first, so TIME_WAIT stays on the
            // server side of every connection and no client or proxy ephemeral port piles up.
            let mut reply = [0u8; 1 + PING];
            reply[0] = id;
            let early = rest.len().min(PING);
            reply[1..1 + early].copy_from_slice(&rest[..early]);
            s.read_exact(&mut reply[1 + early..])?;
            s.write_all(&reply)?;
            Ok(())
        }
        "idle" => {
            s.write_all(&[id])?;
            s.set_read_timeout(None)?;
            PARKED.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            Ok(())
        }
        "ctl" if key == "ctl:drop" => {
            let parked = std::mem::take(&mut *PARKED.lock().unwrap_or_else(|p| p.into_inner()));
            drop(parked);
            s.write_all(&[id, b'k'])?;
            s.shutdown(Shutdown::Write)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown key mode {key:?}"),
        )),
    }
}

/// `pingup`'s pinger: every 20 ms (missed ticks skipped, not bunched up) its send time.
fn ping_every(mut s: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    let mut next = Instant::now() + PING_EVERY;
    loop {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        s.write_all(&mono_ns().to_le_bytes())?;
        let now = Instant::now();
        while next <= now {
            next += PING_EVERY;
        }
    }
}

/// Reads until EOF (after our FIN, wait for the client's, so the client closes first).
fn drain(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.len() < 64 * 1024 {
        buf.resize(64 * 1024, 0);
    }
    while s.read(buf)? > 0 {}
    Ok(())
}
