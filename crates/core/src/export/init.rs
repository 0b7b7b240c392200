//! FUSE_INIT negotiation: which protocol version and features we agree on with the kernel.

use crate::protocol::abi::{
    init_flags::*, init_flags2::*, KERNEL_MINOR_VERSION, KERNEL_VERSION, MIN_KERNEL_MINOR_VERSION,
};
use crate::protocol::encode::InitOut;

/// What we would like; the kernel's offer may lower it.
#[derive(Debug, Clone, Copy)]
pub struct InitLimits {
    /// Largest WRITE we can take in one request (our receive buffers are sized for it).
    pub max_write: u32,
    pub page_size: u32,
    /// Ask for FUSE-over-io_uring if the kernel offers it.
    pub io_uring: bool,
    /// Ask for FUSE_PASSTHROUGH if the kernel offers it.
    pub passthrough: bool,
}

/// The agreed parameters the transport needs after INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub minor: u32,
    pub flags: u32,
    pub max_write: u32,
    /// FUSE-over-io_uring was agreed: requests arrive through ring entries once registered.
    pub io_uring: bool,
    /// FUSE_PASSTHROUGH was agreed: opens may name a registered backing file.
    pub passthrough: bool,
}

/// Pages in one request without FUSE_MAX_PAGES (`FUSE_DEFAULT_MAX_PAGES_PER_REQ`).
const DEFAULT_MAX_PAGES: u32 = 32;

/// Answers the kernel's INIT. Errors carry the reason to log; the caller replies EINVAL then.
pub fn negotiate_init(
    major: u32,
    minor: u32,
    max_readahead: u32,
    kernel_flags: u32,
    kernel_flags2: u32,
    limits: InitLimits,
) -> Result<(InitOut, Negotiated), String> {
    if major != KERNEL_VERSION {
        return Err(format!(
            "FUSE major version mismatch: we speak {KERNEL_VERSION}, the kernel {major}"
        ));
    }
    if minor < MIN_KERNEL_MINOR_VERSION {
        return Err(format!(
            "FUSE protocol 7.{minor} is too old: 7.{MIN_KERNEL_MINOR_VERSION} or newer is required"
        ));
    }
    // ASYNC_READ and ASYNC_DIO let the kernel keep many reads/direct I/Os of one file in flight;
    // BIG_WRITES and MAX_PAGES let a write be larger than a page / 128 KiB.
    let wanted = FUSE_ASYNC_READ | FUSE_ASYNC_DIO | FUSE_BIG_WRITES | FUSE_MAX_PAGES;
    let flags = kernel_flags & wanted;
    let page = limits.page_size.max(4096);
    let max_write = if flags & FUSE_MAX_PAGES != 0 {
        limits.max_write
    } else {
        limits.max_write.min(DEFAULT_MAX_PAGES * page)
    };
    let minor = minor.min(KERNEL_MINOR_VERSION);
    // The kernel offers FUSE_OVER_IO_URING (in flags2, so with INIT_EXT) only while its
    // `enable_uring` parameter is on; 7.42 defined the ring entries' layout.
    let ext = kernel_flags & FUSE_INIT_EXT != 0;
    let io_uring = limits.io_uring && ext && minor >= 42 && kernel_flags2 & FUSE_OVER_IO_URING != 0;
    // Every open is FOPEN_DIRECT_IO; without DIRECT_IO_ALLOW_MMAP (7.39, Linux 6.6) the kernel
    // refuses mmap(MAP_SHARED) of such a file with ENODEV. With it, the kernel serves a mapping
    // from the page cache (READ/WRITE requests to us) and keeps it coherent with direct I/O.
    let allow_mmap = ext && minor >= 39 && kernel_flags2 & FUSE_DIRECT_IO_ALLOW_MMAP != 0;
    // 7.40 (Linux 6.9) defined passthrough and `max_stack_depth`; our backing file is the
    // image, on a file system that is not itself stacked (the kernel refuses deeper ones).
    let passthrough =
        limits.passthrough && ext && minor >= 40 && kernel_flags2 & FUSE_PASSTHROUGH != 0;
    let flags2 = if io_uring { FUSE_OVER_IO_URING } else { 0 }
        | if allow_mmap { FUSE_DIRECT_IO_ALLOW_MMAP } else { 0 }
        | if passthrough { FUSE_PASSTHROUGH } else { 0 };
    let flags = if flags2 != 0 { flags | FUSE_INIT_EXT } else { flags };
    let out = InitOut {
        major: KERNEL_VERSION,
        minor,
        max_readahead,
        flags,
        // libfuse's maximum, and its default ratio for the congestion threshold.
        max_background: u16::MAX,
        congestion_threshold: (u16::MAX as u32 * 3 / 4) as u16,
        max_write,
        time_gran: 1,
        max_pages: max_write.div_ceil(page).min(u16::MAX as u32) as u16,
        flags2,
        max_stack_depth: u32::from(passthrough),
    };
    Ok((out, Negotiated { minor, flags, max_write, io_uring, passthrough }))
}
