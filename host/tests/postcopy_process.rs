//! Postcopy of plain process memory: a writer thread stands in for the
//! guest on the source (userfaultfd write-protect tracking), a reader thread
//! stands in for it on the destination, touching pages that are missing
//! there, so that real userfaultfd faults become page requests on the urgent
//! channel. Real loopback sockets, real transports.

mod common;
use common::{fill, memory, same_bytes, tracker_for, Writer};

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ferry_core::policy::PolicyError;
use ferry_host::destination::{self, DestinationConfig, DestinationErrorKind};
use ferry_host::link::{Endpoint, Listener};
use ferry_host::memory::{MappedMemory, MemoryOptions};
use ferry_host::migration::{
    CallbackError, DeviceSection, Event, GuestStarter, SourceConfig, SNAPSHOT_BITMAP_SECTION,
};
use ferry_host::postcopy::PostcopyMode;
use ferry_host::ram::{Ram, PAGE_SIZE};
use ferry_host::source::{self, SourceError, SourceLink};
use ferry_uring::{Transport, UringConfig};

const MIB: u64 = 1 << 20;

/// The destination "guest": on start, a thread reads random pages (most of
/// them missing at first) and compares each with the source's final copy.
struct Reader {
    dst_base: usize,
    src_base: usize,
    pages: u64,
    started: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    checked: Arc<AtomicU64>,
    mismatches: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
    sections: Vec<DeviceSection>,
    postcopy_sections: Vec<DeviceSection>,
}

impl Reader {
    fn new(dst_base: usize, src_base: usize, pages: u64) -> Reader {
        Reader {
            dst_base,
            src_base,
            pages,
            started: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            checked: Arc::new(AtomicU64::new(0)),
            mismatches: Arc::new(AtomicU64::new(0)),
            handle: None,
            sections: Vec::new(),
            postcopy_sections: Vec::new(),
        }
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

impl GuestStarter for Reader {
    fn start(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError> {
        self.sections = sections.to_vec();
        self.started.store(true, Ordering::Release);
        if self.dst_base == 0 {
            // No memory to read: a starter that only records.
            return Ok(());
        }
        let (d, s, pages) = (self.dst_base, self.src_base, self.pages);
        let (stop, checked, bad) = (
            self.stop.clone(),
            self.checked.clone(),
            self.mismatches.clone(),
        );
        self.handle = Some(thread::spawn(move || {
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            while !stop.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = x % pages;
                let off = (page * PAGE_SIZE) as usize;
                // SAFETY: inside both mappings; the destination page is
                // faulted in through userfaultfd; the source is paused.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts((d + off) as *const u8, PAGE_SIZE as usize),
                        std::slice::from_raw_parts((s + off) as *const u8, PAGE_SIZE as usize),
                    )
                };
                if a != b {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                checked.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(200));
            }
        }));
        Ok(())
    }

