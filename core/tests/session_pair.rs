//! Whole migrations between a `SourceSession` and a `DestinationSession` in
//! memory, with no sockets: each side's host is a small script, messages move
//! through two queues, and time is a counter. Then the same migrations cut at
//! every step, in each direction, as a silent stall and as a reset.

use std::collections::VecDeque;

use ferry_core::session::{
    Completeness, Custody, DestinationControl, DestinationEvent, DestinationSession, Failure,
    Limits, SourceAction, SourceControl, SourceEvent, SourceSession, Switchover, Timeouts, Wait,
    SEC,
};
use ferry_core::state::MigrationState;
use ferry_core::wire::{ErrorCode, Repr, ReturnRepr};

const MS: u64 = 1_000_000;
const LIMITS: Limits = Limits {
    max_channels: 4,
    max_device_bytes: 1 << 20,
};

/// What travels from the source to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Down {
    Hello {
        channels: u16,
        postcopy_ram: bool,
    },
    Record(Repr),
    /// Bulk data: counts only as activity.
    Bulk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    None,
    /// From step `at` on, nothing more arrives in this direction and nobody
    /// is told (a stall).
    Stall {
        at: usize,
        down: bool,
    },
    /// At step `at` the connection resets: both sides learn it.
    Reset {
        at: usize,
    },
}

/// The source host's script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SrcStep {
    Rounds(u32),
    Pause,
    Finish,
    WaitStarted,
    Postcopy(u32),
    Done,
}

struct Pair {
    now: u64,
    steps: usize,
    src: SourceSession,
    dst: DestinationSession,
    down: VecDeque<Down>,
    up: VecDeque<ReturnRepr>,
    script: SrcStep,
    switchover: Switchover,
    dst_running: bool,
    src_running: bool,
    section_len: u32,
    torn_once: bool,
    resent: u32,
    cut: Cut,
    cut_at_ns: Option<u64>,
    src_ended_at: Option<u64>,
    dst_ended_at: Option<u64>,
    trace: Vec<String>,
}

impl Pair {
    fn new(switchover: Switchover, cut: Cut) -> Pair {
        let channels = 3;
        let src = SourceSession::new(0, Timeouts::DEFAULT, channels);
        let dst = DestinationSession::new(0, Timeouts::DEFAULT, LIMITS);
        let mut down = VecDeque::new();
        down.push_back(Down::Hello {
            channels,
            postcopy_ram: switchover == Switchover::PostcopyRam,
        });
        Pair {
            now: 0,
            steps: 0,
            src,
            dst,
            down,
            up: VecDeque::new(),
            script: SrcStep::Rounds(3),
            switchover,
            dst_running: false,
            src_running: true,
            section_len: 4096,
            torn_once: false,
            resent: 0,
            cut,
            cut_at_ns: None,
            src_ended_at: None,
            dst_ended_at: None,
            trace: Vec::new(),
        }
    }

    fn cut_down(&self) -> bool {
        matches!(self.cut, Cut::Stall { at, down: true } if self.steps >= at)
            || matches!(self.cut, Cut::Reset { at } if self.steps >= at)
    }

    fn cut_up(&self) -> bool {
        matches!(self.cut, Cut::Stall { at, down: false } if self.steps >= at)
            || matches!(self.cut, Cut::Reset { at } if self.steps >= at)
    }

    fn send_down(&mut self, m: Down) {
        if !self.cut_down() {
            self.down.push_back(m);
        }
    }

    fn send_up(&mut self, r: ReturnRepr) {
        if !self.cut_up() {
            self.up.push_back(r);
        }
    }

    /// One step of either side; false when nothing was left to do.
    fn step(&mut self) -> bool {
        self.now += MS;
        if let Cut::Reset { at } = self.cut {
            if self.steps == at {
                self.cut_at_ns = Some(self.now);
                self.down.clear();
                self.up.clear();
                self.src.link_failed(self.now);
                self.dst.link_failed(self.now);
            }
        }
        if let Cut::Stall { at, .. } = self.cut {
            if self.steps == at {
                self.cut_at_ns = Some(self.now);
            }
        }
        self.steps += 1;
        let mut did = self.source_host();
        did |= self.destination_host();
        self.drain();
        did
    }

