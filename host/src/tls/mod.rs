//! Authenticated, encrypted migration: TLS 1.3 on every connection of a migration, every
//! connection bound to the session its control connection opened (feature `tls`).
//!
//! - [`SourceTls`] and [`DestinationTls`] hold one side's credentials: mutual x509 (a CA,
//!   this side's certificate and key; the destination checks the source's certificate
//!   against an allow list of names, the source checks the destination's name), or a
//!   pre-shared key ([`PskKey`]), proved in both directions over each connection's TLS
//!   exporter. (rustls has no external-PSK handshake, so in PSK mode each side shows a
//!   throw-away certificate and the key is proved inside the connection; a man in the middle
//!   holds two connections with two exporters, and no proof he relays verifies.)
//! - [`TlsConnector`] and [`TlsAcceptor`] wrap any [`Connector`] and [`Acceptor`]: the
//!   source's `migrate_over` and the destination's `receive_with` run over them unchanged.
//!   The control connection's exporter names the session; every bulk and urgent connection
//!   proves it belongs to it. A connection that fails its handshake or proof is refused and
//!   the destination waits on for the real one, within the channel's bound.
//! - The record layer (`ferry_uring::tls`) protects each direction with the keys rustls
//!   negotiated, in user space (this kernel has no kTLS). Bulk connections hand their keys to
//!   the channel itself ([`ferry_uring::tls::TlsChannel`]: pages are sealed as they are
//!   gathered from guest memory and opened once on arrival); the urgent connection is split
//!   into halves that open and seal records in the threads that read and write it (`direct`);
//!   the control connection goes through relay threads (`pump`) between the network
//!   connection and the plain stream the migration code reads and writes.
//!
//! [`generate_x509`] writes a throw-away CA and certificates for both ends, in the layout
//! [`X509Credentials::from_dir`] reads (QEMU's: `ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`).

pub(crate) mod direct;
mod handshake;
mod pump;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::link::{Acceptor, ChannelRole, Conn, Connector, DataConn, LinkError};
pub use ferry_uring::tls::RecordError;
pub use handshake::Verdict;

/// The bound on one connection's TLS handshake and channel hello, by default.
pub const HANDSHAKE_BOUND: Duration = Duration::from_secs(10);

