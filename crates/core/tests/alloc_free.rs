//! The hot path allocates nothing per request in steady state: a queue serving READ, WRITE and
//! GETATTR over a fake device (a SOCK_SEQPACKET socketpair, which keeps message boundaries like
//! /dev/fuse) with a raw file backend (io_uring path) makes zero heap allocations once warm.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockfuse_core::backend::{Backend, CacheMode, RawBackend, RawOptions};
use blockfuse_core::export::{Export, ExportOptions};
use blockfuse_core::protocol::abi::opcode;
use blockfuse_core::transport::queue::{run_queue, Shared};

mod counting_alloc;
use counting_alloc::{Counting, MEASURING, QUEUE_ALLOCATIONS, QUEUE_ALLOCATIONS_EVER};

thread_local! {
    static ON_QUEUE_THREAD: Cell<bool> = const { Cell::new(false) };
}

#[global_allocator]
static GLOBAL: Counting = Counting { is_queue_thread: || ON_QUEUE_THREAD.with(|q| q.get()) };

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair failed: {}", std::io::Error::last_os_error());
    // SAFETY: socketpair just created both fds for us.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn request(buf: &mut Vec<u8>, op: u32, unique: u64, body: &[u8]) {
    buf.clear();
    let len = (40 + body.len()) as u32;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&op.to_ne_bytes());
    buf.extend_from_slice(&unique.to_ne_bytes());
    buf.extend_from_slice(&1u64.to_ne_bytes());
    buf.extend_from_slice(&[0u8; 16]);
    buf.extend_from_slice(body);
}

fn rw_body(offset: u64, size: u32, payload: Option<&[u8]>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0u64.to_ne_bytes());
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&size.to_ne_bytes());
    b.extend_from_slice(&[0u8; 20]);
    if let Some(p) = payload {
        b.extend_from_slice(p);
    }
    b
}

#[test]
fn steady_state_requests_do_not_allocate() {
    let path = std::env::temp_dir().join(format!("blockfuse-alloc-{}.raw", std::process::id()));
    std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
    let backend = RawBackend::open(
        &path,
        RawOptions { writable: true, cache: CacheMode::Writeback, ..Default::default() },
    )
    .expect("open image");
    let opts = ExportOptions {
        writable: true,
        growable: false,
        allow_other: false,
        writethrough: false,
        max_read: 1 << 20,
    };
    let export = Export::new(Backend::Raw(backend), opts, 0, 0);
    let shared = Arc::new(Shared::new(export, 1 << 20, Box::new(|_| {})));
    let (ours, theirs) = seqpacket_pair();
    let queue_shared = shared.clone();
    let queue = std::thread::spawn(move || {
        ON_QUEUE_THREAD.with(|q| q.set(true));
        run_queue(theirs, queue_shared)
    });

    // Every request and reply buffer is built before measuring; this thread allocates nothing
    // while the queue is measured (and is not counted anyway).
    let payload = vec![0x5au8; 65536];
    let bodies = [
        (opcode::FUSE_READ, rw_body(4096, 65536, None)),
        (opcode::FUSE_WRITE, rw_body(65536, 65536, Some(&payload))),
        (opcode::FUSE_GETATTR, vec![0u8; 16]),
    ];
    let mut reqs: Vec<Vec<u8>> = Vec::new();
    for (i, (op, body)) in bodies.iter().enumerate() {
        let mut r = Vec::with_capacity(70_000);
        request(&mut r, *op, i as u64 + 1, body);
        reqs.push(r);
    }
    let mut reply = vec![0u8; 70_000];
    let fd = ours.as_raw_fd();
    let mut round = |n: usize| {
        for i in 0..n {
            let r = &reqs[i % reqs.len()];
            // SAFETY: `r` is a live buffer of r.len() bytes; `fd` is our open socket.
            let w = unsafe { libc::write(fd, r.as_ptr().cast(), r.len()) };
            assert_eq!(w as usize, r.len());
            // SAFETY: `reply` is a live writable buffer of reply.len() bytes.
            let got = unsafe { libc::read(fd, reply.as_mut_ptr().cast(), reply.len()) };
            assert!(got >= 16, "short reply");
            let error = i32::from_ne_bytes(reply[4..8].try_into().unwrap());
            assert_eq!(error, 0, "request {i} failed with {error}");
        }
    };
    round(3000);
    MEASURING.store(true, Ordering::SeqCst);
    round(30_000);
    MEASURING.store(false, Ordering::SeqCst);
    let counted = QUEUE_ALLOCATIONS.load(Ordering::SeqCst);

    shared.request_stop();
    queue.join().unwrap().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(QUEUE_ALLOCATIONS_EVER.load(Ordering::SeqCst) > 0, "the counter never saw the queue");
    assert_eq!(counted, 0, "the queue thread allocated {counted} times in 30000 requests");
}
