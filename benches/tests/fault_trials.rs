//! A short run of the fault-injection trials (`src/bin/fault_trials.rs`):
//! 42 seeded trials (24 in precopy and at the handover, 8 with postcopy, one
//! cut in the middle of postcopy that must be recovered, and 9 of those
//! encrypted; stalls take up to 45 s each and are left to `make faults`),
//! each a real `ferry send` →
//! `ferry receive` migration of a 64 MiB KVM guest through the fault proxy.
//! None may end with the guest lost, on both sides, with wrong memory, or
//! hung.
//!
//! The `ferry` binary must sit next to `fault_trials` (`cargo test
//! --workspace --release` builds it); without it the test fails.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Runs `fault_trials` with `args`, asserts that no trial failed, and returns
/// its JSON summary.
fn trials(args: &[&str], n: u64) -> Option<serde_json::Value> {
    // One run at a time: the guests of parallel runs would share two cores.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        return None;
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_fault_trials"));
    let ferry = bin.with_file_name("ferry");
    assert!(
        ferry.exists(),
        "{} is missing: build it first with `cargo build --release -p ferry-cli --bin ferry` \
         (or run the whole workspace's tests, which build it)",
        ferry.display()
    );
    let t = Instant::now();
    let out = Command::new(bin)
        .args(["--trials", &n.to_string()])
        .args(args)
        .arg("--json")
        .output()
        .expect("fault_trials runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("fault_trials printed no JSON ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(v["trials"], n, "{stdout}");
    assert_eq!(
        v["failures"], 0,
        "trials ended lost, both, wrong or hung: {}",
        v["by_class"]
    );
    assert!(out.status.success(), "fault_trials exited {:?}", out.status);
    eprintln!(
        "{n} trials in {:.0} s: {}",
        t.elapsed().as_secs_f64(),
        v["by_class"]
    );
    Some(v)
}

/// Precopy and the handover: resets, kills, faults on the return path at
/// the handover, and cuts.
#[test]
fn precopy_trials_lose_nothing() {
    trials(
        &[
            "--seed",
            "1",
            "--faults",
            "reset,kill,handover,cut",
            "--kill-window-ms",
            "800",
            "--bound-s",
            "40",
        ],
        24,
    );
}

/// Postcopy: cuts (most of them in postcopy, which then resumes) and kills.
#[test]
fn postcopy_trials_lose_nothing() {
    trials(
        &[
            "--seed",
            "2",
            "--postcopy",
            "--faults",
            "cut,kill",
            "--kill-window-ms",
            "2500",
            "--bound-s",
            "40",
        ],
        8,
    );
}

/// A cut in the middle of postcopy: both sides hold, reconnect, and the
/// migration completes with the guest verifying its memory on the
/// destination.
#[test]
fn a_cut_in_postcopy_is_recovered() {
    let Some(v) = trials(&["--postcopy", "--fault", "cut:72000000"], 1) else {
        return;
    };
    assert_eq!(v["results"][0]["class"], "recovered", "{v}");
}

/// Encrypted migrations (TLS 1.3, a pre-shared key): resets, kills and cuts
/// of the encrypted connections lose nothing either.
#[test]
fn encrypted_trials_lose_nothing() {
    trials(
        &[
            "--tls",
            "--seed",
            "3",
            "--faults",
            "reset,kill,cut",
            "--kill-window-ms",
            "800",
            "--bound-s",
            "40",
        ],
        8,
    );
}

/// An encrypted postcopy cut in the middle: the resume's new connections
/// run their own handshakes, bound to the new session, and the migration
/// completes.
#[test]
fn an_encrypted_cut_in_postcopy_is_recovered() {
    let Some(v) = trials(&["--tls", "--postcopy", "--fault", "cut:72000000"], 1) else {
        return;
    };
    assert_eq!(v["results"][0]["class"], "recovered", "{v}");
}
