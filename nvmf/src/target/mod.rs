//! The NVMe/TCP target: its control plane (the TCP transport's options,
//! subsystems, namespaces, hosts, bound listeners, with SPDK's RPCs and
//! `save_config`: `subsystem.rs`, `rpc.rs`), how a change to them reaches
//! every core before its RPC returns (`changes.rs`), controllers and the
//! admin queue (`admin.rs`), and the data plane: accepting
//! (`listener.rs`), each core's poll group of connections (`poll_group.rs`)
//! over non-blocking sockets (`socket.rs`), one connection's PDUs and
//! commands (`conn.rs`) with receive buffers (`recv_buf.rs`), request
//! slots (`request.rs`), a send queue (`send_queue.rs`) and NVM command
//! planning (`io.rs`); and what bounds all of it (`limits.rs`).

pub mod admin;
pub mod changes;
pub mod conn;
pub mod io;
pub mod limits;
pub mod listener;
pub mod poll_group;
mod recv_buf;
pub mod request;
pub mod rpc;
pub mod send_queue;
pub mod socket;
pub mod subsystem;
