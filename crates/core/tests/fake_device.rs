//! The transport over a fake device: one end of a SOCK_SEQPACKET socketpair (which keeps message
//! boundaries, like /dev/fuse) is served by a real queue, the other end plays the kernel. Crafted
//! requests go in, exact reply bytes come out; malformed streams halt the queue.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use blockfuse_core::backend::{Backend, BlockBackend, CacheMode, MemoryBackend};
use blockfuse_core::config::{self, ExportConfig, Source};
use blockfuse_core::export::{Export, ExportOptions};
use blockfuse_core::protocol::abi::opcode::*;
use blockfuse_core::transport::queue::{run_queue, Shared, StopCause, WORKERS_PER_QUEUE};
use blockfuse_core::transport::{IoUringMode, PassthroughMode, Session, SessionEvent};

mod common;
use common::*;

const IMAGE_LEN: usize = 256 << 10;
const UID: u32 = 1234;
const GID: u32 = 5678;

const ENOSYS: i32 = libc::ENOSYS;
const EINVAL: i32 = libc::EINVAL;

/// A pattern with no zero bytes, so zeros in a reply mean something.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8 + 1).collect()
}

fn writable() -> ExportOptions {
    ExportOptions {
        writable: true,
        growable: false,
        allow_other: false,
        writethrough: false,
        max_read: MAX_WRITE as u32,
    }
}

fn memory_export(opts: ExportOptions) -> Export {
    Export::new(Backend::Memory(MemoryBackend::new(pattern(IMAGE_LEN))), opts, UID, GID)
}

fn read_req(unique: u64, offset: u64, size: u32) -> Vec<u8> {
    rw(FUSE_READ, unique, offset, size, &[])
}

fn write_req(unique: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    rw(FUSE_WRITE, unique, offset, payload.len() as u32, payload)
}

fn getattr_req(unique: u64) -> Vec<u8> {
    // fuse_getattr_in: getattr_flags, dummy, fh.
    request(FUSE_GETATTR, unique, &[0; 16])
}

fn error_reply(errno: i32, unique: u64) -> Vec<u8> {
    reply(-errno, unique, &[])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

/// The GETATTR reply we expect: `fuse_attr_out` for the export's only file. Times are "now",
/// so they are taken from `got` (and checked to be sane).
fn attr_reply(unique: u64, size: u64, mode: u32, got: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&1u64.to_ne_bytes()); // attr_valid
    a.extend_from_slice(&0u32.to_ne_bytes()); // attr_valid_nsec
    a.extend_from_slice(&0u32.to_ne_bytes()); // dummy
    a.extend_from_slice(&1u64.to_ne_bytes()); // ino
    a.extend_from_slice(&size.to_ne_bytes());
    a.extend_from_slice(&size.div_ceil(512).to_ne_bytes()); // blocks
                                                            // atime, mtime, ctime, atimensec, mtimensec, ctimensec: bytes 40..76 of fuse_attr_out.
    let times = got.get(16 + 40..16 + 76).unwrap_or(&[0; 36]);
    a.extend_from_slice(times);
    a.extend_from_slice(&mode.to_ne_bytes());
    a.extend_from_slice(&1u32.to_ne_bytes()); // nlink
    a.extend_from_slice(&UID.to_ne_bytes());
    a.extend_from_slice(&GID.to_ne_bytes());
    a.extend_from_slice(&0u32.to_ne_bytes()); // rdev
    a.extend_from_slice(&512u32.to_ne_bytes()); // blksize
    a.extend_from_slice(&0u32.to_ne_bytes()); // flags
    assert_eq!(a.len(), 104);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mtime = u64_at(&a, 48);
    assert!(mtime.abs_diff(now.as_secs()) < 60, "mtime {mtime} is not now");
    reply(0, unique, &a)
}

// ---------------------------------------------------------------------------------------------
// Serving

