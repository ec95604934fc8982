//! The destination's side of the protocol.

use super::{Custody, Failure, Nanos, Queue, SessionError, Timeouts, Wait};
use crate::state::{MigrationState, StateMachine};
use crate::wire::{ErrorCode, Repr, ReturnRepr};

use super::source::Limits;

/// A return-path record the host must send, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationControl {
    /// *accept*, stating this side's limits and naming the session (0: no
    /// resume offered).
    Accept(Limits, u32),
    /// *ready*: every page and section arrived intact (or, after *go* in
    /// postcopy, the migration is complete).
    Ready,
    /// *started*: the guest runs here.
    Started,
    /// The migration failed here.
    Error(ErrorCode),
}

impl DestinationControl {
    /// The return-path record that carries it.
    pub fn repr(self) -> ReturnRepr {
        match self {
            DestinationControl::Accept(l, session) => ReturnRepr::Accept {
                max_channels: l.max_channels,
                max_device_bytes: l.max_device_bytes,
                session,
            },
            DestinationControl::Ready => ReturnRepr::Ready,
            DestinationControl::Started => ReturnRepr::Started,
            DestinationControl::Error(code) => ReturnRepr::Error { code, detail: 0 },
        }
    }
}

/// What the host must act on or report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationEvent {
    /// *go* arrived: start the guest, then call
    /// [`DestinationSession::guest_started`].
    StartGuest,
    /// The end of the stream arrived before *go*: check that every page and
    /// section is here and call [`DestinationSession::handle_completeness`].
    CheckComplete,
    /// The end of postcopy arrived: fetch what is missing, then call
    /// [`DestinationSession::postcopy_complete`].
    FinishPostcopy,
    /// The migration is done: the guest runs here with every page.
    Completed,
    /// The session failed.
    Failed(SessionError),
}

/// What arrived, as the host counts it at the end of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Completeness {
    /// Pages of the layout never received (nor announced zero).
    pub missing_pages: u64,
    /// Pages received torn and not yet received again intact.
    pub torn_pages: u64,
    /// Sections announced without their last chunk.
    pub incomplete_sections: u32,
}

/// Which postcopy, if any, follows *go*.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything arrives before *go*.
    Precopy,
    /// RAM follows after *go*: missing pages are fetched on fault.
    Ram,
    /// Postcopy-only sections follow after *go*.
    Sections,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitHello { deadline: Nanos },
    Receiving,
    Verifying { deadline: Nanos },
    AwaitGo { deadline: Nanos },
    Starting,
    Postcopy,
    Finishing,
    Completed,
    Failed(SessionError),
}

impl Phase {
    const fn name(&self) -> &'static str {
        match self {
            Phase::AwaitHello { .. } => "awaiting hello",
            Phase::Receiving => "receiving",
            Phase::Verifying { .. } => "verifying",
            Phase::AwaitGo { .. } => "awaiting go",
            Phase::Starting => "starting",
            Phase::Postcopy => "postcopy",
            Phase::Finishing => "finishing postcopy",
            Phase::Completed => "completed",
            Phase::Failed(_) => "failed",
        }
    }
}

/// The destination's protocol state: it refuses records out of order, holds
/// *ready* until everything arrived, starts the guest only on *go*, answers
/// *started*, and bounds every wait. It does no I/O; see the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct DestinationSession {
    timeouts: Timeouts,
    limits: Limits,
    phase: Phase,
    state: StateMachine,
    last_activity: Nanos,
    stop_and_copy: bool,
    listen: bool,
    postcopy_ram: bool,
    mode: Mode,
    section_bytes: u64,
    go_received: bool,
    /// The id this session gives the source for a resume (0: none).
    session_id: u32,
    /// This session takes up an interrupted postcopy.
    resuming: bool,
    transmits: Queue<DestinationControl, 4>,
    events: Queue<DestinationEvent, 8>,
}

impl DestinationSession {
    /// A session whose control connection arrived at `now`, offering
    /// `limits`.
    pub fn new(now: Nanos, timeouts: Timeouts, limits: Limits) -> DestinationSession {
        DestinationSession {
            timeouts,
            limits,
            phase: Phase::AwaitHello {
                deadline: now.saturating_add(timeouts.handshake),
            },
            state: StateMachine::new(),
            last_activity: now,
            stop_and_copy: false,
            listen: false,
            postcopy_ram: false,
            mode: Mode::Precopy,
            section_bytes: 0,
            go_received: false,
            session_id: 0,
            resuming: false,
            transmits: Queue::new(),
            events: Queue::new(),
        }
    }

    /// Names this session `id` in its *accept*, so that the source can
    /// resume an interrupted postcopy of it, and only of it. `id` should be
    /// unpredictable and non-zero; 0 offers no resume.
    pub fn with_session_id(mut self, id: u32) -> DestinationSession {
        self.session_id = id;
        self
    }

