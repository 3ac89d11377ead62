//! `ferroplane-perf`: an NVMe/TCP load generator in the manner of
//! `spdk_nvme_perf`: connects to a subsystem, opens one I/O queue per core
//! of `-c` (a thread pinned to each), keeps `-q` commands in flight on each
//! for `-t` seconds and reports IOPS, MiB/s and latency percentiles per
//! core and in total. The admin queue sends Keep Alive meanwhile.
//!
//! Each worker uses the batched blocking host queue of `nvmf::initiator`:
//! every response received is answered by the next command, and all
//! commands queued while responses were buffered leave in one write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// Sleep in the kernel while waiting for responses instead of
    /// busy-polling the sockets (spdk_nvme_perf always polls).
    #[arg(long)]
    no_busy_poll: bool,
    /// Core mask: one I/O queue and thread per core (spdk_nvme_perf's -c).
    #[arg(short = 'c', default_value = "0x1")]
    core_mask: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000fe55";

/// What one worker measured.
struct WorkerResult {
    core: u32,
    done: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
}

/// The workload, shared by the workers.
#[derive(Clone)]
struct Job {
    addr: SocketAddr,
    nqn: String,
    cntlid: u16,
    digests: Digests,
    nsid: u32,
    io_size: u32,
    nlb: u32,
    units: u64,
    random: bool,
    reads_pct: u32,
    qd: u16,
    time: Duration,
    busy_poll: bool,
}

fn pin_to(core: u32) {
    // SAFETY: cpu_set_t is plain data; the calls only read/write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
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
    let digests = Digests {
        header: a.hdr_digest,
        data: a.data_digest,
    };
    let e = |e: nvmf::initiator::HostError| e.to_string();
    let mut admin = HostQueue::connect(addr, &nqn, HOSTNQN, 0, 0, 31, digests).map_err(e)?;
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
            HostPdu::Data(..) => ns.extend_from_slice(admin.data()),
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
    let (random, reads_pct) = match a.workload.as_str() {
        "read" => (false, 100),
        "randread" => (true, 100),
        "write" => (false, 0),
        "randwrite" => (true, 0),
        "rw" => (false, a.read_pct),
        "randrw" => (true, a.read_pct),
        w => return Err(format!("unknown workload {w}")),
    };
    let cores = reactor::CoreSet::parse_mask(&a.core_mask)
        .map_err(|e| format!("-c {}: {e}", a.core_mask))?;
    let job = Job {
        addr,
        nqn: nqn.clone(),
        cntlid: admin.cntlid,
        digests,
        nsid: a.nsid,
        io_size: a.io_size,
        nlb,
        units: nsze / nlb as u64,
        random,
        reads_pct,
        qd,
        time: Duration::from_secs(a.time_s),
        busy_poll: !a.no_busy_poll,
    };
    // Keep the controller alive for runs longer than its KATO.
    let stop = Arc::new(AtomicBool::new(false));
    let keeper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= Duration::from_secs(5) {
                    last = Instant::now();
                    let mut ka = Sqe::default();
                    ka.set_opcode(0x18).set_flags(FLAGS_PSDT_SGL).set_cid(2);
                    if admin.send(&ka, &[]).is_err() || admin.recv().is_err() {
                        break;
                    }
                }
            }
        })
    };
    let workers: Vec<_> = cores
        .cores()
        .iter()
        .enumerate()
        .map(|(i, core)| {
            let (job, core) = (job.clone(), core.0);
            std::thread::spawn(move || worker(&job, i as u16 + 1, core))
        })
        .collect();
    let mut results = Vec::new();
    for w in workers {
        results.push(w.join().map_err(|_| "worker panicked".to_string())??);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = keeper.join();
    let mut total =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let (mut iops, mut errors) = (0.0, 0);
    for r in &results {
        let _ = total.add(&r.hist);
        iops += r.done as f64 / r.secs;
        errors += r.errors;
    }
    let mibs = |iops: f64| iops * a.io_size as f64 / (1 << 20) as f64;
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if a.json {
        let per_core: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({"core": r.core, "iops": r.done as f64 / r.secs,
                "avg_us": r.hist.mean() / 1000.0})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"iops": iops, "mibps": mibs(iops), "errors": errors,
                "latency_us": {"avg": total.mean() / 1000.0, "p50": us(&total, 0.5),
                               "p99": us(&total, 0.99), "p99_9": us(&total, 0.999),
                               "max": total.max() as f64 / 1000.0},
                "cores": per_core})
        );
    } else {
        if results.len() > 1 {
            for r in &results {
                let i = r.done as f64 / r.secs;
                println!(
                    "  core {}: {:.0} IOPS {:.1} MiB/s avg {:.1} us",
                    r.core,
                    i,
                    mibs(i),
                    r.hist.mean() / 1000.0
                );
            }
        }
        println!(
            "{addr} {nqn} ns {} {} q{} {}B x{} queues: {:.0} IOPS {:.1} MiB/s avg {:.1} us p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} errors {}",
            a.nsid,
            a.workload,
            qd,
            a.io_size,
            results.len(),
            iops,
            mibs(iops),
            total.mean() / 1000.0,
            us(&total, 0.5),
            us(&total, 0.99),
            us(&total, 0.999),
            total.max() as f64 / 1000.0,
            errors
        );
    }
    if errors > 0 {
        return Err(format!("{errors} I/O errors"));
    }
    Ok(())
}

