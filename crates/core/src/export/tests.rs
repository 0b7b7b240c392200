//! Handler tests: every op's semantics through `Export::handle` against a `MemoryBackend`, and
//! INIT negotiation.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{negotiate_init, Export, ExportOptions, InitLimits, Outcome};
use crate::backend::{Backend, BlockBackend, MemoryBackend, NullBackend};
use crate::protocol::abi::{
    falloc, fattr, fopen, init_flags::*, opcode, whence, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use crate::protocol::decode::{decode, DecodeError, Op, SetattrIn};
use crate::protocol::encode::{init_out, MAX_SMALL_REPLY};

use falloc::{
    FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_ZERO_RANGE as ZERO,
};

const UID: u32 = 1234;
const GID: u32 = 5678;
const IMAGE_LEN: usize = 10_000;
const DATA_BUF: usize = 1 << 20;

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
}

fn opts() -> ExportOptions {
    ExportOptions {
        writable: false,
        growable: false,
        allow_other: false,
        writethrough: false,
        max_read: 1 << 20,
    }
}

fn writable() -> ExportOptions {
    ExportOptions { writable: true, ..opts() }
}

fn growable() -> ExportOptions {
    ExportOptions { writable: true, growable: true, ..opts() }
}

/// A recognisable image: byte i is i*7 mod 251 + 1 (never zero, so zeroing is visible).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect()
}

fn export_with(image: Vec<u8>, o: ExportOptions) -> Export {
    Export::new(Backend::Memory(MemoryBackend::new(image)), o, UID, GID)
}

fn export(o: ExportOptions) -> Export {
    export_with(pattern(IMAGE_LEN), o)
}

fn mem(e: &Export) -> &MemoryBackend {
    match e.backend() {
        Backend::Memory(m) => m,
        _ => unreachable!("tests use the memory backend"),
    }
}

/// The result of one `handle` call: its outcome and both reply buffers.
struct Reply {
    outcome: Outcome,
    small: [u8; MAX_SMALL_REPLY],
    data: Vec<u8>,
}

