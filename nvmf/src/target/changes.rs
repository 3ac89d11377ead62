//! How a change to the subsystem table reaches every core (SPEC §7): each
//! core's copy of the namespace tables its queues serve from, the one
//! mechanism that updates them (a namespace added, removed, or hot-removed
//! with its bdev, a subsystem deleted), and dropping the connections of a
//! host that lost access (host removed, allow_any_host turned off,
//! subsystem deleted).
//!
//! - Every change runs under one change lock on the main reactor: the main
//!   reactor edits the subsystem table (`subsystem.rs`) and stamps the
//!   subsystem with a new generation; [`publish`] hands the new namespace
//!   list to every core, which swaps it into its [`CoreSubsystem`] at once
//!   (from then on new I/O to a removed namespace gets Invalid Namespace)
//!   and kicks its admin queues (the namespace-attribute notice, a fresh
//!   Identify view); then it waits until the I/O already in flight to each
//!   removed namespace has completed on every core. Only then does the
//!   caller close the namespace's descriptor, so a bdev delete waits for it.
//! - [`disconnect`] closes, on their cores, every queue (admin and I/O) of
//!   the hosts the subsystem no longer allows, forgets their controllers,
//!   and waits for the I/O those queues still had at the bdev.
//! - A queue connecting meanwhile got its namespace list at Connect, on the
//!   main reactor, with the generation it was taken at; when it attaches on
//!   its core the newer of that list and the core's copy wins, so a change
//!   that overtook the Connect is never undone. Generations come from one
//!   target-wide counter, so a subsystem deleted and created again under
//!   the same NQN never looks older than its predecessor.
//! - A command holds its namespace ([`NsUse`]) from the moment it is handed
//!   to the bdev until its slot is free again (its data sent): those holds
//!   are what a removal waits for. A write waiting for R2T data holds
//!   nothing; it looks its namespace up again when the data is in.
//! - Channels: a core opens a namespace's bdev channel at its first I/O
//!   there, and releases it when the namespace is removed and drained, or
//!   when the core's last I/O queue of the subsystem goes.
//!
//! Invariants: a core's copy of a subsystem is at least as new as the last
//! change published to it; nothing of a removed namespace (hold, channel)
//! remains on any core when [`publish`] returns; no queue of a host that
//! lost access remains, nor its in-flight I/O, when [`disconnect`] returns.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bdev::{BdevError, IoChannel};
use reactor::{CompletionEvent, CompletionSender, CoreId};

use super::admin::{NamespaceView, SubsystemView};
use super::poll_group;
use super::subsystem::with_target;

/// How long a removal waits for commands to a removed namespace before
/// closing the connections still holding them. Bdev I/O always completes;
/// what can stall is a read whose data the host does not take (its send
/// queue full): the Linux host gives up on a command after 30 s, we close
/// such a connection sooner.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One namespace as one core sees it.
pub struct CoreNamespace {
    pub view: NamespaceView,
    /// This core's channel to the bdev, opened at the first I/O.
    channel: RefCell<Option<IoChannel>>,
    /// Commands holding it ([`NsUse`]).
    users: Cell<u32>,
    /// Taken out of the table: no new holds; `drained` fire at the last
    /// release.
    removed: Cell<bool>,
    drained: RefCell<Vec<CompletionSender<()>>>,
}

impl CoreNamespace {
    fn new(view: NamespaceView) -> Rc<CoreNamespace> {
        Rc::new(CoreNamespace {
            view,
            channel: RefCell::new(None),
            users: Cell::new(0),
            removed: Cell::new(false),
            drained: RefCell::new(Vec::new()),
        })
    }

    /// Which add of the namespace this is (an nsid added again is another).
    pub fn instance(&self) -> u64 {
        self.view.instance
    }

    /// This core's channel to the namespace's bdev (opened on first use).
    #[inline]
    pub fn channel(&self) -> IoChannel {
        let mut ch = self.channel.borrow_mut();
        ch.get_or_insert_with(|| self.view.bdev.get_channel())
            .clone()
    }
}

/// A command's hold on its namespace: counted, and released on drop. A
/// removal waits for every hold to go.
pub struct NsUse(Rc<CoreNamespace>);

