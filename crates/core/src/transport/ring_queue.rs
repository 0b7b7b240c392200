//! A FUSE-over-io_uring queue: one thread whose ring holds some of the kernel's per-CPU request
//! queues' entries. Each entry is served by one worker task: wait for the request the kernel
//! puts into it, decode, dispatch, write the reply into the entry, and commit it (which also
//! fetches the next request). Replies and file I/O of all workers go to the kernel together,
//! when the thread's executor next enters the ring. Requests the kernel still sends by read(2)
//! (FORGET, INTERRUPT) are served on queue 0 from the /dev/fuse fd.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use super::buffer::RequestBuffer;
use super::executor::{self, IdleWait, Task};
use super::queue::{classify, Received, Shared, StopCause};
use super::reply::{reply_for, Body};
use crate::export::Outcome;
use crate::protocol::abi::uring::{IN_OUT_HEADER_SZ, OP_IN_OUT_SZ};
use crate::protocol::decode::{decode, decode_ring, DecodeError};
use crate::protocol::encode::MAX_SMALL_REPLY;
use crate::sys;
use crate::sys::fuse_uring::{FuseEntry, FuseRequest};
use crate::sys::uring::Ring;

/// What one ring queue thread serves.
#[derive(Debug, Clone)]
pub struct RingQueuePlan {
    /// This queue's number (stats, in-flight counters).
    pub index: usize,
    /// The kernel queue (CPU) of each entry this thread registers; one worker each.
    pub entry_qids: Vec<u16>,
    /// Bytes of each entry's payload buffer (at least the kernel's `max_payload_sz`).
    pub payload_len: usize,
    /// Also serve what arrives by read(2) on the fd (one queue of the export does).
    pub serve_dev_reads: bool,
}

/// Runs one ring queue on the current thread until the export stops. `started` gets `Ok` once
/// every entry is registered, or the reason none can be.
pub fn run_ring_queue(
    fd: OwnedFd,
    shared: Arc<Shared>,
    plan: RingQueuePlan,
    started: Sender<Result<(), String>>,
) -> io::Result<()> {
    // A thread that serves one CPU's queue runs on that CPU: the requests it gets were made
    // there, so waking it needs no other CPU and the request's data is in that CPU's cache.
    if let Some(&cpu) = plan.entry_qids.first() {
        if plan.entry_qids.iter().all(|&q| q == cpu) {
            if let Err(e) = sys::pin_current_thread(cpu as usize) {
                log::warn!("cannot run queue {} on CPU {cpu}: {e}", plan.index);
            }
        }
    }
    let (ring, entries) = match register(fd, &plan) {
        Ok(r) => r,
        Err(e) => {
            let _ = started.send(Err(e));
            return Ok(());
        }
    };
    let _ = started.send(Ok(()));
    let (in_flight, served) = shared.counters(plan.index);
    let mut tasks: Vec<Task<'_>> = Vec::with_capacity(entries.len() + 2);
    for entry in entries {
        tasks.push(Box::pin(serve_entry(&ring, entry, &shared, in_flight, served)));
    }
    if plan.serve_dev_reads {
        let buf = RequestBuffer::new(shared.max_write, sys::page_size());
        tasks.push(Box::pin(serve_dev_reads(&ring, &shared, buf, in_flight, served)));
    }
    // Wakes the loop when close() or another queue asks to stop.
    tasks.push(Box::pin(shared.until_stopped()));
    let result = executor::run(&ring, tasks, IdleWait::Poll, || {
        shared.stopping() && in_flight.load(Ordering::Relaxed) == 0
    });
    Ring::uninstall();
    result
}

/// Creates this thread's driven ring, attaches `fd` and registers every entry of `plan`.
fn register(
    fd: OwnedFd,
    plan: &RingQueuePlan,
) -> Result<(std::rc::Rc<Ring>, Vec<FuseEntry>), String> {
    let ring = Ring::install().map_err(|e| format!("cannot create this queue's io_uring: {e}"))?;
    let fail = |e: String| {
        Ring::uninstall();
        e
    };
    sys::set_nonblocking(fd.as_fd(), true)
        .and_then(|()| ring.attach_fuse_device(fd))
        .map_err(|e| fail(format!("cannot attach /dev/fuse to the ring: {e}")))?;
    let mut entries = Vec::with_capacity(plan.entry_qids.len());
    for &qid in &plan.entry_qids {
        let entry = ring
            .register_fuse_entry(qid, plan.payload_len)
            .map_err(|e| fail(format!("cannot queue a FUSE ring entry: {e}")))?;
        entries.push(entry);
    }
    // Registration errors come back at once; a registered entry completes only with a request.
    ring.wait(false).map_err(|e| fail(format!("io_uring_enter failed: {e}")))?;
    for entry in &entries {
        if let Some(errno) = ring.fuse_entry_error(entry) {
            let e = io::Error::from_raw_os_error(-errno);
            return Err(fail(format!("the kernel refused a FUSE-over-io_uring entry: {e}")));
        }
    }
    Ok((ring, entries))
}

