//! Pending bytes: how much each migratable section still has to send.
//!
//! Every section (RAM, device state, postcopy-only data such as a snapshot dirty
//! bitmap) reports its remainder in three classes — see docs/DESIGN.md, "Pending
//! classes":
//!
//! - `precopy_only`: must reach the destination before the guest starts there;
//! - `compatible`: may move before or after switchover;
//! - `postcopy_only`: may move only after switchover, and never shrinks during
//!   precopy.
//!
//! A section gives a cheap [`Section::estimate`] (counters) and an
//! [`Section::exact`] figure that may re-sync dirty logs. [`Sections::query`]
//! asks for the exact figure only when the estimate says the remainder fits
//! under the threshold, as the migration loop should.

use core::fmt;
use core::ops::{Add, AddAssign};

/// Pending bytes in the three classes. Sums saturate instead of overflowing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pending {
    /// Bytes that must arrive before the guest may start on the destination.
    pub precopy_only: u64,
    /// Bytes that may move before or after switchover.
    pub compatible: u64,
    /// Bytes that may move only after switchover.
    pub postcopy_only: u64,
}

impl Pending {
    /// Nothing pending.
    pub const ZERO: Pending = Pending {
        precopy_only: 0,
        compatible: 0,
        postcopy_only: 0,
    };

    /// A remainder made of the three classes.
    pub const fn new(precopy_only: u64, compatible: u64, postcopy_only: u64) -> Pending {
        Pending {
            precopy_only,
            compatible,
            postcopy_only,
        }
    }

    /// All three classes together (saturating).
    pub const fn total(&self) -> u64 {
        self.precopy_only
            .saturating_add(self.compatible)
            .saturating_add(self.postcopy_only)
    }

    /// What could still move before switchover: `precopy_only + compatible`
    /// (saturating).
    pub const fn before_switchover(&self) -> u64 {
        self.precopy_only.saturating_add(self.compatible)
    }

    /// True when nothing at all is pending.
    pub const fn is_empty(&self) -> bool {
        self.precopy_only == 0 && self.compatible == 0 && self.postcopy_only == 0
    }

    /// The class-wise saturating sum of two remainders.
    pub const fn saturating_add(self, other: Pending) -> Pending {
        Pending {
            precopy_only: self.precopy_only.saturating_add(other.precopy_only),
            compatible: self.compatible.saturating_add(other.compatible),
            postcopy_only: self.postcopy_only.saturating_add(other.postcopy_only),
        }
    }
}

impl Add for Pending {
    type Output = Pending;

    fn add(self, rhs: Pending) -> Pending {
        self.saturating_add(rhs)
    }
}

impl AddAssign for Pending {
    fn add_assign(&mut self, rhs: Pending) {
        *self = self.saturating_add(rhs);
    }
}

/// One piece of migratable state, as the migration loop sees it.
///
/// All sections in one [`Sections`] set share an error type, typically the
/// embedding host's error for a failed dirty-log sync.
pub trait Section {
    /// What `exact` can fail with.
    type Error;

    /// A short name for reports and errors, e.g. `"ram"` or `"vcpu"`.
    fn name(&self) -> &str;

    /// A cheap estimate of what is pending, from counters. Must not block.
    fn estimate(&self) -> Pending;

    /// The exact figure; may re-sync dirty logs and so cost a system call or
    /// a scan. The migration asks for it only when the estimate fits under the
    /// threshold.
    fn exact(&mut self) -> Result<Pending, Self::Error>;
}

/// Errors of the pending accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingError {
    /// A section was added to a set that is already full.
    TooManySections {
        /// How many sections the set holds at most.
        capacity: usize,
    },
}

impl fmt::Display for PendingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingError::TooManySections { capacity } => write!(
                f,
                "cannot add another migratable section: the set holds at most {capacity}"
            ),
        }
    }
}

impl core::error::Error for PendingError {}

/// What [`Sections::query`] found: the remainder and whether it is the exact
/// figure or only the estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// The summed remainder of every section.
    pub pending: Pending,
    /// True when every section was asked for its exact figure.
    pub exact: bool,
}

/// A fixed-capacity set of sections whose remainders are summed.
///
/// Holds borrowed trait objects so that sections of different types live side
/// by side without allocation.
pub struct Sections<'a, E, const N: usize> {
    items: heapless::Vec<&'a mut dyn Section<Error = E>, N>,
}

