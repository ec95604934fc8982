//! The source side of a migration: precopy rounds, the switchover decision,
//! the stop-and-copy and the *ready* / *go* handshake.
//!
//! The loop: arm dirty tracking; a first pass over every page (zero pages as
//! zero runs); then rounds of — ask for the pending figure (the estimate, or
//! the exact figure, which re-syncs the dirty log, when the estimate fits the
//! threshold), decide with [`ferry_core::policy::decide`], and on `Iterate`
//! sync, re-arm exactly the pages about to be sent, and stream them. On
//! `Complete`: pause the guest, final sync and send, device state, then wait
//! for *ready* and send *go*. A failure before *ready* resumes the guest here;
//! after *go* the guest belongs to the destination.
//!
//! Bulk channels are driven by one sender thread each, which computes payload
//! checksums and hands records to the transport; the control channel is
//! driven from the calling thread; a third kind of thread reads the return
//! path.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use ferry_core::bitmap::DirtyBitmap;
use ferry_core::pending::{Pending, Section, Sections};
use ferry_core::policy::{self, Capabilities as PolicyCaps, Decision, Inputs};
use ferry_core::rate::{self, RateEstimator, DEFAULT_WINDOW_NS};
use ferry_core::state::{MigrationState, StateMachine};
use ferry_core::wire::{
    self, Capabilities, Hello, Negotiated, Repr, ReturnRepr, StreamEncoder, HEADER_LEN,
    MAX_RUN_PAGES, MAX_SECTION_CHUNK,
};
use ferry_uring::{share_out, AnyChannel, Channel, OutRecord, Payload, ProbeReport, Transport};

use crate::dirty::{DirtyError, DirtyTracker};
use crate::link::{self, Endpoint, LinkError, ReturnMsg};
use crate::migration::{
    monotonic_ns, CallbackError, Event, GuestControl, RoundProgress, SourceConfig, SourceReport,
};
use crate::ram::{Ram, RamRegion, PAGE_SIZE};

/// Records per batch handed to a sender thread.
const BATCH: usize = 256;
/// Payload bytes per batch: the sender checksums a batch just before handing
/// it to the transport, so a small batch keeps the window in which a guest
/// write tears a page (checksum taken, bytes not yet sent) short.
const BATCH_BYTES: u64 = 2 << 20;
/// Bitmap words re-armed and scanned at a time (64 Ki pages, 256 MiB).
const CHUNK_WORDS: usize = 1024;

/// Why a migration failed on the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connecting or the handshake failed; the guest was never paused.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The transport failed.
    #[error("the {channel} channel failed: {source}")]
    Transport {
        /// Which channel.
        channel: String,
        /// What the transport said.
        source: ferry_uring::Error,
    },
    /// The dirty tracker failed.
    #[error("dirty tracking failed: {0}")]
    Dirty(#[from] DirtyError),
    /// A callback of the embedding hypervisor failed.
    #[error("could not {what} the guest: {source}")]
    Guest {
        /// "pause", "resume" or "save the device state of".
        what: &'static str,
        /// Its error.
        source: CallbackError,
    },
    /// The destination reported an error or went away.
    #[error("the destination failed: {0}")]
    Destination(String),
    /// The migration did not converge in the time allowed.
    #[error(
        "the migration is not converging: after {elapsed_s:.1} s and {rounds} rounds, {pending} bytes are still pending against a threshold of {threshold} bytes (the guest dirties {dirty_rate} B/s, the link carries {bandwidth} B/s); the guest keeps running on the source"
    )]
    NotConverging {
        /// Seconds since the start.
        elapsed_s: f64,
        /// Rounds run.
        rounds: u32,
        /// Bytes pending at the last decision.
        pending: u64,
        /// The threshold at the last decision.
        threshold: u64,
        /// Dirty rate, bytes/s.
        dirty_rate: u64,
        /// Bandwidth, bytes/s.
        bandwidth: u64,
    },
    /// The destination did not answer *ready* in time.
    #[error("the destination did not answer ready within {0:?}")]
    ReadyTimeout(Duration),
    /// The policy refused its inputs.
    #[error("the switchover policy refused: {0}")]
    Policy(policy::PolicyError),
    /// The destination asked for something this build does not do.
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    /// The connection failed after *go* was sent: the guest stays paused on
    /// the source; whether the destination runs it is for the destination's
    /// report to say.
    #[error("the connection failed after go was sent ({0}); the guest stays paused here: check whether the destination received go before resuming anything")]
    AfterGo(String),
    /// A sender thread died.
    #[error("a sender thread failed: {0}")]
    Thread(String),
    /// Encoding a record failed (a bug).
    #[error("could not encode a record: {0}")]
    Emit(wire::EmitError),
}

