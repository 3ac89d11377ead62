//! Per-bdev I/O statistics, kept per channel (so per core, lock-free) and
//! summed on demand; the JSON shape is SPDK's `bdev_get_iostat`.

use serde_json::{json, Map, Value};

use crate::io::{IoStatus, IoType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyStat {
    /// Sum of latencies, in ticks.
    pub total_ticks: u64,
    pub max_ticks: u64,
    /// u64::MAX until the first I/O.
    pub min_ticks: u64,
}

impl Default for LatencyStat {
    fn default() -> Self {
        LatencyStat {
            total_ticks: 0,
            max_ticks: 0,
            min_ticks: u64::MAX,
        }
    }
}

impl LatencyStat {
    #[inline]
    fn record(&mut self, ticks: u64) {
        self.total_ticks = self.total_ticks.wrapping_add(ticks);
        self.max_ticks = self.max_ticks.max(ticks);
        self.min_ticks = self.min_ticks.min(ticks);
    }

    fn merge(&mut self, o: &LatencyStat) {
        self.total_ticks = self.total_ticks.wrapping_add(o.total_ticks);
        self.max_ticks = self.max_ticks.max(o.max_ticks);
        self.min_ticks = self.min_ticks.min(o.min_ticks);
    }

    fn min_for_json(&self) -> u64 {
        if self.min_ticks == u64::MAX {
            0
        } else {
            self.min_ticks
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStat {
    pub bytes_read: u64,
    pub num_read_ops: u64,
    pub bytes_written: u64,
    pub num_write_ops: u64,
    pub bytes_unmapped: u64,
    pub num_unmap_ops: u64,
    pub num_other_ops: u64,
    pub read_latency: LatencyStat,
    pub write_latency: LatencyStat,
    pub unmap_latency: LatencyStat,
    pub failed: u64,
    pub nomem: u64,
    pub aborted: u64,
    pub miscompare: u64,
}

impl IoStat {
    /// Records one completed I/O. Successful I/O counts bytes, ops and
    /// latency; failures count only in the error counters, as SPDK does.
    #[inline]
    pub fn record(&mut self, io_type: IoType, bytes: u64, latency_ticks: u64, status: IoStatus) {
        match status {
            IoStatus::Success => {}
            IoStatus::Failed => {
                self.failed += 1;
                return;
            }
            IoStatus::NoMemory => {
                self.nomem += 1;
                return;
            }
            IoStatus::Aborted => {
                self.aborted += 1;
                return;
            }
            IoStatus::Miscompare => {
                self.miscompare += 1;
                return;
            }
            IoStatus::Pending => return,
        }
        match io_type {
            IoType::Read => {
                self.bytes_read += bytes;
                self.num_read_ops += 1;
                self.read_latency.record(latency_ticks);
            }
            IoType::Write | IoType::WriteZeroes => {
                self.bytes_written += bytes;
                self.num_write_ops += 1;
                self.write_latency.record(latency_ticks);
            }
            IoType::Unmap => {
                self.bytes_unmapped += bytes;
                self.num_unmap_ops += 1;
                self.unmap_latency.record(latency_ticks);
            }
            IoType::Flush | IoType::Reset | IoType::Compare => self.num_other_ops += 1,
        }
    }

    pub fn merge(&mut self, o: &IoStat) {
        self.bytes_read += o.bytes_read;
        self.num_read_ops += o.num_read_ops;
        self.bytes_written += o.bytes_written;
        self.num_write_ops += o.num_write_ops;
        self.bytes_unmapped += o.bytes_unmapped;
        self.num_unmap_ops += o.num_unmap_ops;
        self.num_other_ops += o.num_other_ops;
        self.read_latency.merge(&o.read_latency);
        self.write_latency.merge(&o.write_latency);
        self.unmap_latency.merge(&o.unmap_latency);
        self.failed += o.failed;
        self.nomem += o.nomem;
        self.aborted += o.aborted;
        self.miscompare += o.miscompare;
    }

    /// Applies SPDK's `reset_mode`.
    pub fn reset(&mut self, mode: ResetMode) {
        match mode {
            ResetMode::None => {}
            ResetMode::All => *self = IoStat::default(),
            ResetMode::MaxMin => {
                for l in [
                    &mut self.read_latency,
                    &mut self.write_latency,
                    &mut self.unmap_latency,
                ] {
                    l.max_ticks = 0;
                    l.min_ticks = u64::MAX;
                }
            }
            ResetMode::Error => {
                self.failed = 0;
                self.nomem = 0;
                self.aborted = 0;
                self.miscompare = 0;
            }
        }
    }

    /// The fields of SPDK's `spdk_bdev_dump_io_stat_json`, in its order.
    pub fn to_json_fields(&self, out: &mut Map<String, Value>) {
        let mut put = |k: &str, v: u64| {
            out.insert(k.to_string(), json!(v));
        };
        put("bytes_read", self.bytes_read);
        put("num_read_ops", self.num_read_ops);
        put("bytes_written", self.bytes_written);
        put("num_write_ops", self.num_write_ops);
        put("bytes_unmapped", self.bytes_unmapped);
        put("num_unmap_ops", self.num_unmap_ops);
        put("bytes_copied", 0);
        put("num_copy_ops", 0);
        put("read_latency_ticks", self.read_latency.total_ticks);
        put("max_read_latency_ticks", self.read_latency.max_ticks);
        put("min_read_latency_ticks", self.read_latency.min_for_json());
        put("write_latency_ticks", self.write_latency.total_ticks);
        put("max_write_latency_ticks", self.write_latency.max_ticks);
        put("min_write_latency_ticks", self.write_latency.min_for_json());
        put("unmap_latency_ticks", self.unmap_latency.total_ticks);
        put("max_unmap_latency_ticks", self.unmap_latency.max_ticks);
        put("min_unmap_latency_ticks", self.unmap_latency.min_for_json());
        put("copy_latency_ticks", 0);
        put("max_copy_latency_ticks", 0);
        put("min_copy_latency_ticks", 0);
        let mut errors = Map::new();
        for (k, v) in [
            ("failed", self.failed),
            ("nomem", self.nomem),
            ("miscompare", self.miscompare),
            ("aborted", self.aborted),
        ] {
            if v != 0 {
                errors.insert(k.to_string(), json!(v));
            }
        }
        out.insert("io_error".to_string(), Value::Object(errors));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResetMode {
    All,
    #[serde(rename = "maxmin")]
    MaxMin,
    Error,
    None,
}