    fn drain(&mut self) {
        while let Some(c) = self.src.poll_transmit(self.now) {
            self.trace.push(format!("src -> {c:?}"));
            self.send_down(Down::Record(c.repr()));
        }
        while let Some(e) = self.src.poll_event() {
            self.trace.push(format!("src event {e:?}"));
            if let SourceEvent::Failed(err) = e {
                // The host obeys custody: resume when told to run it.
                if err.custody == Custody::Runs {
                    self.src_running = true;
                }
            }
            if e == SourceEvent::Completed {
                self.src_running = false;
            }
        }
        while let Some(c) = self.dst.poll_transmit() {
            self.trace.push(format!("dst -> {c:?}"));
            self.send_up(c.repr());
        }
        while let Some(e) = self.dst.poll_event() {
            self.trace.push(format!("dst event {e:?}"));
            match e {
                DestinationEvent::CheckComplete => {
                    let torn = u64::from(!self.torn_once);
                    self.torn_once = true;
                    if torn > 0 {
                        self.send_up(ReturnRepr::Resend {
                            region: 0,
                            first: 0,
                            count: 1,
                        });
                    }
                    let _ = self.dst.handle_completeness(
                        self.now,
                        Completeness {
                            torn_pages: torn,
                            ..Completeness::default()
                        },
                    );
                }
                DestinationEvent::StartGuest => {
                    self.dst_running = true;
                    let _ = self.dst.guest_started(self.now);
                }
                DestinationEvent::FinishPostcopy => {
                    let _ = self.dst.postcopy_complete(self.now);
                }
                DestinationEvent::Failed(err) => {
                    if err.custody == Custody::Released {
                        self.dst_running = false;
                    }
                }
                DestinationEvent::Completed => {}
            }
        }
        if self.src.is_ended() && self.src_ended_at.is_none() {
            self.src_ended_at = Some(self.now);
        }
        if self.dst.is_ended() && self.dst_ended_at.is_none() {
            self.dst_ended_at = Some(self.now);
        }
    }

    fn source_host(&mut self) -> bool {
        let now = self.now;
        let mut did = false;
        if let Some(r) = self.up.pop_front() {
            did = true;
            if let Ok(SourceAction::Resend { .. }) = self.src.handle_return(now, &r) {
                {
                    self.resent += 1;
                    // The guest is paused: the intact page goes at once.
                    self.send_down(Down::Record(Repr::PageRun {
                        region: 0,
                        first: 0,
                        count: 1,
                        requested: false,
                        paused: false,
                    }));
                }
            }
        }
        if self.src.is_ended() {
            return did;
        }
        self.src.handle_timeout(now);
        match self.script {
            SrcStep::Rounds(n) if self.src.state() == MigrationState::Active => {
                self.send_down(Down::Bulk);
                self.script = if n == 0 {
                    SrcStep::Pause
                } else {
                    SrcStep::Rounds(n - 1)
                };
                did = true;
            }
            SrcStep::Pause => {
                self.src_running = false;
                self.src.pause(now, self.switchover).expect("pause");
                self.script = SrcStep::Finish;
                did = true;
            }
            SrcStep::Finish => {
                let cut = self.cut_down();
                self.src.drain_for_test(now, &mut self.down, cut);
                if self.switchover == Switchover::PostcopyRam {
                    // After the listen marker: the pages dirtied since they
                    // were sent, for the destination to drop.
                    self.send_down(Down::Record(DISCARD_MAP));
                } else {
                    self.src
                        .check_device_bytes(u64::from(self.section_len))
                        .expect("fits");
                    self.send_down(Down::Record(Repr::Section {
                        section: 1,
                        offset: 0,
                        len: self.section_len,
                        last: true,
                    }));
                }
                self.src.finish_stream(now).expect("finish");
                self.script = SrcStep::WaitStarted;
                did = true;
            }
            SrcStep::WaitStarted if self.src.state() == MigrationState::PostcopyActive => {
                self.script = SrcStep::Postcopy(2);
                did = true;
            }
            SrcStep::Postcopy(n) => {
                if n == 0 {
                    if self.switchover == Switchover::PostcopySections {
                        self.send_down(Down::Record(Repr::PostcopySection {
                            section: 2,
                            offset: 0,
                            len: 100,
                            last: true,
                        }));
                    }
                    self.src.finish_postcopy(now).expect("finish postcopy");
                    self.script = SrcStep::Done;
                } else {
                    self.send_down(Down::Bulk);
                    self.script = SrcStep::Postcopy(n - 1);
                }
                did = true;
            }
            _ => {}
        }
        did
    }

    fn destination_host(&mut self) -> bool {
        let now = self.now;
        let Some(m) = self.down.pop_front() else {
            self.dst.handle_timeout(now);
            return false;
        };
        if self.dst.is_ended() {
            return true;
        }
        match m {
            Down::Hello {
                channels,
                postcopy_ram,
            } => {
                let _ = self.dst.accept_hello(now, channels, postcopy_ram);
            }
            Down::Bulk => self.dst.note_activity(now),
            Down::Record(r) => {
                if self.dst.handle_record(now, &r).is_ok()
                    && matches!(r, Repr::PageRun { .. })
                    && self.dst.phase_name() == "verifying"
                {
                    let _ = self.dst.handle_completeness(now, Completeness::default());
                }
            }
        }
        self.dst.handle_timeout(now);
        true
    }

