//! One /dev/fuse queue served by read(2): its fd, the thread's executor, and the workers that
//! read, dispatch and answer requests on it. Replies always go to the fd the request came from.
//! Also the state every queue of an export shares.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::buffer::RequestBuffer;
use super::executor::{self, IdleWait, Task};
use super::idle_poll::IdlePoll;
use super::reply::reply_for;
use crate::export::{Export, Outcome};
use crate::protocol::decode::{decode, DecodeError, HaltReason};
use crate::protocol::encode::MAX_SMALL_REPLY;
use crate::sys;
use crate::sys::uring::{Persistent, Ring};

/// Why the queues stopped on their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// The request stream cannot be trusted any more.
    Halt(String),
    /// The kernel ended the connection (the mount was removed from outside).
    Disconnected,
}

/// State every queue of one export shares.
pub struct Shared {
    pub export: Export,
    stop: AtomicBool,
    stop_notify: Notify,
    /// The first reason the queues stopped by themselves, reported once.
    on_stop: Box<dyn Fn(StopCause) + Send + Sync>,
    stopped_reported: AtomicBool,
    /// Requests being served, per queue.
    pub(super) in_flight: Vec<AtomicU64>,
    /// Requests a queue has taken in (answered or not), per queue.
    pub(super) served: Vec<AtomicU64>,
    pub max_write: usize,
}

impl Shared {
    /// Shared state for a single queue (tests, fake devices).
    pub fn new(
        export: Export,
        max_write: usize,
        on_stop: Box<dyn Fn(StopCause) + Send + Sync>,
    ) -> Self {
        Self::with_queues(export, max_write, 1, on_stop)
    }

    pub fn with_queues(
        export: Export,
        max_write: usize,
        queues: usize,
        on_stop: Box<dyn Fn(StopCause) + Send + Sync>,
    ) -> Self {
        Shared {
            export,
            stop: AtomicBool::new(false),
            stop_notify: Notify::new(),
            on_stop,
            stopped_reported: AtomicBool::new(false),
            in_flight: (0..queues.max(1)).map(|_| AtomicU64::new(0)).collect(),
            served: (0..queues.max(1)).map(|_| AtomicU64::new(0)).collect(),
            max_write,
        }
    }

    /// Asks every worker of every queue to finish its current request and exit.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.stop_notify.notify_waiters();
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Resolves once a stop was requested (at once if it was already).
    pub(super) async fn until_stopped(&self) {
        let stop = self.stop_notify.notified();
        tokio::pin!(stop);
        // Registered before the flag is read: a request_stop in between still wakes us.
        stop.as_mut().enable();
        if !self.stopping() {
            stop.await;
        }
    }