/// How the source connects.
#[derive(Clone, Debug)]
pub struct SourceLink {
    /// Where the destination listens.
    pub endpoint: Endpoint,
    /// Which transport to use.
    pub transport: Transport,
    /// Bulk channels (at least 1).
    pub bulk_channels: usize,
}

/// One unit of work for a sender thread.
#[derive(Clone, Copy, Debug)]
struct PageWork {
    region: u16,
    first: u64,
    count: u32,
    /// First pass: check for zero pages and send them as zero runs.
    detect_zero: bool,
}

enum Job {
    Pages(Vec<PageWork>),
    Flush(SyncSender<Result<(), String>>),
    End,
}

#[derive(Clone, Copy, Debug, Default)]
struct SenderStats {
    bytes: u64,
    pages: u64,
    zero_pages: u64,
}

/// The RAM section's view for the pending accounting.
struct RamPending<'t, T: DirtyTracker> {
    tracker: &'t mut T,
    bitmaps: &'t mut [Vec<u64>],
    pages: &'t [u64],
    dirty_rate: u64,
    since_sync_ns: u64,
    newly: &'t mut u64,
}

fn count_bits(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl<T: DirtyTracker> Section for RamPending<'_, T> {
    type Error = DirtyError;

    fn name(&self) -> &str {
        "ram"
    }

    fn estimate(&self) -> Pending {
        let known: u64 = self.bitmaps.iter().map(|b| count_bits(b)).sum();
        let guess = (u128::from(self.dirty_rate) * u128::from(self.since_sync_ns) / 1_000_000_000)
            .min(u128::from(u64::MAX)) as u64;
        Pending::new(known.saturating_mul(PAGE_SIZE).saturating_add(guess), 0, 0)
    }

    fn exact(&mut self) -> Result<Pending, DirtyError> {
        let mut dirty = 0u64;
        for (r, words) in self.bitmaps.iter_mut().enumerate() {
            *self.newly += self.tracker.sync(r, words)?;
            let _ = self.pages[r];
            dirty += count_bits(words);
        }
        self.since_sync_ns = 0;
        Ok(Pending::new(dirty.saturating_mul(PAGE_SIZE), 0, 0))
    }
}

/// Device state as a pending section: its expected size, before switchover.
struct DevicePending(u64);

impl Section for DevicePending {
    type Error = DirtyError;
    fn name(&self) -> &str {
        "device"
    }
    fn estimate(&self) -> Pending {
        Pending::new(self.0, 0, 0)
    }
    fn exact(&mut self) -> Result<Pending, DirtyError> {
        Ok(self.estimate())
    }
}

/// Migrates `ram` to the destination at `link.endpoint`.
///
/// `tracker` must track exactly the regions of `ram`, in order. Progress goes
/// to `events`. On success the guest is paused here and runs on the
/// destination; on an error before *ready* it runs here again.
pub fn migrate<T: DirtyTracker, G: GuestControl>(
    ram: &Ram<'_>,
    tracker: &mut T,
    guest: &mut G,
    config: &SourceConfig,
    link: &SourceLink,
    events: &mut dyn FnMut(&Event),
) -> Result<SourceReport, SourceError> {
    let probe = ferry_uring::probe();
    let mut src = Source::connect(ram, config, link, &probe)?;
    events(&Event::Connected {
        transport: src.transport_name.clone(),
    });
    let result = src.run(tracker, guest, events);
    src.shutdown();
    let _ = tracker.stop();
    result
}

struct Source<'r, 'm> {
    ram: &'r Ram<'m>,
    config: &'r SourceConfig,
    neg: Negotiated,
    ctl: AnyChannel,
    ctl_enc: StreamEncoder,
    ctl_conn: link::Conn,
    returns: Receiver<ReturnMsg>,
    bulk: Vec<AnyChannel>,
    transport_name: String,
    started: Instant,
}

