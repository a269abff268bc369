//! Results: per-run lines, medians over rounds, `results.md`, `samples.csv` and
//! `chart.svg` (plotters).
//!
//! Ratios are paired by round: the median over rounds of (target ÷ direct in the same round),
//! and of (target ÷ floor relay in the same round), so drift between rounds cancels. CPU is
//! the proxy's on-CPU time over the measured window; peak RSS is its VmHWM (the proxy is
//! restarted for every run, so that is the run's peak).
//!
//! With both `shardproxy@N` and `shardproxy-churn@N`, a "membership churn vs none" table
//! pairs them the same way: per round, churn ÷ plain of each scenario's main number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::chart::chart;
use crate::scenarios::{Measured, Scenario, Settings};
use crate::{Kind, Target};

/// One run's outcome.
pub struct Run {
    /// Round, from 1.
    pub round: usize,
    /// Scenario.
    pub scenario: Scenario,
    /// Target.
    pub target: Target,
    /// Measurements, or why the run failed.
    pub result: Result<Measured, String>,
    /// The proxy's VmHWM at the end of the run, KiB.
    pub hwm_kib: Option<u64>,
    /// The proxy's thread count at the end of the run.
    pub threads: Option<u64>,
    /// shardproxy-churn: the membership changes made during the run.
    pub churn: Option<ChurnRun>,
}

/// What a shardproxy-churn run did to the membership.
#[derive(Debug, Clone, Copy)]
pub struct ChurnRun {
    /// Membership changes (puts and deletes of the weight-0 backend) while the scenario ran.
    pub changes: u64,
    /// The etcd revision of the last write, which the proxy had to reach.
    pub revision: i64,
    /// Whether `GET /membership` reached `revision` within the bound.
    pub followed: bool,
    /// etcd's CPU seconds over the scenario.
    pub etcd_cpu_s: f64,
}

impl ChurnRun {
    /// `churn: 2 changes, followed (rev 9)`.
    pub fn describe(&self) -> String {
        let changes = match self.changes {
            0 => "0 changes (the scenario ended before the first, 0.5 s in)".to_string(),
            1 => "1 change".to_string(),
            n => format!("{n} changes"),
        };
        format!(
            "churn: {changes}, {} (rev {}), etcd cpu {:.2}s",
            if self.followed {
                "followed"
            } else {
                "NOT followed"
            },
            self.revision,
            self.etcd_cpu_s
        )
    }
}

/// Everything the report states besides the numbers.
pub struct Context {
    /// Start time, UTC.
    pub date: String,
    /// Rounds.
    pub rounds: usize,
    /// Sizes and durations.
    pub settings: Settings,
    /// Targets, in their base order.
    pub targets: Vec<Target>,
    /// Scenarios run.
    pub scenarios: Vec<Scenario>,
    /// Commit of the tree.
    pub commit: String,
    /// `haproxy -v`.
    pub haproxy_version: String,
    /// `etcd --version`, when shardproxy-churn ran.
    pub etcd_version: Option<String>,
    /// The shardproxy binary.
    pub shardproxy_bin: String,
    /// How to reproduce.
    pub command: String,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Routing check summary lines.
    pub routing: Vec<String>,
    /// Routing violations.
    pub routing_violations: Vec<String>,
    /// Sockets in TIME_WAIT at the start and at the end.
    pub time_wait: (usize, usize),
    /// CPU seconds used by other programs during the run, and the average number of cores.
    pub foreign_cpu: (f64, f64),
    /// 1-minute load average at the start and at the end.
    pub loadavg: (f64, f64),
}

