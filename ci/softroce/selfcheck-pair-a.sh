#!/usr/bin/env bash
# Guest script for VM "a" (fd02::1) of `ci/softroce.sh selfcheck`: the servers. VM "b" runs the
# clients (selfcheck-pair-b.sh) and retries until each server is up.
set -euo pipefail
# shellcheck source=ci/softroce/guest-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
gid=$SOFTROCE_GID_INDEX
iters=${SELFCHECK_ITERS:-100}
# perftest's and ibv_rc_pingpong's out-of-band TCP connection is IPv4-only ("Address family for
# hostname not supported" for fd02::1): 10.2.0.x carries it, the RDMA traffic uses the ULA GID.
add_oob_ipv4
gid_table
port=18601
for t in ib_write_bw ib_send_bw; do
    step "$t server, -s 1048576 -n $iters -x $gid"
    time "$t" -d "$SOFTROCE_DEV" -x "$gid" -s 1048576 -n "$iters" -F --report_gbits -p "$port" | grep -A1 '#bytes'
    port=$((port + 1))
done
step "ibv_rc_pingpong server, -g $gid"
time ibv_rc_pingpong -d "$SOFTROCE_DEV" -g "$gid" -p 18603 -n 200 -s 4096
step "done"
