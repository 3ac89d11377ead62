//! A core's NVMe/TCP poll group (SPDK's `spdk_nvmf_poll_group`): the
//! connections this reactor owns and the pollers that drive them.
//!
//! - Every loop turn, one `epoll_wait(0)` finds the sockets with input (or,
//!   while a connection's output is blocked, room to write); each ready
//!   connection receives and handles everything it has; then every
//!   connection turns finished I/O into responses and sends them, one
//!   `sendmsg` each.
//! - In adaptive mode, just before the reactor parks, a task arms one
//!   io_uring poll on the epoll descriptor, so input on any socket wakes
//!   the reactor; nothing is armed while the loop is spinning.
//! - An on-demand poller enforces deadlines, woken at the earliest one
//!   (and when a connection arrives or an admin queue connects), never
//!   otherwise: keep-alive timeouts of admin queues, and the connect
//!   timeout of connections that have not completed ICReq and Connect
//!   (SPEC §8), so a half-open connection costs no timer of its own.
//! - A stalled connection (`conn.rs`, backpressure) is not reported for
//!   input until it resumes, so its unread bytes neither spin the loop nor
//!   keep a parked reactor awake.
//!
//! - The main reactor reaches a connection by its token (recorded with its
//!   queue pair at Connect): to close it when its host loses access, or to
//!   kick its admin queue after a namespace change (`changes.rs`).
//!
//! Invariants: a connection lives on one core from accept until it is
//! closed and its last bdev I/O is back; every map here is touched only by
//! this core's thread; no borrow of the group is held while a connection
//! runs (connections call back in to close).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};

use reactor::PollStatus;

use super::conn::Connection;
use super::limits::ConnectionPermit;
use super::socket::{self, PolledSocket, ReadySet};

/// Readiness events taken per `epoll_wait`.
const READY_BATCH: usize = 256;
/// Up to this many connections on a core, each is polled with a
/// non-blocking receive every turn instead of through `epoll_wait`.
const DIRECT_RECV_CONNS: usize = 2;

struct PollGroup {
    conns: RefCell<HashMap<u64, Rc<Connection>>>,
    ready: RefCell<ReadySet>,
    next_token: Cell<u64>,
    /// Some connection closed; drop it from `conns` after this turn.
    reap: Cell<bool>,
    /// The wake-up poll on the epoll descriptor is wanted or armed.
    arm: Cell<bool>,
    arm_waker: RefCell<Option<Waker>>,
    /// Scratch: ready tokens of this turn (and whether each hung up), and
    /// connections to visit.
    scratch_tokens: RefCell<Vec<(u64, bool)>>,
    scratch_conns: RefCell<Vec<Rc<Connection>>>,
    /// The group's poller (unregistered when dropped).
    poller: RefCell<Option<reactor::PollerHandle>>,
    keep_alive: RefCell<Option<reactor::PollerHandle>>,
}

thread_local! {
    static GROUP: std::cell::OnceCell<Rc<PollGroup>> = const { std::cell::OnceCell::new() };
}

/// This core's group, created (with its pollers) on first use.
fn group() -> Rc<PollGroup> {
    GROUP.with(|g| {
        g.get_or_init(|| {
            let ready = match ReadySet::new(READY_BATCH) {
                Ok(r) => r,
                // Out of file descriptors at start-up: nothing can serve.
                Err(e) => panic!("NVMe/TCP poll group: epoll_create1: {e}"),
            };
            let g = Rc::new(PollGroup {
                conns: RefCell::new(HashMap::new()),
                ready: RefCell::new(ready),
                next_token: Cell::new(1),
                reap: Cell::new(false),
                arm: Cell::new(false),
                arm_waker: RefCell::new(None),
                scratch_tokens: RefCell::new(Vec::with_capacity(READY_BATCH)),
                scratch_conns: RefCell::new(Vec::new()),
                poller: RefCell::new(None),
                keep_alive: RefCell::new(None),
            });
            start(&g);
            g
        })
        .clone()
    })
}

