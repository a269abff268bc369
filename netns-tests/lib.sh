# Shared by the network-namespace suites (run.sh, dsr.sh, etcd.sh), sourced after each has set
# its topology: P (the namespace prefix; namespaces are $P-HOST), HERE, and the variables the
# helpers below read when called (ADMIN, BIN, BACKEND_FLAGS, PROXY_ADDR, LOGDIR).
#
# It holds the bookkeeping that makes a run clean up exactly what it created: the namespaces
# and the processes it started (signalled only while they are this shell's children, by PID),
# the PASS/FAIL counting and summary, the EXIT/INT/TERM traps; and the helpers every suite
# uses: in_ns, start_bg, wait_for_line, http_get, metric, scrape, route_keys.
# shellcheck shell=bash

ns() { echo "$P-$1"; }          # host name -> namespace name

# ---------------------------------------------------------------------------------------------
# Bookkeeping: what we created, so cleanup removes exactly that

CREATED_NS=()                  # namespaces, in creation order
PIDS=()                        # background processes we started (direct children of this shell)
ALL_PIDS=()                    # every one ever started, to check at the end that none survives
LOGDIR=""
PASSED=0
FAILED=0
SUMMARY_DONE=0
CLEANED=0
T0=$SECONDS

log() { echo "    $*"; }
verbose() { if [[ "${NETNS_VERBOSE:-0}" == 1 ]]; then echo "    | $*"; fi; }

pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }

# Runs a case function; it returns 0 (pass) or non-zero (fail) and explains itself.
run_case() {
    local name=$1 fn=$2 start=$SECONDS
    echo "=== $name"
    # `if` context: errexit is off inside the case, which checks every step itself.
    if "$fn"; then
        pass "$name ($((SECONDS - start))s)"
    else
        fail "$name ($((SECONDS - start))s)"
    fi
}

