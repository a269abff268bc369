#!/usr/bin/env bash
# Network-namespace tests of direct server return (DSR, issue 8): the proxy hands each
# established connection to an agent on the backend host (TCP_REPAIR), steers the flow there
# at L2 (nftables netdev), and the response goes from backend to client without crossing the
# proxy host. See README.md beside this file (section "DSR suite").
#
# Usage (as root):  netns-tests/dsr.sh
#   SHARDPROXY_BIN=/path/to/shardproxy   use this binary (default: cargo build --release)
#   NETNS_KEEP_LOGS=1                    keep the log directory (its path is printed)
#   DSR_BIG=BYTES                        size of case 1's download (default 1 GiB)
#   DSR_EXTRA_FLAGS="..."                extra flags for every --dsr proxy (self-check: with
#                                        "--dsr-key-prefix none-" nothing is handed off and
#                                        every case but 5 must FAIL)
#
# Prints PASS/FAIL per case and ends with the line "N passed, M failed"; exits 1 if any
# failed. Touches only namespaces it creates (prefix sd<pid>-) and addresses in 10.202.0.0/24
# inside them; the EXIT trap kills only the processes it started and deletes its namespaces.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

# ---------------------------------------------------------------------------------------------
# Topology

P="sd$$"                       # unique prefix: namespaces are $P-sw, $P-client, ...
NS_SW="$P-sw"                  # the switch: one bridge, one port per host
HOSTS=(client proxy b1 b2 b3)
declare -A IP=([client]=10.202.0.10 [proxy]=10.202.0.2 [b1]=10.202.0.11 [b2]=10.202.0.12 [b3]=10.202.0.13)
NET_PREFIX=24
VIP=10.202.0.100               # its own /32 on the proxy's eth0 and on each backend's lo
PROXY_PORT=7000
APP_PORT=9000                  # dsr_app.py's TCP listener on every backend host
AGENT_PORT=7100                # agents' control listeners (b1, b2)
ADMIN="127.0.0.1:9090"         # proxy admin, inside the proxy namespace only
AGENT_ADMIN="127.0.0.1:9191"   # agent admin, inside b1's / b2's namespace
BIG=${DSR_BIG:-1073741824}     # case 1: 1 GiB
BACKEND_FLAGS=(
    --backend "b1=${IP[b1]}:$APP_PORT,agent=${IP[b1]}:$AGENT_PORT"
    --backend "b2=${IP[b2]}:$APP_PORT,agent=${IP[b2]}:$AGENT_PORT"
    --backend "b3=${IP[b3]}:$APP_PORT"
)
# The expected delivery path per backend (what dsr_client.py reports).
declare -A DSR_PATH=([b1]=forward [b2]=handoff-socket [b3]=spliced)

# Bookkeeping (cleanup of exactly what this run created, PASS/FAIL, traps) and shared helpers.
# shellcheck source=netns-tests/lib.sh
source "$HERE/lib.sh"

# Signals $2 to our child $1 (only while it is ours), waits (bounded) for it to exit and
# sets STOPPED_RC to its exit status (or "alive" if it did not exit within 10 s).
STOPPED_RC=""
stop_ours() { _stop_ours "$@" 2>/dev/null; }   # quiet: no "Killed" job notice
_stop_ours() {
    local pid=$1 sig=$2 i
    STOPPED_RC=alive
    is_our_child "$pid" || { STOPPED_RC=gone; return 0; }
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        # A zombie still answers kill -0: look at its state.
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && break
        sleep 0.1
    done
    if [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] || ! kill -0 "$pid" 2>/dev/null; then
        STOPPED_RC=0
        { wait "$pid" || STOPPED_RC=$?; } 2>/dev/null
        forget_pid "$pid"
    fi
}

agent_scrape() { http_get "$1" "$AGENT_ADMIN" /metrics; }
admin_scrape() { http_get proxy "$1" /metrics; }

# The proxy's eth0 transmit counter (read inside the proxy namespace's own sysfs).
proxy_tx() { in_ns proxy cat /sys/class/net/eth0/statistics/tx_bytes; }

# The client namespace's TCP retransmission counter (RetransSegs in /proc/net/snmp).
client_retrans() {
    in_ns client awk '$1 == "Tcp:" { if (!h) { for (i = 1; i <= NF; i++) if ($i == "RetransSegs") c = i; h = 1 } else print $c }' /proc/net/snmp
}

table_name() { echo "shardproxy_${VIP//./_}_$1"; }     # the proxy's nftables table for a port
table_exists() { in_ns proxy nft list table netdev "$(table_name "$1")" >/dev/null 2>&1; }
# Number of elements in set/map $2 of the table for port $1 (an "addr . port" per element).
nft_elements() {
    in_ns proxy nft list "$2" netdev "$(table_name "$1")" "$3" 2>/dev/null |
        grep -oE '[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+ \. [0-9]+' | wc -l
}
# Conntrack entries in the proxy namespace for client source ports $@ (to the VIP).
conntrack_count() {
    local ports=" $* "
    in_ns proxy conntrack -L -p tcp -d "$VIP" 2>/dev/null |
        awk -v ports="$ports" '{ for (i = 1; i <= NF; i++) if ($i ~ /^sport=/) { p = substr($i, 7); if (index(ports, " " p " ")) n++; break } } END { print n + 0 }'
}

# Runs dsr_client.py from the client host against VIP:$1 (mode and keys after); output to
# $LOGDIR/dsrclient.N, CLIENT_OUT names it. Returns the client's exit status.
CLIENT_RUNS=0
CLIENT_OUT=""
dsr_client() {
    local port=$1 limit=$2; shift 2
    CLIENT_OUT="$LOGDIR/dsrclient.$((++CLIENT_RUNS))"
    local rc=0
    in_ns client timeout "$limit" python3 "$HERE/dsr_client.py" --vip "$VIP" --port "$port" \
        --proxy-ip "${IP[proxy]}" "$@" >"$CLIENT_OUT" 2>"$CLIENT_OUT.err" </dev/null || rc=$?
    return "$rc"
}
client_failed() { log "client exited $1: $(grep -v -e 'result=ok' -e '^sports ' "$CLIENT_OUT" | head -3 | tr '\n' ';') $(tail -2 "$CLIENT_OUT.err" | tr '\n' ';')"; }
# The field $2 (e.g. path) of key $1's line in the last client output.
client_field() { awk -v k="key=$1" -v f="$2=" '$1 == k { for (i = 1; i <= NF; i++) if (index($i, f) == 1) { print substr($i, length(f) + 1); exit } }' "$CLIENT_OUT"; }

