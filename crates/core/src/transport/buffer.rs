//! A queue worker's receive buffer: sized for the largest request and laid out so that a WRITE's
//! payload lands page-aligned (usable for O_DIRECT without a bounce copy).

use crate::aligned::AlignedBuf;
use crate::protocol::abi::{size, FUSE_MIN_READ_BUFFER};

/// One allocation at start-up, reused for every request the worker handles:
///
/// ```text
/// [ slack | ... header + fuse_write_in (80 bytes) | payload / READ data (max_write) ]
///                                                 ^ page-aligned `data_start`
/// ```
/// A read from /dev/fuse fills `[data_start - 80, data_start + max_write)`: requests are
/// contiguous, and a WRITE's payload starts exactly at `data_start`.
pub struct RequestBuffer {
    mem: AlignedBuf,
    data_len: usize,
}

impl RequestBuffer {
    pub fn new(max_write: usize, page: usize) -> Self {
        // The kernel refuses reads into buffers smaller than FUSE_MIN_READ_BUFFER.
        let data_len = max_write.max(FUSE_MIN_READ_BUFFER);
        let mem = AlignedBuf::with_skew(size::WRITE_PREFIX + data_len, page, size::WRITE_PREFIX);
        RequestBuffer { mem, data_len }
    }

    /// Where the next request is read to.
    pub fn receive_area(&mut self) -> &mut [u8] {
        self.mem.as_mut_slice()
    }

    /// The request just received, `n` bytes long.
    pub fn request(&self, n: usize) -> &[u8] {
        &self.mem.as_slice()[..n]
    }

    /// The aligned data area: a WRITE's payload, or room for READ data.
    pub fn data(&mut self) -> &mut [u8] {
        &mut self.mem.as_mut_slice()[size::WRITE_PREFIX..size::WRITE_PREFIX + self.data_len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_payload_is_page_aligned_and_contiguous_with_the_header() {
        let mut b = RequestBuffer::new(1 << 20, 4096);
        assert_eq!(b.receive_area().len(), size::WRITE_PREFIX + (1 << 20));
        let area = b.receive_area().as_ptr() as usize;
        let data = b.data().as_ptr() as usize;
        assert_eq!(data % 4096, 0);
        assert_eq!(data - area, size::WRITE_PREFIX);
    }

    #[test]
    fn small_max_write_still_meets_the_kernel_minimum() {
        let mut b = RequestBuffer::new(4096, 4096);
        assert!(b.receive_area().len() >= FUSE_MIN_READ_BUFFER);
    }
}
