//! The nvmf RPC methods, with SPDK's names and parameters, and the `nvmf`
//! section of `save_config`. Methods that take something away from hosts
//! (a namespace, a subsystem, a host's access) or add a namespace return
//! only once that is in effect on every core (`changes.rs`).

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use bdev::rpc::{RpcError, RpcTable, StateMask};
use bdev::BdevError;

use super::changes;
use super::subsystem::{
    change_target, open_namespace_bdev, parse_hex16, validate_nqn, with_target, BoundListener,
    ListenAddress, Namespace, Subsystem, TransportOpts, DEFAULT_MAX_CNTLID, DEFAULT_MAX_NAMESPACES,
    DEFAULT_MIN_CNTLID, DEFAULT_MODEL, DEFAULT_SERIAL, DISCOVERY_NQN,
};

#[derive(Deserialize)]
struct CreateTransportParams {
    trtype: String,
    #[serde(flatten)]
    opts: TransportOpts,
}

#[derive(Deserialize)]
#[allow(dead_code)] // tgt_name: one target per process, as in spdk_tgt
struct GetTransportsParams {
    trtype: Option<String>,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
struct CreateSubsystemParams {
    nqn: String,
    serial_number: Option<String>,
    model_number: Option<String>,
    #[serde(default)]
    max_namespaces: u32,
    #[serde(default)]
    allow_any_host: bool,
    min_cntlid: Option<u16>,
    max_cntlid: Option<u16>,
}

#[derive(Deserialize)]
#[allow(dead_code)] // tgt_name: one target per process, as in spdk_tgt
struct GetSubsystemsParams {
    nqn: Option<String>,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
struct NqnParams {
    nqn: String,
}

#[derive(Deserialize)]
struct ListenerParams {
    nqn: String,
    listen_address: ListenAddress,
}

#[derive(Deserialize)]
struct NamespaceSpec {
    bdev_name: String,
    #[serde(default)]
    nsid: u32,
    nguid: Option<String>,
    uuid: Option<Uuid>,
}

#[derive(Deserialize)]
struct AddNsParams {
    nqn: String,
    namespace: NamespaceSpec,
}

#[derive(Deserialize)]
struct RemoveNsParams {
    nqn: String,
    nsid: u32,
}

#[derive(Deserialize)]
struct HostParams {
    nqn: String,
    host: String,
}

#[derive(Deserialize)]
struct AllowAnyHostParams {
    nqn: String,
    allow_any_host: bool,
}

fn invalid(msg: String) -> RpcError {
    BdevError::Invalid(msg).into()
}

fn create_transport(p: CreateTransportParams) -> Result<Value, RpcError> {
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(invalid(format!(
            "Invalid transport type {:?}: only TCP",
            p.trtype
        )));
    }
    p.opts.validate()?;
    with_target(|t| {
        if t.transport.is_some() {
            return Err(RpcError::new(
                bdev::rpc::INTERNAL_ERROR,
                "Transport type 'TCP' already exists",
            ));
        }
        let per_core = super::limits::buffer_budget_per_core(
            p.opts.num_shared_buffers,
            p.opts.io_unit_size,
            p.opts.max_io_size,
            reactor::cores().len(),
        );
        // Before any connection: a listener needs the transport, and each
        // core takes messages in order.
        for core in reactor::cores() {
            reactor::send(core, move || bdev::buf::set_budget_bytes(per_core));
        }
        t.transport = Some(p.opts);
        Ok(json!(true))
    })
}

fn create_subsystem(p: CreateSubsystemParams) -> Result<Value, RpcError> {
    validate_nqn(&p.nqn)?;
    let serial = p.serial_number.unwrap_or_else(|| DEFAULT_SERIAL.into());
    let model = p.model_number.unwrap_or_else(|| DEFAULT_MODEL.into());
    if serial.len() > 20 || !serial.bytes().all(|c| c.is_ascii_graphic() || c == b' ') {
        return Err(invalid(format!(
            "serial_number {serial:?}: up to 20 ASCII characters"
        )));
    }
    if model.len() > 40 || !model.bytes().all(|c| c.is_ascii_graphic() || c == b' ') {
        return Err(invalid(format!(
            "model_number {model:?}: up to 40 ASCII characters"
        )));
    }
    let min = p.min_cntlid.unwrap_or(DEFAULT_MIN_CNTLID);
    let max = p.max_cntlid.unwrap_or(DEFAULT_MAX_CNTLID);
    if min == 0 || max > DEFAULT_MAX_CNTLID || min > max {
        return Err(invalid(format!("cntlid range {min}..={max} invalid")));
    }
    change_target(|t| {
        if t.subsystems.contains_key(&p.nqn) || t.reserved.contains(&p.nqn) {
            return Err(BdevError::Exists(p.nqn.clone()).into());
        }
        let generation = t.next_generation();
        t.subsystems.insert(
            p.nqn.clone(),
            Subsystem {
                nqn: p.nqn.clone(),
                discovery: false,
                serial_number: serial,
                model_number: model,
                max_namespaces: if p.max_namespaces == 0 {
                    DEFAULT_MAX_NAMESPACES
                } else {
                    p.max_namespaces
                },
                min_cntlid: min,
                max_cntlid: max,
                allow_any_host: p.allow_any_host,
                hosts: Vec::new(),
                listeners: Vec::new(),
                namespaces: Default::default(),
                ns_generation: generation,
            },
        );
        Ok(json!(true))
    })
}

/// Closes the listeners a change left unused before the RPC answers, so
/// the port is free by then.
async fn close_released(released: Vec<BoundListener>) -> Result<Value, RpcError> {
    for l in released {
        l.close().await;
    }
    Ok(json!(true))
}

/// Deletes a subsystem: gone from the table (no new Connect), then every
/// queue of it closed and its in-flight I/O completed, then its namespaces
/// gone from every core, then their descriptors closed.
async fn delete_subsystem(p: NqnParams) -> Result<Value, RpcError> {
    if p.nqn == DISCOVERY_NQN {
        return Err(invalid("the discovery subsystem cannot be deleted".into()));
    }
    let _lock = changes::lock().await;
    let (sub, generation, released) = change_target(|t| {
        let sub = t
            .subsystems
            .remove(&p.nqn)
            .ok_or_else(|| BdevError::NoDevice(p.nqn.clone()))?;
        let generation = t.next_generation();
        Ok::<_, RpcError>((sub, generation, t.release_unused()))
    })?;
    changes::disconnect(&p.nqn, "subsystem deleted").await;
    let instances = sub.namespaces.values().map(|n| n.instance).collect();
    changes::publish(&p.nqn, generation, None, instances).await;
    drop(sub);
    close_released(released).await
}

fn add_listener(p: ListenerParams) -> Result<Value, RpcError> {
    let addr = p.listen_address.socket_addr()?;
    change_target(|t| {
        if t.transport.is_none() {
            return Err(invalid(
                "create the TCP transport first (nvmf_create_transport)".into(),
            ));
        }
        t.subsystem(&p.nqn)?;
        t.bind(addr)?;
        let s = t.subsystem(&p.nqn)?;
        if s.listeners.contains(&p.listen_address) {
            return Err(BdevError::Exists(format!("{} already listens on {addr}", p.nqn)).into());
        }
        if s.discovery {
            log::info!(
                "discovery service on {addr}: nvme discover -t tcp -a {} -s {}",
                addr.ip(),
                addr.port()
            );
        } else {
            log::info!(
                "{} on {addr}: nvme connect -t tcp -a {} -s {} -n {}",
                p.nqn,
                addr.ip(),
                addr.port(),
                p.nqn
            );
        }
        s.listeners.push(p.listen_address);
        Ok(json!(true))
    })
}

async fn remove_listener(p: ListenerParams) -> Result<Value, RpcError> {
    let released = change_target(|t| {
        let s = t.subsystem(&p.nqn)?;
        let before = s.listeners.len();
        s.listeners.retain(|l| l != &p.listen_address);
        if s.listeners.len() == before {
            return Err(BdevError::NotFound(format!("{} does not listen there", p.nqn)).into());
        }
        Ok::<_, RpcError>(t.release_unused())
    })?;
    close_released(released).await
}

async fn add_ns(p: AddNsParams) -> Result<Value, RpcError> {
    let ns = p.namespace;
    let nguid = match &ns.nguid {
        Some(h) => Some(parse_hex16(h).ok_or_else(|| {
            RpcError::invalid_params(format!(
                "Invalid parameters: namespace.nguid: {h:?} is not 32 hex digits"
            ))
        })?),
        None => None,
    };
    let _lock = changes::lock().await;
    let (nsid, instance) = with_target(|t| {
        let instance = t.next_instance();
        let s = t.subsystem(&p.nqn)?;
        if s.discovery {
            return Err(invalid("the discovery subsystem has no namespaces".into()));
        }
        let nsid = if ns.nsid == 0 {
            (1..=s.max_namespaces)
                .find(|n| !s.namespaces.contains_key(n))
                .ok_or(BdevError::NoSpace)?
        } else {
            ns.nsid
        };
        if nsid > s.max_namespaces || nsid == 0xFFFF_FFFF {
            return Err(invalid(format!(
                "nsid {nsid} above max_namespaces {}",
                s.max_namespaces
            )));
        }
        if s.namespaces.contains_key(&nsid) {
            return Err(BdevError::Exists(format!("nsid {nsid}")).into());
        }
        Ok::<_, RpcError>((nsid, instance))
    })?;
    let desc = open_namespace_bdev(&p.nqn, nsid, instance, &ns.bdev_name)?;
    let uuid = ns.uuid.unwrap_or_else(|| desc.bdev().uuid());
    let nguid = nguid.unwrap_or(*uuid.as_bytes());
    // Under the change lock nothing else changed the namespaces meanwhile.
    let (generation, views) = with_target(|t| {
        let generation = t.next_generation();
        let s = t.subsystem(&p.nqn)?;
        s.namespaces.insert(
            nsid,
            Namespace {
                nsid,
                instance,
                bdev_name: desc.bdev().name().to_string(),
                uuid,
                nguid,
                desc,
            },
        );
        s.ns_generation = generation;
        Ok::<_, RpcError>((generation, s.namespace_views()))
    })?;
    // Usable on every core (and announced) when this returns.
    changes::publish(&p.nqn, generation, Some(views), Vec::new()).await;
    Ok(json!(nsid))
}

async fn remove_ns(p: RemoveNsParams) -> Result<Value, RpcError> {
    let _lock = changes::lock().await;
    changes::remove_namespace(&p.nqn, p.nsid, None).await?;
    Ok(json!(true))
}

fn add_host(p: HostParams) -> Result<Value, RpcError> {
    validate_nqn(&p.host)?;
    change_target(|t| {
        let s = t.subsystem(&p.nqn)?;
        if s.hosts.contains(&p.host) {
            return Err(BdevError::Exists(p.host.clone()).into());
        }
        s.hosts.push(p.host);
        Ok(json!(true))
    })
}

/// Removes a host from the list; unless any host is allowed, its queues
/// are closed (and their in-flight I/O completed) before this returns.
async fn remove_host(p: HostParams) -> Result<Value, RpcError> {
    let _lock = changes::lock().await;
    change_target(|t| {
        let s = t.subsystem(&p.nqn)?;
        let before = s.hosts.len();
        s.hosts.retain(|h| h != &p.host);
        if before == s.hosts.len() {
            return Err(RpcError::from(BdevError::NoDevice(p.host.clone())));
        }
        Ok(())
    })?;
    changes::disconnect(&p.nqn, "host removed from the subsystem").await;
    Ok(json!(true))
}

/// Turning allow_any_host off closes the queues of every host not in the
/// list before this returns.
async fn allow_any_host(p: AllowAnyHostParams) -> Result<Value, RpcError> {
    let _lock = changes::lock().await;
    change_target(|t| {
        t.subsystem(&p.nqn)?.allow_any_host = p.allow_any_host;
        Ok::<_, RpcError>(())
    })?;
    if !p.allow_any_host {
        changes::disconnect(&p.nqn, "allow_any_host turned off").await;
    }
    Ok(json!(true))
}

/// The `nvmf` section of `save_config`, in SPDK's order: transport, then
/// per subsystem its create, hosts and namespaces, then every listener.
pub fn subsystem_config() -> Value {
    with_target(|t| {
        let mut out = Vec::new();
        if let Some(tr) = &t.transport {
            out.push(json!({"method": "nvmf_create_transport", "params": tr.to_json()}));
        }
        for s in t.subsystems.values().filter(|s| !s.discovery) {
            out.push(json!({"method": "nvmf_create_subsystem", "params": {
                "nqn": s.nqn, "allow_any_host": s.allow_any_host,
                "serial_number": s.serial_number, "model_number": s.model_number,
                "max_namespaces": s.max_namespaces, "min_cntlid": s.min_cntlid,
                "max_cntlid": s.max_cntlid}}));
            for h in &s.hosts {
                out.push(json!({"method": "nvmf_subsystem_add_host",
                                "params": {"nqn": s.nqn, "host": h}}));
            }
            for n in s.namespaces.values() {
                out.push(
                    json!({"method": "nvmf_subsystem_add_ns", "params": {"nqn": s.nqn,
                    "namespace": {"nsid": n.nsid, "bdev_name": n.bdev_name,
                                  "nguid": super::subsystem::hex_upper(&n.nguid),
                                  "uuid": n.uuid.hyphenated().to_string()}}}),
                );
            }
        }
        for s in t.subsystems.values() {
            for l in &s.listeners {
                out.push(json!({"method": "nvmf_subsystem_add_listener",
                                "params": {"nqn": s.nqn, "listen_address": l.to_json()}}));
            }
        }
        Value::Array(out)
    })
}

fn address_json(a: &std::net::SocketAddr) -> Value {
    json!({"trtype": "TCP", "adrfam": if a.is_ipv4() { "IPv4" } else { "IPv6" },
           "traddr": a.ip().to_string(), "trsvcid": a.port().to_string()})
}

fn hostid_string(id: &[u8; 16]) -> String {
    Uuid::from_bytes(*id).hyphenated().to_string()
}

fn get_controllers(p: NqnParams) -> Result<Value, RpcError> {
    with_target(|t| {
        t.subsystem(&p.nqn)?;
        Ok(json!(t
            .controllers
            .live
            .iter()
            .filter(|(_, r)| r.subnqn == p.nqn)
            .map(|(cntlid, r)| json!({"cntlid": cntlid, "hostnqn": r.hostnqn,
                "hostid": hostid_string(&r.hostid), "num_io_qpairs": r.io_qpairs}))
            .collect::<Vec<_>>()))
    })
}

fn get_qpairs(p: NqnParams) -> Result<Value, RpcError> {
    with_target(|t| {
        t.subsystem(&p.nqn)?;
        Ok(json!(t
            .controllers
            .qpairs
            .values()
            .filter(|q| q.subnqn == p.nqn)
            .map(
                |q| json!({"cntlid": q.cntlid, "qid": q.qid, "state": "enabled",
                "thread": format!("nvmf_tgt_poll_group_{:03}", q.core),
                "hostnqn": q.hostnqn, "listen_address": address_json(&q.listen),
                "peer_address": address_json(&q.peer)})
            )
            .collect::<Vec<_>>()))
    })
}

async fn get_stats() -> Result<Value, RpcError> {
    let completed = reactor::for_each_core(|| {
        (
            reactor::current_core().0,
            super::conn::completed_nvme_io(),
            super::conn::pending_data_buffer(),
        )
    })
    .await;
    let groups = with_target(|t| {
        completed
            .iter()
            .map(|(core, done, pending_buf)| {
                let c = &t.controllers;
                let total = c.stats.get(core).copied().unwrap_or_default();
                let current = |admin: bool| {
                    c.qpairs
                        .values()
                        .filter(|q| q.core == *core && (q.qid == 0) == admin)
                        .count()
                };
                json!({"name": format!("nvmf_tgt_poll_group_{core:03}"),
                       "admin_qpairs": total.admin_qpairs, "io_qpairs": total.io_qpairs,
                       "current_admin_qpairs": current(true), "current_io_qpairs": current(false),
                       "pending_bdev_io": 0, "completed_nvme_io": done,
                       "transports": [{"trtype": "TCP", "pending_data_buffer": pending_buf}]})
            })
            .collect::<Vec<_>>()
    });
    Ok(json!({"tick_rate": reactor::ticks::tick_rate(), "poll_groups": groups}))
}

pub fn register(table: &mut RpcTable) {
    let m = StateMask::RUNTIME;
    table.register_with(
        "nvmf_create_transport",
        m,
        |p: CreateTransportParams| async move { create_transport(p) },
    );
    table.register_with(
        "nvmf_get_transports",
        m,
        |p: GetTransportsParams| async move {
            with_target(|t| {
                let list: Vec<Value> = t
                    .transport
                    .iter()
                    .filter(|_| {
                        p.trtype
                            .as_deref()
                            .is_none_or(|x| x.eq_ignore_ascii_case("tcp"))
                    })
                    .map(|o| o.to_json())
                    .collect();
                if p.trtype.is_some() && list.is_empty() {
                    return Err(BdevError::NoDevice("transport".into()).into());
                }
                Ok(json!(list))
            })
        },
    );
    table.register_with(
        "nvmf_create_subsystem",
        m,
        |p: CreateSubsystemParams| async move { create_subsystem(p) },
    );
    table.register_with("nvmf_delete_subsystem", m, delete_subsystem);
    table.register_with(
        "nvmf_get_subsystems",
        m,
        |p: GetSubsystemsParams| async move {
            with_target(|t| match &p.nqn {
                // One subsystem, or ENODEV, as SPDK.
                Some(nqn) => Ok(json!([t.subsystem(nqn)?.to_json()])),
                None => Ok(Value::Array(
                    t.subsystems.values().map(|s| s.to_json()).collect(),
                )),
            })
        },
    );
    table.register_with(
        "nvmf_subsystem_add_listener",
        m,
        |p: ListenerParams| async move { add_listener(p) },
    );
    table.register_with("nvmf_subsystem_remove_listener", m, remove_listener);
    table.register_with(
        "nvmf_subsystem_get_listeners",
        m,
        |p: NqnParams| async move {
            with_target(|t| {
                let s = t.subsystem(&p.nqn)?;
                Ok(json!(s
                    .listeners
                    .iter()
                    .map(|l| json!({"address": l.to_json()}))
                    .collect::<Vec<_>>()))
            })
        },
    );
    table.register_with("nvmf_subsystem_add_ns", m, add_ns);
    table.register_with(
        "nvmf_subsystem_get_controllers",
        m,
        |p: NqnParams| async move { get_controllers(p) },
    );
    table.register_with("nvmf_subsystem_get_qpairs", m, |p: NqnParams| async move {
        get_qpairs(p)
    });
    table.register("nvmf_get_stats", m, |_p| get_stats());
    table.register_with("nvmf_subsystem_remove_ns", m, remove_ns);
    table.register_with("nvmf_subsystem_add_host", m, |p: HostParams| async move {
        add_host(p)
    });
    table.register_with("nvmf_subsystem_remove_host", m, remove_host);
    table.register_with("nvmf_subsystem_allow_any_host", m, allow_any_host);
}