impl NsUse {
    #[inline]
    pub fn new(ns: Rc<CoreNamespace>) -> NsUse {
        debug_assert!(!ns.removed.get(), "a removed namespace takes no new I/O");
        ns.users.set(ns.users.get() + 1);
        NsUse(ns)
    }
}

impl std::ops::Deref for NsUse {
    type Target = CoreNamespace;
    fn deref(&self) -> &CoreNamespace {
        &self.0
    }
}

impl Drop for NsUse {
    #[inline]
    fn drop(&mut self) {
        let n = self.0.users.get();
        debug_assert!(n > 0, "namespace hold count underflow");
        self.0.users.set(n - 1);
        if n == 1 && self.0.removed.get() {
            // The last command of a removed namespace: its channel goes
            // now, and whoever waits for the drain is told.
            self.0.channel.borrow_mut().take();
            for tx in self.0.drained.borrow_mut().drain(..) {
                tx.complete(());
            }
        }
    }
}

/// One subsystem's namespaces as one core sees them, shared by the queues
/// of that subsystem on the core.
pub struct CoreSubsystem {
    generation: Cell<u64>,
    namespaces: RefCell<Vec<Rc<CoreNamespace>>>,
    /// I/O queues attached on this core: the last one to go releases the
    /// channels.
    io_queues: Cell<u32>,
}

impl CoreSubsystem {
    fn new() -> Rc<CoreSubsystem> {
        Rc::new(CoreSubsystem {
            generation: Cell::new(0),
            namespaces: RefCell::new(Vec::new()),
            io_queues: Cell::new(0),
        })
    }

    #[inline]
    pub fn namespace(&self, nsid: u32) -> Option<Rc<CoreNamespace>> {
        self.namespaces
            .borrow()
            .iter()
            .find(|n| n.view.nsid == nsid)
            .cloned()
    }

    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// The namespaces now, for the admin queue's Identify.
    pub fn views(&self) -> Vec<NamespaceView> {
        self.namespaces
            .borrow()
            .iter()
            .map(|n| n.view.clone())
            .collect()
    }

    /// Swaps in `views` if `generation` is newer than this copy. Returns
    /// the namespaces it no longer lists (marked removed). A namespace that
    /// stays keeps its holds and channel.
    fn apply(&self, generation: u64, views: Vec<NamespaceView>) -> Vec<Rc<CoreNamespace>> {
        if generation <= self.generation.get() {
            return Vec::new();
        }
        self.generation.set(generation);
        let mut old = std::mem::take(&mut *self.namespaces.borrow_mut());
        let new: Vec<Rc<CoreNamespace>> = views
            .into_iter()
            .map(
                |v| match old.iter().position(|n| n.view.instance == v.instance) {
                    Some(i) => old.swap_remove(i),
                    None => CoreNamespace::new(v),
                },
            )
            .collect();
        debug_assert!(new.iter().all(|n| !n.removed.get()));
        *self.namespaces.borrow_mut() = new;
        old
    }

    /// Everything, for a deleted subsystem.
    fn take_all(&self, generation: u64) -> Vec<Rc<CoreNamespace>> {
        self.generation.set(generation);
        std::mem::take(&mut *self.namespaces.borrow_mut())
    }
}

/// A queue's attachment to its subsystem's table on its core.
pub struct Attachment {
    sub: Rc<CoreSubsystem>,
    io: bool,
}

impl std::ops::Deref for Attachment {
    type Target = CoreSubsystem;
    fn deref(&self) -> &CoreSubsystem {
        &self.sub
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if !self.io {
            return;
        }
        let n = self.sub.io_queues.get();
        debug_assert!(n > 0);
        self.sub.io_queues.set(n.saturating_sub(1));
        if n == 1 {
            // No I/O queue of this subsystem left on the core: nothing
            // here needs the bdevs' channels (a command still at a bdev
            // holds its own reference to the channel it went through).
            for ns in self.sub.namespaces.borrow().iter() {
                ns.channel.borrow_mut().take();
            }
        }
    }
}

#[derive(Default)]
struct CoreTables {
    subsystems: HashMap<String, Rc<CoreSubsystem>>,
    /// Removed namespaces whose holds have not all gone, so a removal can
    /// still find them when a Connect's newer list removed them first.
    draining: Vec<Weak<CoreNamespace>>,
}

