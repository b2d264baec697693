#!/bin/bash
# Check for, and if missing install, the system packages Strata's tests need.
#
#   scripts/install-deps.sh             qemu-utils >= 10 (qemu-img, qemu-io, qemu-nbd),
#                                         xfsprogs and btrfs-progs (mkfs.xfs, mkfs.btrfs: the
#                                         reflink tests and benches/compare-qemu-fs.sh make
#                                         loop-mounted XFS and btrfs filesystems)
#   scripts/install-deps.sh --libvirt   + libvirt daemon/clients/dev, pkg-config and a
#                                         qemu-system-x86 >= 10 from bookworm-backports
#   scripts/install-deps.sh --fuzz      + cargo-fuzz (cargo install --locked)
#
# Idempotent: when everything is present it only runs a few dpkg-query / --version
# checks and exits (well under 2 s). It never reads stdin.
#
# Why bookworm-backports: Debian 12 ships QEMU 7.2. Our oracle is QEMU 10, which
# comes from bookworm-backports. Installing bookworm's own qemu-system-x86 (7.2)
# would REMOVE qemu-utils 10, so every qemu-* package is taken from backports.
# The backports suite is added with the same mirror URI that the machine's
# existing Debian apt sources already use (read at run time from /etc/apt).
set -euo pipefail

WANT_LIBVIRT=0
WANT_FUZZ=0
for arg in "$@"; do
    case "$arg" in
        --libvirt) WANT_LIBVIRT=1 ;;
        --fuzz) WANT_FUZZ=1 ;;
        -h | --help)
            sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install-deps.sh: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

export DEBIAN_FRONTEND=noninteractive
QEMU_MIN_MAJOR=10
BACKPORTS=bookworm-backports
BACKPORTS_LIST=/etc/apt/sources.list.d/strata-bookworm-backports.sources

log() { echo "install-deps: $*" >&2; }
die() {
    echo "install-deps: ERROR: $*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); fi
fi

# --- cheap checks -----------------------------------------------------------

# Major version of an installed qemu tool, or 0 if absent/unparsable.
qemu_major() {
    local out
    out=$("$1" --version 2>/dev/null </dev/null | head -n1) || {
        echo 0
        return
    }
    # "qemu-img version 10.0.2 (...)", but "qemu-nbd 10.0.2 (...)"
    if [[ "$out" =~ \ ([0-9]+)\.[0-9]+\.[0-9]+ ]]; then echo "${BASH_REMATCH[1]}"; else echo 0; fi
}

qemu_utils_ok() {
    local t
    for t in qemu-img qemu-io qemu-nbd; do
        command -v "$t" >/dev/null 2>&1 || return 1
        [ "$(qemu_major "$t")" -ge "$QEMU_MIN_MAJOR" ] || return 1
    done
}

# Installed version of a Debian package, empty if not installed.
deb_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "ii" { print $2 }' || true
}

# Upstream major version from a Debian version like 1:10.0.2+ds-2~bpo12+1.
deb_major() {
    local v=${1#*:}
    echo "${v%%.*}"
}

LIBVIRT_PKGS=(libvirt-dev libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu pkg-config)
QEMU_SYSTEM_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

libvirt_ok() {
    local p v
    for p in "${LIBVIRT_PKGS[@]}"; do
        [ -n "$(deb_version "$p")" ] || return 1
    done
    v=$(deb_version qemu-system-x86)
    [ -n "$v" ] || return 1
    [ "$(deb_major "$v")" -ge "$QEMU_MIN_MAJOR" ] || return 1
    command -v virsh >/dev/null 2>&1 && [ -x /usr/sbin/libvirtd ]
}

FS_PKGS=(xfsprogs btrfs-progs)

# By package: mkfs.* live in /usr/sbin, often not on a user's PATH.
fs_tools_ok() {
    local p
    for p in "${FS_PKGS[@]}"; do
        [ -n "$(deb_version "$p")" ] || return 1
    done
}

fuzz_ok() {
    cargo fuzz --version >/dev/null 2>&1 </dev/null
}

# --- apt helpers -------------------------------------------------------------

APT_UPDATED=0
apt_get() {
    "${SUDO[@]}" apt-get -y -q -o DPkg::Lock::Timeout=300 "$@" </dev/null
}
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        apt_get update >/dev/null
        APT_UPDATED=1
    fi
}

# All "URI<TAB>suite<TAB>signed-by" triples of enabled deb sources, from both the
# one-line format (*.list, sources.list) and deb822 (*.sources).
apt_source_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [opt=val ...] URI suite component...
        awk '
            /^[ \t]*#/ || NF < 3 || $1 != "deb" { next }
            {
                i = 2; sb = ""
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /^\[?signed-by=/) { sb = $i; sub(/^\[?signed-by=/, "", sb); sub(/\]$/, "", sb) }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if (i + 1 <= NF) print $i "\t" $(i + 1) "\t" sb
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        [ "$f" = "$BACKPORTS_LIST" ] && continue
        # deb822: stanzas separated by blank lines; fields may list several values.
        awk '
            function flush(   n, m, i, j, u, s) {
                if (types ~ /(^| )deb( |$)/ && enabled != "no") {
                    n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (u[i] != "" && s[j] != "") print u[i] "\t" s[j] "\t" signed
                }
                types = ""; uris = ""; suites = ""; signed = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                line = $0
                key = tolower(line); sub(/:.*/, "", key)
                val = line; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "signed-by") signed = val
                else if (key == "enabled") enabled = tolower(val)
            }
            END { flush() }' "$f"
    done
}

