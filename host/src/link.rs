//! The connections of a migration and what flows over them besides pages:
//! the handshake, the return path, and the decoder that tells the transport
//! where each received payload belongs.
//!
//! A migration uses one *control* connection and `N` *bulk* connections, all
//! opened by the source in that order. The control connection carries the
//! handshake, device sections, switchover markers and resent pages from
//! source to destination, and the return path (accept, resend requests,
//! *ready*, errors) back. Bulk connections carry page runs and zero runs only.
//! A page always travels on the same bulk connection (pages are striped by
//! address), so a newer copy never overtakes an older one (nor its discard).
//!
//! With postcopy-ram negotiated the source opens one more connection, the
//! *urgent* one, last: page requests go from destination to source and the
//! requested page runs back, never queued behind bulk data.
//!
//! Where the connections come from is the caller's choice. A [`Connector`]
//! gives the source a stream per [`ChannelRole`] and an [`Acceptor`] gives the
//! destination one: an [`Endpoint`] dials, a [`Listener`] accepts, and
//! [`Connected`] hands out streams that management software opened itself
//! (TCP, Unix, or raw file descriptors passed to the process).

// `Negotiated` and `Hello` are `Copy` in current ferry-core; the clones
// below stay correct whether or not they are.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_core::session::DestinationSession;
use ferry_core::wire::{
    self, Hello, Negotiated, Record, ReturnDecoder, ReturnRecord, ReturnRepr, HEADER_LEN,
    MAX_HELLO_LEN,
};
use ferry_uring::{Decoder, Placement};

/// TCP keepalive on every connection: first probe after this many idle seconds.
pub const KEEPALIVE_IDLE_S: libc::c_int = 10;
/// Seconds between keepalive probes.
pub const KEEPALIVE_INTERVAL_S: libc::c_int = 5;
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_COUNT: libc::c_int = 3;
/// TCP_USER_TIMEOUT on every connection: data unacknowledged (or a zero
/// window never reopened) for this long ends the connection.
pub const USER_TIMEOUT_MS: libc::c_int = 30_000;

/// Pages per stripe: a page's bulk channel is `(page / STRIPE_PAGES) % N`.
pub const STRIPE_PAGES: u64 = 512;

/// The bulk channel that carries `page`.
pub fn channel_of(page: u64, channels: usize) -> usize {
    if channels <= 1 {
        0
    } else {
        ((page / STRIPE_PAGES) % channels as u64) as usize
    }
}

/// Errors of the connections and the handshake.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting or accepting failed.
    #[error("could not {what} {endpoint}: {source}")]
    Connect {
        /// "connect to", "listen on" or "accept on".
        what: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The system's error.
        source: io::Error,
    },
    /// Reading or writing the control connection failed.
    #[error("the control connection failed while {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// The peer's hello was malformed or incompatible.
    #[error("the handshake failed: {0}")]
    Handshake(wire::HandshakeError),
    /// The destination refused the migration.
    #[error("the destination refused the migration: {code:?} (detail {detail})")]
    Refused {
        /// The destination's reason.
        code: wire::ErrorCode,
        /// Its detail field.
        detail: u64,
    },
    /// The peer sent a record that makes no sense at this point.
    #[error("the peer sent an unexpected record during the handshake: {0:?}")]
    Unexpected(ReturnRepr),
    /// A return-path record did not decode.
    #[error("the return path is corrupt: {0}")]
    Decode(wire::DecodeError),
    /// The caller's [`Connected`] set has no stream for a channel the
    /// migration needs.
    #[error("no connection was given for the {channel} channel")]
    MissingChannel {
        /// The channel.
        channel: ChannelRole,
    },
    /// Encoding a record failed (a bug: the record was built wrong).
    #[error("could not encode a record: {0}")]
    Emit(wire::EmitError),
    /// The source did not open a channel of the migration within a bound.
    #[error("the source did not open the {channel} channel within {after_ms} ms")]
    AcceptTimeout {
        /// The channel awaited.
        channel: ChannelRole,
        /// The bound, in milliseconds.
        after_ms: u64,
    },
    /// The peer said nothing within a bound.
    #[error("the peer sent nothing while {what} for {after_ms} ms, the bound on that wait")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The bound, in milliseconds.
        after_ms: u64,
    },
    /// The source asked for payload checksums off, which this side refuses.
    #[error("the source asked to send payloads without checksums, which is refused")]
    ChecksumsRequired,
    /// The source asked for more channels than this side serves.
    #[error("the source asked for {asked} channels, more than the {limit} this side serves")]
    TooManyChannels {
        /// Channels asked for, control included.
        asked: u16,
        /// The limit this side stated.
        limit: u16,
    },
    /// A hello named a session to resume that this side does not hold, or a
    /// new migration's hello reached a side that holds a guest for a resume.
    #[error("the source's hello resumes session {asked:#010x}, but this side holds {held}")]
    WrongSession {
        /// The session the hello named (0: a new migration).
        asked: u32,
        /// What this side holds, for the message.
        held: &'static str,
    },
    /// TLS refused or failed on a connection.
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Where a destination listens and a source connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A string that names no endpoint.
#[derive(Debug, thiserror::Error)]
#[error("'{input}' is neither unix:PATH nor HOST:PORT: {source}")]
pub struct EndpointParseError {
    /// The string.
    pub input: String,
    /// Why it is no TCP address.
    pub source: std::net::AddrParseError,
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointParseError;