/// One line per run, for the log above the progress bar.
pub fn run_line(r: &Run) -> String {
    let head = format!(
        "r{} {:<6} {:<20}",
        r.round,
        r.scenario.name(),
        r.target.id()
    );
    let churn = r
        .churn
        .map_or_else(String::new, |c| format!("  {}", c.describe()));
    match &r.result {
        Err(e) => format!("{head} FAILED: {e}{churn}"),
        Ok(m) => {
            let mut s = format!("{head} {} {}", fmt_num(m.figure), r.scenario.unit());
            if let Some([p50, p99, p999]) = m.lat_us {
                let _ = write!(s, "  p50/p99/p99.9 {p50:.0}/{p99:.0}/{p999:.0} µs");
            }
            if let Some([p50, p99, max]) = m.ping_us {
                let _ = write!(
                    s,
                    "  ping p50/p99/max {:.1}/{:.1}/{:.1} ms",
                    p50 / 1000.0,
                    p99 / 1000.0,
                    max / 1000.0
                );
            }
            if let Some(b) = m.rss_per_conn {
                let _ = write!(s, "  {b:.0} B/conn");
            }
            if let Some(f) = m.fds_per_conn {
                let _ = write!(s, "  {f:.2} fds/conn");
            }
            if let Some(c) = m.cpu_s {
                let _ = write!(s, "  cpu {c:.2}s");
            }
            if let Some(h) = r.hwm_kib {
                let _ = write!(s, "  peak {:.1} MiB", h as f64 / 1024.0);
            }
            s.push_str(&churn);
            s
        }
    }
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians over rounds for one (scenario, target).
#[derive(Debug, Clone, Default)]
pub struct Agg {
    /// Successful rounds.
    pub ok: usize,
    /// Failed rounds.
    pub failed: usize,
    /// Headline figure.
    pub figure: Option<f64>,
    /// Smallest and largest headline figure over the rounds (shown when > 1 round).
    pub range: Option<(f64, f64)>,
    /// Median of per-round target ÷ direct.
    pub ratio: Option<f64>,
    /// Median of per-round target ÷ floor relay.
    pub floor_ratio: Option<f64>,
    /// Median of per-round (proxy CPU per unit ÷ the floor relay's CPU per unit).
    pub cpu_vs_floor: Option<f64>,
    /// pingup: ping delay, µs: p50, p99, max (each the median over rounds).
    pub ping: [Option<f64>; 3],
    /// Latency percentiles, µs.
    pub lat: [Option<f64>; 3],
    /// Median of per-round (p50 − direct p50), µs.
    pub p50_delta: Option<f64>,
    /// Proxy CPU seconds.
    pub cpu_s: Option<f64>,
    /// Proxy CPU seconds per GiB forwarded (bulk1, echo1).
    pub cpu_per_gib: Option<f64>,
    /// Proxy CPU µs per request / connection (rr, cps, idle).
    pub cpu_us_per_op: Option<f64>,
    /// Peak RSS, MiB.
    pub hwm_mib: Option<f64>,
    /// idle: bytes of proxy RSS per connection.
    pub rss_per_conn: Option<f64>,
    /// idle: proxy fds per connection.
    pub fds_per_conn: Option<f64>,
    /// Threads observed in the proxy.
    pub threads: Option<u64>,
    /// shardproxy-churn: membership changes per run (median over the successful rounds).
    pub churn_changes: Option<f64>,
}

/// Proxy CPU per unit of the scenario: seconds per GiB forwarded (bulk1, echo1, pingup),
/// µs per request or connection (rr, cps, idle).
fn cpu_per_unit(scenario: Scenario, m: &Measured) -> Option<f64> {
    match scenario {
        Scenario::Bulk1 | Scenario::Echo1 | Scenario::Pingup if m.bytes > 0 => {
            Some(m.cpu_s? / (m.bytes as f64 / (1u64 << 30) as f64))
        }
        Scenario::Rr32 | Scenario::Rr1 | Scenario::Cps32 | Scenario::Idle if m.ops > 0 => {
            Some(m.cpu_s? * 1e6 / m.ops as f64)
        }
        _ => None,
    }
}

/// Aggregates every (scenario, target).
pub fn aggregate(runs: &[Run]) -> BTreeMap<(Scenario, Target), Agg> {
    let same_round = |kind: Kind, scenario: Scenario, round: usize| {
        runs.iter()
            .find(|r| r.scenario == scenario && r.round == round && r.target.kind == kind)
            .and_then(|r| r.result.as_ref().ok())
    };
    let direct = |scenario: Scenario, round: usize| same_round(Kind::Direct, scenario, round);
    let floor = |scenario: Scenario, round: usize| same_round(Kind::Floor, scenario, round);
    let mut groups: BTreeMap<(Scenario, Target), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        groups.entry((r.scenario, r.target)).or_default().push(r);
    }
    let mut out = BTreeMap::new();
    for ((scenario, target), rs) in groups {
        let oks: Vec<(usize, &Measured, &Run)> = rs
            .iter()
            .filter_map(|r| r.result.as_ref().ok().map(|m| (r.round, m, *r)))
            .collect();
        let col = |f: &dyn Fn(usize, &Measured, &Run) -> Option<f64>| {
            median(
                oks.iter()
                    .filter_map(|(round, m, r)| f(*round, m, r))
                    .collect(),
            )
        };
        let agg = Agg {
            ok: oks.len(),
            failed: rs.len() - oks.len(),
            figure: col(&|_, m, _| Some(m.figure)),
            range: oks
                .iter()
                .map(|(_, m, _)| m.figure)
                .fold(None, |r, x| match r {
                    None => Some((x, x)),
                    Some((lo, hi)) => Some((f64::min(lo, x), f64::max(hi, x))),
                }),
            ratio: col(&|round, m, _| {
                direct(scenario, round)
                    .filter(|d| d.figure > 0.0)
                    .map(|d| m.figure / d.figure)
            }),
            floor_ratio: col(&|round, m, _| {
                floor(scenario, round)
                    .filter(|f| f.figure > 0.0)
                    .map(|f| m.figure / f.figure)
            }),
            cpu_vs_floor: col(&|round, m, _| {
                let f = cpu_per_unit(scenario, floor(scenario, round)?)?;
                let c = cpu_per_unit(scenario, m)?;
                (f > 0.0).then(|| c / f)
            }),
            ping: [0, 1, 2].map(|i| col(&|_, m, _| m.ping_us.map(|l| l[i]))),
            lat: [0, 1, 2].map(|i| col(&|_, m, _| m.lat_us.map(|l| l[i]))),
            p50_delta: col(&|round, m, _| {
                let d = direct(scenario, round)?.lat_us?[0];
                Some(m.lat_us?[0] - d)
            }),
            cpu_s: col(&|_, m, _| m.cpu_s),
            cpu_per_gib: col(&|_, m, _| match scenario {
                Scenario::Bulk1 | Scenario::Echo1 | Scenario::Pingup => cpu_per_unit(scenario, m),
                _ => None,
            }),
            cpu_us_per_op: col(&|_, m, _| match scenario {
                Scenario::Rr32 | Scenario::Rr1 | Scenario::Cps32 | Scenario::Idle => {
                    cpu_per_unit(scenario, m)
                }
                _ => None,
            }),
            hwm_mib: col(&|_, _, r| r.hwm_kib.map(|k| k as f64 / 1024.0)),
            rss_per_conn: col(&|_, m, _| m.rss_per_conn),
            fds_per_conn: col(&|_, m, _| m.fds_per_conn),
            threads: oks.iter().filter_map(|(_, _, r)| r.threads).max(),
            churn_changes: col(&|_, _, r| r.churn.map(|c| c.changes as f64)),
        };
        out.insert((scenario, target), agg);
    }
    out
}

