//! The io_uring channel: one ring per socket, guest memory registered as fixed buffers.
//!
//! Send: records are flattened into segments (header from a registered slab, payload from
//! registered guest memory). A batch becomes one chain of linked SQEs — a `SEND` (fixed buffer)
//! or `SEND_ZC` per long payload, one gathering `SENDMSG` per run of short pieces — all with
//! `MSG_WAITALL`. Only one chain is in flight at a time, so the stream stays in order; a
//! chain that stops short (a short write breaks the link and cancels the rest) is resumed from
//! the exact byte where the kernel stopped. With `SEND_ZC`, a slab slot is reused only after
//! every notification of its chain arrived.
//!
//! Receive: see [`crate::recv`]; the staging buffer is registered and filled with
//! `READ_FIXED`, payloads read straight into place use `RECV` with `MSG_WAITALL`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::channel::{Channel, Stream};
use crate::error::Error;
use crate::memory::{GuestMap, MemRegion};
use crate::probe::{memlock_text, ProbeReport};
use crate::record::{Decoder, OutRecord, Payload, Received, HEADER_LEN};
use crate::recv::{RawRead, Receiver, RecvStrategy};
use crate::segments::{from_offset, push_record, seg_count, Seg};

/// Header slab slots (batches that may be alive at once: one building, one in flight, the
/// rest waiting for zero-copy notifications).
const SLOTS: usize = 4;
/// Records per slot.
const SLOT_RECORDS: usize = 512;
/// Segments per slot.
const SLOT_SEGS: usize = SLOT_RECORDS * 2 + 64;
/// SQEs per chain.
const CHAIN_OPS: usize = 64;
/// Iovecs per gathering `SENDMSG`.
const IOV_PER_MSG: usize = 256;
/// `user_data` of receive operations.
const RECV_TAG: u64 = u64::MAX;
/// Fixed buffer index of the receive staging buffer.
const STAGING_IDX: u16 = 1;
/// Fixed buffer index of the first guest memory piece.
const GUEST_IDX: usize = 2;
/// `IORING_RECVSEND_FIXED_BUF`: the `SEND` buffer is a registered one.
const RECVSEND_FIXED_BUF: u16 = 4;

/// How a [`UringChannel`] sends and receives.
#[derive(Clone, Copy, Debug)]
pub struct UringConfig {
    /// Submission queue entries (at least 2 x 64).
    pub entries: u32,
    /// Send long payloads with `SEND_ZC` (needs the probe to have found it).
    pub zero_copy: bool,
    /// How received payloads reach their place.
    pub recv: RecvStrategy,
    /// Size of the registered receive staging buffer.
    pub staging_len: usize,
    /// Payload pieces at least this long get their own fixed-buffer `SEND`/`SEND_ZC`; shorter
    /// ones are gathered with their neighbours into one `SENDMSG`.
    pub large_send: usize,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            entries: 256,
            zero_copy: false,
            recv: RecvStrategy::default(),
            staging_len: 256 << 10,
            large_send: 32 << 10,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Building,
    InFlight,
    Draining,
}

/// One batch: its headers live in the slab at `index * SLOT_RECORDS * HEADER_LEN`.
struct Slot {
    state: SlotState,
    records: usize,
    segs: Vec<Seg>,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
    total: u64,
    done: u64,
    chain_start: u64,
    pending: usize,
    notifs: isize,
    err: Option<io::Error>,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: SlotState::Free,
            records: 0,
            segs: Vec::with_capacity(SLOT_SEGS),
            iovecs: Vec::with_capacity(SLOT_SEGS),
            msgs: Vec::with_capacity(CHAIN_OPS),
            total: 0,
            done: 0,
            chain_start: 0,
            pending: 0,
            notifs: 0,
            err: None,
        }
    }
}

