//! Transport errors.

use std::io;

use crate::memory::OutOfRange;

/// Everything that can go wrong on a channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io_uring instance could not be created.
    #[error("could not create an io_uring instance with {entries} entries: {source}")]
    RingSetup {
        /// Requested submission queue size.
        entries: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Registering memory as fixed buffers failed.
    #[error(
        "could not register {bytes} bytes of memory as {count} fixed buffers \
         (RLIMIT_MEMLOCK is {memlock}): {source}"
    )]
    Register {
        /// Total bytes being registered.
        bytes: usize,
        /// Number of buffers.
        count: usize,
        /// The soft RLIMIT_MEMLOCK at the time, as text.
        memlock: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A send failed.
    #[error("sending failed after {sent} bytes of a batch of {total}: {source}")]
    Send {
        /// Bytes of the batch the kernel accepted.
        sent: u64,
        /// Bytes in the batch.
        total: u64,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A receive failed.
    #[error("receiving failed at stream offset {offset}: {source}")]
    Recv {
        /// Bytes consumed from the stream before the failing record.
        offset: u64,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The peer closed the stream in the middle of a record.
    #[error(
        "the peer closed the stream in the middle of the record at stream offset {offset}: \
         {missing} bytes of it never arrived"
    )]
    UnexpectedEof {
        /// Stream offset of the record's header.
        offset: u64,
        /// Bytes of the record that were missing.
        missing: u64,
    },
    /// The decoder refused a header.
    #[error("the record at stream offset {offset} was refused: {reason}")]
    Refused {
        /// Stream offset of the record's header.
        offset: u64,
        /// The decoder's reason.
        reason: String,
    },
    /// A received record points outside guest memory; nothing of it was written.
    #[error("the record at stream offset {offset} points outside guest memory ({range}); nothing was written")]
    OutOfRange {
        /// Stream offset of the record's header.
        offset: u64,
        /// The offending range.
        range: OutOfRange,
    },
    /// A record to send points outside guest memory.
    #[error("record {index} of the batch to send points outside guest memory ({range})")]
    SendOutOfRange {
        /// Index of the record in the batch.
        index: usize,
        /// The offending range.
        range: OutOfRange,
    },
    /// A received payload is larger than the caller's buffer.
    #[error("the record at stream offset {offset} carries {len} bytes but the buffer holds {cap}")]
    BufferTooSmall {
        /// Stream offset of the record's header.
        offset: u64,
        /// Payload length.
        len: u64,
        /// Buffer capacity.
        cap: usize,
    },
    /// An earlier error left the stream at an unknown position.
    #[error("the channel is unusable after an earlier error")]
    Broken,
    /// Setting up a channel set failed.
    #[error("channel set handshake failed: {0}")]
    Handshake(String),
    /// A socket operation outside the data path failed.
    #[error("socket setup failed: {0}")]
    Socket(#[source] io::Error),
}