#[test]
fn answers_crafted_requests_with_exact_replies() {
    let q = Queue::start(memory_export(writable()), &[]);
    let image = pattern(IMAGE_LEN);

    let got = q.call(&getattr_req(0x100));
    assert_eq!(got, attr_reply(0x100, IMAGE_LEN as u64, libc::S_IFREG | 0o600, &got));

    assert_eq!(q.call(&read_req(0x101, 1000, 300)), reply(0, 0x101, &image[1000..1300]));
    // Short at EOF, empty past it.
    let tail = IMAGE_LEN as u64 - 10;
    assert_eq!(q.call(&read_req(0x102, tail, 4096)), reply(0, 0x102, &image[IMAGE_LEN - 10..]));
    assert_eq!(q.call(&read_req(0x103, u64::MAX, 4096)), reply(0, 0x103, &[]));
    // Above max_read.
    let too_big = MAX_WRITE as u32 + 1;
    assert_eq!(q.call(&read_req(0x104, 0, too_big)), error_reply(EINVAL, 0x104));

    // WRITE: fuse_write_out { size, padding }, and the bytes land in the backend.
    let payload = b"written through a fake /dev/fuse";
    let mut write_out = (payload.len() as u32).to_ne_bytes().to_vec();
    write_out.extend_from_slice(&[0; 4]);
    assert_eq!(q.call(&write_req(0x105, 4096, payload)), reply(0, 0x105, &write_out));
    let mut want = image.clone();
    want[4096..4096 + payload.len()].copy_from_slice(payload);
    assert_eq!(q.memory().snapshot(), want);
    let back = q.call(&read_req(0x106, 4096, payload.len() as u32));
    assert_eq!(back, reply(0, 0x106, payload));

    // Unknown and unimplemented opcodes.
    assert_eq!(q.call(&request(9999, 0x107, &[])), error_reply(ENOSYS, 0x107));
    let mkdir = request(FUSE_MKDIR, 0x108, b"\xed\x01\0\0\x12\0\0\0dir\0");
    assert_eq!(q.call(&mkdir), error_reply(ENOSYS, 0x108));
    assert_eq!(q.call(&request(FUSE_LOOKUP, 0x109, b"x\0")), error_reply(libc::ENOENT, 0x109));

    // Malformed bodies: EINVAL to that request, and the queue keeps serving.
    assert_eq!(q.call(&request(FUSE_SETATTR, 0x10a, &[0; 40])), error_reply(EINVAL, 0x10a));
    let short = rw(FUSE_WRITE, 0x10b, 0, 100, &[0xff; 50]);
    assert_eq!(q.call(&short), error_reply(EINVAL, 0x10b));
    let long = rw(FUSE_WRITE, 0x10c, 0, 10, &[0xff; 50]);
    assert_eq!(q.call(&long), error_reply(EINVAL, 0x10c));
    assert_eq!(q.memory().snapshot(), want, "a rejected WRITE must not touch the image");
    // Out-of-range offsets.
    let overflow = write_req(0x10d, u64::MAX - 3, &[1; 16]);
    assert_eq!(q.call(&overflow), error_reply(EINVAL, 0x10d));
    // Past EOF of a non-growable image: ENOSPC, not a 0-byte write that callers would retry.
    assert_eq!(q.call(&write_req(0x10e, 1 << 40, &[1; 16])), error_reply(libc::ENOSPC, 0x10e));
    assert_eq!(q.memory().snapshot(), want);

    // FORGET gets no reply: the next reply on the device is the GETATTR's.
    q.send(&request(FUSE_FORGET, 0x10f, &1u64.to_ne_bytes()));
    let got = q.call(&getattr_req(0x110));
    assert_eq!(got, attr_reply(0x110, IMAGE_LEN as u64, libc::S_IFREG | 0o600, &got));

    q.shared.request_stop();
    q.returned().unwrap();
    assert!(q.stops.try_recv().is_err(), "a requested stop is not a halt");
}

#[test]
fn malformed_and_failing_requests_do_not_wear_the_queue_down() {
    // More bad requests than the queue has workers: each is answered, and none costs a worker.
    let q = Queue::start(memory_export(writable()), &[]);
    let rounds = 3 * WORKERS_PER_QUEUE as u64;
    for i in 0..rounds {
        let unique = 100 + 4 * i;
        let short_setattr = request(FUSE_SETATTR, unique, &[0; 8]);
        assert_eq!(q.call(&short_setattr), error_reply(EINVAL, unique));
        let short_write = rw(FUSE_WRITE, unique + 1, 0, 64, &[1; 63]);
        assert_eq!(q.call(&short_write), error_reply(EINVAL, unique + 1));
        assert_eq!(q.call(&request(9999, unique + 2, &[])), error_reply(ENOSYS, unique + 2));
        let too_big = read_req(unique + 3, 0, u32::MAX);
        assert_eq!(q.call(&too_big), error_reply(EINVAL, unique + 3));
    }
    let got = q.call(&getattr_req(1));
    assert_eq!(got, attr_reply(1, IMAGE_LEN as u64, libc::S_IFREG | 0o600, &got));
    assert!(q.stops.try_recv().is_err(), "bad requests are not a halt");
    q.shared.request_stop();
    q.returned().unwrap();
}

