//! The target's socket layer: one non-blocking TCP socket, read and written
//! with plain system calls from a reactor poller (DESIGN.md, "Performance
//! approach": the glommio stream API costs ~4× in latency at QD1), plus the
//! one asynchronous operation the poller cannot do itself: waiting for a
//! socket (or an epoll set of sockets) to become readable, so a parked
//! reactor wakes when a host sends something.
//!
//! Every call here is non-blocking; `WouldBlock` is reported as "nothing
//! now", never as an error.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes (> 0).
    Bytes(usize),
    /// Nothing now.
    Nothing,
    /// The peer closed its side.
    Closed,
}

/// A connected, non-blocking TCP socket.
pub struct PolledSocket {
    stream: TcpStream,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl PolledSocket {
    pub fn new(stream: TcpStream) -> io::Result<PolledSocket> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(PolledSocket {
            local: stream.local_addr()?,
            peer: stream.peer_addr()?,
            stream,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Receives into the given buffers in order (one `readv`).
    pub fn recv_vectored(&self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<Received> {
        // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers are
        // valid for writes for their lengths.
        let n = unsafe {
            libc::readv(
                self.fd(),
                bufs.as_ptr() as *const libc::iovec,
                bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int,
            )
        };
        if n > 0 {
            return Ok(Received::Bytes(n as usize));
        }
        if n == 0 {
            return Ok(Received::Closed);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Received::Nothing),
            _ => Err(e),
        }
    }

    /// Sends as much of `bufs` as the socket takes now (one `sendmsg`);
    /// returns the bytes sent (0 when the socket is full).
    pub fn send_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: msg points at valid iovecs (IoSlice is iovec-compatible)
        // that outlive the call.
        let n = unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(e),
        }
    }

    /// Ends both directions; the peer sees the connection close.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Resolves when `fd` is readable (data, hang-up or error pending).
pub async fn readable(fd: RawFd) -> io::Result<()> {
    glommio::net::wait_readable(fd).await
}

/// A per-core epoll set: which of the core's sockets have something to
/// read (unless their connection stopped reading) or, while their output
/// is blocked, room to write. The set's own descriptor becomes readable
/// when any member is ready, so one wait on it wakes a parked reactor for
/// all of them.
pub struct ReadySet {
    epfd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl ReadySet {
    pub fn new(capacity: usize) -> io::Result<ReadySet> {
        // SAFETY: plain system call.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReadySet {
            epfd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity],
        })
    }

    pub fn fd(&self) -> RawFd {
        self.epfd
    }

    fn ctl(
        &self,
        op: libc::c_int,
        fd: RawFd,
        token: u64,
        input: bool,
        output: bool,
    ) -> io::Result<()> {
        let mut events = 0u32;
        if input {
            events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if output {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event for the call's duration.
        if unsafe { libc::epoll_ctl(self.epfd, op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for input, reporting it as `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, true, false)
    }

    /// Reports `fd` when it has input (`input`) and when it has room to
    /// write (`output`); hang-ups and errors always.
    pub fn set_interest(&self, fd: RawFd, token: u64, input: bool, output: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, input, output)
    }

    pub fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL since 2.6.9.
        unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// The members ready now (never blocks): their tokens and whether
    /// the socket hung up or failed (reported even without interest).
    pub fn ready(&mut self) -> impl Iterator<Item = (u64, bool)> + '_ {
        // SAFETY: events has room for its length.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd,
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                0,
            )
        };
        let n = n.max(0) as usize;
        let gone = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
        self.events[..n]
            .iter()
            .map(move |e| (e.u64, e.events & gone != 0))
    }
}

impl Drop for ReadySet {
    fn drop(&mut self) {
        // SAFETY: we own epfd.
        unsafe { libc::close(self.epfd) };
    }
}
