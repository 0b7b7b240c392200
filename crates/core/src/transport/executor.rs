//! The executor of a queue thread (either intake): polls the thread's tasks when they are
//! woken and, when none is ready, sleeps in the ring's `io_uring_enter`, which also hands the
//! kernel every submission the tasks queued meanwhile (replies, file I/O) in one call. Before
//! sleeping it may poll the ring for an adaptive while (`idle_poll`, [`IdleWait`]).
//!
//! Why not tokio here: tokio's current-thread runtime sleeps in `epoll_wait`, but the ring's
//! completion work (DEFER_TASKRUN, which FUSE entries need, see `sys::fuse_uring`) only runs
//! inside `io_uring_enter`; waiting there directly saves a syscall per wake-up and lets one
//! enter carry a whole batch. Tasks may still use tokio's runtime-independent parts (sync
//! primitives); nothing on a queue thread needs tokio's reactor or timers.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::idle_poll::IdlePoll;
use crate::sys;
use crate::sys::uring::Ring;

/// A task of the executor: pinned once at start, never moved or reallocated.
pub type Task<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Which tasks were woken since they were last polled.
struct WakeState {
    ready: Box<[AtomicBool]>,
    any: AtomicBool,
    owner: ThreadId,
    /// Signalled by wakes from other threads (a stop request, a backend's helper thread): the
    /// ring polls it, so a sleeping loop wakes up.
    eventfd: OwnedFd,
}

struct TaskWaker {
    state: Arc<WakeState>,
    index: usize,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.state.ready[self.index].store(true, Ordering::Release);
        self.state.any.store(true, Ordering::Release);
        if std::thread::current().id() != self.state.owner {
            sys::eventfd_signal(self.state.eventfd.as_fd());
        }
    }
}

/// What the loop does when no task is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleWait {
    /// Polls the ring for an adaptive while before sleeping (see `idle_poll`): for a queue whose
    /// next request comes through the ring.
    Poll,
    /// Sleeps in the ring at once: for a queue that polls for its next request itself and
    /// waits in the ring only while file I/O is in flight. Polling for that I/O's completion
    /// would compete for the CPU with the kernel worker doing it (page-cache writes run in
    /// io_uring's worker threads) and catches little else: on the benchmark VM it cost 15–28%
    /// of the IOPS of page-cache sequential writes at depth 1 (18.9–20.3k against 24.0–26.4k)
    /// and won nothing elsewhere.
    Sleep,
}

/// Runs `tasks` on this thread's driven `ring` until `finished()` holds (checked whenever the
/// woken tasks have run) or every task has returned. Submissions still queued then are handed
/// to the kernel before returning.
pub fn run(
    ring: &Ring,
    tasks: Vec<Task<'_>>,
    idle: IdleWait,
    finished: impl Fn() -> bool,
) -> io::Result<()> {
    let eventfd = sys::eventfd()?;
    let listen_slot =
        ring.persistent().ok_or_else(|| io::Error::other("the io_uring slot table is full"))?;
    let state = Arc::new(WakeState {
        ready: (0..=tasks.len()).map(|_| AtomicBool::new(true)).collect(),
        any: AtomicBool::new(true),
        owner: std::thread::current().id(),
        eventfd,
    });
    let efd = state.eventfd.as_fd();
    // The last task re-arms the poll on the eventfd each time it fires.
    let listener: Task<'_> = Box::pin(async {
        loop {
            if let Err(e) = ring.poll(&listen_slot, efd, libc::POLLIN) {
                log::error!("cannot watch for cross-thread wake-ups: {e}");
                return;
            }
            ring.completion(&listen_slot).await;
            sys::eventfd_drain(efd);
        }
    });
    let mut tasks = tasks;
    let workers = tasks.len();
    tasks.push(listener);
    let wakers: Vec<Waker> = (0..tasks.len())
        .map(|index| Waker::from(Arc::new(TaskWaker { state: state.clone(), index })))
        .collect();
    let mut done = vec![false; tasks.len()];
    let poll = IdlePoll::default();
    let mut running = workers;
    loop {
        while state.any.swap(false, Ordering::AcqRel) {
            for (i, task) in tasks.iter_mut().enumerate() {
                if done[i] || !state.ready[i].swap(false, Ordering::AcqRel) {
                    continue;
                }
                let mut cx = Context::from_waker(&wakers[i]);
                if let Poll::Ready(()) = task.as_mut().poll(&mut cx) {
                    done[i] = true;
                    if i < workers {
                        running -= 1;
                    }
                }
            }
        }
        if running == 0 || finished() {
            return ring.flush();
        }
        // Before sleeping, look for completions for a while (see idle_poll): each look also
        // hands the kernel what the tasks queued. A wake from another thread ends it too.
        let started = Instant::now();
        let window = match idle {
            IdleWait::Poll => poll.window(),
            IdleWait::Sleep => Duration::ZERO,
        };
        loop {
            if window.is_zero() || started.elapsed() >= window {
                ring.wait(true)?;
                break;
            }
            ring.wait(false)?;
            if state.any.load(Ordering::Acquire) {
                break;
            }
            std::thread::yield_now();
        }
        poll.record(started.elapsed());
    }
}
