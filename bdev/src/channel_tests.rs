//! The framework's I/O shaping and lifecycle, seen by a probe module that
//! records what reaches it: splitting, bounce buffering, NoMemory retry
//! (io_wait) and draining before destruct.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::bdev::{Bdev, BdevProps, IoRequirements, LocalFuture};
use crate::buf::BufLender;
use crate::channel::BdevChannel;
use crate::io::{IoBox, IoBuf, IoCompletion, IoStatus, IoType};
use crate::registry;
use crate::testutil::run;

const BS: usize = 512;
const BLOCKS: u64 = 256;

/// What the probe saw and does.
#[derive(Default)]
struct ProbeState {
    mem: Mutex<Vec<u8>>,
    /// (type, offset, blocks, data pointer) of every I/O that reached it.
    log: Mutex<Vec<(IoType, u64, u64, usize)>>,
    /// Complete this many I/Os with NoMemory before serving them.
    nomem: AtomicU32,
    /// Hold I/O until told to release it.
    hold: AtomicBool,
    destructed: AtomicBool,
}

struct Probe(Arc<ProbeState>);

impl Bdev for Probe {
    fn module(&self) -> &'static str {
        "probe"
    }
    fn product_name(&self) -> &'static str {
        "Probe"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write | IoType::Compare)
    }
    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        let ch = Rc::new(ProbeChannel {
            st: self.0.clone(),
            held: RefCell::new(Vec::new()),
        });
        HELD.with(|h| *h.borrow_mut() = Some(ch.clone()));
        ch
    }
    fn write_config_json(&self) -> Option<serde_json::Value> {
        None
    }
    fn destruct(&self) -> LocalFuture<()> {
        self.0.destructed.store(true, Ordering::SeqCst);
        Box::pin(async {})
    }
}

struct ProbeChannel {
    st: Arc<ProbeState>,
    held: RefCell<Vec<IoBox>>,
}

thread_local! {
    static HELD: RefCell<Option<Rc<ProbeChannel>>> = const { RefCell::new(None) };
}

impl ProbeChannel {
    fn serve(&self, mut io: IoBox) {
        let (off, n) = (io.offset_blocks as usize * BS, io.num_blocks as usize * BS);
        let mut mem = self.st.mem.lock().unwrap();
        let status = match io.io_type {
            IoType::Read => {
                io.buf.as_mut_slice()[..n].copy_from_slice(&mem[off..off + n]);
                IoStatus::Success
            }
            IoType::Write => {
                mem[off..off + n].copy_from_slice(&io.data()[..n]);
                IoStatus::Success
            }
            _ if mem[off..off + n] == io.data()[..n] => IoStatus::Success,
            _ => IoStatus::Miscompare,
        };
        drop(mem);
        io.complete(status);
    }
}

impl BdevChannel for ProbeChannel {
    fn submit(self: Rc<Self>, io: IoBox) {
        let ptr = if io.io_type == IoType::Read {
            io.buf.as_ptr() as usize
        } else {
            io.data_ptr() as usize
        };
        self.st
            .log
            .lock()
            .unwrap()
            .push((io.io_type, io.offset_blocks, io.num_blocks, ptr));
        let nomem = self.st.nomem.load(Ordering::SeqCst);
        if nomem > 0 {
            self.st.nomem.store(nomem - 1, Ordering::SeqCst);
            return io.complete(IoStatus::NoMemory);
        }
        if self.st.hold.load(Ordering::SeqCst) {
            return self.held.borrow_mut().push(io);
        }
        self.serve(io);
    }
}

fn release_held() {
    if let Some(ch) = HELD.with(|h| h.borrow().clone()) {
        let held = std::mem::take(&mut *ch.held.borrow_mut());
        for io in held {
            ch.serve(io);
        }
    }
}

