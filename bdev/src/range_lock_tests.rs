//! Range locks seen by a probe module that holds I/O until told, so the
//! tests can prove what reached the module when, on more than one core.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::{LockKind, RangeLock};
use crate::bdev::{Bdev, BdevProps, IoRequirements, LocalFuture};
use crate::channel::BdevChannel;
use crate::io::{IoBox, IoBuf, IoCompletion, IoStatus, IoType};
use crate::testutil::{other_core, run};
use crate::{registry, BdevHandle};

const BS: usize = 512;
const BLOCKS: u64 = 1024;

#[derive(Default)]
struct ProbeState {
    /// (core, type, offset, blocks) of every I/O that reached the module.
    log: Mutex<Vec<(u32, IoType, u64, u64)>>,
    /// Hold I/O in the module until `release` on its core.
    hold: AtomicBool,
}

struct Probe(Arc<ProbeState>);

thread_local! {
    static HELD: RefCell<Vec<IoBox>> = const { RefCell::new(Vec::new()) };
}

impl Bdev for Probe {
    fn module(&self) -> &'static str {
        "lockprobe"
    }
    fn product_name(&self) -> &'static str {
        "Lock probe"
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        Rc::new(ProbeChannel(self.0.clone()))
    }
    fn write_config_json(&self) -> Option<serde_json::Value> {
        None
    }
    fn destruct(&self) -> LocalFuture<()> {
        Box::pin(async {})
    }
}

struct ProbeChannel(Arc<ProbeState>);

impl BdevChannel for ProbeChannel {
    fn submit(self: Rc<Self>, io: IoBox) {
        let core = reactor::current_core().0;
        self.0
            .log
            .lock()
            .unwrap()
            .push((core, io.io_type, io.offset_blocks, io.num_blocks));
        if self.0.hold.load(Ordering::SeqCst) {
            HELD.with(|h| h.borrow_mut().push(io));
        } else {
            io.complete(IoStatus::Success);
        }
    }
}

/// Completes the I/O the probe holds on this core.
fn release() {
    for io in HELD.with(|h| std::mem::take(&mut *h.borrow_mut())) {
        io.complete(IoStatus::Success);
    }
}

async fn probe(name: &str, io: IoRequirements) -> (BdevHandle, Arc<ProbeState>) {
    let st = Arc::new(ProbeState::default());
    let r = registry::reserve(name).unwrap();
    let props = BdevProps::new(name, Uuid::new_v4(), BS as u32, BLOCKS).with_io(io);
    let b = registry::register(r, props, Box::new(Probe(st.clone())))
        .await
        .unwrap();
    (b, st)
}

#[derive(Default)]
struct Done(RefCell<Vec<(u64, IoStatus)>>);

impl IoCompletion for Done {
    fn io_done(&self, io: IoBox) {
        self.0.borrow_mut().push((io.tag, io.status()));
    }
}

fn io(t: IoType, off: u64, n: u64, tag: u64) -> IoBox {
    let buf = if t.has_data() {
        IoBuf::zeroed(n as usize * BS)
    } else {
        IoBuf::empty()
    };
    let mut io = IoBox::with(t, off, n, buf);
    io.tag = tag;
    io
}

fn reached(st: &ProbeState, off: u64) -> bool {
    st.log.lock().unwrap().iter().any(|e| e.2 == off)
}

/// Yields a few hundred turns: long enough for messages between cores
/// and deferred completions to run.
async fn settle() {
    for _ in 0..20 {
        reactor::sleep(Duration::from_micros(200)).await;
    }
}

/// Spawns an acquire; the cell is filled once granted.
fn spawn_lock(b: &BdevHandle, off: u64, n: u64, kind: LockKind) -> Rc<RefCell<Option<RangeLock>>> {
    let cell = Rc::new(RefCell::new(None));
    let (c, b) = (cell.clone(), b.clone());
    reactor::spawn_local(async move {
        let l = RangeLock::acquire(&b, off, n, kind).await.unwrap();
        *c.borrow_mut() = Some(l);
    });
    cell
}

