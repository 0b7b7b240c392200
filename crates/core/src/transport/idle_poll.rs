//! Adaptive polling before an idle queue sleeps, as QEMU's AioContext does (`poll-max-ns`): a
//! queue whose next request usually comes within a few microseconds of the last reply (a client
//! at queue depth 1) looks for it with non-blocking reads for a while before sleeping in
//! read(2). Sleeping costs two wake-ups per request, and waking a halted (virtual) CPU costs far
//! more than the polling does. The window adapts to how long the queue really waits, so a queue
//! whose clients pause does not burn CPU.

use std::cell::Cell;
use std::time::Duration;

/// Longest window: twice QEMU's default `poll-max-ns`, because on the benchmark VM a client's
/// next request at depth 1 comes 35-45 µs after the reply when the queue sleeps (two wake-ups of
/// a halted vCPU), which a 32 µs window would never reach, so it would shrink to nothing.
pub const POLL_MAX: Duration = Duration::from_micros(64);
/// The window a growing queue starts from.
const POLL_START: Duration = Duration::from_micros(4);

/// One queue's polling window.
#[derive(Debug, Default)]
pub struct IdlePoll {
    window: Cell<Duration>,
}

impl IdlePoll {
    /// How long to poll before sleeping.
    pub fn window(&self) -> Duration {
        self.window.get()
    }

    /// Adjusts the window after the queue waited `waited` (polling included) for a request:
    /// within the window, it is right; longer than [`POLL_MAX`], polling would not have caught
    /// it, so halve the window (down to none); in between, double it (up to [`POLL_MAX`]).
    pub fn record(&self, waited: Duration) {
        let w = self.window.get();
        let next = if waited <= w {
            w
        } else if waited > POLL_MAX {
            let half = w / 2;
            if half < POLL_START {
                Duration::ZERO
            } else {
                half
            }
        } else if w.is_zero() {
            POLL_START
        } else {
            (w * 2).min(POLL_MAX)
        };
        self.window.set(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn grows_while_requests_come_soon_and_stays_in_the_sweet_spot() {
        let p = IdlePoll::default();
        assert_eq!(p.window(), Duration::ZERO, "no polling before anything is known");
        for expected in [4, 8, 16, 32, 32] {
            p.record(20 * US);
            assert_eq!(p.window(), expected * US);
        }
        // A wait the window does not cover yet (but polling could) grows it to the maximum.
        p.record(50 * US);
        assert_eq!(p.window(), POLL_MAX);
        // Caught within the window: unchanged.
        p.record(10 * US);
        assert_eq!(p.window(), POLL_MAX);
    }

    #[test]
    fn shrinks_to_nothing_when_the_queue_really_idles() {
        let p = IdlePoll::default();
        for _ in 0..5 {
            p.record(50 * US);
        }
        assert_eq!(p.window(), POLL_MAX);
        for expected in [32, 16, 8, 4, 0, 0] {
            p.record(Duration::from_millis(5));
            assert_eq!(p.window(), expected * US);
        }
    }
}