    /// Requests being served right now, per queue.
    pub fn in_flight(&self) -> Vec<u64> {
        self.in_flight.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Requests each queue has taken in since the start.
    pub fn served(&self) -> Vec<u64> {
        self.served.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// This queue's in-flight and served counters.
    pub(super) fn counters(&self, queue: usize) -> (&AtomicU64, &AtomicU64) {
        let q = queue.min(self.in_flight.len() - 1);
        (&self.in_flight[q], &self.served[q])
    }

    /// Our own close is about to unmount: the connection ending now is expected, not a halt.
    pub fn begin_close(&self) {
        self.stopped_reported.store(true, Ordering::Release);
    }

    pub(super) fn stop_by_itself(&self, cause: StopCause) {
        self.request_stop();
        if !self.stopped_reported.swap(true, Ordering::AcqRel) {
            (self.on_stop)(cause);
        }
    }
}

/// Requests one queue serves concurrently; each worker owns one request buffer
/// (max_write + a page), so a queue's memory is about `WORKERS_PER_QUEUE` MiB.
pub const WORKERS_PER_QUEUE: usize = 16;

/// Runs the only queue of `shared` (see [`run_queue_at`]).
pub fn run_queue(fd: OwnedFd, shared: Arc<Shared>) -> io::Result<()> {
    run_queue_at(fd, None, shared, 0)
}

/// Runs queue number `index` on the current thread until the export stops. Returns after every
/// worker finished its last request.
///
/// `idle`: a blocking fd on the same connection (a clone). When given, a queue with nothing in
/// flight waits for its next request in a blocking `read(2)` on it instead of polling the fd
/// and reading it non-blocking. Only when the owner can wake that read on close (the wake
/// signal, see `Session::wake_idle_readers`).
///
/// The queue runs on the executor of `transport::executor` over a driven io_uring (the ring
/// polls the fd, carries the file I/O, and the executor polls it adaptively before sleeping);
/// where io_uring is unavailable, on a tokio current-thread runtime with synchronous file I/O.
pub fn run_queue_at(
    fd: OwnedFd,
    idle: Option<OwnedFd>,
    shared: Arc<Shared>,
    index: usize,
) -> io::Result<()> {
    sys::set_nonblocking(fd.as_fd(), true)?;
    if let Some(idle) = &idle {
        sys::set_nonblocking(idle.as_fd(), false)?;
    }
    let ring = match Ring::install() {
        Ok(ring) => ring,
        Err(e) => {
            log::warn!("io_uring unavailable, file I/O will block the queue: {e}");
            return run_on_tokio(fd, idle, shared, index);
        }
    };
    let result = serve_on_ring(&ring, fd, idle, &shared, index);
    drop(ring);
    Ring::uninstall();
    result
}

fn serve_on_ring(
    ring: &Rc<Ring>,
    fd: OwnedFd,
    idle: Option<OwnedFd>,
    shared: &Shared,
    index: usize,
) -> io::Result<()> {
    let slot = |what: &str| {
        ring.persistent()
            .ok_or_else(|| io::Error::other(format!("no io_uring slot to poll for {what}")))
    };
    let readiness = Readiness::Ring {
        ring: ring.clone(),
        fd,
        readable: slot("requests")?,
        writable: slot("room")?,
    };
    let intake = Intake::new(readiness, idle);
    let page = sys::page_size();
    let tasks: Vec<Task<'_>> = (0..WORKERS_PER_QUEUE)
        .map(|_| {
            let buf = RequestBuffer::new(shared.max_write, page);
            Box::pin(worker(&intake, shared, buf, index)) as Task<'_>
        })
        .collect();
    // With an idle fd the intake polls for requests itself (see `receive`); the ring then only
    // waits for file I/O.
    let idle_wait = if intake.idle.is_some() { IdleWait::Sleep } else { IdleWait::Poll };
    executor::run(ring, tasks, idle_wait, || false)
}

/// The queue on a tokio current-thread runtime, for systems without io_uring.
fn run_on_tokio(
    fd: OwnedFd,
    idle: Option<OwnedFd>,
    shared: Arc<Shared>,
    index: usize,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let intake = Rc::new(Intake::new(Readiness::Tokio(sys::async_fd(fd)?), idle));
        let page = sys::page_size();
        let mut workers = Vec::with_capacity(WORKERS_PER_QUEUE);
        for _ in 0..WORKERS_PER_QUEUE {
            let buf = RequestBuffer::new(shared.max_write, page);
            let (intake, shared) = (intake.clone(), shared.clone());
            workers.push(tokio::task::spawn_local(async move {
                worker(&intake, &shared, buf, index).await
            }));
        }
        for w in workers {
            w.await.map_err(|e| io::Error::other(format!("queue worker failed: {e}")))?;
        }
        Ok(())
    })
}

/// How a queue waits for its fd to become readable (a request) or writable (room for a reply,
/// only ever missing on a fake device's socket).
enum Readiness {
    Ring { ring: Rc<Ring>, fd: OwnedFd, readable: Persistent, writable: Persistent },
    Tokio(AsyncFd<OwnedFd>),
}

/// A queue's fd and the turn to read from it: idle workers line up on `turn`, so exactly one
/// waits for the next request instead of all of them waking for each one.
struct Intake {
    /// The non-blocking fd and how to wait for it.
    readiness: Readiness,
    /// Blocking fd for reads while nothing is in flight (see [`run_queue_at`]).
    idle: Option<OwnedFd>,
    turn: tokio::sync::Mutex<()>,
    /// Waiting for room to write a reply, one worker at a time.
    write_turn: tokio::sync::Mutex<()>,
    /// How long to look for the next request before sleeping in `idle`.
    poll: IdlePoll,
}

impl Intake {
    fn new(readiness: Readiness, idle: Option<OwnedFd>) -> Self {
        Intake {
            readiness,
            idle,
            turn: tokio::sync::Mutex::new(()),
            write_turn: tokio::sync::Mutex::new(()),
            poll: IdlePoll::default(),
        }
    }