    /// `unix:PATH`, `tcp:HOST:PORT` or plain `HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, EndpointParseError> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        let a = s.strip_prefix("tcp:").unwrap_or(s);
        a.parse::<SocketAddr>()
            .map(Endpoint::Tcp)
            .map_err(|source| EndpointParseError {
                input: s.to_string(),
                source,
            })
    }
}

/// A connected stream socket (TCP or Unix): the one socket type of Ferry,
/// shared with the transport.
pub use ferry_uring::Stream as Conn;

/// Sets what every TCP connection of a migration needs: no Nagle delay, and
/// keepalive and `TCP_USER_TIMEOUT`, so that a peer that vanishes or stops
/// acknowledging (a pulled cable, a frozen host) ends the connection within a
/// bound instead of leaving a send or a receive blocked for good.
fn tune(conn: &Conn) {
    if let Conn::Tcp(s) = conn {
        let _ = s.set_nodelay(true);
        let fd = s.as_raw_fd();
        let opts = [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_COUNT),
            (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, USER_TIMEOUT_MS),
        ];
        for (level, name, value) in opts {
            // SAFETY: setsockopt on a socket this connection owns, with a
            // pointer to a live c_int and its exact size.
            unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// Connects to `endpoint`.
pub fn connect(endpoint: &Endpoint) -> Result<Conn, LinkError> {
    let err = |source| LinkError::Connect {
        what: "connect to",
        endpoint: endpoint.to_string(),
        source,
    };
    let c = match endpoint {
        Endpoint::Tcp(a) => Conn::Tcp(TcpStream::connect(a).map_err(err)?),
        Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p).map_err(err)?),
    };
    tune(&c);
    Ok(c)
}

/// One connection of a migration, in the order the source opens them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelRole {
    /// The control connection: handshake, sections, markers, return path.
    Control,
    /// Bulk connection `n` (from 0): page and zero runs.
    Bulk(usize),
    /// The urgent connection (postcopy-ram only): page requests and replies.
    Urgent,
}

impl std::fmt::Display for ChannelRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelRole::Control => write!(f, "control"),
            ChannelRole::Bulk(n) => write!(f, "bulk {n}"),
            ChannelRole::Urgent => write!(f, "urgent"),
        }
    }
}

/// A bulk connection as a [`Connector`] or [`Acceptor`] opened it: the
/// stream, and, when TLS protects it, the keys its handshake negotiated, which
/// the channel built on it applies itself (no relay in between).
#[derive(Debug)]
pub struct DataConn {
    conn: Conn,
    #[cfg(feature = "tls")]
    protection: Option<ferry_uring::tls::Protection>,
}

impl DataConn {
    /// A stream that carries the migration's records as they are.
    pub fn plain(conn: Conn) -> DataConn {
        DataConn {
            conn,
            #[cfg(feature = "tls")]
            protection: None,
        }
    }

