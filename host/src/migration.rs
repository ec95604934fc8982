//! The embedding API: what a hypervisor hands Ferry, and what it gets back.
//!
//! A hypervisor gives the source side its guest memory, a dirty tracker, a
//! [`GuestControl`] (pause, resume, device state as bytes) and a connected
//! transport, and gets back [`Event`]s while the migration runs and a
//! [`SourceReport`] at the end. The destination side gets its own memory, a
//! [`GuestStarter`] that receives the device state and starts the guest on
//! *go*, and returns a [`DestinationReport`].

use std::time::Duration;

/// An error from a callback the embedding hypervisor provides.
pub type CallbackError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One piece of device state, migrated as a section inside the downtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSection {
    /// The section's id on the wire; unique within a migration.
    pub id: u16,
    /// Its bytes, opaque to Ferry.
    pub bytes: Vec<u8>,
}

/// The source's hold on the running guest.
pub trait GuestControl {
    /// Stops every vCPU; returns once none runs. Called once, for the final
    /// stop-and-copy.
    fn pause(&mut self) -> Result<(), CallbackError>;

    /// Starts the vCPUs again on the source: called when the migration fails
    /// before the destination said *ready*.
    fn resume(&mut self) -> Result<(), CallbackError>;

    /// The device state while paused, one section per piece.
    fn device_state(&mut self) -> Result<Vec<DeviceSection>, CallbackError>;

    /// How many bytes of device state to expect, for the pending estimate.
    fn device_state_estimate(&self) -> u64 {
        64 * 1024
    }
}

/// The destination's way to start the guest.
pub trait GuestStarter {
    /// Called once, on *go*, with every device section received: restore
    /// them and start the vCPUs.
    ///
    /// With RAM in postcopy this runs before every page has arrived, on the
    /// thread that drives the migration: it must not read or write guest RAM
    /// itself. A page still missing would block it until the page arrives,
    /// and if the connection is lost meanwhile, for good: the migration
    /// could then neither notice the loss nor hold the guest for a resume.
    /// Leave such accesses to the vCPUs (a vCPU blocked on a missing page
    /// waits for it, across a resume, as the guest would).
    fn start(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError>;

    /// Called once after postcopy, with every postcopy-only section (e.g. the
    /// snapshot dirty bitmap, [`SNAPSHOT_BITMAP_SECTION`]) that streamed after
    /// the guest started. The default ignores them.
    fn postcopy_sections(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError> {
        let _ = sections;
        Ok(())
    }
}

/// Section id of the snapshot dirty bitmap, a postcopy-only section: one bit
/// per guest page written since the migration started (what an incremental
/// snapshot needs), the regions' bitmaps one after the other as
/// little-endian 64-bit words.
pub const SNAPSHOT_BITMAP_SECTION: u16 = 0x100;

/// Settings of a migration, on the source.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The longest the guest may stay paused: a ceiling, never a budget.
    pub downtime_limit: Duration,
    /// Send at most this many bytes per second; `None` for no cap.
    pub bandwidth_cap: Option<u64>,
    /// Give up, resuming nothing because nothing was paused, when the
    /// migration has not converged after this long. `None` never gives up.
    pub give_up_after: Option<Duration>,
    /// A remainder at or below this many bytes is not worth another round.
    pub floor_bytes: u64,
    /// The longest page run sent as one record.
    pub max_run_pages: u32,
    /// Every bound on a wait of the protocol: the handshake, *ready* after
    /// the end of the stream (the guest is paused meanwhile), *started* after
    /// *go*. See [`ferry_core::session::Timeouts`] for the defaults.
    pub timeouts: ferry_core::session::Timeouts,
    /// Offer the postcopy-ram capability. RAM still enters postcopy only
    /// when the operator asks, through `postcopy`.
    pub offer_postcopy_ram: bool,
    /// Offer the postcopy-only-sections capability: with it, policy rule 4
    /// may complete RAM in the downtime and stream postcopy-only sections
    /// after the guest resumed.
    pub offer_postcopy_only_sections: bool,
    /// The operator's switch to postcopy (share a clone with whoever throws it).
    pub postcopy: crate::postcopy::PostcopyHandle,
    /// Throw the switch once the first full pass is done (libvirt's
    /// postcopy-after-precopy).
    pub postcopy_after_first_pass: bool,
    /// Keep a snapshot dirty bitmap (every page written since the migration
    /// started) and migrate it as the postcopy-only section
    /// [`SNAPSHOT_BITMAP_SECTION`].
    pub snapshot_bitmap: bool,
    /// Baseline for the postcopy benchmark only (feature `bench-baselines`):
    /// send the replies to page requests on the bulk channel, behind the
    /// background stream, instead of the urgent channel.
    #[cfg(feature = "bench-baselines")]
    pub replies_on_bulk: bool,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            downtime_limit: Duration::from_millis(300),
            bandwidth_cap: None,
            give_up_after: None,
            floor_bytes: 256 * 1024,
            max_run_pages: 64,
            timeouts: ferry_core::session::Timeouts::DEFAULT,
            offer_postcopy_ram: false,
            offer_postcopy_only_sections: false,
            postcopy: crate::postcopy::PostcopyHandle::new(),
            postcopy_after_first_pass: false,
            snapshot_bitmap: false,
            #[cfg(feature = "bench-baselines")]
            replies_on_bulk: false,
        }
    }
}