# Is $1 still a live process started by this shell? (Never signal anything else.)
is_our_child() {
    local pid=$1 stat rest ppid
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # /proc/PID/stat is "pid (comm) state ppid ...": the comm may hold spaces, so cut after ")".
    rest=${stat##*) }
    read -r _ ppid _ <<<"$rest"
    [[ "$ppid" == "$$" ]]
}

forget_pid() {
    local pid=$1 kept=() p
    for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || kept+=("$p"); done
    PIDS=("${kept[@]}")
}

cleanup() {
    [[ $CLEANED == 1 ]] && return 0
    CLEANED=1
    set +e
    local pid i name
    # 1. Our processes: TERM, a bounded wait, then KILL.
    for pid in "${PIDS[@]}"; do
        is_our_child "$pid" && kill -TERM "$pid" 2>/dev/null
    done
    for ((i = 0; i < 50; i++)); do
        local alive=0
        for pid in "${PIDS[@]}"; do is_our_child "$pid" && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        is_our_child "$pid" && kill -KILL "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    PIDS=()
    # 2. Our namespaces. Anything still inside one of them was started by this script
    #    (e.g. a grandchild); kill those by pid, then delete the namespace (its veths go with it).
    for name in "${CREATED_NS[@]}"; do
        if ns_exists "$name"; then
            for pid in $(ip netns pids "$name" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null
            done
            ip netns del "$name" 2>/dev/null
        fi
    done
    # 3. Logs.
    if [[ -n "$LOGDIR" && -d "$LOGDIR" ]]; then
        if [[ "${NETNS_KEEP_LOGS:-0}" == 1 ]]; then
            echo "logs kept in $LOGDIR"
        else
            rm -rf -- "$LOGDIR"
        fi
    fi
    set -e
}

ns_exists() { ip netns list 2>/dev/null | awk -v n="$1" '$1 == n {f = 1} END {exit !f}'; }

# What cleanup left behind: namespaces with our prefix, processes we started (none expected).
leftovers() {
    local pid left
    left=$(ip netns list 2>/dev/null | awk -v p="$P-" 'index($1, p) == 1 {printf "%s ", $1}')
    for pid in "${ALL_PIDS[@]}"; do is_our_child "$pid" && left+="pid $pid "; done
    echo "$left"
}

check_cleanup() {
    local left
    left=$(leftovers)
    if [[ -z "$left" ]]; then
        pass "cleanup: processes stopped, no namespace with prefix $P- left ($(ip netns list | wc -l) namespaces on the machine)"
    else
        fail "cleanup: left behind: $left"
    fi
}

summary() {
    [[ $SUMMARY_DONE == 1 ]] && return 0
    SUMMARY_DONE=1
    echo "total time $((SECONDS - T0))s"
    echo "$PASSED passed, $FAILED failed"
}

on_exit() {
    local rc=$?
    trap - EXIT
    # A signal's trap can run inside a function whose output is redirected (e.g. to a
    # client log): report on the script's own stdout/stderr.
    exec 1>&"$OUT_FD" 2>&"$ERR_FD"
    if [[ $SUMMARY_DONE == 0 ]]; then
        # We got here early: an unexpected error or a signal.
        fail "run aborted (exit status $rc) before all cases ran"
        cleanup
        check_cleanup
        summary
        exit 1
    fi
    cleanup
    exit "$rc"
}
exec {OUT_FD}>&1 {ERR_FD}>&2
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Helpers

# Runs a command in host $1's namespace.
in_ns() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

# Starts a long-running command in host $1's namespace in the background; stdout to $2,
# stderr to $2.err. Sets STARTED_PID. `ip netns exec` execs the command, so the pid is the
# command itself.
start_bg() {
    local h=$1 out=$2; shift 2
    ip netns exec "$(ns "$h")" "$@" >"$out" 2>"$out.err" </dev/null {OUT_FD}>&- {ERR_FD}>&- &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    ALL_PIDS+=("$STARTED_PID")
}

# Waits (bounded) until file $1 has a line matching $2 while pid $3 lives.
wait_for_line() {
    local file=$1 pattern=$2 pid=$3 tries=${4:-100}
    local i
    for ((i = 0; i < tries; i++)); do
        if grep -q -- "$pattern" "$file" 2>/dev/null; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited before printing '$pattern'"
            return 1
        fi
        sleep 0.1
    done
    log "timed out waiting for '$pattern' in $file"
    return 1
}

# GET http://$2$3 from host $1's namespace; body on stdout. curl if present, else bash /dev/tcp.
http_get() {
    local h=$1 hostport=$2 path=$3
    if [[ "${NETNS_NO_CURL:-0}" != 1 ]] && command -v curl >/dev/null 2>&1; then
        in_ns "$h" timeout 5 curl -fsS --max-time 4 "http://$hostport$path"
    else
        in_ns "$h" timeout 5 bash -c '
            exec 3<>"/dev/tcp/${0%:*}/${0##*:}" || exit 1
            printf "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" "$1" "$0" >&3
            cat <&3' "$hostport" "$path" | sed '1,/^\r\{0,1\}$/d'
    fi
}

# Value of a metric from a Prometheus text dump on stdin: name $1 plus labels (k="v" strings,
# any order) $2...; prints 0 if absent.
metric() {
    local name=$1; shift
    awk -v name="$name" -v labels="$*" '
        BEGIN { n = split(labels, want, " ") }
        $1 !~ /^#/ {
            split($1, parts, "{")
            if (parts[1] != name) next
            for (i = 1; i <= n; i++) if (index($1, want[i]) == 0) next
            v = $2; found = 1
        }
        END { print (found ? v : 0) }'
}

scrape() { http_get proxy "$ADMIN" /metrics; }

# Fills ROUTE_FIRST[key], ROUTE_SECOND[key] from `shardproxy route` (offline, no network).
declare -A ROUTE_FIRST=() ROUTE_SECOND=()
route_keys() {
    local out key ranked
    out=$(timeout 20 "$BIN" route "${BACKEND_FLAGS[@]}" "$@") || { log "shardproxy route failed"; return 1; }
    while IFS=$'\t' read -r key ranked; do
        read -r -a r <<<"$ranked"
        ROUTE_FIRST[$key]=${r[0]}
        ROUTE_SECOND[$key]=${r[1]:-}
    done <<<"$out"
}
