//! Many requests in flight on one RPC connection, through the real binary:
//! a slow call is overtaken by fast ones sent after it; a thousand
//! pipelined requests (mixed, failing, notifications, batches) get exactly
//! their replies by id; a Go-client-like connection shared by threads keeps
//! answering while a long call is outstanding (Longhorn's engine,
//! `LONGHORN.md` §1); a client that never reads is held back by the
//! per-connection bounds without stalling anyone else or growing the
//! target's memory, and so is one whose requests are all still running;
//! `"params": null` is taken as absent.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{hex, pattern, unhex, Target};
use serde_json::{json, Value};

/// A raw connection: requests are written as given, replies read as a
/// stream of JSON values.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(path: &Path) -> Conn {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// The next reply; None at end of stream.
    fn read_value(&mut self) -> Option<Value> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    return Some(v);
                }
                Some(Err(e)) if !e.is_eof() => panic!("bad JSON from the target: {e}"),
                _ => {}
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read a reply");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A request, compact. `id: None` makes a notification; `params: None`
/// leaves the member out.
fn req(id: Option<Value>, method: &str, params: Option<Value>) -> String {
    let mut r = json!({"jsonrpc": "2.0", "method": method});
    if let Some(p) = params {
        r["params"] = p;
    }
    if let Some(id) = id {
        r["id"] = id;
    }
    r.to_string()
}

fn malloc(t: &Target, name: &str, num_blocks: u64, block_size: u64) {
    t.ok(
        "bdev_malloc_create",
        json!({"name": name, "num_blocks": num_blocks, "block_size": block_size}),
    );
}

/// A delay bdev `name` over a fresh malloc bdev, reads taking `read_us`.
fn delay_bdev(t: &Target, name: &str, read_us: u64) {
    let base = format!("{name}_base");
    malloc(t, &base, 2048, 512);
    t.ok(
        "bdev_delay_create",
        json!({"name": name, "base_bdev_name": base,
            "avg_read_latency": read_us, "p99_read_latency": read_us,
            "avg_write_latency": 0, "p99_write_latency": 0}),
    );
}

