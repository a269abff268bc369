//! The client side of each scenario: plain blocking std sockets on threads (no async
//! runtime in the measured path), identical for every target. A [`Route`] says where a key's
//! connection goes: the proxy, or — for "direct" — the backend `shardproxy::Router` picks.
//!
//! Every scenario verifies what it receives (byte counts; echo content against the pattern
//! sent; request/response equality) and records which backend answered each key, so the
//! harness can check that every key lands on the same backend every time.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use shardproxy::{HeaderFormat, Router};

use crate::backend::{mono_ns, PINGUP_END};
use crate::procs::{fd_count, proc_stat};

/// Client socket read/write timeout: a stuck run fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Client receive buffer for bulk reads.
const BULK_BUF: usize = 1 << 20;
/// Request/response size of rr and cps.
const MSG: usize = 64;
/// Distinct keys the cps clients cycle through (each one is reused many times).
const CPS_KEYS: usize = 256;

/// The scenarios, in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// One connection, backend → client bulk.
    Bulk1,
    /// One connection, echo both ways.
    Echo1,
    /// One connection: the client uploads flat out, the backend pings every 20 ms.
    Pingup,
    /// 32 persistent connections, 64-byte request/response.
    Rr32,
    /// 1 persistent connection, 64-byte request/response.
    Rr1,
    /// 32 concurrent clients: connect, header, one 64-byte echo, close.
    Cps32,
    /// Established idle connections held through the proxy.
    Idle,
}

impl Scenario {
    /// All scenarios, in run order.
    pub const ALL: [Scenario; 7] = [
        Scenario::Bulk1,
        Scenario::Echo1,
        Scenario::Pingup,
        Scenario::Rr32,
        Scenario::Rr1,
        Scenario::Cps32,
        Scenario::Idle,
    ];

    /// Name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk1",
            Scenario::Echo1 => "echo1",
            Scenario::Pingup => "pingup",
            Scenario::Rr32 => "rr32",
            Scenario::Rr1 => "rr1",
            Scenario::Cps32 => "cps32",
            Scenario::Idle => "idle",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Unit of the headline figure.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "GiB/s",
            Scenario::Echo1 => "GiB/s each way",
            Scenario::Pingup => "GiB/s up",
            Scenario::Rr32 | Scenario::Rr1 => "req/s",
            Scenario::Cps32 => "conn/s",
            Scenario::Idle => "conn/s setup",
        }
    }
}

/// Sizes and durations.
#[derive(Debug, Clone)]
pub struct Settings {
    /// bulk1 bytes.
    pub bulk_bytes: u64,
    /// echo1 bytes each way.
    pub echo_bytes: u64,
    /// rr32/rr1/cps32 measured window.
    pub duration: Duration,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// pingup upload time.
    pub pingup: Duration,
    /// idle connections.
    pub idle_conns: usize,
}

/// Where connections go.
pub enum Route<'a> {
    /// Straight to the backend the router picks for the key.
    Direct {
        /// The same router shardproxy builds (names b1.., weight 1).
        router: &'a Router,
        /// Backend addresses by router index.
        addrs: &'a [SocketAddr],
    },
    /// Through a proxy, with its pid for `/proc` readings.
    Proxy {
        /// Listen address.
        addr: SocketAddr,
        /// Process id.
        pid: u32,
    },
}

impl Route<'_> {
    fn addr(&self, key: &str) -> SocketAddr {
        match self {
            Route::Direct { router, addrs } => {
                addrs[router.pick(key.as_bytes()).expect("a backend takes keys")]
            }
            Route::Proxy { addr, .. } => *addr,
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Route::Direct { .. } => None,
            Route::Proxy { pid, .. } => Some(*pid),
        }
    }

    fn cpu(&self) -> f64 {
        self.pid()
            .and_then(|p| proc_stat(p).ok())
            .map_or(0.0, |s| s.cpu_s)
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Headline figure in the scenario's unit.
    pub figure: f64,
    /// Latency percentiles, µs (p50, p99, p99.9), for rr and cps.
    pub lat_us: Option<[f64; 3]>,
    /// pingup: delay of the backend's pings (send → receive), µs: p50, p99, max.
    pub ping_us: Option<[f64; 3]>,
    /// Proxy CPU seconds over the measured window.
    pub cpu_s: Option<f64>,
    /// Bytes the proxy forwarded (both directions) in the window.
    pub bytes: u64,
    /// Requests or connections completed in the window.
    pub ops: u64,
    /// idle: proxy RSS growth per connection, bytes.
    pub rss_per_conn: Option<f64>,
    /// idle: proxy fds per connection.
    pub fds_per_conn: Option<f64>,
    /// Which backend (ASCII index) answered each key.
    pub seen: HashMap<String, u8>,
    /// Keys that answered from two backends within this run.
    pub conflicts: Vec<String>,
}

