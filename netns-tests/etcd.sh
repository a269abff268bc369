#!/usr/bin/env bash
# Network-namespace tests of the etcd membership (issue 10): a 3-member etcd cluster on three
# namespace hosts, a proxy on another one given all three endpoints, backends and a client on
# their own hosts. One member at a time is cut off the switch (its port set down: packets
# vanish, no RST); the proxy must keep watching through the other two, so a change made via a
# surviving member is applied. Then the whole cluster is cut: routing goes on, the proxy says
# it is disconnected, and it catches up when the cluster is back. See README.md beside this
# file.
#
# Usage (as root):  netns-tests/etcd.sh
#   SHARDPROXY_BIN=/path/to/shardproxy   use this binary (default: cargo build --release)
#   NETNS_KEEP_LOGS=1                    keep the log directory (its path is printed)
#   ETCD_PROXY_ENDPOINTS=HOST:PORT,...   the proxy's endpoints (default: all three members)
#
# Prints PASS/FAIL per case and ends with the line "N passed, M failed"; exits 1 if any
# failed. Touches only namespaces it creates (prefix se<pid>-) and addresses in 10.203.0.0/24
# inside them; the EXIT trap kills only the processes it started and deletes its namespaces.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

# ---------------------------------------------------------------------------------------------
# Topology

P="se$$"                       # unique prefix: namespaces are $P-sw, $P-proxy, ...
NS_SW="$P-sw"                  # the switch: one bridge, one port per host
HOSTS=(client proxy be e1 e2 e3)
MEMBERS=(e1 e2 e3)
declare -A IP=([client]=10.203.0.10 [proxy]=10.203.0.2 [be]=10.203.0.20
               [e1]=10.203.0.31 [e2]=10.203.0.32 [e3]=10.203.0.33)
NET_PREFIX=24
PROXY_PORT=7000
ADMIN="127.0.0.1:9090"          # inside the proxy namespace only
PROXY_ADDR="${IP[proxy]}:$PROXY_PORT"
declare -A BACKEND=([b1]="${IP[be]}:9001" [b2]="${IP[be]}:9002" [b3]="${IP[be]}:9003")
PREFIX=/shardproxy/netns
ALL_EP="${IP[e1]}:2379,${IP[e2]}:2379,${IP[e3]}:2379"
# The endpoints the proxy is given. Self-check: ETCD_PROXY_ENDPOINTS=10.203.0.31:2379 (one
# member only) must fail case 2 when e1 is cut.
URL="etcd://${ETCD_PROXY_ENDPOINTS:-$ALL_EP}$PREFIX"
# Bound on a change reaching the proxy while a member is cut off (a silent cut is noticed by
# keepalive or a timeout, then the next endpoint is tried): generous, never a target.
APPLY_BOUND=90

# Bookkeeping (cleanup of exactly what this run created, PASS/FAIL, traps) and shared helpers.
# shellcheck source=netns-tests/lib.sh
source "$HERE/lib.sh"
declare -A MEMBER_PID=()        # etcd member -> its pid

# GET http://$ADMIN$1 in the proxy namespace; body on stdout.
admin_get() { http_get proxy "$ADMIN" "$1"; }

# A sample's value from the proxy's /metrics (name with labels, exact); "absent" if none.
proxy_metric() {
    admin_get /metrics 2>/dev/null | awk -v s="$1" '$1 == s {v = $2; f = 1} END {print (f ? v : "absent")}'
}

# etcdctl from the client host against the endpoints in $EP (default: all three).
ectl() {
    in_ns client timeout 20 env ETCDCTL_API=3 etcdctl --endpoints="${EP:-$ALL_EP}" \
        --dial-timeout=2s --command-timeout=5s "$@"
}

# Puts $1=$2 through the endpoints in $EP (retried, bounded); prints the write's revision.
eput() {
    local i out
    for ((i = 0; i < 20; i++)); do
        if out=$(ectl put -w json -- "$1" "$2" 2>>"$LOGDIR/etcdctl.err"); then
            sed -n 's/.*"revision":\([0-9]*\).*/\1/p' <<<"$out"
            return 0
        fi
        sleep 0.5
    done
    log "etcdctl put $1 kept failing: $(tail -2 "$LOGDIR/etcdctl.err" | tr '\n' ';')"
    return 1
}

bvalue() { echo "{\"addr\":\"${BACKEND[$1]}\",\"weight\":${2:-1}}"; }

