//! TLS 1.3 record protection (RFC 8446, section 5.2) on keys a finished handshake negotiated
//! (feature `tls`): what the kernel's kTLS does, in user space, for a kernel that has none; and
//! [`TlsChannel`], a channel whose records travel inside protected TLS records.
//!
//! A protected record on the wire is a 5-byte header (type 23, version 0x0303, length) and
//! `length` bytes of AEAD output: the plaintext, one byte of inner content type, and the
//! 16-byte tag. The nonce is the traffic IV with the record's 64-bit sequence number XORed
//! into its last 8 bytes; the additional data is the header. Keys are never updated (Ferry's
//! peers send no `KeyUpdate`); a direction refuses to go past [`MAX_RECORDS`] records.

use std::io;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};

use crate::channel::{Channel, Stream};
use crate::error::Error;
use crate::memory::{GuestMap, MemRegion};
use crate::record::{Decoder, OutRecord, Received};
use crate::recv::{RawRead, Receiver, RecvStrategy};
use crate::segments::{flatten, Seg};

/// Length of a record header.
pub const HEADER: usize = 5;
/// Most plaintext bytes in one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Length of the AEAD tag (every TLS 1.3 suite).
pub const TAG: usize = 16;
/// Most bytes after the header of a record Ferry accepts: plaintext, content type, tag.
/// (RFC 8446 allows 2^14 + 256 for padding; Ferry's peers do not pad.)
pub const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// Records one direction may carry under one key. AES-GCM's confidentiality margin under
/// RFC 8446 section 5.5 is 2^24.5 full records; Ferry stops short of it rather than update
/// keys: 2^24 records of 16 KiB are 256 GiB.
pub const MAX_RECORDS: u64 = 1 << 24;

/// Outer content type of every protected record.
const APPLICATION_DATA: u8 = 23;
/// Inner content type of an alert.
const ALERT: u8 = 21;

/// What an opened record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: the first `n` bytes of the body, decrypted in place.
    Data(usize),
    /// The peer's `close_notify`: the orderly end of its direction.
    CloseNotify,
}

/// Why a record could not be protected or opened.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The key or IV does not fit the cipher suite.
    #[error("the handshake's key or IV does not fit its cipher suite")]
    BadKey,
    /// A header with a wrong type, version or length.
    #[error("a record header is malformed (type {kind}, length {len})")]
    BadHeader {
        /// The outer content type.
        kind: u8,
        /// The stated length.
        len: usize,
    },
    /// The tag did not verify: the record was altered, replayed or cut.
    #[error("a record failed authentication: it was altered, replayed or reordered")]
    Authentication,
    /// The peer sent an alert other than `close_notify`.
    #[error("the peer sent TLS alert {description} (level {level})")]
    Alert {
        /// Alert level.
        level: u8,
        /// Alert description.
        description: u8,
    },
    /// A record of a content type Ferry's peers never send after the handshake.
    #[error("the peer sent a record of content type {0} after the handshake")]
    UnexpectedContent(u8),
    /// This direction carried [`MAX_RECORDS`] records.
    #[error("a connection reached the most records one key may protect")]
    KeyExhausted,
}

/// One direction's key, IV and sequence number.
pub struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("algorithm", self.key.algorithm())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The TLS 1.3 cipher suites' record protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// TLS_AES_128_GCM_SHA256.
    Aes128Gcm,
    /// TLS_AES_256_GCM_SHA384.
    Aes256Gcm,
    /// TLS_CHACHA20_POLY1305_SHA256.
    Chacha20Poly1305,
}