impl Measured {
    fn observe(&mut self, key: &str, id: u8) {
        match self.seen.get(key) {
            Some(&prev) if prev != id => self.conflicts.push(format!(
                "{key}: backend {} then {}",
                prev as char, id as char
            )),
            Some(_) => {}
            None => {
                self.seen.insert(key.to_string(), id);
            }
        }
    }
}

/// Runs one scenario against one route. `ctl` is a backend address for control requests.
pub fn run(
    scenario: Scenario,
    route: &Route<'_>,
    s: &Settings,
    ctl: SocketAddr,
) -> io::Result<Measured> {
    match scenario {
        Scenario::Bulk1 => bulk1(route, s.bulk_bytes),
        Scenario::Echo1 => echo1(route, s.echo_bytes),
        Scenario::Pingup => pingup(route, s.pingup),
        Scenario::Rr32 => rr(route, 32, s),
        Scenario::Rr1 => rr(route, 1, s),
        Scenario::Cps32 => cps(route, 32, s),
        Scenario::Idle => idle(route, s.idle_conns, ctl),
    }
}

fn header(key: &str) -> Vec<u8> {
    HeaderFormat::default()
        .encode(key.as_bytes())
        .expect("harness keys are valid")
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_id(s: &mut TcpStream) -> io::Result<u8> {
    let mut id = [0u8; 1];
    s.read_exact(&mut id)?;
    Ok(id[0])
}

const GIB: f64 = (1u64 << 30) as f64;

/// One connection; the backend sends `bytes`; the client counts them.
fn bulk1(route: &Route<'_>, bytes: u64) -> io::Result<Measured> {
    let key = format!("src:{bytes}");
    let mut buf = vec![0u8; BULK_BUF];
    let cpu0 = route.cpu();
    let t0 = Instant::now();
    let mut s = connect(route.addr(&key))?;
    s.write_all(&header(&key))?;
    let id = read_id(&mut s)?;
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got > bytes {
            return Err(bad(format!("bulk1: more than {bytes} bytes")));
        }
    }
    let elapsed = t0.elapsed();
    let cpu1 = route.cpu();
    drop(s);
    if got != bytes {
        return Err(bad(format!("bulk1: got {got} of {bytes} bytes")));
    }
    let mut m = Measured {
        figure: bytes as f64 / GIB / elapsed.as_secs_f64(),
        cpu_s: route.pid().map(|_| cpu1 - cpu0),
        bytes,
        ops: 1,
        ..Default::default()
    };
    m.observe(&key, id);
    Ok(m)
}

/// The echo1 pattern: period P (not a power of two), stored twice so any chunk up to P bytes
/// at any offset is one contiguous slice.
struct Pattern {
    period: usize,
    twice: Vec<u8>,
}

impl Pattern {
    fn new() -> Self {
        let period = BULK_BUF + 4093;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let one: Vec<u8> = (0..period)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut twice = one.clone();
        twice.extend_from_slice(&one);
        Pattern { period, twice }
    }

    fn at(&self, pos: u64, len: usize) -> &[u8] {
        let off = (pos % self.period as u64) as usize;
        &self.twice[off..off + len]
    }
}

fn pattern() -> &'static Pattern {
    static P: OnceLock<Pattern> = OnceLock::new();
    P.get_or_init(Pattern::new)
}

/// One connection; the client sends `bytes` of pattern while reading the echo back and
/// comparing every byte.
fn echo1(route: &Route<'_>, bytes: u64) -> io::Result<Measured> {
    let key = "echo:bulk".to_string();
    let pat = pattern();
    let mut buf = vec![0u8; BULK_BUF];
    let cpu0 = route.cpu();
    let t0 = Instant::now();
    let mut s = connect(route.addr(&key))?;
    s.write_all(&header(&key))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let mut pos = 0u64;
        while pos < bytes {
            let n = (bytes - pos).min(BULK_BUF as u64) as usize;
            w.write_all(pat.at(pos, n))?;
            pos += n as u64;
        }
        w.shutdown(Shutdown::Write)
    });
    let id = read_id(&mut s);
    let mut got = 0u64;
    let read = id.and_then(|id| {
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if got + n as u64 > bytes {
                return Err(bad(format!("echo1: more than {bytes} bytes")));
            }
            if buf[..n] != *pat.at(got, n) {
                return Err(bad(format!("echo1: content differs near byte {got}")));
            }
            got += n as u64;
        }
        Ok(id)
    });
    if read.is_err() {
        let _ = s.shutdown(Shutdown::Both); // unblock the writer
    }
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("echo1 writer panicked")));
    let elapsed = t0.elapsed();
    let cpu1 = route.cpu();
    let id = read?;
    wrote?;
    if got != bytes {
        return Err(bad(format!("echo1: got {got} of {bytes} bytes back")));
    }
    let mut m = Measured {
        figure: bytes as f64 / GIB / elapsed.as_secs_f64(),
        cpu_s: route.pid().map(|_| cpu1 - cpu0),
        bytes: 2 * bytes,
        ops: 1,
        ..Default::default()
    };
    m.observe(&key, id);
    Ok(m)
}

