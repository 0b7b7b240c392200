//! A per-thread io_uring: each queue thread installs one, and backends submit positional reads,
//! writes, fdatasync and fallocate to it from their async fns, so file I/O never blocks a queue's
//! intake. The queue's executor drives the ring: submissions wait in the queue until it enters
//! the ring ([`Ring::wait`]), several in one `io_uring_enter`, and it sleeps there. The ring also
//! polls the queue's fds and carries FUSE-over-io_uring commands (`fuse_uring`).
//!
//! Buffers of one-shot operations are borrowed, not owned: an [`Op`] is only ever created and
//! awaited inside this module's async fns (pinned in the caller's future), and its Drop waits for
//! the kernel to finish with the buffer, so no memory the kernel still writes to is ever freed or
//! reused. Long-lived operations ([`Persistent`] slots: FUSE entries, polls) only ever involve
//! memory the ring itself owns, so they may stay with the kernel until the ring is gone.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};

use crate::aligned::AlignedBuf;
use crate::protocol::abi::uring::REQ_HEADER_SZ;

pub(super) enum Slot {
    Free,
    /// A persistent slot with nothing in flight.
    Idle,
    Pending(Option<Waker>),
    Done(i32),
}

/// One FUSE-over-io_uring entry's memory (a `fuse_uring_req_header` and a payload buffer; the
/// commands that use it are in `fuse_uring`). The kernel has its address from REGISTER on, so the
/// ring owns it: it is freed only after the ring's fd is closed.
pub(crate) struct EntryMem {
    pub(super) header: Box<UnsafeCell<[u8; REQ_HEADER_SZ]>>,
    /// Page-aligned, so a WRITE's data can go to an O_DIRECT file as it is. Only kept alive
    /// here; reached through `payload_ptr`.
    pub(super) _payload: AlignedBuf,
    pub(super) payload_ptr: *mut u8,
    pub(super) payload_len: usize,
    /// REGISTER's iovec pair (header, payload): read by the kernel during submission.
    pub(super) iov: Box<UnsafeCell<[libc::iovec; 2]>>,
    pub(super) slot: Persistent,
    pub(super) qid: u16,
}

/// One thread's ring and the table of operations in flight on it.
pub struct Ring {
    // Declared first so it is dropped first: the kernel is done with `entries` once the ring's
    // fd is closed (see `fuse_uring`).
    pub(super) ring: RefCell<IoUring<squeue::Entry128>>,
    pub(super) slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Entries queued in the submission queue but not yet handed to the kernel.
    unsubmitted: Cell<bool>,
    /// FUSE-over-io_uring entries' memory, owned by the ring (see `fuse_uring`).
    pub(super) entries: RefCell<Vec<EntryMem>>,
    /// The /dev/fuse fd those entries' commands go to.
    pub(super) fuse_fd: RefCell<Option<OwnedFd>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Ring>>> = const { RefCell::new(None) };
}

/// Ring size: bounds the operations in flight per thread; beyond it callers fall back to
/// synchronous I/O rather than fail.
const ENTRIES: u32 = 256;

impl Ring {
    /// Creates a ring and makes it this thread's current one: 128-byte submission entries
    /// (FUSE-over-io_uring commands need them), one submitting thread, completion work deferred
    /// to [`Ring::wait`] (`DEFER_TASKRUN`, Linux 6.1+).
    pub fn install() -> io::Result<Rc<Ring>> {
        let ring = Rc::new(Self::build()?);
        CURRENT.with(|c| *c.borrow_mut() = Some(ring.clone()));
        Ok(ring)
    }

