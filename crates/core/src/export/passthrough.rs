//! FUSE passthrough, decided per open: which opens the kernel may send straight to the image
//! (docs/DESIGN.md, "Passthrough").

use crate::protocol::abi::fopen::{
    FOPEN_DIRECT_IO, FOPEN_PARALLEL_DIRECT_WRITES, FOPEN_PASSTHROUGH,
};

/// The image registered as the connection's backing file, if it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Passthrough {
    /// From FUSE_DEV_IOC_BACKING_OPEN; 0: no passthrough.
    backing_id: u32,
    /// The image is open with O_DIRECT (`cache: 'none'`).
    image_direct: bool,
    /// Writable opens pass through too: the export's write rules hold for any write the kernel
    /// makes to the image (see [`Passthrough::writes_keep_rules`]).
    writes: bool,
}

impl Passthrough {
    pub fn new(backing_id: u32, image_direct: bool, writes: bool) -> Self {
        Passthrough { backing_id, image_direct, writes: writes && !image_direct }
    }

    /// Whether an export with these options may let the kernel write the image itself. A write
    /// that passes through lands at its offset in the image and extends it when it ends past the
    /// end, acknowledged once it is in the image's page cache, without asking us. That is exactly
    /// a *growable* export's rule in writeback mode without `writethrough`; a non-growable export
    /// must refuse writes at its end (ENOSPC/short write) and `writethrough` must flush before
    /// acknowledging, which only we can do. With an O_DIRECT image (`cache: 'none'`) buffered
    /// writable opens would still be ours, and a growing write of ours (truncate, then write)
    /// could race with the kernel's, so writes pass through only in writeback mode ([`Self::new`]).
    pub fn writes_keep_rules(writable: bool, growable: bool, writethrough: bool) -> bool {
        writable && growable && !writethrough
    }

    /// Whether writable opens pass through (the export then never sees READ or WRITE).
    pub fn writes(&self) -> bool {
        self.backing_id != 0 && self.writes
    }

    pub fn backing_id(&self) -> Option<u32> {
        (self.backing_id != 0).then_some(self.backing_id)
    }

    /// The OPEN reply's flags and backing id, given the flags we answer without passthrough and
    /// the open(2) flags. Once one open of the file passes through, the kernel requires every
    /// open to name the backing file (else EIO), so with a backing file every open gets
    /// FOPEN_PASSTHROUGH; an open we must serve ourselves keeps FOPEN_DIRECT_IO, which sends its
    /// reads and writes to us and leaves only mmap to the backing file.
    ///
    /// Passed through: read-only opens, which cannot write, so no size or first-sector rule is
    /// at stake; writable opens too where [`Self::writes_keep_rules`] held. With an O_DIRECT
    /// image only O_DIRECT opens pass through: the kernel opens the backing file with the
    /// client's flags, and a buffered open would fill the page cache that `cache: 'none'`
    /// promises to bypass.
    pub fn open_reply(&self, flags: u32, open_flags: u32) -> (u32, u32) {
        if self.backing_id == 0 {
            return (flags, 0);
        }
        let read_only = open_flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
        let direct_kept = !self.image_direct || open_flags & libc::O_DIRECT as u32 != 0;
        let flags = if (read_only || self.writes) && direct_kept {
            flags & !(FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)
        } else {
            flags
        };
        (flags | FOPEN_PASSTHROUGH, self.backing_id)
    }
}
