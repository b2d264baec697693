#!/usr/bin/env bash
# Costs that must follow the data, not the virtual size or the chain depth:
# qemu-img and Strata side by side, interleaved (alternating which goes
# first), on fresh sparse copies; median and min-max of wall time, peak RSS
# (/usr/bin/time), and what the emptied top keeps on disk. Usage:
#   benches/compare-qemu-sparse.sh [WORKDIR]     (RUNS=3, OPS="commit256t check256t deep200")
# commit256t: a 256 TiB image with 2 MiB clusters, 512 scattered 2 MiB writes
#   (1 GiB of data, one per 512 GiB L2 table span), committed into its base.
# check256t: check of that top (before the commit).
# pull256t, pull256t-ext (not in the default OPS): the same 512 writes in a
#   base (2 MiB clusters; extended_l2=off / on), an empty overlay pulled:
#   `qemu-img rebase -b ''` (stopped after QEMU_TIMEOUT seconds, 300 by
#   default: exit status 124) against `strata pull`.
# deep200: a chain of 200 images (64 MiB, 64 KiB written in the top):
#   check of the top alone, and commit of the top into its parent.
# Everything generated is removed at the end (the images are sparse files).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/bench-sparse}
RUNS=${RUNS:-3}
OPS=${OPS:-"commit256t check256t deep200"}
STRATA=$(realpath "${STRATA:-target/release/strata}")
[ -x "$STRATA" ] || { cargo build --release -p strata-cli >&2; STRATA=$(realpath target/release/strata); }
mkdir -p "$W"; W=$(cd "$W" && pwd)
trap 'rm -rf "$W/img256" "$W/pull256-off" "$W/pull256-on" "$W/qemu-pull.sh" "$W/deep" "$W/run"' EXIT

gen256() {
  mkdir -p "$W/img256"; cd "$W/img256"
  [ -f .done ] && { cd - > /dev/null; return; }
  qemu-img create -q -f qcow2 -o cluster_size=2M base.qcow2 256T
  qemu-img create -q -f qcow2 -o cluster_size=2M -b base.qcow2 -F qcow2 top.qcow2
  python3 - <<'PY' > writes.txt
import random
random.seed(1)
span, c = 512 << 30, 2 << 20
for i in range(512):
    print(f"write -P {i % 255 + 1} {i * span + random.randrange(span // c) * c} 2M")
PY
  qemu-io top.qcow2 < writes.txt > /dev/null
  touch .done; cd - > /dev/null
}

# gen256pull EXT: $W/pull256-EXT, the writes in the base, an empty top.
gen256pull() {
  local ext=$1
  mkdir -p "$W/pull256-$ext"; cd "$W/pull256-$ext"
  [ -f .done ] && { cd - > /dev/null; return; }
  qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2="$ext" base.qcow2 256T
  python3 - <<'PY' > writes.txt
import random
random.seed(1)
span, c = 512 << 30, 2 << 20
for i in range(512):
    print(f"write -P {i % 255 + 1} {i * span + random.randrange(span // c) * c} 2M")
PY
  qemu-io base.qcow2 < writes.txt > /dev/null
  qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2="$ext" -b base.qcow2 -F qcow2 top.qcow2
  touch .done; cd - > /dev/null
  # The empty backing name cannot pass through pair's word splitting.
  printf '#!/bin/sh\nexec qemu-img rebase -q -f qcow2 -b "" "$@"\n' > "$W/qemu-pull.sh"
  chmod +x "$W/qemu-pull.sh"
}

gendeep() {
  mkdir -p "$W/deep"; cd "$W/deep"
  [ -f .done ] && { cd - > /dev/null; return; }
  qemu-img create -q -f qcow2 l0.qcow2 64M
  for i in $(seq 1 199); do
    qemu-img create -q -f qcow2 -b "l$((i - 1)).qcow2" -F qcow2 "l$i.qcow2"
  done
  qemu-io -c "write -P 9 0 64k" l199.qcow2 > /dev/null
  touch .done; cd - > /dev/null
}

