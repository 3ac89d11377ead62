//! The `nvme` bdev module's module-wide options (SPDK's `struct
//! spdk_bdev_nvme_opts`, set by `bdev_nvme_set_options`) and its hotplug
//! setting (`bdev_nvme_set_hotplug`): their types, SPDK v26.05's defaults,
//! SPDK's validation, and the one copy the process keeps.
//!
//! Invariants:
//! - The kept options always passed [`NvmeOptions::validate`]: a call that
//!   fails validation (or is refused because a controller exists) leaves
//!   them exactly as they were.
//! - They are control-plane state owned by the main reactor, like the
//!   target's tables; controllers copy what they need at attach time, so
//!   nothing on the I/O path reads them.
//! - Field names, types and the JSON written by `save_config` are SPDK's,
//!   so a config written by SPDK loads here and the reverse.
//!
//! Only the reconnect / keep-alive / retry fields have a meaning for an
//! NVMe/TCP initiator; the PCIe- and RDMA-only fields (arbitration weights,
//! `rdma_*`, `transport_tos`) are accepted and kept so SPDK configs and
//! clients work unchanged, and have no effect here.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use bdev::BdevError;

/// SPDK_BDEV_NVME_DEFAULT_KEEP_ALIVE_TIMEOUT_IN_MS: 10 s, so a dead target
/// is noticed well before a target's typical 2 min KATO would expire.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT_MS: u32 = 10_000;
/// SPDK's default: attempts per I/O in the transport before it fails.
pub const DEFAULT_TRANSPORT_RETRY_COUNT: u32 = 4;
/// SPDK's default: attempts per I/O in the bdev layer (-1 = forever).
pub const DEFAULT_BDEV_RETRY_COUNT: i32 = 3;
/// SPDK's default: the admin queue is polled for AENs every 10 ms.
pub const DEFAULT_ADMINQ_POLL_PERIOD_US: u64 = 10_000;
/// SPDK_BDEV_NVME_DEFAULT_DELAY_CMD_SUBMIT: batch submissions per poll.
pub const DEFAULT_DELAY_CMD_SUBMIT: bool = true;
/// BDEV_NVME_MULTIPATH_MIN_IO_DEFAULT: round robin switches path per I/O.
pub const DEFAULT_MULTIPATH_MIN_IO: u32 = 1;
/// NVME_HOTPLUG_POLL_PERIOD_DEFAULT: also what a period of 0 means.
pub const HOTPLUG_POLL_PERIOD_DEFAULT_US: u64 = 100_000;
/// NVME_HOTPLUG_POLL_PERIOD_MAX: longer periods are clamped to 10 s.
pub const HOTPLUG_POLL_PERIOD_MAX_US: u64 = 10_000_000;
/// SPDK's DH-HMAC-CHAP list decoders hold at most 32 entries (one per bit
/// of the mask they build).
pub const DHCHAP_LIST_MAX: usize = 32;

/// `action_on_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    #[default]
    None,
    Reset,
    Abort,
}

/// `multipath_opts.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultipathPolicy {
    #[default]
    ActivePassive,
    ActiveActive,
}

/// `multipath_opts.selector` (only meaningful for active_active).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultipathSelector {
    #[default]
    RoundRobin,
    QueueDepth,
}

/// A DH-HMAC-CHAP hash, ordered by SPDK's bit number (SHA-256 is bit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DhchapDigest {
    Sha256 = 1,
    Sha384 = 2,
    Sha512 = 3,
}

/// A DH-HMAC-CHAP Diffie-Hellman group, ordered by SPDK's bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DhchapDhgroup {
    Null = 0,
    Ffdhe2048 = 1,
    Ffdhe3072 = 2,
    Ffdhe4096 = 3,
    Ffdhe6144 = 4,
    Ffdhe8192 = 5,
}

