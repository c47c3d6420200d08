#!/usr/bin/env bash
# Guest script (one VM, via `ci/softroce.sh selfcheck` or `run-one`): rxe0 is up with a RoCE v2
# GID for the ULA address; ibv_rc_pingpong, ib_write_bw and ib_send_bw between two processes on it.
set -euo pipefail
# shellcheck source=ci/softroce/guest-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
gid=$SOFTROCE_GID_INDEX
iters=${SELFCHECK_ITERS:-100}
out=/tmp/selfcheck
mkdir -p "$out"

step "ibv_devinfo -v -d $SOFTROCE_DEV"
time ibv_devinfo -v -d "$SOFTROCE_DEV"

step "GID types: cat /sys/class/infiniband/$SOFTROCE_DEV/ports/1/gid_attrs/types/*"
cat /sys/class/infiniband/"$SOFTROCE_DEV"/ports/1/gid_attrs/types/* 2>/dev/null || true
gid_table
echo "using GID index $gid for $SOFTROCE_ADDR"
ip -6 addr show dev "$SOFTROCE_NETDEV"

# The out-of-band TCP connection of these tools listens on IPv4 only: 127.0.0.1 in one VM.
step "ibv_rc_pingpong -d $SOFTROCE_DEV -g $gid (server and client in this VM)"
time {
    ibv_rc_pingpong -d "$SOFTROCE_DEV" -g "$gid" -p 18600 -n 1000 -s 4096 >"$out/pp-server.txt" 2>&1 &
    srv=$!
    wait_listen 18600
    ibv_rc_pingpong -d "$SOFTROCE_DEV" -g "$gid" -p 18600 -n 1000 -s 4096 127.0.0.1
    wait "$srv"
}
sed 's/^/server: /' "$out/pp-server.txt" | grep -E 'bytes|iters' 

for t in ib_write_bw ib_send_bw; do
    step "$t -s 1048576 -n $iters -x $gid -F --report_gbits (server and client in this VM)"
    args=(-d "$SOFTROCE_DEV" -x "$gid" -s 1048576 -n "$iters" -F --report_gbits -p 18601)
    time {
        "$t" "${args[@]}" >"$out/$t-server.txt" 2>&1 &
        srv=$!
        wait_listen 18601
        "$t" "${args[@]}" 127.0.0.1 | tee "$out/$t-client.txt"
        wait "$srv"
    }
    grep -A1 '#bytes' "$out/$t-server.txt" | sed 's/^/server: /'
    bw_summary "one-vm $t" "$out/$t-client.txt"
done
step "done"