/// Upload write size of pingup.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// One connection for `upload`: the client writes as fast as it can while the backend
/// (`pingup` mode) writes an 8-byte ping carrying its `CLOCK_MONOTONIC` send time every
/// 20 ms; a reader thread stamps each ping on arrival. Only pings sent while the upload ran
/// count. At the client's FIN the backend answers with the byte count it received, which must
/// match. Figure: uploaded GiB/s (until the backend confirmed the count).
fn pingup(route: &Route<'_>, upload: Duration) -> io::Result<Measured> {
    let key = "pingup:up".to_string();
    let cpu0 = route.cpu();
    let mut s = connect(route.addr(&key))?;
    s.write_all(&header(&key))?;
    let mut w = s.try_clone()?;
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || -> io::Result<(u64, u64)> {
        let chunk = vec![0x5Au8; UPLOAD_CHUNK];
        let deadline = Instant::now() + upload;
        let mut sent = 0u64;
        while Instant::now() < deadline {
            w.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        let end = mono_ns();
        w.shutdown(Shutdown::Write)?;
        Ok((sent, end))
    });
    let mut pings: Vec<(u64, u64)> = Vec::with_capacity(1024);
    let read = read_id(&mut s).and_then(|id| {
        let mut word = [0u8; 8];
        loop {
            s.read_exact(&mut word)?;
            let at = mono_ns();
            let v = u64::from_le_bytes(word);
            if v == PINGUP_END {
                break;
            }
            pings.push((v, at));
        }
        s.read_exact(&mut word)?;
        let done = t0.elapsed();
        let mut extra = [0u8; 1];
        if s.read(&mut extra)? != 0 {
            return Err(bad("pingup: bytes after the count".into()));
        }
        Ok((id, u64::from_le_bytes(word), done))
    });
    if read.is_err() {
        let _ = s.shutdown(Shutdown::Both); // unblock the writer
    }
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("pingup writer panicked")));
    let cpu1 = route.cpu();
    let (id, count, done) = read?;
    let (sent, end_ns) = wrote?;
    if count != sent {
        return Err(bad(format!(
            "pingup: backend received {count} of {sent} bytes"
        )));
    }
    let mut delays: Vec<u64> = pings
        .iter()
        .filter(|(sent_at, _)| *sent_at <= end_ns)
        .map(|(sent_at, at)| at.saturating_sub(*sent_at))
        .collect();
    if delays.is_empty() {
        return Err(bad("pingup: no ping arrived during the upload".into()));
    }
    delays.sort_unstable();
    let q = |p: f64| {
        let i = ((delays.len() as f64 * p).ceil() as usize).clamp(1, delays.len()) - 1;
        delays[i] as f64 / 1000.0
    };
    let max = delays[delays.len() - 1] as f64 / 1000.0;
    let mut m = Measured {
        figure: sent as f64 / GIB / done.as_secs_f64(),
        ping_us: Some([q(0.50), q(0.99), max]),
        cpu_s: route.pid().map(|_| cpu1 - cpu0),
        bytes: sent,
        ops: delays.len() as u64,
        ..Default::default()
    };
    m.observe(&key, id);
    Ok(m)
}

/// The measured window, set once every client is ready.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

fn percentiles(mut lat_ns: Vec<u32>) -> Option<[f64; 3]> {
    if lat_ns.is_empty() {
        return None;
    }
    lat_ns.sort_unstable();
    let q = |p: f64| {
        let i = ((lat_ns.len() as f64 * p).ceil() as usize).clamp(1, lat_ns.len()) - 1;
        f64::from(lat_ns[i]) / 1000.0
    };
    Some([q(0.50), q(0.99), q(0.999)])
}

