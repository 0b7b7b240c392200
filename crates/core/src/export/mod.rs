//! Export semantics: what each FUSE operation means for a disk image presented as one regular
//! file (QEMU's `fuse_co_*` handlers). Handlers get decoded scalars and return what the reply
//! carries or an errno; only the transport writes replies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{Backend, BlockBackend, Extent, MAX_IMAGE_SIZE};
use crate::protocol::abi::{falloc, fattr, fopen, whence, FUSE_ROOT_ID};
use crate::protocol::decode::{Op, SetattrIn};
use crate::protocol::encode::{self, Attr, Statfs};

mod init;
mod passthrough;
pub use init::{negotiate_init, InitLimits, Negotiated};
pub use passthrough::Passthrough;

#[cfg(test)]
mod tests;

/// What the transport sends back for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// FORGET and friends: the kernel expects nothing.
    NoReply,
    /// A bare error reply with this positive errno.
    Error(i32),
    /// Success; the body is the first `n` bytes of the small reply buffer (0 = header only).
    Small(usize),
    /// Success; the body is the first `n` bytes of the data buffer (READ).
    Data(usize),
}

/// Policy fixed at export creation.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    pub writable: bool,
    pub growable: bool,
    pub allow_other: bool,
    /// Flush after every write before acknowledging it.
    pub writethrough: bool,
    /// The `max_read` mount option; larger READs are refused.
    pub max_read: u32,
}

/// File attributes a client can change with SETATTR; kept together so a reader never sees a
/// torn update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Counters for `stats()`; relaxed atomics, never a lock on the hot path.
pub struct Stats {
    /// Requests by opcode; index 0 counts opcodes beyond the table.
    pub requests: [AtomicU64; 64],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests answered with an errno, except `ENOSYS`.
    pub errors: AtomicU64,
    /// Requests answered `ENOSYS`: operations blockfuse does not implement by design (the kernel
    /// then stops asking, e.g. STATX falls back to GETATTR). Not failures, so not in `errors`.
    pub unsupported: AtomicU64,
    /// Replies that could not be sent (other than for interrupted requests).
    pub lost_replies: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unsupported: AtomicU64::new(0),
            lost_replies: AtomicU64::new(0),
        }
    }
}

/// Attribute and entry validity the kernel may cache GETATTR results for.
const ATTR_VALID_SECS: u64 = 1;
/// FALLOCATE on long ranges is split into pieces of at most this many bytes...
const ZERO_CHUNK: u64 = 1 << 30;
/// ...unless that would take more than this many backend calls: a client may zero an exabyte of
/// a sparse image, and a billion calls would tie up the request (and close()) for hours.
const MAX_ZERO_PIECES: u64 = 1024;

pub struct Export {
    backend: Backend,
    opts: ExportOptions,
    owner: Mutex<Owner>,
    /// Serialises size changes so two growing writes cannot shrink each other's result.
    resize: tokio::sync::Mutex<()>,
    /// Which opens go straight to the image (none until the session registers it).
    passthrough: Passthrough,
    pub stats: Stats,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
}

impl Export {
    pub fn new(backend: Backend, opts: ExportOptions, uid: u32, gid: u32) -> Self {
        let perm = if opts.writable { 0o600 } else { 0o400 };
        Export {
            backend,
            opts,
            owner: Mutex::new(Owner { mode: libc::S_IFREG | perm, uid, gid }),
            resize: tokio::sync::Mutex::new(()),
            passthrough: Passthrough::default(),
            stats: Stats::default(),
        }
    }

    /// The image registered as the FUSE connection's backing file (by the session, after INIT).
    pub fn set_passthrough(&mut self, passthrough: Passthrough) {
        self.passthrough = passthrough;
    }