    /// A stream whose records travel in TLS records under `tx` and `rx`.
    #[cfg(feature = "tls")]
    pub fn protected(
        conn: Conn,
        tx: ferry_uring::tls::Direction,
        rx: ferry_uring::tls::Direction,
    ) -> DataConn {
        DataConn {
            conn,
            protection: Some(ferry_uring::tls::Protection { tx, rx }),
        }
    }

    /// The socket.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The channel for this connection: the requested transport, or the TLS
    /// record channel when the connection is protected.
    pub fn into_channel(
        self,
        regions: &[ferry_uring::MemRegion],
        transport: ferry_uring::Transport,
        probe: &ferry_uring::ProbeReport,
        share: Option<&ferry_uring::AnyChannel>,
    ) -> Result<ferry_uring::AnyChannel, ferry_uring::Error> {
        #[cfg(feature = "tls")]
        if let Some(p) = self.protection {
            return ferry_uring::AnyChannel::protected(self.conn, regions, p);
        }
        ferry_uring::AnyChannel::new_sharing(self.conn, regions, transport, probe, share)
    }

    /// The connection as a reading half and a writing half, each for a
    /// thread of its own (the urgent connection): the socket itself, or,
    /// when the connection is protected, halves that open and seal TLS
    /// records as they go.
    pub fn into_halves(self) -> io::Result<(ReadHalf, WriteHalf)> {
        #[cfg(feature = "tls")]
        if let Some(p) = self.protection {
            let (r, w) = crate::tls::direct::halves(self.conn, p)?;
            return Ok((Box::new(r), Box::new(w)));
        }
        Ok((Box::new(self.conn.try_clone()?), Box::new(self.conn)))
    }
}

/// The reading half of a connection ([`DataConn::into_halves`]).
pub type ReadHalf = Box<dyn Read + Send>;

/// The writing half of a connection ([`DataConn::into_halves`]).
pub type WriteHalf = Box<dyn Write + Send>;

/// Where the source's connections come from: one stream per [`ChannelRole`],
/// asked for in order (control, bulk 0.., urgent).
pub trait Connector {
    /// The stream for `channel`.
    fn connect(&mut self, channel: ChannelRole) -> Result<Conn, LinkError>;

    /// The bulk connection `channel`; a connector that protects its
    /// connections hands the keys over with it.
    fn connect_data(&mut self, channel: ChannelRole) -> Result<DataConn, LinkError> {
        self.connect(channel).map(DataConn::plain)
    }

    /// How many bulk connections this connector has, when it decides that
    /// itself (streams handed in); `None` when it can open any number.
    fn bulk_channels(&self) -> Option<usize> {
        None
    }
}

/// Where the destination's connections come from: one stream per
/// [`ChannelRole`], asked for in the order the source opens them.
pub trait Acceptor {
    /// The stream for `channel`.
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError>;

    /// The stream for `channel`, waiting at most `bound` for it (the
    /// migration's data channels: a source that went away after the hello
    /// must not leave the destination waiting for good). Streams handed in
    /// ready-made are there at once.
    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        let _ = bound;
        self.accept(channel)
    }

    /// The bulk connection `channel`, within `bound`; an acceptor that
    /// protects its connections hands the keys over with it.
    fn accept_data_within(
        &mut self,
        channel: ChannelRole,
        bound: Duration,
    ) -> Result<DataConn, LinkError> {
        self.accept_within(channel, bound).map(DataConn::plain)
    }
}

impl Connector for Endpoint {
    fn connect(&mut self, _channel: ChannelRole) -> Result<Conn, LinkError> {
        connect(self)
    }
}

impl Connector for &Endpoint {
    fn connect(&mut self, _channel: ChannelRole) -> Result<Conn, LinkError> {
        connect(self)
    }
}

impl Acceptor for Listener {
    fn accept(&mut self, _channel: ChannelRole) -> Result<Conn, LinkError> {
        Listener::accept(self)
    }

    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        Listener::accept_within(self, channel, bound)
    }
}

