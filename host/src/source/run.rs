//! The source's migration, phase by phase: precopy rounds until the policy
//! decides, the stop-and-copy, the handover, then postcopy or completion.
//! The session ([`SourceSession`]) admits every step and owns every timer.

use std::sync::mpsc::{self, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use ferry_core::bitmap::DirtyBitmap;
use ferry_core::pending::{Pending, Query, Sections};
use ferry_core::policy::{self, Capabilities as PolicyCaps, Decision, Inputs};
use ferry_core::rate::{self, RateEstimator, DEFAULT_WINDOW_NS};
use ferry_core::session::{Custody, Switchover};
use ferry_core::wire::{Negotiated, MAX_RUN_PAGES};
use ferry_uring::AnyChannel;

use super::postcopy::PostcopyWork;
use super::stall::SendProgress;
use super::{
    count_bits, dispatch, flush_all, join_senders_list, or_into, sender_thread, words_bytes, Cut,
    DevicePending, Job, RamPending, SenderError, SenderStats, SnapshotPending, Source, SourceError,
    SourceHold, BATCH_BYTES,
};
use crate::dirty::{DirtyError, DirtyTracker};
use crate::migration::{
    monotonic_ns, Event, GuestControl, RoundProgress, SourcePostcopyReport, SourceReport,
    SNAPSHOT_BITMAP_SECTION,
};
use crate::postcopy::PostcopyMode;
use crate::ram::{Ram, RamRegion, PAGE_SIZE};

/// How long a source whose bulk channel failed waits for the destination's
/// error record, which says why.
const REASON_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A bulk sender thread's handle.
pub(super) type SenderHandle<'s> = ScopedJoinHandle<'s, Result<SenderStats, SenderError>>;

/// The bulk sender threads and the queues that feed them.
pub(super) struct Senders<'s> {
    jobs: Option<Vec<SyncSender<Job>>>,
    handles: Option<Vec<SenderHandle<'s>>>,
}

impl Senders<'_> {
    fn jobs(&self) -> &[SyncSender<Job>] {
        self.jobs.as_deref().unwrap_or(&[])
    }

    /// Closes the queues and joins the threads.
    fn stop(&mut self) -> Result<SenderStats, SourceError> {
        self.jobs = None;
        self.handles
            .take()
            .map(join_senders_list)
            .unwrap_or(Ok(SenderStats::default()))
    }

    /// Stops after `e`; a sender that died knows better why than "it
    /// stopped", so its cause wins over [`SourceError::SenderStopped`].
    fn stop_after(&mut self, e: SourceError) -> SourceError {
        match (e, self.stop()) {
            (SourceError::SenderStopped, Err(cause)) => cause,
            (e, _) => e,
        }
    }
}

fn stopped_early(_: mpsc::SendError<Job>) -> SourceError {
    SourceError::SenderStopped
}

/// Ends the stall watchdog when dropped.
struct Finish<'a>(&'a SendProgress);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Starts one sender thread per bulk channel.
fn spawn_senders<'s, 'e, 'm: 's>(
    scope: &'s Scope<'s, 'e>,
    bulk: Vec<AnyChannel>,
    ram: &'s Ram<'m>,
    neg: &'s Negotiated,
    cap: Option<u64>,
    progress: &'s SendProgress,
) -> Senders<'s> {
    let mut jobs = Vec::with_capacity(bulk.len());
    let mut handles = Vec::with_capacity(bulk.len());
    for (i, chan) in bulk.into_iter().enumerate() {
        let (tx, rx) = mpsc::sync_channel::<Job>(8);
        jobs.push(tx);
        handles.push(scope.spawn(move || sender_thread(i, chan, rx, ram, neg, cap, progress)));
    }
    Senders {
        jobs: Some(jobs),
        handles: Some(handles),
    }
}

/// What the source carries from round to round.
pub(super) struct Rounds<'m> {
    regions: Vec<RamRegion<'m>>,
    pages: Vec<u64>,
    bitmaps: Vec<Vec<u64>>,
    snapshot: Option<Vec<Vec<u64>>>,
    snapshot_bytes: u64,
    bandwidth: RateEstimator<64>,
    dirty_rate: RateEstimator<64>,
    last_sync: u64,
    sent_total: u64,
    max_run: u32,
    report: SourceReport,
}

