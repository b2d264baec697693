#!/bin/bash
# Start a private, hermetic libvirtd (QEMU driver, root, no systemd) whose state lives under $D.
#
#   D=/tmp/my-libvirtd scripts/libvirtd/start-libvirtd.sh
#   virsh -c "qemu+unix:///system?socket=$D/run/libvirt-sock" list --all
#   D=/tmp/my-libvirtd scripts/libvirtd/stop-libvirtd.sh
#
# Nothing is written to /etc, /var or /run except empty mount-point dirs: a private
# mount namespace bind-mounts $D/{etc,run,lib,cache,log} over libvirt's directories.
# Needs root and the packages from `scripts/install-deps.sh --libvirt`.
# Keeping $D/cache between runs makes start-up much faster (QEMU capabilities probe).
# Domains need <features><acpi/></features> with this QEMU/libvirt pair.
set -euo pipefail
D=${D:-${TMPDIR:-/tmp}/strata-libvirtd}
URI="qemu+unix:///system?socket=$D/run/libvirt-sock"

[ "$(id -u)" -eq 0 ] || { echo "start-libvirtd.sh: must run as root" >&2; exit 1; }
[ -x /usr/sbin/libvirtd ] || { echo "start-libvirtd.sh: /usr/sbin/libvirtd missing; run scripts/install-deps.sh --libvirt" >&2; exit 1; }

# Already running from a previous call with the same $D?
if [ -f "$D/libvirtd.pid" ] && kill -0 "$(cat "$D/libvirtd.pid")" 2>/dev/null &&
    virsh -q -c "$URI" version >/dev/null 2>&1 </dev/null; then
    echo "libvirtd already running, pid $(cat "$D/libvirtd.pid"), URI $URI"
    exit 0
fi

mkdir -p "$D"/{etc,run,lib,cache,log}
rm -f "$D/run/libvirt-sock" "$D/libvirtd.pid"
cat > "$D/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
stdio_handler = "file"
cgroup_controllers = [ ]
CONF
cat > "$D/etc/libvirtd.conf" <<'CONF'
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
# A privileged libvirtd resolves the compiled-in user 'libvirt-qemu' BEFORE reading qemu.conf
# (else: "Failed to parse user 'libvirt-qemu'"); give it private passwd/group copies instead of useradd.
rm -f "$D/passwd" "$D/group"
getent passwd libvirt-qemu >/dev/null || { cp /etc/passwd "$D/passwd"; echo 'libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >>"$D/passwd"; }
getent group libvirt-qemu >/dev/null  || { cp /etc/group "$D/group"; echo 'libvirt-qemu:x:64055:' >>"$D/group"; }
for m in /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do mkdir -p "$m"; done
setsid unshare --mount --propagation private bash -c '
  D="$1"
  mount --bind "$D/etc"   /etc/libvirt
  mount --bind "$D/run"   /run/libvirt
  mount --bind "$D/lib"   /var/lib/libvirt
  mount --bind "$D/cache" /var/cache/libvirt
  mount --bind "$D/log"   /var/log/libvirt
  [ -f "$D/passwd" ] && mount --bind "$D/passwd" /etc/passwd
  [ -f "$D/group" ]  && mount --bind "$D/group"  /etc/group
  exec /usr/sbin/libvirtd --pid-file="$D/libvirtd.pid"
' _ "$D" </dev/null >"$D/libvirtd.stdout" 2>&1 &
for _ in $(seq 1 300); do
  if [ -S "$D/run/libvirt-sock" ] && virsh -q -c "$URI" version >/dev/null 2>&1 </dev/null; then
    echo "libvirtd ready after ${SECONDS}s, pid $(cat "$D/libvirtd.pid"), URI $URI"; exit 0
  fi
  sleep 0.1
done
echo "libvirtd failed to start" >&2
cat "$D/libvirtd.stdout" >&2 || true
tail -20 "$D/log/libvirtd.log" >&2 || true
exit 1
