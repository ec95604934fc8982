//! The relay between a protected network connection and the plain stream the migration code
//! reads and writes: two threads per connection, one for each direction, each owning its
//! direction's key. The migration code keeps its sockets, its io_uring channels, its read
//! deadlines and its shutdowns; the relay seals what it writes and opens what it reads.
//!
//! Ends: when the migration side closes, the relay sends `close_notify` and shuts the network
//! connection's sending half; when the peer's `close_notify` or end of stream arrives, the
//! migration side sees end of stream. A record that fails to open, or any network error,
//! shuts both ends at once, so a reader blocked on either side wakes with an error rather
//! than act on unauthenticated bytes.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use super::direct::{batch_buffer, close_write, seal_batch, BATCH_PLAIN};
use crate::link::Conn;
use ferry_uring::tls::{send_all, Direction, RecordError, RecordReader, MAX_PLAINTEXT};
/// Socket buffers of the local pair: large, so a bulk channel's batches fit.
const LOCAL_BUFFER: libc::c_int = 4 << 20;

/// The first failure of a relay, kept for the error report.
pub type Fault = Arc<Mutex<Option<RecordError>>>;

fn set_buffers(s: &UnixStream) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket this function's caller owns, with a pointer to a
        // live c_int and its exact size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&LOCAL_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Reads into `buf`; 0 at end of stream.
fn recv_some(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, writable slice for the duration of the call.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Starts the relay for `net`, whose handshake gave `tx` and `rx`; returns the plain stream
/// for the migration code and the slot where the relay keeps its first failure.
pub fn spawn(net: Conn, tx: Direction, rx: Direction, name: &str) -> io::Result<(Conn, Fault)> {
    let (mine, theirs) = UnixStream::pair()?;
    set_buffers(&mine);
    set_buffers(&theirs);
    let fault: Fault = Arc::new(Mutex::new(None));
    let net_out = net.try_clone()?;
    let local_in = mine.try_clone()?;
    let f = fault.clone();
    thread::Builder::new()
        .name(format!("tls-out {name}"))
        .spawn(move || outbound(local_in, net_out, tx, f))?;
    let f = fault.clone();
    thread::Builder::new()
        .name(format!("tls-in {name}"))
        .spawn(move || inbound(net, mine, rx, f))?;
    Ok((Conn::Unix(theirs), fault))
}

fn keep(fault: &Fault, e: RecordError) {
    if let Ok(mut slot) = fault.lock() {
        slot.get_or_insert(e);
    }
}

/// Migration side to network: seal batches of up to 16 records, one send each.
fn outbound(local: UnixStream, net: Conn, mut tx: Direction, fault: Fault) {
    let mut plain = vec![0u8; BATCH_PLAIN];
    let mut wire = batch_buffer();
    let (lfd, nfd) = (local.as_raw_fd(), net.fd());
    loop {
        let n = match recv_some(lfd, &mut plain) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let out = match seal_batch(&mut tx, &plain[..n], &mut wire) {
            Ok(out) => out,
            Err(e) => {
                keep(&fault, e);
                let _ = net.shutdown();
                let _ = local.shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        if send_all(nfd, &wire[..out]).is_err() {
            let _ = local.shutdown(std::net::Shutdown::Both);
            let _ = net.shutdown();
            return;
        }
    }
    // The migration side is done: tell the peer, then end this direction.
    close_write(&mut tx, &net);
}

/// Network to migration side: the record reader opens what arrives (read in large chunks)
/// and its plaintext is passed on.
fn inbound(net: Conn, local: UnixStream, rx: Direction, fault: Fault) {
    let lfd = local.as_raw_fd();
    let mut reader = RecordReader::new(net.fd(), rx);
    let mut plain = vec![0u8; MAX_PLAINTEXT];
    let fail = |e: Option<RecordError>| {
        if let Some(e) = e {
            keep(&fault, e);
        }
        let _ = net.shutdown();
        let _ = local.shutdown(std::net::Shutdown::Both);
    };
    loop {
        match reader.read(&mut plain) {
            Ok(0) if reader.closed() => {
                let _ = local.shutdown(std::net::Shutdown::Write);
                return;
            }
            // End of stream without close_notify: a cut, not an orderly end.
            Ok(0) => return fail(None),
            Ok(n) => {
                if send_all(lfd, &plain[..n]).is_err() {
                    // The migration side is gone.
                    let _ = net.shutdown();
                    return;
                }
            }
            Err(e) => {
                let cause = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<RecordError>())
                    .cloned();
                return fail(cause);
            }
        }
    }
}
