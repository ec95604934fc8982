//! ferry-uring: the channels that carry Ferry's migration stream.
//!
//! A [`Channel`] carries 32-byte-header records (see the wire contract) over one TCP or Unix
//! stream socket. Two transports implement it:
//!
//! - [`UringChannel`]: one io_uring per channel; guest memory registered as fixed buffers (in
//!   pieces of at most 1 GiB), headers in a registered slab, payloads sent straight from guest
//!   memory (`SEND` with a fixed buffer, or `SEND_ZC` with its notifications awaited before a
//!   buffer is reused), many records per submit, short writes resumed; received payloads land
//!   in place after a bounds check.
//! - [`StdChannel`]: blocking `std::net` sockets with the same interface; the fallback when
//!   io_uring is unavailable and the benchmark baseline.
//!
//! The transport knows nothing of the wire format beyond the header length: a [`Decoder`]
//! says where each payload goes ([`WireDecoder`] is the one backed by `ferry_core::wire`).
//! [`probe()`] finds, once, what the kernel offers and says it in one line. [`ChannelSet`]
//! groups N bulk channels and one urgent channel.

mod channel;
mod error;
mod memory;
mod probe;
mod record;
mod recv;
mod segments;
mod std_net;
#[cfg(feature = "tls")]
pub mod tls;
mod uring;
mod wire_decoder;

pub use channel::{
    bulk_channel_for, share_out, AnyChannel, Channel, ChannelSet, Stream, Transport, STRIPE_PAGES,
};
pub use error::Error;
pub use memory::{MemRegion, OutOfRange, MAX_FIXED_BUFFER};
pub use probe::{probe, ProbeReport};
pub use record::{Decoder, OutRecord, Payload, Placement, Received, HEADER_LEN};
pub use recv::RecvStrategy;
pub use std_net::StdChannel;
pub use uring::{UringChannel, UringConfig};
pub use wire_decoder::{WireDecodeError, WireDecoder};