impl Acceptor for &Listener {
    fn accept(&mut self, _channel: ChannelRole) -> Result<Conn, LinkError> {
        Listener::accept(self)
    }

    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        Listener::accept_within(self, channel, bound)
    }
}

/// Streams the caller connected itself, for either side of a migration:
/// management software that owns the sockets (or passes file descriptors
/// into the process) hands them in here.
///
/// The source uses as many bulk connections as were given; the destination
/// needs as many as the source offers. The urgent connection is needed only
/// when postcopy-ram is negotiated.
#[derive(Debug)]
pub struct Connected {
    control: Option<Conn>,
    bulk: Vec<Option<Conn>>,
    urgent: Option<Conn>,
}

impl Connected {
    /// A set with its control connection.
    pub fn new(control: Conn) -> Connected {
        Connected {
            control: Some(control),
            bulk: Vec::new(),
            urgent: None,
        }
    }

    /// Adds the next bulk connection.
    pub fn with_bulk(mut self, conn: Conn) -> Connected {
        self.bulk.push(Some(conn));
        self
    }

    /// Sets the urgent connection (postcopy-ram).
    pub fn with_urgent(mut self, conn: Conn) -> Connected {
        self.urgent = Some(conn);
        self
    }

    fn take(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        let slot = match channel {
            ChannelRole::Control => self.control.take(),
            ChannelRole::Bulk(n) => self.bulk.get_mut(n).and_then(Option::take),
            ChannelRole::Urgent => self.urgent.take(),
        };
        let conn = slot.ok_or(LinkError::MissingChannel { channel })?;
        tune(&conn);
        Ok(conn)
    }
}

impl Connector for Connected {
    fn connect(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        self.take(channel)
    }

    fn bulk_channels(&self) -> Option<usize> {
        Some(self.bulk.len())
    }
}

impl Acceptor for Connected {
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        self.take(channel)
    }
}

/// A listening socket for a destination.
#[derive(Debug)]
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a Unix socket path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `endpoint` (a stale Unix socket file is replaced).
    pub fn bind(endpoint: &Endpoint) -> Result<Listener, LinkError> {
        let err = |source| LinkError::Connect {
            what: "listen on",
            endpoint: endpoint.to_string(),
            source,
        };
        match endpoint {
            Endpoint::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp).map_err(err),
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(err)
            }
        }
    }

    /// The endpoint actually bound (with the port the kernel chose for `:0`).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Listener::Unix(_, p) => Ok(Endpoint::Unix(p.clone())),
        }
    }

    /// Accepts one connection.
    pub fn accept(&self) -> Result<Conn, LinkError> {
        let err = |source| LinkError::Connect {
            what: "accept on",
            endpoint: self
                .local_endpoint()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            source,
        };
        let c = match self {
            Listener::Tcp(l) => Conn::Tcp(l.accept().map_err(err)?.0),
            Listener::Unix(l, _) => Conn::Unix(l.accept().map_err(err)?.0),
        };
        tune(&c);
        Ok(c)
    }

    /// Accepts the connection for `channel`, waiting at most `bound`.
    pub fn accept_within(&self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(bound.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: one valid pollfd, alive for the call, on a listening
            // socket this listener owns.
            let rc = unsafe { libc::poll(&mut p, 1, ms) };
            match rc {
                0 => {
                    return Err(LinkError::AcceptTimeout {
                        channel,
                        after_ms: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
                    })
                }
                r if r > 0 => return self.accept(),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(LinkError::Io {
                            what: "waiting for a connection",
                            source: e,
                        });
                    }
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> LinkError {
    move |source| LinkError::Io { what, source }
}

/// Fills `buf` from `conn` before `deadline`, however the peer spreads its
/// bytes: the socket's receive timeout is set to what is left before every
/// read, so a peer that trickles cannot stretch the wait. Running out of
/// time is [`LinkError::Timeout`] naming `what` and `bound`; the timeout is
/// cleared afterwards.
fn read_exact_by(
    conn: &mut Conn,
    buf: &mut [u8],
    deadline: Instant,
    bound: Duration,
    what: &'static str,
) -> Result<(), LinkError> {
    let timeout = || LinkError::Timeout {
        what,
        after_ms: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
    };
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout());
        }
        conn.set_read_timeout(Some(left))
            .map_err(io_err("setting a timeout"))?;
        match conn.read(&mut buf[at..]) {
            Ok(0) => {
                return Err(LinkError::Io {
                    what,
                    source: io::ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout())
            }
            Err(source) => return Err(LinkError::Io { what, source }),
        }
    }
    conn.set_read_timeout(None)
        .map_err(io_err("clearing a timeout"))
}