/// The default multipath behaviour for new nvme bdevs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultipathOpts {
    pub policy: MultipathPolicy,
    pub selector: MultipathSelector,
    pub min_io: u32,
}

impl Default for MultipathOpts {
    fn default() -> MultipathOpts {
        MultipathOpts {
            policy: MultipathPolicy::ActivePassive,
            selector: MultipathSelector::RoundRobin,
            min_io: DEFAULT_MULTIPATH_MIN_IO,
        }
    }
}

/// As SPDK writes it (`bdev_nvme_write_multipath_config`): the selector
/// only for active_active, `min_io` only for its round robin.
impl Serialize for MultipathOpts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("policy", &self.policy)?;
        if self.policy == MultipathPolicy::ActiveActive {
            m.serialize_entry("selector", &self.selector)?;
            if self.selector == MultipathSelector::RoundRobin {
                m.serialize_entry("min_io", &self.min_io)?;
            }
        }
        m.end()
    }
}

/// SPDK's `struct spdk_bdev_nvme_opts`. Serialises to the `params` of the
/// `bdev_nvme_set_options` entry SPDK's `save_config` writes, in its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvmeOptions {
    pub action_on_timeout: TimeoutAction,
    /// Per-command timeout; 0: not tracked.
    pub timeout_us: u64,
    /// Admin-command timeout; 0: as `timeout_us`.
    pub timeout_admin_us: u64,
    /// KATO the initiator asks for at Connect; 0: no keep-alive.
    pub keep_alive_timeout_ms: u32,
    pub arbitration_burst: u32,
    pub low_priority_weight: u32,
    pub medium_priority_weight: u32,
    pub high_priority_weight: u32,
    pub nvme_adminq_poll_period_us: u64,
    /// 0: poll I/O queues every reactor loop.
    pub nvme_ioq_poll_period_us: u64,
    /// Requests per I/O queue; 0: the driver's default.
    pub io_queue_requests: u32,
    pub delay_cmd_submit: bool,
    pub transport_retry_count: u32,
    /// -1: retry forever.
    pub bdev_retry_count: i32,
    /// TCP: how long (2^n ms, 0..=31; 0 the driver default) to wait for
    /// progress before closing the connection.
    pub transport_ack_timeout: u8,
    /// How long to try reconnecting before deleting the controller;
    /// -1: forever, 0: never reconnect.
    pub ctrlr_loss_timeout_sec: i32,
    /// Delay between reconnect attempts; 0 only with no reconnect.
    pub reconnect_delay_sec: u32,
    /// How long into reconnecting I/O is failed rather than queued; 0: not
    /// until the controller is deleted.
    pub fast_io_fail_timeout_sec: u32,
    pub disable_auto_failback: bool,
    pub generate_uuids: bool,
    pub transport_tos: u8,
    pub nvme_error_stat: bool,
    pub rdma_srq_size: u32,
    pub io_path_stat: bool,
    pub allow_accel_sequence: bool,
    pub rdma_max_cq_size: u32,
    pub rdma_cm_event_timeout_ms: u16,
    pub dhchap_digests: BTreeSet<DhchapDigest>,
    pub dhchap_dhgroups: BTreeSet<DhchapDhgroup>,
    pub rdma_umr_per_io: bool,
    /// 0: no timeout on the TCP connect.
    pub tcp_connect_timeout_ms: u32,
    pub enable_flush: bool,
    #[serde(rename = "multipath_opts")]
    pub multipath: MultipathOpts,
}