async fn wait_granted(cell: &Rc<RefCell<Option<RangeLock>>>) -> RangeLock {
    for _ in 0..5000 {
        if let Some(l) = cell.borrow_mut().take() {
            return l;
        }
        reactor::sleep(Duration::from_micros(200)).await;
    }
    panic!("lock not granted");
}

async fn wait_done(done: &Done, n: usize) {
    for _ in 0..5000 {
        if done.0.borrow().len() >= n {
            return;
        }
        reactor::sleep(Duration::from_micros(200)).await;
    }
    panic!("I/O did not complete");
}

#[test]
fn lock_waits_for_earlier_writes_and_holds_later_ones_until_unlock() {
    run(|| async {
        let (b, st) = probe("L_basic", IoRequirements::default()).await;
        let ch = b.get_channel();
        let done = Rc::new(Done::default());
        // A lock elsewhere puts the channel in tracking mode, so the next
        // I/O's ranges are known.
        let far = RangeLock::acquire(&b, 900, 10, LockKind::Writes)
            .await
            .unwrap();
        st.hold.store(true, Ordering::SeqCst);
        ch.submit(io(IoType::Write, 0, 4, 1), done.clone()); // overlaps
        ch.submit(io(IoType::Write, 100, 4, 2), done.clone()); // does not
        settle().await;
        let lock = spawn_lock(&b, 2, 8, LockKind::Writes);
        settle().await;
        assert!(lock.borrow().is_none(), "waits for the overlapping write");
        // Writes after the lock: an overlapping one waits in the channel,
        // a distant one and a read of the range go ahead.
        ch.submit(io(IoType::Write, 8, 4, 3), done.clone());
        ch.submit(io(IoType::Write, 200, 4, 4), done.clone());
        ch.submit(io(IoType::Read, 2, 4, 5), done.clone());
        settle().await;
        assert!(!reached(&st, 8), "held back by the lock being acquired");
        assert!(reached(&st, 200) && reached(&st, 2));
        // Completing the non-overlapping early write does not grant it.
        st.hold.store(false, Ordering::SeqCst);
        let held: Vec<IoBox> = HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
        let mut first = None;
        for io in held {
            if io.offset_blocks == 0 {
                first = Some(io);
            } else {
                io.complete(IoStatus::Success);
            }
        }
        settle().await;
        assert!(lock.borrow().is_none(), "still waits for the write at 0");
        first.unwrap().complete(IoStatus::Success);
        let guard = wait_granted(&lock).await;
        settle().await;
        assert!(!reached(&st, 8), "held until unlock");
        // The owner's write passes its own lock.
        guard.submit(&ch, io(IoType::Write, 4, 2, 6), done.clone());
        wait_done(&done, 5).await;
        assert!(reached(&st, 4));
        assert!(!done.0.borrow().iter().any(|d| d.0 == 3));
        guard.unlock().await;
        wait_done(&done, 6).await;
        assert!(reached(&st, 8));
        assert!(done.0.borrow().iter().all(|d| d.1 == IoStatus::Success));
        far.unlock().await;
        assert_eq!(ch.in_flight(), 0);
    });
}

#[test]
fn lock_on_an_idle_channel_waits_for_all_io_admitted_without_locks() {
    run(|| async {
        let (b, st) = probe("L_untracked", IoRequirements::default()).await;
        let ch = b.get_channel();
        let done = Rc::new(Done::default());
        st.hold.store(true, Ordering::SeqCst);
        // No lock existed: ranges were not recorded, so even a distant
        // write delays the lock (bounded: it is in the module).
        ch.submit(io(IoType::Write, 500, 4, 1), done.clone());
        settle().await;
        let lock = spawn_lock(&b, 0, 8, LockKind::Writes);
        settle().await;
        assert!(lock.borrow().is_none());
        st.hold.store(false, Ordering::SeqCst);
        release();
        let g = wait_granted(&lock).await;
        drop(g);
        settle().await;
        // Dropped: the range is free again.
        ch.write(0, &vec![1u8; 8 * BS]).await.unwrap();
    });
}