impl Reply {
    fn small_body(&self) -> &[u8] {
        match self.outcome {
            Outcome::Small(n) => &self.small[..n],
            o => panic!("expected a small reply, got {o:?}"),
        }
    }
    fn data_body(&self) -> &[u8] {
        match self.outcome {
            Outcome::Data(n) => &self.data[..n],
            o => panic!("expected a data reply, got {o:?}"),
        }
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.small_body()[off..off + 4].try_into().unwrap())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_ne_bytes(self.small_body()[off..off + 8].try_into().unwrap())
    }
    /// `fuse_write_out.size`.
    fn written(&self) -> u32 {
        assert_eq!(self.small_body().len(), 8);
        self.u32_at(0)
    }
    /// `fuse_lseek_out.offset`.
    fn lseek_offset(&self) -> u64 {
        assert_eq!(self.small_body().len(), 8);
        self.u64_at(0)
    }
    /// The attributes of a `fuse_attr_out` reply (fuse_attr starts at 16).
    fn attr(&self) -> ReplyAttr {
        assert_eq!(self.small_body().len(), 104);
        ReplyAttr {
            valid: self.u64_at(0),
            ino: self.u64_at(16),
            size: self.u64_at(24),
            blocks: self.u64_at(32),
            mode: self.u32_at(76),
            nlink: self.u32_at(80),
            uid: self.u32_at(84),
            gid: self.u32_at(88),
            blksize: self.u32_at(96),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct ReplyAttr {
    valid: u64,
    ino: u64,
    size: u64,
    blocks: u64,
    mode: u32,
    nlink: u32,
    uid: u32,
    gid: u32,
    blksize: u32,
}

fn opcode_of(op: &Op) -> u32 {
    match op {
        Op::Init { .. } => opcode::FUSE_INIT,
        Op::Destroy => opcode::FUSE_DESTROY,
        Op::Statfs => opcode::FUSE_STATFS,
        Op::Lookup => opcode::FUSE_LOOKUP,
        Op::Forget => opcode::FUSE_FORGET,
        Op::Getattr => opcode::FUSE_GETATTR,
        Op::Setattr(_) => opcode::FUSE_SETATTR,
        Op::Open { .. } => opcode::FUSE_OPEN,
        Op::Release => opcode::FUSE_RELEASE,
        Op::Read { .. } => opcode::FUSE_READ,
        Op::Write { .. } => opcode::FUSE_WRITE,
        Op::Flush => opcode::FUSE_FLUSH,
        Op::Fsync { .. } => opcode::FUSE_FSYNC,
        Op::Fallocate { .. } => opcode::FUSE_FALLOCATE,
        Op::Lseek { .. } => opcode::FUSE_LSEEK,
        Op::Unsupported => 9999,
    }
}

/// Runs one op; `payload` is placed at the start of the data buffer (a WRITE's payload).
fn call(e: &Export, op: Op, payload: &[u8]) -> Reply {
    let mut small = [0xeeu8; MAX_SMALL_REPLY];
    let mut data = vec![0xeeu8; DATA_BUF];
    data[..payload.len()].copy_from_slice(payload);
    let outcome = block_on(e.handle(opcode_of(&op), op, &mut small, &mut data));
    Reply { outcome, small, data }
}

fn errno(e: &Export, op: Op) -> i32 {
    match call(e, op, &[]).outcome {
        Outcome::Error(n) => n,
        o => panic!("expected an error for {op:?}, got {o:?}"),
    }
}

fn write(e: &Export, offset: u64, payload: &[u8]) -> Reply {
    call(e, Op::Write { offset, size: payload.len() as u32 }, payload)
}

fn setattr(e: &Export, s: SetattrIn) -> Reply {
    call(e, Op::Setattr(s), &[])
}

fn set_mode(mode: u32) -> SetattrIn {
    SetattrIn { valid: fattr::FATTR_MODE, mode, ..Default::default() }
}

fn fallocate(e: &Export, offset: u64, length: u64, mode: u32) -> Outcome {
    call(e, Op::Fallocate { offset, length, mode }, &[]).outcome
}

fn lseek(e: &Export, offset: u64, whence: u32) -> Reply {
    call(e, Op::Lseek { offset, whence }, &[])
}

// ---------------------------------------------------------------------------------------------
// INIT

fn limits() -> InitLimits {
    InitLimits { max_write: 1 << 20, page_size: 4096, io_uring: false, passthrough: false }
}

const WANTED: u32 = FUSE_ASYNC_READ | FUSE_ASYNC_DIO | FUSE_BIG_WRITES | FUSE_MAX_PAGES;

#[test]
fn init_refuses_other_majors_and_minors_before_9() {
    for major in [0, 6, 8, u32::MAX] {
        let err = negotiate_init(major, 41, 0, u32::MAX, 0, limits()).unwrap_err();
        assert!(err.contains("major"), "{err}");
    }
    for minor in [0, 5, 8] {
        let err = negotiate_init(7, minor, 0, u32::MAX, 0, limits()).unwrap_err();
        assert!(err.contains(&format!("7.{minor}")), "{err}");
    }
}

#[test]
fn init_accepts_7_9_with_the_compat_reply() {
    let (out, neg) = negotiate_init(7, 9, 4096, FUSE_ASYNC_READ | FUSE_BIG_WRITES, 0, limits())
        .expect("7.9 is the oldest we accept");
    assert_eq!((out.major, out.minor, neg.minor), (7, 9, 9));
    let mut b = [0u8; MAX_SMALL_REPLY];
    assert_eq!(init_out(&mut b, &out), 24, "before 7.23 the kernel expects 24 bytes");
    // 7.22 still gets the compat size, 7.23 the full one.
    let (out, _) = negotiate_init(7, 22, 0, 0, 0, limits()).unwrap();
    assert_eq!(init_out(&mut b, &out), 24);
    let (out, _) = negotiate_init(7, 23, 0, 0, 0, limits()).unwrap();
    assert_eq!(init_out(&mut b, &out), 64);
}

#[test]
fn init_answers_with_the_lower_minor() {
    let (out, neg) = negotiate_init(7, 99, 0, 0, 0, limits()).unwrap();
    assert_eq!(out.major, KERNEL_VERSION);
    assert_eq!((out.minor, neg.minor), (KERNEL_MINOR_VERSION, KERNEL_MINOR_VERSION));
    let (out, _) = negotiate_init(7, 31, 0, 0, 0, limits()).unwrap();
    assert_eq!(out.minor, 31);
}

#[test]
fn init_flags_are_the_intersection_with_what_we_want() {
    for offered in [0, u32::MAX, FUSE_ASYNC_READ, FUSE_ASYNC_DIO | FUSE_INIT_EXT | (1 << 3), WANTED]
    {
        let (out, neg) = negotiate_init(7, 41, 0, offered, 0, limits()).unwrap();
        assert_eq!(out.flags, offered & WANTED, "offered {offered:#x}");
        assert_eq!(neg.flags, out.flags);
    }
}

#[test]
fn init_max_write_and_pages() {
    let (out, neg) = negotiate_init(7, 41, 0, u32::MAX, 0, limits()).unwrap();
    assert_eq!((out.max_write, neg.max_write), (1 << 20, 1 << 20));
    assert_eq!(out.max_pages, 256);
    // Without MAX_PAGES the kernel sends at most 32 pages per request.
    let (out, neg) = negotiate_init(7, 41, 0, !FUSE_MAX_PAGES, 0, limits()).unwrap();
    assert_eq!((out.max_write, neg.max_write), (128 << 10, 128 << 10));
    // Never more than our buffers take.
    let small = InitLimits { max_write: 64 << 10, ..limits() };
    let (out, _) = negotiate_init(7, 41, 0, u32::MAX, 0, small).unwrap();
    assert_eq!(out.max_write, 64 << 10);
    // QEMU's 64 KiB is the floor the issue sets; we offer more.
    assert!(negotiate_init(7, 41, 0, u32::MAX, 0, limits()).unwrap().0.max_write >= 64 << 10);
}

#[test]
fn init_agrees_on_io_uring_only_when_offered_asked_for_and_7_42() {
    use crate::protocol::abi::init_flags2::FUSE_OVER_IO_URING;
    let ring = InitLimits { io_uring: true, ..limits() };
    let offered = WANTED | FUSE_INIT_EXT;
    let (out, neg) = negotiate_init(7, 42, 0, offered, FUSE_OVER_IO_URING, ring).unwrap();
    assert!(neg.io_uring);
    assert_eq!(out.flags, WANTED | FUSE_INIT_EXT, "flags2 is only read with INIT_EXT");
    assert_eq!(out.flags2, FUSE_OVER_IO_URING);
    // Any missing piece: no io_uring, and no flags2 in the reply.
    for (minor, flags, flags2, limits) in [
        (42, offered, FUSE_OVER_IO_URING, limits()),
        (41, offered, FUSE_OVER_IO_URING, ring),
        (42, WANTED, FUSE_OVER_IO_URING, ring),
        (42, offered, 0, ring),
        (42, offered, !FUSE_OVER_IO_URING, ring),
    ] {
        let (out, neg) = negotiate_init(7, minor, 0, flags, flags2, limits).unwrap();
        assert!(!neg.io_uring, "7.{minor} {flags:#x} {flags2:#x} {limits:?}");
        assert_eq!(out.flags2 & FUSE_OVER_IO_URING, 0);
        assert_eq!(out.flags & FUSE_INIT_EXT != 0, out.flags2 != 0, "INIT_EXT iff flags2");
    }
}

#[test]
fn init_agrees_on_passthrough_only_when_asked_offered_and_7_40() {
    use crate::protocol::abi::init_flags2::FUSE_PASSTHROUGH as PT;
    let want = InitLimits { passthrough: true, ..limits() };
    let offered = WANTED | FUSE_INIT_EXT;
    let (out, neg) = negotiate_init(7, 40, 0, offered, PT, want).unwrap();
    assert!(neg.passthrough);
    assert_eq!((out.flags2 & PT, out.max_stack_depth), (PT, 1));
    assert_ne!(out.flags & FUSE_INIT_EXT, 0);
    for (minor, flags, flags2, limits) in [
        (39, offered, PT, want),
        (40, WANTED, PT, want),
        (41, offered, !PT, want),
        (41, offered, PT, limits()),
    ] {
        let (out, neg) = negotiate_init(7, minor, 0, flags, flags2, limits).unwrap();
        assert!(!neg.passthrough, "7.{minor} {flags:#x} {flags2:#x} {limits:?}");
        assert_eq!((out.flags2 & PT, out.max_stack_depth), (0, 0));
    }
}

#[test]
fn passthrough_goes_to_read_only_opens_and_names_the_backing_file_on_every_open() {
    use crate::export::Passthrough;
    use fopen::{
        FOPEN_DIRECT_IO as DIO, FOPEN_PARALLEL_DIRECT_WRITES as PAR, FOPEN_PASSTHROUGH as PT,
    };
    let served = DIO | PAR;
    let (rd, rw, wr, direct) =
        (libc::O_RDONLY as u32, libc::O_RDWR as u32, libc::O_WRONLY as u32, libc::O_DIRECT as u32);
    assert_eq!(Passthrough::default().open_reply(served, rd), (served, 0), "no backing file");
    let cached = Passthrough::new(3, false, false);
    assert_eq!(cached.open_reply(served, rd), (PT, 3));
    assert_eq!(cached.open_reply(served, rd | direct), (PT, 3));
    assert_eq!(cached.open_reply(served, rw), (served | PT, 3), "writes stay with us");
    assert_eq!(cached.open_reply(served, wr), (served | PT, 3));
    let direct_image = Passthrough::new(5, true, false);
    assert_eq!(direct_image.open_reply(served, rd | direct), (PT, 5));
    assert_eq!(direct_image.open_reply(served, rd), (served | PT, 5), "would use the page cache");
}

#[test]
fn passthrough_writes_only_where_the_kernel_keeps_every_write_rule() {
    use crate::export::Passthrough;
    use fopen::{
        FOPEN_DIRECT_IO as DIO, FOPEN_PARALLEL_DIRECT_WRITES as PAR, FOPEN_PASSTHROUGH as PT,
    };
    // (writable, growable, writethrough)
    assert!(Passthrough::writes_keep_rules(true, true, false));
    assert!(!Passthrough::writes_keep_rules(true, false, false), "non-growable: ENOSPC at the end");
    assert!(!Passthrough::writes_keep_rules(true, true, true), "writethrough flushes first");
    assert!(!Passthrough::writes_keep_rules(false, true, false), "read-only export");

    let served = DIO | PAR;
    let (rd, rw, wr, direct) =
        (libc::O_RDONLY as u32, libc::O_RDWR as u32, libc::O_WRONLY as u32, libc::O_DIRECT as u32);
    let writes = Passthrough::new(3, false, true);
    assert!(writes.writes());
    assert_eq!(writes.open_reply(served, rw), (PT, 3));
    assert_eq!(writes.open_reply(served, wr | direct), (PT, 3));
    assert_eq!(writes.open_reply(served, rd), (PT, 3));
    // An O_DIRECT image never lets the kernel write: buffered writable opens would stay ours.
    let direct_image = Passthrough::new(5, true, true);
    assert!(!direct_image.writes());
    assert_eq!(direct_image.open_reply(served, rw | direct), (served | PT, 5));
    assert!(!Passthrough::default().writes());
}

#[test]
fn init_allows_mmap_of_direct_io_files_when_offered_and_7_39() {
    use crate::protocol::abi::init_flags2::FUSE_DIRECT_IO_ALLOW_MMAP as MMAP;
    let offered = WANTED | FUSE_INIT_EXT;
    let (out, _) = negotiate_init(7, 39, 0, offered, MMAP, limits()).unwrap();
    assert_eq!((out.flags, out.flags2), (WANTED | FUSE_INIT_EXT, MMAP));
    for (minor, flags, flags2) in [(38, offered, MMAP), (39, WANTED, MMAP), (41, offered, !MMAP)] {
        let (out, _) = negotiate_init(7, minor, 0, flags, flags2, limits()).unwrap();
        assert_eq!((out.flags & FUSE_INIT_EXT, out.flags2), (0, 0), "7.{minor} {flags2:#x}");
    }
}

#[test]
fn init_background_limits_are_libfuses_maxima() {
    let (out, _) = negotiate_init(7, 41, 131072, u32::MAX, 0, limits()).unwrap();
    assert_eq!(out.max_background, 65535);
    assert_eq!(out.congestion_threshold, 49151);
    assert_eq!(out.max_readahead, 131072);
}

// ---------------------------------------------------------------------------------------------
// GETATTR, STATFS, OPEN, LOOKUP, FORGET, unknown ops

#[test]
fn getattr_read_only() {
    let e = export(opts());
    let r = call(&e, Op::Getattr, &[]);
    assert_eq!(r.outcome, Outcome::Small(104));
    assert_eq!(
        r.attr(),
        ReplyAttr {
            valid: 1,
            ino: 1,
            size: IMAGE_LEN as u64,
            blocks: (IMAGE_LEN as u64).div_ceil(512),
            mode: libc::S_IFREG | 0o400,
            nlink: 1,
            uid: UID,
            gid: GID,
            blksize: 512,
        }
    );
}

#[test]
fn getattr_writable_mode_and_size_follow_the_backend() {
    let e = export_with(pattern(4097), writable());
    let a = call(&e, Op::Getattr, &[]).attr();
    assert_eq!(a.mode, libc::S_IFREG | 0o600);
    assert_eq!((a.size, a.blocks), (4097, 9));
    assert!(a.blksize >= 512);
}

#[test]
fn statfs() {
    let e = export(opts());
    let r = call(&e, Op::Statfs, &[]);
    assert_eq!(r.outcome, Outcome::Small(80));
    let bsize = r.u32_at(40);
    assert!(bsize >= 512 && bsize.is_power_of_two(), "bsize {bsize}");
    assert_eq!(r.u32_at(44), 255, "namelen");
    assert_eq!(r.u64_at(0), (IMAGE_LEN as u64).div_ceil(bsize as u64), "blocks");
}

#[test]
fn open_asks_for_direct_io() {
    let e = export(opts());
    let r = call(&e, Op::Open { flags: libc::O_RDWR as u32, pid: 0 }, &[]);
    assert_eq!(r.outcome, Outcome::Small(16));
    assert_eq!(r.u32_at(8), fopen::FOPEN_DIRECT_IO | fopen::FOPEN_PARALLEL_DIRECT_WRITES);
}

#[test]
fn lookup_unknown_forget_and_trivial_ops() {
    let e = export(opts());
    assert_eq!(errno(&e, Op::Lookup), libc::ENOENT);
    assert_eq!(errno(&e, Op::Unsupported), libc::ENOSYS);
    assert_eq!(call(&e, Op::Forget, &[]).outcome, Outcome::NoReply);
    assert_eq!(call(&e, Op::Release, &[]).outcome, Outcome::Small(0));
    assert_eq!(call(&e, Op::Destroy, &[]).outcome, Outcome::Small(0));
    // INIT belongs to the handshake; a second one is a protocol error.
    let init = Op::Init { major: 7, minor: 41, max_readahead: 0, flags: 0, flags2: 0 };
    assert_eq!(errno(&e, init), libc::EPROTO);
}

#[test]
fn flush_and_fsync_flush_the_backend() {
    let e = export(writable());
    assert_eq!(call(&e, Op::Flush, &[]).outcome, Outcome::Small(0));
    assert_eq!(call(&e, Op::Fsync { datasync: true }, &[]).outcome, Outcome::Small(0));
    assert_eq!(call(&e, Op::Fsync { datasync: false }, &[]).outcome, Outcome::Small(0));
    assert_eq!(mem(&e).flush_count(), 3);
}

#[test]
fn stats_count_requests_bytes_and_errors() {
    use Ordering::Relaxed;
    let e = export(writable());
    call(&e, Op::Read { offset: 0, size: 100 }, &[]);
    write(&e, 0, &[1; 30]);
    call(&e, Op::Getattr, &[]);
    call(&e, Op::Lookup, &[]);
    call(&e, Op::Unsupported, &[]);
    call(&e, Op::Unsupported, &[]);
    assert_eq!(e.stats.requests[opcode::FUSE_READ as usize].load(Relaxed), 1);
    assert_eq!(e.stats.requests[opcode::FUSE_WRITE as usize].load(Relaxed), 1);
    assert_eq!(e.stats.requests[opcode::FUSE_GETATTR as usize].load(Relaxed), 1);
    assert_eq!(e.stats.bytes_read.load(Relaxed), 100);
    assert_eq!(e.stats.bytes_written.load(Relaxed), 30);
    assert_eq!(e.stats.errors.load(Relaxed), 1, "LOOKUP's error; ENOSYS is counted apart");
    assert_eq!(e.stats.unsupported.load(Relaxed), 2);
}

// ---------------------------------------------------------------------------------------------
// SETATTR

#[test]
fn setattr_size_on_read_only_is_eacces() {
    let e = export(opts());
    let s = SetattrIn { valid: fattr::FATTR_SIZE, size: 5, ..Default::default() };
    assert_eq!(setattr(&e, s).outcome, Outcome::Error(libc::EACCES));
    assert_eq!(mem(&e).len(), IMAGE_LEN as u64);
}

#[test]
fn setattr_size_grows_and_shrinks_and_replies_the_new_size() {
    let e = export(writable());
    let grow = SetattrIn { valid: fattr::FATTR_SIZE, size: 12_345, ..Default::default() };
    assert_eq!(setattr(&e, grow).attr().size, 12_345);
    let img = mem(&e).snapshot();
    assert_eq!(img.len(), 12_345);
    assert_eq!(&img[..IMAGE_LEN], &pattern(IMAGE_LEN)[..]);
    assert!(img[IMAGE_LEN..].iter().all(|&b| b == 0));

    let shrink = SetattrIn { valid: fattr::FATTR_SIZE, size: 100, ..Default::default() };
    assert_eq!(setattr(&e, shrink).attr().size, 100);
    assert_eq!(mem(&e).snapshot(), pattern(100));
}

#[test]
fn setattr_mode_never_adds_write_to_a_read_only_export() {
    let e = export(opts());
    for mode in [0o600, 0o200, 0o700, 0o100600] {
        assert_eq!(setattr(&e, set_mode(mode)).outcome, Outcome::Error(libc::EROFS), "{mode:o}");
    }
    // Group/other write bits are write bits too (EROFS wins over EPERM).
    assert_eq!(setattr(&e, set_mode(0o420)).outcome, Outcome::Error(libc::EROFS));
    assert_eq!(call(&e, Op::Getattr, &[]).attr().mode, libc::S_IFREG | 0o400);
    // Mode changes without write bits are fine (the `ro` mount refuses chmod before us anyway).
    assert_eq!(setattr(&e, set_mode(0o500)).attr().mode, libc::S_IFREG | 0o500);
    assert_eq!(setattr(&e, set_mode(0)).attr().mode, libc::S_IFREG);
}

#[test]
fn setattr_group_and_other_bits_need_allow_other() {
    let e = export(writable());
    for mode in [0o640, 0o604, 0o610, 0o601, 0o677] {
        assert_eq!(setattr(&e, set_mode(mode)).outcome, Outcome::Error(libc::EPERM), "{mode:o}");
    }
    assert_eq!(call(&e, Op::Getattr, &[]).attr().mode, libc::S_IFREG | 0o600);
    assert_eq!(setattr(&e, set_mode(0o700)).attr().mode, libc::S_IFREG | 0o700);

    let e = export(ExportOptions { allow_other: true, ..writable() });
    assert_eq!(setattr(&e, set_mode(0o644)).attr().mode, libc::S_IFREG | 0o644);
    assert_eq!(call(&e, Op::Getattr, &[]).attr().mode, libc::S_IFREG | 0o644);
    // Read-only with allow_other: read bits for everyone, still no write.
    let e = export(ExportOptions { allow_other: true, ..opts() });
    assert_eq!(setattr(&e, set_mode(0o444)).attr().mode, libc::S_IFREG | 0o444);
    assert_eq!(setattr(&e, set_mode(0o644)).outcome, Outcome::Error(libc::EROFS));
}

#[test]
fn setattr_keeps_the_file_regular() {
    let e = export(writable());
    let a = setattr(&e, set_mode(libc::S_IFDIR | 0o700)).attr();
    assert_eq!(a.mode, libc::S_IFREG | 0o700);
    let a = setattr(&e, set_mode(libc::S_IFLNK | 0o600)).attr();
    assert_eq!(a.mode, libc::S_IFREG | 0o600);
    assert_eq!(call(&e, Op::Getattr, &[]).attr().mode & libc::S_IFMT, libc::S_IFREG);
}

#[test]
fn setattr_uid_gid_need_allow_other() {
    let e = export(writable());
    for valid in [fattr::FATTR_UID, fattr::FATTR_GID, fattr::FATTR_UID | fattr::FATTR_GID] {
        let s = SetattrIn { valid, uid: 1, gid: 2, ..Default::default() };
        assert_eq!(setattr(&e, s).outcome, Outcome::Error(libc::EOPNOTSUPP), "{valid:#x}");
    }
    let a = call(&e, Op::Getattr, &[]).attr();
    assert_eq!((a.uid, a.gid), (UID, GID));

    let e = export(ExportOptions { allow_other: true, ..writable() });
    let s = SetattrIn { valid: fattr::FATTR_UID, uid: 77, gid: 999, ..Default::default() };
    let a = setattr(&e, s).attr();
    assert_eq!((a.uid, a.gid), (77, GID), "only uid was valid");
    let s = SetattrIn { valid: fattr::FATTR_GID, uid: 999, gid: 88, ..Default::default() };
    let a = setattr(&e, s).attr();
    assert_eq!((a.uid, a.gid), (77, 88));
    let a = call(&e, Op::Getattr, &[]).attr();
    assert_eq!((a.uid, a.gid), (77, 88));
}

#[test]
fn setattr_accepts_and_ignores_fh_lockowner_kill_suidgid() {
    let e = export(writable());
    let before = call(&e, Op::Getattr, &[]).attr();
    let valid = fattr::FATTR_FH | fattr::FATTR_LOCKOWNER | fattr::FATTR_KILL_SUIDGID;
    let s = SetattrIn { valid, fh: 3, size: 1, mode: 0o777, uid: 1, gid: 1 };
    assert_eq!(setattr(&e, s).attr(), before);
    // Together with a real change.
    let s = SetattrIn { valid: valid | fattr::FATTR_MODE, mode: 0o400, ..Default::default() };
    assert_eq!(setattr(&e, s).attr().mode, libc::S_IFREG | 0o400);
}

#[test]
fn setattr_times_and_other_bits_are_unsupported() {
    let e = export(ExportOptions { allow_other: true, ..writable() });
    for valid in [
        fattr::FATTR_ATIME,
        fattr::FATTR_MTIME,
        fattr::FATTR_ATIME_NOW,
        fattr::FATTR_MTIME_NOW,
        fattr::FATTR_CTIME,
        1 << 12,
        1 << 31,
    ] {
        let s = SetattrIn { valid, ..Default::default() };
        assert_eq!(setattr(&e, s).outcome, Outcome::Error(libc::EOPNOTSUPP), "{valid:#x}");
    }
}

#[test]
fn rejected_setattr_changes_nothing() {
    // Every check runs before the first change: a refused request must not half-apply.
    let e = export(writable());
    let s = SetattrIn {
        valid: fattr::FATTR_SIZE | fattr::FATTR_MODE,
        size: 50,
        mode: 0o644, // EPERM without allow_other
        ..Default::default()
    };
    assert_eq!(setattr(&e, s).outcome, Outcome::Error(libc::EPERM));
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));

    let s = SetattrIn {
        valid: fattr::FATTR_SIZE | fattr::FATTR_MODE | fattr::FATTR_MTIME,
        size: 50,
        mode: 0o400,
        ..Default::default()
    };
    assert_eq!(setattr(&e, s).outcome, Outcome::Error(libc::EOPNOTSUPP));
    assert_eq!(mem(&e).len(), IMAGE_LEN as u64);
    assert_eq!(call(&e, Op::Getattr, &[]).attr().mode, libc::S_IFREG | 0o600);

    let e = export(opts());
    let s = SetattrIn {
        valid: fattr::FATTR_SIZE | fattr::FATTR_MODE,
        size: 50,
        mode: 0o500,
        ..Default::default()
    };
    assert_eq!(setattr(&e, s).outcome, Outcome::Error(libc::EACCES));
    assert_eq!(call(&e, Op::Getattr, &[]).attr().mode, libc::S_IFREG | 0o400);
}

