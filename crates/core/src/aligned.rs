//! Heap buffers whose start is aligned (O_DIRECT needs it), without unsafe: over-allocate and
//! start at the first aligned byte.

pub struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeroed bytes starting at a multiple of `align` (a power of two) plus `skew`: the
    /// byte at index `skew` is the aligned one.
    pub fn with_skew(len: usize, align: usize, skew: usize) -> Self {
        let align = align.max(1);
        let mem = vec![0u8; len + align + skew];
        let base = mem.as_ptr() as usize;
        let start = (base + skew).next_multiple_of(align) - base - skew;
        AlignedBuf { mem, start, len }
    }

    pub fn new(len: usize, align: usize) -> Self {
        Self::with_skew(len, align, 0)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_and_skewed_byte_are_aligned() {
        for align in [1usize, 512, 4096] {
            let mut b = AlignedBuf::new(10_000, align);
            assert_eq!(b.as_mut_slice().as_ptr() as usize % align, 0);
            assert_eq!(b.as_slice().len(), 10_000);
            let s = AlignedBuf::with_skew(5000, align, 80);
            assert_eq!((s.as_slice()[80..].as_ptr() as usize) % align, 0);
        }
    }
}
