#!/bin/bash
# Builds the Debian packages with dpkg-deb alone (no cargo-deb, nothing to
# download): `make install DESTDIR=<stage> PREFIX=/usr`, split in two, with
# generated DEBIAN/control files.
#
#   strata          /usr/bin/strata, the man pages, the bash/zsh/fish completions
#                   Depends: what the binary links (libc6, libgcc-s1)
#   strata-libvirt  /usr/bin/strata-libvirt (the snapshot, blockcommit, blockpull
#                   and demo commands, which strata runs through it)
#                   Depends: strata (= VERSION), what it links (libvirt0, ...)
#
# Output: $DEB_OUT (default target/debian)/strata_VERSION_ARCH.deb and
# strata-libvirt_VERSION_ARCH.deb (DEB_COMPRESS: xz by default, or gzip, zstd).
# Run through `make deb`; the make variables given to that (NO_BUILD=1,
# BINARIES=...) reach the `make install` below.
#
# Depends come from dpkg-shlibdeps (dpkg-dev) when it is installed, versioned
# as Debian's shlibs files say; otherwise (or with DEB_NO_SHLIBDEPS=1) from
# the libraries the binary names (readelf -d, or all that ldd lists) and
# dpkg -S, unversioned.
set -euo pipefail
cd "$(dirname "$0")/../.."

die() {
    echo "deb: $*" >&2
    exit 1
}
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (this builds Debian packages on Debian)"

target_dir=${CARGO_TARGET_DIR:-target}
out=${DEB_OUT:-$target_dir/debian}
pkgid=$(${CARGO:-cargo} pkgid --offline -p strata-cli)
# Cargo's 1.2.3-rc.1 sorts before 1.2.3 in Debian as 1.2.3~rc.1.
version=${pkgid##*[#@]}
version=${version//-/\~}
arch=$(dpkg --print-architecture)
maintainer="Strata developers <strata@example.invalid>"

stage=$(mktemp -d "${TMPDIR:-/tmp}/strata-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT

${MAKE:-make} --no-print-directory install DESTDIR="$stage/all" PREFIX=/usr GEN_DIR="$stage/gen" >&2

# shlibs-based dependencies of one binary, as a Depends list.
shlib_depends() {
    local bin=$1
    if [ "${DEB_NO_SHLIBDEPS:-0}" != 1 ] && command -v dpkg-shlibdeps >/dev/null; then
        # dpkg-shlibdeps wants to run in a source tree.
        mkdir -p "$stage/src/debian"
        printf 'Source: strata\n\nPackage: strata\nArchitecture: any\n' >"$stage/src/debian/control"
        # (It warns that the binary is not under debian/PACKAGE/: harmless.)
        (cd "$stage/src" && dpkg-shlibdeps -O "$bin" 2> >(grep -v 'should already be installed' >&2)) |
            sed -n 's/^shlibs:Depends=//p'
        return
    fi
    # The libraries the binary names itself (readelf, when binutils is
    # there); ldd alone also lists their dependencies.
    local lib pkgs=() needed=""
    if command -v readelf >/dev/null; then
        needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
    fi
    for lib in $(ldd "$bin" | awk -v needed="$needed" '
        BEGIN { n = split(needed, want, "\n"); for (i = 1; i <= n; i++) keep[want[i]] = 1 }
        $2 == "=>" && $3 ~ /^\// && (n == 0 || ($1 in keep)) { print $3 }'); do
        pkg=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(realpath "$lib")" 2>/dev/null) ||
            die "$bin links $lib, which no installed package owns"
        pkgs+=("${pkg%%:*}")
    done
    printf '%s\n' "${pkgs[@]}" | sort -u | paste -sd, | sed 's/,/, /g'
}

# package NAME DEPENDS SUMMARY DESCRIPTION FILE... (FILE relative to the stage)
package() {
    local name=$1 depends=$2 summary=$3 description=$4
    shift 4
    local root="$stage/$name" f
    for f in "$@"; do
        install -D -m "$(stat -c %a "$stage/all/$f")" "$stage/all/$f" "$root/$f"
    done
    # Debian ships binaries stripped of debug information, man pages
    # compressed, and a copyright file per package.
    if command -v strip >/dev/null; then
        find "$root/usr/bin" -type f -exec strip --strip-debug {} +
    fi
    find "$root/usr/share/man" -name '*.1' -exec gzip -9n {} + 2>/dev/null || true
    install -d "$root/usr/share/doc/$name"
    cat >"$root/usr/share/doc/$name/copyright" <<EOF
Strata, a pure-Rust qcow2 overlay engine.

Copyright: the Strata developers
License: MIT or Apache-2.0, at your option.
EOF
    install -d "$root/DEBIAN"
    (cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    local size
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Description: $summary
$description
EOF
    mkdir -p "$out"
    local deb="$out/${name}_${version}_${arch}.deb"
    dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$root" "$deb" >/dev/null
    echo "$deb"
}

all=$stage/all
man_pages=$(cd "$all" && find usr/share/man/man1 -name 'strata*.1' ! -name strata-libvirt.1 | sort)
# (Assignments, so that a failure stops the script.)
strata_depends=$(shlib_depends "$all/usr/bin/strata")
helper_depends=$(shlib_depends "$all/usr/bin/strata-libvirt")
# shellcheck disable=SC2086 # one path a word
package strata "$strata_depends" \
    "qcow2 backing-chain engine (qemu-img spelling)" \
    " Offline image surgery on qcow2 chains: info, map, check, compare, convert,
 create, commit, pull, rebase and qemu-io style I/O, tested against qemu-img.
 The libvirt snapshot commands need the strata-libvirt package." \
    usr/bin/strata $man_pages \
    usr/share/bash-completion/completions/strata \
    usr/share/zsh/vendor-completions/_strata \
    usr/share/fish/vendor_completions.d/strata.fish
package strata-libvirt "strata (= $version), $helper_depends" \
    "strata's libvirt commands: offline external snapshots" \
    " strata snapshot create/list/revert/delete, blockcommit and blockpull for
 shut-off libvirt domains, without starting QEMU. strata runs them through
 strata-libvirt, which links libvirt's C library." \
    usr/bin/strata-libvirt usr/share/man/man1/strata-libvirt.1