impl<'r, 'm> Source<'r, 'm> {
    fn connect(
        ram: &'r Ram<'m>,
        config: &'r SourceConfig,
        link: &SourceLink,
        probe: &ProbeReport,
    ) -> Result<Self, SourceError> {
        let started = Instant::now();
        let n_bulk = link.bulk_channels.max(1);
        let layout = ram.layout().map_err(|e| {
            SourceError::Destination(format!("the guest RAM layout is invalid: {e:?}"))
        })?;
        let caps = Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: config.payload_checksums,
            channels: u16::try_from(n_bulk + 1).unwrap_or(u16::MAX),
        };
        let hello = Hello::new(caps, layout);
        let mut ctl_conn = link::connect(&link.endpoint)?;
        let (neg, ret_dec) = link::source_handshake(&mut ctl_conn, &hello, Duration::from_secs(30))?;
        let ret_conn = ctl_conn.try_clone().map_err(|source| LinkError::Io {
            what: "duplicating the control socket",
            source,
        })?;
        let regions = ram.mem_regions();
        let chan_err = |channel: String| move |source| SourceError::Transport { channel, source };
        let ctl = AnyChannel::new(
            ctl_conn.try_clone().map_err(|source| LinkError::Io {
                what: "duplicating the control socket",
                source,
            })?,
            &regions,
            link.transport,
            probe,
        )
        .map_err(chan_err("control".into()))?;
        let mut bulk = Vec::with_capacity(n_bulk);
        for i in 0..n_bulk {
            let c = link::connect(&link.endpoint)?;
            bulk.push(
                AnyChannel::new(c, &regions, link.transport, probe)
                    .map_err(chan_err(format!("bulk {i}")))?,
            );
        }
        let (returns, _reader) = link::spawn_return_reader(ret_conn, ret_dec);
        let transport_name = format!("{} x{}", ctl.name(), n_bulk);
        Ok(Source {
            ram,
            config,
            ctl_enc: StreamEncoder::new(&neg),
            neg,
            ctl,
            ctl_conn,
            returns,
            bulk,
            transport_name,
            started,
        })
    }

    fn shutdown(&mut self) {
        self.ctl_conn.shutdown();
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sends one control record with an in-memory payload.
    fn send_ctl(&mut self, repr: Repr, payload: &[u8]) -> Result<(), SourceError> {
        let mut header = [0u8; HEADER_LEN];
        self.ctl_enc
            .encode(&repr, payload, &mut header)
            .map_err(SourceError::Emit)?;
        let payload = if payload.is_empty() {
            Payload::None
        } else {
            Payload::Bytes(payload)
        };
        self.ctl
            .send(&[OutRecord { header, payload }])
            .and_then(|_| self.ctl.flush())
            .map_err(|source| SourceError::Transport {
                channel: "control".into(),
                source,
            })
    }

    fn run<T: DirtyTracker, G: GuestControl>(
        &mut self,
        tracker: &mut T,
        guest: &mut G,
        events: &mut dyn FnMut(&Event),
    ) -> Result<SourceReport, SourceError> {
        let mut state = StateMachine::new();
        let _ = state.move_to(MigrationState::Active);
        let regions: Vec<RamRegion> = self.ram.regions().to_vec();
        let pages: Vec<u64> = regions.iter().map(|r| r.pages()).collect();
        let mut bitmaps: Vec<Vec<u64>> = pages.iter().map(|&p| vec![0u64; p.div_ceil(64) as usize]).collect();
        let mut report = SourceReport {
            transport: self.transport_name.clone(),
            ..SourceReport::default()
        };
        let mut bandwidth = RateEstimator::<64>::new(DEFAULT_WINDOW_NS);
        let mut dirty_rate = RateEstimator::<64>::new(DEFAULT_WINDOW_NS);
        let limit_ns = u64::try_from(self.config.downtime_limit.as_nanos()).unwrap_or(u64::MAX);
        let neg = self.neg.clone();
        let max_run = self.config.max_run_pages.clamp(1, MAX_RUN_PAGES);
        let cap_per_channel = self.config.bandwidth_cap.map(|c| (c / self.bulk.len() as u64).max(1));
        let ram = self.ram;
        let bulk = std::mem::take(&mut self.bulk);

        std::thread::scope(|scope| -> Result<SourceReport, SourceError> {
            // Sender threads, one per bulk channel.
            let mut jobs: Vec<SyncSender<Job>> = Vec::new();
            let mut senders = Vec::new();
            for (i, chan) in bulk.into_iter().enumerate() {
                let (tx, rx) = mpsc::sync_channel::<Job>(8);
                jobs.push(tx);
                let neg = neg.clone();
                senders.push(scope.spawn(move || sender_thread(i, chan, rx, ram, &neg, cap_per_channel)));
            }
            let join_senders = |senders: Vec<std::thread::ScopedJoinHandle<'_, Result<SenderStats, String>>>| {
                let mut total = SenderStats::default();
                let mut first_err = None;
                for h in senders {
                    match h.join() {
                        Ok(Ok(s)) => {
                            total.bytes += s.bytes;
                            total.pages += s.pages;
                            total.zero_pages += s.zero_pages;
                        }
                        Ok(Err(e)) => {
                            first_err.get_or_insert(e);
                        }
                        Err(_) => {
                            first_err.get_or_insert("a sender thread panicked".to_string());
                        }
                    }
                }
                match first_err {
                    Some(e) => Err(SourceError::Thread(e)),
                    None => Ok(total),
                }
            };

            let outcome = (|| -> Result<(Decision, u64, u32, Option<Pending>), SourceError> {
                tracker.start()?;
                // Round 0: every page.
                for (b, &p) in bitmaps.iter_mut().zip(&pages) {
                    let mut bm = DirtyBitmap::new(b, p as usize).map_err(|e| SourceError::Destination(format!("{e:?}")))?;
                    bm.set_all();
                }
                let mut round = 0u32;
                let mut previous: Option<Pending> = None;
                let mut last_sync = self.elapsed_ns();
                let mut sent_total = 0u64;
                loop {
                    // Stream what the bitmaps hold.
                    let t0 = self.elapsed_ns();
                    let bytes = dispatch(tracker, &mut bitmaps, &pages, &jobs, max_run, round == 0)?;
                    flush_all(&jobs)?;
                    let t1 = self.elapsed_ns();
                    if bytes > 0 {
                        let _ = bandwidth.record(bytes, t0, t1.max(t0 + 1));
                    }
                    sent_total += bytes;
                    self.poll_returns(&mut bitmaps, &mut report)?;

                    // Pending: the estimate, or the exact figure when it fits.
                    let threshold = rate::threshold(bandwidth.bytes_per_sec(), limit_ns);
                    let now = self.elapsed_ns();
                    let mut newly = 0u64;
                    let query = {
                        let mut ram_s = RamPending {
                            tracker,
                            bitmaps: &mut bitmaps,
                            pages: &pages,
                            dirty_rate: dirty_rate.bytes_per_sec(),
                            since_sync_ns: now - last_sync,
                            newly: &mut newly,
                        };
                        let mut dev_s = DevicePending(guest.device_state_estimate());
                        let mut set: Sections<'_, DirtyError, 4> = Sections::new();
                        let _ = set.add(&mut ram_s);
                        let _ = set.add(&mut dev_s);
                        set.query(threshold)?
                    };
                    if query.exact {
                        let _ = dirty_rate.record(newly * PAGE_SIZE, last_sync, now.max(last_sync + 1));
                        last_sync = now;
                    }
                    let decision = policy::decide(&Inputs {
                        pending: query.pending,
                        previous,
                        threshold,
                        floor: self.config.floor_bytes,
                        caps: PolicyCaps::default(),
                        start_postcopy: false,
                        in_postcopy: false,
                        can_switchover: true,
                    })
                    .map_err(SourceError::Policy)?;
                    let bw = bandwidth.bytes_per_sec();
                    events(&Event::Round(RoundProgress {
                        round,
                        pending_bytes: query.pending.total(),
                        sent_bytes: sent_total,
                        bandwidth: bw,
                        dirty_rate: dirty_rate.bytes_per_sec(),
                        threshold,
                        expected_downtime_ns: rate::expected_downtime_ns(query.pending.total(), bw),
                        elapsed_ns: now,
                    }));
                    if decision != Decision::Iterate {
                        return Ok((decision, threshold, round, Some(query.pending)));
                    }
                    if let Some(limit) = self.config.give_up_after {
                        if self.started.elapsed() > limit {
                            return Err(SourceError::NotConverging {
                                elapsed_s: self.started.elapsed().as_secs_f64(),
                                rounds: round,
                                pending: query.pending.total(),
                                threshold,
                                dirty_rate: dirty_rate.bytes_per_sec(),
                                bandwidth: bw,
                            });
                        }
                    }
                    // Make sure the next round sends what is dirty now.
                    if !query.exact {
                        let now = self.elapsed_ns();
                        let mut newly = 0;
                        for (r, words) in bitmaps.iter_mut().enumerate() {
                            newly += tracker.sync(r, words)?;
                        }
                        let _ = dirty_rate.record(newly * PAGE_SIZE, last_sync, now.max(last_sync + 1));
                        last_sync = now;
                    }
                    previous = Some(query.pending);
                    round += 1;
                }
            })();

            let (decision, threshold, rounds, final_pending) = match outcome {
                Ok(v) => v,
                Err(e) => {
                    drop(jobs);
                    // A sender that died knows better why than "it stopped".
                    let joined = join_senders(senders);
                    return Err(match (e, joined) {
                        (SourceError::Thread(_), Err(cause)) => cause,
                        (e, _) => e,
                    });
                }
            };
            if let Decision::Switchover { .. } = decision {
                drop(jobs);
                let _ = join_senders(senders);
                return Err(SourceError::Unsupported("postcopy"));
            }

            // Stop-and-copy.
            let _ = state.move_to(MigrationState::StopAndCopy);
            guest
                .pause()
                .map_err(|source| SourceError::Guest { what: "pause", source })?;
            let paused_at = monotonic_ns();
            events(&Event::Paused);
            let final_phase = (|| -> Result<SenderStats, SourceError> {
                self.send_ctl(Repr::StopAndCopy, &[])?;
                for (r, words) in bitmaps.iter_mut().enumerate() {
                    tracker.sync(r, words)?;
                }
                self.poll_returns(&mut bitmaps, &mut report)?;
                dispatch(tracker, &mut bitmaps, &pages, &jobs, max_run, false)?;
                for j in &jobs {
                    j.send(Job::End)
                        .map_err(|_| SourceError::Thread("a sender thread stopped early".into()))?;
                }
                Ok(SenderStats::default())
            })();
            drop(jobs);
            let joined = join_senders(senders);
            let final_phase = match (final_phase, joined) {
                (Err(SourceError::Thread(_)), Err(cause)) => Err(cause),
                (Err(e), _) => Err(e),
                (Ok(_), joined) => joined,
            };
            let result = final_phase.and_then(|stats| {
                report.bytes_sent = stats.bytes;
                report.pages_sent = stats.pages;
                report.zero_pages = stats.zero_pages;
                let sections = guest.device_state().map_err(|source| SourceError::Guest {
                    what: "save the device state of",
                    source,
                })?;
                for s in &sections {
                    let mut offset = 0usize;
                    // An empty section still sends one (empty, last) chunk.
                    loop {
                        let end = (offset + MAX_SECTION_CHUNK as usize).min(s.bytes.len());
                        let chunk = &s.bytes[offset..end];
                        self.send_ctl(
                            Repr::Section {
                                section: s.id,
                                offset: offset as u64,
                                len: chunk.len() as u32,
                                last: end == s.bytes.len(),
                            },
                            chunk,
                        )?;
                        report.device_bytes += chunk.len() as u64;
                        report.bytes_sent += (HEADER_LEN + chunk.len()) as u64;
                        offset = end;
                        if offset >= s.bytes.len() {
                            break;
                        }
                    }
                }
                self.send_ctl(Repr::End, &[])?;
                events(&Event::AwaitingReady);
                self.await_ready(&regions, &mut report)
            });
            if let Err(e) = result {
                let _ = state.move_to(MigrationState::Failed);
                guest
                    .resume()
                    .map_err(|source| SourceError::Guest { what: "resume", source })?;
                events(&Event::ResumedOnSource);
                return Err(e);
            }

            // Go: from here on the guest belongs to the destination.
            if let Err(e) = self.send_ctl(Repr::Go, &[]) {
                let _ = state.move_to(MigrationState::Failed);
                return Err(SourceError::AfterGo(e.to_string()));
            }
            let go_at = monotonic_ns();
            events(&Event::GoSent);
            let _ = state.move_to(MigrationState::Completed);
            let total_ns = self.elapsed_ns();
            report.total_ns = total_ns;
            report.rounds = rounds;
            report.threshold = threshold;
            report.final_pending = final_pending.map(|p| p.total()).unwrap_or(0);
            report.paused_at_ns = paused_at;
            report.go_at_ns = go_at;
            report.source_downtime_ns = go_at.saturating_sub(paused_at);
            report.throughput = (u128::from(report.bytes_sent) * 1_000_000_000 / u128::from(total_ns.max(1))) as u64;
            Ok(report.clone())
        })
    }

    /// Folds resend requests into the bitmaps; fails on an error from the
    /// destination or a closed return path.
    fn poll_returns(&mut self, bitmaps: &mut [Vec<u64>], report: &mut SourceReport) -> Result<(), SourceError> {
        loop {
            match self.returns.try_recv() {
                Ok(ReturnMsg::Record(r)) => self.apply_return(r, bitmaps, report)?,
                Ok(ReturnMsg::Closed(why)) => return Err(SourceError::Destination(why)),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(SourceError::Destination("the return path ended".into()))
                }
            }
        }
    }

    fn apply_return(&mut self, r: ReturnRepr, bitmaps: &mut [Vec<u64>], report: &mut SourceReport) -> Result<(), SourceError> {
        match r {
            ReturnRepr::Resend { region, first, count } => {
                let words = bitmaps
                    .get_mut(usize::from(region))
                    .ok_or_else(|| SourceError::Destination(format!("asked to resend pages of unknown region {region}")))?;
                let pages = self.ram.region(region).map(|r| r.pages()).unwrap_or(0);
                let mut bm = DirtyBitmap::new(words, pages as usize)
                    .map_err(|e| SourceError::Destination(format!("{e:?}")))?;
                let end = first.saturating_add(u64::from(count)).min(pages);
                if first < end {
                    let _ = bm.set_range(first as usize..end as usize);
                }
                report.pages_resent += u64::from(count);
                Ok(())
            }
            ReturnRepr::Error { code, detail } => Err(SourceError::Destination(format!(
                "it reported {code:?} (detail {detail})"
            ))),
            ReturnRepr::PageRequest { .. } => Err(SourceError::Unsupported("postcopy page requests")),
            ReturnRepr::Ready => Err(SourceError::Destination("it said ready before the stream ended".into())),
            ReturnRepr::Accept => Err(SourceError::Destination("it accepted a second hello".into())),
        }
    }

    /// After the end of the stream: serves resend requests from the paused
    /// guest's memory until *ready*.
    fn await_ready(&mut self, regions: &[RamRegion], report: &mut SourceReport) -> Result<(), SourceError> {
        let deadline = Instant::now() + self.config.ready_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match self.returns.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => return Err(SourceError::ReadyTimeout(self.config.ready_timeout)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SourceError::Destination("the return path ended before ready".into()))
                }
            };
            match msg {
                ReturnMsg::Record(ReturnRepr::Ready) => return Ok(()),
                ReturnMsg::Record(ReturnRepr::Resend { region, first, count }) => {
                    let r = regions
                        .get(usize::from(region))
                        .ok_or_else(|| SourceError::Destination(format!("asked to resend pages of unknown region {region}")))?;
                    // SAFETY: the guest is paused: nothing writes these pages.
                    let bytes = unsafe { r.pages_slice(first, u64::from(count)) }.ok_or_else(|| {
                        SourceError::Destination(format!("asked to resend pages {first}+{count} outside region {region}"))
                    })?;
                    let mut header = [0u8; HEADER_LEN];
                    self.ctl_enc
                        .encode(&Repr::PageRun { region, first, count, requested: false }, bytes, &mut header)
                        .map_err(SourceError::Emit)?;
                    self.ctl
                        .send(&[OutRecord {
                            header,
                            payload: Payload::Guest {
                                region: u32::from(region),
                                offset: first * PAGE_SIZE,
                                len: u64::from(count) * PAGE_SIZE,
                            },
                        }])
                        .and_then(|_| self.ctl.flush())
                        .map_err(|source| SourceError::Transport { channel: "control".into(), source })?;
                    report.pages_resent += u64::from(count);
                }
                ReturnMsg::Record(other) => {
                    let mut ignore = Vec::new();
                    self.apply_return(other, &mut ignore, report)?;
                }
                ReturnMsg::Closed(why) => return Err(SourceError::Destination(why)),
            }
        }
    }
}

