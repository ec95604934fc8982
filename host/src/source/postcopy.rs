//! The source after *go* in postcopy: page requests served on the urgent
//! channel, the rest streamed in the background, the postcopy-only sections,
//! and the destination's final *ready*. The source keeps every page until
//! then.

use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

use ferry_core::wire::{Repr, ReturnRepr};

use super::run::SenderHandle;
use super::{
    count_bits, join_senders_list, stream_background, urgent_server, words_bytes, Job, SenderStats,
    Source, SourceError, SourceHold, UrgentServerError, UrgentStats,
};
use crate::migration::{
    Event, PostcopyProgress, SourcePostcopyReport, SourceReport, SNAPSHOT_BITMAP_SECTION,
};

/// What postcopy works on: the pages still to stream and the senders.
pub(super) struct PostcopyWork<'a, 's> {
    pub bitmaps: &'a mut [Vec<u64>],
    pub pages: &'a [u64],
    pub jobs: Option<Vec<SyncSender<Job>>>,
    pub senders: Option<Vec<SenderHandle<'s>>>,
    pub snapshot: Option<&'a [Vec<u64>]>,
    pub max_run: u32,
}

impl<'r, 'm> Source<'r, 'm> {
    /// What a resume of this session's postcopy needs.
    pub(super) fn hold(&self, snapshot: Option<&[Vec<u64>]>) -> SourceHold {
        SourceHold {
            session: self.session.session_id(),
            switchover: self.session.switchover(),
            snapshot: snapshot.map(<[Vec<u64>]>::to_vec),
        }
    }

    /// After *go*: serves page requests on the urgent channel, streams the
    /// remaining pages in the background, then the postcopy-only sections,
    /// and waits for the destination's final acknowledgement.
    pub(super) fn postcopy<'s, 'e>(
        &mut self,
        scope: &'s Scope<'s, 'e>,
        work: PostcopyWork<'_, 's>,
        report: &mut SourceReport,
        pc: &mut SourcePostcopyReport,
        events: &mut dyn FnMut(&Event),
    ) -> Result<(), SourceError>
    where
        'r: 's,
        'm: 's,
    {
        let pages_left: u64 = match work.jobs {
            Some(_) => work.bitmaps.iter().map(|b| count_bits(b)).sum(),
            None => 0,
        };
        let hold = self.hold(work.snapshot);
        let lost = |why: SourceError| SourceError::PostcopyInterrupted {
            why: Box::new(why),
            pages_left,
            hold: Box::new(hold.clone()),
        };
        self.send_ctl(Repr::PostcopyRun, &[]).map_err(lost)?;
        events(&Event::PostcopyStarted {
            ram: work.jobs.is_some(),
            pages_left,
        });
        let requests = Arc::new(UrgentStats::default());
        let server = self
            .start_urgent_server(scope, work.jobs.as_ref(), &requests)
            .map_err(lost)?;
        let snapshot = work.snapshot;
        let streamed = self
            .stream_rest(work, pages_left, &requests, report, pc, events)
            .and_then(|()| self.finish_postcopy_stream(snapshot, report, pc, events));
        if let Some(u) = &self.urgent_waker {
            let _ = u.shutdown();
        }
        let served = server.map(|h| h.join());
        pc.requests = requests.requests.load(Ordering::Relaxed);
        pc.pages_requested = requests.pages.load(Ordering::Relaxed);
        streamed.map_err(lost)?;
        match served {
            Some(Ok(Err(e))) => Err(lost(SourceError::UrgentServer(e))),
            Some(Err(_)) => Err(lost(SourceError::UrgentServer(UrgentServerError::Panicked))),
            _ => Ok(()),
        }
    }

