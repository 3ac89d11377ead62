//! The JSON-RPC method table shared by every crate that registers methods.
//!
//! `src/` owns the socket, framing and dispatch; crates register handlers
//! here (each module from its own `rpc.rs`). The table lives in `bdev`, the
//! lowest crate that registers methods, so no crate depends upward.
//!
//! Errors follow SPDK: protocol faults use JSON-RPC codes, operation
//! failures use the negative errno with its `strerror` text. Unlike SPDK
//! (which answers `-32603 "spdk_json_decode_object failed"`), parameter
//! decode failures are `-32602` and name the offending parameter.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::BdevError;

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;
/// SPDK's `SPDK_JSONRPC_ERROR_INVALID_STATE`.
pub const INVALID_STATE: i32 = -1;

/// A JSON-RPC error object: `{"code": .., "message": ..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }

    pub fn method_not_found() -> RpcError {
        RpcError::new(METHOD_NOT_FOUND, "Method not found")
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

/// Code is the negative errno and the message its `strerror` text, as
/// SPDK sends; where the cause is not obvious from the errno (EINVAL,
/// EPERM, EBUSY) the detail follows after a colon.
impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> RpcError {
        let message = match (&e, e.detail()) {
            (BdevError::Invalid(_) | BdevError::Claimed(_) | BdevError::Busy(_), Some(d)) => {
                format!("{e}: {d}")
            }
            _ => e.to_string(),
        };
        RpcError::new(-e.errno(), message)
    }
}

pub type RpcResult = Result<Value, RpcError>;
pub type RpcFuture = Pin<Box<dyn Future<Output = RpcResult>>>;
type Handler = Rc<dyn Fn(Option<Value>) -> RpcFuture>;

/// SPDK's RPC states: a method may be allowed before `framework_start_init`
/// (STARTUP), after it (RUNTIME), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcState {
    Startup,
    Runtime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateMask {
    pub startup: bool,
    pub runtime: bool,
}

impl StateMask {
    pub const RUNTIME: StateMask = StateMask {
        startup: false,
        runtime: true,
    };
    pub const STARTUP: StateMask = StateMask {
        startup: true,
        runtime: false,
    };
    pub const ANY: StateMask = StateMask {
        startup: true,
        runtime: true,
    };

    pub fn allows(&self, state: RpcState) -> bool {
        match state {
            RpcState::Startup => self.startup,
            RpcState::Runtime => self.runtime,
        }
    }
}

struct Method {
    mask: StateMask,
    handler: Handler,
}

/// The method table. Built once at start-up on the main reactor.
#[derive(Default)]
pub struct RpcTable {
    methods: BTreeMap<&'static str, Method>,
}

impl RpcTable {
    pub fn new() -> RpcTable {
        RpcTable::default()
    }

    /// Registers `name`. Panics on a duplicate: that is a programming error.
    pub fn register<F, Fut>(&mut self, name: &'static str, mask: StateMask, f: F)
    where
        F: Fn(Option<Value>) -> Fut + 'static,
        Fut: Future<Output = RpcResult> + 'static,
    {
        let handler: Handler = Rc::new(move |p| Box::pin(f(p)));
        let prev = self.methods.insert(name, Method { mask, handler });
        assert!(prev.is_none(), "RPC method {name} registered twice");
    }

    /// Registers a method whose parameters are an object decoded into `P`;
    /// absent params decode from `{}` so all-optional structs work.
    pub fn register_with<P, F, Fut>(&mut self, name: &'static str, mask: StateMask, f: F)
    where
        P: DeserializeOwned + 'static,
        F: Fn(P) -> Fut + 'static,
        Fut: Future<Output = RpcResult> + 'static,
    {
        let f = Rc::new(f);
        self.register(name, mask, move |params| {
            let f = f.clone();
            async move {
                let p: P = decode_params(params)?;
                f(p).await
            }
        });
    }

    /// Registers a method that takes no parameters (SPDK rejects any).
    pub fn register_no_params<F, Fut>(&mut self, name: &'static str, mask: StateMask, f: F)
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = RpcResult> + 'static,
    {
        let f = Rc::new(f);
        self.register(name, mask, move |params| {
            let f = f.clone();
            async move {
                if params.is_some() {
                    return Err(RpcError::invalid_params(format!(
                        "{name} requires no parameters"
                    )));
                }
                f().await
            }
        });
    }

    pub fn contains(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    /// Method names, optionally only those allowed in `state`.
    pub fn names(&self, state: Option<RpcState>) -> Vec<&'static str> {
        self.methods
            .iter()
            .filter(|(_, m)| state.is_none_or(|s| m.mask.allows(s)))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Runs `name` with `params` in `state`. `params` of JSON null are
    /// treated as absent, as SPDK does.
    pub fn call(&self, name: &str, params: Option<Value>, state: RpcState) -> RpcFuture {
        let params = params.filter(|p| !p.is_null());
        match self.methods.get(name) {
            None => Box::pin(async { Err(RpcError::method_not_found()) }),
            Some(m) if !m.mask.allows(state) => {
                let msg = match state {
                    RpcState::Startup => "Method may only be called after framework is initialized using framework_start_init RPC.",
                    RpcState::Runtime => "Method may only be called before framework is initialized. Use --wait-for-rpc command line parameter and then issue this RPC before the framework_start_init RPC.",
                };
                Box::pin(async move { Err(RpcError::new(INVALID_STATE, msg)) })
            }
            Some(m) => (m.handler)(params),
        }
    }
}

/// Decodes an object of parameters, naming the offending parameter on
/// failure: `-32602 "Invalid parameters: missing field `num_blocks`"` or
/// `"... block_size: invalid type: string \"x\", expected u32"`.
pub fn decode_params<P: DeserializeOwned>(params: Option<Value>) -> Result<P, RpcError> {
    let value = match params {
        None => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => {
            return Err(RpcError::invalid_params(
                "Invalid parameters: params must be an object",
            ))
        }
    };
    serde_path_to_error::deserialize::<_, P>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            RpcError::invalid_params(format!("Invalid parameters: {inner}"))
        } else {
            RpcError::invalid_params(format!("Invalid parameters: {path}: {inner}"))
        }
    })
}

/// Converts a serializable result into a JSON value.
pub fn to_value<T: serde::Serialize>(v: T) -> RpcResult {
    serde_json::to_value(v).map_err(|e| RpcError::new(INTERNAL_ERROR, e.to_string()))
}
