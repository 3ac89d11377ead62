#!/usr/bin/env bash
# Interop test: Linux kernel NVMe/TCP initiator (nvme-tcp.ko in a QEMU guest)
# against the Ferroplane target running on the host.
#
# Usage: tests/kernel-initiator/run.sh            (needs root: apt-get, dpkg -x)
#
# Environment knobs:
#   FP_KI_CACHE      cache dir for debs / unpacked kernel   (~/.cache/ferroplane-kernel-initiator)
#   FP_KI_KERNEL     Debian kernel package to use            (linux-image-amd64's dependency,
#                                                             fallback: newest linux-image-6.1.0-N-amd64)
#   FP_KI_TIMEOUT    guest timeout in seconds                 (1080)
#   FP_KI_FIO_RUNTIME fio runtime in seconds                  (30)
#   FP_KI_NOBUILD=1  skip `cargo build`
#   FP_KI_KEEP=1     keep the work dir (logs, initramfs) for inspection
#   RUST_LOG         passed to the target                     (debug)
#   FP_KI_PCAP=FILE  also capture the guest's network traffic (qemu filter-dump) into FILE
#
# Output: host + guest steps are printed; the guest console goes to
# $WORK/guest.log and the target log to $WORK/target.log (both are also
# dumped on failure).  Exit status 0 only if the guest printed
# "KERNEL-INITIATOR: PASS".
set -euo pipefail

