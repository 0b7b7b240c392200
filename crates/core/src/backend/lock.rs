//! Image locks that interoperate with QEMU: the OFD byte-range locks of QEMU's `file-posix`
//! driver (`raw_apply_lock_bytes` / `raw_check_lock_bytes`). For each block permission bit `i`
//! a holder read-locks byte `100 + i`; for each permission it does not let others take, it
//! read-locks byte `200 + i`. Taking a permission means no one else holds `200 + i`; not
//! sharing it means no one else holds `100 + i`. Syscalls live in `sys`.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::sys;

/// QEMU's `BLK_PERM_*` bits (include/block/block-common.h); QEMU 7+ has these four.
pub const PERM_CONSISTENT_READ: u8 = 0x01;
pub const PERM_WRITE: u8 = 0x02;
pub const PERM_WRITE_UNCHANGED: u8 = 0x04;
pub const PERM_RESIZE: u8 = 0x08;
const PERM_BITS: u32 = 4;
const PERM_ALL: u8 = 0x0f;

const LOCK_PERM_BASE: u64 = 100;
const LOCK_SHARED_BASE: u64 = 200;

/// QEMU's `locking=` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Lock; where the file system has no OFD locks, warn and go on unlocked.
    #[default]
    Auto,
    /// Lock, and fail where that is impossible.
    On,
    /// Take no locks and check none.
    Off,
}

/// The permissions a file is held with, and those others may take beside us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub held: u8,
    pub shared: u8,
}

impl Perms {
    /// The exported image: a writable export holds write and resize and shares neither (QEMU's
    /// FUSE export with `writable=on,growable=on`); a read-only one holds consistent-read and,
    /// like `qemu-img`, shares neither write nor resize unless `force_share` (`qemu-img -U`).
    pub fn image(writable: bool, force_share: bool) -> Perms {
        if writable {
            Perms {
                held: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            }
        } else if force_share {
            Perms { held: PERM_CONSISTENT_READ, shared: PERM_ALL }
        } else {
            Perms {
                held: PERM_CONSISTENT_READ,
                shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            }
        }
    }

    /// A backing file: read, never written, and no one may write or resize it under us (QEMU's
    /// `bdrv_default_perms_for_cow`); with `force_share` everything is shared.
    pub fn backing(force_share: bool) -> Perms {
        Perms::image(false, force_share)
    }
}

/// QEMU's name of one permission bit (`bdrv_perm_names`).
fn perm_name(bit: u8) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

/// Another process holds the image in a way that conflicts with ours.
#[derive(Debug)]
pub struct Locked {
    pub path: PathBuf,
    /// QEMU's wording: `Failed to get "write" lock` or `Failed to get shared "write" lock`.
    pub what: String,
}

impl fmt::Display for Locked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; is another process using the image?", self.path.display(), self.what)
    }
}

impl std::error::Error for Locked {}

/// Why locking failed.
#[derive(Debug)]
pub enum LockError {
    /// A conflicting lock: the image is in use.
    Locked(Locked),
    /// The locks could not be taken at all (`locking: 'on'` only).
    Failed(io::Error),
}

impl From<LockError> for io::Error {
    fn from(e: LockError) -> io::Error {
        match e {
            LockError::Locked(l) => super::Refusal::error("IMAGE_LOCKED", l.to_string()),
            LockError::Failed(e) => e,
        }
    }
}

/// The locks on one file, released when dropped (closing the lock's own open file description
/// releases every OFD lock taken through it).
#[derive(Debug)]
pub struct ImageLock {
    file: Option<File>,
}

impl ImageLock {
    /// Takes `perms` on `path` as QEMU does: first our bytes, then the check for others' bytes,
    /// so two processes racing cannot both pass.
    pub fn acquire(path: &Path, perms: Perms, mode: LockMode) -> Result<ImageLock, LockError> {
        if mode == LockMode::Off {
            return Ok(ImageLock { file: None });
        }
        let file = File::open(path).map_err(|e| {
            LockError::Failed(io::Error::new(
                e.kind(),
                format!("cannot open {} to lock it: {e}", path.display()),
            ))
        })?;
        match take(&file, path, perms) {
            Ok(()) => Ok(ImageLock { file: Some(file) }),
            Err(LockError::Failed(e)) if mode == LockMode::Auto => {
                log::warn!(
                    "{}: cannot take image locks ({e}); the file system may not support OFD \
                     locks, so the image is served unlocked",
                    path.display()
                );
                Ok(ImageLock { file: None })
            }
            Err(LockError::Failed(e)) => Err(LockError::Failed(io::Error::new(
                e.kind(),
                format!(
                    "{e}; the file system may not support OFD locks (locking 'auto' serves such \
                     a file unlocked with a warning, 'off' takes no locks)"
                ),
            ))),
            Err(e) => Err(e),
        }
    }