/// SPDK v26.05's `g_opts` initialiser.
impl Default for NvmeOptions {
    fn default() -> NvmeOptions {
        use DhchapDhgroup::*;
        NvmeOptions {
            action_on_timeout: TimeoutAction::None,
            timeout_us: 0,
            timeout_admin_us: 0,
            keep_alive_timeout_ms: DEFAULT_KEEP_ALIVE_TIMEOUT_MS,
            arbitration_burst: 0,
            low_priority_weight: 0,
            medium_priority_weight: 0,
            high_priority_weight: 0,
            nvme_adminq_poll_period_us: DEFAULT_ADMINQ_POLL_PERIOD_US,
            nvme_ioq_poll_period_us: 0,
            io_queue_requests: 0,
            delay_cmd_submit: DEFAULT_DELAY_CMD_SUBMIT,
            transport_retry_count: DEFAULT_TRANSPORT_RETRY_COUNT,
            bdev_retry_count: DEFAULT_BDEV_RETRY_COUNT,
            transport_ack_timeout: 0,
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            disable_auto_failback: false,
            generate_uuids: false,
            transport_tos: 0,
            nvme_error_stat: false,
            rdma_srq_size: 0,
            io_path_stat: false,
            allow_accel_sequence: false,
            rdma_max_cq_size: 0,
            rdma_cm_event_timeout_ms: 0,
            dhchap_digests: [
                DhchapDigest::Sha256,
                DhchapDigest::Sha384,
                DhchapDigest::Sha512,
            ]
            .into(),
            dhchap_dhgroups: [Null, Ffdhe2048, Ffdhe3072, Ffdhe4096, Ffdhe6144, Ffdhe8192].into(),
            rdma_umr_per_io: false,
            tcp_connect_timeout_ms: 0,
            enable_flush: false,
            multipath: MultipathOpts::default(),
        }
    }
}

/// SPDK's `bdev_nvme_check_io_error_resiliency_params`, with its messages:
/// the reconnect timers a controller (and `bdev_nvme_attach_controller`'s
/// per-controller override) may use.
pub fn check_io_error_resiliency(
    ctrlr_loss_timeout_sec: i32,
    reconnect_delay_sec: u32,
    fast_io_fail_timeout_sec: u32,
) -> Result<(), BdevError> {
    let fail = |m: &str| Err(BdevError::Invalid(m.into()));
    match ctrlr_loss_timeout_sec {
        i32::MIN..=-2 => fail("ctrlr_loss_timeout_sec can't be less than -1."),
        -1 => {
            if reconnect_delay_sec == 0 {
                fail("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.")
            } else if fast_io_fail_timeout_sec != 0
                && fast_io_fail_timeout_sec < reconnect_delay_sec
            {
                fail("reconnect_delay_sec can't be more than fast_io_fail_timeout_sec.")
            } else {
                Ok(())
            }
        }
        0 => {
            if reconnect_delay_sec != 0 || fast_io_fail_timeout_sec != 0 {
                fail("Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 if ctrlr_loss_timeout_sec is 0.")
            } else {
                Ok(())
            }
        }
        loss => {
            let loss = loss as u32; // positive here
            if reconnect_delay_sec == 0 {
                fail("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.")
            } else if reconnect_delay_sec > loss {
                fail("reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec.")
            } else if fast_io_fail_timeout_sec != 0
                && fast_io_fail_timeout_sec < reconnect_delay_sec
            {
                fail("reconnect_delay_sec can't be more than fast_io_fail_timeout_sec.")
            } else if fast_io_fail_timeout_sec > loss {
                fail("fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec.")
            } else {
                Ok(())
            }
        }
    }
}

