//! A short run of the fault-injection trials (`src/bin/fault_trials.rs`):
//! eight seeded trials of resets and kills (stalls take up to 45 s each and
//! are left to `make faults`), each real `ferry send` → `ferry receive`
//! migration of a 64 MiB KVM guest through the fault proxy. None may end with
//! the guest lost, on both sides, with wrong memory, or hung.
//!
//! The `ferry` binary must sit next to `fault_trials` (`cargo test
//! --workspace --release` builds it); without it the test fails.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn eight_trials_lose_nothing() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        return;
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
        .args(["--trials", "8", "--seed", "1", "--faults", "reset,kill"])
        .args(["--kill-window-ms", "800", "--bound-s", "40", "--json"])
        .output()
        .expect("fault_trials runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("fault_trials printed no JSON ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(v["trials"], 8, "{stdout}");
    assert_eq!(
        v["failures"], 0,
        "trials ended lost, both, wrong or hung: {}",
        v["by_class"]
    );
    assert!(out.status.success(), "fault_trials exited {:?}", out.status);
    eprintln!(
        "8 trials in {:.0} s: {}",
        t.elapsed().as_secs_f64(),
        v["by_class"]
    );
}
