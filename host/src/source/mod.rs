//! The source side of a migration: precopy rounds, the switchover decision,
//! the stop-and-copy, the *ready* / *go* handshake, and postcopy.
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
//! On `Switchover { ram_postcopy: true }` (the operator threw the switch,
//! [`crate::postcopy::PostcopyHandle`], and postcopy-ram was negotiated): pause,
//! final sync; every page dirty now changed after it was sent, so it is
//! discarded on the destination: a discard map (the dirty bitmap) on the
//! control channel, whatever the number of pages, then a `PostcopyListen`
//! marker on every bulk channel; device state, *ready*, *go*; then a request server answers page requests from the paused guest's
//! memory on the urgent connection while the bulk channels stream the
//! discarded pages in the background. On `Switchover { ram_postcopy: false }`
//! (rule 4) RAM completes in the downtime and only the postcopy-only
//! sections (the snapshot dirty bitmap) follow *go*. Either way the source
//! keeps its whole state until the destination's final *ready*; a connection
//! lost in postcopy leaves its guest paused, never resumed.
//!
//! Bulk channels are driven by one sender thread each, which computes payload
//! checksums and hands records to the transport; the control channel is
//! driven from the calling thread; a third kind of thread reads the return
//! path, and in postcopy a fourth serves page requests.

// `Negotiated` and `Hello` are `Copy` in current ferry-core; the clones
// below stay correct whether or not they are.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use ferry_core::bitmap::DirtyBitmap;
use ferry_core::pending::{Pending, Section};
use ferry_core::policy::{self};
use ferry_core::session::{
    Custody, SessionError, SourceAction, SourceEvent, SourceSession, Switchover,
};
use ferry_core::wire::{
    self, Capabilities, Hello, Negotiated, Repr, ReturnRepr, StreamEncoder, HEADER_LEN,
    MAX_SECTION_CHUNK,
};
use ferry_uring::{share_out, AnyChannel, Channel, OutRecord, Payload, ProbeReport, Transport};

use crate::dirty::{DirtyError, DirtyTracker};
use crate::link::{self, ChannelRole, Connector, Endpoint, LinkError, ReturnMsg, ReturnPathEnd};
use crate::migration::{CallbackError, Event, GuestControl, SourceConfig, SourceReport};
use crate::ram::{Ram, RamRegion, PAGE_SIZE};

mod postcopy;
mod run;
mod sender;
mod stall;

use sender::sender_thread;
pub use sender::SenderError;

