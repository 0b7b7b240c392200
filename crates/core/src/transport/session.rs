//! An export's life: mount, answer INIT, start one thread per queue (the mount's fd plus clones
//! made with FUSE_DEV_IOC_CLONE), and on close unmount, drain the queues and flush.

use std::fs::OpenOptions;
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::mount::{self, MountMethod, MountOptions, UnmountGuard};
use super::queue::{run_queue_at, Shared, StopCause};
use super::ring_queue::{plan_ring_queues, run_ring_queue};
use crate::backend::{Backend, BlockBackend};
use crate::error::{Error, Result};
use crate::export::{negotiate_init, Export, InitLimits, Negotiated, Passthrough};
use crate::protocol::abi::{opcode, size, KERNEL_MINOR_VERSION};
use crate::protocol::decode::{decode, DecodeError, Op};
use crate::protocol::encode::{init_out, out_header, MAX_SMALL_REPLY};
use crate::sys;
use crate::sys::uring::Ring;

/// Largest READ and WRITE we negotiate: 1 MiB, with FUSE_MAX_PAGES (QEMU stops at 64 KiB).
pub const MAX_TRANSFER: u32 = 1 << 20;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    /// Number of /dev/fuse queues, each with its own thread (>= 1).
    pub threads: usize,
    /// Whether requests come through FUSE-over-io_uring or read(2).
    pub io_uring: IoUringMode,
    /// Whether opens may go straight to the image (FUSE passthrough).
    pub passthrough: PassthroughMode,
}

/// Whether opens may go straight to a raw image (`passthrough` in the TS API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughMode {
    Off,
    /// Read-only raw exports on regular files, when the kernel and privileges allow it.
    Auto,
    /// Raw exports on regular files, writable ones too; fail where it cannot be used.
    On,
}

/// How requests reach the queues (`ioUring` in the TS API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoUringMode {
    /// read(2) and writev(2) on /dev/fuse.
    Off,
    /// FUSE-over-io_uring when the kernel offers it, else read(2).
    Auto,
    /// FUSE-over-io_uring or fail.
    On,
}

/// Something the session reports on its own, outside any call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The request stream could not be trusted; the queues stopped. The mount is still there.
    Halt { reason: String },
}

pub struct Session {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
    /// Where the export is mounted and how, until it is unmounted; None for a fake device.
    mount: Option<(PathBuf, MountMethod)>,
    /// Removes the mount if this process dies without unmounting it.
    guard: Option<UnmountGuard>,
    /// Our mount's MAJ:MIN, to tell it from a mount stacked on top of it.
    mount_dev: Option<String>,
    /// The lock on the mountpoint, held until we have unmounted.
    claim: Option<mount::Claim>,
    /// Whether queues sleep in a blocking read(2) while idle: close() then wakes them with
    /// [`sys::wake_signal`].
    idle_reads: bool,
    negotiated: Negotiated,
    /// Why `IoUringMode::Auto` serves by read(2), when it does.
    io_uring_fallback: Option<String>,
    /// The image's backing id and a dup of the session fd to drop it with, while registered.
    backing: Option<(OwnedFd, u32)>,
    /// Why `PassthroughMode::Auto` passes nothing through, when it does not.
    passthrough_fallback: Option<String>,
}

type EventSink = Box<dyn Fn(SessionEvent) + Send + Sync>;

