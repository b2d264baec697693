#!/bin/bash
# Make the tiny fixture images committed in testdata/ for unit tests.
#
#   testdata/make-fixtures.sh [OUTDIR]     (default: the directory of this script)
#
# Uses qemu-img and qemu-io (QEMU >= 10) only. All images have a 1 MiB virtual
# size; together they stay well under 1 MiB on disk. The contents are listed in
# testdata/README.md; keep both in sync. Re-running produces byte-identical files
# with the same QEMU version (no snapshots, so no timestamps).
set -euo pipefail

OUT=${1:-$(dirname "$0")}
mkdir -p "$OUT"
cd "$OUT"
exec </dev/null

for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || {
        echo "$0: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done

FIXTURES=(v3-64k.qcow2 v3-4k.qcow2 v2-4k.qcow2 backing-base.qcow2 overlay-relative.qcow2
    extended-l2.qcow2 compressed-deflate.qcow2 compressed-zstd.qcow2)
rm -f "${FIXTURES[@]}"

create() { qemu-img create -q -f qcow2 "$@"; }
io() {
    local img=$1
    shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}

# v3 (compat=1.1), default 64 KiB clusters: one data cluster, one zero cluster.
create -o cluster_size=64k v3-64k.qcow2 1M
io v3-64k.qcow2 "write -P 0x11 4096 8192" "write -z 65536 65536"

# v3, 4 KiB clusters: data, a zero cluster, a partial-cluster write, last cluster.
create -o cluster_size=4k v3-4k.qcow2 1M
io v3-4k.qcow2 \
    "write -P 0x21 0 8192" \
    "write -z 8192 4096" \
    "write -P 0x22 20000 1000" \
    "write -P 0x23 1044480 4096"

# v2 (compat=0.10), 4 KiB clusters: no zero flag, zero writes become data or nothing.
create -o cluster_size=4k,compat=0.10 v2-4k.qcow2 1M
io v2-4k.qcow2 \
    "write -P 0x31 0 8192" \
    "write -z 4096 4096" \
    "write -P 0x32 524288 4096"

# Base and overlay; the overlay names its backing file relatively ("backing-base.qcow2"),
# to be resolved against the overlay's own directory.
create -o cluster_size=4k backing-base.qcow2 1M
io backing-base.qcow2 "write -P 0x41 0 16384" "write -P 0x42 65536 4096"
create -o cluster_size=4k -b backing-base.qcow2 -F qcow2 overlay-relative.qcow2
io overlay-relative.qcow2 \
    "write -P 0x51 4096 100" \
    "write -z 8192 4096" \
    "write -P 0x52 131072 4096"

# Extended L2 entries: 16 KiB clusters, 32 subclusters of 512 B.
create -o cluster_size=16k,extended_l2=on extended-l2.qcow2 1M
io extended-l2.qcow2 \
    "write -P 0x61 512 512" \
    "write -P 0x62 2048 1024" \
    "write -z 4096 1024" \
    "write -P 0x63 16384 16384" \
    "write -z 20480 512"

# Compressed clusters (qemu-io write -c), deflate and zstd, 4 KiB clusters. One cluster per
# command: a multi-cluster `write -c` compresses clusters in parallel, so their host
# order (and the file bytes) would vary from run to run.
create -o cluster_size=4k compressed-deflate.qcow2 1M
io compressed-deflate.qcow2 "write -c -P 0x71 0 4096" "write -c -P 0x73 4096 4096" "write -P 0x72 8192 4096"
create -o cluster_size=4k,compression_type=zstd compressed-zstd.qcow2 1M
io compressed-zstd.qcow2 "write -c -P 0x81 0 4096" "write -c -P 0x83 4096 4096" "write -P 0x82 8192 4096"

for f in "${FIXTURES[@]}"; do
    qemu-img check -q "$f"
done
ls -l "${FIXTURES[@]}"