/// Records per batch handed to a sender thread.
const BATCH: usize = 256;
/// Payload bytes per batch: the sender checksums a batch just before handing
/// it to the transport, so a small batch keeps the window in which a guest
/// write tears a page (checksum taken, bytes not yet sent) short, and the
/// kernel's copy into the socket finds the bytes the checksum just read still
/// in the core's cache. Measured on one channel, 1 GiB idle, five alternating
/// runs each: 512 KiB moved a median 3.21 GB/s, 2 MiB 2.36, 256 KiB 2.27.
const BATCH_BYTES: u64 = 512 << 10;
/// Payload bytes per batch of the postcopy background stream, after *go*:
/// the source is paused (no page can tear), and while the destination's guest
/// faults, larger batches hand the sender fewer jobs. With 512 KiB there, two
/// 1 GiB memfd runs gave fault p99 of 3033 and 3250 µs, against 224-629 µs
/// with 2 MiB earlier the same day.
const BACKGROUND_BATCH_BYTES: u64 = 2 << 20;
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
        channel: ChannelRole,
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
    /// The destination went away: its return path closed, broke or carried
    /// bytes that did not decode.
    #[error("the destination went away: {0}")]
    ReturnPath(crate::link::ReturnPathEnd),
    /// The guest RAM does not make a valid wire layout.
    #[error("the guest RAM layout is invalid: {0}")]
    Layout(ferry_core::wire::LayoutError),
    /// The destination asked for pages outside the guest RAM.
    #[error("the destination asked for pages {first}..{} of region {region}, outside the guest RAM", first.saturating_add(u64::from(*count)))]
    ResendOutOfRange {
        /// Region id.
        region: u16,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// A sender thread stopped taking work (its own error says why).
    #[error("a sender thread stopped early")]
    SenderStopped,
    /// The destination stopped taking data: no send made progress for this
    /// long while data was due.
    #[error("the destination took no data for {after_ms} ms while data was due (a stalled peer)")]
    Stalled {
        /// The bound, in milliseconds.
        after_ms: u64,
    },
    /// Duplicating the urgent socket failed.
    #[error("could not duplicate the urgent socket: {0}")]
    UrgentSocket(std::io::Error),
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
    /// The protocol ended the migration: a bound on a wait ran out, the
    /// destination reported an error or broke the protocol, or a limit it
    /// stated was exceeded. Before *go* the guest was resumed here; after
    /// *go*, see [`SourceError::GoUnconfirmed`].
    #[error("the migration failed: {0}; the guest keeps running on the source")]
    Session(SessionError),
    /// *go* was sent but the destination never confirmed that the guest
    /// runs there. The guest stays paused here with all its state; only the
    /// operator, who can look at the destination, may resume it here or
    /// discard it.
    #[error("go was sent but the destination did not confirm that the guest started ({why}); the guest stays paused here with all its state: resume it here only if the destination did not start it, otherwise discard it")]
    GoUnconfirmed {
        /// What happened instead of *started*.
        why: Unconfirmed,
    },
    /// A dirty bitmap did not fit its region (a bug).
    #[error("a dirty bitmap does not fit its region: {0}")]
    Bitmap(ferry_core::bitmap::BitmapError),
    /// The pending accounting refused a section (a bug).
    #[error("the pending accounting failed: {0}")]
    Pending(ferry_core::pending::PendingError),
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
    AfterGo(Box<SourceError>),
    /// A bulk sender thread stopped with an error.
    #[error("a bulk sender stopped: {0}")]
    Sender(#[source] SenderError),
    /// The urgent request server stopped with an error.
    #[error("the urgent request server stopped: {0}")]
    UrgentServer(#[source] UrgentServerError),
    /// The connection failed during postcopy: the guest runs on the
    /// destination with pages missing; the source keeps every page and its
    /// guest stays paused (never resumed here).
    #[error("the connection was lost during postcopy ({why}); {pages_left} pages were left to stream when postcopy started: the guest runs on the destination and waits there for its missing pages, this side keeps every page and its guest stays paused — do not resume it here")]
    PostcopyInterrupted {
        /// What failed.
        why: Box<SourceError>,
        /// Pages left to stream when postcopy started (0 after a resume: the
        /// destination asks for what it misses).
        pages_left: u64,
        /// What [`resume_postcopy`] needs to take postcopy up again.
        hold: Box<SourceHold>,
    },
    /// Encoding a record failed (a bug).
    #[error("could not encode a record: {0}")]
    Emit(wire::EmitError),
}

/// Why the source's urgent request server stopped before its connection
/// ended.
#[derive(Debug, thiserror::Error)]
pub enum UrgentServerError {
    /// A page request did not decode.
    #[error("a page request did not decode: {0}")]
    Decode(#[source] wire::DecodeError),
    /// The destination sent a record other than a page request on the
    /// urgent channel.
    #[error("the destination sent {0:?} on the urgent channel, where only page requests belong")]
    Unexpected(ReturnRepr),
    /// The destination asked for pages of a region the guest RAM does not
    /// have.
    #[error(
        "the destination asked for pages of region {region}, which the guest RAM does not have"
    )]
    UnknownRegion {
        /// The region id.
        region: u16,
    },
    /// The destination asked for pages outside their region.
    #[error("the destination asked for pages {first}..{} of region {region}, outside the region", first.saturating_add(u64::from(*count)))]
    OutsideRegion {
        /// The region id.
        region: u16,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// A reply did not encode (a bug).
    #[error("a reply did not encode: {0}")]
    Encode(#[source] wire::EmitError),
    /// A reply could not be sent.
    #[error("a reply could not be sent: {0}")]
    Send(#[source] std::io::Error),
    /// The server thread panicked.
    #[error("the urgent request server panicked")]
    Panicked,
}

/// What happened instead of *started*, after *go* was sent.
#[derive(Debug, thiserror::Error)]
pub enum Unconfirmed {
    /// The session failed: a bound ran out, or the destination reported an
    /// error or broke the protocol.
    #[error("{0}")]
    Session(SessionError),
    /// The destination went away.
    #[error("{0}")]
    ReturnPath(crate::link::ReturnPathEnd),
    /// The protocol did not reach completion.
    #[error("the protocol stands at {phase}, not completed")]
    NotCompleted {
        /// Where it stands.
        phase: &'static str,
    },
}

/// What the source keeps when postcopy's connection breaks: the guest stays
/// paused here with every page, and [`resume_postcopy`] takes the migration
/// up again from this.
#[derive(Clone, Debug)]
pub struct SourceHold {
    /// The session the destination named in its *accept*; a resume names
    /// it again, and a destination that holds another refuses it.
    pub session: u32,
    /// How the switchover went.
    pub switchover: Switchover,
    /// The postcopy-only snapshot bitmap, if any: sent again in full.
    snapshot: Option<Vec<Vec<u64>>>,
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
    /// Read from the paused guest: the destination treats a bad checksum
    /// as corruption, not as a torn page.
    paused: bool,
}

enum Job {
    Pages(Vec<PageWork>),
    /// The switchover marker (`PostcopyListen`) on this bulk channel.
    Marker,
    /// A reply to a page request, behind whatever is queued (benchmark
    /// baseline: requests sharing the bulk channel).
    Requested(PageWork),
    /// Flushes the channel; the ack says whether that worked (the cause is
    /// the sender thread's result).
    Flush(SyncSender<Result<(), FlushFailed>>),
    End,
}

/// A flush that failed: the sender thread stops, and its result says why.
#[derive(Clone, Copy, Debug)]
struct FlushFailed;

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
    dirty_rate: u64,
    since_sync_ns: u64,
    newly: &'t mut u64,
    /// RAM may move after switchover (postcopy-ram negotiated).
    compatible: bool,
}

impl<T: DirtyTracker> RamPending<'_, T> {
    fn classed(&self, bytes: u64) -> Pending {
        if self.compatible {
            Pending::new(0, bytes, 0)
        } else {
            Pending::new(bytes, 0, 0)
        }
    }
}

/// The snapshot dirty bitmap: postcopy-only, its whole size pending until
/// the source stops (it keeps changing until then).
struct SnapshotPending(u64);

impl Section for SnapshotPending {
    type Error = DirtyError;
    fn name(&self) -> &str {
        "snapshot-bitmap"
    }
    fn estimate(&self) -> Pending {
        Pending::new(0, 0, self.0)
    }
    fn exact(&mut self) -> Result<Pending, DirtyError> {
        Ok(self.estimate())
    }
}

/// ORs `from` into `into`, word by word.
fn or_into(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
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
        self.classed(known.saturating_mul(PAGE_SIZE).saturating_add(guess))
    }

    fn exact(&mut self) -> Result<Pending, DirtyError> {
        let mut dirty = 0u64;
        for (r, words) in self.bitmaps.iter_mut().enumerate() {
            *self.newly += self.tracker.sync(r, words)?;
            dirty += count_bits(words);
        }
        self.since_sync_ns = 0;
        Ok(self.classed(dirty.saturating_mul(PAGE_SIZE)))
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

/// Migrates `ram` to the destination at `link.endpoint`, dialling every
/// connection itself.
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
    let mut dial = &link.endpoint;
    run_migration(
        ram,
        tracker,
        guest,
        config,
        &mut dial,
        link.transport,
        link.bulk_channels,
        events,
    )
}

/// As [`migrate`], over connections the caller supplies: `connections`
/// gives the control stream, the bulk streams (as many as it has, or
/// `bulk_channels` when it can make any number, as an [`Endpoint`] can) and,
/// with postcopy-ram, the urgent stream. Management software that owns the
/// sockets passes them in through [`link::Connected`].
#[allow(clippy::too_many_arguments)]
pub fn migrate_over<T: DirtyTracker, G: GuestControl, C: Connector>(
    ram: &Ram<'_>,
    tracker: &mut T,
    guest: &mut G,
    config: &SourceConfig,
    connections: &mut C,
    transport: Transport,
    bulk_channels: usize,
    events: &mut dyn FnMut(&Event),
) -> Result<SourceReport, SourceError> {
    let n = connections.bulk_channels().unwrap_or(bulk_channels);
    run_migration(
        ram,
        tracker,
        guest,
        config,
        connections,
        transport,
        n,
        events,
    )
}

/// Takes up a postcopy whose connection broke ([`SourceError::PostcopyInterrupted`]
/// gave `hold`): connects to the destination at `link.endpoint` again with a
/// hello naming the session, serves the destination's page requests (it asks
/// for every page it still misses, which covers the faults that were in
/// flight), sends the postcopy-only sections again, and completes on the
/// destination's final *ready*. The guest stays paused here throughout, as
/// after *go*; on failure the error is `PostcopyInterrupted` again, with a
/// hold to try once more.
pub fn resume_postcopy(
    ram: &Ram<'_>,
    config: &SourceConfig,
    link: &SourceLink,
    hold: &SourceHold,
    events: &mut dyn FnMut(&Event),
) -> Result<SourceReport, SourceError> {
    let mut dial = &link.endpoint;
    resume_postcopy_over(
        ram,
        config,
        &mut dial,
        link.transport,
        link.bulk_channels,
        hold,
        events,
    )
}

/// As [`resume_postcopy`], over connections `connections` gives (a TLS
/// connector, streams the caller opened).
pub fn resume_postcopy_over<C: Connector>(
    ram: &Ram<'_>,
    config: &SourceConfig,
    connections: &mut C,
    transport: Transport,
    bulk_channels: usize,
    hold: &SourceHold,
    events: &mut dyn FnMut(&Event),
) -> Result<SourceReport, SourceError> {
    let interrupted = |why: SourceError| match why {
        e @ SourceError::PostcopyInterrupted { .. } => e,
        why => SourceError::PostcopyInterrupted {
            why: Box::new(why),
            pages_left: 0,
            hold: Box::new(hold.clone()),
        },
    };
    let probe = ferry_uring::probe();
    let n = connections.bulk_channels().unwrap_or(bulk_channels);
    let mut src = Source::connect(ram, config, connections, transport, n, &probe, Some(hold))
        .map_err(interrupted)?;
    events(&Event::Connected {
        transport: src.transport_name.clone(),
    });
    let result = src.resume(hold, events);
    src.shutdown();
    result.map_err(interrupted)
}

#[allow(clippy::too_many_arguments)]
fn run_migration<T: DirtyTracker, G: GuestControl>(
    ram: &Ram<'_>,
    tracker: &mut T,
    guest: &mut G,
    config: &SourceConfig,
    connections: &mut dyn Connector,
    transport: Transport,
    bulk_channels: usize,
    events: &mut dyn FnMut(&Event),
) -> Result<SourceReport, SourceError> {
    let probe = ferry_uring::probe();
    let mut src = Source::connect(
        ram,
        config,
        connections,
        transport,
        bulk_channels,
        &probe,
        None,
    )?;
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
    /// Second handles on the bulk sockets: shutting one down wakes a sender
    /// blocked on a stalled peer.
    bulk_wakers: Vec<link::Conn>,
    /// The urgent connection (postcopy-ram only), until the request server
    /// takes its halves.
    urgent: Option<link::DataConn>,
    /// A second handle on the urgent socket: shutting it down ends the
    /// request server.
    urgent_waker: Option<link::Conn>,
    transport_name: String,
    started: Instant,
    session: SourceSession,
}

impl<'r, 'm> Source<'r, 'm> {
    fn connect(
        ram: &'r Ram<'m>,
        config: &'r SourceConfig,
        connections: &mut dyn Connector,
        transport: Transport,
        bulk_channels: usize,
        probe: &ProbeReport,
        resume: Option<&SourceHold>,
    ) -> Result<Self, SourceError> {
        let started = Instant::now();
        let n_bulk = bulk_channels.max(1);
        let layout = ram.layout().map_err(SourceError::Layout)?;
        // A resume of postcopy RAM needs its urgent channel whatever the
        // configuration says now.
        let postcopy_ram = config.offer_postcopy_ram
            || resume.is_some_and(|h| h.switchover == Switchover::PostcopyRam);
        let postcopy_only_sections = config.offer_postcopy_only_sections
            || resume.is_some_and(|h| h.switchover == Switchover::PostcopySections);
        let extra = if postcopy_ram { 2 } else { 1 };
        let caps = Capabilities {
            postcopy_ram,
            postcopy_only_sections,
            // Always on: only an authenticated transport with its own
            // integrity check may ever replace them.
            payload_checksums: true,
            channels: u16::try_from(n_bulk + extra).unwrap_or(u16::MAX),
        };
        let (hello, mut session) = match resume {
            None => (
                Hello::new(caps, layout),
                SourceSession::new(0, config.timeouts, caps.channels),
            ),
            Some(h) => (
                Hello::resuming(caps, layout, h.session),
                SourceSession::resume(0, config.timeouts, caps.channels, h.session, h.switchover),
            ),
        };
        let mut ctl_conn = connections.connect(ChannelRole::Control)?;
        let (neg, ret_dec, accept) = link::source_handshake(
            &mut ctl_conn,
            &hello,
            Duration::from_nanos(config.timeouts.handshake),
        )?;
        let now = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        session
            .handle_return(now, &accept)
            .map_err(SourceError::Session)?;
        let ret_conn = ctl_conn.try_clone().map_err(|source| LinkError::Io {
            what: "duplicating the control socket",
            source,
        })?;
        let regions = ram.mem_regions();
        let chan_err =
            |channel: ChannelRole| move |source| SourceError::Transport { channel, source };
        // The control channel sends only headers, device state and (rare)
        // resent pages as plain bytes: it needs no guest RAM registered.
        let ctl = AnyChannel::new(
            ctl_conn.try_clone().map_err(|source| LinkError::Io {
                what: "duplicating the control socket",
                source,
            })?,
            &[],
            transport,
            probe,
        )
        .map_err(chan_err(ChannelRole::Control))?;
        let mut bulk = Vec::with_capacity(n_bulk);
        let mut bulk_wakers = Vec::with_capacity(n_bulk);
        for i in 0..n_bulk {
            let c = connections.connect_data(ChannelRole::Bulk(i))?;
            bulk_wakers.push(c.conn().try_clone().map_err(|source| LinkError::Io {
                what: "duplicating a bulk socket",
                source,
            })?);
            // Bulk channels after the first share its registration of guest RAM.
            let chan = c
                .into_channel(&regions, transport, probe, bulk.first())
                .map_err(chan_err(ChannelRole::Bulk(i)))?;
            bulk.push(chan);
        }
        // The urgent connection comes last: page requests in, replies out,
        // never behind bulk data.
        let urgent = if neg.caps.postcopy_ram {
            Some(connections.connect_data(ChannelRole::Urgent)?)
        } else {
            None
        };
        let urgent_waker = urgent
            .as_ref()
            .map(|u| u.conn().try_clone())
            .transpose()
            .map_err(SourceError::UrgentSocket)?;
        let (returns, _reader) = link::spawn_return_reader(ret_conn, ret_dec);
        // The bulk channels carry the pages: theirs is the transport to name
        // (with TLS they are record channels while control is relayed).
        let data = bulk.first().map_or_else(|| ctl.name(), |b| b.name());
        let transport_name = format!("{data} x{n_bulk}");
        Ok(Source {
            ram,
            config,
            ctl_enc: StreamEncoder::new(&neg),
            neg,
            ctl,
            ctl_conn,
            returns,
            bulk,
            bulk_wakers,
            urgent,
            urgent_waker,
            transport_name,
            started,
            session,
        })
    }

    /// Sends every control record the session queued.
    fn flush_session(&mut self) -> Result<(), SourceError> {
        loop {
            let now = self.elapsed_ns();
            let Some(c) = self.session.poll_transmit(now) else {
                return Ok(());
            };
            self.send_ctl(c.repr(), &[])?;
        }
    }

    /// A session input failed: the error to report.
    fn session_error(&self, e: SessionError) -> SourceError {
        if e.custody == Custody::Holds {
            SourceError::GoUnconfirmed {
                why: Unconfirmed::Session(e),
            }
        } else {
            SourceError::Session(e)
        }
    }

    /// After a sender stopped or a bulk channel failed: the destination may
    /// have said why on the return path (it sends its error record before it
    /// closes). Its reason, when it arrives within `within`, is the better
    /// error; anything else leaves `e` as it is.
    fn destination_reason(&mut self, e: SourceError, within: Duration) -> SourceError {
        let bulk_failed = matches!(
            e,
            SourceError::SenderStopped
                | SourceError::Sender(SenderError::Transport { .. })
                | SourceError::Transport {
                    channel: ChannelRole::Bulk(_),
                    ..
                }
        );
        if !bulk_failed {
            return e;
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.returns.recv_timeout(left) {
                Ok(ReturnMsg::Record(r @ ReturnRepr::Error { .. })) => {
                    let now = self.elapsed_ns();
                    return match self.session.handle_return(now, &r) {
                        Err(said) => self.session_error(said),
                        Ok(_) => e,
                    };
                }
                Ok(ReturnMsg::Record(_)) => continue,
                _ => return e,
            }
        }
    }

    /// The return path ended: the session fails, and where the guest is
    /// decides the error.
    fn return_path_ended(&mut self, why: ReturnPathEnd) -> SourceError {
        self.session.link_failed(self.elapsed_ns());
        match self.session.custody() {
            Custody::Holds => SourceError::GoUnconfirmed {
                why: Unconfirmed::ReturnPath(why),
            },
            _ => SourceError::ReturnPath(why),
        }
    }

    fn shutdown(&mut self) {
        let _ = self.ctl_conn.shutdown();
        if let Some(u) = &self.urgent_waker {
            let _ = u.shutdown();
        }
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
                channel: ChannelRole::Control,
                source,
            })
    }

    /// Sends the pages set in `bitmaps` (one per region, indexed by region
    /// id) as discard maps on the control channel, a chunk of at most
    /// [`DISCARD_MAP_CHUNK_WORDS`] words at a time; chunks with no page set
    /// are left out. Returns the pages discarded and the bytes sent.
    fn send_discard_map(&mut self, bitmaps: &[Vec<u64>]) -> Result<(u64, u64), SourceError> {
        let (mut pages, mut sent) = (0u64, 0u64);
        let mut payload = Vec::with_capacity(DISCARD_MAP_CHUNK_WORDS * 8);
        for (r, words) in bitmaps.iter().enumerate() {
            let region_pages = self.ram.region(r as u16).map_or(0, |g| g.pages());
            let used = (region_pages.div_ceil(64) as usize).min(words.len());
            for (c, chunk) in words[..used].chunks(DISCARD_MAP_CHUNK_WORDS).enumerate() {
                if chunk.iter().all(|&w| w == 0) {
                    continue;
                }
                let first = (c * DISCARD_MAP_CHUNK_WORDS * 64) as u64;
                let count = (chunk.len() as u64 * 64).min(region_pages - first);
                payload.clear();
                for (i, &w) in chunk.iter().enumerate() {
                    // Bits past the region's last page stay clear.
                    let left = count - i as u64 * 64;
                    let w = if left < 64 {
                        w & ((1u64 << left) - 1)
                    } else {
                        w
                    };
                    pages += u64::from(w.count_ones());
                    payload.extend_from_slice(&w.to_le_bytes());
                }
                let repr = Repr::DiscardMap {
                    region: r as u16,
                    first,
                    count: count as u32,
                };
                self.send_ctl(repr, &payload)?;
                sent += (HEADER_LEN + payload.len()) as u64;
            }
        }
        Ok((pages, sent))
    }

    /// Sends one section in chunks on the control channel (as a postcopy-only
    /// section when `postcopy`); returns the bytes put on the wire.
    fn send_section(&mut self, id: u16, bytes: &[u8], postcopy: bool) -> Result<u64, SourceError> {
        let mut offset = 0usize;
        let mut sent = 0u64;
        // An empty section still sends one (empty, last) chunk.
        loop {
            let end = (offset + MAX_SECTION_CHUNK as usize).min(bytes.len());
            let chunk = &bytes[offset..end];
            let (len, last) = (chunk.len() as u32, end == bytes.len());
            let repr = if postcopy {
                Repr::PostcopySection {
                    section: id,
                    offset: offset as u64,
                    len,
                    last,
                }
            } else {
                Repr::Section {
                    section: id,
                    offset: offset as u64,
                    len,
                    last,
                }
            };
            self.send_ctl(repr, chunk)?;
            sent += (HEADER_LEN + chunk.len()) as u64;
            offset = end;
            if offset >= bytes.len() {
                return Ok(sent);
            }
        }
    }

    /// Folds resend requests into the bitmaps; fails on an error from the
    /// destination or a closed return path.
    fn poll_returns(
        &mut self,
        bitmaps: &mut [Vec<u64>],
        report: &mut SourceReport,
    ) -> Result<(), SourceError> {
        loop {
            match self.returns.try_recv() {
                Ok(ReturnMsg::Record(r)) => self.apply_return(r, bitmaps, report)?,
                Ok(ReturnMsg::Closed(why)) => {
                    self.session.link_failed(self.elapsed_ns());
                    return Err(SourceError::ReturnPath(why));
                }
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(SourceError::ReturnPath(ReturnPathEnd::Ended))
                }
            }
        }
    }

    fn apply_return(
        &mut self,
        r: ReturnRepr,
        bitmaps: &mut [Vec<u64>],
        report: &mut SourceReport,
    ) -> Result<(), SourceError> {
        let now = self.elapsed_ns();
        let action = self
            .session
            .handle_return(now, &r)
            .map_err(|e| self.session_error(e))?;
        match action {
            SourceAction::None => Ok(()),
            SourceAction::Resend {
                region,
                first,
                count,
            } => {
                let out_of_range = SourceError::ResendOutOfRange {
                    region,
                    first,
                    count,
                };
                let words = bitmaps.get_mut(usize::from(region)).ok_or(out_of_range)?;
                let pages = self.ram.region(region).map(|r| r.pages()).unwrap_or(0);
                let mut bm =
                    DirtyBitmap::new(words, pages as usize).map_err(SourceError::Bitmap)?;
                let end = first.saturating_add(u64::from(count)).min(pages);
                if first < end {
                    let _ = bm.set_range(first as usize..end as usize);
                }
                report.pages_resent += u64::from(count);
                Ok(())
            }
            // Page requests travel on the urgent connection, never here.
            SourceAction::PageRequest { .. } => {
                Err(SourceError::Unsupported("page requests on the return path"))
            }
        }
    }

    /// The next return-path message, waiting at most until the session's
    /// deadline; a deadline that passed fails the session.
    fn next_return(&mut self) -> Result<ReturnRepr, SourceError> {
        loop {
            // What already arrived counts before any deadline is checked.
            let queued = match self.returns.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    Some(ReturnMsg::Closed(ReturnPathEnd::Ended))
                }
            };
            let now = self.elapsed_ns();
            // A record that settles the wait counts if it arrived; anything
            // else (a resend, a flood of them) does not hold the deadline off.
            let settles = matches!(
                queued,
                Some(ReturnMsg::Closed(_))
                    | Some(ReturnMsg::Record(
                        ReturnRepr::Ready
                            | ReturnRepr::Started
                            | ReturnRepr::Error { .. }
                            | ReturnRepr::Accept { .. }
                    ))
            );
            if !settles {
                self.session.handle_timeout(now);
                if let Some(e) = self.session.failure() {
                    return Err(self.session_error(e));
                }
            }
            let left = self
                .session
                .poll_timeout()
                .map(|d| Duration::from_nanos(d.saturating_sub(now)))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let msg = match queued {
                Some(m) => Ok(m),
                None => self.returns.recv_timeout(left),
            };
            match msg {
                Ok(ReturnMsg::Record(r)) => return Ok(r),
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(ReturnMsg::Closed(why)) => return Err(self.return_path_ended(why)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.return_path_ended(ReturnPathEnd::Ended))
                }
            }
        }
    }

    /// After *go*: waits (bounded) for *started*. Postcopy RAM's resends are
    /// folded in later by the background stream; nothing else may come.
    fn await_started(&mut self, report: &mut SourceReport) -> Result<(), SourceError> {
        loop {
            let r = self.next_return()?;
            let started = r == ReturnRepr::Started;
            self.apply_return(r, &mut [], report).or_else(|e| match e {
                // A resend for a region the empty bitmaps do not cover:
                // postcopy RAM asks again through its faults.
                SourceError::ResendOutOfRange { .. } if !started => Ok(()),
                e => Err(e),
            })?;
            while let Some(ev) = self.session.poll_event() {
                if ev == SourceEvent::Started {
                    return Ok(());
                }
            }
        }
    }

    /// After the end of the stream: serves resend requests from the paused
    /// guest's memory until *ready*.
    ///
    /// With `fold` (postcopy RAM), torn pages are not resent here but added
    /// to the background stream.
    fn await_ready(
        &mut self,
        regions: &[RamRegion],
        report: &mut SourceReport,
        mut fold: Option<&mut [Vec<u64>]>,
    ) -> Result<(), SourceError> {
        loop {
            let msg = self.next_return()?;
            match msg {
                ReturnRepr::Ready => {
                    let mut ignore = Vec::new();
                    self.apply_return(msg, &mut ignore, report)?;
                    return Ok(());
                }
                r @ ReturnRepr::Resend { .. } if fold.is_some() => {
                    if let Some(b) = fold.as_deref_mut() {
                        self.apply_return(r, b, report)?;
                    }
                }
                ReturnRepr::Resend {
                    region,
                    first,
                    count,
                } => {
                    // The session checks the resend is allowed now.
                    self.session
                        .handle_return(self.elapsed_ns(), &msg)
                        .map_err(|e| self.session_error(e))?;
                    let out_of_range = SourceError::ResendOutOfRange {
                        region,
                        first,
                        count,
                    };
                    let r = regions.get(usize::from(region)).ok_or(out_of_range)?;
                    // SAFETY: the guest is paused: nothing writes these pages.
                    let bytes = unsafe { r.pages_slice(first, u64::from(count)) }.ok_or(
                        SourceError::ResendOutOfRange {
                            region,
                            first,
                            count,
                        },
                    )?;
                    let mut header = [0u8; HEADER_LEN];
                    self.ctl_enc
                        .encode(
                            &Repr::PageRun {
                                region,
                                first,
                                count,
                                requested: false,
                                paused: true,
                            },
                            bytes,
                            &mut header,
                        )
                        .map_err(SourceError::Emit)?;
                    // Sent as bytes (copied by the kernel before `send`
                    // returns): the control channel does not register guest
                    // RAM, which saves pinning it once more at start.
                    self.ctl
                        .send(&[OutRecord {
                            header,
                            payload: Payload::Bytes(bytes),
                        }])
                        .and_then(|_| self.ctl.flush())
                        .map_err(|source| SourceError::Transport {
                            channel: ChannelRole::Control,
                            source,
                        })?;
                    report.pages_resent += u64::from(count);
                }
                other => {
                    let mut ignore = Vec::new();
                    self.apply_return(other, &mut ignore, report)?;
                }
            }
        }
    }
}

