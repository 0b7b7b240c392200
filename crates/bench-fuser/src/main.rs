//! `bench-fuser`: a bench-only peer that serves a blockfuse backend as one regular file through
//! the `fuser` library instead of blockfuse's own `/dev/fuse` path. It measures the library path
//! (fuser's read loop, decoding, reply writing, one request at a time per thread) against ours,
//! over the very same backend code. Never linked into the product.
//!
//! `--refuse-locks` makes it a file system without lock support (as NFS without lockd): it asks
//! the kernel for POSIX lock requests and answers every one with ENOLCK. The image-lock specs use
//! it to check `locking: 'auto'`'s fallback and `'on'`'s refusal on a real file system.
//! `--no-locking` takes no image locks (the bench's servers share one image, as blockfuse's
//! `--locking off` and QEMU's `locking=off` there).
//!
//! Usage: `bench-fuser [--threads N] [--no-clone-fd] [--cache none|writeback] [--read-only]
//! [--refuse-locks] [--no-locking] <image|null:SIZE> <mountpoint-file>`. Prints one `ready: ...` line once mounted; SIGINT or
//! SIGTERM unmounts and exits 0.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use blockfuse_core::backend::{
    Backend, BlockBackend, CacheMode, LockMode, NullBackend, RawBackend, RawOptions,
};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session, WriteFlags,
};

/// Largest READ/WRITE we negotiate (blockfuse's transfer limit too).
const MAX_IO: usize = 1 << 20;
/// How long the kernel may cache attributes (blockfuse uses the same).
const TTL: Duration = Duration::from_secs(1);
/// Buffer alignment for O_DIRECT backends.
const BUF_ALIGN: usize = 4096;

thread_local! {
    /// Each fuser worker thread drives the backend's (non-Send) futures on its own runtime.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("failed to build a current-thread tokio runtime");
    /// Per-thread I/O buffer, over-allocated so an aligned window always fits. fuser handles
    /// one request at a time per thread, so it is never borrowed twice.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_IO + BUF_ALIGN]);
}

fn block_on<F: Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}

/// Runs `f` on an aligned window of `len` bytes of this thread's buffer.
fn with_buf<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len + BUF_ALIGN {
            b.resize(len + BUF_ALIGN, 0);
        }
        let off = b.as_ptr().align_offset(BUF_ALIGN);
        f(&mut b[off..off + len])
    })
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

struct BlockFs {
    backend: Backend,
    writable: bool,
    /// Answer every lock request ENOLCK (`--refuse-locks`).
    refuse_locks: bool,
    uid: u32,
    gid: u32,
}

impl BlockFs {
    fn attr(&self) -> FileAttr {
        let size = self.backend.len();
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(1),
            size,
            blocks: self.backend.allocated_bytes().map(|b| b / 512).unwrap_or(size.div_ceil(512)),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: if self.writable { 0o600 } else { 0o400 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.backend.alignment().max(512),
            flags: 0,
        }
    }
}

