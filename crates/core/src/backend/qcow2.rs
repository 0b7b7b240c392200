//! The qcow2 backend: a qcow2 image (v2 or v3) and its backing chain, through the imago crate,
//! presented as the disk it describes. imago does the format; this module adapts it:
//! - imago's futures are not `Send`; each queue thread drives them on its own current-thread
//!   runtime, like every backend's. Opening runs on a short-lived thread of its own.
//! - imago reaches files through its `Storage` trait; [`ImageFile`] implements it on the queue
//!   thread's io_uring (`sys::uring`), so qcow2 data and metadata I/O never blocks a queue.
//! - Operations that may invalidate imago's data mappings (discard, shrink) need `&mut` access;
//!   they take the image's lock exclusively, all other requests share it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use imago::format::gate::ImplicitOpenGate;
use imago::format::PreallocateMode;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::storage::drivers::CommonStorageHelper;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions};
use tokio::sync::RwLock;

use super::{file_io, BlockBackend, CacheMode, Extent};
use crate::sys;
use crate::sys::uring::Submission;

#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Options {
    pub writable: bool,
    /// `None` opens every file of the chain with O_DIRECT.
    pub cache: CacheMode,
}

/// Longest backing chain we follow; deeper chains are refused at open.
const MAX_CHAIN: usize = 64;
/// `extent_at` merges mappings of one kind over at most this many bytes per call.
const EXTENT_SCAN: u64 = 1 << 30;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// What we read from the top image's header ourselves (imago validated it).
#[derive(Debug, Clone, Copy)]
struct HeaderInfo {
    version: u32,
    cluster_size: u64,
}

impl HeaderInfo {
    fn read(path: &Path) -> io::Result<Self> {
        // The version 2 header: 72 bytes (version 3 extends it).
        let mut head = [0u8; 72];
        let mut file = File::open(path)?;
        let n = read_up_to(&mut file, &mut head)?;
        if n < 4 || head[..4] != super::probe::QCOW2_MAGIC {
            return Err(invalid("not a qcow2 image (no QFI\\xfb magic)"));
        }
        if n < head.len() {
            return Err(invalid("qcow2 header is truncated"));
        }
        let be32 =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let version = be32(4);
        if version != 2 && version != 3 {
            return Err(invalid(&format!("unsupported qcow2 version {version} (only 2 and 3)")));
        }
        let cluster_bits = be32(20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(&format!("invalid qcow2 cluster_bits {cluster_bits}")));
        }
        // imago has no encryption: such an image would read as ciphertext.
        if be32(32) != 0 {
            return Err(invalid("encrypted qcow2 images are not supported"));
        }
        Ok(HeaderInfo { version, cluster_size: 1 << cluster_bits })
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

pub struct Qcow2Backend {
    image: RwLock<FormatAccess<ImageFile>>,
    len: AtomicU64,
    /// The top image file, for its allocation (GETATTR blocks).
    top: File,
    header: HeaderInfo,
    has_backing: bool,
    alignment: u32,
}

impl Qcow2Backend {
    /// Opens the image and its backing chain (read-only). Runs on a thread of its own, so it
    /// works from any context, including inside another runtime.
    pub fn open(path: &Path, opts: Qcow2Options) -> io::Result<Self> {
        let path = path.to_path_buf();
        std::thread::scope(|s| {
            let opener = std::thread::Builder::new()
                .name("blockfuse-qcow2-open".into())
                .spawn_scoped(s, || {
                    let rt = tokio::runtime::Builder::new_current_thread().build()?;
                    rt.block_on(Self::open_async(&path, opts))
                })?;
            opener.join().unwrap_or_else(|_| Err(io::Error::other("opening the image panicked")))
        })
    }

    async fn open_async(path: &Path, opts: Qcow2Options) -> io::Result<Self> {
        let header = HeaderInfo::read(path)?;
        let direct = opts.cache == CacheMode::None;
        let storage_opts = StorageOpenOptions::new().direct(direct);
        let top_storage =
            ImageFile::open(storage_opts.clone().filename(path).write(opts.writable)).await?;
        let top = top_storage.file.try_clone()?;
        let gate = ChainGate { chain: vec![std::fs::canonicalize(path)?] };
        let qcow2 = Qcow2::<ImageFile>::builder(top_storage)
            .write(opts.writable)
            .storage_open_options(storage_opts)
            .open(gate)
            .await?;
        let has_backing = qcow2.implicit_backing_file().is_some();
        let image = FormatAccess::new(qcow2);
        let alignment = image.req_align().max(image.mem_align()).min(1 << 20) as u32;
        Ok(Qcow2Backend {
            len: AtomicU64::new(image.size()),
            image: RwLock::new(image),
            top,
            header,
            has_backing,
            alignment,
        })
    }