    /// The queue's non-blocking fd.
    fn polled(&self) -> BorrowedFd<'_> {
        match &self.readiness {
            Readiness::Ring { fd, .. } => fd.as_fd(),
            Readiness::Tokio(afd) => afd.get_ref().as_fd(),
        }
    }

    /// Waits until the fd may have a request (or an error to report); the caller reads again.
    async fn readable(&self) -> io::Result<()> {
        match &self.readiness {
            Readiness::Ring { ring, readable, .. } => {
                ring.poll(readable, self.polled(), libc::POLLIN)?;
                poll_result(ring.completion(readable).await)
            }
            // ERROR too: an aborted connection never turns readable, and the read reports it.
            Readiness::Tokio(afd) => {
                afd.ready(Interest::READABLE | Interest::ERROR).await?.clear_ready();
                Ok(())
            }
        }
    }

    /// Waits until the fd may take a reply. Several workers may wait; they take turns (the ring
    /// has one poll per fd and direction).
    async fn writable(&self) -> io::Result<()> {
        let _turn = self.write_turn.lock().await;
        match &self.readiness {
            Readiness::Ring { ring, writable, .. } => {
                ring.poll(writable, self.polled(), libc::POLLOUT)?;
                poll_result(ring.completion(writable).await)
            }
            Readiness::Tokio(afd) => {
                afd.writable().await?.clear_ready();
                Ok(())
            }
        }
    }
}

fn poll_result(res: i32) -> io::Result<()> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(())
    }
}

/// Which of the intake's fds a request came from: its reply must go to the same one.
#[derive(Clone, Copy)]
enum Source {
    Polled,
    Idle,
}

/// What a read from /dev/fuse means for the queue.
pub(super) enum Received {
    Request(usize),
    /// Nothing to read now (or interrupted): try again.
    Retry,
    /// The queue must stop (the reason was reported).
    Stop,
}

pub(super) fn classify(shared: &Shared, r: io::Result<usize>) -> Received {
    match r {
        // End of stream: only a fake device's peer can close; /dev/fuse says ENODEV.
        Ok(0) => {
            shared.stop_by_itself(StopCause::Disconnected);
            Received::Stop
        }
        Ok(n) => Received::Request(n),
        Err(e) => match e.raw_os_error() {
            // Interrupted, or the request was aborted before we read it: try again.
            Some(libc::EINTR) | Some(libc::ENOENT) | Some(libc::EAGAIN) => Received::Retry,
            // The connection is gone: unmounted (by us or from outside) or aborted.
            Some(libc::ENODEV) | Some(libc::ECONNABORTED) => {
                shared.stop_by_itself(StopCause::Disconnected);
                Received::Stop
            }
            _ => {
                shared.stop_by_itself(StopCause::Halt(format!("reading /dev/fuse failed: {e}")));
                Received::Stop
            }
        },
    }
}

/// Waits for the intake's turn. `None` when the export is stopping.
async fn take_turn<'a>(
    intake: &'a Intake,
    shared: &Shared,
) -> Option<tokio::sync::MutexGuard<'a, ()>> {
    tokio::select! {
        biased;
        _ = shared.until_stopped() => None,
        t = intake.turn.lock() => Some(t),
    }
}

/// Reads one request into `buf` (the caller holds the turn). `None` when the export is stopping.
async fn receive(
    intake: &Intake,
    shared: &Shared,
    buf: &mut RequestBuffer,
    in_flight: &AtomicU64,
) -> Option<(usize, Source)> {
    loop {
        if shared.stopping() {
            return None;
        }
        // Nothing in flight on this queue: no task of this thread can make progress until a
        // request arrives, so sleeping in read(2) holds nobody up.
        if let Some(idle) = intake.idle.as_ref().filter(|_| in_flight.load(Ordering::Relaxed) == 0)
        {
            // First poll for a while (see idle_poll), yielding so that a client on this CPU runs.
            let started = Instant::now();
            let window = intake.poll.window();
            while !window.is_zero() && started.elapsed() < window {
                match classify(shared, sys::read(intake.polled(), buf.receive_area())) {
                    Received::Request(n) => {
                        intake.poll.record(started.elapsed());
                        return Some((n, Source::Polled));
                    }
                    Received::Stop => return None,
                    Received::Retry => std::thread::yield_now(),
                }
            }
            match classify(shared, sys::read(idle.as_fd(), buf.receive_area())) {
                Received::Request(n) => {
                    intake.poll.record(started.elapsed());
                    return Some((n, Source::Idle));
                }
                Received::Retry => continue,
                Received::Stop => return None,
            }
        }
        // Try the non-blocking read first: under load a request is usually waiting.
        match classify(shared, sys::read(intake.polled(), buf.receive_area())) {
            Received::Request(n) => return Some((n, Source::Polled)),
            Received::Stop => return None,
            Received::Retry => {}
        }
        let ready = tokio::select! {
            biased;
            _ = shared.until_stopped() => return None,
            r = intake.readable() => r,
        };
        if let Err(e) = ready {
            shared.stop_by_itself(StopCause::Halt(format!("polling /dev/fuse failed: {e}")));
            return None;
        }
    }
}