    /// A session that takes up the interrupted postcopy of session
    /// `session` (in `mode`), waiting from `now` for the source's hello
    /// naming it. The guest runs here already, its vCPUs waiting on the
    /// missing pages: this side holds it from the start.
    pub fn resume(
        now: Nanos,
        timeouts: Timeouts,
        limits: Limits,
        session: u32,
        mode: Mode,
    ) -> DestinationSession {
        DestinationSession {
            state: StateMachine::postcopy_paused(),
            postcopy_ram: mode == Mode::Ram,
            mode,
            go_received: true,
            session_id: session,
            resuming: true,
            ..DestinationSession::new(now, timeouts, limits)
        }
    }

    /// The id named in this session's *accept* (0: none).
    pub fn session_id(&self) -> u32 {
        self.session_id
    }

    /// Whether this session takes up an interrupted postcopy.
    pub fn is_resume(&self) -> bool {
        self.resuming
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Whether the running wait is the idle bound, which moves with every
    /// [`Self::note_activity`] (a watchdog that only sees the activity must
    /// add [`Timeouts::idle`] to it itself).
    pub fn waits_on_activity(&self) -> bool {
        matches!(
            self.phase,
            Phase::Receiving | Phase::Postcopy | Phase::Finishing
        )
    }

    /// The limits this side offers.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The migration state (the coarse machine of [`crate::state`]).
    pub fn state(&self) -> MigrationState {
        self.state.state()
    }

    /// A short name of where the protocol stands, for reports.
    pub fn phase_name(&self) -> &'static str {
        self.phase.name()
    }

    /// Which postcopy follows *go* (known at the end of the stream).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether *go* arrived: the answer the operator needs after a failure.
    pub fn go_received(&self) -> bool {
        self.go_received
    }

    /// Where the guest belongs now.
    pub fn custody(&self) -> Custody {
        match self.phase {
            Phase::AwaitHello { .. } if self.resuming => Custody::Holds,
            Phase::AwaitHello { .. }
            | Phase::Receiving
            | Phase::Verifying { .. }
            | Phase::AwaitGo { .. } => Custody::Released,
            Phase::Starting | Phase::Postcopy | Phase::Finishing | Phase::Completed => {
                Custody::Runs
            }
            Phase::Failed(e) => e.custody,
        }
    }