    /// The qcow2 version of the top image (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }
}

/// Polls `fut`, turning a panic inside imago into EIO for this one request.
async fn no_panic<T>(what: &str, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let mut fut = std::pin::pin!(fut);
    let mut panicked = false;
    let r = std::future::poll_fn(|cx| {
        if panicked {
            return Poll::Ready(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(_) => {
                panicked = true;
                Poll::Ready(Err(io::Error::from_raw_os_error(libc::EIO)))
            }
        }
    })
    .await;
    if panicked {
        log::error!("qcow2 {what} panicked; answered EIO");
    }
    r
}

/// Makes a range read zeros without deallocating it: zero clusters on v3; on v2, which has no
/// zero flag, zeros written as data.
async fn zero_in_place(
    image: &FormatAccess<ImageFile>,
    v3: bool,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    if v3 {
        return image.write_zeroes(offset, len).await;
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        image.write(&zeros[..n], pos).await?;
        pos += n as u64;
    }
    Ok(())
}

/// Request-time errors: OS errors keep their errno; imago's own (corrupt metadata, unsupported
/// feature, out of range) are logged and become EIO, or EOPNOTSUPP for "unsupported".
fn request_error(what: &str, e: io::Error) -> io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    log::warn!("qcow2 {what} failed: {e}");
    if e.kind() == io::ErrorKind::Unsupported {
        io::Error::from_raw_os_error(libc::EOPNOTSUPP)
    } else {
        io::Error::from_raw_os_error(libc::EIO)
    }
}

impl BlockBackend for Qcow2Backend {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn alignment(&self) -> u32 {
        self.alignment
    }
    fn optimal_transfer(&self) -> u32 {
        self.header.cluster_size.clamp(512, 1 << 20) as u32
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.top.metadata().ok().map(|m| m.blocks() * 512)
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        no_panic("read", async {
            let image = self.image.read().await;
            image.read(buf, offset).await
        })
        .await
        .map_err(|e| request_error("read", e))
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        no_panic("write", async {
            let image = self.image.read().await;
            image.write(buf, offset).await
        })
        .await
        .map_err(|e| request_error("write", e))
    }
    async fn flush(&self) -> io::Result<()> {
        no_panic("flush", async {
            let image = self.image.read().await;
            // Cached metadata (L2 tables, refcounts) to the file, then the file to the disk.
            image.flush().await?;
            image.sync().await
        })
        .await
        .map_err(|e| request_error("flush", e))
    }
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()> {
        let old = self.len();
        no_panic("resize", async {
            if new_len > old {
                // With a backing file the new range must not show the backing file's data.
                let mode = match (self.has_backing, preallocate) {
                    (true, _) => PreallocateMode::Zero,
                    (false, true) => PreallocateMode::FullAllocate,
                    (false, false) => PreallocateMode::None,
                };
                self.image.read().await.resize_grow(new_len, mode).await
            } else if new_len < old {
                // Shrinking keeps the last cluster, data past the new end included; zero that
                // tail first, so growing again reads zeros there (as a file would).
                let tail_end = new_len.next_multiple_of(self.header.cluster_size).min(old);
                if tail_end > new_len {
                    let image = self.image.read().await;
                    zero_in_place(&image, self.header.version >= 3, new_len, tail_end - new_len)
                        .await?;
                }
                self.image.write().await.resize_shrink(new_len).await
            } else {
                Ok(())
            }
        })
        .await
        .map_err(|e| request_error("resize", e))?;
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let v3 = self.header.version >= 3;
        no_panic("write-zeroes", async {
            if v3 && unmap {
                // Zero clusters without allocation; partial clusters get zeros written.
                return self.image.write().await.discard_to_zero(offset, len).await;
            }
            if v3 || self.has_backing {
                // v3: zero clusters, allocation kept. v2 with a backing file: zeros as data (v2
                // has no zero flag, and deallocating would show the backing file).
                let image = self.image.read().await;
                return zero_in_place(&image, v3, offset, len).await;
            }
            // v2 without a backing file: unallocated clusters read as zeros, so deallocate the
            // whole clusters and write zeros into the partial ones at either end.
            let image = self.image.write().await;
            let cs = self.header.cluster_size;
            let end = offset + len;
            let inner_start = offset.next_multiple_of(cs);
            let inner_end = if end == self.len() { end } else { end / cs * cs };
            if inner_start >= inner_end {
                return zero_in_place(&image, v3, offset, len).await;
            }
            let mut image = image;
            image.discard_to_backing(inner_start, inner_end - inner_start).await?;
            if offset < inner_start {
                zero_in_place(&image, v3, offset, inner_start - offset).await?;
            }
            if inner_end < end {
                zero_in_place(&image, v3, inner_end, end - inner_end).await?;
            }
            Ok(())
        })
        .await
        .map_err(|e| request_error("write-zeroes", e))
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        let len = self.len();
        let (data, n) = no_panic("block status", async {
            let image = self.image.read().await;
            let mut pos = offset;
            let mut kind = None;
            while pos < len && pos - offset < EXTENT_SCAN {
                let (mapping, n) = image.get_mapping(pos, len - pos).await?;
                // A cluster is a hole when no layer of the chain holds data for it.
                let data = match mapping {
                    Mapping::Zero { .. } => false,
                    Mapping::Eof { .. } => break,
                    _ => true,
                };
                match kind {
                    None => kind = Some(data),
                    Some(k) if k != data => break,
                    Some(_) => {}
                }
                if n == 0 {
                    break;
                }
                pos += n;
            }
            Ok((kind.unwrap_or(false), pos.saturating_sub(offset)))
        })
        .await
        .map_err(|e| request_error("block status", e))?;
        let n = n.max(1);
        Ok(if data { Extent::Data(n) } else { Extent::Hole(n) })
    }
    fn can_unmap(&self) -> bool {
        self.header.version >= 3 || !self.has_backing
    }
}

/// Opens what the image header references (backing files, a data file), refusing loops and
/// over-long chains. Backing files come here read-only (imago asks for them so).
#[derive(Clone)]
struct ChainGate {
    chain: Vec<PathBuf>,
}

impl ImplicitOpenGate<ImageFile> for ChainGate {
    async fn open_format<F: FormatDriverBuilder<ImageFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImageFile>> {
        let inner = Box::pin(builder.open(self.clone())).await?;
        Ok(FormatAccess::new(inner))
    }