/// Writes `results.md`, `samples.csv` and `chart.svg` into `dir`.
pub fn write_all(dir: &Path, ctx: &Context, runs: &[Run]) -> io::Result<()> {
    let aggs = aggregate(runs);
    fs::write(dir.join("results.md"), markdown(ctx, runs, &aggs))?;
    fs::write(dir.join("samples.csv"), csv(runs))?;
    if let Err(e) = chart(&dir.join("chart.svg"), ctx, &aggs) {
        eprintln!("e2e: chart not written: {e}");
    }
    Ok(())
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "–".into(), f)
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn target_label(t: &Target, aggs: &BTreeMap<(Scenario, Target), Agg>) -> String {
    match (t.kind, t.threads) {
        (Kind::Direct, _) => "direct".into(),
        (Kind::Floor, _) => "floor relay".into(),
        (k, Some(n)) => format!("{} N={n}", k.name()),
        (k, None) => {
            let _ = aggs;
            format!("{} default (N={})", k.name(), default_threads())
        }
    }
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn observed_threads(aggs: &BTreeMap<(Scenario, Target), Agg>, t: &Target) -> String {
    let max = aggs
        .iter()
        .filter(|((_, tt), _)| tt == t)
        .filter_map(|(_, a)| a.threads)
        .max();
    max.map_or_else(|| "?".into(), |n| n.to_string())
}

fn markdown(ctx: &Context, runs: &[Run], aggs: &BTreeMap<(Scenario, Target), Agg>) -> String {
    let s = &ctx.settings;
    let mut md = String::new();
    let _ = writeln!(md, "# shardproxy end-to-end benchmark — {}\n", ctx.date);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| date | {} |", ctx.date);
    let _ = writeln!(md, "| kernel | Linux {} |", kernel());
    let _ = writeln!(
        md,
        "| CPU | {} × {} cores |",
        cpu_model(),
        default_threads()
    );
    let _ = writeln!(md, "| commit | {} |", ctx.commit);
    let _ = writeln!(md, "| haproxy | {} |", ctx.haproxy_version);
    if let Some(v) = &ctx.etcd_version {
        let _ = writeln!(
            md,
            "| etcd | {v} (one member for the whole run, same machine) |"
        );
    }
    let _ = writeln!(md, "| shardproxy | `{}` |", ctx.shardproxy_bin);
    let _ = writeln!(
        md,
        "| rounds | {} interleaved (each round runs every scenario against every target; the \
         target order rotates by round); wall time {:.0} s |",
        ctx.rounds,
        ctx.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| sizes | bulk1 {} MiB; echo1 {} MiB each way; rr/cps window {:.1} s after {:.1} s \
         warm-up; pingup {:.1} s upload; idle {} connections |",
        s.bulk_bytes >> 20,
        s.echo_bytes >> 20,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.pingup.as_secs_f64(),
        s.idle_conns
    );
    let mut threads = Vec::new();
    for t in &ctx.targets {
        match (t.kind, t.threads) {
            (Kind::Direct, _) => {}
            (Kind::Floor, _) => threads.push(format!(
                "floor relay: two threads per connection plus an accept thread (observed up to \
                 {} threads at the end of a run)",
                observed_threads(aggs, t)
            )),
            (Kind::Shardproxy, Some(n)) => threads.push(format!(
                "shardproxy N={n}: `--workers {n}` (observed {} threads)",
                observed_threads(aggs, t)
            )),
            (Kind::Shardproxy, None) => threads.push(format!(
                "shardproxy default: no `--workers`, tokio's one worker per core = {} (observed \
                 {} threads)",
                default_threads(),
                observed_threads(aggs, t)
            )),
            (Kind::Haproxy, Some(n)) => threads.push(format!(
                "haproxy N={n}: `nbthread {n}` (observed {} threads)",
                observed_threads(aggs, t)
            )),
            (Kind::ShardproxyChurn, Some(n)) => threads.push(format!(
                "shardproxy-churn N={n}: `--workers {n}` (observed {} threads)",
                observed_threads(aggs, t)
            )),
            (Kind::ShardproxyChurn, None) => threads.push(format!(
                "shardproxy-churn default: no `--workers` (observed {} threads)",
                observed_threads(aggs, t)
            )),
            (Kind::Haproxy, None) => threads.push(format!(
                "haproxy default: no `nbthread`, one thread per core = {} (observed {} threads)",
                default_threads(),
                observed_threads(aggs, t)
            )),
        }
    }
    let _ = writeln!(md, "| thread counts | {} |", threads.join("; "));
    if ctx.targets.iter().any(|t| t.kind == Kind::Floor) {
        let _ = writeln!(
            md,
            "| floor relay | the anchor for what any relay pays on this kernel: a minimal \
             blocking splice relay in the harness (`benches/e2e/floor.rs`, its own process), \
             two threads per connection, a 1 MiB pipe and blocking `splice(2)` per direction, \
             no event loop (threads and pipes are reused across connections); routes with \
             `shardproxy::Router` like shardproxy. Skips idle: two threads and six fds per \
             connection are 10000 threads and 30000 fds at the default 5000 connections, \
             over the 20000 fd limit |"
        );
    }
    if ctx.targets.iter().any(|t| t.kind == Kind::ShardproxyChurn) {
        let _ = writeln!(md, "| shardproxy-churn | {} |", CHURN_DESCRIPTION);
    }
    let _ = writeln!(
        md,
        "| other load | ≈ {:.0} CPU s used by other programs during the run (≈ {:.2} of {} \
         cores on average; /proc/stat busy time minus this harness and its children, a rough \
         estimate); 1-minute load average {:.1} at start, {:.1} at end{} |",
        ctx.foreign_cpu.0,
        ctx.foreign_cpu.1,
        default_threads(),
        ctx.loadavg.0,
        ctx.loadavg.1,
        if ctx.foreign_cpu.1 > 0.1 * default_threads() as f64 {
            ": **the machine was shared, expect noise**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| TIME_WAIT sockets | {} at start, {} at end |",
        ctx.time_wait.0, ctx.time_wait.1
    );
    let flags = ctx.command.trim_start_matches("scripts/bench.sh").trim();
    let cargo = if flags.is_empty() {
        "cargo bench --bench e2e".to_string()
    } else {
        format!("cargo bench --bench e2e -- {flags}")
    };
    let _ = writeln!(
        md,
        "| reproduce | `{}` (= `cargo build --release && {cargo}`) |",
        ctx.command
    );
    let _ = writeln!(md);

    let _ = writeln!(md, "## Results (medians over {} rounds)\n", ctx.rounds);
    let _ = writeln!(
        md,
        "| scenario | target | figure | × direct | × floor | p50 / p99 / p99.9 µs | proxy CPU s | proxy CPU per unit | peak RSS MiB | notes |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---|---:|---:|---:|---|");
    let has_floor = ctx.targets.iter().any(|t| t.kind == Kind::Floor);
    for sc in &ctx.scenarios {
        for t in &ctx.targets {
            let Some(a) = aggs.get(&(*sc, *t)) else {
                continue;
            };
            let mut figure = opt(a.figure, |x| format!("{} {}", fmt_num(x), sc.unit()));
            if let Some((lo, hi)) = a.range.filter(|_| a.ok > 1) {
                let _ = write!(figure, " ({}–{})", fmt_num(lo), fmt_num(hi));
            }
            let ratio = if t.kind == Kind::Direct {
                "1".into()
            } else {
                opt(a.ratio, |x| format!("{x:.2}×"))
            };
            let floor_ratio = if !has_floor {
                "–".into()
            } else if t.kind == Kind::Floor {
                "1".into()
            } else {
                opt(a.floor_ratio, |x| format!("{x:.2}×"))
            };
            let lat = match (a.lat, a.ping) {
                (_, [Some(p50), Some(p99), Some(max)]) => format!(
                    "ping {:.1} / {:.1} / max {:.1} ms",
                    p50 / 1000.0,
                    p99 / 1000.0,
                    max / 1000.0
                ),
                ([Some(p50), Some(p99), Some(p999)], _) => {
                    let mut l = format!("{p50:.0} / {p99:.0} / {p999:.0}");
                    if t.kind != Kind::Direct {
                        if let Some(d) = a.p50_delta {
                            let _ = write!(l, " (p50 {d:+.0})");
                        }
                    }
                    l
                }
                _ => "–".into(),
            };
            let per_unit = match sc {
                Scenario::Bulk1 | Scenario::Echo1 | Scenario::Pingup => {
                    opt(a.cpu_per_gib, |x| format!("{x:.2} s/GiB"))
                }
                Scenario::Rr32 | Scenario::Rr1 => {
                    opt(a.cpu_us_per_op, |x| format!("{x:.1} µs/req"))
                }
                Scenario::Cps32 | Scenario::Idle => {
                    opt(a.cpu_us_per_op, |x| format!("{x:.1} µs/conn"))
                }
            };
            let mut notes = Vec::new();
            if let Some(b) = a.rss_per_conn {
                notes.push(format!("**{:.0} B RSS/conn** ({:.2} KiB)", b, b / 1024.0));
            }
            if let Some(f) = a.fds_per_conn {
                notes.push(format!("{f:.2} fds/conn"));
            }
            if let Some(c) = a.churn_changes {
                let plural = if c == 1.0 { "" } else { "s" };
                notes.push(format!("churn: {c:.0} change{plural}/run, followed"));
            }
            if a.failed > 0 {
                notes.push(format!("{} of {} rounds FAILED", a.failed, a.failed + a.ok));
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                sc.name(),
                target_label(t, aggs),
                figure,
                ratio,
                floor_ratio,
                lat,
                opt(a.cpu_s, |x| format!("{x:.2}")),
                per_unit,
                opt(a.hwm_mib, |x| format!("{x:.1}")),
                notes.join("; ")
            );
        }
    }
    let _ = writeln!(md);
    if !runs_skipped(ctx).is_empty() {
        let _ = writeln!(md, "Not run: {}.\n", runs_skipped(ctx).join(", "));
    }
    against_floor(&mut md, ctx, aggs);
    goals(&mut md, ctx, aggs);
    churn_vs_none(&mut md, ctx, runs);

    let _ = writeln!(md, "## Routing check\n");
    if ctx.routing_violations.is_empty() {
        let _ = writeln!(
            md,
            "Passed: every key was answered by the same backend in every run of its proxy \
             kind (both thread settings), and for direct, shardproxy, shardproxy-churn and \
             the floor relay by the backend `shardproxy::Router::pick` names.\n"
        );
    } else {
        let _ = writeln!(
            md,
            "**FAILED** ({} violations; first 20):\n",
            ctx.routing_violations.len()
        );
        for v in ctx.routing_violations.iter().take(20) {
            let _ = writeln!(md, "- {v}");
        }
        let _ = writeln!(md);
    }
    for l in &ctx.routing {
        let _ = writeln!(md, "- {l}");
    }
    let _ = writeln!(md);

    let failed: Vec<&Run> = runs.iter().filter(|r| r.result.is_err()).collect();
    if !failed.is_empty() {
        let _ = writeln!(md, "## Failed runs\n");
        for r in failed {
            let _ = writeln!(md, "- {}", run_line(r));
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(
        md,
        "## How to read this\n\n\
         - **figure**: bulk1 GiB/s backend → client (one connection); echo1 GiB/s each way \
         (one connection, both directions at once, every byte compared); rr32/rr1 requests/s \
         over 32/1 persistent connections (64-byte request, 64-byte response); cps32 \
         connections/s by 32 clients each doing connect + header + 64-byte echo + close (the \
         backend closes first, so TIME_WAIT stays on the server side); idle the rate at which \
         the connections were set up (8 openers). In brackets: the smallest and largest round.\n\
         - **× direct**: median over rounds of (target ÷ direct in the same round); **× \
         floor** the same against the floor relay.\n\
         - **floor relay**: a minimal blocking splice relay (two threads per connection, a \
         1 MiB pipe and blocking `splice(2)` per direction, no event loop, no timeouts): what \
         any relay pays on this kernel for two TCP connections and the copies between them. A \
         proxy at 1.00× floor moves data as well as a relay can without doing more work; CPU \
         ÷ floor is the proxy's CPU per unit over the floor's.\n\
         - **pingup**: one connection; the client uploads flat out (figure: GiB/s up) while \
         the backend writes an 8-byte ping carrying its `CLOCK_MONOTONIC` send time every \
         20 ms; the client stamps each on arrival (same clock, one machine). The latency \
         column shows the ping delay p50 / p99 / max over the pings sent during the upload: \
         how long the backend → client direction waits behind the other.\n\
         - **latency**: per request (rr) or per whole connection (cps), measured by the client; \
         `(p50 +x)` is the median over rounds of (p50 − direct p50).\n\
         - **proxy CPU**: on-CPU time of the proxy process over the measured window, threads \
         that exited included (its CPU-time clock, `clock_getcpuclockid`, nanoseconds; the \
         same basis as `/proc/<pid>/task/*/schedstat` and utime + stime); per unit: \
         bulk1/echo1/pingup per GiB forwarded (echo1 counts both directions), rr per request, \
         cps/idle per connection.\n\
         - **peak RSS**: the proxy's VmHWM at the end of the run; every run starts a fresh \
         proxy.\n\
         - **idle**: (proxy VmRSS with all connections established − VmRSS before) ÷ \
         connections, and the same for `/proc/<pid>/fd` entries.\n\
         - Everything runs on one machine: the client, the 3 backends (a separate process, \
         blocking threads) and the proxy share its cores, so a proxy's CPU use also slows the \
         client and backends. Raw numbers per run: `samples.csv`; chart: `chart.svg`.\n"
    );
    md
}

/// One goal of the issue: how to read it off an aggregate and how to judge it.
struct Goal {
    goal: &'static str,
    sc: Scenario,
    get: fn(&Agg) -> Option<f64>,
    /// `x` ratio, `us` µs delta, `B` bytes, `s` s/GiB, else plain.
    unit: &'static str,
    /// The absolute goal, if any.
    limit: Option<f64>,
    lower: bool,
}

impl Goal {
    fn new(
        goal: &'static str,
        sc: Scenario,
        get: fn(&Agg) -> Option<f64>,
        unit: &'static str,
        limit: Option<f64>,
        lower: bool,
    ) -> Self {
        Goal {
            goal,
            sc,
            get,
            unit,
            limit,
            lower,
        }
    }
}

/// The goals, per thread setting: shardproxy's value, HAProxy's, pass or miss.
fn goals(md: &mut String, ctx: &Context, aggs: &BTreeMap<(Scenario, Target), Agg>) {
    let mut settings: Vec<Option<usize>> = Vec::new();
    for t in &ctx.targets {
        if !matches!(t.kind, Kind::Direct | Kind::Floor) && !settings.contains(&t.threads) {
            settings.push(t.threads);
        }
    }
    let has = |k: Kind| ctx.targets.iter().any(|t| t.kind == k);
    if settings.is_empty() || !has(Kind::Shardproxy) {
        return;
    }
    let _ = writeln!(md, "## Goals (shardproxy vs HAProxy at equal threads)\n");
    let mut header = "| goal |".to_string();
    let mut rule = "|---|".to_string();
    for th in &settings {
        let label = th.map_or_else(
            || format!("default (N={})", default_threads()),
            |n| format!("N={n}"),
        );
        let _ = write!(header, " {label}: shardproxy | haproxy | met? |");
        rule.push_str("---:|---:|---|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    let rows = [
        Goal::new(
            "bulk1 ≥ 0.70× direct",
            Scenario::Bulk1,
            |a| a.ratio,
            "x",
            Some(0.70),
            false,
        ),
        Goal::new(
            "echo1 ≥ 0.70× direct",
            Scenario::Echo1,
            |a| a.ratio,
            "x",
            Some(0.70),
            false,
        ),
        Goal::new(
            "pingup max ping delay (lower wins)",
            Scenario::Pingup,
            |a| a.ping[2],
            "ms",
            None,
            true,
        ),
        Goal::new(
            "rr32 ≥ 0.50× direct",
            Scenario::Rr32,
            |a| a.ratio,
            "x",
            Some(0.50),
            false,
        ),
        Goal::new(
            "rr1 faster than HAProxy",
            Scenario::Rr1,
            |a| a.ratio,
            "x",
            None,
            false,
        ),
        Goal::new(
            "rr1 p50 ≤ direct + 15 µs",
            Scenario::Rr1,
            |a| a.p50_delta,
            "us",
            Some(15.0),
            true,
        ),
        Goal::new(
            "cps32 ≥ 0.85× direct",
            Scenario::Cps32,
            |a| a.ratio,
            "x",
            Some(0.85),
            false,
        ),
        Goal::new(
            "idle ≤ 2 KiB RSS/conn",
            Scenario::Idle,
            |a| a.rss_per_conn,
            "B",
            Some(2048.0),
            true,
        ),
        Goal::new(
            "idle fds/conn (lower wins)",
            Scenario::Idle,
            |a| a.fds_per_conn,
            "n",
            None,
            true,
        ),
        Goal::new(
            "bulk1 CPU/GiB below HAProxy",
            Scenario::Bulk1,
            |a| a.cpu_per_gib,
            "s",
            None,
            true,
        ),
        Goal::new(
            "echo1 CPU/GiB below HAProxy",
            Scenario::Echo1,
            |a| a.cpu_per_gib,
            "s",
            None,
            true,
        ),
    ];
    for Goal {
        goal,
        sc,
        get,
        unit,
        limit,
        lower,
    } in rows
    {
        if !ctx.scenarios.contains(&sc) {
            continue;
        }
        let mut line = format!("| {goal} |");
        for th in &settings {
            let sp = aggs
                .get(&(
                    sc,
                    Target {
                        kind: Kind::Shardproxy,
                        threads: *th,
                    },
                ))
                .and_then(get);
            let ha = aggs
                .get(&(
                    sc,
                    Target {
                        kind: Kind::Haproxy,
                        threads: *th,
                    },
                ))
                .and_then(get);
            let f = |x: Option<f64>| {
                opt(x, |v| match unit {
                    "x" => format!("{v:.2}×"),
                    "us" => format!("{v:+.0} µs"),
                    "B" => format!("{v:.0} B"),
                    "s" => format!("{v:.2} s/GiB"),
                    "ms" => format!("{:.1} ms", v / 1000.0),
                    _ => format!("{v:.2}"),
                })
            };
            // None: not comparable; Some(None): a tie (within 1%); Some(Some(b)): beats or not.
            let beats = match (sp, ha) {
                (Some(s), Some(h)) if (s - h).abs() <= 0.01 * s.abs().max(h.abs()) => Some(None),
                (Some(s), Some(h)) => Some(Some(if lower { s < h } else { s > h })),
                _ => None,
            };
            let vs = |b: Option<bool>| match b {
                None => "ties",
                Some(true) => "beats",
                Some(false) => "**loses to**",
            };
            let within = match (sp, limit) {
                (Some(s), Some(l)) => Some(if lower { s <= l } else { s >= l }),
                (_, None) => None,
                (None, Some(_)) => Some(false),
            };
            let verdict = match (within, beats) {
                (Some(w), Some(b)) => format!(
                    "{} goal, {} HAProxy",
                    if w { "✅ meets" } else { "❌ misses" },
                    vs(b)
                ),
                (Some(w), None) => (if w {
                    "✅ meets goal"
                } else {
                    "❌ misses goal"
                })
                .into(),
                (None, Some(b)) => format!(
                    "{} {} HAProxy",
                    match b {
                        Some(false) => "❌",
                        None => "➖",
                        Some(true) => "✅",
                    },
                    vs(b)
                ),
                (None, None) => "–".into(),
            };
            let _ = write!(line, " {} | {} | {} |", f(sp), f(ha), verdict);
        }
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md);
}

/// (scenario, target) pairs the harness does not run (the floor relay's idle).
fn runs_skipped(ctx: &Context) -> Vec<String> {
    let mut v = Vec::new();
    for sc in &ctx.scenarios {
        for t in &ctx.targets {
            if !crate::runs_for(*sc, t) {
                v.push(format!("{} for the {}", sc.name(), target_label_plain(t)));
            }
        }
    }
    v
}

fn target_label_plain(t: &Target) -> String {
    match t.kind {
        Kind::Floor => "floor relay (two threads and six fds per connection)".into(),
        _ => t.id(),
    }
}

/// shardproxy (and HAProxy) against the floor relay: figure ÷ floor and CPU per unit ÷
/// floor, paired by round.
fn against_floor(md: &mut String, ctx: &Context, aggs: &BTreeMap<(Scenario, Target), Agg>) {
    let Some(floor) = ctx.targets.iter().find(|t| t.kind == Kind::Floor) else {
        return;
    };
    let proxies: Vec<&Target> = ctx
        .targets
        .iter()
        .filter(|t| !matches!(t.kind, Kind::Direct | Kind::Floor))
        .collect();
    let _ = writeln!(md, "## Against the floor relay\n");
    let _ = writeln!(
        md,
        "Each proxy's figure ÷ the floor relay's in the same round (CPU per unit ÷ the \
         floor's in brackets), medians over rounds. Above 1.00× the proxy beats a minimal \
         blocking splice relay; CPU below 1.00× it spends less per unit.\n"
    );
    let mut header = "| scenario | floor relay (× direct) |".to_string();
    let mut rule = "|---|---:|".to_string();
    for t in &proxies {
        let _ = write!(header, " {} ÷ floor (CPU) |", target_label(t, aggs));
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for sc in &ctx.scenarios {
        let Some(f) = aggs.get(&(*sc, *floor)) else {
            continue;
        };
        let mut line = format!(
            "| {} | {} ({}) |",
            sc.name(),
            opt(f.figure, |x| format!("{} {}", fmt_num(x), sc.unit())),
            opt(f.ratio, |x| format!("{x:.2}×"))
        );
        for t in &proxies {
            let a = aggs.get(&(*sc, **t));
            let ratio = opt(a.and_then(|a| a.floor_ratio), |x| format!("{x:.2}×"));
            let cpu = opt(a.and_then(|a| a.cpu_vs_floor), |x| format!("CPU {x:.2}×"));
            let _ = write!(line, " {ratio} ({cpu}) |");
        }
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md);
}

fn csv(runs: &[Run]) -> String {
    let mut s = String::from(
        "round,scenario,target,ok,figure,unit,p50_us,p99_us,p999_us,proxy_cpu_s,bytes,ops,\
         peak_rss_kib,threads,rss_per_conn_bytes,fds_per_conn,ping_p50_us,ping_p99_us,\
         ping_max_us,churn_changes,error\n",
    );
    let o = |x: Option<f64>| x.map_or_else(String::new, |v| format!("{v:.3}"));
    for r in runs {
        let _ = write!(s, "{},{},{},", r.round, r.scenario.name(), r.target.id());
        let churn = r.churn.map_or_else(String::new, |c| c.changes.to_string());
        match &r.result {
            Ok(m) => {
                let lat = m.lat_us.map_or([None; 3], |l| l.map(Some));
                let ping = m.ping_us.map_or([None; 3], |l| l.map(Some));
                let _ = writeln!(
                    s,
                    "1,{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},",
                    m.figure,
                    r.scenario.unit(),
                    o(lat[0]),
                    o(lat[1]),
                    o(lat[2]),
                    o(m.cpu_s),
                    m.bytes,
                    m.ops,
                    r.hwm_kib.map_or_else(String::new, |v| v.to_string()),
                    r.threads.map_or_else(String::new, |v| v.to_string()),
                    o(m.rss_per_conn),
                    o(m.fds_per_conn),
                    o(ping[0]),
                    o(ping[1]),
                    o(ping[2]),
                    churn
                );
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "0,,,,,,,,,,,,,,,,{},\"{}\"",
                    churn,
                    e.replace('"', "'").replace('\n', " ")
                );
            }
        }
    }
    s
}

/// What the shardproxy-churn target is, for `results.md`.
const CHURN_DESCRIPTION: &str = "shardproxy with the same thread count and extra flags, but \
     its membership from a real etcd (`--membership etcd://127.0.0.1:PORT/bench \
     --membership-cache FILE --admin 127.0.0.1:0`, no `--backend`): one etcd member for the \
     whole harness run on this machine, seeded with `/bench/backends/b1..b3` = the same names \
     and addresses plain shardproxy gets as flags, so routing is identical (checked below). \
     While each scenario runs, a harness thread changes the membership once a second (the \
     first change 0.5 s after the proxy is ready): it alternately puts and deletes \
     `/bench/backends/churn` = `{\"addr\":\"127.0.0.1:1\",\"weight\":0}`. Weight 0 takes no \
     keys, so no benchmark key moves, but every change is a full membership update in the \
     proxy: the watch event, a debounced (100 ms) table rebuild and swap, the cache file \
     rewrite, and a wake-up of every established connection's owner-change watch. After the \
     scenario the proxy's `GET /membership` revision must reach the last write's within 3 s, \
     or the run fails. Scenarios shorter than 0.5 s see no change at all; etcd's own CPU is \
     not in the proxy's CPU figures but shares the machine";

/// The scenario's main number, as the goals table picks it: pingup the max ping delay (µs,
/// lower is better), idle the RSS per connection (bytes, lower is better), the others the
/// headline figure (higher is better). (label, value, higher is better).
fn main_number(sc: Scenario, m: &Measured) -> Option<(&'static str, f64, bool)> {
    match sc {
        Scenario::Pingup => Some(("max ping delay, ms", m.ping_us?[2] / 1000.0, false)),
        Scenario::Idle => Some(("RSS B/conn", m.rss_per_conn?, false)),
        _ => Some((sc.unit(), m.figure, true)),
    }
}

/// "membership churn (1 change/s) vs none": per scenario and thread setting where both
/// `shardproxy@N` and `shardproxy-churn@N` ran, the median over rounds of churn ÷ plain in
/// the same round for the scenario's main number (as the goals table picks it), p99 latency
/// and proxy CPU per unit, with the medians of both.
fn churn_vs_none(md: &mut String, ctx: &Context, runs: &[Run]) {
    let mut settings: Vec<Option<usize>> = Vec::new();
    for t in &ctx.targets {
        let plain = Target {
            kind: Kind::Shardproxy,
            threads: t.threads,
        };
        if t.kind == Kind::ShardproxyChurn
            && ctx.targets.contains(&plain)
            && !settings.contains(&t.threads)
        {
            settings.push(t.threads);
        }
    }
    if settings.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Membership churn (1 change/s) vs none\n");
    let _ = writeln!(
        md,
        "shardproxy-churn (membership from etcd, one change per second during the scenario) \
         against plain shardproxy (`--backend` flags) at the same thread count, paired by \
         round: the median over rounds of (churn ÷ plain in the same round), and the medians \
         of both. Main number as in the goals table: the figure (higher is better), pingup's \
         max ping delay and idle's RSS per connection (lower is better). Issue 10's target is \
         no measurable change: ratios within the rounds' spread of 1.00×.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | threads | main number | plain | churn | churn ÷ plain | p99 µs plain → churn (÷) | CPU/unit churn ÷ plain | changes/run |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---|---:|---:|");
    for sc in &ctx.scenarios {
        for th in &settings {
            let pick = |kind: Kind, round: usize| {
                runs.iter()
                    .find(|r| {
                        r.scenario == *sc
                            && r.round == round
                            && r.target == Target { kind, threads: *th }
                    })
                    .and_then(|r| r.result.as_ref().ok().map(|m| (m, r)))
            };
            let mut plain_v = Vec::new();
            let mut churn_v = Vec::new();
            let mut ratio = Vec::new();
            let mut p99 = (Vec::new(), Vec::new(), Vec::new());
            let mut cpu = Vec::new();
            let mut changes = Vec::new();
            let mut label = None;
            let mut higher = true;
            for round in 1..=ctx.rounds {
                let p = pick(Kind::Shardproxy, round);
                let c = pick(Kind::ShardproxyChurn, round);
                let pv = p.and_then(|(m, _)| main_number(*sc, m));
                let cv = c.and_then(|(m, _)| main_number(*sc, m));
                if let Some((l, v, h)) = pv {
                    plain_v.push(v);
                    label = Some(l);
                    higher = h;
                }
                if let Some((l, v, h)) = cv {
                    churn_v.push(v);
                    label = Some(l);
                    higher = h;
                }
                if let (Some((_, pv, _)), Some((_, cv, _))) = (pv, cv) {
                    if pv > 0.0 {
                        ratio.push(cv / pv);
                    }
                }
                let pl = p.and_then(|(m, _)| m.lat_us.map(|l| l[1]));
                let cl = c.and_then(|(m, _)| m.lat_us.map(|l| l[1]));
                if let Some(x) = pl {
                    p99.0.push(x);
                }
                if let Some(x) = cl {
                    p99.1.push(x);
                }
                if let (Some(a), Some(b)) = (pl, cl) {
                    if a > 0.0 {
                        p99.2.push(b / a);
                    }
                }
                if let (Some((pm, _)), Some((cm, _))) = (p, c) {
                    if let (Some(a), Some(b)) = (cpu_per_unit(*sc, pm), cpu_per_unit(*sc, cm)) {
                        if a > 0.0 {
                            cpu.push(b / a);
                        }
                    }
                }
                if let Some(ch) = c.and_then(|(_, r)| r.churn) {
                    changes.push(ch.changes as f64);
                }
            }
            let Some(label) = label else {
                continue;
            };
            let threads = th.map_or_else(
                || format!("default (N={})", default_threads()),
                |n| format!("N={n}"),
            );
            let ratio_s = opt(median(ratio), |x| {
                format!("{x:.3}×{}", if higher { "" } else { " (lower is better)" })
            });
            let p99_s = match (median(p99.0), median(p99.1)) {
                (None, None) => "–".to_string(),
                (a, b) => format!(
                    "{} → {} ({})",
                    opt(a, |x| format!("{x:.0}")),
                    opt(b, |x| format!("{x:.0}")),
                    opt(median(p99.2), |x| format!("{x:.2}×"))
                ),
            };
            let _ = writeln!(
                md,
                "| {} | {threads} | {label} | {} | {} | {ratio_s} | {p99_s} | {} | {} |",
                sc.name(),
                opt(median(plain_v), fmt_num),
                opt(median(churn_v), fmt_num),
                opt(median(cpu), |x| format!("{x:.2}×")),
                opt(median(changes), |x| format!("{x:.0}")),
            );
        }
    }
    let _ = writeln!(md);
}