/// Re-arms and hands out every dirty page in `bitmaps`, clearing them;
/// returns the bytes handed out (payload plus headers).
fn dispatch<T: DirtyTracker>(
    tracker: &mut T,
    bitmaps: &mut [Vec<u64>],
    pages: &[u64],
    jobs: &[SyncSender<Job>],
    max_run: u32,
    detect_zero: bool,
) -> Result<u64, SourceError> {
    let n = jobs.len();
    let mut batches: Vec<Vec<PageWork>> = (0..n).map(|_| Vec::with_capacity(BATCH)).collect();
    let mut bytes = 0u64;
    let mut batch_bytes = vec![0u64; n];
    for (r, words) in bitmaps.iter_mut().enumerate() {
        let region_pages = pages[r];
        for (c, chunk) in words.chunks_mut(CHUNK_WORDS).enumerate() {
            if chunk.iter().all(|w| *w == 0) {
                continue;
            }
            let first_page = (c * CHUNK_WORDS * 64) as u64;
            // Re-arm exactly these pages before reading them: a write that
            // races the send is caught by the next sync.
            tracker.clear_mask(r, first_page, chunk)?;
            let chunk_pages = (region_pages - first_page).min((CHUNK_WORDS * 64) as u64) as usize;
            let mut bm = DirtyBitmap::new(chunk, chunk_pages)
                .map_err(|e| SourceError::Destination(format!("{e:?}")))?;
            let mut at = 0usize;
            while let Some(run) = bm.take_run(at, max_run as usize) {
                at = run.end();
                for (ch, first, count) in share_out(first_page + run.first as u64, run.len as u64, n) {
                    bytes += count * PAGE_SIZE + HEADER_LEN as u64;
                    batches[ch].push(PageWork {
                        region: r as u16,
                        first,
                        count: count as u32,
                        detect_zero,
                    });
                    batch_bytes[ch] += count * PAGE_SIZE;
                    if batches[ch].len() >= BATCH || batch_bytes[ch] >= BATCH_BYTES {
                        batch_bytes[ch] = 0;
                        let b = std::mem::replace(&mut batches[ch], Vec::with_capacity(BATCH));
                        jobs[ch]
                            .send(Job::Pages(b))
                            .map_err(|_| SourceError::Thread("a sender thread stopped".into()))?;
                    }
                }
            }
        }
    }
    for (ch, b) in batches.into_iter().enumerate() {
        if !b.is_empty() {
            jobs[ch]
                .send(Job::Pages(b))
                .map_err(|_| SourceError::Thread("a sender thread stopped".into()))?;
        }
    }
    Ok(bytes)
}