impl Session {
    /// Mounts `export` and returns once the kernel has been answered INIT, i.e. the mountpoint
    /// serves requests.
    pub fn start(mut export: Export, cfg: SessionConfig, on_event: EventSink) -> Result<Session> {
        if cfg.threads == 0 {
            return Err(Error::InvalidConfig("threads must be at least 1".into()));
        }
        let mut io_uring_fallback = None;
        let want_uring = match cfg.io_uring {
            IoUringMode::Off => false,
            // One thread would serve every CPU's ring queue from one place, never beside its
            // clients; read(2) with run-to-completion workers is faster there (docs/DESIGN.md).
            IoUringMode::Auto if cfg.threads == 1 => {
                io_uring_fallback = Some(ONE_THREAD_FALLBACK.to_string());
                false
            }
            mode => match io_uring_support(ENABLE_URING) {
                Ok(()) => true,
                Err(reason) if mode == IoUringMode::On => return Err(Error::IoUring(reason)),
                Err(reason) => {
                    io_uring_fallback = Some(reason);
                    false
                }
            },
        };
        let read_only = !export.options().writable;
        // Checked before mounting, so that 'on' fails early where no kernel could help.
        let mut passthrough_fallback = None;
        let want_passthrough = match cfg.passthrough {
            PassthroughMode::Off => false,
            mode => match passthrough_candidate(&export, mode) {
                Ok(()) => true,
                Err(reason) if mode == PassthroughMode::On => {
                    return Err(Error::Passthrough(reason))
                }
                Err(reason) => {
                    passthrough_fallback = Some(reason);
                    false
                }
            },
        };
        let opts = MountOptions {
            mountpoint: cfg.mountpoint.clone(),
            read_only,
            allow_other: cfg.allow_other,
            max_read: export.options().max_read,
        };
        let (fd, method, claim) = mount::mount(&opts)?;
        // Read before INIT is answered: nothing can be stacked on an unanswered mount yet.
        let mount_dev = mount::top_device(&cfg.mountpoint);
        // Started before INIT, so that a crash at any point after the mount is covered. If it
        // fails (no /bin/sh?), the export still works; only a crash would leave the mount.
        let guard = UnmountGuard::spawn(&cfg.mountpoint, method)
            .map_err(|e| log::warn!("{e}; a crash of this process would leave the mount behind"))
            .ok();
        let unmount_on_error = |e: Error| {
            let _ = mount::unmount_own(&cfg.mountpoint, method, mount_dev.as_deref());
            e
        };
        let page = sys::page_size() as u32;
        let limits = InitLimits {
            max_write: MAX_TRANSFER,
            page_size: page,
            io_uring: want_uring,
            passthrough: want_passthrough,
        };
        let negotiated = answer_init(&fd, limits).map_err(unmount_on_error)?;
        if want_uring && !negotiated.io_uring {
            let reason = "the kernel did not offer FUSE_OVER_IO_URING in INIT".to_string();
            if cfg.io_uring == IoUringMode::On {
                return Err(unmount_on_error(Error::IoUring(reason)));
            }
            io_uring_fallback = Some(reason);
        }
        let mut backing = None;
        if want_passthrough {
            match register_backing(&fd, &mut export, negotiated.passthrough) {
                Ok(registered) => backing = Some(registered),
                Err(reason) if cfg.passthrough == PassthroughMode::On => {
                    return Err(unmount_on_error(Error::Passthrough(reason)));
                }
                Err(reason) => passthrough_fallback = Some(reason),
            }
        }

        let mut fds = vec![fd];
        for _ in 1..cfg.threads {
            fds.push(clone_fd(&fds[0]).map_err(unmount_on_error)?);
        }
        if negotiated.io_uring {
            let mut session =
                Self::run_rings(export, fds, (cfg.mountpoint, method), negotiated, on_event)?;
            session.backing = backing;
            session.passthrough_fallback = passthrough_fallback;
            session.guard = guard;
            session.mount_dev = mount_dev;
            session.claim = Some(claim);
            return Ok(session);
        }
        // Every queue may sleep in a blocking read while idle, if close() can wake it.
        let idle = match sys::install_wake_signal() {
            Ok(()) => idle_fds(&fds),
            Err(e) => {
                log::warn!(
                    "cannot install the queues' wake-up signal ({e}); they wait through epoll"
                );
                Ok(fds.iter().map(|_| None).collect())
            }
        }
        .map_err(unmount_on_error)?;
        let mut session =
            Self::run(export, fds, idle, Some((cfg.mountpoint, method)), negotiated, on_event)?;
        session.guard = guard;
        session.mount_dev = mount_dev;
        session.claim = Some(claim);
        session.io_uring_fallback = io_uring_fallback;
        session.backing = backing;
        session.passthrough_fallback = passthrough_fallback;
        Ok(session)
    }