#[test]
fn locks_reach_every_core_and_new_channels() {
    run(|| async {
        let (b, st) = probe("L_cores", IoRequirements::default()).await;
        let other = other_core();
        if other == reactor::current_core() {
            return; // one core only
        }
        st.hold.store(true, Ordering::SeqCst);
        // A write held on the other core delays a lock taken here.
        let b2 = b.clone();
        reactor::call_async(other, move || async move {
            let ch = b2.get_channel();
            reactor::spawn_local(async move {
                let _ = ch.write(0, &vec![0u8; 4 * BS]).await;
            });
        })
        .await
        .unwrap();
        settle().await;
        let lock = spawn_lock(&b, 0, 16, LockKind::Writes);
        settle().await;
        assert!(lock.borrow().is_none(), "waits for the other core's write");
        st.hold.store(false, Ordering::SeqCst);
        reactor::call(other, release).await.unwrap();
        let guard = wait_granted(&lock).await;
        // Writes on the other core now wait, including on a channel the
        // other core creates after the lock (the first one is gone).
        let b3 = b.clone();
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        reactor::call_async(other, move || async move {
            reactor::spawn_local(async move {
                let ch = b3.get_channel();
                ch.write(8, &vec![2u8; 4 * BS]).await.unwrap();
                f.store(true, Ordering::SeqCst);
            });
        })
        .await
        .unwrap();
        settle().await;
        assert!(!finished.load(Ordering::SeqCst), "held by the lock");
        assert!(!reached(&st, 8));
        guard.unlock().await;
        for _ in 0..5000 {
            if finished.load(Ordering::SeqCst) {
                break;
            }
            reactor::sleep(Duration::from_micros(200)).await;
        }
        assert!(finished.load(Ordering::SeqCst), "released by the unlock");
    });
}

#[test]
fn overlapping_locks_wait_for_each_other_in_order() {
    run(|| async {
        let (b, _st) = probe("L_order", IoRequirements::default()).await;
        let first = RangeLock::acquire(&b, 0, 16, LockKind::Writes)
            .await
            .unwrap();
        let second = spawn_lock(&b, 8, 16, LockKind::All);
        let third = spawn_lock(&b, 20, 4, LockKind::Writes); // overlaps second only
        settle().await;
        // Independent of all three: granted at once.
        let apart = RangeLock::acquire(&b, 100, 4, LockKind::Writes)
            .await
            .unwrap();
        assert!(second.borrow().is_none() && third.borrow().is_none());
        first.unlock().await;
        let s = wait_granted(&second).await;
        settle().await;
        assert!(third.borrow().is_none(), "queued behind the second");
        drop(s);
        wait_granted(&third).await;
        drop(apart);
        // Bad ranges change nothing.
        assert!(matches!(
            RangeLock::acquire(&b, BLOCKS - 2, 4, LockKind::Writes).await,
            Err(crate::BdevError::Invalid(_))
        ));
        assert!(RangeLock::acquire(&b, 0, 0, LockKind::All).await.is_err());
    });
}

#[test]
fn quiesce_holds_every_io_and_waits_for_reads_in_flight() {
    run(|| async {
        let req = IoRequirements {
            max_transfer_blocks: 4,
            ..IoRequirements::default()
        };
        let (b, st) = probe("L_quiesce", req).await;
        let ch = b.get_channel();
        let done = Rc::new(Done::default());
        let far = RangeLock::acquire(&b, 900, 1, LockKind::Writes)
            .await
            .unwrap();
        st.hold.store(true, Ordering::SeqCst);
        // A read split into pieces by the framework.
        ch.submit(io(IoType::Read, 40, 10, 1), done.clone());
        settle().await;
        drop(far);
        let q = Rc::new(RefCell::new(None));
        let (qc, b2) = (q.clone(), b.clone());
        reactor::spawn_local(async move {
            *qc.borrow_mut() = Some(RangeLock::quiesce(&b2).await.unwrap());
        });
        settle().await;
        assert!(q.borrow().is_none(), "waits for the read");
        st.hold.store(false, Ordering::SeqCst);
        release();
        let guard = wait_granted(&q).await;
        let before = st.log.lock().unwrap().len();
        ch.submit(io(IoType::Read, 0, 1, 2), done.clone());
        ch.submit(io(IoType::Flush, 0, 0, 3), done.clone());
        settle().await;
        assert_eq!(st.log.lock().unwrap().len(), before, "nothing reaches it");
        drop(guard);
        wait_done(&done, 3).await;
        assert!(done.0.borrow().iter().all(|d| d.1.is_success()));
    });
}