backports_configured() {
    apt_source_entries | awk -F'\t' -v s="$BACKPORTS" '$2 == s { found = 1 } END { exit !found }'
}

# Add bookworm-backports using the mirror that serves the plain "bookworm" suite.
ensure_backports_source() {
    if backports_configured || [ -f "$BACKPORTS_LIST" ]; then
        return 0
    fi
    local entry uri signed
    # Prefer the plain release suite; fall back to -updates or "stable" (same archive).
    entry=$(apt_source_entries | awk -F'\t' '
        $2 == "bookworm" && !a { a = $0 }
        $2 == "bookworm-updates" && !b { b = $0 }
        $2 == "stable" && !c { c = $0 }
        END { if (a) print a; else if (b) print b; else if (c) print c }')
    [ -n "$entry" ] || die "no enabled apt source for suite 'bookworm' found under /etc/apt; cannot derive a mirror for $BACKPORTS"
    uri=$(printf '%s' "$entry" | cut -f1)
    signed=$(printf '%s' "$entry" | cut -f3)
    log "adding $BACKPORTS from the existing Debian mirror ($BACKPORTS_LIST)"
    {
        echo "# Added by Strata's scripts/install-deps.sh: same mirror as the bookworm suite."
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: $BACKPORTS"
        echo "Components: main"
        if [ -n "$signed" ]; then echo "Signed-By: $signed"; fi
    } | "${SUDO[@]}" tee "$BACKPORTS_LIST" >/dev/null
    APT_UPDATED=0
}

# True if the package has a version in bookworm-backports. (Output is captured
# first: `apt-cache ... | grep -q` can die of SIGPIPE, which pipefail reports.)
in_backports() {
    local out
    out=$(apt-cache madison "$1" 2>/dev/null || true)
    [[ "$out" == *" $BACKPORTS/"* ]]
}

# "pkg/bookworm-backports" if backports has the package, else "pkg".
backports_name() {
    if in_backports "$1"; then
        echo "$1/$BACKPORTS"
    else
        echo "$1"
    fi
}

install_qemu_utils() {
    ensure_backports_source
    apt_update
    local pkgs=()
    local p
    for p in qemu-utils qemu-block-extra; do
        if in_backports "$p"; then
            pkgs+=("$p/$BACKPORTS")
        fi
    done
    [ "${#pkgs[@]}" -gt 0 ] || die "qemu-utils not found in $BACKPORTS"
    log "installing ${pkgs[*]}"
    apt_get install --no-install-recommends "${pkgs[@]}" >/dev/null
}

install_libvirt() {
    ensure_backports_source
    apt_update
    local pkgs=("${LIBVIRT_PKGS[@]}")
    local p name
    for p in "${QEMU_SYSTEM_PKGS[@]}"; do
        name=$(backports_name "$p")
        if [ "$p" = qemu-system-x86 ] && [ "$name" = "$p" ]; then
            die "qemu-system-x86 is not available from $BACKPORTS; refusing to install bookworm's QEMU 7.2 (it would remove qemu-utils 10)"
        fi
        pkgs+=("$name")
    done
    # Keep qemu-utils on its backports version while the resolver works.
    if in_backports qemu-utils; then
        pkgs+=("qemu-utils/$BACKPORTS")
    fi
    log "installing ${pkgs[*]}"
    # --no-install-recommends: libvirt recommends the 'qemu-system' metapackage,
    # which from bookworm would drag in QEMU 7.2.
    apt_get install --no-install-recommends "${pkgs[@]}" >/dev/null
}

# --- main --------------------------------------------------------------------

if ! qemu_utils_ok; then
    log "qemu-utils >= $QEMU_MIN_MAJOR missing"
    install_qemu_utils
    qemu_utils_ok || die "qemu-img/qemu-io/qemu-nbd >= $QEMU_MIN_MAJOR still not available after install"
fi

if ! fs_tools_ok; then
    log "mkfs.xfs / mkfs.btrfs missing"
    apt_update
    log "installing ${FS_PKGS[*]}"
    apt_get install --no-install-recommends "${FS_PKGS[@]}" >/dev/null
    fs_tools_ok || die "mkfs.xfs / mkfs.btrfs still not available after install"
fi

if [ "$WANT_LIBVIRT" -eq 1 ] && ! libvirt_ok; then
    log "libvirt / qemu-system-x86 >= $QEMU_MIN_MAJOR missing"
    install_libvirt
    libvirt_ok || die "libvirt packages still missing after install"
    qemu_utils_ok || die "installing libvirt changed qemu-utils below $QEMU_MIN_MAJOR"
fi

if [ "$WANT_FUZZ" -eq 1 ] && ! fuzz_ok; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found; cannot install cargo-fuzz"
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked </dev/null
fi

msg="qemu $(qemu-img --version | head -n1 | awk '{print $3}')"
if [ "$WANT_LIBVIRT" -eq 1 ]; then
    msg="$msg, qemu-system-x86 $(deb_version qemu-system-x86), libvirt $(deb_version libvirt-daemon)"
fi
log "ok ($msg)"
