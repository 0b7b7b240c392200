//! Every raw syscall the crate makes, each as a small safe wrapper, and the per-thread io_uring
//! (`uring`). This is the only module with `unsafe`; each block says why it is sound. Nothing here
//! knows about FUSE semantics.

pub mod fuse_uring;
pub mod uring;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Effective user and group id of this process.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid take no arguments, cannot fail and touch no memory of ours.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// mount(2).
pub fn mount(source: &str, target: &Path, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    let source = CString::new(source)?;
    let fstype = CString::new(fstype)?;
    let data = CString::new(data)?;
    let target = cstr(target)?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; the kernel
    // only reads them.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags as libc::c_ulong,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: Ok(false) if another open file description holds a lock.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock takes no pointers; `fd` is open for the duration of the call.
    match check(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// umount2(2).
pub fn umount2(target: &Path, flags: i32) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: `target` is a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// Attaches the freshly opened `/dev/fuse` fd `clone` to the connection of `session`.
pub fn fuse_clone_fd(clone: BorrowedFd<'_>, session: BorrowedFd<'_>) -> io::Result<()> {
    let master: u32 = session.as_raw_fd() as u32;
    // The request parameter is `c_ulong` on glibc and `c_int` on musl: `as _` picks the libc's
    // type (the value fits both; on musl it is the same 32 bits, as the kernel reads them).
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session fd) through the pointer, which points
    // to a live local; both fds are open for the duration of the call.
    check(unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE as _, &master as *const u32) })
        .map(drop)
}

/// fallocate(2).
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) }).map(drop)
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE; `Ok(None)` for ENXIO (no data / no hole after offset).
pub fn seek_data_hole(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let offset = to_off(offset)?;
    // SAFETY: plain syscall on an fd we own; lseek does not touch user memory. The fd's file
    // position moves, which is harmless because all our I/O on it is positional.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    Ok(Some(ret as u64))
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// Direct-I/O alignment of an open file from statx(STATX_DIOALIGN): (memory, offset) alignment.
/// `None` when the kernel or filesystem does not say.
pub fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid C string, `stx` a valid out-pointer for the duration of the call;
    // AT_EMPTY_PATH makes statx look at the fd itself.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// read(2) into `buf`, returning the byte count. One call: `/dev/fuse` returns one whole request
/// per read, which is what the caller relies on.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    check_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// writev(2) of `parts`, returning the byte count. `/dev/fuse` takes a reply in one call.
pub fn writev(fd: BorrowedFd<'_>, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // IoSlice is ABI-compatible with struct iovec (documented by std).
    let count = parts.len().min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: `parts` is a valid array of `count` iovecs, each pointing to live readable memory.
    check_size(unsafe { libc::writev(fd.as_raw_fd(), parts.as_ptr().cast(), count) })
}

/// Clears FD_CLOEXEC on `fd` in a child process between fork and exec, so that it inherits it
/// (the `_FUSE_COMMFD` socket for fusermount3).
pub fn inherit_fd_in_child(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Blocks every signal that can be blocked in the calling thread, so the kernel never picks it to
/// run a handler of a process-directed signal (SIGKILL still ends it with the process).
pub fn block_signals_in_this_thread() -> io::Result<()> {
    // SAFETY: `set` is a local sigset_t that sigfillset initialises before pthread_sigmask reads
    // it; a null old-set pointer is allowed.
    let ret = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Gives the calling thread a private fd table (`unshare(CLONE_FILES)`) holding only the fds in
/// `keep` (everything else copied in is closed at once), and returns them as owned fds of that
/// table. The caller must still close its own copies of `keep` in the shared table, where they
/// stay open: the two tables hold separate references to the same open files.
///
/// Used by the unmount guard's sentinel thread: a private table dies with the thread, even when
/// another thread of a dying process is stuck and keeps the shared table alive.
pub fn private_fd_table_keeping(keep: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    // SAFETY: unshare takes no pointers; CLONE_FILES only affects the calling thread's fd table.
    check(unsafe { libc::unshare(libc::CLONE_FILES) })?;
    let mut sorted: Vec<RawFd> = keep.to_vec();
    sorted.sort_unstable();
    let mut first: u32 = 0;
    for &fd in &sorted {
        if fd as u32 > first {
            // SAFETY: close_range takes no pointers and closes fds of this thread's private table
            // only (after the unshare above); none of them is owned by a Rust value of this thread.
            check(unsafe { libc::syscall(libc::SYS_close_range, first, fd as u32 - 1, 0) }
                as libc::c_int)?;
        }
        first = fd as u32 + 1;
    }
    // SAFETY: as above; the range may be empty of open fds, which close_range accepts.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) } as libc::c_int)?;
    // SAFETY: each fd in `keep` is open in the private table (copied by the unshare) and nothing
    // else in this table owns it, so each OwnedFd is its only owner.
    Ok(keep.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect())
}

/// Receives one file descriptor sent with SCM_RIGHTS over a unix socket (fusermount3's reply).
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // Room for one cmsghdr carrying one int, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // `size_t` on glibc, `socklen_t` on musl; 64 bytes fit either.
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: `msg` points to live buffers (`iov`, `control`) for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break check_size(n)?;
    };
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "fusermount3 sent no fd"));
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR only reads its control fields.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "fusermount3 sent no fd"));
    }
    // SAFETY: `cmsg` is non-null and points into `control`, which the kernel filled.
    let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected control message"));
    }
    // SAFETY: an SCM_RIGHTS message carries at least one int after the header; read unaligned
    // because CMSG_DATA is only byte-aligned by contract.
    let fd: RawFd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>()) };
    // SAFETY: the kernel just installed `fd` in our table for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets or clears O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL/F_SETFL on an fd we borrow; no memory is passed.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }).map(drop)
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Registers `fd` with the current tokio reactor for readability, writability (a fake device's
/// socket can be full) and errors (an aborted FUSE connection polls as EPOLLERR only).
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd that returns the same number from as_raw_fd for its
    // whole life, and the AsyncFd owns it from here on.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            fd,
            tokio::io::Interest::READABLE
                | tokio::io::Interest::WRITABLE
                | tokio::io::Interest::ERROR,
        )
    }
    .map_err(|e| e.into_parts().1)
}

