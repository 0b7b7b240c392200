//! The qcow2 metadata a guest write must never overwrite (QEMU's `qcow2_check_metadata_overlap`
//! with its default checks): header, active L1 table, refcount table, refcount blocks, active L2
//! tables, snapshot table and the snapshots' L1 tables. Read from the image file at open and again
//! whenever the qcow2 backend learns that imago wrote the L1 or refcount table (a new L2 table or
//! refcount block). New metadata comes from clusters the refcounts say are free, which is why a
//! writable open refuses an image whose metadata clusters have refcount 0. Pure reads with
//! positional I/O through [`ReadAt`] (a local file, or an image on an NBD server); no imago.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positional reads of the image's bytes, outside imago (its caches are not consulted).
#[allow(async_fn_in_trait)]
pub trait ReadAt {
    /// Fills `buf` from `offset`; short data is an error.
    async fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    async fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// QEMU's limits (block/qcow2.h) and its reasons for refusing images beyond them.
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
const MAX_L1_SIZE: u64 = 32 << 20;
const MAX_SNAPSHOTS: u64 = 65536;
const MAX_SNAPSHOTS_SIZE: u64 = 1024 * MAX_SNAPSHOTS;
const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;

/// Bits 9..=55 of L1, L2 and refcount table entries hold the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The header fields this module needs (validated by the caller: magic, version, cluster bits).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub refcount_order: u32,
}

impl Layout {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// What QEMU refuses at open as too large, with QEMU's words.
    pub fn check_limits(&self) -> Result<(), String> {
        if u64::from(self.refcount_table_clusters) > MAX_REFTABLE_SIZE >> self.cluster_bits {
            return Err("Reference count table too large".into());
        }
        if u64::from(self.nb_snapshots) > MAX_SNAPSHOTS {
            return Err("Snapshot table too large".into());
        }
        if u64::from(self.l1_size) > MAX_L1_SIZE / 8 {
            return Err("Active L1 table too large".into());
        }
        // QEMU: the L1 index of the VM state (one past the disk) must fit an int.
        let per_l1 = 1u64 << (2 * self.cluster_bits - 3);
        if self.size.div_ceil(per_l1) > i32::MAX as u64 {
            return Err("Image is too big".into());
        }
        Ok(())
    }
}

/// Kinds of metadata, named as in QEMU's "Preventing invalid write on metadata (overlaps with
/// ...)" message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2_header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::InactiveL1 => "inactive L1 table",
        }
    }
}

/// Every metadata cluster of the image, by host cluster index.
#[derive(Debug)]
pub struct MetadataMap {
    cluster_bits: u32,
    clusters: HashMap<u64, Kind>,
}

