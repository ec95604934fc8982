//! Record framing on the receive side, shared by both transports.
//!
//! Headers are read, handed to a [`Decoder`], checked against guest memory and only then is the
//! payload moved to its place: straight from the socket (direct), or through a staging buffer
//! read in large chunks and copied out (staged), or the former for long payloads and the latter
//! for short ones (hybrid, the default).

use std::io;

use crate::error::Error;
use crate::memory::GuestMap;
use crate::record::{Decoder, Placement, Received, HEADER_LEN};

/// How received payloads reach their place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvStrategy {
    /// Every header and every payload is read straight to its destination: two reads per record.
    Direct,
    /// The stream is read in large chunks into a (registered) staging buffer; headers are parsed
    /// there and payloads copied to their place.
    Staged,
    /// Staged, except that a payload with at least `direct_min` bytes not yet in the staging
    /// buffer is read straight into place.
    Hybrid {
        /// Threshold in bytes.
        direct_min: usize,
    },
}

impl Default for RecvStrategy {
    fn default() -> Self {
        RecvStrategy::Hybrid {
            direct_min: 64 << 10,
        }
    }
}

/// The two reads a transport provides to the framer.
pub(crate) trait RawRead {
    /// Reads what is available, at most `len` bytes, into the staging buffer at `dst`; waits for
    /// at least one byte. Returns 0 at end of stream.
    fn read_staging(&mut self, dst: *mut u8, len: usize) -> io::Result<usize>;
    /// Reads `len` bytes into `dst`, waiting for all of them; fewer only at end of stream.
    fn read_full(&mut self, dst: *mut u8, len: usize) -> io::Result<usize>;
}

/// Largest single read asked of the kernel.
const MAX_READ: usize = 1 << 30;

/// Receive state of one channel.
#[derive(Debug)]
pub(crate) struct Receiver {
    staging: Vec<u8>,
    head: usize,
    tail: usize,
    pos: u64,
    strategy: RecvStrategy,
    broken: bool,
    /// The last payload was read straight into place (hybrid): the next header is read on
    /// its own too, so that a staged read does not swallow the start of another long
    /// payload, which would then be copied instead of received in place.
    after_direct: bool,
}

impl Receiver {
    pub(crate) fn new(staging_len: usize, strategy: RecvStrategy) -> Self {
        Self {
            staging: vec![0u8; staging_len.max(HEADER_LEN * 4)],
            head: 0,
            tail: 0,
            pos: 0,
            strategy,
            broken: false,
            after_direct: false,
        }
    }

    /// The staging buffer's base and length, for registration.
    pub(crate) fn staging_raw(&mut self) -> (*mut u8, usize) {
        (self.staging.as_mut_ptr(), self.staging.len())
    }

    /// Bytes of the stream consumed so far.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    /// Receives one record; `Ok(None)` when the peer closed the stream at a record boundary.
    pub(crate) fn recv<R: RawRead, D: Decoder>(
        &mut self,
        io: &mut R,
        map: &GuestMap,
        decoder: &mut D,
        buf: &mut [u8],
    ) -> Result<Option<Received>, Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        let r = self.recv_inner(io, map, decoder, buf);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Copies up to `len` staged bytes to `dst` (or drops them when `dst` is `None`).
    fn take(&mut self, dst: Option<*mut u8>, len: u64) -> usize {
        let n = ((self.tail - self.head) as u64).min(len) as usize;
        if n > 0 {
            if let Some(d) = dst {
                // SAFETY: `head..head + n` lies in the staging buffer; `d` points to at least
                // `len >= n` writable bytes (a checked guest range or the caller's buffer), and
                // the two cannot overlap since the staging buffer is private to the channel.
                unsafe {
                    core::ptr::copy_nonoverlapping(self.staging.as_ptr().add(self.head), d, n)
                };
            }
            self.head += n;
        }
        n
    }

