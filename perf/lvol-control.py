#!/usr/bin/env python3
"""Lvol control-path figures through the real binary:

1. Store load time with 1,000 lvols: a store on a uring bdev over a file,
   1,000 thin lvols (each with one written cluster), then a restart with the
   saved configuration; the time from the process start to the end of
   `bdev_wait_for_examine` (every lvol registered), against the same
   restart with an empty store in the same run.
2. Snapshot creation under load: ferroplane-perf writes 4 KiB random QD32
   over NVMe/TCP to a thin lvol (target core 0, client core 1) while the
   head (64 MiB, in a 4 GiB store: room for every snapshot's copies) is
   snapshotted every 0.5 s; the snapshot RPC's latency, and the
   IOPS of that run against a run without snapshots.

Usage: perf/lvol-control.py [--lvols N] [--seconds S]   (release build)
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/ferroplane")
PERF = os.path.join(ROOT, "target/release/ferroplane-perf")
MIB = 1 << 20


class Rpc:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.buf = b""
        self.id = 0

    def call(self, method, params=None):
        self.id += 1
        req = {"jsonrpc": "2.0", "id": self.id, "method": method}
        if params is not None:
            req["params"] = params
        self.s.sendall(json.dumps(req).encode())
        dec = json.JSONDecoder()
        while True:
            try:
                text = self.buf.decode()
                obj, end = dec.raw_decode(text.lstrip())
                self.buf = text.lstrip()[end:].encode()
                if "error" in obj:
                    raise RuntimeError(f"{method}: {obj['error']}")
                return obj["result"]
            except (ValueError, UnicodeDecodeError):
                chunk = self.s.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("socket closed")
                self.buf += chunk


def start(sock, args):
    if os.path.exists(sock):
        os.unlink(sock)
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "-r", sock] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.001)
    for _ in range(5000):
        try:
            r = Rpc(sock)
            return p, r, t0
        except OSError:
            time.sleep(0.001)
    raise RuntimeError("no socket")


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(30)


def load_time(n_lvols, work):
    img = os.path.join(work, "lvs.img")
    with open(img, "wb") as f:
        f.truncate((n_lvols + 64) * MIB + 64 * MIB)
    sock = os.path.join(work, "rpc.sock")
    conf = os.path.join(work, "conf.json")
    p, r, _ = start(sock, ["--cpus", "0"])
    r.call("bdev_uring_create", {"name": "F0", "filename": img, "block_size": 4096})
    r.call("bdev_lvol_create_lvstore", {"bdev_name": "F0", "lvs_name": "lvs0", "cluster_sz": MIB})
    with open(conf, "w") as f:
        json.dump(r.call("save_config"), f)
    stop(p)
    empty = []
    for _ in range(3):
        p, r, t0 = start(sock, ["--cpus", "0", "-c", conf])
        r.call("bdev_wait_for_examine")
        empty.append(time.monotonic() - t0)
        stop(p)
    p, r, _ = start(sock, ["--cpus", "0", "-c", conf])
    r.call("bdev_wait_for_examine")
    t = time.monotonic()
    data = "ab" * 4096
    for i in range(n_lvols):
        r.call("bdev_lvol_create", {"lvs_name": "lvs0", "lvol_name": f"vol{i}", "size_in_mib": 4, "thin_provision": True})
        r.call("bdev_write", {"name": f"lvs0/vol{i}", "offset_blocks": 0, "data": data})
    create = time.monotonic() - t
    stop(p)
    full = []
    for _ in range(3):
        p, r, t0 = start(sock, ["--cpus", "0", "-c", conf])
        r.call("bdev_wait_for_examine")
        full.append(time.monotonic() - t0)
        n = len(r.call("bdev_lvol_get_lvols"))
        stop(p)
        assert n == n_lvols, n
    print(f"store load: {n_lvols} lvols (each one cluster written, created in {create:.1f} s): "
          f"start to examined {statistics.median(full) * 1000:.0f} ms (runs {[round(x * 1000) for x in full]}), "
          f"empty store {statistics.median(empty) * 1000:.0f} ms; the lvols add "
          f"{(statistics.median(full) - statistics.median(empty)) * 1000:.0f} ms")


def snapshots_under_load(seconds, work):
    sock = os.path.join(work, "rpc2.sock")
    p, r, _ = start(sock, ["--cpus", "0"])
    r.call("bdev_malloc_create", {"name": "M0", "num_blocks": 4096 * 256, "block_size": 4096})
    r.call("bdev_lvol_create_lvstore", {"bdev_name": "M0", "lvs_name": "lvs0", "cluster_sz": MIB})
    uuid = r.call("bdev_lvol_create", {"lvs_name": "lvs0", "lvol_name": "head", "size_in_mib": 64, "thin_provision": True})
    nqn = "nqn.2016-06.io.spdk:lvol"
    r.call("nvmf_create_transport", {"trtype": "TCP"})
    r.call("nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": True})
    r.call("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": uuid}})
    r.call("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4431"}})

    def perf():
        out = subprocess.run([PERF, "-c", "0x2", "--json", "-t", str(seconds), "-q", "32", "-o", "4096", "-w", "randwrite",
                              "-r", f"trtype:tcp adrfam:IPv4 traddr:127.0.0.1 trsvcid:4431 subnqn:{nqn}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ferroplane-perf failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    base = perf()  # also allocates every cluster of the head once
    lat = []
    res = {}
    th = threading.Thread(target=lambda: res.update(perf()))
    th.start()
    time.sleep(1)
    i = 0
    while th.is_alive():
        t = time.monotonic()
        r.call("bdev_lvol_snapshot", {"lvol_name": uuid, "snapshot_name": f"s{i}"})
        lat.append(time.monotonic() - t)
        i += 1
        time.sleep(0.5)
    th.join()
    stop(p)
    lat_ms = sorted(x * 1000 for x in lat)
    print(f"snapshot under 4 KiB randwrite QD32: {len(lat)} snapshots, latency median {statistics.median(lat_ms):.1f} ms, "
          f"max {lat_ms[-1]:.1f} ms; writes {res['iops']:,.0f} IOPS with snapshots vs {base['iops']:,.0f} without "
          f"(ratio {res['iops'] / base['iops']:.2f}; every snapshot makes the head's next write to each cluster a copy)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lvols", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "--workspace"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        load_time(a.lvols, work)
        snapshots_under_load(a.seconds, work)


if __name__ == "__main__":
    sys.exit(main())
