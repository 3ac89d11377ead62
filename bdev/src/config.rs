//! JSON configuration load (`-c FILE` of the target, bdevperf's `-c`): SPDK's `{"subsystems": [{
//! "subsystem": .., "config": [{"method": .., "params": ..}, ..]}]}`,
//! comments allowed, replayed through the RPC method table in file order.
//!
//! A create that fails with ENODEV (its base not made yet, as in a config
//! SPDK wrote with virtual bdevs before their bases) is retried after the
//! rest, until a pass makes no progress.

use std::path::Path;

use crate::rpc::{RpcError, RpcState, RpcTable};
use serde_json::Value;

#[derive(Debug)]
pub struct ConfigEntry {
    pub subsystem: String,
    pub method: String,
    pub params: Option<Value>,
}

/// Removes `//` and `/* */` comments outside strings.
fn strip_comments(s: &str) -> String {
    let b = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(s.len());
    let (mut i, mut in_str, mut esc) = (0, false, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
            out.push(b' ');
            continue;
        }
        out.push(c);
        i += 1;
    }
    // Only whole ASCII comment sequences were removed, so this stays UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// Parses a configuration document into its entries, in order.
pub fn parse(text: &str) -> Result<Vec<ConfigEntry>, String> {
    let root: Value = serde_json::from_str(&strip_comments(text))
        .map_err(|e| format!("invalid JSON configuration: {e}"))?;
    let obj = root
        .as_object()
        .ok_or("Invalid JSON configuration: not enclosed in {}.")?;
    let Some(subsystems) = obj.get("subsystems") else {
        log::warn!("no 'subsystems' key in the JSON configuration");
        return Ok(Vec::new());
    };
    let subsystems = subsystems
        .as_array()
        .ok_or("Invalid JSON configuration: 'subsystems' should be an array.")?;
    let mut out = Vec::new();
    for (i, s) in subsystems.iter().enumerate() {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("subsystems[{i}]: 'subsystem' must be a string"))?;
        let config = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(format!("subsystem {name}: 'config' must be an array")),
        };
        for (j, e) in config.iter().enumerate() {
            // `with_batches` output nests arrays of entries.
            let items: Vec<&Value> = match e {
                Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            for e in items {
                let method = e
                    .get("method")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{name}.config[{j}]: 'method' must be a string"))?;
                let params = match e.get("params") {
                    None | Some(Value::Null) => None,
                    Some(p @ Value::Object(_)) => Some(p.clone()),
                    Some(_) => {
                        return Err(format!(
                            "{name}.config[{j}] ({method}): 'params' must be an object"
                        ))
                    }
                };
                out.push(ConfigEntry {
                    subsystem: name.to_string(),
                    method: method.to_string(),
                    params,
                });
            }
        }
    }
    Ok(out)
}

pub fn read(path: &Path) -> Result<Vec<ConfigEntry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Applies the entries allowed in `state`; returns those it skipped
/// (not allowed in this state). Stops at the first error unless
/// `ignore_errors`.
pub async fn apply(
    table: &RpcTable,
    entries: Vec<ConfigEntry>,
    state: RpcState,
    ignore_errors: bool,
) -> Result<Vec<ConfigEntry>, String> {
    let mut skipped = Vec::new();
    let mut pending: Vec<ConfigEntry> = Vec::new();
    for e in entries {
        if !table.contains(&e.method) {
            return Err(format!("Method '{}' was not found", e.method));
        }
        match table.call(&e.method, e.params.clone(), state).await {
            Ok(_) => {}
            Err(err) if err.code == crate::rpc::INVALID_STATE => skipped.push(e),
            Err(err) if err.code == -libc::ENODEV => pending.push(e),
            Err(err) => fail(&e, err, ignore_errors)?,
        }
    }
    // Retry entries whose base was not there yet, while that helps.
    while !pending.is_empty() {
        let before = pending.len();
        let mut still = Vec::new();
        let mut last_err = None;
        for e in pending {
            match table.call(&e.method, e.params.clone(), state).await {
                Ok(_) => {}
                Err(err) if err.code == -libc::ENODEV => {
                    last_err = Some(err);
                    still.push(e)
                }
                Err(err) => fail(&e, err, ignore_errors)?,
            }
        }
        if still.len() == before {
            for e in &still {
                fail(
                    e,
                    last_err
                        .clone()
                        .unwrap_or_else(|| RpcError::new(-libc::ENODEV, "No such device")),
                    ignore_errors,
                )?;
            }
            break;
        }
        pending = still;
    }
    Ok(skipped)
}

fn fail(e: &ConfigEntry, err: RpcError, ignore: bool) -> Result<(), String> {
    let msg = format!(
        "config {} entry {} failed: {} (code {})",
        e.subsystem, e.method, err.message, err.code
    );
    if ignore {
        log::warn!("{msg}");
        Ok(())
    } else {
        Err(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_shaped_config_with_comments() {
        let text = r#"{
          // written by save_config
          "subsystems": [
            {"subsystem": "accel", "config": null},
            {"subsystem": "bdev", "config": [
              {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
              /* a RAM disk */
              {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8, "block_size": 512, "note": "a // not a comment"}},
              {"method": "bdev_wait_for_examine"}
            ]}
          ]
        }"#;
        let e = parse(text).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].method, "bdev_malloc_create");
        assert_eq!(e[1].params.as_ref().unwrap()["note"], "a // not a comment");
        assert!(e[2].params.is_none());
    }

    #[test]
    fn rejects_bad_shapes_with_a_reason() {
        assert!(parse("[]").unwrap_err().contains("not enclosed"));
        assert!(parse(r#"{"subsystems": 3}"#).unwrap_err().contains("array"));
        assert!(
            parse(r#"{"subsystems": [{"subsystem": "bdev", "config": [{"params": {}}]}]}"#)
                .unwrap_err()
                .contains("method")
        );
        assert!(parse(
            r#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "x", "params": [1]}]}]}"#
        )
        .unwrap_err()
        .contains("params"));
        assert!(parse("{").is_err());
    }
}
