//! Crate `nvmf`: NVMe over TCP.
//!
//! `wire` holds the NVMe/TCP PDU formats and the NVMe command and
//! completion structures, shared by the target and the initiator (which
//! come next, with their RPCs).

pub mod wire;
