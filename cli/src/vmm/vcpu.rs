//! vCPU threads: one per vCPU, each looping on `KVM_RUN` while the VM runs, parked on a
//! condition variable while it is paused.
//!
//! Pausing follows the usual KVM protocol: the controller sets the requested state, then
//! kicks every vCPU thread with a real-time signal whose handler sets `immediate_exit` in the
//! thread's `kvm_run` page. A thread inside `KVM_RUN` returns with `EINTR`; a thread about to
//! enter it returns at once because `immediate_exit` is already set. Either way it then sees
//! the new state under the lock and parks. `pause` returns only when every thread is parked,
//! so no guest instruction runs until `resume`.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::layout::DOORBELL_GPA;
use super::VmmError;

/// Offset from `SIGRTMIN` of the signal used to kick vCPU threads out of `KVM_RUN`.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs (null on other threads).
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialised thread-local read and a volatile store.
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: a non-null pointer is the mapped `kvm_run` of the vCPU owned by this
        // thread; it stays mapped until the thread clears the pointer before exiting.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
fn install_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            RESULT.store(e.errno(), Ordering::SeqCst);
        }
    });
    match RESULT.load(Ordering::SeqCst) {
        0 => Ok(()),
        rc => Err(VmmError::Signal(std::io::Error::from_raw_os_error(rc))),
    }
}

/// What the controller wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    parked: Vec<bool>,
    faults: Vec<Option<String>>,
    kicks: u64,
}

/// Work for vCPU 0's thread to do once, before it next enters the guest.
pub(crate) type FirstRun = Box<dyn FnOnce() + Send>;

/// The pending [`FirstRun`], if any.
#[derive(Default)]
struct FirstRunSlot(Mutex<Option<FirstRun>>);

impl std::fmt::Debug for FirstRunSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstRunSlot").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    doorbells: AtomicU64,
    first_run: FirstRunSlot,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The vCPU file descriptors and their threads.