/// Errors of the credentials and the handshakes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read.
    #[error("could not read the {what} {}: {source}", path.display())]
    Read {
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A credentials file holds no usable PEM object of the kind needed.
    #[error("{} holds no {what}", path.display())]
    Missing {
        /// What was looked for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The pre-shared key file is malformed.
    #[error("the pre-shared key file {} is malformed at line {line}: {why}", path.display())]
    PskFile {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The name the destination must prove is not a DNS name or an IP address.
    #[error("'{0}' is not a DNS name or an IP address the destination could prove")]
    BadName(String),
    /// rustls refused the configuration (a key that does not match its certificate, ...).
    #[error("the TLS configuration is unusable: {0}")]
    Config(rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("the CA certificates cannot verify clients: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// Generating a certificate or its key failed.
    #[error("could not generate a certificate: {0}")]
    Generate(#[source] rcgen::Error),
    /// A generated key is not a private key rustls takes (a bug).
    #[error("a generated key is unusable: {0}")]
    GeneratedKey(&'static str),
    /// Writing generated credentials failed.
    #[error("could not write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The TLS handshake failed (a certificate not signed by the CA, a name mismatch, no
    /// client certificate, an alert from the peer, ...).
    #[error("the TLS handshake on the {channel} connection failed: {source}")]
    Handshake {
        /// The connection.
        channel: ChannelRole,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The socket failed during the handshake.
    #[error("the {channel} connection failed during its TLS handshake: {source}")]
    Io {
        /// The connection.
        channel: ChannelRole,
        /// The system's error.
        source: io::Error,
    },
    /// The handshake did not finish within its bound.
    #[error("the TLS handshake on the {channel} connection did not finish within {after_ms} ms")]
    Timeout {
        /// The connection.
        channel: ChannelRole,
        /// The bound, in milliseconds.
        after_ms: u64,
    },
    /// The peer does not hold the pre-shared key (or names an identity this side has no key
    /// for).
    #[error("the peer on the {channel} connection does not hold the pre-shared key")]
    PskMismatch {
        /// The connection.
        channel: ChannelRole,
    },
    /// The source's identity is not in the destination's allow list.
    #[error("the source's identity {identity} on the {channel} connection is not authorised")]
    NotAuthorised {
        /// The connection.
        channel: ChannelRole,
        /// The identity it showed.
        identity: String,
    },
    /// A data connection did not prove it belongs to the session of the control connection.
    #[error("the {channel} connection does not belong to this migration's session")]
    WrongSession {
        /// The connection.
        channel: ChannelRole,
    },
    /// A connection presented itself as another channel than the one awaited.
    #[error("the connection awaited as {channel} presented itself as channel kind {kind}, index {index}")]
    WrongChannel {
        /// The channel awaited.
        channel: ChannelRole,
        /// The kind it claimed.
        kind: u8,
        /// The index it claimed.
        index: u16,
    },
    /// The channel hello was malformed.
    #[error("the channel hello on the {channel} connection is malformed")]
    Malformed {
        /// The connection.
        channel: ChannelRole,
    },
    /// A data connection was opened before any control connection.
    #[error("the {channel} connection was opened before the control connection named a session")]
    NoSession {
        /// The connection.
        channel: ChannelRole,
    },
    /// The destination refused the connection after the handshake.
    #[error("the destination refused the {channel} connection ({})", verdict_words(*verdict))]
    RefusedByPeer {
        /// The connection.
        channel: ChannelRole,
        /// The destination's [`Verdict`] code.
        verdict: u8,
    },
    /// The handshake chose a cipher suite the record layer does not implement.
    #[error("the handshake chose a cipher suite the record layer does not implement")]
    UnsupportedSuite,
    /// The record layer refused the keys.
    #[error("the record layer: {0}")]
    Record(RecordError),
    /// The relay threads could not be started.
    #[error("could not start the TLS relay: {0}")]
    Relay(io::Error),
}

fn verdict_words(v: u8) -> &'static str {
    match v {
        1 => "it does not hold our pre-shared key",
        2 => "our identity is not in its allow list",
        3 => "the connection does not belong to the session it knows",
        4 => "it found our channel hello malformed",
        _ => "for a reason it did not name",
    }
}

/// A pre-shared key and the identity that names it.
#[derive(Clone)]
pub struct PskKey {
    /// The identity (at most 64 bytes).
    pub identity: String,
    /// The key (at least 16 bytes).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for PskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskKey")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl PskKey {
    /// Reads a key file in QEMU's `keys.psk` format: one `identity:hexkey` per line (blank
    /// lines and `#` comments skipped). Keys must be at least 16 bytes.
    pub fn read_file(path: &Path) -> Result<Vec<PskKey>, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            what: "pre-shared key file",
            path: path.into(),
            source,
        })?;
        let bad = |line, why| TlsError::PskFile {
            path: path.into(),
            line,
            why,
        };
        let mut keys = Vec::new();
        for (i, l) in text.lines().enumerate() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (id, hex) = l
                .split_once(':')
                .ok_or(bad(i + 1, "no ':' between identity and key"))?;
            if id.is_empty() || id.len() > handshake::MAX_IDENTITY {
                return Err(bad(i + 1, "the identity must be 1 to 64 bytes"));
            }
            let key = decode_hex(hex.trim()).ok_or(bad(i + 1, "the key is not hexadecimal"))?;
            if key.len() < 16 {
                return Err(bad(i + 1, "the key is shorter than 16 bytes"));
            }
            keys.push(PskKey {
                identity: id.to_string(),
                key,
            });
        }
        if keys.is_empty() {
            return Err(bad(0, "it holds no key"));
        }
        Ok(keys)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One side's x509 credentials: the CA both ends trust, this side's chain and key.
#[derive(Debug)]
pub struct X509Credentials {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Which end of a migration a credentials directory is read for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The source (TLS client): `client-cert.pem`, `client-key.pem`.
    Source,
    /// The destination (TLS server): `server-cert.pem`, `server-key.pem`.
    Destination,
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what: "PEM certificate",
            path: path.into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Missing {
        what: "PEM private key",
        path: path.into(),
    })
}

impl X509Credentials {
    /// Reads `dir/ca-cert.pem` and this end's `*-cert.pem` and `*-key.pem`.
    pub fn from_dir(dir: &Path, end: End) -> Result<X509Credentials, TlsError> {
        let who = match end {
            End::Source => "client",
            End::Destination => "server",
        };
        Ok(X509Credentials {
            ca: read_certs(&dir.join("ca-cert.pem"), "CA certificate")?,
            chain: read_certs(&dir.join(format!("{who}-cert.pem")), "certificate")?,
            key: read_key(&dir.join(format!("{who}-key.pem")))?,
        })
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(TlsError::Config)?;
        }
        Ok(roots)
    }
}

/// rustls on aws-lc-rs, TLS 1.3 suites only, AES-128-GCM first: the fastest of the three where
/// the CPU has AES instructions (sealing 16 KiB records on one core here: 11.0 GB/s against
/// AES-256-GCM's 9.7 and ChaCha20-Poly1305's 2.6), which is what the record layer spends its
/// time on.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// A throw-away self-signed certificate (PSK mode: the key, not the certificate, proves
/// who the peer is).
fn throwaway() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let g = TlsError::Generate;
    let key = rcgen::KeyPair::generate().map_err(g)?;
    let cert = rcgen::CertificateParams::new(vec!["ferry-psk".to_string()])
        .map_err(g)?
        .self_signed(&key)
        .map_err(g)?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(TlsError::GeneratedKey)?;
    Ok((cert.der().clone(), der))
}

/// PSK mode's certificate check: any certificate, but the handshake's signature must verify
/// with its key (the pre-shared key proof then shows who holds the connection).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The source's TLS settings.
#[derive(Clone, Debug)]
pub struct SourceTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    psk: Option<PskKey>,
    /// The bound on each connection's handshake.
    pub handshake_bound: Duration,
}