    async fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ImageFile> {
        let name = opts.get_filename().ok_or_else(|| io::Error::other("no file name"))?;
        let canonical = std::fs::canonicalize(name)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", name.display())))?;
        if self.chain.contains(&canonical) {
            return Err(invalid(&format!(
                "backing chain loop: {} is already in the chain",
                name.display()
            )));
        }
        if self.chain.len() >= MAX_CHAIN {
            return Err(invalid(&format!("backing chain longer than {MAX_CHAIN} images")));
        }
        self.chain.push(canonical);
        ImageFile::open(opts).await
    }
}

/// A file of the chain as imago's storage: positional I/O through the queue thread's io_uring,
/// synchronous where there is none (opening, closing, tests).
pub struct ImageFile {
    file: File,
    path: PathBuf,
    mem_align: usize,
    req_align: usize,
    submission: Submission,
    helper: CommonStorageHelper,
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

impl Storage for ImageFile {
    async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
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

    fn mem_align(&self) -> usize {
        self.mem_align
    }

    fn req_align(&self) -> usize {
        self.req_align
    }

    fn size(&self) -> io::Result<u64> {
        self.size_now()
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        // As QEMU: a relative backing file name is relative to the image's directory.
        let relative = relative.as_ref();
        if relative.is_absolute() {
            return Ok(relative.to_path_buf());
        }
        let dir = self.path.parent().ok_or_else(|| io::Error::other("image path has no parent"))?;
        Ok(dir.join(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            self.pread_full(&mut slice, pos).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for slice in bufv.into_inner() {
            self.pwrite_full(&slice, pos).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
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

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.fallocate(FALLOC_FL_ZERO_RANGE, offset, length).await
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
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

    async fn flush(&self) -> io::Result<()> {
        // No buffers of our own.
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        file_io::datasync(&self.file).await
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    async fn resize(
        &self,
        new_size: u64,
        prealloc_mode: imago::storage::PreallocateMode,
    ) -> io::Result<()> {
        use imago::storage::PreallocateMode as P;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_info_rejects_what_is_not_qcow2() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("blockfuse-qcow2-hdr-{}", std::process::id()));
        std::fs::write(&path, b"not a qcow2 image at all, just some bytes").unwrap();
        let e = HeaderInfo::read(&path).unwrap_err();
        assert!(e.to_string().contains("not a qcow2 image"), "{e}");
        std::fs::write(&path, b"QFI\xfb\0\0\0\x02").unwrap();
        let e = HeaderInfo::read(&path).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut h = b"QFI\xfb\0\0\0\x07".to_vec();
        h.resize(104, 0);
        std::fs::write(&path, &h).unwrap();
        let e = HeaderInfo::read(&path).unwrap_err();
        assert!(e.to_string().contains("version 7"), "{e}");
        h[7] = 3;
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[32..36].copy_from_slice(&2u32.to_be_bytes());
        std::fs::write(&path, &h).unwrap();
        let e = HeaderInfo::read(&path).unwrap_err();
        assert!(e.to_string().contains("encrypted"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    /// Runs qemu-img; None when it is not installed (the test is skipped).
    fn qemu_img(args: &[&str]) -> Option<String> {
        let out = std::process::Command::new("qemu-img").args(args).output().ok()?;
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn temp_dir(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("blockfuse-qcow2-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    #[test]
    fn write_read_flush_and_a_backing_chain() {
        let dir = temp_dir("chain");
        let base = dir.0.join("base.qcow2");
        let top = dir.0.join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        if qemu_img(&["create", "-q", "-f", "qcow2", b, "4M"]).is_none() {
            return;
        }
        let base_be =
            Qcow2Backend::open(&base, Qcow2Options { writable: true, ..Default::default() })
                .unwrap();
        block_on(base_be.write_at(&[0x11; 65536], 0)).unwrap();
        block_on(base_be.flush()).unwrap();
        drop(base_be);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", t]).unwrap();
        let be = Qcow2Backend::open(&top, Qcow2Options { writable: true, ..Default::default() })
            .unwrap();
        assert_eq!(be.len(), 4 << 20);
        // Data from the base, a hole after it.
        assert_eq!(block_on(be.extent_at(0)).unwrap(), Extent::Data(65536));
        assert_eq!(block_on(be.extent_at(65536)).unwrap(), Extent::Hole((4 << 20) - 65536));
        block_on(be.write_at(&[0x22; 4096], 65536 + 512)).unwrap();
        let mut buf = vec![0u8; 3 * 65536];
        block_on(be.read_at(&mut buf, 0)).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0x11));
        assert!(buf[65536..65536 + 512].iter().all(|&b| b == 0));
        assert!(buf[65536 + 512..65536 + 4608].iter().all(|&b| b == 0x22));
        assert!(buf[65536 + 4608..].iter().all(|&b| b == 0));
        assert_eq!(block_on(be.extent_at(0)).unwrap(), Extent::Data(2 * 65536));
        // Punching the base's cluster in the top makes it read zeros and a hole.
        block_on(be.write_zeroes(0, 65536, true)).unwrap();
        block_on(be.read_at(&mut buf[..65536], 0)).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0));
        assert_eq!(block_on(be.extent_at(0)).unwrap(), Extent::Hole(65536));
        block_on(be.flush()).unwrap();
        drop(be);
        let check = qemu_img(&["check", t]).unwrap();
        assert!(check.contains("No errors were found"), "{check}");
        // The base stayed as it was.
        let base_map = qemu_img(&["map", "--output=json", b]).unwrap();
        assert!(base_map.contains("\"data\": true"), "{base_map}");
    }

    #[test]
    fn open_errors_are_clear() {
        let dir = temp_dir("errors");
        let top = dir.0.join("top.qcow2");
        let t = top.to_str().unwrap();
        if qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "-u",
            t,
            "1M",
        ])
        .is_none()
        {
            return;
        }
        let e = Qcow2Backend::open(&top, Qcow2Options::default()).err().unwrap();
        assert!(e.to_string().contains("gone.qcow2"), "{e}");
        // A loop: the image is its own backing file.
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "-u", t, "1M"])
            .unwrap();
        let e = Qcow2Backend::open(&top, Qcow2Options::default()).err().unwrap();
        assert!(e.to_string().contains("loop"), "{e}");
    }
}