    fn postcopy_sections(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError> {
        self.postcopy_sections = sections.to_vec();
        Ok(())
    }
}

fn postcopy_dest(transport: Transport) -> DestinationConfig {
    DestinationConfig {
        postcopy_ram: true,
        postcopy_only_sections: true,
        ..DestinationConfig::new(transport)
    }
}

fn run_postcopy(transport: Transport, channels: usize) {
    run_postcopy_into(transport, channels, false);
}

/// The destination's guest RAM: anonymous, or memfd-backed with second
/// mappings (kept alive by the second value) and their (gpa, address,
/// length) parts for `Ram::from_raw`.
#[allow(clippy::type_complexity)]
fn destination_memory(
    size: u64,
    memfd: bool,
) -> (
    MappedMemory,
    Vec<ferry_host::memory::SecondMapping>,
    Vec<(u64, std::ptr::NonNull<u8>, u64)>,
) {
    if !memfd {
        return (memory(size), Vec::new(), Vec::new());
    }
    let opts = MemoryOptions {
        backing: ferry_host::memory::Backing::Memfd,
        ..MemoryOptions::default()
    };
    let mem = MappedMemory::with_size(size, 1 << 30, opts).unwrap();
    let seconds: Vec<_> = mem
        .regions()
        .iter()
        .map(|r| r.map_second().unwrap())
        .collect();
    let parts = seconds
        .iter()
        .zip(mem.regions())
        .map(|(m, r)| {
            (
                r.gpa(),
                std::ptr::NonNull::new(m.as_ptr()).unwrap(),
                m.len() as u64,
            )
        })
        .collect();
    (mem, seconds, parts)
}

fn run_postcopy_into(transport: Transport, channels: usize, memfd: bool) {
    let size = 48 * MIB;
    let pages = size / PAGE_SIZE;
    let src_mem = memory(size);
    let (dst_mem, _seconds, parts) = destination_memory(size, memfd);
    // SAFETY: the second mappings live until the end of the test.
    let second_ram = unsafe { Ram::from_raw(&parts) };
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let src_base = src_mem.regions()[0].host_ptr() as usize;
    let dst_base = dst_mem.regions()[0].host_ptr() as usize;
    let mut tracker = tracker_for(&src_mem);
    // ~64 pages/ms (256 MB/s) over the whole region, against a 24 MiB/s link:
    // precopy could never converge.
    let mut writer = Writer::start(src_base, pages, 64);
    let mut reader = Reader::new(dst_base, src_base, pages);
    let (report, dst) = thread::scope(|s| {
        let dst = s.spawn(|| {
            if memfd {
                destination::receive_in_place(
                    &listener,
                    &dst_ram,
                    &second_ram,
                    &mut reader,
                    &postcopy_dest(transport),
                )
            } else {
                destination::receive_with(
                    &listener,
                    &dst_ram,
                    &mut reader,
                    &postcopy_dest(transport),
                )
            }
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: channels,
        };
        let config = SourceConfig {
            bandwidth_cap: Some(24 * MIB),
            give_up_after: Some(Duration::from_secs(60)),
            offer_postcopy_ram: true,
            postcopy_after_first_pass: true,
            ..SourceConfig::default()
        };
        let mut started = false;
        let report = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |e| {
                if let Event::PostcopyStarted { ram, pages_left } = e {
                    assert!(*ram);
                    assert!(*pages_left > 0);
                    started = true;
                }
            },
        );
        assert!(started, "postcopy started");
        (report, dst.join().unwrap())
    });
    let report = report.expect("the migration succeeds");
    let dst_report = dst.expect("the destination succeeds");
    reader.join();
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(writer.resumes.load(Ordering::Relaxed), 0);
    assert!(writer.written.load(Ordering::Relaxed) > 0);
    same_bytes(&src_mem, &dst_mem).expect("destination RAM equals source RAM");
    assert_eq!(
        reader.mismatches.load(Ordering::Relaxed),
        0,
        "every page the reader saw was the final one"
    );
    assert!(reader.checked.load(Ordering::Relaxed) > 0);
    assert_eq!(reader.sections.len(), 1);
    let spc = report.postcopy.expect("source postcopy report");
    let dpc = dst_report.postcopy.expect("destination postcopy report");
    eprintln!("source: {spc:?}\ndestination: {dpc:?}");
    assert_eq!(spc.mode, PostcopyMode::Ram);
    assert!(
        spc.pages_discarded > 0,
        "pages dirtied after they were sent are discarded"
    );
    assert!(dpc.faults > 0, "the reader faulted on missing pages");
    assert!(dpc.pages_on_demand > 0);
    assert!(dpc.pages_streamed > 0);
    assert_eq!(
        dpc.pages_on_demand + dpc.pages_streamed,
        dpc.pages_missing_at_switchover
    );
    assert!(dpc.fault_latency.count > 0 && dpc.fault_latency.p50_ns > 0);
    assert!(dpc.fault_latency.p50_ns <= dpc.fault_latency.p99_ns);
    assert!(spc.requests >= dpc.faults);
}

#[test]
fn process_memory_postcopy_uring() {
    run_postcopy(Transport::Uring(UringConfig::default()), 1);
}

/// memfd-backed destination RAM: pages are received in place through a
/// second mapping (registered with io_uring) and mapped with UFFDIO_CONTINUE.
#[test]
fn memfd_postcopy_receives_in_place_with_uffdio_continue() {
    run_postcopy_into(Transport::Uring(UringConfig::default()), 2, true);
    run_postcopy_into(Transport::Std(ferry_uring::RecvStrategy::Direct), 1, true);
}

#[test]
fn process_memory_postcopy_std_two_channels() {
    run_postcopy(Transport::Std(ferry_uring::RecvStrategy::Direct), 2);
}

/// Asking for postcopy when the capability was not negotiated is an error,
/// not a no-op, and the guest is never paused.
#[test]
fn asking_for_postcopy_without_the_capability_is_an_error() {
    let size = 32 * MIB;
    let src_mem = memory(size);
    let dst_mem = memory(size);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(
        src_mem.regions()[0].host_ptr() as usize,
        size / PAGE_SIZE,
        64,
    );
    let transport = Transport::Uring(UringConfig::default());
    let (src, dst) = thread::scope(|s| {
        let dst = s.spawn(|| {
            destination::receive(&listener, &dst_ram, &mut Reader::new(0, 0, 1), transport)
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let config = SourceConfig {
            bandwidth_cap: Some(64 * MIB),
            ..SourceConfig::default()
        };
        config.postcopy.start_postcopy();
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        (src, dst.join().unwrap())
    });
    let err = src.expect_err("postcopy without the capability must fail");
    assert!(
        matches!(err, SourceError::Policy(PolicyError::PostcopyNotNegotiated)),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("postcopy-ram capability was not negotiated"),
        "{err}"
    );
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 0, "never paused");
    assert!(
        !dst.expect_err("the destination sees the source go away")
            .go_received
    );
}

/// A destination that does not offer postcopy refuses a source that asks
/// for it in the handshake.
#[test]
fn a_destination_without_postcopy_refuses_the_capability() {
    let size = 16 * MIB;
    let src_mem = memory(size);
    let dst_mem = memory(size);
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(
        src_mem.regions()[0].host_ptr() as usize,
        size / PAGE_SIZE,
        0,
    );
    let transport = Transport::Uring(UringConfig::default());
    let (src, dst) = thread::scope(|s| {
        let dst = s.spawn(|| {
            destination::receive(&listener, &dst_ram, &mut Reader::new(0, 0, 1), transport)
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let config = SourceConfig {
            offer_postcopy_ram: true,
            ..SourceConfig::default()
        };
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        (src, dst.join().unwrap())
    });
    let err = src.expect_err("the handshake must fail");
    assert!(matches!(err, SourceError::Link(_)), "{err}");
    let derr = dst.expect_err("the destination refuses");
    assert!(matches!(derr.kind, DestinationErrorKind::Link(_)), "{derr}");
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 0);
}

/// A TCP proxy between source and destination whose connections the test
/// can cut.
struct Proxy {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections still to drop at once after they are made (both ends).
    drop_next: Arc<AtomicU64>,
}

impl Proxy {
    fn start(target: std::net::SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let drop_next = Arc::new(AtomicU64::new(0));
        let (c, d) = (conns.clone(), drop_next.clone());
        thread::spawn(move || {
            while let Ok((a, _)) = l.accept() {
                let Ok(b) = TcpStream::connect(target) else {
                    return;
                };
                if d.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    // Both ends see the connection made, then broken.
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                c.lock()
                    .unwrap()
                    .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                for (mut from, mut to) in [(a, b2), (b, a2)] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            conns,
            drop_next,
        }
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The thread's worry: a large postcopy-only section (the snapshot dirty
/// bitmap) and a small threshold. Classic rules never complete; with the
/// capability, rule 4 completes RAM in the downtime and streams the bitmap
/// after the guest resumed — RAM never enters postcopy.
fn snapshot_scenario(capability: bool) {
    let size = 128 * MIB;
    let pages = size / PAGE_SIZE;
    let src_mem = memory(size);
    let dst_mem = memory(size);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let src_base = src_mem.regions()[0].host_ptr() as usize;
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(src_base, pages, 0);
    writer.estimate = 0;
    let mut reader = Reader::new(0, 0, 1);
    let transport = Transport::Uring(UringConfig::default());
    let dst_config = DestinationConfig {
        postcopy_only_sections: true,
        ..DestinationConfig::new(transport)
    };
    let written = [10u64, 20, 30];
    let (src, dst) = thread::scope(|s| {
        let dst =
            s.spawn(|| destination::receive_with(&listener, &dst_ram, &mut reader, &dst_config));
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        // 256 MiB/s x 5 us: a threshold of about 1.3 KB, against a 4 KiB bitmap.
        let config = SourceConfig {
            bandwidth_cap: Some(256 * MIB),
            downtime_limit: Duration::from_micros(5),
            give_up_after: Some(Duration::from_secs(2)),
            snapshot_bitmap: true,
            offer_postcopy_only_sections: capability,
            ..SourceConfig::default()
        };
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |e| {
                if let Event::Round(p) = e {
                    if p.round == 0 {
                        for &pg in &written {
                            // SAFETY: inside the source mapping (the "guest" writes).
                            unsafe {
                                ((src_base + (pg * PAGE_SIZE) as usize) as *mut u64)
                                    .write_volatile(0xabcd_0000 + pg)
                            };
                        }
                    }
                }
            },
        );
        (src, dst.join().unwrap())
    });
    if !capability {
        let err = src.expect_err("the classic rule never completes");
        assert!(matches!(err, SourceError::NotConverging { .. }), "{err}");
        assert_eq!(writer.pauses.load(Ordering::Relaxed), 0);
        assert!(
            !dst.expect_err("the destination sees the source give up")
                .go_received
        );
        return;
    }
    let report = src.expect("rule 4 completes the migration");
    let dst_report = dst.expect("the destination succeeds");
    same_bytes(&src_mem, &dst_mem).expect("RAM complete after the downtime");
    let spc = report.postcopy.expect("postcopy-only sections followed");
    let dpc = dst_report.postcopy.expect("destination postcopy report");
    assert_eq!(spc.mode, PostcopyMode::Sections, "RAM never in postcopy");
    assert_eq!(dpc.mode, PostcopyMode::Sections);
    assert_eq!(spc.pages_discarded + spc.pages_streamed + spc.requests, 0);
    assert_eq!(dpc.faults + dpc.pages_on_demand + dpc.pages_streamed, 0);
    assert_eq!(spc.section_bytes, pages / 8);
    assert!(
        reader
            .sections
            .iter()
            .all(|s| s.id != SNAPSHOT_BITMAP_SECTION),
        "not in the downtime"
    );
    let bm = reader
        .postcopy_sections
        .iter()
        .find(|s| s.id == SNAPSHOT_BITMAP_SECTION)
        .expect("the bitmap arrived");
    assert_eq!(bm.bytes.len() as u64, pages / 8);
    let set: Vec<u64> = (0..pages)
        .filter(|p| bm.bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect();
    assert_eq!(
        set, written,
        "the bitmap holds exactly the pages written during the migration"
    );
}

#[test]
fn postcopy_only_section_never_completes_under_the_classic_rule() {
    snapshot_scenario(false);
}

#[test]
fn postcopy_only_section_completes_with_the_capability_and_ram_stays_precopy() {
    snapshot_scenario(true);
}

/// Postcopy negotiated but never asked for: RAM never enters postcopy, the
/// migration completes as a precopy (pages installed from buffers, since
/// the destination registers no guest memory with the transport).
#[test]
fn postcopy_negotiated_but_not_asked_stays_precopy() {
    let size = 32 * MIB;
    let src_mem = memory(size);
    let dst_mem = memory(size);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listener.local_endpoint().unwrap();
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(src_mem.regions()[0].host_ptr() as usize, 512, 2);
    let mut reader = Reader::new(0, 0, 1);
    let transport = Transport::Uring(UringConfig::default());
    let (src, dst) = thread::scope(|s| {
        let dst = s.spawn(|| {
            destination::receive_with(&listener, &dst_ram, &mut reader, &postcopy_dest(transport))
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 2,
        };
        let config = SourceConfig {
            offer_postcopy_ram: true,
            give_up_after: Some(Duration::from_secs(60)),
            ..SourceConfig::default()
        };
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |e| {
                assert!(
                    !matches!(e, Event::PostcopyStarted { .. }),
                    "never in postcopy unless asked"
                );
            },
        );
        (src, dst.join().unwrap())
    });
    let report = src.expect("precopy completes");
    let dst_report = dst.expect("the destination succeeds");
    assert!(report.postcopy.is_none());
    assert!(dst_report.postcopy.is_none());
    assert!(writer.written.load(Ordering::Relaxed) > 0);
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 1);
    same_bytes(&src_mem, &dst_mem).expect("destination RAM equals source RAM");
}

/// Postcopy recovery, in the manner of QEMU's `postcopy/recovery/plain`
/// and `recovery/double-failures`: the link is cut in postcopy, both sides
/// pause (the destination's reader blocks on its fault, nothing is written
/// wrongly, the source's guest stays paused and both say so), then the source
/// comes back with a resume naming the session and the migration completes,
/// every page equal to the source's. With `fail_first`, the first resume's
/// connection breaks during its handshake (a second failure), both sides
/// hold again, and a second resume completes. With `wrong_session`, a resume
/// naming another session is refused first and changes nothing.
fn recovery_scenario(fail_first: bool, wrong_session: bool, memfd: bool) {
    let size = 32 * MIB;
    let pages = size / PAGE_SIZE;
    let src_mem = memory(size);
    let (dst_mem, _seconds, parts) = destination_memory(size, memfd);
    // SAFETY: the second mappings live until the end of the test.
    let second_ram = unsafe { Ram::from_raw(&parts) };
    let second = memfd.then_some(&second_ram);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let Endpoint::Tcp(target) = listener.local_endpoint().unwrap() else {
        panic!("tcp")
    };
    let proxy = Proxy::start(target);
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let src_base = src_mem.regions()[0].host_ptr() as usize;
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(src_base, pages, 64);
    let mut reader = Reader::new(dst_mem.regions()[0].host_ptr() as usize, src_base, pages);
    let started = reader.started.clone();
    let transport = Transport::Uring(UringConfig::default());
    let link = SourceLink {
        endpoint: Endpoint::Tcp(proxy.addr),
        transport,
        bulk_channels: 1,
    };
    let config = SourceConfig {
        bandwidth_cap: Some(16 * MIB),
        offer_postcopy_ram: true,
        postcopy_after_first_pass: true,
        ..SourceConfig::default()
    };
    let mut dconfig = postcopy_dest(transport);
    dconfig.timeouts.handshake = Duration::from_secs(5).as_nanos() as u64;
    let (src, dst) = thread::scope(|s| {
        let dst = s.spawn(|| match second {
            Some(second) => {
                destination::receive_in_place(&listener, &dst_ram, second, &mut reader, &dconfig)
            }
            None => destination::receive_with(&listener, &dst_ram, &mut reader, &dconfig),
        });
        s.spawn(|| {
            while !started.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(5));
            }
            thread::sleep(Duration::from_millis(150));
            proxy.cut();
        });
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        (src, dst.join().unwrap())
    });
    // The source says what happened and keeps its guest paused.
    let err = src.expect_err("the source sees the link go");
    assert!(err.to_string().contains("stays paused"), "{err}");
    let SourceError::PostcopyInterrupted { hold: shold, .. } = err else {
        panic!("not interrupted in postcopy: {err}")
    };
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 1);
    // The destination holds the guest, its faults waiting.
    let derr = dst.expect_err("the destination sees the link go");
    assert!(derr.go_received);
    assert!(
        matches!(derr.kind, DestinationErrorKind::PostcopyLost { .. }),
        "{derr}"
    );
    let mut dhold = derr.postcopy_hold.expect("the destination holds the guest");
    let missing_before = dhold.missing_pages;
    assert!(missing_before > 0 && !dhold.missing_runs.is_empty());
    assert_eq!(shold.session, dhold.session, "both sides name one session");
    assert_ne!(shold.session, 0);
    // Paused on both sides: the reader waits on its fault.
    thread::sleep(Duration::from_millis(200));
    let a = reader.checked.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        reader.checked.load(Ordering::Relaxed),
        a,
        "the reader waits"
    );
    assert_eq!(reader.mismatches.load(Ordering::Relaxed), 0);
    // Every page the destination has is the source's final copy.
    let dst_base = dst_mem.regions()[0].host_ptr() as usize;
    let missing: std::collections::HashSet<u64> = dhold
        .missing_runs
        .iter()
        .flat_map(|&(_, f, c)| f..f + u64::from(c))
        .collect();
    for p in (0..pages).filter(|p| !missing.contains(p)) {
        let off = (p * PAGE_SIZE) as usize;
        // SAFETY: the page is present on the destination; the source is paused.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts((dst_base + off) as *const u8, PAGE_SIZE as usize),
                std::slice::from_raw_parts((src_base + off) as *const u8, PAGE_SIZE as usize),
            )
        };
        assert_eq!(x, y, "page {p}");
    }

