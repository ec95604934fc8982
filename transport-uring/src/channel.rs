//! The channel abstraction shared by both transports, and sets of channels.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::Error;
use crate::memory::MemRegion;
use crate::probe::ProbeReport;
use crate::record::{Decoder, OutRecord, Received};
use crate::std_net::StdChannel;
use crate::uring::{UringChannel, UringConfig};

/// A connected stream socket a channel runs over.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain stream socket.
    Unix(UnixStream),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl Stream {
    /// The socket's file descriptor.
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Shuts both directions of the socket down (the peer sees end of stream).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// Blocking mode, and no Nagle delay on TCP (batches are large; urgent records are not).
    pub(crate) fn prepare(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)
            }
            Stream::Unix(s) => s.set_nonblocking(false),
        }
    }

    /// Takes over a connected stream socket passed in as a file descriptor
    /// (TCP over IPv4 or IPv6, or Unix). Fails, closing nothing but `fd`,
    /// when it is not a stream socket of one of those families.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Stream> {
        let raw = fd.as_raw_fd();
        let sock_type = sockopt_int(raw, libc::SO_TYPE)?;
        if sock_type != libc::SOCK_STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file descriptor {raw} is not a stream socket (type {sock_type})"),
            ));
        }
        match sockopt_int(raw, libc::SO_DOMAIN)? {
            libc::AF_INET | libc::AF_INET6 => Ok(Stream::Tcp(TcpStream::from(fd))),
            libc::AF_UNIX => Ok(Stream::Unix(UnixStream::from(fd))),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file descriptor {raw} is a socket of family {other}, not TCP or Unix"),
            )),
        }
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Sets a read timeout (`None` blocks).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An integer socket option of `fd`.
fn sockopt_int(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a live c_int,
    // and updates `len`; `fd` is a descriptor the caller owns.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One direction-agnostic record channel: the same API carries the stream (source to
/// destination) and the return path (destination to source).
pub trait Channel {
    /// Queues `records` for sending and submits them. Guest payloads go out straight from
    /// registered memory; a batch may still be in flight when this returns (call
    /// [`Channel::flush`] to wait), except when it holds [`crate::Payload::Bytes`] payloads,
    /// which are sent completely before this returns. Records are sent in order, and after
    /// every record of earlier calls.
    fn send(&mut self, records: &[OutRecord<'_>]) -> Result<(), Error>;

    /// Waits until everything sent has left (for zero-copy sends: until the kernel released
    /// every buffer).
    fn flush(&mut self) -> Result<(), Error>;

    /// Receives one record: the header is read and handed to `decoder`, whose placement is
    /// checked (a guest range against the channel's regions, a buffer length against `buf`)
    /// before the payload is read into place. `Ok(None)` when the peer closed the stream at a
    /// record boundary. After an error the channel is unusable.
    fn recv<D: Decoder>(
        &mut self,
        decoder: &mut D,
        buf: &mut [u8],
    ) -> Result<Option<Received>, Error>;

    /// The transport's name, for reports.
    fn name(&self) -> &'static str;

    /// The socket underneath.
    fn stream(&self) -> &Stream;
}

/// Which transport to build.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    /// io_uring with the given configuration.
    Uring(UringConfig),
    /// Plain blocking `std::net` sockets.
    Std(crate::recv::RecvStrategy),
}

/// A channel of either transport.
// Channels are few and long-lived (one per socket): the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyChannel {
    /// io_uring.
    Uring(UringChannel),
    /// Blocking std.
    Std(StdChannel),
    /// Inside TLS 1.3 records.
    #[cfg(feature = "tls")]
    Tls(crate::tls::TlsChannel),
}

impl AnyChannel {
    /// Builds a channel of the requested transport; io_uring falls back to the std transport
    /// when the probe found io_uring unavailable.
    pub fn new(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        transport: Transport,
        probe: &ProbeReport,
    ) -> Result<Self, Error> {
        Self::new_sharing(stream, regions, transport, probe, None)
    }

    /// As [`AnyChannel::new`]; an io_uring channel built beside `share` (another io_uring
    /// channel over the same regions, e.g. the first bulk channel) clones its registration
    /// of guest memory instead of pinning it again ([`UringChannel::new_sharing`]).
    pub fn new_sharing(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        transport: Transport,
        probe: &ProbeReport,
        share: Option<&AnyChannel>,
    ) -> Result<Self, Error> {
        let share = match share {
            Some(AnyChannel::Uring(u)) => Some(u),
            _ => None,
        };
        match transport {
            Transport::Uring(cfg) if probe.io_uring.is_ok() => Ok(AnyChannel::Uring(
                UringChannel::new_sharing(stream, regions, cfg, probe, share)?,
            )),
            Transport::Uring(cfg) => Ok(AnyChannel::Std(StdChannel::new(
                stream,
                regions,
                cfg.staging_len,
                cfg.recv,
            )?)),
            Transport::Std(strategy) => Ok(AnyChannel::Std(StdChannel::new(
                stream,
                regions,
                256 << 10,
                strategy,
            )?)),
        }
    }
}

#[cfg(feature = "tls")]
impl AnyChannel {
    /// Builds a channel whose records travel inside TLS records under `protection` (the
    /// transport's own sends and receives; io_uring is not used).
    pub fn protected(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        protection: crate::tls::Protection,
    ) -> Result<Self, Error> {
        Ok(AnyChannel::Tls(crate::tls::TlsChannel::new(
            stream, regions, protection,
        )?))
    }
}

impl Channel for AnyChannel {
    fn send(&mut self, records: &[OutRecord<'_>]) -> Result<(), Error> {
        match self {
            AnyChannel::Uring(c) => c.send(records),
            AnyChannel::Std(c) => c.send(records),
            #[cfg(feature = "tls")]
            AnyChannel::Tls(c) => c.send(records),
        }
    }

    fn flush(&mut self) -> Result<(), Error> {
        match self {
            AnyChannel::Uring(c) => c.flush(),
            AnyChannel::Std(c) => c.flush(),
            #[cfg(feature = "tls")]
            AnyChannel::Tls(c) => c.flush(),
        }
    }

    fn recv<D: Decoder>(
        &mut self,
        decoder: &mut D,
        buf: &mut [u8],
    ) -> Result<Option<Received>, Error> {
        match self {
            AnyChannel::Uring(c) => c.recv(decoder, buf),
            AnyChannel::Std(c) => c.recv(decoder, buf),
            #[cfg(feature = "tls")]
            AnyChannel::Tls(c) => c.recv(decoder, buf),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            AnyChannel::Uring(c) => c.name(),
            AnyChannel::Std(c) => c.name(),
            #[cfg(feature = "tls")]
            AnyChannel::Tls(c) => c.name(),
        }
    }

    fn stream(&self) -> &Stream {
        match self {
            AnyChannel::Uring(c) => c.stream(),
            AnyChannel::Std(c) => c.stream(),
            #[cfg(feature = "tls")]
            AnyChannel::Tls(c) => c.stream(),
        }
    }
}

/// Pages per stripe when page ranges are shared out over bulk channels (2 MiB of 4 KiB pages).
pub const STRIPE_PAGES: u64 = 512;

/// The bulk channel (of `n`) that carries `page`: pages are dealt out in stripes of
/// [`STRIPE_PAGES`], so a run split at stripe boundaries keeps each piece on one channel.
pub fn bulk_channel_for(page: u64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((page / STRIPE_PAGES) % n as u64) as usize
}

/// Splits the page run `first..first + count` at stripe boundaries: yields
/// `(channel, first, count)` pieces for `n` bulk channels.
pub fn share_out(first: u64, count: u64, n: usize) -> impl Iterator<Item = (usize, u64, u64)> {
    let end = first.saturating_add(count);
    let mut at = first;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let stripe_end = (at / STRIPE_PAGES + 1) * STRIPE_PAGES;
        let piece_end = stripe_end.min(end);
        let r = (bulk_channel_for(at, n), at, piece_end - at);
        at = piece_end;
        Some(r)
    })
}

