//! Child processes of the harness — the backends process, shardproxy, HAProxy, the floor
//! relay, etcd (see [`crate::etcd`]) — and what the harness reads about them from `/proc`.
//!
//! Every child is registered in a global table; its guard kills (SIGKILL) and reaps it on
//! drop, including while unwinding from a panic, and a signal thread kills every registered
//! child on SIGINT/SIGTERM before exiting. The backends process and the floor relay also exit
//! by themselves when their stdin (a pipe the harness holds) closes.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::ROLE_ARG;

/// Kernel clock ticks per second for `/proc/<pid>/stat` (USER_HZ is 100 on Linux).
const CLK_TCK: f64 = 100.0;
/// How long a child gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

static CHILDREN: Mutex<BTreeMap<u32, Child>> = Mutex::new(BTreeMap::new());

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<u32, Child>> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills and reaps every registered child.
pub fn kill_all() {
    let mut reg = registry();
    for (_, mut child) in std::mem::take(&mut *reg) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts a thread that kills the children and exits on SIGINT or SIGTERM.
pub fn install_signal_handler() {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(_) => return,
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    let _ = tx.send(());
                    return;
                };
                let _ = tx.send(());
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            eprintln!("\ninterrupted: stopping the proxies and backends");
            kill_all();
            std::process::exit(130);
        });
    if spawned.is_ok() {
        let _ = rx.recv_timeout(Duration::from_secs(2));
    }
}

/// A registered child: killed and reaped on drop.
pub struct Guard {
    pid: u32,
}

