//! End-to-end benchmark harness: shardproxy against HAProxy, against a minimal blocking splice
//! relay (the floor: what any relay pays on this kernel) and against no proxy at all — and,
//! opt-in, against itself with its membership coming from a real etcd while it changes once a
//! second (`shardproxy-churn`).
//!
//! Run it through `scripts/bench.sh` (installs HAProxy if missing, builds, runs), or as
//! `cargo bench --bench e2e -- [FLAGS]`; `--help` lists the flags.
//!
//! What it does:
//! 1. starts 3 backends in a separate process (a re-exec of this binary, see
//!    [`backend`]), named `b1`..`b3`, weight 1;
//! 2. for each round, for each scenario, for each target — **direct** (the client connects to
//!    the backend `shardproxy::Router` picks for the key and sends the same header),
//!    **shardproxy** (`--workers N`) and **HAProxy** (`nbthread N`), at N = 1 and at the
//!    defaults — and the **floor** relay (see [`floor`]; two threads per connection, so it
//!    skips `idle`) — starts a fresh proxy, runs the scenario with the same client code, reads
//!    the proxy's CPU time and peak RSS from `/proc`, and stops the proxy. The target order
//!    rotates by round, so drift of the machine hits every target alike;
//!    **shardproxy-churn** (only with `--proxies ...,shardproxy-churn`; needs `etcd` on PATH)
//!    is shardproxy at the same thread counts and `--shardproxy-args`, but started with
//!    `--membership etcd://.../bench` against one etcd the harness starts for the whole run
//!    (see [`etcd`]; seeded with the same `b1..b3` and addresses as plain shardproxy's
//!    `--backend` flags). While the scenario runs, a thread puts and deletes a weight-0
//!    backend `churn` once a second (first 0.5 s after the proxy is ready): routing stays the
//!    same, but every change is a full membership update in the proxy. After the scenario the
//!    proxy's `GET /membership` revision must reach the last write's (bounded, 3 s), else the
//!    run fails. With both `shardproxy@N` and `shardproxy-churn@N`, `results.md` has a
//!    "membership churn vs none" table: a same-session A/B for issue 10's "no measurable
//!    change in the data path while a change per second flows";
//! 3. checks that every key was answered by the same backend every time, per proxy kind
//!    (and, for direct, shardproxy, shardproxy-churn and the floor, by the backend
//!    `Router::pick` names), so a proxy that silently falls back to round-robin fails the run;
//! 4. writes `results.md`, `chart.svg` and `samples.csv` to `bench-results/<UTC time>/` and
//!    points the symlink `bench-results/latest` (git-ignored) at that folder.
//!
//! Scenarios: `bulk1` (one connection, backend → client), `echo1` (one connection, both ways),
//! `pingup` (the client uploads flat out while the backend sends an 8-byte timestamped ping
//! every 20 ms on the same connection: how long pings wait behind the upload), `rr32`/`rr1` (32/1 persistent connections, 64-byte request/response), `cps32` (32 clients:
//! connect, header, one 64-byte echo, close), `idle` (N established idle connections held
//! through the proxy: RSS and fds per connection).

#[path = "e2e/backend.rs"]
mod backend;
#[path = "e2e/chart.rs"]
mod chart;
#[path = "e2e/etcd.rs"]
mod etcd;
#[path = "e2e/floor.rs"]
mod floor;
#[path = "e2e/procs.rs"]
mod procs;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/scenarios.rs"]
mod scenarios;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shardproxy::Router;

use etcd::Etcd;
use procs::{Backends, Proxy, Scratch};
use report::{ChurnRun, Context, Run};
use scenarios::{Route, Scenario, Settings};

