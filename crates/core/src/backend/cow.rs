//! The temporary copy-on-write overlay of `snapshot: true` (QEMU's `snapshot=on`, nbdkit's `cow`
//! filter): writes go to a sparse scratch file, reads of clusters never written come from the
//! source, which is opened read-only and never changes.
//!
//! The scratch file is created already unlinked (`O_TMPFILE`, or a unique name removed right
//! after creation where the file system has no `O_TMPFILE`), so nothing is left behind however
//! the process ends, kill -9 included. A bitmap says which clusters the overlay holds; a cluster
//! is copied up whole (the source's bytes around a partial write are read first), under a lock,
//! so two first writes to one cluster cannot undo each other. Once a cluster is copied, reads
//! and writes of it go straight to the scratch file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layer::{base, base_read};
use super::{Backend, BlockBackend, Extent, LockMode, RawBackend, RawOptions};

/// Copy-up granularity (QEMU's default qcow2 cluster size).
const CLUSTER: u64 = 64 << 10;

pub struct Cow {
    /// The scratch file, through the raw backend (io_uring on queue threads).
    overlay: RawBackend,
    /// One bit per cluster: set once the overlay holds the whole cluster.
    copied: Box<[AtomicU64]>,
    /// Held while a cluster is copied up.
    copy_up: tokio::sync::Mutex<()>,
    len: u64,
}

/// Where scratch files go: `$TMPDIR`, else `/var/tmp` (as QEMU: `/tmp` is often a RAM disk).
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("TMPDIR").filter(|d| !d.is_empty()).map_or("/var/tmp".into(), PathBuf::from)
}

