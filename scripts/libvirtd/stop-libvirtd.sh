#!/bin/bash
# Stop the private libvirtd started by start-libvirtd.sh (same $D), and any QEMU it left running.
set -uo pipefail
D=${D:-${TMPDIR:-/tmp}/strata-libvirtd}
URI="qemu+unix:///system?socket=$D/run/libvirt-sock"
# 1. destroy running domains (QEMU processes outlive libvirtd otherwise)
if [ -S "$D/run/libvirt-sock" ]; then
  for dom in $(virsh -q -c "$URI" list --name 2>/dev/null </dev/null); do
    virsh -q -c "$URI" destroy "$dom" >/dev/null 2>&1 </dev/null || true
  done
fi
# 2. TERM libvirtd by its pid file, wait up to 10 s, then KILL
if [ -f "$D/libvirtd.pid" ]; then
  pid=$(cat "$D/libvirtd.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
fi
# 3. belt and braces: any QEMU whose pid file is still under $D/run/qemu
for f in "$D"/run/qemu/*.pid; do
  [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null
done
rm -f "$D/libvirtd.pid"
echo "stopped"