    /// Whether clients may write (a read-only export never flushes its image).
    pub fn writable(&self) -> bool {
        self.opts.writable
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn options(&self) -> &ExportOptions {
        &self.opts
    }

    fn owner(&self) -> Owner {
        *self.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one decoded request (INIT is the transport's, at mount time). `small` receives
    /// fixed-size reply bodies; `data` holds a WRITE's payload and receives READ data.
    pub async fn handle(&self, opcode: u32, op: Op, small: &mut [u8], data: &mut [u8]) -> Outcome {
        // Opcodes past the table (unknown to us) are counted in slot 0, which no opcode uses.
        let slot = self.stats.requests.get(opcode as usize).unwrap_or(&self.stats.requests[0]);
        slot.fetch_add(1, Ordering::Relaxed);
        let outcome = match op {
            Op::Forget => Outcome::NoReply,
            // A second INIT after the handshake is a protocol violation.
            Op::Init { .. } => Outcome::Error(libc::EPROTO),
            Op::Destroy | Op::Release => Outcome::Small(0),
            Op::Lookup => Outcome::Error(libc::ENOENT),
            Op::Statfs => Outcome::Small(self.statfs(small)),
            Op::Getattr => Outcome::Small(self.getattr(small)),
            Op::Setattr(s) => self.setattr(s, small).await,
            Op::Open { pid, flags: open_flags } => {
                let mut flags = fopen::FOPEN_DIRECT_IO | fopen::FOPEN_PARALLEL_DIRECT_WRITES;
                // Our own process's files get no FLUSH on close: if the process ends without
                // close(), its last thread closes them after the queue threads are gone, and a
                // FLUSH would wait for an answer forever (docs/DESIGN.md, "Ending without
                // close()"). A FLUSH only syncs the image, which close(2) never promises.
                // (The one place outside `sys` that asks the OS something: a /proc lookup.)
                if crate::sys::is_own_thread(pid) {
                    flags |= fopen::FOPEN_NOFLUSH;
                }
                let (flags, backing_id) = self.passthrough.open_reply(flags, open_flags);
                Outcome::Small(encode::open_out(small, 0, flags, backing_id))
            }
            Op::Read { offset, size } => self.read(offset, size, data).await,
            Op::Write { offset, size } => self.write(offset, size, data, small).await,
            // A read-only export has nothing to flush and never syncs the image (which may live
            // where fsync fails, e.g. /proc).
            Op::Flush | Op::Fsync { .. } if !self.opts.writable => Outcome::Small(0),
            Op::Flush | Op::Fsync { .. } => match self.backend.flush().await {
                Ok(()) => Outcome::Small(0),
                Err(e) => Outcome::Error(errno_of(&e)),
            },
            Op::Fallocate { offset, length, mode } => self.fallocate(offset, length, mode).await,
            Op::Lseek { offset, whence } => self.lseek(offset, whence, small).await,
            Op::Unsupported => Outcome::Error(libc::ENOSYS),
        };
        match outcome {
            Outcome::Error(libc::ENOSYS) => {
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Error(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        outcome
    }

    /// The attributes GETATTR and SETATTR report.
    pub fn attr(&self) -> Attr {
        let owner = self.owner();
        let size = self.backend.len();
        let blocks = self.backend.allocated_bytes().map(|b| b / 512).unwrap_or(size.div_ceil(512));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Attr {
            ino: FUSE_ROOT_ID,
            size,
            blocks,
            time_sec: now.as_secs(),
            time_nsec: now.subsec_nanos(),
            mode: owner.mode,
            nlink: 1,
            uid: owner.uid,
            gid: owner.gid,
            blksize: self.backend.alignment().max(512),
        }
    }

    fn getattr(&self, small: &mut [u8]) -> usize {
        encode::attr_out(small, ATTR_VALID_SECS, &self.attr())
    }

    fn statfs(&self, small: &mut [u8]) -> usize {
        let bsize = self.backend.optimal_transfer().max(512);
        let blocks = self.backend.len().div_ceil(bsize as u64);
        let used = self.backend.allocated_bytes().map(|b| b.div_ceil(bsize as u64));
        let free = used.map(|u| blocks.saturating_sub(u)).unwrap_or(0);
        let s = Statfs {
            blocks,
            bfree: free,
            bavail: free,
            files: 1,
            ffree: 0,
            bsize,
            namelen: 255,
            frsize: bsize,
        };
        encode::statfs_out(small, &s)
    }

    async fn setattr(&self, s: SetattrIn, small: &mut [u8]) -> Outcome {
        let mut supported = fattr::FATTR_SIZE
            | fattr::FATTR_MODE
            | fattr::FATTR_FH
            | fattr::FATTR_LOCKOWNER
            | fattr::FATTR_KILL_SUIDGID;
        if self.opts.allow_other {
            supported |= fattr::FATTR_UID | fattr::FATTR_GID;
        }
        if s.valid & !supported != 0 {
            return Outcome::Error(libc::EOPNOTSUPP);
        }
        let set = |flag: u32| s.valid & flag != 0;
        let new_mode = (s.mode & 0o7777) | libc::S_IFREG;
        if !self.opts.writable {
            if set(fattr::FATTR_SIZE) {
                return Outcome::Error(libc::EACCES);
            }
            if set(fattr::FATTR_MODE) && new_mode & 0o222 != 0 {
                return Outcome::Error(libc::EROFS);
            }
        }
        // Without allow_other nobody but the owner can reach the file; group/other bits would
        // promise an access the mount does not give.
        if set(fattr::FATTR_MODE) && !self.opts.allow_other && new_mode & 0o077 != 0 {
            return Outcome::Error(libc::EPERM);
        }
        if set(fattr::FATTR_SIZE) {
            if s.size > MAX_IMAGE_SIZE {
                return Outcome::Error(libc::EFBIG);
            }
            let _guard = self.resize.lock().await;
            if let Err(e) = self.backend.truncate(s.size, false).await {
                return Outcome::Error(errno_of(&e));
            }
        }
        if set(fattr::FATTR_MODE) || set(fattr::FATTR_UID) || set(fattr::FATTR_GID) {
            let mut owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
            if set(fattr::FATTR_MODE) {
                owner.mode = new_mode;
            }
            if set(fattr::FATTR_UID) {
                owner.uid = s.uid;
            }
            if set(fattr::FATTR_GID) {
                owner.gid = s.gid;
            }
        }
        Outcome::Small(self.getattr(small))
    }

    async fn read(&self, offset: u64, size: u32, data: &mut [u8]) -> Outcome {
        if size > self.opts.max_read || size as usize > data.len() {
            return Outcome::Error(libc::EINVAL);
        }
        let len = self.backend.len();
        // Clients expect short reads at EOF and empty reads past it.
        if offset >= len {
            return Outcome::Data(0);
        }
        let n = (size as u64).min(len - offset) as usize;
        match self.backend.read_at(&mut data[..n], offset).await {
            Ok(()) => {
                self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                Outcome::Data(n)
            }
            Err(e) => Outcome::Error(errno_of(&e)),
        }
    }

    async fn write(&self, offset: u64, size: u32, data: &mut [u8], small: &mut [u8]) -> Outcome {
        if !self.opts.writable {
            return Outcome::Error(libc::EACCES);
        }
        // Writing nothing has no effect (write(2)); in particular it must not grow the image.
        if size == 0 {
            return Outcome::Small(encode::write_out(small, 0));
        }
        let Some(end) = offset.checked_add(size as u64) else {
            return Outcome::Error(libc::EINVAL);
        };
        if size as usize > data.len() {
            return Outcome::Error(libc::EINVAL);
        }
        let mut n = size as u64;
        let len = self.backend.len();
        if end > len && self.opts.growable {
            if end > MAX_IMAGE_SIZE {
                return Outcome::Error(libc::EFBIG);
            }
            // The grow and the write go together: if the write fails, the size goes back to
            // what it was (held under the resize lock, so no other resize interleaves).
            let _guard = self.resize.lock().await;
            let before = self.backend.len();
            if end > before {
                if let Err(e) = self.backend.truncate(end, false).await {
                    return Outcome::Error(errno_of(&e));
                }
                if let Err(e) = self.backend.write_at(&data[..size as usize], offset).await {
                    if let Err(undo) = self.backend.truncate(before, false).await {
                        log::error!("cannot undo the grow of a failed write ({e}): {undo}");
                    }
                    return Outcome::Error(errno_of(&e));
                }
                return self.written(size as usize, small).await;
            }
        } else if end > len {
            if offset >= len {
                // Nothing fits. ENOSPC rather than a 0-byte write: callers that retry short
                // writes (Node's fs) would loop forever on 0; dd reports the same error either way.
                return Outcome::Error(libc::ENOSPC);
            }
            // Clients expect short writes at EOF.
            n = len - offset;
        }
        let n = n as usize;
        if let Err(e) = self.backend.write_at(&data[..n], offset).await {
            return Outcome::Error(errno_of(&e));
        }
        self.written(n, small).await
    }

    /// After `n` bytes were written: writethrough's flush, the counters, the reply.
    async fn written(&self, n: usize, small: &mut [u8]) -> Outcome {
        if self.opts.writethrough {
            if let Err(e) = self.backend.flush().await {
                return Outcome::Error(errno_of(&e));
            }
        }
        self.stats.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
        Outcome::Small(encode::write_out(small, n as u32))
    }

    async fn fallocate(&self, offset: u64, length: u64, mode: u32) -> Outcome {
        match self.fallocate_inner(offset, length, mode).await {
            Ok(()) => Outcome::Small(0),
            Err(errno) => Outcome::Error(errno),
        }
    }

    async fn fallocate_inner(&self, offset: u64, length: u64, mode: u32) -> Result<(), i32> {
        if !self.opts.writable {
            return Err(libc::EACCES);
        }
        // As fallocate(2); an empty range past EOF would otherwise grow the image to `offset`.
        if length == 0 {
            return Err(libc::EINVAL);
        }
        let end = offset.checked_add(length).ok_or(libc::EINVAL)?;
        let io = |e: std::io::Error| errno_of(&e);
        // Growing past the largest exact size is refused; ranges inside the image are not.
        if mode & falloc::FALLOC_FL_KEEP_SIZE == 0
            && end > MAX_IMAGE_SIZE
            && end > self.backend.len()
        {
            return Err(libc::EFBIG);
        }
        let keep_size = mode & falloc::FALLOC_FL_KEEP_SIZE != 0;
        if mode == 0 {
            // Plain allocation can only mean growing: everything before EOF is allocated as far
            // as the client can tell.
            let _guard = self.resize.lock().await;
            let len = self.backend.len();
            if offset < len {
                return Err(libc::EOPNOTSUPP);
            }
            if offset > len {
                self.backend.truncate(offset, false).await.map_err(io)?;
            }
            let grown = self.backend.truncate(end, true).await;
            if grown.is_err() && self.backend.len() != len {
                // A failed allocation leaves the size as it was.
                let _ = self.backend.truncate(len, false).await;
            }
            return grown.map_err(io);
        }
        let unmap = if mode & falloc::FALLOC_FL_PUNCH_HOLE != 0 {
            if !keep_size {
                return Err(libc::EINVAL);
            }
            if mode & !(falloc::FALLOC_FL_PUNCH_HOLE | falloc::FALLOC_FL_KEEP_SIZE) != 0 {
                return Err(libc::EOPNOTSUPP);
            }
            true
        } else if mode & falloc::FALLOC_FL_ZERO_RANGE != 0 {
            if mode & !(falloc::FALLOC_FL_ZERO_RANGE | falloc::FALLOC_FL_KEEP_SIZE) != 0 {
                return Err(libc::EOPNOTSUPP);
            }
            if !keep_size && end > self.backend.len() {
                let _guard = self.resize.lock().await;
                if end > self.backend.len() {
                    self.backend.truncate(end, false).await.map_err(io)?;
                }
            }
            false
        } else {
            return Err(libc::EOPNOTSUPP);
        };
        // Past EOF there is nothing to zero or punch.
        let end = end.min(self.backend.len());
        let chunk = ZERO_CHUNK.max(end.saturating_sub(offset).div_ceil(MAX_ZERO_PIECES));
        let mut pos = offset;
        while pos < end {
            let piece = (end - pos).min(chunk);
            self.backend.write_zeroes(pos, piece, unmap).await.map_err(io)?;
            pos += piece;
        }
        Ok(())
    }

    async fn lseek(&self, offset: u64, whence: u32, small: &mut [u8]) -> Outcome {
        let want_data = match whence {
            whence::SEEK_DATA => true,
            whence::SEEK_HOLE => false,
            _ => return Outcome::Error(libc::EINVAL),
        };
        let len = self.backend.len();
        // As the kernel's generic llseek: both whences fail with ENXIO at or past EOF.
        if offset >= len {
            return Outcome::Error(libc::ENXIO);
        }
        let mut pos = offset;
        while pos < len {
            let extent = match self.backend.extent_at(pos).await {
                Ok(e) => e,
                Err(e) => return Outcome::Error(errno_of(&e)),
            };
            let n = match extent {
                Extent::Data(_) if want_data => {
                    return Outcome::Small(encode::lseek_out(small, pos))
                }
                Extent::Hole(_) if !want_data => {
                    return Outcome::Small(encode::lseek_out(small, pos))
                }
                Extent::Data(n) | Extent::Hole(n) => n,
            };
            pos = pos.saturating_add(n.max(1));
        }
        // The end of the file counts as a hole; there is no data after the last extent.
        if want_data {
            Outcome::Error(libc::ENXIO)
        } else {
            Outcome::Small(encode::lseek_out(small, len))
        }
    }
}
