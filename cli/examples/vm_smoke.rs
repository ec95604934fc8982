//! Boots the demo guest, watches it fill and dirty memory, verifies it, then migrates it in
//! miniature (save state, copy RAM, restore into a second VM) and verifies again.
//!
//! `cargo run -p ferry-host --release --example vm_smoke -- [MiB] [dirty MB/s] [vcpus]`
//! (environment: `THP` for transparent huge pages, `NOPREFAULT` to skip prefaulting RAM)

use std::time::{Duration, Instant};

use ferry_cli::vmm::{Vm, VmConfig};
use ferry_host::memory::{HugePages, MemoryOptions};

fn percentiles(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "{name}: p50 {:?} p99 {:?} max {:?} (n={})",
        at(0.5),
        at(0.99),
        at(1.0),
        v.len()
    );
}

/// Pause/resume cycles: how long `pause` takes, how long until every vCPU beats again after
/// `resume`, and how long saving the state takes.
fn latency(vm: &Vm, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let (mut pause, mut resume, mut save) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        vm.pause()?;
        pause.push(t.elapsed());
        if std::env::var_os("NOSAVE").is_none() {
            let t = Instant::now();
            let _ = vm.save_state()?;
            save.push(t.elapsed());
        }
        let before = vm.guest_status()?;
        let t = Instant::now();
        vm.resume()?;
        vm.wait_until(Duration::from_secs(10), "beat", |s| {
            s.vcpus
                .iter()
                .zip(&before.vcpus)
                .all(|(a, b)| a.heartbeat > b.heartbeat)
        })?;
        resume.push(t.elapsed());
    }
    percentiles("pause", pause);
    if !save.is_empty() {
        percentiles("save_state", save);
    }
    percentiles("resume to every vCPU beating", resume);
    Ok(())
}

/// User + system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(256), |a| a.parse())?;
    let rate_mb: u64 = args.next().map_or(Ok(50), |a| a.parse())?;
    let vcpus: u32 = args.next().map_or(Ok(1), |a| a.parse())?;
    let config = VmConfig {
        mem_size: mib << 20,
        vcpus,
        dirty_rate: rate_mb * 1_000_000,
        memory: MemoryOptions {
            huge_pages: if std::env::var_os("THP").is_some() {
                HugePages::Transparent
            } else {
                HugePages::None
            },
            ..MemoryOptions::default()
        },
        prefault: std::env::var_os("NOPREFAULT").is_none(),
        yield_when_idle: std::env::var_os("NOYIELD").is_none(),
        ..VmConfig::default()
    };
    let t0 = Instant::now();
    let vm = Vm::new(config)?;
    println!(
        "created in {:?}; tsc {} Hz; dirty log {:?}; slots {:?}",
        t0.elapsed(),
        vm.tsc_hz(),
        vm.dirty_log_caps(),
        vm.slots()
    );
    println!("page kind {:?}", vm.memory().regions()[0].page_kind());
    let t1 = Instant::now();
    vm.resume()?;
    let s = vm.wait_filled(Duration::from_secs(120))?;
    let secs = t1.elapsed().as_secs_f64();
    println!(
        "filled {} pages in {:.2} s ({:.0} MB/s)",
        s.pages_filled,
        secs,
        s.pages_filled as f64 * 4096.0 / secs / 1e6
    );
    let d0 = vm.guest_status()?.pages_dirtied;
    let c0 = cpu_seconds();
    let t2 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let d1 = vm.guest_status()?.pages_dirtied;
    let wall = t2.elapsed().as_secs_f64();
    println!(
        "dirtied {:.1} MB/s (asked {} MB/s), using {:.0}% of a host CPU",
        (d1 - d0) as f64 * 4096.0 / wall / 1e6,
        rate_mb,
        (cpu_seconds() - c0) / wall * 100.0
    );
    let t3 = Instant::now();
    let r = vm.request_verify(Duration::from_secs(120))?;
    println!("verify {:?} in {:?}", r, t3.elapsed());

    if let Some(n) = std::env::var("LATENCY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        latency(&vm, n)?;
    }

    let t4 = Instant::now();
    vm.pause()?;
    let paused = t4.elapsed();
    let ts = Instant::now();
    let state = vm.save_state()?;
    println!(
        "paused in {paused:?}; save_state {:?}, {} bytes",
        ts.elapsed(),
        state.len()
    );
    let dst = Vm::new_incoming(config)?;
    for (a, b) in vm.memory().regions().iter().zip(dst.memory().regions()) {
        // SAFETY: the source is paused and the destination not started.
        unsafe { b.as_mut_slice().copy_from_slice(a.as_slice()) };
    }
    let tw = Instant::now();
    dst.wait_prefault()?;
    println!("wait_prefault {:?}", tw.elapsed());
    let tr = Instant::now();
    dst.restore_state(&state)?;
    let restored = tr.elapsed();
    let hb = dst.guest_status()?.heartbeat;
    let tg = Instant::now();
    dst.resume()?;
    dst.wait_until(Duration::from_secs(10), "run", |s| s.heartbeat > hb)?;
    println!(
        "restore_state {restored:?}; resume to first heartbeat {:?}",
        tg.elapsed()
    );
    drop(vm);
    let h0 = dst.guest_status()?;
    std::thread::sleep(Duration::from_millis(500));
    let h1 = dst.guest_status()?;
    println!(
        "destination: heartbeat {} -> {}, dirtied {} -> {}",
        h0.heartbeat, h1.heartbeat, h0.pages_dirtied, h1.pages_dirtied
    );
    let r = dst.request_verify(Duration::from_secs(120))?;
    println!("destination verify {r:?}");
    Ok(())
}