/// How precopy ended.
struct Converged {
    decision: Decision,
    threshold: u64,
    bandwidth: u64,
    rounds: u32,
    pending: Pending,
}

impl Converged {
    fn switchover(&self) -> Switchover {
        match self.decision {
            Decision::Switchover { ram_postcopy: true } => Switchover::PostcopyRam,
            Decision::Switchover {
                ram_postcopy: false,
            } => Switchover::PostcopySections,
            _ => Switchover::StopAndCopy,
        }
    }
}

impl<'r, 'm> Source<'r, 'm> {
    pub(super) fn run<T: DirtyTracker, G: GuestControl>(
        &mut self,
        tracker: &mut T,
        guest: &mut G,
        events: &mut dyn FnMut(&Event),
    ) -> Result<SourceReport, SourceError> {
        // Connecting, the handshake and setting up the channels (io_uring
        // rings, guest RAM registered as fixed buffers) happened before this.
        let setup_ns = self.elapsed_ns();
        let mut st = self.rounds_state();
        let (ram, neg) = (self.ram, self.neg);
        let bulk = std::mem::take(&mut self.bulk);
        let wakers = std::mem::take(&mut self.bulk_wakers);
        let cap = self
            .config
            .bandwidth_cap
            .map(|c| (c / bulk.len().max(1) as u64).max(1));
        let progress = SendProgress::default();
        let stall_bound = self.stall_bound();
        let result = std::thread::scope(|scope| -> Result<SourceReport, SourceError> {
            scope.spawn(|| progress.watch(stall_bound, &wakers));
            // The watchdog ends with the migration, on every path.
            let _finish = Finish(&progress);
            let mut senders = spawn_senders(scope, bulk, ram, &neg, cap, &progress);
            let conv = match self.precopy(&mut st, tracker, guest, senders.jobs(), events) {
                Ok(c) => c,
                Err(e) => {
                    let e = senders.stop_after(e);
                    return Err(self.destination_reason(e, REASON_WAIT));
                }
            };
            let how = conv.switchover();
            if let Err(source) = guest.pause() {
                let _ = senders.stop();
                return Err(SourceError::Guest {
                    what: "pause",
                    source,
                });
            }
            let paused_at = monotonic_ns();
            events(&Event::Paused);
            let mut pc = SourcePostcopyReport {
                mode: if how == Switchover::PostcopyRam {
                    PostcopyMode::Ram
                } else {
                    PostcopyMode::Sections
                },
                ..SourcePostcopyReport::default()
            };
            let copied =
                self.stop_and_copy(&mut st, tracker, guest, &mut senders, how, &mut pc, events);
            if let Err(e) = copied {
                // Before go: the session never handed it out, so the guest
                // is resumed here.
                self.session.local_failure(self.elapsed_ns());
                let _ = senders.stop();
                guest.resume().map_err(|source| SourceError::Guest {
                    what: "resume",
                    source,
                })?;
                events(&Event::ResumedOnSource);
                return Err(e);
            }
            self.send_go(&mut st.report, &conv, paused_at, &mut senders, events)?;
            if how == Switchover::StopAndCopy {
                // Precopy: success only on started.
                if let Err(e) = self.await_started(&mut st.report) {
                    let _ = senders.stop();
                    return Err(e);
                }
                events(&Event::Started);
            } else {
                // Postcopy: the destination's guest may fault before it can
                // answer started, so the request server runs first and
                // postcopy awaits started before its end of stream.
                let pages_left: u64 = st.bitmaps.iter().map(|b| count_bits(b)).sum();
                let go = Instant::now();
                let work = PostcopyWork {
                    bitmaps: &mut st.bitmaps,
                    pages: &st.pages,
                    jobs: senders.jobs.take(),
                    senders: senders.handles.take(),
                    snapshot: st.snapshot.as_deref(),
                    max_run: st.max_run,
                };
                let outcome = self.postcopy(scope, work, &mut st.report, &mut pc, events);
                pc.postcopy_ns = go.elapsed().as_nanos() as u64;
                if let Err(e) = outcome {
                    self.session.link_failed(self.elapsed_ns());
                    return Err(match e {
                        e @ SourceError::PostcopyInterrupted { .. } => e,
                        e => SourceError::PostcopyInterrupted {
                            why: Box::new(e),
                            pages_left,
                            hold: Box::new(self.hold(st.snapshot.as_deref())),
                        },
                    });
                }
                st.report.postcopy = Some(pc);
                events(&Event::Completed);
            }
            self.completed(st.report, setup_ns)
        });
        match result {
            // Senders woken by the stall watchdog fail with their sockets;
            // the stall is the cause.
            Err(SourceError::SenderStopped | SourceError::Sender(_)) if progress.stalled() => {
                Err(SourceError::Stalled {
                    after_ms: u64::try_from(stall_bound.as_millis()).unwrap_or(u64::MAX),
                })
            }
            r => r,
        }
    }