#[test]
fn the_largest_write_fits_the_receive_buffer() {
    let q = Queue::start(memory_export(writable()), &[]);
    let payload: Vec<u8> = (0..MAX_WRITE).map(|i| (i % 199) as u8).collect();
    let mut write_out = (MAX_WRITE as u32).to_ne_bytes().to_vec();
    write_out.extend_from_slice(&[0; 4]);
    assert_eq!(q.call(&write_req(1, 8192, &payload)), reply(0, 1, &write_out));
    assert_eq!(&q.memory().snapshot()[8192..8192 + MAX_WRITE], &payload[..]);
    // And the largest read comes back whole.
    let got = q.call(&read_req(2, 8192, MAX_WRITE as u32));
    assert_eq!(got, reply(0, 2, &payload));
    q.shared.request_stop();
    q.returned().unwrap();
}

#[test]
fn pipelined_requests_are_all_answered() {
    let q = Queue::start(memory_export(writable()), &[]);
    let image = pattern(IMAGE_LEN);
    const N: u64 = 32;
    for i in 0..N {
        q.send(&read_req(1000 + i, i * 777, 256));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let got = q.recv();
        let unique = u64_at(&got, 8);
        let i = unique.checked_sub(1000).filter(|&i| i < N).expect("unknown unique");
        let start = (i * 777) as usize;
        assert_eq!(got, reply(0, unique, &image[start..start + 256]));
        assert!(seen.insert(unique), "unique {unique} answered twice");
    }
    q.shared.request_stop();
    q.returned().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Halting

/// Feeds `bad` (with a valid GETATTR queued right behind it) to a fresh queue and checks the halt:
/// the reason is reported once, run_queue returns, and the GETATTR is never answered.
fn assert_halts(bad: &[u8], reason_mentions: &[&str]) {
    let q = Queue::start(memory_export(writable()), &[bad, &getattr_req(77)]);
    let StopCause::Halt(reason) = q.stop_cause() else {
        panic!("expected a halt");
    };
    for word in reason_mentions {
        assert!(reason.contains(word), "halt reason {reason:?} should mention {word:?}");
    }
    q.returned().expect("a halt is not a queue failure");
    assert!(q.shared.stopping());
    q.assert_closed_without_reply();
    assert!(q.stops.try_recv().is_err(), "the halt is reported once");
}

#[test]
fn a_message_shorter_than_the_header_halts() {
    let full = getattr_req(1);
    assert_halts(&full[..10], &["10", "header"]);
}

#[test]
fn a_header_claiming_more_than_was_read_halts() {
    let bad = with_len(FUSE_GETATTR, 1, &[], 48);
    assert_halts(&bad, &["48", "40"]);
}

#[test]
fn a_header_claiming_less_than_was_read_halts() {
    let bad = with_len(FUSE_GETATTR, 1, &[0; 16], 40);
    assert_halts(&bad, &["40", "56"]);
}

#[test]
fn a_giant_header_length_halts() {
    let bad = with_len(FUSE_WRITE, 1, &[0; 40], u32::MAX);
    assert_halts(&bad, &[&u32::MAX.to_string()]);
}

#[test]
fn a_request_larger_than_the_receive_buffer_halts() {
    // The device hands the queue only what fits its buffer (80 + max_write bytes); the header
    // then disagrees with the byte count. Built by hand: `send` refuses oversized messages.
    let payload = vec![0xab; MAX_WRITE + 64];
    let big = write_req(1, 0, &payload);
    let (ours, theirs) = seqpacket_pair();
    let kernel = kernel_end(theirs);
    assert_eq!(kernel.send(&big).unwrap(), big.len());
    let (stop_tx, stops) = mpsc::channel();
    let on_stop = Box::new(move |c: StopCause| {
        let _ = stop_tx.send(c);
    });
    let shared = Arc::new(Shared::new(memory_export(writable()), MAX_WRITE, on_stop));
    let (ret_tx, returned) = mpsc::channel();
    let s = shared.clone();
    std::thread::spawn(move || {
        let _ = ret_tx.send(run_queue(ours, s));
    });
    let q = Queue { kernel, shared, stops, returned };
    let StopCause::Halt(reason) = q.stop_cause() else {
        panic!("expected a halt");
    };
    assert!(reason.contains(&big.len().to_string()), "{reason}");
    q.returned().unwrap();
    assert_eq!(q.memory().snapshot(), pattern(IMAGE_LEN), "nothing of it may be written");
    q.assert_closed_without_reply();
}

#[test]
fn requests_before_a_halt_are_answered_and_none_after() {
    let q = Queue::start(memory_export(writable()), &[]);
    let got = q.call(&getattr_req(1));
    assert_eq!(u64_at(&got, 8), 1);
    q.send(&with_len(FUSE_GETATTR, 2, &[], 1000));
    assert!(matches!(q.stop_cause(), StopCause::Halt(_)));
    q.returned().unwrap();
    // The device is closed: a later request cannot even be delivered, let alone answered.
    q.assert_closed_without_reply();
}

#[test]
fn the_peer_closing_the_device_stops_the_queue() {
    let q = Queue::start(memory_export(writable()), &[]);
    let Queue { kernel, shared: _shared, stops, returned } = q;
    drop(kernel);
    // Whatever it is called, the queue must notice and return rather than spin or hang.
    stops.recv_timeout(WAIT).expect("the queue did not report the closed device");
    returned.recv_timeout(WAIT).expect("run_queue did not return").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Stopping on request

#[test]
fn request_stop_ends_an_idle_queue() {
    let q = Queue::start(memory_export(writable()), &[]);
    // Make sure the queue is up and waiting for the next request.
    assert_eq!(u64_at(&q.call(&getattr_req(5)), 8), 5);
    q.shared.request_stop();
    q.returned().unwrap();
    assert!(q.stops.try_recv().is_err(), "a requested stop is not a halt");
    q.assert_closed_without_reply();
}

#[test]
fn request_stop_before_the_queue_starts_reading() {
    let (ours, theirs) = seqpacket_pair();
    let kernel = kernel_end(theirs);
    let (stop_tx, stops) = mpsc::channel();
    let on_stop = Box::new(move |c: StopCause| {
        let _ = stop_tx.send(c);
    });
    let shared = Arc::new(Shared::new(memory_export(writable()), MAX_WRITE, on_stop));
    shared.request_stop();
    let (ret_tx, returned) = mpsc::channel();
    let s = shared.clone();
    std::thread::spawn(move || {
        let _ = ret_tx.send(run_queue(ours, s));
    });
    let q = Queue { kernel, shared, stops, returned };
    q.returned().unwrap();
    assert!(q.stops.try_recv().is_err());
}

// ---------------------------------------------------------------------------------------------
// The session around the queue: what TypeScript sees

fn session(export: Export) -> (Session, UnixDatagram, Receiver<SessionEvent>) {
    let (ours, theirs) = seqpacket_pair();
    let (tx, events) = mpsc::channel();
    let on_event = Box::new(move |e: SessionEvent| {
        let _ = tx.send(e);
    });
    let s = Session::serve_fake_device(export, ours, on_event).unwrap();
    (s, kernel_end(theirs), events)
}

/// Shuts a session down on another thread, failing if it takes longer than [`WAIT`].
fn shutdown_bounded(mut s: Session) -> blockfuse_core::Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(s.shutdown());
    });
    rx.recv_timeout(WAIT).expect("shutdown did not finish in time")
}