    /// Runs until both sides settle, then lets time pass past every bound.
    fn run(&mut self) {
        let mut idle = 0;
        while idle < 5 && self.steps < 10_000 {
            if self.step() {
                idle = 0;
            } else {
                idle += 1;
            }
        }
        let bound = Timeouts::DEFAULT.longest() + 2 * SEC;
        let until = self.now + bound;
        while self.now < until {
            self.now += 100 * MS;
            self.src.handle_timeout(self.now);
            self.dst.handle_timeout(self.now);
            self.drain();
        }
    }

    fn context(&self) -> String {
        format!(
            "cut {:?}; src {} ({:?}), dst {} ({:?})\n{}",
            self.cut,
            self.src.phase_name(),
            self.src.custody(),
            self.dst.phase_name(),
            self.dst.custody(),
            self.trace.join("\n")
        )
    }

    /// The promises that hold after any cut.
    fn check_invariants(&self) {
        let (s, d) = (self.src.custody(), self.dst.custody());
        assert!(
            !(s == Custody::Runs && d == Custody::Runs),
            "the guest runs on both sides: {}",
            self.context()
        );
        assert!(
            !(self.src_running && self.dst_running),
            "both hosts run the guest: {}",
            self.context()
        );
        assert!(
            matches!(s, Custody::Runs | Custody::Holds)
                || matches!(d, Custody::Runs | Custody::Holds),
            "nobody has the guest: {}",
            self.context()
        );
        // Every side settles within its bound: it ended, or (postcopy) it
        // holds what it has for the operator.
        let bound = Timeouts::DEFAULT.longest() + SEC;
        let start = self.cut_at_ns.unwrap_or(0);
        for (name, ended, ended_at, holds) in [
            (
                "source",
                self.src.is_ended(),
                self.src_ended_at,
                s == Custody::Holds && self.src.state().is_postcopy(),
            ),
            ("destination", self.dst.is_ended(), self.dst_ended_at, false),
        ] {
            assert!(
                ended || holds,
                "the {name} never settled: {}",
                self.context()
            );
            if let Some(t) = ended_at {
                assert!(
                    t <= start.max(self.steps as u64 * MS) + bound,
                    "the {name} took {} ms past the cut: {}",
                    (t - start) / MS,
                    self.context()
                );
            }
        }
    }
}

/// Test-only glue: hands out queued transmits the way a host would.
trait DrainForTest {
    fn drain_for_test(&mut self, now: u64, down: &mut VecDeque<Down>, cut: bool);
}

impl DrainForTest for SourceSession {
    fn drain_for_test(&mut self, now: u64, down: &mut VecDeque<Down>, cut: bool) {
        while let Some(c) = self.poll_transmit(now) {
            if !cut {
                down.push_back(Down::Record(c.repr()));
            }
        }
    }
}

fn clean_run(switchover: Switchover) -> Pair {
    let mut p = Pair::new(switchover, Cut::None);
    p.run();
    assert_eq!(p.src.custody(), Custody::Released, "{}", p.context());
    assert_eq!(p.dst.custody(), Custody::Runs, "{}", p.context());
    assert_eq!(p.src.state(), MigrationState::Completed, "{}", p.context());
    assert_eq!(p.dst.state(), MigrationState::Completed, "{}", p.context());
    assert!(p.dst_running && !p.src_running);
    p
}

#[test]
fn precopy_completes_on_started() {
    let p = clean_run(Switchover::StopAndCopy);
    // The torn page was asked for once and sent again before ready.
    assert_eq!(p.resent, 1, "{}", p.context());
    let go = p.trace.iter().position(|t| t == "src -> Go").unwrap();
    let started = p.trace.iter().position(|t| t == "dst -> Started").unwrap();
    let completed = p
        .trace
        .iter()
        .position(|t| t == "src event Completed")
        .unwrap();
    assert!(go < started && started < completed, "{}", p.context());
}

#[test]
fn postcopy_ram_completes_on_the_final_ready() {
    let p = clean_run(Switchover::PostcopyRam);
    assert!(p.trace.iter().any(|t| t == "src -> PostcopyListen"));
}

/// A discard map the source sends at a postcopy-RAM switchover.
const DISCARD_MAP: Repr = Repr::DiscardMap {
    region: 0,
    first: 64,
    count: 128,
};

/// A destination past the hello (asking for postcopy of RAM when
/// `postcopy_ram`), with the accept handed out.
fn receiving(postcopy_ram: bool) -> DestinationSession {
    let mut d = DestinationSession::new(0, Timeouts::DEFAULT, LIMITS);
    d.accept_hello(0, 2, postcopy_ram).unwrap();
    assert!(matches!(
        d.poll_transmit(),
        Some(DestinationControl::Accept(..))
    ));
    d
}

