//! What the kernel offers, found once at start and reported in one line.

use std::io;

use io_uring::{opcode, types, IoUring, Probe};

/// What the probe found.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// `Ok` when an io_uring instance could be created, else why not.
    pub io_uring: Result<(), String>,
    /// The `kernel.io_uring_disabled` sysctl, when the kernel has it.
    pub disabled_sysctl: Option<u8>,
    /// `IORING_OP_SEND_ZC` is supported.
    pub send_zc: bool,
    /// `IORING_OP_SEND` accepts registered (fixed) buffers.
    pub send_fixed: bool,
    /// RLIMIT_MEMLOCK soft limit after the probe (bytes; `u64::MAX` = unlimited).
    pub memlock: u64,
    /// RLIMIT_MEMLOCK soft limit before the probe.
    pub memlock_before: u64,
    /// Why the limit could not be raised to unlimited, if it could not.
    pub memlock_error: Option<String>,
    /// `Ok` when the kernel accepts the TLS upper-layer protocol on a TCP connection (kTLS:
    /// record protection in the kernel), else why not. Ferry's encrypted channels protect
    /// records in user space either way; this says whether a kernel path exists.
    pub ktls: Result<(), String>,
}

impl ProbeReport {
    /// Whether io_uring can be used.
    pub fn uring_available(&self) -> bool {
        self.io_uring.is_ok()
    }
}

fn bytes_text(b: u64) -> String {
    if b == u64::MAX || b == libc::RLIM_INFINITY {
        "unlimited".into()
    } else if b >= 1 << 30 {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

/// The current soft RLIMIT_MEMLOCK as text.
pub(crate) fn memlock_text() -> String {
    bytes_text(memlock_get().0)
}

fn memlock_get() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return (0, 0);
    }
    (r.rlim_cur, r.rlim_max)
}

/// Raises RLIMIT_MEMLOCK to unlimited (root / CAP_SYS_RESOURCE), else the soft limit to the
/// hard one. Returns why it stayed limited, if it did.
fn memlock_raise() -> Option<String> {
    let (cur, max) = memlock_get();
    if cur == libc::RLIM_INFINITY {
        return None;
    }
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `inf` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } == 0 {
        return None;
    }
    let err = io::Error::last_os_error();
    let hard = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: `hard` is a valid rlimit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &hard) };
    if has_ipc_lock() {
        return Some(format!(
            "not raised ({err}), but the process has CAP_IPC_LOCK, so registered memory is not counted against it"
        ));
    }
    Some(format!(
        "could not raise it to unlimited ({err}): registering more than {} of memory will fail",
        bytes_text(max.max(cur))
    ))
}

/// Whether the effective capability set holds CAP_IPC_LOCK (bit 14).
fn has_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

fn read_sysctl() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Tries a `SEND` from a registered buffer on a Unix socket pair.
fn try_send_fixed(ring: &mut IoUring) -> bool {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return false;
    }
    let mut buf = vec![7u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` outlives the registration, which is undone below before `buf` drops.
    let ok = if unsafe { ring.submitter().register_buffers(&iov) }.is_ok() {
        let e = opcode::Send::new(types::Fd(fds[0]), buf.as_ptr(), 16)
            .ioprio(4)
            .buf_group(0)
            .build()
            .user_data(1);
        // SAFETY: `buf` stays valid until the completion is reaped below.
        let pushed = unsafe { ring.submission().push(&e) }.is_ok();
        let res = if pushed && ring.submit_and_wait(1).is_ok() {
            ring.completion().next().map(|c| c.result())
        } else {
            None
        };
        let _ = ring.submitter().unregister_buffers();
        res == Some(16)
    } else {
        false
    };
    // SAFETY: closing the two descriptors this function opened.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    drop(buf);
    ok
}

/// Whether a connected loopback TCP socket accepts `setsockopt(TCP_ULP, "tls")`.
fn try_ktls() -> Result<(), String> {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no loopback socket: {e}"))?;
    let addr = l
        .local_addr()
        .map_err(|e| format!("no loopback socket: {e}"))?;
    let c = TcpStream::connect(addr).map_err(|e| format!("no loopback connection: {e}"))?;
    let _accepted = l.accept();
    // TCP_ULP (31 in linux/tcp.h; not in every libc crate release).
    const TCP_ULP: libc::c_int = 31;
    let name = b"tls";
    // SAFETY: setsockopt on a socket this function owns, with a pointer to `name` and its
    // exact length.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "TCP_ULP tls refused: {}",
            io::Error::last_os_error()
        ))
    }
}

/// Probes the kernel: io_uring present and allowed, `SEND_ZC`, fixed-buffer `SEND`, and the
/// memory-lock limit (raised to unlimited when allowed).
pub fn probe() -> ProbeReport {
    let memlock_before = memlock_get().0;
    let memlock_error = memlock_raise();
    let memlock = memlock_get().0;
    let disabled_sysctl = read_sysctl();
    let mut report = ProbeReport {
        io_uring: Ok(()),
        disabled_sysctl,
        send_zc: false,
        send_fixed: false,
        memlock,
        memlock_before,
        memlock_error,
        ktls: try_ktls(),
    };
    match IoUring::new(8) {
        Err(e) => {
            report.io_uring = Err(match e.raw_os_error() {
                Some(libc::ENOSYS) => "the kernel has no io_uring".into(),
                Some(libc::EPERM) => {
                    "io_uring is disabled by kernel.io_uring_disabled or a security policy".into()
                }
                _ => format!("io_uring_setup failed: {e}"),
            });
        }
        Ok(mut ring) => {
            let mut p = Probe::new();
            if ring.submitter().register_probe(&mut p).is_ok() {
                report.send_zc = p.is_supported(opcode::SendZc::CODE);
            }
            report.send_fixed = try_send_fixed(&mut ring);
        }
    }
    report
}

impl core::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let sysctl = self
            .disabled_sysctl
            .map_or("absent".to_string(), |v| v.to_string());
        match &self.io_uring {
            Err(why) => write!(
                f,
                "io_uring unavailable ({why}; kernel.io_uring_disabled={sysctl}): using the blocking std::net transport"
            )?,
            Ok(()) => write!(
                f,
                "io_uring available (kernel.io_uring_disabled={sysctl}); SEND_ZC {}; SEND with fixed buffers {}",
                if self.send_zc { "yes" } else { "no (zero-copy send off)" },
                if self.send_fixed { "yes" } else { "no (plain SEND)" },
            )?,
        }
        write!(f, "; RLIMIT_MEMLOCK {}", bytes_text(self.memlock))?;
        if self.memlock != self.memlock_before {
            write!(f, " (raised from {})", bytes_text(self.memlock_before))?;
        }
        if let Some(e) = &self.memlock_error {
            write!(f, " — {e}")?;
        }
        write!(f, "; fixed buffers at most 1 GiB each")?;
        match &self.ktls {
            Ok(()) => write!(
                f,
                "; kTLS offered (not used yet: TLS records are protected in user space)"
            ),
            Err(why) => write!(
                f,
                "; no kTLS ({why}): TLS records are protected in user space"
            ),
        }
    }
}
