#!/usr/bin/env bash
# Soft-RoCE harness: runs scripts inside qemu guests (TCG) that boot Debian's kernel, load rdma_rxe
# and chroot into this machine's root file system (shared over 9p), so that the host's binaries,
# libraries and this checkout run unchanged on an rxe device. Needs root and Debian's apt.
#
#   ci/softroce.sh prepare                           packages, kernel, initramfs (cached)
#   ci/softroce.sh selfcheck                         ci/softroce/selfcheck-*.sh (one VM, then two)
#   ci/softroce.sh accl                              accl's verbs tests and benchmarks (accl-host.sh)
#   ci/softroce.sh run-one  <guest-script>           one VM (fd02::1/64)
#   ci/softroce.sh run-pair <scriptA> <scriptB> <pcap>  two VMs on one wire (fd02::1, fd02::2)
#
# Or as a library (this sets -euo pipefail in the caller):
#   source ci/softroce.sh; sr_prepare; boot_one NAME SCRIPT [qemu args...]; boot_pair A B PCAP
#
# Inside the guest a script runs as `/bin/bash SCRIPT` under chroot, cwd = this checkout,
# HOME=/root, with SOFTROCE_NAME, SOFTROCE_ADDR (own IPv6 address), SOFTROCE_PEER (the other VM's,
# pair only), SOFTROCE_DEV=rxe0, SOFTROCE_NETDEV=eth0 and SOFTROCE_GID_INDEX (the RoCE v2 GID of
# SOFTROCE_ADDR). /tmp, /run and /dev/shm are guest-local tmpfs, everything else is the host's:
# SCRIPT (and anything it reads) must therefore not live under /tmp or /run. Its output goes to the
# console, which lands here prefixed with "[NAME] " and in $SOFTROCE_DIR/logs/NAME.log; its exit
# status becomes boot_one's (125: the guest failed before or around the script, 124: timeout).
#
# Pair rendezvous: the two VMs' NICs are joined by qemu's UDP socket netdev on 127.0.0.1 (a frame
# per datagram), so there is no start order: both boot at once and reach their scripts within a
# few seconds of each other, either first. Frames sent before the other side is up are lost, like
# on a real wire. A server in "a" must not assume "b" is up; a client must retry connecting until
# its own deadline (accl's TCP bootstrap does; see retry in ci/softroce/guest-lib.sh). Never probe
# a one-shot server (perftest, ibv_rc_pingpong) with a test connection: it takes that as its peer.
# The guests share the host's files with cache=loose: pass data between them over the network.
#
# Knobs (environment): SOFTROCE_DIR (target/softroce), SOFTROCE_TIMEOUT (seconds per VM, 300),
# SOFTROCE_SMP (2), SOFTROCE_MEM (MiB, 2048), SOFTROCE_SNAPLEN (bytes kept per frame in pcaps, 128),
# SOFTROCE_PASS_ENV (names of host variables exported into the guests, e.g. "RUST_LOG ACCL_X"),
# SOFTROCE_CMDLINE (extra kernel arguments, see ci/softroce/initramfs-init), SOFTROCE_PEER_GRACE
# (seconds a pair's second guest may go on after the first failed, 15), SOFTROCE_LOCK_WAIT (seconds
# a subcommand waits for another one to finish, 0: fail at once).
set -euo pipefail

SR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SR_DIR=${SOFTROCE_DIR:-$SR_ROOT/target/softroce}
SR_KDIR=$SR_DIR/kernel
SR_INITRD=$SR_DIR/initrd.img
SR_LOGS=$SR_DIR/logs
SR_INIT_SRC=$SR_ROOT/ci/softroce/initramfs-init
SR_TIMEOUT=${SOFTROCE_TIMEOUT:-300}
SR_SMP=${SOFTROCE_SMP:-2}
SR_MEM=${SOFTROCE_MEM:-2048}
SR_SNAPLEN=${SOFTROCE_SNAPLEN:-128}
SR_PACKAGES=(qemu-system-x86 busybox-static cpio rdma-core ibverbs-providers ibverbs-utils
    libibverbs-dev librdmacm-dev perftest tshark kmod iproute2)
# Loaded by the guest's /init (with their dependencies, resolved here from modules.dep).
SR_MODULES=(crc32_generic virtio_pci virtio_net 9pnet_virtio 9p rdma_rxe ib_uverbs configfs ib_cm
    iw_cm rdma_cm rdma_ucm)

sr_log() { printf 'softroce: %s\n' "$*" >&2; }
sr_die() {
    sr_log "error: $*"
    exit 1
}
sr_now() { date +%s.%N; }
sr_since() { awk -v a="$1" -v b="$(sr_now)" 'BEGIN { printf "%.1f", b - a }'; }

