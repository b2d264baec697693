#!/bin/bash
# CI smoke run of the fuzz targets: each one for FUZZ_SECONDS (default 20).
# Also replays the committed corpus of the merge target through the fuzz
# build (cargo test replays it too: crates/merge/tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
cargo fuzz build -a
mkdir -p fuzz/corpus/merge fuzz/regressions/merge
cargo fuzz run -a merge fuzz/corpus/merge fuzz/regressions/merge -- -runs=0 2>&1 | tail -2
FUZZ_SECONDS=${FUZZ_SECONDS:-20} exec scripts/fuzz.sh "$@"
