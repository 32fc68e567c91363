#!/usr/bin/env bash
# Builds the guest images used by nested runs and the real-guest tests, all under .cache/:
#
#   .cache/images/vmlinuz       newest Debian linux-image-6.12.*-cloud-amd64-unsigned (bzImage),
#                               for L1 and L2 alike
#   .cache/images/l2.cpio.gz    L2 test guest initramfs (busybox, virtio_iommu, virtio_blk,
#                               virtio_net, VFIO modules; /init runs `run=PATH` from the cmdline)
#   .cache/images/l1.cpio.gz    L1 host initramfs base (busybox, kvm, kvm_amd, virtio_blk, VFIO;
#                               /init runs the scenarios appended under /rig/scenarios)
#   .cache/images/l1-l2.cpio    uncompressed cpio putting the L2 kernel and initramfs at
#                               /l2/vmlinuz and /l2/initrd inside L1 (appended to l1.cpio.gz)
#   .cache/images/l1-qemu.cpio  (only with `build.sh qemu`) QEMU with its libraries and firmware,
#                               for using QEMU as the L2 VMM inside L1
#
# Every archive is padded to a multiple of 512 bytes, so archives can be concatenated as they are
# (the kernel wants an uncompressed cpio to start 4-byte aligned).
# A second run with unchanged inputs does nothing.
#
#   .cache/images/l1-perf.cpio  (only with `build.sh perf`) Debian's linux-perf for the L1 kernel's
#                               series (bookworm-backports) with the shared libraries it loads,
#                               under /opt/perf, and /usr/bin/perf running it; appended to L1's
#                               initramfs only by `make profile`
#   .cache/images/l2-dpdk.tar.gz  (only with `build.sh dpdk`) dpdk-testpmd from bookworm's dpdk-dev,
#                               its libraries and PMD plugins, unpacked at / by DPDK scenarios
#
# usage: guest-images/build.sh [images|qemu|dpdk|perf|all]     (default: images)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${RIG_CACHE:-$ROOT/.cache}
DEBS=$CACHE/debs
IMAGES=$CACHE/images
WORK=$CACHE/build