impl Guard {
    /// Registers `child`: from now on it is killed on drop, on error exit and on a signal.
    pub fn register(child: Child) -> Self {
        let pid = child.id();
        registry().insert(pid, child);
        Guard { pid }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` if the child has exited.
    pub fn exited(&self) -> Option<String> {
        let mut reg = registry();
        let child = reg.get_mut(&self.pid)?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let child = registry().remove(&self.pid);
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads the first line of a child's stdout, bounded in time.
fn first_line(stdout: ChildStdout, guard: &Guard) -> io::Result<(String, BufReader<ChildStdout>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let r = reader.read_line(&mut line).map(|_| line);
        let _ = tx.send((r, reader));
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok((Ok(line), reader)) if !line.is_empty() => Ok((line.trim().to_string(), reader)),
        Ok(_) => Err(io::Error::other(format!(
            "child {} closed stdout before its ready line ({})",
            guard.pid,
            guard.exited().unwrap_or_else(|| "still running".into())
        ))),
        Err(_) => Err(io::Error::other(format!(
            "child {} printed no ready line within {READY_TIMEOUT:?}",
            guard.pid
        ))),
    }
}

/// The backends process.
pub struct Backends {
    /// Listener addresses, by backend index (names `b1`, `b2`, ...).
    pub addrs: Vec<SocketAddr>,
    _guard: Guard,
    // Held open: the backends exit when it closes.
    _stdin: ChildStdin,
    _stdout: BufReader<ChildStdout>,
}

impl Backends {
    /// Re-executes this binary as `__backends n`.
    pub fn start(n: usize) -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(ROLE_ARG)
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = Guard::register(child);
        let (line, reader) = first_line(stdout, &guard)?;
        let addrs = line
            .strip_prefix("ready ")
            .ok_or_else(|| io::Error::other(format!("unexpected backend line {line:?}")))?
            .split_whitespace()
            .map(|a| a.parse::<SocketAddr>().map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Backends {
            addrs,
            _guard: guard,
            _stdin: stdin,
            _stdout: reader,
        })
    }

    /// Backend names, by index.
    pub fn names(&self) -> Vec<String> {
        (1..=self.addrs.len()).map(|i| format!("b{i}")).collect()
    }
}

/// A running proxy.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// shardproxy's admin API, when started with `--admin`.
    pub admin: Option<SocketAddr>,
    guard: Guard,
    _stdout: Option<BufReader<ChildStdout>>,
    // The floor relay exits when this closes.
    _stdin: Option<ChildStdin>,
}

impl Proxy {
    /// Starts `shardproxy run` with `--workers n` when `workers` is given: with a
    /// `--backend NAME=ADDR` per backend, or — `membership` = (URL, cache file) — with
    /// `--membership URL --membership-cache FILE --admin 127.0.0.1:0` and no `--backend`
    /// (the backends come from etcd).
    pub fn shardproxy(
        bin: &Path,
        extra: &[String],
        backends: &Backends,
        membership: Option<(&str, &Path)>,
        workers: Option<usize>,
        log: &Path,
    ) -> io::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--listen", "127.0.0.1:0"]);
        match membership {
            None => {
                for (name, addr) in backends.names().iter().zip(&backends.addrs) {
                    cmd.arg("--backend").arg(format!("{name}={addr}"));
                }
            }
            Some((url, cache)) => {
                cmd.arg("--membership").arg(url);
                cmd.arg("--membership-cache").arg(cache);
                cmd.args(["--admin", "127.0.0.1:0"]);
            }
        }
        if let Some(n) = workers {
            cmd.arg("--workers").arg(n.to_string());
        }
        cmd.args(extra);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(fs::File::create(log)?))
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = Guard::register(child);
        let (line, reader) = first_line(stdout, &guard).map_err(|e| with_log(e, log))?;
        // `listening on ADDR` or `listening on ADDR admin ADDR`.
        let words: Vec<&str> = line
            .strip_prefix("listening on ")
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let bad = || io::Error::other(format!("unexpected shardproxy line {line:?}"));
        let addr = words
            .first()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(bad)?;
        let admin = match words.get(1..) {
            Some(["admin", a, ..]) => Some(a.parse::<SocketAddr>().map_err(|_| bad())?),
            _ => None,
        };
        if membership.is_some() && admin.is_none() {
            return Err(bad());
        }
        Ok(Proxy {
            addr,
            admin,
            guard,
            _stdout: Some(reader),
            _stdin: None,
        })
    }

    /// Starts the floor relay (see [`crate::floor`]): a re-exec of this binary as
    /// `__floor-relay b1=ADDR ...`.
    pub fn floor(backends: &Backends, log: &Path) -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg(crate::floor::ROLE_ARG);
        for (name, addr) in backends.names().iter().zip(&backends.addrs) {
            cmd.arg(format!("{name}={addr}"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(fs::File::create(log)?))
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = Guard::register(child);
        let (line, reader) = first_line(stdout, &guard).map_err(|e| with_log(e, log))?;
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected floor-relay line {line:?}")))?;
        Ok(Proxy {
            addr,
            admin: None,
            guard,
            _stdout: Some(reader),
            _stdin: Some(stdin),
        })
    }

    /// Starts `haproxy -f CFG -db` with a generated configuration (`nbthread n` when given).
    pub fn haproxy(
        bin: &Path,
        backends: &Backends,
        nbthread: Option<usize>,
        dir: &Path,
    ) -> io::Result<Self> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}")
            .parse()
            .map_err(io::Error::other)?;
        let cfg = dir.join("haproxy.cfg");
        fs::write(&cfg, haproxy_config(addr, backends, nbthread))?;
        let log = dir.join("haproxy.log");
        let child = Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(&log)?))
            .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
            .spawn()?;
        let guard = Guard::register(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = guard.exited() {
                return Err(with_log(
                    io::Error::other(format!("haproxy exited at start ({status})")),
                    &log,
                ));
            }
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(with_log(io::Error::other("haproxy never listened"), &log));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Proxy {
            addr,
            admin: None,
            guard,
            _stdout: None,
            _stdin: None,
        })
    }

    /// The proxy's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

/// The HAProxy configuration that does the same job as shardproxy: route by the key in the
/// `[u16 BE len][key]` header, forward the stream unchanged, splice both ways.
///
/// `balance hash req.payload_lv(0,2)` silently falls back to round-robin in TCP mode
/// (verified on 2.6.12), so the key is copied into a variable first and hashed from there.
pub fn haproxy_config(listen: SocketAddr, backends: &Backends, nbthread: Option<usize>) -> String {
    let mut c = String::new();
    c.push_str("global\n");
    // HAProxy asks for 2 fds per connection plus 2 per pipe (maxpipes = maxconn/4): at 7000 that
    // is ~17500, inside the 20000 fd hard limit (8000 fails to start).
    c.push_str("    maxconn 7000\n");
    if let Some(n) = nbthread {
        c.push_str(&format!("    nbthread {n}\n"));
    }
    c.push_str(
        "\
defaults
    mode tcp
    maxconn 7000
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout client-fin 10m
    timeout server-fin 10m

frontend shard
",
    );
    c.push_str(&format!("    bind {listen}\n"));
    c.push_str(
        "\
    tcp-request inspect-delay 5s
    tcp-request content set-var(txn.shard_key) req.payload_lv(0,2) if { req.payload_lv(0,2) -m found }
    tcp-request content accept if { var(txn.shard_key) -m found }
    tcp-request content reject
    default_backend shards

backend shards
    balance hash var(txn.shard_key)
    hash-type consistent
    option splice-request
    option splice-response
",
    );
    for (name, addr) in backends.names().iter().zip(&backends.addrs) {
        c.push_str(&format!("    server {name} {addr}\n"));
    }
    c
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `e` with the last 10 lines of `log` appended.
pub fn with_log(e: io::Error, log: &Path) -> io::Error {
    let tail = fs::read_to_string(log).unwrap_or_default();
    let tail: String = tail
        .lines()
        .rev()
        .take(10)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    io::Error::other(format!("{e}; log {}:\n{tail}", log.display()))
}

/// What `/proc` says about a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// On-CPU seconds of the process, threads that already exited included: its CPU-time
    /// clock (`clock_getcpuclockid`, nanoseconds), else the sum of its live threads'
    /// `schedstat` run time, else utime + stime in ticks.
    pub cpu_s: f64,
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Peak resident set over the process's life, KiB.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn proc_stat(pid: u32) -> io::Result<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("bad /proc stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> f64 {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0) as f64
    };
    // utime is field 14, stime field 15: indices 11 and 12 counted from field 3.
    let cpu_s = process_cpu(pid)
        .or_else(|| schedstat_cpu(pid))
        .unwrap_or((tick(11) + tick(12)) / CLK_TCK);
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStat {
        cpu_s,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
    })
}

/// The process's CPU-time clock: the kernel's sum of `sum_exec_runtime` over all its threads,
/// those that already exited included (the floor relay's threads live one connection each),
/// in nanoseconds — the same basis as `schedstat`.
fn process_cpu(pid: u32) -> Option<f64> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    let clock = nix::time::ClockId::pid_cpu_clock_id(pid).ok()?;
    let t = nix::time::clock_gettime(clock).ok()?;
    Some(t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// Sum over the process's threads of `/proc/<pid>/task/<tid>/schedstat`'s first field (ns
/// on CPU). Threads that already exited are not counted; the proxies keep theirs.
fn schedstat_cpu(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = fs::read_to_string(task.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// Open fds of a process.
pub fn fd_count(pid: u32) -> io::Result<u64> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// A scratch directory under the results folder (git-ignored), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates `base/tmp/<pid>`.
    pub fn new(base: &Path) -> io::Result<Self> {
        let dir = base.join("tmp").join(std::process::id().to_string());
        fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = fs::remove_dir(parent); // only if empty
        }
    }
}

/// `haproxy -v`'s first line.
pub fn haproxy_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// TCP sockets in TIME_WAIT (IPv4 and IPv6), from `/proc/net/tcp*`.
pub fn time_wait_sockets() -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .map(|s| {
            s.lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(3) == Some("06"))
                .count()
        })
        .sum()
}

/// Machine-wide busy CPU seconds (all cores) from `/proc/stat`, and this process's own CPU
/// seconds including its reaped children (`/proc/self/stat` utime+stime+cutime+cstime).
/// Sampled twice, the difference is the CPU other programs used meanwhile.
pub fn cpu_accounting() -> (f64, f64) {
    let busy = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: busy excludes idle and iowait.
            Some(
                v.iter().take(8).sum::<u64>()
                    - v.get(3).copied().unwrap_or(0)
                    - v.get(4).copied().unwrap_or(0),
            )
        })
        .unwrap_or(0) as f64
        / CLK_TCK;
    let own = fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            // Fields from 4 (ppid) on are numbers (tpgid may be -1); skip the state (3).
            let f: Vec<i64> = after
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // utime, stime, cutime, cstime are fields 14..=17: indices 10..=13 here.
            Some(f.get(10..14)?.iter().sum::<i64>().max(0) as u64)
        })
        .unwrap_or(0) as f64
        / CLK_TCK;
    (busy, own)
}

/// `/proc/loadavg`'s 1-minute figure.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
