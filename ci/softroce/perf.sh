#!/usr/bin/env bash
# Guest script (one VM): the verbs performance figures of docs/performance.md, measured as
#   bash ci/softroce.sh run-one ci/softroce/perf.sh perf
# Alternates accl-perf and perftest ROUNDS times (emulation is noisy; more rounds with
#   PERF_ROUNDS=9 SOFTROCE_PASS_ENV=PERF_ROUNDS bash ci/softroce.sh run-one ...) and prints medians:
# accl-perf sendrecv (also with registered buffers, -R 1) against ib_write_bw at 1 MiB, allreduce against sendrecv at 4 MiB.
set -euo pipefail
# shellcheck source=ci/softroce/guest-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
rounds=${PERF_ROUNDS:-5}
export ACCL_TRANSPORT=verbs
perf=target/release/accl-perf
out=/tmp/perf
mkdir -p "$out"
: >"$out/samples"

accl() { # label coll size [flags]: busbw (Gb/s) of one accl-perf run, out-of-place and in-place
    local label=$1 coll=$2 size=$3
    shift 3
    "$perf" "$coll" --ranks 2 -b "$size" -e "$size" -w 2 -n 10 --json "$@" >"$out/j.txt" 2>&1
    python3 -c '
import json, sys
label = sys.argv[1]
for line in open(sys.argv[2]):
    line = line.strip()
    if line.startswith("{"):
        o = json.loads(line)
        print(label, "oop", o["busbw"] * 8, "ip", o["in_place_busbw"] * 8)' "$label" "$out/j.txt" >>"$out/samples"
}

perftest() { # label tool [flags]: average Gb/s at 1 MiB (for -b: both directions together)
    local label=$1
    shift
    local args=(-d "$SOFTROCE_DEV" -x "$SOFTROCE_GID_INDEX" -s 1048576 -n 50 -F --report_gbits -p 18601)
    "$@" "${args[@]}" >"$out/server.txt" 2>&1 &
    wait_listen 18601
    "$@" "${args[@]}" 127.0.0.1 >"$out/client.txt" 2>&1
    wait
    awk -v l="$label" '/^ *1048576 +[0-9]+ / { print l, "avg", $4 }' "$out/client.txt" >>"$out/samples"
}

for r in $(seq "$rounds"); do
    step "round $r of $rounds"
    accl sendrecv_1M sendrecv 1M
    accl sendrecv_1M_reg sendrecv 1M -R 1
    perftest ib_write_bw ib_write_bw
    perftest ib_write_bw_bidir ib_write_bw -b
    accl sendrecv_4M sendrecv 4M
    accl allreduce_4M allreduce 4M
done
step "samples (Gb/s; accl: busbw, perftest: BW average)"
cat "$out/samples"
step "medians"
python3 - "$out/samples" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def med(label, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == label)
sr1, wr, wrb = med("sendrecv_1M", 2), med("ib_write_bw", 2), med("ib_write_bw_bidir", 2)
sr1r = med("sendrecv_1M_reg", 2)
sr4, sr4ip, ar4, ar4ip = med("sendrecv_4M", 2), med("sendrecv_4M", 4), med("allreduce_4M", 2), med("allreduce_4M", 4)
print(f"MEDIAN sendrecv 1MiB busbw {sr1:.3f} Gb/s; ib_write_bw {wr:.3f} Gb/s -> {100*sr1/wr:.0f}%; "
      f"ib_write_bw -b {wrb:.3f} Gb/s both ways = {wrb/2:.3f} each way -> {100*sr1/(wrb/2):.0f}%")
print(f"MEDIAN sendrecv 1MiB with registered buffers (-R 1) busbw {sr1r:.3f} Gb/s -> {100*sr1r/wr:.0f}% of ib_write_bw, "
      f"{100*sr1r/(wrb/2):.0f}% of ib_write_bw -b each way")
print(f"MEDIAN allreduce 4MiB busbw {ar4:.3f} (in place {ar4ip:.3f}) Gb/s; sendrecv 4MiB {sr4:.3f} (in place {sr4ip:.3f}) Gb/s "
      f"-> {100*ar4/sr4:.0f}% (in place {100*ar4ip/sr4ip:.0f}%)")
PY
