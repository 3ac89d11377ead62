//! NVMe-oF subsystems, the TCP transport's options and listeners: the
//! target's control-plane state, owned by the main reactor.
//!
//! Invariants: NQNs are unique; the discovery subsystem always exists and
//! cannot be deleted; a namespace holds an open descriptor on its bdev, and
//! when the bdev goes away the namespace is removed (`changes.rs`: the
//! descriptor closes once no core has I/O to it in flight); every change to
//! a subsystem's namespaces stamps it with a new generation from one
//! target-wide counter; a listener address is
//! bound (so a second user of the port fails at once) and released when
//! the last subsystem stops listening on it. Creates are atomic: a failed
//! one leaves nothing behind.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};

use bdev::registry::{self, Descriptor};
use bdev::BdevError;
use serde_json::{json, Value};
use uuid::Uuid;

pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// SPDK's defaults for a subsystem created without them.
pub const DEFAULT_SERIAL: &str = "00000000000000000000";
pub const DEFAULT_MODEL: &str = "Ferroplane bdev Controller";
pub const DEFAULT_MAX_NAMESPACES: u32 = 32;
pub const DEFAULT_MIN_CNTLID: u16 = 1;
pub const DEFAULT_MAX_CNTLID: u16 = 0xFFEF;
/// NVMe Base 2.0, 4.5: an NQN is at most 223 bytes.
pub const MAX_NQN_BYTES: usize = 223;

/// TCP transport options (`nvmf_create_transport`), SPDK's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TransportOpts {
    pub max_queue_depth: u32,
    pub max_io_qpairs_per_ctrlr: u32,
    pub in_capsule_data_size: u32,
    pub max_io_size: u32,
    pub io_unit_size: u32,
    pub max_aq_depth: u32,
    pub num_shared_buffers: u32,
    pub buf_cache_size: u32,
    pub dif_insert_or_strip: bool,
    pub zcopy: bool,
    pub c2h_success: bool,
    pub sock_priority: u32,
    pub abort_timeout_sec: u32,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 131072,
            io_unit_size: 131072,
            max_aq_depth: 128,
            num_shared_buffers: 511,
            buf_cache_size: u32::MAX,
            dif_insert_or_strip: false,
            zcopy: false,
            c2h_success: true,
            sock_priority: 0,
            abort_timeout_sec: 1,
        }
    }
}

impl TransportOpts {
    pub fn validate(&self) -> Result<(), BdevError> {
        let bad = |m: String| Err(BdevError::Invalid(m));
        if !(2..=65535).contains(&self.max_queue_depth) {
            return bad(format!(
                "max_queue_depth {} not in 2..=65535",
                self.max_queue_depth
            ));
        }
        if !(2..=4096).contains(&self.max_aq_depth) {
            return bad(format!(
                "max_aq_depth {} not in 2..=4096",
                self.max_aq_depth
            ));
        }
        if !self.max_io_size.is_power_of_two() || self.max_io_size < 8192 {
            return bad(format!(
                "max_io_size {} is not a power of two of at least 8192",
                self.max_io_size
            ));
        }
        if !self.in_capsule_data_size.is_multiple_of(16) || self.in_capsule_data_size > 131072 {
            return bad(format!(
                "in_capsule_data_size {} is not a multiple of 16 up to 131072",
                self.in_capsule_data_size
            ));
        }
        if self.max_io_qpairs_per_ctrlr == 0 || self.max_io_qpairs_per_ctrlr > 65534 {
            return bad(format!(
                "max_io_qpairs_per_ctrlr {} not in 1..=65534",
                self.max_io_qpairs_per_ctrlr
            ));
        }
        Ok(())
    }

    /// `nvmf_get_transports`' object (SPDK's key order).
    pub fn to_json(&self) -> Value {
        let mut v = json!({"trtype": "TCP"});
        if let (Value::Object(m), Ok(Value::Object(o))) = (&mut v, serde_json::to_value(self)) {
            m.extend(o);
        }
        v
    }
}

/// A transport address (`listen_address`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
pub struct ListenAddress {
    #[serde(deserialize_with = "upper_case")]
    pub trtype: String,
    #[serde(default = "ipv4", deserialize_with = "address_family")]
    pub adrfam: String,
    pub traddr: String,
    #[serde(default)]
    pub trsvcid: String,
}

fn ipv4() -> String {
    "IPv4".into()
}

