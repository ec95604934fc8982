//! The migration protocol as two sans-IO state machines: [`SourceSession`] and
//! [`DestinationSession`].
//!
//! A session owns what the protocol decides — which control record may come
//! when, the *ready* / *go* / *started* handover, and every timer — and nothing
//! of how bytes move. The host drives it, in the manner of quinn-proto's
//! `Connection`:
//!
//! - it feeds what happened: `handle_*(now, …)` for records and local facts,
//!   [`SourceSession::handle_timeout`] when the deadline from `poll_timeout`
//!   has passed, `link_failed` when a connection broke;
//! - it drains what to do: `poll_transmit` (control records to send),
//!   `poll_event` (what the host must act on or report);
//! - it asks where the guest belongs: [`Custody`].
//!
//! Time is a `u64` count of nanoseconds on any monotonic clock the host
//! chooses; the sessions never read a clock.
//!
//! # The handover
//!
//! ```text
//!   source                                    destination
//!   hello ─────────────────────────────────►  (checks layout, limits)
//!         ◄───────────────────────────────── accept (max channels, max device bytes)
//!   page runs, zero runs (bulk channels) ──►
//!   pause guest; stop-and-copy ───────────►
//!   last pages, device sections, end ─────►  (every page and section intact?)
//!         ◄───────────────────────────────── ready
//!   go ───────────────────────────────────►  (starts the guest)
//!         ◄───────────────────────────────── started
//!   releases its guest
//! ```
//!
//! Who holds the guest when something fails ([`Custody`]):
//!
//! | when it fails | source | destination |
//! |---|---|---|
//! | before the source handed out *go* | runs it (resumes if paused) | released |
//! | after *go* was handed out, before *started* | holds it paused for the operator | runs it if it got *go* and started it, else released |
//! | after *started* (precopy) | released | runs it |
//! | postcopy, pages still missing | holds every page | holds (vCPUs wait on faults) |
//!
//! The source never resumes on its own once *go* may have left; the
//! destination never starts without *go*; the source reports success only on
//! *started*.

mod destination;
mod source;

pub use destination::{
    Completeness, DestinationControl, DestinationEvent, DestinationSession, Mode,
};
pub use source::{Limits, SourceAction, SourceControl, SourceEvent, SourceSession, Switchover};

use core::fmt;

use crate::wire::ErrorCode;

/// A reading of the host's monotonic clock, in nanoseconds.
pub type Nanos = u64;

/// Every bound on a wait, in nanoseconds. Each is a setting; the defaults suit
/// a data-centre link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Source: hello sent until *accept*. Destination: first connection until
    /// the hello arrived.
    pub handshake: Nanos,
    /// Destination: the longest silence from the source on every channel
    /// while data is due (precopy, stop-and-copy).
    pub idle: Nanos,
    /// Source: end of stream until *ready* (the guest is paused meanwhile).
    pub ready: Nanos,
    /// Destination: *ready* until *go*.
    pub go: Nanos,
    /// Source: *go* until *started*.
    pub started: Nanos,
    /// Destination: end of stream until every torn page arrived again.
    pub resend: Nanos,
}

impl Timeouts {
    /// The defaults: 30 s handshake, 30 s idle, 10 s for ready, go and started,
    /// 10 s for resends.
    pub const DEFAULT: Timeouts = Timeouts {
        handshake: 30 * SEC,
        idle: 30 * SEC,
        ready: 10 * SEC,
        go: 10 * SEC,
        started: 10 * SEC,
        resend: 10 * SEC,
    };

