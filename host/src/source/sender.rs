//! One bulk channel's sender thread: takes jobs from the migration loop,
//! checksums each page run where it lies in guest memory just before it is
//! handed to the transport, and paces itself to the bandwidth cap.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ferry_core::wire::{self, Negotiated, Repr, StreamEncoder, HEADER_LEN};
use ferry_uring::{AnyChannel, Channel, OutRecord, Payload};

use super::stall::SendProgress;
use super::{FlushFailed, Job, PageWork, SenderStats, BATCH};
use crate::ram::{Ram, RamRegion, PAGE_SIZE};

/// Why a bulk sender thread stopped before the end of its stream.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The transport failed while the sender handed it records or flushed it.
    #[error("bulk channel {channel} failed while {what}: {source}")]
    Transport {
        /// The bulk channel's index.
        channel: usize,
        /// What the sender was doing: "sending pages", "flushing", "sending
        /// the switchover marker" or "sending the end of the stream".
        what: &'static str,
        /// What the transport said.
        source: ferry_uring::Error,
    },
    /// A record did not encode (a bug).
    #[error("bulk channel {channel} could not encode a record: {source}")]
    Encode {
        /// The bulk channel's index.
        channel: usize,
        /// Why.
        source: wire::EmitError,
    },
    /// The sender was handed pages of a region the guest RAM does not have
    /// (a bug).
    #[error("bulk channel {channel} was handed pages of region {region}, which the guest RAM does not have")]
    UnknownRegion {
        /// The bulk channel's index.
        channel: usize,
        /// The region id.
        region: u16,
    },
    /// The sender was handed pages outside their region (a bug).
    #[error("bulk channel {channel} was handed pages {first}..{} of region {region}, outside the region", first.saturating_add(u64::from(*count)))]
    OutsideRegion {
        /// The bulk channel's index.
        channel: usize,
        /// The region id.
        region: u16,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// The sender thread panicked.
    #[error("the sender thread of bulk channel {channel} panicked")]
    Panicked {
        /// The bulk channel's index.
        channel: usize,
    },
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
        let due = Duration::from_nanos(
            (u128::from(self.sent) * 1_000_000_000 / u128::from(self.rate.max(1))) as u64,
        );
        let el = self.start.elapsed();
        if due > el {
            std::thread::sleep(due - el);
        }
    }
}

/// A bulk channel and what it needs to encode records.
struct Sender<'a, 'm> {
    index: usize,
    chan: AnyChannel,
    enc: StreamEncoder,
    ram: &'a Ram<'m>,
    stats: SenderStats,
    recs: Vec<OutRecord<'static>>,
    batch_bytes: u64,
    pacer: Option<Pacer>,
    progress: &'a SendProgress,
}

/// Runs bulk channel `index` until its jobs end; returns what it sent.
pub(super) fn sender_thread(
    index: usize,
    chan: AnyChannel,
    jobs: Receiver<Job>,
    ram: &Ram<'_>,
    neg: &Negotiated,
    cap: Option<u64>,
    progress: &SendProgress,
) -> Result<SenderStats, SenderError> {
    let mut s = Sender {
        index,
        chan,
        enc: StreamEncoder::new(neg),
        ram,
        stats: SenderStats::default(),
        recs: Vec::with_capacity(BATCH * 2),
        batch_bytes: 0,
        pacer: cap.map(|rate| Pacer {
            rate,
            start: Instant::now(),
            sent: 0,
        }),
        progress,
    };
    // The loop ends with the end record, or when the migration gave up
    // (its queue closed): then the channel closes without one.
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Marker => s.control(Repr::PostcopyListen, "sending the switchover marker")?,
            Job::Pages(work) => s.pages(work, false)?,
            Job::Requested(w) => s.pages(vec![w], true)?,
            Job::Flush(ack) => {
                // The ack only says whether it worked: the cause is this
                // thread's result, which the migration gets when it joins it.
                let r = s.progress.during(|| s.chan.flush());
                let _ = ack.send(if r.is_ok() { Ok(()) } else { Err(FlushFailed) });
                r.map_err(|source| s.transport("flushing", source))?;
            }
            Job::End => {
                s.control(Repr::End, "sending the end of the stream")?;
                break;
            }
        }
    }
    Ok(s.stats)
}

impl Sender<'_, '_> {
    /// A transport failure of this channel while doing `what`.
    fn transport(&self, what: &'static str, source: ferry_uring::Error) -> SenderError {
        SenderError::Transport {
            channel: self.index,
            what,
            source,
        }
    }

