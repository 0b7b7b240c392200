//! blockfuse-core: serves a disk image as one regular file over FUSE, speaking the `/dev/fuse`
//! protocol itself (no libfuse, no fuser in the request path).
//!
//! Layers, dependencies pointing down: `transport` (mount, queues) → `export` (per-op semantics)
//! → `protocol` (pure ABI, decoding, encoding) and `backend` (the image). `sys` holds every raw
//! syscall and all of the crate's `unsafe`.

mod aligned;
pub mod backend;
pub mod config;
pub mod error;
pub mod export;
pub mod layers;
pub mod protocol;
mod sys;
pub mod transport;

pub use error::{Error, Result};