/// Source side of the handshake: sends our hello, waits at most `timeout` for
/// *accept* (or the destination's refusal) on the return path. Returns what
/// was negotiated, the return-path decoder, which has consumed the *accept*,
/// and the *accept* itself (the destination's limits, for the session).
pub fn source_handshake(
    ctl: &mut Conn,
    hello: &Hello,
    timeout: Duration,
) -> Result<(Negotiated, ReturnDecoder, ReturnRepr), LinkError> {
    let mut buf = [0u8; MAX_HELLO_LEN];
    let n = hello.emit(&mut buf).map_err(LinkError::Emit)?;
    let deadline = Instant::now() + timeout;
    ctl.write_all(&buf[..n])
        .map_err(io_err("sending the hello"))?;
    // The destination negotiates against its own hello; ours is what both
    // sides use (the destination refuses anything it cannot honour).
    let neg = hello.negotiate(hello).map_err(LinkError::Handshake)?;
    let mut dec = ReturnDecoder::new(neg);
    // The answer is one return record: its header, whole, within the bound.
    let mut hdr = [0u8; HEADER_LEN];
    read_exact_by(
        ctl,
        &mut hdr,
        deadline,
        timeout,
        "waiting for the destination's answer to the hello",
    )?;
    let rec = match dec.step(&hdr).map_err(LinkError::Decode)? {
        (_, Some(rec)) => rec,
        (_, None) => {
            return Err(LinkError::Io {
                what: "decoding the destination's answer to the hello",
                source: io::ErrorKind::InvalidData.into(),
            })
        }
    };
    match rec.repr {
        accept @ ReturnRepr::Accept { .. } => Ok((neg, dec, accept)),
        ReturnRepr::Error { code, detail } => Err(LinkError::Refused { code, detail }),
        other => Err(LinkError::Unexpected(other)),
    }
}

/// Destination side of the handshake: reads the source's hello (waiting at
/// most the session's handshake bound), checks it against ours (the layout
/// must match exactly, payload checksums must be on) and against the
/// session's limits, and answers *accept* with those limits, or an error
/// naming the reason. Returns what was negotiated.
pub fn destination_handshake(
    ctl: &mut Conn,
    ours: &Hello,
    ret: &ReturnWriter,
    session: &mut DestinationSession,
) -> Result<Negotiated, LinkError> {
    // Every refusal of the hello tells the source why before it returns.
    let refuse = |e: LinkError| {
        let _ = ret.send(&ReturnRepr::Error {
            code: wire::ErrorCode::Handshake,
            detail: 0,
        });
        e
    };
    let mut buf = [0u8; MAX_HELLO_LEN];
    let len = read_hello(ctl, &mut buf, session.timeouts().handshake).map_err(refuse)?;
    let theirs = Hello::parse(&buf[..len]);
    let resume = theirs.as_ref().map(|h| h.resume).unwrap_or(0);
    // We serve any number of channels the source opens, up to the wire's
    // limit: take its count as ours.
    let neg = theirs.and_then(|h| {
        let ours = Hello {
            caps: wire::Capabilities {
                channels: h.caps.channels,
                ..ours.caps
            },
            ..*ours
        };
        h.negotiate(&ours)
    });
    let now = crate::migration::monotonic_ns();
    match neg {
        Ok(neg) if !neg.caps.payload_checksums => Err(refuse(LinkError::ChecksumsRequired)),
        Ok(neg) => {
            let accepted = if resume != 0 || session.is_resume() {
                session.accept_resume(now, neg.caps.channels, resume)
            } else {
                session.accept_hello(now, neg.caps.channels, neg.caps.postcopy_ram)
            };
            while let Some(c) = session.poll_transmit() {
                ret.send(&c.repr()).map_err(io_err("answering the hello"))?;
            }
            match accepted {
                Ok(()) => Ok(neg),
                Err(e) if e.failure == ferry_core::session::Failure::WrongSession => {
                    Err(LinkError::WrongSession {
                        asked: resume,
                        held: if session.is_resume() {
                            "another session's interrupted postcopy"
                        } else {
                            "no interrupted postcopy"
                        },
                    })
                }
                Err(_) => Err(LinkError::TooManyChannels {
                    asked: neg.caps.channels,
                    limit: session.limits().max_channels,
                }),
            }
        }
        Err(e) => Err(refuse(LinkError::Handshake(e))),
    }
}