    fn build() -> io::Result<Ring> {
        // Test only: makes every queue take its no-io_uring path (docs/reliability.md).
        if std::env::var_os("BLOCKFUSE_TEST_NO_IO_URING").is_some() {
            return Err(io::Error::other("io_uring switched off by BLOCKFUSE_TEST_NO_IO_URING"));
        }
        let ring = IoUring::<squeue::Entry128>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(ENTRIES)?;
        Ok(Ring {
            ring: RefCell::new(ring),
            slots: RefCell::new((0..ENTRIES).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..ENTRIES).rev().collect()),
            unsubmitted: Cell::new(false),
            entries: RefCell::new(Vec::new()),
            fuse_fd: RefCell::new(None),
        })
    }

    /// Whether this kernel lets this thread create such a ring (it is closed again).
    pub fn probe() -> io::Result<()> {
        Self::build().map(drop)
    }

    /// Removes this thread's ring (the queue is ending).
    pub fn uninstall() {
        CURRENT.with(|c| c.borrow_mut().take());
    }

    /// This thread's ring, if its queue installed one.
    pub fn current() -> Option<Rc<Ring>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Moves every available completion into its slot and wakes its waiter.
    pub fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            // Only a pending slot can complete; a stray completion has nobody to tell.
            if let Some(slot @ Slot::Pending(_)) = slots.get_mut(cqe.user_data() as usize) {
                if let Slot::Pending(Some(waker)) =
                    std::mem::replace(slot, Slot::Done(cqe.result()))
                {
                    waker.wake();
                }
            }
        }
    }

    /// Hands every queued submission to the kernel, runs completion work and, if
    /// `block`, sleeps until at least one completion is there; then reaps. Interrupted waits
    /// return normally.
    pub fn wait(&self, block: bool) -> io::Result<()> {
        self.unsubmitted.set(false);
        let r = {
            let mut ring = self.ring.borrow_mut();
            let to_submit = ring.submission().len() as u32;
            // GETEVENTS even when not blocking: deferred completion work only runs then.
            let flags = io_uring::EnterFlags::GETEVENTS.bits();
            // SAFETY: no argument struct is passed (null, size of sigset_t is ignored without
            // EXT_ARG); the queued entries were pushed under push()'s contract.
            unsafe {
                ring.submitter().enter::<libc::sigset_t>(to_submit, u32::from(block), flags, None)
            }
        };
        match r {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        self.reap();
        Ok(())
    }

    /// Hands queued submissions to the kernel without waiting (a queue's last act, and
    /// [`Submission::Now`] I/O).
    pub fn flush(&self) -> io::Result<()> {
        if self.unsubmitted.replace(false) {
            self.ring.borrow().submit()?;
        }
        Ok(())
    }

    /// Queues `entry` with `user_data = idx` for the next [`Ring::wait`]. False when the
    /// submission queue stays full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until the operation completes: the caller
    /// either borrows it for an [`Op`]'s whole life, or it is memory the ring owns.
    pub(super) unsafe fn push(&self, entry: squeue::Entry128, idx: u32) -> bool {
        let entry = entry.user_data(idx as u64);
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the caller guarantees the buffers outlive the operation (see above).
        let mut pushed = unsafe { ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // The submission queue is full of unsubmitted entries: hand them over and retry.
            let _ = ring.submit();
            // SAFETY: as above.
            pushed = unsafe { ring.submission().push(&entry) }.is_ok();
        }
        if pushed {
            self.unsubmitted.set(true);
        }
        pushed
    }

    fn take_slot(&self) -> Option<u32> {
        let idx = self.free.borrow_mut().pop()?;
        self.slots.borrow_mut()[idx as usize] = Slot::Pending(None);
        Some(idx)
    }

    /// Queues `entry` and hands it to the kernel as `submission` says; `None` when no slot is
    /// free (the caller does the I/O synchronously).
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until the returned [`Op`] completes or is
    /// dropped: the caller awaits the Op in place, borrowing what the pointers point to.
    unsafe fn submit(self: &Rc<Self>, entry: squeue::Entry, submission: Submission) -> Option<Op> {
        let idx = self.take_slot()?;
        // SAFETY: forwarded from the caller.
        if !unsafe { self.push(entry.into(), idx) } {
            self.release(idx);
            return None;
        }
        if submission == Submission::Now {
            if let Err(e) = self.flush() {
                // Left in the queue, the entry goes with the next wait (which reports errors).
                log::debug!("io_uring submit failed, deferring: {e}");
                self.unsubmitted.set(true);
            }
        }
        Some(Op { ring: self.clone(), idx, finished: false })
    }

    fn release(&self, idx: u32) {
        self.slots.borrow_mut()[idx as usize] = Slot::Free;
        self.free.borrow_mut().push(idx);
    }

    /// Blocks until operation `idx` completes (used only when an Op is dropped early).
    fn wait_for(&self, idx: u32) {
        loop {
            if let Slot::Done(_) = self.slots.borrow()[idx as usize] {
                return;
            }
            self.unsubmitted.set(false);
            let _ = self.ring.borrow().submit_and_wait(1);
            self.reap();
        }
    }

    /// A slot for a long-lived operation of this thread; `None` when the table is full.
    pub fn persistent(&self) -> Option<Persistent> {
        let idx = self.take_slot()?;
        self.slots.borrow_mut()[idx as usize] = Slot::Idle;
        Some(Persistent { idx })
    }

    /// Marks `slot` as waited for; false if something is still in flight on it.
    pub(super) fn arm(&self, slot: &Persistent) -> bool {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot.idx as usize];
        if matches!(s, Slot::Idle | Slot::Done(_)) {
            *s = Slot::Pending(None);
            true
        } else {
            false
        }
    }

    /// Arms a one-shot poll of `fd` on `slot` for `events` (error and hang-up are always
    /// reported), unless one is still armed there (its wait was dropped); await
    /// [`Ring::completion`] for the result (the poll mask, or -errno).
    pub fn poll(&self, slot: &Persistent, fd: BorrowedFd<'_>, events: i16) -> io::Result<()> {
        if matches!(self.slots.borrow()[slot.idx as usize], Slot::Pending(_)) {
            return Ok(());
        }
        if !self.arm(slot) {
            return Err(io::Error::other("the poll slot is not in use"));
        }
        let mask = (events | libc::POLLERR | libc::POLLHUP) as u32;
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), mask).build();
        // SAFETY: a poll carries no buffer; the kernel holds its own reference to the file.
        if unsafe { self.push(entry.into(), slot.idx) } {
            Ok(())
        } else {
            self.slots.borrow_mut()[slot.idx as usize] = Slot::Idle;
            Err(io::Error::other("the io_uring submission queue is full"))
        }
    }

    /// Waits for the operation armed on `slot` to complete; resolves to its result.
    pub fn completion<'a>(&'a self, slot: &'a Persistent) -> Completion<'a> {
        self.completion_at(slot.idx)
    }

    pub(super) fn completion_at(&self, idx: u32) -> Completion<'_> {
        Completion { ring: self, idx }
    }
}

