//! The raw backend: an image file (or block device) accessed with positional I/O. On a queue
//! thread the I/O goes through that thread's io_uring, so it never blocks the queue; elsewhere
//! (tests, the close path) it is plain synchronous I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::lock::{ImageLock, LockMode, Perms};
use super::{file_io, BlockBackend, Extent};
use crate::aligned::AlignedBuf;
use crate::sys;
use crate::sys::uring::{Ring, Submission};

/// How the image file is opened (QEMU's `cache.direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the host page cache (QEMU's default for the file driver).
    #[default]
    Writeback,
    /// O_DIRECT: bypasses the host page cache. Unaligned requests are bounced through an aligned
    /// buffer (read-modify-write for writes, serialised against other writes).
    None,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RawOptions {
    pub writable: bool,
    pub cache: CacheMode,
    /// QEMU-compatible image locks (`lock`).
    pub locking: LockMode,
    /// Read-only: let others write and resize the image meanwhile (`qemu-img -U`).
    pub force_share: bool,
}

pub struct RawBackend {
    file: File,
    len: AtomicU64,
    /// The kernel writes the image too (FUSE passthrough of writable opens), and may extend it:
    /// the size is then the file's, read on each use, not `len`.
    size_follows_file: AtomicBool,
    alignment: u32,
    optimal_transfer: u32,
    submission: Submission,
    /// With O_DIRECT: aligned writes share it, a read-modify-write takes it alone, so an RMW never
    /// writes back stale bytes over a concurrent write to the same block.
    rmw: tokio::sync::RwLock<()>,
    /// Held for the backend's lifetime.
    _lock: ImageLock,
}

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

impl RawBackend {
    pub fn open(path: &Path, opts: RawOptions) -> io::Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(opts.writable);
        if opts.cache == CacheMode::None {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in st_size; their size is where SEEK_END lands.
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        };
        let alignment = match opts.cache {
            CacheMode::Writeback => 1,
            CacheMode::None => {
                sys::dio_alignment(&file).map(|(mem, off)| mem.max(off)).unwrap_or(4096).max(512)
            }
        };
        let optimal_transfer = (meta.blksize() as u32).clamp(512, 1 << 20);
        let perms = Perms::image(opts.writable, opts.force_share);
        let lock = ImageLock::acquire(path, perms, opts.locking)?;
        Ok(RawBackend {
            file,
            len: AtomicU64::new(len),
            size_follows_file: AtomicBool::new(false),
            alignment,
            optimal_transfer,
            submission: file_io::submission_for(opts.cache == CacheMode::None),
            rmw: tokio::sync::RwLock::new(()),
            _lock: lock,
        })
    }

    /// The image file, and whether it is open with O_DIRECT, for FUSE passthrough: only a
    /// regular file can be a backing file.
    pub fn passthrough_file(&self) -> Result<(&File, bool), &'static str> {
        match self.file.metadata() {
            Ok(m) if m.file_type().is_file() => Ok((&self.file, self.alignment > 1)),
            _ => Err("the image is not a regular file"),
        }
    }

    /// From now on the size is read from the file on every use: writes that pass through to the
    /// image (FUSE passthrough) extend it without telling us, and a GETATTR answered with an
    /// older size would make the kernel cut the file's end off its page cache.
    pub fn follow_file_size(&self) {
        self.size_follows_file.store(true, Ordering::Release);
    }

    fn is_aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        let a = self.alignment as u64;
        a <= 1
            || ((ptr as u64).is_multiple_of(a)
                && (len as u64).is_multiple_of(a)
                && offset.is_multiple_of(a))
    }

    /// Reads until `buf` is full or EOF; returns the bytes read.
    async fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        // Through the page cache, a cache hit is cheapest as one non-blocking syscall; only what
        // would block (a miss) goes to the ring.
        if self.alignment <= 1 && Ring::current().is_some() {
            if let Some(n) = sys::pread_nowait(&self.file, buf, offset)? {
                if n == buf.len() || n == 0 {
                    return Ok(n);
                }
                done = n;
            }
        }
        let rest = &mut buf[done..];
        let n = file_io::read_full(&self.file, rest, offset + done as u64, self.submission).await?;
        Ok(done + n)
    }

    async fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        file_io::write_all(&self.file, buf, offset, self.submission).await
    }

    /// The aligned range covering `[offset, offset+len)`.
    fn widen(&self, offset: u64, len: usize) -> (u64, usize) {
        let a = self.alignment as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).next_multiple_of(a);
        (start, (end - start) as usize)
    }
}