    if wrong_session {
        let mut other = (*shold).clone();
        other.session ^= 0x5a5a_5a5a;
        let (s_err, d_err) = thread::scope(|s| {
            let d = s.spawn(|| {
                destination::resume_postcopy(
                    &listener,
                    &dst_ram,
                    second,
                    &dhold,
                    &mut reader,
                    &dconfig,
                )
            });
            let r = source::resume_postcopy(&src_ram, &config, &link, &other, &mut |_| {});
            (r, d.join().unwrap())
        });
        let s_err = s_err.expect_err("a resume of another session is refused");
        assert!(
            matches!(s_err, SourceError::PostcopyInterrupted { .. }),
            "{s_err}"
        );
        let d_err = d_err.expect_err("the destination refuses it");
        eprintln!("wrong session: source: {s_err}\ndestination: {d_err}");
        assert!(d_err.to_string().contains("resumes session"), "{d_err}");
        dhold = d_err.postcopy_hold.expect("still held");
        assert_eq!(dhold.missing_pages, missing_before, "nothing was taken");
    }
    let mut shold = shold;
    if fail_first {
        // The resume's control connection breaks at once: a second failure,
        // during the recovery handshake.
        proxy.drop_next.store(1, Ordering::Release);
        let (s_err, d_err) = thread::scope(|s| {
            let d = s.spawn(|| {
                destination::resume_postcopy(
                    &listener,
                    &dst_ram,
                    second,
                    &dhold,
                    &mut reader,
                    &dconfig,
                )
            });
            let r = source::resume_postcopy(&src_ram, &config, &link, &shold, &mut |_| {});
            (r, d.join().unwrap())
        });
        let SourceError::PostcopyInterrupted { hold, .. } =
            s_err.expect_err("the first resume fails")
        else {
            panic!("not interrupted")
        };
        shold = hold;
        let d_err = d_err.expect_err("the destination's first resume fails");
        eprintln!("double failure: destination: {d_err}");
        dhold = d_err.postcopy_hold.expect("held again");
    }
    let (s_ok, d_ok) = thread::scope(|s| {
        let d = s.spawn(|| {
            destination::resume_postcopy(&listener, &dst_ram, second, &dhold, &mut reader, &dconfig)
        });
        let r = source::resume_postcopy(&src_ram, &config, &link, &shold, &mut |_| {});
        (r, d.join().unwrap())
    });
    let s_report = s_ok.expect("the resumed migration completes on the source");
    let d_report = d_ok.expect("the resumed migration completes on the destination");
    eprintln!(
        "resumed: {missing_before} pages were missing; source sent {} bytes",
        s_report.bytes_sent
    );
    assert!(d_report.postcopy.is_some());
    let served = s_report.postcopy.expect("postcopy report").pages_requested;
    assert!(
        served >= missing_before,
        "every missing page was asked for and served: {served} of {missing_before}"
    );
    thread::sleep(Duration::from_millis(100));
    assert!(
        reader.checked.load(Ordering::Relaxed) > a,
        "the reader runs again"
    );
    reader.join();
    assert_eq!(
        writer.resumes.load(Ordering::Relaxed),
        0,
        "never resumed on the source"
    );
    assert_eq!(reader.mismatches.load(Ordering::Relaxed), 0);
    same_bytes(&src_mem, &dst_mem).expect("destination RAM equals source RAM");
    drop(dhold);
}

#[test]
fn postcopy_recovery_plain_completes_after_a_cut() {
    recovery_scenario(false, false, false);
}

#[test]
fn postcopy_recovery_survives_a_second_failure_in_its_handshake() {
    recovery_scenario(true, false, false);
}

#[test]
fn postcopy_recovery_refuses_another_session_and_keeps_the_hold() {
    recovery_scenario(false, true, false);
}

#[test]
fn postcopy_recovery_into_memfd_ram_completes_after_a_cut() {
    recovery_scenario(false, false, true);
}

#[test]
fn postcopy_recovery_into_memfd_ram_survives_a_second_failure() {
    recovery_scenario(true, false, true);
}
