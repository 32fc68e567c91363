# Entry points for building, running and testing the VMM. See README.md ("Make targets").
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CARGO ?= cargo
STATIC_TARGET := x86_64-unknown-linux-gnu
STATIC_VMM := target/$(STATIC_TARGET)/release/vmm
# `make run PROGRAM=qemu` boots the demo guest with QEMU instead of our vmm; `make run
# PROGRAM=vtd` with our vmm behind the emulated Intel VT-d instead of the virtio-iommu.
PROGRAM ?= vmm
# `make test-guests FILTER="boot cpus"` runs only matching real-guest scenarios.
FILTER ?=
# `make test KEEP_GOING=1` runs every stage even after a failure.
KEEP_GOING ?=

# Integration test targets of every crate except the real-guest ones (`guests`, `soak`; stage 2,
# includes the host-KVM tiny-guest tests kvm_*).
INTEGRATION_TESTS := $(sort $(filter-out guests soak,$(basename $(notdir \
	$(wildcard tests/*.rs */tests/*.rs tests/*/tests/*.rs)))))

# Features the test stages (lint, unit, integration) turn on: the optional vm-memory IOMMU glue,
# whose tests and bench declare it. Never for `make bench`: vm-memory's `iommu` feature slows
# every plain guest-memory access.
TEST_FEATURES := --features viommu/vm-memory-iommu

STAGE_TIMES := $(CURDIR)/.cache/stage-times.tsv
TIMED := STAGE_TIMES=$(STAGE_TIMES) .ci/timed
# Tests that cannot run on this host (no /dev/kvm, no TAP, no guest kernel) record themselves
# in this file (`vmm::skip`); the test stages empty it first and count and list what was
# skipped at their end (.ci/timed with SKIP_LOG; the stage result reads "ok, N skipped").
# `make test-integration VMM_TEST_NO_SKIP=1` fails such tests instead.
export VMM_SKIP_LOG := $(CURDIR)/target/skipped.txt
TESTS_TIMED := SKIP_LOG=$(VMM_SKIP_LOG) $(TIMED)

.PHONY: help all deps guest-image guest-image-dpdk vmm-static run test test-lint test-unit test-integration test-images \
	test-guests soak bench bench-micro bench-guest-programs profile clean distclean

all: vmm-static guest-image

## help: this list.
help:
	@sed -n 's/^## //p' $(firstword $(MAKEFILE_LIST))

## deps: host packages: QEMU 10 (bookworm-backports, apt source derived from debian.sources).
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
	@command -v xz >/dev/null && command -v dpkg-deb >/dev/null || { \
		echo "deps: installing xz-utils"; apt-get install -y -q xz-utils; }
	guest-images/deps.sh all

## guest-image: kernel + L1/L2 initramfs under .cache/images (no-op when up to date).
guest-image:
	guest-images/build.sh images

## guest-image-dpdk: dpdk-testpmd, its libraries and PMD plugins for L2 (.cache/images/l2-dpdk.tar.gz;
## the net-dpdk-* guest scenarios build it on demand; the first build downloads ~110 packages).
guest-image-dpdk:
	guest-images/build.sh dpdk

## vmm-static: the statically linked vmm copied into L1 for nested runs.
vmm-static:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(STATIC_TARGET) --bin vmm

## run: build what is missing, boot the demo guest through the rig, print what it saw.
run: deps guest-image vmm-static
	RIG_NO_BUILD=1 $(CARGO) run -q -p rig --example demo -- $(PROGRAM)

## test: all stages, each timed; stops at the first failing stage (KEEP_GOING=1: runs them all).
test:
	@mkdir -p .cache && : >$(STAGE_TIMES)
	@start=$$(date +%s); rc=0; \
	for stage in test-lint test-unit test-integration test-images test-guests; do \
		$(MAKE) --no-print-directory $$stage || { rc=$$?; [ "$(KEEP_GOING)" = 1 ] || break; }; \
	done; \
	echo "==> stage times (s):"; awk -F'\t' '{ printf "    %-16s %8s s  %s\n", $$1, $$2, $$3 }' $(STAGE_TIMES); \
	echo "==> make test: $$( [ $$rc = 0 ] && echo ok || echo FAILED ) in $$(( $$(date +%s) - start )) s"; \
	exit $$rc

## test-lint (stage 0): rustfmt and clippy (warnings are errors) on every crate and target.
test-lint:
	$(TIMED) 0-lint bash -c '$(CARGO) fmt --all --check && \
		$(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings && \
		$(CARGO) clippy $(TEST_FEATURES) --test guests --test soak -- -D warnings'

## test-unit (stage 1): unit tests and doc tests of every crate; lists the tests that skipped.
test-unit:
	$(TESTS_TIMED) 1-unit bash -c '$(CARGO) test --workspace --lib --bins $(TEST_FEATURES) && $(CARGO) test --workspace --doc $(TEST_FEATURES)'

## test-integration (stage 2): integration tests, incl. the fast host-KVM tests (kvm_*); lists
## the tests that skipped (VMM_TEST_NO_SKIP=1: a test that cannot run fails instead).
test-integration:
	$(TESTS_TIMED) 2-integration $(CARGO) test --workspace $(TEST_FEATURES) $(addprefix --test ,$(INTEGRATION_TESTS))

## test-images (stage 3): host deps, guest images (the DPDK tree for net-dpdk-testpmd too),
## static vmm and in-guest programs.
test-images:
	$(TIMED) 3-images bash -c '$(MAKE) --no-print-directory deps guest-image guest-image-dpdk vmm-static bench-guest-programs'

## test-guests (stage 4): real Linux guests through the rig (nested under QEMU TCG here).
## --workspace keeps stage 1's feature resolution, so the dependencies are not built twice.
test-guests:
	$(TIMED) 4-guests env RIG_NO_BUILD=1 $(CARGO) test --workspace $(TEST_FEATURES) --test guests -- $(FILTER)

## soak: issue 16's soak: the two-disk rebind workload and stress-rebind-strict's, SOAK_RUNS times
## each under our vmm (with --watchdog) and QEMU, interleaved in the same L1 boots, with and
## without the vIOMMU, 1 and 2 vCPUs; pass / guest reset / hang / L1 failure per cell and per 100
## runs in target/soak/report.md, each run's evidence in target/soak/runs/.
## `make soak SOAK_RUNS=1 SOAK_ARGS="--cells rebind3-vmm --watchdog 30"` narrows it.
SOAK_RUNS ?= 20
SOAK_ARGS ?=
soak: vmm-static
	@start=$$(date +%s); rc=0; \
	RIG_NO_BUILD=1 $(CARGO) test --workspace --test soak -- --runs $(SOAK_RUNS) $(SOAK_ARGS) || rc=$$?; \
	echo "==> make soak: $$( [ $$rc = 0 ] && echo ok || echo FAILED ) in $$(( $$(date +%s) - start )) s"; \
	exit $$rc

## bench: the vIOMMU side by side with QEMU: criterion microbenchmarks, then the same L2 guest
## under our vmm and QEMU (interleaved, median of BENCH_RUNS); tables in target/bench/report.md,
## report.json and report.html (charts). Disk scenarios run 16 read workloads (4 KiB/1 MiB,
## random/sequential, heap/huge-page buffers, QD1/QD8) with per-I/O counters.
## `make bench BENCH_QUICK=1`: 4 workloads of 1 s, no testpmd, no criterion run (about a third
## of the time). `make bench BENCH_ARGS="--io-seconds 1"` passes options to the harness.
BENCH_RUNS ?= 3
BENCH_ARGS ?=
BENCH_QUICK ?=
bench:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory deps guest-image $(if $(BENCH_QUICK),,guest-image-dpdk) vmm-static \
		bench-guest-programs $(if $(BENCH_QUICK),,bench-micro) && \
	RIG_NO_BUILD=1 $(CARGO) run -q -p bench -- --runs $(BENCH_RUNS) --started $$start \
		$(if $(BENCH_QUICK),--quick) $(BENCH_ARGS); \
	rc=$$?; echo "==> make bench: $$( [ $$rc = 0 ] && echo ok || echo FAILED ) in $$(( $$(date +%s) - start )) s"; \
	exit $$rc

## profile: one real-guest scenario with the VMM under perf inside L1 (Debian's linux-perf for
## the L1 kernel, added to L1 only here): top symbols, CPU per thread, L1's KVM exits by reason
## per I/O, in target/profile/<scenario>-<program>/report.txt. SCENARIO=iommu-strict (default),
## iommu-lazy, no-iommu, vtd-strict or vtd-vfio (VT-d reads, then in-guest VFIO maps); PROGRAM=qemu profiles QEMU instead; PROFILE_ARGS="--io-seconds 4".
SCENARIO ?= iommu-strict
PROFILE_ARGS ?=
profile:
	$(MAKE) --no-print-directory deps guest-image vmm-static bench-guest-programs
	guest-images/build.sh perf
	RIG_NO_BUILD=1 $(CARGO) run -q -p bench -- --profile $(SCENARIO) --program $(PROGRAM) \
		$(PROFILE_ARGS)

## bench-guest-programs: the static in-guest programs (I/O timer, VFIO exerciser) for L2.
bench-guest-programs:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(STATIC_TARGET) \
		-p guest-bench -p guest-vfio

## bench-micro: the criterion benchmarks (viommu datapath, virtio-net forwarding, VT-d invalidation), short
## (target/criterion/*/new/estimates.json).
bench-micro:
	$(CARGO) bench -p viommu --bench datapath -- --warm-up-time 0.5 --measurement-time 2 \
		--noplot
	$(CARGO) bench -p vmm --bench netpath -- --warm-up-time 0.5 --measurement-time 2 --noplot
	$(CARGO) bench -p viommu --bench vtd -- --warm-up-time 0.5 --measurement-time 2 --noplot

## clean: build outputs (cargo target dir, images, rig work dirs); keeps downloaded packages.
clean:
	$(CARGO) clean
	rm -rf .cache/images .cache/build .cache/rig .cache/stage-times.tsv

## distclean: clean, plus every download under .cache.
distclean: clean
	rm -rf .cache

## fuzz: every cargo-fuzz target (fuzz/, its own workspace) for FUZZ_SECONDS each; prints the
## executions (and exec/s) of each target and the total, fails if any target crashed.
## `make fuzz FUZZ_SECONDS=600`, or `fuzz/run.sh <target>...` for some targets.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh
