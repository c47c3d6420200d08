#!/usr/bin/env bash
# Guest script for VM "b" (fd02::2) of `ci/softroce.sh selfcheck`: the clients, towards VM "a".
set -euo pipefail
# shellcheck source=ci/softroce/guest-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
gid=$SOFTROCE_GID_INDEX
server=$(ipv4_of "$SOFTROCE_PEER")
iters=${SELFCHECK_ITERS:-100}
out=/tmp/selfcheck
mkdir -p "$out"
# perftest's and ibv_rc_pingpong's out-of-band TCP connection is IPv4-only ("Address family for
# hostname not supported" for fd02::1): 10.2.0.x carries it, the RDMA traffic uses the ULA GID.
add_oob_ipv4
gid_table
port=18601
for t in ib_write_bw ib_send_bw; do
    step "$t client to $server (OOB), GID [$SOFTROCE_PEER], -s 1048576 -n $iters -x $gid"
    time retry 60 "$t" -d "$SOFTROCE_DEV" -x "$gid" -s 1048576 -n "$iters" -F --report_gbits -p "$port" \
        "$server" >"$out/$t.txt" 2>&1 || { tail -n 5 "$out/$t.txt"; exit 1; }
    grep -A1 '#bytes' "$out/$t.txt"
    bw_summary "two-vm $t" "$out/$t.txt"
    port=$((port + 1))
done
step "ibv_rc_pingpong client to $server (OOB), GID [$SOFTROCE_PEER], -g $gid"
time retry 60 ibv_rc_pingpong -d "$SOFTROCE_DEV" -g "$gid" -p 18603 -n 200 -s 4096 "$server"
step "done"
