//! The `nvme` bdev module's RPC methods with SPDK's names, parameters and
//! errors, and its part of the bdev subsystem's `save_config`.
//!
//! `bdev_nvme_set_options` is applied over the options in force, as SPDK's
//! handler starts from `spdk_bdev_nvme_get_opts`: a key left out keeps its
//! current value, and the result as a whole is validated. Unknown keys,
//! wrong types, out-of-range integers and `null` values are refused with
//! -32602 naming the parameter, before anything is checked or changed.

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use bdev::rpc::{RpcError, RpcTable, StateMask};

use super::options::{
    self, DhchapDhgroup, DhchapDigest, Hotplug, MultipathPolicy, MultipathSelector, NvmeOptions,
    SetError, TimeoutAction, DHCHAP_LIST_MAX,
};

/// SPDK's reply when options change under attached controllers.
pub const CONTROLLERS_ATTACHED_MSG: &str =
    "RPC not permitted with nvme controllers already attached";

/// A key that is present must hold a value of its type: SPDK's decoders
/// refuse `null` where they expect a number, string or bool.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// At most [`DHCHAP_LIST_MAX`] entries, as SPDK's array decoder; the list
/// replaces the set (it is not added to it).
fn dhchap_list<'de, D: Deserializer<'de>, T: Deserialize<'de> + Ord>(
    d: D,
) -> Result<Option<BTreeSet<T>>, D::Error> {
    let v = Vec::<T>::deserialize(d)?;
    if v.len() > DHCHAP_LIST_MAX {
        return Err(serde::de::Error::custom(format!(
            "at most {DHCHAP_LIST_MAX} entries"
        )));
    }
    Ok(Some(v.into_iter().collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MultipathParams {
    #[serde(default, deserialize_with = "present")]
    policy: Option<MultipathPolicy>,
    #[serde(default, deserialize_with = "present")]
    selector: Option<MultipathSelector>,
    #[serde(default, deserialize_with = "present")]
    min_io: Option<u32>,
}

/// Declares the `bdev_nvme_set_options` params (every key optional, typed
/// as SPDK's decoder) and how they lay over [`NvmeOptions`].
macro_rules! set_options_params {
    ($($field:ident: $ty:ty),* $(,)?) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SetOptionsParams {
            $(
                #[serde(default, deserialize_with = "present")]
                $field: Option<$ty>,
            )*
            #[serde(default, deserialize_with = "dhchap_list")]
            dhchap_digests: Option<BTreeSet<DhchapDigest>>,
            #[serde(default, deserialize_with = "dhchap_list")]
            dhchap_dhgroups: Option<BTreeSet<DhchapDhgroup>>,
            #[serde(default, deserialize_with = "present")]
            multipath_opts: Option<MultipathParams>,
        }

        impl SetOptionsParams {
            fn apply(self, o: &mut NvmeOptions) {
                $(
                    if let Some(v) = self.$field {
                        o.$field = v;
                    }
                )*
                if let Some(v) = self.dhchap_digests {
                    o.dhchap_digests = v;
                }
                if let Some(v) = self.dhchap_dhgroups {
                    o.dhchap_dhgroups = v;
                }
                if let Some(m) = self.multipath_opts {
                    if let Some(v) = m.policy {
                        o.multipath.policy = v;
                    }
                    if let Some(v) = m.selector {
                        o.multipath.selector = v;
                    }
                    if let Some(v) = m.min_io {
                        o.multipath.min_io = v;
                    }
                }
            }
        }
    };
}

set_options_params! {
    action_on_timeout: TimeoutAction,
    keep_alive_timeout_ms: u32,
    timeout_us: u64,
    timeout_admin_us: u64,
    arbitration_burst: u32,
    low_priority_weight: u32,
    medium_priority_weight: u32,
    high_priority_weight: u32,
    io_queue_requests: u32,
    nvme_adminq_poll_period_us: u64,
    nvme_ioq_poll_period_us: u64,
    delay_cmd_submit: bool,
    transport_retry_count: u32,
    bdev_retry_count: i32,
    ctrlr_loss_timeout_sec: i32,
    reconnect_delay_sec: u32,
    fast_io_fail_timeout_sec: u32,
    transport_ack_timeout: u8,
    disable_auto_failback: bool,
    generate_uuids: bool,
    transport_tos: u8,
    nvme_error_stat: bool,
    io_path_stat: bool,
    allow_accel_sequence: bool,
    rdma_srq_size: u32,
    rdma_max_cq_size: u32,
    rdma_cm_event_timeout_ms: u16,
    rdma_umr_per_io: bool,
    tcp_connect_timeout_ms: u32,
    enable_flush: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetHotplugParams {
    enable: bool,
    #[serde(default)]
    period_us: u64,
}

fn set_options(p: SetOptionsParams) -> Result<Value, RpcError> {
    let mut new = options::current();
    p.apply(&mut new);
    match options::set(new) {
        Ok(()) => Ok(json!(true)),
        Err(SetError::Invalid(e)) => Err(e.into()),
        Err(SetError::ControllersAttached) => {
            Err(RpcError::new(-libc::EPERM, CONTROLLERS_ATTACHED_MSG))
        }
    }
}

/// The module's entries in the bdev subsystem's `save_config`, as SPDK's
/// `bdev_nvme_config_json` writes them: the options first (attach calls,
/// issue 13, will follow them), hotplug last so every controller exists
/// before the poller starts.
pub fn config_json() -> Vec<Value> {
    vec![
        json!({"method": "bdev_nvme_set_options", "params": options::current()}),
        json!({"method": "bdev_nvme_set_hotplug", "params": options::hotplug()}),
    ]
}

pub fn register(table: &mut RpcTable) {
    // SPDK allows this before framework_start_init too, so a saved config
    // sets the options before anything attaches.
    table.register_with(
        "bdev_nvme_set_options",
        StateMask::ANY,
        |p: SetOptionsParams| async move { set_options(p) },
    );
    table.register_with(
        "bdev_nvme_set_hotplug",
        StateMask::RUNTIME,
        |p: SetHotplugParams| async move {
            options::set_hotplug(Hotplug::new(p.enable, p.period_us));
            Ok(json!(true))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(v: Value) -> Result<SetOptionsParams, RpcError> {
        bdev::rpc::decode_params(Some(v))
    }

    /// What save_config writes decodes as params and lays over other
    /// options to give the same options back: the two cannot drift.
    #[test]
    fn saved_params_round_trip() {
        let mut o = NvmeOptions {
            action_on_timeout: TimeoutAction::Abort,
            keep_alive_timeout_ms: 1,
            timeout_us: 2,
            timeout_admin_us: 3,
            arbitration_burst: 4,
            low_priority_weight: 5,
            medium_priority_weight: 6,
            high_priority_weight: 7,
            io_queue_requests: 8,
            nvme_adminq_poll_period_us: 9,
            nvme_ioq_poll_period_us: 10,
            delay_cmd_submit: false,
            transport_retry_count: 11,
            bdev_retry_count: -1,
            ctrlr_loss_timeout_sec: -1,
            reconnect_delay_sec: 12,
            fast_io_fail_timeout_sec: 13,
            transport_ack_timeout: 14,
            disable_auto_failback: true,
            generate_uuids: true,
            transport_tos: 15,
            nvme_error_stat: true,
            io_path_stat: true,
            allow_accel_sequence: true,
            rdma_srq_size: 16,
            rdma_max_cq_size: 17,
            rdma_cm_event_timeout_ms: 18,
            dhchap_digests: [DhchapDigest::Sha512].into(),
            dhchap_dhgroups: [DhchapDhgroup::Ffdhe8192, DhchapDhgroup::Null].into(),
            rdma_umr_per_io: true,
            tcp_connect_timeout_ms: 19,
            enable_flush: true,
            ..Default::default()
        };
        o.multipath.policy = MultipathPolicy::ActiveActive;
        o.multipath.min_io = 20;
        let saved = serde_json::to_value(&o).unwrap();
        let mut back = NvmeOptions::default();
        decode(saved).unwrap().apply(&mut back);
        assert_eq!(back, o);
        assert_eq!(back.validate(), Ok(()));
    }

    #[test]
    fn decoding_is_strict() {
        let msg = |v: Value| decode(v).err().unwrap();
        let e = msg(json!({"ctrlr_loss_timeout_sec": 15, "no_such_option": 1}));
        assert_eq!(e.code, bdev::rpc::INVALID_PARAMS);
        assert!(e.message.contains("no_such_option"), "{e}");
        for (v, key) in [
            (
                json!({"transport_ack_timeout": 256}),
                "transport_ack_timeout",
            ),
            (json!({"reconnect_delay_sec": -1}), "reconnect_delay_sec"),
            (
                json!({"keep_alive_timeout_ms": null}),
                "keep_alive_timeout_ms",
            ),
            (
                json!({"keep_alive_timeout_ms": "10"}),
                "keep_alive_timeout_ms",
            ),
            (
                json!({"ctrlr_loss_timeout_sec": 1.5}),
                "ctrlr_loss_timeout_sec",
            ),
            (json!({"action_on_timeout": "explode"}), "action_on_timeout"),
            (json!({"dhchap_digests": ["md5"]}), "dhchap_digests"),
            (
                json!({"dhchap_dhgroups": vec!["null"; 33]}),
                "dhchap_dhgroups",
            ),
            (
                json!({"multipath_opts": {"policy": "active_active", "x": 1}}),
                "multipath_opts",
            ),
        ] {
            let e = msg(v.clone());
            assert_eq!(e.code, bdev::rpc::INVALID_PARAMS, "{v}");
            assert!(e.message.contains(key), "{v}: {e}");
        }
    }

    #[test]
    fn absent_keys_keep_current_values() {
        let mut o = NvmeOptions {
            ctrlr_loss_timeout_sec: 15,
            reconnect_delay_sec: 2,
            ..Default::default()
        };
        decode(
            json!({"fast_io_fail_timeout_sec": 10, "multipath_opts": {"policy": "active_active"}}),
        )
        .unwrap()
        .apply(&mut o);
        assert_eq!(
            (
                o.ctrlr_loss_timeout_sec,
                o.reconnect_delay_sec,
                o.fast_io_fail_timeout_sec
            ),
            (15, 2, 10)
        );
        assert_eq!(o.multipath.selector, MultipathSelector::RoundRobin);
        assert_eq!(o.multipath.min_io, 1);
        // An empty DH-HMAC-CHAP list clears the set, as SPDK's mask.
        decode(json!({"dhchap_digests": []})).unwrap().apply(&mut o);
        assert!(o.dhchap_digests.is_empty());
    }
}