#[test]
fn a_halt_reaches_the_session_event_sink_and_close_still_works() {
    let (s, kernel, events) = session(memory_export(writable()));
    send(&kernel, &[0u8; 10]);
    let SessionEvent::Halt { reason } = events.recv_timeout(WAIT).expect("no halt event");
    assert!(reason.contains("header"), "{reason}");
    shutdown_bounded(s).expect("closing a halted export succeeds");
    assert!(events.try_recv().is_err(), "closing reports no second halt");
}

#[test]
fn closing_an_idle_session_is_prompt_and_not_a_halt() {
    let (s, kernel, events) = session(memory_export(writable()));
    send(&kernel, &getattr_req(9));
    assert_eq!(u64_at(&recv(&kernel).unwrap(), 8), 9);
    shutdown_bounded(s).unwrap();
    assert!(events.try_recv().is_err(), "our own close is not a halt");
    assert_eq!(recv(&kernel), Some(Vec::new()), "the device is closed after shutdown");
}

// ---------------------------------------------------------------------------------------------
// A raw image file behind the fake device (the file I/O path, without a mount)

struct TempImage(PathBuf);

impl TempImage {
    fn new(content: &[u8]) -> TempImage {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("blockfuse-fake-device-{}-{n}.raw", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, content).unwrap();
        TempImage(path)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_raw_image_is_read_and_written_through_the_fake_device() {
    let image = pattern(IMAGE_LEN);
    let file = TempImage::new(&image);
    let cfg = ExportConfig {
        source: Source::Raw(file.0.clone()),
        mountpoint: PathBuf::from("/nonexistent"),
        writable: true,
        growable: false,
        allow_other: false,
        threads: 1,
        cache: CacheMode::Writeback,
        writethrough: false,
        io_uring: IoUringMode::Off,
        passthrough: PassthroughMode::Off,
        locking: Default::default(),
        force_share: false,
        layers: Default::default(),
    };
    let (tx, events) = mpsc::channel();
    let (s, peer) = config::start_fake_device(
        cfg,
        Box::new(move |e| {
            let _ = tx.send(e);
        }),
    )
    .unwrap();
    let kernel = kernel_end(peer);
    let call = |m: &[u8]| {
        send(&kernel, m);
        recv(&kernel).expect("no reply")
    };

    assert_eq!(call(&read_req(1, 12345, 4096)), reply(0, 1, &image[12345..12345 + 4096]));
    let payload = vec![0x42u8; 65536];
    let mut write_out = 65536u32.to_ne_bytes().to_vec();
    write_out.extend_from_slice(&[0; 4]);
    assert_eq!(call(&write_req(2, 65536, &payload)), reply(0, 2, &write_out));
    // FSYNC: fuse_fsync_in { fh, fsync_flags = datasync, padding }.
    let mut fsync = 7u64.to_ne_bytes().to_vec();
    fsync.extend_from_slice(&1u32.to_ne_bytes());
    fsync.extend_from_slice(&[0; 4]);
    assert_eq!(call(&request(FUSE_FSYNC, 3, &fsync)), reply(0, 3, &[]));
    let on_disk = std::fs::read(&file.0).unwrap();
    assert_eq!(&on_disk[65536..131072], &payload[..]);
    assert_eq!(&on_disk[..65536], &image[..65536]);
    // A straddling write stops at EOF; the file does not grow.
    let mut ten = 10u32.to_ne_bytes().to_vec();
    ten.extend_from_slice(&[0; 4]);
    assert_eq!(call(&write_req(4, IMAGE_LEN as u64 - 10, &[7; 100])), reply(0, 4, &ten));
    assert_eq!(call(&read_req(5, 65530, 12)), {
        let mut want = image[65530..65536].to_vec();
        want.extend_from_slice(&[0x42; 6]);
        reply(0, 5, &want)
    });

    shutdown_bounded(s).unwrap();
    assert_eq!(std::fs::metadata(&file.0).unwrap().len(), IMAGE_LEN as u64);
    assert!(events.try_recv().is_err());
}

// ---------------------------------------------------------------------------------------------
// Raw image files: allocation status, hole punching, O_DIRECT bouncing, growth

/// A raw image served over a fake device through `config::start_fake_device`.
struct RawDevice {
    session: Session,
    kernel: UnixDatagram,
    file: TempImage,
    events: Receiver<SessionEvent>,
}

fn raw_device(file: TempImage, growable: bool, cache: CacheMode) -> RawDevice {
    let cfg = ExportConfig {
        source: Source::Raw(file.0.clone()),
        mountpoint: PathBuf::from("/nonexistent"),
        writable: true,
        growable,
        allow_other: false,
        threads: 1,
        cache,
        writethrough: false,
        io_uring: IoUringMode::Off,
        passthrough: PassthroughMode::Off,
        locking: Default::default(),
        force_share: false,
        layers: Default::default(),
    };
    let (tx, events) = mpsc::channel();
    let on_event = Box::new(move |e| {
        let _ = tx.send(e);
    });
    let (session, peer) = config::start_fake_device(cfg, on_event)
        .unwrap_or_else(|e| panic!("cannot serve {} ({cache:?}): {e}", file.0.display()));
    RawDevice { session, kernel: kernel_end(peer), file, events }
}

impl RawDevice {
    fn call(&self, msg: &[u8]) -> Vec<u8> {
        send(&self.kernel, msg);
        recv(&self.kernel).expect("no reply")
    }
    fn on_disk(&self) -> Vec<u8> {
        std::fs::read(&self.file.0).unwrap()
    }
    fn blocks(&self) -> u64 {
        let got = self.call(&getattr_req(1));
        assert_eq!(got.len(), 16 + 104, "{got:?}");
        u64_at(&got, 16 + 32)
    }
    fn size(&self) -> u64 {
        u64_at(&self.call(&getattr_req(1)), 16 + 24)
    }
    fn close(self) {
        shutdown_bounded(self.session).unwrap();
        assert!(self.events.try_recv().is_err(), "no halt expected");
    }
}

fn lseek_req(unique: u64, offset: u64, whence: i32) -> Vec<u8> {
    let mut b = 7u64.to_ne_bytes().to_vec(); // fh
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&(whence as u32).to_ne_bytes());
    b.extend_from_slice(&[0; 4]);
    request(FUSE_LSEEK, unique, &b)
}

fn fallocate_req(unique: u64, offset: u64, length: u64, mode: u32) -> Vec<u8> {
    let mut b = 7u64.to_ne_bytes().to_vec(); // fh
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&length.to_ne_bytes());
    b.extend_from_slice(&mode.to_ne_bytes());
    b.extend_from_slice(&[0; 4]);
    request(FUSE_FALLOCATE, unique, &b)
}