#[test]
fn concurrent_setattrs_never_tear_mode_uid_gid() {
    let e = export(ExportOptions { allow_other: true, ..writable() });
    let valid = fattr::FATTR_MODE | fattr::FATTR_UID | fattr::FATTR_GID;
    let a = SetattrIn { valid, mode: 0o600, uid: 100, gid: 100, ..Default::default() };
    let b = SetattrIn { valid, mode: 0o644, uid: 200, gid: 200, ..Default::default() };
    let combo_a = (libc::S_IFREG | 0o600, 100, 100);
    let combo_b = (libc::S_IFREG | 0o644, 200, 200);
    let initial = (libc::S_IFREG | 0o600, UID, GID);
    let ok = |c: (u32, u32, u32)| c == combo_a || c == combo_b || c == initial;
    const ROUNDS: usize = 50_000;
    // Counts finished writers, also when one fails: the reader must not spin forever then.
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for s_in in [a, b] {
            let (e, done) = (&e, &done);
            s.spawn(move || {
                let _done = Done(done);
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let mut small = [0u8; MAX_SMALL_REPLY];
                let mut data = [0u8; 16];
                for _ in 0..ROUNDS {
                    let op = Op::Setattr(s_in);
                    let out =
                        rt.block_on(e.handle(opcode::FUSE_SETATTR, op, &mut small, &mut data));
                    assert_eq!(out, Outcome::Small(104));
                    let reply = Reply { outcome: out, small, data: Vec::new() }.attr();
                    let c = (reply.mode, reply.uid, reply.gid);
                    assert!(ok(c), "a SETATTR reply carried a torn combination {c:?}");
                }
            });
        }
        let (e, done) = (&e, &done);
        s.spawn(move || {
            let mut reads = 0u64;
            while done.load(Ordering::Acquire) < 2 || reads < 1000 {
                let at = e.attr();
                let c = (at.mode, at.uid, at.gid);
                assert!(ok(c), "attr() saw a torn combination {c:?}");
                reads += 1;
            }
        });
    });
    let at = e.attr();
    assert!([combo_a, combo_b].contains(&(at.mode, at.uid, at.gid)));
}