/// One I/O queue driven from one pinned thread.
fn worker(j: &Job, qid: u16, core: u32) -> Result<WorkerResult, String> {
    pin_to(core);
    let e = |e: nvmf::initiator::HostError| e.to_string();
    let mut io = HostQueue::connect(
        j.addr,
        &j.nqn,
        HOSTNQN,
        qid,
        j.cntlid,
        j.qd.max(2) - 1,
        j.digests,
    )
    .map_err(e)?;
    io.set_busy_poll(j.busy_poll).map_err(e)?;
    io.set_discard_data(true);
    let payload = vec![0xA5u8; j.io_size as usize];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ ((core as u64 + 1) << 32));
    let mut seq = (qid as u64 - 1) * (j.units / 8).max(1);
    let mut started: Vec<Instant> = vec![Instant::now(); j.qd as usize];
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut submit = |io: &mut HostQueue, cid: u16, started: &mut Vec<Instant>| {
        let unit = if j.random {
            rng.next() % j.units
        } else {
            seq = (seq + 1) % j.units;
            seq
        };
        let read = (rng.next() % 100) < j.reads_pct as u64;
        let mut sqe = Sqe::default();
        sqe.set_opcode(if read { 0x02 } else { 0x01 })
            .set_flags(FLAGS_PSDT_SGL)
            .set_cid(cid)
            .set_nsid(j.nsid)
            .set_rw(unit * j.nlb as u64, j.nlb);
        // Writes of up to 4 KiB go in the capsule (the target's default
        // in-capsule size); larger ones by R2T.
        let in_capsule = !read && j.io_size <= 4096;
        sqe.set_sgl(if in_capsule {
            SglDescriptor::in_capsule(0, j.io_size)
        } else {
            SglDescriptor::transport(j.io_size)
        });
        started[cid as usize] = Instant::now();
        io.send(&sqe, if in_capsule { &payload } else { &[] })
            .map_err(|e| e.to_string())
    };
    for cid in 0..j.qd {
        submit(&mut io, cid, &mut started)?;
    }
    let start = Instant::now();
    let end = start + j.time;
    let (mut done, mut errors) = (0u64, 0u64);
    let mut outstanding = j.qd as u64;
    while outstanding > 0 {
        match io.recv().map_err(e)? {
            HostPdu::Data(..) => {}
            HostPdu::R2T(cid, ttag, off, len) => {
                io.send_h2c(cid, ttag, off, &payload[off as usize..(off + len) as usize])
                    .map_err(e)?;
            }
            HostPdu::Resp(c) => {
                let cid = c.cid();
                let now = Instant::now();
                let ns_lat = started
                    .get(cid as usize)
                    .map_or(0, |s| now.duration_since(*s).as_nanos() as u64);
                let _ = hist.record(ns_lat.max(1));
                if c.status().is_success() {
                    done += 1;
                } else {
                    errors += 1;
                }
                if now < end {
                    submit(&mut io, cid, &mut started)?;
                } else {
                    outstanding -= 1;
                }
            }
        }
    }
    Ok(WorkerResult {
        core,
        done,
        errors,
        secs: start.elapsed().as_secs_f64(),
        hist,
    })
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(a) {
        eprintln!("ferroplane-perf: {e}");
        std::process::exit(1);
    }
}