/// `fuse_setattr_in` with only `valid` and `size` meaningful.
fn truncate_req(unique: u64, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 88];
    b[..4].copy_from_slice(&(1u32 << 3).to_ne_bytes()); // FATTR_SIZE
    b[16..24].copy_from_slice(&size.to_ne_bytes());
    request(FUSE_SETATTR, unique, &b)
}

const KIB: u64 = 1024;

#[test]
fn raw_sparse_image_seek_data_and_seek_hole() {
    // Data in [0, 64K) and [512K, 576K), holes elsewhere in a 1 MiB file.
    let file = TempImage::new(&[]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file.0).unwrap();
        f.set_len(1024 * KIB).unwrap();
        f.write_all_at(&[1; 64 * 1024], 0).unwrap();
        f.write_all_at(&[2; 64 * 1024], 512 * KIB).unwrap();
        f.sync_all().unwrap();
    }
    let d = raw_device(file, false, CacheMode::Writeback);
    let seek = |offset: u64, whence: i32| -> Result<u64, i32> {
        let got = d.call(&lseek_req(9, offset, whence));
        let error = i32::from_ne_bytes(got[4..8].try_into().unwrap());
        if error != 0 {
            assert_eq!(got.len(), 16);
            return Err(-error);
        }
        assert_eq!(got.len(), 24);
        Ok(u64_at(&got, 16))
    };
    let (data, hole) = (libc::SEEK_DATA, libc::SEEK_HOLE);
    assert_eq!(seek(0, data), Ok(0));
    assert_eq!(seek(0, hole), Ok(64 * KIB));
    assert_eq!(seek(64 * KIB, data), Ok(512 * KIB));
    assert_eq!(seek(100 * KIB, data), Ok(512 * KIB));
    assert_eq!(seek(100 * KIB, hole), Ok(100 * KIB));
    assert_eq!(seek(512 * KIB, hole), Ok(576 * KIB));
    assert_eq!(seek(600 * KIB, hole), Ok(600 * KIB));
    assert_eq!(seek(576 * KIB, data), Err(libc::ENXIO), "no data after the last extent");
    assert_eq!(seek(1024 * KIB, data), Err(libc::ENXIO));
    assert_eq!(seek(1024 * KIB, hole), Err(libc::ENXIO));
    assert_eq!(seek(0, libc::SEEK_END), Err(libc::EINVAL));
    d.close();
}