/// Ring, socket and send state: everything the receive framer needs to read.
struct Engine {
    ring: core::mem::ManuallyDrop<IoUring>,
    fd: RawFd,
    slab: Vec<u8>,
    slots: Vec<Slot>,
    building: Option<usize>,
    in_flight: Option<usize>,
    zero_copy: bool,
    send_fixed: bool,
    large_send: usize,
    broken: bool,
    recv_result: Option<i32>,
    entries: Vec<squeue::Entry>,
    /// A send error found while receiving, for the next `send` or `flush`.
    deferred: Option<Error>,
    ops: Vec<Op>,
}

/// One SQE of a chain, before it is built.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// A gathering `SENDMSG` of the slot's msghdr at this index.
    Gather(usize),
    /// A long piece of guest memory: pointer, length, fixed buffer index.
    Large(*const u8, u32, u16),
}

/// A channel over one stream socket driven by its own io_uring.
pub struct UringChannel {
    engine: Engine,
    receiver: Receiver,
    map: GuestMap,
    stream: Stream,
    /// Guest memory's registration was cloned from another channel's ring.
    shared: bool,
}

// SAFETY: the raw pointers inside (segments, iovecs, msghdrs) point into memory owned by the
// channel itself or into guest regions whose `MemRegion` contract allows use from any thread;
// the channel is used by one thread at a time (`&mut self`).
unsafe impl Send for UringChannel {}

impl core::fmt::Debug for UringChannel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UringChannel")
            .field("fd", &self.engine.fd)
            .field("zero_copy", &self.engine.zero_copy)
            .field("position", &self.receiver.position())
            .finish()
    }
}

impl UringChannel {
    /// Builds a channel over `stream` that may send from and receive into `regions`.
    ///
    /// The regions are registered with the ring as fixed buffers of at most 1 GiB each;
    /// `probe` (from [`crate::probe`]) says what the kernel offers.
    pub fn new(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        config: UringConfig,
        probe: &ProbeReport,
    ) -> Result<Self, Error> {
        Self::new_sharing(stream, regions, config, probe, None)
    }

    /// As [`UringChannel::new`], but when `share` (a channel built over the same `regions`)
    /// is given, guest memory is not pinned again: its registration is cloned from `share`'s
    /// ring (`IORING_REGISTER_CLONE_BUFFERS`, Linux 6.12) and only this channel's own header
    /// slab and staging buffer are registered. On a kernel without cloning, or when `share`
    /// maps other memory, guest memory is registered as [`UringChannel::new`] does.
    /// [`UringChannel::shares_registration`] tells which happened.
    pub fn new_sharing(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        config: UringConfig,
        probe: &ProbeReport,
        share: Option<&UringChannel>,
    ) -> Result<Self, Error> {
        let stream = stream.into();
        stream.prepare().map_err(Error::Socket)?;
        let entries = config.entries.max(2 * CHAIN_OPS as u32);
        // Cooperative task running (5.19+) saves an interrupt per completion; older kernels
        // refuse the flag, so fall back to a plain ring.
        let ring = match IoUring::builder()
            .setup_cqsize(entries * 8)
            .setup_coop_taskrun()
            .build(entries)
        {
            Ok(r) => r,
            Err(_) => IoUring::builder()
                .setup_cqsize(entries * 8)
                .build(entries)
                .map_err(|source| Error::RingSetup { entries, source })?,
        };
        let map = GuestMap::new(regions);
        let mut receiver = Receiver::new(config.staging_len, config.recv);
        let mut slab = vec![0u8; SLOTS * SLOT_RECORDS * HEADER_LEN];
        let (sp, sl) = receiver.staging_raw();
        let mut iov = vec![
            libc::iovec {
                iov_base: slab.as_mut_ptr().cast(),
                iov_len: slab.len(),
            },
            libc::iovec {
                iov_base: sp.cast(),
                iov_len: sl,
            },
        ];
        for (p, l) in map.pieces() {
            iov.push(libc::iovec {
                iov_base: p.as_ptr().cast(),
                iov_len: *l,
            });
        }
        let shared = share.is_some_and(|other| {
            !map.pieces().is_empty()
                && other.map.pieces() == map.pieces()
                && clone_registration(&ring, other.engine.ring.as_raw_fd(), &iov)
        });
        if !shared {
            // SAFETY: the slab and staging buffer are owned by the channel, never resized and
            // outlive the ring (the ring is dropped, and waited for, in `Drop` before them);
            // the guest pieces stay mapped for the channel's life by `MemRegion::new`'s
            // contract.
            unsafe { ring.submitter().register_buffers(&iov) }.map_err(|source| {
                Error::Register {
                    bytes: iov.iter().map(|v| v.iov_len).sum(),
                    count: iov.len(),
                    memlock: memlock_text(),
                    source,
                }
            })?;
        }
        let fd = stream.fd();
        Ok(Self {
            engine: Engine {
                ring: core::mem::ManuallyDrop::new(ring),
                fd,
                slab,
                slots: (0..SLOTS).map(|_| Slot::new()).collect(),
                building: None,
                in_flight: None,
                // Only TCP can send zero-copy; Unix sockets refuse SEND_ZC.
                zero_copy: config.zero_copy && probe.send_zc && matches!(stream, Stream::Tcp(_)),
                send_fixed: probe.send_fixed,
                large_send: config.large_send.max(1),
                broken: false,
                recv_result: None,
                entries: Vec::with_capacity(CHAIN_OPS),
                deferred: None,
                ops: Vec::with_capacity(CHAIN_OPS),
            },
            receiver,
            map,
            stream,
            shared,
        })
    }

