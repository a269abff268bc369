//! DSR benchmark harness (issue 8): direct vs spliced vs DSR `--forward` vs DSR
//! `--handoff-socket`, all in one run so the ratios are comparable.
//!
//! Run it through `scripts/bench-dsr.sh` (root: it builds the release binary, creates the
//! network namespaces `<prefix>-{sw,client,proxy,b1}` and removes them again), which calls
//! `cargo bench --bench dsr -- --ns <prefix> [FLAGS]`. The topology (docs/design.md §6):
//! client, proxy and backend host b1 on one bridge (no netem); the VIP is an address of its
//! own on the proxy's eth0 and sits on b1's `lo`.
//!
//! Processes (each started through `ip netns exec`, each PID killed at the end):
//! - b1: the application (this binary's [`roles::APP`] role) on `0.0.0.0:9000` and on a Unix
//!   hand-off socket; `shardproxy agent --forward 127.0.0.1:9000` (control port 7100) and
//!   `shardproxy agent --handoff-socket PATH` (control port 7101);
//! - proxy: three `shardproxy run --workers 1` — VIP:7000 DSR to the forward agent, VIP:7001
//!   DSR to the hand-off-socket agent, VIP:7002 spliced (backend without `agent=`).
//!
//! Scenarios, each round in a rotated target order, medians over the rounds:
//! 1. `bulk`: one connection, a small request, then the application writes N MiB (default
//!    1024); client-side Gbit/s, checked byte count and content. For every target: the proxy
//!    namespace's eth0 tx bytes during the transfer as % of the response, and the proxy's
//!    (and agent's) CPU seconds per GiB from their CPU-time clocks;
//! 2. `latency`: sequential short connections (connect, header, first byte, close): the
//!    proxy's `shardproxy_dsr_handoff_duration_seconds` histogram (delta over the run,
//!    interpolated in its buckets) and the client's connect→first-byte p50/p99;
//! 3. `cps`: C concurrent clients (default 16) opening short connections for S seconds
//!    against the `--workers 1` proxy: connections/s, the proxy's CPU utilisation (process
//!    and busiest thread, so "one core" is shown), fallbacks (hand-offs not `ok`).
//!
//! Results: `<out>/dsr-<UTC time>/results.md` and `samples.csv`.

#[path = "dsr/roles.rs"]
mod roles;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

/// Flags of `cargo bench --bench dsr -- [FLAGS]` (and of `scripts/bench-dsr.sh`).
#[derive(Debug, Parser)]
#[command(
    name = "dsr",
    about = "DSR benchmark: direct vs spliced vs DSR forward/handoff-socket"
)]
struct Args {
    /// Namespace prefix: the namespaces `<NS>-client`, `<NS>-proxy`, `<NS>-b1` must exist,
    /// set up as `scripts/bench-dsr.sh` does.
    #[arg(long)]
    ns: String,
    /// The /24 the namespaces use (first three octets): client .10, proxy .2, b1 .11,
    /// VIP .100.
    #[arg(long, default_value = "10.231.0")]
    subnet: String,
    /// shardproxy binary (default: the release one next to this bench binary).
    #[arg(long)]
    shardproxy: Option<PathBuf>,
    /// Results folder; each run writes `<out>/dsr-<UTC time>/`.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Download size of the bulk scenario, MiB.
    #[arg(long, default_value_t = 1024)]
    bulk_mib: u64,
    /// Sequential short connections per target and round in the latency scenario.
    #[arg(long, default_value_t = 2000)]
    short_conns: u64,
    /// Short connections per DSR target and round with a pause after each (see
    /// --isolated-gap-ms): the hand-off on its own, not queued behind the previous flow's
    /// removal (0 to skip).
    #[arg(long, default_value_t = 50)]
    isolated_conns: u64,
    /// The pause after each of those connections, milliseconds.
    #[arg(long, default_value_t = 100)]
    isolated_gap_ms: u64,
    /// Length of the cps window, seconds.
    #[arg(long, default_value_t = 5.0)]
    cps_secs: f64,
    /// Concurrent clients in the cps scenario.
    #[arg(long, default_value_t = 16)]
    cps_clients: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(role) = argv.get(1).filter(|a| a.starts_with("__")) {
        roles::run(role, &argv[2..]);
    }
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-dsr: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Targets and the topology
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Spliced,
    Forward,
    Handoff,
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Direct,
        Target::Spliced,
        Target::Forward,
        Target::Handoff,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Spliced => "spliced",
            Target::Forward => "dsr-forward",
            Target::Handoff => "dsr-handoff-socket",
        }
    }

    fn is_dsr(self) -> bool {
        matches!(self, Target::Forward | Target::Handoff)
    }
}

struct Topo {
    exe: PathBuf,
    ns_client: String,
    ns_proxy: String,
    ns_b1: String,
    b1: String,
    vip: String,
}

impl Topo {
    fn addr(&self, t: Target) -> String {
        match t {
            Target::Direct => format!("{}:9000", self.b1),
            Target::Forward => format!("{}:7000", self.vip),
            Target::Handoff => format!("{}:7001", self.vip),
            Target::Spliced => format!("{}:7002", self.vip),
        }
    }