impl NvmeOptions {
    /// SPDK's `bdev_nvme_validate_opts`, checks in its order, EINVAL with
    /// its message. The keep-alive vs timeout relations only warn, as
    /// there.
    pub fn validate(&self) -> Result<(), BdevError> {
        if self.timeout_us == 0 && self.timeout_admin_us != 0 {
            return Err(BdevError::Invalid(
                "Can't have (timeout_us == 0) with (timeout_admin_us > 0)".into(),
            ));
        }
        let kato_us = u64::from(self.keep_alive_timeout_ms) * 1000;
        for (name, t) in [
            ("timeout_us", self.timeout_us),
            ("timeout_admin_us", self.timeout_admin_us),
        ] {
            if t != 0 && kato_us > t {
                log::warn!(
                    "keep_alive_timeout_ms {} should be less than {name} {t}",
                    self.keep_alive_timeout_ms
                );
            }
        }
        if self.bdev_retry_count < -1 {
            return Err(BdevError::Invalid(
                "bdev_retry_count can't be less than -1.".into(),
            ));
        }
        check_io_error_resiliency(
            self.ctrlr_loss_timeout_sec,
            self.reconnect_delay_sec,
            self.fast_io_fail_timeout_sec,
        )?;
        let m = &self.multipath;
        if m.policy == MultipathPolicy::ActiveActive
            && m.selector == MultipathSelector::RoundRobin
            && m.min_io == 0
        {
            return Err(BdevError::Invalid("min_io must be non-zero.".into()));
        }
        Ok(())
    }
}

/// The hotplug poller's setting. Serialises to SPDK's
/// `bdev_nvme_set_hotplug` params (`period_us`, then `enable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Hotplug {
    pub period_us: u64,
    #[serde(rename = "enable")]
    pub enabled: bool,
}

impl Default for Hotplug {
    fn default() -> Hotplug {
        Hotplug {
            period_us: HOTPLUG_POLL_PERIOD_DEFAULT_US,
            enabled: false,
        }
    }
}

impl Hotplug {
    /// SPDK's `bdev_nvme_set_hotplug`: 0 means the default period, longer
    /// than the maximum is clamped. (There hotplug watches the PCIe bus; an
    /// NVMe/TCP initiator has no bus to watch, so it is only kept.)
    pub fn new(enabled: bool, period_us: u64) -> Hotplug {
        let period_us = match period_us {
            0 => HOTPLUG_POLL_PERIOD_DEFAULT_US,
            p => p.min(HOTPLUG_POLL_PERIOD_MAX_US),
        };
        Hotplug { period_us, enabled }
    }
}

#[derive(Default)]
struct State {
    options: NvmeOptions,
    hotplug: Hotplug,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    assert!(
        reactor::is_main_core(),
        "nvme module options are owned by the main reactor"
    );
    STATE.with(|s| f(s.borrow_mut().get_or_insert_with(State::default)))
}

/// The options in force; what a controller attached now starts from.
pub fn current() -> NvmeOptions {
    with_state(|s| s.options.clone())
}

/// The hotplug setting in force.
pub fn hotplug() -> Hotplug {
    with_state(|s| s.hotplug)
}

/// Replaces the options: validated first, then refused with EPERM if a
/// controller exists (SPDK's order: a bad combination is EINVAL even
/// then). On error nothing changes.
pub fn set(new: NvmeOptions) -> Result<(), SetError> {
    admit(&new, super::controllers_attached())?;
    with_state(|s| s.options = new);
    Ok(())
}

fn admit(new: &NvmeOptions, controllers_attached: bool) -> Result<(), SetError> {
    new.validate().map_err(SetError::Invalid)?;
    if controllers_attached {
        return Err(SetError::ControllersAttached);
    }
    Ok(())
}

pub fn set_hotplug(h: Hotplug) {
    with_state(|s| s.hotplug = h);
}

