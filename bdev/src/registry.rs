//! The bdev registry and lifecycle: name reservation, asynchronous
//! register with examine, lookup by name/alias/UUID, descriptors with
//! hot-remove, claims, unregister, and `wait_for_examine`.
//!
//! Claims (SPDK's claim types, `spdk_bdev_module_claim_bdev_desc`): a
//! module holding a bdev through a descriptor says how it shares it.
//! [`ClaimType::ExclusiveWrite`] (one holder; nothing else opens it for
//! writing) and [`ClaimType::ReadManyWriteNone`] (any number of read-only
//! holders, e.g. the clones over a snapshot; nothing opens it for writing
//! or claims it otherwise). A bdev carries one claim type at a time; a
//! claim goes with its descriptor's close, and the type with the last one.
//!
//! Owned by the main reactor: every function here runs there (asserted).
//! Invariants (SPEC §2, §4):
//! - A name (or alias or UUID) is taken from the moment its create reserves
//!   it until its bdev is fully destroyed; a second reservation gets EEXIST.
//! - A bdev is visible to lookups only once registered and examined, and
//!   stops being visible the moment its unregister starts.
//! - A delete of a name whose create is in flight waits for that create
//!   and then deletes what it made, or finds nothing (ENODEV).
//! - `wait_for_examine` resolves when no create (reservation) and no
//!   examine is pending, including those an examine starts itself.
//! - A failed create leaves nothing: dropping a reservation frees the name.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use crate::bdev::{Bdev, BdevHandle, BdevProps, LocalFuture};
use crate::channel::IoChannel;
use crate::error::{BdevError, Result};

/// Runs on the main reactor when the bdev a descriptor holds starts to go
/// away; the holder should close the descriptor.
pub type RemoveCallback = Box<dyn FnOnce() + Send>;

type ExamineHook = Rc<dyn Fn(BdevHandle) -> LocalFuture<()>>;
type Waiter = reactor::CompletionSender<()>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    /// Registered, examine running: not visible.
    Examining,
    Active,
    /// Unregister started: not visible, name still taken.
    Removing,
}

struct Entry {
    bdev: BdevHandle,
    aliases: Vec<String>,
    state: EntryState,
    /// The claim type and its holders (one for exclusive_write); no
    /// holder: not claimed.
    claim: Option<(ClaimType, Vec<Claim>)>,
}

#[derive(Debug, Clone)]
struct Claim {
    desc_id: u64,
    module: &'static str,
}

/// How a claiming module shares the bdev (SPDK's `spdk_bdev_claim_type`;
/// read_many_write_one and read_many_write_shared are not implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimType {
    /// One holder, which may write; no other descriptor writes.
    ExclusiveWrite,
    /// Many read-only holders; no descriptor writes.
    ReadManyWriteNone,
}

impl ClaimType {
    /// SPDK's name (`claim_type` in `bdev_get_bdevs`).
    pub fn as_str(&self) -> &'static str {
        match self {
            ClaimType::ExclusiveWrite => "exclusive_write",
            ClaimType::ReadManyWriteNone => "read_many_write_none",
        }
    }
}

struct DescState {
    bdev_id: u64,
    write: bool,
    on_remove: Option<RemoveCallback>,
}

#[derive(Default)]
struct Registry {
    /// In registration order.
    entries: Vec<Entry>,
    /// Names whose create is in flight, with deletes waiting on them.
    reserved: HashMap<String, Vec<Waiter>>,
    descs: HashMap<u64, DescState>,
    /// Per bdev id: unregisters waiting for the last descriptor to close.
    close_waiters: HashMap<u64, Vec<Waiter>>,
    examine_hooks: Vec<(&'static str, ExamineHook)>,
    /// Reservations plus running examines.
    pending: usize,
    examine_waiters: Vec<Waiter>,
    next_id: u64,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry { next_id: 1, ..Default::default() });
}

/// For drop paths: does nothing once the registry itself is being torn
/// down with its thread (which drops the descriptors it holds).
fn try_with(f: impl FnOnce(&mut Registry) -> Vec<Waiter>) -> Vec<Waiter> {
    REGISTRY
        .try_with(|r| match r.try_borrow_mut() {
            Ok(mut r) => f(&mut r),
            Err(_) => Vec::new(),
        })
        .unwrap_or_default()
}

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    assert!(
        reactor::is_main_core(),
        "the bdev registry is owned by the main reactor"
    );
    REGISTRY.with(|r| f(&mut r.borrow_mut()))
}

