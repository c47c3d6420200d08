#!/usr/bin/env bash
# Guest script for both VMs of the pair (run by `ci/softroce.sh accl`): a 2-rank allreduce
# across the wire, rank 0 in VM "a" (fd02::1, also the rendezvous root), rank 1 in VM "b".
# Four lanes, so four QPs, each with its own flow label and UDP source port.
set -euo pipefail
# shellcheck source=ci/softroce/guest-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
outdir=target/softroce/out
if [ "$SOFTROCE_NAME" = a ]; then rank=0; else rank=1; fi
export ACCL_RANK=$rank ACCL_NRANKS=2 ACCL_ROOT="[fd02::1]:29500" ACCL_TRANSPORT=verbs ACCL_LANES=4
export ACCL_TIMEOUT=120 ACCL_DEBUG=1
gid_table
step "accl-perf allreduce rank $rank of 2 across the wire"
out=$outdir/pair-$SOFTROCE_NAME.txt
if timeout 400 target/release/accl-perf allreduce -b 8 -e 4M -f 4 -d float -c 1 -w 1 -n 3 -v >"$out" 2>&1; then
    cat "$out"
    echo "pair $SOFTROCE_NAME PASS" >"$outdir/results-pair-$SOFTROCE_NAME.txt"
else
    cat "$out"
    echo "pair $SOFTROCE_NAME FAIL" >"$outdir/results-pair-$SOFTROCE_NAME.txt"
    exit 1
fi
step "done"
