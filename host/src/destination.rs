//! The destination side of a migration: accept, handshake, receive pages into
//! place, ask again for torn pages, collect device sections, answer *ready*,
//! and start the guest on *go*.
//!
//! Every bulk connection has its own receiver thread; the control connection
//! is read by the calling thread. Payloads are received straight into guest
//! memory by the transport, after the wire decoder checked that the record
//! lies inside the negotiated layout; their checksum is then verified in
//! place. A torn page (the source guest wrote it while it was on the wire) is
//! remembered and asked for again; a later intact copy clears it. *Ready* is
//! sent only when every channel reached its end record, every torn page was
//! replaced, and the device state arrived.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ferry_core::wire::{
    self, Capabilities, ErrorCode, Hello, Negotiated, Repr, ReturnRepr, MAX_RUN_PAGES,
    MAX_SECTION_CHUNK,
};
use ferry_uring::{AnyChannel, Channel, Transport};

use crate::link::{self, LinkError, Listener, ReturnWriter, WireDecoder};
use crate::migration::{monotonic_ns, DestinationReport, DeviceSection, GuestStarter};
use crate::ram::Ram;

/// Why a migration failed on the destination.
#[derive(Debug, thiserror::Error)]
#[error("{kind} ({})", if *.go_received { "go was received: the guest belongs to this side" } else { "go was never received: the guest belongs to the source" })]
pub struct DestinationError {
    /// What went wrong.
    pub kind: DestinationErrorKind,
    /// Whether *go* arrived before the failure, which tells the operator
    /// which side may run the guest.
    pub go_received: bool,
}

/// What went wrong on the destination.
#[derive(Debug, thiserror::Error)]
pub enum DestinationErrorKind {
    /// Accepting or the handshake failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The transport failed or refused a record.
    #[error("the {channel} channel failed: {source}")]
    Transport {
        /// Which channel.
        channel: String,
        /// What the transport said.
        source: ferry_uring::Error,
    },
    /// The source closed a connection before the end of its stream.
    #[error("the source closed the {0} channel before the end of the stream")]
    Truncated(String),
    /// A record arrived where it makes no sense.
    #[error("the {channel} channel carried an unexpected {record}")]
    Unexpected {
        /// Which channel.
        channel: String,
        /// The record.
        record: String,
    },
    /// A page arrived torn after the source had stopped.
    #[error("pages {first}..{} of region {region} failed their checksum after the source stopped", first + u64::from(*count))]
    Checksum {
        /// Region id.
        region: u16,
        /// First page.
        first: u64,
        /// Page count.
        count: u32,
    },
    /// A device section arrived out of order.
    #[error("device section {section} arrived with a chunk at offset {offset} where {expected} was expected")]
    Section {
        /// Section id.
        section: u16,
        /// The chunk's offset.
        offset: u64,
        /// The offset expected.
        expected: u64,
    },
    /// The embedding hypervisor could not start the guest.
    #[error("could not start the guest: {0}")]
    Start(crate::migration::CallbackError),
    /// A receiver thread died.
    #[error("a receiver thread failed: {0}")]
    Thread(String),
}

impl DestinationErrorKind {
    fn code(&self) -> ErrorCode {
        match self {
            DestinationErrorKind::Link(_) => ErrorCode::Handshake,
            DestinationErrorKind::Transport { .. } | DestinationErrorKind::Truncated(_) => ErrorCode::Io,
            DestinationErrorKind::Unexpected { .. } | DestinationErrorKind::Section { .. } => ErrorCode::Protocol,
            DestinationErrorKind::Checksum { .. } => ErrorCode::Checksum,
            DestinationErrorKind::Start(_) | DestinationErrorKind::Thread(_) => ErrorCode::Internal,
        }
    }
}

/// Pages that arrived torn and wait for an intact copy.
#[derive(Debug, Default)]
struct Torn {
    pages: Mutex<BTreeSet<(u16, u64)>>,
    any: AtomicBool,
}

