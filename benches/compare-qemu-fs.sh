#!/usr/bin/env bash
# Times qemu-img and Strata side by side on filesystems that share extents:
# pull and commit of a chain with 2 GiB of data, on a loop-mounted XFS
# (mkfs.xfs -m reflink=1) and a loop-mounted btrfs that the script makes
# itself (root needed), in interleaved pairs on fresh copies (medians,
# min-max, ratios), as benches/compare-qemu.sh does on the work disk. In
# the same run it measures the physical limits of each filesystem: the
# clone floor (`cp --reflink=always` of the base, and the same followed by
# an fdatasync of the clone: the durable floor, which is what a merge must
# reach) and the durable write bandwidth (`dd bs=4M conv=fdatasync` of
# 2 GiB), and the peak disk use of the file written while each tool runs
# (sampled every 2 ms).
#
#   sudo benches/compare-qemu-fs.sh [WORKDIR]     (RUNS=5 FSES="xfs btrfs")
#
# FSES may also name xfs-copy: an XFS without reflink (mkfs.xfs -m
# reflink=0), where both tools copy (no clone floor there; fresh copies are
# plain copies). Between runs the filesystem is trimmed (fstrim), so that
# its loop file gives back what deleted copies held; the script refuses
# to start with less than 8 GiB free in WORKDIR (12 GiB with xfs-copy; 4
# more the first time, for the random data).
#
# Images: base.qcow2 (4 GiB virtual, 2 GiB of random data in [0, 2 GiB)),
# top.qcow2 over it (2 GiB of other random data in [2 GiB, 4 GiB)). pull
# copies the base's 2 GiB into the top (`qemu-img rebase -b ''` / `strata
# pull`); commit moves the top's 2 GiB into the base (`qemu-img commit` /
# `strata commit --force`), which grows from 2 to 4 GiB. Fresh copies for each run
# are reflink copies of pristine files (new inodes, cold page cache, no
# data written), for both tools alike. The filesystems live in sparse
# files under WORKDIR; they are unmounted and removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/bench-fs}
RUNS=${RUNS:-5}
FSES=${FSES:-xfs btrfs}
GiB=$((1024 * 1024 * 1024))
STRATA=${STRATA:-target/release/strata}
[ "$(id -u)" -eq 0 ] || { echo "compare-qemu-fs.sh: needs root (mount -o loop)" >&2; exit 2; }
for t in mkfs.xfs mkfs.btrfs filefrag fstrim; do
  command -v "$t" > /dev/null || { echo "compare-qemu-fs.sh: $t missing (scripts/install-deps.sh)" >&2; exit 2; }
done
[ -x "$STRATA" ] || cargo build --release -p strata-cli --bin strata >&2
S=$(cd "$(dirname "$STRATA")" && pwd)/$(basename "$STRATA")
mkdir -p "$W"
W=$(cd "$W" && pwd)
# The random data (4 GiB, unless made before), and what the largest
# filesystem's loop file holds at its peak: 8 GiB with clones, 12 GiB
# copying.
need=8; case " $FSES " in *" xfs-copy "*) need=12 ;; esac
[ -f "$W/.data-done" ] || need=$((need + 4))
free=$(( $(df -Pk "$W" | awk 'NR == 2 { print $4 }') / 1024 / 1024 ))
(( free >= need )) || { echo "compare-qemu-fs.sh: $W has $free GiB free, needs $need" >&2; exit 2; }

MOUNTS=()
cleanup() {
  for m in "${MOUNTS[@]}"; do umount "$m" 2> /dev/null || true; done
  rm -f "$W"/fs-*.img
}
trap cleanup EXIT

# The data, made once: two 2 GiB random files (in WORKDIR, outside the
# filesystems under test).
if [ ! -f "$W/.data-done" ]; then
  echo "generating 2 x 2 GiB of random data in $W" >&2
  head -c $((2 * GiB)) /dev/urandom > "$W/a.raw"
  head -c $((2 * GiB)) /dev/urandom > "$W/b.raw"
  touch "$W/.data-done"
fi

now() { echo "$EPOCHREALTIME"; }

