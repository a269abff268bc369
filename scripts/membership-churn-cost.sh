#!/usr/bin/env bash
# What a membership change costs a proxy holding many established connections (issue 10).
#
# Starts etcd (Debian etcd-server) and 3 echo backends on 127.0.0.1, a proxy with
# `--workers 1 --membership etcd://...`, and opens CONNS idle connections through it (each sends
# its key header, then waits). It then reads the proxy's on-CPU time (the sum over its threads
# of /proc/PID/task/*/schedstat) over SECS seconds without changes, and over SECS seconds with
# one change a second (put, then delete, a weight-0 backend: no key moves, but each change is a
# full update: watch event, debounced table rebuild and swap, and every connection's
# owner-change check). Prints both and the difference per change.
#
# Usage: scripts/membership-churn-cost.sh [CONNS] [SECS]     (defaults 8000, 20)
# Needs etcd and etcdctl on PATH, python3, and a free 127.0.0.1 port range 23790-23800,
# 17001, 19001-19003, 19101. Everything it starts is stopped on exit (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${1:-8000}
SECS=${2:-20}
(( CONNS > 0 && CONNS <= 9000 )) || { echo "CONNS must be 1..9000 (2 fds each in the proxy)" >&2; exit 2; }
(( SECS > 0 && SECS <= 600 )) || { echo "SECS must be 1..600" >&2; exit 2; }
for tool in etcd etcdctl python3; do
    command -v $tool >/dev/null || { echo "$tool not found (apt-get install etcd-server etcd-client python3)" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet --bin shardproxy
SP=$PWD/target/release/shardproxy
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
ctl() { ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 --command-timeout=3s "$@" > /dev/null; }

etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:23790 \
     --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
     > "$dir/etcd.log" 2>&1 & pids+=($!)
for _ in $(seq 50); do ctl endpoint health 2>/dev/null && break; sleep 0.2; done
for i in 1 2 3; do
    "$SP" backend --listen 127.0.0.1:1900$i --name b$i > /dev/null & pids+=($!)
    ctl put /churn-cost/backends/b$i "{\"addr\":\"127.0.0.1:1900$i\",\"weight\":1}"
done
"$SP" run --listen 127.0.0.1:17001 --admin 127.0.0.1:19101 --workers 1 \
    --membership etcd://127.0.0.1:23790/churn-cost > "$dir/proxy.out" 2> "$dir/proxy.log" &
proxy=$!
pids+=($proxy)
for _ in $(seq 50); do grep -q listening "$dir/proxy.out" && break; sleep 0.2; done
python3 - "$CONNS" > "$dir/holder.out" 2>&1 <<'PY' &
import socket, struct, sys, time
n = int(sys.argv[1]); held = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", 17001), timeout=5)
    key = b"key%d" % i
    s.sendall(struct.pack(">H", len(key)) + key)
    held.append(s)
print("held", n, flush=True)
time.sleep(900)
PY
pids+=($!)
for _ in $(seq 300); do grep -q held "$dir/holder.out" && break; sleep 0.2; done
grep -q held "$dir/holder.out" || { echo "could not open $CONNS connections: $(cat "$dir/holder.out")" >&2; exit 1; }
sleep 2
active=$(curl -s 127.0.0.1:19101/metrics | awk '/^shardproxy_connections_active /{print $2}')
cpu_us() { cat /proc/"$proxy"/task/*/schedstat | awk '{s += $1} END {printf "%d", s / 1000}'; }

a=$(cpu_us); sleep "$SECS"; b=$(cpu_us)
quiet=$(( b - a ))
a=$(cpu_us)
for s in $(seq "$SECS"); do
    if (( s % 2 )); then ctl put /churn-cost/backends/churn '{"addr":"127.0.0.1:1","weight":0}'
    else ctl del /churn-cost/backends/churn; fi
    sleep 1
done
b=$(cpu_us)
churn=$(( b - a ))
applied=$(curl -s 127.0.0.1:19101/metrics | awk '/^shardproxy_membership_updates_total\{result="applied"\}/{print $2}')
echo "connections held by the proxy: $active"
echo "proxy CPU over ${SECS} s without changes: ${quiet} µs"
echo "proxy CPU over ${SECS} s with ${SECS} changes: ${churn} µs (membership updates applied since start: $applied)"
echo "difference per change: $(( (churn - quiet) / SECS )) µs"