    /// Whether guest memory's registration was cloned from another channel's ring rather
    /// than pinned again ([`UringChannel::new_sharing`]).
    pub fn shares_registration(&self) -> bool {
        self.shared
    }

    /// Whether long payloads go out with `SEND_ZC`.
    pub fn zero_copy(&self) -> bool {
        self.engine.zero_copy
    }

    /// Bytes of guest memory registered with the ring.
    pub fn registered_bytes(&self) -> usize {
        self.map.total_len()
    }
}

/// Clones the fixed buffer table of the ring `src` into `ring`, whose table is empty, then
/// puts this channel's own header slab and staging buffer (`own[..GUEST_IDX]`) in place of
/// the ones cloned with it; the guest pieces stay shared. False when the kernel cannot
/// clone (before 6.12) or the update fails; `ring` is left with no table then.
fn clone_registration(ring: &IoUring, src: RawFd, own: &[libc::iovec]) -> bool {
    let Some(own) = own.get(..GUEST_IDX) else {
        return false;
    };
    let sub = ring.submitter();
    if sub.register_buffers_clone(src).is_err() {
        return false;
    }
    // SAFETY: the slab and staging buffer `own` points at are owned by the channel being
    // built, never resized, and outlive its ring (see `UringChannel::new_sharing`).
    if unsafe { sub.register_buffers_update(0, own, None) }.is_err() {
        let _ = sub.unregister_buffers();
        return false;
    }
    true
}

