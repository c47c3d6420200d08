#!/usr/bin/env bash
# Host script of `ci/softroce.sh selfcheck`: the pair's pcap must hold RoCEv2 (UDP 4791) over IPv6
# between fd02::1 and fd02::2, in both directions.
#   bash ci/softroce/selfcheck-pcap.sh PCAP
set -euo pipefail
pcap=$1
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
tshark -r "$pcap" -Y 'udp.port==4791' -T fields -e ipv6.src -e ipv6.dst -e ipv6.flow -e udp.srcport \
    -e infiniband.bth.opcode 2>/dev/null >"$rows"
echo "tshark -r $pcap -Y 'udp.port==4791' -T fields -e ipv6.src -e ipv6.dst -e ipv6.flow -e udp.srcport -e infiniband.bth.opcode"
echo "first rows:"
head -n 5 "$rows"
echo "count  src  dst  flow  udp.srcport  opcode:"
sort "$rows" | uniq -c | sort -rn | head -n 12
a2b=$(awk -F'\t' '$1 == "fd02::1" && $2 == "fd02::2"' "$rows" | wc -l)
b2a=$(awk -F'\t' '$1 == "fd02::2" && $2 == "fd02::1"' "$rows" | wc -l)
echo "RESULT pcap RoCEv2/IPv6 frames fd02::1->fd02::2 $a2b, fd02::2->fd02::1 $b2a, all $(wc -l <"$rows")"
if [ "$a2b" -eq 0 ] || [ "$b2a" -eq 0 ]; then
    echo "no RoCEv2 over IPv6 both ways in $pcap" >&2
    exit 1
fi
