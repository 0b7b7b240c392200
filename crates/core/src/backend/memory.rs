//! An in-memory backend for handler tests: a growable byte vector behind a lock.

use std::io;
use std::sync::Mutex;

use super::{BlockBackend, Extent};

#[derive(Default)]
pub struct MemoryBackend {
    data: Mutex<Vec<u8>>,
    flushes: std::sync::atomic::AtomicU64,
}

impl MemoryBackend {
    pub fn new(data: Vec<u8>) -> Self {
        MemoryBackend { data: Mutex::new(data), ..Default::default() }
    }
    /// A copy of the current content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
    /// How often `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn range(offset: u64, len: usize, total: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let end = start.checked_add(len).filter(|&e| e <= total);
    end.map(|e| start..e).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

impl BlockBackend for MemoryBackend {
    fn len(&self) -> u64 {
        self.lock().len() as u64
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn optimal_transfer(&self) -> u32 {
        512
    }
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let r = range(offset, buf.len(), data.len())?;
        buf.copy_from_slice(&data[r]);
        Ok(())
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let total = data.len();
        let r = range(offset, buf.len(), total)?;
        data[r].copy_from_slice(buf);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn truncate(&self, new_len: u64, _preallocate: bool) -> io::Result<()> {
        let n = usize::try_from(new_len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.lock().resize(n, 0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let mut data = self.lock();
        let total = data.len();
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let r = range(offset, len, total)?;
        data[r].fill(0);
        Ok(())
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        Ok(Extent::Data(self.len().saturating_sub(offset).max(1)))
    }
    fn can_unmap(&self) -> bool {
        false
    }
}