log() { printf '[kernel-initiator] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get install / download)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${FP_KI_CACHE:-${HOME:-/root}/.cache/ferroplane-kernel-initiator}"
TIMEOUT="${FP_KI_TIMEOUT:-1080}"
FIO_RUNTIME="${FP_KI_FIO_RUNTIME:-30}"
NQN="nqn.2016-06.io.ferroplane:cnode1"
# The same steps over a file-backed (O_DIRECT aio) namespace.
FILE_NQN="nqn.2016-06.io.ferroplane:file1"
# And over a thin lvol (1 MiB clusters) in a store on another aio file, as
# Longhorn exports its replicas: first writes allocate, flushes reach the file.
LVOL_NQN="nqn.2016-06.io.ferroplane:lvol1"
DISC_NQN="nqn.2014-08.org.nvmexpress.discovery"
IO_PORT="${FP_KI_IO_PORT:-4420}"
DISC_PORT="${FP_KI_DISC_PORT:-8009}"
BDEV_BLOCKS=65536      # 65536 * 4096 = 256 MiB
BDEV_BS=4096
BDEV_BYTES=$((BDEV_BLOCKS * BDEV_BS))

mkdir -p "$CACHE/debs"
WORK="$(mktemp -d /tmp/fp-kernel-initiator.XXXXXX)"
TARGET_PID=""
cleanup() {
    if [ -n "$TARGET_PID" ] && kill -0 "$TARGET_PID" 2>/dev/null; then
        log "stopping target (pid $TARGET_PID)"
        kill "$TARGET_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$TARGET_PID" 2>/dev/null || true
    fi
    if [ "${FP_KI_KEEP:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --------------------------------------------------------------------------
# 1. Host packages
# --------------------------------------------------------------------------
HOST_PKGS=(qemu-system-x86 busybox-static nvme-cli fio e2fsprogs kmod cpio xz-utils libaio1)
missing=()
for p in "${HOST_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
apt_updated=0
apt_update_once() {
    [ "$apt_updated" = 1 ] && return 0
    log "apt-get update"
    apt-get update -qq >/dev/null
    apt_updated=1
}
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for b in qemu-system-x86_64 busybox nvme fio mke2fs depmod modprobe cpio; do
    command -v "$b" >/dev/null || die "missing host tool: $b"
done

# --------------------------------------------------------------------------
# 2. Guest kernel (Debian package, unpacked into the cache)
# --------------------------------------------------------------------------
pick_kernel_pkg() {
    if [ -n "${FP_KI_KERNEL:-}" ]; then echo "$FP_KI_KERNEL"; return; fi
    # Reuse an already unpacked kernel if there is one (no network needed).
    local cached
    cached="$(ls -d "$CACHE"/kernel-linux-image-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
    if [ -n "$cached" ] && [ -f "$cached/.done" ]; then basename "$cached" | sed 's/^kernel-//'; return; fi
    local pkg
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    if [ -z "$pkg" ]; then apt_update_once
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    fi
    if [ -z "$pkg" ]; then
        pkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)"
    fi
    if [ -z "$pkg" ]; then
        pkg="$(apt-cache search --names-only '^linux-image-[0-9].*-amd64$' | awk '{print $1}' | sort -V | tail -1)"
    fi
    [ -n "$pkg" ] || die "no linux-image-*-amd64 package found via apt"
    echo "$pkg"
}
KPKG="$(pick_kernel_pkg)"
KDIR="$CACHE/kernel-$KPKG"
if [ ! -f "$KDIR/.done" ]; then
    log "downloading + unpacking $KPKG"
    rm -rf "$KDIR"; mkdir -p "$KDIR"
    ( cd "$CACHE/debs" && ls "${KPKG}"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true )
    deb="$(ls "$CACHE/debs/${KPKG}"_*.deb 2>/dev/null | tail -1)"
    [ -n "$deb" ] || { apt_update_once; ( cd "$CACHE/debs" && apt-get download "$KPKG" ); deb="$(ls "$CACHE/debs/${KPKG}"_*.deb | tail -1)"; }
    dpkg -x "$deb" "$KDIR"
    touch "$KDIR/.done"
else
    log "using cached kernel $KPKG"
fi
KVER="$(ls "$KDIR/lib/modules" | head -1)"
VMLINUZ="$KDIR/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "no vmlinuz in $KDIR"
[ -f "$KDIR/lib/modules/$KVER/modules.dep" ] || depmod -b "$KDIR" "$KVER"
log "guest kernel: $KVER"

# --------------------------------------------------------------------------
# 3. Initramfs
# --------------------------------------------------------------------------
IR="$WORK/initramfs"
mkdir -p "$IR"/{bin,sbin,etc/nvme,proc,sys,dev,tmp,mnt,run,var/run,lib64,usr/bin,usr/sbin}
cp "$(command -v busybox)" "$IR/bin/busybox"
file "$IR/bin/busybox" 2>/dev/null | grep -q 'statically linked' || ldd "$IR/bin/busybox" 2>&1 | grep -q 'not a dynamic' \
    || die "host busybox is not static (install busybox-static)"

# Modules: closure of what we need, decompressed, depmod'ed so that the guest's
# busybox modprobe (and the kernel's request_module, e.g. for crc32c) works.
MODS=(virtio_pci virtio_net nvme-tcp ext4 crc32c_generic crc32c-intel crct10dif_generic crct10dif-pclmul)
log "collecting modules: ${MODS[*]}"
for m in "${MODS[@]}"; do
    modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}'
done | sort -u | while read -r path; do
    rel="${path#"$KDIR"}"
    dst="$IR${rel%.xz}"; dst="${dst%.zst}"
    mkdir -p "$(dirname "$dst")"
    case "$path" in
        *.xz)  xz -dc "$path" >"$dst" ;;
        *.zst) zstd -dcq "$path" >"$dst" ;;
        *)     cp "$path" "$dst" ;;
    esac
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    [ -f "$KDIR/lib/modules/$KVER/$f" ] && cp "$KDIR/lib/modules/$KVER/$f" "$IR/lib/modules/$KVER/"
done
depmod -b "$IR" "$KVER"

# Dynamic binaries + their libraries + the loader.
copy_bin() {
    local src="$1" dst="$IR$2"
    mkdir -p "$(dirname "$dst")"; cp -L "$src" "$dst"
    ldd "$src" | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\// {print $1}' | while read -r lib; do
        [ -e "$IR$lib" ] && continue
        mkdir -p "$IR$(dirname "$lib")"; cp -L "$lib" "$IR$lib"
    done
}
copy_bin "$(command -v nvme)" /usr/sbin/nvme
copy_bin "$(command -v fio)" /usr/bin/fio
copy_bin "$(command -v mke2fs)" /sbin/mke2fs
ln -sf mke2fs "$IR/sbin/mkfs.ext4"
cp /etc/mke2fs.conf "$IR/etc/" 2>/dev/null || true
# libaio engine is linked into fio; name resolution not needed (IPs only).
echo "root:x:0:0:root:/root:/bin/sh" >"$IR/etc/passwd"