/// An AIO bdev `name` on a fresh file of `blocks` × 4 KiB in the target's
/// directory.
fn file_bdev(t: &Target, name: &str, blocks: u64) {
    let path = t.dir.join(format!("{name}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(blocks * 4096)
        .unwrap();
    t.ok(
        "bdev_aio_create",
        json!({"name": name, "filename": path.to_str().unwrap(), "block_size": 4096}),
    );
}

fn read_block(t: &Target, name: &str, block: u64) -> Vec<u8> {
    let r = t.ok(
        "bdev_read",
        json!({"name": name, "offset_blocks": block, "num_blocks": 1}),
    );
    unhex(r["data"].as_str().unwrap())
}

#[test]
fn a_slow_call_is_overtaken_by_fast_calls_sent_after_it() {
    let t = Target::start();
    delay_bdev(&t, "D0", 300_000);
    let mut c = Conn::connect(&t.socket);
    let t0 = Instant::now();
    c.send(&req(
        Some(json!(1)),
        "bdev_read",
        Some(json!({"name": "D0", "offset_blocks": 0, "num_blocks": 1})),
    ));
    // Sent separately and after it, so the slow read is surely running.
    thread::sleep(Duration::from_millis(20));
    c.send(&req(Some(json!(2)), "spdk_get_version", None));
    c.send(&req(
        Some(json!(3)),
        "bdev_get_bdevs",
        Some(json!({"name": "D0"})),
    ));
    let mut arrivals = Vec::new();
    for _ in 0..3 {
        let r = c.read_value().expect("a reply");
        arrivals.push((r["id"].as_u64().unwrap(), t0.elapsed(), r));
    }
    let order: Vec<u64> = arrivals.iter().map(|a| a.0).collect();
    assert_eq!(
        order[2], 1,
        "the slow read was not answered last: {order:?}"
    );
    let fast_at = arrivals[1].1;
    let slow_at = arrivals[2].1;
    assert!(
        slow_at >= Duration::from_millis(300),
        "the read took {slow_at:?}"
    );
    assert!(
        slow_at - fast_at >= Duration::from_millis(150),
        "fast replies at {:?} and {fast_at:?}, slow at {slow_at:?}",
        arrivals[0].1
    );
    for (id, _, r) in &arrivals {
        match id {
            1 => assert_eq!(r["result"]["data"], json!("00".repeat(512))),
            2 => assert!(r["result"]["version"].is_string(), "{r}"),
            3 => assert_eq!(r["result"][0]["name"], "D0"),
            _ => panic!("unexpected reply {r}"),
        }
    }
}

/// What a reply must be.
#[derive(Debug, Clone)]
enum Expect {
    Version,
    BdevNamed(&'static str),
    Code(i64),
    Data(Vec<u8>),
    True,
    MethodList,
    Batch(Vec<(Value, Expect)>),
}

fn check(reply: &Value, id: &Value, expect: &Expect) {
    assert_eq!(&reply["id"], id, "{reply}");
    let result = &reply["result"];
    match expect {
        Expect::Version => assert!(result["version"].is_string(), "{reply}"),
        Expect::BdevNamed(n) => assert_eq!(result[0]["name"], *n, "{reply}"),
        Expect::Code(c) => assert_eq!(reply["error"]["code"], *c, "{reply}"),
        Expect::Data(d) => assert_eq!(result["data"], json!(hex(d)), "{id}"),
        Expect::True => assert_eq!(result, &json!(true), "{reply}"),
        Expect::MethodList => assert!(
            result
                .as_array()
                .is_some_and(|m| m.contains(&json!("bdev_read"))),
            "{reply}"
        ),
        Expect::Batch(_) => unreachable!(),
    }
}

#[test]
fn a_thousand_pipelined_requests_get_exactly_their_replies() {
    const N: usize = 1000;
    const SEEDED_BLOCKS: u64 = 16;
    let t = Target::start();
    malloc(&t, "M0", 2048, 512);
    delay_bdev(&t, "D0", 1_000_000);
    file_bdev(&t, "F0", 256);
    let seeded = |b: u64| pattern(4096, 200 + b as u8);
    for b in 0..SEEDED_BLOCKS {
        t.ok(
            "bdev_write",
            json!({"name": "F0", "offset_blocks": b, "data": hex(&seeded(b))}),
        );
    }

    // id -> what its reply must be; writes to check afterwards.
    let mut expected: HashMap<String, (Value, Expect)> = HashMap::new();
    let mut writes = Vec::new();
    let mut text = String::new();
    let add = |text: &mut String,
               expected: &mut HashMap<String, (Value, Expect)>,
               id: Value,
               method: &str,
               params: Option<Value>,
               e| {
        text.push_str(&req(Some(id.clone()), method, params));
        expected.insert(id.to_string(), (id, e));
    };
    for i in 0..N {
        let id = json!(10_000 + i);
        let block = (i / 10) as u64;
        if i == 0 {
            add(
                &mut text,
                &mut expected,
                id,
                "bdev_read",
                Some(json!({"name": "D0", "offset_blocks": 0, "num_blocks": 1})),
                Expect::Data(vec![0; 512]),
            );
            continue;
        }
        if i == 300 || i == 700 {
            // A batch: one unit, its replies in element order, the
            // successful notification left out.
            let ids = [
                json!(format!("b{i}-0")),
                json!(format!("b{i}-2")),
                json!(format!("b{i}-3")),
            ];
            let batch = format!(
                "[{},{},{},{}]",
                req(Some(ids[0].clone()), "spdk_get_version", None),
                req(None, "spdk_get_version", None),
                req(
                    Some(ids[1].clone()),
                    "bdev_get_bdevs",
                    Some(json!({"name": "nope"}))
                ),
                req(
                    Some(ids[2].clone()),
                    "bdev_read",
                    Some(json!({"name": "F0", "offset_blocks": 3, "num_blocks": 1}))
                ),
            );
            text.push_str(&batch);
            let elements = vec![
                (ids[0].clone(), Expect::Version),
                (ids[1].clone(), Expect::Code(-19)),
                (ids[2].clone(), Expect::Data(seeded(3))),
            ];
            expected.insert(
                ids[0].to_string(),
                (ids[0].clone(), Expect::Batch(elements)),
            );
            continue;
        }
        match i % 10 {
            0 => add(
                &mut text,
                &mut expected,
                id,
                "spdk_get_version",
                None,
                Expect::Version,
            ),
            1 => add(
                &mut text,
                &mut expected,
                id,
                "bdev_get_bdevs",
                Some(json!({"name": "M0"})),
                Expect::BdevNamed("M0"),
            ),
            2 => add(
                &mut text,
                &mut expected,
                id,
                "bdev_get_bdevs",
                Some(json!({"name": "nope"})),
                Expect::Code(-19),
            ),
            3 => add(
                &mut text,
                &mut expected,
                id,
                "no_such_method",
                None,
                Expect::Code(-32601),
            ),
            4 => {
                let b = block % SEEDED_BLOCKS;
                add(
                    &mut text,
                    &mut expected,
                    id,
                    "bdev_read",
                    Some(json!({"name": "F0", "offset_blocks": b, "num_blocks": 1})),
                    Expect::Data(seeded(b)),
                )
            }
            5 => {
                let b = SEEDED_BLOCKS + block;
                let data = pattern(4096, i as u8);
                add(
                    &mut text,
                    &mut expected,
                    id,
                    "bdev_write",
                    Some(json!({"name": "F0", "offset_blocks": b, "data": hex(&data)})),
                    Expect::True,
                );
                writes.push((b, data));
            }
            // A successful notification: no reply at all.
            6 => text.push_str(&req(None, "spdk_get_version", None)),
            // Invalid params type: -32600 with the id echoed.
            7 => add(
                &mut text,
                &mut expected,
                id,
                "spdk_get_version",
                Some(json!(3)),
                Expect::Code(-32600),
            ),
            8 => add(
                &mut text,
                &mut expected,
                id,
                "bdev_malloc_create",
                Some(Value::Null),
                Expect::Code(-32602),
            ),
            _ => add(
                &mut text,
                &mut expected,
                id,
                "rpc_get_methods",
                Some(Value::Null),
                Expect::MethodList,
            ),
        }
    }
    let want = expected.len();

    let mut c = Conn::connect(&t.socket);
    // Written in one go from another thread: the target may push back
    // while this one reads.
    let mut out = c.stream.try_clone().unwrap();
    let writer = thread::spawn(move || out.write_all(text.as_bytes()).unwrap());
    let mut replies = Vec::new();
    while replies.len() < want {
        replies.push(c.read_value().expect("connection closed early"));
    }
    writer.join().unwrap();

    let mut seen = HashMap::new();
    for (pos, reply) in replies.iter().enumerate() {
        let key = match reply {
            Value::Array(elements) => elements[0]["id"].to_string(),
            _ => reply["id"].to_string(),
        };
        assert!(
            seen.insert(key.clone(), pos).is_none(),
            "two replies for {key}"
        );
        let (id, expect) = expected
            .get(&key)
            .unwrap_or_else(|| panic!("reply for no request: {reply}"));
        match (expect, reply) {
            (Expect::Batch(elements), Value::Array(got)) => {
                assert_eq!(got.len(), elements.len(), "{reply}");
                for ((id, e), r) in elements.iter().zip(got) {
                    check(r, id, e);
                }
            }
            (Expect::Batch(_), _) => panic!("batch answered by {reply}"),
            (e, r) => check(r, id, e),
        }
    }
    assert_eq!(seen.len(), want);
    // Nothing more: the notifications got no reply.
    c.send(&req(Some(json!("last")), "spdk_get_version", None));
    assert_eq!(c.read_value().unwrap()["id"], "last");
    // The slow read, dispatched first, was overtaken by many others.
    let slow_pos = seen["10000"];
    assert!(
        slow_pos >= 100,
        "the 1 s read came back at position {slow_pos}"
    );
    for (b, data) in writes {
        assert_eq!(read_block(&t, "F0", b), data, "block {b}");
    }
}

/// Longhorn's go-spdk-helper, reduced: one connection shared by many
/// threads, writes serialised by a mutex, one reader decoding a stream of
/// replies and handing each to its caller by id. Requests are encoded as
/// Go's encoder writes them: tab-indented, `"params": null` when there are
/// none, ids increasing from a random start.
struct GoClient {
    writer: Mutex<UnixStream>,
    next_id: AtomicU32,
    pending: Arc<Mutex<HashMap<u64, mpsc::Sender<Value>>>>,
    /// Replies that matched no caller.
    strays: Arc<Mutex<Vec<Value>>>,
}

impl GoClient {
    fn connect(path: &Path) -> GoClient {
        let stream = UnixStream::connect(path).expect("connect");
        let reader = stream.try_clone().unwrap();
        let pending: Arc<Mutex<HashMap<u64, mpsc::Sender<Value>>>> = Arc::default();
        let strays: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, s) = (pending.clone(), strays.clone());
        thread::spawn(move || {
            for reply in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
                let Ok(reply) = reply else { return };
                let tx = reply["id"]
                    .as_u64()
                    .and_then(|id| p.lock().unwrap().remove(&id));
                match tx {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => s.lock().unwrap().push(reply),
                }
            }
        });
        let start = std::process::id() % 10_000;
        GoClient {
            writer: Mutex::new(stream),
            next_id: AtomicU32::new(start),
            pending,
            strays,
        }
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let request = json!({"id": id, "jsonrpc": "2.0", "method": method, "params": params});
        let mut text = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut text, fmt);
        serde::Serialize::serialize(&request, &mut ser).unwrap();
        text.push(b'\n');
        let (tx, rx) = mpsc::channel();
        self.pending.lock().unwrap().insert(id as u64, tx);
        self.writer.lock().unwrap().write_all(&text).unwrap();
        let reply = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no reply to {method} (id {id})"));
        match reply.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(reply["result"].clone()),
        }
    }
}

