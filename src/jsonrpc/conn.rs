//! One RPC connection: a reader thread that frames the byte stream and hands
//! each request to the dispatcher as soon as its last byte arrives, and a
//! writer thread that sends each response when its request finishes. Many
//! requests are in flight at once and responses go out in completion order,
//! as SPDK does and Longhorn's client (one connection, replies matched by
//! id, 24-hour calls outstanding) needs.
//!
//! Owns: the two threads of a connection, the channel from finished requests
//! to the writer, and the flow control ([`Flow`]) that bounds them.
//!
//! Invariants:
//! - A top-level value (a request, or a whole batch) holds one [`Permit`]
//!   from dispatch until its response is in the socket (or is known to need
//!   none). At most [`MAX_REQUESTS_IN_FLIGHT`] permits exist per connection,
//!   and none is handed out while [`MAX_QUEUED_RESPONSE_BYTES`] or more of
//!   responses wait for the writer. While either bound is reached the reader
//!   does not read, so the client's writes block in the socket instead of
//!   piling up here (backpressure). A batch is one unit: its elements run in
//!   order and its response array keeps their order.
//! - Whoever finishes a request (the main reactor) never blocks on this
//!   connection: it puts the response on an unbounded channel, whose length
//!   the permits bound, and adds to an atomic byte count. Only the writer
//!   thread touches the socket's write side.
//! - Memory per connection stays under `MAX_PENDING_BYTES` + a read chunk
//!   of input, plus [`MAX_QUEUED_RESPONSE_BYTES`] +
//!   [`MAX_REQUESTS_IN_FLIGHT`] × the largest single response of output.
//! - Input that cannot be framed (bad JSON, an incomplete value over
//!   `MAX_PENDING_BYTES`, end of input inside a value) stops reading; the
//!   requests already dispatched are answered, then a -32700 response is
//!   sent and the connection closes. At a clean end of input the requests
//!   already received are answered before it closes.
//! - A connection ends (and frees its slot) only when none of its requests
//!   is still running, unless the server is stopping: then it ends at once
//!   and the requests still running get no answer.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};

use super::framing::{parse_error_line, Framer, Top};

/// Requests (top-level values) one connection may have dispatched and not
/// yet answered. Longhorn's engine sends everything over one connection,
/// one call per goroutine, some lasting hours (a checksum per snapshot
/// being hashed), and the call that stops one of those must still find a
/// place: so generous, as nothing we know bounds how many such calls it
/// keeps outstanding. Past it the connection is not read until replies
/// drain, which bounds the tasks one client queues on the main reactor and
/// what a client that never reads pins.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 256;

/// Response bytes a connection may have waiting for its writer before no
/// further request is dispatched: many ordinary replies (hundreds of bytes
/// to a few KiB). One large reply (`bdev_read`'s hex, up to 2 MiB) may pass
/// it alone.
pub const MAX_QUEUED_RESPONSE_BYTES: usize = 1 << 20;

/// Bytes asked for per read: more than rpc.py's usual request, which it
/// sends whole.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The flow control a connection's reader, writer and dispatched requests
/// share.
pub struct Flow {
    state: Mutex<FlowState>,
    /// Signalled when a permit is released, the writer breaks, or the
    /// server stops.
    changed: Condvar,
    /// Bytes of responses produced and not yet written. An atomic so the
    /// reactor adds to it without taking the lock.
    queued_bytes: AtomicUsize,
}

struct FlowState {
    in_flight: usize,
    /// The socket cannot be written any more: nothing new is dispatched.
    broken: bool,
}

impl Flow {
    pub fn new() -> Arc<Flow> {
        Arc::new(Flow {
            state: Mutex::new(FlowState {
                in_flight: 0,
                broken: false,
            }),
            changed: Condvar::new(),
            queued_bytes: AtomicUsize::new(0),
        })
    }