fn start(g: &Rc<PollGroup>) {
    let w = Rc::downgrade(g);
    let poll = reactor::register_poller("nvmf_tcp_poll_group", move || {
        PollStatus::from_work(w.upgrade().is_some_and(|g| g.poll()))
    });
    let w = Rc::downgrade(g);
    // Runs only when the earliest deadline comes (or a connection arrives
    // or an admin queue connects): an idle target is not woken for nothing.
    let keep_alive = reactor::register_on_demand_poller("nvmf_tcp_keep_alive", move || {
        PollStatus::from_work(w.upgrade().is_some_and(|g| g.check_deadlines()))
    });
    *g.poller.borrow_mut() = Some(poll);
    *g.keep_alive.borrow_mut() = Some(keep_alive);
    let w = Rc::downgrade(g);
    reactor::on_park(move || {
        if let Some(g) = w.upgrade() {
            if !g.conns.borrow().is_empty() && !g.arm.replace(true) {
                if let Some(waker) = g.arm_waker.borrow_mut().take() {
                    waker.wake();
                }
            }
        }
    });
    // The wake source: waits for an arm request, then for the epoll
    // descriptor to become readable, then wakes the loop.
    let g = g.clone();
    let epfd = g.ready.borrow().fd();
    reactor::spawn_local(async move {
        loop {
            std::future::poll_fn(|cx| {
                if g.arm.get() {
                    Poll::Ready(())
                } else {
                    *g.arm_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            let _ = socket::readable(epfd).await;
            g.arm.set(false);
            reactor::wake_loop();
        }
    });
}

impl PollGroup {
    /// Services every connection (finished I/O → responses → one send).
    fn service_all(&self) -> bool {
        let mut busy = false;
        let mut visit = self.scratch_conns.borrow_mut();
        visit.clear();
        visit.extend(self.conns.borrow().values().cloned());
        for c in visit.iter() {
            busy |= c.service();
        }
        visit.clear();
        busy
    }

    /// One turn: send what finished since the last turn (before the
    /// readiness check, so a completion's response does not wait behind
    /// an `epoll_wait`), receive on ready sockets, then send again what
    /// that produced (immediate answers, completions already in).
    fn poll(&self) -> bool {
        if self.conns.borrow().is_empty() {
            return false;
        }
        let mut busy = self.service_all();
        let conns = self.conns.borrow();
        let mut tokens = self.scratch_tokens.borrow_mut();
        let mut visit = self.scratch_conns.borrow_mut();
        tokens.clear();
        visit.clear();
        let direct = conns.len() <= DIRECT_RECV_CONNS;
        // A stalled connection does not read, so only epoll tells of its
        // socket hanging up (reported however often it is asked).
        if !direct || conns.values().any(|c| c.is_stalled()) {
            tokens.extend(self.ready.borrow_mut().ready());
        }
        if direct {
            // Few connections: one non-blocking receive each costs no more
            // system calls than asking epoll first, and saves the
            // `epoll_wait` whenever data is there.
            visit.extend(conns.values().cloned());
        } else {
            visit.extend(tokens.iter().filter_map(|(t, _)| conns.get(t).cloned()));
        }
        // Rare: allocates only when a socket hung up.
        let hung_up: Vec<Rc<Connection>> = tokens
            .iter()
            .filter(|(_, gone)| *gone)
            .filter_map(|(t, _)| conns.get(t).cloned())
            .collect();
        drop(conns);
        for c in &hung_up {
            c.hung_up();
        }
        for c in visit.iter() {
            busy |= c.on_readable();
        }
        visit.clear();
        drop(visit);
        drop(tokens);
        busy |= self.service_all();
        if self.reap.replace(false) {
            self.conns.borrow_mut().retain(|_, c| !c.is_finished());
        }
        busy
    }

    /// Closes admin queues whose keep-alive ran out and connections that
    /// did not connect in time, then arms itself for the earliest deadline
    /// left (traffic since only pushes keep-alives later).
    fn check_deadlines(&self) -> bool {
        let now = reactor::ticks::now();
        let expired: Vec<(Rc<Connection>, &'static str)> = self
            .conns
            .borrow()
            .values()
            .filter_map(|c| c.expired(now).map(|why| (c.clone(), why)))
            .collect();
        for (c, why) in &expired {
            c.close(why);
        }
        let next = self
            .conns
            .borrow()
            .values()
            .filter_map(|c| c.deadline())
            .min();
        if let (Some(at), Some(p)) = (next, self.keep_alive.borrow().as_ref()) {
            p.wake_at(at.max(now + 1));
        }
        !expired.is_empty()
    }
}

/// Adopts an accepted connection on the current core (`permit` counts it
/// against the target's limit for as long as it lives).
pub fn adopt(stream: TcpStream, maxh2cdata: u32, permit: ConnectionPermit) {
    let peer = stream.peer_addr().ok();
    let sock = match PolledSocket::new(stream) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("NVMe/TCP connection from {peer:?}: {e}");
            return;
        }
    };
    let g = group();
    let token = g.next_token.get();
    g.next_token.set(token + 1);
    let fd = sock.fd();
    if let Err(e) = g.ready.borrow().add(fd, token) {
        log::warn!("NVMe/TCP connection from {peer:?}: epoll: {e}");
        return;
    }
    let conn = Rc::new(Connection::new(token, sock, maxh2cdata, permit));
    // Its connect timeout: the deadline poller wakes for it unless it is
    // armed for an earlier one already.
    if let (Some(at), Some(p)) = (conn.deadline(), g.keep_alive.borrow().as_ref()) {
        p.wake_at(at);
    }
    g.conns.borrow_mut().insert(token, conn);
    log::debug!(
        "NVMe/TCP connection from {peer:?} on core {}",
        reactor::current_core().0
    );
    reactor::wake_loop();
}

/// Stops watching `fd` (its connection is closing).
pub(crate) fn unwatch(fd: RawFd) {
    GROUP.with(|g| {
        if let Some(g) = g.get() {
            g.ready.borrow().remove(fd);
        }
    });
}

/// Reports `fd` for input (unless its connection stalled) and for room to
/// write (while its output is blocked).
pub(crate) fn set_interest(fd: RawFd, token: u64, input: bool, output: bool) {
    GROUP.with(|g| {
        if let Some(g) = g.get() {
            if let Err(e) = g.ready.borrow().set_interest(fd, token, input, output) {
                log::warn!("NVMe/TCP: epoll_ctl on fd {fd}: {e}");
            }
        }
    });
}

/// A connection closed: drop it from the group after this turn.
pub(crate) fn reap_later() {
    GROUP.with(|g| {
        if let Some(g) = g.get() {
            g.reap.set(true);
            reactor::wake_loop();
        }
    });
}

/// An admin queue connected on this core: re-arm the keep-alive check.
pub(crate) fn keep_alive_changed() {
    GROUP.with(|g| {
        if let Some(g) = g.get() {
            if let Some(p) = g.keep_alive.borrow().as_ref() {
                p.wake();
            }
        }
    });
}

/// This core's connections (a snapshot: none borrowed while they run).
fn connections() -> Vec<Rc<Connection>> {
    GROUP.with(|g| {
        g.get()
            .map(|g| g.conns.borrow().values().cloned().collect())
            .unwrap_or_default()
    })
}

/// Closes the connections with these tokens (whatever state their queue
/// is in, Connect still running included). Returns, for each whose bdev
/// I/O is still in flight, an event fired when it is all back.
pub fn close_connections(tokens: &[u64], why: &str) -> Vec<reactor::CompletionEvent<()>> {
    let conns: Vec<Rc<Connection>> = GROUP.with(|g| {
        g.get()
            .map(|g| {
                let c = g.conns.borrow();
                tokens.iter().filter_map(|t| c.get(t).cloned()).collect()
            })
            .unwrap_or_default()
    });
    conns
        .iter()
        .filter_map(|c| {
            c.close(why);
            c.in_flight_done()
        })
        .collect()
}

/// Closes the connections holding commands to namespace `instance`.
pub fn close_holding(instance: u64, why: &str) {
    for c in connections() {
        if c.holds_namespace(instance) {
            c.close(why);
        }
    }
}

/// Gives every connection a turn of `service` (admin queues look for
/// namespace changes then).
pub fn kick_all() {
    for c in connections() {
        c.kick();
    }
}