impl Registry {
    fn name_taken(&self, name: &str) -> bool {
        self.reserved.contains_key(name) || self.entries.iter().any(|e| e.matches(name))
    }

    fn find_visible(&self, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.state == EntryState::Active && e.matches(name))
    }

    fn entry_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.bdev.id() == id)
    }

    fn finish_pending(&mut self) -> Vec<Waiter> {
        self.pending -= 1;
        if self.pending == 0 {
            std::mem::take(&mut self.examine_waiters)
        } else {
            Vec::new()
        }
    }

    fn open_count(&self, bdev_id: u64) -> usize {
        self.descs.values().filter(|d| d.bdev_id == bdev_id).count()
    }
}

impl Entry {
    fn matches(&self, name: &str) -> bool {
        self.bdev.name() == name || self.aliases.iter().any(|a| a == name)
    }
}

fn wake_all(waiters: Vec<Waiter>) {
    for w in waiters {
        w.complete(());
    }
}

/// A name held for a create in flight. Dropping it without registering
/// frees the name (the create failed).
pub struct NameReservation {
    name: String,
    consumed: bool,
}

impl NameReservation {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NameReservation {
    fn drop(&mut self) {
        if self.consumed {
            return;
        }
        let waiters = try_with(|r| {
            let mut w = r.reserved.remove(&self.name).unwrap_or_default();
            w.extend(r.finish_pending());
            w
        });
        wake_all(waiters);
    }
}

/// Reserves `name` for a create. EEXIST if a bdev, alias or UUID of that
/// name exists or another create of it is in flight.
pub fn reserve(name: &str) -> Result<NameReservation> {
    if name.is_empty() {
        return Err(BdevError::Invalid("bdev name must not be empty".into()));
    }
    with(|r| {
        if r.name_taken(name) {
            return Err(BdevError::Exists(name.to_string()));
        }
        r.reserved.insert(name.to_string(), Vec::new());
        r.pending += 1;
        Ok(())
    })?;
    Ok(NameReservation {
        name: name.to_string(),
        consumed: false,
    })
}

/// Registers a bdev under its reserved name: runs every examine hook, then
/// makes it visible. Returns once it is usable (SPEC §4).
pub async fn register(
    mut reservation: NameReservation,
    mut props: BdevProps,
    ops: Box<dyn Bdev>,
) -> Result<BdevHandle> {
    if props.name != reservation.name {
        return Err(BdevError::Invalid(format!(
            "registering {} under the reservation for {}",
            props.name, reservation.name
        )));
    }
    if props.block_size == 0 || !props.block_size.is_multiple_of(512) || props.num_blocks == 0 {
        return Err(BdevError::Invalid(format!(
            "bdev {}: block_size {} / num_blocks {}",
            props.name, props.block_size, props.num_blocks
        )));
    }
    let align = props.io.required_alignment;
    if align > 1 && (!align.is_power_of_two() || align as usize > crate::io::IO_BUF_ALIGN) {
        return Err(BdevError::Invalid(format!(
            "bdev {}: required_alignment {align} is not a power of two up to {}",
            props.name,
            crate::io::IO_BUF_ALIGN
        )));
    }
    let uuid = props.uuid.hyphenated().to_string();
    if uuid != props.name && !props.aliases.contains(&uuid) {
        props.aliases.push(uuid);
    }
    let (handle, hooks) = with(|r| {
        for a in &props.aliases {
            if a != &props.name && r.name_taken(a) {
                return Err(BdevError::Exists(a.clone()));
            }
        }
        let id = r.next_id;
        r.next_id += 1;
        let aliases = props.aliases.clone();
        let handle = BdevHandle::new(id, props, ops);
        r.entries.push(Entry {
            bdev: handle.clone(),
            aliases,
            state: EntryState::Examining,
            claim: None,
        });
        Ok((handle, r.examine_hooks.clone()))
    })?;
    // The name stays reserved through examine, so deletes keep waiting and
    // the pending count covers the examine.
    reservation.consumed = true;
    for (module, hook) in hooks {
        log::debug!("examine {} by {module}", handle.name());
        hook(handle.clone()).await;
    }
    let waiters = with(|r| {
        if let Some(e) = r.entry_mut(handle.id()) {
            if e.state == EntryState::Examining {
                e.state = EntryState::Active;
            }
        }
        let mut w = r.reserved.remove(&reservation.name).unwrap_or_default();
        w.extend(r.finish_pending());
        w
    });
    log::info!(
        "registered bdev {} ({} x {} B, {})",
        handle.name(),
        handle.num_blocks(),
        handle.block_size(),
        handle.module()
    );
    wake_all(waiters);
    Ok(handle)
}

/// Adds an examine hook, run on every bdev registered from now on.
pub fn register_examine(
    module: &'static str,
    hook: impl Fn(BdevHandle) -> LocalFuture<()> + 'static,
) {
    with(|r| r.examine_hooks.push((module, Rc::new(hook))));
}

/// Resolves once no create or examine is pending anywhere.
pub async fn wait_for_examine() {
    loop {
        let rx = with(|r| {
            if r.pending == 0 {
                None
            } else {
                let (tx, rx) = reactor::completion();
                r.examine_waiters.push(tx);
                Some(rx)
            }
        });
        match rx {
            None => return,
            Some(rx) => {
                let _ = rx.await;
            }
        }
    }
}

/// Replaces the aliases of `bdev` (an lvol or store rename). Aliases
/// another bdev holds already are skipped; the UUID alias is kept.
pub fn set_aliases(bdev: &BdevHandle, aliases: Vec<String>) {
    let uuid = bdev.uuid().hyphenated().to_string();
    with(|r| {
        let taken: Vec<bool> = aliases
            .iter()
            .map(|a| {
                r.entries
                    .iter()
                    .any(|e| e.bdev.id() != bdev.id() && e.matches(a))
            })
            .collect();
        if let Some(e) = r.entry_mut(bdev.id()) {
            let mut new: Vec<String> = aliases
                .into_iter()
                .zip(taken)
                .filter(|(a, t)| !t && a != e.bdev.name())
                .map(|(a, _)| a)
                .collect();
            if uuid != e.bdev.name() && !new.contains(&uuid) {
                new.push(uuid);
            }
            e.aliases = new;
        }
    })
}

/// A visible bdev by name, alias or UUID.
pub fn lookup(name: &str) -> Option<BdevHandle> {
    with(|r| r.find_visible(name).map(|e| e.bdev.clone()))
}

/// Visible bdevs in registration order.
pub fn list() -> Vec<BdevHandle> {
    with(|r| {
        r.entries
            .iter()
            .filter(|e| e.state == EntryState::Active)
            .map(|e| e.bdev.clone())
            .collect()
    })
}

/// What `bdev_get_bdevs` shows beyond the bdev's own properties.
#[derive(Debug, Clone)]
pub struct RegistryView {
    pub aliases: Vec<String>,
    /// The first claim holder's module.
    pub claimed_by: Option<&'static str>,
    pub claim_type: Option<ClaimType>,
}

/// How many descriptors have `bdev` open (a consumer such as an NVMe/TCP
/// namespace holds one).
pub fn open_count(bdev: &BdevHandle) -> usize {
    with(|r| r.open_count(bdev.id()))
}

pub fn view(bdev: &BdevHandle) -> Option<RegistryView> {
    with(|r| {
        r.entries
            .iter()
            .find(|e| e.bdev == *bdev)
            .map(|e| RegistryView {
                aliases: e.aliases.clone(),
                claimed_by: e
                    .claim
                    .as_ref()
                    .and_then(|(_, h)| h.first())
                    .map(|c| c.module),
                claim_type: e.claim.as_ref().map(|(t, _)| *t),
            })
    })
}

/// Waits for a create of `name` in flight, if any, to finish.
async fn wait_reservation(name: &str) {
    loop {
        let rx = with(|r| {
            r.reserved.get_mut(name).map(|w| {
                let (tx, rx) = reactor::completion();
                w.push(tx);
                rx
            })
        });
        match rx {
            None => return,
            Some(rx) => {
                let _ = rx.await;
            }
        }
    }
}

/// Resolves `name` for a delete: waits out a create in flight, then finds
/// the visible bdev, which must belong to `module` when given.
pub async fn lookup_for_delete(name: &str, module: Option<&str>) -> Result<BdevHandle> {
    wait_reservation(name).await;
    let b = lookup(name).ok_or_else(|| BdevError::NoDevice(name.to_string()))?;
    if module.is_some_and(|m| m != b.module()) {
        return Err(BdevError::NoDevice(name.to_string()));
    }
    Ok(b)
}

/// Unregisters the bdev named `name` (owned by `module` if given): hides
/// it, tells every descriptor holder, waits for them to close and for the
/// I/O still in flight on every core to finish, destructs it, and frees
/// its names.
pub async fn unregister(name: &str, module: Option<&str>) -> Result<()> {
    let bdev = lookup_for_delete(name, module).await?;
    unregister_handle(&bdev).await
}

/// Unregisters `bdev` (see [`unregister`]). ENODEV if it is already going.
pub async fn unregister_handle(bdev: &BdevHandle) -> Result<()> {
    let callbacks = with(|r| {
        let e = r
            .entry_mut(bdev.id())
            .filter(|e| e.state != EntryState::Removing)
            .ok_or_else(|| BdevError::NoDevice(bdev.name().to_string()))?;
        e.state = EntryState::Removing;
        bdev.0.removed.store(true, Ordering::Release);
        let cbs: Vec<RemoveCallback> = r
            .descs
            .values_mut()
            .filter(|d| d.bdev_id == bdev.id())
            .filter_map(|d| d.on_remove.take())
            .collect();
        Ok::<_, BdevError>(cbs)
    })?;
    log::info!("unregistering bdev {}", bdev.name());
    for cb in callbacks {
        cb();
    }
    loop {
        let rx = with(|r| {
            if r.open_count(bdev.id()) == 0 {
                None
            } else {
                let (tx, rx) = reactor::completion();
                r.close_waiters.entry(bdev.id()).or_default().push(tx);
                Some(rx)
            }
        });
        match rx {
            None => break,
            Some(rx) => {
                let _ = rx.await;
            }
        }
    }
    // New I/O is refused from here on (`removed`); wait out what every
    // core still has in flight, so destruct never pulls memory or files
    // from under it.
    let id = bdev.id();
    for core in reactor::cores() {
        let _ = reactor::call_async(core, move || crate::channel::drain_core(id)).await;
    }
    bdev.ops().destruct().await;
    with(|r| {
        r.entries.retain(|e| e.bdev.id() != bdev.id());
        r.close_waiters.remove(&bdev.id());
    });
    Ok(())
}

/// Unregisters every bdev, newest first (so virtual bdevs go before their
/// bases). Used at shutdown.
pub async fn unregister_all() {
    loop {
        let last = with(|r| {
            r.entries
                .iter()
                .rev()
                .find(|e| e.state != EntryState::Removing)
                .map(|e| e.bdev.clone())
        });
        let Some(b) = last else { break };
        if let Err(e) = unregister_handle(&b).await {
            log::warn!("unregister {} at shutdown: {e}", b.name());
        }
    }
}

/// An open bdev. Closing (drop) releases any claim it holds and lets a
/// pending unregister proceed. `Send`: it may be dropped on any core.
pub struct Descriptor {
    bdev: BdevHandle,
    id: u64,
    write: bool,
}

impl Descriptor {
    pub fn bdev(&self) -> &BdevHandle {
        &self.bdev
    }

