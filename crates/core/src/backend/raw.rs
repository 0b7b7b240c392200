//! The raw backend: an image file (or block device) accessed with positional I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockBackend, Extent};
use crate::sys;

/// How the image file is opened (QEMU's `cache.direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the host page cache (QEMU's default for the file driver).
    #[default]
    Writeback,
    /// O_DIRECT: bypasses the host page cache; requests must honour the file's alignment.
    None,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RawOptions {
    pub writable: bool,
    pub cache: CacheMode,
}

pub struct RawBackend {
    file: File,
    len: AtomicU64,
    alignment: u32,
    optimal_transfer: u32,
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
                sys::dio_alignment(&file).map(|(mem, off)| mem.max(off)).unwrap_or(4096)
            }
        };
        let optimal_transfer = (meta.blksize() as u32).clamp(512, 1 << 20);
        Ok(RawBackend { file, len: AtomicU64::new(len), alignment, optimal_transfer })
    }

    fn check_aligned(&self, ptr: usize, len: usize, offset: u64) -> io::Result<()> {
        let a = self.alignment as u64;
        if a > 1 && (ptr as u64 % a != 0 || len as u64 % a != 0 || offset % a != 0) {
            // The export layer bounces unaligned requests; reaching here is a bug, not a panic.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

impl BlockBackend for RawBackend {
    fn len(&self) -> u64 {
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
        self.check_aligned(buf.as_ptr() as usize, buf.len(), offset)?;
        match self.file.read_exact_at(buf, offset) {
            // The file shrank under us (another process truncated it): what is gone reads as
            // zeros, as it would on a block device past a resize.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let mut done = 0;
                while done < buf.len() {
                    match self.file.read_at(&mut buf[done..], offset + done as u64)? {
                        0 => break,
                        n => done += n,
                    }
                }
                buf[done..].fill(0);
                Ok(())
            }
            r => r,
        }
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_aligned(buf.as_ptr() as usize, buf.len(), offset)?;
        self.file.write_all_at(buf, offset)
    }
    async fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()> {
        let old = self.len();
        if preallocate && new_len > old {
            sys::fallocate(&self.file, 0, old, new_len - old)?;
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
        match sys::fallocate(&self.file, mode, offset, len) {
            Err(e) if !unmap && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No ZERO_RANGE here (e.g. tmpfs before 6.x): punching keeps the same content.
                sys::fallocate(&self.file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len)
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