// Hosts send `tcp`/`ipv4` and echo back what we print (`TCP`/`IPv4`, as
// SPDK prints them): one spelling, so an address matches itself either way
// (Longhorn removes listeners with the values it read back).
fn upper_case<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(<String as serde::Deserialize>::deserialize(d)?.to_ascii_uppercase())
}

fn address_family<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    Ok(match s.to_ascii_lowercase().as_str() {
        "ipv4" => "IPv4".into(),
        "ipv6" => "IPv6".into(),
        _ => s,
    })
}

impl ListenAddress {
    pub fn to_json(&self) -> Value {
        json!({"trtype": self.trtype.to_uppercase(), "adrfam": self.adrfam,
               "traddr": self.traddr, "trsvcid": self.trsvcid})
    }

    /// The socket address, checking trtype, adrfam and port.
    pub fn socket_addr(&self) -> Result<SocketAddr, BdevError> {
        if !self.trtype.eq_ignore_ascii_case("tcp") {
            return Err(BdevError::Invalid(format!(
                "trtype {:?}: only TCP is supported",
                self.trtype
            )));
        }
        let port: u16 = self.trsvcid.parse().map_err(|_| {
            BdevError::Invalid(format!("trsvcid {:?} is not a port number", self.trsvcid))
        })?;
        let ip: std::net::IpAddr = self.traddr.parse().map_err(|_| {
            BdevError::Invalid(format!("traddr {:?} is not an IP address", self.traddr))
        })?;
        let family_ok = match self.adrfam.to_ascii_lowercase().as_str() {
            "ipv4" => ip.is_ipv4(),
            "ipv6" => ip.is_ipv6(),
            _ => false,
        };
        if !family_ok {
            return Err(BdevError::Invalid(format!(
                "adrfam {:?} does not match traddr {:?}",
                self.adrfam, self.traddr
            )));
        }
        Ok(SocketAddr::new(ip, port))
    }
}

pub struct Namespace {
    pub nsid: u32,
    /// Unique per add (see `NamespaceView::instance`).
    pub instance: u64,
    pub bdev_name: String,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    pub desc: Descriptor,
}

pub struct Subsystem {
    pub nqn: String,
    pub discovery: bool,
    pub serial_number: String,
    pub model_number: String,
    pub max_namespaces: u32,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    pub listeners: Vec<ListenAddress>,
    pub namespaces: BTreeMap<u32, Namespace>,
    /// The target's generation at the last change of `namespaces` (or at
    /// creation): what the cores' copies are compared by.
    pub ns_generation: u64,
}

impl Subsystem {
    fn new_discovery() -> Subsystem {
        Subsystem {
            nqn: DISCOVERY_NQN.into(),
            discovery: true,
            serial_number: String::new(),
            model_number: String::new(),
            max_namespaces: 0,
            min_cntlid: DEFAULT_MIN_CNTLID,
            max_cntlid: DEFAULT_MAX_CNTLID,
            allow_any_host: true,
            hosts: Vec::new(),
            listeners: Vec::new(),
            namespaces: BTreeMap::new(),
            ns_generation: 0,
        }
    }