# timed DIR CMD: prints "seconds rss_kib" of CMD run in DIR.
timed() {
  local dir=$1; shift
  local t0 t1
  t0=$(now)
  ( cd "$dir" && /usr/bin/time -f "%M" "$@" > /dev/null 2> "$W/time.err" ) || { cat "$W/time.err" >&2; return 1; }
  t1=$(now)
  echo "$(python3 -c "print(f'{$t1 - $t0:.4f}')") $(tail -1 "$W/time.err")"
}

# peak_of FILE: samples FILE's allocated bytes every 2 ms while
# $W/sampling exists (it touches $W/sampling.ready once running); prints
# the peak in MiB.
peak_of() {
  python3 - "$1" "$W/sampling" <<'SAMPLER'
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
}

# Medians of the floors: seconds of `cp --reflink=always` alone, and of
# the same followed by an fdatasync of the clone (`sync -d`).

declare -A T
for fs in $FSES; do
  img="$W/fs-$fs.img"; mnt="$W/mnt-$fs"
  rm -f "$img"; truncate -s 24G "$img"; mkdir -p "$mnt"
  case $fs in
    xfs) mkfs.xfs -q -m reflink=1 "$img" ;;
    xfs-copy) mkfs.xfs -q -m reflink=0 "$img" ;;
    btrfs) mkfs.btrfs -q "$img" ;;
    *) echo "compare-qemu-fs.sh: unknown filesystem $fs (xfs, xfs-copy, btrfs)" >&2; exit 2 ;;
  esac
  mount -o loop "$img" "$mnt"; MOUNTS+=("$mnt")
  clones=1; [ "$fs" = xfs-copy ] && clones=0
  P="$mnt/pristine"; R="$mnt/run"; mkdir -p "$P"
  echo "$fs: building the chain" >&2
  cp "$W/a.raw" "$P/a.raw"; truncate -s $((4 * GiB)) "$P/a.raw"
  qemu-img convert -O qcow2 "$P/a.raw" "$P/base.qcow2"; rm "$P/a.raw"
  truncate -s $((2 * GiB)) "$P/b.raw"; cat "$W/b.raw" >> "$P/b.raw"; truncate -s $((4 * GiB)) "$P/b.raw"
  qemu-img convert -O qcow2 "$P/b.raw" "$P/top.qcow2"; rm "$P/b.raw"
  qemu-img rebase -q -u -b base.qcow2 -F qcow2 "$P/top.qcow2"
  sync

  # Physical limits, measured now, on this filesystem: the clone floor,
  # alone and made durable (interleaved).
  # Timed like the tools (`timed`: the same subshell and /usr/bin/time
  # around the command), so that the ratios compare like with like.
  floor=(); dfloor=()
  for r in $(seq 1 $((clones * RUNS))); do
    rm -f "$mnt/clone"; sync
    floor+=("$(timed "$mnt" cp --reflink=always "$P/base.qcow2" "$mnt/clone" | cut -d' ' -f1)")
    rm -f "$mnt/clone"; sync
    dfloor+=("$(timed "$mnt" sh -c 'cp --reflink=always "$1" "$2" && sync -d "$2"' sh "$P/base.qcow2" "$mnt/clone" | cut -d' ' -f1)")
  done
  rm -f "$mnt/clone"
  dd_out=$(dd if=/dev/zero of="$mnt/dd" bs=4M count=512 conv=fdatasync 2>&1 | tail -1); rm -f "$mnt/dd"
  fstrim "$mnt" || true
  T[$fs.floor]="${floor[*]}"
  T[$fs.dfloor]="${dfloor[*]}"
  T[$fs.dd]="$dd_out"

  fresh() {
    rm -rf "$R"; fstrim "$mnt" || true; mkdir -p "$R"
    if (( clones )); then cp --reflink=always "$P/base.qcow2" "$P/top.qcow2" "$R/"
    else cp --sparse=always "$P/base.qcow2" "$P/top.qcow2" "$R/"; fi
    sync
    # The copies' pages out of the page cache (a reflink copy starts
    # cold; this file only, not the whole machine's cache).
    python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$R/base.qcow2" "$R/top.qcow2"
  }
  for op in pull commit; do
    for r in $(seq 1 "$RUNS"); do
      if (( r % 2 )); then order="q s"; else order="s q"; fi
      for who in $order; do
        fresh
        case $op.$who in
          pull.q) cmd=(qemu-img rebase -b "" top.qcow2) ;;
          pull.s) cmd=("$S" pull top.qcow2) ;;
          commit.q) cmd=(qemu-img commit top.qcow2) ;;
          commit.s) cmd=("$S" commit --force top.qcow2) ;;
        esac
        rm -f "$W/sampling.ready"; touch "$W/sampling"
        watch=base.qcow2; [ "$op" = pull ] && watch=top.qcow2
        peak_of "$R/$watch" > "$W/peak" &
        sampler=$!
        while [ ! -e "$W/sampling.ready" ]; do sleep 0.01; done
        out=$(timed "$R" "${cmd[@]}")
        rm -f "$W/sampling"; wait "$sampler"
        after=$(( $(stat -c %b "$R/$watch") * 512 / 1024 / 1024 ))
        # MiB of the file's extents flagged shared (with the pristine copy
        # it came from, or with the source of a clone).
        shared=$(filefrag -v -b1048576 "$R/$watch" | awk -F: '/shared/ { n += $4 } END { print n + 0 }')
        T[$fs.$op.$who]+="$out $(cat "$W/peak") $after $shared;"
      done
    done
  done
  rm -rf "$R"
  umount "$mnt"; rm -f "$img"
