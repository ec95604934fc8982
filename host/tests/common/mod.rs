//! Helpers shared by the process-memory migration tests: guest memory,
//! its fill pattern, a write-protect tracker over it, and a byte comparison.
#![allow(dead_code)]

use ferry_host::dirty::{ProcessRegion, UffdWpTracker};
use ferry_host::memory::{GuestMemory, MemoryOptions};
use ferry_host::ram::PAGE_SIZE;

pub fn memory(size: u64) -> GuestMemory {
    GuestMemory::with_size(size, 1 << 30, MemoryOptions::default()).expect("guest memory")
}

pub fn fill(mem: &GuestMemory) {
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

pub fn tracker_for(mem: &GuestMemory) -> UffdWpTracker {
    let regions: Vec<ProcessRegion> = mem
        .regions()
        .iter()
        .map(|r| ProcessRegion::new(r.host_ptr() as usize, r.size() as usize))
        .collect();
    UffdWpTracker::new(&regions).expect("userfaultfd write-protect tracker")
}

pub fn same_bytes(a: &GuestMemory, b: &GuestMemory) -> Result<(), String> {
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