/// How [`dispatch`] cuts the work into batches and marks it.
#[derive(Clone, Copy, Debug)]
struct Cut {
    /// Split runs into zero and non-zero pages (the first pass).
    detect_zero: bool,
    /// The guest is paused: no page can tear.
    paused: bool,
    /// Payload bytes per batch.
    batch_bytes: u64,
}

/// Re-arms and hands out every dirty page in `bitmaps`, clearing them;
/// returns the bytes handed out (payload plus headers).
fn dispatch(
    mut tracker: Option<&mut dyn DirtyTracker>,
    bitmaps: &mut [Vec<u64>],
    pages: &[u64],
    jobs: &[SyncSender<Job>],
    max_run: u32,
    cut: Cut,
) -> Result<u64, SourceError> {
    let Cut {
        detect_zero,
        paused,
        batch_bytes,
    } = cut;
    let n = jobs.len();
    let mut batches: Vec<Vec<PageWork>> = (0..n).map(|_| Vec::with_capacity(BATCH)).collect();
    let mut bytes = 0u64;
    let mut filled = vec![0u64; n];
    for (r, words) in bitmaps.iter_mut().enumerate() {
        let region_pages = pages[r];
        for (c, chunk) in words.chunks_mut(CHUNK_WORDS).enumerate() {
            if chunk.iter().all(|w| *w == 0) {
                continue;
            }
            let first_page = (c * CHUNK_WORDS * 64) as u64;
            // Re-arm exactly these pages before reading them: a write that
            // races the send is caught by the next sync.
            if let Some(t) = tracker.as_deref_mut() {
                t.clear_mask(r, first_page, chunk)?;
            }
            let chunk_pages = (region_pages - first_page).min((CHUNK_WORDS * 64) as u64) as usize;
            let mut bm = DirtyBitmap::new(chunk, chunk_pages).map_err(SourceError::Bitmap)?;
            let mut at = 0usize;
            while let Some(run) = bm.take_run(at, max_run as usize) {
                at = run.end();
                for (ch, first, count) in
                    share_out(first_page + run.first as u64, run.len as u64, n)
                {
                    bytes += count * PAGE_SIZE + HEADER_LEN as u64;
                    batches[ch].push(PageWork {
                        region: r as u16,
                        first,
                        count: count as u32,
                        detect_zero,
                        paused,
                    });
                    filled[ch] += count * PAGE_SIZE;
                    if batches[ch].len() >= BATCH || filled[ch] >= batch_bytes {
                        filled[ch] = 0;
                        let b = std::mem::replace(&mut batches[ch], Vec::with_capacity(BATCH));
                        jobs[ch]
                            .send(Job::Pages(b))
                            .map_err(|_| SourceError::SenderStopped)?;
                    }
                }
            }
        }
    }
    for (ch, b) in batches.into_iter().enumerate() {
        if !b.is_empty() {
            jobs[ch]
                .send(Job::Pages(b))
                .map_err(|_| SourceError::SenderStopped)?;
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
            .map_err(|_| SourceError::SenderStopped)?;
        acks.push(rx);
    }
    for rx in acks {
        match rx.recv() {
            Ok(Ok(())) => {}
            // The sender's own error comes with its thread, when it is
            // joined.
            Ok(Err(FlushFailed)) | Err(_) => return Err(SourceError::SenderStopped),
        }
    }
    Ok(())
}

/// Joins the sender threads, in channel order; the first error wins.
fn join_senders_list(
    senders: Vec<std::thread::ScopedJoinHandle<'_, Result<SenderStats, SenderError>>>,
) -> Result<SenderStats, SourceError> {
    let mut total = SenderStats::default();
    let mut first_err = None;
    for (channel, h) in senders.into_iter().enumerate() {
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
                first_err.get_or_insert(SenderError::Panicked { channel });
            }
        }
    }
    match first_err {
        Some(e) => Err(SourceError::Sender(e)),
        None => Ok(total),
    }
}

