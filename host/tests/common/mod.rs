//! Helpers shared by the process-memory migration tests: guest memory,
//! its fill pattern, a write-protect tracker over it, a byte comparison, and
//! a writer thread that stands in for the guest.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ferry_host::dirty::{ProcessRegion, UffdWpTracker};
use ferry_host::memory::{MappedMemory, MemoryOptions};
use ferry_host::migration::{CallbackError, DeviceSection, GuestControl, GuestStarter};
use ferry_host::ram::PAGE_SIZE;

pub fn memory(size: u64) -> MappedMemory {
    MappedMemory::with_size(size, 1 << 30, MemoryOptions::default()).expect("guest memory")
}

pub fn fill(mem: &MappedMemory) {
    for r in mem.regions() {
        let p = r.host_ptr();
        for page in 0..r.size() / PAGE_SIZE {
            if page % 8 == 3 {
                continue;
            }
            // SAFETY: inside the mapping.
            unsafe {
                std::ptr::write_bytes(
                    p.add((page * PAGE_SIZE) as usize),
                    (page % 250 + 1) as u8,
                    PAGE_SIZE as usize,
                )
            };
        }
    }
}

pub fn tracker_for(mem: &MappedMemory) -> UffdWpTracker {
    let regions: Vec<ProcessRegion> = mem
        .regions()
        .iter()
        .map(|r| ProcessRegion::new(r.host_ptr() as usize, r.size() as usize))
        .collect();
    UffdWpTracker::new(&regions).expect("userfaultfd write-protect tracker")
}

pub fn same_bytes(a: &MappedMemory, b: &MappedMemory) -> Result<(), String> {
    for (ra, rb) in a.regions().iter().zip(b.regions()) {
        // SAFETY: both mappings are alive and nobody writes them now.
        let (sa, sb) = unsafe {
            (
                std::slice::from_raw_parts(ra.host_ptr(), ra.size() as usize),
                std::slice::from_raw_parts(rb.host_ptr(), rb.size() as usize),
            )
        };
        if let Some(page) = sa
            .chunks(PAGE_SIZE as usize)
            .zip(sb.chunks(PAGE_SIZE as usize))
            .position(|(x, y)| x != y)
        {
            return Err(format!("region {} differs first at page {page}", ra.id()));
        }
    }
    Ok(())
}

/// The destination "guest": keeps the device sections it was started with.
#[derive(Default)]
pub struct Starter {
    pub sections: Vec<DeviceSection>,
}

impl GuestStarter for Starter {
    fn start(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError> {
        self.sections = sections.to_vec();
        Ok(())
    }
}

/// The source "guest": rewrites random pages of a hot set until paused.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    pub pauses: Arc<AtomicU64>,
    pub resumes: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
    pub estimate: u64,
    /// What `device_state` hands over.
    pub sections: Vec<DeviceSection>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Writer {
    /// Rewrites random pages among the first `pages` at `base`,
    /// `pages_per_ms` pages per millisecond (0: idle).
    pub fn start(base: usize, pages: u64, pages_per_ms: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicBool::new(pages_per_ms == 0));
        let written = Arc::new(AtomicU64::new(0));
        let (s, p, k, w) = (stop.clone(), pause.clone(), parked.clone(), written.clone());
        let handle = thread::spawn(move || {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut version: u64 = 1;
            while !s.load(Ordering::Acquire) {
                if p.load(Ordering::Acquire) || pages_per_ms == 0 {
                    k.store(true, Ordering::Release);
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                k.store(false, Ordering::Release);
                for _ in 0..pages_per_ms {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = x % pages;
                    version += 1;
                    let ptr = (base + (page * PAGE_SIZE) as usize) as *mut u64;
                    for i in 0..(PAGE_SIZE / 8) as usize {
                        // SAFETY: inside the test's own mapping.
                        unsafe { ptr.add(i).write_volatile(version ^ (page << 32) ^ i as u64) };
                    }
                    w.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        Writer {
            stop,
            pause,
            parked,
            pauses: Arc::new(AtomicU64::new(0)),
            resumes: Arc::new(AtomicU64::new(0)),
            written,
            estimate: 4096,
            sections: vec![DeviceSection {
                id: 1,
                bytes: b"registers of the writer".to_vec(),
            }],
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
        self.pauses.fetch_add(1, Ordering::Relaxed);
        self.pause.store(true, Ordering::Release);
        while !self.parked.load(Ordering::Acquire) {
            thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), CallbackError> {
        self.resumes.fetch_add(1, Ordering::Relaxed);
        self.pause.store(false, Ordering::Release);
        Ok(())
    }
    fn device_state(&mut self) -> Result<Vec<DeviceSection>, CallbackError> {
        Ok(self.sections.clone())
    }
    fn device_state_estimate(&self) -> u64 {
        self.estimate
    }
}
