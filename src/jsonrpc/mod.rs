//! The JSON-RPC server: the Unix socket SPDK's `rpc.py` talks to, its
//! connections and the dispatch into the method table
//! (`bdev::rpc::RpcTable`). Wire behaviour follows SPDK (notes
//! `spdk-rpc.md` §1); the pure parts (stream splitting, request validation,
//! response encoding) are in [`framing`], a connection's reading, writing
//! and flow control in [`conn`].
//!
//! Owns: the socket file and its `<path>.lock` (flocked for the server's
//! lifetime, both removed when it stops), an accept thread and, per
//! connection, a reader and a writer thread doing blocking socket I/O;
//! every request runs as its own task on the main reactor, handed over
//! through its mailbox.
//!
//! Invariants:
//! - Many requests are in flight per connection: each top-level value is
//!   dispatched as soon as it is framed and answered when it finishes, in
//!   any order (clients match replies by id, as SPDK's do). A batch is one
//!   unit: its elements run in order and its response array keeps their
//!   order. Per connection at most [`conn::MAX_REQUESTS_IN_FLIGHT`]
//!   requests and [`conn::MAX_QUEUED_RESPONSE_BYTES`] of replies are
//!   outstanding; beyond, the connection is not read until replies drain.
//! - The main reactor never blocks on a client: responses reach the
//!   connection's writer thread through a channel.
//! - At most [`MAX_CONNECTIONS`] connections at once; beyond, the accept
//!   loop waits (the client waits in the listen backlog) until one closes.
//! - Input that is not JSON, or an incomplete value over
//!   [`framing::MAX_PENDING_BYTES`], stops reading: the requests already
//!   dispatched are answered, then a -32700 response is sent and the
//!   connection is closed (SPDK closes without the response).
//! - At end of input the requests already received are answered before the
//!   connection closes.
//! - [`RpcServer::stop`] returns once the accept and connection threads
//!   have ended; requests still running then get no answer.

mod conn;
mod framing;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bdev::rpc::{RpcState, RpcTable};
use log::{debug, info, warn};
use reactor::{CoreId, RuntimeHandle};
use serde_json::Value;

use conn::{Flow, Responder};
use framing::{encode_batch, encode_error, encode_invalid, encode_result, validate, Top};

/// SPDK's `SPDK_JSONRPC_MAX_CONNS`: connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// Pause after a failed accept (EMFILE and the like), so a lasting failure
/// does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The running server. Stop it with [`RpcServer::stop`]; dropping it stops
/// it too. Created and stopped on the main reactor.
pub struct RpcServer {
    shared: Arc<Shared>,
    listener: UnixListener,
    accept_thread: Option<JoinHandle<()>>,
    /// Dropped last: removes the files.
    files: SocketFiles,
}

/// The socket file and its lock file, removed on drop; the lock is held
/// while the open lock file lives.
struct SocketFiles {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in [&self.path, &self.lock_path] {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("cannot remove {}: {e}", p.display());
                }
            }
        }
    }
}

/// State shared by the accept thread and the connection threads.
struct Shared {
    stopping: AtomicBool,
    /// Open connections, so stop can shut them down and wait for them.
    connections: Mutex<HashMap<u64, OpenConnection>>,
    /// Signalled when a connection closes (frees a slot), or at stop.
    slot_freed: Condvar,
    runtime: RuntimeHandle,
    main_core: CoreId,
}

