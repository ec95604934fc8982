//! The source's side of the protocol.

use super::{Custody, Failure, Nanos, Queue, SessionError, Timeouts, Wait};
use crate::state::{MigrationState, StateMachine};
use crate::wire::{Repr, ReturnRepr};

/// What the destination said it accepts, in its *accept*.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Limits {
    /// Channels it serves, the control channel included.
    pub max_channels: u16,
    /// Bytes of device state (every section together) it takes.
    pub max_device_bytes: u64,
}

/// A control record the host must send on the control channel, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceControl {
    /// The stop-and-copy marker (the guest is paused).
    StopAndCopy,
    /// The postcopy listen marker.
    PostcopyListen,
    /// The end of the stream.
    End,
    /// *go*: from the moment this is handed out the guest belongs to the
    /// destination, and the source holds it paused until *started*.
    Go,
}

impl SourceControl {
    /// The stream record that carries it.
    pub fn repr(self) -> Repr {
        match self {
            SourceControl::StopAndCopy => Repr::StopAndCopy,
            SourceControl::PostcopyListen => Repr::PostcopyListen,
            SourceControl::End => Repr::End,
            SourceControl::Go => Repr::Go,
        }
    }
}

/// What the host must act on or report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination accepted the hello, with these limits.
    Accepted(Limits),
    /// The destination is ready; *go* is queued.
    Ready,
    /// The destination started the guest: in precopy the migration is done,
    /// in postcopy the rest streams now.
    Started,
    /// Every page and section arrived (postcopy's final *ready*, or *started*
    /// in precopy): the source may release its guest.
    Completed,
    /// The session failed.
    Failed(SessionError),
}

/// A return-path record the host must serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Nothing to do beyond draining events and transmits.
    None,
    /// Send these pages again: they arrived torn.
    Resend {
        /// Region id.
        region: u16,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// Postcopy: the destination faulted on these pages.
    PageRequest {
        /// Region id.
        region: u16,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
}

/// What follows the pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switchover {
    /// Everything moves in the downtime.
    StopAndCopy,
    /// RAM follows after *go* (postcopy-ram).
    PostcopyRam,
    /// RAM and devices move in the downtime, postcopy-only sections after.
    PostcopySections,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshake { deadline: Nanos },
    Precopy,
    Paused,
    AwaitReady { deadline: Nanos },
    GoDue,
    AwaitStarted { deadline: Nanos },
    Postcopy { deadline: Option<Nanos> },
    Completed,
    Failed(SessionError),
}

impl Phase {
    const fn name(&self) -> &'static str {
        match self {
            Phase::Handshake { .. } => "handshake",
            Phase::Precopy => "precopy",
            Phase::Paused => "stop-and-copy",
            Phase::AwaitReady { .. } => "awaiting ready",
            Phase::GoDue => "go due",
            Phase::AwaitStarted { .. } => "awaiting started",
            Phase::Postcopy { .. } => "postcopy",
            Phase::Completed => "completed",
            Phase::Failed(_) => "failed",
        }
    }
}

/// The source's protocol state: handshake, precopy, the pause, the handover
/// and postcopy, with every timer. It does no I/O; see the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct SourceSession {
    timeouts: Timeouts,
    phase: Phase,
    state: StateMachine,
    switchover: Switchover,
    channels: u16,
    limits: Limits,
    /// The end of the precopy stream was queued (once only).
    stream_end_queued: bool,
    /// The end of postcopy was queued (once only).
    postcopy_end_queued: bool,
    /// The session id the destination named in its *accept* (0: none).
    session_id: u32,
    /// This session resumes an interrupted postcopy: the guest was handed
    /// over before it began.
    resuming: bool,
    transmits: Queue<SourceControl, 4>,
    events: Queue<SourceEvent, 8>,
}

impl SourceSession {
    /// A session that sent its hello at `now` asking for `channels` channels
    /// (control included); the host sends the hello itself.
    pub fn new(now: Nanos, timeouts: Timeouts, channels: u16) -> SourceSession {
        SourceSession {
            timeouts,
            phase: Phase::Handshake {
                deadline: now.saturating_add(timeouts.handshake),
            },
            state: StateMachine::new(),
            switchover: Switchover::StopAndCopy,
            channels,
            limits: Limits::default(),
            stream_end_queued: false,
            postcopy_end_queued: false,
            session_id: 0,
            resuming: false,
            transmits: Queue::new(),
            events: Queue::new(),
        }
    }