/// A slot for long-lived operations (a FUSE entry's fetch, a poll), reused one operation after
/// another. What is in flight on it may outlive any wait for it: it involves no memory but the
/// ring's own.
pub struct Persistent {
    pub(super) idx: u32,
}

/// The result of the operation armed on a [`Persistent`] slot. Dropping it leaves the operation
/// in flight.
pub struct Completion<'a> {
    ring: &'a Ring,
    idx: u32,
}

impl Future for Completion<'_> {
    type Output = i32;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.ring.slots.borrow_mut();
        let slot = &mut slots[self.idx as usize];
        match take_result(slot, cx) {
            Poll::Ready(Some(res)) => {
                *slot = Slot::Idle;
                Poll::Ready(res)
            }
            Poll::Ready(None) => Poll::Ready(-libc::EINVAL),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A slot's result if its operation completed; else registers `cx`'s waker (once per task) and
/// is pending. `Ready(None)`: nothing is in flight on the slot.
fn take_result(slot: &mut Slot, cx: &mut Context<'_>) -> Poll<Option<i32>> {
    match slot {
        Slot::Done(res) => Poll::Ready(Some(*res)),
        Slot::Pending(waker) => {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
        Slot::Idle | Slot::Free => Poll::Ready(None),
    }
}

/// When a file operation is handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// At once (one `io_uring_enter` each, ~1 µs): for O_DIRECT files, whose I/O goes to the
    /// device. Deferred, an operation waited while the thread read more requests and wrote
    /// replies, and the disk saw fewer operations in flight than the client sent. On the
    /// benchmark VM, O_DIRECT random 4 KiB writes at depth 16 with one thread went from
    /// 20.6–22.0k to 25.1–26.0k IOPS.
    Now,
    /// With the loop's next wait, together with the others: for page-cache files. The kernel
    /// completes such I/O during submission or passes it to io_uring's worker, which takes one
    /// file's writes one after another; handed over in a batch, one worker runs them without
    /// sleeping in between. Submitted one by one, page-cache random writes at depth 16 with
    /// two threads fell from 30.0k to 21.9k IOPS.
    Batched,
}

/// An operation in flight; resolves to the CQE result (bytes, or -errno).
struct Op {
    ring: Rc<Ring>,
    idx: u32,
    /// Set once the result was taken and the slot released.
    finished: bool,
}

impl Future for Op {
    type Output = i32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        if self.finished {
            return Poll::Ready(-libc::EIO);
        }
        // Cached reads often complete during submission: look before parking.
        self.ring.reap();
        let mut slots = self.ring.slots.borrow_mut();
        match take_result(&mut slots[self.idx as usize], cx) {
            Poll::Ready(Some(res)) => {
                drop(slots);
                self.ring.release(self.idx);
                self.finished = true;
                Poll::Ready(res)
            }
            Poll::Ready(None) => Poll::Ready(-libc::EIO),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if !self.finished {
            // The kernel may still use the buffer: wait for it before the borrow ends.
            self.ring.wait_for(self.idx);
            self.ring.release(self.idx);
        }
    }
}

fn result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

impl Ring {
    /// One pread into `buf`; may be short.
    pub async fn read_at(
        self: &Rc<Self>,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        offset: u64,
        submission: Submission,
    ) -> Option<io::Result<usize>> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let entry = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(offset)
            .build();
        // SAFETY: `buf` and `fd` are borrowed for this whole async fn, which awaits the Op in
        // place; Op's Drop waits for completion if this future is dropped early.
        let op = unsafe { self.submit(entry, submission) }?;
        Some(result(op.await))
    }

    /// One pwrite from `buf`; may be short.
    pub async fn write_at(
        self: &Rc<Self>,
        fd: BorrowedFd<'_>,
        buf: &[u8],
        offset: u64,
        submission: Submission,
    ) -> Option<io::Result<usize>> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let entry =
            opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), len).offset(offset).build();
        // SAFETY: as in read_at.
        let op = unsafe { self.submit(entry, submission) }?;
        Some(result(op.await))
    }

    /// fdatasync.
    pub async fn datasync(self: &Rc<Self>, fd: BorrowedFd<'_>) -> Option<io::Result<()>> {
        let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: no buffers; `fd` is borrowed for the whole call.
        let op = unsafe { self.submit(entry, Submission::Batched) }?;
        Some(result(op.await).map(drop))
    }

    /// fallocate(2).
    pub async fn fallocate(
        self: &Rc<Self>,
        fd: BorrowedFd<'_>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Option<io::Result<()>> {
        let entry = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: no buffers; `fd` is borrowed for the whole call.
        let op = unsafe { self.submit(entry, Submission::Batched) }?;
        Some(result(op.await).map(drop))
    }
}

