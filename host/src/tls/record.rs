//! TLS 1.3 record protection (RFC 8446, section 5.2) on keys taken from a finished rustls
//! handshake: what the kernel's kTLS does, in user space, for a kernel that has none.
//!
//! A protected record on the wire is a 5-byte header (type 23, version 0x0303, length) and
//! `length` bytes of AEAD output: the plaintext, one byte of inner content type, and the
//! 16-byte tag. The nonce is the traffic IV with the record's 64-bit sequence number XORed
//! into its last 8 bytes; the additional data is the header. Keys are never updated (Ferry's
//! peers send no `KeyUpdate`); a direction refuses to go past [`MAX_RECORDS`] records.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

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
    /// The handshake chose a cipher suite this layer does not implement.
    #[error("the handshake chose a cipher suite the record layer does not implement")]
    UnsupportedSuite,
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

impl Direction {
    /// The direction rustls handed over, starting at sequence number `seq`.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Direction, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let unbound =
            UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Direction, Direction) {
        let mk = || {
            Direction::new(
                0,
                ConnectionTrafficSecrets::Aes256Gcm {
                    key: [7u8; 32].into(),
                    iv: [9u8; 12].into(),
                },
            )
            .unwrap()
        };
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