done
rm -f "$W/sampling.ready" "$W/peak" "$W/time.err"

python3 - "$RUNS" "$FSES" <<PY
import statistics, sys
raw = {$(for k in "${!T[@]}"; do printf '"%s": """%s""",' "$k" "${T[$k]}"; done)}
runs, fses = sys.argv[1], sys.argv[2].split()
def rows(k):
    return [p.split() for p in raw.get(k, "").split(";") if p.strip()]
med = statistics.median
print(f"runs per cell: {runs}  (median [min-max] seconds; peak/after: MiB allocated by the file written; shared: MiB of its extents FIEMAP flags shared, before/after is not told apart: the fresh copies share their old data with the pristine files)")
for fs in fses:
    fl = [float(x) for x in raw.get(fs + ".floor", "").split()]
    dfl = [float(x) for x in raw.get(fs + ".dfloor", "").split()]
    span = lambda t: f"{med(t):.4f} s [{min(t):.4f}-{max(t):.4f}]"
    if fl:
        print(f"\n{fs}: clone floor (cp --reflink=always of the base) {span(fl)}; durable (then sync -d of the clone) {span(dfl)}; dd 2 GiB conv=fdatasync: {raw[fs + '.dd']}")
    else:
        print(f"\n{fs}: no clones (no clone floor); dd 2 GiB conv=fdatasync: {raw[fs + '.dd']}")
    print(f"{'operation':8} {'qemu-img':>24} {'strata':>24} {'speedup':>8} {'/floor':>7} {'/dfloor':>7} {'q peak/after':>13} {'s peak/after':>13} {'q RSS':>6} {'s RSS':>6} {'shared MiB q/s':>15}")
    for op in ["pull", "commit"]:
        q, s = rows(f"{fs}.{op}.q"), rows(f"{fs}.{op}.s")
        if not q or not s: continue
        qt = [float(r[0]) for r in q]; st = [float(r[0]) for r in s]
        f = lambda t: f"{med(t):7.4f} [{min(t):.4f}-{max(t):.4f}]"
        pk = lambda rs: f"{max(int(r[2]) for r in rs)}/{max(int(r[3]) for r in rs)}"
        rss = lambda rs: max(int(r[1]) for r in rs) / 1024
        sh = lambda rs: max(int(r[4]) for r in rs)
        over = lambda fl: f"{med(st)/med(fl):6.1f}x" if fl else f"{'-':>7}"
        print(f"{op:8} {f(qt):>24} {f(st):>24} {med(qt)/med(st):7.1f}x {over(fl)} {over(dfl)} {pk(q):>13} {pk(s):>13} {rss(q):6.1f} {rss(s):6.1f} {sh(q):>7}/{sh(s):<7}")
PY