    /// A panic elsewhere while holding the lock leaves counters that are
    /// still consistent (every update is a single step), so go on.
    fn lock(&self) -> MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, FlowState>) -> MutexGuard<'a, FlowState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for room for one more request. `None` once the connection's
    /// writer broke or the server stops.
    fn acquire(self: &Arc<Self>, stopping: &AtomicBool) -> Option<Permit> {
        let mut s = self.lock();
        loop {
            // `stopping` and `queued_bytes` change outside the lock, but
            // whoever changes them then takes the lock to notify, so a
            // change between this check and the wait is not missed.
            if s.broken || stopping.load(Ordering::SeqCst) {
                return None;
            }
            if s.in_flight < MAX_REQUESTS_IN_FLIGHT
                && self.queued_bytes.load(Ordering::SeqCst) < MAX_QUEUED_RESPONSE_BYTES
            {
                break;
            }
            s = self.wait(s);
        }
        s.in_flight += 1;
        debug_assert!(s.in_flight <= MAX_REQUESTS_IN_FLIGHT);
        Some(Permit {
            flow: self.clone(),
            bytes: 0,
        })
    }

    /// Waits until no request of this connection is in flight, or the
    /// server stops.
    fn wait_idle(&self, stopping: &AtomicBool) {
        let mut s = self.lock();
        while s.in_flight > 0 && !stopping.load(Ordering::SeqCst) {
            s = self.wait(s);
        }
    }

    fn set_broken(&self) {
        self.lock().broken = true;
        self.changed.notify_all();
    }

    fn is_broken(&self) -> bool {
        self.lock().broken
    }

    /// Wakes the reader wherever it waits, after the server set its
    /// stopping flag.
    pub fn wake(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock().in_flight
    }
}

/// One request's place in its connection's in-flight bound, held from
/// dispatch until the writer has written its response. Released on drop,
/// also when the request is abandoned (its task dropped at shutdown).
pub struct Permit {
    flow: Arc<Flow>,
    /// Response bytes charged to `Flow::queued_bytes`.
    bytes: usize,
}

impl Permit {
    fn charge(&mut self, bytes: usize) {
        self.bytes += bytes;
        self.flow.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let before = self
            .flow
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
        debug_assert!(before >= self.bytes);
        let mut s = self.flow.lock();
        assert!(s.in_flight > 0, "permit released twice");
        s.in_flight -= 1;
        drop(s);
        self.flow.changed.notify_all();
    }
}

enum ToWriter {
    /// A finished request's response; `None` when nothing is sent
    /// (successful notifications). The permit is released once written.
    Reply(Permit, Option<String>),
    /// From the reader, after the last reply: a final line (the -32700),
    /// then the writer ends.
    End(Option<String>),
}

/// What a dispatched request answers through. Sending never blocks.
pub struct Responder {
    permit: Permit,
    tx: mpsc::Sender<ToWriter>,
}

impl Responder {
    /// Queues the response (newline included) for the connection's writer.
    /// When the connection is gone it is dropped, and the permit with it.
    pub fn send(mut self, response: Option<String>) {
        if let Some(r) = &response {
            self.permit.charge(r.len());
        }
        let _ = self.tx.send(ToWriter::Reply(self.permit, response));
    }
}

/// Serves one connection until it ends (see the module invariants).
/// `dispatch` starts a request and must not wait for it; it returns false
/// when requests cannot run any more (the reactor is gone), which ends the
/// connection.
pub fn serve(
    stream: UnixStream,
    id: u64,
    flow: Arc<Flow>,
    stopping: &AtomicBool,
    dispatch: impl Fn(Top, Responder) -> bool,
) {
    let (tx, rx) = mpsc::channel();
    let writer = stream.try_clone().and_then(|out| {
        let flow = flow.clone();
        std::thread::Builder::new()
            .name(format!("rpc_send_{id}"))
            .spawn(move || write_loop(out, rx, &flow, id))
    });
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            warn!("RPC connection {id}: cannot start its writer: {e}");
            return;
        }
    };
    let last = read_loop(&stream, id, &flow, stopping, &tx, &dispatch);
    flow.wait_idle(stopping);
    let _ = tx.send(ToWriter::End(last));
    drop(tx);
    if writer.join().is_err() {
        warn!("RPC connection {id}: writer panicked");
    }
}

