//! The null backend: a fixed-size disk that reads zeros and drops writes (QEMU's null-co).
//! For benchmarks of the FUSE path without storage behind it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockBackend, Extent};

pub struct NullBackend {
    len: AtomicU64,
}

impl NullBackend {
    pub fn new(len: u64) -> Self {
        NullBackend { len: AtomicU64::new(len) }
    }
}

impl BlockBackend for NullBackend {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn optimal_transfer(&self) -> u32 {
        4096
    }
    fn allocated_bytes(&self) -> Option<u64> {
        Some(0)
    }
    async fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    async fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn truncate(&self, new_len: u64, _preallocate: bool) -> io::Result<()> {
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }
    async fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Ok(())
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        // Everything reads as zeros, but like null-co we report data, not holes.
        Ok(Extent::Data(self.len().saturating_sub(offset).max(1)))
    }
    fn can_unmap(&self) -> bool {
        false
    }
}
