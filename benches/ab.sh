#!/usr/bin/env bash
# A/B of Strata builds against each other and qemu-img, interleaved, on the
# images of compare-qemu.sh (generated there first: GEN_ONLY=1). Usage:
#   benches/ab.sh pull|commit N WORKDIR STRATA_BINARY...
# Each of the N rounds runs qemu-img, then every binary, each on fresh
# copies of the files the operation changes; prints sorted wall times (ms)
# and the median for each.
set -euo pipefail
op=$1 n=$2 w=$(cd "$3" && pwd); shift 3
[ -f "$w/img/top.qcow2" ] || { echo "no images in $w/img: run GEN_ONLY=1 benches/compare-qemu.sh $w" >&2; exit 1; }
case $op in
  pull) fresh="top.qcow2"; qemu=(qemu-img rebase -b '' top.qcow2) ;;
  commit) fresh="top.qcow2 base.qcow2"; qemu=(qemu-img commit -q top.qcow2) ;;
  *) echo "operation: pull or commit" >&2; exit 2 ;;
esac
declare -A t
for _ in $(seq 1 "$n"); do
  for who in qemu-img "$@"; do
    rm -rf "$w/ab"; mkdir -p "$w/ab"
    ln -s "$w/img/base.qcow2" "$w/img/top.qcow2" "$w/ab/"
    for f in $fresh; do rm "$w/ab/$f"; cp --sparse=always "$w/img/$f" "$w/ab/$f"; done
    sync; sleep 0.5
    start=$(date +%s%N)
    if [ "$who" = qemu-img ]; then (cd "$w/ab" && "${qemu[@]}"); else (cd "$w/ab" && "$(realpath "$who")" "$op" top.qcow2 > /dev/null); fi
    t[$who]+="$(( ($(date +%s%N) - start) / 1000000 )) "
  done
done
for who in qemu-img "$@"; do
  sorted=$(tr ' ' '\n' <<< "${t[$who]}" | grep . | sort -n)
  echo "$who: $(tr '\n' ' ' <<< "$sorted") median $(awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}' <<< "$sorted") ms"
done
