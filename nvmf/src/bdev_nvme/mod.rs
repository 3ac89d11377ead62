//! The `nvme` bdev module (SPDK's module/bdev/nvme): namespaces of remote
//! NVMe/TCP controllers as bdevs, built on the initiator. So far it holds
//! the module-wide options and hotplug setting (`options.rs`) and their
//! RPCs and `save_config` entries (`rpc.rs`), so an orchestrator that
//! configures them first (Longhorn's engine does, and stops if that fails)
//! can start; attaching controllers comes with the initiator issue, which
//! reads [`options::current`] at attach time.

pub mod options;
pub mod rpc;

/// Whether any nvme controller is attached: while one is, the module
/// options are frozen (`bdev_nvme_set_options` answers EPERM, as SPDK's
/// `g_bdev_nvme_init_done && !TAILQ_EMPTY(&g_nvme_bdev_ctrlrs)`).
///
/// Always false until the module can attach controllers (issue 13), which
/// must make this answer from its controller table.
pub fn controllers_attached() -> bool {
    false
}
