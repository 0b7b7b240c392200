//! What the qcow2 backend's images live on, as imago's `Storage`: [`ChainStorage`] is one file of
//! a backing chain, either a local file ([`ImageFile`], through the queue thread's io_uring) or
//! an export on an NBD server ([`NbdStorage`]). What every member of a chain needs whatever it
//! lives on (dirty and corrupt bits hidden while a read-only chain opens, the top image's table
//! writes noted for the metadata overlap check) is done here once, around either.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageExt, StorageOpenOptions};

use super::nbd::NbdStorage;
use super::qcow2_overlap::{Layout, ReadAt};
use super::{file_io, probe};
use crate::sys;
use crate::sys::uring::Submission;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// Incompatible feature bits (v3 header, offset 72).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Where the incompatible feature bits live; the low byte holds the dirty and corrupt bits.
pub const INCOMPAT_OFFSET: u64 = 72;

/// Where one image of the chain lives.
pub enum Medium {
    File(ImageFile),
    Nbd(NbdStorage),
}

/// One image of a qcow2 chain (the top image, a backing file, an external data file).
pub struct ChainStorage {
    medium: Medium,
    /// The image the export serves (not a backing or data file): the overlap check guards it.
    top: bool,
    /// Read-only qcow2 v3 images: the dirty and corrupt bits of the header, hidden from reads
    /// while the window is open (imago refuses them; QEMU reads such images).
    hide: Option<(u8, Arc<AtomicBool>)>,
    /// The top image of a writable export: its writes to the L1 and refcount tables are noted.
    tables: Option<Arc<TableWatch>>,
}

impl ChainStorage {
    pub fn new(medium: Medium, top: bool) -> Self {
        ChainStorage { medium, top, hide: None, tables: None }
    }

    /// Whether this is the image the export serves (whose metadata the overlap check guards).
    pub fn is_top(&self) -> bool {
        self.top
    }

    pub fn is_nbd(&self) -> bool {
        matches!(self.medium, Medium::Nbd(_))
    }

    pub fn watch_tables(&mut self, tables: Option<Arc<TableWatch>>) {
        self.tables = tables;
    }

    /// For a read-only image that is a qcow2 v3 image with the dirty or corrupt bit: hides the
    /// bits from header reads while `window` is true (only during open, so data of a raw image
    /// that looks like such a header is never altered once the chain is open).
    pub async fn hide_dirty_and_corrupt(&mut self, window: &Arc<AtomicBool>, writable: bool) {
        if writable {
            return;
        }
        let mut head = [0u8; 80];
        if self.size().is_ok_and(|s| s < head.len() as u64)
            || self.read(&mut head[..], 0).await.is_err()
        {
            return;
        }
        if head[..4] != probe::QCOW2_MAGIC || head[4..8] != [0, 0, 0, 3] {
            return;
        }
        let bits = head[79] & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) as u8;
        if bits != 0 {
            self.hide = Some((bits, window.clone()));
        }
    }
}

impl fmt::Debug for ChainStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.medium {
            Medium::File(file) => fmt::Debug::fmt(file, f),
            Medium::Nbd(nbd) => fmt::Debug::fmt(nbd, f),
        }
    }
}

impl fmt::Display for ChainStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.medium {
            Medium::File(file) => fmt::Display::fmt(file, f),
            Medium::Nbd(nbd) => fmt::Display::fmt(nbd, f),
        }
    }
}

macro_rules! on_medium {
    ($self:ident, $m:ident => $e:expr) => {
        match &$self.medium {
            Medium::File($m) => $e,
            Medium::Nbd($m) => $e,
        }
    };
}

