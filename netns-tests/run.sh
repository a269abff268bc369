#!/usr/bin/env bash
# Network-namespace tests for shardproxy: real hosts (namespaces) on a virtual switch, real
# links with delay and loss, a blackholed backend host. See README.md beside this file.
#
# Usage (as root):  netns-tests/run.sh
#   SHARDPROXY_BIN=/path/to/shardproxy   use this binary (default: cargo build --release)
#   NETNS_KEEP_LOGS=1                    keep the log directory (its path is printed)
#   NETNS_VERBOSE=1                      print every command's output as it runs
#
# Prints PASS/FAIL per case and ends with the line "N passed, M failed"; exits 1 if any
# failed. Touches only namespaces it creates (prefix sp<pid>-) and addresses in 10.201.0.0/24
# inside them; the EXIT trap kills only the processes it started and deletes its namespaces.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

# ---------------------------------------------------------------------------------------------
# Topology

P="sp$$"                       # unique prefix: namespaces are $P-sw, $P-client, ...
NS_SW="$P-sw"                  # the switch: one bridge, one port per host
NS_CLIENT="$P-client"
HOSTS=(client proxy b1 b2 b3)
declare -A IP=([client]=10.201.0.10 [proxy]=10.201.0.2 [b1]=10.201.0.11 [b2]=10.201.0.12 [b3]=10.201.0.13)
NET_PREFIX=24
PROXY_PORT=7000
BACKEND_PORT=9000
ADMIN="127.0.0.1:9090"          # inside the proxy namespace only
PROXY_ADDR="${IP[proxy]}:$PROXY_PORT"
BACKEND_FLAGS=(
    --backend "b1=${IP[b1]}:$BACKEND_PORT"
    --backend "b2=${IP[b2]}:$BACKEND_PORT"
    --backend "b3=${IP[b3]}:$BACKEND_PORT"
)
NETEM=(delay 5ms loss 1%)

# Bookkeeping (cleanup of exactly what this run created, PASS/FAIL, traps) and shared helpers.
# shellcheck source=netns-tests/lib.sh
source "$HERE/lib.sh"

# Runs `shardproxy client` from the client host; fills GOT_BACKEND[key], GOT_BYTES[key].
# Extra flags before "--", keys after. Returns the client's exit status.
declare -A GOT_BACKEND=() GOT_BYTES=()
CLIENT_OUT=""
run_client() {
    local limit=$1; shift
    local flags=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do flags+=("$1"); shift; done
    shift
    GOT_BACKEND=(); GOT_BYTES=()
    local rc=0 key be rest
    CLIENT_OUT="$LOGDIR/client.$((++CLIENT_RUNS))"
    in_ns client timeout "$limit" "$BIN" client --connect "$PROXY_ADDR" "${flags[@]}" "$@" \
        >"$CLIENT_OUT" 2>"$CLIENT_OUT.err" || rc=$?
    while IFS=$'\t' read -r key be rest; do
        [[ -n "$key" ]] || continue
        GOT_BACKEND[$key]=$be
        GOT_BYTES[$key]=${rest%% *}
    done <"$CLIENT_OUT"
    verbose "client rc=$rc, $(wc -l <"$CLIENT_OUT") lines, stderr: $(head -c 300 "$CLIENT_OUT.err")"
    return "$rc"
}
CLIENT_RUNS=0

# The impaired link: `tc netem delay 5ms loss 1%` when the kernel has sch_netem; otherwise
# (kernels built without it, such as this project's CI machines) a rate limit with a queue
# (tbf) for queueing delay plus 1% random loss per direction with nftables `numgen random`
# in the switch. Chosen once in setup by probing; LINK_MODE says which.
LINK_MODE=""
TBF=(rate 50mbit burst 64kb latency 25ms)
probe_link_mode() {
    if ip netns exec "$NS_SW" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
        ip netns exec "$NS_SW" tc qdisc del dev lo root 2>/dev/null || true
        LINK_MODE=netem
    else
        LINK_MODE=tbf+nft
    fi
}
link_desc() {
    if [[ $LINK_MODE == netem ]]; then echo "netem ${NETEM[*]}"
    else echo "tbf ${TBF[*]} + nft numgen random 1% loss (no sch_netem in this kernel)"; fi
}