async fn read_u64s(file: &impl ReadAt, offset: u64, count: u64) -> io::Result<Vec<u64>> {
    let mut buf = vec![0u8; (count * 8) as usize];
    file.read_exact_at(&mut buf, offset).await?;
    Ok(buf.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).collect())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl MetadataMap {
    /// Reads the metadata layout of the image in `file`. Refuses (with QEMU's reason) a snapshot
    /// table QEMU would refuse.
    pub async fn read(file: &impl ReadAt, l: &Layout) -> io::Result<Self> {
        let cs = l.cluster_size();
        let mut map = MetadataMap { cluster_bits: l.cluster_bits, clusters: HashMap::new() };
        map.add(0, cs, Kind::Header);
        let l1_bytes = u64::from(l.l1_size) * 8;
        map.add(l.l1_offset, l1_bytes, Kind::ActiveL1);
        let rt_bytes = u64::from(l.refcount_table_clusters) * cs;
        map.add(l.refcount_table_offset, rt_bytes, Kind::RefcountTable);
        for e in read_u64s(file, l.refcount_table_offset, rt_bytes / 8).await? {
            let off = e & !0x1ff;
            if off != 0 {
                map.add(off, cs, Kind::RefcountBlock);
            }
        }
        for e in read_u64s(file, l.l1_offset, u64::from(l.l1_size)).await? {
            let off = e & OFFSET_MASK;
            if off != 0 {
                map.add(off, cs, Kind::ActiveL2);
            }
        }
        if l.nb_snapshots > 0 {
            let mut pos = l.snapshots_offset;
            for _ in 0..l.nb_snapshots {
                let mut e = [0u8; 40];
                file.read_exact_at(&mut e, pos).await?;
                let be64 = |a: usize| u64::from_be_bytes(e[a..a + 8].try_into().unwrap());
                let be32 =
                    |a: usize| u64::from(u32::from_be_bytes(e[a..a + 4].try_into().unwrap()));
                let be16 = |a: usize| u64::from(u16::from_be_bytes([e[a], e[a + 1]]));
                let (l1_offset, l1_size) = (be64(0), be32(8));
                let extra = be32(36);
                if extra > MAX_SNAPSHOT_EXTRA_DATA {
                    return Err(invalid("Too much extra metadata in snapshot table entry".into()));
                }
                if l1_size > MAX_L1_SIZE / 8 {
                    return Err(invalid("Snapshot L1 table too large".into()));
                }
                map.add(l1_offset, l1_size * 8, Kind::InactiveL1);
                pos += (40 + extra + be16(12) + be16(14)).next_multiple_of(8);
                if pos - l.snapshots_offset > MAX_SNAPSHOTS_SIZE {
                    return Err(invalid("Snapshot table too large".into()));
                }
            }
            map.add(l.snapshots_offset, pos - l.snapshots_offset, Kind::SnapshotTable);
        }
        Ok(map)
    }

    fn add(&mut self, offset: u64, len: u64, kind: Kind) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for c in first..=last {
            // The first kind found wins; the header outranks everything (as in QEMU's order).
            self.clusters.entry(c).or_insert(kind);
        }
    }

    /// The metadata a write of `len` bytes at host offset `offset` would touch (whole clusters,
    /// as QEMU checks them).
    pub fn overlap(&self, offset: u64, len: u64) -> Option<Kind> {
        if len == 0 {
            return None;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        (first..=last).find_map(|c| self.clusters.get(&c).copied())
    }

    /// The first metadata cluster whose refcount is 0: new data or metadata could be allocated
    /// over it, so such an image must not be written.
    pub async fn unreferenced(
        &self,
        file: &impl ReadAt,
        l: &Layout,
    ) -> io::Result<Option<(u64, Kind)>> {
        let cs = l.cluster_size();
        let bits = 1u64 << l.refcount_order;
        let per_block = cs * 8 / bits;
        let rt =
            read_u64s(file, l.refcount_table_offset, u64::from(l.refcount_table_clusters) * cs / 8)
                .await?;
        let mut blocks: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut sorted: Vec<_> = self.clusters.iter().map(|(&c, &k)| (c, k)).collect();
        sorted.sort_unstable_by_key(|&(c, _)| c);
        for (c, kind) in sorted {
            let block_off = rt.get((c / per_block) as usize).map_or(0, |e| e & !0x1ff);
            let refcount = if block_off == 0 {
                0
            } else {
                if let std::collections::hash_map::Entry::Vacant(v) = blocks.entry(block_off) {
                    let mut buf = vec![0u8; cs as usize];
                    file.read_exact_at(&mut buf, block_off).await?;
                    v.insert(buf);
                }
                refcount_at(&blocks[&block_off], c % per_block, bits)
            };
            if refcount == 0 {
                return Ok(Some((c << self.cluster_bits, kind)));
            }
        }
        Ok(None)
    }
}

/// Entry `index` of a refcount block with `bits`-bit big-endian entries.
fn refcount_at(block: &[u8], index: u64, bits: u64) -> u64 {
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        block[at..at + bytes].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        // Sub-byte entries are packed starting from the least significant bit.
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width() {
        let block = [0x12u8, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
        assert_eq!(refcount_at(&block, 0, 16), 0x1234);
        assert_eq!(refcount_at(&block, 1, 16), 0x5678);
        assert_eq!(refcount_at(&block, 1, 32), 0x9abc_def0);
        assert_eq!(refcount_at(&block, 0, 64), 0x1234_5678_9abc_def0);
        assert_eq!(refcount_at(&block, 2, 8), 0x56);
        assert_eq!(refcount_at(&block, 0, 4), 0x2);
        assert_eq!(refcount_at(&block, 1, 4), 0x1);
        assert_eq!(refcount_at(&block, 0, 1), 0);
        assert_eq!(refcount_at(&block, 1, 1), 1);
    }

    #[test]
    fn overlap_is_by_whole_clusters() {
        let mut m = MetadataMap { cluster_bits: 16, clusters: HashMap::new() };
        m.add(0, 65536, Kind::Header);
        m.add(3 << 16, 8, Kind::ActiveL1);
        assert_eq!(m.overlap(100, 1), Some(Kind::Header));
        assert_eq!(m.overlap(1 << 16, 2 << 16), None);
        assert_eq!(m.overlap((3 << 16) + 4096, 512), Some(Kind::ActiveL1));
        assert_eq!(m.overlap((2 << 16) + 65535, 2), Some(Kind::ActiveL1));
    }

    #[test]
    fn limits_are_qemus() {
        let l = Layout {
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            refcount_order: 4,
        };
        assert!(l.check_limits().is_ok());
        let e = Layout { refcount_table_clusters: 129, ..l }.check_limits().unwrap_err();
        assert_eq!(e, "Reference count table too large");
        let e = Layout { nb_snapshots: 65537, ..l }.check_limits().unwrap_err();
        assert_eq!(e, "Snapshot table too large");
        let e = Layout { l1_size: (4 << 20) + 1, ..l }.check_limits().unwrap_err();
        assert_eq!(e, "Active L1 table too large");
        let e = Layout { cluster_bits: 9, size: 1 << 47, ..l }.check_limits().unwrap_err();
        assert_eq!(e, "Image is too big");
    }
}