impl Storage for ChainStorage {
    async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        // imago opens through the chain gate; this is its fallback for local files.
        Ok(ChainStorage::new(Medium::File(ImageFile::open(opts).await?), false))
    }

    fn mem_align(&self) -> usize {
        on_medium!(self, m => m.mem_align())
    }

    fn req_align(&self) -> usize {
        on_medium!(self, m => m.req_align())
    }

    fn size(&self) -> io::Result<u64> {
        on_medium!(self, m => m.size())
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        on_medium!(self, m => m.resolve_relative_path(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        on_medium!(self, m => m.filename())
    }

    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let hide = self.hide.as_ref().filter(|(_, window)| window.load(Ordering::Acquire));
        let Some((bits, _)) = hide else {
            return on_medium!(self, m => m.readv(bufv, offset).await);
        };
        // Only while the chain opens: slice by slice, clearing the bits where the header's
        // byte lands.
        let at = INCOMPAT_OFFSET + 7;
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            let n = slice.len() as u64;
            let v = IoVectorMut::from(&mut slice[..]);
            on_medium!(self, m => m.readv(v, pos).await)?;
            if (pos..pos + n).contains(&at) {
                slice[(at - pos) as usize] &= !bits;
            }
            pos += n;
        }
        Ok(())
    }

    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        on_medium!(self, m => m.writev(bufv, offset).await)?;
        if let Some(tables) = &self.tables {
            tables.note_write(offset, len);
        }
        Ok(())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        on_medium!(self, m => m.write_zeroes(offset, length).await)
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        on_medium!(self, m => m.write_allocated_zeroes(offset, length).await)
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        on_medium!(self, m => m.discard(offset, length).await)
    }

    async fn flush(&self) -> io::Result<()> {
        // Neither medium buffers anything of its own.
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        on_medium!(self, m => m.sync().await)
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        on_medium!(self, m => m.helper())
    }

    async fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        on_medium!(self, m => m.resize(new_size, prealloc_mode).await)
    }
}

/// The top image's bytes as the qcow2 backend reads and patches them itself (its header, the
/// metadata map, the corrupt bit), beside imago. A local file is read through the page cache
/// (the image's own descriptor may be O_DIRECT).
pub enum TopBytes {
    File(File),
    Nbd(NbdStorage),
}

impl TopBytes {
    /// Reads up to `buf.len()` bytes from the start; returns how many there are.
    pub async fn read_head(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TopBytes::File(f) => read_up_to(f, buf),
            TopBytes::Nbd(n) => {
                let len = (buf.len() as u64).min(n.size()?) as usize;
                n.read_exact_at(&mut buf[..len], 0).await?;
                Ok(len)
            }
        }
    }

    /// Writes `buf` at `offset` and makes it durable.
    pub async fn write_durably(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            TopBytes::File(f) => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(buf, offset)?;
                f.sync_data()
            }
            TopBytes::Nbd(n) => n.write_durably(buf, offset).await,
        }
    }
}

impl ReadAt for TopBytes {
    async fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            TopBytes::File(f) => ReadAt::read_exact_at(f, buf, offset).await,
            TopBytes::Nbd(n) => n.read_exact_at(buf, offset).await,
        }
    }
}