    /// Serves `export` on one queue over `fd`, a fake device (e.g. one end of a SOCK_SEQPACKET
    /// socketpair) that stands in for an already initialised `/dev/fuse` connection: no mount, no
    /// INIT. For tests that feed crafted byte streams through the real request path.
    pub fn serve_fake_device(export: Export, fd: OwnedFd, on_event: EventSink) -> Result<Session> {
        let negotiated = Negotiated {
            minor: KERNEL_MINOR_VERSION,
            flags: 0,
            max_write: MAX_TRANSFER,
            io_uring: false,
            passthrough: false,
        };
        Self::run(export, vec![fd], vec![None], None, negotiated, on_event)
    }

    fn new(
        export: Export,
        queues: usize,
        mount: Option<(PathBuf, MountMethod)>,
        negotiated: Negotiated,
        on_event: EventSink,
    ) -> Session {
        let on_stop = Box::new(move |cause: StopCause| match cause {
            StopCause::Halt(reason) => on_event(SessionEvent::Halt { reason }),
            StopCause::Disconnected => on_event(SessionEvent::Halt {
                reason: "the kernel ended the FUSE connection (aborted, or unmounted from outside)"
                    .into(),
            }),
        });
        let max_write = negotiated.max_write as usize;
        let shared = Arc::new(Shared::with_queues(export, max_write, queues, on_stop));
        Session {
            shared,
            threads: Vec::with_capacity(queues),
            mount,
            guard: None,
            mount_dev: None,
            claim: None,
            idle_reads: false,
            negotiated,
            io_uring_fallback: None,
            backing: None,
            passthrough_fallback: None,
        }
    }