// ---------------------------------------------------------------------------------------------
// READ

#[test]
fn read_inside_the_image() {
    let e = export(opts());
    let r = call(&e, Op::Read { offset: 100, size: 4096 }, &[]);
    assert_eq!(r.data_body(), &pattern(IMAGE_LEN)[100..4196]);
}

#[test]
fn read_is_short_at_eof_and_empty_at_or_past_it() {
    let e = export(opts());
    let r = call(&e, Op::Read { offset: 8192, size: 4096 }, &[]);
    assert_eq!(r.data_body(), &pattern(IMAGE_LEN)[8192..]);
    let r = call(&e, Op::Read { offset: IMAGE_LEN as u64 - 1, size: 4096 }, &[]);
    assert_eq!(r.data_body(), &pattern(IMAGE_LEN)[IMAGE_LEN - 1..]);
    for offset in [IMAGE_LEN as u64, IMAGE_LEN as u64 + 1, 1 << 40, u64::MAX] {
        let r = call(&e, Op::Read { offset, size: 4096 }, &[]);
        assert_eq!(r.outcome, Outcome::Data(0), "offset {offset}");
    }
    assert_eq!(call(&e, Op::Read { offset: 0, size: 0 }, &[]).outcome, Outcome::Data(0));
}

#[test]
fn read_above_max_read_is_einval() {
    let e = export(ExportOptions { max_read: 4096, ..opts() });
    assert_eq!(call(&e, Op::Read { offset: 0, size: 4096 }, &[]).data_body().len(), 4096);
    assert_eq!(errno(&e, Op::Read { offset: 0, size: 4097 }), libc::EINVAL);
    // Even past EOF, where the answer would have been empty.
    assert_eq!(errno(&e, Op::Read { offset: 1 << 40, size: 4097 }), libc::EINVAL);
    let e = export(opts());
    assert_eq!(errno(&e, Op::Read { offset: 0, size: (1 << 20) + 1 }), libc::EINVAL);
    assert_eq!(errno(&e, Op::Read { offset: 0, size: u32::MAX }), libc::EINVAL);
}