# Handoff counter of the proxy with admin $1 for result $2.
handoffs() { admin_scrape "$1" | metric shardproxy_dsr_handoffs_total "result=\"$2\""; }
# From a scrape on stdin: b1's open connections (spliced and handed off); hand-offs tried
# (handoffs_total, every result).
b1_connections() { metric shardproxy_backend_connections_active 'backend="b1"'; }
handoffs_tried() { awk '$1 ~ /^shardproxy_dsr_handoffs_total\{/ { s += $2 } END { print s + 0 }'; }
# Sum of every fallback result (handoffs_total minus result="ok").
fallbacks_of() {
    awk '$1 ~ /^shardproxy_dsr_handoffs_total\{/ && $1 !~ /result="ok"/ { s += $2 } END { print s + 0 }'
}

# ---------------------------------------------------------------------------------------------
# Preflight and setup

preflight() {
    if [[ $EUID -ne 0 ]]; then echo "must run as root (network namespaces, nft, TCP_REPAIR)"; return 1; fi
    local missing=() t
    for t in ip nft ping timeout awk python3 conntrack curl; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "missing tools: ${missing[*]} (apt-get install iproute2 nftables iputils-ping python3 conntrack curl)"
        return 1
    fi
    python3 -c 'import socket, sys; sys.exit(0 if hasattr(socket, "recv_fds") else 1)' ||
        { echo "python3 >= 3.9 needed (socket.recv_fds)"; return 1; }
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
    local h
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
    # The VIP: an address of its own on the proxy's eth0 (not its primary address) ...
    in_ns proxy ip addr add "$VIP/32" dev eth0
    # ... and on each backend's lo, which must neither answer nor announce ARP for it.
    for h in b1 b2 b3; do
        in_ns "$h" ip addr add "$VIP/32" dev lo
        in_ns "$h" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
            net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2
    done
    # Conntrack active on the proxy host, as on any host with a stateful firewall.
    in_ns proxy nft -f - <<'NFT'
table inet fw {
    chain in { type filter hook input priority 0; policy accept; ct state established accept; }
}
NFT
    local i ok
    for h in client b1 b2 b3; do
        ok=0
        for ((i = 0; i < 20; i++)); do
            if pings "$h" "${IP[proxy]}"; then ok=1; break; fi
            sleep 0.1
        done
        [[ $ok == 1 ]] || { echo "$h cannot reach the proxy host"; return 1; }
    done
    head -c 32 /dev/urandom | base64 >"$LOGDIR/secret"
    head -c 32 /dev/urandom | base64 >"$LOGDIR/wrong-secret"
    chmod 600 "$LOGDIR/secret" "$LOGDIR/wrong-secret"
    echo "topology up: ${#CREATED_NS[@]} namespaces, bridge br0 in $NS_SW, VIP $VIP on the proxy's eth0 and the backends' lo"
}

pings() { in_ns "$1" timeout 3 ping -n -q -c 1 -W 1 "$2" >/dev/null 2>&1; }

# Agents: b1 relays to the application (--forward), b2 passes sockets (--handoff-socket).
declare -A AGENT_PID=()
AGENT_RUNS=0
start_agent() {
    local b=$1 secret=${2:-$LOGDIR/secret} target out
    if [[ $b == b1 ]]; then target=(--forward "127.0.0.1:$APP_PORT")
    else target=(--handoff-socket "$LOGDIR/$b-app.sock"); fi
    out="$LOGDIR/$b-agent.$((++AGENT_RUNS))"
    start_bg "$b" "$out" env RUST_LOG=shardproxy=info "$BIN" agent --control "${IP[$b]}:$AGENT_PORT" \
        --vip "$VIP" --secret-file "$secret" "${target[@]}" --admin "$AGENT_ADMIN"
    AGENT_PID[$b]=$STARTED_PID
    wait_for_line "$out" "agent control on" "$STARTED_PID"
}
stop_agent() { stop_ours "${AGENT_PID[$1]}" "$2"; AGENT_PID[$1]=""; }

# Starts a proxy on VIP:$1 with admin $2 and extra flags after; sets STARTED_PID.
PROXY_RUNS=0
start_proxy() {
    local port=$1 admin=$2; shift 2
    local out="$LOGDIR/proxy-$port.$((++PROXY_RUNS))"
    start_bg proxy "$out" "${PROXY_WRAP[@]}" "$ENV_BIN" RUST_LOG=shardproxy=info "$BIN" run --listen "$VIP:$port" \
        "${BACKEND_FLAGS[@]}" --admin "$admin" "$@"
    local pid=$STARTED_PID i
    wait_for_line "$out" "listening on" "$pid" || return 1
    for ((i = 0; i < 50; i++)); do
        http_get proxy "$admin" /healthz 2>/dev/null | grep -q ok && { STARTED_PID=$pid; return 0; }
        sleep 0.1
    done
    log "admin $admin not answering"
    return 1
}
DSR_FLAGS=()
PROXY_WRAP=()                  # a command prefix for start_proxy (case 8)
ENV_BIN=$(command -v env)      # by path: case 8 runs the proxy with an empty PATH
PROXY_PID=""