impl Torn {
    fn add(&self, region: u16, first: u64, count: u32) {
        if let Ok(mut p) = self.pages.lock() {
            for pg in first..first + u64::from(count) {
                p.insert((region, pg));
            }
            self.any.store(true, Ordering::Release);
        }
    }

    fn heal(&self, region: u16, first: u64, count: u32) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut p) = self.pages.lock() {
            let end = first + u64::from(count);
            let hit: Vec<_> = p.range((region, first)..(region, end)).copied().collect();
            for k in hit {
                p.remove(&k);
            }
            self.any.store(!p.is_empty(), Ordering::Release);
        }
    }

    /// The torn pages as runs.
    fn runs(&self) -> Vec<(u16, u64, u32)> {
        let Ok(p) = self.pages.lock() else {
            return Vec::new();
        };
        let mut runs: Vec<(u16, u64, u32)> = Vec::new();
        for &(r, pg) in p.iter() {
            match runs.last_mut() {
                Some((lr, lf, lc)) if *lr == r && *lf + u64::from(*lc) == pg && *lc < MAX_RUN_PAGES => *lc += 1,
                _ => runs.push((r, pg, 1)),
            }
        }
        runs
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct RecvStats {
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    torn: u64,
}

/// The outcome of one page record: checks the payload in place.
fn apply_page_record(
    ram: &Ram<'_>,
    neg: &Negotiated,
    rec: &wire::Record,
    torn: &Torn,
    ret: &ReturnWriter,
    stats: &mut RecvStats,
    strict: bool,
) -> Result<(), DestinationErrorKind> {
    match rec.repr {
        Repr::PageRun { region, first, count, .. } => {
            stats.pages += u64::from(count);
            if neg.caps.payload_checksums {
                let r = ram.region(region).ok_or_else(|| DestinationErrorKind::Unexpected {
                    channel: "bulk".into(),
                    record: format!("page run of unknown region {region}"),
                })?;
                // SAFETY: the transport finished writing these pages; nothing
                // else writes them while this slice lives (a page lives on one
                // channel only, and the guest is not running).
                let bytes = unsafe { r.pages_slice(first, u64::from(count)) }.ok_or_else(|| {
                    DestinationErrorKind::Unexpected {
                        channel: "bulk".into(),
                        record: format!("page run {first}+{count} outside region {region}"),
                    }
                })?;
                if wire::payload_crc(bytes) != rec.payload_crc {
                    if strict {
                        return Err(DestinationErrorKind::Checksum { region, first, count });
                    }
                    stats.torn += u64::from(count);
                    torn.add(region, first, count);
                    // A failed send only loses a hint: the page is dirty on the
                    // source and comes again; the end-of-stream check asks again.
                    let _ = ret.send(&ReturnRepr::Resend { region, first, count });
                    return Ok(());
                }
            }
            torn.heal(region, first, count);
            Ok(())
        }
        Repr::ZeroRun { region, first, count } => {
            let r = ram.region(region).ok_or_else(|| DestinationErrorKind::Unexpected {
                channel: "bulk".into(),
                record: format!("zero run of unknown region {region}"),
            })?;
            if !r.zero_pages(first, u64::from(count)) {
                return Err(DestinationErrorKind::Unexpected {
                    channel: "bulk".into(),
                    record: format!("zero run {first}+{count} outside region {region}"),
                });
            }
            stats.zero_pages += u64::from(count);
            torn.heal(region, first, count);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn bulk_thread(
    index: usize,
    mut chan: AnyChannel,
    ram: &Ram<'_>,
    neg: &Negotiated,
    torn: &Torn,
    ret: &ReturnWriter,
) -> Result<RecvStats, DestinationErrorKind> {
    let name = format!("bulk {index}");
    let mut dec = WireDecoder::new(neg.clone(), 0);
    let mut stats = RecvStats::default();
    let mut buf = [0u8; 0];
    loop {
        let got = chan
            .recv(&mut dec, &mut buf)
            .map_err(|source| DestinationErrorKind::Transport { channel: name.clone(), source })?;
        let Some(got) = got else {
            return Err(DestinationErrorKind::Truncated(name));
        };
        stats.bytes += got.placement.len() + wire::HEADER_LEN as u64;
        let Some(rec) = dec.last() else {
            return Err(DestinationErrorKind::Thread("the decoder lost its record".into()));
        };
        match rec.repr {
            Repr::PageRun { .. } | Repr::ZeroRun { .. } => {
                apply_page_record(ram, neg, &rec, torn, ret, &mut stats, false)?
            }
            Repr::End => return Ok(stats),
            other => {
                return Err(DestinationErrorKind::Unexpected {
                    channel: name,
                    record: format!("{other:?}"),
                })
            }
        }
    }
}

/// Receives a migration on `listener` into `ram`, and starts the guest
/// through `starter` on *go*.
pub fn receive<S: GuestStarter>(
    listener: &Listener,
    ram: &Ram<'_>,
    starter: &mut S,
    transport: Transport,
) -> Result<DestinationReport, DestinationError> {
    let mut go_received = false;
    let mut ret_holder: Option<ReturnWriter> = None;
    let r = receive_inner(listener, ram, starter, transport, &mut go_received, &mut ret_holder);
    r.map_err(|kind| {
        if let Some(ret) = ret_holder {
            if !go_received {
                let _ = ret.send(&ReturnRepr::Error { code: kind.code(), detail: 0 });
            }
        }
        DestinationError { kind, go_received }
    })
}

fn receive_inner<S: GuestStarter>(
    listener: &Listener,
    ram: &Ram<'_>,
    starter: &mut S,
    transport: Transport,
    go_received: &mut bool,
    ret_holder: &mut Option<ReturnWriter>,
) -> Result<DestinationReport, DestinationErrorKind> {
    let probe = ferry_uring::probe();
    let mut ctl_conn = listener.accept()?;
    let ret = ReturnWriter::new(ctl_conn.try_clone().map_err(|source| LinkError::Io {
        what: "duplicating the control socket",
        source,
    })?);
    let layout = ram.layout().map_err(|e| DestinationErrorKind::Unexpected {
        channel: "control".into(),
        record: format!("invalid local layout: {e:?}"),
    })?;
    let ours = Hello::new(
        Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: true,
            channels: 0,
        },
        layout,
    );
    let neg = link::destination_handshake(&mut ctl_conn, &ours, &ret)?;
    *ret_holder = Some(ret.clone());
    let regions = ram.mem_regions();
    let ctl_chan = AnyChannel::new(
        ctl_conn.try_clone().map_err(|source| LinkError::Io {
            what: "duplicating the control socket",
            source,
        })?,
        &regions,
        transport,
        &probe,
    )
    .map_err(|source| DestinationErrorKind::Transport { channel: "control".into(), source })?;
    let n_bulk = usize::from(neg.caps.channels.saturating_sub(1)).max(1);
    let mut bulk = Vec::with_capacity(n_bulk);
    for i in 0..n_bulk {
        let c = listener.accept()?;
        bulk.push(
            AnyChannel::new(c, &regions, transport, &probe)
                .map_err(|source| DestinationErrorKind::Transport { channel: format!("bulk {i}"), source })?,
        );
    }
    let torn = Torn::default();
    let mut report = DestinationReport::default();

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let bulk_fds: Vec<i32> = bulk.iter().map(|c| c.stream().fd()).collect();
        for (i, chan) in bulk.into_iter().enumerate() {
            let (neg, torn, ret) = (&neg, &torn, &ret);
            handles.push(scope.spawn(move || bulk_thread(i, chan, ram, neg, torn, ret)));
        }
        let mut handles = Some(handles);
        let result = (|| {
        let mut ctl = ctl_chan;
        let mut dec = WireDecoder::new(neg.clone(), MAX_SECTION_CHUNK as usize);
        let mut buf = vec![0u8; MAX_SECTION_CHUNK as usize];
        let mut sections: BTreeMap<u16, (Vec<u8>, bool)> = BTreeMap::new();
        let mut stats = RecvStats::default();
        let mut ended = false;
        let mut ready_sent = false;
        loop {
            let got = match ctl.recv(&mut dec, &mut buf) {
                Ok(g) => g,
                Err(source) => {
                    ctl_conn.shutdown();
                    return Err(DestinationErrorKind::Transport { channel: "control".into(), source });
                }
            };
            let Some(got) = got else {
                ctl_conn.shutdown();
                return Err(DestinationErrorKind::Truncated("control".into()));
            };
            stats.bytes += got.placement.len() + wire::HEADER_LEN as u64;
            let Some(rec) = dec.last() else {
                return Err(DestinationErrorKind::Thread("the decoder lost its record".into()));
            };
            match rec.repr {
                Repr::Section { section, offset, len, last } => {
                    let entry = sections.entry(section).or_insert_with(|| (Vec::new(), false));
                    if entry.1 || entry.0.len() as u64 != offset {
                        return Err(DestinationErrorKind::Section { section, offset, expected: entry.0.len() as u64 });
                    }
                    entry.0.extend_from_slice(&buf[..len as usize]);
                    entry.1 = last;
                    if neg.caps.payload_checksums && wire::payload_crc(&buf[..len as usize]) != rec.payload_crc {
                        return Err(DestinationErrorKind::Unexpected {
                            channel: "control".into(),
                            record: format!("device section {section} with a bad checksum"),
                        });
                    }
                }
                Repr::StopAndCopy => {}
                Repr::PageRun { .. } | Repr::ZeroRun { .. } => {
                    // Resent pages: the source is stopped, so they must be intact.
                    apply_page_record(ram, &neg, &rec, &torn, &ret, &mut stats, true)?;
                }
                Repr::End if !ended => {
                    ended = true;
                    if let Some(hs) = handles.take() {
                        for h in hs {
                            match h.join() {
                                Ok(Ok(s)) => {
                                    stats.bytes += s.bytes;
                                    stats.pages += s.pages;
                                    stats.zero_pages += s.zero_pages;
                                    stats.torn += s.torn;
                                }
                                Ok(Err(e)) => return Err(e),
                                Err(_) => return Err(DestinationErrorKind::Thread("a receiver thread panicked".into())),
                            }
                        }
                    }
                    if let Some((id, _)) = sections.iter().find(|(_, (_, last))| !*last) {
                        return Err(DestinationErrorKind::Unexpected {
                            channel: "control".into(),
                            record: format!("end of stream with device section {id} incomplete"),
                        });
                    }
                    for (region, first, count) in torn.runs() {
                        ret.send(&ReturnRepr::Resend { region, first, count }).map_err(|source| {
                            LinkError::Io { what: "asking for torn pages again", source }
                        })?;
                    }
                }
                Repr::Go if ready_sent => {
                    *go_received = true;
                    report.go_at_ns = monotonic_ns();
                    let secs: Vec<DeviceSection> = sections
                        .iter()
                        .map(|(id, (bytes, _))| DeviceSection { id: *id, bytes: bytes.clone() })
                        .collect();
                    starter.start(&secs).map_err(DestinationErrorKind::Start)?;
                    report.resumed_at_ns = monotonic_ns();
                    report.bytes_received = stats.bytes;
                    report.pages_received = stats.pages;
                    report.zero_pages = stats.zero_pages;
                    report.resend_requests = stats.torn;
                    report.sections = sections.len() as u32;
                    return Ok(report.clone());
                }
                other => {
                    ctl_conn.shutdown();
                    return Err(DestinationErrorKind::Unexpected {
                        channel: "control".into(),
                        record: format!("{other:?}"),
                    });
                }
            }
            if ended && !ready_sent && !torn.any.load(Ordering::Acquire) {
                ret.send(&ReturnRepr::Ready)
                    .map_err(|source| LinkError::Io { what: "sending ready", source })?;
                ready_sent = true;
            }
        }
        })();
        if result.is_err() {
            // Wake the receiver threads so the scope can end.
            ctl_conn.shutdown();
            for fd in &bulk_fds {
                // SAFETY: shutdown on a socket descriptor owned by a live
                // channel only changes the socket's state; it does not close it.
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
        }
        result
    })
}