log() { echo "guest-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Pads FILE with zero bytes to a multiple of 512.
pad512() {
    local size pad
    size=$(stat -c %s "$1")
    pad=$(((512 - size % 512) % 512))
    if [ "$pad" -gt 0 ]; then head -c "$pad" /dev/zero >>"$1"; fi
}

# Writes a newc cpio of directory $1 (owned by root) to $2, padded to 512 bytes.
make_cpio() {
    local dir=$1 out=$2
    (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) >"$out.tmp"
    mv "$out.tmp" "$out"
}

# Downloads package $1 (exact name) into $DEBS unless a .deb for it is already there.
fetch_deb() {
    local pkg=$1 existing
    existing=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$existing" ]; then
        echo "$existing"
        return 0
    fi
    log "downloading $pkg"
    (cd "$DEBS" && apt-get download -q "$pkg" 2>&1 | grep -v "unsandboxed" >&2) || die "apt-get download $pkg failed"
    existing=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$existing" ] || die "apt-get download $pkg produced no .deb"
    echo "$existing"
}

# Newest linux-image-6.12.N+debXX-cloud-amd64-unsigned apt knows about (empty if none).
newest_kernel_pkg() {
    apt-cache pkgnames linux-image-6.12. 2>/dev/null |
        grep -E '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-cloud-amd64-unsigned$' | sort -V | tail -n1
}

kernel_pkg() {
    local pkg
    pkg=$(newest_kernel_pkg)
    if [ -z "$pkg" ]; then
        # Offline or not yet configured: a kernel already in the cache is good enough.
        pkg=$(ls "$DEBS"/linux-image-6.12.*-cloud-amd64-unsigned_*.deb 2>/dev/null |
            sed 's|.*/||; s|_.*||' | sort -V | tail -n1 || true)
    fi
    if [ -z "$pkg" ]; then
        log "no linux-image-6.12 cloud kernel known to apt: adding bookworm-backports"
        "$HERE/deps.sh" apt-source >&2
        pkg=$(newest_kernel_pkg)
        if [ -z "$pkg" ]; then
            log "apt-get update"
            if [ "$(id -u)" = 0 ]; then apt-get update -qq >&2; else sudo apt-get update -qq >&2; fi
            pkg=$(newest_kernel_pkg)
        fi
    fi
    [ -n "$pkg" ] || die "no linux-image-6.12.*-cloud-amd64-unsigned package available"
    echo "$pkg"
}

# ---- module handling -------------------------------------------------------------------------

declare -A MOD_PATH   # module name (with '_') -> .ko.xz path
declare -A MOD_DONE   # module name -> 1 once emitted
MOD_ORDER=()          # module names, dependencies first

index_modules() {
    local f base
    MOD_PATH=()
    while IFS= read -r f; do
        base=${f##*/}
        base=${base%.ko.xz}
        base=${base%.ko}
        MOD_PATH[${base//-/_}]=$f
    done < <(find "$MODDIR/kernel" -name '*.ko.xz' -o -name '*.ko')
    [ "${#MOD_PATH[@]}" -gt 0 ] || die "no modules found under $MODDIR"
}

mod_depends() {
    local f=$1
    case "$f" in
        *.xz) xz -dc "$f" ;;
        *) cat "$f" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

# Appends module $1 and (first) its dependencies to MOD_ORDER. Modules built into the kernel
# are skipped silently; an unknown module is an error unless $2 = optional.
add_module() {
    local name=${1//-/_} optional=${2:-} dep
    [ -z "${MOD_DONE[$name]:-}" ] || return 0
    if [ -z "${MOD_PATH[$name]:-}" ]; then
        if grep -qE "/${1}\.ko$|/${name}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
            MOD_DONE[$name]=1
            return 0
        fi
        [ "$optional" = optional ] && { log "module $name not available (optional)"; return 0; }
        die "module $name not found"
    fi
    MOD_DONE[$name]=1
    for dep in $(mod_depends "${MOD_PATH[$name]}"); do
        add_module "$dep"
    done
    MOD_ORDER+=("$name")
}

# Installs the modules in MOD_ORDER into $1/lib/modules (decompressed) and writes
# $1/etc/rig/modules ("name params" per line, load order). $2..: "name=params" overrides.
install_modules() {
    local root=$1 name params kv
    shift
    mkdir -p "$root/lib/modules" "$root/etc/rig"
    : >"$root/etc/rig/modules"
    for name in "${MOD_ORDER[@]}"; do
        case "${MOD_PATH[$name]}" in
            *.xz) xz -dc "${MOD_PATH[$name]}" >"$root/lib/modules/$name.ko" ;;
            *) cp "${MOD_PATH[$name]}" "$root/lib/modules/$name.ko" ;;
        esac
        params=
        for kv in "$@"; do
            [ "${kv%%=*}" = "$name" ] && params=${kv#*=}
        done
        echo "$name $params" >>"$root/etc/rig/modules"
    done
}

# A root skeleton with busybox, its applet links and /dev/console.
make_skeleton() {
    local root=$1 applet
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc/rig,lib/modules,root}
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] && continue
        ln -sf busybox "$root/bin/$applet"
    done
    # Best effort (needs root): the kernel's built-in initramfs has /dev/console anyway, and
    # /init mounts devtmpfs before using anything else.
    mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true
}

# ---- QEMU for L1 -----------------------------------------------------------------------------

build_qemu_cpio() {
    local out=$IMAGES/l1-qemu.cpio root=$WORK/l1-qemu qemu lib f
    qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not installed (make deps)"
    local stamp
    stamp=$({ ls -lL "$qemu"; ldd "$qemu" | awk '{ print $1, $3 }'; sha256sum <"$0"; } | sha256sum | cut -c1-16)
    if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
        log "l1-qemu.cpio: up to date"
        return 0
    fi
    log "building l1-qemu.cpio from $qemu"
    rm -rf "$root"
    mkdir -p "$root/usr/bin" "$root/usr/share/qemu" "$root/usr/share/seabios"
    cp -L "$qemu" "$root/usr/bin/qemu-system-x86_64"
    for lib in $(ldd "$qemu" | awk '/=>/ { print $3 } !/=>/ && $1 ~ /^\// { print $1 }'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    # x86 firmware only: SeaBIOS, option ROMs for the Linux/PVH loaders and NICs.
    for f in /usr/share/qemu/*; do
        case "${f##*/}" in
            bios*.bin | linuxboot*.bin | kvmvapic.bin | multiboot*.bin | pvh.bin | qboot.rom | \
                efi-*.rom | pxe-*.rom | vgabios*.bin)
                cp -L "$f" "$root/usr/share/qemu/" ;;
        esac
    done
    cp -rL /usr/share/seabios/. "$root/usr/share/seabios/"
    make_cpio "$root" "$out"
    pad512 "$out"
    echo "$stamp" >"$out.stamp"
    log "l1-qemu.cpio: $(du -h "$out" | cut -f1)"
}