/// A connected AF_UNIX SOCK_SEQPACKET pair: like /dev/fuse, each read returns one whole message.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid out-array of two ints for the duration of the call.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair just created both fds and nobody else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// preadv2(RWF_NOWAIT): reads only what the page cache holds right now. `Ok(None)` when the read
/// would block (EAGAIN) or the file does not support it.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let offset = to_off(offset)?;
    // SAFETY: `iov` describes `buf`, valid for writes of buf.len() bytes during the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(n as usize))
}

/// A new eventfd (non-blocking, close-on-exec): one thread signals it, another's ring polls it.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes two integers and returns a new fd or -1.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: eventfd just created `fd` and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter, making it readable. Never blocks (the counter cannot
/// overflow in practice: the reader drains it).
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is valid for reads of 8 bytes during the call.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Resets an eventfd's counter to zero (it is no longer readable).
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut count = [0u8; 8];
    // SAFETY: `count` is valid for writes of 8 bytes during the call; the fd is non-blocking.
    let _ = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
}

/// `struct fuse_backing_map`: the fd to register; `flags` and `padding` must be 0.
#[repr(C)]
struct FuseBackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// `_IOW(229, 1, struct fuse_backing_map)` and `_IOW(229, 2, uint32_t)` of include/uapi/linux/fuse.h.
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_e501;
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// Registers `file` as a passthrough backing file of the FUSE connection `dev`
/// (`FUSE_DEV_IOC_BACKING_OPEN`) and returns its backing id (> 0). Needs FUSE_PASSTHROUGH agreed
/// in INIT and CAP_SYS_ADMIN in the initial user namespace (else EPERM).
pub fn fuse_backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<u32> {
    let map = FuseBackingMap { fd: file.as_raw_fd(), flags: 0, padding: 0 };
    // SAFETY: `dev` is an open fd; the ioctl reads a `fuse_backing_map` from `&map`, which is
    // valid and of the size the request number encodes, for the duration of the call.
    let id = check(unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN as _, &map) })?;
    Ok(id as u32)
}