impl SourceConfig {
    /// Whether replies to page requests go on the bulk channel (a benchmark
    /// baseline; always false without the `bench-baselines` feature).
    pub(crate) fn replies_on_bulk(&self) -> bool {
        #[cfg(feature = "bench-baselines")]
        return self.replies_on_bulk;
        #[cfg(not(feature = "bench-baselines"))]
        false
    }
}

/// How a precopy round went, for progress displays.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RoundProgress {
    /// Round number; 0 is the first full pass.
    pub round: u32,
    /// Bytes pending after the round's dirty-log sync.
    pub pending_bytes: u64,
    /// Bytes sent so far, headers included.
    pub sent_bytes: u64,
    /// Bandwidth estimate, bytes/s.
    pub bandwidth: u64,
    /// Dirty-rate estimate, bytes/s.
    pub dirty_rate: u64,
    /// Bytes that fit in the downtime limit.
    pub threshold: u64,
    /// What the downtime would be if the guest stopped now, in nanoseconds.
    pub expected_downtime_ns: Option<u64>,
    /// Time since the migration started.
    pub elapsed_ns: u64,
}

/// What happens during a migration, in order.
#[derive(Clone, Debug)]
pub enum Event {
    /// The handshake succeeded.
    Connected {
        /// The transport in use, e.g. `io_uring (SEND_ZC)` or `std`.
        transport: String,
    },
    /// A round finished (round 0 is the first full pass).
    Round(RoundProgress),
    /// The guest was paused for the final stop-and-copy.
    Paused,
    /// Everything was sent; waiting for the destination's *ready*.
    AwaitingReady,
    /// *go* was sent: the guest is held here, paused, until the destination
    /// confirms that it started it.
    GoSent,
    /// The destination confirmed that the guest runs there (*started*).
    Started,
    /// The migration failed before *ready*, and the guest was resumed here.
    ResumedOnSource,
    /// *go* was sent and the migration is in postcopy: the guest runs on the
    /// destination while the rest streams (and missing pages are fetched).
    PostcopyStarted {
        /// RAM pages may be missing on the destination (postcopy RAM), or
        /// only postcopy-only sections follow.
        ram: bool,
        /// Pages still to stream.
        pages_left: u64,
    },
    /// Postcopy progress, at most every 100 ms.
    Postcopy(PostcopyProgress),
    /// The destination acknowledged that every page and section arrived.
    Completed,
}