cat >"$IR/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run/nvme; mount -t tmpfs tmpfs /tmp
echo /sbin/modprobe >/proc/sys/kernel/modprobe
NQN="$NQN"
FILE_NQN="$FILE_NQN"
LVOL_NQN="$LVOL_NQN"
HOST=10.0.2.2
IO_PORT=$IO_PORT
DISC_PORT=$DISC_PORT
BDEV_BYTES=$BDEV_BYTES
FIO_RUNTIME=$FIO_RUNTIME
EOF
cat >>"$IR/init" <<'EOF'
FAILED=""
pass() { echo "STEP $1: PASS"; }
fail() { echo "STEP $1: FAIL"; [ -z "$FAILED" ] && FAILED="$1"; }
finish() {
    echo "----- guest dmesg (nvme/tcp) -----"
    dmesg | grep -iE 'nvme|tcp|blk_update|I/O error|ext4' | tail -60
    echo "----------------------------------"
    if [ -z "$FAILED" ]; then echo "KERNEL-INITIATOR: PASS"; else echo "KERNEL-INITIATOR: FAIL $FAILED"; fi
    sync; poweroff -f
}
# run <step> <cmd...>: run, show output, record PASS/FAIL
run() {
    st="$1"; shift
    echo "=== STEP $st: $*"
    if "$@" >/tmp/out 2>&1; then cat /tmp/out; pass "$st"; return 0
    else rc=$?; cat /tmp/out; echo "(exit $rc)"; dmesg | tail -15; fail "$st"; return 1; fi
}
# namespace block device (skip hidden per-path nodes nvmeXcYnZ of native multipath)
nsdev() { for d in /sys/block/nvme*n*; do n=${d##*/}; case $n in *c*) continue;; esac
    [ -b "/dev/$n" ] && { echo "/dev/$n"; return 0; }; done; return 1; }
wait_ns() { i=0; while [ $i -lt 100 ]; do nsdev >/dev/null && { sleep 0.5; return 0; }; sleep 0.1; i=$((i+1)); done; return 1; }
wait_no_ns() { i=0; while [ $i -lt 100 ]; do nsdev >/dev/null || return 0; sleep 0.1; i=$((i+1)); done; return 1; }

echo "=== guest up: $(uname -r)"
for m in virtio_pci virtio_net crc32c_generic nvme-tcp ext4; do modprobe $m || echo "modprobe $m failed"; done
modprobe crc32c-intel 2>/dev/null || echo "(crc32c-intel not usable on this vCPU: digests use crc32c_generic)"
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    && pass net || { fail net; finish; }
# nvme-cli derives the host NQN from the DMI product UUID, which is all zeroes
# under QEMU unless -uuid is given; fall back to a random UUID in that case.
nvme gen-hostnqn >/etc/nvme/hostnqn 2>/dev/null
if ! grep -q 'uuid:' /etc/nvme/hostnqn || grep -q '00000000-0000-0000-0000-000000000000' /etc/nvme/hostnqn; then
    echo "nqn.2014-08.org.nvmexpress:uuid:$(cat /proc/sys/kernel/random/uuid)" >/etc/nvme/hostnqn
fi
sed 's/.*uuid://' /etc/nvme/hostnqn >/etc/nvme/hostid
echo "hostnqn: $(cat /etc/nvme/hostnqn)"

# 1. discovery
run discover nvme discover -t tcp -a $HOST -s $DISC_PORT
grep -q "$NQN" /tmp/out || { echo "discovery log does not list $NQN"; fail discover-lists-subsystem; }

# 2. connect without digests, check namespace + size
check_size() {
    dev=$(nsdev) || { echo "no nvme namespace block device"; return 1; }
    sz=$(( $(cat /sys/block/${dev#/dev/}/size) * 512 ))
    echo "$dev size $sz bytes (expected $BDEV_BYTES)"
    [ "$sz" = "$BDEV_BYTES" ]
}
if run connect nvme connect -t tcp -a $HOST -s $IO_PORT -n $NQN; then
    wait_ns || echo "namespace did not appear"
    run list nvme list
    nvme list 2>/dev/null | grep -q nvme || fail list-shows-ns
    run size check_size
    run disconnect nvme disconnect -n $NQN
    wait_no_ns
fi

# 3. connect with header + data digests; fio verify; 4. filesystem: mkfs,
# write, checksum, reconnect, verify (each step needs the previous one).
# Run over the RAM namespace and again over the file-backed one (tag "-file").
exercise() {
    nqn=$1; t=$2
    if run connect-digest$t nvme connect -t tcp -a $HOST -s $IO_PORT -n $nqn --hdr-digest --data-digest; then
        wait_ns || echo "namespace did not appear"
        DEV=$(nsdev)
        run size-digest$t check_size
        run fio$t fio --name=v --filename=$DEV --rw=randrw --bs=4k --iodepth=8 --ioengine=libaio \
            --direct=1 --verify=crc32c --verify_backlog=512 --size=32M --runtime=$FIO_RUNTIME --time_based
        # large (MDTS-sized and bigger) sequential verify pass: exercises R2T/H2C + C2H splitting
        run fio-large$t fio --name=big --filename=$DEV --rw=write --bs=512k --iodepth=4 --ioengine=libaio \
            --direct=1 --verify=crc32c --size=64M --offset=64M
        SUM1=""
        if run mkfs$t mkfs.ext4 -q -F $DEV && run mount$t mount -t ext4 $DEV /mnt; then
            run write-file$t dd if=/dev/urandom of=/mnt/data bs=1M count=16 && sync \
                && SUM1=$(md5sum /mnt/data | cut -d' ' -f1) && echo "md5 before: $SUM1"
            run umount$t umount /mnt
        fi
        run disconnect-digest$t nvme disconnect -n $nqn
        wait_no_ns
        if [ -n "$SUM1" ] && run reconnect$t nvme connect -t tcp -a $HOST -s $IO_PORT -n $nqn --hdr-digest --data-digest; then
            wait_ns || echo "namespace did not appear"
            DEV=$(nsdev)
            if run remount$t mount -t ext4 $DEV /mnt; then
                SUM2=$(md5sum /mnt/data | cut -d' ' -f1); echo "md5 after:  $SUM2"
                if [ "$SUM1" = "$SUM2" ]; then pass checksum$t; else fail checksum$t; fi
                run umount-2$t umount /mnt
            fi
        elif [ -z "$SUM1" ]; then fail checksum$t; fi
        nsdev >/dev/null && run disconnect-final$t nvme disconnect -n $nqn
        wait_no_ns
    fi
}
exercise $NQN ""
exercise $FILE_NQN -file
exercise $LVOL_NQN -lvol
finish
EOF
chmod +x "$IR/init"
INITRD="$WORK/initramfs.cpio.gz"
( cd "$IR" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 >"$INITRD" )
log "initramfs: $(du -h "$INITRD" | cut -f1)"

# --------------------------------------------------------------------------
# 4. Target
# --------------------------------------------------------------------------
if [ "${FP_KI_NOBUILD:-0}" != 1 ]; then
    log "cargo build --release --bin ferroplane"
    ( cd "$ROOT" && cargo build --release --bin ferroplane )
fi
BIN="$ROOT/target/release/ferroplane"
[ -x "$BIN" ] || die "no $BIN"
for port in "$IO_PORT" "$DISC_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port already in use on 127.0.0.1"; fi
done
CFG="$WORK/target.json"
BACKING_FILE="$WORK/file0.img"
truncate -s "$BDEV_BYTES" "$BACKING_FILE"
LVS_FILE="$WORK/lvs0.img"
# The lvol plus room for the store's metadata.
truncate -s "$((BDEV_BYTES + 16 * 1024 * 1024))" "$LVS_FILE"
cat >"$CFG" <<EOF
{
  "subsystems": [
    {
      "subsystem": "bdev",
      "config": [
        {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": $BDEV_BLOCKS, "block_size": $BDEV_BS}},
        {"method": "bdev_aio_create", "params": {"name": "File0", "filename": "$BACKING_FILE", "block_size": $BDEV_BS}},
        {"method": "bdev_aio_create", "params": {"name": "File1", "filename": "$LVS_FILE", "block_size": $BDEV_BS}},
        {"method": "bdev_lvol_create_lvstore", "params": {"bdev_name": "File1", "lvs_name": "lvs0", "cluster_sz": 1048576}},
        {"method": "bdev_lvol_create", "params": {"lvs_name": "lvs0", "lvol_name": "vol", "size_in_mib": $((BDEV_BYTES / 1048576)), "thin_provision": true}},
        {"method": "bdev_wait_for_examine"}
      ]
    },
    {
      "subsystem": "nvmf",
      "config": [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "serial_number": "FP0001", "allow_any_host": true}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "Malloc0"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN", "listen_address": {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$IO_PORT"}}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": "$FILE_NQN", "serial_number": "FP0002", "allow_any_host": true}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$FILE_NQN", "namespace": {"bdev_name": "File0"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$FILE_NQN", "listen_address": {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$IO_PORT"}}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": "$LVOL_NQN", "serial_number": "FP0003", "allow_any_host": true}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$LVOL_NQN", "namespace": {"bdev_name": "lvs0/vol"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$LVOL_NQN", "listen_address": {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$IO_PORT"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$DISC_NQN", "listen_address": {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$DISC_PORT"}}}
      ]
    }
  ]
}
EOF
log "starting target: $BIN -m 0x3 -r $WORK/rpc.sock -c $CFG"
RUST_LOG="${RUST_LOG:-debug}" "$BIN" -m 0x3 -r "$WORK/rpc.sock" -c "$CFG" >"$WORK/target.log" 2>&1 &
TARGET_PID=$!
ready=0
for _ in $(seq 100); do
    kill -0 "$TARGET_PID" 2>/dev/null || { cat "$WORK/target.log" >&2; die "target exited during start-up"; }
    if grep -q 'ferroplane ready' "$WORK/target.log"; then ready=1; break; fi
    sleep 0.1
