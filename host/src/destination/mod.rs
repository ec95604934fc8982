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
//!
//! # Postcopy
//!
//! With postcopy-ram negotiated, channels are built without guest memory:
//! payloads land in buffers and [`PageInstaller`] puts them in place (a copy
//! before switchover, `UFFDIO_COPY` after), keeping a received-pages bitmap.
//! On memfd-backed RAM ([`receive_in_place`]) they are received straight
//! into a second mapping and mapped with `UFFDIO_CONTINUE` after switchover.
//! The records of a postcopy migration, in order:
//!
//! - bulk channels: page runs; at switchover a `PostcopyListen` marker; after
//!   *go* the background stream of the remaining pages; `End`. (A `Discard`
//!   run is still taken before switchover, though Ferry's source no longer
//!   sends one.)
//! - control channel (RAM in postcopy): `PostcopyListen`, the discard map
//!   (`DiscardMap`: pages that changed after they were sent), device
//!   sections, `End`; the destination waits for every bulk marker, arms
//!   userfaultfd (dropping the pages of the map, and zapping every page not
//!   received intact) and answers *ready*; then `Go` (the guest starts),
//!   `PostcopyRun`, postcopy-only sections, `End`.
//! - control channel (only postcopy-only sections follow): `StopAndCopy`,
//!   device sections, `PostcopyListen`, `End`, *ready*, `Go`, `PostcopyRun`,
//!   postcopy-only sections, `End`.
//! - the urgent connection (opened last, postcopy-ram only): page requests
//!   from the destination, requested page runs from the source.
//!
//! Postcopy ends with a second *ready* on the return path: the destination's
//! acknowledgement that every page and section arrived. Until then the source
//! keeps its whole state. If the connection is lost in postcopy, the guest's
//! faults on missing pages stay pending (the userfaultfd is kept open in
//! [`PostcopyHold`]) and nothing is written wrongly.
//!
//! # Resuming an interrupted postcopy
//!
//! [`resume_postcopy`] takes the hold up again: it waits for the source to
//! come back with a hello naming the session of the hold, opens the
//! channels again, serves faults anew, and on the source's end of stream
//! asks for every page still missing (which also covers the faults that
//! were in flight when the link broke). A resume that fails returns a new
//! hold, so it can be tried again.

// `Negotiated` and `Hello` are `Copy` in current ferry-core; the clones
// below stay correct whether or not they are.

mod control;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::session::{DestinationSession, Limits, Mode as SessionMode, Timeouts};
use ferry_core::wire::{
    self, Capabilities, ErrorCode, Hello, Negotiated, Repr, ReturnRepr, MAX_RUN_PAGES,
    MAX_SECTION_CHUNK,
};
use ferry_uring::{AnyChannel, Channel, Decoder, Placement, Transport};

use crate::link::{
    self, Acceptor, ChannelRole, LinkError, ReturnWriter, WireDecodeError, WireDecoder,
};
use crate::migration::{monotonic_ns, DestinationReport, GuestStarter};
use crate::postcopy::{
    Claim, FaultService, FaultServiceError, PageInstaller, PostcopyError, RequestSink, Uffd, Via,
};
use crate::ram::{Ram, PAGE_SIZE};

/// Why a migration failed on the destination.
#[derive(Debug, thiserror::Error)]
#[error("{kind} ({})", if *.go_received { "go was received: the guest belongs to this side" } else { "go was never received: the guest belongs to the source" })]
pub struct DestinationError {
    /// What went wrong.
    pub kind: DestinationErrorKind,
    /// Whether *go* arrived before the failure, which tells the operator
    /// which side may run the guest.
    pub go_received: bool,
    /// When postcopy was interrupted: the state recovery needs.
    pub postcopy_hold: Option<Box<PostcopyHold>>,
}

/// What an interrupted postcopy leaves on the destination: the guest runs
/// here, some pages are missing, and its faults on them wait on this
/// userfaultfd. Dropping the hold closes the userfaultfd, which lets those
/// threads go on with zero pages: kill the guest first.
#[derive(Debug)]
pub struct PostcopyHold {
    /// The userfaultfd registered over guest RAM.
    pub uffd: Arc<Uffd>,
    /// Pages not received.
    pub missing_pages: u64,
    /// The missing pages, as (region, first page, count) runs.
    pub missing_runs: Vec<(u16, u64, u32)>,
    /// The session a resume must name ([`resume_postcopy`]).
    pub session: u32,
    /// What the two sides agreed: layout and capabilities.
    pub negotiated: Negotiated,
    /// Which postcopy was running.
    pub mode: SessionMode,
    installer: Arc<PageInstaller>,
}

impl PostcopyHold {
    fn of(
        installer: Arc<PageInstaller>,
        session: u32,
        negotiated: Negotiated,
        mode: SessionMode,
    ) -> Option<PostcopyHold> {
        let uffd = installer.uffd()?;
        Some(PostcopyHold {
            uffd,
            missing_pages: installer.missing(),
            missing_runs: installer.missing_runs(MAX_RUN_PAGES),
            session,
            negotiated,
            mode,
            installer,
        })
    }
}

/// A fresh session id: unpredictable and never 0, so a resume names one
/// migration only (this is no authentication: that needs TLS).
fn fresh_session_id() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut id = u32::from_le_bytes(b);
    if n != 4 {
        // No entropy from the kernel: the clock still tells two sessions
        // of one host apart.
        id = monotonic_ns() as u32 ^ std::process::id().rotate_left(16);
    }
    id.max(1)
}

/// How the destination receives.
#[derive(Clone, Copy, Debug)]
pub struct DestinationConfig {
    /// The transport.
    pub transport: Transport,
    /// Offer the postcopy-ram capability. Guest RAM must then be anonymous
    /// private memory that was not prefaulted (pages not received are zapped
    /// at switchover and fetched on fault).
    pub postcopy_ram: bool,
    /// Offer the postcopy-only-sections capability.
    pub postcopy_only_sections: bool,
    /// How long postcopy may wait for its last pages after the source's end
    /// of stream.
    pub complete_timeout: Duration,
    /// Every bound on a wait: the hello, a silent source, torn pages sent
    /// again, *go* after *ready*. See [`Timeouts`] for the defaults.
    pub timeouts: Timeouts,
    /// What this side takes, stated in its *accept*: channels (control
    /// included) and bytes of device state. A source that asks for more is
    /// refused.
    pub limits: Limits,
}

/// The channels a destination serves by default: control, up to 14 bulk
/// channels, urgent.
pub const DEFAULT_MAX_CHANNELS: u16 = 16;
/// The device state a destination takes by default, every section together.
pub const DEFAULT_MAX_DEVICE_BYTES: u64 = 256 << 20;

impl DestinationConfig {
    /// Precopy only, over `transport`.
    pub fn new(transport: Transport) -> DestinationConfig {
        DestinationConfig {
            transport,
            postcopy_ram: false,
            postcopy_only_sections: false,
            complete_timeout: Duration::from_secs(60),
            timeouts: Timeouts::DEFAULT,
            limits: Limits {
                max_channels: DEFAULT_MAX_CHANNELS,
                max_device_bytes: DEFAULT_MAX_DEVICE_BYTES,
            },
        }
    }
}

