//! What the `userfaultfd` crate (0.9) lacks, for the two userfaultfd users: the
//! write-protect dirty tracker ([`crate::dirty`]) and the postcopy fault service
//! ([`crate::postcopy`]). Everything else (creating the fd and the API
//! handshake, registering, copy, zeropage, continue, wake, write-protect,
//! unregister, reading events) goes through the crate. Kept in one place so
//! the two users cannot drift apart.

use std::io;
use std::os::fd::{FromRawFd, RawFd};

use userfaultfd::{Error, FeatureFlags, Uffd, UffdBuilder};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// `UFFD_FEATURE_MINOR_SHMEM` (Linux 5.14): the crate's `FeatureFlags` has no constant for it.
pub const FEATURE_MINOR_SHMEM: FeatureFlags = FeatureFlags::from_bits_retain(1 << 10);
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19): the crate's `FeatureFlags` has no constant for it.
#[cfg(feature = "uffd-wp")]
pub const FEATURE_WP_HUGETLBFS_SHMEM: FeatureFlags = FeatureFlags::from_bits_retain(1 << 12);
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): the crate's `FeatureFlags` has no constant for it.
#[cfg(feature = "uffd-wp")]
pub const FEATURE_WP_UNPOPULATED: FeatureFlags = FeatureFlags::from_bits_retain(1 << 13);

/// The system error behind a crate error, errno kept: `userfaultfd::Error` has no conversion
/// to `io::Error`, and its messages drop the errno ("System error", "Copy failed").
pub fn io_error(e: Error) -> io::Error {
    match e {
        Error::SystemError(errno) | Error::CopyFailed(errno) | Error::ZeropageFailed(errno) => {
            io::Error::from_raw_os_error(errno as i32)
        }
        // The crate's name for UFFDIO_COPY's EAGAIN (the byte count is taken by the caller).
        Error::PartiallyCopied(_) => io::Error::from_raw_os_error(libc::EAGAIN),
        Error::OpenDevUserfaultfd(e) => e,
        Error::ReadEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the userfaultfd returned end of file",
        ),
        Error::IncompleteMsg { read, expected } => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the userfaultfd returned a partial message of {read} of {expected} bytes"),
        ),
        Error::UnrecognizedEvent(event) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the userfaultfd returned an unknown event {event:#x}"),
        ),
        Error::UnsupportedIoctls(ioctls) => io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the userfaultfd lacks a required ioctl; it offers {ioctls:?}"),
        ),
    }
}

/// Opens a userfaultfd (close-on-exec, non-blocking, also seeing faults the kernel takes on
/// the process's behalf, such as KVM's) and does the API handshake asking for `features`,
/// through the crate's [`UffdBuilder`]. Hand-written part: the builder opens
/// `/dev/userfaultfd` whenever it exists and fails if that cannot be opened (it is often
/// root-only), never trying the system call, which may still be allowed
/// (`vm.unprivileged_userfaultfd`, `CAP_SYS_PTRACE`); this falls back to it. On failure,
/// returns the call that failed and the system's error.
pub fn open(features: FeatureFlags) -> Result<Uffd, (&'static str, io::Error)> {
    let built = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(features)
        .create();
    match built {
        Ok(uffd) => Ok(uffd),
        Err(Error::OpenDevUserfaultfd(_)) => open_with_syscall(features),
        Err(e) => Err((
            "creating a userfaultfd (with its UFFDIO_API handshake)",
            io_error(e),
        )),
    }
}

/// The system-call path of [`open`]: hand-written because the crate's API handshake is only
/// reachable through [`UffdBuilder::create`], which takes the device path when it exists.
fn open_with_syscall(features: FeatureFlags) -> Result<Uffd, (&'static str, io::Error)> {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(("userfaultfd", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new userfaultfd that nothing else owns; the `Uffd` closes it on drop.
    let uffd = unsafe { Uffd::from_raw_fd(fd as RawFd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes `api` only.
    let ret = unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) };
    if ret != 0 {
        return Err(("UFFDIO_API", io::Error::last_os_error()));
    }
    Ok(uffd)
}

/// `UFFD_API`, for [`open_with_syscall`]'s handshake: the crate keeps its copy private.
const UFFD_API: u64 = 0xAA;

/// `struct uffdio_api`, for [`open_with_syscall`]'s handshake: the crate keeps its copy private.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

// `UFFDIO_API`, for [`open_with_syscall`]'s handshake: the crate keeps its ioctl private.
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xAA, 0x3F, UffdioApi);

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
