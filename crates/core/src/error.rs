//! Setup errors of the core. Each variant has a stable code that the JS boundary exposes.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open source {path}: {source}")]
    SourceOpen { path: PathBuf, source: std::io::Error },
    #[error("mountpoint {0} does not exist")]
    MountpointNotFound(PathBuf),
    #[error("mountpoint {0} is not a regular file")]
    MountpointNotFile(PathBuf),
    #[error("mountpoint {0} {1}")]
    MountpointInUse(PathBuf, &'static str),
    #[error("{0}")]
    FuseDevice(String),
    #[error("{0}")]
    Mount(String),
    #[error("FUSE INIT failed: {0}")]
    Init(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Unmount(String),
    /// FUSE-over-io_uring was required (or chosen) but cannot be used.
    #[error("FUSE-over-io_uring: {0}")]
    IoUring(String),
    /// FUSE passthrough was required but cannot be used.
    #[error("FUSE passthrough: {0}")]
    Passthrough(String),
    #[error("{0}")]
    Internal(String),
    /// The image cannot be served as asked, for a reason with its own code (`IMAGE_LOCKED`,
    /// `IMAGE_TOO_LARGE`, `IMAGE_DIRTY`, `IMAGE_CORRUPT`); the message names the image.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    /// An NBD source's URI cannot be used.
    #[error("invalid NBD URI: {0}")]
    NbdUri(String),
    /// The NBD server cannot be reached (refused, unreachable, timed out).
    #[error("{0}")]
    NbdConnect(String),
    /// The NBD server has no such export.
    #[error("{0}")]
    NbdExportNotFound(String),
    /// TLS with the NBD server failed (files, certificates, server requires TLS).
    #[error("{0}")]
    NbdTls(String),
    /// The NBD server broke or refused the handshake.
    #[error("{0}")]
    NbdHandshake(String),
    /// A writable export of a read-only NBD export.
    #[error("{0}")]
    NbdReadOnly(String),
}

impl Error {
    /// The stable code JS sees as `err.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::SourceOpen { .. } => "SOURCE_OPEN_FAILED",
            Error::MountpointNotFound(_) => "MOUNTPOINT_NOT_FOUND",
            Error::MountpointNotFile(_) => "MOUNTPOINT_NOT_FILE",
            Error::MountpointInUse(..) => "MOUNTPOINT_IN_USE",
            Error::FuseDevice(_) => "FUSE_DEVICE_FAILED",
            Error::Mount(_) => "MOUNT_FAILED",
            Error::Init(_) => "INIT_FAILED",
            Error::InvalidConfig(_) => "INVALID_CONFIG",
            Error::Unmount(_) => "CLOSE_FAILED",
            Error::IoUring(_) => "IO_URING_UNAVAILABLE",
            Error::Passthrough(_) => "PASSTHROUGH_UNAVAILABLE",
            Error::Internal(_) => "INTERNAL",
            Error::Refused { code, .. } => code,
            Error::NbdUri(_) => "NBD_URI_INVALID",
            Error::NbdConnect(_) => "NBD_CONNECT_FAILED",
            Error::NbdExportNotFound(_) => "NBD_EXPORT_NOT_FOUND",
            Error::NbdTls(_) => "NBD_TLS_FAILED",
            Error::NbdHandshake(_) => "NBD_HANDSHAKE_FAILED",
            Error::NbdReadOnly(_) => "NBD_READ_ONLY",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