#[test]
fn an_acquire_dropped_before_its_grant_withdraws() {
    run(|| async {
        let (b, st) = probe("L_withdraw", IoRequirements::default()).await;
        let ch = b.get_channel();
        st.hold.store(true, Ordering::SeqCst);
        let done = Rc::new(Done::default());
        ch.submit(io(IoType::Write, 0, 1, 1), done.clone());
        settle().await;
        let b2 = b.clone();
        let gave_up = futures_lite::future::or(
            async move {
                let _ = RangeLock::acquire(&b2, 0, 4, LockKind::Writes).await;
                false
            },
            async {
                settle().await;
                true
            },
        )
        .await;
        assert!(gave_up);
        settle().await;
        // Nothing is held back any more.
        ch.submit(io(IoType::Write, 2, 1, 2), done.clone());
        settle().await;
        assert!(reached(&st, 2));
        st.hold.store(false, Ordering::SeqCst);
        release();
        wait_done(&done, 2).await;
        assert!(b.lock_table().active.is_empty());
    });
}

/// Data moves: writes to a locked range of a malloc bdev wait, in order,
/// and land after the unlock; the range reads unchanged meanwhile.
#[test]
fn writes_to_a_locked_malloc_range_land_after_unlock_in_order() {
    run(|| async {
        let b = crate::testutil::malloc("L_malloc", 256, BS as u32).await;
        let ch = b.get_channel();
        ch.write(0, &vec![0xaa; 16 * BS]).await.unwrap();
        let lock = RangeLock::acquire(&b, 0, 16, LockKind::Writes)
            .await
            .unwrap();
        let done = Rc::new(Done::default());
        for i in 0..8u64 {
            let mut w = io(IoType::Write, 4, 8, i);
            w.buf.as_mut_slice().fill(i as u8);
            ch.submit(w, done.clone());
        }
        // Outside the lock: goes ahead.
        ch.write(100, &vec![7u8; BS]).await.unwrap();
        assert!(done.0.borrow().is_empty());
        assert_eq!(ch.read(0, 16).await.unwrap(), vec![0xaa; 16 * BS]);
        lock.unlock().await;
        wait_done(&done, 8).await;
        let tags: Vec<u64> = done.0.borrow().iter().map(|d| d.0).collect();
        assert_eq!(tags, (0..8).collect::<Vec<_>>(), "in order");
        let data = ch.read(0, 16).await.unwrap();
        assert_eq!(&data[4 * BS..12 * BS], &vec![7u8; 8 * BS][..]);
    });
}