impl SourceTls {
    /// Mutual x509: `creds` are the source's; the destination must prove `server_name` (a
    /// DNS name or an IP address in its certificate).
    pub fn x509(creds: X509Credentials, server_name: &str) -> Result<SourceTls, TlsError> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::BadName(server_name.into()))?;
        let roots = creds.roots()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(creds.chain, creds.key)
            .map_err(TlsError::Config)?;
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(SourceTls {
            config: Arc::new(config),
            name,
            psk: None,
            handshake_bound: HANDSHAKE_BOUND,
        })
    }

    /// A pre-shared key: the source proves `key` and checks that the destination holds it.
    pub fn psk(key: PskKey) -> Result<SourceTls, TlsError> {
        let p = provider();
        let mut config = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(p)))
            .with_no_client_auth();
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(SourceTls {
            config: Arc::new(config),
            name: ServerName::try_from("ferry-psk")
                .map_err(|_| TlsError::BadName("ferry-psk".into()))?,
            psk: Some(key),
            handshake_bound: HANDSHAKE_BOUND,
        })
    }

    /// Connections from `inner`, each protected and bound to the session.
    pub fn connector<C: Connector>(&self, inner: C) -> TlsConnector<C> {
        TlsConnector {
            tls: self.clone(),
            inner,
            session: None,
            faults: Vec::new(),
        }
    }
}

/// A [`Connector`] that runs TLS and the channel hello on every connection `inner` gives.
#[derive(Debug)]
pub struct TlsConnector<C> {
    tls: SourceTls,
    inner: C,
    session: Option<[u8; 32]>,
    faults: Vec<pump::Fault>,
}

impl<C> TlsConnector<C> {
    /// The first record-layer failure on any connection so far (a record that failed
    /// authentication, ...), for the error report after a failed migration.
    pub fn record_fault(&self) -> Option<RecordError> {
        first_fault(&self.faults)
    }
}

fn first_fault(faults: &[pump::Fault]) -> Option<RecordError> {
    faults
        .iter()
        .find_map(|f| f.lock().ok().and_then(|g| g.clone()))
}

impl<C: Connector> TlsConnector<C> {
    fn open(&mut self, channel: ChannelRole) -> Result<(Conn, handshake::Done), LinkError> {
        let mut net = self.inner.connect(channel)?;
        let done = handshake::client(
            &mut net,
            self.tls.config.clone(),
            self.tls.name.clone(),
            self.tls.psk.as_ref(),
            self.session,
            channel,
            self.tls.handshake_bound,
        )?;
        if channel == ChannelRole::Control {
            self.session = Some(done.session);
            self.faults.clear();
        }
        let _ = net.set_read_timeout(None);
        Ok((net, done))
    }
}

impl<C: Connector> Connector for TlsConnector<C> {
    fn connect(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        let (net, done) = self.open(channel)?;
        let (conn, fault) =
            pump::spawn(net, done.tx, done.rx, &channel.to_string()).map_err(TlsError::Relay)?;
        self.faults.push(fault);
        Ok(conn)
    }