impl Direction {
    /// One direction under `suite` with traffic `key` and `iv`, starting at sequence number
    /// `seq` (the records the handshake already protected).
    pub fn new(suite: Suite, key: &[u8], iv: &[u8], seq: u64) -> Result<Direction, RecordError> {
        let alg = match suite {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        };
        let unbound = UnboundKey::new(alg, key).map_err(|_| RecordError::BadKey)?;
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| RecordError::BadKey)?;
        Ok(Direction {
            key: LessSafeKey::new(unbound),
            iv,
            seq,
        })
    }

    /// The nonce of the next record, advancing the sequence number.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= MAX_RECORDS {
            return Err(RecordError::KeyExhausted);
        }
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Protects `len` plaintext bytes already placed at `record[HEADER..HEADER + len]`:
    /// writes the header, the content type and the tag around them and encrypts in place.
    /// `record` must hold `HEADER + len + 1 + TAG` bytes; returns that length.
    pub fn seal(&mut self, record: &mut [u8], len: usize) -> Result<usize, RecordError> {
        self.seal_typed(record, len, APPLICATION_DATA)
    }

    /// Protects a `close_notify` alert into `record` (at least 24 bytes); returns its length.
    pub fn seal_close_notify(&mut self, record: &mut [u8]) -> Result<usize, RecordError> {
        record[HEADER] = 1;
        record[HEADER + 1] = 0;
        self.seal_typed(record, 2, ALERT)
    }

    fn seal_typed(
        &mut self,
        record: &mut [u8],
        len: usize,
        inner: u8,
    ) -> Result<usize, RecordError> {
        debug_assert!(len <= MAX_PLAINTEXT);
        let body = len + 1 + TAG;
        let total = HEADER + body;
        record[0] = APPLICATION_DATA;
        record[1..3].copy_from_slice(&[3, 3]);
        record[3..5].copy_from_slice(&(body as u16).to_be_bytes());
        record[HEADER + len] = inner;
        let nonce = self.next_nonce()?;
        let (head, rest) = record.split_at_mut(HEADER);
        let aad = Aad::from(
            <[u8; HEADER]>::try_from(&head[..]).map_err(|_| RecordError::Authentication)?,
        );
        let (plain, tail) = rest.split_at_mut(len + 1);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aad, plain)
            .map_err(|_| RecordError::Authentication)?;
        tail[..TAG].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Checks a record header; returns the body length that follows it.
    pub fn body_len(header: &[u8; HEADER]) -> Result<usize, RecordError> {
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != APPLICATION_DATA
            || header[1..3] != [3, 3]
            || !(1 + TAG..=MAX_BODY).contains(&len)
        {
            return Err(RecordError::BadHeader {
                kind: header[0],
                len,
            });
        }
        Ok(len)
    }

    /// Opens the record whose header is `header` and whose body is `body` (decrypted in
    /// place).
    pub fn open(&mut self, header: &[u8; HEADER], body: &mut [u8]) -> Result<Opened, RecordError> {
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(*header), body)
            .map_err(|_| RecordError::Authentication)?;
        // Strip padding: the last non-zero byte is the inner content type.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::UnexpectedContent(0));
        };
        match plain[at] {
            APPLICATION_DATA => Ok(Opened::Data(at)),
            ALERT if at == 2 && plain[..2] == [1, 0] => Ok(Opened::CloseNotify),
            ALERT if at == 2 => Err(RecordError::Alert {
                level: plain[0],
                description: plain[1],
            }),
            other => Err(RecordError::UnexpectedContent(other)),
        }
    }
}

/// The record protection of one connection, both directions, as its handshake left it.
#[derive(Debug)]
pub struct Protection {
    /// What this side sends.
    pub tx: Direction,
    /// What this side receives.
    pub rx: Direction,
}

/// Bytes read from the socket per receive call.
const CIPHER_BUF: usize = 256 << 10;

/// Writes all of `buf` to `fd` without raising SIGPIPE.
pub fn send_all(fd: i32, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live, readable slice for the duration of the call.
        let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[r as usize..];
    }
    Ok(())
}

/// The receive side of a protected stream: reads records in large chunks, opens each in
/// place, and hands out its plaintext.
#[derive(Debug)]
pub struct RecordReader {
    fd: i32,
    rx: Direction,
    buf: Vec<u8>,
    /// Unread bytes of the buffer: `at..end`.
    at: usize,
    end: usize,
    /// Plaintext of the record opened last, not yet handed out: `plain..plain_end`.
    plain: usize,
    plain_end: usize,
    /// The peer's `close_notify` arrived: the orderly end.
    closed: bool,
}

impl RecordReader {
    /// Reads from the socket `fd` under `rx`.
    pub fn new(fd: i32, rx: Direction) -> RecordReader {
        RecordReader {
            fd,
            rx,
            buf: vec![0u8; CIPHER_BUF.max(HEADER + MAX_BODY)],
            at: 0,
            end: 0,
            plain: 0,
            plain_end: 0,
            closed: false,
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.at > 0 && (self.end == self.at || self.buf.len() - self.end < HEADER + MAX_BODY) {
            self.buf.copy_within(self.at..self.end, 0);
            self.end -= self.at;
            // The plaintext window was handed out before any fill.
            self.plain = 0;
            self.plain_end = 0;
            self.at = 0;
        }
        loop {
            let room = &mut self.buf[self.end..];
            // SAFETY: `room` is a live, writable slice for the duration of the call.
            let r = unsafe { libc::recv(self.fd, room.as_mut_ptr().cast(), room.len(), 0) };
            if r >= 0 {
                self.end += r as usize;
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Opens the next record; `Ok(false)` at the end of the stream (after `close_notify`, or
    /// a cut between records, which the caller treats as it treats end of stream).
    fn next_record(&mut self) -> io::Result<bool> {
        loop {
            if self.closed {
                return Ok(false);
            }
            let have = self.end - self.at;
            if have >= HEADER {
                let mut header = [0u8; HEADER];
                header.copy_from_slice(&self.buf[self.at..self.at + HEADER]);
                let len = Direction::body_len(&header).map_err(invalid)?;
                if have >= HEADER + len {
                    let body = self.at + HEADER;
                    let opened = self
                        .rx
                        .open(&header, &mut self.buf[body..body + len])
                        .map_err(invalid)?;
                    self.at = body + len;
                    match opened {
                        Opened::Data(n) => {
                            self.plain = body;
                            self.plain_end = body + n;
                            if n > 0 {
                                return Ok(true);
                            }
                        }
                        Opened::CloseNotify => self.closed = true,
                    }
                    continue;
                }
            }
            if self.fill()? == 0 {
                if self.end > self.at {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended inside a TLS record",
                    ));
                }
                return Ok(false);
            }
        }
    }

    /// Reads plaintext into `buf` (at most what is left of one record); 0 at the end of the
    /// stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.copy_out(buf.as_mut_ptr(), buf.len())
    }

    /// Whether the stream ended with the peer's `close_notify` (not cut between records).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Copies up to `len` bytes of plaintext to `dst`, opening a record when none is left;
    /// 0 at the end of the stream.
    fn copy_out(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        if self.plain == self.plain_end && !self.next_record()? {
            return Ok(0);
        }
        let n = (self.plain_end - self.plain).min(len);
        // SAFETY: `plain..plain + n` lies in the buffer; `dst` points to at least `len >= n`
        // writable bytes (the framer's checked guest range, header or buffer), which cannot
        // overlap the reader's private buffer.
        unsafe { core::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.plain), dst, n) };
        self.plain += n;
        Ok(n)
    }
}

