#!/usr/bin/env bash
# Times `qemu-img convert` and `strata convert` side by side (interleaved,
# rotating which goes first, median [min-max] wall time and peak RSS from
# /usr/bin/time), with floors: `cp --reflink=always` where the filesystem
# shares extents, and `dd conv=fdatasync` of the same number of bytes.
# Usage:
#   benches/compare-qemu-convert.sh [WORKDIR]     (RUNS=5 by default)
# FS="ext4 xfs btrfs" (default): ext4 is WORKDIR's own filesystem (it must
# be ext4 for that row to mean it); xfs (mkfs.xfs -m reflink=1) and btrfs
# are loop-mounted files made here (needs root; xfsprogs / btrfs-progs are
# installed with apt-get when missing). Images: a 4 GiB chain with 2 GiB of
# data (a base with 1 GiB of random data, an overlay of 16384 scattered
# 64 KiB random writes), and overlays of it of 1 TiB and 256 TiB virtual
# size with nothing more in them. Everything made is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/bench-convert}
RUNS=${RUNS:-5}
FS=${FS:-ext4 xfs btrfs}
OPS=${OPS:-qcow2 raw qcow2-1t qcow2-256t}
STRATA=${STRATA:-target/release/strata}
[ -x "$STRATA" ] || cargo build --release -p strata-cli >&2
S=$(cd "$(dirname "$STRATA")" && pwd)/$(basename "$STRATA")
mkdir -p "$W"
W=$(cd "$W" && pwd)
MNT=()
cleanup() {
  for m in "${MNT[@]}"; do umount "$m" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

gen() {  # gen DIR: the images, in DIR
  local d=$1
  mkdir -p "$d"; cd "$d"
  head -c 1G /dev/urandom > d.raw
  truncate -s 4G d.raw
  qemu-img convert -O qcow2 d.raw base.qcow2 && rm d.raw
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
  python3 - <<'PY' > w.txt
import random
random.seed(42)
# 16384 scattered 64 KiB writes (1 GiB), a random pattern each.
for off in sorted(random.sample(range(65536), 16384)):
    print(f"write -P {random.randrange(1, 255)} {off * 65536} 65536")
PY
  qemu-io top.qcow2 < w.txt > /dev/null && rm w.txt
  qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 big1t.qcow2 1T
  qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 big256t.qcow2 256T
  cd - > /dev/null
}

mount_fs() {  # mount_fs KIND: a loop-mounted filesystem at $W/KIND
  local kind=$1 img="$W/$1.img" dir="$W/$1"
  case $kind in
    xfs) command -v mkfs.xfs > /dev/null || apt-get install -y -q xfsprogs > /dev/null ;;
    btrfs) command -v mkfs.btrfs > /dev/null || apt-get install -y -q btrfs-progs > /dev/null ;;
  esac
  truncate -s 24G "$img"
  case $kind in
    xfs) mkfs.xfs -q -m reflink=1 "$img" ;;
    btrfs) mkfs.btrfs -q "$img" > /dev/null ;;
  esac
  mkdir -p "$dir"
  mount -o loop "$img" "$dir"
  MNT+=("$dir")
}

timed() { ( cd "$D" && /usr/bin/time -f "%e %M" bash -c "$1" > /dev/null 2> "$W/time.err" ) || { cat "$W/time.err" >&2; return 1; }; tail -1 "$W/time.err"; }

declare -A T
ORDER=()
bench() {  # bench ROW LABEL=CMD...: interleaved, rotating the first
  local row=$1; shift
  local n=$# r i k
  ORDER+=("$row")
  for r in $(seq 0 $((RUNS - 1))); do
    for i in $(seq 0 $((n - 1))); do
      k=$(( (i + r) % n + 1 ))
      local pair=${!k}
      local label=${pair%%=*} cmd=${pair#*=}
      rm -f "$D"/out.*; sync
      T[$row.$label]+="$(timed "$cmd");"
      T[$row.labels]=${T[$row.labels]:-}
      [[ " ${T[$row.labels]} " == *" $label "* ]] || T[$row.labels]+=" $label"
    done
  done
  rm -f "$D"/out.*
}

run_fs() {  # run_fs KIND DIR
  local kind=$1
  D=$2
  gen "$D"
  local data=$((2 * 1024))  # MiB of data in the chain
  for op in $OPS; do
    case $op in
      qcow2) src=top.qcow2; o="-O qcow2"; ext=qcow2 ;;
      raw) src=top.qcow2; o="-O raw"; ext=raw ;;
      qcow2-1t) src=big1t.qcow2; o="-O qcow2"; ext=qcow2 ;;
      qcow2-256t) src=big256t.qcow2; o="-O qcow2"; ext=qcow2 ;;
    esac
    local floors=("dd=dd if=base.qcow2 of=out.dd bs=4M count=$((data / 4)) conv=fdatasync status=none")
    if [ "$kind" != ext4 ]; then
      floors+=("cp-reflink=cp --reflink=always base.qcow2 out.cp && cp --reflink=always top.qcow2 out.cp2")
    fi
    bench "$kind $op" \
      "qemu=qemu-img convert $o $src out.$ext" \
      "strata=$S convert $o $src out.$ext" \
      "qemu-C=qemu-img convert -C $o $src out.$ext" \
      "strata-C=$S convert -C $o $src out.$ext" \
      "${floors[@]}"
  done
  rm -f "$D"/*.qcow2
}

for kind in $FS; do
  case $kind in
    ext4) run_fs ext4 "$W/ext4" ;;
    *) mount_fs "$kind"; run_fs "$kind" "$W/$kind" ;;
  esac
done

python3 - "$RUNS" <<PY
import statistics, sys
raw = {$(for k in "${!T[@]}"; do printf '"%s": "%s",' "$k" "${T[$k]}"; done)}
order = [$(for r in "${ORDER[@]}"; do printf '"%s",' "$r"; done)]
def pts(k):
    p = [x.split() for x in raw.get(k, "").split(";") if x.strip()]
    return [float(a) for a, b in p], [int(b) / 1024 for a, b in p]
print(f"runs per cell: {sys.argv[1]}  (median [min-max] seconds, peak RSS MiB; ratio = qemu / strata)")
for row in order:
    labels = raw.get(row + ".labels", "").split()
    cells = []
    for l in labels:
        t, m = pts(row + "." + l)
        if t:
            cells.append(f"{l} {statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}] {max(m):.0f}M")
    q, s = pts(row + ".qemu")[0], pts(row + ".strata")[0]
    qc, sc = pts(row + ".qemu-C")[0], pts(row + ".strata-C")[0]
    ratio = f"{statistics.median(q)/statistics.median(s):.2f}x" if q and s else "-"
    ratio_c = f"{statistics.median(qc)/statistics.median(sc):.2f}x" if qc and sc else "-"
    print(f"{row:18} default {ratio:>6}  -C {ratio_c:>6} | " + " | ".join(cells))
PY