impl Shared {
    /// The map stays consistent across a panic elsewhere (each update is
    /// one insert or remove), so go on.
    fn connections(&self) -> MutexGuard<'_, HashMap<u64, OpenConnection>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What stop needs of a connection.
struct OpenConnection {
    /// A clone of the connection's socket, to shut it down.
    stream: UnixStream,
    flow: Arc<Flow>,
    /// Its reader thread (which joins its writer); `None` until started.
    thread: Option<JoinHandle<()>>,
}

/// The table and the state requests run in.
type DispatchTarget = (Rc<RpcTable>, Rc<Cell<RpcState>>);

thread_local! {
    /// What the server dispatches into, set on the main reactor.
    static DISPATCH: RefCell<Option<DispatchTarget>> = const { RefCell::new(None) };
}

impl RpcServer {
    /// Listens on `path` as SPDK does: takes an exclusive non-blocking flock
    /// on `<path>.lock` (created 0600), removes a stale socket file, binds,
    /// and starts accepting. Call it on the main reactor: requests run there,
    /// in the state `state` holds at each call.
    ///
    /// Socket I/O runs on plain threads (an accept thread, and a reader and
    /// a writer per connection) that hand each request to the main reactor
    /// through its mailbox, which wakes it even when parked. The control
    /// plane so never depends on the reactors' own socket polling.
    pub fn start(
        path: &Path,
        table: Rc<RpcTable>,
        state: Rc<Cell<RpcState>>,
    ) -> io::Result<RpcServer> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open RPC lock file {}: {e}", lock_path.display()),
                )
            })?;
        // SAFETY: flock on a file descriptor we own and keep open.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let os = io::Error::last_os_error();
            let msg = format!(
                "RPC Unix domain socket path {} in use. Specify another.",
                path.display()
            );
            return Err(if os.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::AddrInUse, msg)
            } else {
                io::Error::new(os.kind(), format!("{msg} ({os})"))
            });
        }
        // From here on the files are ours: removed again on any failure.
        let files = SocketFiles {
            path: path.to_path_buf(),
            lock_path,
            _lock: lock,
        };
        // A socket left by a process that died. Like SPDK, unlink whatever
        // is there; what cannot be unlinked (a directory) fails the bind.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on RPC socket {}: {e}", path.display()),
            )
        })?;
        DISPATCH.with(|d| *d.borrow_mut() = Some((table, state)));
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            slot_freed: Condvar::new(),
            runtime: reactor::handle(),
            main_core: reactor::current_core(),
        });
        let accept_listener = listener.try_clone()?;
        let accept_shared = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name("rpc_accept".into())
            .spawn(move || accept_loop(accept_listener, accept_shared))?;
        info!("RPC server listening on {}", path.display());
        Ok(RpcServer {
            shared,
            listener,
            accept_thread: Some(accept_thread),
            files,
        })
    }

    /// Stops accepting, shuts down open connections (requests in flight
    /// get no answer), waits for their threads, and removes the socket and
    /// lock files.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (Linux: EINVAL on a shut-down listener).
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        {
            // Under the lock, so an accept loop between its check of
            // `stopping` and its wait does not miss this.
            let _conns = self.shared.connections();
            self.shared.slot_freed.notify_all();
        }
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        // No connection is added any more. Each one wakes from its read, its
        // wait for a permit or for its requests, and ends.
        let open: Vec<OpenConnection> = self.shared.connections().drain().map(|(_, c)| c).collect();
        for c in &open {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            c.flow.wake();
        }
        for c in open {
            if let Some(t) = c.thread {
                let _ = t.join();
            }
        }
        DISPATCH.with(|d| d.borrow_mut().take());
        info!("RPC server on {} stopped", self.files.path.display());
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        // Take a slot first: at the limit, clients wait in the backlog.
        {
            let mut conns = shared.connections();
            while conns.len() >= MAX_CONNECTIONS && !shared.stopping.load(Ordering::SeqCst) {
                conns = shared
                    .slot_freed
                    .wait(conns)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if shared.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                warn!("RPC accept failed: {e}");
                std::thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        debug!("RPC connection {id} accepted");
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn!("RPC connection {id}: {e}; closing it");
                continue;
            }
        };
        let flow = Flow::new();
        shared.connections().insert(
            id,
            OpenConnection {
                stream: clone,
                flow: flow.clone(),
                thread: None,
            },
        );
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("rpc_conn_{id}"))
            .spawn(move || {
                let s = &conn_shared;
                conn::serve(stream, id, flow, &s.stopping, |top, responder| {
                    dispatch(s, top, responder)
                });
                conn_shared.connections().remove(&id);
                conn_shared.slot_freed.notify_all();
                debug!("RPC connection {id} closed");
            });
        match spawned {
            // Unless the connection already ended (and removed itself).
            Ok(t) => {
                if let Some(c) = shared.connections().get_mut(&id) {
                    c.thread = Some(t);
                }
            }
            Err(e) => {
                warn!("RPC: cannot start a connection thread: {e}");
                shared.connections().remove(&id);
            }
        }
    }
}