// ---------------------------------------------------------------------------------------------
// WRITE

#[test]
fn write_to_a_read_only_export_is_eacces() {
    let e = export(opts());
    assert_eq!(write(&e, 0, &[1; 10]).outcome, Outcome::Error(libc::EACCES));
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));
}

#[test]
fn write_inside_the_image_lands_in_the_backend() {
    let e = export(writable());
    assert_eq!(write(&e, 4000, &[0xab; 300]).written(), 300);
    let mut want = pattern(IMAGE_LEN);
    want[4000..4300].fill(0xab);
    assert_eq!(mem(&e).snapshot(), want);
}

#[test]
fn non_growable_write_at_or_past_eof_is_enospc() {
    let e = export(writable());
    for offset in [IMAGE_LEN as u64, IMAGE_LEN as u64 + 1, 1 << 40] {
        let r = write(&e, offset, &[9; 100]);
        assert_eq!(r.outcome, Outcome::Error(libc::ENOSPC), "offset {offset}");
    }
    // Writing nothing still succeeds with 0, at EOF as anywhere (write(2)).
    assert_eq!(write(&e, IMAGE_LEN as u64, &[]).written(), 0);
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));
}

#[test]
fn non_growable_write_straddling_eof_is_short() {
    let e = export(writable());
    let r = write(&e, IMAGE_LEN as u64 - 10, &[0x5a; 100]);
    assert_eq!(r.written(), 10);
    let mut want = pattern(IMAGE_LEN);
    want[IMAGE_LEN - 10..].fill(0x5a);
    assert_eq!(mem(&e).snapshot(), want, "nothing may land past EOF");
}

