#!/usr/bin/env bash
# Lvol cost on one core, ferroplane-bdevperf: a thick lvol on a malloc bdev
# against a raw malloc bdev of the same size, 4 KiB randread and randwrite
# QD32, in alternating pairs; then a thin lvol's first writes (each 64 KiB
# sequential write that starts a 1 MiB cluster allocates it) against the
# same workload on a thick lvol. Prints every run and the median of the
# same-round ratios.
# Usage: perf/lvol.sh [SECONDS_PER_RUN] [ROUNDS]
# Stores use clear_method none, so neither side touches its memory before
# the run: reads hit untouched (zero-page) memory on both sides alike.
set -euo pipefail
cd "$(dirname "$0")/.."
T_S="${1:-3}"
ROUNDS="${2:-5}"
cargo build --release -p tools -q
B=./target/release/ferroplane-bdevperf
CONF="$(mktemp)"
MIB=400
BLOCKS=$((MIB * 256))
cat > "$CONF" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
{"method":"bdev_malloc_create","params":{"name":"Raw","num_blocks":$BLOCKS,"block_size":4096}},
{"method":"bdev_malloc_create","params":{"name":"Base","num_blocks":$((BLOCKS + 2048)),"block_size":4096}},
{"method":"bdev_lvol_create_lvstore","params":{"bdev_name":"Base","lvs_name":"lvs0","cluster_sz":1048576,"clear_method":"none"}},
{"method":"bdev_lvol_create","params":{"lvs_name":"lvs0","lvol_name":"thick","size_in_mib":$MIB}},
{"method":"bdev_malloc_create","params":{"name":"Base2","num_blocks":$((18 * BLOCKS)),"block_size":4096}},
{"method":"bdev_lvol_create_lvstore","params":{"bdev_name":"Base2","lvs_name":"lvs1","cluster_sz":1048576,"clear_method":"none"}},
{"method":"bdev_lvol_create","params":{"lvs_name":"lvs1","lvol_name":"thin","size_in_mib":$((16 * MIB)),"thin_provision":true}},
{"method":"bdev_lvol_create","params":{"lvs_name":"lvs1","lvol_name":"thick2","size_in_mib":$MIB}}
]}]}
JSON
run() { # bdev, bdevperf args -> "iops avg_us p99_us"
  local b=$1; shift
  $B -c "$CONF" --cpus 0 -t "${T_S}" -b "$b" --json "$@" 2>/dev/null | python3 -c '
import json,sys; j=json.load(sys.stdin)["jobs"][0]; l=j["latency_us"]
print(round(j["iops"]), l["avg"], l["p99"])'
}
RES="$(mktemp)"
for r in $(seq "$ROUNDS"); do
  for w in randread randwrite; do
    raw=$(run Raw -q 32 -o 4096 -w "$w"); lv=$(run lvs0/thick -q 32 -o 4096 -w "$w")
    echo "round $r $w: raw $raw | lvol $lv"; echo "$w|$raw|$lv" >> "$RES"
  done
  # Thin first writes: 1 s runs never reach the end of the 6400 MiB lvol
  # (64 KiB x IOPS), so every 16th write allocates; the thick lvol wraps.
  thick=$(T_S=1 run lvs1/thick2 -q 32 -o 65536 -w write); thin=$(T_S=1 run lvs1/thin -q 32 -o 65536 -w write)
  echo "round $r first-write: thick $thick | thin $thin"; echo "first|$thick|$thin" >> "$RES"
done
python3 - "$RES" "$T_S" <<'PY'
import sys, statistics
rows = [l.strip().split('|') for l in open(sys.argv[1])]
t = float(sys.argv[2])
for w in ('randread', 'randwrite', 'first'):
    r = [(list(map(float, a.split())), list(map(float, b.split()))) for k, a, b in rows if k == w]
    ratio = statistics.median(b[0] / a[0] for a, b in r)
    ma = statistics.median(a[0] for a, _ in r); mb = statistics.median(b[0] for _, b in r)
    la = statistics.median(a[1] for a, _ in r); lb = statistics.median(b[1] for _, b in r)
    pa = statistics.median(a[2] for a, _ in r); pb = statistics.median(b[2] for _, b in r)
    extra = f", {mb / 16:,.0f} clusters/s allocated" if w == 'first' else ""
    print(f"{w}: base {ma:,.0f} IOPS (avg {la:.1f} µs, p99 {pb if False else pa:.1f} µs) vs "
          f"lvol {mb:,.0f} IOPS (avg {lb:.1f} µs, p99 {pb:.1f} µs); ratio {ratio:.2f}{extra}")
PY
rm -f "$CONF" "$RES"