    /// With postcopy RAM, the thread that answers page requests from the
    /// paused guest's memory on the urgent connection.
    fn start_urgent_server<'s, 'e>(
        &mut self,
        scope: &'s Scope<'s, 'e>,
        jobs: Option<&Vec<SyncSender<Job>>>,
        requests: &Arc<UrgentStats>,
    ) -> Result<Option<ScopedJoinHandle<'s, Result<(), UrgentServerError>>>, SourceError>
    where
        'r: 's,
        'm: 's,
    {
        let Some(jobs) = jobs else {
            return Ok(None);
        };
        let Some(conn) = self.urgent.take() else {
            return Ok(None);
        };
        let (reader, writer) = conn.into_halves().map_err(SourceError::UrgentSocket)?;
        let via_bulk = self.config.replies_on_bulk().then(|| jobs.clone());
        let (ram, neg, stats) = (self.ram, self.neg, requests.clone());
        Ok(Some(scope.spawn(move || {
            urgent_server(reader, writer, ram, neg, via_bulk, &stats)
        })))
    }

    /// Streams every page still missing on the destination, then ends and
    /// joins the bulk senders.
    fn stream_rest(
        &mut self,
        work: PostcopyWork<'_, '_>,
        pages_left: u64,
        requests: &UrgentStats,
        report: &mut SourceReport,
        pc: &mut SourcePostcopyReport,
        events: &mut dyn FnMut(&Event),
    ) -> Result<(), SourceError> {
        let Some(jobs) = work.jobs else {
            return Ok(());
        };
        let t = Instant::now();
        let mut progress = |streamed: u64| {
            events(&Event::Postcopy(PostcopyProgress {
                pages_streamed: streamed,
                pages_left: pages_left.saturating_sub(streamed),
                requests: requests.requests.load(Ordering::Relaxed),
                elapsed_ns: t.elapsed().as_nanos() as u64,
            }))
        };
        let sent = stream_background(work.bitmaps, work.pages, &jobs, work.max_run, &mut progress)
            .and_then(|()| {
                jobs.iter()
                    .try_for_each(|j| j.send(Job::End).map_err(|_| SourceError::SenderStopped))
            });
        drop(jobs);
        let joined = work
            .senders
            .map(join_senders_list)
            .unwrap_or(Ok(SenderStats::default()));
        // A sender that died knows better why than "it stopped".
        let stats = match (sent, joined) {
            (Err(SourceError::SenderStopped), Err(cause)) => return Err(cause),
            (Err(e), _) => return Err(e),
            (Ok(()), joined) => joined?,
        };
        report.bytes_sent += stats.bytes;
        report.pages_sent += stats.pages;
        report.zero_pages += stats.zero_pages;
        pc.pages_streamed = pages_left;
        progress(pages_left);
        Ok(())
    }

    /// Awaits *started* (if it has not come yet), sends the postcopy-only
    /// sections and the end of the stream, and waits (bounded) for the final
    /// *ready*.
    fn finish_postcopy_stream(
        &mut self,
        snapshot: Option<&[Vec<u64>]>,
        report: &mut SourceReport,
        pc: &mut SourcePostcopyReport,
        events: &mut dyn FnMut(&Event),
    ) -> Result<(), SourceError> {
        while !self.session.state().is_postcopy() {
            self.await_started(report)?;
        }
        events(&Event::Started);
        if let Some(snap) = snapshot {
            let bytes = words_bytes(snap);
            pc.section_bytes = bytes.len() as u64;
            report.bytes_sent += self.send_section(SNAPSHOT_BITMAP_SECTION, &bytes, true)?;
        }
        let now = self.elapsed_ns();
        self.session
            .finish_postcopy(now)
            .map_err(SourceError::Session)?;
        self.flush_session()?;
        // The destination acknowledges that every page and section arrived
        // with a second ready; until then this side keeps all.
        while !self.session.is_ended() {
            match self.next_return()? {
                // In postcopy, a page that arrives torn is fetched again on
                // fault: resend requests need no answer here.
                ReturnRepr::Resend { .. } => {}
                r => self.apply_return(r, &mut [], report)?,
            }
        }
        Ok(())
    }
}