impl Engine {
    /// Waits for at least one completion (or just drains when `wait` is false) and dispatches.
    fn reap(&mut self, wait: bool) -> io::Result<()> {
        if wait {
            loop {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            if ud == RECV_TAG {
                self.recv_result = Some(cqe.result());
                continue;
            }
            let Some(slot) = self.slots.get_mut((ud >> 16) as usize) else {
                continue;
            };
            if cqueue::notif(cqe.flags()) {
                slot.notifs -= 1;
                continue;
            }
            slot.pending = slot.pending.saturating_sub(1);
            if cqueue::more(cqe.flags()) {
                slot.notifs += 1;
            }
            let res = cqe.result();
            if res >= 0 {
                slot.done += res as u64;
            } else if res != -libc::ECANCELED && slot.err.is_none() {
                slot.err = Some(io::Error::from_raw_os_error(-res));
            }
        }
        Ok(())
    }

    /// Moves finished chains on: resumes a short one, retires a complete one.
    fn advance(&mut self) -> Result<(), Error> {
        if let Some(s) = self.in_flight {
            let slot = &mut self.slots[s];
            if slot.pending == 0 {
                if let Some(source) = slot.err.take() {
                    self.broken = true;
                    return Err(Error::Send {
                        sent: slot.done,
                        total: slot.total,
                        source,
                    });
                }
                if slot.done < slot.total {
                    if slot.done == slot.chain_start {
                        self.broken = true;
                        return Err(Error::Send {
                            sent: slot.done,
                            total: slot.total,
                            source: io::Error::new(
                                io::ErrorKind::WriteZero,
                                "the socket accepted no bytes",
                            ),
                        });
                    }
                    let from = slot.done;
                    self.submit_chain(s, from)?;
                } else {
                    slot.state = SlotState::Draining;
                    self.in_flight = None;
                }
            }
        }
        for slot in &mut self.slots {
            if slot.state == SlotState::Draining && slot.notifs <= 0 {
                slot.state = SlotState::Free;
            }
        }
        Ok(())
    }

    fn wait_step(&mut self) -> Result<(), Error> {
        self.reap(true).map_err(|source| {
            self.broken = true;
            Error::Send {
                sent: 0,
                total: 0,
                source,
            }
        })?;
        self.advance()
    }

    /// Builds and submits one linked chain for slot `s`, starting at byte `start` of its batch.
    fn submit_chain(&mut self, s: usize, start: u64) -> Result<(), Error> {
        let fd = types::Fd(self.fd);
        let (zc, fixed) = (self.zero_copy, self.send_fixed);
        // Without SEND_ZC or fixed-buffer SEND a long payload gains nothing from its own SQE:
        // everything is gathered, headers and payloads alike.
        let large = if zc || fixed {
            self.large_send
        } else {
            usize::MAX
        };
        let slot = &mut self.slots[s];
        slot.iovecs.clear();
        slot.msgs.clear();
        slot.chain_start = start;
        let ops = &mut self.ops;
        ops.clear();
        let mut gather_from: Option<usize> = None;
        let Slot {
            segs, iovecs, msgs, ..
        } = slot;
        let mut gather = |iovecs: &mut Vec<libc::iovec>, ops: &mut Vec<Op>, from: usize| {
            // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
            let mut m: libc::msghdr = unsafe { core::mem::zeroed() };
            m.msg_iov = iovecs[from..].as_mut_ptr();
            m.msg_iovlen = iovecs.len() - from;
            msgs.push(m);
            ops.push(Op::Gather(msgs.len() - 1));
        };
        for seg in from_offset(segs, start) {
            if ops.len() + usize::from(gather_from.is_some()) >= CHAIN_OPS
                || iovecs.len() == iovecs.capacity()
            {
                break;
            }
            match seg.piece {
                Some(piece) if seg.len >= large => {
                    if let Some(from) = gather_from.take() {
                        gather(iovecs, ops, from);
                    }
                    if ops.len() >= CHAIN_OPS {
                        break;
                    }
                    ops.push(Op::Large(
                        seg.ptr,
                        seg.len as u32,
                        (GUEST_IDX + piece) as u16,
                    ));
                }
                _ => {
                    let from = *gather_from.get_or_insert(iovecs.len());
                    iovecs.push(libc::iovec {
                        iov_base: seg.ptr as *mut _,
                        iov_len: seg.len,
                    });
                    if iovecs.len() - from == IOV_PER_MSG {
                        gather_from = None;
                        gather(iovecs, ops, from);
                    }
                }
            }
        }
        if let Some(from) = gather_from.take() {
            gather(iovecs, ops, from);
        }
        let n = ops.len();
        if n == 0 {
            return Ok(());
        }
        let entries = &mut self.entries;
        entries.clear();
        for (i, op) in ops.iter().enumerate() {
            // Every op but the last has more of the stream right behind it: MSG_MORE lets TCP
            // put a header in the same segment as the payload that follows it.
            let last = i + 1 == n;
            let flags =
                libc::MSG_WAITALL | libc::MSG_NOSIGNAL | if last { 0 } else { libc::MSG_MORE };
            let e = match *op {
                Op::Gather(m) => {
                    let mp = msgs
                        .get(m)
                        .map_or(core::ptr::null(), |m| m as *const libc::msghdr);
                    opcode::SendMsg::new(fd, mp).flags(flags as u32).build()
                }
                Op::Large(ptr, len, idx) if zc => opcode::SendZc::new(fd, ptr, len)
                    .buf_index(Some(idx))
                    .flags(flags)
                    .build(),
                Op::Large(ptr, len, idx) => opcode::Send::new(fd, ptr, len)
                    .flags(flags)
                    .ioprio(RECVSEND_FIXED_BUF)
                    .buf_group(idx)
                    .build(),
            };
            let e = e.user_data(((s as u64) << 16) | i as u64);
            entries.push(if last {
                e
            } else {
                e.flags(squeue::Flags::IO_LINK)
            });
        }
        slot.pending = n;
        slot.state = SlotState::InFlight;
        {
            let mut sq = self.ring.submission();
            // SAFETY: every pointer in the entries (iovecs, msghdrs, slab headers, caller bytes,
            // guest memory) stays valid and unmoved until the chain's completions — and, for
            // SEND_ZC, its notifications — have been reaped: the slot is not reused before that,
            // caller bytes are waited for before `send` returns, and `Drop` waits too.
            let pushed = unsafe { sq.push_multiple(entries) };
            if pushed.is_err() {
                slot.pending = 0;
                self.broken = true;
                return Err(Error::Send {
                    sent: slot.done,
                    total: slot.total,
                    source: io::Error::other("the submission queue is full"),
                });
            }
        }
        self.in_flight = Some(s);
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap(false).map_err(|source| Error::Send {
                        sent: 0,
                        total: 0,
                        source,
                    })?;
                }
                Err(source) => {
                    self.broken = true;
                    return Err(Error::Send {
                        sent: 0,
                        total: 0,
                        source,
                    });
                }
            }
        }
    }

    /// Submits the slot being built, after the chain before it has fully gone out.
    fn launch(&mut self) -> Result<(), Error> {
        let Some(s) = self.building.take() else {
            return Ok(());
        };
        while self.in_flight.is_some() {
            self.wait_step()?;
        }
        let slot = &mut self.slots[s];
        slot.total = slot.segs.iter().map(|g| g.len as u64).sum();
        slot.done = 0;
        if slot.total == 0 {
            slot.state = SlotState::Free;
            return Ok(());
        }
        self.submit_chain(s, 0)
    }

    /// A slot to build into.
    fn building_slot(&mut self) -> Result<usize, Error> {
        if let Some(s) = self.building {
            return Ok(s);
        }
        loop {
            if let Some(s) = self.slots.iter().position(|x| x.state == SlotState::Free) {
                let slot = &mut self.slots[s];
                slot.state = SlotState::Building;
                slot.records = 0;
                slot.segs.clear();
                slot.err = None;
                slot.notifs = 0;
                self.building = Some(s);
                return Ok(s);
            }
            self.wait_step()?;
        }
    }

    fn idle(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.state == SlotState::Free || s.state == SlotState::Building)
    }

    fn flush(&mut self) -> Result<(), Error> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        if self.broken {
            return Err(Error::Broken);
        }
        self.launch()?;
        while !self.idle() {
            self.wait_step()?;
        }
        Ok(())
    }

    fn send(&mut self, map: &GuestMap, records: &[OutRecord<'_>]) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        // Check every record before anything of the batch is queued.
        for (i, rec) in records.iter().enumerate() {
            if let Payload::Guest {
                region,
                offset,
                len,
            } = rec.payload
            {
                map.check(region, offset, len)
                    .map_err(|range| Error::SendOutOfRange { index: i, range })?;
            }
        }
        let mut borrowed = false;
        for (i, rec) in records.iter().enumerate() {
            borrowed |= matches!(rec.payload, Payload::Bytes(b) if !b.is_empty());
            let mut s = self.building_slot()?;
            let full = {
                let slot = &self.slots[s];
                slot.records == SLOT_RECORDS || slot.segs.len() + seg_count(rec) > SLOT_SEGS
            };
            if full {
                self.launch()?;
                s = self.building_slot()?;
            }
            let slot = &mut self.slots[s];
            let at = (s * SLOT_RECORDS + slot.records) * HEADER_LEN;
            let Some(dst) = self.slab.get_mut(at..at + HEADER_LEN) else {
                return Err(Error::Broken);
            };
            dst.copy_from_slice(&rec.header);
            let hp = dst.as_ptr();
            slot.records += 1;
            push_record(map, i, rec, hp, &mut slot.segs)?;
        }
        self.launch()?;
        if borrowed {
            self.flush()?;
        }
        Ok(())
    }

    /// Submits one receive operation and waits for its result.
    fn recv_op(&mut self, e: squeue::Entry) -> io::Result<usize> {
        self.recv_result = None;
        {
            let mut sq = self.ring.submission();
            // SAFETY: the destination (staging buffer, checked guest range or caller buffer)
            // stays valid until the result is reaped below, before this function returns.
            unsafe { sq.push(&e.user_data(RECV_TAG)) }
                .map_err(|_| io::Error::other("the submission queue is full"))?;
        }
        loop {
            self.reap(true)?;
            if let Some(r) = self.recv_result.take() {
                // Keep sends moving while we read; a send error is reported by the next send.
                if let Err(e) = self.advance() {
                    self.deferred.get_or_insert(e);
                }
                if r < 0 {
                    let e = io::Error::from_raw_os_error(-r);
                    if e.kind() == io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                    return Err(e);
                }
                return Ok(r as usize);
            }
        }
    }
}

