#!/usr/bin/env bash
# Miri over the unit tests of the code that hands out raw views of memory:
# I/O buffers, shares and windows (bdev/src/buf.rs), the NVMe/TCP receive
# buffers that in-capsule writes are served from (recv_buf.rs) and the send
# queue that sends read data in place (send_queue.rs). Needs the nightly
# toolchain with the miri and rust-src components; installs them if it can
# and skips with a notice if it cannot (exit 0), unless
# FERROPLANE_REQUIRE_MIRI=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    timeout 600 rustup toolchain install nightly --profile minimal -c miri,rust-src >/dev/null 2>&1 || true
fi
if ! cargo +nightly miri --version >/dev/null 2>&1 || ! timeout 900 cargo +nightly miri setup >/dev/null 2>&1; then
    if [ "${FERROPLANE_REQUIRE_MIRI:-0}" = 1 ]; then
        echo "Miri is not available (nightly toolchain with miri and rust-src)" >&2
        exit 1
    fi
    echo "NOTICE: Miri is not available here (nightly with miri, rust-src); skipping the Miri run"
    exit 0
fi
cargo +nightly miri test -p bdev --lib buf::
cargo +nightly miri test -p nvmf --lib -- recv_buf send_queue