/// Magic opening every connection of a channel set.
const HELLO_MAGIC: [u8; 3] = *b"FRY";
/// Role byte of bulk connections.
const ROLE_BULK: u8 = 0;
/// Role byte of the urgent connection.
const ROLE_URGENT: u8 = 1;

/// N bulk channels sharing out page ranges, plus one urgent channel (postcopy page requests
/// and replies) that never queues behind bulk data.
#[derive(Debug)]
pub struct ChannelSet<C> {
    /// Bulk channels, by index.
    pub bulk: Vec<C>,
    /// The urgent channel.
    pub urgent: C,
}

impl<C> ChannelSet<C> {
    /// Opens `n_bulk + 1` connections with `connect`, introduces each to the peer, and builds
    /// the channels with `make`.
    pub fn connect(
        n_bulk: usize,
        mut connect: impl FnMut() -> io::Result<Stream>,
        mut make: impl FnMut(Stream) -> Result<C, Error>,
    ) -> Result<Self, Error> {
        let n = u16::try_from(n_bulk)
            .map_err(|_| Error::Handshake(format!("{n_bulk} bulk channels are too many")))?;
        let mut bulk = Vec::with_capacity(n_bulk);
        let mut urgent = None;
        for i in 0..=n {
            let mut s = connect().map_err(Error::Socket)?;
            let role = if i == n { ROLE_URGENT } else { ROLE_BULK };
            let mut hello = [0u8; 8];
            hello[..3].copy_from_slice(&HELLO_MAGIC);
            hello[3] = role;
            hello[4..6].copy_from_slice(&i.to_le_bytes());
            hello[6..8].copy_from_slice(&n.to_le_bytes());
            s.write_all(&hello).map_err(Error::Socket)?;
            let c = make(s)?;
            if role == ROLE_URGENT {
                urgent = Some(c);
            } else {
                bulk.push(c);
            }
        }
        let urgent =
            urgent.ok_or_else(|| Error::Handshake("no urgent channel was opened".into()))?;
        Ok(Self { bulk, urgent })
    }