/// Words of one discard-map chunk: 128 KiB, a million pages (4 GiB of
/// 4 KiB pages).
const DISCARD_MAP_CHUNK_WORDS: usize = 16 * 1024;

/// Words of bitmap handed to the senders at a time in the background
/// stream (4096 pages, 16 MiB), so that progress can be reported.
const STEP_WORDS: usize = 64;

/// Streams every page set in `bitmaps` (clearing them), a step at a time,
/// calling `progress` with the pages handed out so far at most every 100 ms.
fn stream_background(
    bitmaps: &mut [Vec<u64>],
    pages: &[u64],
    jobs: &[SyncSender<Job>],
    max_run: u32,
    progress: &mut dyn FnMut(u64),
) -> Result<(), SourceError> {
    let mut step: Vec<Vec<u64>> = bitmaps.iter().map(|b| vec![0u64; b.len()]).collect();
    let mut done = 0u64;
    let mut last = Instant::now();
    for r in 0..bitmaps.len() {
        let words = bitmaps[r].len();
        let mut at = 0;
        while at < words {
            let end = (at + STEP_WORDS).min(words);
            let src = &mut bitmaps[r][at..end];
            if src.iter().all(|w| *w == 0) {
                at = end;
                continue;
            }
            done += count_bits(src);
            step[r][at..end].copy_from_slice(src);
            src.fill(0);
            // `dispatch` clears what it hands out.
            dispatch(
                None,
                &mut step,
                pages,
                jobs,
                max_run,
                Cut {
                    detect_zero: false,
                    paused: true,
                    batch_bytes: BACKGROUND_BATCH_BYTES,
                },
            )?;
            if last.elapsed() >= Duration::from_millis(100) {
                progress(done);
                last = Instant::now();
            }
            at = end;
        }
    }
    Ok(())
}