    /// The longest any single wait may last.
    pub const fn longest(&self) -> Nanos {
        let mut m = self.handshake;
        let all = [self.idle, self.ready, self.go, self.started, self.resend];
        let mut i = 0;
        while i < all.len() {
            if all[i] > m {
                m = all[i];
            }
            i += 1;
        }
        m
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

/// One second in nanoseconds.
pub const SEC: Nanos = 1_000_000_000;

/// Where the guest belongs, as one side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Custody {
    /// The guest runs on this side, or must be resumed here (a source that
    /// failed before *go*).
    Runs,
    /// This side holds the guest paused (a source from pause until *started*;
    /// a destination in postcopy whose vCPUs wait on missing pages). It must
    /// not resume it on its own, and must not exit while it holds it.
    Holds,
    /// This side has no claim on the guest.
    Released,
}

/// Which bounded wait ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wait {
    /// The handshake.
    Handshake,
    /// A silent source (destination).
    Idle,
    /// *ready* after the end of the stream (source).
    Ready,
    /// *go* after *ready* (destination).
    Go,
    /// *started* after *go* (source).
    Started,
    /// Torn pages sent again (destination).
    Resend,
}

impl Wait {
    /// What was awaited, for messages.
    pub const fn what(self) -> &'static str {
        match self {
            Wait::Handshake => "the handshake",
            Wait::Idle => "data from the source",
            Wait::Ready => "ready from the destination",
            Wait::Go => "go from the source",
            Wait::Started => "started from the destination",
            Wait::Resend => "torn pages sent again",
        }
    }
}

/// Why a session failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A bounded wait ran out.
    Timeout {
        /// Which wait.
        wait: Wait,
        /// Its bound.
        after_ns: Nanos,
    },
    /// A connection broke or closed.
    LinkLost,
    /// The peer reported an error on the return path.
    PeerError {
        /// The peer's reason code.
        code: ErrorCode,
        /// The peer's detail field.
        detail: u64,
    },
    /// The peer sent a record this state does not allow.
    Protocol {
        /// The record's kind byte.
        kind: u8,
        /// The state it arrived in.
        state: &'static str,
    },
    /// The peer asked for more than the limits it was told.
    OverLimit,
    /// The stream ended with pages or sections missing.
    Incomplete,
    /// The host failed locally (a pause, start or I/O of its own).
    Local,
    /// The operator cancelled.
    Cancelled,
    /// A resume named a session the peer does not hold, or the peer
    /// answered for another.
    WrongSession,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout { wait, after_ns } => write!(
                f,
                "{} did not come within {} ms",
                wait.what(),
                after_ns / 1_000_000
            ),
            Failure::LinkLost => f.write_str("the connection to the peer was lost"),
            Failure::PeerError { code, detail } => {
                write!(f, "the peer reported an error: {code} (detail {detail})")
            }
            Failure::Protocol { kind, state } => write!(
                f,
                "the peer sent a record of kind {kind:#04x}, which is not allowed in state {state}"
            ),
            Failure::OverLimit => f.write_str(
                "the channels or device-state bytes asked for exceed the limits the destination stated",
            ),
            Failure::Incomplete => f.write_str("the stream ended with pages or sections missing"),
            Failure::Local => f.write_str("this side failed"),
            Failure::Cancelled => f.write_str("the migration was cancelled"),
            Failure::WrongSession => {
                f.write_str("the resume named a session that the peer does not hold")
            }
        }
    }
}

/// An input the session cannot take in its present state. The session has
/// failed by the time this is returned; [`Custody`] says what to do with the
/// guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionError {
    /// Why the session failed.
    pub failure: Failure,
    /// Where the guest belongs now.
    pub custody: Custody,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.failure)
    }
}

impl core::error::Error for SessionError {}

/// A fixed queue of at most `N` items, for transmits and events.
#[derive(Clone, Debug)]
struct Queue<T: Copy, const N: usize> {
    items: heapless::Deque<T, N>,
}

impl<T: Copy, const N: usize> Queue<T, N> {
    const fn new() -> Self {
        Queue {
            items: heapless::Deque::new(),
        }
    }

    /// Pushes `item`, dropping the oldest when full (only ever events, which
    /// the host drains after every input).
    fn push(&mut self, item: T) {
        if self.items.is_full() {
            let _ = self.items.pop_front();
        }
        let _ = self.items.push_back(item);
    }

    fn pop(&mut self) -> Option<T> {
        self.items.pop_front()
    }
}
