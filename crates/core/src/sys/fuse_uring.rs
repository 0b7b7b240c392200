//! FUSE-over-io_uring entries on a driven [`Ring`]: the memory of each entry (a
//! `fuse_uring_req_header` and a payload buffer), the REGISTER and COMMIT_AND_FETCH commands,
//! and safe access to an entry while userspace owns it.
//!
//! Why this is sound. The kernel writes a request into an entry's memory (and reads the reply
//! from it) only while a command of that entry is in flight, and only from inside this thread's
//! `io_uring_enter`: the ring is created with DEFER_TASKRUN, so the task work that copies a
//! request to userspace runs in no other context, and once the ring's fd is closed that work
//! runs with `IO_URING_F_TASK_DEAD` and copies nothing. Entries are owned by the ring and freed
//! after its fd is closed, so memory the kernel knows about is never freed while it could use
//! it. Rust code gets at an entry only through a [`FuseRequest`], which exists between a
//! command's completion and the next command: never while the kernel owns the entry.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use io_uring::{opcode, squeue, types};

use super::uring::{EntryMem, Ring, Slot};
use crate::aligned::AlignedBuf;
use crate::protocol::abi::uring::{
    CMD_COMMIT_AND_FETCH, CMD_REGISTER, ENT_COMMIT_ID, ENT_IN_OUT_OFFSET, ENT_PAYLOAD_SZ,
    REQ_HEADER_SZ,
};

/// A handle to one entry of this thread's ring, held by the one worker that serves it.
pub struct FuseEntry {
    index: usize,
}

/// The request an entry holds while userspace owns it; answering it hands the entry back.
pub struct FuseRequest<'a> {
    ring: &'a Ring,
    index: usize,
    header: &'a mut [u8; REQ_HEADER_SZ],
    payload: &'a mut [u8],
}

impl Ring {
    /// Gives this ring the /dev/fuse fd its FUSE commands go to (driven mode only; once).
    pub fn attach_fuse_device(&self, fd: OwnedFd) -> io::Result<()> {
        let mut dev = self.fuse_fd.borrow_mut();
        if dev.is_some() {
            return Err(io::Error::other("this ring already serves a FUSE device"));
        }
        *dev = Some(fd);
        Ok(())
    }

    /// The attached /dev/fuse fd (for the requests that still come by read(2)).
    pub fn fuse_device(&self) -> Option<BorrowedFd<'_>> {
        let dev = self.fuse_fd.borrow();
        // SAFETY: the fd is owned by this ring, is set once and never replaced or closed before
        // the ring is dropped, so it outlives the `&self` borrow the result is tied to.
        dev.as_ref().map(|fd| unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) })
    }

    /// Adds an entry for kernel queue `qid` with a payload buffer of `payload_len` bytes and
    /// queues its REGISTER: from the next [`Ring::wait`] on, the kernel may fill it.
    pub fn register_fuse_entry(&self, qid: u16, payload_len: usize) -> io::Result<FuseEntry> {
        let fd = self.fuse_device().ok_or_else(|| io::Error::other("no FUSE device attached"))?;
        let fd = fd.as_raw_fd();
        let slot =
            self.persistent().ok_or_else(|| io::Error::other("the io_uring slot table is full"))?;
        let mut payload = AlignedBuf::new(payload_len, super::page_size());
        let payload_ptr = payload.as_mut_slice().as_mut_ptr();
        let header = Box::new(UnsafeCell::new([0u8; REQ_HEADER_SZ]));
        let iov = Box::new(UnsafeCell::new([
            libc::iovec { iov_base: header.get().cast(), iov_len: REQ_HEADER_SZ },
            libc::iovec { iov_base: payload_ptr.cast(), iov_len: payload_len },
        ]));
        let mem = EntryMem { header, _payload: payload, payload_ptr, payload_len, iov, slot, qid };
        let mut entries = self.entries.borrow_mut();
        let index = entries.len();
        let entry = command(fd, CMD_REGISTER, 0, qid, Some(mem.iov.get() as u64));
        entries.push(mem);
        let mem = &entries[index];
        if !self.arm(&mem.slot) {
            return Err(io::Error::other("FUSE entry slot busy"));
        }
        // SAFETY: the iovecs and the memory they describe belong to the entry, which the ring
        // owns and frees only after its fd is closed (see the module comment).
        if !unsafe { self.push(entry, mem.slot.idx) } {
            return Err(io::Error::other("the io_uring submission queue is full"));
        }
        Ok(FuseEntry { index })
    }

    /// The error a command of `entry` already failed with, without waiting (registration).
    pub fn fuse_entry_error(&self, entry: &FuseEntry) -> Option<i32> {
        let idx = self.entries.borrow()[entry.index].slot.idx;
        match self.slots.borrow()[idx as usize] {
            Slot::Done(res) if res < 0 => Some(res),
            _ => None,
        }
    }

    /// Waits until the kernel put a request into `entry` (after REGISTER or a commit); `Err`
    /// carries the command's negative errno (e.g. `-ENOTCONN` once the connection is gone).
    pub async fn fuse_fetch<'a>(
        &'a self,
        entry: &'a mut FuseEntry,
    ) -> Result<FuseRequest<'a>, i32> {
        let idx = self.entries.borrow()[entry.index].slot.idx;
        let res = self.completion_at(idx).await;
        if res < 0 {
            return Err(res);
        }
        let entries = self.entries.borrow();
        let mem: &EntryMem = &entries[entry.index];
        // SAFETY: the command completed, so the kernel no longer touches this entry until the
        // next one is queued, which only `FuseRequest::commit` does and which consumes the
        // request; `entry` is borrowed mutably for the request's life, so no second request of
        // this entry exists. The header and payload are separate allocations that do not move
        // when `entries` grows.
        let (header, payload) = unsafe {
            (
                &mut *mem.header.get(),
                std::slice::from_raw_parts_mut(mem.payload_ptr, mem.payload_len),
            )
        };
        Ok(FuseRequest { ring: self, index: entry.index, header, payload })
    }
}