/// Postcopy progress on the source.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PostcopyProgress {
    /// Pages streamed in the background so far.
    pub pages_streamed: u64,
    /// Pages still to stream.
    pub pages_left: u64,
    /// Page requests served.
    pub requests: u64,
    /// Time since *go*, nanoseconds.
    pub elapsed_ns: u64,
}

/// What postcopy did on the source.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SourcePostcopyReport {
    /// Which postcopy it was.
    pub mode: crate::postcopy::PostcopyMode,
    /// Pages discarded at switchover (changed after they were sent).
    pub pages_discarded: u64,
    /// Bytes of the discard map sent on the control channel at switchover
    /// (headers included).
    pub discard_map_bytes: u64,
    /// Pages streamed after *go*.
    pub pages_streamed: u64,
    /// Page requests served on the urgent channel.
    pub requests: u64,
    /// Pages sent in reply to requests.
    pub pages_requested: u64,
    /// Bytes of postcopy-only sections sent after *go*.
    pub section_bytes: u64,
    /// From *go* to the destination's final acknowledgement, nanoseconds.
    pub postcopy_ns: u64,
}

/// The result of a migration, on the source.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SourceReport {
    /// Wall time from start to *go*, in nanoseconds.
    pub total_ns: u64,
    /// Precopy rounds after the first full pass.
    pub rounds: u32,
    /// Bytes put on the stream, headers included.
    pub bytes_sent: u64,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as zero runs (no payload).
    pub zero_pages: u64,
    /// Pages the destination asked for again because they arrived torn.
    pub pages_resent: u64,
    /// Bytes of device state sent in the downtime.
    pub device_bytes: u64,
    /// Mean throughput over the whole migration (setup included), bytes/s.
    pub throughput: u64,
    /// Time spent connecting and setting up the channels before the first
    /// page was sent, in nanoseconds.
    pub setup_ns: u64,
    /// Mean throughput from the first page sent to *go*, bytes/s.
    pub transfer_throughput: u64,
    /// Pending bytes when the guest was paused.
    pub final_pending: u64,
    /// CLOCK_MONOTONIC reading when the guest was paused, in nanoseconds.
    pub paused_at_ns: u64,
    /// CLOCK_MONOTONIC reading when *go* was sent, in nanoseconds.
    pub go_at_ns: u64,
    /// The downtime seen from the source: pause to *go* sent.
    pub source_downtime_ns: u64,
    /// The final sync of the dirty log, inside the downtime, in nanoseconds.
    pub final_sync_ns: u64,
    /// The threshold at the final decision.
    pub threshold: u64,
    /// The bandwidth the policy measured at the final decision, bytes/s
    /// (the threshold is this times the downtime limit).
    pub bandwidth: u64,
    /// The transport used.
    pub transport: String,
    /// Postcopy, when the migration switched over into it.
    pub postcopy: Option<SourcePostcopyReport>,
}

/// The result of a migration, on the destination.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DestinationReport {
    /// Bytes read off the stream, headers included.
    pub bytes_received: u64,
    /// Pages received with their contents.
    pub pages_received: u64,
    /// Pages received as zero runs.
    pub zero_pages: u64,
    /// Torn pages asked for again.
    pub resend_requests: u64,
    /// Device sections received.
    pub sections: u32,
    /// CLOCK_MONOTONIC reading when *go* arrived, in nanoseconds.
    pub go_at_ns: u64,
    /// CLOCK_MONOTONIC reading when the guest was started, in nanoseconds.
    pub resumed_at_ns: u64,
    /// Postcopy, when the migration switched over into it.
    pub postcopy: Option<crate::postcopy::DestinationPostcopyReport>,
}

/// The CLOCK_MONOTONIC reading in nanoseconds: comparable across the
/// processes of one machine, which is how the demo measures the downtime
/// from the source's pause to the destination's resume.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