#[test]
fn growable_write_past_eof_grows_first() {
    let e = export(growable());
    let r = write(&e, IMAGE_LEN as u64 + 50, &[0x77; 100]);
    assert_eq!(r.written(), 100);
    let img = mem(&e).snapshot();
    assert_eq!(img.len(), IMAGE_LEN + 150);
    assert_eq!(&img[..IMAGE_LEN], &pattern(IMAGE_LEN)[..]);
    assert!(img[IMAGE_LEN..IMAGE_LEN + 50].iter().all(|&b| b == 0), "the gap reads as zeros");
    assert!(img[IMAGE_LEN + 50..].iter().all(|&b| b == 0x77));
    // Straddling EOF: all of it, and the size follows.
    assert_eq!(write(&e, img.len() as u64 - 1, &[1; 10]).written(), 10);
    assert_eq!(mem(&e).len(), IMAGE_LEN as u64 + 159);
    // Growing never shrinks: a write inside the image leaves the size alone.
    assert_eq!(write(&e, 0, &[2; 10]).written(), 10);
    assert_eq!(mem(&e).len(), IMAGE_LEN as u64 + 159);
}

#[test]
fn write_offset_overflow_is_einval() {
    for o in [writable(), growable()] {
        let e = export(o);
        let r = write(&e, u64::MAX - 10, &[1; 100]);
        assert_eq!(r.outcome, Outcome::Error(libc::EINVAL));
        assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));
    }
}

