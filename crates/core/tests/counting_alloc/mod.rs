//! The global allocator of the allocation-free tests: defers every call to the system allocator
//! and counts the allocations of the threads its predicate picks (the queue threads): all of
//! them, and those made while [`MEASURING`] is set.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub static MEASURING: AtomicBool = AtomicBool::new(false);
/// Queue-thread allocations while measuring.
pub static QUEUE_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Every queue-thread allocation, measured or not: proves the counter sees those threads.
pub static QUEUE_ALLOCATIONS_EVER: AtomicU64 = AtomicU64::new(0);

pub struct Counting {
    /// Whether the calling thread is one to count; must not allocate.
    pub is_queue_thread: fn() -> bool,
}

impl Counting {
    fn note(&self) {
        if (self.is_queue_thread)() {
            QUEUE_ALLOCATIONS_EVER.fetch_add(1, Ordering::Relaxed);
            if MEASURING.load(Ordering::Relaxed) {
                QUEUE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// SAFETY: defers every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