#[derive(Debug)]
pub(crate) struct Vcpus {
    fds: Vec<Arc<Mutex<VcpuFd>>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Vcpus {
    /// Spawns one parked thread per vCPU.
    pub(crate) fn spawn(fds: Vec<VcpuFd>, tsc_hz: u64) -> Result<Self, VmmError> {
        install_handler()?;
        let n = fds.len();
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                parked: vec![false; n],
                faults: vec![None; n],
                kicks: 0,
            }),
            cv: Condvar::new(),
            doorbells: AtomicU64::new(0),
            first_run: FirstRunSlot::default(),
        });
        let fds: Vec<_> = fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let mut me = Self {
            fds,
            shared,
            threads: Vec::with_capacity(n),
        };
        for (i, fd) in me.fds.iter().enumerate() {
            let fd = Arc::clone(fd);
            let shared = Arc::clone(&me.shared);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(i, &fd, &shared, tsc_hz))
                .map_err(VmmError::Thread)?;
            me.threads.push(t);
        }
        // Wait until every thread has parked once, so its kvm_run pointer is published.
        me.wait_parked(Duration::from_secs(10))?;
        Ok(me)
    }

    /// Has vCPU 0's thread run `work` once, just before it next enters the guest: work that
    /// touches guest RAM then blocks that vCPU, as a guest access would (in postcopy, on a
    /// page still missing), and never the thread that resumed the VM.
    pub(crate) fn before_first_run(&self, work: FirstRun) {
        *self
            .shared
            .first_run
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(work);
    }

    /// Number of vCPUs.
    pub(crate) fn len(&self) -> usize {
        self.fds.len()
    }

    /// Runs `f` on vCPU `i`'s descriptor; the VM must be paused.
    pub(crate) fn with_fd<R>(&self, i: usize, f: impl FnOnce(&mut VcpuFd) -> R) -> Option<R> {
        let fd = self.fds.get(i)?;
        let mut g = fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(f(&mut g))
    }

    /// Lets every vCPU run.
    pub(crate) fn resume(&self) {
        let mut c = self.shared.lock();
        c.want = Want::Run;
        self.shared.cv.notify_all();
    }

    /// Stops every vCPU and waits until all are out of `KVM_RUN`.
    pub(crate) fn pause(&self, timeout: Duration) -> Result<(), VmmError> {
        {
            let mut c = self.shared.lock();
            if c.want == Want::Pause && c.parked.iter().all(|p| *p) {
                return Ok(());
            }
            c.want = Want::Pause;
            // Wake threads sleeping on a doorbell; kick those inside KVM_RUN.
            self.shared.cv.notify_all();
        }
        self.kick_all();
        self.wait_parked(timeout)
    }

    /// Whether the VM is (being) paused.
    pub(crate) fn paused(&self) -> bool {
        let c = self.shared.lock();
        c.want != Want::Run
    }

    /// The first vCPU fault recorded, if any.
    pub(crate) fn fault(&self) -> Option<(usize, String)> {
        let c = self.shared.lock();
        c.faults
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.clone().map(|f| (i, f)))
    }

    /// How many kicks were sent (for tests and reports).
    pub(crate) fn kicks(&self) -> u64 {
        self.shared.lock().kicks
    }

    /// How many times the guest rang the doorbell to sleep.
    pub(crate) fn doorbells(&self) -> u64 {
        self.shared.doorbells.load(Ordering::Relaxed)
    }

    fn kick_all(&self) {
        let mut sent = 0;
        for t in &self.threads {
            // SAFETY: the pthread handle belongs to a thread we spawned and have not joined;
            // the signal has a handler installed that only touches thread-local state.
            let rc = unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            if rc == 0 {
                sent += 1;
            }
        }
        self.shared.lock().kicks += sent;
    }

    fn wait_parked(&self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        loop {
            if c.parked.iter().all(|p| *p) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let running = c.parked.iter().filter(|p| !**p).count();
                return Err(VmmError::PauseTimeout { running });
            }
            let step = (deadline - now).min(Duration::from_millis(20));
            let (g, res) = self
                .shared
                .cv
                .wait_timeout(c, step)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            c = g;
            if res.timed_out() && c.want != Want::Run {
                // Re-kick threads that are still out: harmless if the first kick landed.
                drop(c);
                self.kick_all();
                c = self.shared.lock();
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Exit;
        self.shared.cv.notify_all();
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Clears the thread's `kvm_run` pointer when the thread leaves `vcpu_thread`.
struct ClearRunPtr;

impl Drop for ClearRunPtr {
    fn drop(&mut self) {
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Longest sleep one doorbell ring can ask for.
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// Sleeps for the guest's doorbell request of `ticks` TSC ticks, waking early when the
/// controller wants the vCPU stopped. Returns whether it should stop.
fn doorbell_sleep(shared: &Shared, ticks: u64, tsc_hz: u64) -> bool {
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz.max(1));
    let dur = Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).min(MAX_SLEEP);
    let deadline = Instant::now() + dur;
    let mut c = shared.lock();
    while c.want == Want::Run {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        c = shared
            .cv
            .wait_timeout(c, deadline - now)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
    c.want != Want::Run
}

fn vcpu_thread(idx: usize, fd: &Mutex<VcpuFd>, shared: &Shared, tsc_hz: u64) {
    {
        let mut v = fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let p: *mut kvm_run = v.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(p));
    }
    let _clear = ClearRunPtr;
    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
    loop {
        {
            let mut c = shared.lock();
            loop {
                match c.want {
                    Want::Exit => {
                        c.parked[idx] = true;
                        shared.cv.notify_all();
                        return;
                    }
                    Want::Run if c.faults[idx].is_none() => break,
                    _ => {
                        if !c.parked[idx] {
                            c.parked[idx] = true;
                            shared.cv.notify_all();
                        }
                        c = shared
                            .cv
                            .wait(c)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                }
            }
            c.parked[idx] = false;
        }
        if idx == 0 {
            let work = shared
                .first_run
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(work) = work {
                work();
            }
        }
        let mut v = fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut doorbell: Option<u64> = None;
        let fault = match v.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                v.set_kvm_immediate_exit(0);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) if addr == DOORBELL_GPA => {
                let mut b = [0u8; 8];
                let n = data.len().min(8);
                b[..n].copy_from_slice(&data[..n]);
                doorbell = Some(u64::from_le_bytes(b));
                shared.doorbells.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
            Ok(VcpuExit::Shutdown) => {
                Some("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".to_owned())
            }
            Ok(exit) => Some(format!("unexpected exit {exit:?}")),
        };
        if let Some(ticks) = doorbell {
            if doorbell_sleep(shared, ticks, tsc_hz) {
                // Stopping mid-exit: re-enter once with immediate_exit so KVM completes the
                // MMIO write and the vCPU state is consistent for saving.
                v.set_kvm_immediate_exit(1);
                let _ = v.run();
                v.set_kvm_immediate_exit(0);
            }
        }
        drop(v);
        if let Some(f) = fault {
            let mut c = shared.lock();
            c.faults[idx] = Some(f);
            c.parked[idx] = true;
            shared.cv.notify_all();
        }
    }
}
