//! What `ferry send` and `ferry receive` tell the operator, and how they wait
//! for the operator's decision while they hold a guest.
//!
//! A process that holds a paused guest (go sent, *started* never confirmed)
//! or a guest with missing pages (postcopy cut off) must not exit: exiting
//! destroys the guest. It prints what happened and what can be done, then
//! waits for a signal:
//!
//! | signal | meaning |
//! |---|---|
//! | `SIGUSR2` | resume the guest here (only when the other side never ran it) |
//! | `SIGTERM` or `SIGINT` | discard the guest held here and exit |
//!
//! A postcopy cut off is different: both sides hold, and each keeps trying
//! to resume it ([`hold_retrying`]) until it completes or the operator
//! discards the guest.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// How a `ferry send` or `ferry receive` ended, as its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The migration completed (and, where checked, the guest verified).
    Done,
    /// Something failed that is not a migration outcome (bad arguments, no
    /// KVM, a setup error).
    Error,
    /// The migration failed and the guest runs on the source.
    RunsOnSource,
    /// The migration failed and this process held the guest for the
    /// operator (who then resumed or discarded it).
    Held,
    /// The migration failed after *go*: the guest belongs to the destination.
    FailedAfterGo,
}

impl Outcome {
    /// The exit status: 0 done, 1 error, 3 guest on the source, 4 guest held
    /// here for the operator, 5 failed after go.
    pub const fn code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::Error => 1,
            Outcome::RunsOnSource => 3,
            Outcome::Held => 4,
            Outcome::FailedAfterGo => 5,
        }
    }

    /// A short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Error => "error",
            Outcome::RunsOnSource => "runs-on-source",
            Outcome::Held => "held",
            Outcome::FailedAfterGo => "failed-after-go",
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        ExitCode::from(o.code())
    }
}

/// What the operator decided about a held guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Resume the guest on this side.
    Resume,
    /// Discard the guest held here.
    Discard,
}

const NONE: u8 = 0;
const RESUME: u8 = 1;
const DISCARD: u8 = 2;

static DECISION: AtomicU8 = AtomicU8::new(NONE);

extern "C" fn on_resume(_: libc::c_int) {
    DECISION.store(RESUME, Ordering::Release);
}

extern "C" fn on_discard(_: libc::c_int) {
    DECISION.store(DISCARD, Ordering::Release);
}

fn install_handlers() {
    // SAFETY: the handlers only store to an atomic, which is
    // async-signal-safe; the function pointers live for the program.
    unsafe {
        libc::signal(libc::SIGUSR2, on_resume as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_discard as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_discard as *const () as libc::sighandler_t);
    }
}

/// Holds a guest whose postcopy was cut off while trying to take it up
/// again: prints `what`, then calls `attempt` (one resume: it blocks for at
/// most its own bounds) about every `every` until it gives a result, or
/// until the operator discards the guest (`SIGTERM`, `SIGINT`), which
/// returns `None`. `SIGUSR2` is refused: the guest runs on the destination.
pub fn hold_retrying<T>(
    what: &str,
    every: Duration,
    mut attempt: impl FnMut(u32) -> Option<T>,
) -> Option<T> {
    DECISION.store(NONE, Ordering::Release);
    install_handlers();
    let pid = std::process::id();
    eprintln!("ferry: {what}");
    eprintln!("ferry: this process holds the guest and tries to resume the migration every {} s; it will not exit on its own (pid {pid}).", every.as_secs_f64());
    eprintln!("ferry:   kill -TERM {pid}   discard the guest held here and exit");
    let mut tries = 0u32;
    loop {
        match DECISION.swap(NONE, Ordering::AcqRel) {
            DISCARD => return None,
            RESUME => eprintln!("ferry: resuming here is not possible for this guest; discard it with kill -TERM {pid}"),
            _ => {}
        }
        tries += 1;
        if let Some(t) = attempt(tries) {
            return Some(t);
        }
        let until = std::time::Instant::now() + every;
        while std::time::Instant::now() < until {
            if DECISION.load(Ordering::Acquire) == DISCARD {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Prints `what` and the choices on standard error, then waits until the
/// operator decides. With `allow_resume` false, `SIGUSR2` is refused with a
/// message and the wait goes on.
pub fn hold(what: &str, allow_resume: bool) -> Decision {
    DECISION.store(NONE, Ordering::Release);
    install_handlers();
    let pid = std::process::id();
    eprintln!("ferry: {what}");
    eprintln!("ferry: this process holds the guest and will not exit on its own (pid {pid}).");
    if allow_resume {
        eprintln!("ferry:   kill -USR2 {pid}   resume the guest here (only if the destination never started it)");
    }
    eprintln!("ferry:   kill -TERM {pid}   discard the guest held here and exit");
    loop {
        match DECISION.swap(NONE, Ordering::AcqRel) {
            RESUME if allow_resume => return Decision::Resume,
            RESUME => eprintln!("ferry: resuming here is not possible for this guest; discard it with kill -TERM {pid}"),
            DISCARD => return Decision::Discard,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
