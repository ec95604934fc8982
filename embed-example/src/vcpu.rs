//! The vCPU thread: `KVM_RUN` in a loop while the VM runs, parked while it is paused.
//!
//! To pause, the VMM sets the wanted state and kicks the thread with a real-time signal whose
//! handler sets `immediate_exit` in the thread's `kvm_run` page: inside `KVM_RUN` the thread
//! returns with `EINTR`, about to enter it it returns at once. Either way it then sees the
//! wanted state and parks; `pause` returns once it has, so no guest instruction runs until
//! `resume`.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::ExampleError;

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler.
    static RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: `SIGRTMIN + 3` (the project's demo VMM uses `SIGRTMIN`).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null pointer is the mapped `kvm_run` page of the vCPU this thread
        // runs; the thread clears it before its vCPU can go away. A volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

fn install_kick_handler() -> Result<(), ExampleError> {
    static ONCE: Once = Once::new();
    static ERRNO: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            ERRNO.store(e.errno(), Ordering::SeqCst);
        }
    });
    match ERRNO.load(Ordering::SeqCst) {
        0 => Ok(()),
        errno => Err(ExampleError::Signal(std::io::Error::from_raw_os_error(
            errno,
        ))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    parked: bool,
    fault: Option<String>,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One vCPU and the thread that runs it.
#[derive(Debug)]
pub(crate) struct Vcpu {
    fd: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    /// Starts the thread, parked.
    pub(crate) fn spawn(fd: VcpuFd) -> Result<Vcpu, ExampleError> {
        install_kick_handler()?;
        let fd = Arc::new(Mutex::new(fd));
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                parked: false,
                fault: None,
            }),
            cv: Condvar::new(),
        });
        let thread = {
            let (fd, shared) = (Arc::clone(&fd), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(move || run(&fd, &shared))
                .map_err(ExampleError::Thread)?
        };
        let vcpu = Vcpu {
            fd,
            shared,
            thread: Some(thread),
        };
        vcpu.wait_parked(Duration::from_secs(10))?;
        Ok(vcpu)
    }

    /// Runs `f` on the vCPU's descriptor (it waits while the vCPU runs: pause first).
    pub(crate) fn with_fd<R>(&self, f: impl FnOnce(&mut VcpuFd) -> R) -> R {
        f(&mut self.fd.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Lets the vCPU run; fails if it stopped on a fault.
    pub(crate) fn resume(&self) -> Result<(), ExampleError> {
        let mut c = self.shared.lock();
        if let Some(why) = &c.fault {
            return Err(ExampleError::VcpuFault(why.clone()));
        }
        c.want = Want::Run;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Stops the vCPU; returns once it is out of `KVM_RUN` and parked.
    pub(crate) fn pause(&self) -> Result<(), ExampleError> {
        self.shared.lock().want = Want::Pause;
        self.kick();
        self.wait_parked(Duration::from_secs(5))?;
        match &self.shared.lock().fault {
            Some(why) => Err(ExampleError::VcpuFault(why.clone())),
            None => Ok(()),
        }
    }

    /// The fault the vCPU stopped on, if any.
    pub(crate) fn fault(&self) -> Option<String> {
        self.shared.lock().fault.clone()
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the handle is of a thread we spawned and have not joined; the signal's
            // handler only touches that thread's own `kvm_run` page.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    fn wait_parked(&self, timeout: Duration) -> Result<(), ExampleError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        while !c.parked {
            let now = Instant::now();
            if now >= deadline {
                return Err(ExampleError::PauseTimeout);
            }
            let step = (deadline - now).min(Duration::from_millis(20));
            let (g, waited) = self
                .shared
                .cv
                .wait_timeout(c, step)
                .unwrap_or_else(PoisonError::into_inner);
            c = g;
            if waited.timed_out() && !c.parked && c.want != Want::Run {
                // A kick that came too early is harmless; send another.
                drop(c);
                self.kick();
                c = self.shared.lock();
            }
        }
        Ok(())
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Exit;
        self.shared.cv.notify_all();
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Clears the thread's `kvm_run` pointer when the thread ends.
struct ClearRun;

impl Drop for ClearRun {
    fn drop(&mut self) {
        RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}

fn run(fd: &Mutex<VcpuFd>, shared: &Shared) {
    {
        let mut v = fd.lock().unwrap_or_else(PoisonError::into_inner);
        let page: *mut kvm_run = v.get_kvm_run();
        RUN.with(|r| r.set(page));
    }
    let _clear = ClearRun;
    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
    loop {
        {
            let mut c = shared.lock();
            loop {
                match c.want {
                    Want::Exit => {
                        c.parked = true;
                        shared.cv.notify_all();
                        return;
                    }
                    Want::Run if c.fault.is_none() => break,
                    _ => {
                        if !c.parked {
                            c.parked = true;
                            shared.cv.notify_all();
                        }
                        c = shared.cv.wait(c).unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
            c.parked = false;
        }
        let mut v = fd.lock().unwrap_or_else(PoisonError::into_inner);
        let fault = match v.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                v.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
            Ok(VcpuExit::Shutdown) => Some("the guest triple-faulted".to_owned()),
            Ok(exit) => Some(format!("unexpected exit {exit:?}")),
        };
        drop(v);
        if let Some(why) = fault {
            let mut c = shared.lock();
            c.fault = Some(why);
            c.parked = true;
            shared.cv.notify_all();
        }
    }
}