impl Filesystem for BlockFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Same negotiation as blockfuse where fuser lets us: async direct I/O, 1 MiB writes,
        // no background-request throttling.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(MAX_IO as u32);
        let _ = config.set_max_background(u16::MAX);
        let _ = config.set_congestion_threshold((u16::MAX as u32 * 3 / 4) as u16);
        if self.refuse_locks {
            // Without it the kernel keeps locks itself and never asks.
            let _ = config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS);
        }
        Ok(())
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: fuser::ReplyLock,
    ) {
        reply.error(Errno::ENOLCK);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOLCK);
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(size) = size {
            if !self.writable {
                return reply.error(Errno::EACCES);
            }
            if let Err(e) = block_on(self.backend.truncate(size, false)) {
                return reply.error(errno(e));
            }
        }
        reply.attr(&TTL, &self.attr());
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.writable && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EACCES);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self.backend.len();
        // Short reads at EOF, empty reads past it.
        if offset >= len {
            return reply.data(&[]);
        }
        let n = (size as u64).min(len - offset) as usize;
        with_buf(n, |buf| match block_on(self.backend.read_at(buf, offset)) {
            Ok(()) => reply.data(buf),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.writable {
            return reply.error(Errno::EACCES);
        }
        let len = self.backend.len();
        if offset >= len {
            return reply.written(0);
        }
        // Short writes at EOF (not growable).
        let n = (data.len() as u64).min(len - offset) as usize;
        let data = &data[..n];
        let result = if self.backend.alignment() > 1 {
            // fuser hands us its receive buffer, which is not aligned for O_DIRECT: bounce.
            with_buf(n, |buf| {
                buf.copy_from_slice(data);
                block_on(self.backend.write_at(buf, offset))
            })
        } else {
            block_on(self.backend.write_at(data, offset))
        };
        match result {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match block_on(self.backend.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match block_on(self.backend.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = self.backend.optimal_transfer().max(512);
        let blocks = self.backend.len().div_ceil(bsize as u64);
        reply.statfs(blocks, 0, 0, 1, 0, bsize, 255, bsize);
    }
}

struct Args {
    source: String,
    mountpoint: PathBuf,
    threads: usize,
    clone_fd: bool,
    cache: CacheMode,
    writable: bool,
    refuse_locks: bool,
    locking: LockMode,
}

const USAGE: &str = "usage: bench-fuser [--threads N] [--no-clone-fd] [--cache none|writeback] \
                     [--read-only] [--refuse-locks] [--no-locking] <image|null:SIZE> \
                     <mountpoint-file>";

fn parse_args() -> Result<Args, String> {
    let mut threads = 1;
    let mut clone_fd = true;
    let mut cache = CacheMode::Writeback;
    let mut writable = true;
    let mut refuse_locks = false;
    let mut locking = LockMode::Auto;
    let mut positional = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => {
                let v = it.next().ok_or("--threads needs a value")?;
                threads = v.parse().map_err(|_| format!("bad --threads {v}"))?;
                if threads == 0 {
                    return Err("--threads must be at least 1".into());
                }
            }
            "--no-clone-fd" => clone_fd = false,
            "--cache" => {
                cache = match it.next().as_deref() {
                    Some("none") => CacheMode::None,
                    Some("writeback") => CacheMode::Writeback,
                    other => return Err(format!("bad --cache {other:?}")),
                }
            }
            "--read-only" => writable = false,
            "--refuse-locks" => refuse_locks = true,
            "--no-locking" => locking = LockMode::Off,
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => positional.push(a),
        }
    }
    let [source, mountpoint] = <[String; 2]>::try_from(positional)
        .map_err(|_| "expected <image|null:SIZE> <mountpoint-file>".to_string())?;
    Ok(Args {
        source,
        mountpoint: mountpoint.into(),
        threads,
        clone_fd,
        cache,
        writable,
        refuse_locks,
        locking,
    })
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult).filter(|&n| n > 0)
}

fn open_backend(args: &Args) -> Result<Backend, String> {
    if let Some(size) = args.source.strip_prefix("null:") {
        let len = parse_size(size).ok_or_else(|| format!("bad null size {size:?}"))?;
        return Ok(Backend::Null(NullBackend::new(len)));
    }
    let opts = RawOptions {
        writable: args.writable,
        cache: args.cache,
        locking: args.locking,
        ..Default::default()
    };
    RawBackend::open(args.source.as_ref(), opts)
        .map(Backend::Raw)
        .map_err(|e| format!("failed to open {}: {e}", args.source))
}

fn run(args: Args) -> Result<(), String> {
    let backend = open_backend(&args)?;
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs =
        BlockFs { backend, writable: args.writable, refuse_locks: args.refuse_locks, uid, gid };

    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("bench-fuser".into()),
        if args.writable { MountOption::RW } else { MountOption::RO },
    ];
    cfg.n_threads = Some(args.threads);
    cfg.clone_fd = args.clone_fd;

    // Signals are handled on this thread's runtime; set up before mounting so none is lost.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("failed to build runtime: {e}"))?;
    let (mut sigint, mut sigterm) = rt
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .map_err(|e| format!("failed to install signal handlers: {e}"))?;

    let mut session = Session::new(fs, &args.mountpoint, &cfg)
        .map_err(|e| format!("failed to mount at {}: {e}", args.mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let worker = std::thread::Builder::new()
        .name("fuser-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })
        .map_err(|e| format!("failed to spawn the session thread: {e}"))?;

    println!(
        "ready: {} exported at {} (fuser, {} thread{}, clone_fd={}, cache={:?})",
        args.source,
        args.mountpoint.display(),
        args.threads,
        if args.threads == 1 { "" } else { "s" },
        args.clone_fd,
        args.cache
    );

    let unmounted_externally = rt.block_on(async {
        tokio::select! {
            _ = sigint.recv() => false,
            _ = sigterm.recv() => false,
            _ = done_rx => true,
        }
    });
    if !unmounted_externally {
        unmounter.unmount().map_err(|e| format!("failed to unmount: {e}"))?;
    }
    match worker.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("session ended with an error: {e}")),
        Err(_) => Err("session thread panicked".into()),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("bench-fuser: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("bench-fuser: {msg}");
            ExitCode::FAILURE
        }
    }
}
