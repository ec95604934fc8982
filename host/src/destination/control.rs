//! The destination's control channel: one record at a time, each admitted by
//! the [`DestinationSession`] before the host acts on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::ScopedJoinHandle;
use std::time::Instant;

use ferry_core::session::{Completeness, DestinationSession, Mode as SessionMode};
use ferry_core::wire::{self, Negotiated, Record, Repr, ReturnRepr, MAX_RUN_PAGES};
use ferry_uring::{AnyChannel, Channel};

use super::{
    flush_session, receive_resent, session_failed, BulkNote, DestinationConfig,
    DestinationErrorKind, PostcopyLoss, RecvStats, Torn, UrgentRequests, Watch,
};
use crate::link::{ChannelRole, ReturnWriter, WireDecoder};
use crate::migration::{monotonic_ns, DestinationReport, DeviceSection, GuestStarter};
use crate::postcopy::{FaultService, PageInstaller, PostcopyMode, Uffd};
use crate::ram::Ram;

/// Device sections as they arrive in chunks: bytes so far and whether the
/// last chunk came.
#[derive(Debug, Default)]
pub(super) struct Sections {
    map: BTreeMap<u16, (Vec<u8>, bool)>,
}

impl Sections {
    /// Appends a chunk, which must continue the section where it stands and
    /// carry the right checksum.
    fn add(
        &mut self,
        section: u16,
        offset: u64,
        bytes: &[u8],
        last: bool,
        crc: u32,
    ) -> Result<(), DestinationErrorKind> {
        let entry = self
            .map
            .entry(section)
            .or_insert_with(|| (Vec::new(), false));
        if entry.1 || entry.0.len() as u64 != offset {
            return Err(DestinationErrorKind::Section {
                section,
                offset,
                expected: entry.0.len() as u64,
            });
        }
        if wire::payload_crc(bytes) != crc {
            return Err(DestinationErrorKind::SectionChecksum { section, offset });
        }
        entry.0.extend_from_slice(bytes);
        entry.1 = last;
        Ok(())
    }

    /// Sections announced without their last chunk.
    fn incomplete(&self) -> u32 {
        self.map.values().filter(|(_, last)| !*last).count() as u32
    }

    /// Fails on the first section still without its last chunk.
    fn check_complete(&self) -> Result<(), DestinationErrorKind> {
        match self.map.iter().find(|(_, (_, last))| !*last) {
            Some((id, (bytes, _))) => Err(DestinationErrorKind::SectionIncomplete {
                section: *id,
                received: bytes.len() as u64,
            }),
            None => Ok(()),
        }
    }

    fn to_device_sections(&self) -> Vec<DeviceSection> {
        self.map
            .iter()
            .map(|(id, (bytes, _))| DeviceSection {
                id: *id,
                bytes: bytes.clone(),
            })
            .collect()
    }
}

/// A bulk receiver thread's handle.
pub(super) type BulkHandle<'s> = ScopedJoinHandle<'s, Result<RecvStats, DestinationErrorKind>>;

/// The control thread's state, from the handshake to the end.
pub(super) struct Control<'s, 'a, 'm, S> {
    pub session: DestinationSession,
    pub ctl: AnyChannel,
    pub dec: WireDecoder,
    pub buf: Vec<u8>,
    pub sections: Sections,
    pub pc_sections: Sections,
    pub stats: RecvStats,
    pub go_at: Option<Instant>,
    pub report: DestinationReport,
    pub faults: Option<FaultService>,
    pub bulk: Option<Vec<BulkHandle<'s>>>,
    pub n_bulk: usize,
    pub notes: mpsc::Receiver<BulkNote>,
    pub ram: &'a Ram<'m>,
    pub neg: Negotiated,
    pub inst: Option<Arc<PageInstaller>>,
    pub torn: &'a Torn,
    pub ret: &'a ReturnWriter,
    pub urgent_writer: Option<ReturnWriter>,
    pub watch: &'a Watch,
    pub finished: &'a AtomicBool,
    pub config: &'a DestinationConfig,
    pub starter: &'a mut S,
    pub go_received: &'a mut bool,
    /// Postcopy RAM: how long the switchover waited for the bulk markers.
    pub markers_wait_ns: u64,
}