#[test]
fn a_go_client_sharing_one_connection_is_answered_while_a_long_call_runs() {
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 6;
    const LONG: Duration = Duration::from_secs(3);
    let t = Target::start();
    delay_bdev(&t, "Slow", LONG.as_micros() as u64);
    file_bdev(&t, "F0", 256);
    t.ok(
        "bdev_write",
        json!({"name": "Slow", "offset_blocks": 5, "data": hex(&pattern(512, 9))}),
    );
    let client = Arc::new(GoClient::connect(&t.socket));

    // The stand-in for Longhorn's 24-hour checksum call.
    let long_done = Arc::new(AtomicBool::new(false));
    let long = {
        let (client, done) = (client.clone(), long_done.clone());
        thread::spawn(move || {
            let t0 = Instant::now();
            let r = client.call(
                "bdev_read",
                json!({"name": "Slow", "offset_blocks": 5, "num_blocks": 1}),
            );
            done.store(true, Ordering::SeqCst);
            (r, t0.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(50));

    let t0 = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|k| {
            let client = client.clone();
            thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                let mut timed = |f: &mut dyn FnMut()| {
                    let s = Instant::now();
                    f();
                    slowest = slowest.max(s.elapsed());
                };
                for j in 0..ROUNDS {
                    timed(&mut || {
                        let bdevs = client.call("bdev_get_bdevs", Value::Null).unwrap();
                        assert!(bdevs
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|b| b["name"] == "Slow"));
                    });
                    timed(&mut || {
                        let v = client.call("spdk_get_version", Value::Null).unwrap();
                        assert!(v["version"].is_string());
                    });
                    timed(&mut || {
                        let s = client.call("nvmf_get_subsystems", Value::Null).unwrap();
                        assert!(s.is_array(), "{s}");
                    });
                    timed(&mut || {
                        let e = client
                            .call("bdev_get_bdevs", json!({"name": "missing"}))
                            .unwrap_err();
                        assert_eq!(e["code"], -19);
                    });
                    // Data through a file-backed bdev, each thread its own
                    // blocks.
                    let block = k * ROUNDS + j;
                    let data = pattern(4096, (block + 1) as u8);
                    timed(&mut || {
                        let w = client.call(
                            "bdev_write",
                            json!({"name": "F0", "offset_blocks": block, "data": hex(&data)}),
                        );
                        assert_eq!(w.unwrap(), json!(true));
                    });
                    timed(&mut || {
                        let r = client
                            .call(
                                "bdev_read",
                                json!({"name": "F0", "offset_blocks": block, "num_blocks": 1}),
                            )
                            .unwrap();
                        assert_eq!(unhex(r["data"].as_str().unwrap()), data);
                    });
                    let name = format!("T{k}_{j}");
                    timed(&mut || {
                        let r = client.call(
                            "bdev_malloc_create",
                            json!({"name": name, "num_blocks": 64, "block_size": 512}),
                        );
                        assert_eq!(r.unwrap(), json!(name));
                        let r = client.call("bdev_malloc_delete", json!({"name": name}));
                        assert_eq!(r.unwrap(), json!(true));
                    });
                }
                slowest
            })
        })
        .collect();
    let slowest = workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .max()
        .unwrap();
    let all_took = t0.elapsed();
    assert!(
        !long_done.load(Ordering::SeqCst),
        "the long call finished before the {} others ({all_took:?})",
        THREADS * ROUNDS * 8
    );
    assert!(slowest < Duration::from_secs(1), "a call took {slowest:?}");
    let (r, long_took) = long.join().unwrap();
    assert_eq!(r.unwrap()["data"], json!(hex(&pattern(512, 9))));
    assert!(long_took >= LONG, "the long call took {long_took:?}");
    assert!(
        client.strays.lock().unwrap().is_empty(),
        "unmatched replies"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_client_that_never_reads_is_held_back_and_stalls_no_one() {
    const FLOOD: usize = 40_000;
    let t = Arc::new(Target::start());
    // Replies of a few KiB each: unbounded, the flood's replies alone
    // would be about FLOOD × reply bytes.
    for i in 0..8 {
        malloc(&t, &format!("M{i}"), 256, 512);
    }
    file_bdev(&t, "F0", 64);
    let reply_bytes = t.ok("bdev_get_bdevs", Value::Null).to_string().len();
    assert!(reply_bytes > 3000, "{reply_bytes}");
    let rss_before = rss_kib(t.pid());

    // Another client keeps working, verifying data, and must not wait.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (t, stop) = (t.clone(), stop.clone());
        thread::spawn(move || {
            let mut c = t.client();
            let (mut calls, mut slowest) = (0u64, Duration::ZERO);
            while !stop.load(Ordering::SeqCst) {
                let s = Instant::now();
                let data = pattern(4096, calls as u8);
                let b = calls % 64;
                c.call(
                    "bdev_write",
                    json!({"name": "F0", "offset_blocks": b, "data": hex(&data)}),
                )
                .unwrap();
                let r = c
                    .call(
                        "bdev_read",
                        json!({"name": "F0", "offset_blocks": b, "num_blocks": 1}),
                    )
                    .unwrap();
                assert_eq!(unhex(r["data"].as_str().unwrap()), data);
                slowest = slowest.max(s.elapsed());
                calls += 1;
            }
            (calls, slowest)
        })
    };

    let one = req(Some(json!(1)), "bdev_get_bdevs", None);
    let flood: Vec<u8> = one.as_bytes().repeat(FLOOD);
    let mut c = Conn::connect(&t.socket);
    c.stream.set_nonblocking(true).unwrap();
    let mut written = 0;
    let mut last_progress = Instant::now();
    let t0 = Instant::now();
    let mut rss_peak = rss_before;
    // Until the target stops taking bytes for a second (or took it all).
    while written < flood.len() && last_progress.elapsed() < Duration::from_secs(1) {
        match c.stream.write(&flood[written..]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("flood write: {e}"),
        }
        rss_peak = rss_peak.max(rss_kib(t.pid()));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "flood never stalled"
        );
    }
    // Let whatever the target took turn into replies.
    thread::sleep(Duration::from_millis(500));
    rss_peak = rss_peak.max(rss_kib(t.pid()));
    stop.store(true, Ordering::SeqCst);
    let (calls, slowest) = other.join().unwrap();
    let taken = written / one.len();
    eprintln!(
        "flood: target took {taken} of {FLOOD} requests ({written} bytes); RSS {rss_before} -> {rss_peak} KiB; \
         other client: {calls} write+read pairs, slowest {slowest:?}"
    );
    // What the socket buffers and one read chunk hold, far from the flood.
    assert!(taken < FLOOD / 4, "the target took {taken} requests");
    // Limits: 1 MiB of queued replies + 64 in flight × a reply, and 1 MiB of
    // framing; allow for allocator slack.
    assert!(
        rss_peak < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_peak} KiB"
    );
    assert!(calls >= 10, "the other client made only {calls} calls");
    assert!(slowest < Duration::from_secs(2), "it waited {slowest:?}");

    // Now read: every request the target took is answered, nothing lost.
    c.stream.set_nonblocking(false).unwrap();
    let mut reader = Conn {
        stream: c.stream.try_clone().unwrap(),
        buf: Vec::new(),
    };
    let counter = thread::spawn(move || {
        let mut n = 0;
        while let Some(r) = reader.read_value() {
            assert_eq!(r["id"], 1, "{r}");
            assert_eq!(r["result"].as_array().unwrap().len(), 9);
            n += 1;
        }
        n
    });
    // Finish the request cut by the stall, then end the input.
    let end = written.div_ceil(one.len()) * one.len();
    c.stream.write_all(&flood[written..end]).unwrap();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(counter.join().unwrap(), end / one.len());
}