/// What went wrong on the destination.
#[derive(Debug, thiserror::Error)]
pub enum DestinationErrorKind {
    /// The protocol ended the migration: a wait ran out, the source broke the
    /// protocol or exceeded a stated limit, or the stream ended incomplete.
    #[error("the migration failed: {0}")]
    Session(ferry_core::session::SessionError),
    /// Accepting or the handshake failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The transport failed or refused a record.
    #[error("the {channel} channel failed: {source}")]
    Transport {
        /// Which channel.
        channel: ChannelRole,
        /// What the transport said.
        source: ferry_uring::Error,
    },
    /// The source closed a connection before the end of its stream.
    #[error("the source closed the {0} channel before the end of the stream")]
    Truncated(ChannelRole),
    /// A record arrived where it makes no sense.
    #[error("the {channel} channel carried a record it may not carry: {record:?}")]
    Unexpected {
        /// Which channel.
        channel: ChannelRole,
        /// The record.
        record: Repr,
    },
    /// A record named pages outside the guest RAM.
    #[error("the {channel} channel carried pages {first}..{} of region {region}, outside the guest RAM", first.saturating_add(u64::from(*count)))]
    OutOfRange {
        /// Which channel.
        channel: ChannelRole,
        /// Region id.
        region: u16,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// A header on the urgent channel did not decode.
    #[error("the {channel} channel carried a header that did not decode: {source}")]
    Decode {
        /// Which channel.
        channel: ChannelRole,
        /// Why.
        source: WireDecodeError,
    },
    /// The source switched RAM to postcopy without the capability.
    #[error("the source started postcopy of RAM without the postcopy-ram capability")]
    PostcopyNotNegotiated,
    /// The session refused an input without failing (it had completed).
    #[error("the migration had already completed here when the {state} refused another record")]
    Refused {
        /// Where the protocol stood.
        state: &'static str,
    },
    /// A receiver thread panicked.
    #[error("a receiver thread panicked")]
    ReceiverPanicked,
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
    /// A device section's chunk failed its checksum.
    #[error("device section {section} failed its checksum at offset {offset}")]
    SectionChecksum {
        /// Section id.
        section: u16,
        /// The chunk's offset.
        offset: u64,
    },
    /// A device section never got its last chunk.
    #[error(
        "the stream ended with device section {section} incomplete ({received} bytes received)"
    )]
    SectionIncomplete {
        /// Section id.
        section: u16,
        /// Bytes received.
        received: u64,
    },
    /// This side's own guest RAM does not make a valid layout.
    #[error("the guest RAM here does not make a valid layout: {0}")]
    Layout(ferry_core::wire::LayoutError),
    /// The decoder handed out no record after a receive (a bug).
    #[error("the control channel's decoder lost its record")]
    DecoderLost,
    /// A bulk receiver stopped before the switchover marker.
    #[error("a bulk receiver stopped before the switchover")]
    ReceiverStopped,
    /// The embedding hypervisor could not start the guest.
    #[error("could not start the guest: {0}")]
    Start(crate::migration::CallbackError),
    /// The fault service stopped with an error.
    #[error("the fault service failed: {0}")]
    FaultService(#[source] FaultServiceError),
    /// Serving postcopy faults failed.
    #[error("postcopy failed: {0}")]
    Postcopy(#[from] PostcopyError),
    /// The connection was lost while the guest ran here in postcopy.
    #[error("the connection to the source was lost during postcopy ({why}): {missing} pages never arrived; the guest's vCPUs that touch them wait on their faults and nothing was written wrongly; the source holds every page")]
    PostcopyLost {
        /// What failed.
        #[source]
        why: PostcopyLoss,
        /// Pages missing.
        missing: u64,
    },
}

/// What cut postcopy off from the source while the guest ran here.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyLoss {
    /// The source closed the urgent channel with pages still missing.
    #[error("the source closed the urgent channel")]
    Closed,
    /// Reading a reply on the urgent channel failed.
    #[error("the urgent channel failed: {0}")]
    Urgent(#[source] std::io::Error),
    /// Asking for the pages still missing at the end of the stream failed.
    #[error("asking for the last pages failed: {0}")]
    LastRequest(#[source] std::io::Error),
    /// The pages still missing at the end of the stream did not arrive in
    /// time.
    #[error("the last pages did not arrive within {waited:?}")]
    LastPagesLate {
        /// How long they were waited for.
        waited: Duration,
    },
    /// Another failure, after *go*.
    #[error(transparent)]
    Failed(Box<DestinationErrorKind>),
}

impl DestinationErrorKind {
    fn code(&self) -> ErrorCode {
        match self {
            DestinationErrorKind::Link(_) => ErrorCode::Handshake,
            // The stream itself was at fault, not the transport.
            DestinationErrorKind::Transport {
                source:
                    ferry_uring::Error::Refused { .. } | ferry_uring::Error::BufferTooSmall { .. },
                ..
            } => ErrorCode::Protocol,
            // Only the TLS record reader reports bytes that do not hold up:
            // a record that failed authentication.
            DestinationErrorKind::Transport {
                source: ferry_uring::Error::Recv { source, .. },
                ..
            } if source.kind() == std::io::ErrorKind::InvalidData => ErrorCode::Authentication,
            DestinationErrorKind::Transport {
                source: ferry_uring::Error::OutOfRange { .. },
                ..
            }
            | DestinationErrorKind::OutOfRange { .. } => ErrorCode::OutOfRange,
            DestinationErrorKind::Transport { .. } | DestinationErrorKind::Truncated(_) => {
                ErrorCode::Io
            }
            DestinationErrorKind::Unexpected { .. }
            | DestinationErrorKind::Decode { .. }
            | DestinationErrorKind::PostcopyNotNegotiated
            | DestinationErrorKind::Refused { .. }
            | DestinationErrorKind::Section { .. }
            | DestinationErrorKind::SectionIncomplete { .. } => ErrorCode::Protocol,
            DestinationErrorKind::SectionChecksum { .. } => ErrorCode::Checksum,
            DestinationErrorKind::Layout(_)
            | DestinationErrorKind::DecoderLost
            | DestinationErrorKind::ReceiverStopped => ErrorCode::Internal,
            DestinationErrorKind::Checksum { .. } => ErrorCode::Checksum,
            DestinationErrorKind::Start(_)
            | DestinationErrorKind::ReceiverPanicked
            | DestinationErrorKind::FaultService(_)
            | DestinationErrorKind::Postcopy(_) => ErrorCode::Internal,
            DestinationErrorKind::PostcopyLost { .. } => ErrorCode::Io,
            DestinationErrorKind::Session(e) => match e.failure {
                ferry_core::session::Failure::Timeout { .. }
                | ferry_core::session::Failure::LinkLost => ErrorCode::Io,
                ferry_core::session::Failure::Cancelled => ErrorCode::Cancelled,
                ferry_core::session::Failure::Local => ErrorCode::Internal,
                _ => ErrorCode::Protocol,
            },
        }
    }
}

/// What arrived: pages received torn that wait for an intact copy, and
/// every page of which a copy arrived at least once (intact, torn, or as a
/// zero run), so that *ready* is answered only when the whole layout is here
/// and nothing is still torn.
#[derive(Debug, Default)]
struct Torn {
    pages: Mutex<BTreeSet<(u16, u64)>>,
    any: AtomicBool,
    /// One bit per page of each region: arrived intact at least once.
    arrived: Vec<Vec<AtomicU64>>,
    /// Pages of each region.
    region_pages: Vec<u64>,
}

impl Torn {
    fn new(ram: &Ram<'_>) -> Torn {
        let region_pages: Vec<u64> = ram.regions().iter().map(|r| r.pages()).collect();
        Torn {
            arrived: region_pages
                .iter()
                .map(|&p| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            region_pages,
            ..Torn::default()
        }
    }

    /// Marks `first..first + count` of `region` arrived.
    fn arrive(&self, region: u16, first: u64, count: u32) {
        let Some(words) = self.arrived.get(usize::from(region)) else {
            return;
        };
        let end = first.saturating_add(u64::from(count));
        let mut page = first;
        while page < end {
            let (w, b) = ((page / 64) as usize, page % 64);
            let n = (64 - b).min(end - page);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            if let Some(word) = words.get(w) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            page += n;
        }
    }

    /// Pages of the layout that never arrived.
    fn missing(&self) -> u64 {
        self.arrived
            .iter()
            .zip(&self.region_pages)
            .map(|(words, &pages)| {
                let got: u64 = words
                    .iter()
                    .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                    .sum();
                pages.saturating_sub(got)
            })
            .sum()
    }

    /// Pages still torn.
    fn torn_pages(&self) -> u64 {
        self.pages
            .lock()
            .map(|p| p.len() as u64)
            .unwrap_or(u64::MAX)
    }

    fn add(&self, region: u16, first: u64, count: u32) {
        // A torn copy arrived: the page is not missing but torn, and *ready*
        // waits (bounded) for its intact copy.
        self.arrive(region, first, count);
        if let Ok(mut p) = self.pages.lock() {
            for pg in first..first + u64::from(count) {
                p.insert((region, pg));
            }
            self.any.store(true, Ordering::Release);
        }
    }

    fn heal(&self, region: u16, first: u64, count: u32) {
        self.arrive(region, first, count);
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

    /// Asks the source, on the return path, for every torn page again.
    fn ask_again(&self, ret: &ReturnWriter) -> Result<(), LinkError> {
        for (region, first, count) in self.runs() {
            ret.send(&ReturnRepr::Resend {
                region,
                first,
                count,
            })
            .map_err(|source| LinkError::Io {
                what: "asking for torn pages again",
                source,
            })?;
        }
        Ok(())
    }

    /// The torn pages as runs.
    fn runs(&self) -> Vec<(u16, u64, u32)> {
        let Ok(p) = self.pages.lock() else {
            return Vec::new();
        };
        let mut runs: Vec<(u16, u64, u32)> = Vec::new();
        for &(r, pg) in p.iter() {
            match runs.last_mut() {
                Some((lr, lf, lc))
                    if *lr == r && *lf + u64::from(*lc) == pg && *lc < MAX_RUN_PAGES =>
                {
                    *lc += 1
                }
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
    // A page read from the paused source cannot be torn: a bad checksum is
    // corruption, and fails the migration.
    let strict = strict || matches!(rec.repr, Repr::PageRun { paused: true, .. });
    match rec.repr {
        Repr::PageRun {
            region,
            first,
            count,
            ..
        } => {
            stats.pages += u64::from(count);
            if neg.caps.payload_checksums {
                let out_of_range = || DestinationErrorKind::OutOfRange {
                    channel: ChannelRole::Bulk(0),
                    region,
                    first,
                    count,
                };
                let r = ram.region(region).ok_or_else(out_of_range)?;
                // SAFETY: the transport finished writing these pages; nothing
                // else writes them while this slice lives (a page lives on one
                // channel only, and the guest is not running).
                let bytes =
                    unsafe { r.pages_slice(first, u64::from(count)) }.ok_or_else(out_of_range)?;
                if wire::payload_crc(bytes) != rec.payload_crc {
                    if strict {
                        return Err(DestinationErrorKind::Checksum {
                            region,
                            first,
                            count,
                        });
                    }
                    stats.torn += u64::from(count);
                    torn.add(region, first, count);
                    // A failed send only loses a hint: the page is dirty on the
                    // source and comes again; the end-of-stream check asks again.
                    let _ = ret.send(&ReturnRepr::Resend {
                        region,
                        first,
                        count,
                    });
                    return Ok(());
                }
            }
            torn.heal(region, first, count);
            Ok(())
        }
        Repr::ZeroRun {
            region,
            first,
            count,
        } => {
            let out_of_range = || DestinationErrorKind::OutOfRange {
                channel: ChannelRole::Bulk(0),
                region,
                first,
                count,
            };
            let r = ram.region(region).ok_or_else(out_of_range)?;
            // SAFETY: precopy records are applied before *go*, while the
            // guest here is not running, and pages reach guest RAM only from
            // the one channel their stripe belongs to, so nothing else touches
            // these pages during the write.
            if !unsafe { r.zero_pages(first, u64::from(count)) } {
                return Err(out_of_range());
            }
            stats.zero_pages += u64::from(count);
            torn.heal(region, first, count);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Largest page-run payload.
const MAX_RUN_BYTES: usize = MAX_RUN_PAGES as usize * PAGE_SIZE as usize;

/// The destination's decoder: the wire decoder, plus — when pages are
/// received in place through a second mapping after switchover — the claim
/// of each page run, so that a page is written by one receiver only and a
/// late copy never overwrites what the guest wrote since.
struct RecvDecoder<'i> {
    inner: WireDecoder,
    /// Set in in-place mode.
    inst: Option<&'i PageInstaller>,
    /// The pages this receiver claimed, when it could not claim the whole
    /// run (the payload then goes to the buffer).
    partial: Option<Vec<u64>>,
    buffer_len: u64,
}

impl<'i> RecvDecoder<'i> {
    fn new(
        inner: WireDecoder,
        inst: Option<&'i PageInstaller>,
        buffer_len: usize,
    ) -> RecvDecoder<'i> {
        RecvDecoder {
            inner,
            inst: inst.filter(|i| i.in_place()),
            partial: None,
            buffer_len: buffer_len as u64,
        }
    }

    fn last(&self) -> Option<wire::Record> {
        self.inner.last()
    }
}

impl Decoder for RecvDecoder<'_> {
    type Error = WireDecodeError;

    fn place(&mut self, header: &[u8; wire::HEADER_LEN]) -> Result<Placement, WireDecodeError> {
        self.partial = None;
        let p = self.inner.place(header)?;
        let (Some(inst), Placement::Guest { len, .. }, Some(rec)) =
            (self.inst, p, self.inner.last())
        else {
            return Ok(p);
        };
        let Repr::PageRun {
            region,
            first,
            count,
            ..
        } = rec.repr
        else {
            return Ok(p);
        };
        match inst.claim(region, first, u64::from(count)) {
            Ok(Claim::All) => Ok(p),
            Ok(Claim::Some(pages)) => {
                if len > self.buffer_len {
                    return Err(WireDecodeError::TooLarge {
                        len,
                        buffer: self.buffer_len,
                    });
                }
                self.partial = Some(pages);
                Ok(Placement::Buffer { len })
            }
            Err(e) => Err(WireDecodeError::Refused(e.to_string())),
        }
    }
}

/// Checks a page run received in place (or, for a partly claimed run, into
/// `buf`) and installs it.
#[allow(clippy::too_many_arguments)]
fn install_placed(
    inst: &PageInstaller,
    neg: &Negotiated,
    rec: &wire::Record,
    partial: Option<Vec<u64>>,
    buf: &[u8],
    torn: &Torn,
    ret: Option<&ReturnWriter>,
    stats: &mut RecvStats,
    via: Via,
    strict: bool,
) -> Result<(), DestinationErrorKind> {
    // A page read from the paused source cannot be torn: a bad checksum is
    // corruption, and fails the migration.
    let strict = strict || matches!(rec.repr, Repr::PageRun { paused: true, .. });
    let Repr::PageRun {
        region,
        first,
        count,
        ..
    } = rec.repr
    else {
        return Err(DestinationErrorKind::Unexpected {
            channel: ChannelRole::Bulk(0),
            record: rec.repr,
        });
    };
    let n = u64::from(count);
    let len = (n * PAGE_SIZE) as usize;
    stats.pages += n;
    let bytes: &[u8] = match &partial {
        Some(_) => buf.get(..len).unwrap_or(&[]),
        None => {
            // SAFETY: the transport finished writing these pages, which this
            // receiver claimed; a concurrent write would carry the same bytes.
            let p = unsafe { inst.in_place_ptr(region, first, n) }?;
            // SAFETY: `n` pages inside the second mapping.
            unsafe { std::slice::from_raw_parts(p, len) }
        }
    };
    if neg.caps.payload_checksums && wire::payload_crc(bytes) != rec.payload_crc {
        let Some(ret) = ret.filter(|_| !strict && !inst.is_armed()) else {
            return Err(DestinationErrorKind::Checksum {
                region,
                first,
                count,
            });
        };
        stats.torn += n;
        inst.discard(region, first, n)?;
        torn.add(region, first, count);
        let _ = ret.send(&ReturnRepr::Resend {
            region,
            first,
            count,
        });
        return Ok(());
    }
    match partial {
        None => inst.install_in_place(region, first, n, via)?,
        Some(pages) => {
            for p in pages {
                let off = ((p - first) * PAGE_SIZE) as usize;
                let page = bytes.get(off..off + PAGE_SIZE as usize).unwrap_or(&[]);
                // SAFETY: this receiver claimed page `p`.
                let at = unsafe { inst.in_place_ptr(region, p, 1) }?;
                // SAFETY: one page inside the second mapping, from the buffer.
                unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), at, page.len()) };
                inst.install_in_place(region, p, 1, via)?;
            }
        }
    }
    torn.heal(region, first, count);
    Ok(())
}

/// What a bulk receiver tells the control thread.
enum BulkNote {
    /// Channel `i` reached its switchover marker.
    Marker,
    /// A receiver failed (its error comes with its join).
    Failed,
}

/// Checks a buffered page run and installs it (postcopy-capable receive).
#[allow(clippy::too_many_arguments)]
fn install_buffered(
    inst: &PageInstaller,
    neg: &Negotiated,
    rec: &wire::Record,
    bytes: &[u8],
    torn: &Torn,
    ret: &ReturnWriter,
    stats: &mut RecvStats,
    via: Via,
    strict: bool,
) -> Result<(), DestinationErrorKind> {
    // A page read from the paused source cannot be torn: a bad checksum is
    // corruption, and fails the migration.
    let strict = strict || matches!(rec.repr, Repr::PageRun { paused: true, .. });
    match rec.repr {
        Repr::PageRun {
            region,
            first,
            count,
            ..
        } => {
            stats.pages += u64::from(count);
            if neg.caps.payload_checksums && wire::payload_crc(bytes) != rec.payload_crc {
                if strict || inst.is_armed() {
                    return Err(DestinationErrorKind::Checksum {
                        region,
                        first,
                        count,
                    });
                }
                stats.torn += u64::from(count);
                // Not intact: the page counts as not received (it is zapped
                // at switchover if nothing better arrives).
                inst.discard(region, first, u64::from(count))?;
                torn.add(region, first, count);
                let _ = ret.send(&ReturnRepr::Resend {
                    region,
                    first,
                    count,
                });
                return Ok(());
            }
            inst.install(region, first, bytes, via)?;
            torn.heal(region, first, count);
            Ok(())
        }
        Repr::ZeroRun {
            region,
            first,
            count,
        } => {
            inst.install_zero(region, first, u64::from(count))?;
            stats.zero_pages += u64::from(count);
            torn.heal(region, first, count);
            Ok(())
        }
        Repr::Discard {
            region,
            first,
            count,
        } => {
            if inst.is_armed() {
                return Err(DestinationErrorKind::Unexpected {
                    channel: ChannelRole::Bulk(0),
                    record: rec.repr,
                });
            }
            inst.discard(region, first, u64::from(count))?;
            torn.heal(region, first, count);
            Ok(())
        }
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn bulk_thread(
    index: usize,
    mut chan: AnyChannel,
    ram: &Ram<'_>,
    neg: &Negotiated,
    torn: &Torn,
    ret: &ReturnWriter,
    inst: Option<&PageInstaller>,
    notes: &mpsc::Sender<BulkNote>,
    watch: &Watch,
) -> Result<RecvStats, DestinationErrorKind> {
    let name = ChannelRole::Bulk(index);
    let mut stats = RecvStats::default();
    let (mut dec, mut buf) = match inst {
        Some(i) if i.in_place() => (
            RecvDecoder::new(WireDecoder::new(*neg, MAX_RUN_BYTES), inst, MAX_RUN_BYTES),
            vec![0u8; MAX_RUN_BYTES],
        ),
        Some(_) => (
            RecvDecoder::new(WireDecoder::buffered(*neg, MAX_RUN_BYTES), None, 0),
            vec![0u8; MAX_RUN_BYTES],
        ),
        None => (
            RecvDecoder::new(WireDecoder::new(*neg, 0), None, 0),
            Vec::new(),
        ),
    };
    loop {
        let got =
            chan.recv(&mut dec, &mut buf)
                .map_err(|source| DestinationErrorKind::Transport {
                    channel: name,
                    source,
                })?;
        let Some(got) = got else {
            return Err(DestinationErrorKind::Truncated(name));
        };
        watch.touch(monotonic_ns());
        let len = got.placement.len();
        stats.bytes += len + wire::HEADER_LEN as u64;
        let Some(rec) = dec.last() else {
            return Err(DestinationErrorKind::DecoderLost);
        };
        match (rec.repr, inst) {
            (Repr::PageRun { .. }, Some(inst)) if inst.in_place() => {
                let partial = dec.partial.take();
                install_placed(
                    inst,
                    neg,
                    &rec,
                    partial,
                    &buf,
                    torn,
                    Some(ret),
                    &mut stats,
                    Via::Stream,
                    false,
                )?
            }
            (Repr::PageRun { .. } | Repr::ZeroRun { .. } | Repr::Discard { .. }, Some(inst)) => {
                let bytes = buf.get(..len as usize).unwrap_or(&[]);
                install_buffered(
                    inst,
                    neg,
                    &rec,
                    bytes,
                    torn,
                    ret,
                    &mut stats,
                    Via::Stream,
                    false,
                )?
            }
            (Repr::PageRun { .. } | Repr::ZeroRun { .. }, None) => {
                apply_page_record(ram, neg, &rec, torn, ret, &mut stats, false)?
            }
            (Repr::PostcopyListen, Some(inst)) if !inst.is_armed() => {
                let _ = notes.send(BulkNote::Marker);
                inst.wait_armed()?;
            }
            (Repr::End, _) => return Ok(stats),
            (other, _) => {
                return Err(DestinationErrorKind::Unexpected {
                    channel: name,
                    record: other,
                })
            }
        }
    }
}

/// Page requests go out on the urgent connection.
struct UrgentRequests(ReturnWriter);

impl RequestSink for UrgentRequests {
    fn request(&mut self, region: u16, first: u64, count: u32) -> std::io::Result<()> {
        self.0.send(&ReturnRepr::PageRequest {
            region,
            first,
            count,
        })
    }
}

/// How reading the next reply header on the urgent connection ended.
enum UrgentRead {
    /// A header.
    Header([u8; wire::HEADER_LEN]),
    /// A clean end with nothing missing.
    Done,
    /// The connection closed or failed.
    Lost(PostcopyLoss),
}

fn read_urgent_header(conn: &mut link::ReadHalf, inst: &PageInstaller) -> UrgentRead {
    use std::io::Read;
    let mut hdr = [0u8; wire::HEADER_LEN];
    let mut got = 0;
    while got < hdr.len() {
        match conn.read(&mut hdr[got..]) {
            Ok(0) if got == 0 && inst.missing() == 0 => return UrgentRead::Done,
            Ok(0) => return UrgentRead::Lost(PostcopyLoss::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return UrgentRead::Lost(PostcopyLoss::Urgent(e)),
        }
    }
    UrgentRead::Header(hdr)
}

/// Receives the urgent connection: replies to page requests, each read
/// straight into place (memfd) or into a buffer, checked, and installed.
fn urgent_thread(
    mut conn: link::ReadHalf,
    neg: &Negotiated,
    inst: &PageInstaller,
    finished: &AtomicBool,
) -> Result<RecvStats, DestinationErrorKind> {
    use std::io::Read;
    crate::postcopy::prioritise_urgent_thread();
    let mut dec = if inst.in_place() {
        let wire_dec = WireDecoder::new(*neg, MAX_RUN_BYTES);
        RecvDecoder::new(wire_dec, Some(inst), MAX_RUN_BYTES)
    } else {
        RecvDecoder::new(WireDecoder::buffered(*neg, MAX_RUN_BYTES), None, 0)
    };
    let mut buf = vec![0u8; MAX_RUN_BYTES];
    let mut stats = RecvStats::default();
    // A connection lost once the migration finished is no loss.
    let lost = |why: PostcopyLoss, stats: RecvStats| match finished.load(Ordering::Acquire) {
        true => Ok(stats),
        false => Err(DestinationErrorKind::PostcopyLost {
            why,
            missing: inst.missing(),
        }),
    };
    loop {
        let hdr = match read_urgent_header(&mut conn, inst) {
            UrgentRead::Header(h) => h,
            UrgentRead::Done => return Ok(stats),
            UrgentRead::Lost(why) => return lost(why, stats),
        };
        let placement = dec
            .place(&hdr)
            .map_err(|source| DestinationErrorKind::Decode {
                channel: ChannelRole::Urgent,
                source,
            })?;
        let rec = dec.last().ok_or(DestinationErrorKind::DecoderLost)?;
        let Repr::PageRun {
            region,
            first,
            count,
            ..
        } = rec.repr
        else {
            return Err(DestinationErrorKind::Unexpected {
                channel: ChannelRole::Urgent,
                record: rec.repr,
            });
        };
        let len = placement.len() as usize;
        let read = match placement {
            Placement::Guest { .. } => {
                // SAFETY: the decoder claimed these pages for this receiver.
                let p = unsafe { inst.in_place_ptr(region, first, u64::from(count)) }?;
                // SAFETY: `len` bytes of the claimed pages in the second mapping.
                conn.read_exact(unsafe { std::slice::from_raw_parts_mut(p, len) })
            }
            _ => match buf.get_mut(..len) {
                Some(b) => conn.read_exact(b),
                None => Err(std::io::Error::other(
                    "a reply larger than the receive buffer",
                )),
            },
        };
        if let Err(e) = read {
            return lost(PostcopyLoss::Urgent(e), stats);
        }
        stats.bytes += (len + wire::HEADER_LEN) as u64;
        install_reply(inst, neg, &rec, dec.partial.take(), &buf, len, &mut stats)?;
    }
}

/// Installs one reply to a page request; after the source stopped, a bad
/// checksum is an error, never a silently wrong page.
fn install_reply(
    inst: &PageInstaller,
    neg: &Negotiated,
    rec: &wire::Record,
    partial: Option<Vec<u64>>,
    buf: &[u8],
    len: usize,
    stats: &mut RecvStats,
) -> Result<(), DestinationErrorKind> {
    if inst.in_place() {
        let no_torn = Torn::default();
        return install_placed(
            inst,
            neg,
            rec,
            partial,
            buf,
            &no_torn,
            None,
            stats,
            Via::Request,
            true,
        );
    }
    let Repr::PageRun {
        region,
        first,
        count,
        ..
    } = rec.repr
    else {
        return Ok(());
    };
    let bytes = buf.get(..len).unwrap_or(&[]);
    if wire::payload_crc(bytes) != rec.payload_crc {
        return Err(DestinationErrorKind::Checksum {
            region,
            first,
            count,
        });
    }
    inst.install(region, first, bytes, Via::Request)?;
    stats.pages += u64::from(count);
    Ok(())
}

/// Receives a migration over the connections `listener` accepts into `ram`,
/// and starts the guest through `starter` on *go*. Precopy only; see
/// [`receive_with`].
///
/// `listener` is any [`Acceptor`]: a `&Listener` accepts the source's
/// connections, a [`link::Connected`] hands out streams the caller connected.
pub fn receive<S: GuestStarter, A: Acceptor>(
    listener: A,
    ram: &Ram<'_>,
    starter: &mut S,
    transport: Transport,
) -> Result<DestinationReport, DestinationError> {
    receive_with(listener, ram, starter, &DestinationConfig::new(transport))
}

/// Receives a migration on `listener` into `ram` as `config` says, starts the
/// guest through `starter` on *go*, and serves postcopy until every page and
/// section arrived.
pub fn receive_with<S: GuestStarter, A: Acceptor>(
    mut listener: A,
    ram: &Ram<'_>,
    starter: &mut S,
    config: &DestinationConfig,
) -> Result<DestinationReport, DestinationError> {
    receive_any(&mut listener, ram, None, starter, config, None)
}

/// As [`receive_with`], for memfd-backed guest RAM: `second` is a second
/// mapping of the same memfds (same regions and sizes, e.g. from
/// [`crate::memory::MappedRegion::map_second`]). With postcopy-ram, the
/// transport receives pages straight into `second` (no copy in user space,
/// and registering it with io_uring is safe: the memfd's pages stay put),
/// and after switchover `UFFDIO_CONTINUE` maps them into the guest.
pub fn receive_in_place<S: GuestStarter, A: Acceptor>(
    mut listener: A,
    ram: &Ram<'_>,
    second: &Ram<'_>,
    starter: &mut S,
    config: &DestinationConfig,
) -> Result<DestinationReport, DestinationError> {
    receive_any(&mut listener, ram, Some(second), starter, config, None)
}

/// Takes up the postcopy that `hold` describes (from a failed
/// [`receive_with`], [`receive_in_place`] or an earlier resume): waits, at
/// most the handshake bound, for the source to come back on `listener` with
/// a hello naming `hold.session`, then receives the rest and completes as
/// postcopy does. `second` is the second mapping for memfd-backed RAM, as
/// given to [`receive_in_place`]. The guest keeps running meanwhile; its
/// vCPUs that touch missing pages wait on their faults. On failure the
/// error carries a new hold: a resume can be tried again, by the operator
/// or a retry policy.
pub fn resume_postcopy<S: GuestStarter, A: Acceptor>(
    mut listener: A,
    ram: &Ram<'_>,
    second: Option<&Ram<'_>>,
    hold: &PostcopyHold,
    starter: &mut S,
    config: &DestinationConfig,
) -> Result<DestinationReport, DestinationError> {
    receive_any(&mut listener, ram, second, starter, config, Some(hold))
}

/// What the receive left behind, for the error path: who to tell, and what
/// a postcopy hold needs.
struct Trail {
    go_received: bool,
    ret: Option<ReturnWriter>,
    inst: Option<Arc<PageInstaller>>,
    error_sent: bool,
    session: u32,
    neg: Option<Negotiated>,
    mode: SessionMode,
}

fn receive_any<S: GuestStarter>(
    listener: &mut dyn Acceptor,
    ram: &Ram<'_>,
    second: Option<&Ram<'_>>,
    starter: &mut S,
    config: &DestinationConfig,
    resume: Option<&PostcopyHold>,
) -> Result<DestinationReport, DestinationError> {
    let mut trail = Trail {
        go_received: resume.is_some(),
        ret: None,
        inst: resume.map(|h| h.installer.clone()),
        error_sent: false,
        session: resume.map_or(0, |h| h.session),
        neg: resume.map(|h| h.negotiated),
        mode: resume.map_or(SessionMode::Precopy, |h| h.mode),
    };
    let r = receive_inner(listener, ram, second, starter, config, resume, &mut trail);
    r.map_err(|mut kind| {
        if let Some(ret) = trail.ret.filter(|_| !trail.error_sent) {
            let _ = ret.send(&ReturnRepr::Error {
                code: kind.code(),
                detail: 0,
            });
        }
        let mut postcopy_hold = None;
        if let (Some(inst), Some(neg), true) = (trail.inst, trail.neg, trail.go_received) {
            if let Some(hold) = PostcopyHold::of(inst, trail.session, neg, trail.mode) {
                // A resume that failed says why as it is (its caller knows
                // the guest is held: a source that has not come back yet
                // is a wait that ran out, not a loss).
                if resume.is_none() && !matches!(kind, DestinationErrorKind::PostcopyLost { .. }) {
                    kind = DestinationErrorKind::PostcopyLost {
                        why: PostcopyLoss::Failed(Box::new(kind)),
                        missing: hold.missing_pages,
                    };
                }
                postcopy_hold = Some(Box::new(hold));
            }
        }
        DestinationError {
            kind,
            go_received: trail.go_received,
            postcopy_hold,
        }
    })
}

/// Wakes the control thread when the session's deadline passes: the
/// control channel blocks in a receive, so the watchdog shuts the sockets
/// down and the control thread then asks the session which wait ran out.
/// The decision stays with the session; the watchdog only does the I/O.
#[derive(Debug)]
struct Watch {
    /// The session's deadline (monotonic ns), `u64::MAX` for none.
    deadline: AtomicU64,
    /// Whether the deadline moves with activity (the idle bound).
    idle_ns: AtomicU64,
    /// The last time bytes arrived on any channel.
    activity: AtomicU64,
    fired: AtomicBool,
    /// When it fired, and the activity it had seen then: what the session
    /// judges the wait by (a receiver may still note activity afterwards,
    /// draining what it had buffered).
    fired_at: AtomicU64,
    activity_at_fire: AtomicU64,
    done: AtomicBool,
    /// A bulk receiver failed: the control thread must stop and say why.
    bulk_failed: AtomicBool,
    /// The source was sent the error record already.
    told: AtomicBool,
}

impl Watch {
    fn new(now: u64) -> Watch {
        Watch {
            deadline: AtomicU64::new(u64::MAX),
            idle_ns: AtomicU64::new(0),
            activity: AtomicU64::new(now),
            fired: AtomicBool::new(false),
            fired_at: AtomicU64::new(0),
            activity_at_fire: AtomicU64::new(now),
            done: AtomicBool::new(false),
            bulk_failed: AtomicBool::new(false),
            told: AtomicBool::new(false),
        }
    }

    /// When the watchdog fired and the activity it had seen then.
    fn fire_point(&self) -> (u64, u64) {
        (
            self.fired_at.load(Ordering::Acquire),
            self.activity_at_fire.load(Ordering::Acquire),
        )
    }

    fn touch(&self, now: u64) {
        self.activity.fetch_max(now, Ordering::Relaxed);
    }

    fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    fn bulk_failed(&self) -> bool {
        self.bulk_failed.load(Ordering::Acquire)
    }

    fn publish(&self, session: &DestinationSession) {
        let idle = if session.waits_on_activity() {
            session.timeouts().idle
        } else {
            0
        };
        self.idle_ns.store(idle, Ordering::Relaxed);
        self.deadline.store(
            session.poll_timeout().unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }

    /// Runs until `done`: wakes everything once the deadline passed.
    fn run(&self, wakers: &Wakers) {
        while !self.done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            let mut deadline = self.deadline.load(Ordering::Acquire);
            let idle = self.idle_ns.load(Ordering::Relaxed);
            let seen = self.activity();
            if idle > 0 {
                deadline = deadline.max(seen.saturating_add(idle));
            }
            let now = monotonic_ns();
            if now >= deadline {
                self.fired_at.store(now, Ordering::Release);
                self.activity_at_fire.store(seen, Ordering::Release);
                self.fired.store(true, Ordering::Release);
                wakers.all();
                return;
            }
        }
    }
}

/// The error for a session that failed (or refused an input).
fn session_failed(session: &DestinationSession) -> DestinationErrorKind {
    match session.failure() {
        Some(e) => DestinationErrorKind::Session(e),
        None => DestinationErrorKind::Refused {
            state: session.phase_name(),
        },
    }
}

/// Sends every return-path record the session queued.
fn flush_session(session: &mut DestinationSession, ret: &ReturnWriter) -> Result<(), LinkError> {
    while let Some(c) = session.poll_transmit() {
        ret.send(&c.repr()).map_err(|source| LinkError::Io {
            what: "answering on the return path",
            source,
        })?;
    }
    Ok(())
}

/// A page run or zero run sent again on the control channel (the source is
/// paused, so it must be intact).
#[allow(clippy::too_many_arguments)]
fn receive_resent(
    ram: &Ram<'_>,
    inst: Option<&PageInstaller>,
    neg: &Negotiated,
    rec: &wire::Record,
    payload: &[u8],
    torn: &Torn,
    ret: &ReturnWriter,
    stats: &mut RecvStats,
) -> Result<(), DestinationErrorKind> {
    if let Some(inst) = inst {
        return install_buffered(inst, neg, rec, payload, torn, ret, stats, Via::Stream, true);
    }
    if let Repr::PageRun {
        region,
        first,
        count,
        ..
    } = rec.repr
    {
        // The decoder checked the run against the layout; the copy checks it
        // once more.
        // SAFETY: before *go* the guest here is not running, and the source
        // resends pages on the control channel only once every bulk channel
        // has ended its stream; `payload` is the control channel's own buffer.
        let placed = ram
            .region(region)
            .is_some_and(|r| unsafe { r.write_pages(first, u64::from(count), payload) });
        if !placed {
            return Err(DestinationErrorKind::OutOfRange {
                channel: ChannelRole::Control,
                region,
                first,
                count,
            });
        }
    }
    apply_page_record(ram, neg, rec, torn, ret, stats, true)
}

/// The control connection after the handshake.
struct Handshaken {
    ctl_conn: link::Conn,
    ret: ReturnWriter,
    neg: Negotiated,
    session: DestinationSession,
}

/// Accepts the control connection and runs the handshake under the session:
/// a new migration's, or (with `resume`) the one that takes up an
/// interrupted postcopy, which waits for the source at most the handshake
/// bound.
fn handshake(
    listener: &mut dyn Acceptor,
    ram: &Ram<'_>,
    config: &DestinationConfig,
    resume: Option<&PostcopyHold>,
) -> Result<Handshaken, DestinationErrorKind> {
    let mut ctl_conn = match resume {
        None => listener.accept(ChannelRole::Control)?,
        Some(_) => listener.accept_within(
            ChannelRole::Control,
            Duration::from_nanos(config.timeouts.handshake),
        )?,
    };
    let ret = ReturnWriter::new(ctl_conn.try_clone().map_err(|source| LinkError::Io {
        what: "duplicating the control socket",
        source,
    })?);
    let layout = ram.layout().map_err(DestinationErrorKind::Layout)?;
    // A resume offers what the interrupted session had agreed.
    let caps = match resume {
        Some(h) => Capabilities {
            channels: 0,
            ..h.negotiated.caps
        },
        None => Capabilities {
            postcopy_ram: config.postcopy_ram,
            postcopy_only_sections: config.postcopy_only_sections,
            payload_checksums: true,
            channels: 0,
        },
    };
    let ours = Hello::new(caps, layout);
    let now = monotonic_ns();
    let mut session = match resume {
        Some(h) => {
            DestinationSession::resume(now, config.timeouts, config.limits, h.session, h.mode)
        }
        None => DestinationSession::new(now, config.timeouts, config.limits)
            .with_session_id(fresh_session_id()),
    };
    let neg = link::destination_handshake(&mut ctl_conn, &ours, &ret, &mut session)?;
    if let Some(h) = resume {
        // The channels of a resume may differ; nothing else may.
        if neg.caps.postcopy_ram != h.negotiated.caps.postcopy_ram {
            return Err(DestinationErrorKind::PostcopyNotNegotiated);
        }
    }
    Ok(Handshaken {
        ctl_conn,
        ret,
        neg,
        session,
    })
}

/// The data connections of a migration, accepted in the source's order.
struct Channels {
    ctl: AnyChannel,
    bulk: Vec<AnyChannel>,
    urgent: Option<link::DataConn>,
}

/// Builds the control channel and accepts the bulk (and urgent) ones.
fn open_channels(
    listener: &mut dyn Acceptor,
    ram: &Ram<'_>,
    second: Option<&Ram<'_>>,
    config: &DestinationConfig,
    neg: &Negotiated,
    ctl_conn: &link::Conn,
) -> Result<Channels, DestinationErrorKind> {
    let probe = ferry_uring::probe();
    let postcopy_ram = neg.caps.postcopy_ram;
    // A source that went away after the hello must not leave this side
    // waiting for its data channels for good.
    let bound = Duration::from_nanos(config.timeouts.handshake);
    // With postcopy into anonymous memory, nothing is received into
    // registered guest memory (a pinned page would not be the one mapped
    // after a zap); into memfd memory, pages land in the second mapping.
    let regions = match (postcopy_ram, second) {
        (false, _) => ram.mem_regions(),
        (true, Some(second)) => second.mem_regions(),
        (true, None) => Vec::new(),
    };
    let transport_err =
        |channel: ChannelRole| move |source| DestinationErrorKind::Transport { channel, source };
    // The control channel carries headers, device state and (rare) resent
    // pages, all received into a buffer: it registers no guest RAM, which
    // saves pinning it once more before the first page can arrive.
    let dup = ctl_conn.try_clone().map_err(|source| LinkError::Io {
        what: "duplicating the control socket",
        source,
    })?;
    let ctl = AnyChannel::new(dup, &[], config.transport, &probe)
        .map_err(transport_err(ChannelRole::Control))?;
    let extra = if postcopy_ram { 2 } else { 1 };
    let n_bulk = usize::from(neg.caps.channels.saturating_sub(extra)).max(1);
    let mut bulk = Vec::with_capacity(n_bulk);
    for i in 0..n_bulk {
        let c = listener.accept_data_within(ChannelRole::Bulk(i), bound)?;
        // Bulk channels after the first share its registration of guest RAM.
        let chan = c
            .into_channel(&regions, config.transport, &probe, bulk.first())
            .map_err(transport_err(ChannelRole::Bulk(i)))?;
        bulk.push(chan);
    }
    let urgent = if postcopy_ram {
        Some(listener.accept_data_within(ChannelRole::Urgent, bound)?)
    } else {
        None
    };
    Ok(Channels { ctl, bulk, urgent })
}

/// Second handles on every socket of a migration, held until every thread
/// that uses them has ended: shutting one down wakes whoever blocks on the
/// socket, and, unlike a raw descriptor number, a handle can never name a
/// socket that was closed and reused meanwhile.
struct Wakers {
    bulk: Vec<link::Conn>,
    control: link::Conn,
    urgent: Option<link::Conn>,
}

impl Wakers {
    fn new(chans: &Channels) -> Result<Wakers, DestinationErrorKind> {
        let dup = |c: &link::Conn| {
            c.try_clone().map_err(|source| LinkError::Io {
                what: "duplicating a socket",
                source,
            })
        };
        Ok(Wakers {
            bulk: chans
                .bulk
                .iter()
                .map(|c| dup(c.stream()))
                .collect::<Result<_, _>>()?,
            control: dup(chans.ctl.stream())?,
            urgent: chans.urgent.as_ref().map(|u| dup(u.conn())).transpose()?,
        })
    }

    /// Wakes the bulk receivers.
    fn bulk(&self) {
        for c in &self.bulk {
            let _ = c.shutdown();
        }
    }

    /// Wakes the urgent receiver.
    fn urgent(&self) {
        if let Some(c) = &self.urgent {
            let _ = c.shutdown();
        }
    }

    /// Wakes every thread of the migration.
    fn all(&self) {
        self.bulk();
        self.urgent();
        let _ = self.control.shutdown();
    }
}

fn receive_inner<S: GuestStarter>(
    listener: &mut dyn Acceptor,
    ram: &Ram<'_>,
    second: Option<&Ram<'_>>,
    starter: &mut S,
    config: &DestinationConfig,
    resume: Option<&PostcopyHold>,
    trail: &mut Trail,
) -> Result<DestinationReport, DestinationErrorKind> {
    let Handshaken {
        ctl_conn,
        ret,
        neg,
        session,
    } = handshake(listener, ram, config, resume)?;
    trail.ret = Some(ret.clone());
    trail.session = session.session_id();
    trail.neg = Some(neg);
    let second = second.filter(|_| neg.caps.postcopy_ram);
    let chans = open_channels(listener, ram, second, config, &neg, &ctl_conn)?;
    let inst = match resume {
        Some(h) => {
            // The receivers of the broken connection are gone; a page one
            // of them claimed and never completed is anyone's again.
            h.installer.reset_claims();
            Some(h.installer.clone())
        }
        None => neg.caps.postcopy_ram.then(|| {
            Arc::new(match second {
                Some(second) => PageInstaller::new_in_place(ram, second),
                None => PageInstaller::new(ram),
            })
        }),
    };
    trail.inst = inst.clone();
    let go_received = &mut trail.go_received;
    let torn = Torn::new(ram);
    let finished = AtomicBool::new(false);
    let (notes_tx, notes_rx) = mpsc::channel::<BulkNote>();
    let watch = Watch::new(monotonic_ns());
    let n_bulk = chans.bulk.len();
    let wakers = Wakers::new(&chans)?;
    // The urgent connection's halves: replies read by the urgent receiver,
    // requests written by the fault service.
    let (urgent_reader, urgent_writer) = match chans.urgent.map(link::DataConn::into_halves) {
        Some(Ok((r, w))) => (Some(r), Some(ReturnWriter::new(w))),
        Some(Err(source)) => {
            return Err(DestinationErrorKind::Link(LinkError::Io {
                what: "splitting the urgent connection",
                source,
            }))
        }
        None => (None, None),
    };
    // A resume serves faults again from the start, on the new urgent
    // connection.
    let faults = match (resume, inst.clone(), urgent_writer.clone()) {
        (Some(_), Some(inst), Some(w)) => Some(FaultService::start(inst, UrgentRequests(w))?),
        _ => None,
    };
    let (result, error_sent, mode) = std::thread::scope(|scope| {
        let watchdog = scope.spawn(|| watch.run(&wakers));
        let mut handles = Vec::with_capacity(n_bulk);
        for (i, chan) in chans.bulk.into_iter().enumerate() {
            let (neg, torn, ret, inst, watch) = (&neg, &torn, &ret, inst.as_deref(), &watch);
            let (notes, wakers) = (notes_tx.clone(), &wakers);
            handles.push(scope.spawn(move || {
                let r = bulk_thread(i, chan, ram, neg, torn, ret, inst, &notes, watch);
                if let Err(e) = &r {
                    // The source learns why before the sockets close (the
                    // first failure only; the others saw their sockets shut).
                    if !watch.fired() && !watch.told.swap(true, Ordering::AcqRel) {
                        let _ = ret.send(&ReturnRepr::Error {
                            code: e.code(),
                            detail: 0,
                        });
                    }
                    // The control thread learns at once, not at the end
                    // of the stream, and every other receiver stops.
                    let _ = notes.send(BulkNote::Failed);
                    watch.bulk_failed.store(true, Ordering::Release);
                    wakers.all();
                }
                r
            }));
        }
        drop(notes_tx);
        let urgent_handle = match (urgent_reader, inst.as_deref()) {
            (Some(conn), Some(inst)) => {
                let (neg, finished) = (&neg, &finished);
                Some(scope.spawn(move || urgent_thread(conn, neg, inst, finished)))
            }
            _ => None,
        };
        let buf_len = (MAX_SECTION_CHUNK as usize).max(MAX_RUN_BYTES);
        let mut control = control::Control {
            session,
            ctl: chans.ctl,
            dec: WireDecoder::buffered(neg, buf_len),
            buf: vec![0u8; buf_len],
            sections: control::Sections::default(),
            pc_sections: control::Sections::default(),
            stats: RecvStats::default(),
            go_at: resume.map(|_| Instant::now()),
            report: DestinationReport::default(),
            faults,
            bulk: Some(handles),
            n_bulk,
            notes: notes_rx,
            ram,
            neg,
            inst: inst.clone(),
            torn: &torn,
            ret: &ret,
            urgent_writer,
            watch: &watch,
            finished: &finished,
            config,
            starter,
            go_received,
            markers_wait_ns: 0,
        };
        let result = control.run();
        control.stop_postcopy();
        let mode = control.session.mode();
        let ends = Ends {
            ret: &ret,
            ctl_conn: &ctl_conn,
            wakers: &wakers,
            watch: &watch,
        };
        let mut error_sent = false;
        let r = ends.wind_down(result, &mut error_sent, watchdog, urgent_handle);
        (r, error_sent, mode)
    });
    trail.error_sent = error_sent;
    trail.mode = mode;
    result
}

/// What must be closed and joined when the migration ends here.
struct Ends<'a> {
    ret: &'a ReturnWriter,
    ctl_conn: &'a link::Conn,
    wakers: &'a Wakers,
    watch: &'a Watch,
}

impl Ends<'_> {
    /// The source learns why before the sockets close; every thread is
    /// woken and joined; the urgent channel's figures join the report.
    fn wind_down(
        &self,
        result: Result<DestinationReport, DestinationErrorKind>,
        error_sent: &mut bool,
        watchdog: std::thread::ScopedJoinHandle<'_, ()>,
        urgent: Option<std::thread::ScopedJoinHandle<'_, Result<RecvStats, DestinationErrorKind>>>,
    ) -> Result<DestinationReport, DestinationErrorKind> {
        if let Err(kind) = &result {
            if !self.watch.told.swap(true, Ordering::AcqRel) {
                let _ = self.ret.send(&ReturnRepr::Error {
                    code: kind.code(),
                    detail: 0,
                });
            }
            *error_sent = true;
        }
        self.watch.done.store(true, Ordering::Release);
        let _ = watchdog.join();
        if result.is_err() {
            // Wake the receiver threads so the scope can end.
            let _ = self.ctl_conn.shutdown();
            self.wakers.bulk();
        }
        // The urgent thread owns its socket and ends on the end of the
        // connection this causes.
        self.wakers.urgent();
        match (result, urgent.map(|h| h.join())) {
            (
                Err(DestinationErrorKind::Transport { .. } | DestinationErrorKind::Truncated(_)),
                Some(Ok(Err(e))),
            ) => Err(e),
            (Ok(mut r), Some(Ok(Ok(s)))) => {
                r.bytes_received += s.bytes;
                r.pages_received += s.pages;
                Ok(r)
            }
            (r, _) => r,
        }
    }
}
