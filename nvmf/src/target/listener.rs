//! Accepting NVMe/TCP connections on a bound listen socket: a task on the
//! main reactor takes each new connection (non-blocking `accept`, sleeping
//! on an io_uring poll of the listen socket in between) and hands it to
//! the next reactor in turn, whose poll group owns it from then on.

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use super::{poll_group, socket};

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
    Ok(reactor::spawn_local_joinable(async move {
        log::info!("NVMe/TCP listening on {addr}");
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let cores = reactor::cores();
                    let core = cores[next.get() % cores.len()];
                    next.set(next.get() + 1);
                    reactor::send(core, move || poll_group::adopt(stream, maxh2cdata));
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
