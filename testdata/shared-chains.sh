#!/bin/bash
# The chain shapes of make-chains.sh, made once and shared by every test
# process that reads them (read-only: a test that writes copies a shape first).
#
#   testdata/shared-chains.sh BASE
#
# Prints the directory of the shapes: BASE/strata-chains-KEY, where KEY hashes
# make-chains.sh and the qemu-img version, so a change to either makes a new
# set and removes the old one. Built under a lock (flock on BASE/strata-chains.lock)
# into a temporary name, then renamed: a process killed mid-build leaves only a
# temporary directory, which the next call removes.
#
# Why: nextest runs every test in its own process. Making the shapes per
# process (about 56 MB each time) cost seconds per test, and a set held by a
# static was never deleted: hundreds of leaked copies filled the disk.
set -euo pipefail

if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    echo "usage: $0 BASE" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
base=$(cd "$1" && pwd)
key=$({ cat "$here/make-chains.sh"; qemu-img --version | head -1; } | sha256sum | cut -c1-16)
dir="$base/strata-chains-$key"

exec 9>"$base/strata-chains.lock"
flock 9
if [ ! -f "$dir/.complete" ]; then
    # Under the lock nothing else builds: every other set, finished or not,
    # is stale.
    for old in "$base"/strata-chains-*; do
        [ -d "$old" ] && rm -rf "$old"
    done
    tmp="$dir.building"
    bash "$here/make-chains.sh" "$tmp" >/dev/null
    touch "$tmp/.complete"
    mv -T "$tmp" "$dir"
fi
echo "$dir"
