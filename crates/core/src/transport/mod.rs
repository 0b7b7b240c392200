//! Transport: mounting, the FUSE INIT handshake, `/dev/fuse` queues and their threads, draining
//! and halting. The only layer that talks to the kernel (through `crate::sys`).

mod buffer;
mod executor;
mod idle_poll;
pub mod mount;
pub mod queue;
mod reply;
pub mod ring_queue;
pub mod session;

pub use session::{
    IoUringMode, PassthroughMode, Session, SessionConfig, SessionEvent, MAX_TRANSFER,
};
