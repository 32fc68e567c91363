#!/usr/bin/env bash
# Validates guest-vfio (and so viommu's VFIO backend, host/vfio.rs) on real VFIO type1: boots L1
# under QEMU TCG with an emulated Intel IOMMU and a virtio-blk (iommu_platform=on) at 00:18.0,
# runs every mode there against it (no L2, no vmm), and checks the sector digests (plain
# buffer, through viommu::Shadow with a region-edge split, through viommu::StaticMapping).
#   tests/guest-vfio/scripts/run-in-l1.sh        (about 20 s of L1 time on an idle machine)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
BIN=$ROOT/target/x86_64-unknown-linux-gnu/release/guest-vfio
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target x86_64-unknown-linux-gnu -p guest-vfio >&2)
tmp=$(mktemp -d /tmp/guest-vfio-l1.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
truncate -s 16M "$tmp/disk.img"
# Sector 5: byte i = (13 i + 7) mod 256; its FNV-1a 64 is printed by virtio-blk-read.
expected=$(python3 - "$tmp/disk.img" <<'PY'
import sys
data = bytes((i * 13 + 7) & 0xff for i in range(512))
with open(sys.argv[1], "r+b") as f:
    f.seek(5 * 512)
    f.write(data)
h = 0xcbf29ce484222325
for b in data:
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print("fnv1a64=%#018x" % h)
PY
)
set +e
"$ROOT/guest-images/nested-run.sh" --vmm "$HERE/l1-wrapper.sh" --timeout 400 \
    --file "$BIN:/usr/bin/guest-vfio" \
    --l0-arg -device --l0-arg intel-iommu,intremap=on,caching-mode=on \
    --l0-arg -drive --l0-arg "file=$tmp/disk.img,if=none,id=pt0,format=raw" \
    --l0-arg -device \
    --l0-arg virtio-blk-pci,drive=pt0,iommu_platform=on,disable-legacy=on,addr=0x18.0 \
    --l1-append "intel_iommu=on iommu=pt" -- run 2>&1 | tr -d '\r' | tee "$tmp/out" |
    grep -E '^(check |errors:|maps_per_s|[a-z-]*blk-read:|shadow:|static:|guest-vfio: |l1-wrapper)'
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
    echo "run-in-l1: FAIL (status $status)"
    exit 1
fi
for what in virtio-blk-read shadow-blk-read static-blk-read; do
    if ! grep -q "^$what: sector=5 status=ok .*$expected" "$tmp/out"; then
        echo "run-in-l1: FAIL ($what: sector 5 digest is not $expected)"
        exit 1
    fi
done
if ! grep -q "^shadow: .* became 2 host mappings" "$tmp/out"; then
    echo "run-in-l1: FAIL (the shadowed window was not split in two host mappings)"
    exit 1
fi
echo "run-in-l1: PASS"