    /// Accepts `n_bulk + 1` connections with `accept`, sorts them by the peer's introduction,
    /// and builds the channels with `make`.
    pub fn accept(
        n_bulk: usize,
        mut accept: impl FnMut() -> io::Result<Stream>,
        mut make: impl FnMut(Stream) -> Result<C, Error>,
    ) -> Result<Self, Error> {
        let mut slots: Vec<Option<Stream>> = (0..n_bulk).map(|_| None).collect();
        let mut urgent = None;
        for _ in 0..=n_bulk {
            let mut s = accept().map_err(Error::Socket)?;
            let mut hello = [0u8; 8];
            s.read_exact(&mut hello).map_err(Error::Socket)?;
            let idx = u16::from_le_bytes([hello[4], hello[5]]) as usize;
            let count = u16::from_le_bytes([hello[6], hello[7]]) as usize;
            if hello[..3] != HELLO_MAGIC || count != n_bulk {
                return Err(Error::Handshake(format!(
                    "a connection introduced itself as {hello:02x?}, expected one of {n_bulk} bulk channels or the urgent one"
                )));
            }
            match hello[3] {
                ROLE_URGENT if urgent.is_none() => urgent = Some(s),
                ROLE_BULK if idx < n_bulk && slots[idx].is_none() => slots[idx] = Some(s),
                _ => {
                    return Err(Error::Handshake(format!(
                        "duplicate or unknown channel role {} index {idx}",
                        hello[3]
                    )))
                }
            }
        }
        let mut bulk = Vec::with_capacity(n_bulk);
        for s in slots {
            let s = s.ok_or_else(|| Error::Handshake("a bulk channel is missing".into()))?;
            bulk.push(make(s)?);
        }
        let urgent =
            urgent.ok_or_else(|| Error::Handshake("the urgent channel is missing".into()))?;
        Ok(Self {
            bulk,
            urgent: make(urgent)?,
        })
    }

    /// The bulk channel that carries `page`.
    pub fn bulk_for(&mut self, page: u64) -> Option<&mut C> {
        let i = bulk_channel_for(page, self.bulk.len());
        self.bulk.get_mut(i)
    }
}