# Impairs both directions of host $1's link: its own eth0 (host -> switch) and its switch
# port p-$1 (switch -> host).
link_impair() {
    local h=$1
    if [[ $LINK_MODE == netem ]]; then
        in_ns "$h" tc qdisc replace dev eth0 root netem "${NETEM[@]}" &&
            ip netns exec "$NS_SW" tc qdisc replace dev "p-$h" root netem "${NETEM[@]}"
    else
        in_ns "$h" tc qdisc replace dev eth0 root tbf "${TBF[@]}" &&
            ip netns exec "$NS_SW" tc qdisc replace dev "p-$h" root tbf "${TBF[@]}" &&
            ip netns exec "$NS_SW" nft -f - <<EOF
table bridge sp_loss_$h {
    chain lossy {
        type filter hook forward priority 0; policy accept;
        iifname "p-$h" numgen random mod 100 < 1 counter drop
        oifname "p-$h" numgen random mod 100 < 1 counter drop
    }
}
EOF
    fi
}
link_restore() {
    local h=$1
    in_ns "$h" tc qdisc del dev eth0 root 2>/dev/null || true
    ip netns exec "$NS_SW" tc qdisc del dev "p-$h" root 2>/dev/null || true
    ip netns exec "$NS_SW" nft delete table bridge "sp_loss_$h" 2>/dev/null || true
}
# Packets dropped on purpose on host $1's link so far (both directions; before link_restore).
link_drops() {
    local h=$1 a b c
    a=$(in_ns "$h" tc -s qdisc show dev eth0 | awk '$1 == "qdisc" {q = $2} q == "netem" && /dropped/ {gsub(",", "", $7); print $7; exit}')
    b=$(ip netns exec "$NS_SW" tc -s qdisc show dev "p-$h" | awk '$1 == "qdisc" {q = $2} q == "netem" && /dropped/ {gsub(",", "", $7); print $7; exit}')
    c=$(ip netns exec "$NS_SW" nft list table bridge "sp_loss_$h" 2>/dev/null |
        awk '{for (i = 1; i < NF; i++) if ($i == "packets") s += $(i + 1)} END {print s + 0}')
    echo $(( ${a:-0} + ${b:-0} + ${c:-0} ))
}

blackhole_on() {
    in_ns "$1" nft -f - <<'EOF'
table inet sp_blackhole {
    chain in { type filter hook input priority 0; policy drop; }
    chain out { type filter hook output priority 0; policy drop; }
}
EOF
}
blackhole_off() { in_ns "$1" nft delete table inet sp_blackhole; }

