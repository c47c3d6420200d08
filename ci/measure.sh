#!/usr/bin/env bash
# Measures the figures in docs/performance.md. Each round runs every configuration once, in
# turn, so that the machine's slow spells hit all of them alike; the script prints every run,
# the medians, and the median over rounds of allreduce's busbw as a share of sendrecv's. On a
# VM, other guests take CPU time from this one ("steal" in /proc/stat); each run's stolen share
# is printed, and the ratios are also given over the rounds where no run lost more than 2 %
# (the others are marked with *).
# Run on an otherwise idle machine:
#   bash ci/measure.sh [ROUNDS]          (default 7)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p accl-tools
exec python3 - "${1:-7}" <<'EOF'
import json, statistics, subprocess, sys

perf = "target/release/accl-perf"
rounds = int(sys.argv[1])
# label -> (field, accl-perf arguments)
configs = {}
# n -> labels of (allreduce, sendrecv) bandwidth, the pair the ratios compare
pairs = {}
for n in (2, 4):
    pairs[n] = (f"allreduce 32MiB busbw n={n}", f"sendrecv 32MiB busbw n={n}")
    for label, coll in zip(pairs[n], ("allreduce", "sendrecv")):
        configs[label] = ("busbw", [coll, "--ranks", str(n), "-b", "32M", "-e", "32M", "-w", "5", "-n", "40"])
    configs[f"allreduce 8B time_us n={n}"] = ("time_us", ["allreduce", "--ranks", str(n), "-b", "8", "-e", "8", "-w", "1000", "-n", "20000"])

def cpu_ticks():
    # The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    return sum(fields), fields[7]

runs = {label: ([], []) for label in configs}
stolen = {label: [] for label in configs}
for _ in range(rounds):
    for label, (field, args) in configs.items():
        total0, steal0 = cpu_ticks()
        out = subprocess.run([perf, *args, "--json"], check=True, capture_output=True, text=True).stdout
        total1, steal1 = cpu_ticks()
        stolen[label].append((steal1 - steal0) / max(1, total1 - total0))
        row = json.loads(out.strip().splitlines()[-1])
        runs[label][0].append(row[field])
        runs[label][1].append(row["in_place_" + field])

def show(values):
    return " ".join(f"{v:.3g}" for v in values)

for label, (oop, ip) in runs.items():
    print(f"{label:28} out-of-place median {statistics.median(oop):<8.3g} in-place median "
          f"{statistics.median(ip):<8.3g} runs: {show(oop)} | {show(ip)}")
    print(f"{'':28} CPU stolen by other guests per run: {' '.join(f'{v:.0%}' for v in stolen[label])}")
for n, (ar_label, sr_label) in pairs.items():
    ar, sr = runs[ar_label], runs[sr_label]
    # Both modes of allreduce against sendrecv out of place: sendrecv in place first copies its
    # outgoing data aside, so it is not the transport's limit.
    quiet = [max(a, s) <= 0.02 for a, s in zip(stolen[ar_label], stolen[sr_label])]
    for mode, values in (("out-of-place", ar[0]), ("in-place", ar[1])):
        ratios = [a / s for a, s in zip(values, sr[0])]
        calm = [r for r, q in zip(ratios, quiet) if q]
        calm_median = f"{statistics.median(calm):.0%} over {len(calm)} rounds" if calm else "no such round"
        print(f"allreduce/sendrecv n={n} {mode:12} median of per-round ratios "
              f"{statistics.median(ratios):.0%}, without stolen time {calm_median}; "
              f"rounds: {' '.join(f'{r:.0%}' + ('' if q else '*') for r, q in zip(ratios, quiet))}")
EOF