impl Ring {
    /// One recv(2) into `buf` from a socket; with `wait_all`, until `buf` is full unless the
    /// stream ends or fails. May be short (0 = the peer closed).
    pub async fn recv(
        self: &Rc<Self>,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        wait_all: bool,
    ) -> Option<io::Result<usize>> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let flags = if wait_all { libc::MSG_WAITALL } else { 0 };
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .flags(flags)
            .build();
        // SAFETY: as in read_at.
        let op = unsafe { self.submit(entry, Submission::Batched) }?;
        Some(result(op.await))
    }

    /// One sendmsg(2) of `first` then `second` on a socket; may be short.
    pub async fn send2(
        self: &Rc<Self>,
        fd: BorrowedFd<'_>,
        first: &[u8],
        second: &[u8],
    ) -> Option<io::Result<usize>> {
        let iov = [
            libc::iovec { iov_base: first.as_ptr() as *mut libc::c_void, iov_len: first.len() },
            libc::iovec { iov_base: second.as_ptr() as *mut libc::c_void, iov_len: second.len() },
        ];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = if second.is_empty() { 1 } else { 2 };
        let entry = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), &msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: `msg`, `iov` and the buffers they point to live in this async fn's frame or
        // are borrowed for its whole life; the Op is awaited in place and its Drop waits for
        // completion if this future is dropped early.
        let op = unsafe { self.submit(entry, Submission::Batched) }?;
        Some(result(op.await))
    }
}
