#!/bin/bash
# A tiny Linux guest for the booted-guest tests: Debian's cloud kernel and an
# initramfs of busybox-static whose /init prints the sha256 of every virtio
# disk on the serial console and powers off.
#
#   scripts/guest/build-guest.sh BASE
#
# Prints the directory of the guest, BASE/strata-guest-KEY, holding
#   vmlinuz      the kernel of linux-image-cloud-amd64's versioned package
#   initrd.img   cpio newc, gzip: busybox, /init, the virtio modules it loads
#   versions     the package versions it was made from
# KEY hashes this script and the package versions apt would download, so a new
# kernel or busybox (or a change here) makes a new guest and removes the old.
# Built under a lock (flock on BASE/strata-guest.lock) into a temporary name,
# then renamed, as testdata/shared-chains.sh does: built once per machine, a
# process killed mid-build leaves only a temporary directory that the next
# call removes.
#
# Network: only Debian's package mirrors, through `apt-get download` (and
# `apt-get update` when apt's lists do not know a package yet). Needs no root
# except for that update. Needs: apt, dpkg-deb, gzip.
#
# The guest's /init is scripts/guest/init (kernel command line: console=ttyS0
# strata.disks=N); on the serial console it prints
#   STRATA-GUEST up                     once /init runs
#   STRATA-SHA256 vda <sha256 of /dev/vda>   for each virtio disk, in name order
#   STRATA-DONE <number of disks>
#   STRATA-ERROR <why>                  instead, when something is missing
# then `poweroff -f` (the domain needs <features><acpi/></features>).
set -euo pipefail

if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    echo "usage: $0 BASE" >&2
    exit 2
fi
die() {
    echo "build-guest.sh: ERROR: $*" >&2
    exit 1
}
for tool in apt-get apt-cache dpkg-deb gzip flock sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (this script needs a Debian-like system)"
done
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$1"
base=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"

META=linux-image-cloud-amd64
BUSYBOX=busybox-static
# virtio_blk and the PCI transport; their dependencies come from the modules.
MODULES=(virtio_pci virtio_blk)

# "PACKAGE VERSION" of each package's candidate (one apt-cache run: each
# costs about half a second).
candidates() {
    apt-cache policy "$@" 2>/dev/null | awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } $1 == "Candidate:" { print p, $2 }'
}
# The versioned kernel package the metapackage's candidate depends on.
kernel_package() {
    apt-cache depends "$META" 2>/dev/null |
        awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-/ { print $2; exit }'
}
resolve() {
    local c
    kpkg=$(kernel_package || true)
    c=$(candidates "$BUSYBOX" ${kpkg:+"$kpkg"} || true)
    bver=$(echo "$c" | awk -v p="$BUSYBOX" '$1 == p { print $2 }')
    kver=""
    if [ -n "$kpkg" ]; then kver=$(echo "$c" | awk -v p="$kpkg" '$1 == p { print $2 }'); fi
    [ -n "$kpkg" ] && [ -n "$kver" ] && [ "$kver" != "(none)" ] &&
        [ -n "$bver" ] && [ "$bver" != "(none)" ]
}
if ! resolve; then
    echo "build-guest.sh: apt does not know $META/$BUSYBOX yet: apt-get update" >&2
    apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null </dev/null ||
        die "apt-get update failed (it needs root and Debian's mirrors)"
    resolve || die "no installable $META (kernel: '${kpkg:-?}' '${kver:-?}') or $BUSYBOX ('${bver:-?}') in apt's sources"
fi
versions=$(printf '%s %s\n%s %s\n' "$kpkg" "$kver" "$BUSYBOX" "$bver")
key=$({ cat "$self" "$here/init"; echo "$versions"; } | sha256sum | cut -c1-16)
dir="$base/strata-guest-$key"

exec 9>"$base/strata-guest.lock"
flock 9
if [ -f "$dir/.complete" ]; then
    echo "$dir"
    exit 0