# ---- perf for L1 -----------------------------------------------------------------------------

# linux-perf's Depends and, recursively, theirs, restricted to shared-library packages
# (interpreters, data and helper packages are left out: perf's perl/python scripting is not
# used). One name per line. $1: the linux-perf version.
perf_closure() {
    local -A seen=()
    local queue next p
    queue=$(apt-cache depends "linux-perf=$1" | sed -n 's/^ *\(Pre\)\?Depends: //p' | grep -v '^<')
    while [ -n "${queue// /}" ]; do
        next=""
        for p in $queue; do
            case "$p" in
                lib*-dev | lib*-stdlib | lib*-data | libperl*-modules*) continue ;;
                lib* | zlib1g) ;;
                *) continue ;;
            esac
            [ -z "${seen[$p]:-}" ] || continue
            seen[$p]=1
            next="$next $(apt-cache depends "$p" 2>/dev/null | sed -n 's/^ *\(Pre\)\?Depends: //p' | grep -v '^<' || true)"
        done
        queue=$next
    done
    printf '%s\n' "${!seen[@]}" | sort
}

# .cache/images/l1-perf.cpio: /opt/perf/bin/perf (Debian's linux-perf of the kernel's series),
# the libraries the loader resolves for it (/opt/perf/lib, with the loader) and /usr/bin/perf, a
# wrapper running it through that loader (L1's base image has no dynamic loader of its own).
build_perf() {
    local out=$IMAGES/l1-perf.cpio root=$WORK/l1-perf stage=$WORK/l1-perf-debs
    local kver series ver stamp deb pkg lib libpath n=0
    mkdir -p "$DEBS" "$IMAGES" "$WORK"
    kver=$(cat "$IMAGES/kernel-version")
    series=$(echo "$kver" | cut -d. -f1,2)
    ver=$(apt-cache madison linux-perf 2>/dev/null | awk '{ print $3 }' | grep "^$series\." | sort -V | tail -n1 || true)
    if [ -z "$ver" ]; then
        deb=$(ls "$DEBS"/linux-perf_"$series".*.deb 2>/dev/null | sort -V | tail -n1 || true)
        [ -n "$deb" ] || die "no linux-perf $series.* known to apt (bookworm-backports: make deps)"
        ver=$(dpkg-deb -f "$deb" Version)
    fi
    stamp=$({ echo "$ver"; sed -n '/^# ---- perf for L1/,/^# ---- DPDK for L2/p' "$0"; } | sha256sum | cut -c1-16)
    if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
        log "l1-perf.cpio: up to date (linux-perf $ver for kernel $kver)"
        return 0
    fi
    log "building l1-perf.cpio (linux-perf $ver for kernel $kver)"
    rm -rf "$root" "$stage"
    mkdir -p "$stage" "$root/opt/perf/bin" "$root/opt/perf/lib" "$root/usr/bin"
    deb=$DEBS/linux-perf_${ver//:/%3a}_amd64.deb
    if [ ! -f "$deb" ]; then
        log "downloading linux-perf $ver"
        (cd "$DEBS" && apt-get download -q "linux-perf=$ver" 2>&1 | grep -v "unsandboxed" >&2) ||
            die "apt-get download linux-perf=$ver failed"
    fi
    dpkg-deb -x "$deb" "$stage"
    for pkg in $(perf_closure "$ver"); do
        dpkg-deb -x "$(fetch_deb "$pkg")" "$stage"
        n=$((n + 1))
    done
    log "  linux-perf and $n library packages unpacked"
    [ -x "$stage/usr/bin/perf" ] || die "no usr/bin/perf in linux-perf $ver"
    [ -e "$stage/lib64/ld-linux-x86-64.so.2" ] || die "no dynamic loader in libc6"
    cp "$stage/usr/bin/perf" "$root/opt/perf/bin/perf"
    cp -L "$stage/lib64/ld-linux-x86-64.so.2" "$root/opt/perf/lib/"
    # Exactly the libraries the staged loader resolves for perf, from the staged tree only.
    libpath=$stage/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu
    for lib in $("$stage/lib64/ld-linux-x86-64.so.2" --library-path "$libpath" --list "$stage/usr/bin/perf" |
        awk '/=>/ { print $3 }'); do
        case "$lib" in
            "$stage"/*) cp -L "$lib" "$root/opt/perf/lib/" ;;
            *) die "perf needs $lib, which is not in the staged packages" ;;
        esac
    done
    cat >"$root/usr/bin/perf" <<'WRAP'
#!/bin/sh
# Debian's linux-perf through its own loader and libraries (guest-images/build.sh perf).
exec /opt/perf/lib/ld-linux-x86-64.so.2 --library-path /opt/perf/lib /opt/perf/bin/perf "$@"
WRAP
    chmod 755 "$root/usr/bin/perf"
    echo "$ver" >"$root/opt/perf/version"
    make_cpio "$root" "$out"
    pad512 "$out"
    echo "$stamp" >"$out.stamp"
    rm -rf "$stage"
    log "l1-perf.cpio: $(du -h "$out" | cut -f1) ($(ls "$root/opt/perf/lib" | wc -l) files in /opt/perf/lib)"
}

# ---- DPDK for L2 -----------------------------------------------------------------------------

# Packages skipped while following Depends from dpdk-dev: headers, interpreters, maintainer-script
# helpers and daemons; testpmd and its plugins only need shared libraries.
dpdk_skip() {
    case "$1" in
        dpdk-dev) return 1 ;;
        libdpdk-dev | python3* | perl* | *-dev | debconf* | dpkg | adduser | passwd | \
            init-system-helpers | lsb-base | sensible-utils | tzdata | readline-common | \
            libc-bin | mawk | sysvinit-utils | ucf | install-info | udev | rdma-core)
            return 0 ;;
    esac
    return 1
}

# dpdk-dev and, recursively, the Depends/Pre-Depends of everything it needs at run time, plus
# librte-net-virtio23 (the virtio PMD: only a Recommends of dpdk) and libgcc-s1 (glibc loads it
# at exit). One package name per line.
dpdk_closure() {
    local -A seen=()
    local queue next p
    queue="dpdk-dev $(apt-cache depends dpdk-dev | sed -n 's/^ *Depends: //p' | grep -v '^<') librte-net-virtio23 libgcc-s1"
    while [ -n "${queue// /}" ]; do
        next=""
        for p in $queue; do
            dpdk_skip "$p" && continue
            [ -z "${seen[$p]:-}" ] || continue
            seen[$p]=1
            next="$next $(apt-cache depends "$p" 2>/dev/null | sed -n 's/^ *\(Pre\)\?Depends: //p' | grep -v '^<' || true)"
        done
        queue=$next
    done
    printf '%s\n' "${!seen[@]}" | sort
}

# .cache/images/l2-dpdk.tar.gz: dpdk-testpmd, its shared libraries, the dynamic loader and the
# PMD plugin directory (/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0), to unpack at / in L2 (busybox
# tar keeps the symbolic links DPDK's plugin loader relies on).
build_dpdk() {
    local out=$IMAGES/l2-dpdk.tar.gz root=$WORK/l2-dpdk stage=$WORK/l2-dpdk-debs ver stamp pkg deb n=0
    mkdir -p "$DEBS" "$IMAGES" "$WORK"
    ver=$(apt-cache policy dpdk-dev 2>/dev/null | sed -n 's/^ *Candidate: //p')
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
        ver=$(ls "$DEBS"/dpdk-dev_*.deb 2>/dev/null | sort -V | tail -n1 | sed 's|.*/||' || true)
    fi
    [ -n "$ver" ] || die "dpdk-dev is not known to apt (Debian bookworm main)"
    stamp=$({ echo "$ver"; sed -n '/^# ---- DPDK for L2/,/^# ---- main/p' "$0"; } | sha256sum | cut -c1-16)
    if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
        log "l2-dpdk.tar.gz: up to date (dpdk-dev $ver)"
        return 0
    fi
    log "building l2-dpdk.tar.gz (dpdk-dev $ver): resolving dependencies"
    rm -rf "$root" "$stage"
    mkdir -p "$stage" "$root"
    for pkg in $(dpdk_closure); do
        deb=$(fetch_deb "$pkg")
        dpkg-deb -x "$deb" "$stage"
        n=$((n + 1))
    done
    log "  $n packages unpacked"
    [ -x "$stage/usr/bin/dpdk-testpmd" ] || die "dpdk-testpmd not found in dpdk-dev"
    mkdir -p "$root/usr/bin"
    cp -a "$stage/usr/bin/dpdk-testpmd" "$root/usr/bin/"
    # Shared libraries (and their links) from the library directories only: no docs, headers.
    local d
    for d in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64; do
        [ -d "$stage/$d" ] || continue
        mkdir -p "$root/$d"
        (cd "$stage/$d" && find . \( -type f -o -type l \) \( -name '*.so*' -o -path './dpdk/*' \
            -o -path './libibverbs/*' \) ! -path './*/pkgconfig/*' -print0 |
            tar --null -T - -cf -) | tar -C "$root/$d" -xf -
    done
    [ -d "$root/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0" ] || die "no pmds-23.0 plugin directory"
    [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || die "no dynamic loader in libc6"
    mkdir -p "$root/etc/libibverbs.d"
    [ -d "$stage/etc/libibverbs.d" ] && cp -a "$stage/etc/libibverbs.d/." "$root/etc/libibverbs.d/"
    tar -C "$root" -czf "$out.tmp" .
    mv "$out.tmp" "$out"
    echo "$stamp" >"$out.stamp"
    rm -rf "$stage"
    log "l2-dpdk.tar.gz: $(du -h "$out" | cut -f1) ($n packages)"
}

# ---- main ------------------------------------------------------------------------------------

build_images() {
    local t0 kpkg kdeb bbdeb kver stamp
    t0=$(date +%s)
    mkdir -p "$DEBS" "$IMAGES" "$WORK"
    kpkg=$(kernel_pkg)
    kdeb=$(fetch_deb "$kpkg")
    bbdeb=$(fetch_deb busybox-static)
    stamp=$({
        basename "$kdeb"
        basename "$bbdeb"
        cat "$0" "$HERE/l1/init" "$HERE/l2/init" "$HERE/l2/demo.sh"
    } | sha256sum | cut -c1-16)
    if [ "$(cat "$IMAGES/stamp" 2>/dev/null)" = "$stamp" ] &&
        [ -f "$IMAGES/vmlinuz" ] && [ -f "$IMAGES/l2.cpio.gz" ] &&
        [ -f "$IMAGES/l1.cpio.gz" ] && [ -f "$IMAGES/l1-l2.cpio" ]; then
        log "up to date ($(cat "$IMAGES/kernel-version"), $(basename "$bbdeb"))"
        return 0
    fi
    log "building images from $(basename "$kdeb") and $(basename "$bbdeb")"

    log "unpacking packages"
    rm -rf "$WORK/kernel" "$WORK/busybox"
    dpkg-deb -x "$kdeb" "$WORK/kernel"
    dpkg-deb -x "$bbdeb" "$WORK/busybox"
    BUSYBOX=$WORK/busybox/bin/busybox
    [ -x "$BUSYBOX" ] || die "busybox not found in $bbdeb"
    kver=$(ls "$WORK/kernel/lib/modules" | head -n1)
    MODDIR=$WORK/kernel/lib/modules/$kver
    cp "$WORK/kernel/boot/vmlinuz-$kver" "$IMAGES/vmlinuz.tmp"
    mv "$IMAGES/vmlinuz.tmp" "$IMAGES/vmlinuz"
    echo "$kver" >"$IMAGES/kernel-version"
    log "kernel $kver -> .cache/images/vmlinuz"
    index_modules

    # L2: virtio_iommu strictly before any virtio driver (VIRTIO_PCI is built in and probes
    # devices as soon as their driver registers).
    log "building l2.cpio.gz"
    MOD_DONE=()
    MOD_ORDER=()
    add_module virtio_iommu
    add_module virtio_blk
    add_module virtio_net optional
    add_module vfio
    add_module vfio_iommu_type1
    add_module vfio_pci
    # DPDK's baseline without an IOMMU (the kernel has no VFIO no-IOMMU mode).
    add_module uio_pci_generic optional
    make_skeleton "$WORK/l2root"
    install_modules "$WORK/l2root" vfio_iommu_type1=allow_unsafe_interrupts=1
    install -m 755 "$HERE/l2/init" "$WORK/l2root/init"
    install -m 755 "$HERE/l2/demo.sh" "$WORK/l2root/etc/rig/demo.sh"
    log "  L2 modules: ${MOD_ORDER[*]}"
    make_cpio "$WORK/l2root" "$WORK/l2.cpio"
    gzip -9n <"$WORK/l2.cpio" >"$IMAGES/l2.cpio.gz.tmp"
    pad512 "$IMAGES/l2.cpio.gz.tmp"
    mv "$IMAGES/l2.cpio.gz.tmp" "$IMAGES/l2.cpio.gz"

    log "building l1.cpio.gz"
    MOD_DONE=()
    MOD_ORDER=()
    add_module virtio_iommu
    add_module irqbypass
    add_module kvm
    add_module kvm_amd
    add_module virtio_blk
    add_module vfio
    add_module vfio_iommu_type1
    add_module vfio_pci
    make_skeleton "$WORK/l1root"
    install_modules "$WORK/l1root" vfio_iommu_type1=allow_unsafe_interrupts=1
    install -m 755 "$HERE/l1/init" "$WORK/l1root/init"
    mkdir -p "$WORK/l1root/rig/scenarios" "$WORK/l1root/l2"
    log "  L1 modules: ${MOD_ORDER[*]}"
    make_cpio "$WORK/l1root" "$WORK/l1.cpio"
    gzip -6n <"$WORK/l1.cpio" >"$IMAGES/l1.cpio.gz.tmp"
    pad512 "$IMAGES/l1.cpio.gz.tmp"
    mv "$IMAGES/l1.cpio.gz.tmp" "$IMAGES/l1.cpio.gz"

    log "building l1-l2.cpio (/l2/vmlinuz, /l2/initrd for L1)"
    rm -rf "$WORK/l1-l2"
    mkdir -p "$WORK/l1-l2/l2"
    cp "$IMAGES/vmlinuz" "$WORK/l1-l2/l2/vmlinuz"
    cp "$IMAGES/l2.cpio.gz" "$WORK/l1-l2/l2/initrd"
    make_cpio "$WORK/l1-l2" "$IMAGES/l1-l2.cpio.tmp"
    pad512 "$IMAGES/l1-l2.cpio.tmp"
    mv "$IMAGES/l1-l2.cpio.tmp" "$IMAGES/l1-l2.cpio"

    cp "$BUSYBOX" "$IMAGES/busybox"
    rm -f "$WORK/l1.cpio" "$WORK/l2.cpio"
    echo "$stamp" >"$IMAGES/stamp"
    log "done in $(($(date +%s) - t0)) s: vmlinuz $(du -h "$IMAGES/vmlinuz" | cut -f1)," \
        "l2.cpio.gz $(du -h "$IMAGES/l2.cpio.gz" | cut -f1), l1.cpio.gz $(du -h "$IMAGES/l1.cpio.gz" | cut -f1)"
}

for tool in apt-get apt-cache dpkg-deb xz gzip flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian host expected; make deps)"
done

# One build at a time (several test runs may start together); the DPDK tree has a lock of its
# own, so its long first build does not hold up the other images.
mkdir -p "$CACHE"
if [ "${1:-images}" = dpdk ]; then
    exec 9>"$CACHE/.guest-image-dpdk.lock"
else
    exec 9>"$CACHE/.guest-image.lock"
fi
if ! flock -n 9; then
    log "waiting for another build to finish"
    flock 9
fi

case "${1:-images}" in
    images) build_images ;;
    qemu)
        mkdir -p "$IMAGES" "$WORK"
        BUSYBOX=$IMAGES/busybox
        [ -x "$BUSYBOX" ] || build_images
        build_qemu_cpio
        ;;
    dpdk) build_dpdk ;;
    perf)
        build_images
        BUSYBOX=$IMAGES/busybox
        build_perf
        ;;
    all)
        build_images
        BUSYBOX=$IMAGES/busybox
        build_qemu_cpio
        ;;
    *) echo "usage: $0 [images|qemu|dpdk|perf|all]" >&2; exit 2 ;;
esac