start_servers() {
    DSR_FLAGS=(--dsr --dsr-device eth0 --dsr-secret-file "$LOGDIR/secret")
    # DSR_EXTRA_FLAGS: extra flags for every --dsr proxy. With e.g. "--dsr-key-prefix none-"
    # nothing is handed off any more, and every case but 5 must fail (the suite's self-check).
    if [[ -n "${DSR_EXTRA_FLAGS:-}" ]]; then
        read -r -a extra <<<"$DSR_EXTRA_FLAGS"
        DSR_FLAGS+=("${extra[@]}")
    fi
    local b
    for b in b1 b2 b3; do
        local app=(python3 "$HERE/dsr_app.py" --name "$b" --tcp "0.0.0.0:$APP_PORT")
        [[ $b == b2 ]] && app+=(--unix "$LOGDIR/b2-app.sock")
        start_bg "$b" "$LOGDIR/$b-app.out" "${app[@]}"
        wait_for_line "$LOGDIR/$b-app.out" "listening on" "$STARTED_PID" || return 1
    done
    start_agent b1 || return 1
    start_agent b2 || return 1
    start_proxy "$PROXY_PORT" "$ADMIN" "${DSR_FLAGS[@]}" || return 1
    PROXY_PID=$STARTED_PID
    echo "servers up: apps on b1 b2 b3, agents on b1 (--forward) and b2 (--handoff-socket), proxy: $(head -1 "$LOGDIR/proxy-$PROXY_PORT.1")"
}

# ---------------------------------------------------------------------------------------------
# Cases

KEYS=()
for ((k = 0; k < 1500; k++)); do KEYS+=("dsr-$k"); done

