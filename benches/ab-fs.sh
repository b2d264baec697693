#!/usr/bin/env bash
# A/B of Strata builds against each other on a loop-mounted XFS, with the
# clone floor, interleaved (for measuring one change; compare-qemu-fs.sh
# times qemu-img too). Usage (root):
#   benches/ab-fs.sh pull|commit N WORKDIR STRATA_BINARY...
# WORKDIR holds the random data compare-qemu-fs.sh generates there (a.raw,
# b.raw); the chain is the same (4 GiB virtual, 2 GiB of data in each
# layer). FS=xfs (default, reflink=1) or FS=xfs-copy (reflink=0: fresh
# copies are plain copies, no floor). Each of the N rounds runs the floor
# (`cp --reflink=always` of the base), then every binary, each on fresh
# copies; prints sorted wall times (ms), the median, and each run's peak
# and final MiB on disk of the file written (sampled every 2 ms; SAMPLE=0
# runs without the sampler, which competes for the CPU).
set -euo pipefail
op=$1 n=$2 W=$(cd "$3" && pwd); shift 3
FS=${FS:-xfs}
SAMPLE=${SAMPLE:-1}
GiB=$((1024 * 1024 * 1024))
[ "$(id -u)" -eq 0 ] || { echo "ab-fs.sh: needs root (mount -o loop)" >&2; exit 2; }
[ -f "$W/.data-done" ] || { echo "ab-fs.sh: no data in $W: run benches/compare-qemu-fs.sh $W first" >&2; exit 2; }
case $op in pull | commit) ;; *) echo "ab-fs.sh: pull or commit" >&2; exit 2 ;; esac
bins=(); for b in "$@"; do bins+=("$(realpath "$b")"); done
img="$W/ab-fs.img"; M="$W/ab-mnt"; P="$M/pristine"; R="$M/run"
cleanup() { umount "$M" 2> /dev/null || true; rm -f "$img" "$W/ab-sampling" "$W/ab-sampling.ready" "$W/ab-peak"; rmdir "$M" 2> /dev/null || true; }
trap cleanup EXIT
truncate -s 24G "$img"; mkdir -p "$M"
clones=1
if [ "$FS" = xfs-copy ]; then clones=0; mkfs.xfs -q -m reflink=0 "$img"; else mkfs.xfs -q -m reflink=1 "$img"; fi
mount -o loop "$img" "$M"; mkdir -p "$P"
cp "$W/a.raw" "$P/a.raw"; truncate -s $((4 * GiB)) "$P/a.raw"
qemu-img convert -O qcow2 "$P/a.raw" "$P/base.qcow2"; rm "$P/a.raw"
truncate -s $((2 * GiB)) "$P/b.raw"; cat "$W/b.raw" >> "$P/b.raw"; truncate -s $((4 * GiB)) "$P/b.raw"
qemu-img convert -O qcow2 "$P/b.raw" "$P/top.qcow2"; rm "$P/b.raw"
qemu-img rebase -q -u -b base.qcow2 -F qcow2 "$P/top.qcow2"
sync
watch=top.qcow2; [ "$op" = commit ] && watch=base.qcow2
args=(pull top.qcow2); [ "$op" = commit ] && args=(commit --force top.qcow2)
ms() { python3 -c "print(round(($2 - $1) * 1000, 1))"; }
declare -A t pk
who_list=(); (( clones )) && who_list+=(floor); who_list+=("${bins[@]}")
for _ in $(seq 1 "$n"); do
  for who in "${who_list[@]}"; do
    rm -rf "$R"; fstrim "$M" || true; mkdir -p "$R"
    if (( clones )); then cp --reflink=always "$P/base.qcow2" "$P/top.qcow2" "$R/"
    else cp --sparse=always "$P/base.qcow2" "$P/top.qcow2" "$R/"; fi
    sync
    if [ "$who" = floor ]; then
      t0=$EPOCHREALTIME; cp --reflink=always "$P/base.qcow2" "$R/clone"; t1=$EPOCHREALTIME
      t[$who]+="$(ms "$t0" "$t1") "
      continue
    fi
    if (( ! SAMPLE )); then
      t0=$EPOCHREALTIME; (cd "$R" && "$who" "${args[@]}" > /dev/null); t1=$EPOCHREALTIME
      t[$who]+="$(ms "$t0" "$t1") "
      continue
    fi
    rm -f "$W/ab-sampling.ready"; touch "$W/ab-sampling"
    python3 - "$R/$watch" "$W/ab-sampling" > "$W/ab-peak" <<'SAMPLER' &
import os, sys, time
f, flag = sys.argv[1], sys.argv[2]
peak = 0
open(flag + ".ready", "w").close()
while os.path.exists(flag):
    try:
        peak = max(peak, os.stat(f).st_blocks)
    except OSError:
        pass
    time.sleep(0.002)
print(peak * 512 // (1 << 20))
SAMPLER
    sampler=$!
    while [ ! -e "$W/ab-sampling.ready" ]; do sleep 0.01; done
    t0=$EPOCHREALTIME; (cd "$R" && "$who" "${args[@]}" > /dev/null); t1=$EPOCHREALTIME
    rm -f "$W/ab-sampling"; wait "$sampler"
    t[$who]+="$(ms "$t0" "$t1") "
    pk[$who]+="$(cat "$W/ab-peak")/$(( $(stat -c %b "$R/$watch") * 512 / 1024 / 1024 )) "
  done
done
for who in "${who_list[@]}"; do
  sorted=$(tr ' ' '\n' <<< "${t[$who]}" | grep . | sort -n | tr '\n' ' ')
  med=$(python3 -c "import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))" ${t[$who]})
  echo "$who: $sorted median $med ms${pk[$who]:+  peak/after MiB: ${pk[$who]}}"
done
