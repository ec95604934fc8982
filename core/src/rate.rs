//! Bandwidth and dirty-rate estimators, the switchover threshold and the
//! expected downtime.
//!
//! No clock lives here: callers pass monotonic nanosecond readings in. A
//! [`RateEstimator`] keeps the last `N` samples (bytes moved over an interval)
//! and reports the rate over the newest samples that together cover at least
//! its window. Until that much time has been observed, it divides by the whole
//! window anyway, so early estimates are low rather than high.
//!
//! That is what keeps the threshold honest (docs/DESIGN.md, rule 2): a short burst
//! cannot inflate it. A 100 ms sample at twice the sustained rate moves a
//! one-second window's estimate by a tenth, not by double, and a burst at the
//! very start counts for a tenth of its rate. Underestimating the bandwidth
//! only costs rounds; overestimating it would stop the guest for longer than
//! the downtime limit allows.

use core::fmt;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The default window a rate is measured over: one second.
pub const DEFAULT_WINDOW_NS: u64 = 1_000_000_000;

/// Errors of the rate estimators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateError {
    /// A sample's interval ends before it starts.
    BackwardsInterval {
        /// Start of the interval, in nanoseconds.
        start_ns: u64,
        /// End of the interval, in nanoseconds.
        end_ns: u64,
    },
    /// A sample starts before the previous one ended: the clock went back or
    /// samples arrived out of order.
    Overlapping {
        /// Where the previous sample ended.
        previous_end_ns: u64,
        /// Where this one starts.
        start_ns: u64,
    },
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateError::BackwardsInterval { start_ns, end_ns } => write!(
                f,
                "a rate sample ends at {end_ns} ns, before it starts at {start_ns} ns"
            ),
            RateError::Overlapping {
                previous_end_ns,
                start_ns,
            } => write!(
                f,
                "a rate sample starts at {start_ns} ns, before the previous one ended at {previous_end_ns} ns"
            ),
        }
    }
}

impl core::error::Error for RateError {}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    bytes: u64,
    duration_ns: u64,
}

/// A windowed rate over the last `N` samples.
///
/// Used both for bandwidth (bytes sent while sending) and for the dirty rate
/// (bytes dirtied per round).
#[derive(Clone, Debug)]
pub struct RateEstimator<const N: usize> {
    samples: [Sample; N],
    /// Index of the next slot to write.
    next: usize,
    len: usize,
    window_ns: u64,
    last_end_ns: Option<u64>,
    total_bytes: u64,
}

impl<const N: usize> RateEstimator<N> {
    /// An estimator over a window of `window_ns` nanoseconds (at least 1).
    pub const fn new(window_ns: u64) -> Self {
        RateEstimator {
            samples: [Sample {
                bytes: 0,
                duration_ns: 0,
            }; N],
            next: 0,
            len: 0,
            window_ns: if window_ns == 0 { 1 } else { window_ns },
            last_end_ns: None,
            total_bytes: 0,
        }
    }

    /// Records `bytes` moved between `start_ns` and `end_ns`. Intervals must
    /// not go backwards or overlap; gaps between them (time spent not
    /// sending) are fine and do not count.
    pub fn record(&mut self, bytes: u64, start_ns: u64, end_ns: u64) -> Result<(), RateError> {
        if end_ns < start_ns {
            return Err(RateError::BackwardsInterval { start_ns, end_ns });
        }
        if let Some(previous_end_ns) = self.last_end_ns {
            if start_ns < previous_end_ns {
                return Err(RateError::Overlapping {
                    previous_end_ns,
                    start_ns,
                });
            }
        }
        if N == 0 {
            return Ok(());
        }
        self.last_end_ns = Some(end_ns);
        self.total_bytes = self.total_bytes.saturating_add(bytes);
        self.samples[self.next % N] = Sample {
            bytes,
            duration_ns: end_ns - start_ns,
        };
        self.next = (self.next + 1) % N;
        self.len = (self.len + 1).min(N);
        Ok(())
    }

    /// Bytes recorded since creation.
    pub const fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Time covered by the samples still held, in nanoseconds.
    pub fn observed_ns(&self) -> u64 {
        self.newest()
            .fold(0u64, |t, s| t.saturating_add(s.duration_ns))
    }

    /// True once the samples held cover at least the window.
    pub fn is_warm(&self) -> bool {
        self.observed_ns() >= self.window_ns
    }

    /// The rate in bytes per second over the newest samples that cover the
    /// window, divided by at least the window. Zero before any sample.
    pub fn bytes_per_sec(&self) -> u64 {
        let mut bytes: u128 = 0;
        let mut ns: u128 = 0;
        for s in self.newest() {
            if ns >= u128::from(self.window_ns) {
                break;
            }
            bytes += u128::from(s.bytes);
            ns += u128::from(s.duration_ns);
        }
        let ns = ns.max(u128::from(self.window_ns));
        let rate = bytes * NANOS_PER_SEC / ns;
        u64::try_from(rate).unwrap_or(u64::MAX)
    }

    /// Samples from newest to oldest.
    fn newest(&self) -> impl Iterator<Item = Sample> + '_ {
        (1..=self.len).map(move |back| self.samples[(self.next + N - back) % N])
    }
}

