//! The switchover decision: iterate, complete, or switch over.
//!
//! One pure function, [`decide`], implements docs/DESIGN.md "The switchover
//! decision". The rules apply in order and the first that holds decides:
//!
//! 1. **In postcopy**: iterate until nothing is pending, then complete.
//! 2. **Stop-and-copy**: the destination is ready, everything pending (all three
//!    classes) fits under the threshold, and another round would not pay — the
//!    remainder did not at least halve over the last round, or it is already at
//!    or below a small floor. Complete; postcopy-only data goes in the downtime
//!    too. The threshold is a ceiling, never a budget: while rounds still halve
//!    the remainder, iterate, so an idle guest stops for milliseconds.
//! 3. **Postcopy RAM**: only when the operator asked (`start_postcopy`), the
//!    `postcopy_ram` capability is on, the destination is ready and
//!    `precopy_only <= threshold`. Never on Ferry's own initiative. Asking
//!    without the capability is an error ([`PolicyError`]), checked before any
//!    rule.
//! 4. **Postcopy-only sections**: with `postcopy_only_sections` on, when only
//!    postcopy-only data keeps the total above the threshold
//!    (`precopy_only + compatible <= threshold < total`) and another round of RAM
//!    would not pay (the same test as rule 2, applied to
//!    `precopy_only + compatible`), switch over with `ram_postcopy = false`: RAM
//!    and device state complete inside the downtime exactly as a stop-and-copy
//!    would, and the postcopy-only sections stream afterwards.
//! 5. Otherwise **iterate**.
//!
//! "Fits under the threshold" means `<= threshold` throughout.

use core::fmt;

use crate::pending::Pending;

/// Capabilities negotiated with the destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// RAM may be switched to postcopy, when the operator asks.
    pub postcopy_ram: bool,
    /// Postcopy-only sections (e.g. a snapshot dirty bitmap) move after
    /// switchover, with RAM completing in the downtime.
    pub postcopy_only_sections: bool,
}

/// Everything the decision depends on. Plain data, no clock, no I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// What is pending now, summed over every section.
    pub pending: Pending,
    /// What was pending at the previous decision, if there was one. Used to
    /// tell whether the last round at least halved the remainder.
    pub previous: Option<Pending>,
    /// Bytes that fit in the downtime limit: bandwidth × downtime limit.
    pub threshold: u64,
    /// A remainder at or below this many bytes is not worth another round.
    pub floor: u64,
    /// Negotiated capabilities.
    pub caps: Capabilities,
    /// The operator asked to switch RAM to postcopy.
    pub start_postcopy: bool,
    /// The migration is already in postcopy (the guest runs on the destination).
    pub in_postcopy: bool,
    /// The destination is ready to take the switchover.
    pub can_switchover: bool,
}

/// What the migration loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Run another round.
    Iterate,
    /// Finish: a stop-and-copy before postcopy, or the end of postcopy.
    Complete,
    /// Stop the source and start the guest on the destination, with more data
    /// following. `ram_postcopy` says whether RAM pages may still be missing
    /// on the destination (postcopy RAM) or RAM completes in the downtime and
    /// only postcopy-only sections follow.
    Switchover {
        /// RAM pages may be missing on the destination and fetched on fault.
        ram_postcopy: bool,
    },
}

/// Inputs that no decision can honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The operator asked for postcopy, but the `postcopy_ram` capability was
    /// not negotiated.
    PostcopyNotNegotiated,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::PostcopyNotNegotiated => f.write_str(
                "postcopy was requested but the postcopy-ram capability was not negotiated",
            ),
        }
    }
}

impl core::error::Error for PolicyError {}

/// True when another round over `now` would not pay: it is at or below the
/// floor, or the last round did not at least halve it (`prev` is what it was
/// before that round). With no previous round, only the floor counts.
pub const fn round_would_not_pay(now: u64, prev: Option<u64>, floor: u64) -> bool {
    if now <= floor {
        return true;
    }
    match prev {
        // Halved means now <= prev / 2, i.e. 2 * now <= prev, without rounding.
        Some(prev) => (now as u128) * 2 > prev as u128,
        None => false,
    }
}

