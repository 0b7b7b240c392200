//! Layers over a source backend: a slice (a byte range or a partition of the disk) and a
//! temporary copy-on-write overlay (`snapshot`). Both are one wrapper, [`Layered`], over a base
//! backend that is never itself layered, so its futures are awaited directly (no boxing, no
//! allocation per request): the base is dispatched by [`base!`], which has no arm for layers.
//!
//! Order: base → snapshot overlay (covers the whole disk) → slice. A persistent qcow2 overlay
//! (`overlay: PATH`) is not a layer: the export opens that qcow2 image, whose backing file is the
//! source (see `overlay.rs`).

use std::io;

use super::cow::Cow;
use super::{Backend, BlockBackend, Extent};

/// Calls `$e` on the base backend `$b` (bound to `$x`). A layered or fault-injected backend is
/// never a base: [`Layered::new`] refuses them.
macro_rules! base {
    ($b:expr, $x:ident => $e:expr) => {
        match $b {
            Backend::Raw($x) => $e,
            Backend::Null($x) => $e,
            Backend::Memory($x) => $e,
            Backend::Qcow2($x) => $e,
            Backend::Vmdk($x) => $e,
            Backend::Nbd($x) => $e,
            Backend::ProbedRaw($x) => $e,
            Backend::ProbedNbd($x) => $e,
            Backend::Layered(_) | Backend::Fault(_) => Err($crate::backend::layer::not_a_base()),
        }
    };
}
pub(crate) use base;

pub(crate) fn not_a_base() -> io::Error {
    io::Error::other("a layered backend cannot be the base of another layer")
}

/// Reads from a base backend (see [`base!`]).
pub(crate) async fn base_read(b: &Backend, buf: &mut [u8], offset: u64) -> io::Result<()> {
    base!(b, x => x.read_at(buf, offset).await)
}

/// The bytes of the disk an export shows: `[start, start + len)` of the (overlaid) base.
pub struct Layered {
    base: Box<Backend>,
    cow: Option<Cow>,
    start: u64,
    len: u64,
}

impl Layered {
    /// Wraps `base` (not itself layered); `cow` covers the whole base; the slice
    /// `[start, start + len)` has been checked against the base's size and alignment.
    pub fn new(base: Backend, cow: Option<Cow>, start: u64, len: u64) -> io::Result<Self> {
        if matches!(base, Backend::Layered(_) | Backend::Fault(_)) {
            return Err(not_a_base());
        }
        debug_assert!(start.checked_add(len).is_some_and(|end| end <= base.len()));
        Ok(Layered { base: Box::new(base), cow, start, len })
    }

    pub fn base(&self) -> &Backend {
        &self.base
    }

    /// Whether writes go to a temporary overlay.
    pub fn is_snapshot(&self) -> bool {
        self.cow.is_some()
    }

    fn fixed_size() -> io::Error {
        // A slice or snapshot has the size it was opened with (growable is refused at open).
        io::Error::from_raw_os_error(libc::EPERM)
    }
}

impl BlockBackend for Layered {
    fn len(&self) -> u64 {
        self.len
    }
    fn alignment(&self) -> u32 {
        self.base.alignment()
    }
    fn optimal_transfer(&self) -> u32 {
        self.base.optimal_transfer()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        // The base file's allocation says nothing about a part of it or about the overlay.
        None
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = self.start + offset;
        match &self.cow {
            Some(cow) => cow.read_at(&self.base, buf, at).await,
            None => base!(&*self.base, b => b.read_at(buf, at).await),
        }
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.start + offset;
        match &self.cow {
            Some(cow) => cow.write_at(&self.base, buf, at).await,
            None => base!(&*self.base, b => b.write_at(buf, at).await),
        }
    }
    async fn flush(&self) -> io::Result<()> {
        match &self.cow {
            // The overlay is thrown away at close: there is nothing to make durable, and the
            // source is read-only.
            Some(_) => Ok(()),
            None => base!(&*self.base, b => b.flush().await),
        }
    }
    async fn truncate(&self, new_len: u64, _preallocate: bool) -> io::Result<()> {
        if new_len == self.len {
            return Ok(());
        }
        Err(Self::fixed_size())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let at = self.start + offset;
        match &self.cow {
            Some(cow) => cow.write_zeroes(&self.base, at, len, unmap).await,
            None => base!(&*self.base, b => b.write_zeroes(at, len, unmap).await),
        }
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        let at = self.start + offset;
        let extent = match &self.cow {
            Some(cow) => cow.extent_at(&self.base, at).await?,
            None => base!(&*self.base, b => b.extent_at(at).await)?,
        };
        // The base's extent may run past the slice's end.
        let left = self.len - offset;
        Ok(match extent {
            Extent::Data(n) => Extent::Data(n.min(left)),
            Extent::Hole(n) => Extent::Hole(n.min(left)),
        })
    }
    fn can_unmap(&self) -> bool {
        match &self.cow {
            Some(_) => true,
            None => self.base.can_unmap(),
        }
    }
}
