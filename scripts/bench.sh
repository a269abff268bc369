#!/usr/bin/env bash
# End-to-end benchmark: direct vs shardproxy vs HAProxy vs a floor relay (issues #3, #7).
#
# Installs HAProxy if missing (apt-get), builds the release binary, and runs the harness
# `cargo bench --bench e2e -- <flags>`. Results go to bench-results/<UTC time>/ (results.md,
# chart.svg, samples.csv); the git-ignored symlink bench-results/latest points at the newest.
# The floor relay is a minimal blocking splice relay built into the harness
# (benches/e2e/floor.rs): the anchor for what any relay pays on this kernel.
#
# Usage: scripts/bench.sh [FLAGS]        (all flags are passed to the harness)
#   --quick               short smoke run (1 round, small transfers, ~40 s)
#   --rounds N            interleaved rounds (default 3; medians are reported)
#   --scenarios a,b       subset of bulk1,echo1,pingup,rr32,rr1,cps32,idle (default: all)
#   --proxies a,b         subset of shardproxy,haproxy,floor,shardproxy-churn (default:
#                         shardproxy,haproxy,floor; direct always runs; the floor relay has no
#                         thread setting and skips idle). shardproxy-churn (opt-in, needs
#                         `etcd` on PATH: apt-get install etcd-server) is shardproxy with its
#                         membership from an etcd the harness starts, changing once a second
#                         (a weight-0 backend put/deleted) during each scenario; with
#                         shardproxy,shardproxy-churn results.md gets a churn-vs-none table
#                         (issue 10: no measurable change while a change per second flows)
#   --threads 1,default   proxy thread counts: shardproxy --workers N vs haproxy nbthread N;
#                         `default` passes neither (one per core for both)
#   --duration S          rr/cps measured window in seconds (default 2)
#   --warmup S            warm-up before each window (default 0.3)
#   --bulk-mib N          bulk1 size (default 2048)
#   --echo-mib N          echo1 size each way (default 1024)
#   --pingup-secs S       pingup upload time (default 4): the client uploads flat out while
#                         the backend pings every 20 ms; reports ping delay p50/p99/max
#   --idle-conns N        idle connections (default 5000)
#   --out DIR             results folder (default bench-results)
#   --haproxy PATH        HAProxy binary (default: haproxy on PATH)
#   --shardproxy-args "A B"  extra `shardproxy run` flags for an A/B run (e.g. "--no-splice")
#                         (shardproxy-churn gets them too)
#   --no-progress         no progress bar
#   --help                the harness's own help
# Also: `cargo bench --bench micro` for the criterion micro-benchmarks (~1 min).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1; then
    echo "bench.sh: installing haproxy" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y haproxy >/dev/null 2>&1 || {
        $SUDO apt-get update >/dev/null && $SUDO apt-get install -y haproxy >/dev/null
    }
fi

cargo build --release --bin shardproxy
exec cargo bench --bench e2e -- "$@"