/// Reads up to `buf.len()` bytes from the start of `file`; returns how many there are.
pub fn read_up_to(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A local file of the chain: positional I/O through the queue thread's io_uring, synchronous
/// where there is none (opening, closing, tests).
pub struct ImageFile {
    pub file: File,
    pub path: PathBuf,
    mem_align: usize,
    req_align: usize,
    submission: Submission,
    helper: CommonStorageHelper,
}

/// Where the L1 and refcount tables of the top image are, and whether they were written since
/// the metadata map was last read. Every write of the top image checks the two ranges (four
/// relaxed loads); the tables are written only when imago allocates an L2 table or a refcount
/// block.
pub struct TableWatch {
    l1: (AtomicU64, AtomicU64),
    refcount_table: (AtomicU64, AtomicU64),
    pub changed: AtomicBool,
}

impl TableWatch {
    pub fn new(layout: &Layout) -> Self {
        let w = TableWatch {
            l1: (AtomicU64::new(0), AtomicU64::new(0)),
            refcount_table: (AtomicU64::new(0), AtomicU64::new(0)),
            changed: AtomicBool::new(false),
        };
        w.watch(layout);
        w
    }

    /// Watches the tables where `layout` puts them (they move when the image grows).
    pub fn watch(&self, layout: &Layout) {
        let set = |(start, end): &(AtomicU64, AtomicU64), offset: u64, len: u64| {
            start.store(offset, Ordering::Relaxed);
            end.store(offset + len, Ordering::Relaxed);
        };
        set(&self.l1, layout.l1_offset, u64::from(layout.l1_size) * 8);
        let rt_len = u64::from(layout.refcount_table_clusters) << layout.cluster_bits;
        set(&self.refcount_table, layout.refcount_table_offset, rt_len);
    }

    /// Notes a write of `len` bytes at `offset` if it touches either table.
    fn note_write(&self, offset: u64, len: u64) {
        let hits = |(start, end): &(AtomicU64, AtomicU64)| {
            offset < end.load(Ordering::Relaxed) && offset + len > start.load(Ordering::Relaxed)
        };
        if hits(&self.l1) || hits(&self.refcount_table) {
            self.changed.store(true, Ordering::Release);
        }
    }
}

impl fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageFile").field("path", &self.path).finish()
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

impl ImageFile {
    fn size_now(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_file() {
            Ok(meta.len())
        } else {
            // Block devices: the size is where SEEK_END lands.
            (&self.file).seek(io::SeekFrom::End(0))
        }
    }

    /// Fills `buf` from `offset`; what lies past EOF reads as zeros.
    async fn pread_full(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = file_io::read_full(&self.file, buf, offset, self.submission).await?;
        buf[n..].fill(0);
        Ok(())
    }

    async fn pwrite_full(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        file_io::write_all(&self.file, buf, offset, self.submission).await
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        file_io::fallocate(&self.file, mode, offset, len).await
    }

    async fn write_zero_data(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            self.pwrite_full(&chunk[..n], offset).await?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// The medium interface [`ChainStorage`] forwards to (imago's `Storage`, safe: imago keeps
/// requests aligned and within its rules before they get here).
impl ImageFile {
    pub async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::other("no file name to open"))?
            .to_path_buf();
        let mut oo = OpenOptions::new();
        oo.read(true).write(opts.get_writable());
        if opts.get_direct() {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            ));
        }
        let (mem_align, req_align) = if opts.get_direct() {
            let (mem, off) = sys::dio_alignment(&file).unwrap_or((4096, 4096));
            (mem.max(512) as usize, off.max(512) as usize)
        } else {
            (1, 1)
        };
        let submission = file_io::submission_for(opts.get_direct());
        let helper = CommonStorageHelper::default();
        Ok(ImageFile { file, path, mem_align, req_align, submission, helper })
    }

    pub fn mem_align(&self) -> usize {
        self.mem_align
    }

    pub fn req_align(&self) -> usize {
        self.req_align
    }

    pub fn size(&self) -> io::Result<u64> {
        self.size_now()
    }

    pub fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        // As QEMU: a relative backing file name is relative to the image's directory. An NBD
        // URI names a server, not a file.
        let relative = relative.as_ref();
        if relative.is_absolute() || relative.to_str().is_some_and(super::nbd::uri::is_nbd_uri) {
            return Ok(relative.to_path_buf());
        }
        let dir = self.path.parent().ok_or_else(|| io::Error::other("image path has no parent"))?;
        Ok(dir.join(relative))
    }

    pub fn filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    pub async fn readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            self.pread_full(&mut slice, pos).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    pub async fn writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for slice in bufv.into_inner() {
            self.pwrite_full(&slice, pos).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    pub async fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let size = self.size_now()?;
        let end = offset + length;
        if offset < size {
            let n = end.min(size) - offset;
            self.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n).await?;
        }
        if end > size {
            // Grows the file and never shrinks it, whatever writes run beside it.
            let from = offset.max(size);
            self.fallocate(FALLOC_FL_ZERO_RANGE, from, end - from).await?;
        }
        Ok(())
    }

    pub async fn write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.fallocate(FALLOC_FL_ZERO_RANGE, offset, length).await
    }

    pub async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let size = self.size_now()?;
        if offset >= size {
            return Ok(());
        }
        let n = (offset + length).min(size) - offset;
        match self.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n).await {
            // A discard may do nothing.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            r => r,
        }
    }

    pub async fn sync(&self) -> io::Result<()> {
        file_io::datasync(&self.file).await
    }

    pub fn helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    pub async fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        use PreallocateMode as P;
        let size = self.size_now()?;
        if new_size <= size {
            return self.file.set_len(new_size);
        }
        match prealloc_mode {
            P::Allocate => self.fallocate(0, size, new_size - size).await,
            P::WriteData => self.write_zero_data(size, new_size - size).await,
            _ => self.file.set_len(new_size),
        }
    }
}
