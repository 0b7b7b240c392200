//! Reply encoding: the out structs laid out in native byte order into caller-provided bytes.
//! Pure: no I/O, no unsafe, no allocation.

use super::abi::size;

/// A little writer over a fixed buffer; the buffers used are sized for the largest struct.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_ne_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_ne_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.put(&v.to_ne_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_ne_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf[self.pos..self.pos + n].fill(0);
        self.pos += n;
        self
    }
    pub fn written(&self) -> usize {
        self.pos
    }
}

/// Large enough for any fixed-size reply body we send (INIT's 64 bytes, attr_out's 104).
pub const MAX_SMALL_REPLY: usize = 128;

/// `fuse_out_header`.
pub fn out_header(buf: &mut [u8; size::OUT_HEADER], len: u32, error: i32, unique: u64) {
    Writer::new(buf).u32(len).i32(error).u64(unique);
}

/// What GETATTR and SETATTR report; the export fills it from its state and the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub time_sec: u64,
    pub time_nsec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// `fuse_attr_out` (7.9+ layout). Returns the bytes written.
pub fn attr_out(buf: &mut [u8], valid_sec: u64, a: &Attr) -> usize {
    let mut w = Writer::new(buf);
    w.u64(valid_sec).u32(0).u32(0);
    w.u64(a.ino).u64(a.size).u64(a.blocks);
    w.u64(a.time_sec).u64(a.time_sec).u64(a.time_sec);
    w.u32(a.time_nsec).u32(a.time_nsec).u32(a.time_nsec);
    w.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
    w.u32(0).u32(a.blksize).u32(0); // rdev, blksize, flags
    debug_assert_eq!(w.written(), size::ATTR_OUT);
    w.written()
}

/// `fuse_init_out` fields we set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    /// The flags' upper half (read by the kernel when `flags` has FUSE_INIT_EXT).
    pub flags2: u32,
    /// File systems stacked under a passthrough backing file, plus one (0 without passthrough).
    pub max_stack_depth: u32,
}

/// `fuse_init_out`, truncated to the compat size the kernel's minor expects (before 7.23 the
/// kernel only knows the first 24 bytes).
pub fn init_out(buf: &mut [u8], o: &InitOut) -> usize {
    let mut w = Writer::new(buf);
    w.u32(o.major).u32(o.minor).u32(o.max_readahead).u32(o.flags);
    w.u16(o.max_background).u16(o.congestion_threshold).u32(o.max_write);
    w.u32(o.time_gran).u16(o.max_pages).u16(0); // map_alignment
    w.u32(o.flags2).u32(o.max_stack_depth).u16(0).zeros(22); // request_timeout, unused
    debug_assert_eq!(w.written(), size::INIT_OUT);
    if o.minor >= 23 {
        size::INIT_OUT
    } else {
        size::INIT_OUT_COMPAT_22
    }
}

/// `fuse_open_out`; `backing_id` is 0 unless `open_flags` has FOPEN_PASSTHROUGH.
pub fn open_out(buf: &mut [u8], fh: u64, open_flags: u32, backing_id: u32) -> usize {
    Writer::new(buf).u64(fh).u32(open_flags).u32(backing_id).written()
}

/// `fuse_write_out`.
pub fn write_out(buf: &mut [u8], written: u32) -> usize {
    Writer::new(buf).u32(written).u32(0).written()
}

/// `fuse_lseek_out`.
pub fn lseek_out(buf: &mut [u8], offset: u64) -> usize {
    Writer::new(buf).u64(offset).written()
}

/// `fuse_statfs_out` (`fuse_kstatfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub fn statfs_out(buf: &mut [u8], s: &Statfs) -> usize {
    let mut w = Writer::new(buf);
    w.u64(s.blocks).u64(s.bfree).u64(s.bavail).u64(s.files).u64(s.ffree);
    w.u32(s.bsize).u32(s.namelen).u32(s.frsize).u32(0).zeros(24);
    debug_assert_eq!(w.written(), size::STATFS_OUT);
    w.written()
}