    /// Serves the connection through FUSE-over-io_uring: one thread per fd in `fds`, each
    /// registering its share of the kernel's per-CPU queues' entries. Returns once every entry
    /// is registered; an error (with everything stopped and unmounted) if one cannot be.
    fn run_rings(
        export: Export,
        fds: Vec<OwnedFd>,
        mount: (PathBuf, MountMethod),
        negotiated: Negotiated,
        on_event: EventSink,
    ) -> Result<Session> {
        let page = sys::page_size();
        let plans = plan_ring_queues(fds.len(), kernel_queue_count(), negotiated.max_write, page);
        let mut session = Self::new(export, fds.len(), Some(mount), negotiated, on_event);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        for (fd, plan) in fds.into_iter().zip(plans) {
            let queue_shared = session.shared.clone();
            let started = started_tx.clone();
            let name = format!("blockfuse-r{}", plan.index);
            session.spawn_queue(name, move || run_ring_queue(fd, queue_shared, plan, started))?;
        }
        drop(started_tx);
        let mut failure = None;
        for _ in 0..session.threads.len() {
            match started_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => failure = failure.or(Some(reason)),
                Err(_) => failure = failure.or(Some("a queue thread ended during setup".into())),
            }
        }
        if let Some(reason) = failure {
            // Stop the queues that did register; unmounting ends the connection for them.
            let _ = session.shutdown();
            return Err(Error::IoUring(reason));
        }
        Ok(session)
    }

    fn run(
        export: Export,
        fds: Vec<OwnedFd>,
        idle: Vec<Option<OwnedFd>>,
        mount: Option<(PathBuf, MountMethod)>,
        negotiated: Negotiated,
        on_event: EventSink,
    ) -> Result<Session> {
        let mut session = Self::new(export, fds.len(), mount, negotiated, on_event);
        session.idle_reads = idle.iter().any(Option::is_some);
        for (i, (fd, queue_idle)) in fds.into_iter().zip(idle).enumerate() {
            let queue_shared = session.shared.clone();
            let name = format!("blockfuse-q{i}");
            session.spawn_queue(name, move || run_queue_at(fd, queue_idle, queue_shared, i))?;
        }
        Ok(session)
    }

    /// Starts one queue thread; if that fails, shuts the session down and says so.
    fn spawn_queue(
        &mut self,
        name: String,
        queue: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<()> {
        match std::thread::Builder::new().name(name).spawn(queue) {
            Ok(t) => {
                self.threads.push(t);
                Ok(())
            }
            Err(e) => {
                let _ = self.shutdown();
                Err(Error::Internal(format!("cannot start queue thread: {e}")))
            }
        }
    }

    pub fn export(&self) -> &Export {
        &self.shared.export
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// Whether requests come through FUSE-over-io_uring.
    pub fn io_uring(&self) -> bool {
        self.negotiated.io_uring
    }

    pub(crate) fn set_io_uring_fallback(&mut self, reason: String) {
        self.io_uring_fallback = Some(reason);
    }

    /// Why an `IoUringMode::Auto` session serves by read(2), if it does.
    pub fn io_uring_fallback(&self) -> Option<&str> {
        self.io_uring_fallback.as_deref()
    }

    /// Whether opens go straight to the image (FUSE passthrough; false once closed).
    pub fn passthrough(&self) -> bool {
        self.backing.is_some()
    }

    /// Why a `PassthroughMode::Auto` session passes nothing through, if it does not.
    pub fn passthrough_fallback(&self) -> Option<&str> {
        self.passthrough_fallback.as_deref()
    }

    /// Requests being served right now, per queue.
    pub fn in_flight(&self) -> Vec<u64> {
        self.shared.in_flight()
    }

    /// Requests each queue has taken in since the start.
    pub fn served(&self) -> Vec<u64> {
        self.shared.served()
    }

    /// Unmounts, lets every queue finish the request it is serving, and flushes the backend.
    /// Idempotent.
    pub fn shutdown(&mut self) -> Result<()> {
        // Unmount first, while the queues still answer: the mountpoint is uncovered at once.
        self.shared.begin_close();
        // Opens that use the backing file keep it until released; the registration goes now.
        if let Some((dev, id)) = self.backing.take() {
            if let Err(e) = sys::fuse_backing_close(dev.as_fd(), id) {
                log::warn!("FUSE_DEV_IOC_BACKING_CLOSE of backing id {id} failed: {e}");
            }
        }
        let unmounted = match self.mount.take() {
            // Only our own mount: not one stacked on top, and nothing if it was unmounted from
            // outside already (umount, fusermount3 -u).
            Some((mountpoint, method)) => {
                mount::unmount_own(&mountpoint, method, self.mount_dev.as_deref())
            }
            None => Ok(()),
        };
        if unmounted.is_ok() {
            if let Some(guard) = self.guard.take() {
                guard.disarm();
            }
        }
        self.shared.request_stop();
        self.wake_idle_readers();
        let mut failure = None;
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(format!("queue failed: {e}")),
                Err(_) => failure = Some("queue thread panicked".to_string()),
            }
        }
        // If our unmount failed, the guard removes the (now served by nobody) mount.
        drop(self.guard.take());
        // Read-only exports wrote nothing, so they never flush or sync the image.
        let flushed = if self.shared.export.writable() {
            flush_now(self.shared.export.backend())
        } else {
            Ok(())
        };
        // Unmounted (or left to whoever covers it): another export may claim the mountpoint now.
        drop(self.claim.take());
        unmounted?;
        if let Some(f) = failure {
            return Err(Error::Internal(f));
        }
        flushed.map_err(|e| Error::Internal(format!("final flush failed: {e}")))
    }
}

impl Session {
    /// A queue sleeping in read(2) while idle wakes when the connection ends, which the unmount
    /// does unless a client still holds the file open (the unmount is lazy). So each queue
    /// thread gets the wake signal until it has stopped; its read returns EINTR and it sees the
    /// stop flag. (A busy queue stops by itself after its current request; the signal only
    /// makes some syscall of it return EINTR, which every caller retries.)
    fn wake_idle_readers(&mut self) {
        if !self.idle_reads {
            return;
        }
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                sys::wake_thread(t);
            }
            std::thread::sleep(WAKE_INTERVAL);
        }
    }
}