    fn connect_data(&mut self, channel: ChannelRole) -> Result<DataConn, LinkError> {
        let (net, done) = self.open(channel)?;
        Ok(DataConn::protected(net, done.tx, done.rx))
    }

    fn bulk_channels(&self) -> Option<usize> {
        self.inner.bulk_channels()
    }
}

/// The destination's TLS settings.
#[derive(Clone, Debug)]
pub struct DestinationTls {
    config: Arc<ServerConfig>,
    psk: Vec<PskKey>,
    authz: Vec<String>,
    /// The bound on each connection's handshake.
    pub handshake_bound: Duration,
}

impl DestinationTls {
    /// Mutual x509: `creds` are the destination's; a source must show a certificate signed
    /// by the CA and, when `authz` is not empty, valid for one of its names.
    pub fn x509(creds: X509Credentials, authz: Vec<String>) -> Result<DestinationTls, TlsError> {
        let p = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(creds.roots()?), p.clone())
                .build()
                .map_err(TlsError::Verifier)?;
        let config = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(creds.chain, creds.key)
            .map_err(TlsError::Config)?;
        Ok(DestinationTls::finish(config, Vec::new(), authz))
    }

    /// Pre-shared keys: a source must prove one of `keys` (and, when `authz` is not empty,
    /// its identity must be listed there).
    pub fn psk(keys: Vec<PskKey>, authz: Vec<String>) -> Result<DestinationTls, TlsError> {
        let (cert, key) = throwaway()?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(TlsError::Config)?;
        Ok(DestinationTls::finish(config, keys, authz))
    }

    fn finish(mut config: ServerConfig, psk: Vec<PskKey>, authz: Vec<String>) -> DestinationTls {
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        DestinationTls {
            config: Arc::new(config),
            psk,
            authz,
            handshake_bound: HANDSHAKE_BOUND,
        }
    }

    /// Connections from `inner`, each checked and protected. Use it by reference
    /// (`&TlsAcceptor`) to keep it across receives (a postcopy resume).
    pub fn acceptor<A: Acceptor>(&self, inner: A) -> TlsAcceptor<A> {
        TlsAcceptor {
            tls: self.clone(),
            inner: Mutex::new(inner),
            state: Mutex::new(AcceptState::default()),
        }
    }
}

#[derive(Debug, Default)]
struct AcceptState {
    session: Option<[u8; 32]>,
    identity: Option<String>,
    refused: Vec<String>,
    faults: Vec<pump::Fault>,
}

/// An [`Acceptor`] that runs TLS and checks the channel hello on every connection `inner`
/// accepts. A connection that fails is refused (closed) and the next one awaited, within the
/// channel's bound; [`TlsAcceptor::refused`] lists why each was refused.
#[derive(Debug)]
pub struct TlsAcceptor<A> {
    tls: DestinationTls,
    inner: Mutex<A>,
    state: Mutex<AcceptState>,
}

impl<A> TlsAcceptor<A> {
    /// Why each refused connection was refused, oldest first.
    pub fn refused(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.refused.clone())
            .unwrap_or_default()
    }

    /// The source's identity on the current session (its PSK identity, or the allow-list
    /// name its certificate is valid for); `None` before a session, or with x509 and no
    /// allow list.
    pub fn peer_identity(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.identity.clone())
    }

    /// The first record-layer failure on the current session's connections.
    pub fn record_fault(&self) -> Option<RecordError> {
        self.state.lock().ok().and_then(|s| first_fault(&s.faults))
    }
}

impl<A: Acceptor> TlsAcceptor<A> {
    fn accept_by(&self, channel: ChannelRole, bound: Option<Duration>) -> Result<Conn, LinkError> {
        let (net, done) = self.open(channel, bound)?;
        let (conn, fault) =
            pump::spawn(net, done.tx, done.rx, &channel.to_string()).map_err(TlsError::Relay)?;
        if let Ok(mut s) = self.state.lock() {
            s.faults.push(fault);
        }
        Ok(conn)
    }