done
[ "$ready" = 1 ] || { cat "$WORK/target.log" >&2; die "target did not start listening on $IO_PORT/$DISC_PORT"; }
grep -m2 'nvme connect' "$WORK/target.log" >&2 || true
log "target ready (pid $TARGET_PID)"

# --------------------------------------------------------------------------
# 5. Guest
# --------------------------------------------------------------------------
log "booting guest (TCG, timeout ${TIMEOUT}s); console -> $WORK/guest.log"
set +e
timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -nographic \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1" -no-reboot \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    ${FP_KI_PCAP:+-object filter-dump,id=f0,netdev=n0,file=$FP_KI_PCAP,maxlen=256} </dev/null 2>&1 | tee "$WORK/guest.log" | tr -d '\r' \
    | grep --line-buffered -vE '^\s*$' >&2
qrc=${PIPESTATUS[0]}
set -e
[ "$qrc" = 124 ] && log "guest timed out after ${TIMEOUT}s"

if grep -q 'KERNEL-INITIATOR: PASS' "$WORK/guest.log"; then
    log "RESULT: PASS"
    exit 0
fi
log "RESULT: FAIL ($(tr -d '\r' <"$WORK/guest.log" | grep -o 'KERNEL-INITIATOR: FAIL.*' || echo 'no result marker from guest'))"
log "----- target log (last 150 lines of $WORK/target.log) -----"
tail -150 "$WORK/target.log" >&2
FP_KI_KEEP=1
exit 1