#[test]
fn raw_punch_hole_deallocates_and_zero_range_zeroes() {
    let image = pattern(1024 * 1024);
    let d = raw_device(TempImage::new(&image), false, CacheMode::Writeback);
    let mut want = image.clone();
    let before = d.blocks();
    assert!(before >= 2048, "a fully written 1 MiB file has 2048 blocks, not {before}");

    // PUNCH_HOLE without KEEP_SIZE is refused; with it, the range reads as zeros, is
    // deallocated, and the size stays.
    assert_eq!(d.call(&fallocate_req(1, 256 * KIB, 256 * KIB, 0x02)), error_reply(EINVAL, 1));
    assert_eq!(d.call(&fallocate_req(2, 256 * KIB, 256 * KIB, 0x03)), reply(0, 2, &[]));
    want[256 * 1024..512 * 1024].fill(0);
    assert_eq!(d.on_disk(), want);
    let after = d.blocks();
    assert!(after + 512 <= before, "punching 256 KiB must free 512 blocks: {before} -> {after}");
    assert_eq!(d.size(), 1024 * KIB);
    let got = d.call(&lseek_req(3, 0, libc::SEEK_HOLE));
    assert_eq!(got, reply(0, 3, &(256 * KIB).to_ne_bytes()));

    // ZERO_RANGE inside the image.
    assert_eq!(d.call(&fallocate_req(4, 600 * KIB + 5, 1000, 0x10)), reply(0, 4, &[]));
    want[600 * 1024 + 5..600 * 1024 + 1005].fill(0);
    assert_eq!(d.on_disk(), want);
    // ZERO_RANGE across EOF without KEEP_SIZE grows the file; with KEEP_SIZE it does not.
    assert_eq!(d.call(&fallocate_req(5, 1024 * KIB - 10, 100, 0x11)), reply(0, 5, &[]));
    want[1024 * 1024 - 10..].fill(0);
    assert_eq!(d.on_disk(), want);
    assert_eq!(d.call(&fallocate_req(6, 1024 * KIB - 10, 100, 0x10)), reply(0, 6, &[]));
    want.resize(1024 * 1024 + 90, 0);
    assert_eq!(d.on_disk(), want);

    // Mode 0 at EOF grows with allocated blocks (not a multiple of 128 KiB).
    let blocks = d.blocks();
    let len = want.len() as u64;
    assert_eq!(d.call(&fallocate_req(7, len, 300 * KIB + 7, 0)), reply(0, 7, &[]));
    assert_eq!(d.size(), len + 300 * KIB + 7);
    assert!(d.blocks() >= blocks + 600, "preallocation must allocate");
    want.resize(want.len() + 300 * 1024 + 7, 0);
    assert_eq!(d.on_disk(), want);
    // ... and a read across the new EOF is short.
    let tail = d.call(&read_req(8, want.len() as u64 - 3, 100));
    assert_eq!(tail, reply(0, 8, &[0, 0, 0]));
    d.close();
}

