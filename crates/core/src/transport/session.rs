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
use crate::backend::{Backend, BlockBackend};
use crate::error::{Error, Result};
use crate::export::{negotiate_init, Export, InitLimits, Negotiated};
use crate::protocol::abi::{opcode, size, KERNEL_MINOR_VERSION};
use crate::protocol::decode::{decode, DecodeError, Op};
use crate::protocol::encode::{init_out, out_header, MAX_SMALL_REPLY};
use crate::sys;

/// Largest READ and WRITE we negotiate: 1 MiB, with FUSE_MAX_PAGES (QEMU stops at 64 KiB).
pub const MAX_TRANSFER: u32 = 1 << 20;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    /// Number of /dev/fuse queues, each with its own thread (>= 1).
    pub threads: usize,
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
    /// The connection's fusectl `abort` file, when its single queue sleeps in read(2) while
    /// idle: the only way to wake that read if the connection outlives the unmount.
    abort: Option<std::fs::File>,
    negotiated: Negotiated,
}

type EventSink = Box<dyn Fn(SessionEvent) + Send + Sync>;

impl Session {
    /// Mounts `export` and returns once the kernel has been answered INIT, i.e. the mountpoint
    /// serves requests.
    pub fn start(export: Export, cfg: SessionConfig, on_event: EventSink) -> Result<Session> {
        if cfg.threads == 0 {
            return Err(Error::InvalidConfig("threads must be at least 1".into()));
        }
        let read_only = !export.options().writable;
        let opts = MountOptions {
            mountpoint: cfg.mountpoint.clone(),
            read_only,
            allow_other: cfg.allow_other,
            max_read: export.options().max_read,
        };
        let (fd, method) = mount::mount(&opts)?;
        // Started before INIT, so that a crash at any point after the mount is covered. If it
        // fails (no /bin/sh?), the export still works; only a crash would leave the mount.
        let guard = UnmountGuard::spawn(&cfg.mountpoint, method)
            .map_err(|e| log::warn!("{e}; a crash of this process would leave the mount behind"))
            .ok();
        let unmount_on_error = |e: Error| {
            let _ = mount::unmount(&cfg.mountpoint, method);
            e
        };
        let page = sys::page_size() as u32;
        let negotiated = answer_init(&fd, InitLimits { max_write: MAX_TRANSFER, page_size: page })
            .map_err(unmount_on_error)?;

        let mut fds = vec![fd];
        for _ in 1..cfg.threads {
            fds.push(clone_fd(&fds[0]).map_err(unmount_on_error)?);
        }
        // One queue: it may sleep in a blocking read while idle, if close() can wake it.
        let (idle, abort) = match mount::open_abort_file(&cfg.mountpoint) {
            Some(abort) if cfg.threads == 1 => match clone_fd(&fds[0]) {
                Ok(idle) => (Some(idle), Some(abort)),
                Err(e) => {
                    log::warn!("{e}; the queue waits through epoll only");
                    (None, None)
                }
            },
            _ => (None, None),
        };
        let mut session =
            Self::run(export, fds, idle, Some((cfg.mountpoint, method)), negotiated, on_event)?;
        session.guard = guard;
        session.abort = abort;
        Ok(session)
    }

    /// Serves `export` on one queue over `fd`, a fake device (e.g. one end of a SOCK_SEQPACKET
    /// socketpair) that stands in for an already initialised `/dev/fuse` connection: no mount, no
    /// INIT. For tests that feed crafted byte streams through the real request path.
    pub fn serve_fake_device(export: Export, fd: OwnedFd, on_event: EventSink) -> Result<Session> {
        let negotiated =
            Negotiated { minor: KERNEL_MINOR_VERSION, flags: 0, max_write: MAX_TRANSFER };
        Self::run(export, vec![fd], None, None, negotiated, on_event)
    }

