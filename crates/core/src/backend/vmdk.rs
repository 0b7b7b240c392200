//! The vmdk backend, read-only, through imago's VMDK driver: a descriptor file with FLAT (raw)
//! and ZERO extents (`qemu-img create -f vmdk -o subformat=monolithicFlat`). imago reads no
//! sparse extents (`monolithicSparse`, the `KDMV` header) and writes no VMDK at all, so writable
//! exports and sparse images are refused at open with the reason.
//!
//! imago's own file storage does plain positional I/O; a vmdk export's queue thread waits on
//! the disk for its reads (the raw and qcow2 backends use the queue's io_uring instead).

use std::io;
use std::path::Path;

use imago::format::gate::PermissiveImplicitOpenGate;
use imago::vmdk::Vmdk;
use imago::{FormatAccess, FormatDriverBuilder};

use super::lock::{ImageLock, LockMode, Perms};
use super::{BlockBackend, Extent};

pub struct VmdkBackend {
    image: FormatAccess<imago::file::File>,
    len: u64,
    /// A read lock on the descriptor file.
    _lock: ImageLock,
}

impl VmdkBackend {
    /// Opens the descriptor at `path` and its extents read-only. Runs on a thread of its own, so
    /// it works from any context.
    pub fn open(path: &Path, locking: LockMode, force_share: bool) -> io::Result<Self> {
        let lock = ImageLock::acquire(path, Perms::image(false, force_share), locking)?;
        let path = path.to_path_buf();
        let image = std::thread::scope(|s| {
            let opener = std::thread::Builder::new()
                .name("blockfuse-vmdk-open".into())
                .spawn_scoped(s, || {
                    let rt = tokio::runtime::Builder::new_current_thread().build()?;
                    rt.block_on(async {
                        // Extent files are named by the descriptor, as QEMU opens them.
                        let vmdk = Vmdk::<imago::file::File>::builder_path(&path)
                            .write(false)
                            .open(PermissiveImplicitOpenGate::default())
                            .await?;
                        Ok::<_, io::Error>(FormatAccess::new(vmdk))
                    })
                })?;
            opener.join().unwrap_or_else(|_| Err(io::Error::other("opening the image panicked")))
        })?;
        Ok(VmdkBackend { len: image.size(), image, _lock: lock })
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl BlockBackend for VmdkBackend {
    fn len(&self) -> u64 {
        self.len
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn optimal_transfer(&self) -> u32 {
        64 << 10
    }
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read(buf, offset).await
    }
    async fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(read_only())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn truncate(&self, _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        // FLAT extents are data throughout (as a raw backing file is for qcow2).
        Ok(Extent::Data(self.len - offset))
    }
    fn can_unmap(&self) -> bool {
        false
    }
}