/// Flags of `cargo bench --bench e2e -- [FLAGS]` (and of `scripts/bench.sh`).
#[derive(Debug, Parser)]
#[command(
    name = "e2e",
    about = "End-to-end benchmark: direct vs shardproxy vs HAProxy vs a floor relay, \
             interleaved rounds"
)]
struct Args {
    /// Short smoke run: 1 round, small transfers, short windows, 1000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Rounds (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Scenarios to run, comma-separated: bulk1,echo1,pingup,rr32,rr1,cps32,idle (default:
    /// all).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Proxies to compare with direct, comma-separated: shardproxy,haproxy,floor,
    /// shardproxy-churn (default: shardproxy,haproxy,floor; floor is the minimal blocking
    /// splice relay, one thread count only; shardproxy-churn is shardproxy following a real
    /// etcd (needs `etcd` on PATH) while its membership changes once a second).
    #[arg(long, value_delimiter = ',')]
    proxies: Vec<String>,
    /// Proxy thread counts, comma-separated: numbers and/or `default` (default: 1,default).
    /// shardproxy (and shardproxy-churn) gets `--workers N`, HAProxy `nbthread N`; `default`
    /// passes neither.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<String>,
    /// Measured window of rr32/rr1/cps32, seconds (default 2; 0.5 with --quick).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up before each rr/cps window, seconds (default 0.3; 0.1 with --quick).
    #[arg(long)]
    warmup: Option<f64>,
    /// bulk1 size in MiB (default 2048; 256 with --quick).
    #[arg(long)]
    bulk_mib: Option<u64>,
    /// echo1 size in MiB each way (default 1024; 128 with --quick).
    #[arg(long)]
    echo_mib: Option<u64>,
    /// pingup upload time in seconds (default 4; 1 with --quick).
    #[arg(long)]
    pingup_secs: Option<f64>,
    /// idle connections (default 5000; 1000 with --quick).
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Results folder: each run writes `<out>/<UTC time>/` and points the symlink
    /// `<out>/latest` at it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// HAProxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy: PathBuf,
    /// shardproxy binary (default: the one cargo built with this bench).
    #[arg(long)]
    shardproxy: Option<PathBuf>,
    /// Extra arguments for `shardproxy run`, whitespace-separated (e.g. "--no-splice"), to
    /// compare a variant against HAProxy with the same harness (shardproxy-churn gets them
    /// too).
    #[arg(long, allow_hyphen_values = true)]
    shardproxy_args: Option<String>,
    /// No progress bar (per-run lines still go to stderr).
    #[arg(long)]
    no_progress: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Which proxy, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// No proxy.
    Direct,
    /// The floor relay (blocking splice, two threads per connection).
    Floor,
    /// shardproxy.
    Shardproxy,
    /// HAProxy.
    Haproxy,
    /// shardproxy with its membership from etcd, changing once a second.
    ShardproxyChurn,
}

impl Kind {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Floor => "floor",
            Kind::Shardproxy => "shardproxy",
            Kind::Haproxy => "haproxy",
            Kind::ShardproxyChurn => "shardproxy-churn",
        }
    }
}

/// One thing to measure: a proxy kind at a thread count (`None`: its default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The proxy.
    pub kind: Kind,
    /// `Some(n)`: `--workers n` / `nbthread n`; `None`: the proxy's default.
    pub threads: Option<usize>,
}

impl Target {
    /// Short id, e.g. `shardproxy@1`, `haproxy@default`, `direct`.
    pub fn id(&self) -> String {
        match (self.kind, self.threads) {
            (Kind::Direct, _) => "direct".into(),
            (Kind::Floor, _) => "floor".into(),
            (k, Some(n)) => format!("{}@{n}", k.name()),
            (k, None) => format!("{}@default", k.name()),
        }
    }