/// How often close() signals queues that have not stopped yet: a signal that lands just
/// before a queue enters read(2) does not interrupt it, the next one does.
const WAKE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Flushes the backend from the closing thread, on a throwaway current-thread runtime.
fn flush_now(backend: &Backend) -> std::io::Result<()> {
    tokio::runtime::Builder::new_current_thread().build()?.block_on(backend.flush())
}

/// Where the kernel says whether FUSE-over-io_uring may be used.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Why `IoUringMode::Auto` with one thread serves by read(2).
pub const ONE_THREAD_FALLBACK: &str =
    "with one thread, read(2) on /dev/fuse is faster; io_uring is used with threads >= 2";

/// Whether this machine lets us serve through FUSE-over-io_uring (`param`: the kernel's
/// `enable_uring` file); the reason when not.
pub(crate) fn io_uring_support(param: &str) -> std::result::Result<(), String> {
    match std::fs::read_to_string(param) {
        Ok(v) if v.trim() == "Y" || v.trim() == "1" => {}
        Ok(_) => {
            return Err(format!(
                "the kernel has it switched off ({param} is N; as root: echo Y > {param})"
            ))
        }
        Err(e) => {
            return Err(format!(
                "this kernel has no FUSE-over-io_uring ({param}: {e}; it needs Linux 6.14 or \
                 newer built with CONFIG_FUSE_IO_URING)"
            ))
        }
    }
    Ring::probe()
        .map_err(|e| format!("cannot create an io_uring with deferred task work (Linux 6.1+): {e}"))
}

/// The kernel's FUSE-over-io_uring queues: one per possible CPU (`num_possible_cpus()`).
fn kernel_queue_count() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|list| super::ring_queue::count_cpu_list(list.trim()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn clone_fd(session: &OwnedFd) -> Result<OwnedFd> {
    try_clone_fd(session)
        .map_err(|e| Error::FuseDevice(format!("failed to clone /dev/fuse fd: {e}")))
}

fn try_clone_fd(session: &OwnedFd) -> std::io::Result<OwnedFd> {
    let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot open /dev/fuse for a queue: {e}"))
    })?;
    sys::fuse_clone_fd(dev.as_fd(), session.as_fd())?;
    Ok(dev.into())
}

/// One blocking clone per queue for idle reads. The clones are an optimisation: where the ioctl
/// does not exist (ENOTTY/ENOSYS: an old kernel, or qemu-user, which does not emulate it), the
/// queues wait through epoll instead. A one-queue export then needs no clone at all.
fn idle_fds(fds: &[OwnedFd]) -> Result<Vec<Option<OwnedFd>>> {
    let mut idle = Vec::with_capacity(fds.len());
    for fd in fds {
        match try_clone_fd(fd) {
            Ok(clone) => idle.push(Some(clone)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::ENOSYS)) => {
                log::warn!(
                    "FUSE_DEV_IOC_CLONE is unavailable ({e}); the queues wait through epoll"
                );
                return Ok(fds.iter().map(|_| None).collect());
            }
            Err(e) => return Err(Error::FuseDevice(format!("failed to clone /dev/fuse fd: {e}"))),
        }
    }
    Ok(idle)
}

/// Whether `export` can pass opens through at all in `mode`, before asking the kernel.
fn passthrough_candidate(
    export: &Export,
    mode: PassthroughMode,
) -> std::result::Result<(), String> {
    let writable = export.options().writable;
    // 'auto' only where a passed-through open cannot outlive the export harmfully: after a
    // kill -9 of the server, opens that passed through keep reading (and a writable mapping
    // would keep writing) the image, unseen by any lock (docs/DESIGN.md, "Passthrough").
    if mode == PassthroughMode::Auto && writable {
        return Err("'auto' passes through read-only exports only".into());
    }
    export.backend().passthrough_file(writable).map(drop).map_err(str::to_string)
}