fn invalid(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl RawRead for RecordReader {
    fn read_staging(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        self.copy_out(dst, len)
    }

    fn read_full(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        let mut done = 0;
        while done < len {
            // `done < len`: the pointer stays inside the caller's range.
            let n = self.copy_out(dst.wrapping_add(done), len - done)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

/// A channel whose stream travels in TLS 1.3 records on the keys of a finished handshake.
/// Sending gathers each batch's headers and payloads (straight from guest memory) into
/// records and seals them in one buffer, sent with one write; receiving opens records in a
/// private buffer and copies payloads to their checked place, as the std transport does.
#[derive(Debug)]
pub struct TlsChannel {
    stream: Stream,
    map: GuestMap,
    tx: Direction,
    reader: RecordReader,
    receiver: Receiver,
    headers: Vec<[u8; crate::record::HEADER_LEN]>,
    segs: Vec<Seg>,
    out: Vec<u8>,
    broken: bool,
}

// SAFETY: the raw pointers held between calls point into guest regions (usable from any
// thread by `MemRegion`'s contract) or into the channel's own buffers.
unsafe impl Send for TlsChannel {}

/// Sealed bytes gathered before a write.
const SEND_CHUNK: usize = 16 * MAX_PLAINTEXT;

impl TlsChannel {
    /// A channel over `stream`, protected by `protection`, that may send from and receive
    /// into `regions`.
    pub fn new(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        protection: Protection,
    ) -> Result<TlsChannel, Error> {
        let stream = stream.into();
        stream.prepare().map_err(Error::Socket)?;
        let fd = stream.fd();
        Ok(TlsChannel {
            stream,
            map: GuestMap::new(regions),
            tx: protection.tx,
            reader: RecordReader::new(fd, protection.rx),
            receiver: Receiver::new(HEADER_LEN_MIN, RecvStrategy::Direct),
            headers: Vec::new(),
            segs: Vec::new(),
            out: Vec::with_capacity(
                SEND_CHUNK / MAX_PLAINTEXT * (HEADER + MAX_PLAINTEXT + 1 + TAG),
            ),
            broken: false,
        })
    }

    /// Seals the plaintext gathered at `out[start + HEADER..]` into its record.
    fn seal_open_record(&mut self, start: usize) -> Result<(), RecordError> {
        let len = self.out.len() - start - HEADER;
        self.out.resize(start + HEADER + len + 1 + TAG, 0);
        self.tx.seal(&mut self.out[start..], len)?;
        Ok(())
    }

    fn send_segs(&mut self) -> Result<(), Error> {
        let fd = self.stream.fd();
        let total: u64 = self.segs.iter().map(|s| s.len as u64).sum();
        let mut sent = 0u64;
        let fail = |sent, source| Error::Send {
            sent,
            total,
            source,
        };
        self.out.clear();
        // The record being filled starts at `open` (its header's place).
        let mut open = 0;
        self.out.resize(HEADER, 0);
        let segs = std::mem::take(&mut self.segs);
        let mut result = Ok(());
        'all: for s in &segs {
            let mut off = 0;
            while off < s.len {
                let room = MAX_PLAINTEXT - (self.out.len() - open - HEADER);
                let n = room.min(s.len - off);
                // SAFETY: `s.ptr + off .. + n` lies inside the segment: a header owned by this
                // channel, caller bytes borrowed for this call, or a checked guest range.
                let src = unsafe { std::slice::from_raw_parts(s.ptr.add(off), n) };
                self.out.extend_from_slice(src);
                off += n;
                if self.out.len() - open - HEADER == MAX_PLAINTEXT {
                    if let Err(e) = self.seal_open_record(open) {
                        result = Err(fail(sent, invalid(e)));
                        break 'all;
                    }
                    if self.out.len() >= SEND_CHUNK {
                        if let Err(e) = send_all(fd, &self.out) {
                            result = Err(fail(sent, e));
                            break 'all;
                        }
                        sent += self.out.len() as u64;
                        self.out.clear();
                    }
                    open = self.out.len();
                    self.out.resize(open + HEADER, 0);
                }
            }
        }
        self.segs = segs;
        result?;
        if self.out.len() > open + HEADER {
            self.seal_open_record(open)
                .map_err(|e| fail(sent, invalid(e)))?;
        } else {
            self.out.truncate(open);
        }
        send_all(fd, &self.out).map_err(|e| fail(sent, e))
    }
}

/// Staging the std framer needs even when every read is direct.
const HEADER_LEN_MIN: usize = 4 * crate::record::HEADER_LEN;

impl Channel for TlsChannel {
    fn send(&mut self, records: &[OutRecord<'_>]) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        flatten(&self.map, records, &mut self.headers, &mut self.segs)?;
        let r = self.send_segs();
        self.segs.clear();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        Ok(())
    }

    fn recv<D: Decoder>(
        &mut self,
        decoder: &mut D,
        buf: &mut [u8],
    ) -> Result<Option<Received>, Error> {
        self.receiver
            .recv(&mut self.reader, &self.map, decoder, buf)
    }

    fn name(&self) -> &'static str {
        "tls"
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Direction, Direction) {
        let mk = || Direction::new(Suite::Aes256Gcm, &[7u8; 32], &[9u8; 12], 0).unwrap();
        (mk(), mk())
    }

    #[test]
    fn a_sealed_record_opens_and_a_changed_one_does_not() {
        let (mut tx, mut rx) = pair();
        let mut rec = [0u8; HEADER + 5 + 1 + TAG];
        rec[HEADER..HEADER + 5].copy_from_slice(b"hello");
        let n = tx.seal(&mut rec, 5).unwrap();
        assert_eq!(n, rec.len());
        assert_eq!(&rec[..HEADER], &[23, 3, 3, 0, 22]);
        let mut copy = rec;
        let h: [u8; HEADER] = rec[..HEADER].try_into().unwrap();
        assert_eq!(Direction::body_len(&h).unwrap(), 22);
        assert_eq!(rx.open(&h, &mut rec[HEADER..]).unwrap(), Opened::Data(5));
        assert_eq!(&rec[HEADER..HEADER + 5], b"hello");
        // The same bytes again (a replay) are under the next sequence number: refused.
        assert_eq!(
            rx.open(&h, &mut copy[HEADER..]).unwrap_err(),
            RecordError::Authentication
        );
    }

    #[test]
    fn a_flipped_bit_fails_authentication() {
        let (mut tx, mut rx) = pair();
        let mut rec = [0u8; HEADER + 4 + 1 + TAG];
        rec[HEADER..HEADER + 4].copy_from_slice(b"page");
        tx.seal(&mut rec, 4).unwrap();
        rec[HEADER + 1] ^= 0x40;
        let h: [u8; HEADER] = rec[..HEADER].try_into().unwrap();
        assert_eq!(
            rx.open(&h, &mut rec[HEADER..]).unwrap_err(),
            RecordError::Authentication
        );
    }

    #[test]
    fn close_notify_round_trips() {
        let (mut tx, mut rx) = pair();
        let mut rec = [0u8; 32];
        let n = tx.seal_close_notify(&mut rec).unwrap();
        let h: [u8; HEADER] = rec[..HEADER].try_into().unwrap();
        assert_eq!(
            rx.open(&h, &mut rec[HEADER..n]).unwrap(),
            Opened::CloseNotify
        );
    }

    #[test]
    fn headers_of_other_types_or_lengths_are_refused() {
        for h in [
            [22u8, 3, 3, 0, 40],
            [23, 3, 1, 0, 40],
            [23, 3, 3, 0, 3],
            [23, 3, 3, 0x41, 0x01],
        ] {
            assert!(matches!(
                Direction::body_len(&h),
                Err(RecordError::BadHeader { .. })
            ));
        }
    }
}