impl RawRead for Engine {
    fn read_staging(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        let e = opcode::ReadFixed::new(types::Fd(self.fd), dst, len as u32, STAGING_IDX)
            .offset(0)
            .build();
        self.recv_op(e)
    }

    fn read_full(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        let mut done = 0;
        while done < len {
            let p = dst.wrapping_add(done);
            let want = (len - done).min(1 << 30) as u32;
            let e = opcode::Recv::new(types::Fd(self.fd), p, want)
                .flags(libc::MSG_WAITALL)
                .build();
            let n = self.recv_op(e)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

impl Channel for UringChannel {
    fn send(&mut self, records: &[OutRecord<'_>]) -> Result<(), Error> {
        self.engine.send(&self.map, records)
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.engine.flush()
    }

    fn recv<D: Decoder>(
        &mut self,
        decoder: &mut D,
        buf: &mut [u8],
    ) -> Result<Option<Received>, Error> {
        self.receiver
            .recv(&mut self.engine, &self.map, decoder, buf)
    }

    fn name(&self) -> &'static str {
        if self.engine.zero_copy {
            "io_uring SEND_ZC"
        } else {
            "io_uring"
        }
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        let e = &mut self.engine;
        if e.idle() && e.in_flight.is_none() {
            // SAFETY: nothing is in flight and the ring is never used again.
            unsafe { core::mem::ManuallyDrop::drop(&mut e.ring) };
            return;
        }
        // Operations still reference the slab and guest memory: make them fail fast, then wait
        // (bounded) for every completion and notification before the buffers are freed.
        let _ = self.stream.shutdown();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let busy = |e: &Engine| e.slots.iter().any(|s| s.pending > 0 || s.notifs > 0);
        while busy(e) && std::time::Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = e.ring.submitter().submit_with_args(1, &args);
            if e.reap(false).is_err() {
                break;
            }
        }
        if busy(e) {
            // The kernel may still touch these buffers: leak them, and the ring, rather than
            // free them early.
            std::mem::forget(std::mem::take(&mut e.slab));
            std::mem::forget(std::mem::take(&mut e.slots));
        } else {
            // SAFETY: every operation completed and the ring is never used again.
            unsafe { core::mem::ManuallyDrop::drop(&mut e.ring) };
        }
    }
}