    fn run(
        export: Export,
        fds: Vec<OwnedFd>,
        mut idle: Option<OwnedFd>,
        mount: Option<(PathBuf, MountMethod)>,
        negotiated: Negotiated,
        on_event: EventSink,
    ) -> Result<Session> {
        let on_stop = Box::new(move |cause: StopCause| match cause {
            StopCause::Halt(reason) => on_event(SessionEvent::Halt { reason }),
            StopCause::Disconnected => on_event(SessionEvent::Halt {
                reason: "the kernel ended the FUSE connection (aborted, or unmounted from outside)"
                    .into(),
            }),
        });
        let max_write = negotiated.max_write as usize;
        let shared = Arc::new(Shared::with_queues(export, max_write, fds.len(), on_stop));
        let mut session = Session {
            shared,
            threads: Vec::with_capacity(fds.len()),
            mount,
            guard: None,
            abort: None,
            negotiated,
        };
        for (i, fd) in fds.into_iter().enumerate() {
            let queue_shared = session.shared.clone();
            let queue_idle = idle.take();
            let spawned = std::thread::Builder::new()
                .name(format!("blockfuse-q{i}"))
                .spawn(move || run_queue_at(fd, queue_idle, queue_shared, i));
            match spawned {
                Ok(t) => session.threads.push(t),
                Err(e) => {
                    let _ = session.shutdown();
                    return Err(Error::Internal(format!("cannot start queue thread: {e}")));
                }
            }
        }
        Ok(session)
    }

    pub fn export(&self) -> &Export {
        &self.shared.export
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// Requests being served right now, per queue.
    pub fn in_flight(&self) -> Vec<u64> {
        self.shared.in_flight()
    }

    /// Unmounts, lets every queue finish the request it is serving, and flushes the backend.
    /// Idempotent.
    pub fn shutdown(&mut self) -> Result<()> {
        // Unmount first, while the queues still answer: the mountpoint is uncovered at once.
        self.shared.begin_close();
        let unmounted = match self.mount.take() {
            // Unmounted from outside already (umount, fusermount3 -u): nothing left to do.
            Some((mountpoint, _)) if !mount::is_mounted(&mountpoint) => Ok(()),
            Some((mountpoint, method)) => mount::unmount(&mountpoint, method),
            None => Ok(()),
        };
        if unmounted.is_ok() {
            if let Some(guard) = self.guard.take() {
                guard.disarm();
            }
        }
        self.shared.request_stop();
        self.wake_idle_reader();
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
        let flushed = flush_now(self.shared.export.backend());
        unmounted?;
        if let Some(f) = failure {
            return Err(Error::Internal(f));
        }
        flushed.map_err(|e| Error::Internal(format!("final flush failed: {e}")))
    }
}

impl Session {
    /// A queue sleeping in read(2) while idle wakes when the connection ends. The unmount ends it
    /// unless a client still holds the file open (the unmount is lazy); then the connection is
    /// aborted, as closing our /dev/fuse fds would do: such clients get ENOTCONN.
    fn wake_idle_reader(&mut self) {
        let Some(mut abort) = self.abort.take() else { return };
        // Only a queue with nothing in flight can be asleep in read(2); one serving requests
        // stops after them by itself, and aborting would lose their replies.
        let mut idle_since = std::time::Instant::now();
        while self.threads.iter().any(|t| !t.is_finished()) {
            if self.shared.in_flight().iter().any(|&n| n > 0) {
                idle_since = std::time::Instant::now();
            } else if idle_since.elapsed() >= IDLE_WAKE_GRACE {
                use std::io::Write;
                if let Err(e) = abort.write_all(b"1") {
                    log::error!("cannot abort the FUSE connection to stop its queue: {e}");
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// How long close() lets an idle queue stop by itself before it aborts the connection. When the
/// unmount ended the connection (no client holds the file open) the queue stops at once.
const IDLE_WAKE_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Flushes the backend from the closing thread, on a throwaway current-thread runtime.
fn flush_now(backend: &Backend) -> std::io::Result<()> {
    tokio::runtime::Builder::new_current_thread().build()?.block_on(backend.flush())
}

fn clone_fd(session: &OwnedFd) -> Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| Error::FuseDevice(format!("cannot open /dev/fuse for a queue: {e}")))?;
    sys::fuse_clone_fd(dev.as_fd(), session.as_fd())
        .map_err(|e| Error::FuseDevice(format!("failed to clone /dev/fuse fd: {e}")))?;
    Ok(dev.into())
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
    let Op::Init { major, minor, max_readahead, flags } = req.op else {
        return Err(Error::Init(format!(
            "expected INIT as the first request, got opcode {} ({})",
            req.header.opcode,
            opcode::name(req.header.opcode)
        )));
    };
    let mut body = [0u8; MAX_SMALL_REPLY];
    let mut header = [0u8; size::OUT_HEADER];
    let (len, error, result) = match negotiate_init(major, minor, max_readahead, flags, limits) {
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