# Waits (at most $2 s) until the proxy's membership revision is at least $1; prints seconds.
wait_revision() {
    local want=$1 bound=$2 start=$SECONDS rev
    while ((SECONDS - start < bound)); do
        rev=$(proxy_metric shardproxy_membership_revision)
        if [[ "$rev" != absent ]] && awk -v r="$rev" -v w="$want" 'BEGIN {exit !(r >= w)}'; then
            echo $((SECONDS - start))
            return 0
        fi
        sleep 0.2
    done
    log "the proxy never reached revision $want (at $(proxy_metric shardproxy_membership_revision)) within ${bound}s"
    return 1
}

# Waits (at most $3 s) until the sample $1 reads $2.
wait_metric() {
    local sample=$1 want=$2 bound=$3 start=$SECONDS v
    while ((SECONDS - start < bound)); do
        v=$(proxy_metric "$sample")
        if [[ "$v" != absent ]] && awk -v a="$v" -v b="$want" 'BEGIN {exit !(a == b)}'; then
            return 0
        fi
        sleep 0.2
    done
    log "$sample never read $want (reads $(proxy_metric "$sample")) within ${bound}s"
    return 1
}

# The backend names the proxy lists, sorted, space-separated.
proxy_names() {
    admin_get /backends 2>/dev/null | grep -o '"name":"[^"]*"' | cut -d'"' -f4 | sort | tr '\n' ' ' | sed 's/ $//'
}

# Every key of KEYS lands, from the client host, on the first name that `shardproxy route`
# ranks for the backends given as NAME=ADDR arguments.
KEYS=()
for ((k = 0; k < 60; k++)); do KEYS+=("user-$k"); done
routes_as() {
    local flags=() b out key ranked be rest bad=0
    declare -A want=()
    for b in "$@"; do flags+=(--backend "$b"); done
    out=$(timeout 20 "$BIN" route "${flags[@]}" "${KEYS[@]}") || { log "shardproxy route failed"; return 1; }
    while IFS=$'\t' read -r key ranked; do want[$key]=${ranked%% *}; done <<<"$out"
    out=$(in_ns client timeout 60 "$BIN" client --connect "$PROXY_ADDR" --payload 64 "${KEYS[@]}" \
        2>"$LOGDIR/client.err") || { log "client failed: $(head -3 "$LOGDIR/client.err" | tr '\n' ';')"; return 1; }
    while IFS=$'\t' read -r key be rest; do
        [[ -n "$key" ]] || continue
        if [[ "$be" != "${want[$key]:-}" ]]; then
            ((bad++ < 3)) && log "key $key on $be, route says ${want[$key]:-?}"
        fi
    done <<<"$out"
    [[ $(grep -c . <<<"$out") == "${#KEYS[@]}" ]] || { log "the client answered $(grep -c . <<<"$out") of ${#KEYS[@]} keys"; return 1; }
    [[ $bad == 0 ]]
}

# Which member the proxy's etcd connection goes to (for the log; empty if none).
proxy_peer() {
    in_ns proxy ss -Htn state established '( dport = :2379 )' 2>/dev/null |
        awk '{print $4}' | sort -u | tr '\n' ' '
}

cut_member() { ip netns exec "$NS_SW" ip link set "p-$1" down; }
restore_member() { ip netns exec "$NS_SW" ip link set "p-$1" up; }

# Every member reports healthy (bounded).
cluster_healthy() {
    local i
    for ((i = 0; i < 60; i++)); do
        if EP=$ALL_EP ectl endpoint health >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "the cluster is not healthy: $(EP=$ALL_EP ectl endpoint health 2>&1 | tr '\n' ';')"
    return 1
}

# ---------------------------------------------------------------------------------------------
# Preflight and setup

preflight() {
    if [[ $EUID -ne 0 ]]; then echo "must run as root (network namespaces)"; return 1; fi
    local missing=() t
    for t in ip ss ping timeout awk etcd etcdctl; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "missing tools: ${missing[*]} (apt-get install iproute2 iputils-ping etcd-server etcd-client)"
        return 1
    fi
    if [[ -n "${SHARDPROXY_BIN:-}" ]]; then
        BIN=$SHARDPROXY_BIN
    else
        echo "building: cargo build --release"
        (cd "$REPO" && timeout 900 cargo build --release --quiet) || { echo "cargo build failed"; return 1; }
        BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/shardproxy"
    fi
    [[ -x "$BIN" ]] || { echo "not executable: $BIN"; return 1; }
    BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
    echo "binary: $BIN"
}

add_ns() {
    ip netns add "$1"
    CREATED_NS+=("$1")
    ip netns exec "$1" ip link set lo up
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    ip netns exec "$1" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
}