/// Bytes that fit in `downtime_limit_ns` at `bytes_per_sec`: the switchover
/// threshold.
pub const fn threshold(bytes_per_sec: u64, downtime_limit_ns: u64) -> u64 {
    let t = (bytes_per_sec as u128) * (downtime_limit_ns as u128) / NANOS_PER_SEC;
    if t > u64::MAX as u128 {
        u64::MAX
    } else {
        t as u64
    }
}

/// How long sending `pending` bytes takes at `bytes_per_sec`, in
/// nanoseconds; `None` when the bandwidth is not known yet (zero).
pub const fn expected_downtime_ns(pending: u64, bytes_per_sec: u64) -> Option<u64> {
    if bytes_per_sec == 0 {
        return None;
    }
    let t = (pending as u128) * NANOS_PER_SEC / (bytes_per_sec as u128);
    Some(if t > u64::MAX as u128 {
        u64::MAX
    } else {
        t as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const GB: u64 = 1_000_000_000;

    /// Feeds `count` back-to-back samples of `ms` milliseconds at `rate`
    /// bytes/s, starting at `*now`.
    fn feed<const N: usize>(
        e: &mut RateEstimator<N>,
        now: &mut u64,
        count: u32,
        ms: u64,
        rate: u64,
    ) {
        for _ in 0..count {
            let bytes = rate / 1000 * ms;
            e.record(bytes, *now, *now + ms * MS).unwrap();
            *now += ms * MS;
        }
    }

    #[test]
    fn steady_rate_is_measured() {
        let mut e = RateEstimator::<32>::new(DEFAULT_WINDOW_NS);
        let mut now = 0;
        feed(&mut e, &mut now, 20, 100, 3 * GB);
        assert!(e.is_warm());
        assert_eq!(e.bytes_per_sec(), 3 * GB);
        assert_eq!(e.total_bytes(), 6 * GB);
    }

    /// The test the design asks for: a 100 ms sample at twice the sustained
    /// rate must not double the threshold.
    #[test]
    fn short_burst_does_not_inflate_the_threshold() {
        let downtime = 300 * MS;
        let mut e = RateEstimator::<32>::new(DEFAULT_WINDOW_NS);
        let mut now = 0;
        feed(&mut e, &mut now, 20, 100, GB);
        let sustained = threshold(e.bytes_per_sec(), downtime);
        assert_eq!(sustained, 300_000_000);
        feed(&mut e, &mut now, 1, 100, 2 * GB);
        let after_burst = threshold(e.bytes_per_sec(), downtime);
        assert!(after_burst > sustained, "the burst is seen at all");
        assert!(
            after_burst <= sustained + sustained / 5,
            "a 100 ms burst moved the threshold from {sustained} to {after_burst}"
        );
    }

    /// A burst at the very start, before a window has been observed, is
    /// divided by the whole window.
    #[test]
    fn cold_start_burst_is_not_trusted() {
        let mut e = RateEstimator::<32>::new(DEFAULT_WINDOW_NS);
        let mut now = 0;
        feed(&mut e, &mut now, 1, 100, 2 * GB);
        assert!(!e.is_warm());
        assert_eq!(e.bytes_per_sec(), 2 * GB / 10);
        assert_eq!(RateEstimator::<4>::new(MS).bytes_per_sec(), 0);
    }

    /// Time between samples (not sending) does not lower the rate; old
    /// samples fall out of the window.
    #[test]
    fn gaps_do_not_count_and_old_samples_age_out() {
        let mut e = RateEstimator::<8>::new(DEFAULT_WINDOW_NS);
        let mut now = 0;
        feed(&mut e, &mut now, 10, 100, GB);
        now += 60_000 * MS;
        feed(&mut e, &mut now, 10, 100, 4 * GB);
        assert_eq!(e.bytes_per_sec(), 4 * GB / 10 * 8);
        let mut e = RateEstimator::<32>::new(DEFAULT_WINDOW_NS);
        let mut now = 0;
        feed(&mut e, &mut now, 10, 100, GB);
        now += 60_000 * MS;
        feed(&mut e, &mut now, 10, 100, 4 * GB);
        assert_eq!(e.bytes_per_sec(), 4 * GB);
    }

    #[test]
    fn bad_intervals_are_errors() {
        let mut e = RateEstimator::<4>::new(DEFAULT_WINDOW_NS);
        assert_eq!(
            e.record(1, 10, 5),
            Err(RateError::BackwardsInterval {
                start_ns: 10,
                end_ns: 5
            })
        );
        e.record(1, 10, 20).unwrap();
        assert_eq!(
            e.record(1, 15, 30),
            Err(RateError::Overlapping {
                previous_end_ns: 20,
                start_ns: 15
            })
        );
        assert_eq!(e.total_bytes(), 1);
    }

    #[test]
    fn threshold_and_downtime() {
        assert_eq!(threshold(GB, 300 * MS), 300_000_000);
        assert_eq!(threshold(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(threshold(0, 300 * MS), 0);
        assert_eq!(expected_downtime_ns(GB / 2, GB), Some(500 * MS));
        assert_eq!(expected_downtime_ns(1, 0), None);
        assert_eq!(expected_downtime_ns(u64::MAX, 1), Some(u64::MAX));
    }
}