/// Over a file (uring), with writes in flight from both cores all along:
/// a locked window reads the same twice with a pause between, the owner's
/// own write reads back as written, and every foreground write succeeds.
#[test]
fn a_locked_window_of_a_file_bdev_stays_still_under_writes_from_every_core() {
    let dir = std::env::temp_dir().join(format!("fp-rlock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 * 4096)
        .unwrap();
    let f2 = file.clone();
    run(move || async move {
        use crate::module::uring::{rpc::create, CreatedBy, UringOptions};
        create(UringOptions {
            name: "L_file".into(),
            filename: f2,
            block_size: 4096,
            uuid: None,
            readonly: false,
            created_by: CreatedBy::Uring,
        })
        .await
        .unwrap();
        let b = registry::lookup("L_file").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let running = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Eight writers per core, one block each at a pseudo-random place.
        for core in reactor::cores() {
            let (b, stop, written, failed, running) = (
                b.clone(),
                stop.clone(),
                written.clone(),
                failed.clone(),
                running.clone(),
            );
            reactor::call(core, move || {
                for w in 0..8u64 {
                    let (b, stop, written, failed, running) = (
                        b.clone(),
                        stop.clone(),
                        written.clone(),
                        failed.clone(),
                        running.clone(),
                    );
                    running.fetch_add(1, Ordering::SeqCst);
                    reactor::spawn_local(async move {
                        let ch = b.get_channel();
                        let mut x = w * 7919 + reactor::current_core().0 as u64 * 104729 + 1;
                        while !stop.load(Ordering::SeqCst) {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let blk = (x >> 33) % 256;
                            let data = vec![(x >> 40) as u8 | 1; 4096];
                            match ch.write(blk, &data).await {
                                Ok(()) => written.fetch_add(1, Ordering::SeqCst),
                                Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                            };
                        }
                        running.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
            .await
            .unwrap();
        }
        let ch = b.get_channel();
        let done = Rc::new(Done::default());
        for round in 0..20u64 {
            let at = (round * 37) % 240;
            let before = written.load(Ordering::SeqCst);
            let lock = RangeLock::acquire(&b, at, 16, LockKind::Writes)
                .await
                .unwrap();
            let first = ch.read(at, 16).await.unwrap();
            reactor::sleep(Duration::from_millis(3)).await;
            let second = ch.read(at, 16).await.unwrap();
            assert!(
                first == second,
                "round {round}: a write got into the window"
            );
            // The owner writes through its lock.
            let mut own = IoBox::with(IoType::Write, at, 16, IoBuf::zeroed(16 * 4096));
            own.buf.as_mut_slice().fill(round as u8 * 2);
            own.tag = round;
            lock.submit(&ch, own, done.clone());
            wait_done(&done, round as usize + 1).await;
            assert_eq!(done.0.borrow()[round as usize].1, IoStatus::Success);
            let back = ch.read(at, 16).await.unwrap();
            assert!(back.iter().all(|&x| x == round as u8 * 2), "round {round}");
            lock.unlock().await;
            assert!(
                written.load(Ordering::SeqCst) > before,
                "writers kept going"
            );
        }
        stop.store(true, Ordering::SeqCst);
        while running.load(Ordering::SeqCst) > 0 {
            reactor::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(failed.load(Ordering::SeqCst), 0, "no write failed");
        assert!(written.load(Ordering::SeqCst) > 100);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn held_io_is_split_after_unlock_and_unregister_waits_for_the_lock() {
    run(|| async {
        let req = IoRequirements {
            max_transfer_blocks: 4,
            ..IoRequirements::default()
        };
        let (b, st) = probe("L_split", req).await;
        let ch = b.get_channel();
        let done = Rc::new(Done::default());
        let lock = RangeLock::acquire(&b, 0, 64, LockKind::Writes)
            .await
            .unwrap();
        ch.submit(io(IoType::Write, 2, 10, 1), done.clone());
        settle().await;
        assert!(st.log.lock().unwrap().is_empty());
        drop(lock);
        wait_done(&done, 1).await;
        assert!(done.0.borrow()[0].1.is_success());
        let pieces: Vec<(u64, u64)> = st.log.lock().unwrap().iter().map(|e| (e.2, e.3)).collect();
        assert_eq!(
            pieces,
            vec![(2, 4), (6, 4), (10, 2)],
            "split after the lock"
        );
        // A write held by a lock keeps unregister waiting; once the lock
        // goes, it is failed (the bdev is going) and unregister finishes.
        let lock = RangeLock::acquire(&b, 0, 64, LockKind::Writes)
            .await
            .unwrap();
        ch.submit(io(IoType::Write, 0, 1, 2), done.clone());
        let finished = Rc::new(std::cell::Cell::new(false));
        let f = finished.clone();
        reactor::spawn_local(async move {
            registry::unregister("L_split", None).await.unwrap();
            f.set(true);
        });
        settle().await;
        assert!(!finished.get());
        assert!(matches!(
            RangeLock::acquire(&b, 100, 1, LockKind::Writes).await,
            Err(crate::BdevError::NoDevice(_))
        ));
        drop(lock);
        wait_done(&done, 2).await;
        assert_eq!(done.0.borrow()[1].1, IoStatus::Failed);
        drop(ch);
        for _ in 0..5000 {
            if finished.get() {
                break;
            }
            reactor::sleep(Duration::from_micros(200)).await;
        }
        assert!(finished.get());
    });
}
