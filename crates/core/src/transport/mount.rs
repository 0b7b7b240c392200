//! Mounting the export over a regular file: mount(2) when privileged, fusermount3 with the
//! `_FUSE_COMMFD` fd-passing protocol otherwise; and the matching unmount.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::sys;

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    pub read_only: bool,
    pub allow_other: bool,
    pub max_read: u32,
}

/// How the mount was made, which decides how it is unmade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMethod {
    Syscall,
    Fusermount,
}

const MS_RDONLY: u64 = libc::MS_RDONLY;
const MS_NOSUID: u64 = libc::MS_NOSUID;
const MS_NODEV: u64 = libc::MS_NODEV;
const MS_NOATIME: u64 = libc::MS_NOATIME;

/// The comma-separated generic options, as fusermount3 takes them.
fn generic_options(opts: &MountOptions) -> String {
    let mut s = String::from(if opts.read_only { "ro" } else { "rw" });
    s.push_str(",nosuid,nodev,noatime,default_permissions");
    if opts.allow_other {
        s.push_str(",allow_other");
    }
    s.push_str(&format!(",max_read={}", opts.max_read));
    s
}

/// Checks that the mountpoint is an existing regular file (we cover it; unmounting uncovers it).
pub fn check_mountpoint(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MountpointNotFound(path.to_path_buf())
        } else {
            Error::Mount(format!("cannot stat mountpoint {}: {e}", path.display()))
        }
    })?;
    if !meta.file_type().is_file() {
        return Err(Error::MountpointNotFile(path.to_path_buf()));
    }
    Ok(())
}

/// Mounts and returns the session fd. The kernel sends INIT on it next.
pub fn mount(opts: &MountOptions) -> Result<(OwnedFd, MountMethod)> {
    check_mountpoint(&opts.mountpoint)?;
    if sys::effective_ids().0 == 0 {
        mount_syscall(opts).map(|fd| (fd, MountMethod::Syscall))
    } else {
        mount_fusermount(opts).map(|fd| (fd, MountMethod::Fusermount))
    }
}

fn mount_syscall(opts: &MountOptions) -> Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| Error::FuseDevice(format!("cannot open /dev/fuse: {e}")))?;
    let (uid, gid) = sys::effective_ids();
    let mut data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},default_permissions,max_read={}",
        dev.as_raw_fd(),
        libc::S_IFREG,
        opts.max_read
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MS_NOSUID | MS_NODEV | MS_NOATIME;
    if opts.read_only {
        flags |= MS_RDONLY;
    }
    sys::mount("blockfuse", &opts.mountpoint, "fuse.blockfuse", flags, &data).map_err(|e| {
        Error::Mount(format!("mount(2) on {} failed: {e}", opts.mountpoint.display()))
    })?;
    Ok(dev.into())
}

fn mount_fusermount(opts: &MountOptions) -> Result<OwnedFd> {
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| Error::Mount(format!("cannot create a socket for fusermount3: {e}")))?;
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-o")
        .arg(format!("{},subtype=blockfuse,fsname=blockfuse", generic_options(opts)))
        .arg("--")
        .arg(&opts.mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    sys::inherit_fd_in_child(&mut cmd, theirs.as_raw_fd());
    let child = cmd
        .spawn()
        .map_err(|e| Error::Mount(format!("cannot run fusermount3 (is fuse3 installed?): {e}")))?;
    drop(theirs);
    let fd = sys::recv_fd(ours.as_fd());
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Mount(format!("waiting for fusermount3 failed: {e}")))?;
    match fd {
        Ok(fd) if out.status.success() => Ok(fd),
        _ => Err(Error::Mount(format!(
            "fusermount3 could not mount {}: {}",
            opts.mountpoint.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Unmounts lazily (MNT_DETACH): the mountpoint is uncovered at once even if a client still holds
/// the file open; such clients get errors once the session fd is closed.
pub fn unmount(mountpoint: &Path, method: MountMethod) -> Result<()> {
    match method {
        MountMethod::Syscall => sys::umount2(mountpoint, libc::MNT_DETACH)
            .map_err(|e| Error::Unmount(format!("umount2({}) failed: {e}", mountpoint.display()))),
        MountMethod::Fusermount => {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg("--")
                .arg(mountpoint)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::Unmount(format!("cannot run fusermount3 -u: {e}")))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(Error::Unmount(format!(
                    "fusermount3 -u {} failed: {}",
                    mountpoint.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
    }
}

/// Whether some mount sits exactly on `path` in this mount namespace (/proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        // Cannot tell: assume it is, and let the unmount itself report what is wrong.
        return true;
    };
    mountinfo_has(&info, path)
}

fn mountinfo_has(info: &str, path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape_mountinfo(field) == want)
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_paths_are_unescaped() {
        let info = "36 35 98:0 / /mnt/a\\040b rw,noatime - fuse.blockfuse blockfuse rw\n\
                    37 35 98:0 / /other rw - ext4 /dev/x rw\n";
        assert!(mountinfo_has(info, Path::new("/mnt/a b")));
        assert!(mountinfo_has(info, Path::new("/other")));
        assert!(!mountinfo_has(info, Path::new("/mnt/a")));
    }

    use super::*;

    #[test]
    fn generic_options_follow_the_mount_flags() {
        let mut o = MountOptions {
            mountpoint: "/x".into(),
            read_only: true,
            allow_other: false,
            max_read: 1 << 20,
        };
        assert_eq!(
            generic_options(&o),
            "ro,nosuid,nodev,noatime,default_permissions,max_read=1048576"
        );
        o.read_only = false;
        o.allow_other = true;
        assert_eq!(
            generic_options(&o),
            "rw,nosuid,nodev,noatime,default_permissions,allow_other,max_read=1048576"
        );
    }
}
