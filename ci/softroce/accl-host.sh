#!/usr/bin/env bash
# The soft-RoCE check of accl (host side; `ci/softroce.sh accl` runs it, and so does ci/test.sh):
#  1. builds accl with the `verbs` feature (accl-perf, and the verbs test binary);
#  2. one VM: the verbs test suite and accl-perf (allreduce, reduce, alltoall; float and
#     bfloat16; 2 and 4 ranks; 8 B to 4 MiB; -c 1), all ranks on one rxe device;
#  3. two VMs on one wire: a 2-rank, 4-lane allreduce across it, the wire captured to a pcap;
#  4. tshark on the pcap: RoCEv2 (UDP 4791) over IPv6 both ways, one UDP source port per lane,
#     the ports accl-perf -v printed;
# and ends with `softroce: PASS transport=verbs gid=... ranks=... collectives=...` or fails.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
# The one-VM run takes 5 to 13 minutes here: the emulated CPUs' speed varies by up to 2x from
# run to run. The bound is there to catch a hang, with room for a slow run.
export SOFTROCE_TIMEOUT=${SOFTROCE_TIMEOUT:-1800}
# shellcheck source=ci/softroce.sh
source ci/softroce.sh
t0=$(sr_now)
out=target/softroce/out
fail() {
    sr_log "FAIL: $*"
    exit 1
}

sr_prepare
sr_log "building accl with the verbs feature"
cargo build --release -p accl-tools --features verbs --bins
cargo test -p accl-core --features verbs --test verbs --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "verbs":
        print(m["executable"])' >target/softroce/verbs-tests.path
[ -s target/softroce/verbs-tests.path ] || fail "no verbs test binary"
rm -rf "$out"
mkdir -p "$out"

t=$(sr_now)
boot_one one-accl ci/softroce/accl-one.sh || sr_log "one-VM run failed"
sr_log "one VM: $(sr_since "$t") s"
t=$(sr_now)
boot_pair ci/softroce/accl-pair.sh ci/softroce/accl-pair.sh "$out/pair.pcap" || sr_log "pair run failed"
sr_log "two VMs: $(sr_since "$t") s"

cat "$out"/results-*.txt
grep -q "^tests verbs PASS" "$out/results-one.txt" || fail "verbs test suite"
! grep -h FAIL "$out"/results-*.txt || fail "see the lines above"
perf_runs=$(grep -c '^perf .* PASS' "$out/results-one.txt")
[ "$perf_runs" -ge 14 ] || fail "only $perf_runs accl-perf runs passed in the one-VM run"
for side in a b; do
    grep -q "^pair $side PASS" "$out/results-pair-$side.txt" || fail "pair VM $side"
done
# #wrong must be 0 everywhere (accl-perf exits non-zero on wrong results too; belt and braces).
if awk '/^ +[0-9]+ +[0-9]+ / && ($9 != 0 || $13 != 0) { bad = 1 } END { exit !bad }' "$out"/perf-*.txt "$out"/pair-*.txt; then
    fail "#wrong is not 0 somewhere"
fi

gid=$(sed -n 's/.*uses [^ ]* gid\[[0-9]*\] \([0-9a-f:]*\).*/\1/p' "$out/pair-a.txt" | head -n 1)
[ -n "$gid" ] || fail "no GID in the pair's accl-perf header"
# The capture: RoCEv2 over IPv6 both ways, one UDP source port per lane.
rows=$out/pcap-rows.txt
tshark -r "$out/pair.pcap" -Y 'udp.port==4791' -T fields -e ipv6.src -e ipv6.dst -e ipv6.flow -e udp.srcport \
    >"$rows" 2>/dev/null || fail "tshark could not read the capture"
echo "tshark -r $out/pair.pcap -Y 'udp.port==4791' -T fields -e ipv6.src -e ipv6.dst -e ipv6.flow -e udp.srcport | sort | uniq -c"
sort "$rows" | uniq -c
printed=$(sed -n 's/^#  Rank  0 -> peer  1 lane .* udp sport \([0-9]*\)$/\1/p' "$out/pair-a.txt" | sort -u | tr '\n' ' ')
seen=$(awk -F'\t' '$1 == "fd02::1" && $2 == "fd02::2" { print $4 }' "$rows" | sort -u | tr '\n' ' ')
back=$(awk -F'\t' '$1 == "fd02::2" && $2 == "fd02::1" { print $4 }' "$rows" | sort -u | tr '\n' ' ')
echo "UDP source ports: accl-perf -v printed [$printed], fd02::1->fd02::2 carried [$seen], fd02::2->fd02::1 [$back]"
[ -n "$back" ] || fail "no RoCEv2 packets from fd02::2"
[ "$(wc -w <<<"$printed")" = 4 ] || fail "expected 4 lanes with a UDP source port each"
[ "$printed" = "$seen" ] || fail "the capture's UDP source ports differ from the ones accl computed"

collectives=$((perf_runs + 1))
sr_log "done in $(sr_since "$t0") s"
echo "softroce: PASS transport=verbs gid=$gid ranks=4 collectives=$collectives"