    /// Takes up an interrupted postcopy after the resume's handshake: the
    /// destination asks for what it misses; the postcopy-only sections go
    /// again; the final *ready* completes it.
    pub(super) fn resume(
        &mut self,
        hold: &SourceHold,
        events: &mut dyn FnMut(&Event),
    ) -> Result<SourceReport, SourceError> {
        let setup_ns = self.elapsed_ns();
        let mut st = self.rounds_state();
        let (ram, neg) = (self.ram, self.neg);
        let bulk = std::mem::take(&mut self.bulk);
        let wakers = std::mem::take(&mut self.bulk_wakers);
        let progress = SendProgress::default();
        let stall_bound = self.stall_bound();
        std::thread::scope(|scope| -> Result<SourceReport, SourceError> {
            scope.spawn(|| progress.watch(stall_bound, &wakers));
            let _finish = Finish(&progress);
            let mut senders = spawn_senders(scope, bulk, ram, &neg, None, &progress);
            let mut pc = SourcePostcopyReport {
                mode: if hold.switchover == Switchover::PostcopyRam {
                    PostcopyMode::Ram
                } else {
                    PostcopyMode::Sections
                },
                ..SourcePostcopyReport::default()
            };
            // Nothing to stream of our own: every page the destination
            // misses, it asks for.
            let work = PostcopyWork {
                bitmaps: &mut st.bitmaps,
                pages: &st.pages,
                jobs: senders.jobs.take(),
                senders: senders.handles.take(),
                snapshot: hold.snapshot.as_deref(),
                max_run: st.max_run,
            };
            let t = Instant::now();
            let outcome = self.postcopy(scope, work, &mut st.report, &mut pc, events);
            pc.postcopy_ns = t.elapsed().as_nanos() as u64;
            outcome?;
            st.report.postcopy = Some(pc);
            events(&Event::Completed);
            self.completed(st.report, setup_ns)
        })
    }

    /// How long a send may make no progress: the time allowed to converge,
    /// and never more than the idle bound.
    fn stall_bound(&self) -> Duration {
        let idle = Duration::from_nanos(self.config.timeouts.idle);
        self.config.give_up_after.map_or(idle, |g| g.min(idle))
    }

