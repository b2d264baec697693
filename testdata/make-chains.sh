#!/bin/bash
# Generate qcow2 backing-chain "shapes" for differential tests (Strata vs qemu-img).
#
#   testdata/make-chains.sh OUTDIR
#
# Uses only qemu-img and qemu-io (QEMU >= 10). Makes one directory per shape:
#
#   OUTDIR/<shape>/top          one line: path of the image to test, relative to
#                               the shape directory (usually "top.qcow2")
#   OUTDIR/<shape>/description  one line: what the shape exercises
#   OUTDIR/<shape>/*.qcow2 ...  the layers
#   OUTDIR/SHAPES               the shape names, one per line (also printed)
#
# Every layer writes its own byte patterns (0xaN in bases, 0xbN in overlays,
# 0x10+i in layer i of the deep chain) so reads through a chain show which layer
# answered. After generating, every qcow2 file is run through `qemu-img check`;
# all must be clean except the overlay of "dirty_lazy_refcounts", which is
# deliberately left with the dirty bit set (see testdata/README.md).
#
# Existing shape directories in OUTDIR are replaced. Takes a few seconds.
set -euo pipefail

if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || {
        echo "$0: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
exec </dev/null

KiB=1024
MiB=$((1024 * 1024))
SHAPES=()

# --- helpers -----------------------------------------------------------------

# shape NAME DESCRIPTION: start a fresh shape directory and cd into it.
shape() {
    SHAPE=$1
    rm -rf "${OUT:?}/$SHAPE"
    mkdir -p "$OUT/$SHAPE"
    cd "$OUT/$SHAPE"
    echo "$2" >description
    SHAPES+=("$SHAPE")
}

# top PATH: record the image to test (relative to the shape dir).
top() { echo "$1" >"$OUT/$SHAPE/top"; }

# create [qemu-img create args...]: quiet qcow2 create.
create() { qemu-img create -q -f qcow2 "$@"; }

# io FILE CMD...: run qemu-io commands on a qcow2 image (its chain is opened too).
io() { io_fmt qcow2 "$@"; }
io_fmt() {
    local fmt=$1 img=$2
    shift 2
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f "$fmt" "${args[@]}" "$img" >/dev/null
}

# base_writes FILE C S [FMT]: data for a base layer with cluster size C, virtual size S.
base_writes() {
    local img=$1 c=$2 s=$3 fmt=${4:-qcow2}
    io_fmt "$fmt" "$img" \
        "write -P 0xa1 0 $((4 * c))" \
        "write -P 0xa2 $((5 * c + c / 4)) $((c / 2))" \
        "write -P 0xa3 $((s - c)) $c" \
        "write -P 0xa4 $((s / 2)) $((s / 8))" \
        "write -P 0xa5 $((s / 4 + c)) $((3 * c))"
}

# overlay_writes FILE C S: data patterns, zero writes, discards and partial-cluster
# writes on top of base_writes' layout.
overlay_writes() {
    local img=$1 c=$2 s=$3
    io "$img" \
        "write -P 0xb1 $((c / 2)) $c" \
        "write -z $((2 * c)) $c" \
        "write -z $((3 * c + c / 4)) $((c / 4))" \
        "discard $((5 * c)) $c" \
        "write -P 0xb2 $((4 * c)) $c" \
        "write -P 0xb3 $((7 * c + 1)) $((c - 2))" \
        "write -P 0xb4 $((s / 2 + c / 3)) $c" \
        "write -P 0xb5 $((s - c / 2)) $((c / 2))" \
        "write -P 0xb6 $((s / 4)) $((2 * c))" \
        "discard $((s / 4)) $c" \
        "write -P 0xb7 $((s / 4 + 2 * c)) $((c / 8))"
}

# base_overlay NAME DESC C S CREATE_OPTS: the two-layer shape used for most formats.
base_overlay() {
    local name=$1 desc=$2 c=$3 s=$4 opts=$5
    shape "$name" "$desc"
    create -o "cluster_size=$c${opts:+,$opts}" base.qcow2 "$s"
    base_writes base.qcow2 "$c" "$s"
    create -o "cluster_size=$c${opts:+,$opts}" -b base.qcow2 -F qcow2 top.qcow2
    overlay_writes top.qcow2 "$c" "$s"
    top top.qcow2
}

# --- shapes ------------------------------------------------------------------

base_overlay cluster512 "base+overlay, 512 B clusters (many L2 tables), data/zero/discard/partial writes" 512 $MiB ""
base_overlay cluster4k "base+overlay, 4 KiB clusters, data/zero/discard/partial writes" $((4 * KiB)) $((2 * MiB)) ""
base_overlay cluster64k "base+overlay, 64 KiB clusters (default), data/zero/discard/partial writes" $((64 * KiB)) $((4 * MiB)) ""

# 2 MiB clusters get their own, sparser layout (4 clusters) so the files stay small.
shape cluster2m "base+overlay, 2 MiB clusters (8 MiB, 4 clusters), partial-cluster COW, zero cluster, discards"
create -o cluster_size=2M base.qcow2 8M
io base.qcow2 \
    "write -P 0xa1 0 1M" \
    "write -P 0xa2 $((2 * MiB + 512 * KiB)) 64k" \
    "write -P 0xa3 $((6 * MiB)) 2M"
create -o cluster_size=2M -b base.qcow2 -F qcow2 top.qcow2
io top.qcow2 \
    "write -P 0xb1 $((MiB - 4 * KiB)) 8k" \
    "write -z 2M 2M" \
    "discard 4M 2M" \
    "write -P 0xb2 $((6 * MiB + 1000)) 3000" \
    "discard $((6 * MiB)) 64k"
top top.qcow2

# Extended L2 entries: 64 KiB clusters with 32 subclusters of 2 KiB.
shape extended_l2 "base+overlay with extended_l2=on (64 KiB clusters, 2 KiB subclusters), subcluster-granular writes"
create -o cluster_size=64k,extended_l2=on base.qcow2 4M
io base.qcow2 \
    "write -P 0xa1 0 128k" \
    "write -P 0xa2 200k 6k" \
    "write -P 0xa3 1M 2k" \
    "write -P 0xa4 1058816 3000" \
    "write -z 32k 4k"
create -o cluster_size=64k,extended_l2=on -b base.qcow2 -F qcow2 top.qcow2
io top.qcow2 \
    "write -P 0xb1 2k 2k" \
    "write -z 8k 4k" \
    "write -P 0xb2 70k 1000" \
    "discard 96k 32k" \
    "write -P 0xb3 130k 2k" \
    "write -P 0xb4 202k 1k" \
    "write -z 1M 64k" \
    "write -P 0xb5 2103296 2k" \
    "write -P 0xb6 3M 64k" \
    "discard 3162112 4k"
top top.qcow2

# qcow2 version 2: no zero flag, so zero writes and discards behave differently.
base_overlay compat010 "base+overlay, both compat=0.10 (qcow2 v2): no zero clusters, discard falls through" \
    $((64 * KiB)) $((4 * MiB)) "compat=0.10"

base_overlay refcount1 "base+overlay, refcount_bits=1" $((64 * KiB)) $((4 * MiB)) "refcount_bits=1"
base_overlay refcount64 "base+overlay, refcount_bits=64" $((64 * KiB)) $((4 * MiB)) "refcount_bits=64"

# Compressed bases made by qemu-img convert -c, one write into a compressed
# cluster of the base (so it is partly decompressed/reallocated), then an overlay.
for alg in deflate zstd; do
    shape "compressed_$alg" "base compressed with $alg by qemu-img convert -c (one compressed cluster then overwritten in part), plus overlay"
    create -o cluster_size=64k src.qcow2 4M
    base_writes src.qcow2 $((64 * KiB)) $((4 * MiB))
    if [ "$alg" = zstd ]; then
        qemu-img convert -q -c -O qcow2 -o compression_type=zstd src.qcow2 base.qcow2
    else
        qemu-img convert -q -c -O qcow2 src.qcow2 base.qcow2
    fi
    rm -f src.qcow2
    io base.qcow2 "write -P 0xa9 $((64 * KiB + 1000)) 3000"
    create -b base.qcow2 -F qcow2 top.qcow2
    overlay_writes top.qcow2 $((64 * KiB)) $((4 * MiB))
    top top.qcow2
done

# Raw backing file, format given explicitly.
shape raw_backing "raw base (-F raw) under a qcow2 overlay"
qemu-img create -q -f raw base.raw 4M
base_writes base.raw $((64 * KiB)) $((4 * MiB)) raw
create -b base.raw -F raw top.qcow2
overlay_writes top.qcow2 $((64 * KiB)) $((4 * MiB))
top top.qcow2

# Relative backing name across directories: sub/top.qcow2 -> ../base/base.qcow2.
shape relative_backing "overlay in sub/ names its backing as ../base/base.qcow2 (relative to the overlay's directory)"
mkdir base sub
create -o cluster_size=64k base/base.qcow2 4M
base_writes base/base.qcow2 $((64 * KiB)) $((4 * MiB))
(cd sub && create -b ../base/base.qcow2 -F qcow2 top.qcow2)
overlay_writes sub/top.qcow2 $((64 * KiB)) $((4 * MiB))
top sub/top.qcow2

# Backing file shorter than the overlay; base size not a multiple of the cluster size.
shape short_backing "base of 1 MiB + 4 KiB (last cluster partial) under a 4 MiB overlay; writes straddle and pass the base's end"
create -o cluster_size=64k base.qcow2 $((MiB + 4 * KiB))
io base.qcow2 \
    "write -P 0xa1 0 512k" \
    "write -P 0xa2 $((MiB - 64 * KiB)) $((64 * KiB + 4 * KiB))"
create -o cluster_size=64k -b base.qcow2 -F qcow2 top.qcow2 4M
io top.qcow2 \
    "write -P 0xb1 $((MiB - 4 * KiB)) 12k" \
    "write -P 0xb2 $((MiB + 64 * KiB + 100)) 1000" \
    "write -P 0xb3 2M 64k" \
    "write -z 3M 64k" \
    "write -P 0xb4 $((4 * MiB - 512)) 512"
top top.qcow2

# Deep chain: 12 layers, each writing an overlapping, unaligned run of its own.
shape depth12 "chain of 12 layers (layer0 = base ... layer11 = top), each with its own pattern, some zero writes and discards"
create -o cluster_size=64k layer0.qcow2 2M
for i in $(seq 0 11); do
    if [ "$i" -gt 0 ]; then
        create -o cluster_size=64k -b "layer$((i - 1)).qcow2" -F qcow2 "layer$i.qcow2"
    fi
    cmds=("write -P $((0x10 + i)) $((i * 64 * KiB + i * 1000)) 96k"
        "write -P $((0x30 + i)) $((1536 * KiB + i * 4 * KiB)) 4k")
    if [ $((i % 3)) -eq 2 ]; then cmds+=("write -z $(((i - 2) * 64 * KiB)) 64k"); fi
    if [ $((i % 4)) -eq 3 ]; then cmds+=("discard $(((i - 1) * 64 * KiB)) 64k"); fi
    io "layer$i.qcow2" "${cmds[@]}"
done
top layer11.qcow2

# Internal snapshots: writes after each snapshot copy-on-write shared clusters.
shape internal_snapshot "single image with internal snapshots snap1 and snap2 and writes after each (refcounts > 1, COW)"
create -o cluster_size=64k top.qcow2 2M
io top.qcow2 "write -P 0xa1 0 512k" "write -P 0xa2 1M 64k"
qemu-img snapshot -c snap1 top.qcow2
io top.qcow2 "write -P 0xb1 64k 128k" "write -z 256k 64k" "write -P 0xb2 1048676 1000" "discard 384k 64k"
qemu-img snapshot -c snap2 top.qcow2
io top.qcow2 "write -P 0xc1 0 32k" "write -P 0xc2 1536k 64k"
top top.qcow2

# Persistent dirty bitmaps in the overlay (one enabled, one disabled), then writes.
shape dirty_bitmap "base+overlay; overlay has persistent bitmaps bm0 (enabled) and bm1 (disabled), written after adding"
create -o cluster_size=64k base.qcow2 4M
base_writes base.qcow2 $((64 * KiB)) $((4 * MiB))
create -o cluster_size=64k -b base.qcow2 -F qcow2 top.qcow2
qemu-img bitmap --add top.qcow2 bm0
qemu-img bitmap --add --granularity 128k top.qcow2 bm1
qemu-img bitmap --disable top.qcow2 bm1
overlay_writes top.qcow2 $((64 * KiB)) $((4 * MiB))
top top.qcow2

# Lazy refcounts + abort: the overlay keeps its dirty bit and stale refcounts.
shape dirty_lazy_refcounts "overlay with lazy_refcounts=on left dirty by an aborted qemu-io (dirty bit set, refcounts not updated)"
create -o cluster_size=64k base.qcow2 2M
io base.qcow2 "write -P 0xa1 0 1M"
create -o cluster_size=64k,lazy_refcounts=on -b base.qcow2 -F qcow2 top.qcow2
io top.qcow2 "write -P 0xb1 0 64k"
# qemu-io's `abort` raises SIGABRT (exit 134); no core file wanted.
(
    ulimit -c 0
    qemu-io -f qcow2 -c "write -P 0xb2 128k 192k" -c "write -P 0xb3 1052672 8k" -c "write -z 1536k 64k" -c abort top.qcow2 \
        >/dev/null 2>&1
) 2>/dev/null || true
if ! qemu-img info --output=json -U top.qcow2 | grep -q '"dirty-flag": true'; then
    echo "$0: dirty_lazy_refcounts: expected dirty-flag true after abort" >&2
    exit 1
fi
top top.qcow2

# --- verify ------------------------------------------------------------------

cd "$OUT"
printf '%s\n' "${SHAPES[@]}" >SHAPES
fail=0
for s in "${SHAPES[@]}"; do
    while IFS= read -r img; do
        rc=0
        qemu-img check -q "$img" >/dev/null 2>&1 || rc=$?
        if [ "$s/$(cat "$s/top")" = "$img" ] && [ "$s" = dirty_lazy_refcounts ]; then
            continue # deliberately dirty; qemu-img check reports it (see testdata/README.md)
        fi
        if [ "$rc" -ne 0 ]; then
            echo "$0: qemu-img check $img exited $rc" >&2
            fail=1
        fi
    done < <(find "$s" -name '*.qcow2' | sort)
done
[ "$fail" -eq 0 ] || exit 1
printf '%s\n' "${SHAPES[@]}"
