#!/bin/bash
# By-hand check of the Debian packages on this machine (NOT run by the
# tests: it installs system-wide, as root, and removes the packages again).
#
#   make deb && scripts/deb/smoke.sh            install, check, remove
#   scripts/deb/smoke.sh --keep                 leave the packages installed
#
# Checks: apt-get install of both packages, `strata --version`, the helper
# found next to strata, `man strata-commit`, and bash completion of
# `strata com<TAB>` in an interactive bash inside tmux (bash-completion
# must be installed: it loads /usr/share/bash-completion/completions/strata).
# Then apt-get remove (bash-completion too when this script installed it),
# and that nothing of strata is left in /usr.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive

keep=0
installed_completion=0
[ "${1:-}" = --keep ] && keep=1
out=${DEB_OUT:-${CARGO_TARGET_DIR:-target}/debian}
[ "$(id -u)" = 0 ] || {
    echo "smoke: run as root (it installs packages)" >&2
    exit 1
}
shopt -s nullglob
debs=("$out"/strata_*.deb "$out"/strata-libvirt_*.deb)
[ ${#debs[@]} = 2 ] || {
    echo "smoke: want one strata_*.deb and one strata-libvirt_*.deb in $out (make deb)" >&2
    exit 1
}
step() { printf '\n$ %s\n' "$*"; }
session=strata-smoke-$$
cleanup() {
    tmux kill-session -t "$session" 2>/dev/null || true
    if [ "$keep" = 0 ]; then
        step apt-get remove -y strata strata-libvirt
        apt-get remove -y strata strata-libvirt 2>&1 | tail -n 3
        left=$(find /usr -name 'strata*' -not -path '*/src/*' 2>/dev/null | grep -v "^$PWD" || true)
        if [ -n "$left" ]; then
            echo "smoke: left behind:" >&2
            echo "$left" >&2
            exit 1
        fi
        echo "(nothing of strata left in /usr)"
        if [ "$installed_completion" = 1 ]; then
            step apt-get purge -y bash-completion '# installed by this script'
            apt-get purge -y bash-completion 2>&1 | grep -E '^(Removing|Purging|E:)' || true
        fi
    fi
}
trap cleanup EXIT

step apt-get install -y "${debs[@]/#/./}"
apt-get install -y "${debs[@]/#/./}" 2>&1 | grep -E '^(Setting up|Unpacking|Selecting|E:)' || true
dpkg -s strata strata-libvirt | grep -E '^(Package|Status|Version|Depends):'

step command -v strata strata-libvirt
command -v strata strata-libvirt
step strata --version
strata --version
step strata-libvirt --version
strata-libvirt --version
step strata snapshot list nosuch -c test:///default '# strata-libvirt runs it'
strata snapshot list nosuch -c test:///default 2>&1 | head -n 2 || true

step man -w strata-commit
man -w strata-commit
step "MANWIDTH=80 man strata-commit | head -n 12"
MANWIDTH=80 MANPAGER=cat man strata-commit 2>&1 | head -n 12

if ! dpkg -s bash-completion >/dev/null 2>&1; then
    step apt-get install -y bash-completion
    apt-get install -y bash-completion 2>&1 | grep -E '^(Setting up|E:)' || true
    installed_completion=1
fi
step "tmux: bash -i; type 'strata com' TAB TAB"
tmux new-session -d -s "$session" -x 120 -y 20 "env -i HOME=/root TERM=xterm PATH=/usr/bin:/bin bash --norc --noprofile"
# A shell like a login shell's, with bash-completion's loader.
tmux send-keys -t "$session" 'source /usr/share/bash-completion/bash_completion; PS1="$ "; clear' Enter
sleep 1
tmux send-keys -t "$session" 'strata com' Tab Tab
sleep 1
screen=$(tmux capture-pane -p -t "$session" | sed '/^$/d')
echo "$screen"
if ! grep -q commit <<<"$screen" || ! grep -q compare <<<"$screen"; then
    echo "smoke: bash did not offer commit and compare" >&2
    exit 1
fi
# One more letter makes it unique: TAB completes the word.
tmux send-keys -t "$session" 'm' Tab
sleep 1
line=$(tmux capture-pane -p -t "$session" | sed '/^$/d' | tail -n 1)
echo "after 'm' TAB: $line"
grep -q 'strata commit' <<<"$line" || {
    echo "smoke: 'strata comm<TAB>' did not complete to commit" >&2
    exit 1
}
echo
echo "smoke: ok"
