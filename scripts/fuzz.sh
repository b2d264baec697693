#!/bin/bash
# Run every fuzz target for a bounded time (FUZZ_SECONDS each, default 60).
#
#   scripts/fuzz.sh [TARGET...]          FUZZ_SECONDS=600 scripts/fuzz.sh open_read
#
# Works with the stable toolchain: RUSTC_BOOTSTRAP=1 lets it accept the
# sanitizer flags cargo-fuzz passes (install cargo-fuzz with
# `cargo install cargo-fuzz --locked`). Builds with debug assertions, so
# arithmetic overflow panics. Seeds are read from fuzz/corpus/<target>
# (committed); new inputs go to fuzz/corpus-new/<target> (not committed);
# crashes go to fuzz/artifacts/<target>/. Each run ends with libFuzzer's
# "Done N runs" line; the script prints a summary of execs per target and
# exits non-zero when a target found a crash.
#
# FUZZ_JOBS (default 1) runs that many targets at once; FUZZ_RSS_MB (default
# 2048) is libFuzzer's memory limit per process.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
RSS=${FUZZ_RSS_MB:-2048}
export RUSTC_BOOTSTRAP=1
ALL=(header l2_refcount open_read write merge)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")
command -v cargo-fuzz >/dev/null || {
    echo "$0: cargo-fuzz not found: cargo install cargo-fuzz --locked" >&2
    exit 1
}
max_len() {
    case $1 in
        header) echo 65536 ;;
        l2_refcount) echo 4096 ;;
        *) echo 262144 ;;
    esac
}
cargo fuzz build -a || exit 1
mkdir -p target/fuzz-logs
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus-new/$t" "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log=target/fuzz-logs/$t.log
    echo "== $t: ${SECONDS_EACH}s (log: $log)"
    cargo fuzz run -a "$t" "fuzz/corpus-new/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS" -timeout=20 \
        -max_len="$(max_len "$t")" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1)
    echo "   $t: ${runs:-no final stats} (exit $rc)"
    if [ $rc -ne 0 ]; then
        status=1
        grep -m3 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | sed 's/^/   /'
        ls "fuzz/artifacts/$t" | sed 's/^/   artifact: /'
    fi
done
exit $status