# First $2 keys (in KEYS order) whose first choice is $1.
keys_owned_by() {
    local owner=$1 n=$2 key out=()
    for key in "${KEYS[@]}"; do
        [[ "${ROUTE_FIRST[$key]}" == "$owner" ]] && out+=("$key")
        [[ ${#out[@]} -ge $n ]] && break
    done
    echo "${out[@]}"
}

# 1. A big download through DSR, bytes verified, for both agent modes; the proxy's eth0
#    transmits under 2 % of the response.
case_download() {
    local b key ok0 ok1 tx0 tx1 rc bad=0 path got pct rate
    for b in b1 b2; do
        key=$(keys_owned_by "$b" 1)
        ok0=$(handoffs "$ADMIN" ok); tx0=$(proxy_tx)
        rc=0
        dsr_client "$PROXY_PORT" 300 --bytes "$BIG" download "$key" || rc=$?
        tx1=$(proxy_tx); ok1=$(handoffs "$ADMIN" ok)
        path=$(client_field "$key" path); got=$(client_field "$key" bytes); rate=$(client_field "$key" MiBps)
        pct=$(awk -v t=$((tx1 - tx0)) -v b="$BIG" 'BEGIN { printf "%.3f", 100 * t / b }')
        log "$b ($key): path=$path, $got of $BIG bytes verified at ${rate:-?} MiB/s; handoffs ok +$((ok1 - ok0)); proxy eth0 tx $((tx1 - tx0)) bytes = $pct % of the response"
        if [[ $rc != 0 ]]; then client_failed "$rc"; bad=1; continue; fi
        [[ "$path" == "${DSR_PATH[$b]}" ]] || { log "expected path ${DSR_PATH[$b]}"; bad=1; }
        [[ "$got" == "$BIG" ]] || { log "expected $BIG verified bytes"; bad=1; }
        [[ $((ok1 - ok0)) == 1 ]] || { log "expected exactly one hand-off"; bad=1; }
        # Under 2 %: the response went from the backend to the client, not through the proxy.
        (( (tx1 - tx0) * 50 < BIG )) || { log "proxy transmitted 2 % or more of the response"; bad=1; }
        grep -q "key=$key via=.* result=get $BIG sent\$" "$LOGDIR/$b-app.out" ||
            { log "the application did not log a clean GET of $BIG for $key"; bad=1; }
    done
    return "$bad"
}

# 2. Bytes the client sends while its flow is frozen are retransmitted and reach the backend;
#    then 200 request/response rounds; then half-close both ways. Both agent modes.
case_frozen() {
    local attempt rt0 rt1 bad=0
    # A hand-off freezes a flow for about a millisecond; the client writes every ~0.2 ms, so
    # some writes nearly always fall in that window. If none did (no retransmission), the
    # whole round is repeated, at most 3 times; every round is fully checked.
    for ((attempt = 1; attempt <= 3; attempt++)); do
        rt0=$(client_retrans)
        frozen_round || bad=1
        rt1=$(client_retrans)
        log "round $attempt: client TCP retransmissions $((rt1 - rt0)) (segments dropped while frozen, sent again)"
        [[ $bad == 0 ]] || return 1
        [[ $((rt1 - rt0)) -gt 0 ]] && return 0
    done
    # Nothing is lost on these links: a retransmission means a frozen segment was dropped and
    # sent again, and the application's byte-for-byte check proves it arrived.
    log "no retransmission in 3 rounds: no byte was sent while a flow was frozen"
    return 1
}
frozen_round() {
    local b key ok0 ok1 rc bad=0 p1 p2
    for b in b1 b2; do
        key=$(keys_owned_by "$b" 2 | awk '{print $2}')
        ok0=$(handoffs "$ADMIN" ok)
        rc=0
        dsr_client "$PROXY_PORT" 90 --stream-bytes 640000 --duration 1.0 --rounds 200 frozen "$key" || rc=$?
        ok1=$(handoffs "$ADMIN" ok)
        p1=$(awk '/halfclose=client-first/ { for (i = 1; i <= NF; i++) if ($i ~ /^path=/) print substr($i, 6) }' "$CLIENT_OUT")
        p2=$(awk '/halfclose=app-first/ { for (i = 1; i <= NF; i++) if ($i ~ /^path=/) print substr($i, 6) }' "$CLIENT_OUT")
        log "$b ($key): $(grep -o 'streamed=[^ ]* over [^ ]*' "$CLIENT_OUT" | head -1) in 5000 writes from the first byte, then 200 echo rounds, client half-close; app half-close; paths $p1 / $p2; handoffs ok +$((ok1 - ok0))"
        if [[ $rc != 0 ]]; then client_failed "$rc"; bad=1; continue; fi
        [[ "$p1" == "${DSR_PATH[$b]}" && "$p2" == "${DSR_PATH[$b]}" ]] || { log "expected path ${DSR_PATH[$b]} for both connections"; bad=1; }
        [[ $((ok1 - ok0)) == 2 ]] || { log "expected 2 hand-offs"; bad=1; }
        # The application verified, after its own FIN, the 100000 bytes the client sent.
        local i seen=0
        for ((i = 0; i < 50; i++)); do
            [[ $(grep -c "key=$key via=.* result=final-ok 100000" "$LOGDIR/$b-app.out" || true) -ge $FINALS_SEEN_NEXT ]] && { seen=1; break; }
            sleep 0.1
        done
        [[ $seen == 1 ]] || { log "the application did not verify the bytes sent after its half-close: $(grep "key=$key " "$LOGDIR/$b-app.out" | tail -2 | tr '\n' ';')"; bad=1; }
    done
    FINALS_SEEN_NEXT=$((FINALS_SEEN_NEXT + 1))
    return "$bad"
}
FINALS_SEEN_NEXT=1   # final-ok lines each frozen key's app log must show after this round

# 3. 200 concurrent hand-offs; after they close, no steering entry, no conntrack entry.
case_concurrent() {
    local keys=() k ok0 ok1 act ct_open map_open hold="$LOGDIR/many.release" rc=0 bad=0 i
    for k in $(keys_owned_by b1 100) $(keys_owned_by b2 100); do keys+=("$k"); done
    [[ ${#keys[@]} == 200 ]] || { log "only ${#keys[@]} keys"; return 1; }
    ok0=$(handoffs "$ADMIN" ok)
    rm -f "$hold"
    CLIENT_OUT="$LOGDIR/many.client"
    timeout 120 ip netns exec "$(ns client)" python3 "$HERE/dsr_client.py" --vip "$VIP" \
        --port "$PROXY_PORT" --proxy-ip "${IP[proxy]}" --hold-file "$hold" --hold-timeout 60 \
        many "${keys[@]}" >"$CLIENT_OUT" 2>"$CLIENT_OUT.err" </dev/null {OUT_FD}>&- {ERR_FD}>&- &
    local cpid=$!
    PIDS+=("$cpid"); ALL_PIDS+=("$cpid")
    for ((i = 0; i < 900; i++)); do
        grep -q '^open ' "$CLIENT_OUT" 2>/dev/null && break
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.1
    done
    local sports
    sports=$(awk '$1 == "sports" { $1 = ""; print }' "$CLIENT_OUT")
    ok1=$(handoffs "$ADMIN" ok)
    act=$(scrape | metric shardproxy_dsr_flows_active)
    ct_open=$(conntrack_count $sports)
    map_open=$(nft_elements "$PROXY_PORT" map flows)
    log "$(grep '^open ' "$CLIENT_OUT" || echo 'never opened') concurrently: handoffs ok +$((ok1 - ok0)), flows_active $act, flows map $map_open elements, proxy conntrack entries for their ports $ct_open"
    touch "$hold"
    wait "$cpid" || rc=$?
    forget_pid "$cpid"
    local good
    good=$(grep -cE "path=(forward|handoff-socket) result=ok" "$CLIENT_OUT" || true)
    log "closed: $good of 200 verified on a DSR path (client exit $rc)"
    [[ $rc == 0 && $good == 200 ]] || { client_failed "$rc"; bad=1; }
    [[ $((ok1 - ok0)) == 200 ]] || { log "expected 200 hand-offs"; bad=1; }
    [[ ${act%.*} -ge 200 ]] || { log "expected 200 active flows"; bad=1; }
    [[ $map_open -ge 200 ]] || { log "expected 200 elements in the flows map"; bad=1; }
    # The check after the close proves something only if the entries existed.
    [[ $ct_open == 200 ]] || { log "expected a conntrack entry for each open flow"; bad=1; }
    # After the close (agents report it; --handoff-socket is polled every 500 ms): bounded wait.
    local map frozen ct
    for ((i = 0; i < 100; i++)); do
        act=$(scrape | metric shardproxy_dsr_flows_active)
        map=$(nft_elements "$PROXY_PORT" map flows); frozen=$(nft_elements "$PROXY_PORT" set frozen)
        ct=$(conntrack_count $sports)
        [[ ${act%.*} == 0 && $map == 0 && $frozen == 0 && $ct == 0 ]] && break
        sleep 0.2
    done
    local ended
    ended=$(scrape | metric shardproxy_dsr_flows_ended_total 'reason="closed"')
    log "after the close ($((i * 2 / 10)) s): flows_active $act, flows map $map, frozen set $frozen, conntrack entries $ct; flows_ended_total{closed} $ended"
    [[ ${act%.*} == 0 && $map == 0 && $frozen == 0 && $ct == 0 ]] || bad=1
    return "$bad"
}

# One echo through VIP:$PROXY_PORT for key $1; expects backend $2 on path $3 and result
# counter $4 (a regex of results) +1 and nothing else; logs what happened.
fallback_echo() {
    local key=$1 be=$2 want_path=$3 want_result=$4 m0 m1 rc=0
    m0=$(scrape)
    dsr_client "$PROXY_PORT" 30 echo "$key" || rc=$?
    m1=$(scrape)
    local path got r d changed="" total=0
    path=$(client_field "$key" path); got=$(client_field "$key" backend)
    for r in ok nft_missing no_permission steering_failed not_established unsupported invalid io \
        agent_unreachable agent_auth agent_timeout agent_lost agent_refused; do
        d=$(( $(metric shardproxy_dsr_handoffs_total "result=\"$r\"" <<<"$m1") - $(metric shardproxy_dsr_handoffs_total "result=\"$r\"" <<<"$m0") ))
        if [[ $d != 0 ]]; then changed+="$r+$d "; total=$((total + d)); fi
    done
    log "  $key: backend $got, path $path, echo $([[ $rc == 0 ]] && echo verified || echo FAILED); handoffs: ${changed:-none}"
    [[ $rc == 0 ]] || { client_failed "$rc"; return 1; }
    [[ "$got" == "$be" && "$path" == "$want_path" ]] || { log "  expected $be on path $want_path"; return 1; }
    [[ $total == 1 && "$changed" =~ ^($want_result)\+1\ $ ]] || { log "  expected one result matching $want_result"; return 1; }
}

# 4. Fallbacks: agent killed, agent with the wrong secret, agent host unreachable.
case_fallbacks() {
    local key bad=0
    key=$(keys_owned_by b1 3 | awk '{print $3}')
    log "a) SIGKILL to b1's agent"
    stop_agent b1 KILL
    sleep 0.3
    fallback_echo "$key" b1 spliced 'agent_unreachable|agent_lost' || bad=1

    log "b) b1's agent restarted with the wrong secret"
    start_agent b1 "$LOGDIR/wrong-secret" || { log "agent did not start"; return 1; }
    sleep 1.3    # past the link's 1 s retry pause after the failed connect
    fallback_echo "$key" b1 spliced agent_auth || bad=1
    local macs
    macs=$(agent_scrape b1 | metric shardproxy_agent_control_errors_total 'reason="bad_mac"')
    log "  agent control_errors_total{bad_mac} = $macs"
    [[ ${macs%.*} -ge 1 ]] || { log "  the agent did not count the bad MAC"; bad=1; }

    log "c) b1's agent back with the right secret"
    stop_agent b1 KILL
    start_agent b1 || { log "agent did not start"; return 1; }
    sleep 1.3
    fallback_echo "$key" b1 forward ok || bad=1

    log "d) b1's agent port unreachable (nft drop of tcp dport $AGENT_PORT in b1; app port open)"
    in_ns b1 nft -f - <<EOF
table inet sd_agentdrop {
    chain in { type filter hook input priority 0; policy accept; tcp dport $AGENT_PORT drop; }
}
EOF
    # The live control connection goes with the old agent (its FIN still leaves b1); the
    # new agent listens behind the drop rule.
    stop_agent b1 KILL
    start_agent b1 || { log "agent did not start"; return 1; }
    sleep 1.3
    fallback_echo "$key" b1 spliced agent_unreachable || bad=1
    in_ns b1 nft delete table inet sd_agentdrop
    sleep 1.3
    log "e) rule removed"
    fallback_echo "$key" b1 forward ok || bad=1
    return "$bad"
}

# 5. Without --dsr (same backends with agent=): spliced as before, no DSR metric, no table.
case_no_dsr() {
    local port=7001 admin=127.0.0.1:9091 pid bad=0 keys=() b rc=0 imp0 imp1
    for b in b1 b2 b3; do keys+=("$(keys_owned_by "$b" 1)"); done
    imp0=$(( $(agent_scrape b1 | metric shardproxy_agent_handoffs_total 'result="imported"') + $(agent_scrape b2 | metric shardproxy_agent_handoffs_total 'result="imported"') ))
    start_proxy "$port" "$admin" || return 1
    pid=$STARTED_PID
    dsr_client "$port" 30 echo "${keys[@]}" || rc=$?
    local k paths=""
    for k in "${keys[@]}"; do
        paths+="$(client_field "$k" backend)=$(client_field "$k" path) "
        [[ "$(client_field "$k" path)" == spliced ]] || bad=1
    done
    local series
    series=$(admin_scrape "$admin" | grep -c '^shardproxy_dsr_' || true)
    imp1=$(( $(agent_scrape b1 | metric shardproxy_agent_handoffs_total 'result="imported"') + $(agent_scrape b2 | metric shardproxy_agent_handoffs_total 'result="imported"') ))
    log "client exit $rc; $paths; shardproxy_dsr_ series: $series; agents' imports +$((imp1 - imp0)); table $(table_name $port): $(table_exists $port && echo present || echo absent)"
    [[ $rc == 0 ]] || { client_failed "$rc"; bad=1; }
    [[ $series == 0 && $((imp1 - imp0)) == 0 ]] || bad=1
    table_exists "$port" && bad=1
    stop_ours "$pid" TERM
    [[ $STOPPED_RC == 0 ]] || { log "proxy exit: $STOPPED_RC"; bad=1; }
    return "$bad"
}

# 6. A clean exit removes the table; a crashed proxy's table is replaced at the next start
#    and removed at its clean exit.
case_table_lifecycle() {
    local port=7002 admin=127.0.0.1:9092 pid bad=0 t key
    t=$(table_name $port)
    key=$(keys_owned_by b2 4 | awk '{print $4}')
    start_proxy "$port" "$admin" "${DSR_FLAGS[@]}" || return 1
    pid=$STARTED_PID
    table_exists $port || { log "no table $t while the proxy runs"; bad=1; }
    stop_ours "$pid" TERM
    log "start, SIGTERM: exit $STOPPED_RC, table $(table_exists $port && echo LEFT || echo removed)"
    [[ $STOPPED_RC == 0 ]] && ! table_exists $port || bad=1

    start_proxy "$port" "$admin" "${DSR_FLAGS[@]}" || return 1
    pid=$STARTED_PID
    stop_ours "$pid" KILL
    table_exists $port || { log "SIGKILL: no table left behind, nothing to replace"; return 1; }
    # Mark the leftover, so its replacement can be told from it.
    in_ns proxy nft add element netdev "$t" flows "{ 10.202.0.250 . 1 : ${IP[b1]} }"
    log "start, SIGKILL: table left with $(nft_elements $port map flows) marker element in flows"
    start_proxy "$port" "$admin" "${DSR_FLAGS[@]}" || return 1
    pid=$STARTED_PID
    local marker ok0 ok1 rc=0
    marker=$(nft_elements $port map flows)
    ok0=$(handoffs "$admin" ok)
    dsr_client "$port" 30 echo "$key" || rc=$?
    ok1=$(handoffs "$admin" ok)
    log "restart: table $(table_exists $port && echo present || echo MISSING), marker elements $marker; $key path $(client_field "$key" path), handoffs ok +$((ok1 - ok0))"
    table_exists $port && [[ $marker == 0 ]] || bad=1
    [[ $rc == 0 && "$(client_field "$key" path)" == handoff-socket && $((ok1 - ok0)) == 1 ]] || { [[ $rc == 0 ]] || client_failed "$rc"; bad=1; }
    stop_ours "$pid" TERM
    log "SIGTERM: exit $STOPPED_RC, table $(table_exists $port && echo LEFT || echo removed)"
    [[ $STOPPED_RC == 0 ]] && ! table_exists $port || bad=1
    return "$bad"
}

# Hands off one connection for key $2 through VIP:$1 and checks only the proxy with admin $3
# counted it (the other proxy's admin is $4).
own_handoff() {
    local port=$1 key=$2 admin=$3 other=$4 a0 b0 a1 b1c rc=0
    a0=$(handoffs "$admin" ok); b0=$(handoffs "$other" ok)
    dsr_client "$port" 30 echo "$key" || rc=$?
    a1=$(handoffs "$admin" ok); b1c=$(handoffs "$other" ok)
    log "  :$port $key: path $(client_field "$key" path); this proxy ok +$((a1 - a0)), the other +$((b1c - b0))"
    [[ $rc == 0 ]] || { client_failed "$rc"; return 1; }
    [[ "$(client_field "$key" path)" == forward && $((a1 - a0)) == 1 && $((b1c - b0)) == 0 ]]
}

# 7. Two proxies with --dsr, same VIP and device, two ports: each hands off its own
#    connections and removes only its own table.
case_two_proxies() {
    local port2=7003 admin2=127.0.0.1:9093 pid2 bad=0 key
    key=$(keys_owned_by b1 5 | awk '{print $5}')
    start_proxy "$port2" "$admin2" "${DSR_FLAGS[@]}" || return 1
    pid2=$STARTED_PID
    log "tables: $(in_ns proxy nft list tables netdev | awk '{print $3}' | tr '\n' ' ')"
    own_handoff "$PROXY_PORT" "$key" "$ADMIN" "$admin2" || bad=1
    own_handoff "$port2" "$key" "$admin2" "$ADMIN" || bad=1
    stop_ours "$PROXY_PID" TERM
    log "SIGTERM to the :$PROXY_PORT proxy: exit $STOPPED_RC; its table $(table_exists $PROXY_PORT && echo LEFT || echo removed), :$port2's $(table_exists $port2 && echo kept || echo REMOVED)"
    [[ $STOPPED_RC == 0 ]] && ! table_exists $PROXY_PORT && table_exists $port2 || bad=1
    local ok0 ok1 rc=0
    ok0=$(handoffs "$admin2" ok)
    dsr_client "$port2" 30 echo "$key" || rc=$?
    ok1=$(handoffs "$admin2" ok)
    log "  :$port2 still hands off: path $(client_field "$key" path), ok +$((ok1 - ok0))"
    [[ $rc == 0 && $((ok1 - ok0)) == 1 ]] || bad=1
    start_proxy "$PROXY_PORT" "$ADMIN" "${DSR_FLAGS[@]}" || return 1
    PROXY_PID=$STARTED_PID
    own_handoff "$PROXY_PORT" "$key" "$ADMIN" "$admin2" || bad=1
    stop_ours "$pid2" TERM
    log "SIGTERM to the :$port2 proxy: exit $STOPPED_RC; its table $(table_exists $port2 && echo LEFT || echo removed), :$PROXY_PORT's $(table_exists $PROXY_PORT && echo kept || echo REMOVED)"
    [[ $STOPPED_RC == 0 ]] && ! table_exists $port2 && table_exists $PROXY_PORT || bad=1
    rc=0
    ok0=$(handoffs "$ADMIN" ok)
    dsr_client "$PROXY_PORT" 30 echo "$key" || rc=$?
    ok1=$(handoffs "$ADMIN" ok)
    log "  :$PROXY_PORT still hands off: path $(client_field "$key" path), ok +$((ok1 - ok0))"
    [[ $rc == 0 && $((ok1 - ok0)) == 1 ]] || bad=1
    return "$bad"
}

# ---------------------------------------------------------------------------------------------
# Main

# 8. Steering unavailable — no `nft` on the proxy's PATH, or no CAP_NET_ADMIN — the proxy
#    still starts, and every connection that would be handed off is spliced intact and
#    counted with the reason.
case_no_steering() {
    local bad=0 key sub port admin pid rc m path got n
    key=$(keys_owned_by b1 4 | awk '{print $4}')
    for sub in "nft_missing:env PATH=/nonexistent" \
        "no_permission:setpriv --bounding-set=-net_admin --inh-caps=-net_admin"; do
        local want=${sub%%:*} wrap=${sub#*:}
        port=7005; admin=127.0.0.1:9095
        read -r -a PROXY_WRAP <<<"$wrap"
        start_proxy "$port" "$admin" "${DSR_FLAGS[@]}" || { PROXY_WRAP=(); log "$want: proxy did not start"; return 1; }
        PROXY_WRAP=()
        pid=$STARTED_PID
        rc=0
        dsr_client "$port" 30 echo "$key" || rc=$?
        m=$(admin_scrape "$admin")
        path=$(client_field "$key" path); got=$(client_field "$key" backend)
        n=$(metric shardproxy_dsr_handoffs_total "result=\"$want\"" <<<"$m")
        log "$wrap: backend $got, path $path, echo $([[ $rc == 0 ]] && echo verified || echo FAILED); handoffs_total{$want} = $n, ok = $(metric shardproxy_dsr_handoffs_total 'result="ok"' <<<"$m"); table $(table_exists $port && echo present || echo absent)"
        [[ $rc == 0 ]] || { client_failed "$rc"; bad=1; }
        [[ "$got" == b1 && "$path" == spliced && ${n%.*} == 1 ]] || bad=1
        table_exists "$port" && bad=1
        stop_ours "$pid" TERM
    done
    return "$bad"
}

# Opens two held connections through the proxy on port $1 (dsr_client.py `many`: each stays
# open until its hold file appears, at most $2 s): key $3 with hold file $4 and output $5, key
# $6 with $7 and $8. Sets HELD=(pid1 pid2) and waits (bounded, 10 s) until both are open.
HELD=()
hold_two() {
    local port=$1 hold_timeout=$2 i outs=()
    shift 2
    HELD=()
    for i in 0 1; do
        local key=$1 hold=$2 out=$3
        shift 3
        rm -f "$hold"
        timeout $((hold_timeout + 20)) ip netns exec "$(ns client)" python3 "$HERE/dsr_client.py" \
            --vip "$VIP" --port "$port" --proxy-ip "${IP[proxy]}" --hold-file "$hold" \
            --hold-timeout "$hold_timeout" many "$key" >"$out" 2>"$out.err" </dev/null \
            {OUT_FD}>&- {ERR_FD}>&- &
        PIDS+=("$!"); ALL_PIDS+=("$!"); HELD+=("$!")
        outs+=("$out")
    done
    for ((i = 0; i < 100; i++)); do
        grep -q '^open 1' "${outs[0]}" 2>/dev/null && grep -q '^open 1' "${outs[1]}" 2>/dev/null && break
        sleep 0.1
    done
}

# 9. An agent restart: the application keeps its passed connections; the proxy, reconciling
#    every third of --dsr-flow-timeout, keeps steering the live one (its new agent finds it in
#    the kernel) past the flow timeout, and forgets the one that closed while no agent could
#    report it (ended{reason="gone"}).
case_agent_restart() {
    local port=7006 admin=127.0.0.1:9096 pid bad=0 keys hold1="$LOGDIR/restart.1" hold2="$LOGDIR/restart.2"
    local c1 c2 out1="$LOGDIR/restart.client1" out2="$LOGDIR/restart.client2" rc1=0 rc2=0 i m act gone map
    read -r -a keys <<<"$(keys_owned_by b2 2)"
    [[ ${#keys[@]} == 2 ]] || { log "need two keys of b2"; return 1; }
    start_proxy "$port" "$admin" "${DSR_FLAGS[@]}" --dsr-flow-timeout 3s || return 1
    pid=$STARTED_PID
    hold_two "$port" 40 "${keys[0]}" "$hold1" "$out1" "${keys[1]}" "$hold2" "$out2"
    c1=${HELD[0]} c2=${HELD[1]}
    m=$(admin_scrape "$admin")
    log "two connections open: handoffs ok $(metric shardproxy_dsr_handoffs_total 'result="ok"' <<<"$m"), flows_active $(metric shardproxy_dsr_flows_active <<<"$m")"
    [[ $(metric shardproxy_dsr_flows_active <<<"$m") == 2 ]] || bad=1
    stop_agent b2 KILL
    touch "$hold2"                       # the second closes while b2 has no agent
    wait "$c2" || rc2=$?; forget_pid "$c2"
    start_agent b2 || { log "agent did not restart"; return 1; }
    sleep 5                              # past the 3 s flow timeout
    m=$(admin_scrape "$admin")
    act=$(metric shardproxy_dsr_flows_active <<<"$m")
    gone=$(metric shardproxy_dsr_flows_ended_total 'reason="gone"' <<<"$m")
    map=$(nft_elements "$port" map flows)
    log "5 s after the restart: second client exit $rc2 ($(grep -o 'result=[a-z]*' "$out2")), flows_active $act, ended{gone} $gone, flows map $map"
    [[ $rc2 == 0 && ${act%.*} == 1 && ${gone%.*} == 1 && $map == 1 ]] || bad=1
    touch "$hold1"                       # the first still works, steered past the timeout
    wait "$c1" || rc1=$?; forget_pid "$c1"
    for ((i = 0; i < 50; i++)); do
        act=$(admin_scrape "$admin" | metric shardproxy_dsr_flows_active)
        [[ ${act%.*} == 0 ]] && break
        sleep 0.2
    done
    log "first client exit $rc1 ($(grep -o 'path=[a-z-]* result=[a-z]*' "$out1")); flows_active then $act"
    grep -q 'path=handoff-socket result=ok' "$out1" || bad=1
    [[ $rc1 == 0 && ${act%.*} == 0 ]] || bad=1
    stop_ours "$pid" TERM
    return "$bad"
}

# 10. A backend's max_connections counts its handed-off connections until their agent reports
#     them closed: with b1 capped at 2 and two hand-offs to b1 held open, a third connection
#     for a b1 key is refused (backend_full, closed without a byte, not offered to the agent);
#     once one held connection closes and its flow is forgotten, a new one is handed off.
case_backend_cap() {
    local port=7007 admin=127.0.0.1:9097 pid bad=0 keys i m0 m c1 c2 rc rc1=0 rc2=0 act be ok0 ok1
    local hold1="$LOGDIR/cap.hold1" hold2="$LOGDIR/cap.hold2" out1="$LOGDIR/cap.client1" out2="$LOGDIR/cap.client2"
    read -r -a keys <<<"$(keys_owned_by b1 4)"
    [[ ${#keys[@]} == 4 ]] || { log "need four keys of b1"; return 1; }
    # start_proxy reads BACKEND_FLAGS: this proxy caps b1 at 2 (routing is the same).
    local BACKEND_FLAGS=(
        --backend "b1=${IP[b1]}:$APP_PORT,agent=${IP[b1]}:$AGENT_PORT,max_connections=2"
        --backend "b2=${IP[b2]}:$APP_PORT,agent=${IP[b2]}:$AGENT_PORT"
        --backend "b3=${IP[b3]}:$APP_PORT"
    )
    start_proxy "$port" "$admin" "${DSR_FLAGS[@]}" || return 1
    pid=$STARTED_PID
    hold_two "$port" 20 "${keys[0]}" "$hold1" "$out1" "${keys[1]}" "$hold2" "$out2"
    c1=${HELD[0]} c2=${HELD[1]}
    m0=$(admin_scrape "$admin")
    log "two held (${keys[0]} ${keys[1]}): handoffs ok $(metric shardproxy_dsr_handoffs_total 'result="ok"' <<<"$m0"), flows_active $(metric shardproxy_dsr_flows_active <<<"$m0"), b1 active_connections $(b1_connections <<<"$m0")"
    [[ $(metric shardproxy_dsr_handoffs_total 'result="ok"' <<<"$m0") == 2 && $(metric shardproxy_dsr_flows_active <<<"$m0") == 2 && $(b1_connections <<<"$m0") == 2 ]] || bad=1

    rc=0
    dsr_client "$port" 15 --timeout 5 refused "${keys[2]}" || rc=$?
    m=$(admin_scrape "$admin")
    local full=$(( $(metric shardproxy_connection_errors_total 'reason="backend_full"' <<<"$m") - $(metric shardproxy_connection_errors_total 'reason="backend_full"' <<<"$m0") ))
    local offered=$(( $(handoffs_tried <<<"$m") - $(handoffs_tried <<<"$m0") ))
    log "third (${keys[2]}): client exit $rc ($(grep -o 'closed=[a-z]* result=.*' "$CLIENT_OUT" || head -1 "$CLIENT_OUT")); backend_full +$full; hand-offs tried +$offered; b1 active_connections $(b1_connections <<<"$m")"
    [[ $rc == 0 ]] || { client_failed "$rc"; bad=1; }
    [[ $full == 1 && $offered == 0 ]] || bad=1

    touch "$hold1"
    wait "$c1" || rc1=$?; forget_pid "$c1"
    for ((i = 0; i < 50; i++)); do
        m=$(admin_scrape "$admin")
        act=$(metric shardproxy_dsr_flows_active <<<"$m")
        [[ ${act%.*} == 1 ]] && break
        sleep 0.1
    done
    be=$(b1_connections <<<"$m")
    log "first held closed (exit $rc1, $(grep -o 'path=[a-z-]* result=[a-z]*' "$out1")): flows_active $act, b1 active_connections $be, after ~$((i * 100)) ms"
    [[ $rc1 == 0 && ${act%.*} == 1 && ${be%.*} == 1 ]] || bad=1

    rc=0
    ok0=$(handoffs "$admin" ok)
    dsr_client "$port" 15 echo "${keys[3]}" || rc=$?
    ok1=$(handoffs "$admin" ok)
    log "then ${keys[3]}: backend $(client_field "${keys[3]}" backend), path $(client_field "${keys[3]}" path), handoffs ok +$((ok1 - ok0))"
    [[ $rc == 0 ]] || { client_failed "$rc"; bad=1; }
    [[ "$(client_field "${keys[3]}" path)" == forward && $((ok1 - ok0)) == 1 ]] || bad=1

    touch "$hold2"
    wait "$c2" || rc2=$?; forget_pid "$c2"
    for ((i = 0; i < 50; i++)); do
        m=$(admin_scrape "$admin")
        act=$(metric shardproxy_dsr_flows_active <<<"$m"); be=$(b1_connections <<<"$m")
        [[ ${act%.*} == 0 && ${be%.*} == 0 ]] && break
        sleep 0.1
    done
    log "all closed (second held exit $rc2): flows_active $act, b1 active_connections $be"
    [[ $rc2 == 0 && ${act%.*} == 0 && ${be%.*} == 0 ]] || bad=1
    stop_ours "$pid" TERM
    [[ $STOPPED_RC == 0 ]] || { log "proxy exit: $STOPPED_RC"; bad=1; }
    return "$bad"
}

main() {
    echo "shardproxy DSR netns tests (prefix $P)"
    if ! preflight; then fail "preflight"; summary; exit 1; fi
    LOGDIR=$(mktemp -d "/tmp/$P-dsr.XXXXXX")
    if ! setup_topology; then fail "setup: topology"; cleanup; check_cleanup; summary; exit 1; fi
    if ! start_servers || ! route_keys "${KEYS[@]}"; then
        fail "setup: servers"
        local f
        for f in "$LOGDIR"/*.err; do
            [[ -s "$f" ]] || continue
            echo "--- $(basename "$f") (first lines)"
            sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -v '^[[:space:]]*$' | head -n 4 || true
        done
        cleanup; check_cleanup; summary; exit 1
    fi

    run_case "1 download: $BIG bytes through DSR verified, both agent modes, proxy tx < 2 %" case_download
    run_case "2 frozen bytes retransmitted to the backend; 200 rounds; half-close both ways" case_frozen
    run_case "3 200 concurrent hand-offs; no flow, frozen or conntrack entry left after close" case_concurrent
    run_case "4 fallbacks (agent killed, wrong secret, agent unreachable) spliced intact, by reason" case_fallbacks
    run_case "5 without --dsr: spliced, no shardproxy_dsr_ series, no table" case_no_dsr
    run_case "6 table removed at exit; a crashed proxy's table replaced, then removed" case_table_lifecycle
    run_case "7 two --dsr proxies on one device: own hand-offs, own table cleanup" case_two_proxies
    run_case "8 steering unavailable (no nft, no CAP_NET_ADMIN): spliced intact, by reason" case_no_steering
    run_case "9 agent restart: the live flow stays steered past the flow timeout, the closed one is forgotten" case_agent_restart
    run_case "10 max_connections counts handed-off connections until closed: the third refused (backend_full), room again after a close" case_backend_cap

    if [[ $FAILED -gt 0 ]]; then
        local f
        for f in "$LOGDIR"/proxy-*.err "$LOGDIR"/b*-agent.*.err; do
            [[ -s "$f" ]] || continue
            echo "--- $(basename "$f") (last 8 lines)"
            sed 's/\x1b\[[0-9;]*m//g' "$f" | tail -n 8 || true
        done
    fi
    cleanup
    check_cleanup
    summary
    [[ $FAILED == 0 ]]
}

main "$@"
