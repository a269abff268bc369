#!/usr/bin/env bash
# DSR benchmark (issue 8): direct vs spliced vs DSR --forward vs DSR --handoff-socket.
#
# Needs root (network namespaces, nftables, TCP_REPAIR). Builds the release binary and the
# harness (benches/dsr.rs), creates its own namespace topology — <prefix>-sw (a bridge),
# <prefix>-client, <prefix>-proxy, <prefix>-b1, addresses in 10.231.0.0/24, the VIP
# 10.231.0.100 on the proxy's eth0 and on b1's lo (docs/design.md §6) — runs
# `cargo bench --bench dsr -- --ns <prefix> [FLAGS]`, and removes the namespaces (and any
# process left in them) on exit, however it exits. Results go to
# bench-results/dsr-<UTC time>/ (results.md, samples.csv).
#
# Usage: sudo scripts/bench-dsr.sh [FLAGS]     (all flags are passed to the harness)
#   --rounds N          rounds, medians reported (default 3)
#   --bulk-mib N        download size of the one-connection scenario (default 1024)
#   --short-conns N     sequential short connections per target and round (default 2000)
#   --isolated-conns N  short connections per DSR target and round with a pause after each
#                       (default 50; 0 skips): the hand-off on its own
#   --isolated-gap-ms M that pause (default 100)
#   --cps-secs S        window of the concurrent short-connection scenario (default 5)
#   --cps-clients N     concurrent clients in it (default 16)
#   --out DIR           results folder (default bench-results)
#   --help              the harness's own help
# The default run takes about 3–5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-dsr.sh: needs root (network namespaces, nftables, TCP_REPAIR)" >&2
    exit 1
fi
for tool in ip nft; do
    command -v "$tool" >/dev/null 2>&1 || { echo "bench-dsr.sh: $tool is missing" >&2; exit 1; }
done

cargo build --release --locked --bin shardproxy
cargo bench --locked --bench dsr --no-run
# Run a private copy of the binary: the target directory may be shared with other builds.
TMP=$(mktemp -d /tmp/shardproxy-bench-dsr.XXXXXX)
cp "${CARGO_TARGET_DIR:-target}/release/shardproxy" "$TMP/shardproxy"

P="spxdsr$$"
NET=10.231.0
VIP=$NET.100
HOSTS=(client proxy b1)
declare -A IP=([client]=$NET.10 [proxy]=$NET.2 [b1]=$NET.11)

cleanup() {
    set +e
    # Processes still inside our namespaces were started by this run: stop them by PID.
    for n in "${HOSTS[@]}"; do
        for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    sleep 0.5
    for n in "${HOSTS[@]}"; do
        for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    for n in "${HOSTS[@]}" sw; do ip netns del "$P-$n" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
for h in "${HOSTS[@]}"; do
    ip netns add "$P-$h"
    ip link add eth0 netns "$P-$h" type veth peer name "$h" netns "$P-sw"
    ip -n "$P-sw" link set "$h" master br0 up
    ip -n "$P-$h" addr add "${IP[$h]}/24" dev eth0
    ip -n "$P-$h" link set eth0 up
    ip -n "$P-$h" link set lo up
done
# The VIP: an address of its own on the proxy host, and on the backend host's lo.
ip -n "$P-proxy" addr add "$VIP/32" dev eth0
ip -n "$P-b1" addr add "$VIP/32" dev lo
ip netns exec "$P-b1" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
    net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2
# Room for tens of thousands of short client connections (their TIME_WAITs stay with the
# client, which closes first).
ip netns exec "$P-client" sysctl -qw net.ipv4.ip_local_port_range="1024 65000"
# Conntrack active on the proxy host, as on a host with a stateful firewall.
ip netns exec "$P-proxy" nft add table inet fw
ip netns exec "$P-proxy" nft add chain inet fw in '{ type filter hook input priority 0; }'
ip netns exec "$P-proxy" nft add rule inet fw in ct state established accept

ulimit -n 20000 2>/dev/null || true
cargo bench --locked --bench dsr -- --ns "$P" --subnet "$NET" --shardproxy "$TMP/shardproxy" "$@"
