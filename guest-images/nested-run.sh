#!/usr/bin/env bash
# Dev helper: boots L1 Linux under QEMU TCG (nested SVM KVM inside) and runs our `vmm` there.
#
#   guest-images/nested-run.sh [OPTIONS] -- VMM_ARGS...
#
# Inside L1:
#   /l2/vmlinuz, /l2/initrd   the L2 kernel and test-guest initramfs (.cache/images)
#   /dev/rigdisk/d0, d1, ...  the files given with --disk, in order (virtio-blk in L1: writes by
#                             L2 land in the host file)
#   /usr/bin/vmm              the statically linked vmm (built by this script)
# L1's console (kernel log, the vmm's stdout = L2's serial) goes to the terminal; the vmm's stderr
# is printed after it exits. L1 powers off when the vmm exits; this script exits with the vmm's
# exit status (124 on timeout).
#
# Example (L2 runs the demo script: PCI devices, IOMMU groups, a DMA read from the disk):
#   truncate -s 64M /tmp/disk.img
#   guest-images/nested-run.sh --disk /tmp/disk.img -- --kernel /l2/vmlinuz \
#       --initramfs /l2/initrd --cmdline "console=ttyS0 panic=-1" --memory 512M --cpus 1 \
#       --viommu virtio --disk path=/dev/rigdisk/d0,iommu=on --serial stdout
#
# Options:
#   --disk FILE       attach FILE (raw) to L1; repeatable; seen in L1 as /dev/rigdisk/dN
#   --qemu            run QEMU instead of vmm in L1 (VMM_ARGS are QEMU's arguments); useful to
#                     compare, and to check the L1 side, e.g.
#                       nested-run.sh --qemu -- -machine q35,accel=kvm -cpu host -m 512 \
#                         -nodefaults -no-reboot -display none -serial stdio -monitor none \
#                         -kernel /l2/vmlinuz -initrd /l2/initrd -append console=ttyS0
#   --vmm PATH        use this (static) vmm binary instead of building one
#   --no-build        do not (re)build the vmm; use target/x86_64-unknown-linux-gnu/release/vmm
#   --timeout SECS    kill the vmm in L1 after SECS seconds (default 900)
#   --l0-arg ARG      extra argument for the L0 QEMU (repeatable), e.g. --l0-arg -device
#                     --l0-arg intel-iommu,intremap=on,caching-mode=on
#   --l1-append STR   extra L1 kernel command-line words (e.g. "intel_iommu=on iommu=pt")
#   --file SRC:DST    copy host file SRC to DST inside L1 (repeatable)
#   --l2-script FILE  L2 runs FILE (busybox sh) instead of the default demo script: it replaces
#                     /etc/rig/demo.sh in the /l2/initrd L1 gets
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
IMAGES=$ROOT/.cache/images
TARGET_TRIPLE=x86_64-unknown-linux-gnu

log() { echo "nested-run: $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

disks=()
l0_args=()
files=()
program=vmm
vmm_bin=
build=1
timeout=900
l1_append=
l2_script=
while [ $# -gt 0 ]; do
    case "$1" in
        --disk) disks+=("$(realpath "$2")"); shift 2 ;;
        --qemu) program=qemu; shift ;;
        --vmm) vmm_bin=$(realpath "$2"); build=0; shift 2 ;;
        --no-build) build=0; shift ;;
        --timeout) timeout=$2; shift 2 ;;
        --l0-arg) l0_args+=("$2"); shift 2 ;;
        --l1-append) l1_append=$2; shift 2 ;;
        --file) files+=("$2"); shift 2 ;;
        --l2-script) l2_script=$(realpath "$2"); shift 2 ;;
        --) shift; break ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (VMM arguments go after --)" ;;
    esac