    /// A session that resumes the interrupted postcopy of session `session`
    /// (switched over as `how`): its hello, naming that session, went out at
    /// `now` asking for `channels` channels. The guest was handed over
    /// before: this side holds it paused from the start, and once the
    /// destination accepts, the session is in postcopy again.
    pub fn resume(
        now: Nanos,
        timeouts: Timeouts,
        channels: u16,
        session: u32,
        how: Switchover,
    ) -> SourceSession {
        SourceSession {
            state: StateMachine::postcopy_paused(),
            switchover: how,
            session_id: session,
            resuming: true,
            ..SourceSession::new(now, timeouts, channels)
        }
    }

    /// The session id the destination named in its *accept*: what a resume
    /// after an interrupted postcopy must name. 0 until accepted, or when
    /// the destination offers no resume.
    pub fn session_id(&self) -> u32 {
        self.session_id
    }

    /// Whether this session resumes an interrupted postcopy.
    pub fn is_resume(&self) -> bool {
        self.resuming
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// The migration state (the coarse machine of [`crate::state`]).
    pub fn state(&self) -> MigrationState {
        self.state.state()
    }

    /// A short name of where the protocol stands, for reports.
    pub fn phase_name(&self) -> &'static str {
        self.phase.name()
    }

    /// The destination's limits (zero until accepted).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// How the switchover goes (stop-and-copy until [`Self::pause`] says).
    pub fn switchover(&self) -> Switchover {
        self.switchover
    }

    /// Where the guest belongs now.
    pub fn custody(&self) -> Custody {
        match self.phase {
            Phase::Handshake { .. } if self.resuming => Custody::Holds,
            Phase::Handshake { .. } | Phase::Precopy => Custody::Runs,
            Phase::Paused
            | Phase::AwaitReady { .. }
            | Phase::GoDue
            | Phase::AwaitStarted { .. }
            | Phase::Postcopy { .. } => Custody::Holds,
            Phase::Completed => Custody::Released,
            Phase::Failed(e) => e.custody,
        }
    }

