//! Format probing for `format: auto`, and the guard that keeps a probed raw image raw: a write
//! that would make its first sector look like another image format is refused (QEMU's
//! `raw_co_pwritev` rule for probed images). Why: see docs/formats.md.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{BlockBackend, Extent, RawBackend};

/// The first sector: what probing reads, and what the guard protects.
pub const PROBE_SECTOR: u64 = 512;

/// The qcow2 magic, "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// What the header of an image says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    Raw,
    Qcow2,
    /// A format we recognise but cannot serve (its name).
    Other(&'static str),
}

/// Magic strings at offset 0 of the formats QEMU's probes recognise (and imago's vmdk).
const MAGICS: &[(&[u8], &str)] = &[
    (b"QED\0", "qed"),
    (b"KDMV", "vmdk"),
    (b"COWD", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
];

/// VDI keeps its signature at byte 0x40 (little-endian 0xbeda107f).
const VDI_SIGNATURE_AT: usize = 0x40;
const VDI_SIGNATURE: [u8; 4] = 0xbeda_107f_u32.to_le_bytes();

/// Classifies the first bytes of an image (up to one sector; fewer for a tiny file).
pub fn probe_header(head: &[u8]) -> Probed {
    if head.starts_with(&QCOW2_MAGIC) {
        // Versions 2 and 3 are qcow2; 1 is the old qcow, which we cannot read.
        let version = head.get(4..8).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(1) => Probed::Other("qcow"),
            _ => Probed::Qcow2,
        };
    }
    if let Some(&(_, name)) = MAGICS.iter().find(|(magic, _)| head.starts_with(magic)) {
        return Probed::Other(name);
    }
    if head.get(VDI_SIGNATURE_AT..VDI_SIGNATURE_AT + 4) == Some(&VDI_SIGNATURE[..]) {
        return Probed::Other("vdi");
    }
    Probed::Raw
}

/// Reads the first sector of `path` and classifies it.
pub fn probe_file(path: &Path) -> io::Result<Probed> {
    let mut head = Vec::with_capacity(PROBE_SECTOR as usize);
    File::open(path)?.take(PROBE_SECTOR).read_to_end(&mut head)?;
    Ok(probe_header(&head))
}

/// A raw image that was found by probing. Writes touching the first sector are serialised and
/// checked: one that would leave a sector that probes as anything but raw fails with EPERM.
/// Everything else goes straight to the raw backend.
pub struct ProbedRaw<B = RawBackend> {
    inner: B,
    /// Held across check and write, so two partial writes cannot assemble a magic together.
    first_sector: tokio::sync::Mutex<()>,
    warned: AtomicBool,
}

impl<B: BlockBackend> ProbedRaw<B> {
    /// The backend whose first sector this one guards.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn new(inner: B) -> Self {
        ProbedRaw {
            inner,
            first_sector: tokio::sync::Mutex::new(()),
            warned: AtomicBool::new(false),
        }
    }

    async fn guarded_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _turn = self.first_sector.lock().await;
        let sector_len = PROBE_SECTOR.min(self.inner.len()) as usize;
        let mut sector = [0u8; PROBE_SECTOR as usize];
        let align = u64::from(self.inner.alignment());
        if align > PROBE_SECTOR {
            // The backend reads whole blocks only (an NBD server's minimum block size).
            let mut block = vec![0u8; align.min(self.inner.len()) as usize];
            self.inner.read_at(&mut block, 0).await?;
            sector[..sector_len].copy_from_slice(&block[..sector_len]);
        } else {
            self.inner.read_at(&mut sector[..sector_len], 0).await?;
        }
        // `offset` < 512 here; overlay the part of `buf` that lands in the first sector.
        let start = offset as usize;
        let n = buf.len().min(PROBE_SECTOR as usize - start);
        let end = (start + n).max(sector_len);
        sector[start..start + n].copy_from_slice(&buf[..n]);
        let format = match probe_header(&sector[..end]) {
            Probed::Raw => None,
            Probed::Qcow2 => Some("qcow2"),
            Probed::Other(name) => Some(name),
        };
        if let Some(format) = format {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "refused a write to the first sector of a probed raw image: it would make \
                     the image look like {format}; export with --format raw (format: 'raw') to \
                     allow such writes"
                );
            } else {
                log::debug!("refused another write that would make the image look like {format}");
            }
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.write_at(buf, offset).await
    }
}

