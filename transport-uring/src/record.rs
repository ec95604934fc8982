//! What a channel sends and where a received payload goes.

/// Length of every record header on the stream (see the wire contract).
pub const HEADER_LEN: usize = 32;

/// The payload that follows a header on the stream.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// No payload: the header says `payload_len = 0`.
    None,
    /// `len` bytes of guest memory starting at byte `offset` of region `region`; sent straight
    /// from the registered memory, no copy in user space.
    Guest {
        /// Region index, among the regions the channel was built with.
        region: u32,
        /// Byte offset inside the region.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Bytes in caller memory (device state, return-path messages). A batch holding such a
    /// payload is complete when [`crate::Channel::send`] returns.
    Bytes(&'a [u8]),
}

impl Payload<'_> {
    /// Number of payload bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Payload::None => 0,
            Payload::Guest { len, .. } => len,
            Payload::Bytes(b) => b.len() as u64,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One record to send: a 32-byte header and its payload.
#[derive(Clone, Copy, Debug)]
pub struct OutRecord<'a> {
    /// The encoded header; its `payload_len` must equal `payload.len()`.
    pub header: [u8; HEADER_LEN],
    /// The payload that follows it.
    pub payload: Payload<'a>,
}

/// Where the payload of a received record goes, as a [`Decoder`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// No payload follows the header.
    Empty,
    /// Into guest memory: region `region`, byte `offset`, `len` bytes. Checked against the
    /// channel's regions before a single byte is written.
    Guest {
        /// Region index.
        region: u32,
        /// Byte offset inside the region.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Into the caller's buffer passed to `recv`, at its start.
    Buffer {
        /// Number of bytes.
        len: u64,
    },
    /// Read and thrown away.
    Discard {
        /// Number of bytes.
        len: u64,
    },
}

impl Placement {
    /// Number of payload bytes following the header.
    pub fn len(&self) -> u64 {
        match *self {
            Placement::Empty => 0,
            Placement::Guest { len, .. }
            | Placement::Buffer { len }
            | Placement::Discard { len } => len,
        }
    }

    /// Whether no payload follows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decides, from a header, where the record's payload goes. The transport knows nothing else
/// of the wire format.
pub trait Decoder {
    /// Why a header was refused.
    type Error: core::fmt::Display;

    /// Decodes `header` and says where its payload goes.
    fn place(&mut self, header: &[u8; HEADER_LEN]) -> Result<Placement, Self::Error>;
}

/// A record that arrived: its header and where its payload was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The header as it came off the stream.
    pub header: [u8; HEADER_LEN],
    /// Where the payload went (already there when this is returned).
    pub placement: Placement,
}