    /// Thread setting label: `N=1`, `default`.
    pub fn threads_label(&self) -> String {
        match (self.kind, self.threads) {
            (Kind::Direct, _) => "-".into(),
            (Kind::Floor, _) => "2/conn".into(),
            (_, Some(n)) => format!("N={n}"),
            (_, None) => "default".into(),
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(backend::ROLE_ARG) {
        backend::main(&argv[2..]);
    }
    if argv.get(1).map(String::as_str) == Some(floor::ROLE_ARG) {
        floor::main(&argv[2..]);
    }
    if argv.len() == 1 {
        // `cargo test --benches` / `--all-targets` runs bench binaries with no arguments
        // (`cargo bench` passes `--bench`): do not start a multi-minute benchmark then.
        println!("e2e: not run without arguments; use scripts/bench.sh or cargo bench --bench e2e");
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            procs::kill_all();
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let _ = shardproxy::proxy::sockopt::raise_fd_limit();
    procs::install_signal_handler();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));

    let q = args.quick;
    let rounds = args.rounds.unwrap_or(if q { 1 } else { 3 }).max(1);
    let settings = Settings {
        bulk_bytes: args.bulk_mib.unwrap_or(if q { 256 } else { 2048 }).max(1) << 20,
        echo_bytes: args.echo_mib.unwrap_or(if q { 128 } else { 1024 }).max(1) << 20,
        duration: secs(args.duration.unwrap_or(if q { 0.5 } else { 2.0 })),
        warmup: secs(args.warmup.unwrap_or(if q { 0.1 } else { 0.3 })),
        pingup: secs(args.pingup_secs.unwrap_or(if q { 1.0 } else { 4.0 })).max(secs(0.1)),
        idle_conns: args
            .idle_conns
            .unwrap_or(if q { 1000 } else { 5000 })
            .max(1),
    };
    let scenario_list: Vec<Scenario> = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios
            .iter()
            .map(|s| Scenario::parse(s.trim()).ok_or_else(|| format!("unknown scenario {s:?}")))
            .collect::<Result<_, _>>()?
    };
    let kinds: Vec<Kind> = if args.proxies.is_empty() {
        vec![Kind::Shardproxy, Kind::Haproxy, Kind::Floor]
    } else {
        args.proxies
            .iter()
            .map(|p| match p.trim() {
                "shardproxy" => Ok(Kind::Shardproxy),
                "haproxy" => Ok(Kind::Haproxy),
                "floor" => Ok(Kind::Floor),
                "shardproxy-churn" => Ok(Kind::ShardproxyChurn),
                other => Err(format!("unknown proxy {other:?}")),
            })
            .collect::<Result<_, _>>()?
    };
    let threads: Vec<Option<usize>> = if args.threads.is_empty() {
        vec![Some(1), None]
    } else {
        args.threads
            .iter()
            .map(|t| match t.trim() {
                "default" => Ok(None),
                n => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Some)
                    .ok_or_else(|| format!("bad thread count {n:?}")),
            })
            .collect::<Result<_, _>>()?
    };
    let mut targets = vec![Target {
        kind: Kind::Direct,
        threads: None,
    }];
    if kinds.contains(&Kind::Floor) {
        targets.push(Target {
            kind: Kind::Floor,
            threads: None,
        });
    }
    for t in &threads {
        for k in kinds.iter().filter(|k| **k != Kind::Floor) {
            targets.push(Target {
                kind: *k,
                threads: *t,
            });
        }
    }

    let shardproxy_bin = args
        .shardproxy
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_shardproxy")));
    let extra: Vec<String> = args
        .shardproxy_args
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let shardproxy_cmd = (shardproxy_bin.clone(), extra.clone());
    let churn = kinds.contains(&Kind::ShardproxyChurn);
    if churn && !Etcd::available() {
        return Err(
            "etcd not found (shardproxy-churn needs it): `apt-get install -y etcd-server`, \
             or run without shardproxy-churn in --proxies"
                .into(),
        );
    }
    if kinds.contains(&Kind::Haproxy) {
        let found = std::process::Command::new(&args.haproxy)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!(
                "{} not found: `apt-get install -y haproxy` (scripts/bench.sh does it), \
                 or run with --proxies shardproxy",
                args.haproxy.display()
            ));
        }
    }

    let out_base = args
        .out
        .clone()
        .unwrap_or_else(|| manifest.join("bench-results"));
    let stamp = utc_stamp(SystemTime::now());
    let out_dir = out_base.join(&stamp.0);
    let scratch = Scratch::new(&out_base).map_err(|e| format!("scratch dir: {e}"))?;

    let tw_start = procs::time_wait_sockets();
    let cpu_start = procs::cpu_accounting();
    let load_start = procs::loadavg();

    let backends = Backends::start(3).map_err(|e| format!("starting the backends: {e}"))?;
    let names = backends.names();
    let router =
        Router::new(names.iter().map(|n| (n.as_str(), 1))).map_err(|e| format!("router: {e}"))?;
    // One etcd for the whole run, seeded with the backends plain shardproxy gets as flags.
    let etcd = if churn {
        let e = Etcd::start(&scratch.0).map_err(|e| format!("starting etcd: {e}"))?;
        e.seed(&backends)
            .map_err(|e| format!("seeding etcd with the backends: {e}"))?;
        Some(e)
    } else {
        None
    };

    let per_round = scenario_list
        .iter()
        .map(|sc| targets.iter().filter(|t| runs_for(*sc, t)).count())
        .sum::<usize>();
    let total = (rounds * per_round) as u64;
    let progress = Progress::new(total, args.no_progress);
    progress.line(format!(
        "e2e: {rounds} round(s) × {} scenario(s) × {} target(s) → {}",
        scenario_list.len(),
        targets.len(),
        out_dir.display()
    ));

    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    let mut checker = RoutingCheck::default();
    for round in 1..=rounds {
        for &scenario in &scenario_list {
            let mut order: Vec<Target> = targets
                .iter()
                .copied()
                .filter(|t| runs_for(scenario, t))
                .collect();
            let shift = (round - 1) % order.len();
            order.rotate_left(shift);
            for target in order {
                progress.set_message(format!(
                    "round {round}/{rounds} {} {}",
                    scenario.name(),
                    target.id()
                ));
                let run = run_one(
                    round,
                    scenario,
                    target,
                    &settings,
                    &backends,
                    &router,
                    &shardproxy_cmd,
                    &args.haproxy,
                    etcd.as_ref(),
                    &scratch.0,
                );
                if let Ok(m) = &run.result {
                    checker.record(target.kind, &router, m);
                }
                progress.line(report::run_line(&run));
                runs.push(run);
                progress.inc();
                // Let the previous run's sockets (TIME_WAIT, teardown) settle.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    progress.finish();
    drop(etcd);
    drop(backends);
    let cpu_end = procs::cpu_accounting();
    let wall = started.elapsed().as_secs_f64();
    let foreign = ((cpu_end.0 - cpu_start.0) - (cpu_end.1 - cpu_start.1)).max(0.0);

    let ctx = Context {
        date: stamp.1,
        rounds,
        settings,
        targets: targets.clone(),
        scenarios: scenario_list,
        commit: git_commit(manifest),
        haproxy_version: if kinds.contains(&Kind::Haproxy) {
            procs::haproxy_version(&args.haproxy)
        } else {
            "not run".into()
        },
        etcd_version: churn.then(etcd_version),
        shardproxy_bin: if extra.is_empty() {
            shardproxy_bin.display().to_string()
        } else {
            format!("{} run … {}", shardproxy_bin.display(), extra.join(" "))
        },
        loadavg: (load_start, procs::loadavg()),
        command: reproduce_command(),
        elapsed: started.elapsed(),
        routing: checker.summary(&names),
        routing_violations: checker.violations.clone(),
        time_wait: (tw_start, procs::time_wait_sockets()),
        foreign_cpu: (foreign, foreign / wall.max(1e-9)),
    };
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    report::write_all(&out_dir, &ctx, &runs).map_err(|e| format!("writing results: {e}"))?;
    let latest = out_base.join("latest");
    point_latest(&latest, Path::new(&stamp.0))
        .map_err(|e| format!("pointing {} at {}: {e}", latest.display(), stamp.0))?;
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap_or_default();
    println!("{md}");
    println!("results: {}", out_dir.display());
    let failed = runs.iter().filter(|r| r.result.is_err()).count();
    if !checker.violations.is_empty() || failed > 0 {
        eprintln!(
            "e2e: {} routing violation(s), {failed} failed run(s): see results.md",
            checker.violations.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// One run: a fresh proxy (if any), the scenario, the proxy's `/proc` readings.
#[allow(clippy::too_many_arguments)]
fn run_one(
    round: usize,
    scenario: Scenario,
    target: Target,
    settings: &Settings,
    backends: &Backends,
    router: &Router,
    shardproxy: &(PathBuf, Vec<String>),
    haproxy_bin: &Path,
    etcd: Option<&Etcd>,
    scratch: &Path,
) -> Run {
    let mut run = Run {
        round,
        scenario,
        target,
        result: Err("not run".into()),
        hwm_kib: None,
        threads: None,
        churn: None,
    };
    let proxy = match target.kind {
        Kind::Direct => None,
        Kind::Shardproxy | Kind::ShardproxyChurn => {
            let churn = target.kind == Kind::ShardproxyChurn;
            // The churn target follows the harness's etcd instead of --backend flags.
            let membership = match (churn, etcd) {
                (false, _) => None,
                (true, Some(etcd)) => Some((etcd.url(), scratch.join("membership-cache.json"))),
                (true, None) => {
                    run.result = Err("shardproxy-churn without etcd".into());
                    return run;
                }
            };
            match Proxy::shardproxy(
                &shardproxy.0,
                &shardproxy.1,
                backends,
                membership.as_ref().map(|(u, c)| (u.as_str(), c.as_path())),
                target.threads,
                &scratch.join(format!("{}.log", target.kind.name())),
            ) {
                Ok(p) => Some(p),
                Err(e) => {
                    run.result = Err(format!("starting {}: {e}", target.kind.name()));
                    return run;
                }
            }
        }
        Kind::Haproxy => match Proxy::haproxy(haproxy_bin, backends, target.threads, scratch) {
            Ok(p) => Some(p),
            Err(e) => {
                run.result = Err(format!("starting haproxy: {e}"));
                return run;
            }
        },
        Kind::Floor => match Proxy::floor(backends, &scratch.join("floor.log")) {
            Ok(p) => Some(p),
            Err(e) => {
                run.result = Err(format!("starting the floor relay: {e}"));
                return run;
            }
        },
    };
    let route = match &proxy {
        None => Route::Direct {
            router,
            addrs: &backends.addrs,
        },
        Some(p) => Route::Proxy {
            addr: p.addr,
            pid: p.pid(),
        },
    };
    // shardproxy-churn: membership changes once a second while the scenario runs.
    let churn = match (target.kind, etcd) {
        (Kind::ShardproxyChurn, Some(etcd)) => match etcd::churn(etcd.client()) {
            Ok(c) => Some((
                c,
                etcd,
                procs::proc_stat(etcd.pid()).map_or(0.0, |s| s.cpu_s),
            )),
            Err(e) => {
                run.result = Err(format!("starting the churn thread: {e}"));
                return run;
            }
        },
        _ => None,
    };
    run.result =
        scenarios::run(scenario, &route, settings, backends.addrs[0]).map_err(|e| e.to_string());
    if let Some((c, etcd, cpu0)) = churn {
        let etcd_cpu_s = procs::proc_stat(etcd.pid()).map_or(0.0, |s| s.cpu_s) - cpu0;
        let admin = proxy.as_ref().and_then(|p| p.admin);
        if let Err(e) = finish_churn(&mut run, c, etcd, admin, etcd_cpu_s) {
            run.result = Err(match &run.result {
                Ok(_) => e,
                Err(first) => format!("{first}; then {e}"),
            });
        }
    }
    if let Some(p) = &proxy {
        if let Ok(st) = procs::proc_stat(p.pid()) {
            run.hwm_kib = Some(st.hwm_kib);
            run.threads = Some(st.threads);
        }
    }
    if scenario == Scenario::Idle && run.result.is_err() {
        // Normally done inside the scenario; make sure nothing stays parked.
        let _ = scenarios::drop_parked(backends.addrs[0]);
    }
    drop(proxy);
    run
}

/// Stops a churn run's thread, checks that the proxy (admin API `admin`) followed every
/// change, records the outcome in `run.churn`, and deletes the churn backend if the run left
/// it present (so every churn run starts from `b1..b3`; not counted as a change).
fn finish_churn(
    run: &mut Run,
    churn: etcd::Churn,
    etcd: &Etcd,
    admin: Option<std::net::SocketAddr>,
    etcd_cpu_s: f64,
) -> Result<(), String> {
    let outcome = churn.stop()?;
    if let Some(rev) = outcome.last_rev {
        etcd.wrote(rev);
    }
    let want = etcd.last_revision();
    let followed = match admin {
        Some(a) => etcd::wait_followed(a, want, Duration::from_secs(3)),
        None => Err("the proxy has no admin address".into()),
    };
    run.churn = Some(ChurnRun {
        changes: outcome.changes,
        revision: want,
        followed: followed.is_ok(),
        etcd_cpu_s,
    });
    let cleanup = if outcome.present {
        etcd.delete(etcd::CHURN_NAME)
            .map(|_| ())
            .map_err(|e| format!("deleting the churn backend after the run: {e}"))
    } else {
        Ok(())
    };
    if let Some(e) = outcome.error {
        return Err(e);
    }
    followed?;
    cleanup
}

/// `etcd --version`'s first line.
fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Which backend answered each key, per proxy kind, over every run.
#[derive(Default)]
struct RoutingCheck {
    seen: HashMap<(Kind, String), u8>,
    violations: Vec<String>,
}

impl RoutingCheck {
    fn record(&mut self, kind: Kind, router: &Router, m: &scenarios::Measured) {
        for c in &m.conflicts {
            self.violations
                .push(format!("{}: {c} (same run)", kind.name()));
        }
        for (key, &id) in &m.seen {
            if matches!(
                kind,
                Kind::Direct | Kind::Shardproxy | Kind::ShardproxyChurn | Kind::Floor
            ) {
                let want = router.pick(key.as_bytes()).map(|i| b'0' + i as u8);
                if want != Some(id) {
                    self.violations.push(format!(
                        "{}: key {key} answered by b{} but Router::pick says b{}",
                        kind.name(),
                        (id - b'0' + 1),
                        want.map_or(0, |w| w - b'0' + 1)
                    ));
                }
            }
            match self.seen.get(&(kind, key.clone())) {
                Some(&prev) if prev != id => self.violations.push(format!(
                    "{}: key {key} answered by b{} earlier, now by b{}",
                    kind.name(),
                    prev - b'0' + 1,
                    id - b'0' + 1
                )),
                Some(_) => {}
                None => {
                    self.seen.insert((kind, key.clone()), id);
                }
            }
        }
    }

    /// One line per kind: keys checked and their spread over the backends; flags a proxy that
    /// sends every key to one backend.
    fn summary(&mut self, names: &[String]) -> Vec<String> {
        let mut lines = Vec::new();
        for kind in [
            Kind::Direct,
            Kind::Floor,
            Kind::Shardproxy,
            Kind::ShardproxyChurn,
            Kind::Haproxy,
        ] {
            let mut per = vec![0usize; names.len()];
            for ((k, _), id) in &self.seen {
                if *k == kind {
                    if let Some(c) = per.get_mut(usize::from(id - b'0')) {
                        *c += 1;
                    }
                }
            }
            let keys: usize = per.iter().sum();
            if keys == 0 {
                continue;
            }
            let spread: Vec<String> = names
                .iter()
                .zip(&per)
                .map(|(n, c)| format!("{n} {c}"))
                .collect();
            lines.push(format!(
                "{}: {keys} distinct keys, each always on the same backend; spread {}",
                kind.name(),
                spread.join(", ")
            ));
            if keys >= 30 && per.contains(&0) {
                self.violations.push(format!(
                    "{}: a backend got no key at all ({})",
                    kind.name(),
                    spread.join(", ")
                ));
            }
        }
        lines
    }
}

/// The progress bar (stderr), plus per-run lines that also show when stderr is not a
/// terminal.
struct Progress {
    bar: ProgressBar,
    tty: bool,
}

impl Progress {
    fn new(total: u64, disabled: bool) -> Self {
        let tty = std::io::stderr().is_terminal() && !disabled;
        let bar = ProgressBar::new(total);
        if tty {
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Progress { bar, tty }
    }

    fn line(&self, s: String) {
        if self.tty {
            self.bar.println(s);
        } else {
            eprintln!(
                "[{}/{}] {s}",
                self.bar.position(),
                self.bar.length().unwrap_or(0)
            );
        }
    }

    fn set_message(&self, s: String) {
        self.bar.set_message(s);
    }

    fn inc(&self) {
        self.bar.inc(1);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 3600.0))
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

fn git_commit(dir: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    match git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ]) {
        Some(s) if !s.is_empty() => format!("{head} + uncommitted changes under src/"),
        _ => head,
    }
}

/// The command that reproduces this run, as `scripts/bench.sh` takes it.
fn reproduce_command() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        "scripts/bench.sh".into()
    } else {
        format!("scripts/bench.sh {}", args.join(" "))
    }
}

/// Whether `target` runs `scenario`: the floor relay skips `idle` (two threads and six fds
/// per connection: 5000 idle connections would be 10000 threads and 30000 fds, over the
/// 20000 fd limit this harness is built for).
pub fn runs_for(scenario: Scenario, target: &Target) -> bool {
    !(scenario == Scenario::Idle && target.kind == Kind::Floor)
}

/// Points the symlink `latest` at `dir` (a name relative to the symlink's folder), replacing
/// an older symlink — or an older copied folder of that name.
fn point_latest(latest: &Path, dir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(latest) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(latest)?,
        Ok(_) => std::fs::remove_file(latest)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(dir, latest)
}