impl<B: BlockBackend> BlockBackend for ProbedRaw<B> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn alignment(&self) -> u32 {
        self.inner.alignment()
    }
    fn optimal_transfer(&self) -> u32 {
        self.inner.optimal_transfer()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Only writes touching the first sector pay for the check.
        if offset < PROBE_SECTOR && !buf.is_empty() {
            return self.guarded_write(buf, offset).await;
        }
        self.inner.write_at(buf, offset).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()> {
        self.inner.truncate(new_len, preallocate).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // Zeros never form a magic.
        self.inner.write_zeroes(offset, len, unmap).await
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        self.inner.extent_at(offset).await
    }
    fn can_unmap(&self) -> bool {
        self.inner.can_unmap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RawOptions;

    fn sector(prefix: &[u8]) -> Vec<u8> {
        let mut s = prefix.to_vec();
        s.resize(512, 0);
        s
    }

    #[test]
    fn probe_recognises_qcow2_v2_and_v3() {
        assert_eq!(probe_header(&sector(b"QFI\xfb\0\0\0\x02")), Probed::Qcow2);
        assert_eq!(probe_header(&sector(b"QFI\xfb\0\0\0\x03")), Probed::Qcow2);
        // A bare magic (a 4-byte file) is still qcow2 as far as probing goes.
        assert_eq!(probe_header(b"QFI\xfb"), Probed::Qcow2);
        assert_eq!(probe_header(&sector(b"QFI\xfb\0\0\0\x01")), Probed::Other("qcow"));
    }

    #[test]
    fn probe_calls_everything_else_raw() {
        assert_eq!(probe_header(&[]), Probed::Raw);
        assert_eq!(probe_header(b"QFI"), Probed::Raw);
        assert_eq!(probe_header(&sector(b"")), Probed::Raw);
        assert_eq!(probe_header(&sector(b"\xeb\x63\x90MBR")), Probed::Raw);
        assert_eq!(probe_header(&sector(b"xQFI\xfb")), Probed::Raw);
    }

    #[test]
    fn probe_recognises_other_formats() {
        assert_eq!(probe_header(&sector(b"KDMV")), Probed::Other("vmdk"));
        assert_eq!(probe_header(&sector(b"QED\0")), Probed::Other("qed"));
        assert_eq!(probe_header(&sector(b"vhdxfile")), Probed::Other("vhdx"));
        let mut vdi = sector(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe_header(&vdi), Probed::Other("vdi"));
    }

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_raw(name: &str, content: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "blockfuse-probe-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }

    fn guarded(file: &TempFile) -> ProbedRaw {
        let opts = RawOptions { writable: true, ..Default::default() };
        ProbedRaw::new(RawBackend::open(&file.0, opts).unwrap())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn first_sector_guard_refuses_a_magic() {
        let file = temp_raw("magic", &[0u8; 4096]);
        let b = guarded(&file);
        let err = block_on(b.write_at(b"QFI\xfb\0\0\0\x03", 0)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // Nothing was written.
        assert_eq!(std::fs::read(&file.0).unwrap(), vec![0u8; 4096]);
        // A vmdk magic is refused too.
        let err = block_on(b.write_at(b"KDMV", 0)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn first_sector_guard_sees_what_partial_writes_assemble() {
        let file = temp_raw("partial", &[0u8; 4096]);
        let b = guarded(&file);
        // "QF" alone is harmless; "I\xfb" after it would complete the magic.
        block_on(b.write_at(b"QF", 0)).unwrap();
        let err = block_on(b.write_at(b"I\xfb", 2)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // A write that straddles the sector end is checked on its first-sector part only.
        let mut big = vec![0xabu8; 1024];
        block_on(b.write_at(&big, 256)).unwrap();
        big[..4].copy_from_slice(b"QFI\xfb");
        let err = block_on(b.write_at(&big, 0)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn first_sector_guard_lets_ordinary_writes_through() {
        let file = temp_raw("ordinary", &[0u8; 4096]);
        let b = guarded(&file);
        block_on(b.write_at(&sector(b"\xeb\x63\x90 an MBR"), 0)).unwrap();
        // Past the first sector nothing is checked: a magic there is just data.
        block_on(b.write_at(b"QFI\xfb", 512)).unwrap();
        let data = std::fs::read(&file.0).unwrap();
        assert_eq!(&data[..3], b"\xeb\x63\x90");
        assert_eq!(&data[512..516], b"QFI\xfb");
    }

    #[test]
    fn first_sector_guard_on_a_tiny_image() {
        let file = temp_raw("tiny", &[0u8; 2]);
        let b = guarded(&file);
        block_on(b.write_at(b"QF", 0)).unwrap();
        assert_eq!(std::fs::read(&file.0).unwrap(), b"QF");
    }
}
