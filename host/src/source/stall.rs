//! A stalled destination on the source side: a sender blocked in a send to
//! a peer that stopped reading would wait until TCP gives up. The watchdog
//! here bounds that wait: when no send has made progress for the bound while
//! one is in progress, it shuts the bulk sockets down, which fails the
//! blocked sends, and the migration fails as a stall (before the pause, the
//! guest never stopped; during the stop-and-copy, it resumes here).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::link::Conn;
use crate::migration::monotonic_ns;

/// What the sender threads report and the watchdog reads.
#[derive(Debug, Default)]
pub(super) struct SendProgress {
    /// Sends (or flushes) in progress.
    busy: AtomicU32,
    /// When a send last began or ended (monotonic ns).
    last: AtomicU64,
    fired: AtomicBool,
    done: AtomicBool,
}

impl SendProgress {
    /// Runs `send`, telling the watchdog it is in progress.
    pub fn during<T>(&self, send: impl FnOnce() -> T) -> T {
        self.last.fetch_max(monotonic_ns(), Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::AcqRel);
        let r = send();
        self.busy.fetch_sub(1, Ordering::AcqRel);
        self.last.fetch_max(monotonic_ns(), Ordering::Relaxed);
        r
    }

    /// Whether the watchdog found a stall.
    pub fn stalled(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Ends the watchdog.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// Runs until [`Self::finish`]: wakes every sender through `wakers`
    /// once a send has been stuck for `bound`.
    pub fn watch(&self, bound: Duration, wakers: &[Conn]) {
        let bound_ns = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        while !self.done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            let busy = self.busy.load(Ordering::Acquire) > 0;
            let since = monotonic_ns().saturating_sub(self.last.load(Ordering::Relaxed));
            if busy && since >= bound_ns {
                self.fired.store(true, Ordering::Release);
                for w in wakers {
                    let _ = w.shutdown();
                }
                return;
            }
        }
    }
}
