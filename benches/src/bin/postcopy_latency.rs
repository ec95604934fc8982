//! Postcopy figures, each beside its baseline from the same run:
//!
//! 1. Fault latency (fault read on the destination → page installed) while
//!    the background stream fills the link, for a "guest" thread touching
//!    random pages: replies on the urgent channel, against replies queued on
//!    the bulk channel behind the background stream.
//! 2. Install cost per 4 KiB page: `UFFDIO_COPY` (anonymous memory) against
//!    `UFFDIO_CONTINUE` (memfd, page filled through a second mapping), with a
//!    plain `memcpy` into populated memory as the floor.
//! 3. How much a KVM guest slows in postcopy: its dirtying rate while in
//!    postcopy as a fraction of its rate before the migration (skipped
//!    without /dev/kvm).
//!
//! `cargo run --release -p ferry-benches --bin postcopy_latency -- [--json] [--mib 256] [--guest-mib-s 1024]`
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_cli::kvm_guest::{self, IncomingGuest, SourceGuest};
use ferry_cli::vmm::{Vm, VmConfig};
use ferry_host::destination::{self, DestinationConfig};
use ferry_host::dirty::{ProcessRegion, UffdWpTracker};
use ferry_host::link::Listener;
use ferry_host::memory::{Backing, MappedMemory, MemoryOptions};
use ferry_host::migration::{
    CallbackError, DeviceSection, GuestControl, GuestStarter, SourceConfig,
};
use ferry_host::postcopy::{LatencySummary, Uffd};
use ferry_host::ram::{Ram, PAGE_SIZE};
use ferry_host::source::{self, SourceLink};
use ferry_uring::{Transport, UringConfig};

const MIB: u64 = 1 << 20;

