#!/usr/bin/env bash
# Runs the NVMe/TCP fuzz target for a bounded time (default 60 s), as CI
# does: `fuzz/run.sh [SECONDS]`. Needs cargo-fuzz (`cargo install
# cargo-fuzz`) and a C++ compiler (libFuzzer). Works with the machine's one
# (stable) toolchain: RUSTC_BOOTSTRAP=1 lets it take the sanitizer flags
# cargo-fuzz passes; FERROPLANE_FUZZ_TOOLCHAIN=nightly to use a nightly.
# Findings land in fuzz/artifacts/ and fail the run. Leak detection is off:
# the in-process target keeps tasks and buffers for its whole life, which
# LeakSanitizer cannot tell from leaks.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_BUDGET="${1:-60}"
# A private copy of the seeds: libFuzzer adds what it finds to the corpus.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp corpus/nvmf_tcp_stream/* "$WORK/"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
export FERROPLANE_FUZZ_PORT="${FERROPLANE_FUZZ_PORT:-4499}"
TOOLCHAIN="${FERROPLANE_FUZZ_TOOLCHAIN:-}"
if [ -z "$TOOLCHAIN" ]; then
    export RUSTC_BOOTSTRAP=1
fi
cargo ${TOOLCHAIN:+"+$TOOLCHAIN"} fuzz run nvmf_tcp_stream "$WORK" -- \
    -max_total_time="$SECONDS_BUDGET" -max_len=8192 -timeout=20 \
    -rss_limit_mb=4096 -detect_leaks=0 -print_final_stats=1