    fn rounds_state(&self) -> Rounds<'m> {
        let regions: Vec<RamRegion<'m>> = self.ram.regions().to_vec();
        let pages: Vec<u64> = regions.iter().map(|r| r.pages()).collect();
        let bitmaps: Vec<Vec<u64>> = pages
            .iter()
            .map(|&p| vec![0u64; p.div_ceil(64) as usize])
            .collect();
        Rounds {
            snapshot: self.config.snapshot_bitmap.then(|| bitmaps.clone()),
            snapshot_bytes: bitmaps.iter().map(|b| b.len() as u64 * 8).sum(),
            regions,
            pages,
            bitmaps,
            bandwidth: RateEstimator::new(DEFAULT_WINDOW_NS),
            dirty_rate: RateEstimator::new(DEFAULT_WINDOW_NS),
            last_sync: 0,
            sent_total: 0,
            max_run: self.config.max_run_pages.clamp(1, MAX_RUN_PAGES),
            report: SourceReport {
                transport: self.transport_name.clone(),
                ..SourceReport::default()
            },
        }
    }

    /// Precopy rounds until the policy decides anything but `Iterate`, or
    /// the time allowed runs out.
    fn precopy<T: DirtyTracker, G: GuestControl>(
        &mut self,
        st: &mut Rounds<'m>,
        tracker: &mut T,
        guest: &mut G,
        jobs: &[SyncSender<Job>],
        events: &mut dyn FnMut(&Event),
    ) -> Result<Converged, SourceError> {
        tracker.start()?;
        // Round 0: every page.
        for (b, &p) in st.bitmaps.iter_mut().zip(&st.pages) {
            DirtyBitmap::new(b, p as usize)
                .map_err(SourceError::Bitmap)?
                .set_all();
        }
        let mut previous: Option<Pending> = None;
        st.last_sync = self.elapsed_ns();
        let mut round = 0u32;
        loop {
            self.stream_round(st, tracker, jobs, round)?;
            let (decision, threshold, query) =
                self.decide(st, tracker, guest, previous, round, events)?;
            if decision != Decision::Iterate {
                return Ok(Converged {
                    decision,
                    threshold,
                    bandwidth: st.bandwidth.bytes_per_sec(),
                    rounds: round,
                    pending: query.pending,
                });
            }
            self.check_give_up(st, round, &query, threshold)?;
            // Make sure the next round sends what is dirty now.
            if !query.exact {
                self.sync_all(st, tracker)?;
            }
            previous = Some(query.pending);
            round = round.saturating_add(1);
        }
    }

    /// Streams what the bitmaps hold and folds in resend requests.
    fn stream_round<T: DirtyTracker>(
        &mut self,
        st: &mut Rounds<'m>,
        tracker: &mut T,
        jobs: &[SyncSender<Job>],
        round: u32,
    ) -> Result<(), SourceError> {
        let t0 = self.elapsed_ns();
        if round > 0 {
            if let Some(snap) = st.snapshot.as_mut() {
                or_into(snap, &st.bitmaps);
            }
        }
        let bytes = dispatch(
            Some(tracker),
            &mut st.bitmaps,
            &st.pages,
            jobs,
            st.max_run,
            Cut {
                detect_zero: round == 0,
                paused: false,
                batch_bytes: BATCH_BYTES,
            },
        )?;
        flush_all(jobs)?;
        if round == 0 && self.config.postcopy_after_first_pass {
            self.config.postcopy.start_postcopy();
        }
        let t1 = self.elapsed_ns();
        if bytes > 0 {
            // A zero-length interval cannot happen: `max` makes it one ns.
            let _ = st.bandwidth.record(bytes, t0, t1.max(t0 + 1));
        }
        st.sent_total += bytes;
        self.poll_returns(&mut st.bitmaps, &mut st.report)
    }

    /// The pending figure (the estimate, or the exact one when it fits) and
    /// the policy's decision on it; reports the round.
    fn decide<T: DirtyTracker, G: GuestControl>(
        &mut self,
        st: &mut Rounds<'m>,
        tracker: &mut T,
        guest: &mut G,
        previous: Option<Pending>,
        round: u32,
        events: &mut dyn FnMut(&Event),
    ) -> Result<(Decision, u64, Query), SourceError> {
        let limit_ns = u64::try_from(self.config.downtime_limit.as_nanos()).unwrap_or(u64::MAX);
        let threshold = rate::threshold(st.bandwidth.bytes_per_sec(), limit_ns);
        let now = self.elapsed_ns();
        let mut newly = 0u64;
        let query = {
            let mut ram_s = RamPending {
                tracker,
                bitmaps: &mut st.bitmaps,
                dirty_rate: st.dirty_rate.bytes_per_sec(),
                since_sync_ns: now - st.last_sync,
                newly: &mut newly,
                compatible: self.neg.caps.postcopy_ram,
            };
            let mut dev_s = DevicePending(guest.device_state_estimate());
            let mut snap_s = SnapshotPending(st.snapshot_bytes);
            let mut set: Sections<'_, DirtyError, 4> = Sections::new();
            set.add(&mut ram_s).map_err(SourceError::Pending)?;
            set.add(&mut dev_s).map_err(SourceError::Pending)?;
            if st.snapshot.is_some() {
                set.add(&mut snap_s).map_err(SourceError::Pending)?;
            }
            set.query(threshold)?
        };
        if query.exact {
            let _ =
                st.dirty_rate
                    .record(newly * PAGE_SIZE, st.last_sync, now.max(st.last_sync + 1));
            st.last_sync = now;
        }
        let decision = policy::decide(&Inputs {
            pending: query.pending,
            previous,
            threshold,
            floor: self.config.floor_bytes,
            caps: PolicyCaps {
                postcopy_ram: self.neg.caps.postcopy_ram,
                postcopy_only_sections: self.neg.caps.postcopy_only_sections,
            },
            start_postcopy: self.config.postcopy.requested(),
            in_postcopy: false,
            can_switchover: true,
        })
        .map_err(SourceError::Policy)?;
        let bw = st.bandwidth.bytes_per_sec();
        events(&Event::Round(RoundProgress {
            round,
            pending_bytes: query.pending.total(),
            sent_bytes: st.sent_total,
            bandwidth: bw,
            dirty_rate: st.dirty_rate.bytes_per_sec(),
            threshold,
            expected_downtime_ns: rate::expected_downtime_ns(query.pending.total(), bw),
            elapsed_ns: now,
        }));
        Ok((decision, threshold, query))
    }

    /// Gives up, with the guest still running, once the time allowed passed.
    fn check_give_up(
        &self,
        st: &Rounds<'m>,
        round: u32,
        query: &Query,
        threshold: u64,
    ) -> Result<(), SourceError> {
        match self.config.give_up_after {
            Some(limit) if self.started.elapsed() > limit => Err(SourceError::NotConverging {
                elapsed_s: self.started.elapsed().as_secs_f64(),
                rounds: round,
                pending: query.pending.total(),
                threshold,
                dirty_rate: st.dirty_rate.bytes_per_sec(),
                bandwidth: st.bandwidth.bytes_per_sec(),
            }),
            _ => Ok(()),
        }
    }

    /// Syncs every region's dirty log into the bitmaps.
    fn sync_all<T: DirtyTracker>(
        &mut self,
        st: &mut Rounds<'m>,
        tracker: &mut T,
    ) -> Result<(), SourceError> {
        let now = self.elapsed_ns();
        let mut newly = 0;
        for (r, words) in st.bitmaps.iter_mut().enumerate() {
            newly += tracker.sync(r, words)?;
        }
        let _ = st
            .dirty_rate
            .record(newly * PAGE_SIZE, st.last_sync, now.max(st.last_sync + 1));
        st.last_sync = now;
        Ok(())
    }

    /// With the guest paused: the marker, the last pages (or, for postcopy
    /// RAM, the discards), the device state, the end of the stream, and
    /// *ready*. Any error leaves the guest to be resumed here.
    #[allow(clippy::too_many_arguments)]
    fn stop_and_copy<T: DirtyTracker, G: GuestControl>(
        &mut self,
        st: &mut Rounds<'m>,
        tracker: &mut T,
        guest: &mut G,
        senders: &mut Senders<'_>,
        how: Switchover,
        pc: &mut SourcePostcopyReport,
        events: &mut dyn FnMut(&Event),
    ) -> Result<(), SourceError> {
        let now = self.elapsed_ns();
        self.session.pause(now, how).map_err(SourceError::Session)?;
        self.final_pages(st, tracker, senders, how, pc)?;
        self.send_device_state(st, guest, how)?;
        // The postcopy listen marker (postcopy-only sections), then the end
        // of the stream.
        let now = self.elapsed_ns();
        self.session
            .finish_stream(now)
            .map_err(SourceError::Session)?;
        self.flush_session()?;
        events(&Event::AwaitingReady);
        let fold = (how == Switchover::PostcopyRam).then_some(&mut st.bitmaps[..]);
        self.await_ready(&st.regions, &mut st.report, fold)
    }

    /// The final sync and what it found: sent (stop-and-copy), or discarded
    /// on the destination and left for the background stream (postcopy RAM).
    fn final_pages<T: DirtyTracker>(
        &mut self,
        st: &mut Rounds<'m>,
        tracker: &mut T,
        senders: &mut Senders<'_>,
        how: Switchover,
        pc: &mut SourcePostcopyReport,
    ) -> Result<(), SourceError> {
        let ram_postcopy = how == Switchover::PostcopyRam;
        if !ram_postcopy {
            // The stop-and-copy marker.
            self.flush_session()?;
        }
        let t = Instant::now();
        for (r, words) in st.bitmaps.iter_mut().enumerate() {
            tracker.sync(r, words)?;
        }
        st.report.final_sync_ns = t.elapsed().as_nanos() as u64;
        if let Some(snap) = st.snapshot.as_mut() {
            or_into(snap, &st.bitmaps);
        }
        self.poll_returns(&mut st.bitmaps, &mut st.report)?;
        if ram_postcopy {
            // The postcopy listen marker on control, then the pages dirty
            // now: they changed after they were sent, so the destination
            // drops whatever copy it has of them; they come in the
            // background or on demand. One bitmap on control, whatever
            // their number. Then a marker on every bulk channel: the
            // destination arms once each is in, so no copy from before the
            // pause arrives after (each round ended with its runs handed to
            // the kernel, so only the sockets' backlog is ahead of them).
            self.flush_session()?;
            let (pages, bytes) = self.send_discard_map(&st.bitmaps)?;
            pc.pages_discarded = pages;
            pc.discard_map_bytes = bytes;
            st.report.bytes_sent += bytes;
            for j in senders.jobs() {
                j.send(Job::Marker).map_err(stopped_early)?;
            }
            return Ok(());
        }
        let sent = dispatch(
            Some(tracker),
            &mut st.bitmaps,
            &st.pages,
            senders.jobs(),
            st.max_run,
            Cut {
                detect_zero: false,
                paused: true,
                batch_bytes: BATCH_BYTES,
            },
        )
        .and_then(|_| {
            senders
                .jobs()
                .iter()
                .try_for_each(|j| j.send(Job::End).map_err(stopped_early))
        });
        let stats = match sent.and_then(|()| senders.stop()) {
            Ok(stats) => stats,
            Err(e) => {
                let e = senders.stop_after(e);
                return Err(self.destination_reason(e, REASON_WAIT));
            }
        };
        st.report.bytes_sent = stats.bytes;
        st.report.pages_sent = stats.pages;
        st.report.zero_pages = stats.zero_pages;
        Ok(())
    }

    /// The device state, checked against the destination's limit, and (in
    /// the classic behaviour) the postcopy-only section inside the downtime.
    fn send_device_state<G: GuestControl>(
        &mut self,
        st: &mut Rounds<'m>,
        guest: &mut G,
        how: Switchover,
    ) -> Result<(), SourceError> {
        let sections = guest.device_state().map_err(|source| SourceError::Guest {
            what: "save the device state of",
            source,
        })?;
        let device_bytes: u64 = sections.iter().map(|s| s.bytes.len() as u64).sum();
        self.session
            .check_device_bytes(device_bytes)
            .map_err(SourceError::Session)?;
        for s in &sections {
            st.report.device_bytes += s.bytes.len() as u64;
            st.report.bytes_sent += self.send_section(s.id, &s.bytes, false)?;
        }
        if let (Some(snap), Switchover::StopAndCopy) = (st.snapshot.as_ref(), how) {
            let bytes = words_bytes(snap);
            st.report.bytes_sent += self.send_section(SNAPSHOT_BITMAP_SECTION, &bytes, false)?;
        }
        Ok(())
    }

    /// Hands out *go*: from here the guest is held paused until *started*.
    fn send_go(
        &mut self,
        report: &mut SourceReport,
        conv: &Converged,
        paused_at: u64,
        senders: &mut Senders<'_>,
        events: &mut dyn FnMut(&Event),
    ) -> Result<(), SourceError> {
        if let Err(e) = self.flush_session() {
            self.session.link_failed(self.elapsed_ns());
            let _ = senders.stop();
            return Err(SourceError::AfterGo(Box::new(e)));
        }
        let go_at = monotonic_ns();
        events(&Event::GoSent);
        report.rounds = conv.rounds;
        report.threshold = conv.threshold;
        report.bandwidth = conv.bandwidth;
        report.final_pending = conv.pending.total();
        report.paused_at_ns = paused_at;
        report.go_at_ns = go_at;
        report.source_downtime_ns = go_at.saturating_sub(paused_at);
        Ok(())
    }

    /// The report, once the session says the destination has the guest.
    fn completed(
        &self,
        mut report: SourceReport,
        setup_ns: u64,
    ) -> Result<SourceReport, SourceError> {
        if !self.session.is_ended() || self.session.custody() != Custody::Released {
            return Err(SourceError::GoUnconfirmed {
                why: super::Unconfirmed::NotCompleted {
                    phase: self.session.phase_name(),
                },
            });
        }
        let total_ns = self.elapsed_ns();
        report.total_ns = total_ns;
        report.throughput =
            (u128::from(report.bytes_sent) * 1_000_000_000 / u128::from(total_ns.max(1))) as u64;
        report.setup_ns = setup_ns;
        report.transfer_throughput = (u128::from(report.bytes_sent) * 1_000_000_000
            / u128::from(total_ns.saturating_sub(setup_ns).max(1)))
            as u64;
        Ok(report)
    }
}