/// Source "guest": rewrites random pages until paused.
struct Writer {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Writer {
    fn start(base: usize, pages: u64, pages_per_ms: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicBool::new(false));
        let (s, p, k) = (stop.clone(), pause.clone(), parked.clone());
        let handle = thread::spawn(move || {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            while !s.load(Ordering::Acquire) {
                if p.load(Ordering::Acquire) {
                    k.store(true, Ordering::Release);
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                for _ in 0..pages_per_ms {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = x % pages;
                    // SAFETY: inside the benchmark's own mapping.
                    unsafe { ((base + (page * PAGE_SIZE) as usize) as *mut u64).write_volatile(x) };
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        Writer {
            stop,
            pause,
            parked,
            handle: Some(handle),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl GuestControl for Writer {
    fn pause(&mut self) -> Result<(), CallbackError> {
        self.pause.store(true, Ordering::Release);
        while !self.parked.load(Ordering::Acquire) {
            thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), CallbackError> {
        self.pause.store(false, Ordering::Release);
        Ok(())
    }
    fn device_state(&mut self) -> Result<Vec<DeviceSection>, CallbackError> {
        Ok(vec![DeviceSection {
            id: 1,
            bytes: vec![1; 64],
        }])
    }
}

/// Destination "guest": touches random pages as fast as they come.
struct Toucher {
    base: usize,
    pages: u64,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl GuestStarter for Toucher {
    fn start(&mut self, _: &[DeviceSection]) -> Result<(), CallbackError> {
        let (base, pages, stop) = (self.base, self.pages, self.stop.clone());
        self.handle = Some(thread::spawn(move || {
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            let mut sum = 0u64;
            while !stop.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = x % pages;
                // SAFETY: inside the destination mapping; faults are served.
                sum = sum.wrapping_add(unsafe {
                    ((base + (page * PAGE_SIZE) as usize) as *const u64).read_volatile()
                });
                thread::sleep(Duration::from_micros(100));
            }
            std::hint::black_box(sum);
        }));
        Ok(())
    }
}

fn memory(size: u64) -> MappedMemory {
    MappedMemory::with_size(size, 1 << 30, MemoryOptions::default()).unwrap()
}

/// One postcopy migration of process memory; returns the fault latencies.
fn fault_latency(mib: u64, replies_on_bulk: bool) -> (LatencySummary, u64) {
    let size = mib * MIB;
    let pages = size / PAGE_SIZE;
    let src = memory(size);
    let dst = memory(size);
    for r in src.regions() {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_bytes(r.host_ptr(), 0x5a, r.size() as usize) };
    }
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let (src_ram, dst_ram) = (Ram::from_memory(&src), Ram::from_memory(&dst));
    let regions: Vec<ProcessRegion> = src
        .regions()
        .iter()
        .map(|r| ProcessRegion::new(r.host_ptr() as usize, r.size() as usize))
        .collect();
    let mut tracker = UffdWpTracker::new(&regions).unwrap();
    // Dirty everything between the first pass and the switchover, so that
    // nearly all of RAM streams in the background after go.
    let mut writer = Writer::start(src.regions()[0].host_ptr() as usize, pages, 512);
    let mut toucher = Toucher {
        base: dst.regions()[0].host_ptr() as usize,
        pages,
        stop: Arc::new(AtomicBool::new(false)),
        handle: None,
    };
    let transport = Transport::Uring(UringConfig::default());
    let dcfg = DestinationConfig {
        postcopy_ram: true,
        ..DestinationConfig::new(transport)
    };
    let (r, d) = thread::scope(|s| {
        let d = s.spawn(|| destination::receive_with(&listener, &dst_ram, &mut toucher, &dcfg));
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let config = SourceConfig {
            // A link the background stream fills for a few seconds.
            bandwidth_cap: Some(128 * MIB),
            offer_postcopy_ram: true,
            postcopy_after_first_pass: true,
            replies_on_bulk,
            ..SourceConfig::default()
        };
        let r = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        (r, d.join().unwrap())
    });
    r.unwrap();
    let d = d.unwrap();
    toucher.stop.store(true, Ordering::Release);
    if let Some(h) = toucher.handle.take() {
        h.join().unwrap();
    }
    let pc = d.postcopy.unwrap();
    (pc.fault_latency, pc.pages_on_demand)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ns per page of: UFFDIO_COPY, UFFDIO_CONTINUE, memcpy.
fn install_cost(pages: usize, reps: usize) -> (f64, Option<f64>, f64) {
    let len = (pages as u64 * PAGE_SIZE).next_multiple_of(2 * MIB);
    let page = PAGE_SIZE as usize;
    let src: Vec<u8> = (0..page).map(|i| i as u8 | 1).collect();
    let (mut copy, mut cont, mut mem) = (Vec::new(), Vec::new(), Vec::new());
    let mut cont_ok = true;
    for _ in 0..reps {
        // UFFDIO_COPY into missing anonymous pages.
        let anon = memory(len);
        let a = anon.regions()[0].host_ptr() as usize;
        let u = Uffd::new().unwrap();
        u.register_missing(a, len as usize).unwrap();
        let t = Instant::now();
        for p in 0..pages {
            // SAFETY: the range is registered in MISSING mode.
            unsafe { u.copy(a + p * page, &src) }.unwrap();
        }
        copy.push(t.elapsed().as_nanos() as f64 / pages as f64);
        // memcpy into the (now populated) pages: the floor.
        let t = Instant::now();
        for p in 0..pages {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (a + p * page) as *mut u8, page) };
        }
        mem.push(t.elapsed().as_nanos() as f64 / pages as f64);
        drop(u);
        drop(anon);

        // UFFDIO_CONTINUE on memfd pages filled through a second mapping
        // (where the transport would receive them).
        if cont_ok {
            let opts = MemoryOptions {
                backing: Backing::Memfd,
                ..MemoryOptions::default()
            };
            let shared = MappedMemory::with_size(len, 1 << 30, opts).unwrap();
            let region = &shared.regions()[0];
            let guest = region.host_ptr() as usize;
            let second = region.map_second().unwrap();
            for p in 0..pages {
                // SAFETY: inside the second mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), second.as_ptr().add(p * page), page)
                };
            }
            match Uffd::new_minor().and_then(|u| u.register_minor(guest, len as usize).map(|()| u))
            {
                Ok(u) => {
                    let t = Instant::now();
                    for p in 0..pages {
                        u.continue_range(guest + p * page, page).unwrap();
                    }
                    cont.push(t.elapsed().as_nanos() as f64 / pages as f64);
                }
                Err(e) => {
                    eprintln!("UFFDIO_CONTINUE unavailable: {e}");
                    cont_ok = false;
                }
            }
        }
    }
    let c = (!cont.is_empty()).then(|| median(&mut cont));
    (median(&mut copy), c, median(&mut mem))
}

/// The KVM guest's dirtying rate before migration and during postcopy,
/// pages per second.
fn guest_slowdown(
    rate: u64,
    replies_on_bulk: bool,
    memfd: bool,
) -> Option<(f64, f64, LatencySummary)> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping the guest slowdown: /dev/kvm is missing");
        return None;
    }
    let t = Duration::from_secs(120);
    let config = VmConfig {
        mem_size: 256 * MIB,
        vcpus: 1,
        seed: 7,
        ..VmConfig::default()
    };
    let src = Vm::new(config).unwrap();
    src.resume().unwrap();
    src.wait_filled(t).unwrap();
    src.set_dirty_rate(rate).unwrap();
    src.wait_rate_applied(t).unwrap();
    let a = src.guest_status().unwrap().pages_dirtied;
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let before =
        (src.guest_status().unwrap().pages_dirtied - a) as f64 / t0.elapsed().as_secs_f64();
    let memory = if memfd {
        MemoryOptions {
            backing: Backing::Memfd,
            ..MemoryOptions::default()
        }
    } else {
        MemoryOptions::default()
    };
    let dst = Vm::new_incoming(VmConfig {
        prefault: false,
        memory,
        ..config
    })
    .unwrap();
    let seconds: Vec<_> = if memfd {
        dst.memory()
            .regions()
            .iter()
            .map(|r| r.map_second().unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let parts: Vec<_> = seconds
        .iter()
        .zip(dst.memory().regions())
        .map(|(m, r)| {
            (
                r.gpa(),
                std::ptr::NonNull::new(m.as_ptr()).unwrap(),
                m.len() as u64,
            )
        })
        .collect();
    // SAFETY: the second mappings outlive the migration.
    let second_ram = unsafe { Ram::from_raw(&parts) };
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let transport = Transport::Uring(UringConfig::default());
    let (src_ram, dst_ram) = (
        Ram::from_memory(src.memory()),
        Ram::from_memory(dst.memory()),
    );
    let mut tracker = kvm_guest::dirty_tracker(&src).unwrap();
    let mut control = SourceGuest::new(&src);
    struct Timed<'a> {
        inner: IncomingGuest<'a>,
        vm: &'a Vm,
        started: Option<(Instant, u64)>,
        rate: f64,
    }
    impl GuestStarter for Timed<'_> {
        fn start(&mut self, s: &[DeviceSection]) -> Result<(), CallbackError> {
            self.inner.start(s)?;
            self.started = Some((Instant::now(), self.vm.guest_status()?.pages_dirtied));
            Ok(())
        }
        fn postcopy_sections(&mut self, _: &[DeviceSection]) -> Result<(), CallbackError> {
            if let Some((t, n)) = self.started {
                self.rate =
                    (self.vm.guest_status()?.pages_dirtied - n) as f64 / t.elapsed().as_secs_f64();
            }
            Ok(())
        }
    }
    let mut starter = Timed {
        inner: IncomingGuest::new(&dst),
        vm: &dst,
        started: None,
        rate: 0.0,
    };
    let dcfg = DestinationConfig {
        postcopy_ram: true,
        ..DestinationConfig::new(transport)
    };
    let (r, d) = thread::scope(|s| {
        let d = s.spawn(|| {
            if memfd {
                destination::receive_in_place(&listener, &dst_ram, &second_ram, &mut starter, &dcfg)
            } else {
                destination::receive_with(&listener, &dst_ram, &mut starter, &dcfg)
            }
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let config = SourceConfig {
            bandwidth_cap: Some(48 * MIB),
            offer_postcopy_ram: true,
            postcopy_after_first_pass: true,
            replies_on_bulk,
            ..SourceConfig::default()
        };
        let r = source::migrate(
            &src_ram,
            &mut tracker,
            &mut control,
            &config,
            &link,
            &mut |_| {},
        );
        (r, d.join().unwrap())
    });
    r.unwrap();
    let d = d.unwrap();
    let v = dst.request_verify(t).unwrap();
    assert_eq!(v.mismatches, 0);
    Some((before, starter.rate, d.postcopy.unwrap().fault_latency))
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let mib = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(256u64);

    let (urgent, urgent_pages) = fault_latency(mib, false);
    let (shared, shared_pages) = fault_latency(mib, true);
    let (copy_ns, cont_ns, memcpy_ns) = install_cost(4096, 5);
    let guest_rate = args
        .iter()
        .position(|a| a == "--guest-mib-s")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024u64);
    let slow = guest_slowdown(guest_rate * MIB, false, false);
    let slow_memfd = guest_slowdown(guest_rate * MIB, false, true);
    let slow_shared = guest_slowdown(guest_rate * MIB, true, false);

    if json {
        let v = serde_json::json!({
            "fault_latency_urgent": urgent,
            "fault_latency_shared_bulk": shared,
            "pages_on_demand_urgent": urgent_pages,
            "pages_on_demand_shared": shared_pages,
            "install_ns_per_page": { "uffdio_copy": copy_ns, "uffdio_continue": cont_ns, "memcpy": memcpy_ns },
            "guest_dirty_pages_per_s": slow.map(|(b, d, _)| serde_json::json!({ "before": b, "in_postcopy": d, "fraction": d / b })),
            "kvm_fault_latency": slow.map(|(_, _, l)| l),
            "kvm_guest_dirty_pages_per_s_shared_bulk": slow_shared.map(|(b, d, _)| serde_json::json!({ "before": b, "in_postcopy": d, "fraction": d / b })),
            "kvm_fault_latency_shared_bulk": slow_shared.map(|(_, _, l)| l),
            "kvm_guest_dirty_pages_per_s_memfd_continue": slow_memfd.map(|(b, d, _)| serde_json::json!({ "before": b, "in_postcopy": d, "fraction": d / b })),
            "kvm_fault_latency_memfd_continue": slow_memfd.map(|(_, _, l)| l),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return;
    }
    println!("Postcopy fault latency, {mib} MiB, background stream capped at 128 MiB/s, guest touching random pages");
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "replies", "faults", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for (name, l) in [
        ("urgent channel", urgent),
        ("shared bulk channel (baseline)", shared),
    ] {
        println!(
            "{:<34} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            name,
            l.count,
            us(l.p50_ns),
            us(l.p99_ns),
            us(l.p999_ns),
            us(l.max_ns)
        );
    }
    println!();
    println!("Install cost per 4 KiB page (median of 5 x 4096 pages)");
    println!("  UFFDIO_COPY          {copy_ns:>8.0} ns");
    match cont_ns {
        Some(c) => println!("  UFFDIO_CONTINUE      {c:>8.0} ns  (page already in the memfd, filled through a second mapping)"),
        None => println!("  UFFDIO_CONTINUE      unavailable on this kernel"),
    }
    println!("  memcpy (baseline)    {memcpy_ns:>8.0} ns");
    if slow.is_some() || slow_shared.is_some() {
        println!();
        println!("KVM guest (256 MiB, 1 vCPU asked to dirty {guest_rate} MiB/s), link capped at 48 MiB/s");
        println!(
            "{:<34} {:>8} {:>10} {:>10} {:>10} {:>10} {:>14}",
            "replies", "faults", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "dirty rate"
        );
        for (name, r) in [
            ("urgent channel", slow),
            ("urgent, memfd + UFFDIO_CONTINUE", slow_memfd),
            ("shared bulk channel (baseline)", slow_shared),
        ] {
            let Some((b, d, l)) = r else { continue };
            println!(
                "{:<34} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>13.0}%",
                name,
                l.count,
                us(l.p50_ns),
                us(l.p99_ns),
                us(l.p999_ns),
                us(l.max_ns),
                100.0 * d / b
            );
        }
        if let Some((b, d, _)) = slow {
            println!("  dirty rate = pages/s dirtied during postcopy over pages/s before the migration ({b:.0} → {d:.0} with the urgent channel)");
        }
    }
}