/// `conns` persistent connections doing 64-byte request/response for the window.
fn rr(route: &Route<'_>, conns: usize, st: &Settings) -> io::Result<Measured> {
    let ready = Arc::new(Barrier::new(conns + 1));
    let go = Arc::new(Barrier::new(conns + 1));
    let window: Arc<OnceLock<Window>> = Arc::new(OnceLock::new());
    let mut handles = Vec::with_capacity(conns);
    for i in 0..conns {
        let key = format!("echo:rr:{i}");
        let addr = route.addr(&key);
        let (ready, go, window) = (ready.clone(), go.clone(), window.clone());
        handles.push(std::thread::spawn(
            move || -> io::Result<(Vec<u32>, String, u8)> {
                // Connect and handshake before the barrier; a failure still reaches both.
                let setup = connect(addr).and_then(|mut s| {
                    s.write_all(&header(&key))?;
                    let id = read_id(&mut s)?;
                    Ok((s, id))
                });
                ready.wait();
                go.wait();
                let (mut s, id) = setup?;
                let w = *window.get().expect("window set before go");
                let mut lat = Vec::with_capacity(1 << 16);
                let mut req = [0u8; MSG];
                let mut resp = [0u8; MSG];
                let mut n = 0u64;
                loop {
                    let t = Instant::now();
                    if t >= w.end {
                        break;
                    }
                    req[..8].copy_from_slice(&n.to_le_bytes());
                    req[8] = i as u8;
                    s.write_all(&req)?;
                    s.read_exact(&mut resp)?;
                    let t2 = Instant::now();
                    if resp != req {
                        return Err(bad(format!("rr: wrong echo on connection {i}")));
                    }
                    if t >= w.start && t2 <= w.end {
                        lat.push(u32::try_from((t2 - t).as_nanos()).unwrap_or(u32::MAX));
                    }
                    n += 1;
                }
                Ok((lat, key, id))
            },
        ));
    }
    ready.wait();
    let start = Instant::now() + st.warmup;
    let _ = window.set(Window {
        start,
        end: start + st.duration,
    });
    go.wait();
    sleep_until(start);
    let cpu0 = route.cpu();
    sleep_until(start + st.duration);
    let cpu1 = route.cpu();
    let mut m = Measured::default();
    let mut all = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok((lat, key, id))) => {
                all.extend_from_slice(&lat);
                m.observe(&key, id);
            }
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(io::Error::other("rr client panicked"))),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    m.ops = all.len() as u64;
    m.figure = m.ops as f64 / st.duration.as_secs_f64();
    m.bytes = m.ops * 2 * MSG as u64;
    m.cpu_s = route.pid().map(|_| cpu1 - cpu0);
    m.lat_us = percentiles(all);
    Ok(m)
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// `clients` threads, each in a loop: connect, header + 64 bytes in one write, read the
/// backend id and the echo, see the backend close, close. (The backend closes first, as
/// servers usually do, so TIME_WAIT stays on the server side: thousands of connections a
/// second would otherwise exhaust the client's and the proxy's ephemeral ports towards the
/// backends and slow `connect` down for everyone sharing them.)
fn cps(route: &Route<'_>, clients: usize, st: &Settings) -> io::Result<Measured> {
    let keys: Vec<String> = (0..CPS_KEYS).map(|k| format!("ping:cps:{k}")).collect();
    let payload: Vec<u8> = (0..MSG as u8).map(|b| b.wrapping_mul(13)).collect();
    let plan: Arc<Vec<(SocketAddr, Vec<u8>)>> = Arc::new(
        keys.iter()
            .map(|k| {
                let mut msg = header(k);
                msg.extend_from_slice(&payload);
                (route.addr(k), msg)
            })
            .collect(),
    );
    let start = Instant::now() + st.warmup;
    let w = Window {
        start,
        end: start + st.duration,
    };
    let mut handles = Vec::with_capacity(clients);
    for c in 0..clients {
        let plan = plan.clone();
        handles.push(std::thread::spawn(
            move || -> io::Result<(Vec<u32>, Vec<u8>)> {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut seen = vec![0u8; CPS_KEYS];
                let mut reply = [0u8; 1 + MSG];
                let mut j = c * 7;
                loop {
                    let t = Instant::now();
                    if t >= w.end {
                        break;
                    }
                    let k = j % CPS_KEYS;
                    j += 1;
                    let (addr, msg) = &plan[k];
                    let mut s = connect(*addr)?;
                    s.write_all(msg)?;
                    s.read_exact(&mut reply)?;
                    drop(s);
                    let t2 = Instant::now();
                    if reply[1..] != msg[msg.len() - MSG..] {
                        return Err(bad("cps: wrong echo".into()));
                    }
                    match seen[k] {
                        0 => seen[k] = reply[0],
                        prev if prev != reply[0] => {
                            return Err(bad(format!(
                                "cps: key ping:cps:{k} answered by backend {} then {}",
                                prev as char, reply[0] as char
                            )))
                        }
                        _ => {}
                    }
                    if t >= w.start && t2 <= w.end {
                        lat.push(u32::try_from((t2 - t).as_nanos()).unwrap_or(u32::MAX));
                    }
                }
                Ok((lat, seen))
            },
        ));
    }
    sleep_until(start);
    let cpu0 = route.cpu();
    sleep_until(w.end);
    let cpu1 = route.cpu();
    let mut m = Measured::default();
    let mut all = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok((lat, seen))) => {
                all.extend_from_slice(&lat);
                for (k, id) in seen.into_iter().enumerate() {
                    if id != 0 {
                        m.observe(&keys[k], id);
                    }
                }
            }
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(io::Error::other("cps client panicked"))),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    m.ops = all.len() as u64;
    m.figure = m.ops as f64 / st.duration.as_secs_f64();
    m.bytes = m.ops * (2 * MSG as u64 + 2 + 10);
    m.cpu_s = route.pid().map(|_| cpu1 - cpu0);
    m.lat_us = percentiles(all);
    Ok(m)
}

