//! The NVMe/TCP target. So far its control plane: the TCP transport's
//! options, subsystems, namespaces, hosts and bound listeners, with SPDK's
//! RPCs and `save_config`. The connection state machine (ICReq, fabrics
//! connect, admin and I/O commands on reactor-pinned queue pairs) builds on
//! `crate::wire` next.

pub mod rpc;
pub mod subsystem;
