//! Runs the example: a KVM guest on vm-memory migrates with Ferry to a second memory while it
//! and its emulated device keep writing, then runs on from there. Prints what happened.
//!
//! `ferry-embed-example [LOW_MIB HIGH_MIB]` (default 64 64: 128 MiB of guest RAM).

use std::process::ExitCode;

use ferry_embed_example::guest::Shape;
use ferry_embed_example::{migrate_example, Config};

fn main() -> ExitCode {
    let mut config = Config::default();
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u64>().unwrap_or(0))
        .collect();
    if let [low, high] = args[..] {
        config.shape = Shape {
            low: low << 20,
            high: high << 20,
        };
    } else if !args.is_empty() {
        eprintln!("usage: ferry-embed-example [LOW_MIB HIGH_MIB]");
        return ExitCode::FAILURE;
    }
    let o = match migrate_example(&config) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ferry-embed-example: {e}");
            return ExitCode::FAILURE;
        }
    };
    let s = &o.source;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "guest: {:.0} MiB in 2 vm-memory regions ({} pages), 1 vCPU, dirty tracking: {}",
        mib(o.guest_bytes),
        o.guest_pages,
        o.tracker
    );
    println!(
        "migrated in {:.1} ms ({} transport): {} pages sent with data + {} as zero runs = {:.2}x the guest's pages, {} round(s) after the first pass, {:.1} MiB on the wire",
        o.elapsed.as_secs_f64() * 1e3,
        s.transport,
        s.pages_sent,
        s.zero_pages,
        (s.pages_sent + s.zero_pages) as f64 / o.guest_pages as f64,
        s.rounds,
        mib(s.bytes_sent)
    );
    println!(
        "downtime on the source (pause to go): {:.2} ms",
        s.source_downtime_ns as f64 / 1e6
    );
    println!(
        "the guest counted from {} to {} during the migration; the device wrote {} pages through the VMM's mapping, {} report(s) came only from its marks",
        o.counter_at_start, o.counter_at_pause, o.device_writes, o.vmm_only_reports
    );
    let m = &o.mismatch;
    if m.differing == 0 {
        println!(
            "destination memory equals the paused source's: {} pages compared byte for byte",
            m.pages
        );
    } else {
        println!(
            "DESTINATION DIFFERS: {} of {} pages, the first at guest address {:#x}",
            m.differing,
            m.pages,
            m.first.unwrap_or(0)
        );
    }
    println!(
        "on the destination the guest counted on, to {}",
        o.counter_on_destination
    );
    if m.differing == 0 && o.counter_on_destination > o.counter_at_pause {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
