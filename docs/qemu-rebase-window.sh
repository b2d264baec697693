#!/bin/bash
# Reproduces the window of `qemu-img rebase -b ''` (QEMU 10): killed part-way,
# is the image left with no backing file and part of its data missing?
#
#   docs/qemu-rebase-window.sh [WORKDIR] [KILL_AFTER_SECONDS...]
#
# Makes base.qcow2 (384 MiB of data) and an empty overlay top.qcow2, records the
# overlay's view, then for each delay runs `qemu-img rebase -b '' top.qcow2` on a
# fresh copy, SIGKILLs it after the delay, and prints `qemu-img info` (backing
# file?) and `qemu-img compare` against the recorded view.
set -euo pipefail
W=${1:-$(mktemp -d)}
shift || true
DELAYS=("$@")
[ ${#DELAYS[@]} -gt 0 ] || DELAYS=(0.3 0.6 1.0)
mkdir -p "$W/pristine"
cd "$W/pristine"
qemu-img create -q -f qcow2 base.qcow2 512M
qemu-io -f qcow2 -c "write -P 0xa1 0 256M" -c "write -P 0xa2 320M 128M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c "write -P 0xb1 1M 1M" top.qcow2 >/dev/null
qemu-img convert -O raw top.qcow2 ../orig.raw
cd "$W"
echo "qemu-img: $(qemu-img --version | head -1)"
for d in "${DELAYS[@]}"; do
    rm -rf run && cp -a pristine run
    echo "=== qemu-img rebase -b '' top.qcow2, SIGKILL after ${d}s"
    qemu-img rebase -b '' run/top.qcow2 &
    pid=$!
    sleep "$d"
    kill -KILL "$pid" 2>/dev/null && echo "killed pid $pid" || echo "(it had finished)"
    wait "$pid" 2>/dev/null || true
    echo "--- qemu-img info run/top.qcow2"
    qemu-img info run/top.qcow2 | grep -E '^(image|virtual size|disk size|backing file)' || true
    qemu-img info run/top.qcow2 | grep -q '^backing file' || echo "(no backing file)"
    echo "--- qemu-img compare -f qcow2 -F raw run/top.qcow2 orig.raw"
    qemu-img compare -f qcow2 -F raw run/top.qcow2 orig.raw || echo "(exit $?)"
    echo "--- qemu-img check run/top.qcow2"
    qemu-img check run/top.qcow2 2>&1 | grep -vE "^(Leaked cluster|$)" | tail -6 || true
done
