//! An NBD export as the medium of a qcow2 image (imago's storage, through
//! `qcow2_storage::ChainStorage`): a qcow2 file served raw (`nbdkit file`, `qemu-nbd -f raw`)
//! exported as the disk inside it. Every request goes through [`NbdBackend`], so the client's
//! properties hold here too: block-size limits honoured when splitting, timeouts, reconnects,
//! one connection per queue with multi-conn, and no reply taken as good that was not checked.
//!
//! An NBD export has a fixed size: the image cannot grow past it. A write, zeroing or resize
//! that would need more room fails with ENOSPC and sends nothing.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;

use super::NbdBackend;
use crate::backend::BlockBackend;

/// The NBD export's bytes as imago's storage. Cloning shares the connection(s).
#[derive(Clone)]
pub struct NbdStorage {
    backend: Arc<NbdBackend>,
    /// The URI, for messages.
    uri: Arc<str>,
    helper: Arc<CommonStorageHelper>,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl NbdStorage {
    pub fn new(backend: NbdBackend, uri: &str) -> Self {
        NbdStorage {
            backend: Arc::new(backend),
            uri: uri.into(),
            helper: Arc::new(CommonStorageHelper::default()),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn backend(&self) -> &NbdBackend {
        &self.backend
    }

    /// Fails with ENOSPC unless `[offset, offset + len)` lies inside the export.
    fn inside(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.backend.len() => Ok(()),
            _ => Err(enospc()),
        }
    }

    /// The block-aligned range `[start, end)` covering `[offset, offset + len)`, clipped to the
    /// export's end.
    fn covering(&self, offset: u64, len: u64) -> (u64, u64) {
        let min = u64::from(self.backend.alignment().max(1));
        let start = offset / min * min;
        let end = (offset + len).next_multiple_of(min).min(self.backend.len());
        (start, end)
    }

    /// Reads `buf` at `offset` (any alignment: padded to the server's minimum block size); the
    /// range must lie inside the export. For the backend's own header and metadata reads.
    pub async fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inside(offset, buf.len() as u64).map_err(|_| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("{}: read past the end", self.uri))
        })?;
        let (start, end) = self.covering(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            return self.backend.read_at(buf, offset).await;
        }
        let mut block = vec![0u8; (end - start) as usize];
        self.backend.read_at(&mut block, start).await?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&block[at..at + buf.len()]);
        Ok(())
    }

    /// Writes `buf` at `offset` (read-modify-write of the covering blocks when it is not
    /// aligned to the server's minimum block size) and flushes it to the server's stable
    /// storage. Only for the corrupt bit, written once no other write may run.
    pub async fn write_durably(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inside(offset, buf.len() as u64)?;
        let (start, end) = self.covering(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            self.backend.write_at(buf, offset).await?;
        } else {
            let mut block = vec![0u8; (end - start) as usize];
            self.backend.read_at(&mut block, start).await?;
            let at = (offset - start) as usize;
            block[at..at + buf.len()].copy_from_slice(buf);
            self.backend.write_at(&block, start).await?;
        }
        self.backend.flush().await
    }

    pub fn mem_align(&self) -> usize {
        1
    }

    /// The server's minimum block size (imago pads and splits requests to it).
    pub fn req_align(&self) -> usize {
        self.backend.alignment().max(1) as usize
    }

    pub fn size(&self) -> io::Result<u64> {
        Ok(self.backend.len())
    }

    /// A backing file named by an image on an NBD server: only another NBD URI can be reached
    /// (the name is the server machine's path otherwise); the chain gate refuses the rest.
    pub fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        Ok(relative.as_ref().to_path_buf())
    }

    pub fn filename(&self) -> Option<PathBuf> {
        None
    }

    /// Fills the buffers from `offset`; what lies past the export's end reads as zeros (as a
    /// file's bytes past EOF do).
    pub async fn readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let size = self.backend.len();
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            let n = slice.len() as u64;
            let inside = size.saturating_sub(pos).min(n) as usize;
            self.backend.read_at(&mut slice[..inside], pos).await?;
            slice[inside..].fill(0);
            pos += n;
        }
        Ok(())
    }

    pub async fn writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        self.inside(offset, bufv.len())?;
        let mut pos = offset;
        for slice in bufv.into_inner() {
            self.backend.write_at(&slice, pos).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    /// Zeros that may deallocate (NBD_CMD_WRITE_ZEROES without NO_HOLE).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inside(offset, len)?;
        self.backend.write_zeroes(offset, len, true).await
    }

    /// Zeros that stay allocated (NO_HOLE).
    pub async fn write_allocated_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inside(offset, len)?;
        self.backend.write_zeroes(offset, len, false).await
    }

    /// A discard may leave any content, so it is a deallocating zeroing where the server can
    /// deallocate, and nothing elsewhere (writing zeros would only cost).
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.backend.len();
        if offset >= size || !self.backend.can_unmap() {
            return Ok(());
        }
        let len = len.min(size - offset);
        let min = u64::from(self.backend.alignment().max(1));
        // Only whole blocks of the server's minimum size.
        let start = offset.next_multiple_of(min);
        let end = (offset + len) / min * min;
        if start >= end {
            return Ok(());
        }
        self.backend.write_zeroes(start, end - start, true).await
    }

    /// NBD_CMD_FLUSH (skipped by the backend when nothing was written since the last one).
    pub async fn sync(&self) -> io::Result<()> {
        self.backend.flush().await
    }

    pub fn helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    /// The export's size is the server's: shrinking leaves the tail as it is (harmless: imago
    /// no longer references it), growing fails with ENOSPC.
    pub async fn resize(&self, new_size: u64, _prealloc: PreallocateMode) -> io::Result<()> {
        if new_size > self.backend.len() {
            return Err(enospc());
        }
        Ok(())
    }
}

impl fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdStorage").field("uri", &self.uri).finish()
    }
}

impl fmt::Display for NbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}