thread_local! {
    static CORE: RefCell<CoreTables> = RefCell::new(CoreTables::default());
}

/// Marks `removed` as such; those still held are kept track of until
/// their holds go, the rest are freed (channel released) here.
fn retire(tables: &mut CoreTables, removed: Vec<Rc<CoreNamespace>>) {
    tables.draining.retain(|w| w.strong_count() > 0);
    for ns in removed {
        ns.removed.set(true);
        if ns.users.get() > 0 {
            tables.draining.push(Rc::downgrade(&ns));
        } else {
            ns.channel.borrow_mut().take();
        }
    }
}

/// Attaches a queue that Connect accepted with `view` to its subsystem's
/// table on this core (`io`: an I/O queue, which uses the channels).
pub fn attach(view: &SubsystemView, io: bool) -> Attachment {
    let sub = CORE.with(|c| {
        let mut c = c.borrow_mut();
        let sub = c
            .subsystems
            .entry(view.nqn.clone())
            .or_insert_with(CoreSubsystem::new)
            .clone();
        let removed = sub.apply(view.ns_generation, view.namespaces.clone());
        retire(&mut c, removed);
        sub
    });
    if io {
        sub.io_queues.set(sub.io_queues.get() + 1);
    }
    Attachment { sub, io }
}

/// One core's part of [`publish`]: applies the change and returns, for
/// each of the `removed` instances still held here, an event fired when
/// its last hold goes.
fn apply_on_core(
    nqn: &str,
    generation: u64,
    views: Option<Vec<NamespaceView>>,
    removed: &[u64],
) -> Vec<(u64, CompletionEvent<()>)> {
    let waits = CORE.with(|c| {
        let mut c = c.borrow_mut();
        let gone = match views {
            Some(v) => c
                .subsystems
                .entry(nqn.to_string())
                .or_insert_with(CoreSubsystem::new)
                .apply(generation, v),
            // Deleted: unless a newer subsystem of that NQN is here already.
            None => match c.subsystems.get(nqn) {
                Some(s) if s.generation() <= generation => {
                    let gone = s.take_all(generation);
                    c.subsystems.remove(nqn);
                    gone
                }
                _ => Vec::new(),
            },
        };
        retire(&mut c, gone);
        c.draining
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|ns| removed.contains(&ns.instance()) && ns.users.get() > 0)
            .map(|ns| {
                let (tx, rx) = reactor::completion();
                ns.drained.borrow_mut().push(tx);
                (ns.instance(), rx)
            })
            .collect()
    });
    // Admin queues pick up the new list and owe their hosts the notice.
    poll_group::kick_all();
    waits
}

/// Publishes `nqn`'s namespace list as of `generation` (None: the
/// subsystem was deleted) to every core, then waits until no core holds
/// any of the `removed` namespace instances. Main reactor, under the
/// change lock.
pub async fn publish(
    nqn: &str,
    generation: u64,
    views: Option<Vec<NamespaceView>>,
    removed: Vec<u64>,
) {
    assert!(reactor::is_main_core());
    // First every core stops new I/O to what was removed, then we wait
    // for what was in flight, everywhere at once.
    let mut waits = Vec::new();
    for core in reactor::cores() {
        let (n, v, r) = (nqn.to_string(), views.clone(), removed.clone());
        match reactor::call(core, move || apply_on_core(&n, generation, v, &r)).await {
            Ok(w) => waits.extend(w.into_iter().map(|(i, rx)| (core, i, rx))),
            Err(_) => log::warn!("core {}: stopped before taking the change", core.0),
        }
    }
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    for (core, instance, rx) in waits {
        drain_one(nqn, core, instance, rx, deadline).await;
    }
}

/// Waits for one removed namespace's holds on `core` to go; past the
/// deadline, closes the connections there still holding it, then waits
/// for what they had at the bdev.
async fn drain_one(
    nqn: &str,
    core: CoreId,
    instance: u64,
    mut rx: CompletionEvent<()>,
    deadline: std::time::Instant,
) {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let done = futures_lite::future::or(
        async {
            let _ = (&mut rx).await;
            true
        },
        async {
            reactor::sleep(left).await;
            false
        },
    )
    .await;
    if done {
        return;
    }
    log::warn!(
        "{nqn}: namespace commands on core {} not finished after {:?}: closing their connections",
        core.0,
        DRAIN_TIMEOUT
    );
    let _ = reactor::call(core, move || {
        poll_group::close_holding(instance, "its namespace was removed")
    })
    .await;
    let _ = rx.await;
}