impl<S: GuestStarter> Control<'_, '_, '_, S> {
    /// Runs the control channel until the migration ends here.
    pub fn run(&mut self) -> Result<DestinationReport, DestinationErrorKind> {
        self.watch.publish(&self.session);
        loop {
            let (rec, len) = self.next_record()?;
            if let Some(report) = self.on_record(rec, len)? {
                return Ok(report);
            }
            if self.session.phase_name() == "verifying" {
                self.check_ready()?;
            }
            self.watch.publish(&self.session);
        }
    }

    /// Stops the fault service and wakes anything blocked on the installer.
    pub fn stop_postcopy(&mut self) {
        if let Some(mut f) = self.faults.take() {
            let _ = f.stop();
        }
        if let Some(inst) = self.inst.as_deref() {
            inst.abort();
        }
    }

    /// The next control record, admitted by the session; its payload is in
    /// `buf[..len]`. A wait that ran out is reported as the session's error.
    fn next_record(&mut self) -> Result<(Record, usize), DestinationErrorKind> {
        let got = match self.ctl.recv(&mut self.dec, &mut self.buf) {
            Ok(Some(g)) => g,
            Ok(None) | Err(_) if self.watch.fired() => {
                // The watchdog woke us: the session says which wait ran
                // out, judged as the watchdog saw it when it fired (a
                // receiver may have noted activity since, draining what it
                // had buffered).
                let (at, seen) = self.watch.fire_point();
                self.session.note_activity(seen);
                self.session.handle_timeout(at);
                if !self.session.is_ended() {
                    // A record noted after the watchdog fired: the wait
                    // was over all the same.
                    self.session.handle_timeout(u64::MAX);
                }
                return Err(session_failed(&self.session));
            }
            // A bulk receiver failed and shut the sockets: its cause counts.
            Ok(None) | Err(_) if self.watch.bulk_failed() => return Err(self.bulk_failure()),
            Err(source) => {
                return Err(DestinationErrorKind::Transport {
                    channel: ChannelRole::Control,
                    source,
                })
            }
            Ok(None) => return Err(DestinationErrorKind::Truncated(ChannelRole::Control)),
        };
        let now = monotonic_ns();
        self.watch.touch(now);
        let len = got.placement.len() as usize;
        self.stats.bytes += len as u64 + wire::HEADER_LEN as u64;
        let rec = self.dec.last().ok_or(DestinationErrorKind::DecoderLost)?;
        self.session.note_activity(self.watch.activity());
        if self.session.handle_record(now, &rec.repr).is_err() {
            return Err(session_failed(&self.session));
        }
        Ok((rec, len))
    }

    /// Acts on one admitted record; the report once the migration is done.
    fn on_record(
        &mut self,
        rec: Record,
        len: usize,
    ) -> Result<Option<DestinationReport>, DestinationErrorKind> {
        let payload = self.buf.get(..len).unwrap_or(&[]);
        match rec.repr {
            Repr::Section {
                section,
                offset,
                last,
                ..
            } => self
                .sections
                .add(section, offset, payload, last, rec.payload_crc)?,
            Repr::PostcopySection {
                section,
                offset,
                last,
                ..
            } => self
                .pc_sections
                .add(section, offset, payload, last, rec.payload_crc)?,
            // The pages to drop at arming; the session admitted the record
            // only in postcopy RAM, after the listen marker.
            Repr::DiscardMap {
                region,
                first,
                count,
            } => {
                let inst = self
                    .inst
                    .as_ref()
                    .ok_or(DestinationErrorKind::PostcopyNotNegotiated)?;
                inst.add_discard_map(region, first, u64::from(count), payload)?;
            }
            Repr::StopAndCopy | Repr::PostcopyListen | Repr::PostcopyRun => {}
            // Resent pages: the source is stopped, so they must be intact.
            Repr::PageRun { .. } | Repr::ZeroRun { .. } => receive_resent(
                self.ram,
                self.inst.as_deref(),
                &self.neg,
                &rec,
                payload,
                self.torn,
                self.ret,
                &mut self.stats,
            )?,
            Repr::End if self.go_at.is_none() => self.end_of_stream()?,
            Repr::Go => return self.go(),
            Repr::End => return self.end_of_postcopy().map(Some),
            other => {
                return Err(DestinationErrorKind::Unexpected {
                    channel: ChannelRole::Control,
                    record: other,
                })
            }
        }
        Ok(None)
    }

    /// The end of the stream before *go*: every bulk channel is done (or, for
    /// postcopy RAM, at its marker) and torn pages are asked for again.
    fn end_of_stream(&mut self) -> Result<(), DestinationErrorKind> {
        if self.session.mode() == SessionMode::Ram {
            self.arm_postcopy_ram()?;
        } else {
            self.join_bulk()?;
        }
        // Postcopy RAM: torn pages are missing now, and the source adds them
        // to its background stream; otherwise it sends them at once.
        self.torn.ask_again(self.ret)?;
        Ok(())
    }

    /// Postcopy RAM: once every bulk channel reached its marker (so every
    /// discard is in), registers guest RAM with userfaultfd and starts
    /// serving faults.
    fn arm_postcopy_ram(&mut self) -> Result<(), DestinationErrorKind> {
        let (Some(inst), Some(writer)) = (self.inst.clone(), self.urgent_writer.clone()) else {
            return Err(DestinationErrorKind::PostcopyNotNegotiated);
        };
        let t = Instant::now();
        for _ in 0..self.n_bulk {
            match self.notes.recv() {
                Ok(BulkNote::Marker) => {}
                Ok(BulkNote::Failed) | Err(_) => {
                    inst.abort();
                    self.join_bulk()?;
                    return Err(DestinationErrorKind::ReceiverStopped);
                }
            }
        }
        self.markers_wait_ns = t.elapsed().as_nanos() as u64;
        inst.arm(if inst.in_place() {
            Uffd::new_minor()?
        } else {
            Uffd::new()?
        })?;
        self.faults = Some(FaultService::start(inst, UrgentRequests(writer))?);
        Ok(())
    }

    /// *go*: starts the guest and answers *started*. In precopy that is the
    /// end of the migration here.
    fn go(&mut self) -> Result<Option<DestinationReport>, DestinationErrorKind> {
        *self.go_received = true;
        self.report.go_at_ns = monotonic_ns();
        self.go_at = Some(Instant::now());
        self.starter
            .start(&self.sections.to_device_sections())
            .map_err(DestinationErrorKind::Start)?;
        self.report.resumed_at_ns = monotonic_ns();
        self.report.sections = self.sections.map.len() as u32;
        if self.session.guest_started(monotonic_ns()).is_err() {
            return Err(session_failed(&self.session));
        }
        flush_session(&mut self.session, self.ret)?;
        if let Some(inst) = self
            .inst
            .clone()
            .filter(|i| i.in_place() && self.session.mode() == SessionMode::Ram)
        {
            // The received pages are mapped once the guest runs, not in the
            // downtime, where the thread would take a core from the handover;
            // until then a first touch maps its page through a minor fault.
            let _ = std::thread::Builder::new()
                .name("ferry-map".into())
                .spawn(move || inst.map_received());
        }
        if self.session.mode() != SessionMode::Precopy {
            return Ok(None);
        }
        self.finished.store(true, Ordering::Release);
        Ok(Some(self.final_report()))
    }

    /// The end of postcopy: fetches what is still missing (bounded), checks
    /// every section, hands the postcopy-only sections over and answers the
    /// final *ready*.
    fn end_of_postcopy(&mut self) -> Result<DestinationReport, DestinationErrorKind> {
        let mode = self.session.mode();
        self.join_bulk()?;
        if let Some(inst) = self.inst.clone().filter(|_| mode == SessionMode::Ram) {
            self.fetch_the_rest(&inst)?;
        }
        self.pc_sections.check_complete()?;
        if let Some(f) = self.faults.as_mut() {
            f.stop().map_err(DestinationErrorKind::FaultService)?;
        }
        let secs = self.pc_sections.to_device_sections();
        self.starter
            .postcopy_sections(&secs)
            .map_err(DestinationErrorKind::Start)?;
        self.finished.store(true, Ordering::Release);
        if self.session.postcopy_complete(monotonic_ns()).is_err() {
            return Err(session_failed(&self.session));
        }
        flush_session(&mut self.session, self.ret)?;
        let mut pc = self.inst.as_deref().map(|i| i.report()).unwrap_or_default();
        pc.mode = if mode == SessionMode::Ram {
            PostcopyMode::Ram
        } else {
            PostcopyMode::Sections
        };
        pc.postcopy_ns = self
            .go_at
            .map(|t| t.elapsed().as_nanos() as u64)
            .unwrap_or(0);
        pc.section_bytes = secs.iter().map(|s| s.bytes.len() as u64).sum();
        pc.markers_wait_ns = self.markers_wait_ns;
        self.report.postcopy = Some(pc);
        Ok(self.final_report())
    }

    /// Asks for every page still missing and waits for them, bounded by
    /// `complete_timeout`.
    fn fetch_the_rest(&mut self, inst: &PageInstaller) -> Result<(), DestinationErrorKind> {
        if let Some(w) = self.urgent_writer.as_ref() {
            for (region, first, count) in inst.missing_runs(MAX_RUN_PAGES) {
                w.send(&ReturnRepr::PageRequest {
                    region,
                    first,
                    count,
                })
                .map_err(|e| DestinationErrorKind::PostcopyLost {
                    why: PostcopyLoss::LastRequest(e),
                    missing: inst.missing(),
                })?;
            }
        }
        if !inst.wait_complete(self.config.complete_timeout) {
            return Err(DestinationErrorKind::PostcopyLost {
                why: PostcopyLoss::LastPagesLate {
                    waited: self.config.complete_timeout,
                },
                missing: inst.missing(),
            });
        }
        Ok(())
    }

    /// After the end of the stream: *ready* once every page of the layout
    /// arrived intact (postcopy RAM fetches the rest on fault) and every
    /// announced section is complete.
    fn check_ready(&mut self) -> Result<(), DestinationErrorKind> {
        let ram_follows = self.session.mode() == SessionMode::Ram;
        let complete = Completeness {
            missing_pages: if ram_follows { 0 } else { self.torn.missing() },
            torn_pages: self.torn.torn_pages(),
            incomplete_sections: self.sections.incomplete(),
        };
        if self
            .session
            .handle_completeness(monotonic_ns(), complete)
            .is_err()
        {
            return Err(session_failed(&self.session));
        }
        flush_session(&mut self.session, self.ret)?;
        Ok(())
    }

    /// A bulk receiver failed: the first error that says why (the others
    /// only saw their sockets shut).
    fn bulk_failure(&mut self) -> DestinationErrorKind {
        let mut errors = Vec::new();
        for h in self.bulk.take().unwrap_or_default() {
            match h.join() {
                Ok(Err(e)) => errors.push(e),
                Ok(Ok(_)) => {}
                Err(_) => errors.push(DestinationErrorKind::ReceiverPanicked),
            }
        }
        let telling = errors.iter().position(|e| {
            !matches!(
                e,
                DestinationErrorKind::Transport { .. } | DestinationErrorKind::Truncated(_)
            )
        });
        match telling {
            Some(i) => errors.swap_remove(i),
            None => errors
                .into_iter()
                .next()
                .unwrap_or(DestinationErrorKind::ReceiverStopped),
        }
    }

    /// Joins the bulk receivers, adding up what they received.
    fn join_bulk(&mut self) -> Result<(), DestinationErrorKind> {
        for h in self.bulk.take().unwrap_or_default() {
            let s = h
                .join()
                .map_err(|_| DestinationErrorKind::ReceiverPanicked)??;
            self.stats.bytes += s.bytes;
            self.stats.pages += s.pages;
            self.stats.zero_pages += s.zero_pages;
            self.stats.torn += s.torn;
        }
        Ok(())
    }

    fn final_report(&mut self) -> DestinationReport {
        self.report.bytes_received = self.stats.bytes;
        self.report.pages_received = self.stats.pages;
        self.report.zero_pages = self.stats.zero_pages;
        self.report.resend_requests = self.stats.torn;
        self.report.clone()
    }
}