/// The bitmaps' words as little-endian bytes.
fn words_bytes(bitmaps: &[Vec<u64>]) -> Vec<u8> {
    bitmaps
        .iter()
        .flat_map(|b| b.iter().flat_map(|w| w.to_le_bytes()))
        .collect()
}

/// Counters of the urgent server.
#[derive(Debug, Default)]
struct UrgentStats {
    requests: std::sync::atomic::AtomicU64,
    pages: std::sync::atomic::AtomicU64,
}

/// Serves page requests from the paused guest's memory, ahead of the
/// background stream: each request is answered at once on the urgent
/// connection (or, as a benchmark baseline, queued on the page's bulk
/// channel). Ends when the connection does.
fn urgent_server(
    mut reader: link::ReadHalf,
    mut writer: link::WriteHalf,
    ram: &Ram<'_>,
    neg: Negotiated,
    via_bulk: Option<Vec<SyncSender<Job>>>,
    stats: &UrgentStats,
) -> Result<(), UrgentServerError> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    crate::postcopy::prioritise_urgent_thread();
    let mut dec = ferry_core::wire::ReturnDecoder::new(neg);
    let mut enc = StreamEncoder::new(&neg);
    let mut out: Vec<u8> = Vec::with_capacity(HEADER_LEN + 64 * PAGE_SIZE as usize);
    loop {
        let rec = match link::read_return(&mut reader, &mut dec) {
            Ok(r) => r,
            // The end of the connection is how the server is stopped.
            Err(link::ReturnReadError::Io(_)) => return Ok(()),
            Err(link::ReturnReadError::Decode(e)) => return Err(UrgentServerError::Decode(e)),
        };
        let ReturnRepr::PageRequest {
            region,
            first,
            count,
        } = rec.repr
        else {
            return Err(UrgentServerError::Unexpected(rec.repr));
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.pages.fetch_add(u64::from(count), Ordering::Relaxed);
        if let Some(jobs) = via_bulk.as_ref() {
            let ch = link::channel_of(first, jobs.len());
            let work = PageWork {
                region,
                first,
                count,
                detect_zero: false,
                paused: true,
            };
            if jobs[ch].send(Job::Requested(work)).is_ok() {
                continue;
            }
            // The background stream has ended: answer directly.
        }
        let r = ram
            .region(region)
            .ok_or(UrgentServerError::UnknownRegion { region })?;
        // SAFETY: the guest is paused on this side: nothing writes its pages.
        let bytes = unsafe { r.pages_slice(first, u64::from(count)) }.ok_or(
            UrgentServerError::OutsideRegion {
                region,
                first,
                count,
            },
        )?;
        let mut header = [0u8; HEADER_LEN];
        enc.encode(
            &Repr::PageRun {
                region,
                first,
                count,
                requested: true,
                paused: true,
            },
            bytes,
            &mut header,
        )
        .map_err(UrgentServerError::Encode)?;
        out.clear();
        out.extend_from_slice(&header);
        out.extend_from_slice(bytes);
        writer.write_all(&out).map_err(UrgentServerError::Send)?;
    }
}