sr_packages() {
    local missing=() p
    for p in "${SR_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || sr_die "missing packages ${missing[*]} and not root"
    sr_log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Debian's kernel package, unpacked (not installed) into $SR_KDIR, with modules.dep made by depmod.
sr_kernel() {
    if [ -s "$SR_KDIR/vmlinux" ] && compgen -G "$SR_KDIR/lib/modules/*/modules.dep" >/dev/null; then
        return 0
    fi
    local pkg dl
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || sr_die "cannot tell which linux-image package linux-image-amd64 depends on"
    sr_log "fetching $pkg"
    dl=$SR_DIR/deb
    rm -rf "$dl" "$SR_KDIR"
    mkdir -p "$dl"
    if ! (cd "$dl" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >/dev/null); then
        apt-get update -qq
        (cd "$dl" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >/dev/null)
    fi
    dpkg -x "$dl"/"$pkg"_*.deb "$SR_KDIR"
    rm -rf "$dl"
    local kver
    kver=$(sr_kver)
    depmod -b "$SR_KDIR" "$kver"
    sr_vmlinux "$SR_KDIR/boot/vmlinuz-$kver" "$SR_KDIR/vmlinux"
}

# The uncompressed ELF kernel: qemu boots it through its PVH entry point, which skips the xz
# decompression of the bzImage (about 4 s under TCG). Absent if extraction fails (bzImage is used).
sr_vmlinux() {
    local off
    off=$(LC_ALL=C grep -abo $'\xfd7zXZ' "$1" | head -n 1 | cut -d: -f1 || true)
    rm -f "$2.new"
    [ -z "$off" ] || tail -c +$((off + 1)) "$1" | xz -dcq >"$2.new" 2>/dev/null || true
    if [ -s "$2.new" ] && od -An -c -N4 "$2.new" | grep -q 'E   L   F'; then
        mv "$2.new" "$2"
    else
        rm -f "$2.new"
        sr_log "could not extract vmlinux from $1: booting the bzImage (slower)"
    fi
}

# The kernel image qemu gets.
sr_kernel_image() {
    if [ -s "$SR_KDIR/vmlinux" ]; then echo "$SR_KDIR/vmlinux"; else echo "$SR_KDIR/boot/vmlinuz-$(sr_kver)"; fi
}

sr_kver() {
    local v
    v=$(compgen -G "$SR_KDIR/lib/modules/*" | head -n 1)
    [ -n "$v" ] || sr_die "no kernel in $SR_KDIR (run prepare)"
    basename "$v"
}

# Busybox initramfs with the modules and /init; rebuilt when missing or older than its sources.
sr_initrd() {
    if [ -s "$SR_INITRD" ] && [ "$SR_INITRD" -nt "$SR_INIT_SRC" ] && [ "$SR_INITRD" -nt "${BASH_SOURCE[0]}" ]; then
        return 0
    fi
    local kver tree mods m f
    kver=$(sr_kver)
    tree=$SR_DIR/initrd.tree
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,sbin,proc,sys,dev,host,tmp,etc} "$tree/lib/modules/$kver"
    cp /bin/busybox "$tree/bin/busybox"
    for m in $("$tree/bin/busybox" --list); do
        [ "$m" = busybox ] || ln -s busybox "$tree/bin/$m"
    done
    mods=$(for m in "${SR_MODULES[@]}"; do
        modprobe -d "$SR_KDIR" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | sort -u)
    for f in $mods; do
        f=${f#"$SR_KDIR"/}
        mkdir -p "$tree/$(dirname "$f")"
        cp "$SR_KDIR/$f" "$tree/$f"
    done
    cp "$SR_KDIR/lib/modules/$kver"/modules.* "$tree/lib/modules/$kver/"
    install -m 755 "$SR_INIT_SRC" "$tree/init"
    (cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -1 >"$SR_INITRD.new"
    mv "$SR_INITRD.new" "$SR_INITRD"
    rm -rf "$tree"
    sr_log "built $SR_INITRD ($(du -h "$SR_INITRD" | cut -f1), $(echo "$mods" | wc -w) modules)"
}

sr_prepare() {
    local t0
    t0=$(sr_now)
    mkdir -p "$SR_DIR" "$SR_LOGS"
    sr_packages
    sr_kernel
    sr_initrd
    sr_log "prepared in $(sr_since "$t0") s (kernel $(sr_kver))"
}

# Paths travel on the kernel command line and are seen through the guest's chroot.
sr_check_path() {
    case $1 in
        *[[:space:]]*) sr_die "$1: whitespace in the path" ;;
        "$SR_ROOT"/*) ;; # the checkout is carried into the guest wherever it lives
        /tmp/* | /run/* | /dev/* | /proc/* | /sys/*) sr_die "$1: the guest does not see the host's $(echo "$1" | cut -d/ -f2)" ;;
        /*) ;;
        *) sr_die "$1: not absolute" ;;
    esac
}

# sr_vm NAME SCRIPT ADDR PEER [qemu args (the NIC)...]: boots one guest, prints its console
# prefixed with [NAME] (and into $SR_LOGS/NAME.log) and returns the script's exit status.
sr_vm() {
    local name=$1 script=$2 addr=$3 peer=$4
    shift 4
    local rcfile=$SR_LOGS/$name.rc log=$SR_LOGS/$name.log envfile=$SR_LOGS/$name.env kernel t0 qrc rc v
    script=$(realpath "$script")
    [ -f "$script" ] || sr_die "$script: no such file"
    sr_check_path "$script"
    sr_check_path "$rcfile"
    kernel=$(sr_kernel_image)
    rm -f "$rcfile" "$SR_LOGS/$name.pid"
    mkdir -p "$SR_LOGS"
    for v in ${SOFTROCE_PASS_ENV:-}; do
        if [ -n "${!v+set}" ]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
    done >"$envfile"
    t0=$(sr_now)
    set +e
    timeout -k 10 "$SR_TIMEOUT" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu max -smp "$SR_SMP" -m "$SR_MEM" \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$kernel" -initrd "$SR_INITRD" \
        -append "console=ttyS0 panic=-1 quiet mitigations=off cryptomgr.notests clocksource=tsc tsc=reliable ${SOFTROCE_CMDLINE:-} accl.name=$name accl.addr=$addr accl.peer=$peer accl.script=$script accl.rc=$rcfile accl.env=$envfile accl.cwd=$SR_ROOT" \
        -virtfs local,path=/,mount_tag=host,security_model=passthrough,id=host0,multidevs=remap \
        -pidfile "$SR_LOGS/$name.pid" "$@" </dev/null 2>&1 |
        sed -u -e 's/\r$//' -e '/warning: hub 0 is not connected to host network/d' |
        tee "$log" | sed -u "s/^/[$name] /"
    qrc=${PIPESTATUS[0]}
    set -e
    rm -f "$SR_LOGS/$name.pid"
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
        sr_log "$name: timed out after $SR_TIMEOUT s (log: $log)"
        return 124
    fi
    rc=$(cat "$rcfile" 2>/dev/null || true)
    if ! [[ $rc =~ ^[0-9]+$ ]]; then
        sr_log "$name: no exit status from the guest (qemu exit $qrc; log: $log)"
        return 125
    fi
    sr_log "$name: exit status $rc after $(sr_since "$t0") s"
    return "$rc"
}

# boot_one NAME SCRIPT [extra qemu args...]: one guest with eth0 = fd02::1/64 on a NIC whose
# backend is a hub with no other port (the link is up, frames go nowhere); rxe0 on eth0.
boot_one() {
    local name=$1 script=$2
    shift 2
    sr_vm "$name" "$script" fd02::1/64 "" \
        -netdev hubport,id=n0,hubid=0 -device virtio-net-pci,netdev=n0,mac=52:54:00:02:00:01 "$@"
}

# sr_stop_vm NAME DELAY: SIGTERM to guest NAME's qemu (from its pidfile) after DELAY seconds.
sr_stop_vm() {
    local pidfile=$SR_LOGS/$1.pid pid
    sleep "$2"
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = qemu-system-x86 ]; then kill -TERM "$pid"; fi
}

sr_free_udp_port() {
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 20000))
        [ -z "$(ss -Huan "sport = :$p")" ] && echo "$p" && return 0
    done
    sr_die "no free UDP port"
}

# boot_pair SCRIPT_A SCRIPT_B PCAP: guests "a" (fd02::1/64) and "b" (fd02::2/64) joined by qemu's
# socket netdev over 127.0.0.1; the wire is recorded to PCAP (SOFTROCE_SNAPLEN bytes per frame).
# Returns 0 when both scripts exit 0, else the first non-zero status (a's first).
boot_pair() {
    local sa=$1 sb=$2 pcap=$3 pa_port pb_port pa pb rca=0 rcb=0
    pcap=$(realpath -m "$pcap")
    mkdir -p "$(dirname "$pcap")"
    rm -f "$pcap"
    # One UDP datagram per frame, each VM sending to the other's port. (The TCP flavour,
    # listen=/connect=, suffers from Nagle: 40-50 ms stalls, 1.3 Mbit/s in ibv_rc_pingpong.)
    pa_port=$(sr_free_udp_port)
    pb_port=$(sr_free_udp_port)
    [ "$pa_port" != "$pb_port" ] || pb_port=$((pa_port + 1))
    sr_vm a "$sa" fd02::1/64 fd02::2 \
        -netdev "socket,id=n0,udp=127.0.0.1:$pb_port,localaddr=127.0.0.1:$pa_port" \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:02:00:01 \
        -object "filter-dump,id=f0,netdev=n0,file=$pcap,maxlen=$SR_SNAPLEN" &
    pa=$!
    sr_vm b "$sb" fd02::2/64 fd02::1 \
        -netdev "socket,id=n0,udp=127.0.0.1:$pa_port,localaddr=127.0.0.1:$pb_port" \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:02:00:02 &
    pb=$!
    # When one guest fails, the other is probably waiting for it: stop it after a grace period.
    local first rc=0 other op killer=''
    wait -n -p first "$pa" "$pb" || rc=$?
    if [ "$first" = "$pa" ]; then rca=$rc other=b op=$pb; else rcb=$rc other=a op=$pa; fi
    if [ "$rc" != 0 ]; then
        sr_log "pair: $([ "$other" = a ] && echo b || echo a) failed ($rc): stopping $other in ${SOFTROCE_PEER_GRACE:-15} s"
        sr_stop_vm "$other" "${SOFTROCE_PEER_GRACE:-15}" &
        killer=$!
    fi
    rc=0
    wait "$op" || rc=$?
    if [ "$other" = a ]; then rca=$rc; else rcb=$rc; fi
    if [ -n "$killer" ]; then kill "$killer" 2>/dev/null || true; fi
    sr_log "pair: a=$rca b=$rcb, pcap $pcap ($(du -h "$pcap" 2>/dev/null | cut -f1))"
    [ "$rca" = 0 ] || return "$rca"
    return "$rcb"
}

# selfcheck: the standard tools on rxe, in one VM then across two; prints RESULT lines and timings.
sr_selfcheck() {
    local t0 t d=$SR_ROOT/ci/softroce pcap=$SR_LOGS/selfcheck-pair.pcap
    t0=$(sr_now)
    sr_prepare
    export SOFTROCE_PASS_ENV="${SOFTROCE_PASS_ENV:-} SELFCHECK_ITERS"
    t=$(sr_now)
    SELFCHECK_ITERS=${SELFCHECK_ITERS_ONE:-100} boot_one one "$d/selfcheck-one.sh"
    sr_log "selfcheck one VM: $(sr_since "$t") s"
    t=$(sr_now)
    SELFCHECK_ITERS=${SELFCHECK_ITERS_PAIR:-20} boot_pair "$d/selfcheck-pair-a.sh" "$d/selfcheck-pair-b.sh" "$pcap"
    sr_log "selfcheck pair: $(sr_since "$t") s"
    t=$(sr_now)
    bash "$d/selfcheck-pcap.sh" "$pcap"
    sr_log "selfcheck pcap: $(sr_since "$t") s"
    grep -h '^RESULT' "$SR_LOGS"/one.log "$SR_LOGS"/a.log "$SR_LOGS"/b.log || true
    sr_log "selfcheck passed in $(sr_since "$t0") s"
}

sr_main() {
    local cmd=${1:-}
    shift || true
    mkdir -p "$SR_DIR"
    # One harness run at a time: the guests' names, logs and exit-status files are fixed.
    exec 9>"$SR_DIR/lock"
    if [ "${SOFTROCE_LOCK_WAIT:-0}" -gt 0 ]; then
        flock -w "$SOFTROCE_LOCK_WAIT" 9 || sr_die "another ci/softroce.sh still runs after ${SOFTROCE_LOCK_WAIT} s"
    else
        flock -n 9 || sr_die "another ci/softroce.sh runs (lock $SR_DIR/lock; SOFTROCE_LOCK_WAIT=SECONDS waits)"
    fi
    case $cmd in
        prepare) sr_prepare ;;
        selfcheck) sr_selfcheck ;;
        accl) bash "$SR_ROOT/ci/softroce/accl-host.sh" ;;
        run-one)
            [ $# -ge 1 ] || sr_die "usage: $0 run-one <guest-script> [name]"
            sr_prepare
            boot_one "${2:-one}" "$1"
            ;;
        run-pair)
            [ $# -eq 3 ] || sr_die "usage: $0 run-pair <scriptA> <scriptB> <pcap>"
            sr_prepare
            boot_pair "$1" "$2" "$3"
            ;;
        *) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2 && exit 2 ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    sr_main "$@"
fi