/// Reads one hello record (header, then the payload its header announces)
/// into `buf`, all of it within `bound_ns` however the source spreads its
/// bytes; returns its length.
fn read_hello(
    ctl: &mut Conn,
    buf: &mut [u8; MAX_HELLO_LEN],
    bound_ns: u64,
) -> Result<usize, LinkError> {
    let bound = Duration::from_nanos(bound_ns.max(1));
    let deadline = Instant::now() + bound;
    let what = "waiting for the source's hello";
    read_exact_by(ctl, &mut buf[..HEADER_LEN], deadline, bound, what)?;
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let rest = Hello::payload_len(&header).map_err(LinkError::Handshake)?;
    read_exact_by(
        ctl,
        &mut buf[HEADER_LEN..HEADER_LEN + rest],
        deadline,
        bound,
        what,
    )?;
    Ok(HEADER_LEN + rest)
}

/// Why reading a return-path record failed.
#[derive(Debug)]
pub enum ReturnReadError {
    /// The connection failed or closed.
    Io(io::Error),
    /// The bytes did not decode.
    Decode(wire::DecodeError),
}

/// Reads one return-path record, a byte-exact header at a time.
pub fn read_return<R: Read + ?Sized>(
    conn: &mut R,
    dec: &mut ReturnDecoder,
) -> Result<ReturnRecord, ReturnReadError> {
    let mut hdr = [0u8; HEADER_LEN];
    loop {
        conn.read_exact(&mut hdr).map_err(ReturnReadError::Io)?;
        let mut at = 0;
        while at < hdr.len() {
            let (used, rec) = dec.step(&hdr[at..]).map_err(ReturnReadError::Decode)?;
            at += used;
            if let Some(r) = rec {
                return Ok(r);
            }
            if used == 0 {
                break;
            }
        }
    }
}

/// The destination's side of the return path: any thread may send on it.
#[derive(Clone)]
pub struct ReturnWriter {
    inner: Arc<Mutex<(WriteHalf, u32)>>,
}

impl std::fmt::Debug for ReturnWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReturnWriter").finish_non_exhaustive()
    }
}

impl ReturnWriter {
    /// Writes return records on `conn` (a socket, or the writing half of a
    /// protected connection).
    pub fn new(conn: impl Write + Send + 'static) -> ReturnWriter {
        ReturnWriter {
            inner: Arc::new(Mutex::new((Box::new(conn), 0))),
        }
    }

    /// Sends one record.
    pub fn send(&self, repr: &ReturnRepr) -> io::Result<()> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("the return path lock was poisoned"))?;
        let (conn, seq) = &mut *g;
        let mut hdr = [0u8; HEADER_LEN];
        repr.emit(*seq, &mut hdr);
        *seq = seq.wrapping_add(1);
        conn.write_all(&hdr)
    }
}

/// What the source's return-path reader thread delivers.
#[derive(Debug)]
pub enum ReturnMsg {
    /// A record from the destination.
    Record(ReturnRepr),
    /// The return path ended: the connection closed or broke, or the bytes
    /// did not decode. Nothing more follows.
    Closed(ReturnPathEnd),
}

