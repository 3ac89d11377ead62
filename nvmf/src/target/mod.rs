//! The NVMe/TCP target: its control plane (the TCP transport's options,
//! subsystems, namespaces, hosts, bound listeners, with SPDK's RPCs and
//! `save_config`) and its connections (`conn`: accept, spread over the
//! reactors, ICReq/ICResp, PDU checks and termination). Serving fabrics
//! Connect and admin/I/O commands on reactor-pinned queue pairs builds on
//! this next.

pub mod admin;
pub mod conn;
pub mod io;
pub mod rpc;
pub mod subsystem;
