//! The fake device shared by the fake-device tests: one end of a SOCK_SEQPACKET socketpair (which
//! keeps message boundaries, like /dev/fuse) served by a real queue on its own thread, the other
//! end playing the kernel; and FUSE requests and replies built byte by byte.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use blockfuse_core::backend::{Backend, MemoryBackend};
use blockfuse_core::export::Export;
use blockfuse_core::transport::queue::{run_queue, Shared, StopCause};

pub const MAX_WRITE: usize = 64 << 10;
/// uid and gid in the headers of crafted requests (the export does not look at them).
const HEADER_UID: u32 = 1234;
const HEADER_GID: u32 = 5678;
/// Bound on every wait: a queue that does not answer, stop or return within it has failed.
pub const WAIT: Duration = Duration::from_secs(5);

/// The kernel's end and the queue's end of a fake device.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints for the duration of the call.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair failed: {}", io::Error::last_os_error());
    // SAFETY: socketpair just created both fds; nobody else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The kernel's end. std has no SEQPACKET type; UnixDatagram's send/recv are the same syscalls
/// and keep the message boundaries the socket type gives.
pub fn kernel_end(fd: OwnedFd) -> UnixDatagram {
    let sock = UnixDatagram::from(fd);
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_write_timeout(Some(WAIT)).unwrap();
    sock
}

/// A queue served by `run_queue` on its own thread.
pub struct Queue {
    pub kernel: UnixDatagram,
    pub shared: Arc<Shared>,
    pub stops: Receiver<StopCause>,
    pub returned: Receiver<io::Result<()>>,
}

impl Queue {
    /// Starts a queue; `pending` messages are in the device before the queue first reads.
    pub fn start(export: Export, pending: &[&[u8]]) -> Queue {
        let (ours, theirs) = seqpacket_pair();
        let kernel = kernel_end(theirs);
        for m in pending {
            send(&kernel, m);
        }
        let (stop_tx, stops) = mpsc::channel();
        let on_stop = Box::new(move |cause: StopCause| {
            let _ = stop_tx.send(cause);
        });
        let shared = Arc::new(Shared::new(export, MAX_WRITE, on_stop));
        let (ret_tx, returned) = mpsc::channel();
        let queue_shared = shared.clone();
        std::thread::Builder::new()
            .name("fake-device-queue".into())
            .spawn(move || {
                let _ = ret_tx.send(run_queue(ours, queue_shared));
            })
            .unwrap();
        Queue { kernel, shared, stops, returned }
    }

    pub fn send(&self, msg: &[u8]) {
        send(&self.kernel, msg);
    }

    /// The next reply; fails the test if none comes within [`WAIT`].
    pub fn recv(&self) -> Vec<u8> {
        let reply = recv(&self.kernel).expect("no reply within the time limit");
        assert!(!reply.is_empty(), "the queue closed the device instead of answering");
        reply
    }

    /// Sends one request and returns its reply.
    pub fn call(&self, msg: &[u8]) -> Vec<u8> {
        self.send(msg);
        self.recv()
    }

    pub fn memory(&self) -> &MemoryBackend {
        match self.shared.export.backend() {
            Backend::Memory(m) => m,
            _ => unreachable!(),
        }
    }

    /// Waits (bounded) for `run_queue` to return.
    pub fn returned(&self) -> io::Result<()> {
        match self.returned.recv_timeout(WAIT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => panic!("run_queue did not return within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the queue thread panicked"),
        }
    }

    /// Waits (bounded) for the queue to report that it stopped by itself.
    pub fn stop_cause(&self) -> StopCause {
        self.stops.recv_timeout(WAIT).expect("no stop reported within the time limit")
    }

    /// After the queue returned: it reported no stop of its own, and closed the device without
    /// answering anything more.
    pub fn assert_closed_without_reply(&self) {
        match recv(&self.kernel) {
            Some(r) if r.is_empty() => {}
            Some(r) => panic!("got a reply after the queue stopped: {r:?}"),
            None => panic!("the device is still open after run_queue returned"),
        }
    }
}

pub fn send(sock: &UnixDatagram, msg: &[u8]) {
    assert!(msg.len() <= MAX_WRITE + 80, "a crafted message would be truncated by the socket");
    assert_eq!(sock.send(msg).expect("send to the fake device"), msg.len());
}

/// One message; `Some(empty)` at end of stream, `None` on timeout.
pub fn recv(sock: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2 * MAX_WRITE];
    match sock.recv(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
        // The queue closed its end with requests still unread in it.
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Some(Vec::new()),
        Err(e) => panic!("recv from the fake device: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and replies, byte by byte (include/uapi/linux/fuse.h)

/// `fuse_in_header` with `len` = the real size, then `body`.
pub fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    with_len(opcode, unique, body, (40 + body.len()) as u32)
}

/// As [`request`] but with the header claiming `len` bytes.
pub fn with_len(opcode: u32, unique: u64, body: &[u8], len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(40 + body.len());
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(&opcode.to_ne_bytes());
    v.extend_from_slice(&unique.to_ne_bytes());
    v.extend_from_slice(&1u64.to_ne_bytes()); // nodeid
    v.extend_from_slice(&HEADER_UID.to_ne_bytes());
    v.extend_from_slice(&HEADER_GID.to_ne_bytes());
    v.extend_from_slice(&4242u32.to_ne_bytes()); // pid
    v.extend_from_slice(&[0; 4]); // total_extlen, padding
    v.extend_from_slice(body);
    v
}

/// `fuse_read_in` / `fuse_write_in` (same 40-byte layout), then an optional payload.
pub fn rw(opcode: u32, unique: u64, offset: u64, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&7u64.to_ne_bytes()); // fh
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&size.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // read_flags / write_flags
    b.extend_from_slice(&0u64.to_ne_bytes()); // lock_owner
    b.extend_from_slice(&2u32.to_ne_bytes()); // flags
    b.extend_from_slice(&0u32.to_ne_bytes()); // padding
    b.extend_from_slice(payload);
    request(opcode, unique, &b)
}

/// `fuse_out_header` followed by `body`.
pub fn reply(error: i32, unique: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    v.extend_from_slice(&error.to_ne_bytes());
    v.extend_from_slice(&unique.to_ne_bytes());
    v.extend_from_slice(body);
    v
}

pub fn write_out(n: u32) -> Vec<u8> {
    let mut v = n.to_ne_bytes().to_vec();
    v.extend_from_slice(&[0; 4]);
    v
}