    /// Runs a role of this binary in `ns`; its stdout, or why it failed.
    fn role(&self, ns: &str, args: &[String], timeout: Duration) -> Result<String, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(&self.exe).args(args);
        run_bounded(cmd, timeout)
    }

    fn scrape(&self, ns: &str, port: u16) -> Result<Metrics, String> {
        let text = self.role(
            ns,
            &[
                roles::SCRAPE.into(),
                format!("127.0.0.1:{port}"),
                "/metrics".into(),
            ],
            Duration::from_secs(10),
        )?;
        Ok(Metrics::parse(&text))
    }

    fn proxy_tx_bytes(&self) -> Result<f64, String> {
        let text = self.role(
            &self.ns_proxy,
            &[
                roles::READ.into(),
                "/sys/class/net/eth0/statistics/tx_bytes".into(),
            ],
            Duration::from_secs(10),
        )?;
        text.trim()
            .parse()
            .map_err(|e| format!("tx_bytes {text:?}: {e}"))
    }
}

/// Runs `cmd` with its output captured, killed after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    match status {
        Some(st) if st.success() => Ok(out),
        Some(st) => Err(format!("{what}: {st}: {}{}", out.trim(), err.trim())),
        None => Err(format!("{what}: killed after {timeout:?}: {}", err.trim())),
    }
}

// ---------------------------------------------------------------------------------------
// Long-running processes
// ---------------------------------------------------------------------------------------

struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// The processes this harness started; all stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Default)]
struct Procs {
    list: Vec<Proc>,
}

impl Procs {
    /// Starts `program args` in `ns` and waits for a stdout line starting with `ready`.
    fn start(
        &mut self,
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        ready: &str,
        logs: &Path,
    ) -> Result<u32, String> {
        let err_path = logs.join(format!("{name}.err"));
        let err_file = fs::File::create(&err_path).map_err(|e| e.to_string())?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stdin = child.stdin.take();
        self.list.push(Proc {
            name: name.into(),
            child,
            stdin,
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with(ready) => return Ok(pid),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "{name} exited before it was ready: {}",
                        tail(&err_path)
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    return Err(format!("{name} not ready in 15 s: {}", tail(&err_path)));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Processes that exited already (a crash during the run).
    fn dead(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for p in &mut self.list {
            if !matches!(p.child.try_wait(), Ok(None)) {
                dead.push(p.name.clone());
            }
        }
        dead
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.list {
            p.stdin = None;
            if let Ok(pid) = i32::try_from(p.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in &mut self.list {
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

// ---------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------

/// The process's CPU seconds (all threads, exited ones included: its CPU-time clock).
fn cpu_s(pid: u32) -> f64 {
    let Ok(raw) = i32::try_from(pid) else {
        return f64::NAN;
    };
    nix::time::ClockId::pid_cpu_clock_id(nix::unistd::Pid::from_raw(raw))
        .and_then(nix::time::clock_gettime)
        .map_or(f64::NAN, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// CPU seconds per live thread (`comm/tid` → seconds, from `schedstat`).
fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut map = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return map;
    };
    for task in dir.flatten() {
        let p = task.path();
        let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
        let ns: f64 = fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0);
        map.insert(
            format!("{}/{}", comm.trim(), task.file_name().to_string_lossy()),
            ns / 1e9,
        );
    }
    map
}

/// CPU seconds of the process's child processes (the proxy's long-lived `nft`).
fn children_cpu(pid: u32) -> f64 {
    let mut total = 0.0;
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    for task in dir.flatten() {
        let kids = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for kid in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<u32>().ok())
        {
            let c = cpu_s(kid);
            if c.is_finite() {
                total += c;
            }
        }
    }
    total
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------

/// Samples of one scrape: (name, labels as written, value).
struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut v = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            v.push((name.to_string(), labels.to_string(), value));
        }
        Metrics(v)
    }

    /// Sum of `name` over the series whose labels contain `label` (all if empty).
    fn sum(&self, name: &str, label: &str) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(label))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Per-`result` counts of `shardproxy_dsr_handoffs_total`.
    fn handoffs(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for (n, l, v) in &self.0 {
            if n == "shardproxy_dsr_handoffs_total" {
                let result = l
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("result="))
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string();
                *m.entry(result).or_insert(0.0) += v;
            }
        }
        m
    }

    /// The hand-off duration histogram: (upper bound, cumulative count), ascending.
    fn handoff_buckets(&self) -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|(n, _, _)| n == "shardproxy_dsr_handoff_duration_seconds_bucket")
            .filter_map(|(_, l, v)| {
                let le = l
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("le="))?
                    .trim_matches('"');
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        b.sort_by(|a, b| a.0.total_cmp(&b.0));
        b
    }
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// Quantile `q` of a cumulative histogram, linearly interpolated inside its bucket (seconds);
/// infinite if it falls in the `+Inf` bucket.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return f64::INFINITY;
            }
            let inside = cum - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return lo + (le - lo) * frac;
        }
        lo = le;
        below = cum;
    }
    f64::NAN
}

// ---------------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------------

struct Sample {
    scenario: &'static str,
    target: Target,
    round: usize,
    metric: &'static str,
    value: f64,
}

#[derive(Default)]
struct Samples(Vec<Sample>);

impl Samples {
    fn add(
        &mut self,
        scenario: &'static str,
        target: Target,
        round: usize,
        metric: &'static str,
        value: f64,
    ) {
        self.0.push(Sample {
            scenario,
            target,
            round,
            metric,
            value,
        });
    }