    /// True once the session has ended, done or failed.
    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Failed(_))
    }

    /// The failure, once failed.
    pub fn failure(&self) -> Option<SessionError> {
        match self.phase {
            Phase::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The next return-path record to send.
    pub fn poll_transmit(&mut self) -> Option<DestinationControl> {
        self.transmits.pop()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DestinationEvent> {
        self.events.pop()
    }

    /// When [`Self::handle_timeout`] must be called next, if any wait runs.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        match self.phase {
            Phase::AwaitHello { deadline }
            | Phase::Verifying { deadline }
            | Phase::AwaitGo { deadline } => Some(deadline),
            Phase::Receiving | Phase::Postcopy | Phase::Finishing => {
                Some(self.last_activity.saturating_add(self.timeouts.idle))
            }
            Phase::Starting | Phase::Completed | Phase::Failed(_) => None,
        }
    }

    /// Bytes arrived from the source on any channel at `now`.
    pub fn note_activity(&mut self, now: Nanos) {
        if now > self.last_activity {
            self.last_activity = now;
        }
    }

    /// Fails the session if the running wait's bound passed at `now`.
    pub fn handle_timeout(&mut self, now: Nanos) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        let (wait, after_ns) = match self.phase {
            Phase::AwaitHello { .. } => (Wait::Handshake, self.timeouts.handshake),
            Phase::Verifying { .. } => (Wait::Resend, self.timeouts.resend),
            Phase::AwaitGo { .. } => (Wait::Go, self.timeouts.go),
            _ => (Wait::Idle, self.timeouts.idle),
        };
        self.fail(Failure::Timeout { wait, after_ns }, ErrorCode::Io);
    }

    /// A connection of the migration broke or closed.
    pub fn link_failed(&mut self, _now: Nanos) {
        if !self.is_ended() {
            self.fail(Failure::LinkLost, ErrorCode::Io);
        }
    }

    /// The host failed on its own; `code` goes to the source.
    pub fn local_failure(&mut self, _now: Nanos, code: ErrorCode) {
        if !self.is_ended() {
            self.fail(Failure::Local, code);
        }
    }

    /// The source's hello checked out against ours, asking for `channels`
    /// channels (control included) and, with `postcopy_ram`, postcopy of RAM.
    /// Queues *accept*, or refuses a channel count over the limit.
    pub fn accept_hello(
        &mut self,
        now: Nanos,
        channels: u16,
        postcopy_ram: bool,
    ) -> Result<(), SessionError> {
        if !matches!(self.phase, Phase::AwaitHello { .. }) {
            return Err(self.protocol(crate::wire::HELLO_KIND));
        }
        if self.resuming {
            // A new migration cannot take over a guest held for a resume.
            return Err(self.fail(Failure::WrongSession, ErrorCode::Handshake));
        }
        if channels > self.limits.max_channels || channels == 0 {
            return Err(self.fail(Failure::OverLimit, ErrorCode::Handshake));
        }
        self.move_to(MigrationState::Active)?;
        self.postcopy_ram = postcopy_ram;
        self.last_activity = now;
        self.phase = Phase::Receiving;
        self.transmits
            .push(DestinationControl::Accept(self.limits, self.session_id));
        Ok(())
    }

    /// The source's hello resumes session `session` with `channels`
    /// channels. On a session made by [`Self::resume`] for that id, queues
    /// *accept* and is in postcopy again; anything else is refused.
    pub fn accept_resume(
        &mut self,
        now: Nanos,
        channels: u16,
        session: u32,
    ) -> Result<(), SessionError> {
        if !matches!(self.phase, Phase::AwaitHello { .. }) {
            return Err(self.protocol(crate::wire::HELLO_KIND));
        }
        if !self.resuming || session == 0 || session != self.session_id {
            return Err(self.fail(Failure::WrongSession, ErrorCode::Handshake));
        }
        if channels > self.limits.max_channels || channels == 0 {
            return Err(self.fail(Failure::OverLimit, ErrorCode::Handshake));
        }
        self.move_to(MigrationState::PostcopyActive)?;
        self.last_activity = now;
        self.phase = Phase::Postcopy;
        self.transmits
            .push(DestinationControl::Accept(self.limits, self.session_id));
        Ok(())
    }

    /// The source's hello was refused (a mismatch, a bad header).
    pub fn refuse_hello(&mut self, _now: Nanos) -> SessionError {
        let state = self.phase.name();
        self.fail(
            Failure::Protocol {
                kind: crate::wire::HELLO_KIND,
                state,
            },
            ErrorCode::Handshake,
        )
    }

    /// A record arrived on the control channel at `now`. Page records on the
    /// bulk channels need not pass here (only [`Self::note_activity`]); page
    /// runs on the control channel (resends) do.
    pub fn handle_record(&mut self, now: Nanos, repr: &Repr) -> Result<(), SessionError> {
        self.note_activity(now);
        let before_end = self.phase == Phase::Receiving;
        let after_go = matches!(self.phase, Phase::Postcopy);
        match *repr {
            Repr::Section { len, .. } if before_end => self.add_section_bytes(len),
            Repr::PostcopySection { len, .. } if after_go && self.mode == Mode::Sections => {
                self.add_section_bytes(len)
            }
            Repr::StopAndCopy if before_end && !self.stop_and_copy && !self.listen => {
                self.stop_and_copy = true;
                Ok(())
            }
            Repr::PostcopyListen if before_end && !self.listen => {
                if !self.stop_and_copy && !self.postcopy_ram {
                    return Err(self.protocol(repr.kind() as u8));
                }
                self.listen = true;
                Ok(())
            }
            // Postcopy RAM: the pages to drop, after the listen marker and
            // before the end of the stream.
            Repr::DiscardMap { .. }
                if before_end && self.listen && !self.stop_and_copy && self.postcopy_ram =>
            {
                Ok(())
            }
            Repr::PostcopyRun if after_go => Ok(()),
            Repr::PageRun { .. } | Repr::ZeroRun { .. }
                if before_end
                    || matches!(self.phase, Phase::Verifying { .. } | Phase::AwaitGo { .. }) =>
            {
                Ok(())
            }
            Repr::End if before_end && (self.stop_and_copy || self.listen) => {
                self.mode = match (self.listen, self.stop_and_copy) {
                    (true, false) => Mode::Ram,
                    (true, true) => Mode::Sections,
                    _ => Mode::Precopy,
                };
                self.move_to(MigrationState::StopAndCopy)?;
                self.phase = Phase::Verifying {
                    deadline: now.saturating_add(self.timeouts.resend),
                };
                self.events.push(DestinationEvent::CheckComplete);
                Ok(())
            }
            Repr::Go if matches!(self.phase, Phase::AwaitGo { .. }) => {
                self.go_received = true;
                self.phase = Phase::Starting;
                self.events.push(DestinationEvent::StartGuest);
                Ok(())
            }
            Repr::End if after_go => {
                self.phase = Phase::Finishing;
                self.events.push(DestinationEvent::FinishPostcopy);
                Ok(())
            }
            _ => Err(self.protocol(repr.kind() as u8)),
        }
    }

    /// After [`DestinationEvent::CheckComplete`] (and again after every page
    /// sent again): *ready* when nothing is missing; waits (bounded) for torn
    /// pages; fails when pages or sections are missing for good.
    pub fn handle_completeness(
        &mut self,
        _now: Nanos,
        c: Completeness,
    ) -> Result<(), SessionError> {
        if !matches!(self.phase, Phase::Verifying { .. }) {
            return Err(self.fail(Failure::Local, ErrorCode::Internal));
        }
        if c.incomplete_sections > 0 || (self.mode != Mode::Ram && c.missing_pages > 0) {
            return Err(self.fail(Failure::Incomplete, ErrorCode::Protocol));
        }
        if self.mode != Mode::Ram && c.torn_pages > 0 {
            return Ok(());
        }
        self.phase = Phase::AwaitGo {
            deadline: _now.saturating_add(self.timeouts.go),
        };
        self.transmits.push(DestinationControl::Ready);
        Ok(())
    }

    /// The host started the guest after [`DestinationEvent::StartGuest`]:
    /// queues *started*.
    pub fn guest_started(&mut self, now: Nanos) -> Result<(), SessionError> {
        if self.phase != Phase::Starting {
            return Err(self.fail(Failure::Local, ErrorCode::Internal));
        }
        self.transmits.push(DestinationControl::Started);
        self.last_activity = now;
        if self.mode == Mode::Precopy {
            self.move_to(MigrationState::Completed)?;
            self.phase = Phase::Completed;
            self.events.push(DestinationEvent::Completed);
        } else {
            self.move_to(MigrationState::PostcopyActive)?;
            self.phase = Phase::Postcopy;
        }
        Ok(())
    }

    /// Postcopy: every page and section is here; queues the final *ready*.
    pub fn postcopy_complete(&mut self, _now: Nanos) -> Result<(), SessionError> {
        if self.phase != Phase::Finishing {
            return Err(self.fail(Failure::Local, ErrorCode::Internal));
        }
        self.move_to(MigrationState::Completed)?;
        self.transmits.push(DestinationControl::Ready);
        self.phase = Phase::Completed;
        self.events.push(DestinationEvent::Completed);
        Ok(())
    }

    fn add_section_bytes(&mut self, len: u32) -> Result<(), SessionError> {
        self.section_bytes = self.section_bytes.saturating_add(u64::from(len));
        if self.section_bytes > self.limits.max_device_bytes {
            return Err(self.fail(Failure::OverLimit, ErrorCode::Protocol));
        }
        Ok(())
    }

    fn protocol(&mut self, kind: u8) -> SessionError {
        let f = Failure::Protocol {
            kind,
            state: self.phase.name(),
        };
        self.fail(f, ErrorCode::Protocol)
    }

    fn move_to(&mut self, to: MigrationState) -> Result<(), SessionError> {
        if self.state.move_to(to).is_err() {
            return Err(self.fail(Failure::Local, ErrorCode::Internal));
        }
        Ok(())
    }

    fn fail(&mut self, failure: Failure, code: ErrorCode) -> SessionError {
        match self.phase {
            Phase::Failed(e) => return e,
            // Done: a stray input is refused, and changes nothing.
            Phase::Completed => {
                return SessionError {
                    failure,
                    custody: Custody::Runs,
                }
            }
            _ => {}
        }
        let custody = match self.phase {
            // A resume that did not come about: the vCPUs still wait here.
            Phase::AwaitHello { .. } if self.resuming => Custody::Holds,
            // Before go the guest is the source's.
            Phase::AwaitHello { .. }
            | Phase::Receiving
            | Phase::Verifying { .. }
            | Phase::AwaitGo { .. } => Custody::Released,
            // Go arrived but the guest did not start: the source holds it.
            Phase::Starting => Custody::Released,
            // The guest runs here with pages missing: its vCPUs wait.
            Phase::Postcopy | Phase::Finishing => Custody::Holds,
            Phase::Completed => Custody::Runs,
            Phase::Failed(e) => e.custody,
        };
        let to = if self.state.state().is_postcopy() {
            MigrationState::PostcopyPaused
        } else {
            MigrationState::Failed
        };
        if self.state.state() != to && self.state.move_to(to).is_err() {
            // Only a terminal state refuses Failed; the phase below is what
            // counts from here on.
            debug_assert!(self.state.state().is_terminal());
        }
        while self.transmits.pop().is_some() {}
        if failure != Failure::LinkLost {
            self.transmits.push(DestinationControl::Error(code));
        }
        let e = SessionError { failure, custody };
        self.phase = Phase::Failed(e);
        self.events.push(DestinationEvent::Failed(e));
        e
    }
}
