#!/usr/bin/env bash
# Host dependencies for building guest images and booting nested guests.
#
#   guest-images/deps.sh apt-source   # add bookworm-backports to apt (derived from debian.sources)
#   guest-images/deps.sh qemu         # QEMU >= 10 (qemu-system-x86 from bookworm-backports)
#   guest-images/deps.sh all          # both
#
# Idempotent: every step checks first and does nothing when already satisfied.
set -euo pipefail

log() { echo "deps: $*" >&2; }

BACKPORTS_FILE=/etc/apt/sources.list.d/bookworm-backports.sources
DEBIAN_SOURCES=/etc/apt/sources.list.d/debian.sources

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# True when some apt source already lists the bookworm-backports suite.
have_backports_source() {
    grep -rqsE '^(Suites:.*[[:space:]]|deb .*[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# Adds a deb822 stanza for bookworm-backports: the main Debian stanza (not the security one) of
# debian.sources with its Suites replaced. Runs `apt-get update` when it added the source.
ensure_backports_source() {
    if have_backports_source; then
        log "apt source bookworm-backports: present"
        return 0
    fi
    [ -r "$DEBIAN_SOURCES" ] || { log "cannot derive backports source: $DEBIAN_SOURCES missing"; exit 1; }
    local stanza
    stanza=$(awk 'BEGIN { RS = ""; ORS = "\n\n" }
        /Suites:[^\n]*bookworm([ \t\n]|$)/ && !/debian-security/ {
            n = split($0, lines, "\n"); out = ""
            for (i = 1; i <= n; i++) {
                if (lines[i] ~ /^Suites:/) lines[i] = "Suites: bookworm-backports"
                out = out lines[i] "\n"
            }
            printf "%s", out; exit
        }' "$DEBIAN_SOURCES")
    [ -n "$stanza" ] || { log "no bookworm stanza found in $DEBIAN_SOURCES"; exit 1; }
    log "adding apt source $BACKPORTS_FILE"
    printf '%s\n' "$stanza" | as_root tee "$BACKPORTS_FILE" >/dev/null
    log "apt-get update"
    as_root apt-get update -qq
}

qemu_major() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\..*/\1/p'
}

ensure_qemu() {
    local major
    major=$(qemu_major)
    if [ "${major:-0}" -ge 10 ]; then
        log "qemu-system-x86_64 $major.x: present"
        return 0
    fi
    ensure_backports_source
    log "installing qemu-system-x86 from bookworm-backports (found version '${major:-none}')"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-system-data >&2; then
        log "apt-get install failed; retrying after apt-get update"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -t bookworm-backports qemu-system-x86 qemu-system-data >&2
    fi
    major=$(qemu_major)
    [ "${major:-0}" -ge 10 ] || { log "qemu-system-x86_64 is still older than 10"; exit 1; }
}

case "${1:-all}" in
    apt-source) ensure_backports_source ;;
    qemu) ensure_qemu ;;
    all) ensure_backports_source; ensure_qemu ;;
    *) echo "usage: $0 [apt-source|qemu|all]" >&2; exit 2 ;;
esac