/// Threads that open the idle connections.
const IDLE_OPENERS: usize = 8;

/// `conns` established connections held at once; the proxy's RSS and fd growth per
/// connection. The figure is the setup rate.
fn idle(route: &Route<'_>, conns: usize, ctl: SocketAddr) -> io::Result<Measured> {
    let pid = route.pid();
    let before = pid.map(proc_stat).transpose()?;
    let fds_before = pid.map(fd_count).transpose()?;
    let t0 = Instant::now();
    let per = conns.div_ceil(IDLE_OPENERS);
    let mut handles = Vec::new();
    for t in 0..IDLE_OPENERS {
        let range = (t * per)..((t + 1) * per).min(conns);
        let targets: Vec<(String, SocketAddr)> = range
            .map(|i| {
                let key = format!("idle:{i}");
                let addr = route.addr(&key);
                (key, addr)
            })
            .collect();
        handles.push(std::thread::spawn(
            move || -> io::Result<Vec<(TcpStream, String, u8)>> {
                let mut held = Vec::with_capacity(targets.len());
                for (key, addr) in targets {
                    let mut s = connect(addr)?;
                    s.write_all(&header(&key))?;
                    let id = read_id(&mut s)?;
                    held.push((s, key, id));
                }
                Ok(held)
            },
        ));
    }
    let mut held = Vec::with_capacity(conns);
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => held.extend(v),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(io::Error::other("idle opener panicked"))),
        }
    }
    let setup = t0.elapsed();
    if let Some(e) = first_err {
        return Err(e);
    }
    // Let the proxy settle (deferred frees, per-thread caches), then read it.
    std::thread::sleep(Duration::from_millis(300));
    let after = pid.map(proc_stat).transpose()?;
    let fds_after = pid.map(fd_count).transpose()?;
    let mut m = Measured {
        figure: conns as f64 / setup.as_secs_f64(),
        ops: conns as u64,
        ..Default::default()
    };
    if let (Some(b), Some(a)) = (before, after) {
        m.cpu_s = Some(a.cpu_s - b.cpu_s);
        m.rss_per_conn = Some((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / conns as f64);
    }
    if let (Some(b), Some(a)) = (fds_before, fds_after) {
        m.fds_per_conn = Some((a as f64 - b as f64) / conns as f64);
    }
    for (_, key, id) in &held {
        m.observe(key, *id);
    }
    // The backends close first (TIME_WAIT on the server side); then each client sees EOF.
    drop_parked(ctl)?;
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(5);
    for (s, _, _) in &mut held {
        if Instant::now() >= deadline {
            break; // a FIN that never came; close from this side
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.read(&mut byte);
    }
    drop(held);
    Ok(m)
}

/// Closes every parked idle socket in the backends process (asks backend `addr`).
pub fn drop_parked(addr: SocketAddr) -> io::Result<()> {
    let mut s = connect(addr)?;
    s.write_all(&header("ctl:drop"))?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply)?;
    if reply[1] != b'k' {
        return Err(bad("ctl:drop not acknowledged".into()));
    }
    Ok(())
}