    /// Reads more of the stream into the staging buffer. Returns the bytes read (0 at end).
    fn fill<R: RawRead>(&mut self, io: &mut R) -> Result<usize, Error> {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.tail == self.staging.len() {
            self.staging.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let room = self.staging.len() - self.tail;
        // SAFETY: `tail <= len`, so the pointer stays inside (or one past) the staging buffer.
        let dst = unsafe { self.staging.as_mut_ptr().add(self.tail) };
        let n = io.read_staging(dst, room).map_err(|source| Error::Recv {
            offset: self.pos,
            source,
        })?;
        self.tail += n.min(room);
        Ok(n)
    }

    fn recv_inner<R: RawRead, D: Decoder>(
        &mut self,
        io: &mut R,
        map: &GuestMap,
        decoder: &mut D,
        buf: &mut [u8],
    ) -> Result<Option<Received>, Error> {
        let offset = self.pos;
        let mut header = [0u8; HEADER_LEN];
        let hp = header.as_mut_ptr();
        let mut got = self.take(Some(hp), HEADER_LEN as u64);
        // After a long payload read in place, nothing is staged: read this header alone.
        let header_alone =
            self.strategy == RecvStrategy::Direct || (self.after_direct && self.head == self.tail);
        while got < HEADER_LEN {
            if header_alone {
                // SAFETY: `got < HEADER_LEN`, so the pointer stays inside `header`.
                let dst = unsafe { hp.add(got) };
                let want = HEADER_LEN - got;
                let n = io
                    .read_full(dst, want)
                    .map_err(|source| Error::Recv { offset, source })?;
                got += n;
                if n < want {
                    break;
                }
            } else {
                if self.fill(io)? == 0 {
                    break;
                }
                // SAFETY: as above.
                let dst = unsafe { hp.add(got) };
                got += self.take(Some(dst), (HEADER_LEN - got) as u64);
            }
        }
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            return Err(Error::UnexpectedEof {
                offset,
                missing: (HEADER_LEN - got) as u64,
            });
        }

        let placement = decoder.place(&header).map_err(|e| Error::Refused {
            offset,
            reason: e.to_string(),
        })?;
        let (dst, len) = match placement {
            Placement::Empty => (None, 0),
            Placement::Guest {
                region,
                offset: off,
                len,
            } => {
                let p = map
                    .check(region, off, len)
                    .map_err(|range| Error::OutOfRange { offset, range })?;
                (Some(p), len)
            }
            Placement::Buffer { len } => {
                if len > buf.len() as u64 {
                    return Err(Error::BufferTooSmall {
                        offset,
                        len,
                        cap: buf.len(),
                    });
                }
                (Some(buf.as_mut_ptr()), len)
            }
            Placement::Discard { len } => (None, len),
        };

        let at = |done: u64| dst.map(|d| d.wrapping_add(done as usize));
        let mut done = self.take(dst, len) as u64;
        self.after_direct = false;
        while done < len {
            let rem = len - done;
            let direct = match self.strategy {
                RecvStrategy::Direct => true,
                RecvStrategy::Staged => false,
                RecvStrategy::Hybrid { direct_min } => rem >= direct_min as u64,
            };
            match at(done) {
                Some(d) if direct => {
                    self.after_direct = matches!(self.strategy, RecvStrategy::Hybrid { .. });
                    let want = rem.min(MAX_READ as u64) as usize;
                    let n = io
                        .read_full(d, want)
                        .map_err(|source| Error::Recv { offset, source })?;
                    done += n as u64;
                    if n < want {
                        return Err(Error::UnexpectedEof {
                            offset,
                            missing: len - done,
                        });
                    }
                }
                d => {
                    if self.fill(io)? == 0 {
                        return Err(Error::UnexpectedEof {
                            offset,
                            missing: len - done,
                        });
                    }
                    done += self.take(d, rem) as u64;
                }
            }
        }
        self.pos += HEADER_LEN as u64 + len;
        Ok(Some(Received { header, placement }))
    }
}