/// Frames and dispatches until the input ends or cannot go on; returns the
/// final line to send after the replies, if any.
fn read_loop(
    mut stream: &UnixStream,
    id: u64,
    flow: &Arc<Flow>,
    stopping: &AtomicBool,
    tx: &mpsc::Sender<ToWriter>,
    dispatch: &impl Fn(Top, Responder) -> bool,
) -> Option<String> {
    let mut framer = Framer::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        loop {
            match framer.next_value() {
                Ok(Some(top)) => {
                    let permit = flow.acquire(stopping)?;
                    let responder = Responder {
                        permit,
                        tx: tx.clone(),
                    };
                    if !dispatch(top, responder) {
                        return None;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("RPC connection {id}: {e}; closing it");
                    return Some(parse_error_line());
                }
            }
        }
        if stopping.load(Ordering::SeqCst) {
            return None;
        }
        match stream.read(&mut chunk) {
            // The writer shuts the socket down when it breaks: not an end
            // of input worth a warning.
            Ok(0) if flow.is_broken() => return None,
            Ok(0) if framer.has_partial() => {
                warn!("RPC connection {id}: input ended inside a request");
                return Some(parse_error_line());
            }
            Ok(0) => return None,
            Ok(n) => framer.push(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("RPC connection {id}: read failed: {e}");
                return None;
            }
        }
    }
}

