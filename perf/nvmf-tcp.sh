#!/usr/bin/env bash
# NVMe/TCP target on core 0 (malloc namespace), ferroplane-perf on core 1:
# 4 KiB randread QD1/32/128, randwrite QD32, 128 KiB read QD16, and QD32
# randread with header + data digests; adaptive and busy poll modes
# interleaved, REPS rounds; prints each run and the median per cell.
# Usage: perf/nvmf-tcp.sh [SECONDS_PER_RUN] [REPS]
# With FERROPLANE_BASELINE_BIN=path/to/other/ferroplane, that binary runs
# the same matrix (adaptive) in the same rounds, for a same-run ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
T_S="${1:-4}"
REPS="${2:-3}"
PORT=4421
NQN=nqn.2016-06.io.spdk:cnode1
cargo build --release --workspace -q
CONF="$(mktemp)"
cat > "$CONF" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":65536,"block_size":4096}}]},
{"subsystem":"nvmf","config":[{"method":"nvmf_create_transport","params":{"trtype":"TCP"}},
{"method":"nvmf_create_subsystem","params":{"nqn":"$NQN","allow_any_host":true}},
{"method":"nvmf_subsystem_add_ns","params":{"nqn":"$NQN","namespace":{"bdev_name":"Malloc0","nsid":1}}},
{"method":"nvmf_subsystem_add_listener","params":{"nqn":"$NQN","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"$PORT"}}}]}]}
JSON
WORKLOADS=("-q 1 -o 4096 -w randread" "-q 32 -o 4096 -w randread" "-q 128 -o 4096 -w randread"
           "-q 32 -o 4096 -w randwrite" "-q 16 -o 131072 -w read"
           "-q 32 -o 4096 -w randread --hdr-digest --data-digest")
RES="$(mktemp)"
MODES=(adaptive busy)
if [ -n "${FERROPLANE_BASELINE_BIN:-}" ]; then MODES+=(baseline); fi
for rep in $(seq "$REPS"); do
  for mode in "${MODES[@]}"; do
    BIN=./target/release/ferroplane
    PM=$mode
    if [ "$mode" = baseline ]; then BIN=$FERROPLANE_BASELINE_BIN; PM=adaptive; fi
    taskset -c 0 "$BIN" --cpus 0 -c "$CONF" -r /tmp/ferroplane-perf.sock \
        --poll-mode "$PM" >/dev/null 2>&1 &
    TGT=$!
    sleep 1
    for i in "${!WORKLOADS[@]}"; do
      # shellcheck disable=SC2086
      out=$(./target/release/ferroplane-perf -c 0x2 --json -t "$T_S" ${WORKLOADS[$i]} \
            -r "trtype:tcp adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN")
      iops=$(echo "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))')
      lat=$(echo "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["latency_us"]["avg"],1))')
      echo "$mode|$i|$iops|$lat|$rep" >> "$RES"
      echo "rep $rep $mode ${WORKLOADS[$i]}: $iops IOPS, avg $lat us"
    done
    kill "$TGT"; wait "$TGT" 2>/dev/null || true
  done
done
echo
python3 - "$RES" "${WORKLOADS[@]}" <<'PY'
import sys, statistics
res, wl = sys.argv[1], sys.argv[2:]
rows = [l.strip().split('|') for l in open(res)]
modes = [m for m in ('adaptive', 'busy', 'baseline') if any(x[0] == m for x in rows)]
print("| workload | " + " | ".join(f"{m} IOPS (avg µs)" for m in modes)
      + (" | adaptive / baseline (median of pair ratios; ratio of medians) |" if 'baseline' in modes else " |"))
print("|---|" + "---:|" * (len(modes) + ('baseline' in modes)))
for i, w in enumerate(wl):
    cell = []
    med = {}
    for mode in modes:
        r = [(int(x[2]), float(x[3])) for x in rows if x[0] == mode and int(x[1]) == i]
        iops = statistics.median(v[0] for v in r); lat = statistics.median(v[1] for v in r)
        mib = f", {iops*131072/2**20:.0f} MiB/s" if "131072" in w else ""
        med[mode] = iops
        cell.append(f"{iops:,.0f}{mib} ({lat})")
    if 'baseline' in med:
        # Same-round pairs: the machine's speed swings between runs.
        by = {(x[0], x[4]): int(x[2]) for x in rows if int(x[1]) == i}
        pairs = [by[('adaptive', r)] / by[('baseline', r)] for (m, r) in by
                 if m == 'baseline' and ('adaptive', r) in by]
        cell.append(f"{statistics.median(pairs):.2f}; {med['adaptive'] / med['baseline']:.2f}")
    print(f"| `{w}` | " + " | ".join(cell) + " |")
PY
rm -f "$CONF" "$RES"