#[test]
fn raw_o_direct_unaligned_requests_are_bounced() {
    // 10000 bytes: not a multiple of any O_DIRECT alignment.
    let image = pattern(10_000);
    let d = raw_device(TempImage::new(&image), false, CacheMode::None);
    let mut want = image.clone();
    for (offset, size) in [(0u64, 4096u32), (1, 333), (4095, 2), (4000, 5000), (9990, 100)] {
        let end = (offset as usize + size as usize).min(want.len());
        let got = d.call(&read_req(1, offset, size));
        assert_eq!(got, reply(0, 1, &want[offset as usize..end]), "read {offset}+{size}");
    }
    // A write across a block boundary, one inside a block, one straddling EOF.
    assert_eq!(d.call(&write_req(2, 4093, b"abcdefg")), reply(0, 2, &write_out(7)));
    want[4093..4100].copy_from_slice(b"abcdefg");
    assert_eq!(d.call(&write_req(3, 17, b"xyz")), reply(0, 3, &write_out(3)));
    want[17..20].copy_from_slice(b"xyz");
    assert_eq!(d.call(&write_req(4, 9998, &[9; 10])), reply(0, 4, &write_out(2)));
    want[9998..].fill(9);
    assert_eq!(d.on_disk(), want, "the file holds exactly what was written, and stays 10000 bytes");
    assert_eq!(d.call(&read_req(5, 4090, 20)), reply(0, 5, &want[4090..4110]));
    d.close();

    // Growable: a write past EOF grows the file to exactly its end.
    let d = raw_device(TempImage::new(&image), true, CacheMode::None);
    assert_eq!(d.call(&write_req(6, 10_005, b"tail!!!")), reply(0, 6, &write_out(7)));
    let mut want = image.clone();
    want.extend_from_slice(&[0; 5]);
    want.extend_from_slice(b"tail!!!");
    assert_eq!(d.on_disk(), want);
    assert_eq!(d.size(), 10_012);
    d.close();
}

