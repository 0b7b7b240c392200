//! The qcow2 backend: a qcow2 image (v2 or v3) and its backing chain, through the imago crate,
//! presented as the disk it describes. imago does the format; this module adapts it:
//! - imago's futures are not `Send`; each queue thread drives them on its own current-thread
//!   runtime, like every backend's. Opening runs on a short-lived thread of its own.
//! - imago reaches images through its `Storage` trait; [`ChainStorage`] implements it for a
//!   local file (on the queue thread's io_uring, `sys::uring`) or an NBD export (through the NBD
//!   client, whose socket I/O is on the same io_uring), so qcow2 data and metadata I/O never
//!   blocks a queue. Everything below is the same for both.
//! - Operations that may invalidate imago's data mappings (discard, shrink) need `&mut` access;
//!   they take the image's lock exclusively, all other requests share it.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use imago::format::gate::ImplicitOpenGate;
use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, StorageExt, StorageOpenOptions};
use tokio::sync::RwLock;

use super::lock::{ImageLock, LockError, LockMode, Perms};
use super::nbd::{uri::is_nbd_uri, NbdBackend, NbdSettings, NbdStorage};
use super::qcow2_overlap::{Layout, MetadataMap, ReadAt};
use super::qcow2_storage::{
    read_up_to, ChainStorage, ImageFile, Medium, TableWatch, TopBytes, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, INCOMPAT_OFFSET,
};
use super::{BlockBackend, CacheMode, Extent, Refusal, MAX_IMAGE_SIZE};

#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    pub writable: bool,
    /// `None` opens every file of the chain with O_DIRECT.
    pub cache: CacheMode,
    /// QEMU-compatible image locks on every file of the chain (`lock`).
    pub locking: LockMode,
    /// Read-only: let others write and resize the files meanwhile (`qemu-img -U`).
    pub force_share: bool,
    /// How to connect to a backing file named by an NBD URI (a qcow2 overlay over an NBD
    /// source).
    pub nbd: NbdSettings,
}

/// Longest backing chain we follow; deeper chains are refused at open.
const MAX_CHAIN: usize = 64;
/// `extent_at` merges mappings of one kind over at most this many bytes per call.
const EXTENT_SCAN: u64 = 1 << 30;
/// The header bytes we read: version 2 has 72, version 3 at least 104.
const HEADER_READ: usize = 104;

/// What we read from the top image's header ourselves (imago validates the rest).
#[derive(Debug, Clone, Copy)]
struct HeaderInfo {
    version: u32,
    cluster_size: u64,
    incompatible: u64,
    layout: Layout,
}

impl HeaderInfo {
    /// Reads the header of a local image file.
    fn read(path: &Path) -> io::Result<Self> {
        let mut head = [0u8; HEADER_READ];
        let n = read_up_to(&File::open(path)?, &mut head)?;
        Self::parse(&head[..n], &path.display().to_string())
    }

    /// Checks the first bytes of an image (`head`: up to [`HEADER_READ`]); `name` is for
    /// messages.
    fn parse(head: &[u8], name: &str) -> io::Result<Self> {
        let n = head.len();
        if n < 4 || head[..4] != super::probe::QCOW2_MAGIC {
            return Err(invalid("not a qcow2 image (no QFI\\xfb magic)"));
        }
        if n < 72 {
            return Err(invalid("qcow2 header is truncated"));
        }
        let be32 =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
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
        if version == 3 && n < HEADER_READ {
            return Err(invalid("qcow2 header is truncated"));
        }
        let layout = Layout {
            cluster_bits,
            size: be64(24),
            l1_size: be32(36),
            l1_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            refcount_order: if version == 3 { be32(96) } else { 4 },
        };
        if layout.size > MAX_IMAGE_SIZE {
            return Err(Refusal::error(
                "IMAGE_TOO_LARGE",
                format!(
                    "{name}: virtual size {} bytes is larger than 2^53-1 ({MAX_IMAGE_SIZE}), the \
                     largest size blockfuse serves exactly",
                    layout.size
                ),
            ));
        }
        layout.check_limits().map_err(|reason| invalid(&reason))?;
        let incompatible = if version == 3 { be64(72) } else { 0 };
        Ok(HeaderInfo { version, cluster_size: 1 << cluster_bits, incompatible, layout })
    }

