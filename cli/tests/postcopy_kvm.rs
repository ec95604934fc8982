//! Postcopy of a real KVM guest: the guest dirties memory faster than the
//! capped link carries it, RAM switches to postcopy after the first full
//! pass, the guest runs on the destination at once with most of its
//! recently-written pages missing, its vCPUs fault them in through
//! userfaultfd, and it verifies every page of its memory there.

use std::path::Path;
use std::thread;
use std::time::Duration;

use ferry_cli::kvm_guest::{self, IncomingGuest, SourceGuest};
use ferry_cli::vmm::{Vm, VmConfig};
use ferry_host::destination::{self, DestinationConfig};
use ferry_host::link::Listener;
use ferry_host::memory::{Backing, MemoryOptions};
use ferry_host::migration::{Event, SourceConfig};
use ferry_host::postcopy::PostcopyMode;
use ferry_host::ram::Ram;
use ferry_host::source::{self, SourceLink};
use ferry_uring::{Transport, UringConfig};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

#[test]
fn kvm_guest_migrates_in_postcopy_and_verifies() {
    run(false);
}

/// The same with memfd-backed destination RAM: pages are received in place
/// through a second mapping and mapped with UFFDIO_CONTINUE.
#[test]
fn kvm_guest_on_memfd_migrates_in_postcopy_with_uffdio_continue() {
    run(true);
}

fn run(memfd: bool) {
    if !kvm_present() {
        return;
    }
    let dirty_rate = 48 * MIB;
    let cap = 16 * MIB;
    let config = VmConfig {
        mem_size: 64 * MIB,
        vcpus: 2,
        seed: 0x90_57c0,
        ..VmConfig::default()
    };
    let src = Vm::new(config).unwrap();
    src.resume().unwrap();
    src.wait_filled(T).unwrap();
    src.set_dirty_rate(dirty_rate).unwrap();
    src.wait_rate_applied(T).unwrap();
    // Postcopy needs the destination's RAM unpopulated.
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
    // SAFETY: the second mappings live until the end of the test.
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
    let mut starter = IncomingGuest::new(&dst);
    let dst_config = DestinationConfig {
        postcopy_ram: true,
        ..DestinationConfig::new(transport)
    };
    let mut first_pass_pending = 0;
    let (report, dst_report) = thread::scope(|s| {
        let d = s.spawn(|| {
            if memfd {
                destination::receive_in_place(
                    &listener,
                    &dst_ram,
                    &second_ram,
                    &mut starter,
                    &dst_config,
                )
            } else {
                destination::receive_with(&listener, &dst_ram, &mut starter, &dst_config)
            }
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let config = SourceConfig {
            bandwidth_cap: Some(cap),
            give_up_after: Some(Duration::from_secs(60)),
            offer_postcopy_ram: true,
            postcopy_after_first_pass: true,
            ..SourceConfig::default()
        };
        let r = source::migrate(
            &src_ram,
            &mut tracker,
            &mut control,
            &config,
            &link,
            &mut |e| {
                if let Event::Round(p) = e {
                    if p.round == 0 {
                        first_pass_pending = p.pending_bytes;
                    }
                }
            },
        );
        (r, d.join().unwrap())
    });
    let report = report.expect("the source side succeeds");
    let dst_report = dst_report.expect("the destination side succeeds");
    assert!(src.is_paused(), "the source guest stays paused after go");
    // Precopy could not have converged: more was dirty after the first
    // pass than the link carries in the downtime limit.
    assert!(
        first_pass_pending > report.threshold,
        "{first_pass_pending} vs {}",
        report.threshold
    );
    let spc = report.postcopy.expect("source postcopy report");
    let dpc = dst_report.postcopy.expect("destination postcopy report");
    eprintln!("source: {spc:?}\ndestination: {dpc:?}");
    assert_eq!(spc.mode, PostcopyMode::Ram);
    assert!(spc.pages_discarded > 0);
    assert!(dpc.faults > 0, "the guest's vCPUs faulted on missing pages");
    assert!(dpc.pages_on_demand > 0);
    assert_eq!(
        dpc.pages_on_demand + dpc.pages_streamed,
        dpc.pages_missing_at_switchover
    );
    assert!(dpc.fault_latency.count > 0);
    // The histogram holds every timed fault, and their waits add up to the
    // time the vCPUs were blocked.
    assert_eq!(
        dpc.fault_latency_buckets_us.iter().sum::<u64>(),
        dpc.fault_latency.count
    );
    assert!(dpc.blocked_ns > 0);
    assert!(dpc.blocked_ns <= dpc.fault_latency.count * dpc.fault_latency.max_ns);
    // The guest counted its own progress during postcopy.
    let rate = starter.rate_since_start().expect("the guest started here");
    assert!(rate > 0.0, "the guest made progress during postcopy");
    // The guest runs on and checks every page against its own record.
    let r = dst.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 0, "{r:?}");
    assert_eq!(r.pages_checked, dst.layout().work_pages);
}