fi
# Under the lock nothing else builds: every other guest, finished or not, is stale.
for old in "$base"/strata-guest-*; do
    [ -d "$old" ] && rm -rf "$old"
done
tmp="$dir.building"
mkdir -p "$tmp/debs" "$tmp/x" "$tmp/root"
trap 'rm -rf "$tmp"' EXIT

if ! (
    cd "$tmp/debs"
    # As root, apt's download sandbox user cannot write here: no need for it.
    apt-get -q -o APT::Sandbox::User=root download "$kpkg=$kver" "$BUSYBOX=$bver" >/dev/null </dev/null
); then
    # apt's lists may be stale (the mirror has newer versions): update once
    # and start again, versions and key included.
    if [ -z "${STRATA_GUEST_RETRIED:-}" ]; then
        echo "build-guest.sh: apt-get download failed; apt-get update and retry" >&2
        rm -rf "$tmp"
        trap - EXIT
        exec 9>&-
        apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null </dev/null ||
            die "apt-get update failed (it needs root and Debian's mirrors)"
        STRATA_GUEST_RETRIED=1 exec bash "$self" "$base"
    fi
    die "apt-get download $kpkg=$kver $BUSYBOX=$bver failed"
fi
for deb in "$tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$tmp/x"
done

kernel=$(find "$tmp/x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -1)
config=$(find "$tmp/x/boot" -maxdepth 1 -name 'config-*' | head -1)
if [ -z "$kernel" ] || [ -z "$config" ]; then
    die "$kpkg has no /boot/vmlinuz-* or /boot/config-*"
fi
uname_r=${kernel##*/vmlinuz-}
moddir="$tmp/x/lib/modules/$uname_r"
bb="$tmp/x/bin/busybox"
[ -x "$bb" ] || die "$BUSYBOX has no /bin/busybox"
for opt in CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP CONFIG_DEVTMPFS CONFIG_SERIAL_8250_CONSOLE; do
    grep -q "^$opt=y" "$config" || die "$kpkg: $opt is not built in"
done

root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp "$bb" "$root/bin/busybox"
for applet in sh mount insmod sleep sha256sum cut cat ls poweroff echo sed seq; do
    ln -s busybox "$root/bin/$applet"
done

# Modules: none when virtio_blk and virtio_pci are built in (=y); otherwise
# each with its dependencies first (the `depends=` of its .modinfo, which is
# what depmod writes into modules.dep), decompressed if the package has them
# compressed (busybox's insmod wants a plain .ko).
module_file() {
    find "$moddir/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" \) | head -1
}
: >"$root/lib/modules/load"
declare -A seen=()
add_module() {
    local name=$1 f deps d
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    # Built in? (modules.builtin lists kernel/.../name.ko)
    if grep -q "/$name\.ko$" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
    f=$(module_file "$name")
    [ -n "$f" ] || die "$kpkg: module $name is neither built in nor in $moddir"
    case "$f" in
        *.ko) cp "$f" "$root/lib/modules/$name.ko" ;;
        *.ko.xz) "$bb" unxz -c "$f" >"$root/lib/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$name.ko" || die "zstd needed for $f" ;;
    esac
    deps=$(tr '\0' '\n' <"$root/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
    for d in $deps; do
        add_module "${d//-/_}"
    done
    echo "$name" >>"$root/lib/modules/load"
}
for m in "${MODULES[@]}"; do
    if grep -q "^CONFIG_${m^^}=y" "$config"; then continue; fi
    add_module "$m"
done

cp "$here/init" "$root/init"
chmod 755 "$root/init"

(cd "$root" && find . | sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n >"$tmp/initrd.img"
cp "$kernel" "$tmp/vmlinuz"
{
    echo "$versions"
    echo "kernel $uname_r"
    echo "modules $(tr '\n' ' ' <"$root/lib/modules/load")"
} >"$tmp/versions"
rm -rf "$tmp/debs" "$tmp/x" "$tmp/root"
touch "$tmp/.complete"
mv -T "$tmp" "$dir"
trap - EXIT
echo "$dir"