/// Waits until every sender handed everything to the kernel.
fn flush_all(jobs: &[SyncSender<Job>]) -> Result<(), SourceError> {
    let mut acks = Vec::with_capacity(jobs.len());
    for j in jobs {
        let (tx, rx) = mpsc::sync_channel(1);
        j.send(Job::Flush(tx))
            .map_err(|_| SourceError::Thread("a sender thread stopped".into()))?;
        acks.push(rx);
    }
    for rx in acks {
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(SourceError::Thread(e)),
            Err(_) => return Err(SourceError::Thread("a sender thread stopped".into())),
        }
    }
    Ok(())
}

/// Paces a sender to a byte rate.
struct Pacer {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    fn wait(&mut self, bytes: u64) {
        self.sent += bytes;
        let due = Duration::from_nanos((u128::from(self.sent) * 1_000_000_000 / u128::from(self.rate.max(1))) as u64);
        let el = self.start.elapsed();
        if due > el {
            std::thread::sleep(due - el);
        }
    }
}

fn sender_thread(
    index: usize,
    mut chan: AnyChannel,
    jobs: Receiver<Job>,
    ram: &Ram<'_>,
    neg: &Negotiated,
    cap: Option<u64>,
) -> Result<SenderStats, String> {
    let mut enc = StreamEncoder::new(neg);
    let mut stats = SenderStats::default();
    let mut recs: Vec<OutRecord<'static>> = Vec::with_capacity(BATCH * 2);
    let checksums = neg.caps.payload_checksums;
    let mut pacer = cap.map(|rate| Pacer { rate, start: Instant::now(), sent: 0 });
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("bulk channel {index}: {what}: {e}");
    let mut ended = false;
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Pages(work) => {
                recs.clear();
                let mut batch_bytes = 0u64;
                for w in work {
                    let Some(region) = ram.region(w.region) else {
                        return Err(fail("page run", &format!("unknown region {}", w.region)));
                    };
                    let mut push = |first: u64, count: u32, zero: bool| -> Result<(), String> {
                        let mut header = [0u8; HEADER_LEN];
                        if zero {
                            enc.encode_with_crc(&Repr::ZeroRun { region: w.region, first, count }, 0, &mut header)
                                .map_err(|e| fail("encoding", &e))?;
                            recs.push(OutRecord { header, payload: Payload::None });
                            stats.zero_pages += u64::from(count);
                            stats.bytes += HEADER_LEN as u64;
                            batch_bytes += HEADER_LEN as u64;
                        } else {
                            let crc = if checksums {
                                // SAFETY: a read that tolerates tearing: if the guest
                                // writes the pages before they leave, the checksum
                                // fails on the destination, which asks again, and the
                                // write re-dirtied the pages anyway.
                                let bytes = unsafe { region.pages_slice(first, u64::from(count)) }
                                    .ok_or_else(|| fail("page run", &"pages outside the region"))?;
                                wire::payload_crc(bytes)
                            } else {
                                0
                            };
                            enc.encode_with_crc(&Repr::PageRun { region: w.region, first, count, requested: false }, crc, &mut header)
                                .map_err(|e| fail("encoding", &e))?;
                            let len = u64::from(count) * PAGE_SIZE;
                            recs.push(OutRecord {
                                header,
                                payload: Payload::Guest { region: u32::from(w.region), offset: first * PAGE_SIZE, len },
                            });
                            stats.pages += u64::from(count);
                            stats.bytes += len + HEADER_LEN as u64;
                            batch_bytes += len + HEADER_LEN as u64;
                        }
                        Ok(())
                    };
                    if w.detect_zero {
                        // Split the run into runs of zero and non-zero pages.
                        let mut start = w.first;
                        let end = w.first + u64::from(w.count);
                        while start < end {
                            let zero = region.page_is_zero(start);
                            let mut stop = start + 1;
                            while stop < end && region.page_is_zero(stop) == zero {
                                stop += 1;
                            }
                            push(start, (stop - start) as u32, zero)?;
                            start = stop;
                        }
                    } else {
                        push(w.first, w.count, false)?;
                    }
                }
                chan.send(&recs).map_err(|e| fail("send", &e))?;
                if let Some(p) = pacer.as_mut() {
                    p.wait(batch_bytes);
                }
            }
            Job::Flush(ack) => {
                let r = chan.flush().map_err(|e| fail("flush", &e));
                let failed = r.is_err();
                let _ = ack.send(r);
                if failed {
                    return Err(fail("flush", &"failed"));
                }
            }
            Job::End => {
                let mut header = [0u8; HEADER_LEN];
                enc.encode_with_crc(&Repr::End, 0, &mut header).map_err(|e| fail("encoding", &e))?;
                chan.send(&[OutRecord { header, payload: Payload::None }])
                    .and_then(|_| chan.flush())
                    .map_err(|e| fail("end of stream", &e))?;
                stats.bytes += HEADER_LEN as u64;
                ended = true;
                break;
            }
        }
    }
    if ended {
        Ok(stats)
    } else {
        // The migration gave up: close without an end record.
        Ok(stats)
    }
}