#[test]
fn raw_growable_write_and_truncate() {
    let image = pattern(100_000);
    let d = raw_device(TempImage::new(&image), true, CacheMode::Writeback);
    assert_eq!(d.call(&write_req(1, 200_000, &[5; 1000])), reply(0, 1, &write_out(1000)));
    let mut want = image.clone();
    want.resize(200_000, 0);
    want.extend_from_slice(&[5; 1000]);
    assert_eq!(d.on_disk(), want);
    // SETATTR size shrinks the file and the reply carries the new size.
    let got = d.call(&truncate_req(2, 5000));
    assert_eq!((got.len(), u64_at(&got, 16 + 24)), (120, 5000));
    assert_eq!(d.on_disk(), image[..5000].to_vec());
    assert_eq!(d.call(&read_req(3, 4990, 100)), reply(0, 3, &image[4990..5000]));
    d.close();
}

// ---------------------------------------------------------------------------------------------
// A random request stream through the whole queue

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn a_random_request_stream_is_always_answered_with_sound_replies() {
    let opts = ExportOptions { growable: true, allow_other: true, ..writable() };
    let q = Queue::start(memory_export(opts), &[]);
    let mut rng = Rng(0x5eed_0fb1_0cf0_0d00);
    let opcodes = [1, 2, 3, 4, 9, 14, 15, 16, 17, 18, 20, 25, 36, 42, 43, 46, 9999];
    for i in 0..5_000u64 {
        let op = opcodes[rng.below(opcodes.len() as u64) as usize];
        let unique = 1_000_000 + i;
        // Every value stays near the image: the memory backend really allocates what a
        // growing request asks for. Only READ, which never grows, gets offsets near u64::MAX.
        let mut body = Vec::new();
        for _ in 0..rng.below(12) {
            let v = if rng.below(2) == 0 { rng.below(512 * KIB) } else { rng.below(256) };
            body.extend_from_slice(&v.to_ne_bytes());
        }
        if op == FUSE_READ && body.len() >= 16 && rng.below(4) == 0 {
            body[8..16].copy_from_slice(&(u64::MAX - rng.below(1 << 20)).to_ne_bytes());
        }
        if op == FUSE_WRITE && body.len() >= 40 {
            let size = rng.below(5000) as u32;
            body.truncate(40);
            body[16..20].copy_from_slice(&size.to_ne_bytes());
            body.extend((0..size).map(|b| b as u8));
        }
        q.send(&request(op, unique, &body));
        if op == FUSE_FORGET || op == FUSE_BATCH_FORGET {
            continue;
        }
        let got = q.recv();
        assert!(got.len() >= 16, "reply too short: {got:?}");
        let len = u32::from_ne_bytes(got[..4].try_into().unwrap()) as usize;
        let error = i32::from_ne_bytes(got[4..8].try_into().unwrap());
        assert_eq!(len, got.len(), "out header len disagrees with the reply's size");
        assert_eq!(u64_at(&got, 8), unique, "reply to the wrong request");
        assert!((-4095..=0).contains(&error), "error {error}");
        if error != 0 {
            assert_eq!(len, 16, "an error reply carries no body");
        }
        assert!(q.memory().len() < 4 << 20, "the image grew out of bounds");
    }
    assert!(q.stops.try_recv().is_err(), "well-framed requests never halt");
    // The queue still serves, and a badly framed request still halts it.
    assert_eq!(u64_at(&q.call(&getattr_req(1)), 8), 1);
    q.send(&with_len(FUSE_READ, 2, &[0; 40], 81));
    assert!(matches!(q.stop_cause(), StopCause::Halt(_)));
    q.returned().unwrap();
}