    /// Whether *go* may have reached the destination.
    pub fn go_sent(&self) -> bool {
        self.resuming
            || matches!(
                self.phase,
                Phase::AwaitStarted { .. } | Phase::Postcopy { .. } | Phase::Completed
            )
            || matches!(self.phase, Phase::Failed(e) if e.custody == Custody::Holds)
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

    /// The next control record to send.
    ///
    /// Handing out [`SourceControl::Go`] is the point of no return: the
    /// session then holds the guest until *started*, whatever happens to the
    /// bytes afterwards.
    pub fn poll_transmit(&mut self, now: Nanos) -> Option<SourceControl> {
        let c = self.transmits.pop()?;
        if c == SourceControl::Go {
            if self.phase != Phase::GoDue {
                return None;
            }
            self.phase = Phase::AwaitStarted {
                deadline: now.saturating_add(self.timeouts.started),
            };
        }
        if c == SourceControl::End {
            match self.phase {
                Phase::Paused => {
                    self.phase = Phase::AwaitReady {
                        deadline: now.saturating_add(self.timeouts.ready),
                    }
                }
                Phase::Postcopy { .. } => {
                    self.phase = Phase::Postcopy {
                        deadline: Some(now.saturating_add(self.timeouts.ready)),
                    }
                }
                _ => {}
            }
        }
        Some(c)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop()
    }

    /// When [`Self::handle_timeout`] must be called next, if any wait runs.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        match self.phase {
            Phase::Handshake { deadline }
            | Phase::AwaitReady { deadline }
            | Phase::AwaitStarted { deadline } => Some(deadline),
            Phase::Postcopy { deadline } => deadline,
            _ => None,
        }
    }

    /// Fails the session if the running wait's bound passed at `now`.
    pub fn handle_timeout(&mut self, now: Nanos) {
        let (wait, after_ns) = match self.phase {
            Phase::Handshake { deadline } if now >= deadline => {
                (Wait::Handshake, self.timeouts.handshake)
            }
            Phase::AwaitReady { deadline } if now >= deadline => (Wait::Ready, self.timeouts.ready),
            Phase::AwaitStarted { deadline } if now >= deadline => {
                (Wait::Started, self.timeouts.started)
            }
            Phase::Postcopy {
                deadline: Some(deadline),
            } if now >= deadline => (Wait::Ready, self.timeouts.ready),
            _ => return,
        };
        self.fail(Failure::Timeout { wait, after_ns });
    }

    /// A connection of the migration broke or closed.
    pub fn link_failed(&mut self, _now: Nanos) {
        if !self.is_ended() {
            self.fail(Failure::LinkLost);
        }
    }

    /// The host failed on its own (I/O, pause, a dirty-log error): the
    /// session ends, and [`Self::custody`] says where the guest goes.
    pub fn local_failure(&mut self, _now: Nanos) {
        if !self.is_ended() {
            self.fail(Failure::Local);
        }
    }

    /// The operator cancels. Possible until *go* is handed out; afterwards the
    /// guest is the destination's and this returns the error.
    pub fn cancel(&mut self, _now: Nanos) -> Result<(), SessionError> {
        match self.phase {
            Phase::Handshake { .. } if self.resuming => Err(SessionError {
                failure: Failure::Cancelled,
                custody: self.custody(),
            }),
            Phase::Handshake { .. }
            | Phase::Precopy
            | Phase::Paused
            | Phase::AwaitReady { .. }
            | Phase::GoDue => {
                self.fail(Failure::Cancelled);
                Ok(())
            }
            _ => Err(SessionError {
                failure: Failure::Cancelled,
                custody: self.custody(),
            }),
        }
    }

    /// The host paused the guest at `now` for a switchover of kind `how`.
    /// Queues the marker that tells the destination.
    pub fn pause(&mut self, _now: Nanos, how: Switchover) -> Result<(), SessionError> {
        if self.phase != Phase::Precopy {
            return Err(self.illegal("pause"));
        }
        self.move_to(MigrationState::StopAndCopy)?;
        self.switchover = how;
        self.phase = Phase::Paused;
        match how {
            Switchover::StopAndCopy | Switchover::PostcopySections => {
                self.transmits.push(SourceControl::StopAndCopy)
            }
            Switchover::PostcopyRam => self.transmits.push(SourceControl::PostcopyListen),
        }
        Ok(())
    }

    /// Checks that `bytes` of device state fit the destination's limit;
    /// fails the session (the guest resumes here) when they do not.
    pub fn check_device_bytes(&mut self, bytes: u64) -> Result<(), SessionError> {
        if bytes > self.limits.max_device_bytes {
            self.fail(Failure::OverLimit);
            return Err(self.error(Failure::OverLimit));
        }
        Ok(())
    }

    /// Every page and section of the stop-and-copy was handed to the channels:
    /// queues (for postcopy-sections) the listen marker, then the end of the
    /// stream; *ready* is awaited from when `End` is handed out.
    pub fn finish_stream(&mut self, _now: Nanos) -> Result<(), SessionError> {
        if self.phase != Phase::Paused || self.stream_end_queued {
            return Err(self.illegal("end of stream"));
        }
        self.stream_end_queued = true;
        if self.switchover == Switchover::PostcopySections {
            self.transmits.push(SourceControl::PostcopyListen);
        }
        self.transmits.push(SourceControl::End);
        Ok(())
    }

    /// Postcopy: the background stream and every postcopy-only section went
    /// out; queues the end of the stream and awaits the final *ready*.
    pub fn finish_postcopy(&mut self, _now: Nanos) -> Result<(), SessionError> {
        if !matches!(self.phase, Phase::Postcopy { deadline: None }) || self.postcopy_end_queued {
            return Err(self.illegal("end of postcopy"));
        }
        self.postcopy_end_queued = true;
        self.transmits.push(SourceControl::End);
        Ok(())
    }

    /// A record arrived on the return path.
    pub fn handle_return(
        &mut self,
        now: Nanos,
        rec: &ReturnRepr,
    ) -> Result<SourceAction, SessionError> {
        let _ = now;
        match (*rec, self.phase) {
            (
                ReturnRepr::Accept {
                    max_channels,
                    max_device_bytes,
                    session,
                },
                Phase::Handshake { .. },
            ) => {
                let limits = Limits {
                    max_channels,
                    max_device_bytes,
                };
                if self.channels > max_channels {
                    self.fail(Failure::OverLimit);
                    return Err(self.error(Failure::OverLimit));
                }
                if self.resuming {
                    // Only the session that was interrupted may take up
                    // its postcopy.
                    if session != self.session_id {
                        self.fail(Failure::WrongSession);
                        return Err(self.error(Failure::WrongSession));
                    }
                    self.move_to(MigrationState::PostcopyActive)?;
                    self.phase = Phase::Postcopy { deadline: None };
                } else {
                    self.move_to(MigrationState::Active)?;
                    self.session_id = session;
                    self.phase = Phase::Precopy;
                }
                self.limits = limits;
                self.events.push(SourceEvent::Accepted(limits));
                Ok(SourceAction::None)
            }
            (ReturnRepr::Error { code, detail }, _) if !self.is_ended() => {
                let f = Failure::PeerError { code, detail };
                self.fail(f);
                Err(self.error(f))
            }
            (
                ReturnRepr::Resend {
                    region,
                    first,
                    count,
                },
                Phase::Precopy | Phase::Paused | Phase::AwaitReady { .. } | Phase::Postcopy { .. },
            ) => Ok(SourceAction::Resend {
                region,
                first,
                count,
            }),
            (
                ReturnRepr::PageRequest {
                    region,
                    first,
                    count,
                },
                Phase::AwaitStarted { .. } | Phase::Postcopy { .. },
            ) if self.switchover == Switchover::PostcopyRam => Ok(SourceAction::PageRequest {
                region,
                first,
                count,
            }),
            (ReturnRepr::Ready, Phase::AwaitReady { .. }) => {
                self.phase = Phase::GoDue;
                self.transmits.push(SourceControl::Go);
                self.events.push(SourceEvent::Ready);
                Ok(SourceAction::None)
            }
            (ReturnRepr::Started, Phase::AwaitStarted { .. }) => {
                self.events.push(SourceEvent::Started);
                if self.switchover == Switchover::StopAndCopy {
                    self.complete()?;
                } else {
                    self.move_to(MigrationState::PostcopyActive)?;
                    self.phase = Phase::Postcopy { deadline: None };
                }
                Ok(SourceAction::None)
            }
            (
                ReturnRepr::Ready,
                Phase::Postcopy {
                    deadline: Some(_), ..
                },
            ) => {
                self.complete()?;
                Ok(SourceAction::None)
            }
            (r, _) => {
                let f = Failure::Protocol {
                    kind: r.kind() as u8,
                    state: self.phase.name(),
                };
                if !self.is_ended() {
                    self.fail(f);
                }
                Err(self.error(f))
            }
        }
    }

    /// Done: the destination has the guest; nothing queued goes out.
    fn complete(&mut self) -> Result<(), SessionError> {
        self.move_to(MigrationState::Completed)?;
        self.phase = Phase::Completed;
        while self.transmits.pop().is_some() {}
        self.events.push(SourceEvent::Completed);
        Ok(())
    }

    fn move_to(&mut self, to: MigrationState) -> Result<(), SessionError> {
        if self.state.move_to(to).is_err() {
            self.fail(Failure::Local);
            return Err(self.error(Failure::Local));
        }
        Ok(())
    }

    fn illegal(&mut self, _what: &'static str) -> SessionError {
        let f = Failure::Local;
        if !self.is_ended() {
            self.fail(f);
        }
        self.error(f)
    }

    fn error(&self, failure: Failure) -> SessionError {
        SessionError {
            failure,
            custody: self.custody(),
        }
    }

    fn fail(&mut self, failure: Failure) {
        if self.is_ended() {
            return;
        }
        let custody = match self.phase {
            Phase::Handshake { .. } if self.resuming => Custody::Holds,
            Phase::Handshake { .. }
            | Phase::Precopy
            | Phase::Paused
            | Phase::AwaitReady { .. }
            | Phase::GoDue => Custody::Runs,
            Phase::AwaitStarted { .. } | Phase::Postcopy { .. } => Custody::Holds,
            Phase::Completed => Custody::Released,
            Phase::Failed(e) => e.custody,
        };
        // In postcopy the guest's memory is split between the sides: any
        // failure pauses it there, for a resume.
        let to = if failure == Failure::Cancelled {
            MigrationState::Cancelled
        } else if self.state.state().is_postcopy() {
            MigrationState::PostcopyPaused
        } else {
            MigrationState::Failed
        };
        // Every live state may fail or cancel; Setup/Active/StopAndCopy may
        // cancel. Anything else is Failed, which every live state allows.
        if self.state.state() != to && self.state.move_to(to).is_err() {
            let _ = self.state.move_to(MigrationState::Failed);
        }
        // Nothing queued goes out after a failure: above all not *go*.
        while self.transmits.pop().is_some() {}
        let e = SessionError { failure, custody };
        self.phase = Phase::Failed(e);
        self.events.push(SourceEvent::Failed(e));
    }
}
