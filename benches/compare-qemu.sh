#!/usr/bin/env bash
# Times qemu-img and Strata side by side on the same generated images, in
# interleaved pairs on fresh copies, and prints a ratio table (median and
# min-max of wall time, peak RSS; map is timed over 20 runs in a row and
# divided). Usage:
#   benches/compare-qemu.sh [WORKDIR]        (RUNS=5 SCALE=1 by default)
# SCALE=1: a 1 GiB base with 512 MiB of random data, a 256 MiB scattered
# overlay, a depth-16 chain of 16 MiB overlays. SCALE=4 divides the sizes by 4.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/bench-work}
RUNS=${RUNS:-5}
SCALE=${SCALE:-1}
MiB=$((1024 * 1024))
STRATA=${STRATA:-target/release/strata}
[ -x "$STRATA" ] || cargo build --release -p strata-cli >&2
mkdir -p "$W"
W=$(cd "$W" && pwd)

base_size=$((1024 * MiB / SCALE)); base_data=$((512 * MiB / SCALE))
over_data=$((256 * MiB / SCALE)); layer_data=$((16 * MiB / SCALE))

gen() {
  [ -f "$W/.done-$SCALE" ] && return
  rm -rf "$W"/img; mkdir -p "$W/img"; cd "$W/img"
  echo "generating images in $W/img (scale $SCALE)" >&2
  head -c "$base_data" /dev/urandom > data.raw
  truncate -s "$base_size" data.raw
  qemu-img convert -O qcow2 data.raw base.qcow2 && rm data.raw
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
  # Scattered 64 KiB writes covering over_data bytes, random patterns.
  python3 - "$base_size" "$over_data" > writes.txt <<'PY'
import random, sys
size, total = int(sys.argv[1]), int(sys.argv[2])
random.seed(42)
n = total // 65536
for off in sorted(random.sample(range(size // 65536), n)):
    print(f"write -P {random.randrange(1, 255)} {off * 65536} 65536")
PY
  qemu-io top.qcow2 < writes.txt > /dev/null
  # Depth-16 chain of layer_data overlays, and the same data flattened.
  prev=base.qcow2
  for i in $(seq 1 16); do
    qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "l$i.qcow2"
    qemu-io -c "write -P $((i + 16)) $(( (i - 1) * layer_data * 3 )) $layer_data" "l$i.qcow2" > /dev/null
    prev="l$i.qcow2"
  done
  qemu-img convert -O qcow2 l16.qcow2 flat.qcow2
  cd - > /dev/null
  touch "$W/.done-$SCALE"
}

# run LABEL TOOL CMD...: times CMD in a fresh copy of the images; prints "secs rss_kib"
# Fresh copies of the files an operation changes (the others are linked).
fresh() {
  rm -rf "$W/run"; mkdir -p "$W/run"
  for f in "$W"/img/*.qcow2; do ln -s "$f" "$W/run/"; done
  for f in $FRESH; do rm -f "$W/run/$f"; cp --sparse=always "$W/img/$f" "$W/run/$f"; done
  sync
}
timed() { ( cd "$W/run" && /usr/bin/time -f "%e %M" "$@" > /dev/null 2> "$W/time.err" ) || { cat "$W/time.err" >&2; return 1; }; tail -1 "$W/time.err"; }

declare -A T
bench() {  # bench NAME "qemu cmd" "strata cmd"
  local name=$1 q=$2 s=$3
  for r in $(seq 1 "$RUNS"); do
    if (( r % 2 )); then order="q s"; else order="s q"; fi
    for who in $order; do
      fresh
      if [ "$who" = q ]; then out=$(timed bash -c "$q"); else out=$(timed bash -c "$s"); fi
      T[$name.$who]+="$out;"
    done
  done
}

gen
[ -n "${GEN_ONLY:-}" ] && { echo "images in $W/img"; exit 0; }
S=$(cd "$(dirname "$STRATA")" && pwd)/$(basename "$STRATA")
OPS=${OPS:-commit pull map16 read16 readflat}
MAP_REPEAT=20
for op in $OPS; do
  case $op in
    commit) FRESH="base.qcow2 top.qcow2" bench commit "qemu-img commit top.qcow2" "$S commit --force top.qcow2" ;;
    pull) FRESH="base.qcow2 top.qcow2" bench pull "qemu-img rebase -b '' top.qcow2" "$S pull top.qcow2" ;;
    # map takes milliseconds: time 20 runs in a row (the table divides).
    map16) FRESH="" bench map16 "for i in \$(seq $MAP_REPEAT); do qemu-img map --output json l16.qcow2; done" \
             "for i in \$(seq $MAP_REPEAT); do $S map --output json l16.qcow2; done" ;;
    read16) FRESH="" bench read16 "qemu-img convert -O raw l16.qcow2 out.raw" "$S convert -O raw l16.qcow2 out.raw" ;;
    readflat) FRESH="" bench readflat "qemu-img convert -O raw flat.qcow2 out.raw" "$S convert -O raw flat.qcow2 out.raw" ;;
  esac
done

python3 - "$RUNS" <<PY
import statistics, sys
raw = {$(for k in "${!T[@]}"; do printf '"%s": "%s",' "$k" "${T[$k]}"; done)}
def parse(k):
    pts = [p.split() for p in raw.get(k, "").split(";") if p.strip()]
    div = $MAP_REPEAT if k.startswith("map16") else 1
    return [float(a) / div for a, b in pts], [int(b) / 1024 for a, b in pts]
print(f"runs per cell: {sys.argv[1]}  (median [min-max] seconds, peak RSS MiB)")
print(f"{'operation':10} {'qemu-img':>22} {'strata':>22} {'speedup':>8} {'qemu RSS':>9} {'strata RSS':>10}")
for op in ["commit", "pull", "map16", "read16", "readflat"]:
    qt, qm = parse(op + ".q"); st, sm = parse(op + ".s")
    if not qt or not st: continue
    f = lambda t: f"{statistics.median(t):6.4f} [{min(t):.4f}-{max(t):.4f}]"
    print(f"{op:10} {f(qt):>22} {f(st):>22} {statistics.median(qt)/statistics.median(st):7.2f}x {max(qm):8.1f} {max(sm):10.1f}")
_, _ = parse("read16.s"), parse("readflat.s")
r16, rf = parse("read16.s")[0], parse("readflat.s")[0]
if r16 and rf:
    print(f"strata depth-16 read / flat read: {statistics.median(r16)/statistics.median(rf):.2f}x")
PY