    /// Whether `hostnqn` may connect (access control, SPDK's rules: with
    /// allow_any_host even an empty host NQN may, as SPDK's initiator
    /// sends when none is configured; otherwise it must be listed).
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.hosts.iter().any(|h| h == hostnqn)
    }

    /// The namespaces as queues see them.
    pub fn namespace_views(&self) -> Vec<super::admin::NamespaceView> {
        self.namespaces
            .values()
            .map(|n| super::admin::NamespaceView {
                nsid: n.nsid,
                instance: n.instance,
                bdev: n.desc.bdev().clone(),
                num_blocks: n.desc.bdev().num_blocks(),
                block_size: n.desc.bdev().block_size(),
                nguid: n.nguid,
                uuid: *n.uuid.as_bytes(),
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let mut o = json!({
            "nqn": self.nqn,
            "subtype": if self.discovery { "Discovery" } else { "NVMe" },
            "listen_addresses": self.listeners.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
            "allow_any_host": self.allow_any_host,
            "hosts": self.hosts.iter().map(|h| json!({"nqn": h})).collect::<Vec<_>>(),
        });
        if !self.discovery {
            o["serial_number"] = json!(self.serial_number);
            o["model_number"] = json!(self.model_number);
            o["max_namespaces"] = json!(self.max_namespaces);
            o["min_cntlid"] = json!(self.min_cntlid);
            o["max_cntlid"] = json!(self.max_cntlid);
            o["namespaces"] = self
                .namespaces
                .values()
                .map(|n| {
                    json!({"nsid": n.nsid, "bdev_name": n.bdev_name, "name": n.bdev_name,
                           "nguid": hex_upper(&n.nguid), "uuid": n.uuid.hyphenated().to_string()})
                })
                .collect();
        }
        o
    }
}

pub fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

pub fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let s: String = s.chars().filter(|c| *c != '-').collect();
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks an NQN: `nqn.yyyy-mm.reverse.domain:...` or the UUID form, at
/// most 223 bytes of printable ASCII.
pub fn validate_nqn(nqn: &str) -> Result<(), BdevError> {
    let bad = |why: &str| Err(BdevError::Invalid(format!("nqn {nqn:?}: {why}")));
    if nqn.len() > MAX_NQN_BYTES {
        return bad("longer than 223 bytes");
    }
    if !nqn.bytes().all(|c| c.is_ascii_graphic()) {
        return bad("not printable ASCII");
    }
    if let Some(u) = nqn.strip_prefix("nqn.2014-08.org.nvmexpress:uuid:") {
        return match Uuid::parse_str(u) {
            Ok(_) => Ok(()),
            Err(_) => bad("invalid UUID"),
        };
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else {
        return bad("must start with \"nqn.\"");
    };
    let date_ok = rest.len() > 8
        && rest.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[4] == b'-'
        && rest.as_bytes()[5..7].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[7] == b'.';
    if !date_ok {
        return bad("must be nqn.yyyy-mm.<reverse domain>");
    }
    Ok(())
}

pub struct BoundListener {
    pub socket: TcpListener,
    acceptor: Option<glommio::task::JoinHandle<()>>,
}

impl BoundListener {
    /// Stops accepting and waits until the acceptor (which owns a copy of
    /// the socket) is gone, so the port is free when this returns.
    pub async fn close(mut self) {
        if let Some(a) = self.acceptor.take() {
            a.cancel();
            a.await;
        }
    }
}

impl Drop for BoundListener {
    fn drop(&mut self) {
        if let Some(a) = &self.acceptor {
            a.cancel();
        }
    }
}

/// The whole target's control state.
pub struct Target {
    pub transport: Option<TransportOpts>,
    pub subsystems: BTreeMap<String, Subsystem>,
    /// Bound listen sockets, by address, shared by the subsystems on them,
    /// with the task accepting on each.
    pub sockets: BTreeMap<SocketAddr, BoundListener>,
    /// NQNs whose create is in flight (SPEC §2).
    pub reserved: Vec<String>,
    pub controllers: super::admin::Controllers,
    /// Discovery log generation: bumped by every change hosts could see.
    pub genctr: u64,
    /// Namespace generations and instances handed out so far.
    generation: u64,
    instances: u64,
}

thread_local! {
    static TARGET: RefCell<Target> = RefCell::new(Target {
        transport: None,
        subsystems: BTreeMap::from([(DISCOVERY_NQN.to_string(), Subsystem::new_discovery())]),
        sockets: BTreeMap::new(),
        reserved: Vec::new(),
        controllers: Default::default(),
        genctr: 1,
        generation: 0,
        instances: 0,
    });
}

/// Runs `f` on the target state. Main reactor only.
pub fn with_target<R>(f: impl FnOnce(&mut Target) -> R) -> R {
    assert!(
        reactor::is_main_core(),
        "nvmf state is owned by the main reactor"
    );
    TARGET.with(|t| f(&mut t.borrow_mut()))
}

/// Like [`with_target`], for changes a host could see in the discovery log.
pub fn change_target<R>(f: impl FnOnce(&mut Target) -> R) -> R {
    with_target(|t| {
        t.genctr += 1;
        f(t)
    })
}

impl Target {
    /// A new namespace generation, newer than every one handed out.
    pub fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// A new namespace instance id.
    pub fn next_instance(&mut self) -> u64 {
        self.instances += 1;
        self.instances
    }

    pub fn subsystem(&mut self, nqn: &str) -> Result<&mut Subsystem, BdevError> {
        self.subsystems
            .get_mut(nqn)
            .ok_or_else(|| BdevError::NoDevice(nqn.to_string()))
    }

    /// Binds `addr` unless already bound for another subsystem.
    pub fn bind(&mut self, addr: SocketAddr) -> Result<(), BdevError> {
        if self.sockets.contains_key(&addr) {
            return Ok(());
        }
        let l = TcpListener::bind(addr).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => BdevError::Exists(format!("{addr}: {e}")),
            _ => BdevError::Invalid(format!("cannot listen on {addr}: {e}")),
        })?;
        l.set_nonblocking(true)
            .map_err(|e| BdevError::Invalid(format!("{addr}: {e}")))?;
        let maxh2cdata = self
            .transport
            .as_ref()
            .map_or(TransportOpts::default().max_io_size, |t| t.max_io_size);
        let acceptor = super::listener::start_acceptor(addr, &l, maxh2cdata)
            .map_err(|e| BdevError::Invalid(format!("cannot accept on {addr}: {e}")))?;
        self.sockets.insert(
            addr,
            BoundListener {
                socket: l,
                acceptor: Some(acceptor),
            },
        );
        Ok(())
    }

    /// Takes out the bound addresses no subsystem listens on any more; the
    /// caller closes them ([`BoundListener::close`]).
    pub fn release_unused(&mut self) -> Vec<BoundListener> {
        let used: Vec<SocketAddr> = self
            .subsystems
            .values()
            .flat_map(|s| s.listeners.iter())
            .filter_map(|l| l.socket_addr().ok())
            .collect();
        let unused: Vec<SocketAddr> = self
            .sockets
            .keys()
            .filter(|a| !used.contains(a))
            .copied()
            .collect();
        unused
            .iter()
            .filter_map(|a| self.sockets.remove(a))
            .collect()
    }
}