/// Registers the image as the connection's backing file and tells the export.
fn register_backing(
    fd: &OwnedFd,
    export: &mut Export,
    agreed: bool,
) -> std::result::Result<(OwnedFd, u32), String> {
    if !agreed {
        return Err("the kernel did not offer FUSE_PASSTHROUGH in INIT (Linux 6.9 or newer,                     CONFIG_FUSE_PASSTHROUGH)"
            .into());
    }
    let (file, image_direct) = export.backend().passthrough_file(export.options().writable)?;
    let id =
        sys::fuse_backing_open(fd.as_fd(), file.as_fd()).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => {
                "registering the image needs CAP_SYS_ADMIN in the initial user namespace"
                    .to_string()
            }
            _ => format!("FUSE_DEV_IOC_BACKING_OPEN failed: {e}"),
        })?;
    let dev = match fd.try_clone() {
        Ok(dev) => dev,
        Err(e) => {
            let _ = sys::fuse_backing_close(fd.as_fd(), id);
            return Err(format!("cannot keep the session fd for BACKING_CLOSE: {e}"));
        }
    };
    let o = export.options();
    let writes = !image_direct
        && Passthrough::writes_keep_rules(o.writable, o.growable, o.writethrough)
        && export.backend().let_kernel_write_passthrough_file();
    export.set_passthrough(Passthrough::new(id, image_direct, writes));
    Ok((dev, id))
}

/// Reads the kernel's INIT from the fresh session fd and answers it.
fn answer_init(fd: &OwnedFd, limits: InitLimits) -> Result<Negotiated> {
    let mut buf = vec![0u8; size::IN_HEADER + size::WRITE_IN + limits.max_write as usize + 4096];
    let n = loop {
        match sys::read(fd.as_fd(), &mut buf) {
            Ok(n) => break n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(Error::Init(format!("reading INIT from /dev/fuse failed: {e}"))),
        }
    };
    let req = match decode(&buf[..n]) {
        Ok(r) => r,
        Err(DecodeError::Halt(h)) => return Err(Error::Init(h.to_string())),
        Err(DecodeError::Malformed { .. }) => {
            return Err(Error::Init("the kernel's INIT request is too short".into()))
        }
    };
    let Op::Init { major, minor, max_readahead, flags, flags2 } = req.op else {
        return Err(Error::Init(format!(
            "expected INIT as the first request, got opcode {} ({})",
            req.header.opcode,
            opcode::name(req.header.opcode)
        )));
    };
    let mut body = [0u8; MAX_SMALL_REPLY];
    let mut header = [0u8; size::OUT_HEADER];
    let (len, error, result) =
        match negotiate_init(major, minor, max_readahead, flags, flags2, limits) {
            Ok((out, negotiated)) => (init_out(&mut body, &out), 0, Ok(negotiated)),
            Err(reason) => {
                log::error!("{reason}");
                (0, -libc::EPROTO, Err(Error::Init(reason)))
            }
        };
    out_header(&mut header, (size::OUT_HEADER + len) as u32, error, req.header.unique);
    sys::writev(fd.as_fd(), &[IoSlice::new(&header), IoSlice::new(&body[..len])])
        .map_err(|e| Error::Init(format!("answering INIT failed: {e}")))?;
    result
}

#[cfg(test)]
mod tests {
    use super::io_uring_support;

    #[test]
    fn io_uring_support_says_why_not() {
        let dir =
            std::env::temp_dir().join(format!("blockfuse-uring-param-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let param = dir.join("enable_uring");
        std::fs::write(&param, "N\n").unwrap();
        let off = io_uring_support(param.to_str().unwrap()).unwrap_err();
        assert!(off.contains("switched off") && off.contains("echo Y >"), "{off}");
        let missing = io_uring_support(dir.join("nope").to_str().unwrap()).unwrap_err();
        assert!(missing.contains("6.14") && missing.contains("CONFIG_FUSE_IO_URING"), "{missing}");
        std::fs::write(&param, "Y\n").unwrap();
        // With the parameter on, only the ring probe can refuse (it works on any 6.1+ kernel).
        assert_eq!(io_uring_support(param.to_str().unwrap()), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
