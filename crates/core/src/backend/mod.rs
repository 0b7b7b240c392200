//! Block backends: what an export reads from and writes to. One trait, several implementations,
//! and an enum that dispatches without boxing so the hot path never allocates.

use std::io;

pub mod cow;
pub mod fault;
mod file_io;
pub mod layer;
pub mod lock;
mod memory;
pub mod nbd;
mod null;
pub mod partition;
pub mod probe;
mod qcow2;
mod qcow2_overlap;
mod qcow2_storage;
mod raw;
mod vmdk;

pub use cow::Cow;
pub use fault::{FaultBackend, FaultSpec};
pub use layer::Layered;
pub use lock::LockMode;
pub use memory::MemoryBackend;
pub use nbd::{NbdBackend, NbdOptions, NbdStorage};
pub use null::NullBackend;
pub use probe::ProbedRaw;
pub use qcow2::{Qcow2Backend, Qcow2Options};
pub use raw::{CacheMode, RawBackend, RawOptions};
pub use vmdk::VmdkBackend;

/// An image refused at open for a reason with its own stable code (`IMAGE_LOCKED`,
/// `IMAGE_TOO_LARGE`, ...). Travels inside an `io::Error`; [`refusal_of`] finds it again.
#[derive(Debug)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    pub fn error(code: &'static str, message: String) -> io::Error {
        io::Error::other(Refusal { code, message })
    }
}

/// The [`Refusal`] an open error carries, if any.
pub fn refusal_of(e: &io::Error) -> Option<&Refusal> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Refusal>())
}

/// Largest image size blockfuse serves: 2^53 - 1, the largest integer a JavaScript number holds
/// exactly, so sizes reach the API, the ready line and events unrounded.
pub const MAX_IMAGE_SIZE: u64 = (1 << 53) - 1;

/// Whether a range holds data or is a hole, as SEEK_DATA/SEEK_HOLE see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `[offset, offset + len)` reads as data.
    Data(u64),
    /// `[offset, offset + len)` is unallocated and reads as zeros.
    Hole(u64),
}

/// A disk image. Offsets and lengths are bytes; callers keep requests inside `len()` except for
/// the resizing calls. Futures are not required to be `Send`: each queue drives its own
/// current-thread runtime.
// `len` is the image size, not a collection length: an `is_empty` would mean nothing here.
#[allow(async_fn_in_trait, clippy::len_without_is_empty)]
pub trait BlockBackend: Send + Sync {
    /// Current size in bytes.
    fn len(&self) -> u64;
    /// Request alignment the backend needs for offsets, lengths and buffers (1 = none).
    fn alignment(&self) -> u32;
    /// Optimal transfer size (STATFS block size, GETATTR blksize); at least 512.
    fn optimal_transfer(&self) -> u32;
    /// Bytes actually allocated on the host, or None when unknown.
    fn allocated_bytes(&self) -> Option<u64>;
    /// Fills `buf` from `offset`; the range lies inside `len()`.
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; the range lies inside `len()`.
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync for files).
    async fn flush(&self) -> io::Result<()>;
    /// Resizes to `new_len`; with `preallocate`, the new range is allocated on the host.
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros; with `unmap`, deallocates it where possible.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// The extent that starts at `offset` (inside `len()`), at least one byte long.
    async fn extent_at(&self, offset: u64) -> io::Result<Extent>;
    /// Whether `write_zeroes(.., unmap = true)` really deallocates.
    fn can_unmap(&self) -> bool;
}

/// Every backend, dispatched statically.
pub enum Backend {
    Raw(RawBackend),
    Null(NullBackend),
    Memory(MemoryBackend),
    Qcow2(Qcow2Backend),
    /// A VMDK descriptor with flat extents, read-only.
    Vmdk(VmdkBackend),
    /// A disk on an NBD server.
    Nbd(NbdBackend),
    /// A raw image found by probing: first-sector writes are checked (see `probe`).
    ProbedRaw(ProbedRaw),
    /// An NBD export probed as raw: first-sector writes are checked like a file's.
    ProbedNbd(ProbedRaw<NbdBackend>),
    /// A slice of another backend and/or a snapshot overlay over it (see `layer`).
    Layered(Layered),
    /// Test only: another backend with injected errors and latency (see `fault`).
    Fault(FaultBackend),
}

impl Backend {
    /// The image format served: `raw`, `qcow2`, `vmdk` or `null` (`memory` in tests). A probed image
    /// reports what probing found.
    pub fn format_name(&self) -> &'static str {
        match self {
            Backend::Raw(_) | Backend::ProbedRaw(_) => "raw",
            Backend::Nbd(_) | Backend::ProbedNbd(_) => "raw",
            Backend::Null(_) => "null",
            Backend::Memory(_) => "memory",
            Backend::Qcow2(_) => "qcow2",
            Backend::Vmdk(_) => "vmdk",
            Backend::Layered(l) => l.base().format_name(),
            Backend::Fault(f) => f.inner().format_name(),
        }
    }

    /// The file FUSE passthrough may send opens to (and whether it is open with O_DIRECT), or
    /// why there is none: only a raw image on a regular file maps offset N to offset N. A probed
    /// raw image that is writable is not passed through: a writable mapping of the backing file
    /// would bypass the first-sector check.
    pub fn passthrough_file(&self, writable: bool) -> Result<(&std::fs::File, bool), &'static str> {
        match self {
            Backend::Raw(r) => r.passthrough_file(),
            Backend::ProbedRaw(p) if !writable => p.inner().passthrough_file(),
            Backend::ProbedRaw(_) => {
                Err("a writable probed raw image keeps its first-sector check; give format 'raw'")
            }
            _ => Err("only raw images on regular files pass through"),
        }
    }

    /// Whether the kernel may write the passthrough file itself, and if so, from now on the
    /// size is the file's (it may grow under us). Only an explicit raw image: a probed one keeps
    /// its first-sector check, which a write the kernel makes would skip.
    pub fn let_kernel_write_passthrough_file(&self) -> bool {
        match self {
            Backend::Raw(r) => {
                r.follow_file_size();
                true
            }
            _ => false,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Backend::Raw($b) => $e,
            Backend::Null($b) => $e,
            Backend::Memory($b) => $e,
            Backend::Qcow2($b) => $e,
            Backend::Vmdk($b) => $e,
            Backend::Nbd($b) => $e,
            Backend::ProbedRaw($b) => $e,
            Backend::ProbedNbd($b) => $e,
            Backend::Layered($b) => $e,
            Backend::Fault($b) => $e,
        }
    };
}

impl BlockBackend for Backend {
    fn len(&self) -> u64 {
        dispatch!(self, b => b.len())
    }
    fn alignment(&self) -> u32 {
        dispatch!(self, b => b.alignment())
    }
    fn optimal_transfer(&self) -> u32 {
        dispatch!(self, b => b.optimal_transfer())
    }
    fn allocated_bytes(&self) -> Option<u64> {
        dispatch!(self, b => b.allocated_bytes())
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        dispatch!(self, b => b.read_at(buf, offset).await)
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        dispatch!(self, b => b.write_at(buf, offset).await)
    }
    async fn flush(&self) -> io::Result<()> {
        dispatch!(self, b => b.flush().await)
    }
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()> {
        dispatch!(self, b => b.truncate(new_len, preallocate).await)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        dispatch!(self, b => b.write_zeroes(offset, len, unmap).await)
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        dispatch!(self, b => b.extent_at(offset).await)
    }
    fn can_unmap(&self) -> bool {
        dispatch!(self, b => b.can_unmap())
    }
}