pings() { in_ns "$1" timeout 3 ping -n -q -c 1 -W 1 "$2" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------
# Preflight and setup

preflight() {
    if [[ $EUID -ne 0 ]]; then echo "must run as root (network namespaces, tc, nft)"; return 1; fi
    local missing=() t
    for t in ip tc nft ping timeout awk; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "missing tools: ${missing[*]} (apt-get install iproute2 nftables iputils-ping coreutils gawk)"
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
    # Quiet IPv6 (router solicitations, DAD): only IPv4 traffic on these links.
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    ip netns exec "$1" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
}

setup_topology() {
    local h
    for h in sw "${HOSTS[@]}"; do
        if ns_exists "$(ns "$h")"; then
            echo "namespace $(ns "$h") already exists"; return 1
        fi
    done
    add_ns "$NS_SW"
    ip netns exec "$NS_SW" ip link add br0 type bridge stp_state 0 forward_delay 0
    ip netns exec "$NS_SW" ip link set br0 up
    for h in "${HOSTS[@]}"; do
        add_ns "$(ns "$h")"
        # Created directly inside the two namespaces: no interface ever appears in the root one.
        ip link add eth0 netns "$(ns "$h")" type veth peer name "p-$h" netns "$NS_SW"
        ip netns exec "$NS_SW" ip link set "p-$h" master br0
        ip netns exec "$NS_SW" ip link set "p-$h" up
        in_ns "$h" ip addr add "${IP[$h]}/$NET_PREFIX" dev eth0
        in_ns "$h" ip link set eth0 up
    done
    # Readiness: every host reaches the proxy host over the bridge (bounded).
    local i ok
    for h in client b1 b2 b3; do
        ok=0
        for ((i = 0; i < 20; i++)); do
            if pings "$h" "${IP[proxy]}"; then ok=1; break; fi
            sleep 0.1
        done
        [[ $ok == 1 ]] || { echo "$h cannot reach the proxy host"; return 1; }
    done
    probe_link_mode
    echo "topology up: ${#CREATED_NS[@]} namespaces, bridge br0 in $NS_SW; impaired links: $(link_desc)"
}

PROXY_PID=""
start_servers() {
    local b
    for b in b1 b2 b3; do
        start_bg "$b" "$LOGDIR/$b.out" "$BIN" backend --listen "${IP[$b]}:$BACKEND_PORT" --name "$b"
        wait_for_line "$LOGDIR/$b.out" "listening on" "$STARTED_PID" || return 1
    done
    start_bg proxy "$LOGDIR/proxy.out" "$BIN" run --listen "$PROXY_ADDR" "${BACKEND_FLAGS[@]}" \
        --admin "$ADMIN" --connect-timeout 300ms --max-tries 3 --drain-timeout 60s
    PROXY_PID=$STARTED_PID
    wait_for_line "$LOGDIR/proxy.out" "listening on" "$PROXY_PID" || return 1
    local i
    for ((i = 0; i < 50; i++)); do
        if http_get proxy "$ADMIN" /healthz 2>/dev/null | grep ok >/dev/null; then
            echo "servers up: $(head -1 "$LOGDIR/proxy.out")"
            return 0
        fi
        sleep 0.1
    done
    echo "admin /healthz not answering"
    return 1
}

# ---------------------------------------------------------------------------------------------
# Cases

KEYS=()
for ((k = 0; k < 200; k++)); do KEYS+=("user-$k"); done
BIG=4000000

# Key header bytes the echo returns with the payload (u16 length + key; forwarded by default).
header_len() { echo $((2 + ${#1})); }

# 1. Routing across real hosts: every key lands on the first name `shardproxy route` ranks.
case_routing() {
    route_keys "${KEYS[@]}" || return 1
    local rc=0
    run_client 60 --payload 256 -- "${KEYS[@]}" || rc=$?
    if [[ $rc != 0 ]]; then log "client exited $rc: $(head -3 "$CLIENT_OUT.err" | tr "\n" ";")"; return 1; fi
    local key bad=0 want
    declare -A per=()
    for key in "${KEYS[@]}"; do
        want=$((256 + $(header_len "$key")))
        if [[ "${GOT_BACKEND[$key]:-}" != "${ROUTE_FIRST[$key]}" || "${GOT_BYTES[$key]:-}" != "$want" ]]; then
            ((bad++ < 5)) && log "key $key: got ${GOT_BACKEND[$key]:-none} (${GOT_BYTES[$key]:-0} bytes), route says ${ROUTE_FIRST[$key]} ($want bytes)"
        fi
        per[${GOT_BACKEND[$key]:-none}]=$((${per[${GOT_BACKEND[$key]:-none}]:-0} + 1))
    done
    log "${#KEYS[@]} keys: b1=${per[b1]:-0} b2=${per[b2]:-0} b3=${per[b3]:-0}, $bad misrouted"
    [[ $bad == 0 ]] || return 1
    # Every host served some keys (200 keys over 3 nodes: an empty one means routing is broken).
    [[ ${per[b1]:-0} -gt 0 && ${per[b2]:-0} -gt 0 && ${per[b3]:-0} -gt 0 ]] || { log "a backend got no key"; return 1; }
}

# First $2 keys (in KEYS order) whose first choice is $1.
keys_owned_by() {
    local owner=$1 n=$2 key out=()
    for key in "${KEYS[@]}"; do
        [[ "${ROUTE_FIRST[$key]}" == "$owner" ]] && out+=("$key")
        [[ ${#out[@]} -ge $n ]] && break
    done
    echo "${out[@]}"
}

# 2. Byte integrity over lossy, delayed links (client link and b2's link, both directions).
case_lossy() {
    link_impair client || { log "cannot impair the client link"; return 1; }
    link_impair b2 || { log "cannot impair b2's link"; link_restore client; return 1; }
    local keys=() k
    for k in $(keys_owned_by b1 1) $(keys_owned_by b2 2) $(keys_owned_by b3 1); do keys+=("$k"); done
    log "$(link_desc) on client<->switch and b2<->switch; $BIG-byte payloads for ${keys[*]}"
    # A dropped SYN to b2 can outlast the proxy's 300 ms connect timeout; the key then
    # rightly fails over to its second choice. Count timeouts so such a move is allowed only
    # when one really happened.
    local m timeouts_before=0 timeouts_after=0 b
    m=$(scrape) || { log "metrics scrape failed"; return 1; }
    for b in b1 b2 b3; do
        timeouts_before=$((timeouts_before + $(metric shardproxy_backend_connect_failures_total "backend=\"$b\"" 'reason="timeout"' <<<"$m")))
    done
    local rc=0 bad=0 moved=0 want
    run_client 100 --payload "$BIG" -- "${keys[@]}" || rc=$?
    local drops_c drops_b2
    drops_c=$(link_drops client); drops_b2=$(link_drops b2)
    link_restore client; link_restore b2
    if [[ $rc != 0 ]]; then log "client exited $rc: $(head -3 "$CLIENT_OUT.err" | tr "\n" ";")"; return 1; fi
    m=$(scrape) || { log "metrics scrape failed"; return 1; }
    for b in b1 b2 b3; do
        timeouts_after=$((timeouts_after + $(metric shardproxy_backend_connect_failures_total "backend=\"$b\"" 'reason="timeout"' <<<"$m")))
    done
    for k in "${keys[@]}"; do
        want=$((BIG + $(header_len "$k")))
        if [[ "${GOT_BYTES[$k]:-}" != "$want" ]]; then
            log "key $k: ${GOT_BACKEND[$k]:-none} verified ${GOT_BYTES[$k]:-0} bytes, want $want"
            bad=1
        elif [[ "${GOT_BACKEND[$k]:-}" == "${ROUTE_SECOND[$k]}" ]]; then
            moved=$((moved + 1))
        elif [[ "${GOT_BACKEND[$k]:-}" != "${ROUTE_FIRST[$k]}" ]]; then
            log "key $k: reached ${GOT_BACKEND[$k]:-none}, want ${ROUTE_FIRST[$k]} (or ${ROUTE_SECOND[$k]} after a connect timeout)"
            bad=1
        fi
    done
    local timeouts=$((timeouts_after - timeouts_before))
    if ((moved > timeouts)); then
        log "$moved keys on their second choice but only $timeouts connect timeouts"
        bad=1
    fi
    log "all ${#keys[@]} echoes checked ($moved failed over after $timeouts connect timeouts); the links dropped $drops_c packets on the client link, $drops_b2 on b2's"
    [[ $bad == 0 ]] || return 1
    # The link really was lossy: TCP had to retransmit through the proxy.
    [[ $drops_c -gt 0 ]] || { log "nothing dropped on the client link: loss not exercised"; return 1; }
}

# Subset for the failover cases: each key of b3 costs one 300 ms connect timeout.
FO_KEYS=("${KEYS[@]:0:60}")

# 3. Blackholed backend host: connects time out; its keys move to their second choice.
case_blackhole() {
    blackhole_on b3 || { log "nft failed"; return 1; }
    if pings proxy "${IP[b3]}"; then log "b3 still answers ping: blackhole not in force"; return 1; fi
    local before after refused_before refused_after fo_before fo_after m
    m=$(scrape) || { log "metrics scrape failed"; return 1; }
    before=$(metric shardproxy_backend_connect_failures_total 'backend="b3"' 'reason="timeout"' <<<"$m")
    refused_before=$(metric shardproxy_backend_connect_failures_total 'backend="b3"' 'reason="refused"' <<<"$m")
    fo_before=$(metric shardproxy_failovers_total 'backend="b3"' <<<"$m")
    local rc=0 start=$SECONDS
    run_client 60 --payload 256 -- "${FO_KEYS[@]}" || rc=$?
    local took=$((SECONDS - start))
    if [[ $rc != 0 ]]; then log "client exited $rc: $(head -3 "$CLIENT_OUT.err" | tr "\n" ";")"; return 1; fi
    local key bad=0 owned=0 want
    for key in "${FO_KEYS[@]}"; do
        if [[ "${ROUTE_FIRST[$key]}" == b3 ]]; then
            want=${ROUTE_SECOND[$key]}
            owned=$((owned + 1))
        else
            want=${ROUTE_FIRST[$key]}
        fi
        if [[ "${GOT_BACKEND[$key]:-}" != "$want" ]]; then
            ((bad++ < 5)) && log "key $key: got ${GOT_BACKEND[$key]:-none}, want $want (ranked ${ROUTE_FIRST[$key]} ${ROUTE_SECOND[$key]})"
        fi
    done
    m=$(scrape) || { log "metrics scrape failed"; return 1; }
    after=$(metric shardproxy_backend_connect_failures_total 'backend="b3"' 'reason="timeout"' <<<"$m")
    refused_after=$(metric shardproxy_backend_connect_failures_total 'backend="b3"' 'reason="refused"' <<<"$m")
    fo_after=$(metric shardproxy_failovers_total 'backend="b3"' <<<"$m")
    local timeouts=$((after - before)) refused=$((refused_after - refused_before)) fo=$((fo_after - fo_before))
    log "${#FO_KEYS[@]} keys in ${took}s: $owned owned by b3 moved to their second choice, $bad misrouted"
    log "b3 metrics: connect timeouts +$timeouts (total $after), refused +$refused, failovers +$fo"
    [[ $bad == 0 ]] || return 1
    [[ $owned -gt 0 ]] || { log "no key of b3 in the sample"; return 1; }
    [[ $after -gt 0 ]] || { log "connect_failures_total{backend=b3,reason=timeout} is 0"; return 1; }
    # At most one connect attempt per b3 key (today exactly one; fewer once a passive ejection
    # skips a dead node), each a timeout, never a refusal: the SYN was dropped, not answered.
    [[ $timeouts -ge 1 && $timeouts -le $owned ]] || { log "expected 1..$owned timeouts, counted $timeouts"; return 1; }
    [[ $refused == 0 ]] || { log "b3 connects were refused, not timed out"; return 1; }
    [[ $fo -ge 1 && $fo -le $owned ]] || { log "expected 1..$owned failovers off b3, counted $fo"; return 1; }
}

# 4. Recovery: blackhole removed, keys go back to their owner (polled, bounded).
case_recovery() {
    blackhole_off b3 || { log "nft delete failed"; return 1; }
    local i ok=0
    for ((i = 0; i < 20; i++)); do pings proxy "${IP[b3]}" && { ok=1; break; }; sleep 0.1; done
    [[ $ok == 1 ]] || { log "b3 does not answer ping after the blackhole was removed"; return 1; }
    local attempt key bad deadline=$((SECONDS + 20))
    for ((attempt = 1; attempt <= 10 && SECONDS < deadline; attempt++)); do
        bad=0
        run_client 30 --payload 256 -- "${FO_KEYS[@]}" || bad=1
        for key in "${FO_KEYS[@]}"; do
            [[ "${GOT_BACKEND[$key]:-}" == "${ROUTE_FIRST[$key]}" ]] || bad=$((bad + 1))
        done
        if [[ $bad == 0 ]]; then
            log "attempt $attempt: all ${#FO_KEYS[@]} keys back on their owner"
            return 0
        fi
        log "attempt $attempt: $bad keys not on their owner yet"
        sleep 1
    done
    return 1
}

# 5. Graceful drain: SIGTERM during a long transfer over the lossy link.
case_drain() {
    # Sized so the transfer lasts several seconds on either kind of impaired link.
    local key drain_payload=24000000
    [[ $LINK_MODE == netem ]] && drain_payload=12000000
    key=$(keys_owned_by b1 1)
    link_impair client || { log "cannot impair the client link"; return 1; }
    local out="$LOGDIR/drain.client"
    # The transfer runs in the background (bounded by timeout); its pid is ours.
    timeout 120 ip netns exec "$NS_CLIENT" "$BIN" client --connect "$PROXY_ADDR" \
        --payload "$drain_payload" "$key" >"$out" 2>"$out.err" </dev/null {OUT_FD}>&- {ERR_FD}>&- &
    local cpid=$!
    PIDS+=("$cpid")
    ALL_PIDS+=("$cpid")
    # Wait (bounded) until it is well under way: connection open on b1, >1 MB through.
    local i m active bytes ok=0
    for ((i = 0; i < 100; i++)); do
        m=$(scrape 2>/dev/null) || m=""
        active=$(metric shardproxy_backend_connections_active 'backend="b1"' <<<"$m")
        bytes=$(metric shardproxy_backend_bytes_total 'backend="b1"' 'direction="backend_to_client"' <<<"$m")
        if [[ ${active%.*} -ge 1 && ${bytes%.*} -gt 1000000 ]]; then ok=1; break; fi
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ $ok != 1 ]]; then log "transfer never got under way (active=$active bytes=$bytes)"; link_restore client; return 1; fi
    log "transfer of $drain_payload bytes for $key under way ($bytes bytes echoed so far); SIGTERM to the proxy"
    kill -TERM "$PROXY_PID"
    local term_at=$SECONDS
    # New connections are refused while the old one drains (bounded attempts).
    local refused=0 still_running=0 perr="$LOGDIR/drain.probe.err" probe_deadline=$((SECONDS + 15))
    for ((i = 0; i < 20 && SECONDS < probe_deadline; i++)); do
        if ! in_ns client timeout 5 "$BIN" client --connect "$PROXY_ADDR" --payload 8 probe \
                >/dev/null 2>"$perr"; then
            if grep -qi "refused" "$perr"; then
                refused=1
                kill -0 "$cpid" 2>/dev/null && still_running=1
                break
            fi
        fi
        sleep 0.1
    done
    # The transfer finishes, verified.
    local crc=0
    wait "$cpid" || crc=$?
    forget_pid "$cpid"
    local drained_in=$((SECONDS - term_at))
    link_restore client
    # The proxy exits 0 (bounded wait).
    local prc=0 exited=0
    for ((i = 0; i < 150; i++)); do
        kill -0 "$PROXY_PID" 2>/dev/null || { exited=1; break; }
        sleep 0.1
    done
    if [[ $exited == 1 ]]; then
        wait "$PROXY_PID" || prc=$?
        forget_pid "$PROXY_PID"
    fi
    local want=$((drain_payload + $(header_len "$key"))) got
    got=$(awk -F'\t' '{print $3}' "$out" | awk '{print $1}')
    log "client exit $crc, verified ${got:-0}/$want bytes, $drained_in s after SIGTERM"
    log "probe after SIGTERM: $([[ $refused == 1 ]] && echo refused || echo NOT refused: "$(head -c 200 "$perr")")$([[ $still_running == 1 ]] && echo ' (while the transfer was still running)')"
    log "proxy: $([[ $exited == 1 ]] && echo "exited $prc" || echo "still running 15s after the transfer")"
    log "proxy log: $(sed 's/\x1b\[[0-9;]*m//g' "$LOGDIR/proxy.out.err" | grep -E 'draining|stopped' | tr -s ' ' | tr '\n' ';' | head -c 300)"
    [[ $crc == 0 && "$got" == "$want" ]] || { log "transfer failed: $(head -3 "$out.err" | tr "\n" ";")"; return 1; }
    [[ $refused == 1 && $still_running == 1 ]] || { log "new connections were not refused during the drain"; return 1; }
    [[ $exited == 1 && $prc == 0 ]] || return 1
}

# Tests that need root (TCP_REPAIR, nftables, namespaces of their own) are ordinary cargo
# tests marked #[ignore = "needs root: ..."] in the test files named tests/*_root_*.rs, so
# `cargo test` passes for any user without counting them as passed; this case runs exactly
# those (the other ignored tests, which need etcd or promtool, .ci/run runs on their own),
# and fails if none ran.
case_root_cargo_tests() {
    local out="$LOGDIR/root-cargo-tests.out" ran failed f targets=()
    for f in "$REPO"/tests/*_root_*.rs; do
        f=${f##*/}
        targets+=(--test "${f%.rs}")
    done
    (cd "$REPO" && cargo test --locked "${targets[@]}" -- --ignored) >"$out" 2>&1
    local rc=$?
    ran=$(grep -E '^test result:' "$out" | awk '{s += $4} END {print s + 0}')
    failed=$(grep -E '^test result:' "$out" | awk '{s += $6} END {print s + 0}')
    log "root-only cargo tests: $ran passed, $failed failed (exit $rc)"
    if [[ $rc != 0 ]]; then
        grep -E '^(test .* FAILED|thread .* panicked|---- )' "$out" | head -n 12 | sed 's/^/    /'
        return 1
    fi
    [[ $ran -gt 0 ]] || { log "no root-only test ran"; return 1; }
}

# ---------------------------------------------------------------------------------------------
# Main

main() {
    echo "shardproxy netns tests (prefix $P)"
    if ! preflight; then fail "preflight"; summary; exit 1; fi
    LOGDIR=$(mktemp -d "/tmp/$P-netns.XXXXXX")
    if ! setup_topology; then fail "setup: topology"; cleanup; check_cleanup; summary; exit 1; fi
    if ! start_servers; then
        fail "setup: servers"
        local f
        for f in "$LOGDIR"/*.err; do
            [[ -s "$f" ]] || continue
            echo "--- $(basename "$f") (first lines)"
            sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -v '^[[:space:]]*$' | head -n 4 || true
        done
        cleanup; check_cleanup; summary; exit 1
    fi

    run_case "1 routing: 200 keys across 3 backend hosts match 'shardproxy route'" case_routing
    run_case "2 integrity: 4 MB echoes over lossy, delayed links" case_lossy
    run_case "3 blackholed host: connect timeout, owner's keys to 2nd choice, timeout metric" case_blackhole
    run_case "4 recovery: blackhole removed, keys back on their owner" case_recovery
    run_case "5 drain: SIGTERM mid-transfer, transfer completes, new connections refused, exit 0" case_drain
    run_case "6 root-only cargo tests (TCP_REPAIR, nftables steering)" case_root_cargo_tests

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
