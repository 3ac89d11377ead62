//! The bdev layer's error type. Every variant maps to the errno SPDK would
//! return, so RPC replies carry the codes SPDK clients expect; the message
//! is the `strerror` text, which is what SPDK puts on the wire.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevError {
    /// EEXIST: a bdev, alias or UUID of that name exists or is being created.
    Exists(String),
    /// ENODEV: no such bdev (or not one owned by the module asked).
    NoDevice(String),
    /// EBUSY: in use (open for write, claimed, being deleted).
    Busy(String),
    /// EPERM: already claimed by another module.
    Claimed(String),
    /// EINVAL: a parameter out of range.
    Invalid(String),
    /// ENOMEM: allocation failed.
    NoMemory,
    /// ENOSPC
    NoSpace,
    /// ECANCELED: the operation was cancelled.
    Cancelled,
    /// EIO: the I/O failed.
    Io,
    /// ENOTSUP: the bdev does not support this I/O type.
    NotSupported,
    /// ENOENT
    NotFound(String),
    /// ESHUTDOWN: the reactor set is stopping.
    ShuttingDown,
}

impl BdevError {
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::Exists(_) => libc::EEXIST,
            BdevError::NoDevice(_) => libc::ENODEV,
            BdevError::Busy(_) => libc::EBUSY,
            BdevError::Claimed(_) => libc::EPERM,
            BdevError::Invalid(_) => libc::EINVAL,
            BdevError::NoMemory => libc::ENOMEM,
            BdevError::NoSpace => libc::ENOSPC,
            BdevError::Cancelled => libc::ECANCELED,
            BdevError::Io => libc::EIO,
            BdevError::NotSupported => libc::ENOTSUP,
            BdevError::NotFound(_) => libc::ENOENT,
            BdevError::ShuttingDown => libc::ESHUTDOWN,
        }
    }

    /// The detail behind the errno, for logs.
    pub fn detail(&self) -> Option<&str> {
        match self {
            BdevError::Exists(s)
            | BdevError::NoDevice(s)
            | BdevError::Busy(s)
            | BdevError::Claimed(s)
            | BdevError::Invalid(s)
            | BdevError::NotFound(s) => Some(s),
            _ => None,
        }
    }
}

/// glibc's `strerror` text for `errno`.
pub fn strerror(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "Operation not permitted",
        libc::ENOENT => "No such file or directory",
        libc::ESRCH => "No such process",
        libc::EIO => "Input/output error",
        libc::ENOMEM => "Cannot allocate memory",
        libc::EBUSY => "Device or resource busy",
        libc::EEXIST => "File exists",
        libc::ENODEV => "No such device",
        libc::EINVAL => "Invalid argument",
        libc::ENOSPC => "No space left on device",
        libc::ENOTSUP => "Operation not supported",
        libc::EALREADY => "Operation already in progress",
        libc::ECANCELED => "Operation canceled",
        libc::ESHUTDOWN => "Cannot send after transport endpoint shutdown",
        libc::ETIMEDOUT => "Connection timed out",
        _ => "Unknown error",
    }
}

/// Displays as the `strerror` text, which is what goes on the wire.
impl fmt::Display for BdevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(strerror(self.errno()))
    }
}

impl std::error::Error for BdevError {}

pub type Result<T, E = BdevError> = std::result::Result<T, E>;