#[test]
fn write_larger_than_the_data_buffer_is_einval() {
    let e = export(growable());
    let mut small = [0u8; MAX_SMALL_REPLY];
    let mut data = vec![0u8; 4096];
    let out = block_on(e.handle(
        opcode::FUSE_WRITE,
        Op::Write { offset: 0, size: 4097 },
        &mut small,
        &mut data,
    ));
    assert_eq!(out, Outcome::Error(libc::EINVAL));
}

#[test]
fn zero_length_write_changes_nothing() {
    // write(2) of zero bytes has no effect; in particular it does not extend the file.
    let e = export(growable());
    // (Offsets stay small: the memory backend would really allocate a huge growth.)
    for offset in [0, IMAGE_LEN as u64, IMAGE_LEN as u64 + 1, 1 << 20] {
        assert_eq!(write(&e, offset, &[]).written(), 0, "offset {offset}");
        assert_eq!(mem(&e).len(), IMAGE_LEN as u64, "offset {offset}");
    }
    assert!(mem(&e).snapshot() == pattern(IMAGE_LEN));
    assert_eq!(write(&export(opts()), 0, &[]).outcome, Outcome::Error(libc::EACCES));
}

#[test]
fn writethrough_flushes_every_write() {
    let e = export(ExportOptions { writethrough: true, ..writable() });
    for i in 1..=3u64 {
        assert_eq!(write(&e, i * 100, &[3; 10]).written(), 10);
        assert_eq!(mem(&e).flush_count(), i);
    }
    // Without writethrough nothing is flushed behind the client's back.
    let e = export(writable());
    write(&e, 0, &[3; 10]);
    assert_eq!(mem(&e).flush_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// FALLOCATE

#[test]
fn fallocate_on_read_only_is_eacces() {
    let e = export(opts());
    for mode in [0, PUNCH | KEEP, ZERO, ZERO | KEEP] {
        assert_eq!(fallocate(&e, 0, 10, mode), Outcome::Error(libc::EACCES), "mode {mode:#x}");
    }
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));
}

#[test]
fn fallocate_mode_0_only_grows() {
    let e = export(writable());
    assert_eq!(fallocate(&e, 0, 10, 0), Outcome::Error(libc::EOPNOTSUPP));
    assert_eq!(fallocate(&e, IMAGE_LEN as u64 - 1, 10, 0), Outcome::Error(libc::EOPNOTSUPP));
    assert_eq!(mem(&e).len(), IMAGE_LEN as u64);
    // At EOF: grows by length (even on a non-growable export, as QEMU does).
    assert_eq!(fallocate(&e, IMAGE_LEN as u64, 4096, 0), Outcome::Small(0));
    assert_eq!(mem(&e).len(), IMAGE_LEN as u64 + 4096);
    // Past EOF: grows to offset + length, the gap reads as zeros.
    let len = mem(&e).len();
    assert_eq!(fallocate(&e, len + 100, 50, 0), Outcome::Small(0));
    let img = mem(&e).snapshot();
    assert_eq!(img.len() as u64, len + 150);
    assert_eq!(&img[..IMAGE_LEN], &pattern(IMAGE_LEN)[..]);
    assert!(img[IMAGE_LEN..].iter().all(|&b| b == 0));
}

#[test]
fn fallocate_punch_hole_needs_keep_size() {
    let e = export(writable());
    assert_eq!(fallocate(&e, 100, 100, PUNCH), Outcome::Error(libc::EINVAL));
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));

    assert_eq!(fallocate(&e, 100, 100, PUNCH | KEEP), Outcome::Small(0));
    let mut want = pattern(IMAGE_LEN);
    want[100..200].fill(0);
    assert_eq!(mem(&e).snapshot(), want);
    // Across EOF: zeroes up to EOF, the size stays.
    assert_eq!(fallocate(&e, IMAGE_LEN as u64 - 10, 100, PUNCH | KEEP), Outcome::Small(0));
    want[IMAGE_LEN - 10..].fill(0);
    assert_eq!(mem(&e).snapshot(), want);
    // Entirely past EOF: nothing to do.
    assert_eq!(fallocate(&e, 1 << 40, 100, PUNCH | KEEP), Outcome::Small(0));
    assert_eq!(mem(&e).snapshot(), want);
}

#[test]
fn fallocate_zero_range_with_and_without_keep_size() {
    let e = export(writable());
    assert_eq!(fallocate(&e, 10, 20, ZERO), Outcome::Small(0));
    let mut want = pattern(IMAGE_LEN);
    want[10..30].fill(0);
    assert_eq!(mem(&e).snapshot(), want);

    // With KEEP_SIZE across EOF: zeroes up to EOF, no growth.
    assert_eq!(fallocate(&e, IMAGE_LEN as u64 - 5, 100, ZERO | KEEP), Outcome::Small(0));
    want[IMAGE_LEN - 5..].fill(0);
    assert_eq!(mem(&e).snapshot(), want);

    // Without KEEP_SIZE across EOF: grows to the range's end.
    let e = export(writable());
    assert_eq!(fallocate(&e, IMAGE_LEN as u64 - 5, 100, ZERO), Outcome::Small(0));
    let mut want = pattern(IMAGE_LEN);
    want[IMAGE_LEN - 5..].fill(0);
    want.resize(IMAGE_LEN + 95, 0);
    assert_eq!(mem(&e).snapshot(), want);
}

#[test]
fn fallocate_other_modes_are_unsupported() {
    let e = export(writable());
    const COLLAPSE: u32 = 0x08;
    const INSERT: u32 = 0x20;
    const UNSHARE: u32 = 0x40;
    const NO_HIDE_STALE: u32 = 0x04;
    for mode in [
        KEEP,
        COLLAPSE,
        INSERT,
        UNSHARE,
        NO_HIDE_STALE,
        KEEP | UNSHARE,
        PUNCH | KEEP | NO_HIDE_STALE,
        PUNCH | KEEP | ZERO,
        ZERO | COLLAPSE,
        1 << 31,
    ] {
        assert_eq!(fallocate(&e, 0, 10, mode), Outcome::Error(libc::EOPNOTSUPP), "{mode:#x}");
    }
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));
}