    fn open(
        &self,
        channel: ChannelRole,
        bound: Option<Duration>,
    ) -> Result<(Conn, handshake::Done), LinkError> {
        let deadline = bound.map(|b| Instant::now() + b);
        loop {
            let mut net = {
                let mut inner = self.inner.lock().map_err(|_| LinkError::Io {
                    what: "accepting a connection",
                    source: io::Error::other("a thread panicked while accepting"),
                })?;
                match deadline {
                    None => inner.accept(channel)?,
                    Some(d) => {
                        inner.accept_within(channel, d.saturating_duration_since(Instant::now()))?
                    }
                }
            };
            let session = self.state.lock().ok().and_then(|s| s.session);
            let hs_bound = match deadline {
                Some(d) => self
                    .tls
                    .handshake_bound
                    .min(d.saturating_duration_since(Instant::now())),
                None => self.tls.handshake_bound,
            };
            let check = handshake::ServerCheck {
                psk: &self.tls.psk,
                authz: &self.tls.authz,
                session,
            };
            match handshake::server(&mut net, self.tls.config.clone(), &check, channel, hs_bound) {
                Ok(done) => {
                    let _ = net.set_read_timeout(None);
                    if channel == ChannelRole::Control {
                        if let Ok(mut s) = self.state.lock() {
                            s.session = Some(done.session);
                            s.identity = Some(done.identity.clone()).filter(|i| !i.is_empty());
                            s.faults.clear();
                        }
                    }
                    return Ok((net, done));
                }
                Err(e) => {
                    let _ = net.shutdown();
                    if let Ok(mut s) = self.state.lock() {
                        s.refused.push(e.to_string());
                    }
                }
            }
        }
    }
}

impl<A: Acceptor> Acceptor for &TlsAcceptor<A> {
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        self.accept_by(channel, None)
    }

    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        self.accept_by(channel, Some(bound))
    }

    fn accept_data_within(
        &mut self,
        channel: ChannelRole,
        bound: Duration,
    ) -> Result<DataConn, LinkError> {
        let (net, done) = self.open(channel, Some(bound))?;
        Ok(DataConn::protected(net, done.tx, done.rx))
    }
}

/// Owned, as by reference.
impl<A: Acceptor> Acceptor for TlsAcceptor<A> {
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        Acceptor::accept(&mut &*self, channel)
    }

    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        Acceptor::accept_within(&mut &*self, channel, bound)
    }

    fn accept_data_within(
        &mut self,
        channel: ChannelRole,
        bound: Duration,
    ) -> Result<DataConn, LinkError> {
        Acceptor::accept_data_within(&mut &*self, channel, bound)
    }
}

/// The files [`generate_x509`] wrote.
#[derive(Debug)]
pub struct Generated {
    /// The directory.
    pub dir: PathBuf,
    /// The names the destination's certificate is valid for.
    pub server_names: Vec<String>,
    /// The name in the source's certificate (its identity for `authz`).
    pub client_name: String,
}

/// Writes a throw-away CA and certificates for both ends into `dir` (created if missing):
/// `ca-cert.pem`, `server-cert.pem` and `server-key.pem` valid for `server_names` (DNS
/// names or IP addresses), `client-cert.pem` and `client-key.pem` for `client_name`. Keys
/// are written readable by the owner only.
pub fn generate_x509(
    dir: &Path,
    server_names: &[&str],
    client_name: &str,
) -> Result<Generated, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let g = TlsError::Generate;
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.into(),
        source,
    })?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(g)?;
    ca.distinguished_name
        .push(DnType::CommonName, "Ferry throw-away CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(g)?).map_err(g)?;
    let leaf = |names: Vec<String>, usage| -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(g)?;
        let mut p = CertificateParams::new(names.clone()).map_err(g)?;
        p.distinguished_name
            .push(DnType::CommonName, names[0].clone());
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca).map_err(g)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let server: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
    let (scert, skey) = leaf(server.clone(), ExtendedKeyUsagePurpose::ServerAuth)?;
    let (ccert, ckey) = leaf(
        vec![client_name.to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let write = |name: &str, text: &str, private: bool| -> Result<(), TlsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let err = |source| TlsError::Write {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&path)
            .map_err(err)?;
        io::Write::write_all(&mut f, text.as_bytes()).map_err(err)
    };
    write("ca-cert.pem", &ca.pem(), false)?;
    write("server-cert.pem", &scert, false)?;
    write("server-key.pem", &skey, true)?;
    write("client-cert.pem", &ccert, false)?;
    write("client-key.pem", &ckey, true)?;
    Ok(Generated {
        dir: dir.into(),
        server_names: server,
        client_name: client_name.into(),
    })
}