/// Serves requests while holding the turn as long as each one completes without waiting (the
/// null backend, page-cache reads): then one worker loops read, handle, reply, with no task
/// switch, like a blocking server. A request that has to wait (file I/O) passes the turn on to
/// the next idle worker first, and this worker gets back in line after it.
async fn worker(intake: &Intake, shared: &Shared, mut buf: RequestBuffer, queue: usize) {
    let mut small = [0u8; MAX_SMALL_REPLY];
    let (in_flight, served) = shared.counters(queue);
    while let Some(turn) = take_turn(intake, shared).await {
        let mut turn = Some(turn);
        while turn.is_some() {
            let Some((n, source)) = receive(intake, shared, &mut buf, in_flight).await else {
                return;
            };
            served.fetch_add(1, Ordering::Relaxed);
            let serving = Serving::start(in_flight);
            let serve = serve_one(intake, source, shared, &mut buf, n, &mut small, serving);
            tokio::pin!(serve);
            let first = std::future::poll_fn(|cx| Poll::Ready(serve.as_mut().poll(cx))).await;
            let keep_going = match first {
                Poll::Ready(keep_going) => keep_going,
                Poll::Pending => {
                    turn = None;
                    serve.await
                }
            };
            if !keep_going {
                return;
            }
        }
    }
}

/// One request counted in its queue's in-flight counter until this is dropped: right before its
/// reply is written (so a client that has its answer never sees it still in flight), or when
/// the request ends without one.
struct Serving<'a>(&'a AtomicU64);

impl<'a> Serving<'a> {
    fn start(in_flight: &'a AtomicU64) -> Self {
        in_flight.fetch_add(1, Ordering::Relaxed);
        Serving(in_flight)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decodes, dispatches and answers one request. Returns false when the export must halt.
async fn serve_one(
    intake: &Intake,
    source: Source,
    shared: &Shared,
    buf: &mut RequestBuffer,
    n: usize,
    small: &mut [u8; MAX_SMALL_REPLY],
    serving: Serving<'_>,
) -> bool {
    // Decode into owned scalars before the first await; the buffer is reused for the reply.
    let (unique, outcome) = match decode(buf.request(n)) {
        Ok(req) => {
            let outcome = shared.export.handle(req.header.opcode, req.op, small, buf.data()).await;
            (req.header.unique, outcome)
        }
        Err(DecodeError::Halt(reason)) => {
            halt(shared, reason);
            return false;
        }
        Err(DecodeError::Malformed { header, errno }) => (header.unique, Outcome::Error(errno)),
    };
    if let Some((header, body)) = reply_for(unique, outcome) {
        let body = body.bytes(small, buf.data());
        reply(intake, source, shared, unique, &header, body, serving).await;
    }
    true
}

fn halt(shared: &Shared, reason: HaltReason) {
    shared.stop_by_itself(StopCause::Halt(reason.to_string()));
}

/// Writes one reply to the fd its request came from.
async fn reply(
    intake: &Intake,
    source: Source,
    shared: &Shared,
    unique: u64,
    header: &[u8],
    body: &[u8],
    serving: Serving<'_>,
) {
    // Only a fake device (no idle blocking fd) can make the write below wait, so no other
    // worker can go to sleep in read(2) on the strength of this early decrement.
    drop(serving);
    let fd = match (source, &intake.idle) {
        (Source::Idle, Some(idle)) => idle.as_fd(),
        _ => intake.polled(),
    };
    loop {
        match sys::writev(fd, &[IoSlice::new(header), IoSlice::new(body)]) {
            Ok(_) => return,
            // /dev/fuse never blocks, but a fake device (a socket) can be full: wait for room.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if intake.writable().await.is_err() {
                    break;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // The request was interrupted or aborted meanwhile: nobody waits for the answer.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
            Err(e) => {
                log::warn!("cannot send the reply to request {unique}: {e}");
                break;
            }
        }
    }
    shared.export.stats.lost_replies.fetch_add(1, Ordering::Relaxed);
}