/// Starts one top-level value as a task on the main reactor, which answers
/// through `responder` when it finishes. False when the reactor is gone.
fn dispatch(shared: &Shared, top: Top, responder: Responder) -> bool {
    shared.runtime.send(shared.main_core, move || {
        reactor::spawn_local(async move {
            // None once the server stopped: the request is dropped
            // unanswered, and its permit with it.
            let Some((table, state)) = DISPATCH.with(|d| d.borrow().clone()) else {
                return;
            };
            responder.send(respond(&table, &state, top).await);
        });
    })
}

/// The response to one top-level value, newline included, or `None` when
/// nothing is to be sent (successful notifications).
async fn respond(table: &RpcTable, state: &Cell<RpcState>, top: Top) -> Option<String> {
    match top {
        Top::Object(members) => answer(table, state, members).await.map(|mut r| {
            r.push('\n');
            r
        }),
        Top::Batch(elements) if elements.is_empty() => {
            warn!("RPC: empty batch");
            Some(encode_invalid(&Value::Null) + "\n")
        }
        Top::Batch(elements) => {
            let mut responses = Vec::new();
            for element in elements {
                let response = match element {
                    Top::Object(members) => answer(table, state, members).await,
                    _ => {
                        warn!("RPC: batch element is not an object");
                        Some(encode_invalid(&Value::Null))
                    }
                };
                responses.extend(response);
            }
            encode_batch(&responses)
        }
        Top::Other => {
            warn!("RPC: request is not an object or array");
            Some(encode_invalid(&Value::Null) + "\n")
        }
    }
}