async fn probe(name: &str, io: IoRequirements) -> (crate::BdevHandle, Arc<ProbeState>) {
    let st = Arc::new(ProbeState::default());
    *st.mem.lock().unwrap() = vec![0; BLOCKS as usize * BS];
    let r = registry::reserve(name).unwrap();
    let props = BdevProps::new(name, Uuid::new_v4(), BS as u32, BLOCKS).with_io(io);
    let b = registry::register(r, props, Box::new(Probe(st.clone())))
        .await
        .unwrap();
    (b, st)
}

struct Done(RefCell<Vec<IoBox>>);

impl IoCompletion for Done {
    fn io_done(&self, io: IoBox) {
        self.0.borrow_mut().push(io);
    }
}

async fn wait_for(done: &Done, n: usize) {
    for _ in 0..100_000 {
        if done.0.borrow().len() >= n {
            return;
        }
        futures_lite::future::yield_now().await;
    }
    panic!("I/O did not complete");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn large_and_boundary_crossing_io_is_split_for_the_module() {
    run(|| async {
        let req = IoRequirements {
            required_alignment: 0,
            split_boundary_blocks: 16,
            max_transfer_blocks: 6,
        };
        let (b, st) = probe("P_split", req).await;
        let ch = b.get_channel();
        let data = pattern(40 * BS, 3);
        // A write from 10 to 50: pieces end at 16, 22, 28, 32, 38, 44, 48, 50.
        ch.write(10, &data).await.unwrap();
        let pieces: Vec<(u64, u64)> = st.log.lock().unwrap().iter().map(|e| (e.1, e.2)).collect();
        assert_eq!(
            pieces,
            vec![
                (10, 6),
                (16, 6),
                (22, 6),
                (28, 4),
                (32, 6),
                (38, 6),
                (44, 4),
                (48, 2)
            ]
        );
        assert_eq!(&st.mem.lock().unwrap()[10 * BS..50 * BS], &data[..]);
        // Reads come back whole, in place.
        assert_eq!(ch.read(10, 40).await.unwrap(), data);
        // Statistics count what the submitter sent, not the pieces.
        let stats = ch.stats();
        assert_eq!((stats.num_write_ops, stats.num_read_ops), (1, 1));
        assert_eq!(stats.bytes_written, 40 * BS as u64);
        // A compare is split too, and a mismatch in any piece fails it.
        let done = Rc::new(Done(RefCell::new(Vec::new())));
        let mut bad = data.clone();
        bad[35 * BS] ^= 1;
        for d in [&data, &bad] {
            let io = IoBox::with(IoType::Compare, 10, 40, IoBuf::from_slice(d));
            ch.submit(io, done.clone());
        }
        wait_for(&done, 2).await;
        let st: Vec<IoStatus> = done.0.borrow().iter().map(|io| io.status()).collect();
        assert_eq!(st, vec![IoStatus::Success, IoStatus::Miscompare]);
        // Within limits: one piece.
        let before = b.get_channel().stats();
        ch.write(16, &data[..6 * BS]).await.unwrap();
        assert_eq!(ch.stats().num_write_ops, before.num_write_ops + 1);
    });
}

#[test]
fn unaligned_data_is_bounced_through_an_aligned_buffer() {
    run(|| async {
        let req = IoRequirements {
            required_alignment: 4096,
            ..IoRequirements::default()
        };
        let (b, st) = probe("P_align", req).await;
        let ch = b.get_channel();
        let done = Rc::new(Done(RefCell::new(Vec::new())));
        // Data 100 bytes into an aligned buffer, as a write's in-capsule data
        // lies in a receive buffer: a read-only share, and a read window.
        let data = pattern(8 * BS, 9);
        let mut backing = IoBuf::zeroed(100 + data.len());
        backing.as_mut_slice()[100..].copy_from_slice(&data);
        let lender = BufLender::new();
        lender.lend(backing).unwrap();
        let mut w = IoBox::with(IoType::Write, 4, 8, IoBuf::empty());
        w.shared = lender.share(100, data.len()).unwrap();
        assert_ne!(w.data_ptr() as usize % 4096, 0);
        ch.submit(w, done.clone());
        wait_for(&done, 1).await;
        let w = done.0.borrow_mut().pop().unwrap();
        assert!(w.status().is_success());
        // The submitter's view is back, untouched.
        assert_eq!(w.data(), &data[..]);
        drop(w);
        assert_eq!(&st.mem.lock().unwrap()[4 * BS..12 * BS], &data[..]);
        let backing = lender.reclaim().expect("every piece returned");
        lender.lend(backing).unwrap();
        let window = lender.window(100, data.len()).unwrap();
        let r = IoBox::with(IoType::Read, 4, 8, window);
        ch.submit(r, done.clone());
        wait_for(&done, 1).await;
        let r = done.0.borrow_mut().pop().unwrap();
        assert!(r.status().is_success());
        drop(r);
        let backing = lender.reclaim().unwrap();
        assert_eq!(
            &backing.as_slice()[100..],
            &data[..],
            "read into the window"
        );
        // The module saw only aligned buffers; aligned ones pass as they are.
        let aligned = IoBuf::from_slice(&data);
        let p = aligned.as_ptr() as usize;
        ch.submit(IoBox::with(IoType::Write, 0, 8, aligned), done.clone());
        wait_for(&done, 1).await;
        let log = st.log.lock().unwrap();
        assert!(log.iter().all(|e| e.3 % 4096 == 0), "{log:?}");
        assert_eq!(log.last().unwrap().3, p, "no bounce when aligned");
    });
}

#[test]
fn io_refused_for_lack_of_resources_is_retried_not_failed() {
    run(|| async {
        let (b, st) = probe("P_nomem", IoRequirements::default()).await;
        let ch = b.get_channel();
        let data = pattern(2 * BS, 1);
        // Alone: retried by the timer.
        st.nomem.store(3, Ordering::SeqCst);
        ch.write(0, &data).await.unwrap();
        assert_eq!(
            st.log.lock().unwrap().len(),
            4,
            "three refusals, then served"
        );
        assert_eq!(ch.stats().nomem, 3);
        assert_eq!(ch.stats().failed, 0);
        // Several in flight: each is retried as others complete.
        let done = Rc::new(Done(RefCell::new(Vec::new())));
        st.nomem.store(5, Ordering::SeqCst);
        for i in 0..8u64 {
            let io = IoBox::with(IoType::Write, i * 2, 2, IoBuf::from_slice(&data));
            ch.submit(io, done.clone());
        }
        wait_for(&done, 8).await;
        assert!(done.0.borrow().iter().all(|io| io.status().is_success()));
        assert_eq!(ch.in_flight(), 0);
    });
}

#[test]
fn unregister_drains_io_in_flight_before_destruct() {
    run(|| async {
        let (b, st) = probe("P_drain", IoRequirements::default()).await;
        let ch = b.get_channel();
        st.hold.store(true, Ordering::SeqCst);
        let done = Rc::new(Done(RefCell::new(Vec::new())));
        let io = IoBox::with(IoType::Read, 0, 1, IoBuf::new(BS));
        ch.submit(io, done.clone());
        let finished = Rc::new(Cell::new(false));
        let f = finished.clone();
        reactor::spawn_local(async move {
            registry::unregister("P_drain", None).await.unwrap();
            f.set(true);
        });
        for _ in 0..200 {
            futures_lite::future::yield_now().await;
        }
        assert!(!finished.get(), "unregister waits for the read in flight");
        assert!(!st.destructed.load(Ordering::SeqCst), "destruct waits");
        assert!(registry::lookup("P_drain").is_none(), "hidden at once");
        // New I/O is refused meanwhile.
        let late = IoBox::with(IoType::Read, 0, 1, IoBuf::new(BS));
        ch.submit(late, done.clone());
        wait_for(&done, 1).await;
        assert_eq!(done.0.borrow()[0].status(), IoStatus::Failed);
        release_held();
        wait_for(&done, 2).await;
        assert!(done.0.borrow()[1].status().is_success());
        // The drain visits every core: allow for the round trips.
        for _ in 0..5000 {
            if finished.get() {
                break;
            }
            reactor::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(finished.get() && st.destructed.load(Ordering::SeqCst));
        drop(ch);
    });
}