    fn values(&self, scenario: &str, target: Target, metric: &str) -> Vec<f64> {
        self.0
            .iter()
            .filter(|s| s.scenario == scenario && s.target == target && s.metric == metric)
            .map(|s| s.value)
            .collect()
    }

    fn median(&self, scenario: &str, target: Target, metric: &str) -> f64 {
        median(self.values(scenario, target, metric))
    }

    /// Sum over the rounds; NaN if there is no sample (the metric does not apply).
    fn total(&self, scenario: &str, target: Target, metric: &str) -> f64 {
        let v = self.values(scenario, target, metric);
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().fold(0.0, |a, b| a + b)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "key value key value ..." after a leading `ok`.
fn fields(line: &str) -> BTreeMap<String, f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut m = BTreeMap::new();
    if words.first() == Some(&"ok") {
        if let Some(v) = words.get(1).and_then(|v| v.parse().ok()) {
            m.insert("ok".to_string(), v);
        }
        for kv in words[2..].chunks(2) {
            if let [k, v] = kv {
                if let Ok(v) = v.parse() {
                    m.insert((*k).to_string(), v);
                }
            }
        }
    }
    m
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

struct Pids {
    proxy: BTreeMap<&'static str, u32>,
    agent: BTreeMap<&'static str, u32>,
}

impl Pids {
    fn proxy(&self, t: Target) -> Option<u32> {
        self.proxy.get(t.name()).copied()
    }
    fn agent(&self, t: Target) -> Option<u32> {
        self.agent.get(t.name()).copied()
    }
}

fn admin_port(t: Target) -> Option<u16> {
    match t {
        Target::Direct => None,
        Target::Forward => Some(9090),
        Target::Handoff => Some(9091),
        Target::Spliced => Some(9092),
    }
}

fn run(args: &Args) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let shardproxy = match &args.shardproxy {
        Some(p) => p.clone(),
        None => exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("shardproxy"))
            .ok_or("cannot find the shardproxy binary; pass --shardproxy")?,
    };
    if !shardproxy.is_file() {
        return Err(format!(
            "{} is missing: cargo build --release",
            shardproxy.display()
        ));
    }
    let s = &args.subnet;
    let topo = Topo {
        exe: exe.clone(),
        ns_client: format!("{}-client", args.ns),
        ns_proxy: format!("{}-proxy", args.ns),
        ns_b1: format!("{}-b1", args.ns),
        b1: format!("{s}.11"),
        vip: format!("{s}.100"),
    };
    let started = SystemTime::now();
    let (stamp, human) = utc_stamp(started);
    let dir = args.out.join(format!("dsr-{stamp}"));
    let scratch = std::env::temp_dir().join(format!("shardproxy-dsr-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let result = run_in(args, &topo, &shardproxy, &scratch, &dir, &human);
    if result.is_err() {
        eprintln!("bench-dsr: logs kept in {}", scratch.display());
    } else {
        let _ = fs::remove_dir_all(&scratch);
    }
    result
}

fn run_in(
    args: &Args,
    topo: &Topo,
    shardproxy: &Path,
    scratch: &Path,
    dir: &Path,
    human: &str,
) -> Result<(), String> {
    let t_run = Instant::now();
    let load_before = loadavg();
    let mut secret = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(|e| e.to_string())?;
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let secret_path = scratch.join("secret");
    fs::write(&secret_path, secret_hex).map_err(|e| e.to_string())?;
    let secret_arg = secret_path.display().to_string();
    let sock = scratch.join("app.sock").display().to_string();

    let mut procs = Procs::default();
    let s = |x: &str| x.to_string();
    procs.start(
        "app",
        &topo.ns_b1,
        &topo.exe,
        &[s(roles::APP), s("0.0.0.0:9000"), sock.clone()],
        "ready",
        scratch,
    )?;
    let mut pids = Pids {
        proxy: BTreeMap::new(),
        agent: BTreeMap::new(),
    };
    for (t, port, admin, delivery) in [
        (
            Target::Forward,
            7100,
            9191,
            ["--forward".to_string(), s("127.0.0.1:9000")],
        ),
        (
            Target::Handoff,
            7101,
            9192,
            ["--handoff-socket".to_string(), sock.clone()],
        ),
    ] {
        let mut a = vec![
            s("agent"),
            s("--control"),
            format!("{}:{port}", topo.b1),
            s("--vip"),
            topo.vip.clone(),
            s("--secret-file"),
            secret_arg.clone(),
            s("--admin"),
            format!("127.0.0.1:{admin}"),
        ];
        a.extend(delivery);
        let pid = procs.start(
            &format!("agent-{}", t.name()),
            &topo.ns_b1,
            shardproxy,
            &a,
            "agent control on",
            scratch,
        )?;
        pids.agent.insert(t.name(), pid);
    }
    for t in [Target::Forward, Target::Handoff, Target::Spliced] {
        let mut a = vec![
            s("run"),
            s("--listen"),
            topo.addr(t),
            s("--admin"),
            format!("127.0.0.1:{}", admin_port(t).unwrap_or(0)),
            s("--workers"),
            s("1"),
        ];
        match t {
            Target::Forward | Target::Handoff => {
                let agent_port = if t == Target::Forward { 7100 } else { 7101 };
                a.extend([
                    s("--backend"),
                    format!("b1={}:9000,agent={}:{agent_port}", topo.b1, topo.b1),
                    s("--dsr"),
                    s("--dsr-device"),
                    s("eth0"),
                    s("--dsr-secret-file"),
                    secret_arg.clone(),
                ]);
            }
            _ => a.extend([s("--backend"), format!("b1={}:9000", topo.b1)]),
        }
        let pid = procs.start(
            &format!("proxy-{}", t.name()),
            &topo.ns_proxy,
            shardproxy,
            &a,
            "listening on",
            scratch,
        )?;
        pids.proxy.insert(t.name(), pid);
    }
    // Links to the agents come up in the background: wait until one short connection per
    // DSR target is handed off, or give up.
    for t in [Target::Forward, Target::Handoff] {
        let port = admin_port(t).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            topo.role(
                &topo.ns_client,
                &[s(roles::SHORT), topo.addr(t), s("1"), s("1"), s("10")],
                Duration::from_secs(15),
            )?;
            let m = topo.scrape(&topo.ns_proxy, port)?;
            if m.handoffs().get("ok").copied().unwrap_or(0.0) > 0.0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no successful hand-off in 15 s (hand-offs {:?}); proxy log: {}",
                    t.name(),
                    m.handoffs(),
                    tail(&scratch.join(format!("proxy-{}.err", t.name())))
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let totals_before = handoff_totals(topo)?;

    let mut samples = Samples::default();
    let bulk_bytes = args.bulk_mib << 20;
    let mut notes: Vec<String> = Vec::new();
    for round in 0..args.rounds {
        let mut order = Target::ALL.to_vec();
        let n = order.len();
        order.rotate_left(round % n);
        for &t in &order {
            bulk(
                args,
                topo,
                &pids,
                t,
                round,
                bulk_bytes,
                &mut samples,
                &mut notes,
            )?;
        }
        for &t in &order {
            latency(args, topo, t, round, &mut samples, &mut notes)?;
        }
        for &t in order.iter().filter(|t| **t != Target::Direct) {
            cps(args, topo, &pids, t, round, &mut samples, &mut notes)?;
        }
        let dead = procs.dead();
        if !dead.is_empty() {
            return Err(format!("processes died during round {round}: {dead:?}"));
        }
    }
    let totals_after = handoff_totals(topo)?;
    let mut agent_metrics = String::new();
    for (t, port) in [(Target::Forward, 9191), (Target::Handoff, 9192)] {
        let m = topo.scrape(&topo.ns_b1, port)?;
        let mut line = format!("- {} agent:", t.name());
        for (n, l, v) in &m.0 {
            if (n == "shardproxy_agent_handoffs_total"
                || n == "shardproxy_agent_control_errors_total")
                && *v != 0.0
            {
                let _ = write!(line, " `{n}{{{l}}}` {v}");
            }
        }
        agent_metrics.push_str(&line);
        agent_metrics.push('\n');
    }
    for t in [Target::Forward, Target::Handoff] {
        let m = topo.scrape(&topo.ns_proxy, admin_port(t).unwrap_or(0))?;
        let _ = writeln!(
            agent_metrics,
            "- {} proxy at the end: `shardproxy_dsr_flows_active` {}, `shardproxy_dsr_flows_ended_total` {:?}",
            t.name(),
            m.sum("shardproxy_dsr_flows_active", ""),
            m.0.iter()
                .filter(|(n, _, _)| n == "shardproxy_dsr_flows_ended_total")
                .map(|(_, l, v)| format!("{l} {v}"))
                .collect::<Vec<_>>()
        );
    }
    drop(procs);
    let elapsed = t_run.elapsed().as_secs_f64();
    let report = Report {
        args,
        human,
        load_before,
        load_after: loadavg(),
        elapsed,
        samples: &samples,
        notes: &notes,
        totals: totals_after
            .iter()
            .map(|(t, m)| {
                (
                    *t,
                    delta(m, totals_before.get(t).unwrap_or(&BTreeMap::new())),
                )
            })
            .collect(),
        agent_metrics,
    };
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    fs::write(dir.join("results.md"), report.markdown()).map_err(|e| e.to_string())?;
    fs::write(dir.join("samples.csv"), report.csv()).map_err(|e| e.to_string())?;
    println!("{}", report.markdown());
    eprintln!("bench-dsr: results in {}", dir.display());
    Ok(())
}

fn handoff_totals(topo: &Topo) -> Result<BTreeMap<Target, BTreeMap<String, f64>>, String> {
    let mut m = BTreeMap::new();
    for t in [Target::Forward, Target::Handoff] {
        m.insert(
            t,
            topo.scrape(&topo.ns_proxy, admin_port(t).unwrap_or(0))?
                .handoffs(),
        );
    }
    Ok(m)
}

impl PartialOrd for Target {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Target {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

#[allow(clippy::too_many_arguments)]
fn bulk(
    args: &Args,
    topo: &Topo,
    pids: &Pids,
    t: Target,
    round: usize,
    bytes: u64,
    samples: &mut Samples,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let s = |x: &str| x.to_string();
    let port = admin_port(t);
    let h0 = match (t.is_dsr(), port) {
        (true, Some(p)) => Some(topo.scrape(&topo.ns_proxy, p)?.handoffs()),
        _ => None,
    };
    let deadline = 30.0 * (args.bulk_mib as f64 / 1024.0).max(0.1);
    let tx0 = topo.proxy_tx_bytes()?;
    let p0 = pids.proxy(t).map(cpu_s);
    let a0 = pids.agent(t).map(cpu_s);
    let out = topo.role(
        &topo.ns_client,
        &[
            s(roles::BULK),
            topo.addr(t),
            bytes.to_string(),
            format!("{deadline}"),
        ],
        Duration::from_secs_f64(deadline + 10.0),
    );
    let p1 = pids.proxy(t).map(cpu_s);
    let a1 = pids.agent(t).map(cpu_s);
    let tx1 = topo.proxy_tx_bytes()?;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            notes.push(format!(
                "bulk {} round {}: FAILED: {e}",
                t.name(),
                round + 1
            ));
            eprintln!(
                "bench-dsr: bulk {} round {}: FAILED: {e}",
                t.name(),
                round + 1
            );
            return Ok(());
        }
    };
    let words: Vec<&str> = out.split_whitespace().collect();
    let (got, secs): (f64, f64) = match words.as_slice() {
        ["ok", b, s, ..] => (b.parse().unwrap_or(0.0), s.parse().unwrap_or(f64::NAN)),
        _ => return Err(format!("bulk {}: unexpected output {out:?}", t.name())),
    };
    let gib = got / f64::from(1u32 << 30);
    let gbps = got * 8.0 / secs / 1e9;
    samples.add("bulk", t, round, "gbit_s", gbps);
    samples.add("bulk", t, round, "proxy_tx_pct", (tx1 - tx0) / got * 100.0);
    if let (Some(a), Some(b)) = (p0, p1) {
        samples.add("bulk", t, round, "proxy_cpu_s_per_gib", (b - a) / gib);
    }
    if let (Some(a), Some(b)) = (a0, a1) {
        samples.add("bulk", t, round, "agent_cpu_s_per_gib", (b - a) / gib);
    }
    if let (Some(h0), Some(p)) = (h0, port) {
        let d = delta(&topo.scrape(&topo.ns_proxy, p)?.handoffs(), &h0);
        let ok = d.get("ok").copied().unwrap_or(0.0);
        samples.add("bulk", t, round, "handoffs_ok", ok);
        if ok != 1.0 || d.len() != 1 {
            notes.push(format!(
                "bulk {} round {}: hand-offs {d:?} (expected exactly one ok): this transfer was not DSR",
                t.name(),
                round + 1
            ));
        }
    }
    eprintln!(
        "bench-dsr: round {} bulk {:<18} {gbps:6.2} Gbit/s  proxy eth0 tx {:.3}% of the response",
        round + 1,
        t.name(),
        (tx1 - tx0) / got * 100.0
    );
    Ok(())
}

fn latency(
    args: &Args,
    topo: &Topo,
    t: Target,
    round: usize,
    samples: &mut Samples,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    sequential(
        args.short_conns,
        0,
        "latency",
        topo,
        t,
        round,
        samples,
        notes,
    )?;
    if t.is_dsr() && args.isolated_conns > 0 {
        sequential(
            args.isolated_conns,
            args.isolated_gap_ms,
            "isolated",
            topo,
            t,
            round,
            samples,
            notes,
        )?;
    }
    Ok(())
}

/// `conns` sequential short connections with `gap_ms` after each, recorded as `scenario`.
#[allow(clippy::too_many_arguments)]
fn sequential(
    conns: u64,
    gap_ms: u64,
    scenario: &'static str,
    topo: &Topo,
    t: Target,
    round: usize,
    samples: &mut Samples,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let s = |x: &str| x.to_string();
    let port = admin_port(t);
    let before = match (t.is_dsr(), port) {
        (true, Some(p)) => Some(topo.scrape(&topo.ns_proxy, p)?),
        _ => None,
    };
    let out = topo.role(
        &topo.ns_client,
        &[
            s(roles::SHORT),
            topo.addr(t),
            s("1"),
            conns.to_string(),
            s("120"),
            gap_ms.to_string(),
        ],
        Duration::from_secs(130),
    )?;
    let f = fields(out.lines().next().unwrap_or(""));
    if let Some(e) = out.lines().find_map(|l| l.strip_prefix("first_error ")) {
        notes.push(format!(
            "latency {} round {}: client errors, first: {e}",
            t.name(),
            round + 1
        ));
    }
    for (k, m) in [
        ("p50_us", "client_p50_us"),
        ("p99_us", "client_p99_us"),
        ("max_us", "client_max_us"),
        ("errors", "client_errors"),
        ("ok", "conns"),
    ] {
        samples.add(scenario, t, round, m, f.get(k).copied().unwrap_or(f64::NAN));
    }
    let mut line = format!(
        "bench-dsr: round {} {scenario:<8} {:<18} client p50 {:.0} us p99 {:.0} us",
        round + 1,
        t.name(),
        f.get("p50_us").copied().unwrap_or(f64::NAN),
        f.get("p99_us").copied().unwrap_or(f64::NAN)
    );
    if let (Some(before), Some(p)) = (before, port) {
        let after = topo.scrape(&topo.ns_proxy, p)?;
        let b0 = before.handoff_buckets();
        let b1 = after.handoff_buckets();
        let diff: Vec<(f64, f64)> = b1
            .iter()
            .map(|&(le, c)| {
                let c0 = b0.iter().find(|(l, _)| *l == le).map_or(0.0, |x| x.1);
                (le, c - c0)
            })
            .collect();
        let p50 = histogram_quantile(&diff, 0.5) * 1e6;
        let p99 = histogram_quantile(&diff, 0.99) * 1e6;
        samples.add(scenario, t, round, "handoff_p50_us", p50);
        samples.add(scenario, t, round, "handoff_p99_us", p99);
        samples.add(
            scenario,
            t,
            round,
            "handoff_count",
            diff.last().map_or(0.0, |x| x.1),
        );
        let d = delta(&after.handoffs(), &before.handoffs());
        let fallbacks: f64 = d.iter().filter(|(k, _)| *k != "ok").map(|(_, v)| v).sum();
        samples.add(scenario, t, round, "fallbacks", fallbacks);
        if fallbacks > 0.0 {
            notes.push(format!(
                "latency {} round {}: hand-offs {d:?}",
                t.name(),
                round + 1
            ));
        }
        let _ = write!(line, "; hand-off p50 {p50:.0} us p99 {p99:.0} us");
    }
    eprintln!("{line}");
    Ok(())
}

fn cps(
    args: &Args,
    topo: &Topo,
    pids: &Pids,
    t: Target,
    round: usize,
    samples: &mut Samples,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let s = |x: &str| x.to_string();
    let port = admin_port(t).unwrap_or(0);
    let pid = pids.proxy(t).ok_or("no proxy")?;
    let before = topo.scrape(&topo.ns_proxy, port)?.handoffs();
    // Let the previous scenario's flows settle (the hand-off socket agent's watch runs every
    // 500 ms).
    std::thread::sleep(Duration::from_millis(600));
    let th0 = thread_cpu(pid);
    let kids0 = children_cpu(pid);
    let c0 = cpu_s(pid);
    let w0 = Instant::now();
    let out = topo.role(
        &topo.ns_client,
        &[
            s(roles::SHORT),
            topo.addr(t),
            args.cps_clients.to_string(),
            s("0"),
            format!("{}", args.cps_secs),
        ],
        Duration::from_secs_f64(args.cps_secs + 30.0),
    )?;
    let wall = w0.elapsed().as_secs_f64();
    let c1 = cpu_s(pid);
    let kids1 = children_cpu(pid);
    let th1 = thread_cpu(pid);
    let after = topo.scrape(&topo.ns_proxy, port)?.handoffs();
    let f = fields(out.lines().next().unwrap_or(""));
    if let Some(e) = out.lines().find_map(|l| l.strip_prefix("first_error ")) {
        notes.push(format!(
            "cps {} round {}: client errors, first: {e}",
            t.name(),
            round + 1
        ));
    }
    let ok = f.get("ok").copied().unwrap_or(0.0);
    let client_wall = f.get("wall").copied().unwrap_or(f64::NAN);
    let rate = ok / client_wall;
    samples.add("cps", t, round, "conns_per_s", rate);
    samples.add(
        "cps",
        t,
        round,
        "client_errors",
        f.get("errors").copied().unwrap_or(f64::NAN),
    );
    samples.add(
        "cps",
        t,
        round,
        "client_p50_us",
        f.get("p50_us").copied().unwrap_or(f64::NAN),
    );
    samples.add(
        "cps",
        t,
        round,
        "client_p99_us",
        f.get("p99_us").copied().unwrap_or(f64::NAN),
    );
    samples.add("cps", t, round, "proxy_cpu_pct", (c1 - c0) / wall * 100.0);
    samples.add(
        "cps",
        t,
        round,
        "nft_cpu_pct",
        (kids1 - kids0) / wall * 100.0,
    );
    let mut busiest = (String::new(), 0.0);
    for (name, v) in &th1 {
        let d = v - th0.get(name).copied().unwrap_or(0.0);
        if d > busiest.1 {
            busiest = (name.clone(), d);
        }
    }
    samples.add(
        "cps",
        t,
        round,
        "busiest_thread_pct",
        busiest.1 / wall * 100.0,
    );
    let mut line = format!(
        "bench-dsr: round {} cps {:<18} {rate:7.0} conn/s, proxy CPU {:.0}% (busiest thread {} {:.0}%)",
        round + 1,
        t.name(),
        (c1 - c0) / wall * 100.0,
        busiest.0,
        busiest.1 / wall * 100.0
    );
    if t.is_dsr() {
        let d = delta(&after, &before);
        let hok = d.get("ok").copied().unwrap_or(0.0);
        let fallbacks: f64 = d.iter().filter(|(k, _)| *k != "ok").map(|(_, v)| v).sum();
        samples.add("cps", t, round, "handoffs_ok_per_s", hok / client_wall);
        samples.add("cps", t, round, "fallbacks", fallbacks);
        if fallbacks > 0.0 {
            notes.push(format!(
                "cps {} round {}: hand-offs {d:?}",
                t.name(),
                round + 1
            ));
        }
        let _ = write!(line, "; hand-offs {d:?}");
    }
    eprintln!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

struct Report<'a> {
    args: &'a Args,
    human: &'a str,
    load_before: String,
    load_after: String,
    elapsed: f64,
    samples: &'a Samples,
    notes: &'a [String],
    totals: BTreeMap<Target, BTreeMap<String, f64>>,
    agent_metrics: String,
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.is_infinite() {
        "> 1 s".into()
    } else {
        format!("{v:.digits$}")
    }
}

impl Report<'_> {
    fn all(&self, scenario: &str, t: Target, metric: &str, digits: usize) -> String {
        let v = self.samples.values(scenario, t, metric);
        v.iter()
            .map(|x| fmt(*x, digits))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn markdown(&self) -> String {
        let a = self.args;
        let sm = self.samples;
        let mut md = String::new();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let _ = writeln!(md, "# DSR benchmark — {}\n", self.human);
        let _ = writeln!(
            md,
            "Commit {}, kernel {}, {cores} cores, load average {} before / {} after, {:.0} s in all. \
             Reproduce: `sudo scripts/bench-dsr.sh --rounds {} --bulk-mib {} --short-conns {} \
             --isolated-conns {} --isolated-gap-ms {} --cps-secs {} --cps-clients {}`.\n",
            git_commit(),
            kernel.trim(),
            self.load_before,
            self.load_after,
            self.elapsed,
            a.rounds,
            a.bulk_mib,
            a.short_conns,
            a.isolated_conns,
            a.isolated_gap_ms,
            a.cps_secs,
            a.cps_clients
        );
        md.push_str(
            "Topology (docs/design.md §6): network namespaces client, proxy and b1 on one bridge \
             (veth, no netem); the VIP is a /32 of its own on the proxy's eth0 and sits on b1's \
             `lo` (arp_ignore=1, arp_announce=2); the proxy host runs a stateful nftables filter \
             (conntrack on). Three `shardproxy run --workers 1` on the proxy: VIP:7000 DSR to \
             `shardproxy agent --forward 127.0.0.1:9000`, VIP:7001 DSR to `shardproxy agent \
             --handoff-socket` (the bench's application receives the fd through \
             `shardproxy::dsr::Acceptor`), VIP:7002 spliced (backend without `agent=`); direct is \
             client → b1:9000. All processes share one machine's cores (other jobs were running \
             too: see the load average), so figures are relative, not absolute. Every value is \
             the median over the rounds; the per-round values follow in brackets and in \
             `samples.csv`.\n\n",
        );

        let direct = sm.median("bulk", Target::Direct, "gbit_s");
        let _ = writeln!(md, "## 1–2. One connection, {} MiB download\n", a.bulk_mib);
        md.push_str(
            "| target | Gbit/s | ratio to direct | proxy eth0 tx, % of the response | proxy CPU s/GiB | agent CPU s/GiB |\n\
             |---|---|---|---|---|---|\n",
        );
        for t in Target::ALL {
            let g = sm.median("bulk", t, "gbit_s");
            let _ = writeln!(
                md,
                "| {} | {} [{}] | {} | {} [{}] | {} | {} |",
                t.name(),
                fmt(g, 2),
                self.all("bulk", t, "gbit_s", 2),
                fmt(g / direct, 2),
                fmt(sm.median("bulk", t, "proxy_tx_pct"), 3),
                self.all("bulk", t, "proxy_tx_pct", 3),
                fmt(sm.median("bulk", t, "proxy_cpu_s_per_gib"), 3),
                fmt(sm.median("bulk", t, "agent_cpu_s_per_gib"), 3),
            );
        }
        md.push_str(
            "\nGbit/s: response bytes × 8 / (connect → EOF) at the client, which checks the byte \
             count, the whole first 4 MiB and three bytes of every read against the pattern. \
             CPU: the process's CPU-time clock (all threads); kernel work done in softirq \
             context (the proxy host's nftables forwarding of the client's ACKs under DSR, \
             or of every packet when spliced in the receive path) is charged to whatever runs \
             then, so it is not all in these figures. Each DSR transfer is checked to be \
             exactly one `ok` hand-off.\n\n",
        );

        let _ = writeln!(
            md,
            "## 3. Hand-off latency ({} sequential short connections per target and round)\n",
            a.short_conns
        );
        md.push_str(
            "| target | hand-off p50 µs | hand-off p99 µs | client connect→first byte p50 µs | p99 µs | max µs | client errors | fallbacks |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for t in Target::ALL {
            let _ = writeln!(
                md,
                "| {} | {} | {} [{}] | {} | {} [{}] | {} | {} | {} |",
                t.name(),
                fmt(sm.median("latency", t, "handoff_p50_us"), 0),
                fmt(sm.median("latency", t, "handoff_p99_us"), 0),
                self.all("latency", t, "handoff_p99_us", 0),
                fmt(sm.median("latency", t, "client_p50_us"), 0),
                fmt(sm.median("latency", t, "client_p99_us"), 0),
                self.all("latency", t, "client_p99_us", 0),
                fmt(sm.median("latency", t, "client_max_us"), 0),
                fmt(sm.total("latency", t, "client_errors"), 0),
                fmt(sm.total("latency", t, "fallbacks"), 0),
            );
        }
        if a.isolated_conns > 0 {
            for t in [Target::Forward, Target::Handoff] {
                let _ = writeln!(
                    md,
                    "| {} isolated ({} conns, {} ms apart) | {} | {} [{}] | {} | {} [{}] | {} | {} | {} |",
                    t.name(),
                    a.isolated_conns,
                    a.isolated_gap_ms,
                    fmt(sm.median("isolated", t, "handoff_p50_us"), 0),
                    fmt(sm.median("isolated", t, "handoff_p99_us"), 0),
                    self.all("isolated", t, "handoff_p99_us", 0),
                    fmt(sm.median("isolated", t, "client_p50_us"), 0),
                    fmt(sm.median("isolated", t, "client_p99_us"), 0),
                    self.all("isolated", t, "client_p99_us", 0),
                    fmt(sm.median("isolated", t, "client_max_us"), 0),
                    fmt(sm.total("isolated", t, "client_errors"), 0),
                    fmt(sm.total("isolated", t, "fallbacks"), 0),
                );
            }
        }
        md.push_str(
            "\nIsolated rows: the same connections with a pause after each, so a hand-off does \
             not queue behind the previous flow's removal in the proxy's steering helper. \
             Hand-off: the proxy's `shardproxy_dsr_handoff_duration_seconds` (freeze → steer), \
             the delta of the histogram over each round's connections, linearly interpolated \
             inside its bucket. Client: connect() → the application's first byte, which \
             includes the handshake, the header, the whole hand-off and the delivery.\n\n",
        );

        let _ = writeln!(
            md,
            "## 4. Short connections per second, `--workers 1` proxy, {} concurrent clients, {} s\n",
            a.cps_clients, a.cps_secs
        );
        md.push_str(
            "| target | connections/s | ok hand-offs/s | proxy CPU % | busiest proxy thread % | nft helper CPU % | client p50 µs | client p99 µs | client errors | fallbacks |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for t in [Target::Spliced, Target::Forward, Target::Handoff] {
            let _ = writeln!(
                md,
                "| {} | {} [{}] | {} | {} [{}] | {} | {} | {} | {} | {} | {} |",
                t.name(),
                fmt(sm.median("cps", t, "conns_per_s"), 0),
                self.all("cps", t, "conns_per_s", 0),
                fmt(sm.median("cps", t, "handoffs_ok_per_s"), 0),
                fmt(sm.median("cps", t, "proxy_cpu_pct"), 0),
                self.all("cps", t, "proxy_cpu_pct", 0),
                fmt(sm.median("cps", t, "busiest_thread_pct"), 0),
                fmt(sm.median("cps", t, "nft_cpu_pct"), 1),
                fmt(sm.median("cps", t, "client_p50_us"), 0),
                fmt(sm.median("cps", t, "client_p99_us"), 0),
                fmt(sm.total("cps", t, "client_errors"), 0),
                fmt(sm.total("cps", t, "fallbacks"), 0),
            );
        }
        md.push_str(
            "\nProxy CPU %: the process's CPU seconds over the window's wall time (100 % = one \
             core); busiest thread: its hungriest thread's share (`schedstat`). The nft helper \
             is the proxy's long-lived `nft` child process that applies steering updates. \
             Clients, application, agents and proxy all share the same cores.\n\n",
        );

        md.push_str("## Targets from issue 8\n\n| target | measured | met |\n|---|---|---|\n");
        let ratio = sm.median("bulk", Target::Handoff, "gbit_s") / direct;
        let fwd = sm.median("bulk", Target::Forward, "gbit_s");
        let spl = sm.median("bulk", Target::Spliced, "gbit_s");
        let tx_f = sm.median("bulk", Target::Forward, "proxy_tx_pct");
        let tx_h = sm.median("bulk", Target::Handoff, "proxy_tx_pct");
        let p99_f = sm.median("latency", Target::Forward, "handoff_p99_us");
        let p99_h = sm.median("latency", Target::Handoff, "handoff_p99_us");
        let yes = |b: bool| if b { "yes" } else { "**no**" };
        let _ = writeln!(
            md,
            "| handoff-socket ≥ 0.9× direct | {}× ({} vs {} Gbit/s) | {} |",
            fmt(ratio, 2),
            fmt(sm.median("bulk", Target::Handoff, "gbit_s"), 2),
            fmt(direct, 2),
            yes(ratio >= 0.9)
        );
        let _ = writeln!(
            md,
            "| forward ≥ spliced | {} vs {} Gbit/s ({}×) | {} |",
            fmt(fwd, 2),
            fmt(spl, 2),
            fmt(fwd / spl, 2),
            yes(fwd >= spl)
        );
        let _ = writeln!(
            md,
            "| proxy tx < 2 % of the response | forward {} %, handoff-socket {} % | {} |",
            fmt(tx_f, 3),
            fmt(tx_h, 3),
            yes(tx_f < 2.0 && tx_h < 2.0)
        );
        let _ = writeln!(
            md,
            "| hand-off p99 < 1 ms | forward {} µs, handoff-socket {} µs | {} |",
            fmt(p99_f, 0),
            fmt(p99_h, 0),
            yes(p99_f < 1000.0 && p99_h < 1000.0)
        );

        md.push_str("\n## Counters over the measured run\n\n");
        for (t, d) in &self.totals {
            let _ = writeln!(
                md,
                "- {} proxy `shardproxy_dsr_handoffs_total` delta: {d:?}",
                t.name()
            );
        }
        md.push_str(&self.agent_metrics);
        if !self.notes.is_empty() {
            md.push_str("\n## Notes and failures\n\n");
            for n in self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    fn csv(&self) -> String {
        let mut csv = String::from("scenario,target,round,metric,value\n");
        for s in &self.samples.0 {
            let _ = writeln!(
                csv,
                "{},{},{},{},{}",
                s.scenario,
                s.target.name(),
                s.round + 1,
                s.metric,
                s.value
            );
        }
        csv
    }
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_string())
}

/// (`2025-01-02T03-04-05Z` for a folder name, `2025-01-02 03:04:05 UTC` for people).
fn utc_stamp(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}-{m:02}-{s:02}Z"),
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC"),
    )
}