/// Writes responses in the order requests finish. After a failed write it
/// keeps taking replies (releasing their permits) but writes nothing.
fn write_loop(mut stream: UnixStream, rx: mpsc::Receiver<ToWriter>, flow: &Flow, id: u64) {
    let mut broken = false;
    for msg in rx {
        let (text, permit, end) = match msg {
            ToWriter::Reply(permit, text) => (text, Some(permit), false),
            ToWriter::End(text) => (text, None, true),
        };
        if let (Some(text), false) = (text, broken) {
            if let Err(e) = stream.write_all(text.as_bytes()) {
                debug!("RPC connection {id}: cannot send a response: {e}");
                broken = true;
                flow.set_broken();
                // Wakes the reader from its read.
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
        drop(permit);
        if end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    /// A connection served on a thread with a dispatcher that parks every
    /// request's responder for the test to answer.
    struct Harness {
        client: UnixStream,
        flow: Arc<Flow>,
        parked: Arc<Mutex<Vec<(Top, Responder)>>>,
        dispatched: Arc<AtomicUsize>,
        stopping: Arc<AtomicBool>,
        server: Option<std::thread::JoinHandle<()>>,
    }

    impl Harness {
        fn new() -> Harness {
            let (client, server) = UnixStream::pair().unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let flow = Flow::new();
            let parked = Arc::new(Mutex::new(Vec::new()));
            let dispatched = Arc::new(AtomicUsize::new(0));
            let stopping = Arc::new(AtomicBool::new(false));
            let (f, p, d, s) = (
                flow.clone(),
                parked.clone(),
                dispatched.clone(),
                stopping.clone(),
            );
            let server = std::thread::spawn(move || {
                serve(server, 0, f, &s, |top, responder| {
                    d.fetch_add(1, Ordering::SeqCst);
                    p.lock().unwrap().push((top, responder));
                    true
                })
            });
            Harness {
                client,
                flow,
                parked,
                dispatched,
                stopping,
                server: Some(server),
            }
        }

        fn wait_dispatched(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.dispatched.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "never dispatched {n}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Answers the parked request at `index` with `text`.
        fn answer(&self, index: usize, text: Option<&str>) {
            let (_, r) = self.parked.lock().unwrap().remove(index);
            r.send(text.map(|t| format!("{t}\n")));
        }

        fn join(&mut self) {
            if let Some(s) = self.server.take() {
                s.join().unwrap();
            }
        }
    }

    fn request(id: usize) -> String {
        format!(r#"{{"method":"m","id":{id}}}"#)
    }

    fn line(reader: &mut BufReader<UnixStream>) -> String {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        l
    }

    #[test]
    fn responses_go_out_in_completion_order() {
        let mut h = Harness::new();
        let mut out = BufReader::new(h.client.try_clone().unwrap());
        (&h.client)
            .write_all((request(1) + &request(2) + &request(3)).as_bytes())
            .unwrap();
        h.wait_dispatched(3);
        assert_eq!(h.flow.in_flight(), 3);
        h.answer(2, Some("three"));
        assert_eq!(line(&mut out), "three\n");
        h.answer(0, None);
        h.answer(0, Some("two"));
        assert_eq!(line(&mut out), "two\n");
        h.client.shutdown(std::net::Shutdown::Write).unwrap();
        h.join();
        assert_eq!(h.flow.in_flight(), 0);
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "");
    }

    #[test]
    fn the_in_flight_bound_stops_reading_until_replies_drain() {
        let mut h = Harness::new();
        let total = MAX_REQUESTS_IN_FLIGHT + 10;
        let all: String = (0..total).map(request).collect();
        (&h.client).write_all(all.as_bytes()).unwrap();
        h.wait_dispatched(MAX_REQUESTS_IN_FLIGHT);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(h.dispatched.load(Ordering::SeqCst), MAX_REQUESTS_IN_FLIGHT);
        // A reply that nobody reads yet still frees a slot once written.
        h.answer(0, Some("x"));
        h.wait_dispatched(MAX_REQUESTS_IN_FLIGHT + 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            h.dispatched.load(Ordering::SeqCst),
            MAX_REQUESTS_IN_FLIGHT + 1
        );
        // The rest, in arrival order of dispatch.
        while h.dispatched.load(Ordering::SeqCst) < total || !h.parked.lock().unwrap().is_empty() {
            if h.parked.lock().unwrap().is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            h.answer(0, None);
        }
        h.client.shutdown(std::net::Shutdown::Write).unwrap();
        h.join();
        assert_eq!(h.dispatched.load(Ordering::SeqCst), total);
    }

    #[test]
    fn queued_response_bytes_stop_dispatch_while_the_client_does_not_read() {
        let mut h = Harness::new();
        (&h.client)
            .write_all((request(1) + &request(2) + &request(3)).as_bytes())
            .unwrap();
        h.wait_dispatched(3);
        // Far more than the socket holds: the writer blocks, the bytes stay
        // queued, and nothing new is dispatched.
        let big = "b".repeat(MAX_QUEUED_RESPONSE_BYTES);
        h.answer(0, Some(&big));
        (&h.client).write_all(request(4).as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(h.dispatched.load(Ordering::SeqCst), 3);
        // Reading drains it; then the fourth is dispatched.
        let mut out = BufReader::new(h.client.try_clone().unwrap());
        assert_eq!(line(&mut out).len(), big.len() + 1);
        h.wait_dispatched(4);
        while !h.parked.lock().unwrap().is_empty() {
            h.answer(0, Some("r"));
        }
        h.client.shutdown(std::net::Shutdown::Write).unwrap();
        for _ in 0..3 {
            assert_eq!(line(&mut out), "r\n");
        }
        h.join();
    }

    #[test]
    fn a_parse_error_comes_after_the_replies_to_earlier_requests() {
        let mut h = Harness::new();
        let mut out = BufReader::new(h.client.try_clone().unwrap());
        (&h.client)
            .write_all((request(1) + "{bad json").as_bytes())
            .unwrap();
        h.wait_dispatched(1);
        std::thread::sleep(Duration::from_millis(50));
        h.answer(0, Some("one"));
        assert_eq!(line(&mut out), "one\n");
        assert_eq!(line(&mut out), parse_error_line());
        h.join();
        assert_eq!(line(&mut out), "");
    }

    #[test]
    fn stopping_ends_a_connection_with_requests_still_running() {
        let mut h = Harness::new();
        let all: String = (0..MAX_REQUESTS_IN_FLIGHT + 1).map(request).collect();
        (&h.client).write_all(all.as_bytes()).unwrap();
        h.wait_dispatched(MAX_REQUESTS_IN_FLIGHT);
        // The reader waits for a permit; stop wakes it.
        h.stopping.store(true, Ordering::SeqCst);
        h.flow.wake();
        let _ = h.client.shutdown(std::net::Shutdown::Both);
        h.join();
        // The abandoned requests release their permits when dropped.
        h.parked.lock().unwrap().clear();
        assert_eq!(h.flow.in_flight(), 0);
    }

    #[test]
    fn a_client_gone_mid_reply_breaks_the_writer_and_releases_everything() {
        let mut h = Harness::new();
        (&h.client)
            .write_all((request(1) + &request(2)).as_bytes())
            .unwrap();
        h.wait_dispatched(2);
        let _ = h.client.shutdown(std::net::Shutdown::Both);
        h.answer(0, Some("lost"));
        h.answer(0, Some("lost too"));
        h.join();
        assert!(h.flow.is_broken());
        assert_eq!(h.flow.in_flight(), 0);
    }
}