/// Validates and runs one request object; its response without newline.
async fn answer(
    table: &RpcTable,
    state: &Cell<RpcState>,
    members: Vec<(String, Value)>,
) -> Option<String> {
    let request = match validate(members) {
        Ok(r) => r,
        Err(invalid) => {
            warn!("RPC: invalid request: {}", invalid.reason);
            return Some(encode_invalid(&invalid.id));
        }
    };
    let notification = request.is_notification();
    let id = request.response_id().clone();
    debug!("RPC request {} (id {id})", request.method);
    match table
        .call(&request.method, request.params, state.get())
        .await
    {
        Ok(_) if notification => None,
        Ok(result) => Some(encode_result(&id, &result)),
        Err(e) => {
            debug!("RPC {} failed: {e}", request.method);
            Some(encode_error(&id, &e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::framing::{parse_error_line, Framer};
    use super::*;
    use bdev::rpc::{RpcError, StateMask};
    use futures_lite::future::block_on;
    use serde_json::json;

    /// A table whose handlers need no reactor.
    fn table() -> RpcTable {
        let mut t = RpcTable::new();
        t.register("echo", StateMask::ANY, |p| async move {
            Ok(p.unwrap_or(Value::Null))
        });
        t.register("fail", StateMask::ANY, |_| async {
            Err(RpcError::new(-19, "No such device"))
        });
        t.register("late", StateMask::RUNTIME, |_| async { Ok(json!(true)) });
        t
    }

    fn run(input: &str) -> Vec<Option<String>> {
        let table = table();
        let state = Cell::new(RpcState::Startup);
        let mut f = Framer::new();
        f.push(input.as_bytes());
        let mut out = Vec::new();
        while let Some(top) = f.next_value().unwrap() {
            out.push(block_on(respond(&table, &state, top)));
        }
        out
    }

    fn one(input: &str) -> Option<String> {
        let mut r = run(input);
        assert_eq!(r.len(), 1);
        r.remove(0)
    }

    #[test]
    fn dispatch_echoes_the_id_exactly() {
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":"abc"}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":\"abc\",\"result\":{\"a\":1}}\n"
        );
        assert_eq!(
            one(r#"{"method":"echo","params":[1],"id":18446744073709551615}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":18446744073709551615,\"result\":[1]}\n"
        );
        assert_eq!(
            one(r#"{"method":"echo","id":-3}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":-3,\"result\":null}\n"
        );
    }

    #[test]
    fn dispatch_errors_from_the_table() {
        assert_eq!(
            one(r#"{"method":"nope","id":1}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-32601,\"message\":\"Method not found\"}}\n"
        );
        assert_eq!(
            one(r#"{"method":"fail","id":2}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":-19,\"message\":\"No such device\"}}\n"
        );
        // Wrong state: the table's -1 answer, with the id.
        let r: Value = serde_json::from_str(&one(r#"{"method":"late","id":3}"#).unwrap()).unwrap();
        assert_eq!(r["error"]["code"], -1);
        assert_eq!(r["id"], 3);
    }

    #[test]
    fn notifications_answer_only_errors() {
        assert_eq!(one(r#"{"method":"echo"}"#), None);
        assert_eq!(one(r#"{"method":"echo","id":null}"#), None);
        assert_eq!(
            one(r#"{"method":"fail"}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-19,\"message\":\"No such device\"}}\n"
        );
    }

    #[test]
    fn invalid_requests_get_minus_32600() {
        let invalid_null =
            "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32600,\"message\":\"Invalid request\"}}\n";
        for req in [
            r#"{"method":"echo","id":1,"foo":2}"#,
            r#"{"method":"echo","id":1,"id":2}"#,
            r#"{"id":1}"#,
            r#"{"method":1,"id":1}"#,
            r#"{"jsonrpc":"1.0","method":"echo","id":1}"#,
            r#"{"method":"echo","id":{}}"#,
            r#"{"method":"echo","id":true}"#,
            r#"[]"#,
            r#"1"#,
            r#""str""#,
            r#"null"#,
        ] {
            assert_eq!(one(req).as_deref(), Some(invalid_null), "{req}");
        }
        assert_eq!(
            one(r#"{"method":"echo","id":5,"params":3}"#).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":5,\"error\":{\"code\":-32600,\"message\":\"Invalid request\"}}\n"
        );
    }

    #[test]
    fn batches_collect_responses_in_order() {
        let r = one(r#"[
              {"jsonrpc":"2.0","method":"echo","params":{"n":1},"id":1},
              {"jsonrpc":"2.0","method":"echo","params":{"n":2}},
              5,
              {"jsonrpc":"2.0","method":"nope","id":"x"},
              {"jsonrpc":"2.0","method":"echo","params":[3],"id":3}
            ]"#)
        .unwrap();
        assert_eq!(
            r,
            concat!(
                "[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"n\":1}},",
                "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32600,\"message\":\"Invalid request\"}},",
                "{\"jsonrpc\":\"2.0\",\"id\":\"x\",\"error\":{\"code\":-32601,\"message\":\"Method not found\"}},",
                "{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":[3]}]\n"
            )
        );
        // Only successful notifications: nothing at all.
        assert_eq!(
            one(r#"[{"method":"echo"},{"method":"echo","id":null}]"#),
            None
        );
    }

    /// Each value of a pipeline gets its own response (the socket tests
    /// show they may come back in any order).
    #[test]
    fn pipelined_requests_each_get_their_response() {
        let r = run(
            r#"{"method":"echo","params":[1],"id":1}{"method":"echo"} {"method":"echo","params":[2],"id":2}"#,
        );
        assert_eq!(
            r,
            vec![
                Some("{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[1]}\n".to_string()),
                None,
                Some("{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":[2]}\n".to_string()),
            ]
        );
    }

    /// The server end to end on a real reactor, driven by plain blocking
    /// sockets from the test thread, as rpc.py would.
    mod socket {
        use super::*;
        use std::io::{BufRead, BufReader, Read, Write};
        use std::os::unix::net::UnixStream as StdStream;
        use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
        use std::sync::mpsc;
        use std::time::Instant;

        use reactor::{CoreSet, Runtime, RuntimeConfig};

        fn socket_table() -> RpcTable {
            let mut t = RpcTable::new();
            t.register("echo", StateMask::ANY, |p| async move {
                Ok(p.unwrap_or(Value::Null))
            });
            t.register("slow", StateMask::ANY, |_| async {
                reactor::sleep(Duration::from_millis(200)).await;
                Ok(json!("slow"))
            });
            // A timer, not `pending()`: a task nothing can wake would be
            // freed at once.
            t.register("hang", StateMask::ANY, |_| async {
                reactor::sleep(Duration::from_secs(3600)).await;
                Ok(Value::Null)
            });
            t
        }

        /// Serves `socket_table` on a fresh socket from a one-core reactor
        /// set, runs `client` against it on this thread, shuts down, and
        /// checks the socket and lock files are gone.
        fn with_server(name: &str, client: impl FnOnce(&Path)) {
            let dir = std::env::temp_dir()
                .join(format!("ferroplane-jsonrpc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let sock = dir.join("spdk.sock");
            let lock = dir.join("spdk.sock.lock");
            let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
            let server_sock = sock.clone();
            let cfg = RuntimeConfig::new(CoreSet::parse_list("0").unwrap());
            let rt = Runtime::start(cfg, move || async move {
                let table = Rc::new(socket_table());
                let state = Rc::new(Cell::new(RpcState::Runtime));
                let server = match RpcServer::start(&server_sock, table.clone(), state.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // The lock keeps a second server off the path, and the
                // failed attempt leaves the first one's files alone.
                let in_use = format!(
                    "RPC Unix domain socket path {} in use. Specify another.",
                    server_sock.display()
                );
                let second = match RpcServer::start(&server_sock, table, state) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse && e.to_string() == in_use => {
                        Ok(())
                    }
                    Err(e) => Err(format!("second start: unexpected error {e}")),
                    Ok(_) => Err("second start succeeded".to_string()),
                };
                reactor::on_shutdown(move || async move { server.stop() });
                let _ = ready_tx.send(second);
            })
            .unwrap();
            let started = ready_rx.recv_timeout(Duration::from_secs(10));
            let outcome = match started {
                Ok(Ok(())) => catch_unwind(AssertUnwindSafe(|| client(&sock))),
                other => Err(Box::new(format!("server did not start: {other:?}")) as _),
            };
            rt.handle().shutdown(0);
            assert_eq!(rt.join(), 0);
            if let Err(p) = outcome {
                resume_unwind(p);
            }
            assert!(!sock.exists(), "socket file left behind");
            assert!(!lock.exists(), "lock file left behind");
            let _ = std::fs::remove_dir_all(&dir);
        }

        struct Client {
            stream: StdStream,
            reader: BufReader<StdStream>,
        }

        impl Client {
            fn connect(path: &Path) -> Client {
                let stream = StdStream::connect(path).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let reader = BufReader::new(stream.try_clone().unwrap());
                Client { stream, reader }
            }

            fn send(&mut self, data: &str) {
                self.stream.write_all(data.as_bytes()).unwrap();
            }

            /// One response line, newline included.
            fn line(&mut self) -> String {
                let mut line = String::new();
                let n = self.reader.read_line(&mut line).unwrap();
                assert!(n > 0, "connection closed");
                line
            }

            fn expect_eof(&mut self) {
                let mut rest = String::new();
                self.reader.read_to_string(&mut rest).unwrap();
                assert_eq!(rest, "", "data before end of stream");
            }
        }

        /// A request as rpc.py sends it: pretty-printed with indent 2, no
        /// trailing newline.
        fn request(method: &str, id: u64, params: Option<Value>) -> String {
            let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
            if let Some(p) = params {
                req["params"] = p;
            }
            serde_json::to_string_pretty(&req).unwrap()
        }

        fn result_line(id: u64, result: &str) -> String {
            format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{result}}}\n")
        }

        #[test]
        fn serves_rpc_py_style_clients() {
            with_server("serve", |sock| {
                let mut a = Client::connect(sock);
                // A pretty-printed request in two writes.
                let req = request("echo", 1, Some(json!({"x": [1, 2]})));
                let (head, tail) = req.split_at(req.len() / 2);
                a.send(head);
                std::thread::sleep(Duration::from_millis(50));
                a.send(tail);
                assert_eq!(a.line(), result_line(1, r#"{"x":[1,2]}"#));
                // An unknown method: the table's -32601.
                a.send(&request("no_such_method", 2, None));
                assert_eq!(
                    a.line(),
                    "{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":-32601,\"message\":\"Method not found\"}}\n"
                );
                // Pipelined in one write: the fast one sent second is
                // answered first, while the slow one still runs.
                let t0 = Instant::now();
                a.send(&(request("slow", 3, None) + &request("echo", 4, Some(json!([4])))));
                assert_eq!(a.line(), result_line(4, "[4]"));
                assert!(
                    t0.elapsed() < Duration::from_millis(200),
                    "echo waited behind slow"
                );
                assert_eq!(a.line(), result_line(3, "\"slow\""));

                // While `a` waits on a slow request, `b` is served.
                let t0 = Instant::now();
                a.send(&request("slow", 5, None));
                let mut b = Client::connect(sock);
                b.send(&request("echo", 1, Some(json!(["b"]))));
                assert_eq!(b.line(), result_line(1, r#"["b"]"#));
                let b_took = t0.elapsed();
                assert_eq!(a.line(), result_line(5, "\"slow\""));
                let a_took = t0.elapsed();
                // Had `b` waited behind `a`, it would have taken the full 200 ms.
                assert!(b_took < Duration::from_millis(200), "b waited {b_took:?}");
                assert!(a_took >= Duration::from_millis(200), "slow took {a_took:?}");

                // A batch, as rpc.py -b sends it.
                let batch = serde_json::to_string_pretty(&json!([
                    {"jsonrpc": "2.0", "method": "echo", "params": {"n": 1}, "id": 1},
                    {"jsonrpc": "2.0", "method": "echo", "params": {"n": 2}},
                    {"jsonrpc": "2.0", "method": "echo", "params": {"n": 3}, "id": 3}
                ]))
                .unwrap();
                b.send(&batch);
                assert_eq!(
                    b.line(),
                    "[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"n\":1}},{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"n\":3}}]\n"
                );

                // A valid request then bad JSON: the answer, a parse error,
                // then the server closes.
                let mut c = Client::connect(sock);
                c.send(&(request("echo", 1, None) + "\n{bad json"));
                assert_eq!(c.line(), result_line(1, "null"));
                assert_eq!(c.line(), parse_error_line());
                c.expect_eof();

                // End of input with a request outstanding: it is answered,
                // then the connection closes.
                let mut d = Client::connect(sock);
                d.send(&request("slow", 7, None));
                d.stream.shutdown(std::net::Shutdown::Write).unwrap();
                assert_eq!(d.line(), result_line(7, "\"slow\""));
                d.expect_eof();

                // `a` and `b` still work.
                a.send(&request("echo", 6, None));
                assert_eq!(a.line(), result_line(6, "null"));
                b.send(&request("echo", 2, None));
                assert_eq!(b.line(), result_line(2, "null"));
            });
        }

        #[test]
        fn stop_ends_connections_that_never_read_or_wait_on_requests() {
            // Clients stay open until after the server stopped.
            let open = std::cell::RefCell::new(Vec::new());
            with_server("stop", |sock| {
                // Never reads: its writer is stuck in a write, its reader
                // waits for a permit.
                let a = Client::connect(sock);
                let big = json!(["x".repeat(100_000)]);
                let flood: String = (0..conn::MAX_REQUESTS_IN_FLIGHT as u64 + 10)
                    .map(|i| request("echo", i, Some(big.clone())))
                    .collect();
                let mut out = a.stream.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = out.write_all(flood.as_bytes());
                });
                // More requests that never finish than may be in flight:
                // its reader waits for a permit while its writer is idle.
                let mut b = Client::connect(sock);
                let hangs: String = (0..conn::MAX_REQUESTS_IN_FLIGHT as u64 + 1)
                    .map(|i| request("hang", i, None))
                    .collect();
                b.send(&hangs);
                // Has ended its input but waits for its request.
                let mut c = Client::connect(sock);
                c.send(&request("hang", 1, None));
                c.stream.shutdown(std::net::Shutdown::Write).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                open.borrow_mut().extend([a, b, c]);
            });
            // Stop returned (the reactor joined), and each connection was
            // closed without an answer to what was still running.
            for mut c in open.into_inner().into_iter().skip(1) {
                c.expect_eof();
            }
        }

        #[test]
        fn connections_beyond_the_limit_wait_for_a_free_slot() {
            with_server("limit", |sock| {
                let mut held: Vec<Client> = (0..MAX_CONNECTIONS)
                    .map(|_| Client::connect(sock))
                    .collect();
                // The first and the last of the limit are served.
                for c in [0, held.len() - 1] {
                    held[c].send(&request("echo", 1, None));
                    assert_eq!(held[c].line(), result_line(1, "null"));
                }
                // One more connects (the backlog) but is not served...
                let mut extra = Client::connect(sock);
                extra.send(&request("echo", 9, None));
                extra
                    .stream
                    .set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut line = String::new();
                let err = extra.reader.read_line(&mut line).unwrap_err();
                assert!(
                    matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "{err}"
                );
                // ... until a connection closes.
                drop(held.pop());
                extra
                    .stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                assert_eq!(extra.line(), result_line(9, "null"));
            });
        }
    }
}