/// Checks that `d` refused a discard map in `state` as a protocol error,
/// failed, and tells the source.
fn refused_discard_map(
    d: &mut DestinationSession,
    now: u64,
    state: &'static str,
    custody: Custody,
) {
    let e = d.handle_record(now, &DISCARD_MAP).unwrap_err();
    assert_eq!(e.failure, Failure::Protocol { kind: 0x0b, state });
    assert_eq!(e.custody, custody);
    assert_eq!(d.failure(), Some(e), "the session failed");
    assert!(d.is_ended());
    assert!(std::iter::from_fn(|| d.poll_event()).any(|ev| ev == DestinationEvent::Failed(e)));
    assert_eq!(
        std::iter::from_fn(|| d.poll_transmit()).last(),
        Some(DestinationControl::Error(ErrorCode::Protocol))
    );
}

#[test]
fn discard_map_accepted_after_postcopy_listen_before_the_end() {
    let mut d = receiving(true);
    d.handle_record(1, &Repr::PostcopyListen).unwrap();
    d.handle_record(2, &DISCARD_MAP).unwrap();
    // The map may come in several chunks, and page runs still arrive.
    d.handle_record(
        3,
        &Repr::DiscardMap {
            region: 1,
            first: 0,
            count: 1,
        },
    )
    .unwrap();
    d.handle_record(
        4,
        &Repr::PageRun {
            region: 0,
            first: 0,
            count: 1,
            requested: false,
            paused: false,
        },
    )
    .unwrap();
    assert!(d.failure().is_none());
    d.handle_record(5, &Repr::End).unwrap();
    assert_eq!(d.mode(), ferry_core::session::Mode::Ram);
    assert_eq!(d.poll_event(), Some(DestinationEvent::CheckComplete));
}

#[test]
fn discard_map_before_postcopy_listen_is_refused() {
    let mut d = receiving(true);
    refused_discard_map(&mut d, 1, "receiving", Custody::Released);
    // Without postcopy of RAM, before any marker.
    let mut d = receiving(false);
    refused_discard_map(&mut d, 1, "receiving", Custody::Released);
}

#[test]
fn discard_map_outside_postcopy_ram_is_refused() {
    // Postcopy of sections: stop-and-copy, then listen.
    for postcopy_ram in [false, true] {
        let mut d = receiving(postcopy_ram);
        d.handle_record(1, &Repr::StopAndCopy).unwrap();
        d.handle_record(2, &Repr::PostcopyListen).unwrap();
        refused_discard_map(&mut d, 3, "receiving", Custody::Released);
    }
    // Precopy: stop-and-copy only.
    let mut d = receiving(true);
    d.handle_record(1, &Repr::StopAndCopy).unwrap();
    refused_discard_map(&mut d, 2, "receiving", Custody::Released);
}

#[test]
fn discard_map_after_the_end_is_refused() {
    let mut d = receiving(true);
    d.handle_record(1, &Repr::PostcopyListen).unwrap();
    d.handle_record(2, &Repr::End).unwrap();
    refused_discard_map(&mut d, 3, "verifying", Custody::Released);
    // Ready sent, go awaited.
    let mut d = receiving(true);
    d.handle_record(1, &Repr::PostcopyListen).unwrap();
    d.handle_record(2, &Repr::End).unwrap();
    d.handle_completeness(
        3,
        Completeness {
            missing_pages: 60,
            ..Completeness::default()
        },
    )
    .unwrap();
    refused_discard_map(&mut d, 4, "awaiting go", Custody::Released);
}

#[test]
fn discard_map_after_go_is_refused() {
    let mut d = receiving(true);
    d.handle_record(1, &Repr::PostcopyListen).unwrap();
    d.handle_record(2, &DISCARD_MAP).unwrap();
    d.handle_record(3, &Repr::End).unwrap();
    d.handle_completeness(
        4,
        Completeness {
            missing_pages: 60,
            ..Completeness::default()
        },
    )
    .unwrap();
    d.handle_record(5, &Repr::Go).unwrap();
    // Go arrived, the guest not started yet.
    let mut starting = d.clone();
    refused_discard_map(&mut starting, 6, "starting", Custody::Released);
    // The guest runs here in postcopy: its vCPUs wait on the missing pages.
    d.guest_started(6).unwrap();
    d.handle_record(7, &Repr::PostcopyRun).unwrap();
    refused_discard_map(&mut d, 8, "postcopy", Custody::Holds);
}

#[test]
fn postcopy_sections_complete() {
    let p = clean_run(Switchover::PostcopySections);
    assert!(p.trace.iter().any(|t| t == "src -> PostcopyListen"));
}

