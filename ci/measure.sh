#!/usr/bin/env bash
# Measures the figures in docs/performance.md: each configuration REPS times (default 5),
# printing every run and the median. Run on an otherwise idle machine:
#   bash ci/measure.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
cargo build --release -q -p accl-tools
perf=target/release/accl-perf

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# $1 label, $2 column (busbw or time), then accl-perf arguments
measure() {
    local label=$1 field=$2; shift 2
    local oop=() ip=()
    for _ in $(seq "$reps"); do
        local row
        row=$("$perf" "$@" --json | tail -n 1)
        oop+=("$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r[sys.argv[2]])' "$row" "$field")")
        ip+=("$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["in_place_"+sys.argv[2]])' "$row" "$field")")
    done
    printf '%-34s out-of-place median %-9s in-place median %-9s  runs: %s | %s\n' "$label" \
        "$(printf '%s\n' "${oop[@]}" | median)" "$(printf '%s\n' "${ip[@]}" | median)" "${oop[*]}" "${ip[*]}"
}

for n in 2 4; do
    measure "allreduce 32MiB busbw n=$n" busbw allreduce --ranks $n -b 32M -e 32M -w 5 -n 40
    measure "sendrecv 32MiB busbw n=$n" busbw sendrecv --ranks $n -b 32M -e 32M -w 5 -n 40
    measure "allreduce 8B time_us n=$n" time_us allreduce --ranks $n -b 8 -e 8 -w 1000 -n 20000
done
