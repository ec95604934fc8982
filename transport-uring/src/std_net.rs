//! The plain blocking transport: `std::net` sockets, `sendmsg` gathers, `recv` reads. Same
//! interface as the io_uring channel; the fallback when io_uring is unavailable and the
//! baseline of the benchmarks.

use std::io;

use crate::channel::{Channel, Stream};
use crate::error::Error;
use crate::memory::{GuestMap, MemRegion};
use crate::record::{Decoder, OutRecord, Payload, Received, HEADER_LEN};
use crate::recv::{RawRead, Receiver, RecvStrategy};
use crate::segments::{flatten, from_offset, Seg};

/// Iovecs per `sendmsg`.
const IOV_MAX: usize = 1024;

/// A channel over one blocking stream socket.
#[derive(Debug)]
pub struct StdChannel {
    stream: Stream,
    map: GuestMap,
    receiver: Receiver,
    headers: Vec<[u8; HEADER_LEN]>,
    segs: Vec<Seg>,
    iov: Vec<libc::iovec>,
    broken: bool,
}

// SAFETY: the raw pointers held between calls point into guest regions (usable from any
// thread by `MemRegion`'s contract) or into the channel's own buffers.
unsafe impl Send for StdChannel {}

/// Reads from a raw socket descriptor.
struct Fd(i32);

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl RawRead for Fd {
    fn read_staging(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: `dst` points to `len` writable bytes of the staging buffer.
            let r = cvt(unsafe { libc::recv(self.0, dst.cast(), len, 0) });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn read_full(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        let mut done = 0;
        while done < len {
            // SAFETY: `dst + done .. dst + len` is writable: a checked guest range, the
            // caller's buffer or a header array, per the framer.
            let r = cvt(unsafe {
                libc::recv(self.0, dst.add(done).cast(), len - done, libc::MSG_WAITALL)
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(0) => break,
                Ok(n) => done += n,
            }
        }
        Ok(done)
    }
}

impl StdChannel {
    /// Builds a channel over `stream` that may send from and receive into `regions`.
    pub fn new(
        stream: impl Into<Stream>,
        regions: &[MemRegion],
        staging_len: usize,
        strategy: RecvStrategy,
    ) -> Result<Self, Error> {
        let stream = stream.into();
        stream.prepare().map_err(Error::Socket)?;
        Ok(Self {
            stream,
            map: GuestMap::new(regions),
            receiver: Receiver::new(staging_len, strategy),
            headers: Vec::new(),
            segs: Vec::new(),
            iov: Vec::with_capacity(IOV_MAX),
            broken: false,
        })
    }

    fn write_segs(&mut self) -> Result<(), Error> {
        let total: u64 = self.segs.iter().map(|s| s.len as u64).sum();
        let mut sent = 0u64;
        let fd = self.stream.fd();
        while sent < total {
            self.iov.clear();
            for s in from_offset(&self.segs, sent).take(IOV_MAX) {
                self.iov.push(libc::iovec {
                    iov_base: s.ptr as *mut _,
                    iov_len: s.len,
                });
            }
            // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
            let mut m: libc::msghdr = unsafe { core::mem::zeroed() };
            m.msg_iov = self.iov.as_mut_ptr();
            m.msg_iovlen = self.iov.len();
            // SAFETY: every iovec points to readable bytes (headers owned here, caller bytes
            // borrowed for this call, checked guest ranges) that outlive the call.
            let r = cvt(unsafe { libc::sendmsg(fd, &m, libc::MSG_NOSIGNAL) });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Send {
                        sent,
                        total,
                        source,
                    })
                }
                Ok(0) => {
                    return Err(Error::Send {
                        sent,
                        total,
                        source: io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the socket accepted no bytes",
                        ),
                    })
                }
                Ok(n) => sent += n as u64,
            }
        }
        Ok(())
    }
}

impl Channel for StdChannel {
    fn send(&mut self, records: &[OutRecord<'_>]) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        for (i, rec) in records.iter().enumerate() {
            if let Payload::Guest {
                region,
                offset,
                len,
            } = rec.payload
            {
                self.map
                    .check(region, offset, len)
                    .map_err(|range| Error::SendOutOfRange { index: i, range })?;
            }
        }
        flatten(&self.map, records, &mut self.headers, &mut self.segs)?;
        let r = self.write_segs();
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
        let mut fd = Fd(self.stream.fd());
        self.receiver.recv(&mut fd, &self.map, decoder, buf)
    }

    fn name(&self) -> &'static str {
        "std"
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }
}
