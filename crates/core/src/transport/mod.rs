//! Transport: mounting, the FUSE INIT handshake, `/dev/fuse` queues and their threads, draining
//! and halting. The only layer that talks to the kernel (through `crate::sys`).

mod buffer;
pub mod mount;
pub mod queue;
pub mod session;

pub use session::{Session, SessionConfig, SessionEvent, MAX_TRANSFER};