/// A command of an entry failed: the connection is gone, or the ring cannot be trusted.
fn entry_failed(shared: &Shared, errno: i32) {
    match errno {
        libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED => {
            shared.stop_by_itself(StopCause::Disconnected)
        }
        _ => shared.stop_by_itself(StopCause::Halt(format!(
            "a FUSE-over-io_uring command failed: {}",
            io::Error::from_raw_os_error(errno)
        ))),
    }
}

/// Serves the requests the kernel puts into `entry`, one after another.
async fn serve_entry(
    ring: &Ring,
    mut entry: FuseEntry,
    shared: &Shared,
    in_flight: &AtomicU64,
    served: &AtomicU64,
) {
    let mut small = [0u8; MAX_SMALL_REPLY];
    loop {
        let mut req = match ring.fuse_fetch(&mut entry).await {
            Ok(req) => req,
            Err(errno) => return entry_failed(shared, -errno),
        };
        // Stopping: leave the request with the kernel, which fails it when the connection ends.
        if shared.stopping() {
            return;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        served.fetch_add(1, Ordering::Relaxed);
        let answered = answer(&mut req, shared, &mut small).await;
        let committed = if answered { req.commit() } else { Ok(()) };
        in_flight.fetch_sub(1, Ordering::Relaxed);
        if !answered {
            return;
        }
        if let Err(e) = committed {
            shared.stop_by_itself(StopCause::Halt(format!("cannot answer a request: {e}")));
            return;
        }
    }
}

/// Decodes and handles the request in `req` and writes its reply into it. False when the
/// export must halt (nothing to commit then).
async fn answer(
    req: &mut FuseRequest<'_>,
    shared: &Shared,
    small: &mut [u8; MAX_SMALL_REPLY],
) -> bool {
    let payload_len = req.payload_len();
    let (header, payload) = req.parts();
    let in_out = &header[..IN_OUT_HEADER_SZ];
    let op_in = &header[IN_OUT_HEADER_SZ..IN_OUT_HEADER_SZ + OP_IN_OUT_SZ];
    let decoded = decode_ring(in_out, op_in, payload_len);
    let (unique, outcome) = match decoded {
        Ok(r) => {
            (r.header.unique, shared.export.handle(r.header.opcode, r.op, small, payload).await)
        }
        Err(DecodeError::Halt(reason)) => {
            shared.stop_by_itself(StopCause::Halt(reason.to_string()));
            return false;
        }
        Err(DecodeError::Malformed { header, errno }) => (header.unique, Outcome::Error(errno)),
    };
    // FORGET never comes through a ring; should anything want no reply, the entry still has
    // to be handed back, with an error.
    let outcome = match outcome {
        Outcome::NoReply => Outcome::Error(libc::ENOSYS),
        other => other,
    };
    let Some((out, body)) = reply_for(unique, outcome) else { return false };
    if let Body::Small(n) = body {
        payload[..n].copy_from_slice(&small[..n]);
    }
    req.set_reply(&out, body.len());
    true
}

/// Serves the requests that still come by read(2) on the connection (FORGET, INTERRUPT).
async fn serve_dev_reads(
    ring: &Ring,
    shared: &Shared,
    mut buf: RequestBuffer,
    in_flight: &AtomicU64,
    served: &AtomicU64,
) {
    let Some(slot) = ring.persistent() else {
        log::error!("the io_uring slot table is full; FORGET and INTERRUPT go unanswered");
        return;
    };
    let Some(fd) = ring.fuse_device() else { return };
    let mut small = [0u8; MAX_SMALL_REPLY];
    loop {
        match classify(shared, sys::read(fd, buf.receive_area())) {
            Received::Request(n) => {
                in_flight.fetch_add(1, Ordering::Relaxed);
                served.fetch_add(1, Ordering::Relaxed);
                let (unique, outcome) = match decode(buf.request(n)) {
                    Ok(r) => {
                        let out =
                            shared.export.handle(r.header.opcode, r.op, &mut small, buf.data());
                        (r.header.unique, out.await)
                    }
                    Err(DecodeError::Halt(reason)) => {
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        return shared.stop_by_itself(StopCause::Halt(reason.to_string()));
                    }
                    Err(DecodeError::Malformed { header, errno }) => {
                        (header.unique, Outcome::Error(errno))
                    }
                };
                if let Some((out, body)) = reply_for(unique, outcome) {
                    let body = body.bytes(&small, buf.data());
                    match sys::writev(fd, &[IoSlice::new(&out), IoSlice::new(body)]) {
                        // ENOENT: the request was interrupted meanwhile (or, for an INTERRUPT
                        // of a ring request, the kernel does not find it here).
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            log::warn!("cannot send the reply to request {unique}: {e}");
                            shared.export.stats.lost_replies.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Received::Retry => {
                if let Err(e) = ring.poll(&slot, fd, libc::POLLIN) {
                    return shared
                        .stop_by_itself(StopCause::Halt(format!("cannot poll /dev/fuse: {e}")));
                }
                if ring.completion(&slot).await < 0 {
                    return shared.stop_by_itself(StopCause::Disconnected);
                }
            }
            Received::Stop => return,
        }
    }
}

/// Entries per kernel queue (CPU): as many requests of one CPU as a /dev/fuse queue has
/// workers, fewer on machines with many CPUs so an export stays within [`MAX_ENTRIES`].
const ENTRIES_PER_KERNEL_QUEUE: usize = 16;
/// At most this many entries per export (each has a payload buffer of max_write bytes, only
/// touched as far as requests fill it).
const MAX_ENTRIES: usize = 64;
/// At least this many per kernel queue, so one slow request does not hold up a CPU's others.
const MIN_ENTRIES_PER_KERNEL_QUEUE: usize = 2;

/// Splits the kernel's `kernel_queues` per-CPU queues over `threads` ring threads: with no more
/// threads than queues, thread t serves the queues q with q % threads == t; with more, thread
/// t serves queue t % kernel_queues, and the threads of one queue share its entries.
pub fn plan_ring_queues(
    threads: usize,
    kernel_queues: usize,
    max_write: u32,
    page: usize,
) -> Vec<RingQueuePlan> {
    let threads = threads.max(1);
    let kernel_queues = kernel_queues.clamp(1, u16::MAX as usize);
    let per_queue =
        (MAX_ENTRIES / kernel_queues).clamp(MIN_ENTRIES_PER_KERNEL_QUEUE, ENTRIES_PER_KERNEL_QUEUE);
    // The kernel's max_payload_sz: max(FUSE_MIN_READ_BUFFER, max_write, max_pages * page).
    let page = page.max(4096);
    let payload_len = (max_write as usize)
        .div_ceil(page)
        .saturating_mul(page)
        .max(crate::protocol::abi::FUSE_MIN_READ_BUFFER);
    (0..threads)
        .map(|t| {
            let mut entry_qids = Vec::new();
            if threads <= kernel_queues {
                for q in (t..kernel_queues).step_by(threads) {
                    entry_qids.extend(std::iter::repeat_n(q as u16, per_queue));
                }
            } else {
                let q = t % kernel_queues;
                let sharing = (q..threads).step_by(kernel_queues).count();
                entry_qids.extend(std::iter::repeat_n(q as u16, per_queue.div_ceil(sharing)));
            }
            RingQueuePlan { index: t, entry_qids, payload_len, serve_dev_reads: t == 0 }
        })
        .collect()
}

/// The number of CPUs in a kernel CPU list such as `0-3,5,8-9`; `None` if it is not one.
pub fn count_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count += hi.checked_sub(lo)? + 1;
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,5,8-9"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    fn qids(plans: &[RingQueuePlan]) -> Vec<Vec<u16>> {
        plans.iter().map(|p| p.entry_qids.clone()).collect()
    }

    #[test]
    fn one_thread_serves_every_cpu() {
        let plans = plan_ring_queues(1, 2, 1 << 20, 4096);
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].entry_qids.len(), 32);
        assert_eq!(plans[0].entry_qids.iter().filter(|&&q| q == 1).count(), 16);
        assert!(plans[0].serve_dev_reads);
        assert_eq!(plans[0].payload_len, 1 << 20);
    }

    #[test]
    fn threads_split_the_cpus_and_share_when_more() {
        let two = plan_ring_queues(2, 4, 1 << 20, 4096);
        assert_eq!(qids(&two)[0].iter().filter(|&&q| q == 0).count(), 16);
        assert_eq!(qids(&two)[0].iter().filter(|&&q| q == 2).count(), 16);
        assert_eq!(qids(&two)[1].iter().filter(|&&q| q == 3).count(), 16);
        assert!(!two[1].serve_dev_reads);
        // 4 threads on 2 CPUs: two threads per CPU queue, 8 entries each.
        let four = plan_ring_queues(4, 2, 1 << 20, 4096);
        assert_eq!(qids(&four), vec![vec![0; 8], vec![1; 8], vec![0; 8], vec![1; 8]]);
    }

    #[test]
    fn many_cpus_keep_the_export_bounded() {
        let plans = plan_ring_queues(1, 64, 1 << 20, 4096);
        assert_eq!(plans[0].entry_qids.len(), 64 * MIN_ENTRIES_PER_KERNEL_QUEUE);
        let plans = plan_ring_queues(1, 8, 1 << 20, 4096);
        assert_eq!(plans[0].entry_qids.len(), MAX_ENTRIES);
        // Small max_write still meets the kernel's minimum payload buffer.
        assert_eq!(plan_ring_queues(1, 1, 4096, 4096)[0].payload_len, 8192);
    }
}
