#!/usr/bin/env bash
# RAID cost in-process: ferroplane-bdevperf on one core (core 0), 4 KiB
# random reads and writes at QD32 for 5 s, on one bdev, raid0 over two
# (64 KiB strips), raid1 over two; members malloc (256 MiB each), then null
# (the RAID layer's own cost, no data copy); REPS rounds interleaved,
# medians, ratios against the single bdev measured in the same rounds.
# Usage: perf/raid.sh [SECONDS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
T_S="${1:-5}"
REPS="${2:-3}"
cargo build --release --workspace -q
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT
malloc() { echo "{\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"$1\",\"num_blocks\":65536,\"block_size\":4096}}"; }
null() { echo "{\"method\":\"bdev_null_create\",\"params\":{\"name\":\"$1\",\"num_blocks\":65536,\"block_size\":4096}}"; }
for kind in malloc null; do
  cat > "$DIR/single-$kind.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[$($kind M0)]}]}
JSON
  for level in raid0 raid1; do
    cat > "$DIR/$level-$kind.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[$($kind M0),$($kind M1),
 {"method":"bdev_raid_create","params":{"name":"R","raid_level":"$level","strip_size_kb":64,"base_bdevs":["M0","M1"]}}]}]}
JSON
  done
done
RES="$DIR/res"
for rep in $(seq "$REPS"); do
  for kind in malloc null; do
  for w in randread randwrite; do
    for setup in single raid0 raid1; do
      b=R; [ "$setup" = single ] && b=M0
      iops=$(./target/release/ferroplane-bdevperf -c "$DIR/$setup-$kind.json" -b "$b" -q 32 -o 4096 \
             -w "$w" -t "$T_S" -m 0x1 --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["total"]["iops"]))')
      echo "$setup|$kind $w|$iops" >> "$RES"
      echo "rep $rep $kind $w $setup: $iops IOPS"
    done
  done
  done
done
python3 - "$RES" <<'PY'
import sys, statistics
rows = [l.strip().split('|') for l in open(sys.argv[1])]
med = lambda s, w: statistics.median(int(r[2]) for r in rows if r[0] == s and r[1] == w)
print()
print("| members, workload | single | raid0 (2) | raid1 (2) | raid0 / single | raid1 / single | raid layer ns/IO (raid0, raid1) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for w in ("malloc randread", "malloc randwrite", "null randread", "null randwrite"):
    s, r0, r1 = med("single", w), med("raid0", w), med("raid1", w)
    ns = lambda r: 1e9 / r - 1e9 / s
    print(f"| {w} 4K QD32, 1 core | {s:,.0f} | {r0:,.0f} | {r1:,.0f} | {r0/s:.2f} | {r1/s:.2f} | {ns(r0):.0f}, {ns(r1):.0f} |")
PY