/// The switchover decision. See the module documentation for the rules.
pub fn decide(inputs: &Inputs) -> Result<Decision, PolicyError> {
    let Inputs {
        pending,
        previous,
        threshold,
        floor,
        caps,
        start_postcopy,
        in_postcopy,
        can_switchover,
    } = *inputs;

    if start_postcopy && !caps.postcopy_ram {
        return Err(PolicyError::PostcopyNotNegotiated);
    }

    // Rule 1.
    if in_postcopy {
        return Ok(if pending.is_empty() {
            Decision::Complete
        } else {
            Decision::Iterate
        });
    }

    if !can_switchover {
        return Ok(Decision::Iterate);
    }

    // Rule 2.
    let total = pending.total();
    if total <= threshold && round_would_not_pay(total, previous.map(|p| p.total()), floor) {
        return Ok(Decision::Complete);
    }

    // Rule 3.
    if start_postcopy && pending.precopy_only <= threshold {
        return Ok(Decision::Switchover { ram_postcopy: true });
    }

    // Rule 4.
    let ram = pending.before_switchover();
    if caps.postcopy_only_sections
        && ram <= threshold
        && total > threshold
        && round_would_not_pay(ram, previous.map(|p| p.before_switchover()), floor)
    {
        return Ok(Decision::Switchover {
            ram_postcopy: false,
        });
    }

    // Rule 5.
    Ok(Decision::Iterate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1000;
    const FLOOR: u64 = 10;

    fn inputs(pending: Pending) -> Inputs {
        Inputs {
            pending,
            previous: None,
            threshold: T,
            floor: FLOOR,
            caps: Capabilities::default(),
            start_postcopy: false,
            in_postcopy: false,
            can_switchover: true,
        }
    }

    /// Runs the decision once per round with the remainders given, as the
    /// migration loop would, and returns the first decision that is not
    /// `Iterate` with its round number.
    fn run(mut base: Inputs, rounds: &[Pending]) -> Option<(usize, Result<Decision, PolicyError>)> {
        let mut previous = None;
        for (i, p) in rounds.iter().enumerate() {
            base.pending = *p;
            base.previous = previous;
            let d = decide(&base);
            if d != Ok(Decision::Iterate) {
                return Some((i, d));
            }
            previous = Some(*p);
        }
        None
    }

    // ---- The thread's scenarios, one readable test each. ----

    /// RAM alone, postcopy off: RAM is precopy-only. It iterates while rounds
    /// halve the remainder, then completes by stop-and-copy.
    #[test]
    fn ram_alone_completes_by_stop_and_copy_once_rounds_stop_paying() {
        let ram = |b| Pending::new(b, 0, 0);
        let rounds = [ram(100_000), ram(20_000), ram(900), ram(300), ram(200)];
        // 900 fits but halved 20_000: iterate. 300 halved 900: iterate.
        // 200 did not halve 300: complete.
        assert_eq!(
            run(inputs(Pending::ZERO), &rounds),
            Some((4, Ok(Decision::Complete)))
        );
    }

    /// The limit is a ceiling, not a budget: an idle guest whose remainder
    /// drops to the floor stops at once, with far less than the threshold.
    #[test]
    fn idle_guest_stops_at_the_floor_not_at_the_threshold() {
        let rounds = [
            Pending::new(1_000_000, 0, 0),
            Pending::new(800, 0, 0),
            Pending::new(4, 0, 0),
        ];
        assert_eq!(
            run(inputs(Pending::ZERO), &rounds),
            Some((2, Ok(Decision::Complete)))
        );
    }

    /// RAM with the postcopy-ram capability but no operator start: RAM is
    /// `compatible`, and it must complete by stop-and-copy — never postcopy.
    #[test]
    fn postcopy_capability_without_operator_start_completes_by_stop_and_copy() {
        let mut base = inputs(Pending::ZERO);
        base.caps.postcopy_ram = true;
        let rounds = [
            Pending::new(50, 100_000, 0),
            Pending::new(50, 5_000, 0),
            Pending::new(50, 700, 0),
            Pending::new(50, 600, 0),
        ];
        assert_eq!(run(base, &rounds), Some((3, Ok(Decision::Complete))));
        // And if it never converges, it iterates forever rather than switching.
        let stuck = [Pending::new(50, 5_000, 0); 8];
        assert_eq!(run(base, &stuck), None);
    }

    /// With the operator's start, RAM switches to postcopy once the
    /// precopy-only part fits.
    #[test]
    fn operator_start_switches_ram_to_postcopy() {
        let mut base = inputs(Pending::new(2_000, 1_000_000, 0));
        base.caps.postcopy_ram = true;
        base.start_postcopy = true;
        assert_eq!(decide(&base), Ok(Decision::Iterate));
        base.pending.precopy_only = T;
        assert_eq!(
            decide(&base),
            Ok(Decision::Switchover { ram_postcopy: true })
        );
        base.can_switchover = false;
        assert_eq!(decide(&base), Ok(Decision::Iterate));
    }

    /// RAM plus postcopy-only data, capability on: once RAM fits and stops
    /// shrinking, switch over with RAM completing in the downtime; the bitmap
    /// follows after the guest resumes.
    #[test]
    fn ram_plus_postcopy_only_data_switches_with_ram_in_the_downtime() {
        let mut base = inputs(Pending::ZERO);
        base.caps.postcopy_only_sections = true;
        let bitmap = 64_000;
        let rounds = [
            Pending::new(100_000, 0, bitmap),
            Pending::new(900, 0, bitmap),
            Pending::new(400, 0, bitmap),
            Pending::new(300, 0, bitmap),
        ];
        assert_eq!(
            run(base, &rounds),
            Some((
                3,
                Ok(Decision::Switchover {
                    ram_postcopy: false
                })
            ))
        );
        // Without the capability the same migration never completes: the
        // classic rule counts the bitmap against the threshold.
        base.caps.postcopy_only_sections = false;
        assert_eq!(run(base, &rounds), None);
    }

    /// Postcopy-only data alone: it goes in the downtime when it fits, and
    /// after switchover when it does not (with the capability).
    #[test]
    fn postcopy_only_data_alone() {
        let mut base = inputs(Pending::new(0, 0, 500));
        base.previous = Some(Pending::new(0, 0, 500));
        assert_eq!(decide(&base), Ok(Decision::Complete));
        base.pending.postcopy_only = 5_000;
        base.previous = Some(base.pending);
        assert_eq!(decide(&base), Ok(Decision::Iterate));
        base.caps.postcopy_only_sections = true;
        assert_eq!(
            decide(&base),
            Ok(Decision::Switchover {
                ram_postcopy: false
            })
        );
    }

    /// Operator start without the capability is an error, not a no-op.
    #[test]
    fn operator_start_without_capability_is_an_error() {
        let mut base = inputs(Pending::new(0, 0, 0));
        base.start_postcopy = true;
        assert_eq!(decide(&base), Err(PolicyError::PostcopyNotNegotiated));
        base.caps.postcopy_only_sections = true;
        assert_eq!(decide(&base), Err(PolicyError::PostcopyNotNegotiated));
    }

    /// In postcopy: iterate until nothing is pending, then complete —
    /// whatever the threshold or the destination says.
    #[test]
    fn in_postcopy_runs_until_empty() {
        let mut base = inputs(Pending::new(0, 1, 0));
        base.in_postcopy = true;
        base.caps.postcopy_ram = true;
        base.threshold = u64::MAX;
        assert_eq!(decide(&base), Ok(Decision::Iterate));
        base.pending = Pending::ZERO;
        base.can_switchover = false;
        assert_eq!(decide(&base), Ok(Decision::Complete));
    }

    #[test]
    fn halving_and_floor() {
        assert!(round_would_not_pay(10, None, 10));
        assert!(!round_would_not_pay(11, None, 10));
        assert!(!round_would_not_pay(50, Some(100), 0)); // exactly halved
        assert!(round_would_not_pay(51, Some(100), 0));
        assert!(round_would_not_pay(u64::MAX, Some(u64::MAX), 0));
        assert!(!round_would_not_pay(u64::MAX / 2, Some(u64::MAX), 0));
    }

    // ---- The exhaustive grid. ----

    const VALUES: [u64; 7] = [0, 1, FLOOR + 1, T / 2, T - 1, T, T + 1];

    #[derive(Clone, Copy)]
    enum Prev {
        None,
        Halved,
        Stalled,
    }

    fn previous_for(p: Pending, prev: Prev) -> Option<Pending> {
        match prev {
            Prev::None => None,
            Prev::Halved => Some(Pending::new(
                p.precopy_only.saturating_mul(2),
                p.compatible.saturating_mul(2),
                p.postcopy_only,
            )),
            Prev::Stalled => Some(p),
        }
    }

    /// Every combination of the five booleans, every class at 0, just above
    /// the floor, half, just below, at and just above the threshold, with a
    /// previous round that halved, stalled or did not exist; each outcome is
    /// checked against the rule that must have produced it, and each rule's
    /// precondition is checked to produce its outcome.
    #[test]
    fn exhaustive_grid() {
        let mut checked = 0u32;
        for bits in 0u8..32 {
            let caps = Capabilities {
                postcopy_ram: bits & 1 != 0,
                postcopy_only_sections: bits & 2 != 0,
            };
            let start_postcopy = bits & 4 != 0;
            let in_postcopy = bits & 8 != 0;
            let can_switchover = bits & 16 != 0;
            for &pre in &VALUES {
                for &compat in &VALUES {
                    for &post in &VALUES {
                        for prev in [Prev::None, Prev::Halved, Prev::Stalled] {
                            let pending = Pending::new(pre, compat, post);
                            let i = Inputs {
                                pending,
                                previous: previous_for(pending, prev),
                                threshold: T,
                                floor: FLOOR,
                                caps,
                                start_postcopy,
                                in_postcopy,
                                can_switchover,
                            };
                            check_rules(&i, decide(&i));
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 32 * 7 * 7 * 7 * 3);
    }

    fn check_rules(i: &Inputs, d: Result<Decision, PolicyError>) {
        let p = i.pending;
        let total = p.total();
        let ram = p.before_switchover();
        let prev_total = i.previous.map(|q| q.total());
        let prev_ram = i.previous.map(|q| q.before_switchover());
        let no_pay_total = round_would_not_pay(total, prev_total, i.floor);
        let no_pay_ram = round_would_not_pay(ram, prev_ram, i.floor);
        let ctx = (i, d);

        // The error comes first and only from a start without the capability.
        if i.start_postcopy && !i.caps.postcopy_ram {
            assert_eq!(d, Err(PolicyError::PostcopyNotNegotiated), "{ctx:?}");
            return;
        }
        let Ok(d) = d else {
            panic!("unexpected error: {ctx:?}");
        };

        // Rule 1.
        if i.in_postcopy {
            let want = if p.is_empty() {
                Decision::Complete
            } else {
                Decision::Iterate
            };
            assert_eq!(d, want, "rule 1: {ctx:?}");
            return;
        }

        // Rules 2-4 need the destination ready.
        if !i.can_switchover {
            assert_eq!(d, Decision::Iterate, "not ready: {ctx:?}");
            return;
        }

        let rule2 = total <= i.threshold && no_pay_total;
        let rule3 = i.start_postcopy && i.caps.postcopy_ram && p.precopy_only <= i.threshold;
        let rule4 = i.caps.postcopy_only_sections
            && ram <= i.threshold
            && total > i.threshold
            && no_pay_ram;

        match d {
            Decision::Complete => {
                assert!(rule2, "completed without rule 2: {ctx:?}");
                // The ceiling: never stop with more than the threshold.
                assert!(total <= i.threshold, "{ctx:?}");
            }
            Decision::Switchover { ram_postcopy: true } => {
                assert!(!rule2 && rule3, "postcopy without rule 3: {ctx:?}");
                // Never on our own initiative.
                assert!(i.start_postcopy, "{ctx:?}");
            }
            Decision::Switchover {
                ram_postcopy: false,
            } => {
                assert!(!rule2 && !rule3 && rule4, "rule 4 misapplied: {ctx:?}");
                assert!(p.postcopy_only > 0 && ram <= i.threshold, "{ctx:?}");
            }
            Decision::Iterate => {
                assert!(
                    !rule2 && !rule3 && !rule4,
                    "iterated when a rule held: {ctx:?}"
                );
            }
        }

        // Classic behaviour without the postcopy-only capability and without
        // an operator start: only iterate or complete.
        if !i.caps.postcopy_only_sections && !i.start_postcopy {
            assert!(
                matches!(d, Decision::Iterate | Decision::Complete),
                "{ctx:?}"
            );
        }
    }
}
