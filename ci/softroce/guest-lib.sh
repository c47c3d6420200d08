#!/usr/bin/env bash
# Helpers for guest scripts run by ci/softroce.sh (source it; it runs inside the VM's chroot).
# The harness exports SOFTROCE_NAME, SOFTROCE_ADDR, SOFTROCE_PEER, SOFTROCE_DEV (rxe0),
# SOFTROCE_NETDEV (eth0) and SOFTROCE_GID_INDEX (RoCE v2 GID of SOFTROCE_ADDR).
: "${SOFTROCE_DEV:?not inside a soft-RoCE guest (run through ci/softroce.sh)}"
TIMEFORMAT='took %R s'

# guest uptime in seconds, for timing steps
sr_uptime() { cut -d' ' -f1 /proc/uptime; }

# step TITLE: a visible section header with the guest's uptime
step() { printf -- '--- [%s t=%ss] %s\n' "$SOFTROCE_NAME" "$(sr_uptime)" "$*"; }

# gid_table: index, GID, type and netdev of every populated GID of rxe0 port 1 (the table has
# 1024 entries: builtins only, a fork per entry costs minutes under TCG)
gid_table() {
    local p=/sys/class/infiniband/$SOFTROCE_DEV/ports/1 f i t g n
    for f in "$p"/gid_attrs/types/*; do
        i=${f##*/}
        { read -r t <"$f"; } 2>/dev/null || continue
        [ -n "$t" ] || continue
        read -r g <"$p/gids/$i"
        { read -r n <"$p/gid_attrs/ndevs/$i"; } 2>/dev/null || n='?'
        printf 'GID[%s] %s %s (%s)\n' "$i" "$g" "$t" "$n"
    done
}

# poll_until SECONDS WHAT CMD...: runs CMD every 0.1 s until it succeeds; says WHAT and
# returns 1 when SECONDS have passed
poll_until() {
    local n=$(($1 * 10)) what=$2
    shift 2
    while [ "$n" -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    echo "$what" >&2
    return 1
}

listening() { [ -n "$(ss -Hltn "sport = :$1")" ]; }
tcp_opens() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_listen PORT [SECONDS]: until some process listens on TCP PORT (any address); 1 on timeout
wait_listen() { poll_until "${2:-30}" "nothing listens on port $1" listening "$1"; }

# wait_tcp HOST PORT [SECONDS]: until a TCP connect to HOST:PORT succeeds (probe connection!)
wait_tcp() { poll_until "${3:-30}" "cannot connect to $1:$2" tcp_opens "$1" "$2"; }

# bw_summary LABEL FILE: the average-bandwidth row of a perftest report, tagged for grepping
bw_summary() {
    awk -v l="$1" '/^[ \t]*[0-9]+[ \t]+[0-9]+[ \t]+[0-9.]+[ \t]+[0-9.]+[ \t]+[0-9.]+/ { printf "RESULT %s bytes=%s iters=%s bw_peak=%s bw_avg=%s Gb/s msg_rate=%s Mpps\n", l, $1, $2, $3, $4, $5 }' "$2"
}

# retry SECONDS CMD...: runs CMD until it succeeds or SECONDS have passed (for clients whose
# server in the other VM may not be up yet; never probe such a server with a test connection)
retry() {
    local end=$((SECONDS + $1)) n=1
    shift
    until "$@"; do
        if [ "$SECONDS" -ge "$end" ]; then
            echo "retry: giving up on $1 after $n attempts" >&2
            return 1
        fi
        n=$((n + 1))
        sleep 0.5
    done
}

# ipv4_of ADDR: 10.2.0.N for an IPv6 address ending in hex N (fd02::1 -> 10.2.0.1)
ipv4_of() { echo "10.2.0.$((16#${1##*:}))"; }

# add_oob_ipv4: gives eth0 the address ipv4_of $SOFTROCE_ADDR /24, for tools whose out-of-band TCP
# exchange is IPv4-only (perftest, ibv_*_pingpong). rxe adds a GID for it (an IPv4-mapped one, at
# a higher index): SOFTROCE_GID_INDEX stays the ULA's.
add_oob_ipv4() { ip addr add "$(ipv4_of "$SOFTROCE_ADDR")/24" dev "$SOFTROCE_NETDEV"; }
