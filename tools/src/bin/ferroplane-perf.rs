//! `ferroplane-perf`: an NVMe/TCP load generator in the manner of
//! `spdk_nvme_perf`: connects to a subsystem, opens one I/O queue, keeps
//! `-q` commands in flight for `-t` seconds and reports IOPS, MiB/s and
//! latency percentiles.
//!
//! First version: one queue on one thread with a blocking socket (the
//! pipelined commands share it); per-core queues and batched sockets come
//! with the target's data-path work.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use nvmf::initiator::{HostPdu, HostQueue};
use nvmf::wire::nvme::{SglDescriptor, Sqe, FLAGS_PSDT_SGL};
use nvmf::wire::pdu::Digests;

#[derive(Parser, Debug)]
#[command(name = "ferroplane-perf", about = "NVMe/TCP load generator")]
struct Args {
    /// Transport ID: 'trtype:tcp adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:NQN'
    #[arg(short = 'r')]
    trid: String,
    /// Queue depth.
    #[arg(short = 'q', default_value_t = 32)]
    queue_depth: u16,
    /// I/O size in bytes.
    #[arg(short = 'o', default_value_t = 4096)]
    io_size: u32,
    /// read, write, randread, randwrite, rw, randrw.
    #[arg(short = 'w', default_value = "randread")]
    workload: String,
    /// Read percentage for rw/randrw.
    #[arg(short = 'M', default_value_t = 50)]
    read_pct: u32,
    /// Seconds.
    #[arg(short = 't', default_value_t = 5)]
    time_s: u64,
    /// Namespace to use.
    #[arg(short = 'n', long = "nsid", default_value_t = 1)]
    nsid: u32,
    #[arg(long = "hdr-digest")]
    hdr_digest: bool,
    #[arg(long = "data-digest")]
    data_digest: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_trid(s: &str) -> Result<(SocketAddr, String), String> {
    let mut kv = HashMap::new();
    for part in s.split_whitespace() {
        let (k, v) = part
            .split_once(':')
            .ok_or(format!("bad transport ID field {part:?}"))?;
        kv.insert(k.to_ascii_lowercase(), v.to_string());
    }
    if kv
        .get("trtype")
        .is_some_and(|t| !t.eq_ignore_ascii_case("tcp"))
    {
        return Err("only trtype:tcp is supported".into());
    }
    let addr = format!(
        "{}:{}",
        kv.get("traddr").ok_or("traddr missing")?,
        kv.get("trsvcid").map_or("4420", |s| s.as_str())
    );
    let addr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let nqn = kv.get("subnqn").ok_or("subnqn missing")?.clone();
    Ok((addr, nqn))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run(a: Args) -> Result<(), String> {
    let (addr, nqn) = parse_trid(&a.trid)?;
    let hostnqn = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000fe55";
    let digests = Digests {
        header: a.hdr_digest,
        data: a.data_digest,
    };
    let e = |e: nvmf::initiator::HostError| e.to_string();
    let mut admin = HostQueue::connect(addr, &nqn, hostnqn, 0, 0, 31, digests).map_err(e)?;
    // Identify the namespace for its size and block size.
    let mut id = Sqe::default();
    id.set_opcode(0x06)
        .set_flags(FLAGS_PSDT_SGL)
        .set_cid(1)
        .set_nsid(a.nsid)
        .set_sgl(SglDescriptor::transport(4096))
        .set_cdw(10, 0);
    admin.send(&id, &[]).map_err(e)?;
    let mut ns = Vec::new();
    loop {
        match admin.recv().map_err(e)? {
            HostPdu::Data(_, _, d) => ns.extend_from_slice(&d),
            HostPdu::Resp(c) if c.status().is_success() => break,
            HostPdu::Resp(c) => {
                return Err(format!("identify namespace {}: {:?}", a.nsid, c.status()))
            }
            HostPdu::R2T(..) => return Err("unexpected R2T".into()),
        }
    }
    let nsze = u64::from_le_bytes(ns[0..8].try_into().map_err(|_| "short identify")?);
    let lbads = ns[130];
    if nsze == 0 || lbads < 9 {
        return Err(format!("namespace {} is not active", a.nsid));
    }
    let bs = 1u32 << lbads;
    if a.io_size == 0 || !a.io_size.is_multiple_of(bs) {
        return Err(format!(
            "-o {} is not a multiple of the block size {bs}",
            a.io_size
        ));
    }
    let nlb = a.io_size / bs;
    let qd = a.queue_depth.max(1);
    let mut io = HostQueue::connect(addr, &nqn, hostnqn, 1, admin.cntlid, qd.max(2) - 1, digests)
        .map_err(e)?;
    let (random, reads_pct) = match a.workload.as_str() {
        "read" => (false, 100),
        "randread" => (true, 100),
        "write" => (false, 0),
        "randwrite" => (true, 0),
        "rw" => (false, a.read_pct),
        "randrw" => (true, a.read_pct),
        w => return Err(format!("unknown workload {w}")),
    };
    let units = nsze / nlb as u64;
    let payload = vec![0xA5u8; a.io_size as usize];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut seq = 0u64;
    let mut started: Vec<Instant> = vec![Instant::now(); qd as usize];
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut submit =
        |io: &mut HostQueue, cid: u16, started: &mut Vec<Instant>| -> Result<(), String> {
            let unit = if random {
                rng.next() % units
            } else {
                seq = (seq + 1) % units;
                seq
            };
            let read = (rng.next() % 100) < reads_pct as u64;
            let mut sqe = Sqe::default();
            sqe.set_opcode(if read { 0x02 } else { 0x01 })
                .set_flags(FLAGS_PSDT_SGL)
                .set_cid(cid)
                .set_nsid(a.nsid)
                .set_rw(unit * nlb as u64, nlb);
            // Writes of up to 4 KiB go in the capsule (the target's default
            // in-capsule size); larger ones by R2T.
            let in_capsule = !read && a.io_size <= 4096;
            sqe.set_sgl(if in_capsule {
                SglDescriptor::in_capsule(0, a.io_size)
            } else {
                SglDescriptor::transport(a.io_size)
            });
            started[cid as usize] = Instant::now();
            io.send(&sqe, if in_capsule { &payload } else { &[] })
                .map_err(|e| e.to_string())
        };
    for cid in 0..qd {
        submit(&mut io, cid, &mut started)?;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(a.time_s);
    let (mut done, mut errors) = (0u64, 0u64);
    let mut outstanding = qd as u64;
    while outstanding > 0 {
        match io.recv().map_err(e)? {
            HostPdu::Data(..) => {}
            HostPdu::R2T(cid, ttag, off, len) => {
                io.send_h2c(cid, ttag, off, &payload[off as usize..(off + len) as usize])
                    .map_err(e)?;
            }
            HostPdu::Resp(c) => {
                let cid = c.cid();
                let ns_lat = started
                    .get(cid as usize)
                    .map_or(0, |s| s.elapsed().as_nanos() as u64);
                let _ = hist.record(ns_lat.max(1));
                if c.status().is_success() {
                    done += 1;
                } else {
                    errors += 1;
                }
                if Instant::now() < end {
                    submit(&mut io, cid, &mut started)?;
                } else {
                    outstanding -= 1;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let iops = done as f64 / secs;
    let mibs = iops * a.io_size as f64 / (1 << 20) as f64;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"iops": iops, "mibps": mibs, "errors": errors,
                "latency_us": {"avg": hist.mean() / 1000.0, "p50": us(0.5), "p99": us(0.99),
                               "p99_9": us(0.999), "max": hist.max() as f64 / 1000.0}})
        );
    } else {
        println!(
            "{addr} {nqn} ns {} {} q{} {}B: {:.0} IOPS {:.1} MiB/s avg {:.1} us p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} errors {}",
            a.nsid,
            a.workload,
            qd,
            a.io_size,
            iops,
            mibs,
            hist.mean() / 1000.0,
            us(0.5),
            us(0.99),
            us(0.999),
            hist.max() as f64 / 1000.0,
            errors
        );
    }
    if errors > 0 {
        return Err(format!("{errors} I/O errors"));
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(a) {
        eprintln!("ferroplane-perf: {e}");
        std::process::exit(1);
    }
}
