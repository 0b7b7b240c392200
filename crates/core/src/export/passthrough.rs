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
}

impl Passthrough {
    pub fn new(backing_id: u32, image_direct: bool) -> Self {
        Passthrough { backing_id, image_direct }
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
    /// at stake. With an O_DIRECT image only O_DIRECT opens pass through: the kernel opens the
    /// backing file with the client's flags, and a buffered open would fill the page cache
    /// that `cache: 'none'` promises to bypass.
    pub fn open_reply(&self, flags: u32, open_flags: u32) -> (u32, u32) {
        if self.backing_id == 0 {
            return (flags, 0);
        }
        let read_only = open_flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
        let direct_kept = !self.image_direct || open_flags & libc::O_DIRECT as u32 != 0;
        let flags = if read_only && direct_kept {
            flags & !(FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)
        } else {
            flags
        };
        (flags | FOPEN_PASSTHROUGH, self.backing_id)
    }
}