/// Drops the connection's registration of backing file `id` (`FUSE_DEV_IOC_BACKING_CLOSE`);
/// opens that already use it keep it until they are released.
pub fn fuse_backing_close(dev: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    // SAFETY: `dev` is an open fd; the ioctl reads one u32 from `&id`, valid for the call.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id) }).map(drop)
}

/// Whether `tid` is a thread of this process (a FUSE request's pid is the caller's thread id).
pub fn is_own_thread(tid: u32) -> bool {
    tid != 0 && Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// Restricts the calling thread to CPU `cpu` (sched_setaffinity).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu` was checked to be below CPU_SETSIZE, the set's capacity.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    check(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) }).map(drop)
}

/// The signal that wakes a queue thread asleep in read(2) on /dev/fuse (see
/// [`install_wake_signal`]). A real-time signal: Node, libuv and V8 use none of them.
pub fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn on_wake_signal(_: libc::c_int) {}

/// Installs a handler that does nothing for [`wake_signal`], without SA_RESTART: a thread that
/// gets the signal while blocked in read(2) returns EINTR and can look at its stop flag. Fails
/// (and leaves things as they are) if someone else handles that signal already. Idempotent.
pub fn install_wake_signal() -> io::Result<()> {
    static RESULT: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = RESULT.get_or_init(|| {
        let sig = wake_signal();
        // SAFETY: sigaction is plain old data; all-zero is a valid value to fill.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: querying the current action (null new action) into `old`.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } < 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        if old.sa_sigaction != libc::SIG_DFL {
            return Err(libc::EBUSY);
        }
        // SAFETY: as above.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_wake_signal as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = 0;
        // SAFETY: `act` is fully initialised; the handler is async-signal-safe (does nothing).
        if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        Ok(())
    });
    r.map_err(io::Error::from_raw_os_error)
}

/// Sends [`wake_signal`] to the thread of `handle` (which must not have been joined: its
/// pthread_t stays valid until then, even after it ended). Harmless if it already ended.
pub fn wake_thread<T>(handle: &std::thread::JoinHandle<T>) {
    use std::os::unix::thread::JoinHandleExt;
    // std's RawPthread is an integer; libc's pthread_t is one on glibc and a pointer on musl.
    #[allow(clippy::unnecessary_cast)]
    let thread = handle.as_pthread_t() as libc::pthread_t;
    // SAFETY: the pthread_t of an unjoined JoinHandle is valid (glibc reports ESRCH for a thread
    // that has ended); the signal has a do-nothing handler installed by install_wake_signal.
    let _ = unsafe { libc::pthread_kill(thread, wake_signal()) };
}

/// An open-file-description (OFD) byte-range lock request: F_RDLCK, F_WRLCK or F_UNLCK.
fn ofd_flock(kind: libc::c_int, offset: u64, len: u64) -> io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct of integers; all zeros is a valid value. l_pid must be
    // 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = to_off(offset)?;
    fl.l_len = to_off(len)?;
    Ok(fl)
}

/// fcntl(F_OFD_SETLK): takes (or with F_UNLCK drops) a lock without waiting. A lock held by
/// another open file description fails with EAGAIN or EACCES.
pub fn ofd_setlk(file: &File, kind: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let fl = ofd_flock(kind, offset, len)?;
    // SAFETY: F_OFD_SETLK reads one `struct flock` through the pointer, which points to a live
    // local; the fd is open for the duration of the call.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl as *const libc::flock) })
        .map(drop)
}

/// fcntl(F_OFD_GETLK): whether a lock of `kind` on the range would conflict with a lock held
/// through another open file description (locks of `file`'s own description never conflict).
pub fn ofd_conflicts(file: &File, kind: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    let mut fl = ofd_flock(kind, offset, len)?;
    // SAFETY: F_OFD_GETLK reads and writes one `struct flock` through the pointer, which points
    // to a live local we own mutably; the fd is open for the duration of the call.
    check(unsafe {
        libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock)
    })?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}
