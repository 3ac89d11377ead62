//! Accepting NVMe/TCP connections on a bound listen socket: a task on the
//! main reactor takes each new connection (non-blocking `accept`, sleeping
//! on an io_uring poll of the listen socket in between) and hands it to
//! the next reactor in turn, whose poll group owns it from then on. Beyond
//! the target's connection limit (`limits.rs`) a connection is closed as
//! soon as it is accepted, and the refusals are logged (at most once per
//! [`REFUSAL_LOG_INTERVAL`]).

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::limits::{self, ConnectionPermit};
use super::{poll_group, socket};

/// Connections refused at the limit are logged once per this long (with
/// their count), so a flood of them does not flood the log.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Starts accepting on `listener` (a dup of the bound socket, already
/// non-blocking) from the current reactor; returns the task, cancelled
/// when the address is released (dropping the task closes its socket).
pub fn start_acceptor(
    addr: SocketAddr,
    listener: &TcpListener,
    maxh2cdata: u32,
) -> std::io::Result<glommio::task::JoinHandle<()>> {
    let listener = listener.try_clone()?;
    listener.set_nonblocking(true)?;
    let next = Cell::new(0usize);
    // Refusals since the last warning, and when that was (ticks).
    let refused = Cell::new(0u64);
    let last_warn = Cell::new(None::<u64>);
    Ok(reactor::spawn_local_joinable(async move {
        log::info!("NVMe/TCP listening on {addr}");
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let Some(permit) = ConnectionPermit::acquire() else {
                        drop(stream);
                        refused.set(refused.get() + 1);
                        let now = reactor::ticks::now();
                        let due = last_warn.get().is_none_or(|t| {
                            now >= t + reactor::ticks::from_duration(REFUSAL_LOG_INTERVAL)
                        });
                        if due {
                            log::warn!(
                                "NVMe/TCP {addr}: at the limit of {} connections: closed {} new one(s) (last from {peer})",
                                limits::max_connections(),
                                refused.replace(0)
                            );
                            last_warn.set(Some(now));
                        }
                        continue;
                    };
                    let cores = reactor::cores();
                    let core = cores[next.get() % cores.len()];
                    next.set(next.get() + 1);
                    reactor::send(core, move || poll_group::adopt(stream, maxh2cdata, permit));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Err(e) = socket::readable(listener.as_raw_fd()).await {
                        log::warn!("accept on {addr}: {e}");
                        reactor::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, or the like: back off, keep serving.
                    log::warn!("accept on {addr}: {e}");
                    reactor::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}