    /// Reads the header of the top image, wherever it lives.
    async fn read_top(top: &TopBytes, name: &str) -> io::Result<Self> {
        let mut head = [0u8; HEADER_READ];
        let n = top.read_head(&mut head).await?;
        Self::parse(&head[..n], name)
    }
}

/// The way out QEMU gives for a dirty or corrupt image.
fn repair_hint(name: &str) -> String {
    format!("repair it with: qemu-img check -r all {name}")
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Where the top image is: what [`Qcow2Backend::open_top`] starts from.
struct Top {
    storage: ChainStorage,
    /// Its bytes for our own header and metadata reads (and the corrupt bit).
    bytes: TopBytes,
    /// The path or URI, for messages.
    name: String,
    /// Its canonical path (a file) or URI (NBD): the first link of the chain.
    chain_id: PathBuf,
    locks: Vec<ImageLock>,
}

pub struct Qcow2Backend {
    image: RwLock<FormatAccess<ChainStorage>>,
    len: AtomicU64,
    /// The top image file, for its allocation (GETATTR blocks); None on NBD.
    top_file: Option<File>,
    /// The top image's bytes, for the metadata map and the corrupt bit.
    top: TopBytes,
    header: HeaderInfo,
    has_backing: bool,
    alignment: u32,
    /// The top image's path or URI, for messages.
    name: String,
    /// Writable only: the metadata guest writes must not touch.
    /// Re-read from the image when it may be stale: after a resize (which may move the L1
    /// table) and before a suspected overlap is reported (freed metadata is reused for data).
    metadata: Option<std::sync::RwLock<MetadataMap>>,
    /// Writable only: tells when imago wrote the L1 or refcount table (a new L2 table or
    /// refcount block was allocated), so the map is refreshed before the next write is checked.
    tables: Option<Arc<TableWatch>>,
    /// Set once a write was stopped from overwriting metadata: the image is marked corrupt and
    /// every later write fails (QEMU makes the node read-only the same way).
    corrupt: AtomicBool,
    /// Image locks on every file of the chain, held for the backend's lifetime.
    _locks: Vec<ImageLock>,
}

/// Runs `open` on a thread of its own with a current-thread runtime, so opening works from any
/// context, including inside another runtime.
fn on_open_thread<F, Fut>(open: F) -> io::Result<Qcow2Backend>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = io::Result<Qcow2Backend>>,
{
    std::thread::scope(|s| {
        let opener = std::thread::Builder::new().name("blockfuse-qcow2-open".into()).spawn_scoped(
            s,
            || {
                let rt = tokio::runtime::Builder::new_current_thread().build()?;
                rt.block_on(open())
            },
        )?;
        opener.join().unwrap_or_else(|_| Err(io::Error::other("opening the image panicked")))
    })
}

impl Qcow2Backend {
    /// Opens the image file and its backing chain (read-only).
    pub fn open(path: &Path, opts: Qcow2Options) -> io::Result<Self> {
        let path = path.to_path_buf();
        on_open_thread(|| Self::open_file(path, opts))
    }

    /// Opens the qcow2 image held by an NBD export (a qcow2 file served raw). Its backing
    /// files, if any, must be NBD URIs themselves (see [`ChainGate`]). No image locks: the
    /// server owns the file.
    pub fn open_nbd(storage: NbdStorage, opts: Qcow2Options) -> io::Result<Self> {
        on_open_thread(|| async move {
            let name = storage.uri().to_string();
            let top = Top {
                storage: ChainStorage::new(Medium::Nbd(storage.clone()), true),
                bytes: TopBytes::Nbd(storage),
                chain_id: PathBuf::from(&name),
                name,
                locks: Vec::new(),
            };
            Self::open_top(top, None, &opts).await
        })
    }

    /// The virtual size a qcow2 image's header states (for an overlay created over it).
    pub fn virtual_size(path: &Path) -> io::Result<u64> {
        Ok(HeaderInfo::read(path)?.layout.size)
    }

    async fn open_file(path: PathBuf, opts: Qcow2Options) -> io::Result<Self> {
        // Checked before imago sees it, for clear reasons.
        HeaderInfo::read(&path)?;
        let direct = opts.cache == CacheMode::None;
        let storage_opts = StorageOpenOptions::new().direct(direct);
        let file =
            ImageFile::open(storage_opts.clone().filename(&path).write(opts.writable)).await?;
        let top_lock =
            ImageLock::acquire(&path, Perms::image(opts.writable, opts.force_share), opts.locking)?;
        let top_file = file.file.try_clone()?;
        let top = Top {
            storage: ChainStorage::new(Medium::File(file), true),
            // Through the page cache: the image's own file may be O_DIRECT. Writable for the
            // corrupt bit.
            bytes: TopBytes::File(OpenOptions::new().read(true).write(opts.writable).open(&path)?),
            name: path.display().to_string(),
            chain_id: std::fs::canonicalize(&path)?,
            locks: vec![top_lock],
        };
        let mut backend = Self::open_top(top, Some(storage_opts), &opts).await?;
        backend.top_file = Some(top_file);
        Ok(backend)
    }

    /// Opens the chain from its top image: the header and metadata checks, then imago.
    async fn open_top(
        top: Top,
        storage_opts: Option<StorageOpenOptions>,
        opts: &Qcow2Options,
    ) -> io::Result<Self> {
        let Top { storage: mut top_storage, bytes, name, chain_id, locks } = top;
        let header = HeaderInfo::read_top(&bytes, &name).await?;
        let dirty = header.incompatible & INCOMPAT_DIRTY != 0;
        let corrupt = header.incompatible & INCOMPAT_CORRUPT != 0;
        if opts.writable && corrupt {
            return Err(Refusal::error(
                "IMAGE_CORRUPT",
                format!(
                    "{name}: the qcow2 image is marked corrupt and can only be exported read-only; \
                     {}",
                    repair_hint(&name)
                ),
            ));
        }
        if opts.writable && dirty {
            return Err(Refusal::error(
                "IMAGE_DIRTY",
                format!(
                    "{name}: the qcow2 image has the dirty bit set (left by a crash with \
                     lazy_refcounts), so its refcounts may be wrong; export it read-only, or {}",
                    repair_hint(&name)
                ),
            ));
        }
        let metadata = if opts.writable {
            let map = MetadataMap::read(&bytes, &header.layout).await?;
            if let Some((offset, kind)) = map.unreferenced(&bytes, &header.layout).await? {
                return Err(Refusal::error(
                    "IMAGE_CORRUPT",
                    format!(
                        "{name}: the {} at host offset {offset:#x} has refcount 0, so new clusters \
                         could be allocated over it; export it read-only, or {}",
                        kind.name(),
                        repair_hint(&name)
                    ),
                ));
            }
            Some(std::sync::RwLock::new(map))
        } else {
            // Still refuses what QEMU refuses (a snapshot table too large).
            MetadataMap::read(&bytes, &header.layout).await?;
            None
        };
        // Read-only, a dirty or corrupt image is served as QEMU serves it: imago would refuse
        // the bits, so they are hidden from it while it opens the chain.
        let window = Arc::new(AtomicBool::new(true));
        top_storage.hide_dirty_and_corrupt(&window, opts.writable).await;
        let tables = metadata.is_some().then(|| Arc::new(TableWatch::new(&header.layout)));
        top_storage.watch_tables(tables.clone());
        if corrupt {
            log::warn!(
                "{name}: the qcow2 image is marked corrupt; serving it read-only; {}",
                repair_hint(&name)
            );
        } else if dirty {
            log::warn!("{name}: the qcow2 image has the dirty bit set; serving it read-only");
        }
        let nbd_in_chain = top_storage.is_nbd();
        let gate = ChainGate {
            chain: vec![chain_id],
            nbd_in_chain,
            nbd: opts.nbd.clone(),
            locking: opts.locking,
            force_share: opts.force_share,
            locks: Arc::new(Mutex::new(locks)),
            refused: Arc::new(Mutex::new(None)),
            window: window.clone(),
        };
        let locks = gate.locks.clone();
        let refused = gate.refused.clone();
        let mut builder = Qcow2::<ChainStorage>::builder(top_storage).write(opts.writable);
        if let Some(storage_opts) = storage_opts {
            builder = builder.storage_open_options(storage_opts);
        }
        let opened = builder.open(gate).await;
        window.store(false, Ordering::Release);
        let qcow2 = match opened {
            Ok(q) => q,
            // imago adds context to errors of the files it opens, which loses our refusal.
            Err(e) => {
                return Err(refused.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(e))
            }
        };
        let locks = std::mem::take(&mut *locks.lock().unwrap_or_else(|p| p.into_inner()));
        let has_backing = qcow2.implicit_backing_file().is_some();
        let image = FormatAccess::new(qcow2);
        let alignment = image.req_align().max(image.mem_align()).min(1 << 20) as u32;
        Ok(Qcow2Backend {
            len: AtomicU64::new(image.size()),
            image: RwLock::new(image),
            top_file: None,
            top: bytes,
            header,
            has_backing,
            alignment,
            name,
            metadata,
            tables,
            corrupt: AtomicBool::new(false),
            _locks: locks,
        })
    }

    /// EIO once the image was marked corrupt.
    fn writable_now(&self) -> io::Result<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// imago's `FormatAccess::write`, with QEMU's metadata overlap check between learning where
    /// the data goes and writing it: a write that would land on metadata writes nothing, marks
    /// the image corrupt and fails.
    async fn checked_write(
        &self,
        image: &FormatAccess<ChainStorage>,
        mut buf: &[u8],
        mut offset: u64,
    ) -> io::Result<()> {
        if self.metadata.is_none() {
            return image.write(buf, offset).await;
        }
        let mut rechecked = false;
        while !buf.is_empty() {
            let mapping = image.prepare_data_mapping(offset, buf.len() as u64, true).await?;
            // Preparing may have allocated an L2 table or refcount block (over a cluster a
            // damaged L2 entry points at, say): the map must know it before the check.
            self.refresh_if_tables_changed().await?;
            let (storage, host, n) = (mapping.storage(), mapping.offset(), mapping.length());
            if storage.is_top() {
                if let Some(kind) = self.overlap(host, n) {
                    // Nothing written; the prepared mapping is dropped uncommitted.
                    drop(mapping);
                    self.overlap_found(image, kind, host, &mut rechecked).await?;
                    continue;
                }
            }
            let (chunk, rest) = buf.split_at(n as usize);
            storage.write(chunk, host).await?;
            image.commit_data_mapping(mapping).await?;
            buf = rest;
            offset += n;
            rechecked = false;
        }
        Ok(())
    }

    /// A write, zero or discard of `host` overlaps metadata of kind `kind`. The first time
    /// (`rechecked` false) the map may be stale (metadata freed and reused): refresh it from the
    /// file, with imago's cached metadata written first, and return Ok so the caller tries again.
    /// The second time the overlap is real: mark the image corrupt and fail with EIO.
    async fn overlap_found(
        &self,
        image: &FormatAccess<ChainStorage>,
        kind: super::qcow2_overlap::Kind,
        host: u64,
        rechecked: &mut bool,
    ) -> io::Result<()> {
        if !*rechecked {
            *rechecked = true;
            image.flush().await?;
            return self.refresh_metadata().await;
        }
        self.mark_corrupt(kind.name(), host).await;
        Err(io::Error::from_raw_os_error(libc::EIO))
    }

    /// The metadata a host range of the top file overlaps, if any.
    fn overlap(&self, host: u64, len: u64) -> Option<super::qcow2_overlap::Kind> {
        let map = self.metadata.as_ref()?;
        map.read().unwrap_or_else(|p| p.into_inner()).overlap(host, len)
    }

    /// Re-reads the metadata map from the image.
    async fn refresh_metadata(&self) -> io::Result<()> {
        let Some(map) = &self.metadata else { return Ok(()) };
        if let Some(tables) = &self.tables {
            // Cleared first: a table written while this reads is seen by the next check.
            tables.changed.store(false, Ordering::Release);
        }
        let header = HeaderInfo::read_top(&self.top, &self.name).await?;
        let fresh = MetadataMap::read(&self.top, &header.layout).await?;
        *map.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        if let Some(tables) = &self.tables {
            tables.watch(&header.layout);
        }
        Ok(())
    }

    /// Refreshes the metadata map if imago wrote the L1 or refcount table since the last time.
    async fn refresh_if_tables_changed(&self) -> io::Result<()> {
        match &self.tables {
            Some(tables) if tables.changed.load(Ordering::Acquire) => self.refresh_metadata().await,
            _ => Ok(()),
        }
    }

    /// Makes a range read zeros without deallocating it: zero clusters on v3; on v2, which has
    /// no zero flag, zeros written as data.
    async fn zero_in_place(
        &self,
        image: &FormatAccess<ChainStorage>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        if self.header.version >= 3 {
            return image.write_zeroes(offset, len).await;
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.checked_write(image, &zeros[..n], pos).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Before zeroing or discarding: fails (and marks the image corrupt) if a cluster of the
    /// range is mapped onto metadata, since freeing or zeroing it would destroy that metadata.
    async fn check_mapped(
        &self,
        image: &FormatAccess<ChainStorage>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        if self.metadata.is_none() {
            return Ok(());
        }
        let end = offset + len;
        let mut pos = offset;
        let mut rechecked = false;
        while pos < end {
            let (mapping, n) = image.get_mapping(pos, end - pos).await?;
            if n == 0 {
                break;
            }
            self.refresh_if_tables_changed().await?;
            if let Mapping::Raw { storage, offset: host, .. } = mapping {
                if storage.is_top() {
                    if let Some(kind) = self.overlap(host, n) {
                        self.overlap_found(image, kind, host, &mut rechecked).await?;
                        continue;
                    }
                }
            }
            pos += n;
            rechecked = false;
        }
        Ok(())
    }

    /// QEMU's `qcow2_signal_corruption`: sets the corrupt bit in the header (v3; v2 has none)
    /// and stops all further writes.
    async fn mark_corrupt(&self, what: &str, host: u64) {
        if self.corrupt.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!(
            "Marking image as corrupt: Preventing invalid write on metadata (overlaps with \
             {what}) at host offset {host:#x}; further writes fail with EIO"
        );
        if self.header.version < 3 {
            return;
        }
        let mut field = [0u8; 8];
        let marked = async {
            self.top.read_exact_at(&mut field, INCOMPAT_OFFSET).await?;
            let bits = u64::from_be_bytes(field) | INCOMPAT_CORRUPT;
            self.top.write_durably(&bits.to_be_bytes(), INCOMPAT_OFFSET).await
        };
        if let Err(e) = marked.await {
            log::error!("could not set the corrupt bit in the image header: {e}");
        }
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
        self.top_file.as_ref()?.metadata().ok().map(|m| m.blocks() * 512)
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
        self.writable_now()?;
        no_panic("write", async {
            let image = self.image.read().await;
            self.checked_write(&image, buf, offset).await
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
        self.writable_now()?;
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
                    self.check_mapped(&image, new_len, tail_end - new_len).await?;
                    self.zero_in_place(&image, new_len, tail_end - new_len).await?;
                }
                self.image.write().await.resize_shrink(new_len).await
            } else {
                Ok(())
            }
        })
        .await
        .map_err(|e| request_error("resize", e))?;
        if self.metadata.is_some() && new_len != old {
            // A resize may move the L1 table and allocate refcount blocks.
            no_panic("resize", async { self.image.read().await.flush().await })
                .await
                .map_err(|e| request_error("resize", e))?;
            self.refresh_metadata().await?;
        }
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.writable_now()?;
        let v3 = self.header.version >= 3;
        no_panic("write-zeroes", async {
            self.check_mapped(&*self.image.read().await, offset, len).await?;
            if v3 && unmap {
                // Zero clusters without allocation; partial clusters get zeros written.
                return self.image.write().await.discard_to_zero(offset, len).await;
            }
            if v3 || self.has_backing {
                // v3: zero clusters, allocation kept. v2 with a backing file: zeros as data (v2
                // has no zero flag, and deallocating would show the backing file).
                let image = self.image.read().await;
                return self.zero_in_place(&image, offset, len).await;
            }
            // v2 without a backing file: unallocated clusters read as zeros, so deallocate the
            // whole clusters and write zeros into the partial ones at either end.
            let image = self.image.write().await;
            let cs = self.header.cluster_size;
            let end = offset + len;
            let inner_start = offset.next_multiple_of(cs);
            let inner_end = if end == self.len() { end } else { end / cs * cs };
            if inner_start >= inner_end {
                return self.zero_in_place(&image, offset, len).await;
            }
            let mut image = image;
            image.discard_to_backing(inner_start, inner_end - inner_start).await?;
            if offset < inner_start {
                self.zero_in_place(&image, offset, inner_start - offset).await?;
            }
            if inner_end < end {
                self.zero_in_place(&image, inner_end, end - inner_end).await?;
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
///
/// A backing file named by an NBD URI (`nbd://...`, `nbd+unix://...`; what an overlay over an
/// NBD source records) is opened over NBD, read-only, with the export's NBD settings. An image on
/// an NBD server that names a path instead (on the server's machine, or relative to its
/// directory there) cannot be reached: such a chain is refused with `NBD_BACKING_UNSUPPORTED`
/// (let the server open the chain: `qemu-nbd -f qcow2`).
#[derive(Clone)]
struct ChainGate {
    /// Canonical paths (files) and URIs (NBD) of the images opened so far.
    chain: Vec<PathBuf>,
    /// The chain so far has an image on an NBD server.
    nbd_in_chain: bool,
    nbd: NbdSettings,
    locking: LockMode,
    force_share: bool,
    /// The locks taken so far, shared by the gate's clones.
    locks: Arc<Mutex<Vec<ImageLock>>>,
    /// A lock conflict met while opening, returned instead of imago's rewording of it.
    refused: Arc<Mutex<Option<io::Error>>>,
    /// True while the chain is being opened (see [`ChainStorage::hide_dirty_and_corrupt`]).
    window: Arc<AtomicBool>,
}

impl ChainGate {
    /// A backing file on an NBD server, named by its URI.
    async fn open_nbd(&mut self, uri: &str, writable: bool) -> io::Result<ChainStorage> {
        let id = PathBuf::from(uri);
        if self.chain.contains(&id) {
            return Err(invalid(&format!("backing chain loop: {uri} is already in the chain")));
        }
        if self.chain.len() >= MAX_CHAIN {
            return Err(invalid(&format!("backing chain longer than {MAX_CHAIN} images")));
        }
        if writable {
            // imago opens backing files read-only; only an external data file comes writable.
            return Err(invalid(&format!("{uri}: a writable data file on NBD is not supported")));
        }
        let parsed = super::nbd::uri::parse(uri).map_err(|e| {
            self.refuse(Refusal::error("NBD_URI_INVALID", format!("backing file {uri}: {e}")))
        })?;
        let settings = self.nbd.read_only(parsed);
        // Connecting blocks (with its own timeouts); this is the opening thread.
        let backend = NbdBackend::open(&settings).map_err(|e| {
            let (code, message) = e.code_and_message();
            self.refuse(Refusal::error(code, format!("backing file {uri}: {message}")))
        })?;
        self.chain.push(id);
        self.nbd_in_chain = true;
        let mut storage = ChainStorage::new(Medium::Nbd(NbdStorage::new(backend, uri)), false);
        storage.hide_dirty_and_corrupt(&self.window, writable).await;
        Ok(storage)
    }

    /// Keeps `e` to return in place of imago's rewording of it, and returns it.
    fn refuse(&self, e: io::Error) -> io::Error {
        if let Some(r) = super::refusal_of(&e) {
            let copy = Refusal::error(r.code, r.message.clone());
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(copy);
        }
        e
    }
}

impl ImplicitOpenGate<ChainStorage> for ChainGate {
    async fn open_format<F: FormatDriverBuilder<ChainStorage>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ChainStorage>> {
        let inner = Box::pin(builder.open(self.clone())).await?;
        Ok(FormatAccess::new(inner))
    }

    async fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ChainStorage> {
        let name = opts.get_filename().ok_or_else(|| io::Error::other("no file name"))?;
        if let Some(uri) = name.to_str().filter(|n| is_nbd_uri(n)) {
            return self.open_nbd(uri, opts.get_writable()).await;
        }
        if self.nbd_in_chain {
            let top = self.chain.first().map(|p| p.display().to_string()).unwrap_or_default();
            return Err(self.refuse(Refusal::error(
                "NBD_BACKING_UNSUPPORTED",
                format!(
                    "{top}: the qcow2 image on the NBD server names the backing file {}, a path                      on the server's machine, which blockfuse cannot open; let the server open                      the chain (qemu-nbd -f qcow2, or qemu-storage-daemon) and export its disk                      with format raw, or rebase the image onto no backing file (qemu-img                      convert)",
                    name.display()
                ),
            )));
        }
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
        let writable = opts.get_writable();
        let file = ImageFile::open(opts).await?;
        // Backing files come read-only; an external data file comes writable with the image.
        let perms = Perms::image(writable, self.force_share);
        match ImageLock::acquire(&file.path, perms, self.locking) {
            Ok(lock) => self.locks.lock().unwrap_or_else(|p| p.into_inner()).push(lock),
            Err(e) => {
                let locked = matches!(e, LockError::Locked(_));
                let e = io::Error::from(e);
                if locked {
                    let copy = Refusal::error("IMAGE_LOCKED", e.to_string());
                    *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(copy);
                }
                return Err(e);
            }
        }
        let mut storage = ChainStorage::new(Medium::File(file), false);
        storage.hide_dirty_and_corrupt(&self.window, writable).await;
        Ok(storage)
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