/// Closes every queue of `nqn` whose host the subsystem no longer allows
/// (all of them once it is deleted) and forgets their controllers, then
/// waits until the I/O those queues had at their bdevs has completed.
/// Main reactor, under the change lock, after the table changed.
pub async fn disconnect(nqn: &str, why: &'static str) {
    assert!(reactor::is_main_core());
    let victims: Vec<(u64, u32, u64)> = with_target(|t| {
        let s = t.subsystems.get(nqn);
        let refused = |host: &str| !s.is_some_and(|s| s.host_allowed(host));
        let v = t
            .controllers
            .qpairs
            .iter()
            .filter(|(_, q)| q.subnqn == nqn && refused(&q.hostnqn))
            .map(|(id, q)| (*id, q.core, q.token))
            .collect();
        t.controllers
            .live
            .retain(|_, r| !(r.subnqn == nqn && refused(&r.hostnqn)));
        v
    });
    if victims.is_empty() {
        return;
    }
    let mut cores: Vec<u32> = victims.iter().map(|v| v.1).collect();
    cores.sort_unstable();
    cores.dedup();
    let mut waits = Vec::new();
    for core in cores {
        let tokens: Vec<u64> = victims
            .iter()
            .filter(|v| v.1 == core)
            .map(|v| v.2)
            .collect();
        let close = move || poll_group::close_connections(&tokens, why);
        match reactor::call(CoreId(core), close).await {
            Ok(w) => waits.extend(w),
            Err(_) => log::warn!("core {core}: stopped before closing connections"),
        }
    }
    for rx in waits {
        let _ = rx.await;
    }
    // Their records go now, not when each queue's own notice arrives, so
    // the RPCs that list them agree with the RPC that just returned.
    with_target(|t| {
        for (id, _, _) in &victims {
            super::admin::forget_qpair(&mut t.controllers, *id);
        }
    });
    log::info!("{nqn}: closed {} queue(s): {why}", victims.len());
}

/// Removes namespace `nsid` of `nqn` (only if it is still add `instance`,
/// when given): from the table, then from every core (draining what is in
/// flight to it), then closes its descriptor. Main reactor, under the
/// change lock.
pub async fn remove_namespace(
    nqn: &str,
    nsid: u32,
    instance: Option<u64>,
) -> Result<(), BdevError> {
    let (ns, generation, views) = with_target(|t| {
        let generation = t.next_generation();
        let s = t.subsystem(nqn)?;
        let matches = |n: &super::subsystem::Namespace| instance.is_none_or(|i| i == n.instance);
        let ns = match s.namespaces.remove(&nsid) {
            Some(n) if matches(&n) => n,
            other => {
                if let Some(n) = other {
                    s.namespaces.insert(nsid, n);
                }
                return Err(BdevError::NoDevice(format!("nsid {nsid}")));
            }
        };
        s.ns_generation = generation;
        Ok((ns, generation, s.namespace_views()))
    })?;
    publish(nqn, generation, Some(views), vec![ns.instance]).await;
    log::info!("{nqn}: namespace {nsid} ({}) removed", ns.bdev_name);
    drop(ns);
    Ok(())
}

thread_local! {
    static LOCK: Rc<glommio::sync::Semaphore> = Rc::new(glommio::sync::Semaphore::new(1));
}

