//! A per-thread io_uring for file I/O: each queue thread installs one, and backends submit
//! positional reads, writes, fdatasync and fallocate to it from their async fns. Completions are
//! reaped by a task watching the ring's fd, so file I/O never blocks a queue's intake.
//!
//! Buffers are borrowed, not owned: an [`Op`] is only ever created and awaited inside this
//! module's async fns (pinned in the caller's future), and its Drop waits for the kernel to finish
//! with the buffer, so no memory the kernel still writes to is ever freed or reused.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};

enum Slot {
    Free,
    Pending(Option<Waker>),
    Done(i32),
}

/// One thread's ring and the table of operations in flight on it.
pub struct Ring {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Ring>>> = const { RefCell::new(None) };
}

/// Ring size: bounds the operations in flight per thread; beyond it callers fall back to
/// synchronous I/O rather than fail.
const ENTRIES: u32 = 256;

impl Ring {
    /// Creates a ring and makes it this thread's current one.
    pub fn install() -> io::Result<Rc<Ring>> {
        let ring = IoUring::builder().setup_single_issuer().setup_coop_taskrun().build(ENTRIES)?;
        let ring = Rc::new(Ring {
            ring: RefCell::new(ring),
            slots: RefCell::new((0..ENTRIES).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..ENTRIES).rev().collect()),
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(ring.clone()));
        Ok(ring)
    }

    /// Removes this thread's ring (the queue is ending).
    pub fn uninstall() {
        CURRENT.with(|c| c.borrow_mut().take());
    }

    /// This thread's ring, if its queue installed one.
    pub fn current() -> Option<Rc<Ring>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// The ring's fd: readable when completions are waiting.
    pub fn fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    /// Moves every available completion into its slot and wakes its waiter.
    pub fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            if let Some(slot) = slots.get_mut(cqe.user_data() as usize) {
                if let Slot::Pending(Some(waker)) =
                    std::mem::replace(slot, Slot::Done(cqe.result()))
                {
                    waker.wake();
                }
            }
        }
    }

    /// Submits `entry`; `None` when no slot is free (the caller does the I/O synchronously).
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until the returned [`Op`] completes or is
    /// dropped: the caller awaits the Op in place, borrowing what the pointers point to.
    unsafe fn submit(self: &Rc<Self>, entry: squeue::Entry) -> Option<Op> {
        let idx = self.free.borrow_mut().pop()?;
        self.slots.borrow_mut()[idx as usize] = Slot::Pending(None);
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
        if !pushed {
            drop(ring);
            self.release(idx);
            return None;
        }
        // A failed enter (EAGAIN/EBUSY) leaves the entry queued; the next submit hands it over.
        let _ = ring.submit();
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
            let _ = self.ring.borrow().submit_and_wait(1);
            self.reap();
        }
    }
}

/// Reaps completions whenever the ring's fd turns readable. Runs as one task per queue thread
/// for as long as the queue lives.
pub async fn reap_forever(ring: Rc<Ring>) -> io::Result<()> {
    struct RingFd(RawFd);
    impl AsRawFd for RingFd {
        fn as_raw_fd(&self) -> RawFd {
            self.0
        }
    }
    // SAFETY: the fd belongs to `ring`, which this future holds (and so keeps open) for as long
    // as the AsyncFd exists; it always reports the same fd.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            RingFd(ring.fd()),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = afd.readable().await?;
        // Clear first: a completion posted after this point raises readiness again.
        guard.clear_ready();
        ring.reap();
    }
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
        match &mut slots[self.idx as usize] {
            Slot::Done(res) => {
                let res = *res;
                drop(slots);
                self.ring.release(self.idx);
                self.finished = true;
                Poll::Ready(res)
            }
            Slot::Pending(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Free => Poll::Ready(-libc::EIO),
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
    ) -> Option<io::Result<usize>> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let entry = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(offset)
            .build();
        // SAFETY: `buf` and `fd` are borrowed for this whole async fn, which awaits the Op in
        // place; Op's Drop waits for completion if this future is dropped early.
        let op = unsafe { self.submit(entry) }?;
        Some(result(op.await))
    }

    /// One pwrite from `buf`; may be short.
    pub async fn write_at(
        self: &Rc<Self>,
        fd: BorrowedFd<'_>,
        buf: &[u8],
        offset: u64,
    ) -> Option<io::Result<usize>> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let entry =
            opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), len).offset(offset).build();
        // SAFETY: as in read_at.
        let op = unsafe { self.submit(entry) }?;
        Some(result(op.await))
    }

    /// fdatasync.
    pub async fn datasync(self: &Rc<Self>, fd: BorrowedFd<'_>) -> Option<io::Result<()>> {
        let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: no buffers; `fd` is borrowed for the whole call.
        let op = unsafe { self.submit(entry) }?;
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
        let op = unsafe { self.submit(entry) }?;
        Some(result(op.await).map(drop))
    }
}