    pub fn is_write(&self) -> bool {
        self.write
    }

    /// This core's channel to the bdev.
    pub fn channel(&self) -> IoChannel {
        self.bdev.get_channel()
    }

    /// Claims the bdev for `module` (SPDK's exclusive_write claim): nothing
    /// else may then open it for writing. EPERM if already claimed or open
    /// for writing through another descriptor.
    pub fn claim(&self, module: &'static str) -> Result<()> {
        self.claim_as(module, ClaimType::ExclusiveWrite)
    }

    /// Claims the bdev for `module` as `kind`. EPERM if it is claimed with
    /// another type, this descriptor already holds a claim, or another
    /// descriptor is open for writing; EINVAL for a read-many claim
    /// through a descriptor open for writing. Released when this
    /// descriptor closes.
    pub fn claim_as(&self, module: &'static str, kind: ClaimType) -> Result<()> {
        let (id, bdev_id, write) = (self.id, self.bdev.id(), self.write);
        with(|r| {
            let other_writer = r
                .descs
                .iter()
                .any(|(did, d)| *did != id && d.bdev_id == bdev_id && d.write);
            let e = r
                .entry_mut(bdev_id)
                .ok_or_else(|| BdevError::NoDevice(String::new()))?;
            let name = e.bdev.name().to_string();
            if kind == ClaimType::ReadManyWriteNone && write {
                return Err(BdevError::Invalid(format!(
                    "bdev {name}: a read_many_write_none claim needs a read-only descriptor"
                )));
            }
            match &mut e.claim {
                Some((t, holders)) => {
                    if *t != kind || kind == ClaimType::ExclusiveWrite {
                        return Err(BdevError::Claimed(format!(
                            "bdev {name} already claimed ({}) by {}",
                            t.as_str(),
                            holders.first().map_or("?", |c| c.module)
                        )));
                    }
                    if holders.iter().any(|c| c.desc_id == id) {
                        return Err(BdevError::Claimed(format!(
                            "bdev {name}: this descriptor already holds a claim"
                        )));
                    }
                    holders.push(Claim {
                        desc_id: id,
                        module,
                    });
                }
                None => {
                    if other_writer {
                        return Err(BdevError::Claimed(format!(
                            "bdev {name} is open for writing"
                        )));
                    }
                    e.claim = Some((
                        kind,
                        vec![Claim {
                            desc_id: id,
                            module,
                        }],
                    ));
                }
            }
            Ok(())
        })
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        let id = self.id;
        if reactor::try_current_core() == Some(reactor::main_core()) {
            close(id);
        } else if reactor::try_current_core().is_some() {
            reactor::send(reactor::main_core(), move || close(id));
        }
    }
}

fn close(desc_id: u64) {
    let waiters = try_with(|r| {
        let Some(d) = r.descs.remove(&desc_id) else {
            return Vec::new();
        };
        if let Some(e) = r.entry_mut(d.bdev_id) {
            if let Some((_, holders)) = &mut e.claim {
                holders.retain(|c| c.desc_id != desc_id);
                if holders.is_empty() {
                    e.claim = None;
                }
            }
        }
        if r.open_count(d.bdev_id) == 0 {
            r.close_waiters.remove(&d.bdev_id).unwrap_or_default()
        } else {
            Vec::new()
        }
    });
    wake_all(waiters);
}

/// Opens and claims `base` for the virtual bdev `vbdev` of `module`; when
/// the base goes away, `vbdev` is unregistered with it (SPDK's hot-remove
/// cascade for delay, error, ...).
pub fn open_base(base: &str, vbdev: &str, module: &'static str) -> Result<Descriptor> {
    let vbdev = vbdev.to_string();
    let on_remove = Box::new(move || {
        reactor::spawn_local(async move {
            if let Err(e) = unregister(&vbdev, Some(module)).await {
                log::debug!("{module} bdev {vbdev}: base removed, unregister: {e}");
            }
        })
    });
    let desc = open(base, true, Some(on_remove))?;
    desc.claim(module)?;
    Ok(desc)
}

/// Opens a visible bdev by name, alias or UUID.
pub fn open(name: &str, write: bool, on_remove: Option<RemoveCallback>) -> Result<Descriptor> {
    let bdev = lookup(name).ok_or_else(|| BdevError::NoDevice(name.to_string()))?;
    open_handle(&bdev, write, on_remove)
}

/// Opens `bdev`, which may still be under examine (examine hooks open the
/// bdev they are handed). ENODEV once its unregister has started; EPERM for
/// a write open of a claimed bdev.
pub fn open_handle(
    bdev: &BdevHandle,
    write: bool,
    on_remove: Option<RemoveCallback>,
) -> Result<Descriptor> {
    let id = with(|r| {
        let e = r
            .entries
            .iter()
            .find(|e| e.bdev.id() == bdev.id() && e.state != EntryState::Removing)
            .ok_or_else(|| BdevError::NoDevice(bdev.name().to_string()))?;
        if write {
            if let Some((t, holders)) = &e.claim {
                return Err(BdevError::Claimed(format!(
                    "bdev {} is claimed ({}) by {}",
                    e.bdev.name(),
                    t.as_str(),
                    holders.first().map_or("?", |c| c.module)
                )));
            }
        }
        let id = r.next_id;
        r.next_id += 1;
        r.descs.insert(
            id,
            DescState {
                bdev_id: bdev.id(),
                write,
                on_remove,
            },
        );
        Ok(id)
    })?;
    Ok(Descriptor {
        bdev: bdev.clone(),
        id,
        write,
    })
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