/// Creates an unlinked scratch file in `dir`.
fn scratch_file(dir: &Path) -> io::Result<File> {
    let tmpfile = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match tmpfile {
        Ok(f) => Ok(f),
        // No O_TMPFILE here: a unique name, removed at once.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)) => {
            for attempt in 0u32..100 {
                let name =
                    dir.join(format!(".blockfuse-snapshot-{}-{attempt}", std::process::id()));
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&name)
                {
                    Ok(f) => {
                        std::fs::remove_file(&name)?;
                        return Ok(f);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free scratch file name"))
        }
        Err(e) => Err(e),
    }
}

impl Cow {
    /// An empty overlay of `len` bytes in `dir`.
    pub fn new(dir: &Path, len: u64) -> io::Result<Cow> {
        let scratch = scratch_file(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create the snapshot overlay in {} ({e}); set TMPDIR",
                    dir.display()
                ),
            )
        })?;
        scratch.set_len(len)?;
        // The raw backend opens by path: this process's descriptor of the unlinked file is one.
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", scratch.as_raw_fd()));
        let opts = RawOptions { writable: true, locking: LockMode::Off, ..Default::default() };
        let overlay = RawBackend::open(&by_fd, opts)?;
        let words = len.div_ceil(CLUSTER).div_ceil(64) as usize;
        Ok(Cow {
            overlay,
            copied: (0..words).map(|_| AtomicU64::new(0)).collect(),
            copy_up: tokio::sync::Mutex::new(()),
            len,
        })
    }

    fn is_copied(&self, cluster: u64) -> bool {
        let word = &self.copied[(cluster / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0
    }

    fn mark_copied(&self, cluster: u64) {
        self.copied[(cluster / 64) as usize].fetch_or(1 << (cluster % 64), Ordering::Release);
    }

    /// The end of the run of clusters from `offset`'s that are all copied (`copied`) or all not,
    /// capped at `end`.
    fn run_end(&self, offset: u64, end: u64, copied: bool) -> u64 {
        let mut cluster = offset / CLUSTER + 1;
        while cluster * CLUSTER < end && self.is_copied(cluster) == copied {
            cluster += 1;
        }
        (cluster * CLUSTER).min(end)
    }

    pub async fn read_at(&self, base: &Backend, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let copied = self.is_copied(pos / CLUSTER);
            let run_end = self.run_end(pos, end, copied);
            let chunk = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if copied {
                self.overlay.read_at(chunk, pos).await?;
            } else {
                base_read(base, chunk, pos).await?;
            }
            pos = run_end;
        }
        Ok(())
    }

    pub async fn write_at(&self, base: &Backend, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let cluster = pos / CLUSTER;
            if self.is_copied(cluster) {
                let run_end = self.run_end(pos, end, true);
                let chunk = &buf[(pos - offset) as usize..(run_end - offset) as usize];
                self.overlay.write_at(chunk, pos).await?;
                pos = run_end;
                continue;
            }
            let part_end = ((cluster + 1) * CLUSTER).min(end);
            let part = &buf[(pos - offset) as usize..(part_end - offset) as usize];
            self.write_uncopied(base, cluster, part, pos).await?;
            pos = part_end;
        }
        Ok(())
    }

    /// Writes `part` (inside one cluster) to a cluster that was not copied when looked at.
    async fn write_uncopied(
        &self,
        base: &Backend,
        cluster: u64,
        part: &[u8],
        pos: u64,
    ) -> io::Result<()> {
        let _turn = self.copy_up.lock().await;
        if self.is_copied(cluster) {
            // Copied by another writer meanwhile.
            return self.overlay.write_at(part, pos).await;
        }
        let start = cluster * CLUSTER;
        let end = (start + CLUSTER).min(self.len);
        if pos == start && pos + part.len() as u64 == end {
            self.overlay.write_at(part, pos).await?;
        } else {
            // First write to this cluster covers part of it: the rest comes from the source.
            let mut whole = vec![0u8; (end - start) as usize];
            base_read(base, &mut whole, start).await?;
            let at = (pos - start) as usize;
            whole[at..at + part.len()].copy_from_slice(part);
            self.overlay.write_at(&whole, start).await?;
        }
        self.mark_copied(cluster);
        Ok(())
    }

    pub async fn write_zeroes(
        &self,
        base: &Backend,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> io::Result<()> {
        let end = offset + len;
        // Whole clusters are zeroed in the overlay; partial ones at either end take the write
        // path (their other bytes may come from the source).
        let first_whole = offset.next_multiple_of(CLUSTER);
        let last_whole = if end == self.len { end } else { end / CLUSTER * CLUSTER };
        if first_whole >= last_whole {
            return self.write_at(base, &vec![0u8; len as usize], offset).await;
        }
        if offset < first_whole {
            let head = vec![0u8; (first_whole - offset) as usize];
            self.write_at(base, &head, offset).await?;
        }
        {
            let _turn = self.copy_up.lock().await;
            self.overlay.write_zeroes(first_whole, last_whole - first_whole, unmap).await?;
            let mut cluster = first_whole / CLUSTER;
            while cluster * CLUSTER < last_whole {
                self.mark_copied(cluster);
                cluster += 1;
            }
        }
        if last_whole < end {
            let tail = vec![0u8; (end - last_whole) as usize];
            self.write_at(base, &tail, last_whole).await?;
        }
        Ok(())
    }

    pub async fn extent_at(&self, base: &Backend, offset: u64) -> io::Result<Extent> {
        let copied = self.is_copied(offset / CLUSTER);
        let run_end = self.run_end(offset, self.len, copied);
        let extent = if copied {
            // The scratch file's own holes are zeros the overlay holds (zeroed clusters).
            self.overlay.extent_at(offset).await?
        } else {
            base!(base, b => b.extent_at(offset).await)?
        };
        let cap = run_end - offset;
        Ok(match extent {
            Extent::Data(n) => Extent::Data(n.min(cap)),
            Extent::Hole(n) => Extent::Hole(n.min(cap)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    /// A base of 3.5 clusters, each byte its offset's low bits; the overlay over it.
    fn setup() -> (Backend, Cow, Vec<u8>) {
        let len = 3 * CLUSTER as usize + CLUSTER as usize / 2;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let base = Backend::Memory(MemoryBackend::new(data.clone()));
        let cow = Cow::new(&std::env::temp_dir(), len as u64).unwrap();
        (base, cow, data)
    }

    fn read_all(cow: &Cow, base: &Backend, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        block_on(cow.read_at(base, &mut out, 0)).unwrap();
        out
    }

    #[test]
    fn partial_writes_copy_up_the_rest_of_the_cluster_and_leave_the_base_alone() {
        let (base, cow, mut expected) = setup();
        // Across the first cluster boundary, and into the short last cluster.
        for (at, len, byte) in [(CLUSTER - 10, 20, 0xaa), (3 * CLUSTER + 5, 7, 0xbb)] {
            block_on(cow.write_at(&base, &vec![byte; len], at)).unwrap();
            expected[at as usize..at as usize + len].fill(byte);
        }
        assert_eq!(read_all(&cow, &base, expected.len()), expected);
        let Backend::Memory(m) = &base else { unreachable!() };
        assert_ne!(m.snapshot(), expected, "the base is never written");
        assert!(cow.is_copied(0) && cow.is_copied(1) && !cow.is_copied(2) && cow.is_copied(3));
    }

    #[test]
    fn zeroes_and_extents_combine_overlay_and_base() {
        let (base, cow, mut expected) = setup();
        // Whole cluster 1 punched, with partial edges in clusters 0 and 2.
        let (at, len) = (CLUSTER - 100, CLUSTER + 200);
        block_on(cow.write_zeroes(&base, at, len, true)).unwrap();
        expected[at as usize..(at + len) as usize].fill(0);
        assert_eq!(read_all(&cow, &base, expected.len()), expected);
        // Cluster 1 is a hole in the scratch file; the memory base is data throughout.
        assert_eq!(block_on(cow.extent_at(&base, CLUSTER)).unwrap(), Extent::Hole(CLUSTER));
        assert_eq!(block_on(cow.extent_at(&base, 3 * CLUSTER)).unwrap(), Extent::Data(CLUSTER / 2));
    }
}