# fresh SRC FILES...: $W/run holds sparse copies of FILES, links to the rest.
fresh() {
  local src=$1; shift
  rm -rf "$W/run"; mkdir -p "$W/run"
  for f in "$src"/*.qcow2; do ln -s "$f" "$W/run/"; done
  for f in "$@"; do rm -f "$W/run/$f"; cp --sparse=always "$src/$f" "$W/run/$f"; done
  sync
}

# timed CMD...: runs CMD in $W/run; prints "secs rss_kib status".
timed() {
  local st=0
  ( cd "$W/run" && /usr/bin/time -f "%e %M" -o "$W/time.out" "$@" > /dev/null 2> "$W/err.out" ) || st=$?
  echo "$(cat "$W/time.out" | tail -1) $st"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)] " [" a[1] "-" a[NR] "]"}'; }

# pair NAME SRC "FILES" "QEMU CMD" "STRATA CMD" [after-hook]
pair() {
  local name=$1 src=$2 files=$3 qcmd=$4 scmd=$5 hook=${6:-}
  : > "$W/q.t"; : > "$W/s.t"
  for r in $(seq 1 "$RUNS"); do
    for who in $( [ $((r % 2)) = 1 ] && echo "q s" || echo "s q"); do
      # shellcheck disable=SC2086
      fresh "$src" $files
      if [ "$who" = q ]; then
        # shellcheck disable=SC2086
        timed $qcmd >> "$W/q.t"
      else
        # shellcheck disable=SC2086
        timed "$STRATA" $scmd >> "$W/s.t"
      fi
      [ -n "$hook" ] && echo "  $who run $r: $( $hook )" >&2
    done
  done
  local qs ss qr sr qst sst
  qs=$(awk '{print $1}' "$W/q.t" | median); ss=$(awk '{print $1}' "$W/s.t" | median)
  qr=$(awk '{print $2/1024}' "$W/q.t" | median); sr=$(awk '{print $2/1024}' "$W/s.t" | median)
  qst=$(awk '{print $3}' "$W/q.t" | sort -u | tr '\n' ' '); sst=$(awk '{print $3}' "$W/s.t" | sort -u | tr '\n' ' ')
  awk -v n="$name" -v qs="$qs" -v ss="$ss" -v qr="$qr" -v sr="$sr" -v qst="$qst" -v sst="$sst" 'BEGIN {
    split(qs, a, " "); split(ss, b, " "); split(qr, c, " "); split(sr, d, " ");
    r = (b[1] > 0 ? sprintf("%.2fx", a[1] / b[1]) : sprintf("> %.0fx (strata under 10 ms)", a[1] / 0.01));
    printf "| %s | %s s %s | %s s %s | %s | %.1f MiB | %.1f MiB | exit %s/ %s|\n", n, a[1], a[2], b[1], b[2], r, c[1], d[1], qst, sst }'
}

top_usage() { echo "top $(du -k "$W/run/top.qcow2" | cut -f1) KiB on disk, $(stat -c %s "$W/run/top.qcow2") bytes long"; }

echo "| operation | qemu-img | strata | ratio | qemu RSS | strata RSS | exit status (qemu/strata) |"
echo "|---|---|---|---|---|---|---|"
for op in $OPS; do
  case $op in
    commit256t)
      gen256
      pair "commit, 256 TiB, 2 MiB clusters, 1 GiB scattered" "$W/img256" "base.qcow2 top.qcow2" \
        "qemu-img commit -q top.qcow2" "commit top.qcow2" top_usage ;;
    check256t)
      gen256
      pair "check of the 256 TiB top (512 L2 tables of 2 MiB)" "$W/img256" "" \
        "qemu-img check top.qcow2" "check top.qcow2" ;;
    pull256t|pull256t-ext)
      ext=off; [ "$op" = pull256t-ext ] && ext=on
      gen256pull "$ext"
      pair "pull, 256 TiB, 2 MiB clusters, extended_l2=$ext, 1 GiB scattered in the base" \
        "$W/pull256-$ext" "top.qcow2" \
        "timeout ${QEMU_TIMEOUT:-300} $W/qemu-pull.sh top.qcow2" "pull top.qcow2" top_usage ;;
    deep200)
      gendeep
      pair "check of the top of a depth-200 chain" "$W/deep" "" \
        "qemu-img check l199.qcow2" "check l199.qcow2"
      pair "commit of a depth-200 top into its parent" "$W/deep" "l198.qcow2 l199.qcow2" \
        "qemu-img commit -q l199.qcow2" "commit l199.qcow2" ;;
    *) echo "unknown op $op" >&2; exit 2 ;;
  esac
done
