//! A queue without io_uring (old kernels, `kernel.io_uring_disabled`): it runs on a tokio
//! current-thread runtime and does its file I/O synchronously. Forced here with the test-only
//! `BLOCKFUSE_TEST_NO_IO_URING` (its own test binary: the variable is process-wide), then the
//! same READ/WRITE/GETATTR traffic as elsewhere must be served over a fake device, raw image.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use blockfuse_core::backend::{Backend, CacheMode, RawBackend, RawOptions};
use blockfuse_core::export::{Export, ExportOptions};
use blockfuse_core::protocol::abi::opcode;
use blockfuse_core::transport::queue::{run_queue, Shared};

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair failed: {}", std::io::Error::last_os_error());
    // SAFETY: socketpair just created both fds for us.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn request(op: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&((40 + body.len()) as u32).to_ne_bytes());
    buf.extend_from_slice(&op.to_ne_bytes());
    buf.extend_from_slice(&unique.to_ne_bytes());
    buf.extend_from_slice(&1u64.to_ne_bytes());
    buf.extend_from_slice(&[0u8; 16]);
    buf.extend_from_slice(body);
    buf
}

fn rw_body(offset: u64, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0u64.to_ne_bytes());
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&size.to_ne_bytes());
    b.extend_from_slice(&[0u8; 20]);
    b.extend_from_slice(payload);
    b
}

/// Collects warnings, to see that the queue did take the path without io_uring.
struct Warnings(std::sync::Mutex<Vec<String>>);

impl log::Log for Warnings {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0.lock().unwrap().push(r.args().to_string());
    }
    fn flush(&self) {}
}

static WARNINGS: Warnings = Warnings(std::sync::Mutex::new(Vec::new()));

#[test]
fn a_queue_without_io_uring_serves_reads_and_writes() {
    log::set_logger(&WARNINGS).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    std::env::set_var("BLOCKFUSE_TEST_NO_IO_URING", "1");
    let path = std::env::temp_dir().join(format!("blockfuse-no-uring-{}.raw", std::process::id()));
    std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
    let backend = RawBackend::open(
        &path,
        RawOptions { writable: true, cache: CacheMode::Writeback, ..Default::default() },
    )
    .unwrap();
    let opts = ExportOptions {
        writable: true,
        growable: false,
        allow_other: false,
        writethrough: false,
        max_read: 1 << 20,
    };
    let shared = Arc::new(Shared::new(
        Export::new(Backend::Raw(backend), opts, 0, 0),
        1 << 20,
        Box::new(|_| {}),
    ));
    let (ours, theirs) = seqpacket_pair();
    let queue_shared = shared.clone();
    let queue = std::thread::spawn(move || run_queue(theirs, queue_shared));
    let fd = ours.as_raw_fd();
    let exchange = |req: &[u8], reply: &mut [u8]| -> usize {
        // SAFETY: `req` is a live buffer of req.len() bytes; `fd` is our open socket.
        assert_eq!(unsafe { libc::write(fd, req.as_ptr().cast(), req.len()) }, req.len() as isize);
        // SAFETY: `reply` is a live writable buffer of reply.len() bytes.
        let n = unsafe { libc::read(fd, reply.as_mut_ptr().cast(), reply.len()) };
        assert!(n >= 16, "short reply");
        assert_eq!(i32::from_ne_bytes(reply[4..8].try_into().unwrap()), 0, "error reply");
        n as usize
    };
    let mut reply = vec![0u8; 70_000];
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    exchange(&request(opcode::FUSE_WRITE, 1, &rw_body(4096, 65536, &data)), &mut reply);
    let n = exchange(&request(opcode::FUSE_READ, 2, &rw_body(4096, 65536, &[])), &mut reply);
    assert_eq!(n, 16 + 65536);
    assert_eq!(&reply[16..n], &data[..], "read back what was written");
    exchange(&request(opcode::FUSE_GETATTR, 3, &[0u8; 16]), &mut reply);
    shared.request_stop();
    queue.join().unwrap().unwrap();
    let warnings = WARNINGS.0.lock().unwrap().clone();
    assert!(
        warnings.iter().any(|w| w.contains("io_uring unavailable")),
        "the queue did not take the path without io_uring: {warnings:?}"
    );
    let image = std::fs::read(&path).unwrap();
    assert_eq!(&image[4096..4096 + 65536], &data[..], "the write reached the image");
    let _ = std::fs::remove_file(&path);
}