#[test]
fn null_params_are_taken_as_absent() {
    let t = Target::start();
    malloc(&t, "M0", 64, 512);
    let mut c = Conn::connect(&t.socket);
    let call = |c: &mut Conn, id: u64, method: &str| {
        c.send(&req(Some(json!(id)), method, Some(Value::Null)));
        let r = c.read_value().expect("a reply");
        assert_eq!(r["id"], id, "{r}");
        r
    };
    for (id, method) in [
        "nvmf_get_subsystems",
        "bdev_get_bdevs",
        "rpc_get_methods",
        "spdk_get_version",
        "framework_get_reactors",
        "bdev_get_iostat",
    ]
    .into_iter()
    .enumerate()
    {
        let r = call(&mut c, id as u64, method);
        assert!(r.get("result").is_some(), "{method}: {r}");
    }
    // Methods whose params are required: a clear invalid-params error.
    for (id, method) in ["bdev_malloc_create", "bdev_delay_create", "bdev_read"]
        .into_iter()
        .enumerate()
    {
        let r = call(&mut c, 100 + id as u64, method);
        assert_eq!(r["error"]["code"], -32602, "{method}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains("missing field"), "{method}: {msg}");
    }
    // Nothing was created, and the target is fine.
    assert_eq!(t.bdev_names(), vec!["M0"]);
}

#[test]
fn requests_still_running_hold_back_reading_at_the_in_flight_bound() {
    const FLOOD: usize = 20_000;
    let t = Target::start();
    delay_bdev(&t, "D0", 3_000_000);
    let one = req(
        Some(json!(7)),
        "bdev_read",
        Some(json!({"name": "D0", "offset_blocks": 0, "num_blocks": 1})),
    );
    let flood: Vec<u8> = one.as_bytes().repeat(FLOOD);
    let mut c = Conn::connect(&t.socket);
    c.stream.set_nonblocking(true).unwrap();
    let mut written = 0;
    let mut last_progress = Instant::now();
    // The reads take 3 s, so no reply exists yet: only the count of
    // requests in flight can stop the target taking more.
    while written < flood.len() && last_progress.elapsed() < Duration::from_millis(500) {
        match c.stream.write(&flood[written..]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("flood write: {e}"),
        }
    }
    let taken = written / one.len();
    eprintln!("the target took {taken} of {FLOOD} slow reads ({written} bytes)");
    assert!(taken < FLOOD / 2, "the target took {taken} slow reads");
    // Others are served meanwhile; the rest of the reads go fast.
    for kind in ["avg_read", "p99_read"] {
        t.ok(
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": "D0", "latency_type": kind, "latency_us": 0}),
        );
    }
    // Every read the target took is answered once; nothing is lost.
    c.stream.set_nonblocking(false).unwrap();
    let mut reader = Conn {
        stream: c.stream.try_clone().unwrap(),
        buf: Vec::new(),
    };
    let counter = thread::spawn(move || {
        let mut n = 0;
        while let Some(r) = reader.read_value() {
            assert_eq!(r["result"]["data"], json!("00".repeat(512)), "{r}");
            n += 1;
        }
        n
    });
    let end = written.div_ceil(one.len()) * one.len();
    c.stream.write_all(&flood[written..end]).unwrap();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(counter.join().unwrap(), end / one.len());
}