impl BlockBackend for RawBackend {
    fn len(&self) -> u64 {
        if self.size_follows_file.load(Ordering::Relaxed) {
            // A regular file (only those pass through), so st_size is its size.
            if let Ok(m) = self.file.metadata() {
                return m.len();
            }
        }
        self.len.load(Ordering::Acquire)
    }
    fn alignment(&self) -> u32 {
        self.alignment
    }
    fn optimal_transfer(&self) -> u32 {
        self.optimal_transfer
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = if self.is_aligned(buf.as_ptr(), buf.len(), offset) {
            self.pread(buf, offset).await?
        } else {
            // Slow path (O_DIRECT, unaligned request): read the covering aligned range.
            let (start, len) = self.widen(offset, buf.len());
            let mut bounce = AlignedBuf::new(len, self.alignment as usize);
            let got = self.pread(bounce.as_mut_slice(), start).await?;
            let skip = (offset - start) as usize;
            let n = got.saturating_sub(skip).min(buf.len());
            buf[..n].copy_from_slice(&bounce.as_slice()[skip..skip + n]);
            n
        };
        // The file shrank under us (another process truncated it): what is gone reads as zeros.
        buf[n..].fill(0);
        Ok(())
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.alignment <= 1 {
            return self.pwrite(buf, offset).await;
        }
        if self.is_aligned(buf.as_ptr(), buf.len(), offset) {
            let _shared = self.rmw.read().await;
            return self.pwrite(buf, offset).await;
        }
        // Slow path (O_DIRECT, unaligned request): read-modify-write of the covering range.
        let _exclusive = self.rmw.write().await;
        let (start, len) = self.widen(offset, buf.len());
        let mut bounce = AlignedBuf::new(len, self.alignment as usize);
        self.pread(bounce.as_mut_slice(), start).await?;
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        self.pwrite(bounce.as_slice(), start).await?;
        let file_len = self.len().max(offset + buf.len() as u64);
        if start + len as u64 > file_len {
            // O_DIRECT wrote whole blocks, the last one past EOF: cut the file back to its size.
            self.file.set_len(file_len)?;
        }
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        file_io::datasync(&self.file).await
    }
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()> {
        let old = self.len();
        if preallocate && new_len > old {
            file_io::fallocate(&self.file, 0, old, new_len - old).await?;
        } else {
            self.file.set_len(new_len)?;
        }
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        } else {
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        };
        match file_io::fallocate(&self.file, mode, offset, len).await {
            Err(e) if !unmap && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No ZERO_RANGE on this filesystem: punching reads back the same zeros.
                let mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
                file_io::fallocate(&self.file, mode, offset, len).await
            }
            r => r,
        }
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        let len = self.len();
        let next_hole = sys::seek_data_hole(&self.file, offset, libc::SEEK_HOLE)?.unwrap_or(len);
        if next_hole > offset {
            return Ok(Extent::Data(next_hole.min(len) - offset));
        }
        let next_data = sys::seek_data_hole(&self.file, offset, libc::SEEK_DATA)?.unwrap_or(len);
        Ok(Extent::Hole(next_data.min(len).saturating_sub(offset).max(1)))
    }
    fn can_unmap(&self) -> bool {
        true
    }
}
