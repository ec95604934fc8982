//! One connection's handshake: TLS 1.3 through rustls, then Ferry's channel hello inside it
//! (which channel this is, the proof of the pre-shared key, the proof of belonging to the
//! session), then the keys handed to the record layer.
//!
//! The channel hello, client to server, 137 bytes:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 4 | magic `FTLS` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | channel kind: 0 control, 1 bulk, 2 urgent |
//! | 6 | 2 | bulk index (big-endian) |
//! | 8 | 1 | identity length (PSK mode; 0 with x509) |
//! | 9 | 64 | identity, zero-padded |
//! | 73 | 32 | PSK proof: HMAC-SHA256(key, "ferry psk source" ‖ channel exporter) |
//! | 105 | 32 | session proof: HMAC-SHA256(session, "ferry channel" ‖ kind ‖ index ‖ channel exporter) |
//!
//! The answer, server to client, 33 bytes: a verdict (0 accepted, else a [`Verdict`]) and the
//! server's PSK proof, HMAC-SHA256(key, "ferry psk destination" ‖ channel exporter). The
//! channel exporter is 32 bytes of the connection's TLS exporter under
//! `EXPORTER-ferry-channel`; a man in the middle holds two connections with two different
//! exporters, so no proof it relays verifies. The session value is the control connection's
//! exporter under `EXPORTER-ferry-session`, known only to the two ends of that connection.
//!
//! Nothing follows the hello until the answer is read, and the answer is read record by
//! record, so when rustls hands its keys over it holds no bytes of the migration.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ConnectionTrafficSecrets, ServerConnection};

use super::{PskKey, TlsError};
use crate::link::{ChannelRole, Conn};
use ferry_uring::tls::{Direction, Suite, HEADER, MAX_BODY};

const MAGIC: &[u8; 4] = b"FTLS";
const VERSION: u8 = 1;
/// Length of the channel hello.
pub const HELLO_LEN: usize = 137;
/// Length of the answer.
pub const ANSWER_LEN: usize = 33;
/// Longest PSK identity.
pub const MAX_IDENTITY: usize = 64;

/// Why the destination refused a channel (the answer's first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    /// Accepted.
    Accepted = 0,
    /// The PSK proof did not verify, or the identity is unknown.
    Psk = 1,
    /// The identity is not in the allow list.
    NotAuthorised = 2,
    /// The connection does not prove it belongs to the control connection's session.
    WrongSession = 3,
    /// The hello was malformed.
    Malformed = 4,
}

/// A finished channel handshake: the keys, and the session value when this was the control
/// connection.
pub struct Done {
    pub tx: Direction,
    pub rx: Direction,
    pub session: [u8; 32],
    pub identity: String,
}

fn role_bytes(role: ChannelRole) -> (u8, u16) {
    match role {
        ChannelRole::Control => (0, 0),
        ChannelRole::Bulk(n) => (1, u16::try_from(n).unwrap_or(u16::MAX)),
        ChannelRole::Urgent => (2, 0),
    }
}

fn tag(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn verify(key: &[u8], parts: &[&[u8]], claimed: &[u8]) -> bool {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let msg: Vec<u8> = parts.concat();
    hmac::verify(&k, &msg, claimed).is_ok()
}

/// A socket with a deadline for the handshake's reads.
struct Wire<'c> {
    conn: &'c mut Conn,
    deadline: Instant,
    bound: Duration,
    role: ChannelRole,
}