/// A `URING_CMD` SQE for the FUSE device: `fuse_uring_cmd_req` in the command area and, for
/// REGISTER, the address of the two iovecs.
fn command(fd: i32, cmd_op: u32, commit_id: u64, qid: u16, iov: Option<u64>) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut builder = opcode::UringCmd80::new(types::Fd(fd), cmd_op).cmd(cmd);
    if let Some(addr) = iov {
        builder = builder.addr(Some(addr));
    }
    let entry = builder.build();
    match iov {
        // REGISTER also needs `len` = 2 (the iovec count), which the builder cannot set.
        Some(_) => with_sqe_len(entry, 2),
        None => entry,
    }
}

/// Offset of `len` in `struct io_uring_sqe`.
const SQE_LEN_OFFSET: usize = 24;

fn with_sqe_len(entry: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is `#[repr(C)]` over `io_uring_sqe` plus 64 command bytes, 128 bytes of
    // plain integers and unions of integers with no padding, so every byte pattern is a valid
    // value and a round trip through bytes preserves it.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
    bytes[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

impl FuseRequest<'_> {
    /// Bytes of the request in the payload buffer (`ent_in_out.payload_sz`).
    pub fn payload_len(&self) -> usize {
        let at = ENT_IN_OUT_OFFSET + ENT_PAYLOAD_SZ;
        u32::from_ne_bytes([
            self.header[at],
            self.header[at + 1],
            self.header[at + 2],
            self.header[at + 3],
        ]) as usize
    }

    /// The header (read-only) and the payload buffer (a WRITE's data; room for the reply body).
    pub fn parts(&mut self) -> (&[u8; REQ_HEADER_SZ], &mut [u8]) {
        (self.header, self.payload)
    }

    /// Sets the reply: `out_header` goes to `in_out`, the body is the first `body_len` bytes of
    /// the payload buffer.
    pub fn set_reply(&mut self, out_header: &[u8; 16], body_len: usize) {
        self.header[..16].copy_from_slice(out_header);
        let at = ENT_IN_OUT_OFFSET + ENT_PAYLOAD_SZ;
        self.header[at..at + 4].copy_from_slice(&(body_len as u32).to_ne_bytes());
    }

    /// Queues COMMIT_AND_FETCH: the kernel takes the reply set with [`set_reply`] (during the
    /// next [`Ring::wait`]) and puts the next request into the entry.
    ///
    /// [`set_reply`]: FuseRequest::set_reply
    pub fn commit(self) -> io::Result<()> {
        let at = ENT_IN_OUT_OFFSET + ENT_COMMIT_ID;
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.header[at..at + 8]);
        let commit_id = u64::from_ne_bytes(id);
        let ring = self.ring;
        let fd = ring.fuse_device().ok_or_else(|| io::Error::other("no FUSE device attached"))?;
        let entries = ring.entries.borrow();
        let mem = &entries[self.index];
        let entry = command(fd.as_raw_fd(), CMD_COMMIT_AND_FETCH, commit_id, mem.qid, None);
        if !ring.arm(&mem.slot) {
            return Err(io::Error::other("FUSE entry slot busy"));
        }
        // SAFETY: the command refers to the entry's memory only through the kernel's record of
        // REGISTER; that memory is ring-owned (see the module comment). `self` (the only
        // access to it) is consumed here.
        if unsafe { ring.push(entry, mem.slot.idx) } {
            Ok(())
        } else {
            Err(io::Error::other("the io_uring submission queue is full"))
        }
    }
}