    /// A record of this channel that did not encode.
    fn encode_failed(&self, source: wire::EmitError) -> SenderError {
        SenderError::Encode {
            channel: self.index,
            source,
        }
    }

    /// Encodes a header-only record.
    fn header(&mut self, repr: &Repr) -> Result<[u8; HEADER_LEN], SenderError> {
        let mut header = [0u8; HEADER_LEN];
        self.enc
            .encode_with_crc(repr, 0, &mut header)
            .map_err(|e| self.encode_failed(e))?;
        Ok(header)
    }

    /// Sends a header-only record at once (a marker or the end).
    fn control(&mut self, repr: Repr, what: &'static str) -> Result<(), SenderError> {
        let header = self.header(&repr)?;
        let (chan, progress) = (&mut self.chan, self.progress);
        progress
            .during(|| {
                chan.send(&[OutRecord {
                    header,
                    payload: Payload::None,
                }])
                .and_then(|_| chan.flush())
            })
            .map_err(|e| self.transport(what, e))?;
        self.stats.bytes += HEADER_LEN as u64;
        Ok(())
    }

    /// A batch of page runs (zero pages as zero runs on the first pass).
    fn pages(&mut self, work: Vec<PageWork>, requested: bool) -> Result<(), SenderError> {
        self.recs.clear();
        self.batch_bytes = 0;
        for w in work {
            let Some(region) = self.ram.region(w.region).copied() else {
                return Err(SenderError::UnknownRegion {
                    channel: self.index,
                    region: w.region,
                });
            };
            if !w.detect_zero {
                self.push_run(&region, w.first, w.count, false, requested, w.paused)?;
                continue;
            }
            // Split the run into runs of zero and non-zero pages.
            let (mut start, end) = (w.first, w.first + u64::from(w.count));
            while start < end {
                let zero = region.page_is_zero(start);
                let mut stop = start + 1;
                while stop < end && region.page_is_zero(stop) == zero {
                    stop += 1;
                }
                self.push_run(
                    &region,
                    start,
                    (stop - start) as u32,
                    zero,
                    requested,
                    w.paused,
                )?;
                start = stop;
            }
        }
        let recs = std::mem::take(&mut self.recs);
        let (chan, progress) = (&mut self.chan, self.progress);
        let sent = progress
            .during(|| chan.send(&recs))
            .map_err(|e| self.transport("sending pages", e));
        self.recs = recs;
        sent?;
        if requested {
            let (chan, progress) = (&mut self.chan, self.progress);
            progress
                .during(|| chan.flush())
                .map_err(|e| self.transport("flushing", e))?;
        }
        if let Some(p) = self.pacer.as_mut() {
            p.wait(self.batch_bytes);
        }
        Ok(())
    }

    /// Queues one run: a zero run, or a page run checksummed in place.
    fn push_run(
        &mut self,
        region: &RamRegion<'_>,
        first: u64,
        count: u32,
        zero: bool,
        requested: bool,
        paused: bool,
    ) -> Result<(), SenderError> {
        if zero {
            let header = self.header(&Repr::ZeroRun {
                region: region.id,
                first,
                count,
            })?;
            self.recs.push(OutRecord {
                header,
                payload: Payload::None,
            });
            self.stats.zero_pages += u64::from(count);
            self.stats.bytes += HEADER_LEN as u64;
            self.batch_bytes += HEADER_LEN as u64;
            return Ok(());
        }
        // SAFETY: a read that tolerates tearing: if the guest writes the
        // pages before they leave, the checksum fails on the destination,
        // which asks again, and the write re-dirtied the pages anyway.
        let bytes = unsafe { region.pages_slice(first, u64::from(count)) }.ok_or(
            SenderError::OutsideRegion {
                channel: self.index,
                region: region.id,
                first,
                count,
            },
        )?;
        let crc = wire::payload_crc(bytes);
        let mut header = [0u8; HEADER_LEN];
        self.enc
            .encode_with_crc(
                &Repr::PageRun {
                    region: region.id,
                    first,
                    count,
                    requested,
                    paused,
                },
                crc,
                &mut header,
            )
            .map_err(|e| self.encode_failed(e))?;
        let len = u64::from(count) * PAGE_SIZE;
        self.recs.push(OutRecord {
            header,
            payload: Payload::Guest {
                region: u32::from(region.id),
                offset: first * PAGE_SIZE,
                len,
            },
        });
        self.stats.pages += u64::from(count);
        self.stats.bytes += len + HEADER_LEN as u64;
        self.batch_bytes += len + HEADER_LEN as u64;
        Ok(())
    }
}
