#!/usr/bin/env bash
# Guest script (one VM, run by `ci/softroce.sh accl`): the verbs test suite and accl-perf over
# rxe0, with every rank on the one soft-RoCE device. Writes a summary line per check to
# target/softroce/out/results-one.txt (on the host's disk) for the host to judge.
set -euo pipefail
# shellcheck source=ci/softroce/guest-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
outdir=target/softroce/out
results=$outdir/results-one.txt
tests_bin=$(cat target/softroce/verbs-tests.path)
perf=target/release/accl-perf
export ACCL_TRANSPORT=verbs ACCL_TIMEOUT=120
: >"$results"

step "GID table"
gid_table

step "verbs test suite ($tests_bin)"
# ACCL_REQUIRE_VERBS makes a missing device a failure instead of a skip.
if ACCL_REQUIRE_VERBS=1 "$tests_bin" --test-threads=1; then
    echo "tests verbs PASS" >>"$results"
else
    echo "tests verbs FAIL" >>"$results"
fi

perf_run() { # name args...: one accl-perf run, judged by its exit status and #wrong column
    local name=$1 out
    shift
    out=/tmp/perf-$name.txt
    step "accl-perf $*"
    if timeout 600 "$perf" "$@" >"$out" 2>&1; then
        cat "$out"
        echo "perf $name PASS" >>"$results"
    else
        cat "$out"
        echo "perf $name FAIL" >>"$results"
    fi
    cp "$out" "$outdir/perf-$name.txt"
}

iters=${ACCL_SOFTROCE_ITERS:-1}
for n in 2 4; do
    for coll in allreduce reduce alltoall; do
        for dtype in float bfloat16; do
            perf_run "$coll-$dtype-$n" "$coll" --ranks "$n" -b 8 -e 4M -f 2 -d "$dtype" -c 1 -w 1 -n "$iters"
        done
    done
done
step "performance: sendrecv and allreduce at 1 MiB and 4 MiB, 2 ranks, beside perftest"
perf_run "sendrecv-2" sendrecv --ranks 2 -b 1M -e 4M -f 4 -w 2 -n 10 -v
perf_run "allreduce-big-2" allreduce --ranks 2 -b 1M -e 4M -f 4 -w 2 -n 10
for t in "ib_write_bw" "ib_write_bw -b" "ib_send_bw"; do
    step "$t -s 1048576 (server and client in this VM)"
    args=(-d "$SOFTROCE_DEV" -x "$SOFTROCE_GID_INDEX" -s 1048576 -n 100 -F --report_gbits -p 18601)
    # shellcheck disable=SC2086
    $t "${args[@]}" >/tmp/perftest-server.txt 2>&1 &
    wait_listen 18601
    # shellcheck disable=SC2086
    $t "${args[@]}" 127.0.0.1 | tee -a "$outdir/perftest.txt" | grep -A1 '#bytes' || true
    wait || true
done
step "done"