/// Held while a change runs, so changes (and their drains) never overlap.
pub struct ChangeLock(#[allow(dead_code)] Option<glommio::sync::StaticPermit>);

/// Takes the change lock (main reactor).
pub async fn lock() -> ChangeLock {
    assert!(reactor::is_main_core());
    let sem = LOCK.with(|l| l.clone());
    // The semaphore is never closed, so this cannot fail.
    ChangeLock(sem.acquire_static_permit(1).await.ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reactor::{CoreSet, Runtime, RuntimeConfig};

    fn run(
        body: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send + 'static,
    ) {
        let rt = Runtime::start(
            RuntimeConfig::new(CoreSet::from_ids([0]).expect("core 0")),
            move || async move {
                body().await;
                bdev::registry::unregister_all().await;
                reactor::shutdown(0);
            },
        )
        .expect("runtime");
        assert_eq!(rt.join(), 0, "the reactor panicked");
    }

    async fn view(name: &str, nsid: u32, instance: u64) -> NamespaceView {
        let p = serde_json::from_value(serde_json::json!(
            {"name": name, "num_blocks": 16, "block_size": 512}
        ))
        .expect("malloc params");
        bdev::module::malloc::rpc::create(p).await.expect("malloc");
        let bdev = bdev::registry::lookup(name).expect("registered");
        NamespaceView {
            nsid,
            instance,
            num_blocks: bdev.num_blocks(),
            block_size: bdev.block_size(),
            bdev,
            nguid: [0; 16],
            uuid: [0; 16],
        }
    }

    fn snapshot(generation: u64, namespaces: Vec<NamespaceView>) -> SubsystemView {
        SubsystemView {
            nqn: "nqn.2016-06.io.spdk:t".into(),
            discovery: false,
            serial: String::new(),
            model: String::new(),
            max_namespaces: 32,
            namespaces,
            max_queue_depth: 128,
            max_aq_depth: 128,
            max_io_qpairs: 1,
            in_capsule_data_size: 4096,
            max_io_size: 131072,
            discovery_log: Vec::new(),
            discovery_genctr: 0,
            ns_generation: generation,
        }
    }

    /// The races publish and attach settle by generation, and a removal's
    /// wait for holds, on one core.
    #[test]
    fn the_newest_list_wins_and_removals_wait_for_holds() {
        run(|| {
            Box::pin(async {
                let nqn = "nqn.2016-06.io.spdk:t";
                let (a, b) = (view("A", 1, 1).await, view("B", 2, 2).await);
                // A change (generation 5) reaches the core before a Connect
                // whose list (generation 4) is older: attaching keeps the
                // newer one.
                assert!(apply_on_core(nqn, 5, Some(vec![a.clone(), b.clone()]), &[]).is_empty());
                let q = attach(&snapshot(4, vec![a.clone()]), true);
                assert_eq!(q.generation(), 5);
                assert!(q.namespace(2).is_some(), "not undone by the older list");
                // A Connect newer than the core's copy brings its list in.
                let q2 = attach(&snapshot(6, vec![a.clone(), b.clone()]), true);
                assert_eq!(q2.generation(), 6);

                // Namespace 1 is removed while a command holds it: the wait
                // ends when the hold goes, and the channel goes with it.
                let ns1 = q.namespace(1).expect("namespace 1");
                let hold = NsUse::new(ns1.clone());
                let _ = hold.channel();
                let waits = apply_on_core(nqn, 7, Some(vec![b.clone()]), &[1]);
                assert_eq!(waits.len(), 1);
                assert!(q.namespace(1).is_none(), "no new I/O reaches it");
                assert!(!waits[0].1.is_complete());
                drop(hold);
                assert!(waits[0].1.is_complete());
                assert!(ns1.channel.borrow().is_none(), "channel released");
                // Removed already (by a newer Connect list) but still held:
                // a later removal still finds it to wait for.
                let ns2 = q.namespace(2).expect("namespace 2");
                let hold = NsUse::new(ns2);
                let _ = attach(&snapshot(8, vec![]), false);
                let waits = apply_on_core(nqn, 8, Some(vec![]), &[2]);
                assert_eq!(waits.len(), 1, "found among the draining");
                drop(hold);
                assert!(waits[0].1.is_complete());

                // A delete older than the core's copy (the NQN was created
                // again since) leaves it; a newer one takes it away.
                assert!(apply_on_core(nqn, 3, None, &[]).is_empty());
                assert!(CORE.with(|c| c.borrow().subsystems.contains_key(nqn)));
                apply_on_core(nqn, 9, None, &[]);
                assert!(!CORE.with(|c| c.borrow().subsystems.contains_key(nqn)));
                drop((q, q2));
            })
        });
    }
}