impl Wire<'_> {
    fn timeout(&self) -> TlsError {
        TlsError::Timeout {
            channel: self.role,
            after_ms: u64::try_from(self.bound.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn io(&self, e: io::Error) -> TlsError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timeout(),
            _ => TlsError::Io {
                channel: self.role,
                source: e,
            },
        }
    }

    fn arm(&mut self) -> Result<(), TlsError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout());
        }
        self.conn
            .set_read_timeout(Some(left))
            .map_err(|e| self.io(e))
    }

    fn flush(&mut self, tls: &mut Connection) -> Result<(), TlsError> {
        while tls.wants_write() {
            match tls.write_tls(self.conn) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r.map_err(|e| self.io(e))?,
            };
        }
        Ok(())
    }

    /// Reads what the socket has into rustls and processes it.
    fn pull(&mut self, tls: &mut Connection) -> Result<(), TlsError> {
        let n = loop {
            self.arm()?;
            match tls.read_tls(self.conn) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| self.io(e))?,
            }
        };
        if n == 0 {
            return Err(TlsError::Io {
                channel: self.role,
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        self.process(tls)
    }

    /// Reads exactly one record from the socket into rustls, no byte beyond it.
    fn pull_one_record(&mut self, tls: &mut Connection) -> Result<(), TlsError> {
        let mut rec = vec![0u8; HEADER + MAX_BODY];
        self.arm()?;
        self.conn
            .read_exact(&mut rec[..HEADER])
            .map_err(|e| self.io(e))?;
        let len = usize::from(u16::from_be_bytes([rec[3], rec[4]])).min(MAX_BODY);
        self.arm()?;
        self.conn
            .read_exact(&mut rec[HEADER..HEADER + len])
            .map_err(|e| self.io(e))?;
        let mut src = &rec[..HEADER + len];
        while !src.is_empty() {
            tls.read_tls(&mut src).map_err(|e| self.io(e))?;
        }
        self.process(tls)
    }

    fn process(&mut self, tls: &mut Connection) -> Result<(), TlsError> {
        if let Err(e) = tls.process_new_packets() {
            // Tell the peer why (rustls queued the alert), then fail.
            let _ = self.flush(tls);
            return Err(TlsError::Handshake {
                channel: self.role,
                source: e,
            });
        }
        Ok(())
    }

    fn handshake(&mut self, tls: &mut Connection) -> Result<(), TlsError> {
        while tls.is_handshaking() {
            self.flush(tls)?;
            if tls.is_handshaking() && tls.wants_read() {
                self.pull(tls)?;
            }
        }
        self.flush(tls)
    }

    /// Reads exactly `buf.len()` bytes of application data through rustls; `exact_records`
    /// keeps rustls from reading past the record that completes it.
    fn read_plain(
        &mut self,
        tls: &mut Connection,
        buf: &mut [u8],
        exact_records: bool,
    ) -> Result<(), TlsError> {
        let mut got = 0;
        while got < buf.len() {
            match tls.reader().read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(TlsError::Io {
                        channel: self.role,
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if exact_records {
                        self.pull_one_record(tls)?;
                    } else {
                        self.pull(tls)?;
                    }
                }
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    fn write_plain(&mut self, tls: &mut Connection, buf: &[u8]) -> Result<(), TlsError> {
        tls.writer().write_all(buf).map_err(|e| self.io(e))?;
        self.flush(tls)
    }
}

fn exporter(tls: &Connection, label: &[u8], role: ChannelRole) -> Result<[u8; 32], TlsError> {
    let mut out = [0u8; 32];
    tls.export_keying_material(&mut out, label, None)
        .map(|_| ())
        .map_err(|e| TlsError::Handshake {
            channel: role,
            source: e,
        })?;
    Ok(out)
}

fn finish(
    tls: Connection,
    role: ChannelRole,
    session: [u8; 32],
    identity: String,
) -> Result<Done, TlsError> {
    let secrets = tls
        .dangerous_extract_secrets()
        .map_err(|e| TlsError::Handshake {
            channel: role,
            source: e,
        })?;
    Ok(Done {
        tx: direction(secrets.tx.0, secrets.tx.1)?,
        rx: direction(secrets.rx.0, secrets.rx.1)?,
        session,
        identity,
    })
}

/// The record layer's direction for the secrets rustls handed over.
fn direction(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Direction, TlsError> {
    let (suite, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Suite::Chacha20Poly1305, key, iv)
        }
        _ => return Err(TlsError::UnsupportedSuite),
    };
    Direction::new(suite, key.as_ref(), iv.as_ref(), seq).map_err(TlsError::Record)
}

/// Runs the TLS handshake of `tls` on `conn` within `bound`; returns the socket with its
/// deadline for what follows, and the connection's channel exporter.
fn shake<'c>(
    conn: &'c mut Conn,
    tls: &mut Connection,
    role: ChannelRole,
    bound: Duration,
) -> Result<(Wire<'c>, [u8; 32]), TlsError> {
    let mut w = Wire {
        conn,
        deadline: Instant::now() + bound,
        bound,
        role,
    };
    w.handshake(tls)?;
    let chan = exporter(tls, b"EXPORTER-ferry-channel", role)?;
    Ok((w, chan))
}

fn rustls_failed(role: ChannelRole) -> impl FnOnce(rustls::Error) -> TlsError {
    move |source| TlsError::Handshake {
        channel: role,
        source,
    }
}

/// The source's side of one connection.
pub fn client(
    conn: &mut Conn,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    psk: Option<&PskKey>,
    session: Option<[u8; 32]>,
    role: ChannelRole,
    bound: Duration,
) -> Result<Done, TlsError> {
    let client = ClientConnection::new(config, name).map_err(rustls_failed(role))?;
    let mut tls = Connection::from(client);
    let (mut w, chan) = shake(conn, &mut tls, role, bound)?;
    let session = match role {
        ChannelRole::Control => exporter(&tls, b"EXPORTER-ferry-session", role)?,
        _ => session.ok_or(TlsError::NoSession { channel: role })?,
    };
    let (kind, index) = role_bytes(role);
    let mut hello = [0u8; HELLO_LEN];
    hello[..4].copy_from_slice(MAGIC);
    hello[4] = VERSION;
    hello[5] = kind;
    hello[6..8].copy_from_slice(&index.to_be_bytes());
    if let Some(p) = psk {
        hello[8] = p.identity.len() as u8;
        hello[9..9 + p.identity.len()].copy_from_slice(p.identity.as_bytes());
        hello[73..105].copy_from_slice(&tag(&p.key, &[b"ferry psk source", &chan]));
    }
    if role != ChannelRole::Control {
        hello[105..137].copy_from_slice(&tag(
            &session,
            &[b"ferry channel", &[kind], &index.to_be_bytes(), &chan],
        ));
    }
    w.write_plain(&mut tls, &hello)?;
    let mut answer = [0u8; ANSWER_LEN];
    w.read_plain(&mut tls, &mut answer, true)?;
    if answer[0] != Verdict::Accepted as u8 {
        return Err(TlsError::RefusedByPeer {
            channel: role,
            verdict: answer[0],
        });
    }
    if let Some(p) = psk {
        if !verify(&p.key, &[b"ferry psk destination", &chan], &answer[1..]) {
            return Err(TlsError::PskMismatch { channel: role });
        }
    }
    let identity = psk.map(|p| p.identity.clone()).unwrap_or_default();
    finish(tls, role, session, identity)
}

/// What the destination checks a connecting source against.
pub struct ServerCheck<'a> {
    pub psk: &'a [PskKey],
    pub authz: &'a [String],
    pub session: Option<[u8; 32]>,
}

/// The destination's side of one connection, expected to be `role`.
pub fn server(
    conn: &mut Conn,
    config: Arc<rustls::ServerConfig>,
    check: &ServerCheck<'_>,
    role: ChannelRole,
    bound: Duration,
) -> Result<Done, TlsError> {
    let server = ServerConnection::new(config).map_err(rustls_failed(role))?;
    let mut tls = Connection::from(server);
    let (mut w, chan) = shake(conn, &mut tls, role, bound)?;
    let mut hello = [0u8; HELLO_LEN];
    w.read_plain(&mut tls, &mut hello, false)?;
    let refuse = |w: &mut Wire<'_>, tls: &mut Connection, v: Verdict, e: TlsError| {
        let mut answer = [0u8; ANSWER_LEN];
        answer[0] = v as u8;
        let _ = w.write_plain(tls, &answer);
        Err(e)
    };
    let (kind, index) = role_bytes(role);
    if &hello[..4] != MAGIC || hello[4] != VERSION || usize::from(hello[8]) > MAX_IDENTITY {
        return refuse(
            &mut w,
            &mut tls,
            Verdict::Malformed,
            TlsError::Malformed { channel: role },
        );
    }
    if hello[5] != kind || hello[6..8] != index.to_be_bytes() {
        return refuse(
            &mut w,
            &mut tls,
            Verdict::WrongSession,
            TlsError::WrongChannel {
                channel: role,
                kind: hello[5],
                index: u16::from_be_bytes([hello[6], hello[7]]),
            },
        );
    }
    let claimed = String::from_utf8_lossy(&hello[9..9 + usize::from(hello[8])]).into_owned();
    // PSK mode: the identity names the key, and the proof shows the source holds it.
    let key = if check.psk.is_empty() {
        None
    } else {
        match check.psk.iter().find(|k| k.identity == claimed) {
            Some(k) if verify(&k.key, &[b"ferry psk source", &chan], &hello[73..105]) => Some(k),
            _ => {
                return refuse(
                    &mut w,
                    &mut tls,
                    Verdict::Psk,
                    TlsError::PskMismatch { channel: role },
                )
            }
        }
    };
    let identity = match key {
        Some(k) => k.identity.clone(),
        None => x509_identity(&tls, check.authz).unwrap_or_default(),
    };
    if !check.authz.is_empty() && !authorised(&tls, key, check.authz) {
        return refuse(
            &mut w,
            &mut tls,
            Verdict::NotAuthorised,
            TlsError::NotAuthorised {
                channel: role,
                identity: if identity.is_empty() {
                    "(no name)".into()
                } else {
                    identity
                },
            },
        );
    }
    let session = match role {
        ChannelRole::Control => exporter(&tls, b"EXPORTER-ferry-session", role)?,
        _ => {
            let ok = check.session.is_some_and(|s| {
                verify(
                    &s,
                    &[b"ferry channel", &[kind], &index.to_be_bytes(), &chan],
                    &hello[105..137],
                )
            });
            if !ok {
                return refuse(
                    &mut w,
                    &mut tls,
                    Verdict::WrongSession,
                    TlsError::WrongSession { channel: role },
                );
            }
            check.session.unwrap_or_default()
        }
    };
    let mut answer = [0u8; ANSWER_LEN];
    if let Some(k) = key {
        answer[1..].copy_from_slice(&tag(&k.key, &[b"ferry psk destination", &chan]));
    }
    w.write_plain(&mut tls, &answer)?;
    finish(tls, role, session, identity)
}

/// Whether the source is in the allow list: its PSK identity, or (x509) a DNS name its
/// certificate is valid for.
fn authorised(tls: &Connection, key: Option<&PskKey>, authz: &[String]) -> bool {
    match key {
        Some(k) => authz.contains(&k.identity),
        None => x509_identity(tls, authz).is_some(),
    }
}

/// The first allow-list entry the peer's certificate is valid for.
fn x509_identity(tls: &Connection, authz: &[String]) -> Option<String> {
    let der = tls.peer_certificates()?.first()?;
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    authz.iter().find_map(|a| {
        let name = ServerName::try_from(a.as_str()).ok()?;
        cert.verify_is_valid_for_subject_name(&name).ok()?;
        Some(a.clone())
    })
}
