#!/usr/bin/env bash
# Build every fuzz target, (re)generate the seed corpus, fuzz each target for FUZZ_SECONDS
# (default 60), print executions per target and the total, and fail if any target crashed
# (the others still run). `make fuzz` runs this.
#   FUZZ_SECONDS=300 fuzz/run.sh               all targets
#   fuzz/run.sh viommu_queue pci_config         some targets
# Stable toolchain: libFuzzer instrumentation (-Z flags) is enabled with RUSTC_BOOTSTRAP=1.
# No sanitizer by default (FUZZ_SANITIZER=none): the code under test is safe Rust but for the
# FFI/mmap edge (guest RAM mmaps, preadv, ioctls), where an out-of-bounds access faults on the
# mapping's guard anyway; panics, assertion failures, hangs (-timeout) and memory growth
# (-rss_limit_mb) are what the harnesses find, and those need no sanitizer. ASan costs a
# multiple of the executions (README): FUZZ_SANITIZER=address turns it on, its builds live
# apart (target/<sanitizer>/). Leak detection stays off: a leak in safe Rust is not a memory
# error, and LeakSanitizer scanned the whole heap after nearly every input (pci_config and
# virtio_pci ran 20 times slower). Crashes land in fuzz/artifacts/<target>/, logs in
# fuzz/artifacts/logs/, the growing corpus in fuzz/corpus/<target>/ (not committed).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
TARGET_DIR="target/$SANITIZER"
BIN_DIR="$TARGET_DIR/x86_64-unknown-linux-gnu/release"
# FUZZ_NO_BLK=1: leave out virtio_blk and the `vmm` crate (e.g. while it does not build).
FEATURES=()
ALL=(viommu_queue virtio_pci pci_config virtio_blk virtio_net shadow vfio_pci blk_iommu virtio_pci_devs vtd_unit)
if [ -n "${FUZZ_NO_BLK:-}" ]; then
    FEATURES=(--no-default-features)
    ALL=(viommu_queue virtio_pci pci_config shadow vfio_pci vtd_unit)
fi
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=("${ALL[@]}")
fi
# cargo-fuzz: from PATH, else installed once into the repository's ignored .cache/.
CACHE_BIN="$(cd .. && pwd)/.cache/cargo-fuzz/bin"
export PATH="$PATH:$CACHE_BIN"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --root "$(dirname "$CACHE_BIN")"
export RUSTC_BOOTSTRAP=1
cargo run -q "${FEATURES[@]}" --bin seeds -- corpus
mkdir -p artifacts/logs
total=0
crashed=()
for t in "${TARGETS[@]}"; do
    cargo fuzz build "${FEATURES[@]}" -s "$SANITIZER" --target-dir "$TARGET_DIR" "$t"
    mkdir -p "artifacts/$t" "corpus/$t"
    log="artifacts/logs/$t.$(date +%Y%m%d-%H%M%S).log"
    echo "==> fuzz $t for ${SECONDS_EACH}s, sanitizer $SANITIZER (log $log)"
    rc=0
    "$BIN_DIR/$t" "corpus/$t" \
        -artifact_prefix="artifacts/$t/" -max_total_time="$SECONDS_EACH" -max_len=4096 \
        -timeout=10 -detect_leaks=0 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    echo "    $t: ${runs:-0} executions (${rate:-0}/s), exit $rc"
    total=$((total + ${runs:-0}))
    if [ "$rc" != 0 ]; then
        grep -m1 -A12 -E "panicked|ERROR: AddressSanitizer|ERROR: libFuzzer" "$log" || tail -30 "$log"
        echo "==> fuzz: $t crashed; reproduce with: $BIN_DIR/$t artifacts/$t/<crash file>" >&2
        crashed+=("$t")
    fi
done
echo "==> fuzz: ${#TARGETS[@]} targets, $total executions, ${#crashed[@]} crashed ${crashed[*]}"
[ ${#crashed[@]} -eq 0 ]