#[test]
fn fallocate_of_zero_bytes_is_einval() {
    // As fallocate(2): a zero length is invalid, and must not grow the image to `offset`.
    let e = export(growable());
    for mode in [0, PUNCH | KEEP, ZERO, ZERO | KEEP] {
        for offset in [0, IMAGE_LEN as u64, 1 << 20] {
            let got = fallocate(&e, offset, 0, mode);
            assert_eq!(got, Outcome::Error(libc::EINVAL), "mode {mode:#x} offset {offset}");
            assert_eq!(mem(&e).len(), IMAGE_LEN as u64, "mode {mode:#x} offset {offset}");
        }
    }
    assert!(mem(&e).snapshot() == pattern(IMAGE_LEN));
}

#[test]
fn fallocate_range_overflow_is_einval() {
    let e = export(writable());
    for mode in [0, PUNCH | KEEP, ZERO] {
        assert_eq!(fallocate(&e, u64::MAX - 5, 10, mode), Outcome::Error(libc::EINVAL));
    }
    assert_eq!(mem(&e).snapshot(), pattern(IMAGE_LEN));
}

// ---------------------------------------------------------------------------------------------
// LSEEK

#[test]
fn lseek_only_data_and_hole() {
    let e = export(opts());
    for w in [whence::SEEK_SET, whence::SEEK_CUR, whence::SEEK_END, 5, u32::MAX] {
        assert_eq!(lseek(&e, 0, w).outcome, Outcome::Error(libc::EINVAL), "whence {w}");
    }
}

#[test]
fn lseek_at_or_past_eof_is_enxio() {
    let e = export(opts());
    for offset in [IMAGE_LEN as u64, IMAGE_LEN as u64 + 1, u64::MAX] {
        for w in [whence::SEEK_DATA, whence::SEEK_HOLE] {
            assert_eq!(lseek(&e, offset, w).outcome, Outcome::Error(libc::ENXIO), "{offset} {w}");
        }
    }
}

#[test]
fn lseek_on_an_all_data_image() {
    let e = export(opts());
    for offset in [0, 1, 4096, IMAGE_LEN as u64 - 1] {
        assert_eq!(lseek(&e, offset, whence::SEEK_DATA).lseek_offset(), offset);
        assert_eq!(lseek(&e, offset, whence::SEEK_HOLE).lseek_offset(), IMAGE_LEN as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder and dispatcher together on random input

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A field value: small most of the time, so requests hit the image and its EOF; with
    /// `wide`, also huge values and values next to u64::MAX.
    fn field(&mut self, wide: bool) -> u64 {
        match self.next() % 4 {
            0 if wide => self.next(),
            1 if wide => u64::MAX - self.next() % 4096,
            2 => self.next() % 16_384,
            _ => self.next() % 256,
        }
    }
}

/// Feeds random well-framed requests through `decode` and `Export::handle`.
fn fuzz_dispatch(e: &Export, wide: bool, seed: u64, iterations: usize) {
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut small = [0u8; MAX_SMALL_REPLY];
    let mut data = vec![0u8; 64 << 10];
    let opcodes = [1, 2, 3, 4, 14, 15, 16, 17, 18, 20, 25, 26, 36, 38, 42, 43, 46, 9999];
    for _ in 0..iterations {
        let op = opcodes[(rng.next() % opcodes.len() as u64) as usize];
        let mut body = Vec::new();
        for _ in 0..rng.next() % 12 {
            body.extend_from_slice(&rng.field(wide).to_ne_bytes());
        }
        if op == opcode::FUSE_WRITE && body.len() >= 40 {
            let size = (rng.next() % 3000) as u32;
            body.truncate(40);
            body[16..20].copy_from_slice(&size.to_ne_bytes());
            body.extend((0..size).map(|i| i as u8));
        }
        let mut buf = Vec::new();
        buf.extend_from_slice(&((40 + body.len()) as u32).to_ne_bytes());
        buf.extend_from_slice(&op.to_ne_bytes());
        buf.extend_from_slice(&rng.next().to_ne_bytes());
        buf.extend_from_slice(&[0; 24]);
        buf.extend_from_slice(&body);
        match decode(&buf) {
            Ok(req) => {
                // The transport reads a WRITE's payload straight into the data buffer.
                if let Op::Write { size, .. } = req.op {
                    data[..size as usize].copy_from_slice(&buf[80..]);
                }
                let out = rt.block_on(e.handle(req.header.opcode, req.op, &mut small, &mut data));
                match out {
                    Outcome::Small(n) => assert!(n <= MAX_SMALL_REPLY),
                    Outcome::Data(n) => assert!(n <= data.len()),
                    Outcome::Error(errno) => assert!(errno > 0),
                    Outcome::NoReply => assert_eq!(req.op, Op::Forget),
                }
            }
            Err(DecodeError::Malformed { errno, .. }) => assert_eq!(errno, libc::EINVAL),
            Err(DecodeError::Halt(h)) => panic!("a well-framed request halted: {h}"),
        }
        // Keep a memory image from growing without bound.
        if e.backend().len() > 1 << 20 && matches!(e.backend(), Backend::Memory(_)) {
            let s = SetattrIn { valid: fattr::FATTR_SIZE, size: 8192, ..Default::default() };
            assert_eq!(setattr(e, s).attr().size, 8192);
        }
    }
}

#[test]
fn random_requests_through_decode_and_handle_never_panic() {
    let fuzz_opts = ExportOptions { allow_other: true, max_read: 64 << 10, ..growable() };
    // A real image with offsets near it, so reads, writes and fallocates do real work.
    fuzz_dispatch(&export(fuzz_opts), false, 0x2545_f491_4f6c_dd1d, 20_000);
    fuzz_dispatch(&export(ExportOptions { growable: false, ..fuzz_opts }), false, 7, 10_000);
    fuzz_dispatch(&export(opts()), false, 11, 5_000);
    // Any offset and size, against a backend that can be "grown" to any length for free.
    let null = Export::new(Backend::Null(NullBackend::new(1 << 30)), fuzz_opts, UID, GID);
    fuzz_dispatch(&null, true, 0x9e37_79b9_7f4a_7c15, 20_000);
}