/// Why [`set`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    Invalid(BdevError),
    /// EPERM: the options are read at attach, so they are frozen while any
    /// controller exists.
    ControllersAttached,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longhorn_values_are_valid() {
        let o = NvmeOptions {
            ctrlr_loss_timeout_sec: 15,
            reconnect_delay_sec: 2,
            fast_io_fail_timeout_sec: 10,
            transport_ack_timeout: 10,
            keep_alive_timeout_ms: 10_000,
            ..Default::default()
        };
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(NvmeOptions::default().validate(), Ok(()));
    }

    #[test]
    fn resiliency_rules_are_spdks() {
        let bad = |l, r, f| check_io_error_resiliency(l, r, f).unwrap_err();
        let msg = |e: BdevError| e.detail().unwrap().to_string();
        assert!(msg(bad(-2, 1, 0)).contains("less than -1"));
        assert!(msg(bad(-1, 0, 0)).contains("reconnect_delay_sec can't be 0"));
        assert!(msg(bad(-1, 5, 3)).contains("more than fast_io_fail"));
        assert!(msg(bad(0, 1, 0)).contains("must be 0"));
        assert!(msg(bad(0, 0, 1)).contains("must be 0"));
        assert!(msg(bad(10, 0, 0)).contains("can't be 0"));
        assert!(msg(bad(10, 11, 0)).contains("more than ctrlr_loss"));
        assert!(msg(bad(10, 5, 4)).contains("more than fast_io_fail"));
        assert!(msg(bad(10, 5, 11)).contains("fast_io_fail_timeout_sec can't be more"));
        for ok in [
            (0, 0, 0),
            (-1, 1, 0),
            (-1, 2, 2),
            (-1, 2, 100),
            (10, 10, 10),
            (10, 1, 0),
            (15, 2, 10),
        ] {
            assert_eq!(
                check_io_error_resiliency(ok.0, ok.1, ok.2),
                Ok(()),
                "{ok:?}"
            );
        }
    }

    #[test]
    fn other_checks() {
        let o = NvmeOptions {
            timeout_admin_us: 5,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        let o = NvmeOptions {
            timeout_us: 5,
            timeout_admin_us: 5,
            ..Default::default()
        };
        assert_eq!(o.validate(), Ok(()));
        let o = NvmeOptions {
            bdev_retry_count: -2,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        let mut o = NvmeOptions::default();
        o.multipath.policy = MultipathPolicy::ActiveActive;
        o.multipath.min_io = 0;
        assert!(o.validate().is_err());
        o.multipath.selector = MultipathSelector::QueueDepth;
        assert_eq!(o.validate(), Ok(()));
    }

    #[test]
    fn refused_once_a_controller_exists_but_bad_input_is_einval_first() {
        let good = NvmeOptions::default();
        assert_eq!(admit(&good, false), Ok(()));
        assert_eq!(admit(&good, true), Err(SetError::ControllersAttached));
        let bad = NvmeOptions {
            bdev_retry_count: -5,
            ..Default::default()
        };
        assert!(matches!(admit(&bad, true), Err(SetError::Invalid(_))));
    }

    #[test]
    fn hotplug_period_is_normalised() {
        assert_eq!(
            Hotplug::new(true, 0).period_us,
            HOTPLUG_POLL_PERIOD_DEFAULT_US
        );
        assert_eq!(Hotplug::new(true, 7).period_us, 7);
        assert_eq!(
            Hotplug::new(false, u64::MAX).period_us,
            HOTPLUG_POLL_PERIOD_MAX_US
        );
    }

    #[test]
    fn serialises_in_spdks_shape() {
        let v = serde_json::to_value(NvmeOptions::default()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 33);
        assert_eq!(keys[0], "action_on_timeout");
        assert_eq!(keys[32], "multipath_opts");
        assert_eq!(v["action_on_timeout"], "none");
        assert_eq!(
            v["dhchap_digests"],
            serde_json::json!(["sha256", "sha384", "sha512"])
        );
        assert_eq!(v["dhchap_dhgroups"][0], "null");
        assert_eq!(
            v["multipath_opts"],
            serde_json::json!({"policy": "active_passive"})
        );
        let mut o = NvmeOptions::default();
        o.multipath.policy = MultipathPolicy::ActiveActive;
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(
            v["multipath_opts"],
            serde_json::json!({"policy": "active_active", "selector": "round_robin", "min_io": 1})
        );
        assert_eq!(
            serde_json::to_value(Hotplug::default())
                .unwrap()
                .to_string(),
            r#"{"period_us":100000,"enable":false}"#
        );
    }
}