done
[ $# -gt 0 ] || die "no VMM arguments (usage: $0 [--disk FILE]... -- VMM_ARGS...)"
for d in "${disks[@]}"; do [ -f "$d" ] || die "disk $d is not a file"; done

"$HERE/deps.sh" qemu >&2
"$HERE/build.sh" images
[ "$program" = qemu ] && "$HERE/build.sh" qemu

if [ "$program" = vmm ]; then
    if [ -z "$vmm_bin" ]; then
        vmm_bin=$ROOT/target/$TARGET_TRIPLE/release/vmm
        if [ "$build" = 1 ]; then
            log "building static vmm"
            (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
                cargo build --release --target "$TARGET_TRIPLE" --bin vmm >&2)
        fi
    fi
    [ -x "$vmm_bin" ] || die "vmm binary $vmm_bin missing"
fi

tmp=$(mktemp -d /tmp/nested-run.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# Single-quotes a word for /bin/sh.
shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

extra=$tmp/extra
mkdir -p "$extra/rig/scenarios/000" "$extra/usr/bin"
if [ "$program" = vmm ]; then
    cp "$vmm_bin" "$extra/usr/bin/vmm"
    cmd=/usr/bin/vmm
else
    cmd=/usr/bin/qemu-system-x86_64
fi
for f in "${files[@]}"; do
    src=${f%%:*}
    dst=${f#*:}
    mkdir -p "$extra$(dirname "$dst")"
    cp "$src" "$extra$dst"
done
if [ -n "$l2_script" ]; then
    # A later cpio entry replaces an earlier one: the script overrides the demo script in the
    # L2 initrd, and that initrd overrides /l2/initrd from l1-l2.cpio.
    mkdir -p "$tmp/l2extra/etc/rig" "$extra/l2"
    install -m 755 "$l2_script" "$tmp/l2extra/etc/rig/demo.sh"
    (cd "$tmp/l2extra" && find . -mindepth 1 | LC_ALL=C sort |
        "$IMAGES/busybox" cpio -o -H newc -R 0:0 2>/dev/null) >"$tmp/l2extra.cpio"
    cat "$IMAGES/l2.cpio.gz" "$tmp/l2extra.cpio" >"$extra/l2/initrd"
fi
{
    printf 'exec %s' "$cmd"
    for a in "$@"; do printf ' %s' "$(shq "$a")"; done
    printf '\n'
} >"$extra/rig/scenarios/000/run"
echo "nested-run" >"$extra/rig/scenarios/000/name"
echo "$timeout" >"$extra/rig/scenarios/000/timeout"
log "L1 will run: $(cat "$extra/rig/scenarios/000/run")"
(cd "$extra" && find . -mindepth 1 | LC_ALL=C sort |
    "$IMAGES/busybox" cpio -o -H newc -R 0:0 2>/dev/null) >"$tmp/extra.cpio"

parts=("$IMAGES/l1.cpio.gz" "$IMAGES/l1-l2.cpio")
[ "$program" = qemu ] && parts+=("$IMAGES/l1-qemu.cpio")
parts+=("$tmp/extra.cpio")
cat "${parts[@]}" >"$tmp/l1-initrd"

qemu_disks=()
i=0
for d in "${disks[@]}"; do
    qemu_disks+=(-drive "file=$d,if=none,id=d$i,format=raw,cache=writeback"
        -device "virtio-blk-pci,drive=d$i,serial=d$i")
    log "disk $d -> L1 /dev/rigdisk/d$i"
    i=$((i + 1))
done

log "booting L1 (qemu TCG, $(du -h "$tmp/l1-initrd" | cut -f1) initramfs)"
start=$(date +%s)
set +e
qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -smp 2 -m 3072 \
    -display none -serial stdio -monitor none -no-reboot -nodefaults \
    -kernel "$IMAGES/vmlinuz" -initrd "$tmp/l1-initrd" \
    -append "console=ttyS0 panic=-1 loglevel=4 $l1_append" \
    "${qemu_disks[@]}" "${l0_args[@]}" </dev/null | tee "$tmp/out"
qemu_status=${PIPESTATUS[0]}
set -e
log "L0 QEMU exited with $qemu_status after $(($(date +%s) - start)) s"
end=$(tr -d '\r' <"$tmp/out" | grep -a '^@@RIG-END 000 ' | tail -n1 || true)
[ -n "$end" ] || { log "L1 did not report the end of the run"; exit 1; }
status=$(echo "$end" | sed -n 's/.* status=\([0-9]*\).*/\1/p')
if echo "$end" | grep -q 'timedout=1'; then
    log "TIMEOUT after ${timeout}s"
    exit 124
fi
log "$program exited with status $status in L1 ($(echo "$end" | sed -n 's/.* ms=\([0-9]*\).*/\1/p') ms)"
exit "$status"
