//! `shardproxy demo`: the first thing a newcomer runs. Part of the binary, not the library.
//!
//! Starts three echo backends and the proxy in this process on loopback, sends a burst of
//! keyed connections with random payloads, checks every byte and every routing decision
//! against [`Router`], stops one backend and shows that only its keys moved — each to its
//! second choice. Prints tables; returns an error if any check fails. Leaves nothing
//! running.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use shardproxy::config::{BackendSpec, ProxyConfig};
use shardproxy::fixtures::client::round_trip;
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::header::HeaderFormat;
use shardproxy::routing::Router;

/// Names of the demo backends.
const NAMES: [&str; 3] = ["shard-a", "shard-b", "shard-c"];
/// The backend the demo stops.
const STOPPED: &str = "shard-b";
/// Connections in flight at once.
const CONCURRENCY: usize = 32;

/// Demo settings.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// Distinct keys sent in each round.
    pub keys: u32,
    /// Largest payload per connection, in bytes.
    pub max_payload: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            keys: 2000,
            max_payload: 16 * 1024,
        }
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up backends or the proxy failed.
    #[error("demo set-up failed: {0}")]
    Setup(String),
    /// A check did not hold.
    #[error("demo check failed: {0}")]
    Check(String),
}

/// Runs the demo and returns the report to print.
pub async fn run(opts: DemoOptions) -> Result<String, DemoError> {
    let started = Instant::now();
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut backends = Vec::new();
    for name in NAMES {
        backends.push(
            EchoBackend::start(loopback, name)
                .await
                .map_err(|e| setup(&e))?,
        );
    }
    let specs: Vec<BackendSpec> = backends
        .iter()
        .map(|b| BackendSpec {
            name: b.name().to_string(),
            addr: b.local_addr(),
            weight: 1,
            agent: None,
            max_connections: None,
            proxy_protocol: None,
        })
        .collect();
    let mut config = ProxyConfig::new(loopback, specs.clone());
    config.connect_timeout = Duration::from_millis(500);
    let proxy = shardproxy::start(config).await.map_err(|e| setup(&e))?;
    let addr = proxy.local_addr();
    let router =
        Router::new(specs.iter().map(|s| (s.name.as_str(), s.weight))).map_err(|e| setup(&e))?;
    let fmt = HeaderFormat::default();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "shardproxy demo: proxy on {addr}, backends {}",
        specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.addr))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Round 1: every backend up.
    let first = drive(addr, fmt, opts, "all backends up").await?;
    let mut per_backend: BTreeMap<&str, u32> = BTreeMap::new();
    for (i, owner) in first.owners.iter().enumerate() {
        let predicted = router
            .pick(&key(i as u32))
            .map(|n| router.name(n))
            .ok_or_else(|| DemoError::Check("no backend takes keys".into()))?;
        if owner != predicted {
            return Err(DemoError::Check(format!(
                "key {} reached {owner}, Router says {predicted}",
                String::from_utf8_lossy(&key(i as u32))
            )));
        }
        *per_backend.entry(predicted).or_default() += 1;
    }
    let _ = writeln!(out, "\nKeys per backend ({} keys, all up):", opts.keys);
    let _ = writeln!(out, "  {:<10} {:>7} {:>7}", "backend", "keys", "share");
    for (name, n) in &per_backend {
        let _ = writeln!(
            out,
            "  {name:<10} {n:>7} {:>6.1}%",
            100.0 * f64::from(*n) / f64::from(opts.keys)
        );
    }
    let _ = writeln!(
        out,
        "\nSample routes (same key → same backend, every time):"
    );
    for i in [0u32, 1, 2, 3, 42, 1000]
        .into_iter()
        .filter(|i| *i < opts.keys)
    {
        let k = key(i);
        let _ = writeln!(
            out,
            "  {:<14} → {:<8} (ranking: {})",
            String::from_utf8_lossy(&k),
            first.owners[i as usize],
            router.rank_names(&k).join(" > ")
        );
    }

    // Round 2: stop one backend; only its keys may move, each to its second choice.
    let mut kept = Vec::new();
    for b in backends {
        if b.name() == STOPPED {
            b.stop().await;
        } else {
            kept.push(b);
        }
    }
    let second = drive(addr, fmt, opts, "shard-b stopped").await?;
    let mut moves: BTreeMap<(String, String), u32> = BTreeMap::new();
    for (i, (before, after)) in first.owners.iter().zip(&second.owners).enumerate() {
        if before == after {
            continue;
        }
        let k = key(i as u32);
        let second_choice = router.rank_names(&k)[1];
        if before != STOPPED || after != second_choice {
            return Err(DemoError::Check(format!(
                "key {} moved {before} → {after}; only {STOPPED}'s keys may move, to their second choice ({second_choice})",
                String::from_utf8_lossy(&k)
            )));
        }
        *moves.entry((before.clone(), after.clone())).or_default() += 1;
    }
    let moved: u32 = moves.values().sum();
    let orphans = per_backend.get(STOPPED).copied().unwrap_or(0);
    if moved != orphans {
        return Err(DemoError::Check(format!(
            "{moved} keys moved but {STOPPED} owned {orphans}"
        )));
    }
    let _ = writeln!(
        out,
        "\nAfter stopping {STOPPED}: {moved} of {} keys moved (exactly {STOPPED}'s), none of the others:",
        opts.keys
    );
    for ((from, to), n) in &moves {
        let _ = writeln!(out, "  {from} → {to}: {n} keys");
    }
    let _ = writeln!(
        out,
        "\nBytes verified: {} in {} round trips, 0 lost, reordered or duplicated.",
        human_bytes(first.verified + second.verified),
        2 * opts.keys
    );
    let _ = writeln!(
        out,
        "Done in {:.1?}. Try it by hand: `shardproxy backend` + `shardproxy run` + `shardproxy client` (see README).",
        started.elapsed()
    );
    proxy.shutdown().await;
    for b in kept {
        b.stop().await;
    }
    Ok(out)
}

/// Outcome of one round: the backend each key reached, and the bytes verified.
struct Round {
    owners: Vec<String>,
    verified: u64,
}

async fn drive(
    addr: SocketAddr,
    fmt: HeaderFormat,
    opts: DemoOptions,
    label: &'static str,
) -> Result<Round, DemoError> {
    let bar = ProgressBar::new(u64::from(opts.keys)).with_message(label);
    bar.set_style(
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} keys")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let fmt = Arc::new(fmt);
    let mut owners = vec![String::new(); opts.keys as usize];
    let mut verified = 0;
    let mut set = JoinSet::new();
    let mut next = 0u32;
    loop {
        while next < opts.keys && set.len() < CONCURRENCY {
            let i = next;
            next += 1;
            let fmt = fmt.clone();
            let payload = payload(i, opts.max_payload);
            set.spawn(async move { (i, round_trip(addr, &fmt, &key(i), &payload).await) });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (i, reply) = done.map_err(|e| DemoError::Check(e.to_string()))?;
        let reply = reply.map_err(|e| {
            DemoError::Check(format!("key {}: {e}", String::from_utf8_lossy(&key(i))))
        })?;
        verified += reply.verified;
        owners[i as usize] = reply.backend;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Round { owners, verified })
}

fn key(i: u32) -> Vec<u8> {
    format!("player:{i}").into_bytes()
}

/// A deterministic pseudo-random payload (xorshift), 1..=max bytes.
fn payload(i: u32, max: usize) -> Vec<u8> {
    let mut s = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let len = 1 + (next() as usize % max.max(1));
    (0..len).map(|_| next() as u8).collect()
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