    /// Whether locks are really held (false with `locking: 'off'` or the `auto` fallback).
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }
}

fn failed(path: &Path, what: &str, e: io::Error) -> LockError {
    LockError::Failed(io::Error::new(
        e.kind(),
        format!("{}: failed to {what}: {e}", path.display()),
    ))
}

fn take(file: &File, path: &Path, perms: Perms) -> Result<(), LockError> {
    let bits = (0..PERM_BITS).map(|i| (i as u64, 1u8 << i));
    for (i, bit) in bits.clone() {
        if perms.held & bit != 0 {
            sys::ofd_setlk(file, libc::F_RDLCK, LOCK_PERM_BASE + i, 1).map_err(|e| {
                lock_error(path, e, || format!("Failed to lock byte {}", LOCK_PERM_BASE + i))
            })?;
        }
        if perms.shared & bit == 0 {
            sys::ofd_setlk(file, libc::F_RDLCK, LOCK_SHARED_BASE + i, 1).map_err(|e| {
                lock_error(path, e, || format!("Failed to lock byte {}", LOCK_SHARED_BASE + i))
            })?;
        }
    }
    for (i, bit) in bits.clone() {
        if perms.held & bit != 0
            && sys::ofd_conflicts(file, libc::F_WRLCK, LOCK_SHARED_BASE + i, 1)
                .map_err(|e| failed(path, "test a lock", e))?
        {
            let what = format!("Failed to get \"{}\" lock", perm_name(bit));
            return Err(LockError::Locked(Locked { path: path.to_path_buf(), what }));
        }
    }
    for (i, bit) in bits {
        if perms.shared & bit == 0
            && sys::ofd_conflicts(file, libc::F_WRLCK, LOCK_PERM_BASE + i, 1)
                .map_err(|e| failed(path, "test a lock", e))?
        {
            let what = format!("Failed to get shared \"{}\" lock", perm_name(bit));
            return Err(LockError::Locked(Locked { path: path.to_path_buf(), what }));
        }
    }
    Ok(())
}

/// A read lock refused by a conflicting write lock means the image is in use; anything else
/// means the file system cannot lock.
fn lock_error(path: &Path, e: io::Error, what: impl FnOnce() -> String) -> LockError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            LockError::Locked(Locked { path: path.to_path_buf(), what: what() })
        }
        // `what` is QEMU's conflict wording ("Failed to lock byte 100").
        _ => failed(path, &what().replacen("Failed to ", "", 1), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("blockfuse-lock-{name}-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        p
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let p = temp_file("rw");
        let w = Perms::image(true, false);
        let r = Perms::image(false, false);
        let u = Perms::image(false, true);
        let first = ImageLock::acquire(&p, w, LockMode::On).unwrap();
        assert!(first.is_held());
        match ImageLock::acquire(&p, w, LockMode::On) {
            Err(LockError::Locked(l)) => assert!(l.what.contains("\"write\""), "{l}"),
            other => panic!("second writer: {other:?}"),
        }
        assert!(matches!(ImageLock::acquire(&p, r, LockMode::On), Err(LockError::Locked(_))));
        // Force-share reads beside a writer, and `off` checks nothing.
        let shared = ImageLock::acquire(&p, u, LockMode::On).unwrap();
        assert!(!ImageLock::acquire(&p, w, LockMode::Off).unwrap().is_held());
        drop(first);
        drop(shared);
        let r1 = ImageLock::acquire(&p, r, LockMode::On).unwrap();
        let r2 = ImageLock::acquire(&p, r, LockMode::On).unwrap();
        // A reader that does not share write keeps writers out.
        assert!(matches!(ImageLock::acquire(&p, w, LockMode::On), Err(LockError::Locked(_))));
        drop((r1, r2));
        ImageLock::acquire(&p, w, LockMode::On).unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn locked_survives_the_trip_through_io_error() {
        let e: io::Error = LockError::Locked(Locked {
            path: PathBuf::from("/x/y.img"),
            what: "Failed to get \"write\" lock".into(),
        })
        .into();
        let r = super::super::refusal_of(&e).unwrap();
        assert_eq!(r.code, "IMAGE_LOCKED");
        assert!(r.message.starts_with("/x/y.img: Failed to get \"write\" lock"), "{r}");
        assert!(super::super::refusal_of(&io::Error::other("other")).is_none());
    }
}
