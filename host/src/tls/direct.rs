//! A protected connection used straight from the threads that read and write it, with no relay
//! in between: the reading thread opens records as it reads, the writing thread seals what it
//! writes. The urgent connection goes this way, so that a page request and its reply cross no
//! thread hand-off; control keeps the relay, whose plain stream its deadlines and shutdowns
//! expect.

use std::io::{self, Read, Write};

use crate::link::Conn;
use ferry_uring::tls::{
    send_all, Direction, Protection, RecordError, RecordReader, HEADER, MAX_PLAINTEXT, TAG,
};

/// Plaintext sealed per send: up to 16 records.
pub(super) const BATCH_PLAIN: usize = 16 * MAX_PLAINTEXT;

/// A buffer that holds the records of [`BATCH_PLAIN`] bytes of plaintext.
pub(super) fn batch_buffer() -> Vec<u8> {
    vec![0u8; (BATCH_PLAIN / MAX_PLAINTEXT) * (HEADER + MAX_PLAINTEXT + 1 + TAG)]
}

/// Seals `plain` (at most [`BATCH_PLAIN`] bytes) into records at the start of `wire` (a
/// [`batch_buffer`]); returns their length.
pub(super) fn seal_batch(
    tx: &mut Direction,
    plain: &[u8],
    wire: &mut [u8],
) -> Result<usize, RecordError> {
    let mut out = 0;
    for chunk in plain.chunks(MAX_PLAINTEXT) {
        let rec = &mut wire[out..out + HEADER + chunk.len() + 1 + TAG];
        rec[HEADER..HEADER + chunk.len()].copy_from_slice(chunk);
        out += tx.seal(rec, chunk.len())?;
    }
    Ok(out)
}

/// Ends the sending direction of `net` the orderly way: `close_notify`, then a half close.
pub(super) fn close_write(tx: &mut Direction, net: &Conn) {
    let mut rec = [0u8; HEADER + 2 + 1 + TAG];
    if let Ok(len) = tx.seal_close_notify(&mut rec) {
        let _ = send_all(net.fd(), &rec[..len]);
    }
    let _ = match net {
        Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
    };
}

/// The receiving half: records are read in large chunks and opened in place; a record that
/// fails to open is an error (its [`ferry_uring::tls::RecordError`] inside the `io::Error`),
/// never bytes.
#[derive(Debug)]
pub struct OpenedReader {
    /// Keeps the socket the reader reads open.
    _net: Conn,
    records: RecordReader,
}

impl Read for OpenedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.records.read(buf)
    }
}

/// The sending half: each write is sealed into records and sent at once. Dropping it sends
/// `close_notify` and ends the connection's sending direction.
#[derive(Debug)]
pub struct SealedWriter {
    net: Conn,
    tx: Direction,
    wire: Vec<u8>,
}

impl Write for SealedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(BATCH_PLAIN);
        let out =
            seal_batch(&mut self.tx, &buf[..take], &mut self.wire).map_err(io::Error::other)?;
        send_all(self.net.fd(), &self.wire[..out])?;
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SealedWriter {
    fn drop(&mut self) {
        close_write(&mut self.tx, &self.net);
    }
}

/// The two halves of `net`, whose handshake left `protection`.
pub fn halves(net: Conn, protection: Protection) -> io::Result<(OpenedReader, SealedWriter)> {
    let reader = OpenedReader {
        records: RecordReader::new(net.fd(), protection.rx),
        _net: net.try_clone()?,
    };
    let writer = SealedWriter {
        net,
        tx: protection.tx,
        wire: batch_buffer(),
    };
    Ok((reader, writer))
}
