//! Mounting the export over a regular file: mount(2) when privileged, fusermount3 with the
//! `_FUSE_COMMFD` fd-passing protocol otherwise; the matching unmount; and the unmount guard
//! that removes the mount when this process dies without unmounting it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// An export's claim on its mountpoint: an exclusive `flock` on the mountpoint file, taken before
/// mounting and held (by keeping this open) until the export has unmounted. Two exports started
/// at the same moment, in one process or several, cannot both hold it, so they cannot both mount.
///
/// The lock is taken on the file under the mount. An export that opens the path only after
/// another one mounted on it locks that export's file instead (a local lock: FUSE is not asked),
/// so the claim also checks mountinfo once it holds the lock: a mount there means "in use".
pub struct Claim {
    _file: Option<std::fs::File>,
}

/// How long a claim waits for a busy mountpoint lock (see [`claim`]).
const CLAIM_PATIENCE: Duration = Duration::from_millis(500);

/// Claims `path` for one export (see [`Claim`]), or fails with `MOUNTPOINT_IN_USE`.
pub fn claim(path: &Path) -> Result<Claim> {
    let open = |read: bool| OpenOptions::new().read(read).write(!read).open(path);
    // Any access mode can be locked; a file we may not read (mode 0200) may still be writable.
    let file = match open(true).or_else(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => open(false),
        _ => Err(e),
    }) {
        Ok(file) => Some(file),
        // Neither readable nor writable for us: mounting on it needs neither (root), and
        // fusermount3 decides for an ordinary user. Only the mountinfo check below protects it.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            log::warn!("cannot open mountpoint {} to lock it: {e}", path.display());
            None
        }
        Err(e) => {
            return Err(Error::Mount(format!("cannot open mountpoint {}: {e}", path.display())))
        }
    };
    if let Some(f) = &file {
        // A lock can be held for a moment by a process being started elsewhere in this process
        // (fork copies every fd; CLOEXEC closes them only at exec), after its export has already
        // closed; so a busy lock is tried again for a short while before it means "in use".
        let deadline = Instant::now() + CLAIM_PATIENCE;
        let locked = loop {
            let locked = sys::try_lock_exclusive(f.as_fd()).map_err(|e| {
                Error::Mount(format!("cannot lock mountpoint {}: {e}", path.display()))
            })?;
            if locked || Instant::now() >= deadline {
                break locked;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !locked {
            return Err(Error::MountpointInUse(
                path.to_path_buf(),
                "is being exported by another export (it holds the mountpoint's lock)",
            ));
        }
    }
    let canonical = canonical_parent(path).unwrap_or_else(|_| path.to_path_buf());
    if is_mounted(&canonical) {
        return Err(Error::MountpointInUse(
            path.to_path_buf(),
            "already has a filesystem mounted on it: another export, or a stale one",
        ));
    }
    Ok(Claim { _file: file })
}

/// Claims the mountpoint, mounts and returns the session fd and the claim, which must be kept
/// until the export has unmounted. The kernel sends INIT on the fd next.
pub fn mount(opts: &MountOptions) -> Result<(OwnedFd, MountMethod, Claim)> {
    check_mountpoint(&opts.mountpoint)?;
    let claim = claim(&opts.mountpoint)?;
    if sys::effective_ids().0 == 0 {
        mount_syscall(opts).map(|fd| (fd, MountMethod::Syscall, claim))
    } else {
        mount_fusermount(opts).map(|fd| (fd, MountMethod::Fusermount, claim))
    }
}

/// The MAJ:MIN of the topmost mount on `mountpoint` (right after mounting: ours), so that the
/// export can later tell its own mount from one stacked on top of it.
pub fn top_device(mountpoint: &Path) -> Option<String> {
    let path = canonical_parent(mountpoint).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    top_mount(&info, &path).map(|(_, dev)| dev.to_string())
}

/// Unmounts our mount (device `own`, from [`top_device`]) if it is the topmost one on the
/// mountpoint. Unmounting by path removes the topmost mount, so if another mount was stacked on
/// top of ours it is left alone (ours then stays under it, dead once our connection ends, until
/// whoever mounted on top unmounts theirs); if ours is gone already (unmounted from outside),
/// there is nothing to do. Without a known device, unmounts whatever is on top (as before).
pub fn unmount_own(mountpoint: &Path, method: MountMethod, own: Option<&str>) -> Result<()> {
    let path = canonical_parent(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return unmount(mountpoint, method);
    };
    match (top_mount(&info, &path), own) {
        (None, _) => Ok(()),
        (Some((_, top)), Some(own)) if top != own => {
            if mount_devices(&info, &path).any(|dev| dev == own) {
                log::warn!(
                    "another filesystem ({top}) is mounted on top of this export at {}; \
                     leaving it mounted",
                    mountpoint.display()
                );
            }
            Ok(())
        }
        _ => unmount(mountpoint, method),
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

/// Removes the mount if this process dies without unmounting it (`kill -9`, abort, OOM kill).
///
/// A `/bin/sh` child (a new process image, so it holds none of our memory or fds) waits on a pipe
/// whose write end only this process holds (`O_CLOEXEC`: no exec'd child inherits it). A line on
/// the pipe means "we unmounted ourselves": the guard exits. End of file without a line means we
/// are gone: if the topmost mount on the mountpoint is still ours (same device number in
/// mountinfo, so a later export by someone else is never touched), the guard unmounts it lazily,
/// with `umount` for a mount(2) mount and `fusermount3 -u -z` for a fusermount3 one.
///
/// The guard's pipe is held by a *sentinel thread* with a private fd table holding nothing else
/// (`sys::private_fd_table_keeping`). If a thread of ours is stuck in a read or write on our own
/// export when the process dies, it keeps the shared fd table (and the `/dev/fuse` fds in it)
/// alive forever, so a pipe end in that table would never close; the sentinel's table dies with
/// the sentinel, at once. The guard then *aborts the connection* before unmounting: through
/// fusectl's `abort` (owned by the mount's owner, so unprivileged too, when fusectl is mounted)
/// and, for a mount(2) mount, with `umount -f` (MNT_FORCE: `fuse_umount_begin` aborts the
/// connection). The abort answers every request a dead queue had taken with ECONNABORTED, the
/// stuck thread returns, the process is reaped. After an ordinary death the connection is
/// already gone and the abort does nothing.
///
/// Why not fusermount3's `auto_unmount`: it only works through fusermount3, and in fuse3 3.14 its
/// watcher checks for a dead connection by opening the mountpoint as root, which a mount without
/// `allow_other` refuses with EACCES (not ENOTCONN), so an unprivileged export is never cleaned
/// up. A forked (not exec'd) guard would keep a copy-on-write image of the whole Node process.
pub struct UnmountGuard {
    /// Tells the sentinel thread `disarm` (a byte) or "we are going" (end of file).
    sentinel: Option<std::io::PipeWriter>,
    child: Option<Child>,
}

/// The guard's program. Arguments: mountinfo's (escaped) mount point field, the mount's
/// MAJ:MIN, how it was mounted (`syscall` | `fusermount`), the mountpoint path.
const GUARD_SCRIPT: &str = r#"trap '' HUP INT TERM PIPE
if read -r _; then exit 0; fi
top=
while read -r _ _ dev _ point _; do
  if [ "$point" = "$1" ]; then top=$dev; fi
done < /proc/self/mountinfo
[ "$top" = "$2" ] || exit 0
abort=/sys/fs/fuse/connections/$(( ${2%%:*} * 1048576 + ${2#*:} ))/abort
if [ -w "$abort" ]; then echo 1 > "$abort"; fi
if [ "$3" = syscall ]; then exec umount -i -c -f -l -- "$4"; fi
exec fusermount3 -u -z -- "$4"
"#;

impl UnmountGuard {
    /// Starts the guard of the mount just made on `mountpoint`.
    pub fn spawn(mountpoint: &Path, method: MountMethod) -> Result<UnmountGuard> {
        let fail = |what: String| Error::Mount(format!("cannot start the unmount guard: {what}"));
        // Mountinfo lists canonical paths. Only the parent is resolved: a stat of the mountpoint
        // itself would be a FUSE request, and INIT may not be answered yet.
        let mountpoint = canonical_parent(mountpoint).map_err(|e| fail(e.to_string()))?;
        let mountpoint = mountpoint.as_path();
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| fail(format!("reading /proc/self/mountinfo: {e}")))?;
        let (field, dev) = top_mount(&info, mountpoint)
            .ok_or_else(|| fail(format!("{} is not in mountinfo", mountpoint.display())))?;
        let (reader, writer) = std::io::pipe().map_err(|e| fail(format!("pipe: {e}")))?;
        let how = match method {
            MountMethod::Syscall => "syscall",
            MountMethod::Fusermount => "fusermount",
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut search = std::ffi::OsString::from("/usr/sbin:/usr/bin:/sbin:/bin:");
        search.push(path);
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("blockfuse-unmount-guard")
            .arg(field)
            .arg(dev)
            .arg(how)
            .arg(mountpoint)
            .env("PATH", search)
            .current_dir("/")
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C meant for the exporting program must not end it.
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("cannot run /bin/sh: {e}")))?;
        let sentinel = match spawn_sentinel(writer) {
            Ok(sentinel) => sentinel,
            Err(e) => {
                // The guard read end of the file at once: it removes the fresh mount.
                drop(UnmountGuard { sentinel: None, child: Some(child) });
                return Err(fail(e.to_string()));
            }
        };
        Ok(UnmountGuard { sentinel: Some(sentinel), child: Some(child) })
    }

    /// We unmounted ourselves: the guard exits without looking at the mount table.
    pub fn disarm(mut self) {
        if let Some(mut w) = self.sentinel.take() {
            let _ = w.write_all(b"u");
        }
    }
}

/// Starts the thread that holds the guard's pipe (`to_guard`) in a private fd table, and returns
/// the pipe that commands it: a byte means "write the disarm line", end of file means "close
/// without it". Returns once the thread holds the only other reference to `to_guard`.
fn spawn_sentinel(to_guard: std::io::PipeWriter) -> std::io::Result<std::io::PipeWriter> {
    let (commands, command_writer) = std::io::pipe()?;
    let fds = [to_guard.as_raw_fd(), commands.as_raw_fd()];
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("blockfuse-guard".into()).spawn(move || {
        // Signal handlers (libuv's among them) write to fds by number: they must never run on
        // this thread once its table is private. Blocked before the unshare, so none does.
        let owned = match sys::block_signals_in_this_thread()
            .and_then(|()| sys::private_fd_table_keeping(&fds))
        {
            Ok(owned) => owned,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        let mut owned = owned.into_iter();
        let (mut to_guard, mut commands) = match (owned.next(), owned.next()) {
            (Some(g), Some(c)) => (std::fs::File::from(g), std::fs::File::from(c)),
            _ => return,
        };
        let mut byte = [0u8; 1];
        let got = loop {
            match std::io::Read::read(&mut commands, &mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        if matches!(got, Ok(1)) {
            let _ = to_guard.write_all(b"unmounted\n");
        }
    })?;
    let ready = ready_rx.recv().map_err(|_| {
        std::io::Error::other("the guard's sentinel thread ended before it was ready")
    })?;
    ready?;
    // The shared table's references go now: the sentinel's are the only ones left.
    drop(to_guard);
    drop(commands);
    Ok(command_writer)
}

impl Drop for UnmountGuard {
    /// Closes the pipe (after `disarm`, or as if we died: then the guard removes what is left of
    /// our mount) and reaps the guard, waiting at most a few seconds on this thread.
    fn drop(&mut self) {
        drop(self.sentinel.take());
        let Some(mut child) = self.child.take() else { return };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        log::warn!("the unmount guard (pid {}) did not exit; not waiting for it", child.id());
        // Reap it whenever it ends, so it does not stay a zombie.
        let _ = std::thread::Builder::new().spawn(move || child.wait());
    }
}

/// `path` with its directory resolved (symlinks, `..`, relative) and its last component kept.
fn canonical_parent(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "mountpoint has no file name")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(dir)?.join(name))
}

/// The mountinfo mount point field (escaped as mountinfo has it) and the MAJ:MIN of the topmost
/// mount on `path`: later lines are mounted on top of earlier ones.
fn top_mount<'a>(info: &'a str, path: &Path) -> Option<(&'a str, &'a str)> {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    info.lines()
        .rev()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let point = fields.nth(1)?;
            Some((point, dev))
        })
        .find(|(point, _)| unescape_mountinfo(point) == want)
}

/// The MAJ:MIN of every mount on `path`, bottom first.
fn mount_devices<'a>(info: &'a str, path: &'a Path) -> impl Iterator<Item = &'a str> + 'a {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    info.lines().filter_map(move |line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        (unescape_mountinfo(point) == want).then_some(dev)
    })
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
    fn the_topmost_mount_is_the_last_one_listed() {
        let info = "36 35 0:50 / /mnt/a\\040b rw - fuse.blockfuse blockfuse rw\n\
                    37 35 8:1 / /other rw - ext4 /dev/x rw\n\
                    38 36 0:61 / /mnt/a\\040b rw - fuse.blockfuse blockfuse rw\n";
        assert_eq!(top_mount(info, Path::new("/mnt/a b")), Some(("/mnt/a\\040b", "0:61")));
        assert_eq!(top_mount(info, Path::new("/other")), Some(("/other", "8:1")));
        assert_eq!(top_mount(info, Path::new("/mnt/a")), None);
        let all: Vec<_> = mount_devices(info, Path::new("/mnt/a b")).collect();
        assert_eq!(all, ["0:50", "0:61"]);
    }

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