impl<'a, E, const N: usize> Default for Sections<'a, E, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a, E, const N: usize> Sections<'a, E, N> {
    /// An empty set.
    pub const fn new() -> Self {
        Sections {
            items: heapless::Vec::new(),
        }
    }

    /// Adds a section. Fails, leaving the set unchanged, when it is full.
    pub fn add(&mut self, section: &'a mut dyn Section<Error = E>) -> Result<(), PendingError> {
        self.items
            .push(section)
            .map_err(|_| PendingError::TooManySections { capacity: N })
    }

    /// How many sections the set holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when the set holds no section.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The sum of every section's estimate.
    pub fn estimate(&self) -> Pending {
        self.items
            .iter()
            .fold(Pending::ZERO, |sum, s| sum + s.estimate())
    }

    /// The sum of every section's exact figure; stops at the first error.
    pub fn exact(&mut self) -> Result<Pending, E> {
        let mut sum = Pending::ZERO;
        for s in self.items.iter_mut() {
            sum += s.exact()?;
        }
        Ok(sum)
    }

    /// The remainder the migration loop should decide on: the estimate, or the
    /// exact figure when the estimate's total fits under `threshold`.
    pub fn query(&mut self, threshold: u64) -> Result<Query, E> {
        let estimate = self.estimate();
        if estimate.total() <= threshold {
            Ok(Query {
                pending: self.exact()?,
                exact: true,
            })
        } else {
            Ok(Query {
                pending: estimate,
                exact: false,
            })
        }
    }

    /// Each section's name and estimate, for reports.
    pub fn each_estimate(&self) -> impl Iterator<Item = (&str, Pending)> + use<'_, 'a, E, N> {
        self.items.iter().map(|s| (s.name(), s.estimate()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        name: &'static str,
        estimate: Pending,
        exact: Pending,
        exact_calls: u32,
        fail: bool,
    }

    impl Fake {
        fn new(name: &'static str, estimate: Pending, exact: Pending) -> Fake {
            Fake {
                name,
                estimate,
                exact,
                exact_calls: 0,
                fail: false,
            }
        }
    }

    #[derive(Debug, PartialEq)]
    struct SyncFailed(&'static str);

    impl Section for Fake {
        type Error = SyncFailed;
        fn name(&self) -> &str {
            self.name
        }
        fn estimate(&self) -> Pending {
            self.estimate
        }
        fn exact(&mut self) -> Result<Pending, SyncFailed> {
            self.exact_calls += 1;
            if self.fail {
                Err(SyncFailed(self.name))
            } else {
                Ok(self.exact)
            }
        }
    }

    #[test]
    fn sums_saturate() {
        let a = Pending::new(u64::MAX - 1, 5, 0);
        let b = Pending::new(10, u64::MAX, 3);
        let s = a + b;
        assert_eq!(s, Pending::new(u64::MAX, u64::MAX, 3));
        assert_eq!(s.total(), u64::MAX);
        assert_eq!(Pending::new(1, 2, 3).total(), 6);
        assert_eq!(Pending::new(1, 2, 3).before_switchover(), 3);
        assert!(Pending::ZERO.is_empty());
        assert!(!Pending::new(0, 0, 1).is_empty());
    }

    #[test]
    fn set_sums_estimates_and_exact() {
        let mut ram = Fake::new("ram", Pending::new(0, 100, 0), Pending::new(0, 80, 0));
        let mut dev = Fake::new("dev", Pending::new(7, 0, 0), Pending::new(7, 0, 0));
        let mut bmp = Fake::new("bitmap", Pending::new(0, 0, 50), Pending::new(0, 0, 50));
        let mut set: Sections<'_, SyncFailed, 4> = Sections::new();
        set.add(&mut ram).unwrap();
        set.add(&mut dev).unwrap();
        set.add(&mut bmp).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.estimate(), Pending::new(7, 100, 50));
        assert_eq!(set.exact(), Ok(Pending::new(7, 80, 50)));
        let names: heapless::Vec<&str, 4> = set.each_estimate().map(|(n, _)| n).collect();
        assert_eq!(names.as_slice(), &["ram", "dev", "bitmap"]);
    }

    #[test]
    fn query_asks_exact_only_when_estimate_fits() {
        let mut ram = Fake::new("ram", Pending::new(0, 1000, 0), Pending::new(0, 900, 0));
        {
            let mut set: Sections<'_, SyncFailed, 2> = Sections::new();
            set.add(&mut ram).unwrap();
            let q = set.query(999).unwrap();
            assert_eq!(
                q,
                Query {
                    pending: Pending::new(0, 1000, 0),
                    exact: false
                }
            );
            let q = set.query(1000).unwrap();
            assert_eq!(
                q,
                Query {
                    pending: Pending::new(0, 900, 0),
                    exact: true
                }
            );
        }
        assert_eq!(ram.exact_calls, 1);
    }

    #[test]
    fn exact_error_names_the_section() {
        let mut ok = Fake::new("ok", Pending::ZERO, Pending::ZERO);
        let mut bad = Fake::new("bad", Pending::ZERO, Pending::ZERO);
        bad.fail = true;
        let mut set: Sections<'_, SyncFailed, 2> = Sections::new();
        set.add(&mut ok).unwrap();
        set.add(&mut bad).unwrap();
        assert_eq!(set.exact(), Err(SyncFailed("bad")));
        assert_eq!(set.query(0), Err(SyncFailed("bad")));
    }

    #[test]
    fn too_many_sections_is_an_error() {
        let mut a = Fake::new("a", Pending::ZERO, Pending::ZERO);
        let mut b = Fake::new("b", Pending::ZERO, Pending::ZERO);
        let mut set: Sections<'_, SyncFailed, 1> = Sections::new();
        set.add(&mut a).unwrap();
        let err = set.add(&mut b).err();
        assert_eq!(err, Some(PendingError::TooManySections { capacity: 1 }));
        assert_eq!(set.len(), 1);
    }
}