setup_topology() {
    local h i ok
    for h in sw "${HOSTS[@]}"; do
        if ns_exists "$(ns "$h")"; then echo "namespace $(ns "$h") already exists"; return 1; fi
    done
    add_ns "$NS_SW"
    ip netns exec "$NS_SW" ip link add br0 type bridge stp_state 0 forward_delay 0
    ip netns exec "$NS_SW" ip link set br0 up
    for h in "${HOSTS[@]}"; do
        add_ns "$(ns "$h")"
        ip link add eth0 netns "$(ns "$h")" type veth peer name "p-$h" netns "$NS_SW"
        ip netns exec "$NS_SW" ip link set "p-$h" master br0
        ip netns exec "$NS_SW" ip link set "p-$h" up
        in_ns "$h" ip addr add "${IP[$h]}/$NET_PREFIX" dev eth0
        in_ns "$h" ip link set eth0 up
    done
    for h in client be e1 e2 e3; do
        ok=0
        for ((i = 0; i < 30; i++)); do
            if in_ns "$h" timeout 3 ping -n -q -c 1 -W 1 "${IP[proxy]}" >/dev/null 2>&1; then
                ok=1; break
            fi
            sleep 0.1
        done
        [[ $ok == 1 ]] || { echo "$h cannot reach the proxy host"; return 1; }
    done
    echo "topology up: ${#CREATED_NS[@]} namespaces, bridge br0 in $NS_SW"
}

start_member() {
    local m=$1 cluster="" x
    for x in "${MEMBERS[@]}"; do cluster+="${cluster:+,}$x=http://${IP[$x]}:2380"; done
    start_bg "$m" "$LOGDIR/$m.out" etcd --name "$m" --data-dir "$LOGDIR/$m.data" \
        --listen-client-urls "http://${IP[$m]}:2379" --advertise-client-urls "http://${IP[$m]}:2379" \
        --listen-peer-urls "http://${IP[$m]}:2380" --initial-advertise-peer-urls "http://${IP[$m]}:2380" \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "$P" \
        --logger zap --log-outputs stderr --log-level warn
    MEMBER_PID[$m]=$STARTED_PID
}

PROXY_PID=""
start_servers() {
    local m b
    for m in "${MEMBERS[@]}"; do start_member "$m"; done
    cluster_healthy || return 1
    for b in b1 b2 b3; do
        start_bg be "$LOGDIR/$b.out" "$BIN" backend --listen "${BACKEND[$b]}" --name "$b"
        wait_for_line "$LOGDIR/$b.out" "listening on" "$STARTED_PID" || return 1
    done
    eput "$PREFIX/backends/b1" "$(bvalue b1)" >/dev/null || return 1
    eput "$PREFIX/backends/b2" "$(bvalue b2)" >/dev/null || return 1
    start_bg proxy "$LOGDIR/proxy.out" "$BIN" run --listen "$PROXY_ADDR" --admin "$ADMIN" \
        --membership "$URL" --membership-cache "$LOGDIR/membership-cache.json"
    PROXY_PID=$STARTED_PID
    wait_for_line "$LOGDIR/proxy.out" "listening on" "$PROXY_PID" 200 || return 1
    echo "servers up: etcd cluster ${MEMBERS[*]}, proxy $(head -1 "$LOGDIR/proxy.out"), membership $URL"
}

# ---------------------------------------------------------------------------------------------
# Cases

# 1. The proxy follows the cluster: the starting membership, then a put.
case_follow() {
    local rev took names
    wait_metric shardproxy_membership_connected 1 30 || return 1
    names=$(proxy_names)
    [[ "$names" == "b1 b2" ]] || { log "the proxy lists '$names', want 'b1 b2'"; return 1; }
    rev=$(eput "$PREFIX/backends/b3" "$(bvalue b3)") || return 1
    took=$(wait_revision "$rev" 30) || return 1
    names=$(proxy_names)
    [[ "$names" == "b1 b2 b3" ]] || { log "the proxy lists '$names', want 'b1 b2 b3'"; return 1; }
    log "b3 put at revision $rev: applied within ${took}s; etcd connection to $(proxy_peer)"
    routes_as "b1=${BACKEND[b1]}" "b2=${BACKEND[b2]}" "b3=${BACKEND[b3]}" || return 1
    log "${#KEYS[@]} keys routed as 'shardproxy route' ranks them over b1 b2 b3"
}