/// Why the source's return path ended.
#[derive(Debug, thiserror::Error)]
pub enum ReturnPathEnd {
    /// The destination closed the connection.
    #[error("the destination closed the connection")]
    Closed,
    /// The connection failed.
    #[error("the return path failed: {0}")]
    Failed(io::Error),
    /// The bytes did not decode.
    #[error("the return path is corrupt: {0}")]
    Corrupt(wire::DecodeError),
    /// The reader thread could not start.
    #[error("could not start the return-path reader: {0}")]
    NoReader(io::Error),
    /// The reader is gone.
    #[error("the return path ended")]
    Ended,
}

/// Return-path records the source's reader queues before it stops reading
/// until the migration takes some (the destination then waits on its
/// socket): the bound on what a flood can cost the source.
pub const RETURN_QUEUE: usize = 4096;

/// Starts a thread that reads the return path on `conn` and forwards each
/// record (at most [`RETURN_QUEUE`] waiting); it ends when the connection
/// does.
pub fn spawn_return_reader(
    mut conn: Conn,
    mut dec: ReturnDecoder,
) -> (mpsc::Receiver<ReturnMsg>, JoinHandle<()>) {
    // Bounded: a destination that floods the return path fills this queue
    // and then waits on its socket, instead of growing this side's heap.
    let (tx, rx) = mpsc::sync_channel(RETURN_QUEUE);
    let h = std::thread::Builder::new()
        .name("ferry-return".into())
        .spawn(move || loop {
            match read_return(&mut conn, &mut dec) {
                Ok(r) => {
                    if tx.send(ReturnMsg::Record(r.repr)).is_err() {
                        return;
                    }
                }
                Err(ReturnReadError::Io(e)) => {
                    let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                        ReturnPathEnd::Closed
                    } else {
                        ReturnPathEnd::Failed(e)
                    };
                    let _ = tx.send(ReturnMsg::Closed(why));
                    return;
                }
                Err(ReturnReadError::Decode(e)) => {
                    let _ = tx.send(ReturnMsg::Closed(ReturnPathEnd::Corrupt(e)));
                    return;
                }
            }
        });
    match h {
        Ok(h) => (rx, h),
        Err(e) => {
            // No thread: hand back a receiver that reports why at once.
            let (tx, rx) = mpsc::sync_channel(1);
            let _ = tx.send(ReturnMsg::Closed(ReturnPathEnd::NoReader(e)));
            (rx, std::thread::spawn(|| {}))
        }
    }
}

/// The one decoder of Ferry's streams: headers checked by `ferry_core::wire`,
/// sequence numbers that must follow, payloads placed in guest memory or the
/// caller's buffer.
pub use ferry_uring::{WireDecodeError, WireDecoder};

/// Why reading a stream record off a plain connection failed.
#[derive(Debug)]
pub enum StreamReadError {
    /// The connection failed or closed mid-record.
    Io(io::Error),
    /// The header did not decode, or records were lost.
    Decode(WireDecodeError),
}

impl std::fmt::Display for StreamReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamReadError::Io(e) => write!(f, "{e}"),
            StreamReadError::Decode(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one stream record with a blocking read (the urgent channel): the
/// header, checked by `dec`, then its payload into `buf`. Returns `None` at a
/// clean end of the connection (between records).
pub fn read_stream_record(
    conn: &mut Conn,
    dec: &mut WireDecoder,
    buf: &mut [u8],
) -> Result<Option<(Record, usize)>, StreamReadError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match conn.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(StreamReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamReadError::Io(e)),
        }
    }
    let placement = dec.place(&hdr).map_err(StreamReadError::Decode)?;
    let rec = dec.last().ok_or(StreamReadError::Io(io::Error::other(
        "the decoder lost its record",
    )))?;
    let len = placement.len() as usize;
    match placement {
        Placement::Buffer { .. } | Placement::Empty => {
            let dst =
                buf.get_mut(..len)
                    .ok_or(StreamReadError::Decode(WireDecodeError::TooLarge {
                        len: len as u64,
                        buffer: 0,
                    }))?;
            conn.read_exact(dst).map_err(StreamReadError::Io)?;
        }
        _ => {
            return Err(StreamReadError::Io(io::Error::other(
                "a record on the urgent channel has a payload that does not go in the buffer",
            )))
        }
    }
    Ok(Some((rec, len)))
}
