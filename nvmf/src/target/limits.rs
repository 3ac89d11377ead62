//! What one host (or many) can make the NVMe/TCP target hold (SPEC §8):
//! the named limits, the process-wide settings behind the two that are
//! configurable (`--nvmf-max-connections`, `--nvmf-connect-timeout-ms`),
//! the count of live connections, and how the transport's shared-buffer
//! options become each core's data-buffer budget.
//!
//! The limits and where they are enforced:
//! - Connections per target: [`max_connections`]; the acceptor closes any
//!   beyond it at once (`listener.rs`), holding a [`ConnectionPermit`] for
//!   each it keeps until that connection is gone.
//! - A connection that has not completed ICReq and Connect within
//!   [`connect_timeout`] is closed by its core's deadline poller
//!   (`poll_group.rs`, the one that enforces keep-alive).
//! - Per connection: request slots = the queue size the host connected
//!   with (`request.rs`); copied send-queue bytes [`MAX_SEND_QUEUE_BYTES`]
//!   and [`MAX_RECV_BLOCKS`] receive blocks of [`RX_BUF_BYTES`] (or one
//!   capsule, if larger) (`conn.rs`, `recv_buf.rs`): at either
//!   limit, or with no free slot, the connection stops parsing and stops
//!   reading its socket, so TCP pushes back on the host.
//! - Data buffers: from each core's budgeted pool ([`buffer_budget_per_core`],
//!   `bdev::buf`); a command that cannot get one waits in its queue's
//!   pending-buffer list.
//! - I/O queues per controller: the count Set Features Number of Queues
//!   granted (else `max_io_qpairs_per_ctrlr`), each QID once (`admin.rs`).
//! - What one admin command can make us send: at most `max_io_size` (MDTS).
//!
//! Memory, from those (what the flooding test checks against), per core:
//! budget + `bdev::buf::POOL_FREE_BYTES_PER_CORE`; per connection:
//! [`MAX_RECV_BLOCKS`] × receive block + 2 × [`MAX_SEND_QUEUE_BYTES`] (the
//! queue's buffer holds sent bytes until it compacts) + `max_io_size` (one
//! admin response past the limit) + queue size × (slot +
//! `in_capsule_data_size`, a write bounced from its receive block); times
//! [`max_connections`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

pub use super::recv_buf::MAX_RECV_BLOCKS;

/// A connection's first receive block: many PDUs per `readv`. An I/O queue
/// whose in-capsule data (plus header, digests, padding) does not fit
/// grows its blocks to hold one whole capsule.
pub const RX_BUF_BYTES: usize = 64 * 1024;

/// Connections a target keeps at once unless set otherwise: every one
/// costs a descriptor and up to a few hundred KiB of buffers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How long a new connection may take to send its ICReq and have a Connect
/// accepted unless set otherwise: hosts do both within milliseconds; a
/// connection idle that long is someone holding a descriptor for nothing.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copied bytes (PDU headers, responses, admin data) a connection's send
/// queue may hold before it stops taking commands: far above what one poll
/// turn of a busy queue produces, small against a host that does not read.
pub const MAX_SEND_QUEUE_BYTES: usize = 64 * 1024;

/// A second Connect for a QID still live on its controller is checked
/// again once after this long before it is refused (SPDK's
/// DUPLICATE_QID_RETRY_US): the old queue may be closing right now.
pub const DUPLICATE_QID_RETRY: Duration = Duration::from_millis(1);

static MAX_CONNECTIONS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_CONNECTIONS);
static CONNECT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_CONNECT_TIMEOUT.as_millis() as u64);
static LIVE_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Sets the target's connection limit (at start-up; at least 1).
pub fn set_max_connections(n: usize) {
    MAX_CONNECTIONS.store(n.max(1), Ordering::Relaxed);
}

pub fn max_connections() -> usize {
    MAX_CONNECTIONS.load(Ordering::Relaxed)
}

/// Sets the ICReq + Connect timeout (at start-up; at least 1 ms).
pub fn set_connect_timeout(t: Duration) {
    CONNECT_TIMEOUT_MS.store((t.as_millis() as u64).max(1), Ordering::Relaxed);
}

pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Connections admitted and not yet gone.
pub fn live_connections() -> usize {
    LIVE_CONNECTIONS.load(Ordering::Relaxed)
}

/// One admitted connection: counted until dropped (with the connection,
/// on whichever core it ended up).
#[derive(Debug)]
pub struct ConnectionPermit(());

impl ConnectionPermit {
    /// A permit if the target is below its connection limit.
    pub fn acquire() -> Option<ConnectionPermit> {
        let max = max_connections();
        LIVE_CONNECTIONS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionPermit(()))
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        LIVE_CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Each core's data-buffer budget for the TCP transport's options: SPDK's
/// `num_shared_buffers` × `io_unit_size` is the transport's whole pool, so
/// each of `cores` gets its share, but never less than two buffers of
/// `max_io_size` (a Compare of the largest size needs both at once).
pub fn buffer_budget_per_core(
    num_shared_buffers: u32,
    io_unit_size: u32,
    max_io_size: u32,
    cores: usize,
) -> usize {
    let total = num_shared_buffers as usize * io_unit_size as usize;
    let floor = 2 * bdev::buf::capacity_for(max_io_size as usize);
    (total / cores.max(1)).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_stop_at_the_limit_and_come_back_when_dropped() {
        set_max_connections(live_connections() + 2);
        let a = ConnectionPermit::acquire().expect("first");
        let b = ConnectionPermit::acquire().expect("second");
        assert!(ConnectionPermit::acquire().is_none(), "at the limit");
        drop(a);
        let c = ConnectionPermit::acquire().expect("a freed permit");
        drop((b, c));
        set_max_connections(DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn the_shared_buffers_are_split_over_the_cores() {
        // SPDK's defaults over two cores: 511 x 128 KiB, halved.
        assert_eq!(
            buffer_budget_per_core(511, 131072, 131072, 2),
            511 * 131072 / 2
        );
        // Too few for even one large Compare per core: raised to that.
        assert_eq!(buffer_budget_per_core(1, 4096, 131072, 4), 2 * 131072);
    }
}