/// Opens `bdev_name` for namespace `nsid` (add `instance`) of `nqn`; if
/// the bdev goes away, the namespace is removed as `nvmf_subsystem_remove_ns`
/// removes it, and the bdev's unregister waits until that is done (the
/// descriptor closes last).
pub fn open_namespace_bdev(
    nqn: &str,
    nsid: u32,
    instance: u64,
    bdev_name: &str,
) -> Result<Descriptor, BdevError> {
    let (nqn, name) = (nqn.to_string(), bdev_name.to_string());
    registry::open(
        bdev_name,
        true,
        Some(Box::new(move || {
            log::warn!("bdev {name} removed: removing namespace {nsid} of {nqn}");
            reactor::spawn_local(async move {
                let _lock = super::changes::lock().await;
                // Gone already if the RPC removed it (or deleted the
                // subsystem) meanwhile.
                let _ = super::changes::remove_namespace(&nqn, nsid, Some(instance)).await;
            });
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqn_rules() {
        for ok in [
            "nqn.2016-06.io.spdk:cnode1",
            "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            DISCOVERY_NQN,
        ] {
            assert!(validate_nqn(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "iqn.2016-06.io.spdk:x",
            "nqn.16-06.x",
            "nqn.2016-06",
            "nqn.2016-06.io x",
        ] {
            assert!(validate_nqn(bad).is_err(), "{bad:?}");
        }
        assert!(validate_nqn(&format!("nqn.2016-06.io.x:{}", "a".repeat(220))).is_err());
    }

    #[test]
    fn addresses_and_transport_options() {
        let a = ListenAddress {
            trtype: "tcp".into(),
            adrfam: "IPv4".into(),
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
        };
        assert_eq!(a.socket_addr().unwrap(), "127.0.0.1:4420".parse().unwrap());
        assert_eq!(a.to_json()["trtype"], "TCP");
        let mut b = a.clone();
        b.adrfam = "IPv6".into();
        assert!(b.socket_addr().is_err());
        b.trtype = "RDMA".into();
        assert!(b.socket_addr().is_err());
        let t = TransportOpts::default();
        assert!(t.validate().is_ok());
        assert_eq!(t.to_json()["max_io_size"], 131072);
        assert_eq!(
            t.to_json().as_object().unwrap().keys().next().unwrap(),
            "trtype"
        );
        let bad = TransportOpts {
            max_io_size: 5000,
            ..TransportOpts::default()
        };
        assert_eq!(bad.validate().unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            parse_hex16("ABCDEF0123456789ABCDEF0123456789").unwrap()[0],
            0xAB
        );
    }
}