fn steps_of(switchover: Switchover) -> usize {
    let mut p = Pair::new(switchover, Cut::None);
    p.run();
    p.steps
}

#[test]
fn a_cut_at_every_step_loses_no_guest() {
    let mut cases = 0;
    for switchover in [
        Switchover::StopAndCopy,
        Switchover::PostcopyRam,
        Switchover::PostcopySections,
    ] {
        let n = steps_of(switchover);
        for at in 0..=n {
            for cut in [
                Cut::Stall { at, down: true },
                Cut::Stall { at, down: false },
                Cut::Reset { at },
            ] {
                let mut p = Pair::new(switchover, cut);
                p.run();
                p.check_invariants();
                cases += 1;
            }
        }
    }
    assert!(cases > 60, "only {cases} cuts were tried");
}

#[test]
fn ready_then_silence_holds_the_guest_and_never_completes() {
    // A destination that answers ready and vanishes: go goes out, started
    // never comes.
    let mut src = SourceSession::new(0, Timeouts::DEFAULT, 2);
    src.handle_return(
        MS,
        &ReturnRepr::Accept {
            max_channels: 2,
            max_device_bytes: 100,
            session: 0,
        },
    )
    .unwrap();
    src.pause(2 * MS, Switchover::StopAndCopy).unwrap();
    assert_eq!(src.poll_transmit(2 * MS), Some(SourceControl::StopAndCopy));
    src.finish_stream(3 * MS).unwrap();
    assert_eq!(src.poll_transmit(3 * MS), Some(SourceControl::End));
    src.handle_return(4 * MS, &ReturnRepr::Ready).unwrap();
    assert_eq!(src.custody(), Custody::Holds);
    assert_eq!(src.poll_transmit(5 * MS), Some(SourceControl::Go));
    assert!(src.go_sent());
    let deadline = src.poll_timeout().unwrap();
    assert_eq!(deadline, 5 * MS + Timeouts::DEFAULT.started);
    src.handle_timeout(deadline - 1);
    assert!(!src.is_ended());
    src.handle_timeout(deadline);
    let e = src.failure().unwrap();
    assert_eq!(
        e.failure,
        Failure::Timeout {
            wait: Wait::Started,
            after_ns: Timeouts::DEFAULT.started
        }
    );
    assert_eq!(
        e.custody,
        Custody::Holds,
        "never resumes on its own after go"
    );
    assert_ne!(src.state(), MigrationState::Completed);
    // A late ready or started changes nothing.
    assert!(src
        .handle_return(deadline + 1, &ReturnRepr::Started)
        .is_err());
    assert_eq!(src.custody(), Custody::Holds);
}

#[test]
fn a_stall_at_stop_and_copy_resumes_on_the_source() {
    let mut src = SourceSession::new(0, Timeouts::DEFAULT, 2);
    src.handle_return(
        MS,
        &ReturnRepr::Accept {
            max_channels: 2,
            max_device_bytes: 100,
            session: 0,
        },
    )
    .unwrap();
    src.pause(2 * MS, Switchover::StopAndCopy).unwrap();
    src.finish_stream(2 * MS).unwrap();
    while src.poll_transmit(3 * MS).is_some() {}
    let deadline = src.poll_timeout().unwrap();
    assert_eq!(deadline, 3 * MS + Timeouts::DEFAULT.ready);
    src.handle_timeout(deadline);
    let e = src.failure().unwrap();
    assert_eq!(e.custody, Custody::Runs);
    assert!(!src.go_sent());
    // Go is never handed out after the failure, even if ready arrives late.
    assert!(src.handle_return(deadline + 1, &ReturnRepr::Ready).is_err());
    assert_eq!(src.poll_transmit(deadline + 2), None);
}

#[test]
fn destination_waits_are_bounded() {
    let t = Timeouts::DEFAULT;
    // No hello.
    let mut d = DestinationSession::new(0, t, LIMITS);
    d.handle_timeout(t.handshake - 1);
    assert!(!d.is_ended());
    d.handle_timeout(t.handshake);
    assert_eq!(
        d.failure().unwrap().failure,
        Failure::Timeout {
            wait: Wait::Handshake,
            after_ns: t.handshake
        }
    );
    // Silence in precopy, measured from the last byte on any channel.
    let mut d = DestinationSession::new(0, t, LIMITS);
    d.accept_hello(0, 2, false).unwrap();
    assert_eq!(
        d.poll_transmit(),
        Some(DestinationControl::Accept(LIMITS, 0))
    );
    d.note_activity(5 * SEC);
    d.handle_timeout(5 * SEC + t.idle - 1);
    assert!(!d.is_ended());
    d.handle_timeout(5 * SEC + t.idle);
    assert_eq!(d.custody(), Custody::Released);
    assert_eq!(
        d.poll_transmit(),
        Some(DestinationControl::Error(ErrorCode::Io)),
        "the source is told why"
    );
    // Ready, then no go.
    let mut d = DestinationSession::new(0, t, LIMITS);
    d.accept_hello(0, 2, false).unwrap();
    d.handle_record(1, &Repr::StopAndCopy).unwrap();
    d.handle_record(2, &Repr::End).unwrap();
    d.handle_completeness(3, Completeness::default()).unwrap();
    d.handle_timeout(3 + t.go);
    assert!(!d.go_received());
    assert_eq!(d.custody(), Custody::Released);
    assert_eq!(
        d.failure().unwrap().failure,
        Failure::Timeout {
            wait: Wait::Go,
            after_ns: t.go
        }
    );
}

