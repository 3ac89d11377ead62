#!/usr/bin/env bash
# Local-storage comparison, one core: ferroplane-bdevperf on null, malloc
# and uring (a file on local disk) against fio's io_uring engine on the same
# file, same workloads, in the same run. Prints a table with the ratio
# ferroplane/fio; paste it into perf/RESULTS.md with this command line.
#
#   perf/local-storage.sh [seconds-per-case] [file]
#
# Needs fio (apt-get install fio). Builds release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
FILE="${2:-/var/tmp/ferroplane-perf.img}"
SIZE_MB=4096
CORE=0

cargo build --release -q -p tools --bin ferroplane-bdevperf
BDEVPERF=./target/release/ferroplane-bdevperf

if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" -lt $((SIZE_MB << 20)) ]; then
    echo "preparing $FILE ($SIZE_MB MiB)..." >&2
    fio --name=prep --filename="$FILE" --size=${SIZE_MB}M --rw=write --bs=1M \
        --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
fi

CFG=$(mktemp /tmp/fp-perf-XXXX.json)
trap 'rm -f "$CFG"' EXIT
cat > "$CFG" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_null_create","params":{"name":"Null0","num_blocks":1048576,"block_size":4096}},
 {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":131072,"block_size":4096}},
 {"method":"bdev_uring_create","params":{"name":"Uring0","filename":"$FILE","block_size":4096}}
]}]}
JSON

bdevperf_iops() { # bdev workload qd
    "$BDEVPERF" -c "$CFG" -b "$1" -w "$2" -q "$3" -o 4096 -t "$SECS" -m "0x$((1 << CORE))" --json --progress 0 \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["total"]["iops"]))'
}

fio_iops() { # workload qd
    fio --name=cmp --filename="$FILE" --size=${SIZE_MB}M --rw="$1" --bs=4k --direct=1 \
        --ioengine=io_uring --iodepth="$2" --runtime="$SECS" --time_based \
        --cpus_allowed=$CORE --output-format=json \
        | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}

printf "%-9s %-10s %4s %14s %14s %7s\n" bdev workload qd ferroplane fio_io_uring ratio
for case in "randread 1" "randread 32" "randread 128" "randwrite 32"; do
    set -- $case
    for bdev in Null0 Malloc0; do
        printf "%-9s %-10s %4s %14s %14s %7s\n" "$bdev" "$1" "$2" "$(bdevperf_iops $bdev "$1" "$2")" - -
    done
    fp=$(bdevperf_iops Uring0 "$1" "$2")
    f=$(fio_iops "$1" "$2")
    ratio=$(python3 -c "print(f'{$fp/$f:.3f}')")
    printf "%-9s %-10s %4s %14s %14s %7s\n" Uring0 "$1" "$2" "$fp" "$f" "$ratio"
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r); file $FILE on $(df --output=source "$FILE" | tail -1)"