# 2. Each member in turn is cut off the switch; a change made via the two others is applied,
#    the proxy stays connected, and routing follows. Cutting every member in turn cuts the one
#    the proxy was watching through at least once.
case_member_cut() {
    local m ep x rev took names weight=1 peer
    for m in "${MEMBERS[@]}"; do
        ep=""
        for x in "${MEMBERS[@]}"; do [[ $x == "$m" ]] || ep+="${ep:+,}${IP[$x]}:2379"; done
        peer=$(proxy_peer)
        cut_member "$m"
        weight=$((weight + 1))
        rev=$(EP=$ep eput "$PREFIX/backends/b3" "$(bvalue b3 "$weight")") || { restore_member "$m"; return 1; }
        if ! took=$(wait_revision "$rev" "$APPLY_BOUND"); then
            log "with $m (${IP[$m]}) cut off (the proxy was connected to: ${peer:-none})"
            restore_member "$m"
            return 1
        fi
        log "$m (${IP[$m]}) cut off (proxy was on ${peer:-none}): b3 weight $weight at revision $rev applied within ${took}s, now on $(proxy_peer)"
        [[ $(proxy_metric shardproxy_membership_connected) == 1 ]] || { log "the proxy says it is disconnected"; restore_member "$m"; return 1; }
        names=$(proxy_names)
        [[ "$names" == "b1 b2 b3" ]] || { log "the proxy lists '$names'"; restore_member "$m"; return 1; }
        routes_as "b1=${BACKEND[b1]}" "b2=${BACKEND[b2]}" "b3=${BACKEND[b3]},weight=$weight" || { restore_member "$m"; return 1; }
        restore_member "$m"
        cluster_healthy || return 1
    done
}

# 3. The whole cluster cut off: routing goes on on the last table, the proxy reports the
#    disconnection; back: it reconnects, resyncs and applies a change made meanwhile.
case_cluster_cut() {
    local m rev took names reconnects
    # Connected first (a rejoining member can cause an election, which ends the watch for a
    # moment), so that the 0 below is the cut's doing.
    wait_metric shardproxy_membership_connected 1 30 || return 1
    reconnects=$(proxy_metric shardproxy_membership_reconnects_total)
    for m in "${MEMBERS[@]}"; do cut_member "$m"; done
    if ! wait_metric shardproxy_membership_connected 0 "$APPLY_BOUND"; then
        for m in "${MEMBERS[@]}"; do restore_member "$m"; done
        return 1
    fi
    log "all members cut: the proxy reports membership_connected 0"
    if ! routes_as "b1=${BACKEND[b1]}" "b2=${BACKEND[b2]}" "b3=${BACKEND[b3]},weight=4"; then
        for m in "${MEMBERS[@]}"; do restore_member "$m"; done
        return 1
    fi
    log "routing unchanged while etcd is unreachable"
    for m in "${MEMBERS[@]}"; do restore_member "$m"; done
    cluster_healthy || return 1
    rev=$(eput "$PREFIX/backends/b3" "$(bvalue b3 1)") || return 1
    took=$(wait_revision "$rev" "$APPLY_BOUND") || return 1
    wait_metric shardproxy_membership_connected 1 30 || return 1
    log "cluster back: b3 weight 1 at revision $rev applied within ${took}s; reconnects $reconnects -> $(proxy_metric shardproxy_membership_reconnects_total)"
    names=$(proxy_names)
    [[ "$names" == "b1 b2 b3" ]] || { log "the proxy lists '$names'"; return 1; }
    routes_as "b1=${BACKEND[b1]}" "b2=${BACKEND[b2]}" "b3=${BACKEND[b3]}"
}

# ---------------------------------------------------------------------------------------------
# Main

main() {
    echo "shardproxy etcd netns tests (prefix $P)"
    if ! preflight; then fail "preflight"; summary; exit 1; fi
    LOGDIR=$(mktemp -d "/tmp/$P-netns.XXXXXX")
    if ! setup_topology; then fail "setup: topology"; cleanup; check_cleanup; summary; exit 1; fi
    if ! start_servers; then
        fail "setup: servers"
        local f
        for f in "$LOGDIR"/*.err; do
            [[ -s "$f" ]] || continue
            echo "--- $(basename "$f") (last lines)"
            sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -v '^[[:space:]]*$' | tail -n 4 || true
        done
        cleanup; check_cleanup; summary; exit 1
    fi

    run_case "1 follow: a 3-member cluster's membership, then a put, applied and routed" case_follow
    run_case "2 member cut: each member in turn off the switch, a change via the others applied" case_member_cut
    run_case "3 cluster cut: routing goes on, connected 0; back: resync and a change applied" case_cluster_cut

    if [[ $FAILED -gt 0 ]]; then
        echo "--- proxy stderr (last 15 lines)"
        sed 's/\x1b\[[0-9;]*m//g' "$LOGDIR/proxy.out.err" | tail -n 15 || true
    fi
    cleanup
    check_cleanup
    summary
    [[ $FAILED == 0 ]]
}

main "$@"