#[test]
fn ready_only_when_everything_arrived() {
    let t = Timeouts::DEFAULT;
    let start = |d: &mut DestinationSession| {
        d.accept_hello(0, 2, false).unwrap();
        d.handle_record(1, &Repr::StopAndCopy).unwrap();
        d.handle_record(2, &Repr::End).unwrap();
        while d.poll_transmit().is_some() {}
    };
    let mut d = DestinationSession::new(0, t, LIMITS);
    start(&mut d);
    let e = d
        .handle_completeness(
            3,
            Completeness {
                missing_pages: 1,
                ..Completeness::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.failure, Failure::Incomplete);
    assert_eq!(
        d.poll_transmit(),
        Some(DestinationControl::Error(ErrorCode::Protocol))
    );
    let mut d = DestinationSession::new(0, t, LIMITS);
    start(&mut d);
    let e = d
        .handle_completeness(
            3,
            Completeness {
                incomplete_sections: 1,
                ..Completeness::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.failure, Failure::Incomplete);
    // Torn pages: no ready yet, and the wait is bounded.
    let mut d = DestinationSession::new(0, t, LIMITS);
    start(&mut d);
    d.handle_completeness(
        3,
        Completeness {
            torn_pages: 2,
            ..Completeness::default()
        },
    )
    .unwrap();
    assert_eq!(d.poll_transmit(), None);
    d.handle_timeout(2 + t.resend);
    assert_eq!(
        d.failure().unwrap().failure,
        Failure::Timeout {
            wait: Wait::Resend,
            after_ns: t.resend
        }
    );
}

#[test]
fn out_of_order_records_end_the_session() {
    let t = Timeouts::DEFAULT;
    let fresh = || {
        let mut d = DestinationSession::new(0, t, LIMITS);
        d.accept_hello(0, 2, false).unwrap();
        d
    };
    // Go before ready.
    let mut d = fresh();
    assert!(d.handle_record(1, &Repr::Go).is_err());
    assert!(!d.go_received());
    // End without a stop-and-copy marker.
    let mut d = fresh();
    assert!(d.handle_record(1, &Repr::End).is_err());
    // Postcopy listen without the capability, not after a stop-and-copy.
    let mut d = fresh();
    assert!(d.handle_record(1, &Repr::PostcopyListen).is_err());
    // A second hello.
    let mut d = fresh();
    assert!(d.accept_hello(1, 2, false).is_err());
    // Go twice: the second is refused once the guest started.
    let mut d = fresh();
    d.handle_record(1, &Repr::StopAndCopy).unwrap();
    d.handle_record(2, &Repr::End).unwrap();
    d.handle_completeness(3, Completeness::default()).unwrap();
    d.handle_record(4, &Repr::Go).unwrap();
    d.guest_started(5).unwrap();
    assert!(d.handle_record(6, &Repr::Go).is_err());
    assert_eq!(d.custody(), Custody::Runs, "the guest runs on here");
}

#[test]
fn limits_are_enforced_on_both_sides() {
    let t = Timeouts::DEFAULT;
    // Too many channels.
    let mut d = DestinationSession::new(0, t, LIMITS);
    let e = d
        .accept_hello(0, LIMITS.max_channels + 1, false)
        .unwrap_err();
    assert_eq!(e.failure, Failure::OverLimit);
    assert_eq!(
        d.poll_transmit(),
        Some(DestinationControl::Error(ErrorCode::Handshake))
    );
    // A section flood stops at the cap.
    let mut d = DestinationSession::new(0, t, LIMITS);
    d.accept_hello(0, 2, false).unwrap();
    let chunk = 1 << 16;
    let mut accepted = 0u64;
    for i in 0..64u64 {
        let r = Repr::Section {
            section: 1,
            offset: i * chunk,
            len: chunk as u32,
            last: false,
        };
        if d.handle_record(i, &r).is_err() {
            break;
        }
        accepted += chunk;
    }
    assert_eq!(accepted, LIMITS.max_device_bytes);
    assert_eq!(d.failure().unwrap().failure, Failure::OverLimit);
    // The source refuses to go on when the destination serves fewer channels.
    let mut s = SourceSession::new(0, t, 5);
    let e = s
        .handle_return(
            1,
            &ReturnRepr::Accept {
                max_channels: 4,
                max_device_bytes: 0,
                session: 0,
            },
        )
        .unwrap_err();
    assert_eq!(e.failure, Failure::OverLimit);
    assert_eq!(e.custody, Custody::Runs);
    // ... and device state over the limit resumes the guest here.
    let mut s = SourceSession::new(0, t, 2);
    s.handle_return(
        1,
        &ReturnRepr::Accept {
            max_channels: 4,
            max_device_bytes: 10,
            session: 0,
        },
    )
    .unwrap();
    s.pause(2, Switchover::StopAndCopy).unwrap();
    let e = s.check_device_bytes(11).unwrap_err();
    assert_eq!(e.custody, Custody::Runs);
}

#[test]
fn cancel_only_before_go() {
    let t = Timeouts::DEFAULT;
    let mut s = SourceSession::new(0, t, 2);
    s.handle_return(
        1,
        &ReturnRepr::Accept {
            max_channels: 4,
            max_device_bytes: 10,
            session: 0,
        },
    )
    .unwrap();
    s.pause(2, Switchover::StopAndCopy).unwrap();
    s.finish_stream(3).unwrap();
    while s.poll_transmit(4).is_some() {}
    s.handle_return(5, &ReturnRepr::Ready).unwrap();
    // Go is queued but not handed out: cancelling still resumes here.
    let mut before = s.clone();
    before.cancel(6).unwrap();
    assert_eq!(before.custody(), Custody::Runs);
    assert_eq!(before.state(), MigrationState::Cancelled);
    assert_eq!(before.poll_transmit(7), None, "no go after a cancel");
    assert_eq!(s.poll_transmit(6), Some(SourceControl::Go));
    assert!(s.cancel(7).is_err());
    assert_eq!(s.custody(), Custody::Holds);
}

#[test]
fn an_error_from_the_destination_before_go_resumes_the_source() {
    let mut s = SourceSession::new(0, Timeouts::DEFAULT, 2);
    s.handle_return(
        1,
        &ReturnRepr::Accept {
            max_channels: 4,
            max_device_bytes: 10,
            session: 0,
        },
    )
    .unwrap();
    let e = s
        .handle_return(
            2,
            &ReturnRepr::Error {
                code: ErrorCode::Checksum,
                detail: 7,
            },
        )
        .unwrap_err();
    assert_eq!(e.custody, Custody::Runs);
    assert_eq!(
        e.failure,
        Failure::PeerError {
            code: ErrorCode::Checksum,
            detail: 7
        }
    );
    // Started before go is a protocol error, not a success.
    let mut s = SourceSession::new(0, Timeouts::DEFAULT, 2);
    assert!(s.handle_return(1, &ReturnRepr::Started).is_err());
    assert_eq!(s.custody(), Custody::Runs);
}

// ---- Resuming an interrupted postcopy ----

const SESSION: u32 = 0x1234_5678;

/// Both sides' sessions after a postcopy cut off: each takes it up again,
/// the destination asks for what it misses, and the final *ready* ends it.
#[test]
fn a_resumed_postcopy_completes_and_names_its_session() {
    let t = Timeouts::DEFAULT;
    // The session id the destination gives, and the source learns.
    let mut d0 = DestinationSession::new(0, t, LIMITS).with_session_id(SESSION);
    d0.accept_hello(0, 3, true).unwrap();
    let accept = d0.poll_transmit().unwrap();
    assert_eq!(accept, DestinationControl::Accept(LIMITS, SESSION));
    let mut s0 = SourceSession::new(0, t, 3);
    s0.handle_return(1, &accept.repr()).unwrap();
    assert_eq!(s0.session_id(), SESSION);

    let mut s = SourceSession::resume(0, t, 3, SESSION, Switchover::PostcopyRam);
    let mut d = DestinationSession::resume(0, t, LIMITS, SESSION, ferry_core::session::Mode::Ram);
    // Held from the start on both sides, paused in postcopy.
    assert_eq!(s.custody(), Custody::Holds);
    assert_eq!(d.custody(), Custody::Holds);
    assert_eq!(s.state(), MigrationState::PostcopyPaused);
    assert_eq!(d.state(), MigrationState::PostcopyPaused);
    assert!(s.go_sent() && d.go_received());
    assert!(s.cancel(1).is_err(), "a resume cannot be cancelled");
    d.accept_resume(1, 3, SESSION).unwrap();
    let accept = d.poll_transmit().unwrap();
    assert_eq!(accept, DestinationControl::Accept(LIMITS, SESSION));
    assert_eq!(d.state(), MigrationState::PostcopyActive);
    s.handle_return(2, &accept.repr()).unwrap();
    assert_eq!(s.state(), MigrationState::PostcopyActive);
    // Page requests are served again.
    assert!(matches!(
        s.handle_return(
            3,
            &ReturnRepr::PageRequest {
                region: 0,
                first: 5,
                count: 1
            }
        ),
        Ok(SourceAction::PageRequest { first: 5, .. })
    ));
    d.handle_record(4, &Repr::PostcopyRun).unwrap();
    s.finish_postcopy(5).unwrap();
    assert_eq!(s.poll_transmit(5), Some(SourceControl::End));
    d.handle_record(6, &Repr::End).unwrap();
    assert!(std::iter::from_fn(|| d.poll_event()).any(|e| e == DestinationEvent::FinishPostcopy));
    d.postcopy_complete(7).unwrap();
    let ready = d.poll_transmit().unwrap();
    assert_eq!(ready, DestinationControl::Ready);
    s.handle_return(8, &ready.repr()).unwrap();
    assert_eq!(s.custody(), Custody::Released);
    assert_eq!(d.custody(), Custody::Runs);
    assert_eq!(s.state(), MigrationState::Completed);
    assert_eq!(d.state(), MigrationState::Completed);
}

/// A resume that names another session is refused on each side, and each
/// keeps holding, paused in postcopy; so is a new migration's hello at a
/// destination that holds a guest for a resume, and a resume at a fresh one.
#[test]
fn a_resume_of_another_session_is_refused_and_both_sides_keep_holding() {
    let t = Timeouts::DEFAULT;
    let mode = ferry_core::session::Mode::Ram;
    let mut d = DestinationSession::resume(0, t, LIMITS, SESSION, mode);
    let e = d.accept_resume(1, 3, SESSION ^ 1).unwrap_err();
    assert_eq!(e.failure, Failure::WrongSession);
    assert_eq!(e.custody, Custody::Holds);
    assert_eq!(d.state(), MigrationState::PostcopyPaused);
    assert_eq!(
        d.poll_transmit(),
        Some(DestinationControl::Error(ErrorCode::Handshake))
    );

    let mut d = DestinationSession::resume(0, t, LIMITS, SESSION, mode);
    let e = d.accept_hello(1, 3, true).unwrap_err();
    assert_eq!(e.failure, Failure::WrongSession);
    assert_eq!(d.custody(), Custody::Holds);

    let mut d = DestinationSession::new(0, t, LIMITS).with_session_id(SESSION);
    let e = d.accept_resume(1, 3, SESSION).unwrap_err();
    assert_eq!(e.failure, Failure::WrongSession, "nothing to resume here");
    assert_eq!(d.custody(), Custody::Released);

    let mut s = SourceSession::resume(0, t, 3, SESSION, Switchover::PostcopyRam);
    let e = s
        .handle_return(
            1,
            &ReturnRepr::Accept {
                max_channels: 4,
                max_device_bytes: 0,
                session: SESSION + 1,
            },
        )
        .unwrap_err();
    assert_eq!(e.failure, Failure::WrongSession);
    assert_eq!(s.custody(), Custody::Holds);
    assert_eq!(s.state(), MigrationState::PostcopyPaused);
    assert_eq!(s.poll_transmit(2), None, "nothing goes out");
}

/// The resume's waits are bounded, and running out of them leaves both
/// sides holding, paused in postcopy (so the next resume can try again).
#[test]
fn a_resume_that_times_out_keeps_the_guest_held() {
    let t = Timeouts::DEFAULT;
    let mut s = SourceSession::resume(0, t, 3, SESSION, Switchover::PostcopyRam);
    s.handle_timeout(t.handshake);
    assert_eq!(
        s.failure().unwrap().failure,
        Failure::Timeout {
            wait: Wait::Handshake,
            after_ns: t.handshake
        }
    );
    assert_eq!(s.custody(), Custody::Holds);
    assert_eq!(s.state(), MigrationState::PostcopyPaused);
    let mut d = DestinationSession::resume(0, t, LIMITS, SESSION, ferry_core::session::Mode::Ram);
    d.handle_timeout(t.handshake);
    assert_eq!(d.custody(), Custody::Holds);
    assert_eq!(d.state(), MigrationState::PostcopyPaused);
    // Accepted, then the link breaks again: still held, still paused.
    let mut d = DestinationSession::resume(0, t, LIMITS, SESSION, ferry_core::session::Mode::Ram);
    d.accept_resume(1, 3, SESSION).unwrap();
    d.link_failed(2);
    assert_eq!(d.custody(), Custody::Holds);
    assert_eq!(d.state(), MigrationState::PostcopyPaused);
}
